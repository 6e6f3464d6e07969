//! The host side of a workload's veth: its sysctls, one list for the two writers (REFERENCE
//! §4/§5). The CNI plugin writes every one that applies at ADD, before the host side comes
//! up (so the pod works before Felix's next pass, and IPv6 DAD is off before the link-local
//! address appears), as Calico's `configureSysctls` (cni-plugin
//! `pkg/dataplane/linux/dataplane_linux.go`) does. After the ADD each setting has one
//! keeper: [`Owner::Felix`] for the three Felix puts back when they drift, and
//! [`Owner::Cni`] for those only the ADD writes. Calico's Felix (`configureInterface` in
//! `felix/dataplane/linux/endpoint_mgr.go`) also keeps `route_localnet` and `proxy_ndp`;
//! ours does not yet (the split is the one this project had before the list was shared).
//! Ground level: both `cni` and `felix` read it, neither imports the other.

/// Which address family a setting belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// Written for every workload (the CNI plugin writes them whatever the pod's
    /// addresses).
    V4,
    /// Written only for a workload with IPv6 addresses.
    V6,
}

/// Who keeps a setting right after the CNI plugin's ADD.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner {
    /// Only the CNI plugin's ADD writes it (settings that matter while the link comes up,
    /// and those our Felix does not keep yet).
    Cni,
    /// Felix keeps it: each full pass, and each repair of the interface, writes it when
    /// it differs.
    Felix,
}

/// One per-interface sysctl: `/proc/sys/net/<dir>/<interface>/<name>` = `value`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostSysctl {
    /// `ipv4/conf`, `ipv4/neigh` or `ipv6/conf`.
    pub dir: &'static str,
    pub name: &'static str,
    pub value: &'static str,
    pub family: Family,
    pub owner: Owner,
}

impl HostSysctl {
    /// The file of this setting for interface `ifname`.
    pub fn path(&self, ifname: &str) -> String {
        format!("/proc/sys/net/{}/{ifname}/{}", self.dir, self.name)
    }
}

const fn setting(
    dir: &'static str,
    name: &'static str,
    value: &'static str,
    family: Family,
    owner: Owner,
) -> HostSysctl {
    HostSysctl {
        dir,
        name,
        value,
        family,
        owner,
    }
}

/// The host veth's sysctls, in the order the CNI plugin writes them.
pub const HOST_VETH_SYSCTLS: &[HostSysctl] = &[
    // Proxy ARP: the host answers the pod's ARP for its gateway 169.254.1.1 with its own
    // MAC, so no address is needed on the host side.
    setting("ipv4/conf", "proxy_arp", "1", Family::V4, Owner::Felix),
    // No delay before those proxy answers: not needed in a Calico network.
    setting("ipv4/neigh", "proxy_delay", "0", Family::V4, Owner::Felix),
    // Forward packets coming from the pod.
    setting("ipv4/conf", "forwarding", "1", Family::V4, Owner::Felix),
    // Routing to localhost, for NAT to the host.
    setting("ipv4/conf", "route_localnet", "1", Family::V4, Owner::Cni),
    // No duplicate address detection on a point-to-point link: it would delay the
    // addresses by up to a second. Must precede the link coming up.
    setting("ipv6/conf", "accept_dad", "0", Family::V6, Owner::Cni),
    // Without IPv6 the host side gets no link-local address (the pod's IPv6 gateway).
    setting("ipv6/conf", "disable_ipv6", "0", Family::V6, Owner::Cni),
    // Proxy NDP, the IPv6 counterpart of proxy ARP.
    setting("ipv6/conf", "proxy_ndp", "1", Family::V6, Owner::Cni),
    setting("ipv6/conf", "forwarding", "1", Family::V6, Owner::Cni),
    // Router advertisements from a pod are not to be believed.
    setting("ipv6/conf", "accept_ra", "0", Family::V6, Owner::Cni),
];

/// What the CNI plugin writes at ADD (IPv6's only for a pod with IPv6 addresses).
pub fn written_at_add(v6: bool) -> impl Iterator<Item = &'static HostSysctl> {
    HOST_VETH_SYSCTLS
        .iter()
        .filter(move |s| s.family == Family::V4 || v6)
}

/// What Felix keeps on every workload interface.
pub fn kept_by_felix() -> impl Iterator<Item = &'static HostSysctl> {
    HOST_VETH_SYSCTLS.iter().filter(|s| s.owner == Owner::Felix)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(it: impl Iterator<Item = &'static HostSysctl>) -> Vec<String> {
        it.map(|s| s.path("caliX")).collect()
    }

    /// One entry per file: a setting cannot have two values or two owners.
    #[test]
    fn each_setting_is_listed_once() {
        let mut paths = names(HOST_VETH_SYSCTLS.iter());
        let n = paths.len();
        paths.sort();
        paths.dedup();
        assert_eq!(paths.len(), n, "{paths:?}");
    }

    /// The CNI plugin writes the whole list at ADD (REFERENCE §4), IPv6's for IPv6 pods.
    #[test]
    fn the_cni_plugin_writes_every_setting_at_add() {
        assert_eq!(
            names(written_at_add(false)),
            [
                "/proc/sys/net/ipv4/conf/caliX/proxy_arp",
                "/proc/sys/net/ipv4/neigh/caliX/proxy_delay",
                "/proc/sys/net/ipv4/conf/caliX/forwarding",
                "/proc/sys/net/ipv4/conf/caliX/route_localnet",
            ]
        );
        assert_eq!(written_at_add(true).count(), HOST_VETH_SYSCTLS.len());
    }

    /// Felix keeps proxy ARP, its delay and forwarding (REFERENCE §5) and nothing the
    /// link's coming up depends on: DAD and IPv6 itself stay the CNI plugin's.
    #[test]
    fn felix_keeps_the_proxy_arp_settings_and_the_cni_plugin_the_rest() {
        assert_eq!(
            names(kept_by_felix()),
            [
                "/proc/sys/net/ipv4/conf/caliX/proxy_arp",
                "/proc/sys/net/ipv4/neigh/caliX/proxy_delay",
                "/proc/sys/net/ipv4/conf/caliX/forwarding",
            ]
        );
        for s in HOST_VETH_SYSCTLS {
            if ["accept_dad", "disable_ipv6"].contains(&s.name) {
                assert_eq!(s.owner, Owner::Cni, "{s:?}");
            }
        }
    }
}
