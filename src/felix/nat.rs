//! NAT outgoing (REFERENCE §5) in nftables, in tables of our own (`ip calico`, and `ip6
//! calico` when there are IPv6 pools): traffic from pools with `natOutgoing` to
//! destinations outside every pool is masqueraded (fully random ports), or SNATed to
//! `natOutgoingAddress`. Calico's names: sets `cali40masq-ipam-pools` and
//! `cali40all-ipam-pools` (`cali60…` for IPv6), chains `cali-POSTROUTING` (the hook) and
//! `cali-nat-outgoing`. Rendered here ([`body`], pure); written with the policy's filter
//! layer in the same table and transaction by `felix::nft`; other tables are never
//! touched.

use ipnet::IpNet;

use super::calc::Nat;

fn elements(nets: impl Iterator<Item = IpNet>) -> String {
    let v: Vec<String> = nets.map(|n| n.to_string()).collect();
    if v.is_empty() {
        String::new()
    } else {
        format!("\t\telements = {{ {} }}\n", v.join(", "))
    }
}

/// The sets and chains of NAT outgoing for one family, as lines inside `table <family>
/// calico { … }`; `None` for IPv6 when no pool is IPv6 (nothing to masquerade). The
/// policy renderer (`felix::nft::render`) puts them in the same table as the filter
/// layer, so that a NAT change and a policy change are one table.
pub(crate) fn body(nat: &Nat, v6: bool) -> Option<String> {
    let n = if v6 { "60" } else { "40" };
    let fam = |net: &&IpNet| net.addr().is_ipv6() == v6;
    let masq = nat.masquerade.iter().filter(fam).copied();
    let all: Vec<IpNet> = nat.all.iter().filter(fam).copied().collect();
    if all.is_empty() && v6 {
        return None;
    }
    let (addr_type, saddr) = if v6 {
        ("ipv6_addr", "ip6")
    } else {
        ("ipv4_addr", "ip")
    };
    let action = match nat.snat_to {
        Some(a) if a.is_ipv6() == v6 => format!("snat to {a}"),
        _ => "masquerade fully-random".to_string(),
    };
    Some(format!(
        "\tset cali{n}masq-ipam-pools {{\n\t\ttype {addr_type}\n\t\tflags interval\n{}\t}}\n\
         \tset cali{n}all-ipam-pools {{\n\t\ttype {addr_type}\n\t\tflags interval\n{}\t}}\n\
         \tchain cali-nat-outgoing {{\n\
         \t\t{saddr} saddr @cali{n}masq-ipam-pools {saddr} daddr != @cali{n}all-ipam-pools {action}\n\
         \t}}\n\
         \tchain cali-POSTROUTING {{\n\
         \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
         \t\tjump cali-nat-outgoing\n\
         \t}}\n",
        elements(masq),
        elements(all.into_iter()),
    ))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    /// Both families' bodies, as the renderer puts them in the tables.
    fn script(nat: &Nat) -> String {
        [false, true]
            .iter()
            .filter_map(|&v6| body(nat, v6))
            .collect()
    }

    fn v4_pools() -> Nat {
        Nat {
            masquerade: BTreeSet::from([net("10.244.0.0/16")]),
            all: BTreeSet::from([net("10.244.0.0/16"), net("10.96.0.0/16")]),
            snat_to: None,
        }
    }

    /// Traffic from natOutgoing pools to destinations outside every pool is masqueraded
    /// with random ports, in Calico's set and chain names.
    #[test]
    fn masquerade_from_nat_pools_to_outside_all_pools() {
        let s = script(&v4_pools());
        assert!(s.contains("set cali40masq-ipam-pools {\n\t\ttype ipv4_addr\n\t\tflags interval\n\t\telements = { 10.244.0.0/16 }\n\t}"), "{s}");
        assert!(
            s.contains("set cali40all-ipam-pools {\n\t\ttype ipv4_addr\n\t\tflags interval\n\t\telements = { 10.96.0.0/16, 10.244.0.0/16 }"),
            "{s}"
        );
        assert!(s.contains("\t\tip saddr @cali40masq-ipam-pools ip daddr != @cali40all-ipam-pools masquerade fully-random\n"), "{s}");
        assert!(s.contains("chain cali-POSTROUTING {\n\t\ttype nat hook postrouting priority srcnat; policy accept;\n\t\tjump cali-nat-outgoing\n"), "{s}");
    }

    /// natOutgoingAddress SNATs its own family; the other family masquerades.
    #[test]
    fn snat_to_the_outgoing_address_of_its_family() {
        let nat = Nat {
            masquerade: BTreeSet::from([net("10.245.0.0/16"), net("fd00:244::/48")]),
            all: BTreeSet::from([net("10.245.0.0/16"), net("fd00:244::/48")]),
            snat_to: Some("10.0.0.100".parse().unwrap()),
        };
        let s = script(&nat);
        assert!(
            s.contains("ip daddr != @cali40all-ipam-pools snat to 10.0.0.100\n"),
            "{s}"
        );
        assert!(body(&nat, true).is_some() && body(&v4_pools(), true).is_none());
        assert!(s.contains("ip6 saddr @cali60masq-ipam-pools ip6 daddr != @cali60all-ipam-pools masquerade fully-random"), "{s}");
        assert!(s.contains("elements = { fd00:244::/48 }"), "{s}");
        assert!(s.contains("type ipv6_addr"), "{s}");
    }
}
