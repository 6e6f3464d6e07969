//! BGPConfiguration and BGPPeer (REFERENCE §2, §6).

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use serde::{Deserialize, Serialize};

use super::asn::AsNumber;
use super::validate::{self, Validated, ValidationError};
use super::{Kind, ObjectMeta, Resource};

/// A BGPConfiguration resource (`default` or `node.<name>`).
pub type BGPConfiguration = Resource<BGPConfigurationSpec>;
/// A BGPPeer resource.
pub type BGPPeer = Resource<BGPPeerSpec>;

/// Default AS number when neither the Node nor BGPConfiguration sets one.
pub const DEFAULT_AS: AsNumber = AsNumber(64512);

/// `{cidr}` entries of the service IP lists. Calico accepts an empty entry (`{}`), which
/// means nothing.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CidrBlock {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub cidr: String,
}

/// A named BGP community (`aa:nn` or large `aa:nn:mm`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Community {
    pub name: String,
    pub value: String,
}

/// Communities attached to a prefix on export.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrefixAdvertisement {
    pub cidr: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub communities: Vec<String>,
}

/// Reference to a Kubernetes secret holding a BGP password.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SecretKeyRef {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub optional: Option<bool>,
}

/// A BGP session password.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BGPPassword {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_key_ref: Option<SecretKeyRef>,
}

/// Calico's `BGPConfigurationSpec`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BGPConfigurationSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_severity_screen: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_to_node_mesh_enabled: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub as_number: Option<AsNumber>,
    #[serde(
        default,
        rename = "serviceLoadBalancerIPs",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub service_load_balancer_ips: Vec<CidrBlock>,
    /// `Enabled` (default): the `serviceLoadBalancerIPs` ranges are advertised whole;
    /// `Disabled`: only per service (which needs the Kubernetes API).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_load_balancer_aggregation: Option<String>,
    #[serde(
        default,
        rename = "serviceExternalIPs",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub service_external_ips: Vec<CidrBlock>,
    #[serde(
        default,
        rename = "serviceClusterIPs",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub service_cluster_ips: Vec<CidrBlock>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub communities: Vec<Community>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen_port: Option<u32>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub prefix_advertisements: Vec<PrefixAdvertisement>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_mesh_password: Option<BGPPassword>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_mesh_max_restart_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bind_mode: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ignored_interfaces: Vec<String>,
    #[serde(
        default,
        rename = "localWorkloadPeeringIPV4",
        skip_serializing_if = "Option::is_none"
    )]
    pub local_workload_peering_ipv4: Option<String>,
    #[serde(
        default,
        rename = "localWorkloadPeeringIPV6",
        skip_serializing_if = "Option::is_none"
    )]
    pub local_workload_peering_ipv6: Option<String>,
}

/// The node label that keeps a node from advertising the service ranges (Kubernetes'
/// own label for nodes out of load balancing; Calico honours it the same way).
pub const EXCLUDE_FROM_SERVICES_LABEL: &str =
    "node.kubernetes.io/exclude-from-external-load-balancers";

