//! NetworkSet (namespaced) and GlobalNetworkSet: labelled lists of networks that policy
//! selectors match like endpoints (REFERENCE §9; Calico's `api/.../v3/networkset.go`,
//! `globalnetworkset.go`, and `validateNetworkSet` in libcalico-go's validator).

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::validate::{Validated, ValidationError};
use super::workload::LABEL_NAMESPACE;
use super::{Kind, ObjectMeta, Resource};

/// A NetworkSet resource (namespaced).
pub type NetworkSet = Resource<NetworkSetSpec>;
/// A GlobalNetworkSet resource.
pub type GlobalNetworkSet = Resource<GlobalNetworkSetSpec>;

/// Calico's `NetworkSetSpec`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NetworkSetSpec {
    /// Networks in CIDR form; a bare address stands for its /32 or /128.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nets: Vec<String>,
}

/// Calico's `GlobalNetworkSetSpec` (the same fields, not namespaced).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GlobalNetworkSetSpec {
    /// Networks in CIDR form; a bare address stands for its /32 or /128.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nets: Vec<String>,
}

/// One entry of `nets` as Calico's `ParseCIDROrIP` reads it: a CIDR (host bits allowed,
/// as Calico's `cidr` validator allows them) or a single address.
pub fn parse_net(value: &str) -> Option<IpNet> {
    value
        .parse::<IpNet>()
        .ok()
        .or_else(|| value.parse::<std::net::IpAddr>().ok().map(IpNet::from))
}

/// The networks of a set, for the policy calculation (entries that do not parse, which
/// validation refuses, are left out).
pub fn networks(nets: &[String]) -> Vec<IpNet> {
    nets.iter()
        .filter_map(|n| parse_net(n))
        .map(|n| n.trunc())
        .collect()
}

/// The checks both kinds share: every net parses; the namespace label is refused
/// (Calico keeps it for mapping the real namespace into the v1 model).
fn validate_set(nets: &[String], meta: &ObjectMeta) -> Validated {
    for (i, n) in nets.iter().enumerate() {
        if parse_net(n).is_none() {
            return Err(ValidationError::new(
                &format!("spec.nets[{i}]"),
                n,
                "not a valid CIDR or IP address",
            ));
        }
    }
    if meta.labels.contains_key(LABEL_NAMESPACE) {
        return Err(ValidationError::new(
            "metadata.labels",
            LABEL_NAMESPACE,
            "projectcalico.org/namespace is not a valid label name",
        ));
    }
    Ok(())
}

impl Kind for NetworkSetSpec {
    const KIND: &'static str = "NetworkSet";
    const PLURAL: &'static str = "networksets";
    const NAMESPACED: bool = true;

    fn set_defaults(&mut self, meta: &mut ObjectMeta) {
        meta.namespace.get_or_insert_with(|| "default".into());
    }

    fn validate(&self, meta: &ObjectMeta) -> Validated {
        validate_set(&self.nets, meta)
    }
}

impl Kind for GlobalNetworkSetSpec {
    const KIND: &'static str = "GlobalNetworkSet";
    const PLURAL: &'static str = "globalnetworksets";

    fn validate(&self, meta: &ObjectMeta) -> Validated {
        validate_set(&self.nets, meta)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::prepare_resource;

    #[test]
    fn calicos_examples_round_trip() {
        // Calico's documented examples, as its client stores them.
        let ns = r#"{"kind":"NetworkSet","apiVersion":"projectcalico.org/v3","metadata":{"name":"external-database","namespace":"staging","labels":{"role":"db"}},"spec":{"nets":["198.51.100.0/28","203.0.113.0/24"]}}"#;
        let r: NetworkSet = serde_json::from_str(ns).unwrap();
        assert_eq!(
            r.key(),
            "/calico/resources/v3/projectcalico.org/networksets/staging/external-database"
        );
        assert_eq!(serde_json::to_string(&r).unwrap(), ns);
        let gns = r#"{"kind":"GlobalNetworkSet","apiVersion":"projectcalico.org/v3","metadata":{"name":"a-name-for-the-set","labels":{"role":"external-database"}},"spec":{"nets":["198.51.100.0/28","203.0.113.0/24"]}}"#;
        let r: GlobalNetworkSet = serde_json::from_str(gns).unwrap();
        assert_eq!(
            r.key(),
            "/calico/resources/v3/projectcalico.org/globalnetworksets/a-name-for-the-set"
        );
        assert_eq!(serde_json::to_string(&r).unwrap(), gns);
        assert_eq!(
            networks(&r.spec.nets),
            vec![
                "198.51.100.0/28".parse::<IpNet>().unwrap(),
                "203.0.113.0/24".parse().unwrap()
            ]
        );
    }

    #[test]
    fn nets_accept_cidrs_and_addresses_and_name_the_bad_one() {
        let mut ok = GlobalNetworkSet::new(
            "s",
            GlobalNetworkSetSpec {
                nets: vec!["10.0.0.1".into(), "10.1.2.3/16".into(), "fd00::/64".into()],
            },
        );
        assert!(prepare_resource(&mut ok).is_ok());
        assert_eq!(
            networks(&ok.spec.nets),
            vec![
                "10.0.0.1/32".parse::<IpNet>().unwrap(),
                "10.1.0.0/16".parse().unwrap(),
                "fd00::/64".parse().unwrap()
            ]
        );
        let mut bad = NetworkSet::new(
            "s",
            NetworkSetSpec {
                nets: vec!["10.0.0.0/8".into(), "10.0.0.0/33".into()],
            },
        );
        assert_eq!(
            prepare_resource(&mut bad).unwrap_err().to_string(),
            "error with field spec.nets[1] = '10.0.0.0/33' (not a valid CIDR or IP address)"
        );
    }

    #[test]
    fn namespace_label_is_refused() {
        let mut s = GlobalNetworkSet::new("s", GlobalNetworkSetSpec::default());
        s.metadata.labels.insert(LABEL_NAMESPACE.into(), "x".into());
        assert_eq!(
            prepare_resource(&mut s).unwrap_err().to_string(),
            "error with field metadata.labels = 'projectcalico.org/namespace' (projectcalico.org/namespace is not a valid label name)"
        );
        let mut s = NetworkSet::new("s", NetworkSetSpec::default());
        s.metadata.labels.insert("role".into(), "db".into());
        assert!(prepare_resource(&mut s).is_ok());
    }

    #[test]
    fn network_sets_default_to_the_default_namespace() {
        let mut s = NetworkSet::new("s", NetworkSetSpec::default());
        prepare_resource(&mut s).unwrap();
        assert_eq!(s.metadata.namespace.as_deref(), Some("default"));
        let mut g = GlobalNetworkSet::new("s", GlobalNetworkSetSpec::default());
        g.metadata.namespace = Some("ns1".into());
        assert_eq!(
            prepare_resource(&mut g).unwrap_err().to_string(),
            "error with field metadata.namespace = 'ns1' (GlobalNetworkSet is not a namespaced kind)"
        );
    }
}
