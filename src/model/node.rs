//! Node: a Calico node's BGP identity, tunnel addresses and addresses (REFERENCE §2).

use serde::{Deserialize, Serialize};

use super::asn::AsNumber;
use super::validate::{self, Validated, ValidationError};
use super::{Kind, ObjectMeta, Resource};

/// A Node resource.
pub type Node = Resource<NodeSpec>;

/// `spec.bgp` of a Node.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeBGPSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub as_number: Option<AsNumber>,
    /// The node's IPv4 address in CIDR form, e.g. `10.192.0.2/16`.
    #[serde(
        default,
        rename = "ipv4Address",
        skip_serializing_if = "Option::is_none"
    )]
    pub ipv4_address: Option<String>,
    #[serde(
        default,
        rename = "ipv6Address",
        skip_serializing_if = "Option::is_none"
    )]
    pub ipv6_address: Option<String>,
    #[serde(
        default,
        rename = "ipv4IPIPTunnelAddr",
        skip_serializing_if = "Option::is_none"
    )]
    pub ipv4_ipip_tunnel_addr: Option<String>,
    #[serde(
        default,
        rename = "routeReflectorClusterID",
        skip_serializing_if = "Option::is_none"
    )]
    pub route_reflector_cluster_id: Option<String>,
}

/// An orchestrator reference (`orchRefs`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OrchRef {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub node_name: String,
    pub orchestrator: String,
}

/// WireGuard interface addresses.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeWireguardSpec {
    #[serde(
        default,
        rename = "interfaceIPv4Address",
        skip_serializing_if = "Option::is_none"
    )]
    pub interface_ipv4_address: Option<String>,
    #[serde(
        default,
        rename = "interfaceIPv6Address",
        skip_serializing_if = "Option::is_none"
    )]
    pub interface_ipv6_address: Option<String>,
}

/// One of the node's addresses.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeAddress {
    pub address: String,
    #[serde(default, rename = "type", skip_serializing_if = "String::is_empty")]
    pub kind: String,
}

/// Calico's `NodeSpec`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bgp: Option<NodeBGPSpec>,
    #[serde(
        default,
        rename = "ipv4VXLANTunnelAddr",
        skip_serializing_if = "Option::is_none"
    )]
    pub ipv4_vxlan_tunnel_addr: Option<String>,
    #[serde(
        default,
        rename = "ipv6VXLANTunnelAddr",
        skip_serializing_if = "Option::is_none"
    )]
    pub ipv6_vxlan_tunnel_addr: Option<String>,
    #[serde(
        default,
        rename = "vxlanTunnelMACAddr",
        skip_serializing_if = "Option::is_none"
    )]
    pub vxlan_tunnel_mac_addr: Option<String>,
    #[serde(
        default,
        rename = "vxlanTunnelMACAddrV6",
        skip_serializing_if = "Option::is_none"
    )]
    pub vxlan_tunnel_mac_addr_v6: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub orch_refs: Vec<OrchRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wireguard: Option<NodeWireguardSpec>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<NodeAddress>,
}

impl NodeSpec {
    /// `spec.bgp.ipv4Address` (CIDR form), if any.
    pub fn ipv4_address(&self) -> Option<&str> {
        self.bgp.as_ref()?.ipv4_address.as_deref()
    }
}

fn opt_ip(field: &str, v: &Option<String>) -> Validated {
    match v {
        Some(v) => validate::ip(field, v).map(|_| ()),
        None => Ok(()),
    }
}

impl Kind for NodeSpec {
    const KIND: &'static str = "Node";
    const PLURAL: &'static str = "nodes";

    fn validate(&self, _meta: &ObjectMeta) -> Validated {
        if let Some(bgp) = &self.bgp {
            if let Some(a) = &bgp.ipv4_address {
                validate::ip_with_prefix("spec.bgp.ipv4Address", a, true)?;
            }
            if let Some(a) = &bgp.ipv6_address {
                validate::ip_with_prefix("spec.bgp.ipv6Address", a, false)?;
            }
            opt_ip("spec.bgp.ipv4IPIPTunnelAddr", &bgp.ipv4_ipip_tunnel_addr)?;
            if let Some(id) = &bgp.route_reflector_cluster_id
                && id.parse::<std::net::Ipv4Addr>().is_err()
            {
                return Err(ValidationError::new(
                    "spec.bgp.routeReflectorClusterID",
                    id,
                    "must be in IPv4 address format, e.g. 224.0.0.1",
                ));
            }
        }
        opt_ip("spec.ipv4VXLANTunnelAddr", &self.ipv4_vxlan_tunnel_addr)?;
        opt_ip("spec.ipv6VXLANTunnelAddr", &self.ipv6_vxlan_tunnel_addr)?;
        if let Some(m) = &self.vxlan_tunnel_mac_addr {
            validate::mac("spec.vxlanTunnelMACAddr", m)?;
        }
        if let Some(m) = &self.vxlan_tunnel_mac_addr_v6 {
            validate::mac("spec.vxlanTunnelMACAddrV6", m)?;
        }
        for (i, a) in self.addresses.iter().enumerate() {
            let field = format!("spec.addresses[{i}].address");
            if a.address.parse::<std::net::IpAddr>().is_err()
                && a.address.parse::<ipnet::IpNet>().is_err()
            {
                return Err(ValidationError::new(
                    &field,
                    &a.address,
                    "not an IP address or CIDR",
                ));
            }
            if !a.kind.is_empty() {
                validate::one_of(
                    &format!("spec.addresses[{i}].type"),
                    &a.kind,
                    &["InternalIP", "ExternalIP", "CalicoNodeIP"],
                )?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_address_must_be_cidr_form_v4() {
        let mut n = NodeSpec {
            bgp: Some(NodeBGPSpec {
                ipv4_address: Some("10.0.0.2".into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(
            n.validate(&ObjectMeta::default()).unwrap_err().to_string(),
            "error with field spec.bgp.ipv4Address = '10.0.0.2' (not an address in CIDR form (e.g. 10.0.0.2/24))"
        );
        n.bgp.as_mut().unwrap().ipv4_address = Some("fd00::2/64".into());
        assert_eq!(
            n.validate(&ObjectMeta::default()).unwrap_err().to_string(),
            "error with field spec.bgp.ipv4Address = 'fd00::2/64' (not an IPv4 address)"
        );
        n.bgp.as_mut().unwrap().ipv4_address = Some("10.0.0.2/16".into());
        assert!(n.validate(&ObjectMeta::default()).is_ok());
        n.bgp.as_mut().unwrap().route_reflector_cluster_id = Some("rr1".into());
        assert_eq!(
            n.validate(&ObjectMeta::default()).unwrap_err().to_string(),
            "error with field spec.bgp.routeReflectorClusterID = 'rr1' (must be in IPv4 address format, e.g. 224.0.0.1)"
        );
    }

    #[test]
    fn unknown_fields_are_refused_by_name() {
        let e = serde_json::from_str::<NodeSpec>(r#"{"bgp":{"ipv4Adress":"10.0.0.1/24"}}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `ipv4Adress`"), "{e}");
    }
}