impl BGPConfigurationSpec {
    /// The service ranges every node advertises, as Calico does: all `serviceClusterIPs`,
    /// and the `serviceExternalIPs` and `serviceLoadBalancerIPs` that are ranges (a single
    /// address, /32 or /128, belongs to one service and is advertised per service, which
    /// needs the Kubernetes API). Sorted, without duplicates; empty or invalid entries
    /// (validation rejects those) skipped. Routes inside them are not programmed into the
    /// kernel: kube-proxy answers for service addresses.
    pub fn service_ranges(&self) -> Vec<ipnet::IpNet> {
        let parse = |b: &CidrBlock| b.cidr.parse::<ipnet::IpNet>().ok();
        let range = |n: &ipnet::IpNet| n.prefix_len() < n.max_prefix_len();
        let load_balancers: &[CidrBlock] =
            if self.service_load_balancer_aggregation.as_deref() == Some("Disabled") {
                &[]
            } else {
                &self.service_load_balancer_ips
            };
        let mut out: Vec<ipnet::IpNet> = self
            .service_cluster_ips
            .iter()
            .filter_map(parse)
            .chain(
                self.service_external_ips
                    .iter()
                    .chain(load_balancers)
                    .filter_map(parse)
                    .filter(range),
            )
            .map(|n| n.trunc())
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// `prefixAdvertisements` with community names resolved through `communities`: the
    /// communities to add to exported routes inside each CIDR. Entries that do not parse
    /// (validation rejects those) are skipped.
    pub fn prefix_communities(&self) -> Vec<(ipnet::IpNet, Vec<CommunityValue>)> {
        self.prefix_advertisements
            .iter()
            .filter_map(|p| {
                let net = p.cidr.parse::<ipnet::IpNet>().ok()?.trunc();
                let mut values: Vec<CommunityValue> = p
                    .communities
                    .iter()
                    .filter_map(|c| {
                        let named = self.communities.iter().find(|n| &n.name == c);
                        named.map_or(c.as_str(), |n| n.value.as_str()).parse().ok()
                    })
                    .collect();
                values.sort();
                values.dedup();
                Some((net, values))
            })
            .collect()
    }

    /// `nodeToNodeMeshEnabled`, default true.
    pub fn mesh_enabled(&self) -> bool {
        self.node_to_node_mesh_enabled.unwrap_or(true)
    }
    /// `listenPort`, default 179.
    pub fn listen_port_or_default(&self) -> u16 {
        self.listen_port
            .and_then(|p| u16::try_from(p).ok())
            .unwrap_or(179)
    }
}

/// A BGP community value: standard (RFC 1997, `aa:nn`, two 16-bit halves) or large
/// (RFC 8092, `aa:nn:mm`, three 32-bit parts).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CommunityValue {
    Standard(u32),
    Large([u32; 3]),
}

impl std::str::FromStr for CommunityValue {
    type Err = ();

    fn from_str(v: &str) -> Result<CommunityValue, ()> {
        let parts: Vec<&str> = v.split(':').collect();
        match parts[..] {
            [a, b] => {
                let (a, b) = (
                    a.parse::<u16>().map_err(|_| ())?,
                    b.parse::<u16>().map_err(|_| ())?,
                );
                Ok(CommunityValue::Standard(
                    (u32::from(a) << 16) | u32::from(b),
                ))
            }
            [a, b, c] => {
                let p = |x: &str| x.parse::<u32>().map_err(|_| ());
                Ok(CommunityValue::Large([p(a)?, p(b)?, p(c)?]))
            }
            _ => Err(()),
        }
    }
}

impl std::fmt::Display for CommunityValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CommunityValue::Standard(c) => write!(f, "{}:{}", c >> 16, c & 0xffff),
            CommunityValue::Large([a, b, c]) => write!(f, "{a}:{b}:{c}"),
        }
    }
}

fn community_value(field: &str, v: &str) -> Validated {
    match v.parse::<CommunityValue>() {
        Ok(_) => Ok(()),
        Err(()) => Err(ValidationError::new(
            field,
            v,
            "community must be aa:nn (each 0-65535) or a large community aa:nn:mm",
        )),
    }
}

impl Kind for BGPConfigurationSpec {
    const KIND: &'static str = "BGPConfiguration";
    const PLURAL: &'static str = "bgpconfigurations";

