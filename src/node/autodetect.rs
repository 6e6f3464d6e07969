//! Calico's IPv4 autodetection (`IP_AUTODETECTION_METHOD`): which of the node's addresses
//! becomes `Node.spec.bgp.ipv4Address`. Interfaces Calico itself creates or that belong to
//! other software (cali*, tunl*, vxlan.calico, docker*, kube-ipvs*, ...) are never chosen,
//! the "wrong node IP" complaint of REFERENCE §8.

use std::net::{IpAddr, Ipv4Addr, ToSocketAddrs, UdpSocket};

use ipnet::Ipv4Net;
use regex::Regex;

/// Interfaces Calico never autodetects from (Calico's default exclusion list).
const EXCLUDED: &[&str] = &[
    "^docker.*",
    "^cbr.*",
    "^dummy.*",
    "^virbr.*",
    "^lxcbr.*",
    "^veth.*",
    "^lo$",
    "^cali.*",
    "^tunl.*",
    "^flannel.*",
    "^kube-ipvs.*",
    "^cni.*",
    "^vxlan.calico.*",
    "^vxlan-v6.calico.*",
    "^wireguard.cali.*",
    "^egress.calico.*",
    "^nodelocaldns.*",
];

/// Interfaces never chosen even when a user's `interface=` regex matches them.
const NEVER: &[&str] = &[
    "^lo$",
    "^cali.*",
    "^tunl.*",
    "^vxlan.calico.*",
    "^vxlan-v6.calico.*",
];

/// A user-given interface regex, anchored to the whole name; compared by its text.
#[derive(Debug, Clone)]
pub struct IfaceRegex(Regex);

impl IfaceRegex {
    fn new(pattern: &str) -> Result<Self, regex::Error> {
        Regex::new(&format!("^(?:{pattern})$")).map(IfaceRegex)
    }
    fn matches(&self, name: &str) -> bool {
        self.0.is_match(name)
    }
}

impl PartialEq for IfaceRegex {
    fn eq(&self, other: &Self) -> bool {
        self.0.as_str() == other.0.as_str()
    }
}

impl Eq for IfaceRegex {}

/// `IP_AUTODETECTION_METHOD`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AutodetectionMethod {
    /// `first-found` (default): the first valid address of the first usable interface.
    FirstFound,
    /// `interface=REGEX[,REGEX]`: the first matching interface.
    Interface(Vec<IfaceRegex>),
    /// `skip-interface=REGEX[,REGEX]`: first-found, also skipping matching interfaces.
    SkipInterface(Vec<IfaceRegex>),
    /// `can-reach=ADDR`: the address the kernel would use as source toward ADDR.
    CanReach(String),
    /// `cidr=CIDR[,CIDR]`: the first address inside one of the networks.
    Cidr(Vec<Ipv4Net>),
}

/// Why no address could be chosen.
#[derive(Debug, thiserror::Error)]
pub enum AutodetectError {
    /// The method string does not parse.
    #[error("invalid IP_AUTODETECTION_METHOD '{value}': {reason}")]
    InvalidMethod { value: String, reason: String },
    /// The interfaces could not be listed.
    #[error("cannot list network interfaces: {0}")]
    ListInterfaces(String),
    /// No interface had a usable address for the method.
    #[error("no IPv4 address found on interfaces matching {method} (interfaces seen: {seen})")]
    NotFound { method: String, seen: String },
    /// `can-reach` could not resolve or route to the destination.
    #[error("can-reach={dest}: {reason}")]
    CanReach { dest: String, reason: String },
}

fn regex_list(value: &str, list: &str) -> Result<Vec<IfaceRegex>, AutodetectError> {
    let out: Result<Vec<_>, _> = list
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| {
            IfaceRegex::new(p).map_err(|e| AutodetectError::InvalidMethod {
                value: value.into(),
                reason: format!("bad interface regex '{p}': {e}"),
            })
        })
        .collect();
    let out = out?;
    if out.is_empty() {
        return Err(AutodetectError::InvalidMethod {
            value: value.into(),
            reason: "no interface regex given".into(),
        });
    }
    Ok(out)
}

