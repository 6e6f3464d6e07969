//! NAT outgoing (REFERENCE §5) in nftables, in tables of our own (`ip calico`, and `ip6
//! calico` when there are IPv6 pools): traffic from pools with `natOutgoing` to
//! destinations outside every pool is masqueraded (fully random ports), or SNATed to
//! `natOutgoingAddress`. Calico's names: sets `cali40masq-ipam-pools` and
//! `cali40all-ipam-pools` (`cali60…` for IPv6), chains `cali-POSTROUTING` (the hook) and
//! `cali-nat-outgoing`. Each apply replaces the tables in one transaction; other tables
//! are never touched.

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

/// The nft script that makes our tables exactly what `nat` says.
pub fn script(nat: &Nat) -> String {
    let mut s = String::new();
    for (v6, family, n) in [(false, "ip", "40"), (true, "ip6", "60")] {
        let fam = |net: &&IpNet| net.addr().is_ipv6() == v6;
        let masq = nat.masquerade.iter().filter(fam).copied();
        let all: Vec<IpNet> = nat.all.iter().filter(fam).copied().collect();
        // Declare, then delete: the delete cannot fail, and the whole script is one
        // transaction.
        s += &format!("table {family} calico\ndelete table {family} calico\n");
        if all.is_empty() && v6 {
            continue;
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
        s += &format!(
            "table {family} calico {{\n\
             \tset cali{n}masq-ipam-pools {{\n\t\ttype {addr_type}\n\t\tflags interval\n{}\t}}\n\
             \tset cali{n}all-ipam-pools {{\n\t\ttype {addr_type}\n\t\tflags interval\n{}\t}}\n\
             \tchain cali-nat-outgoing {{\n\
             \t\t{saddr} saddr @cali{n}masq-ipam-pools {saddr} daddr != @cali{n}all-ipam-pools {action}\n\
             \t}}\n\
             \tchain cali-POSTROUTING {{\n\
             \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
             \t\tjump cali-nat-outgoing\n\
             \t}}\n\
             }}\n",
            elements(masq),
            elements(all.into_iter()),
        );
    }
    s
}

/// Apply `nat` with `nft -f -` (in the caller's network namespace).
pub fn apply(nat: &Nat) -> Result<(), NatError> {
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
        .write_all(script(nat).as_bytes())
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