    fn validate(&self, meta: &ObjectMeta) -> Validated {
        if meta.name != "default" {
            if let Some(v) = self.node_to_node_mesh_enabled {
                return Err(ValidationError::new(
                    "spec.nodeToNodeMeshEnabled",
                    v,
                    "may only be set on the global BGPConfiguration named 'default'",
                ));
            }
            if let Some(v) = self.as_number {
                return Err(ValidationError::new(
                    "spec.asNumber",
                    v,
                    "may only be set on the global BGPConfiguration named 'default'",
                ));
            }
        }
        if let Some(s) = &self.log_severity_screen {
            validate::log_severity("spec.logSeverityScreen", s)?;
        }
        for (name, list) in [
            ("serviceLoadBalancerIPs", &self.service_load_balancer_ips),
            ("serviceExternalIPs", &self.service_external_ips),
            ("serviceClusterIPs", &self.service_cluster_ips),
        ] {
            for (i, b) in list.iter().enumerate().filter(|(_, b)| !b.cidr.is_empty()) {
                validate::cidr(&format!("spec.{name}[{i}].cidr"), &b.cidr, false)?;
            }
        }
        if let Some(a) = &self.service_load_balancer_aggregation {
            validate::one_of(
                "spec.serviceLoadBalancerAggregation",
                a,
                &["Enabled", "Disabled"],
            )?;
        }
        for (i, c) in self.communities.iter().enumerate() {
            community_value(&format!("spec.communities[{i}].value"), &c.value)?;
        }
        for (i, p) in self.prefix_advertisements.iter().enumerate() {
            validate::cidr(
                &format!("spec.prefixAdvertisements[{i}].cidr"),
                &p.cidr,
                false,
            )?;
            for (j, c) in p.communities.iter().enumerate() {
                let field = format!("spec.prefixAdvertisements[{i}].communities[{j}]");
                let named = self.communities.iter().any(|n| &n.name == c);
                if !named {
                    community_value(&field, c)?;
                }
            }
        }
        if let Some(p) = self.listen_port {
            validate::port("spec.listenPort", p)?;
        }
        if let Some(d) = &self.node_mesh_max_restart_time {
            validate::duration("spec.nodeMeshMaxRestartTime", d)?;
        }
        if let Some(m) = &self.bind_mode {
            validate::one_of("spec.bindMode", m, &["None", "NodeIP"])?;
        }
        if let Some(pw) = &self.node_mesh_password {
            secret_ref("spec.nodeMeshPassword", pw)?;
        }
        for (i, name) in self.ignored_interfaces.iter().enumerate() {
            let ok = (1..=15).contains(&name.len())
                && name != "*"
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_.*-".contains(&b));
            if !ok {
                return Err(ValidationError::new(
                    &format!("spec.ignoredInterfaces[{i}]"),
                    name,
                    "must be an interface name or pattern: 1 to 15 letters, digits, '_', '.', '-' or '*', and not '*' alone",
                ));
            }
        }
        Ok(())
    }
}

fn secret_ref(field: &str, pw: &BGPPassword) -> Validated {
    if let Some(r) = &pw.secret_key_ref {
        if r.name.is_empty() {
            return Err(ValidationError::new(
                &format!("{field}.secretKeyRef.name"),
                "",
                "the secret name is required",
            ));
        }
        if r.key.is_empty() {
            return Err(ValidationError::new(
                &format!("{field}.secretKeyRef.key"),
                "",
                "the secret key is required",
            ));
        }
    }
    Ok(())
}

/// Calico's `BGPPeerSpec`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BGPPeerSpec {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub node: String,
    #[serde(default, rename = "peerIP", skip_serializing_if = "String::is_empty")]
    pub peer_ip: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub as_number: Option<AsNumber>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub node_selector: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub peer_selector: String,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub keep_original_next_hop: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_hop_mode: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<BGPPassword>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_address: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_detection_mode: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart_mode: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_restart_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bird_gateway_mode: Option<String>,
    #[serde(
        default,
        rename = "numAllowedLocalASNumbers",
        skip_serializing_if = "Option::is_none"
    )]
    pub num_allowed_local_as_numbers: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_security: Option<u8>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reachable_by: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keepalive_time: Option<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub local_workload_selector: String,
    #[serde(
        default,
        rename = "localASNumber",
        skip_serializing_if = "Option::is_none"
    )]
    pub local_as_number: Option<AsNumber>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub external_network: String,
    /// For peerings between Calico nodes: whether the nodes the remote side selects
    /// (`peerSelector`, or the node at `peerIP`) peer back automatically (`Auto`, the
    /// default) or only through a BGPPeer of their own (`Manual`). Calico v3 BGPPeer
    /// `reversePeering`; confd's second pass over BGPPeers emits the reverse.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reverse_peering: Option<String>,
}

/// `reversePeering: Manual`: no automatic reverse peering.
pub const REVERSE_PEERING_MANUAL: &str = "Manual";

/// Parse a BGPPeer `peerIP`: `ip`, `ip:port` (IPv4) or `[v6]:port`; a bare IPv6 address
/// is also accepted. Returns the address and the port when one is given.
pub fn parse_peer_ip(s: &str) -> Result<(IpAddr, Option<u16>), String> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok((ip, None));
    }
    if let Ok(sa) = s.parse::<SocketAddr>() {
        if sa.port() == 0 {
            return Err("port must be between 1 and 65535".into());
        }
        return Ok((sa.ip(), Some(sa.port())));
    }
    if s.starts_with('[')
        && let Some(inner) = s.strip_prefix('[').and_then(|r| r.strip_suffix(']'))
        && let Ok(ip) = inner.parse::<Ipv6Addr>()
    {
        return Ok((IpAddr::V6(ip), None));
    }
    Err("must be an IP address, IPv4:port or [IPv6]:port".into())
}

