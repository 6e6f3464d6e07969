//! HostEndpoint: one of a node's own interfaces (or all of them) under policy (REFERENCE
//! §10; Calico's `api/.../v3/hostendpoint.go`, the validator's `interface`, `ip`, `name`
//! and `portName` field checks, `validateEndpointPort`, and the CRD's rules that a host
//! endpoint names its node and an interface or expected addresses).

use serde::{Deserialize, Serialize};

use super::rule::Protocol;
use super::validate::{self, Validated, ValidationError};
use super::{Kind, ObjectMeta, Resource};

/// A HostEndpoint resource (not namespaced).
pub type HostEndpoint = Resource<HostEndpointSpec>;

/// `interfaceName: "*"`: every interface of the host, workload traffic included.
pub const ALL_INTERFACES: &str = "*";

/// Calico's `HostEndpointSpec`, fields in Calico's order.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HostEndpointSpec {
    /// The node whose interface this is; only that node's Felix programs it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub node: String,
    /// A Linux interface name, `*` for all of the host's interfaces, or empty (then the
    /// interface holding one of `expectedIPs`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub interface_name: String,
    /// The endpoint's addresses: what selectors that match it stand for in rules.
    #[serde(default, rename = "expectedIPs", skip_serializing_if = "Vec::is_empty")]
    pub expected_ips: Vec<String>,
    /// Profiles applied after the policies, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub profiles: Vec<String>,
    /// Named ports, for rules that name them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<HostEndpointPort>,
}

/// Calico's `EndpointPort`: a named port of a host endpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HostEndpointPort {
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
}

impl HostEndpointSpec {
    /// Whether this endpoint covers every interface of the host.
    pub fn all_interfaces(&self) -> bool {
        self.interface_name == ALL_INTERFACES
    }
}

/// Calico's interface check: `*`, or 1-15 of letters, digits, `_`, `.` and `-`.
fn interface(field: &str, value: &str) -> Validated {
    let ok = value == ALL_INTERFACES
        || ((1..=15).contains(&value.len())
            && value
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c)));
    validate::require(
        ok,
        field,
        value,
        "must be \"*\" or a Linux interface name (1-15 letters, digits, '_', '.', '-')",
    )
}

/// Kubernetes' `IsValidPortName`, which Calico's `portName` check uses: 1-15 lower-case
/// letters, digits and `-`, at least one letter, no `-` at either end, no `--`.
fn port_name(field: &str, value: &str) -> Validated {
    let ok = (1..=15).contains(&value.len())
        && value
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && value.chars().any(|c| c.is_ascii_lowercase())
        && !value.starts_with('-')
        && !value.ends_with('-')
        && !value.contains("--");
    validate::require(
        ok,
        field,
        value,
        "not a valid port name (1-15 lower-case letters, digits and '-', with a letter, no '-' at either end, no '--')",
    )
}

impl Kind for HostEndpointSpec {
    const KIND: &'static str = "HostEndpoint";
    const PLURAL: &'static str = "hostendpoints";