impl AutodetectionMethod {
    /// Parse the variable's value; empty means `first-found`.
    pub fn parse(s: &str) -> Result<Self, AutodetectError> {
        let s = s.trim();
        let invalid = |reason: &str| AutodetectError::InvalidMethod {
            value: s.into(),
            reason: reason.into(),
        };
        if s.is_empty() || s == "first-found" {
            return Ok(AutodetectionMethod::FirstFound);
        }
        let (kind, arg) = s.split_once('=').ok_or_else(|| {
            invalid("expected first-found, interface=, skip-interface=, can-reach= or cidr=")
        })?;
        match kind {
            "interface" => Ok(AutodetectionMethod::Interface(regex_list(s, arg)?)),
            "skip-interface" => Ok(AutodetectionMethod::SkipInterface(regex_list(s, arg)?)),
            "can-reach" if !arg.trim().is_empty() => {
                Ok(AutodetectionMethod::CanReach(arg.trim().to_string()))
            }
            "can-reach" => Err(invalid("can-reach needs an address or host name")),
            "cidr" => {
                let nets: Result<Vec<Ipv4Net>, _> = arg
                    .split(',')
                    .map(str::trim)
                    .filter(|c| !c.is_empty())
                    .map(|c| {
                        c.parse::<Ipv4Net>()
                            .map(|n| n.trunc())
                            .map_err(|_| invalid(&format!("'{c}' is not an IPv4 CIDR")))
                    })
                    .collect();
                let nets = nets?;
                if nets.is_empty() {
                    return Err(invalid("cidr needs at least one CIDR"));
                }
                Ok(AutodetectionMethod::Cidr(nets))
            }
            _ => Err(invalid(
                "expected first-found, interface=, skip-interface=, can-reach= or cidr=",
            )),
        }
    }

    /// The method as the user writes it (`interface=eth0`).
    pub fn describe(&self) -> String {
        let res = |v: &[IfaceRegex]| {
            v.iter()
                .map(|r| {
                    r.0.as_str()
                        .trim_start_matches("^(?:")
                        .trim_end_matches(")$")
                        .to_string()
                })
                .collect::<Vec<_>>()
                .join(",")
        };
        match self {
            AutodetectionMethod::FirstFound => "first-found".into(),
            AutodetectionMethod::Interface(v) => format!("interface={}", res(v)),
            AutodetectionMethod::SkipInterface(v) => format!("skip-interface={}", res(v)),
            AutodetectionMethod::CanReach(d) => format!("can-reach={d}"),
            AutodetectionMethod::Cidr(n) => format!(
                "cidr={}",
                n.iter()
                    .map(|n| n.to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            ),
        }
    }
}

/// An interface and its IPv4 addresses with prefix lengths.
#[derive(Debug, Clone)]
pub struct InterfaceAddrs {
    pub name: String,
    pub index: u32,
    pub up: bool,
    pub addrs: Vec<Ipv4Net>,
}

/// The interfaces of the current network namespace, by index.
pub fn list_interfaces() -> Result<Vec<InterfaceAddrs>, AutodetectError> {
    use nix::net::if_::InterfaceFlags;
    let addrs =
        nix::ifaddrs::getifaddrs().map_err(|e| AutodetectError::ListInterfaces(e.to_string()))?;
    let mut out: Vec<InterfaceAddrs> = Vec::new();
    for a in addrs {
        let idx = out
            .iter()
            .position(|i| i.name == a.interface_name)
            .unwrap_or_else(|| {
                let index =
                    nix::net::if_::if_nametoindex(a.interface_name.as_str()).unwrap_or(u32::MAX);
                out.push(InterfaceAddrs {
                    name: a.interface_name.clone(),
                    index,
                    up: false,
                    addrs: Vec::new(),
                });
                out.len() - 1
            });
        let iface = &mut out[idx];
        iface.up |= a.flags.contains(InterfaceFlags::IFF_UP);
        let ip = a
            .address
            .as_ref()
            .and_then(|s| s.as_sockaddr_in())
            .map(|s| s.ip());
        let mask = a
            .netmask
            .as_ref()
            .and_then(|s| s.as_sockaddr_in())
            .map(|s| s.ip());
        if let (Some(ip), Some(mask)) = (ip, mask) {
            let prefix = u32::from(mask).leading_ones() as u8;
            if let Ok(net) = Ipv4Net::new(ip, prefix) {
                iface.addrs.push(net);
            }
        }
    }
    out.sort_by_key(|i| i.index);
    Ok(out)
}

fn matches_any(patterns: &[&str], name: &str) -> bool {
    patterns
        .iter()
        .any(|p| Regex::new(p).is_ok_and(|r| r.is_match(name)))
}

/// Loopback, link-local and unspecified addresses are never a node address.
fn usable(addr: Ipv4Addr) -> bool {
    !(addr.is_loopback() || addr.is_link_local() || addr.is_unspecified())
}

fn first_usable<'a>(
    ifaces: impl Iterator<Item = &'a InterfaceAddrs>,
    want: impl Fn(&Ipv4Net) -> bool,
) -> Option<Ipv4Net> {
    ifaces
        .filter(|i| i.up)
        .flat_map(|i| i.addrs.iter())
        .find(|a| usable(a.addr()) && want(a))
        .copied()
}