impl BGPPeerSpec {
    /// The peer address and optional port (after validation this cannot fail).
    pub fn peer_addr(&self) -> Option<(IpAddr, Option<u16>)> {
        parse_peer_ip(&self.peer_ip).ok()
    }

    /// Whether the nodes this peering selects on its remote side peer back on their own.
    /// As Calico's confd (`automaticReversePeering`): only `Manual` turns it off, so a
    /// value another writer stored that is neither keeps Calico's default.
    pub fn automatic_reverse_peering(&self) -> bool {
        self.reverse_peering.as_deref() != Some(REVERSE_PEERING_MANUAL)
    }
}

impl Kind for BGPPeerSpec {
    const KIND: &'static str = "BGPPeer";
    const PLURAL: &'static str = "bgppeers";

    fn validate(&self, _meta: &ObjectMeta) -> Validated {
        if !self.node.is_empty() && !self.node_selector.is_empty() {
            return Err(ValidationError::new(
                "spec.nodeSelector",
                &self.node_selector,
                "node and nodeSelector cannot both be set",
            ));
        }
        if !self.peer_selector.is_empty() {
            if !self.peer_ip.is_empty() {
                return Err(ValidationError::new(
                    "spec.peerIP",
                    &self.peer_ip,
                    "peerIP and peerSelector cannot both be set",
                ));
            }
            if let Some(a) = self.as_number {
                return Err(ValidationError::new(
                    "spec.asNumber",
                    a,
                    "asNumber and peerSelector cannot both be set (the peers' own AS is used)",
                ));
            }
            validate::selector("spec.peerSelector", &self.peer_selector)?;
        } else {
            if self.peer_ip.is_empty() {
                return Err(ValidationError::new(
                    "spec.peerIP",
                    "",
                    "peerIP or peerSelector is required",
                ));
            }
            parse_peer_ip(&self.peer_ip)
                .map_err(|r| ValidationError::new("spec.peerIP", &self.peer_ip, r))?;
            if self.as_number.is_none() {
                return Err(ValidationError::new(
                    "spec.asNumber",
                    "",
                    "asNumber is required when peerIP is set",
                ));
            }
        }
        if !self.node_selector.is_empty() {
            validate::selector("spec.nodeSelector", &self.node_selector)?;
        }
        if !self.local_workload_selector.is_empty() {
            validate::selector("spec.localWorkloadSelector", &self.local_workload_selector)?;
        }
        if let Some(m) = &self.next_hop_mode {
            validate::one_of("spec.nextHopMode", m, &["Auto", "Self", "Keep"])?;
            if self.keep_original_next_hop && m != "Keep" && m != "Auto" {
                return Err(ValidationError::new(
                    "spec.keepOriginalNextHop",
                    true,
                    format!("conflicts with nextHopMode {m}"),
                ));
            }
        }
        if let Some(s) = &self.source_address {
            validate::one_of("spec.sourceAddress", s, &["UseNodeIP", "None"])?;
        }
        if let Some(s) = &self.reverse_peering {
            validate::one_of("spec.reversePeering", s, &["Auto", REVERSE_PEERING_MANUAL])?;
        }
        if let Some(s) = &self.failure_detection_mode {
            validate::one_of(
                "spec.failureDetectionMode",
                s,
                &["None", "BFDIfDirectlyConnected"],
            )?;
        }
        if let Some(s) = &self.restart_mode {
            validate::one_of(
                "spec.restartMode",
                s,
                &["GracefulRestart", "LongLivedGracefulRestart"],
            )?;
        }
        if let Some(s) = &self.bird_gateway_mode {
            validate::one_of(
                "spec.birdGatewayMode",
                s,
                &["Recursive", "DirectIfDirectlyConnected"],
            )?;
        }
        if let Some(d) = &self.max_restart_time {
            validate::duration("spec.maxRestartTime", d)?;
        }
        if let Some(d) = &self.keepalive_time {
            validate::duration("spec.keepaliveTime", d)?;
        }
        if let Some(pw) = &self.password {
            secret_ref("spec.password", pw)?;
        }
        if !self.reachable_by.is_empty() {
            validate::ip("spec.reachableBy", &self.reachable_by)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(name: &str) -> ObjectMeta {
        ObjectMeta {
            name: name.into(),
            ..Default::default()
        }
    }

    #[test]
    fn peer_ip_forms() {
        assert_eq!(
            parse_peer_ip("10.0.0.1"),
            Ok(("10.0.0.1".parse().unwrap(), None))
        );
        assert_eq!(
            parse_peer_ip("10.0.0.1:1179"),
            Ok(("10.0.0.1".parse().unwrap(), Some(1179)))
        );
        assert_eq!(
            parse_peer_ip("[fd00::1]:1179"),
            Ok(("fd00::1".parse().unwrap(), Some(1179)))
        );
        assert_eq!(
            parse_peer_ip("fd00::1"),
            Ok(("fd00::1".parse().unwrap(), None))
        );
        assert_eq!(
            parse_peer_ip("[fd00::1]"),
            Ok(("fd00::1".parse().unwrap(), None))
        );
        assert!(parse_peer_ip("10.0.0.1:0").is_err());
        assert!(parse_peer_ip("10.0.0.300").is_err());
        assert!(parse_peer_ip("fd00::1:179:x").is_err());
    }

    fn peer(ip: &str, asn: Option<u32>) -> BGPPeerSpec {
        BGPPeerSpec {
            peer_ip: ip.into(),
            as_number: asn.map(AsNumber),
            ..Default::default()
        }
    }

    fn err(p: &BGPPeerSpec) -> String {
        p.validate(&meta("p")).unwrap_err().to_string()
    }

    #[test]
    fn peer_rules_give_exact_messages() {
        assert!(
            peer("10.0.0.1:1179", Some(64512))
                .validate(&meta("p"))
                .is_ok()
        );
        assert_eq!(
            err(&peer("10.0.0.1:x", Some(64512))),
            "error with field spec.peerIP = '10.0.0.1:x' (must be an IP address, IPv4:port or [IPv6]:port)"
        );
        assert_eq!(
            err(&peer("10.0.0.1", None)),
            "error with field spec.asNumber = '' (asNumber is required when peerIP is set)"
        );
        assert_eq!(
            err(&peer("", None)),
            "error with field spec.peerIP = '' (peerIP or peerSelector is required)"
        );
        let mut p = peer("10.0.0.1", Some(1));
        p.peer_selector = "has(rr)".into();
        assert_eq!(
            err(&p),
            "error with field spec.peerIP = '10.0.0.1' (peerIP and peerSelector cannot both be set)"
        );
        let mut p = peer("10.0.0.1", Some(1));
        p.node = "n1".into();
        p.node_selector = "all()".into();
        assert_eq!(
            err(&p),
            "error with field spec.nodeSelector = 'all()' (node and nodeSelector cannot both be set)"
        );
        let mut p = peer("10.0.0.1", Some(1));
        p.next_hop_mode = Some("Never".into());
        assert_eq!(
            err(&p),
            "error with field spec.nextHopMode = 'Never' (must be one of: Auto, Self, Keep)"
        );
        let mut p = peer("10.0.0.1", Some(1));
        p.max_restart_time = Some("2 minutes".into());
        assert_eq!(
            err(&p),
            "error with field spec.maxRestartTime = '2 minutes' (not a valid duration (e.g. 90s, 1m30s, 500ms))"
        );
    }

    /// Calico's enum: `Auto` (the default) and `Manual`; anything else is refused by name.
    #[test]
    fn reverse_peering_is_auto_or_manual() {
        let p: BGPPeerSpec = serde_json::from_str(
            r#"{"nodeSelector":"all()","peerSelector":"rr == 'true'","reversePeering":"Manual"}"#,
        )
        .unwrap();
        assert!(p.validate(&meta("p")).is_ok());
        assert!(!p.automatic_reverse_peering());
        assert_eq!(
            serde_json::to_value(&p).unwrap()["reversePeering"],
            "Manual"
        );
        let mut p = peer("10.0.0.1", Some(1));
        assert!(p.automatic_reverse_peering(), "Auto by default");
        p.reverse_peering = Some("Auto".into());
        assert!(p.validate(&meta("p")).is_ok() && p.automatic_reverse_peering());
        p.reverse_peering = Some("manual".into());
        assert_eq!(
            err(&p),
            "error with field spec.reversePeering = 'manual' (must be one of: Auto, Manual)"
        );
    }

    #[test]
    fn as_number_out_of_range_fails_to_decode() {
        let e =
            serde_json::from_str::<BGPPeerSpec>(r#"{"peerIP":"10.0.0.1","asNumber":4294967296}"#)
                .unwrap_err()
                .to_string();
        assert!(
            e.contains("AS number must be between 1 and 4294967295"),
            "{e}"
        );
    }

    /// Calico's `{}` entries parse and mean nothing; load-balancer ranges are advertised
    /// only with aggregation on (the default); a bad aggregation value is refused by name.
    #[test]
    fn service_ranges_from_calico_yaml() {
        let c: BGPConfigurationSpec = serde_yaml::from_str(
            "serviceClusterIPs:\n- cidr: 10.101.0.0/16\n- {}\n- cidr: fd00:96::/112\nserviceLoadBalancerIPs:\n- cidr: 80.15.0.0/24\n- {}\nserviceExternalIPs:\n- cidr: 203.0.113.7/32\n",
        )
        .unwrap();
        assert!(c.validate(&meta("default")).is_ok());
        let nets = |c: &BGPConfigurationSpec| -> Vec<String> {
            c.service_ranges().iter().map(|n| n.to_string()).collect()
        };
        assert_eq!(nets(&c), ["10.101.0.0/16", "80.15.0.0/24", "fd00:96::/112"]);
        let mut off = c.clone();
        off.service_load_balancer_aggregation = Some("Disabled".into());
        assert_eq!(nets(&off), ["10.101.0.0/16", "fd00:96::/112"]);
        off.service_load_balancer_aggregation = Some("Off".into());
        assert_eq!(
            off.validate(&meta("default")).unwrap_err().to_string(),
            "error with field spec.serviceLoadBalancerAggregation = 'Off' (must be one of: Enabled, Disabled)"
        );
    }

    #[test]
    fn ignored_interfaces_are_names_or_patterns() {
        let c = |names: &[&str]| BGPConfigurationSpec {
            ignored_interfaces: names.iter().map(|n| n.to_string()).collect(),
            ..Default::default()
        };
        assert!(
            c(&["eth0", "docker*", "br-1.x_y"])
                .validate(&meta("default"))
                .is_ok()
        );
        for bad in ["*", "", "a\"b", "sixteen-chars-xx", "eth 0"] {
            let e = c(&["eth0", bad])
                .validate(&meta("default"))
                .unwrap_err()
                .to_string();
            assert!(
                e.starts_with("error with field spec.ignoredInterfaces[1] = "),
                "{e}"
            );
        }
    }

    #[test]
    fn node_specific_bgp_configuration_cannot_set_global_fields() {
        let c = BGPConfigurationSpec {
            node_to_node_mesh_enabled: Some(false),
            ..Default::default()
        };
        assert!(c.validate(&meta("default")).is_ok());
        assert_eq!(
            c.validate(&meta("node.n1")).unwrap_err().to_string(),
            "error with field spec.nodeToNodeMeshEnabled = 'false' (may only be set on the global BGPConfiguration named 'default')"
        );
        let c = BGPConfigurationSpec {
            listen_port: Some(70000),
            ..Default::default()
        };
        assert_eq!(
            c.validate(&meta("default")).unwrap_err().to_string(),
            "error with field spec.listenPort = '70000' (port must be between 1 and 65535)"
        );
        let c = BGPConfigurationSpec {
            communities: vec![Community {
                name: "c".into(),
                value: "65536:1".into(),
            }],
            ..Default::default()
        };
        assert!(c.validate(&meta("default")).is_err());
        let c = BGPConfigurationSpec {
            communities: vec![Community {
                name: "c".into(),
                value: "64512:100".into(),
            }],
            ..Default::default()
        };
        assert!(c.validate(&meta("default")).is_ok());
    }
}
