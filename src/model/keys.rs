//! etcd key layout (REFERENCE §1): v3 resources and the IPAM v2 records.

use ipnet::IpNet;

/// Prefix of every v3 resource key.
pub const RESOURCE_PREFIX: &str = "/calico/resources/v3/projectcalico.org/";
/// Prefix of every IPAM record.
pub const IPAM_PREFIX: &str = "/calico/ipam/v2/";
/// The IPAM configuration record.
pub const IPAM_CONFIG_KEY: &str = "/calico/ipam/v2/config";

/// Key of a v3 resource: `<prefix><plural>[/<namespace>]/<name>`.
pub fn resource_key(plural: &str, namespace: Option<&str>, name: &str) -> String {
    match namespace {
        Some(ns) => format!("{RESOURCE_PREFIX}{plural}/{ns}/{name}"),
        None => format!("{RESOURCE_PREFIX}{plural}/{name}"),
    }
}

/// Prefix listing every resource of a kind (optionally one namespace of it).
pub fn resource_prefix(plural: &str, namespace: Option<&str>) -> String {
    match namespace {
        Some(ns) => format!("{RESOURCE_PREFIX}{plural}/{ns}/"),
        None => format!("{RESOURCE_PREFIX}{plural}/"),
    }
}

/// A parsed v3 resource key.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ResourceKey {
    pub plural: String,
    pub namespace: Option<String>,
    pub name: String,
}

/// Split a v3 resource key into plural, namespace and name.
pub fn parse_resource_key(key: &str) -> Option<ResourceKey> {
    let rest = key.strip_prefix(RESOURCE_PREFIX)?;
    let parts: Vec<&str> = rest.split('/').collect();
    match parts.as_slice() {
        [plural, name] if !name.is_empty() => Some(ResourceKey {
            plural: plural.to_string(),
            namespace: None,
            name: name.to_string(),
        }),
        [plural, ns, name] if !name.is_empty() => Some(ResourceKey {
            plural: plural.to_string(),
            namespace: Some(ns.to_string()),
            name: name.to_string(),
        }),
        _ => None,
    }
}

fn family(net: &IpNet) -> &'static str {
    match net {
        IpNet::V4(_) => "ipv4",
        IpNet::V6(_) => "ipv6",
    }
}

/// CIDR as it appears in IPAM keys: the first `/` becomes `-`.
pub fn cidr_key_part(net: &IpNet) -> String {
    net.to_string().replacen('/', "-", 1)
}

/// `/calico/ipam/v2/assignment/ipv4/block/10.65.0.0-26`
pub fn block_key(cidr: &IpNet) -> String {
    format!(
        "{IPAM_PREFIX}assignment/{}/block/{}",
        family(cidr),
        cidr_key_part(cidr)
    )
}

/// `/calico/ipam/v2/host/<node>/ipv4/block/10.65.0.0-26`
pub fn affinity_key(host: &str, cidr: &IpNet) -> String {
    format!(
        "{IPAM_PREFIX}host/{host}/{}/block/{}",
        family(cidr),
        cidr_key_part(cidr)
    )
}

/// `/calico/ipam/v2/handle/<handleID>`
pub fn handle_key(handle_id: &str) -> String {
    format!("{IPAM_PREFIX}handle/{handle_id}")
}

/// What an IPAM key names.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum IpamKey {
    Block(IpNet),
    Affinity { host: String, cidr: IpNet },
    Handle(String),
    Config,
}

fn parse_cidr_part(s: &str) -> Option<IpNet> {
    s.replacen('-', "/", 1).parse().ok()
}

/// Parse an IPAM key.
pub fn parse_ipam_key(key: &str) -> Option<IpamKey> {
    if key == IPAM_CONFIG_KEY {
        return Some(IpamKey::Config);
    }
    let rest = key.strip_prefix(IPAM_PREFIX)?;
    let parts: Vec<&str> = rest.split('/').collect();
    match parts.as_slice() {
        ["assignment", "ipv4" | "ipv6", "block", c] => parse_cidr_part(c).map(IpamKey::Block),
        ["host", host, "ipv4" | "ipv6", "block", c] => Some(IpamKey::Affinity {
            host: host.to_string(),
            cidr: parse_cidr_part(c)?,
        }),
        ["handle", id] => Some(IpamKey::Handle(id.to_string())),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_keys_match_calico_layout() {
        assert_eq!(
            resource_key("ippools", None, "default-ipv4-ippool"),
            "/calico/resources/v3/projectcalico.org/ippools/default-ipv4-ippool"
        );
        assert_eq!(
            resource_key("workloadendpoints", Some("default"), "n1-k8s-p-eth0"),
            "/calico/resources/v3/projectcalico.org/workloadendpoints/default/n1-k8s-p-eth0"
        );
        let k = parse_resource_key(
            "/calico/resources/v3/projectcalico.org/workloadendpoints/ns1/n1-k8s-p-eth0",
        )
        .unwrap();
        assert_eq!(k.plural, "workloadendpoints");
        assert_eq!(k.namespace.as_deref(), Some("ns1"));
        assert_eq!(k.name, "n1-k8s-p-eth0");
        assert!(parse_resource_key("/calico/resources/v3/projectcalico.org/ippools/").is_none());
    }

    #[test]
    fn ipam_keys_replace_the_first_slash() {
        let b: IpNet = "10.65.0.0/26".parse().unwrap();
        assert_eq!(
            block_key(&b),
            "/calico/ipam/v2/assignment/ipv4/block/10.65.0.0-26"
        );
        assert_eq!(
            affinity_key("node-1", &b),
            "/calico/ipam/v2/host/node-1/ipv4/block/10.65.0.0-26"
        );
        let b6: IpNet = "fd00::/122".parse().unwrap();
        assert_eq!(
            block_key(&b6),
            "/calico/ipam/v2/assignment/ipv6/block/fd00::-122"
        );
        assert_eq!(parse_ipam_key(&block_key(&b6)), Some(IpamKey::Block(b6)));
        assert_eq!(
            parse_ipam_key("/calico/ipam/v2/host/node-1/ipv4/block/10.65.0.0-26"),
            Some(IpamKey::Affinity {
                host: "node-1".into(),
                cidr: b
            })
        );
        assert_eq!(
            parse_ipam_key("/calico/ipam/v2/handle/k8s-pod-network.abc"),
            Some(IpamKey::Handle("k8s-pod-network.abc".into()))
        );
        assert_eq!(parse_ipam_key(IPAM_CONFIG_KEY), Some(IpamKey::Config));
    }
}