/// Choose the address per `method` among `interfaces` (pure except for `can-reach`, which
/// asks the kernel for the source address toward the destination).
pub fn autodetect_ipv4(
    method: &AutodetectionMethod,
    interfaces: &[InterfaceAddrs],
) -> Result<Ipv4Net, AutodetectError> {
    let default_ok = |i: &&InterfaceAddrs| !matches_any(EXCLUDED, &i.name);
    let found = match method {
        AutodetectionMethod::FirstFound => {
            first_usable(interfaces.iter().filter(default_ok), |_| true)
        }
        AutodetectionMethod::Interface(res) => first_usable(
            interfaces
                .iter()
                .filter(|i| res.iter().any(|r| r.matches(&i.name)) && !matches_any(NEVER, &i.name)),
            |_| true,
        ),
        AutodetectionMethod::SkipInterface(res) => first_usable(
            interfaces
                .iter()
                .filter(default_ok)
                .filter(|i| !res.iter().any(|r| r.matches(&i.name))),
            |_| true,
        ),
        AutodetectionMethod::Cidr(nets) => {
            first_usable(interfaces.iter().filter(default_ok), |a| {
                nets.iter().any(|n| n.contains(&a.addr()))
            })
        }
        AutodetectionMethod::CanReach(dest) => {
            let src = source_toward(dest)?;
            interfaces
                .iter()
                .flat_map(|i| i.addrs.iter())
                .find(|a| a.addr() == src)
                .copied()
        }
    };
    found.ok_or_else(|| AutodetectError::NotFound {
        method: method.describe(),
        seen: interfaces
            .iter()
            .map(|i| i.name.as_str())
            .collect::<Vec<_>>()
            .join(", "),
    })
}

/// The local address the kernel picks toward `dest` (a UDP connect sends nothing).
fn source_toward(dest: &str) -> Result<Ipv4Addr, AutodetectError> {
    let err = |reason: String| AutodetectError::CanReach {
        dest: dest.into(),
        reason,
    };
    let target = match dest.parse::<IpAddr>() {
        Ok(ip) => std::net::SocketAddr::new(ip, 80),
        Err(_) => (dest, 80)
            .to_socket_addrs()
            .map_err(|e| err(format!("cannot resolve: {e}")))?
            .find(|a| a.is_ipv4())
            .ok_or_else(|| err("no IPv4 address for this name".into()))?,
    };
    let sock = UdpSocket::bind("0.0.0.0:0").map_err(|e| err(e.to_string()))?;
    sock.connect(target)
        .map_err(|e| err(format!("no route: {e}")))?;
    match sock.local_addr().map_err(|e| err(e.to_string()))?.ip() {
        IpAddr::V4(v4) => Ok(v4),
        IpAddr::V6(_) => Err(err("the route uses IPv6".into())),
    }
}

/// List the interfaces of this namespace and choose per `method`.
pub fn detect(method: &AutodetectionMethod) -> Result<Ipv4Net, AutodetectError> {
    autodetect_ipv4(method, &list_interfaces()?)
}

