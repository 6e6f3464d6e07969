//! WorkloadEndpoint: a pod's (or container's) interface, written by the CNI plugin
//! and read by Felix (REFERENCE §1, §2).

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::validate::{self, Validated, ValidationError};
use super::{Kind, ObjectMeta, Resource};

/// A WorkloadEndpoint resource (namespaced).
pub type WorkloadEndpoint = Resource<WorkloadEndpointSpec>;

/// Label Calico always sets: the workload's namespace.
pub const LABEL_NAMESPACE: &str = "projectcalico.org/namespace";
/// Label Calico always sets: the orchestrator.
pub const LABEL_ORCHESTRATOR: &str = "projectcalico.org/orchestrator";

/// A NAT mapping of the endpoint.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IpNat {
    #[serde(rename = "internalIP")]
    pub internal_ip: String,
    #[serde(rename = "externalIP")]
    pub external_ip: String,
}

/// A named port of the endpoint.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EndpointPort {
    pub name: String,
    /// `TCP`, `UDP`, `SCTP` or a protocol number.
    pub protocol: Value,
    pub port: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_port: Option<u16>,
    #[serde(default, rename = "hostIP", skip_serializing_if = "Option::is_none")]
    pub host_ip: Option<String>,
}

/// Calico's `WorkloadEndpointSpec`, fields in Calico's order.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadEndpointSpec {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub orchestrator: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub workload: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub node: String,
    #[serde(
        default,
        rename = "containerID",
        skip_serializing_if = "String::is_empty"
    )]
    pub container_id: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub pod: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub endpoint: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub service_account_name: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ip_networks: Vec<String>,
    #[serde(
        default,
        rename = "ipv4Gateway",
        skip_serializing_if = "String::is_empty"
    )]
    pub ipv4_gateway: String,
    #[serde(
        default,
        rename = "ipv6Gateway",
        skip_serializing_if = "String::is_empty"
    )]
    pub ipv6_gateway: String,
    #[serde(default, rename = "ipNATs", skip_serializing_if = "Vec::is_empty")]
    pub ip_nats: Vec<IpNat>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub profiles: Vec<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub interface_name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub mac: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<EndpointPort>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_spoofed_source_prefixes: Vec<String>,
}

/// Calico's WorkloadEndpoint name: `<node>-<orchestrator>-<workload>-<endpoint>` with
/// every `-` inside a segment doubled (`k8s` uses the pod name as workload, `cni` the
/// container ID).
pub fn workload_endpoint_name(
    node: &str,
    orchestrator: &str,
    workload: &str,
    endpoint: &str,
) -> String {
    let esc = |s: &str| s.replace('-', "--");
    format!(
        "{}-{}-{}-{}",
        esc(node),
        esc(orchestrator),
        esc(workload),
        esc(endpoint)
    )
}

impl Kind for WorkloadEndpointSpec {
    const KIND: &'static str = "WorkloadEndpoint";
    const PLURAL: &'static str = "workloadendpoints";
    const NAMESPACED: bool = true;

    fn set_defaults(&mut self, meta: &mut ObjectMeta) {
        let ns = meta
            .namespace
            .get_or_insert_with(|| "default".into())
            .clone();
        meta.labels.insert(LABEL_NAMESPACE.into(), ns);
        if !self.orchestrator.is_empty() {
            meta.labels
                .insert(LABEL_ORCHESTRATOR.into(), self.orchestrator.clone());
        }
    }

    fn validate(&self, _meta: &ObjectMeta) -> Validated {
        for (i, n) in self.ip_networks.iter().enumerate() {
            let field = format!("spec.ipNetworks[{i}]");
            let net = validate::cidr(&field, n, true)?;
            if net.prefix_len() != net.max_prefix_len() {
                return Err(ValidationError::new(
                    &field,
                    n,
                    "workload addresses must be /32 (IPv4) or /128 (IPv6)",
                ));
            }
        }
        for (i, nat) in self.ip_nats.iter().enumerate() {
            validate::ip(&format!("spec.ipNATs[{i}].internalIP"), &nat.internal_ip)?;
            validate::ip(&format!("spec.ipNATs[{i}].externalIP"), &nat.external_ip)?;
            let inside = self
                .ip_networks
                .iter()
                .any(|n| n.split('/').next() == Some(nat.internal_ip.as_str()));
            if !inside {
                return Err(ValidationError::new(
                    &format!("spec.ipNATs[{i}].internalIP"),
                    &nat.internal_ip,
                    "must be one of the endpoint's ipNetworks",
                ));
            }
        }
        if !self.interface_name.is_empty() {
            let ok = self.interface_name.len() <= 15
                && self
                    .interface_name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
            if !ok {
                return Err(ValidationError::new(
                    "spec.interfaceName",
                    &self.interface_name,
                    "must be a valid Linux interface name (at most 15 characters: letters, digits, '-', '_', '.')",
                ));
            }
        }
        if !self.mac.is_empty() {
            validate::mac("spec.mac", &self.mac)?;
        }
        for (f, v) in [
            ("spec.ipv4Gateway", &self.ipv4_gateway),
            ("spec.ipv6Gateway", &self.ipv6_gateway),
        ] {
            if !v.is_empty() {
                validate::ip(f, v)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_double_dashes_inside_segments() {
        assert_eq!(
            workload_endpoint_name("node-1", "k8s", "my-pod", "eth0"),
            "node--1-k8s-my--pod-eth0"
        );
        assert_eq!(
            workload_endpoint_name("n1", "cni", "abc123", "eth0"),
            "n1-cni-abc123-eth0"
        );
    }

    #[test]
    fn ip_networks_must_be_host_routes() {
        let w = WorkloadEndpointSpec {
            ip_networks: vec!["10.65.0.0/26".into()],
            ..Default::default()
        };
        assert_eq!(
            w.validate(&ObjectMeta::default()).unwrap_err().to_string(),
            "error with field spec.ipNetworks[0] = '10.65.0.0/26' (workload addresses must be /32 (IPv4) or /128 (IPv6))"
        );
        let w = WorkloadEndpointSpec {
            ip_networks: vec!["10.65.0.1/32".into(), "fd00::1/128".into()],
            interface_name: "cali0123456789a".into(),
            mac: "aa:bb:cc:dd:ee:ff".into(),
            ..Default::default()
        };
        assert!(w.validate(&ObjectMeta::default()).is_ok());
    }

    #[test]
    fn defaults_set_calicos_labels() {
        let mut w = WorkloadEndpointSpec {
            orchestrator: "k8s".into(),
            ..Default::default()
        };
        let mut m = ObjectMeta::default();
        w.set_defaults(&mut m);
        assert_eq!(m.namespace.as_deref(), Some("default"));
        assert_eq!(
            m.labels.get(LABEL_NAMESPACE).map(String::as_str),
            Some("default")
        );
        assert_eq!(
            m.labels.get(LABEL_ORCHESTRATOR).map(String::as_str),
            Some("k8s")
        );
    }
}