    fn validate(&self, _meta: &ObjectMeta) -> Validated {
        if self.node.is_empty() {
            return Err(ValidationError::new(
                "spec.node",
                "",
                "node must be specified",
            ));
        }
        validate::name("spec.node", &self.node)?;
        if self.interface_name.is_empty() && self.expected_ips.is_empty() {
            return Err(ValidationError::new(
                "spec.interfaceName",
                "",
                "at least one of interfaceName or expectedIPs must be specified",
            ));
        }
        if !self.interface_name.is_empty() {
            interface("spec.interfaceName", &self.interface_name)?;
        }
        for (i, ip) in self.expected_ips.iter().enumerate() {
            validate::ip(&format!("spec.expectedIPs[{i}]"), ip)?;
        }
        for (i, p) in self.profiles.iter().enumerate() {
            validate::name(&format!("spec.profiles[{i}]"), p)?;
        }
        for (i, p) in self.ports.iter().enumerate() {
            port_name(&format!("spec.ports[{i}].name"), &p.name)?;
            let field = format!("spec.ports[{i}].protocol");
            p.protocol.validate(&field)?;
            if !p.protocol.supports_ports() {
                return Err(ValidationError::new(
                    &field,
                    p.protocol.to_string(),
                    "EndpointPort protocol does not support ports.",
                ));
            }
            if p.port == 0 {
                return Err(ValidationError::new(
                    &format!("spec.ports[{i}].port"),
                    0,
                    "must be greater than 0",
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{AnyResource, prepare_resource};

    /// Calico's documented example, as its client stores it: key, JSON round trip.
    #[test]
    fn calicos_example_round_trips() {
        let doc = r#"{"kind":"HostEndpoint","apiVersion":"projectcalico.org/v3","metadata":{"name":"my-host-eth0","labels":{"environment":"production","type":"production"}},"spec":{"node":"my-host","interfaceName":"eth0","expectedIPs":["192.168.0.1","192.168.0.2"],"profiles":["profile1","profile2"],"ports":[{"name":"some-port","protocol":"TCP","port":1234},{"name":"another-port","protocol":"UDP","port":5432}]}}"#;
        let r: HostEndpoint = serde_json::from_str(doc).unwrap();
        assert_eq!(
            r.key(),
            "/calico/resources/v3/projectcalico.org/hostendpoints/my-host-eth0"
        );
        assert_eq!(serde_json::to_string(&r).unwrap(), doc);
        let any = AnyResource::decode_slice("HostEndpoint", doc.as_bytes()).unwrap();
        assert!(matches!(any, AnyResource::HostEndpoint(_)));
        let mut ok = r.clone();
        assert!(prepare_resource(&mut ok).is_ok());
        let mut all = r;
        all.spec.interface_name = "*".into();
        all.spec.expected_ips.clear();
        assert!(prepare_resource(&mut all).is_ok());
        assert!(all.spec.all_interfaces());
    }

    /// Each rule refuses with the field and the reason.
    #[test]
    fn bad_specs_name_the_field() {
        let base = || HostEndpointSpec {
            node: "node-1".into(),
            interface_name: "eth0".into(),
            ..Default::default()
        };
        let port = |name: &str, proto: &str, port: u16| HostEndpointPort {
            name: name.into(),
            protocol: Protocol::parse(proto),
            port,
        };
        let cases: Vec<(HostEndpointSpec, &str, &str)> = vec![
            (
                HostEndpointSpec {
                    node: String::new(),
                    ..base()
                },
                "spec.node",
                "node must be specified",
            ),
            (
                HostEndpointSpec {
                    node: "Node_1".into(),
                    ..base()
                },
                "spec.node",
                "",
            ),
            (
                HostEndpointSpec {
                    interface_name: String::new(),
                    ..base()
                },
                "spec.interfaceName",
                "at least one of interfaceName or expectedIPs",
            ),
            (
                HostEndpointSpec {
                    interface_name: "eth0 with space".into(),
                    ..base()
                },
                "spec.interfaceName",
                "Linux interface name",
            ),
            (
                HostEndpointSpec {
                    interface_name: "a-very-long-interface".into(),
                    ..base()
                },
                "spec.interfaceName",
                "",
            ),
            (
                HostEndpointSpec {
                    expected_ips: vec!["10.0.0.1".into(), "10.0.0.300".into()],
                    ..base()
                },
                "spec.expectedIPs[1]",
                "",
            ),
            (
                HostEndpointSpec {
                    profiles: vec!["Bad_Profile".into()],
                    ..base()
                },
                "spec.profiles[0]",
                "",
            ),
            (
                HostEndpointSpec {
                    ports: vec![port("ssh", "TCP", 22), port("Web", "TCP", 80)],
                    ..base()
                },
                "spec.ports[1].name",
                "port name",
            ),
            (
                HostEndpointSpec {
                    ports: vec![port("ping", "ICMP", 1)],
                    ..base()
                },
                "spec.ports[0].protocol",
                "does not support ports",
            ),
            (
                HostEndpointSpec {
                    ports: vec![port("web", "TCP", 0)],
                    ..base()
                },
                "spec.ports[0].port",
                "greater than 0",
            ),
        ];
        for (spec, field, reason) in cases {
            let mut r = HostEndpoint::new("hep", spec.clone());
            let err = prepare_resource(&mut r).expect_err(&format!("{spec:?}"));
            let text = err.to_string();
            assert!(
                text.contains(field) && text.contains(reason),
                "{spec:?}: {text}"
            );
        }
        // Expected addresses alone name the interface.
        let mut r = HostEndpoint::new(
            "hep",
            HostEndpointSpec {
                interface_name: String::new(),
                expected_ips: vec!["10.0.0.1".into(), "fd00::1".into()],
                ports: vec![port("bgp", "tcp", 179)],
                ..base()
            },
        );
        assert!(prepare_resource(&mut r).is_ok());
    }
}
