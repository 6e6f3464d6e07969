//! NAT outgoing (REFERENCE §5) in nftables, in tables of our own (`ip calico`, and `ip6
//! calico` when there are IPv6 pools): traffic from pools with `natOutgoing` to
//! destinations outside every pool is masqueraded (fully random ports), or SNATed to
//! `natOutgoingAddress`. Calico's names: sets `cali40masq-ipam-pools` and
//! `cali40all-ipam-pools` (`cali60…` for IPv6), chains `cali-POSTROUTING` (the hook) and
//! `cali-nat-outgoing`. Each apply replaces the tables in one transaction; other tables
//! are never touched.
//!
//! Plan and execute: [`plan`] gives the script when the desired sets differ from those
//! last applied (pure), [`apply`] runs it.

use std::io::Write;
use std::process::{Command, Stdio};

use ipnet::IpNet;

use super::calc::Nat;

#[derive(Debug, thiserror::Error)]
pub enum NatError {
    #[error("cannot run nft (the nftables package): {0}")]
    NoNft(std::io::Error),
    #[error("nft refused the NAT rules: {0}")]
    Refused(String),
}

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

/// The nft script that makes our tables exactly what `nat` says, with NAT alone in them
/// (the daemon writes NAT together with policy: `felix::nft`).
pub fn script(nat: &Nat) -> String {
    let mut s = String::new();
    for (v6, family) in [(false, "ip"), (true, "ip6")] {
        // Declare, then delete: the delete cannot fail, and the whole script is one
        // transaction.
        s += &format!("table {family} calico\ndelete table {family} calico\n");
        if let Some(body) = body(nat, v6) {
            s += &format!("table {family} calico {{\n{body}}}\n");
        }
    }
    s
}

/// What a pass does about NAT: nothing when `desired` is what was last applied
/// successfully, else the script that replaces our tables (one transaction).
pub fn plan(desired: &Nat, applied: Option<&Nat>) -> Option<String> {
    (applied != Some(desired)).then(|| script(desired))
}

/// Apply `desired` unless it is what `applied` holds; `applied` follows each success.
/// Whether nft ran.
pub fn ensure(desired: &Nat, applied: &mut Option<Nat>) -> Result<bool, NatError> {
    let Some(script) = plan(desired, applied.as_ref()) else {
        return Ok(false);
    };
    run_nft(&script)?;
    *applied = Some(desired.clone());
    Ok(true)
}

/// Apply `nat` with `nft -f -` (in the caller's network namespace).
pub fn apply(nat: &Nat) -> Result<(), NatError> {
    run_nft(&script(nat))
}

/// Run `script` with `nft -f -`.
fn run_nft(script: &str) -> Result<(), NatError> {
    let mut child = Command::new(crate::env::program("nft"))
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(NatError::NoNft)?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(script.as_bytes())
        .map_err(NatError::NoNft)?;
    let out = child.wait_with_output().map_err(NatError::NoNft)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(NatError::Refused(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
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

    /// Each apply replaces our tables in one transaction: declared then deleted (so the
    /// delete cannot fail), then made again. No IPv6 pool: the ip6 table only goes.
    #[test]
    fn our_tables_are_replaced_whole_and_ipv6_only_with_ipv6_pools() {
        let s = script(&v4_pools());
        assert!(s.starts_with("table ip calico\ndelete table ip calico\ntable ip calico {\n"));
        assert!(
            s.ends_with("table ip6 calico\ndelete table ip6 calico\n"),
            "{s}"
        );
        // No pool at all: an IPv4 table that matches nothing.
        let s = script(&Nat::default());
        assert!(s.contains("table ip calico {\n"), "{s}");
        assert!(!s.contains("elements"), "{s}");
        assert!(!s.contains("table ip6 calico {"), "{s}");
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
        assert!(s.contains("table ip6 calico {"), "{s}");
        assert!(s.contains("ip6 saddr @cali60masq-ipam-pools ip6 daddr != @cali60all-ipam-pools masquerade fully-random"), "{s}");
        assert!(s.contains("elements = { fd00:244::/48 }"), "{s}");
        assert!(s.contains("type ipv6_addr"), "{s}");
    }

    /// nft runs only when the desired sets differ from those last applied.
    #[test]
    fn applied_again_only_when_the_sets_change() {
        let nat = v4_pools();
        assert_eq!(plan(&nat, None), Some(script(&nat)));
        assert_eq!(plan(&nat, Some(&nat)), None);
        let mut other = nat.clone();
        other.snat_to = Some("10.0.0.100".parse().unwrap());
        assert_eq!(plan(&other, Some(&nat)), Some(script(&other)));
    }

    /// Nothing to apply: nft is not even run, and what was applied stays.
    #[test]
    fn ensure_does_nothing_when_the_tables_are_right() {
        let nat = v4_pools();
        let mut applied = Some(nat.clone());
        assert!(!ensure(&nat, &mut applied).unwrap());
        assert_eq!(applied, Some(nat));
    }
}