/// The interface address (with its prefix) equal to `addr`, for `IP=a.b.c.d` without a mask.
pub fn find_prefix_for(addr: Ipv4Addr, interfaces: &[InterfaceAddrs]) -> Option<Ipv4Net> {
    interfaces
        .iter()
        .flat_map(|i| i.addrs.iter())
        .find(|a| a.addr() == addr)
        .copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iface(name: &str, index: u32, up: bool, addrs: &[&str]) -> InterfaceAddrs {
        InterfaceAddrs {
            name: name.into(),
            index,
            up,
            addrs: addrs.iter().map(|a| a.parse().unwrap()).collect(),
        }
    }

    fn host() -> Vec<InterfaceAddrs> {
        vec![
            iface("lo", 1, true, &["127.0.0.1/8"]),
            iface("docker0", 2, true, &["172.17.0.1/16"]),
            iface("cali12345", 3, true, &["10.65.0.1/32"]),
            iface("eth0", 4, true, &["169.254.3.3/16", "10.0.0.5/24"]),
            iface("eth1", 5, true, &["192.168.7.2/24"]),
            iface("eth2", 6, false, &["10.9.9.9/24"]),
            iface("tunl0", 7, true, &["10.65.0.2/32"]),
            iface("vxlan.calico", 8, true, &["10.65.0.3/32"]),
            iface("kube-ipvs0", 9, true, &["10.96.0.1/32"]),
        ]
    }

    fn pick(method: &str) -> Result<String, String> {
        let m = AutodetectionMethod::parse(method).map_err(|e| e.to_string())?;
        autodetect_ipv4(&m, &host())
            .map(|n| n.to_string())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn first_found_skips_excluded_loopback_and_link_local() {
        assert_eq!(pick("first-found").unwrap(), "10.0.0.5/24");
        assert_eq!(pick("").unwrap(), "10.0.0.5/24");
    }

    #[test]
    fn interface_regex_is_anchored() {
        assert_eq!(pick("interface=eth1").unwrap(), "192.168.7.2/24");
        assert_eq!(pick("interface=eth.*").unwrap(), "10.0.0.5/24");
        assert!(pick("interface=eth").is_err(), "'eth' must not match eth0");
        assert_eq!(pick("interface=nomatch,eth1").unwrap(), "192.168.7.2/24");
        // Down interfaces and Calico's own devices are never chosen.
        assert!(pick("interface=eth2").is_err());
        assert!(pick("interface=tunl0").is_err());
        assert!(pick("interface=cali.*").is_err());
        // A user may pick an otherwise excluded interface explicitly.
        assert_eq!(pick("interface=docker0").unwrap(), "172.17.0.1/16");
    }

    #[test]
    fn skip_interface_skips_matching_and_defaults() {
        assert_eq!(pick("skip-interface=eth0").unwrap(), "192.168.7.2/24");
        assert_eq!(
            pick("skip-interface=eth[01]").unwrap_err(),
            "no IPv4 address found on interfaces matching skip-interface=eth[01] (interfaces seen: lo, docker0, cali12345, eth0, eth1, eth2, tunl0, vxlan.calico, kube-ipvs0)"
        );
    }

    #[test]
    fn cidr_picks_an_address_inside() {
        assert_eq!(pick("cidr=192.168.0.0/16").unwrap(), "192.168.7.2/24");
        assert_eq!(
            pick("cidr=10.99.0.0/16, 10.0.0.9/24").unwrap(),
            "10.0.0.5/24"
        );
        // Addresses on excluded interfaces do not count.
        assert!(pick("cidr=172.17.0.0/16").is_err());
        assert!(pick("cidr=10.96.0.0/12").is_err());
    }

    #[test]
    fn parse_errors_name_the_variable() {
        assert_eq!(
            pick("eth0").unwrap_err(),
            "invalid IP_AUTODETECTION_METHOD 'eth0': expected first-found, interface=, skip-interface=, can-reach= or cidr="
        );
        assert_eq!(
            pick("cidr=10.0.0.0/33").unwrap_err(),
            "invalid IP_AUTODETECTION_METHOD 'cidr=10.0.0.0/33': '10.0.0.0/33' is not an IPv4 CIDR"
        );
        assert_eq!(
            pick("interface=").unwrap_err(),
            "invalid IP_AUTODETECTION_METHOD 'interface=': no interface regex given"
        );
        assert!(
            pick("interface=(")
                .unwrap_err()
                .contains("bad interface regex '('")
        );
        assert_eq!(
            pick("can-reach=").unwrap_err(),
            "invalid IP_AUTODETECTION_METHOD 'can-reach=': can-reach needs an address or host name"
        );
    }

    #[test]
    fn prefix_is_found_for_a_bare_address() {
        assert_eq!(
            find_prefix_for("192.168.7.2".parse().unwrap(), &host())
                .unwrap()
                .to_string(),
            "192.168.7.2/24"
        );
        assert!(find_prefix_for("10.1.1.1".parse().unwrap(), &host()).is_none());
    }

    #[test]
    fn listing_this_namespace_finds_loopback() {
        let l = list_interfaces().unwrap();
        assert!(
            l.iter()
                .any(|i| i.name == "lo" && i.addrs.iter().any(|a| a.addr().is_loopback()))
        );
    }
}
