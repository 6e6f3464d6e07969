//! FelixConfiguration: dataplane settings, global (`default`) and per node (`node.<name>`),
//! overridable by `FELIX_<FIELD>` environment variables as in Felix.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::validate::{self, Validated, ValidationError};
use super::{Kind, ObjectMeta, Resource};

/// The kernel route protocol (`proto 80`) of the routes Felix owns (REFERENCE §5): Felix
/// takes these as its own; the CNI plugin replaces Felix's blackhole for a /32 block with
/// the pod's route. A shared fact of the dataplane, so it lives below both.
pub const PROTO_FELIX: u8 = 80;

/// A FelixConfiguration resource.
pub type FelixConfiguration = Resource<FelixConfigurationSpec>;

/// The FelixConfiguration fields this project interprets. Calico has many more; those we
/// do not model are kept in `other` so that a read-modify-write loses nothing.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FelixConfigurationSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route_refresh_interval: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface_prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipip_enabled: Option<bool>,
    #[serde(default, rename = "ipipMTU", skip_serializing_if = "Option::is_none")]
    pub ipip_mtu: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vxlan_enabled: Option<bool>,
    #[serde(default, rename = "vxlanMTU", skip_serializing_if = "Option::is_none")]
    pub vxlan_mtu: Option<u32>,
    #[serde(default, rename = "vxlanPort", skip_serializing_if = "Option::is_none")]
    pub vxlan_port: Option<u32>,
    #[serde(default, rename = "vxlanVNI", skip_serializing_if = "Option::is_none")]
    pub vxlan_vni: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reporting_interval: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_severity_screen: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_enabled: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_host: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_port: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prometheus_metrics_enabled: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prometheus_metrics_host: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prometheus_metrics_port: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_route_protocol: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remove_external_routes: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nat_outgoing_address: Option<String>,
    /// `defaultEndpointToHostAction`: `Drop` (Felix's default), `Return` or `Accept`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_endpoint_to_host_action: Option<String>,
    /// `allowVXLANPacketsFromWorkloads` (default false: a workload's VXLAN packets to the
    /// VXLAN port are dropped, so that a pod cannot inject encapsulated traffic).
    #[serde(
        default,
        rename = "allowVXLANPacketsFromWorkloads",
        skip_serializing_if = "Option::is_none"
    )]
    pub allow_vxlan_packets_from_workloads: Option<bool>,
    /// `allowIPIPPacketsFromWorkloads` (default false: IP-in-IP packets from workloads
    /// are dropped).
    #[serde(
        default,
        rename = "allowIPIPPacketsFromWorkloads",
        skip_serializing_if = "Option::is_none"
    )]
    pub allow_ipip_packets_from_workloads: Option<bool>,
    /// `failsafeInboundHostPorts`: what reaches a host endpoint whatever the policy (an
    /// empty list: none); unset, Felix's defaults ([`DEFAULT_FAILSAFE_INBOUND`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failsafe_inbound_host_ports: Option<Vec<ProtoPort>>,
    /// `failsafeOutboundHostPorts`: what a host endpoint may always send; unset, Felix's
    /// defaults ([`DEFAULT_FAILSAFE_OUTBOUND`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failsafe_outbound_host_ports: Option<Vec<ProtoPort>>,
    /// `logPrefix`: the prefix of Log rules' log lines, with Calico's specifiers `%t`
    /// (tier), `%k` (kind), `%n` (name), `%p` (namespace/name); default `calico-packet`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_prefix: Option<String>,
    /// `nftablesFilterAllowAction` / `nftablesMangleAllowAction` (and the `iptables*`
    /// ones): `Accept` (default) or `Return`. Stored and validated; in nftables an
    /// accept ends only the base chain it is in (every other table still sees the
    /// packet), so both give the same verdicts here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nftables_filter_allow_action: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nftables_mangle_allow_action: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iptables_filter_allow_action: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iptables_mangle_allow_action: Option<String>,
    /// Every other Felix setting, passed through untouched.
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

/// Calico's `ProtoPort`: a failsafe port, with the protocol (`TCP`, `UDP` or `SCTP`; Felix
/// takes `tcp` when none is given) and, optionally, the only network it is open to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProtoPort {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub protocol: String,
    pub port: u16,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub net: String,
}

impl ProtoPort {
    fn of(protocol: &str, port: u16) -> ProtoPort {
        ProtoPort {
            protocol: protocol.to_string(),
            port,
            net: String::new(),
        }
    }

    /// The protocol in upper case (a value someone else stored in lower case reads the
    /// same), `TCP` when none is given.
    pub fn protocol(&self) -> String {
        if self.protocol.is_empty() {
            "TCP".to_string()
        } else {
            self.protocol.to_ascii_uppercase()
        }
    }
}

/// Felix's default `failsafeInboundHostPorts`: SSH, DHCP, then [`FAILSAFE_BOTH_WAYS`].
pub const DEFAULT_FAILSAFE_INBOUND: &[(&str, u16)] = &[("TCP", 22), ("UDP", 68)];

/// Felix's default `failsafeOutboundHostPorts`: DNS, DHCP, then [`FAILSAFE_BOTH_WAYS`].
pub const DEFAULT_FAILSAFE_OUTBOUND: &[(&str, u16)] = &[("UDP", 53), ("UDP", 67)];

/// The end of both default failsafe lists: BGP, etcd, Typha, the Kubernetes API.
pub const FAILSAFE_BOTH_WAYS: &[(&str, u16)] = &[
    ("TCP", 179),
    ("TCP", 2379),
    ("TCP", 2380),
    ("TCP", 5473),
    ("TCP", 6443),
    ("TCP", 6666),
    ("TCP", 6667),
];

/// Felix's port-list format, as `FELIX_FAILSAFE*HOSTPORTS` takes it: comma-separated
/// `<port>`, `<protocol>:<port>` or `<protocol>:<net>:<port>` (an IPv6 net in brackets),
/// protocol `tcp` (the default) or `udp`; `none` is the empty list.
pub fn parse_port_list(raw: &str) -> Result<Vec<ProtoPort>, String> {
    if raw.trim().eq_ignore_ascii_case("none") {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for entry in raw.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let mut rest = entry.to_string();
        let mut net = String::new();
        if let (Some(a), Some(b)) = (entry.find('['), entry.find("]:"))
            && a < b
        {
            net = entry[a + 1..b].to_string();
            rest = format!("{}{}", &entry[..a], &entry[b + 2..]);
        }
        let parts: Vec<&str> = rest.split(':').collect();
        let (proto, port) = match parts.as_slice() {
            [port] => ("tcp", *port),
            [proto, port] => (*proto, *port),
            [proto, n, port] => {
                net = n.to_string();
                (*proto, *port)
            }
            _ => {
                return Err(format!(
                    "{entry}: ports should be <protocol>:<net>:<number> or <protocol>:<number> or <number>"
                ));
            }
        };
        let proto = proto.to_ascii_lowercase();
        if proto != "tcp" && proto != "udp" {
            return Err(format!("{entry}: unknown protocol: {proto}"));
        }
        let port: u16 = port
            .parse()
            .map_err(|_| format!("{entry}: ports should be integers in range 0-65535"))?;
        if !net.is_empty() {
            let parsed = super::networkset::parse_net(&net)
                .ok_or_else(|| format!("{entry}: invalid CIDR or IP {net}"))?;
            net = parsed.trunc().to_string();
        }
        out.push(ProtoPort {
            protocol: proto.to_ascii_uppercase(),
            port,
            net,
        });
    }
    Ok(out)
}

/// Which fields are durations (Felix takes them in seconds from the environment).
const DURATION_FIELDS: &[&str] = &["routeRefreshInterval", "reportingInterval"];

impl FelixConfigurationSpec {
    /// Per-node values override global ones (`node.<name>` over `default`).
    pub fn merged(global: &Self, node: &Self) -> Self {
        let mut g = serde_json::to_value(global).expect("FelixConfigurationSpec serializes");
        let n = serde_json::to_value(node).expect("FelixConfigurationSpec serializes");
        if let (Value::Object(g), Value::Object(n)) = (&mut g, n) {
            g.extend(n);
        }
        serde_json::from_value(g).expect("merge of two valid specs is valid")
    }

    /// Apply one `FELIX_<FIELD>` override (field name matched case-insensitively, as Felix
    /// does). Returns false when the field is not one we model (the caller warns).
    pub fn apply_env(&mut self, env_name: &str, value: &str) -> Result<bool, ValidationError> {
        let key = env_name.trim_start_matches("FELIX_").to_ascii_lowercase();
        let mut obj = match serde_json::to_value(&*self) {
            Ok(Value::Object(o)) => o,
            _ => serde_json::Map::new(),
        };
        let Some(field) = Self::known_fields()
            .into_iter()
            .find(|f| f.to_ascii_lowercase() == key)
        else {
            return Ok(false);
        };
        let bad = |reason: &str| ValidationError::new(env_name, value, reason.to_string());
        // An empty port list is unset (Felix's defaults), as Felix reads it; `none` is
        // the empty list.
        if matches!(Self::default_value_kind(field), FieldKind::PortList) && value.trim().is_empty()
        {
            obj.remove(field);
            *self = serde_json::from_value(Value::Object(obj)).map_err(|e| bad(&e.to_string()))?;
            return Ok(true);
        }
        let probe = Self::default_value_kind(field);
        let parsed = match probe {
            FieldKind::Bool => Value::Bool(match value.to_ascii_lowercase().as_str() {
                "true" | "1" | "yes" | "y" | "t" => true,
                "false" | "0" | "no" | "n" | "f" => false,
                _ => return Err(bad("expected a boolean (true or false)")),
            }),
            FieldKind::Int => Value::from(
                value
                    .parse::<u32>()
                    .map_err(|_| bad("expected a non-negative integer"))?,
            ),
            FieldKind::Duration => {
                let secs: f64 = value
                    .parse()
                    .map_err(|_| bad("expected a number of seconds"))?;
                // try_from: a huge value (1e300) is refused, never a panic.
                let d = Duration::try_from_secs_f64(secs)
                    .map_err(|_| bad("expected a number of seconds (0 to about 292 years)"))?;
                Value::from(validate::format_duration(d))
            }
            FieldKind::String => Value::from(value),
            FieldKind::PortList => {
                serde_json::to_value(parse_port_list(value).map_err(|e| bad(&e))?)
                    .expect("ports serialize")
            }
        };
        // Only the variable's own field is validated: another field that someone else
        // stored badly in the datastore (e.g. an overflowing duration) is reported by the
        // syncer and replaced by its default where used, and must not make every
        // `FELIX_*` variable fail (which stopped the node).
        let alone: Self = serde_json::from_value(Value::Object(
            [(field.to_string(), parsed.clone())].into_iter().collect(),
        ))
        .map_err(|e| bad(&e.to_string()))?;
        alone.validate(&ObjectMeta::default())?;
        obj.insert(field.to_string(), parsed);
        *self = serde_json::from_value(Value::Object(obj)).map_err(|e| bad(&e.to_string()))?;
        Ok(true)
    }

    fn known_fields() -> Vec<&'static str> {
        vec![
            "routeRefreshInterval",
            "interfacePrefix",
            "ipipEnabled",
            "ipipMTU",
            "vxlanEnabled",
            "vxlanMTU",
            "vxlanPort",
            "vxlanVNI",
            "reportingInterval",
            "logSeverityScreen",
            "healthEnabled",
            "healthHost",
            "healthPort",
            "prometheusMetricsEnabled",
            "prometheusMetricsHost",
            "prometheusMetricsPort",
            "deviceRouteProtocol",
            "removeExternalRoutes",
            "natOutgoingAddress",
            "defaultEndpointToHostAction",
            "allowVXLANPacketsFromWorkloads",
            "allowIPIPPacketsFromWorkloads",
            "failsafeInboundHostPorts",
            "failsafeOutboundHostPorts",
            "logPrefix",
            "nftablesFilterAllowAction",
            "nftablesMangleAllowAction",
            "iptablesFilterAllowAction",
            "iptablesMangleAllowAction",
        ]
    }

    fn default_value_kind(field: &str) -> FieldKind {
        if field.ends_with("HostPorts") {
            FieldKind::PortList
        } else if DURATION_FIELDS.contains(&field) {
            FieldKind::Duration
        } else if field.ends_with("Enabled")
            || field == "removeExternalRoutes"
            || field.ends_with("FromWorkloads")
        {
            FieldKind::Bool
        } else if field.ends_with("MTU")
            || field.ends_with("Port")
            || field == "vxlanVNI"
            || field == "deviceRouteProtocol"
        {
            FieldKind::Int
        } else {
            FieldKind::String
        }
    }

    /// `defaultEndpointToHostAction` (case-insensitive as Felix reads it), default `Drop`;
    /// a value Felix does not know is `Drop` too.
    pub fn endpoint_to_host_action(&self) -> &'static str {
        match self
            .default_endpoint_to_host_action
            .as_deref()
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            Some("return") => "Return",
            Some("accept") => "Accept",
            _ => "Drop",
        }
    }

    /// `logPrefix`, `calico-packet` when unset or empty.
    pub fn log_prefix(&self) -> &str {
        self.log_prefix
            .as_deref()
            .filter(|p| !p.is_empty())
            .unwrap_or("calico-packet")
    }

    /// `failsafeInboundHostPorts`, Felix's defaults when unset.
    pub fn failsafe_inbound(&self) -> Vec<ProtoPort> {
        failsafe_or(&self.failsafe_inbound_host_ports, DEFAULT_FAILSAFE_INBOUND)
    }

    /// `failsafeOutboundHostPorts`, Felix's defaults when unset.
    pub fn failsafe_outbound(&self) -> Vec<ProtoPort> {
        failsafe_or(
            &self.failsafe_outbound_host_ports,
            DEFAULT_FAILSAFE_OUTBOUND,
        )
    }

    /// `routeRefreshInterval`, default 90 s.
    pub fn route_refresh_interval(&self) -> Duration {
        self.route_refresh_interval
            .as_deref()
            .and_then(validate::parse_go_duration)
            .unwrap_or(Duration::from_secs(90))
    }
    /// `prometheusMetricsEnabled`, default false.
    pub fn prometheus_enabled(&self) -> bool {
        self.prometheus_metrics_enabled.unwrap_or(false)
    }
    /// `prometheusMetricsPort`, default 9091.
    pub fn prometheus_port(&self) -> u16 {
        self.prometheus_metrics_port
            .and_then(|p| u16::try_from(p).ok())
            .unwrap_or(9091)
    }
    /// `prometheusMetricsHost`, default all addresses.
    pub fn prometheus_host(&self) -> &str {
        self.prometheus_metrics_host.as_deref().unwrap_or("0.0.0.0")
    }
    /// `healthEnabled`, default true here (Calico's manifests always enable it).
    pub fn health_enabled(&self) -> bool {
        self.health_enabled.unwrap_or(true)
    }
    /// `healthPort`, default 9099.
    pub fn health_port(&self) -> u16 {
        self.health_port
            .and_then(|p| u16::try_from(p).ok())
            .unwrap_or(9099)
    }
    /// `healthHost`, default `localhost` (Felix's default).
    pub fn health_host(&self) -> &str {
        self.health_host.as_deref().unwrap_or("localhost")
    }
    /// `interfacePrefix`, default `cali`.
    pub fn interface_prefix(&self) -> &str {
        self.interface_prefix.as_deref().unwrap_or("cali")
    }
    /// `vxlanVNI`, default 4096.
    pub fn vxlan_vni(&self) -> u32 {
        self.vxlan_vni.unwrap_or(4096)
    }
    /// `vxlanPort`, default 4789.
    pub fn vxlan_port(&self) -> u16 {
        self.vxlan_port
            .and_then(|p| u16::try_from(p).ok())
            .unwrap_or(4789)
    }
    /// `deviceRouteProtocol`, default 3 (boot).
    pub fn device_route_protocol(&self) -> u8 {
        self.device_route_protocol
            .and_then(|p| u8::try_from(p).ok())
            .unwrap_or(3)
    }
}

enum FieldKind {
    PortList,
    Bool,
    Int,
    Duration,
    String,
}

fn failsafe_or(set: &Option<Vec<ProtoPort>>, default: &[(&str, u16)]) -> Vec<ProtoPort> {
    match set {
        Some(v) => v.clone(),
        None => default
            .iter()
            .chain(FAILSAFE_BOTH_WAYS)
            .map(|(p, n)| ProtoPort::of(p, *n))
            .collect(),
    }
}

impl Kind for FelixConfigurationSpec {
    const KIND: &'static str = "FelixConfiguration";
    const PLURAL: &'static str = "felixconfigurations";

    fn validate(&self, _meta: &ObjectMeta) -> Validated {
        for (f, v) in [
            ("spec.routeRefreshInterval", &self.route_refresh_interval),
            ("spec.reportingInterval", &self.reporting_interval),
        ] {
            if let Some(v) = v {
                validate::duration(f, v)?;
            }
        }
        for (f, v) in [
            ("spec.healthPort", self.health_port),
            ("spec.prometheusMetricsPort", self.prometheus_metrics_port),
            ("spec.vxlanPort", self.vxlan_port),
        ] {
            if let Some(v) = v {
                validate::port(f, v)?;
            }
        }
        for (f, v) in [
            (
                "spec.failsafeInboundHostPorts",
                &self.failsafe_inbound_host_ports,
            ),
            (
                "spec.failsafeOutboundHostPorts",
                &self.failsafe_outbound_host_ports,
            ),
        ] {
            for (i, p) in v.iter().flatten().enumerate() {
                if !["TCP", "UDP", "SCTP"].contains(&p.protocol.as_str()) && !p.protocol.is_empty()
                {
                    return Err(ValidationError::new(
                        &format!("{f}[{i}].protocol"),
                        &p.protocol,
                        "protocol must be 'TCP' or 'UDP' or 'SCTP'.",
                    ));
                }
                if !p.net.is_empty() && super::networkset::parse_net(&p.net).is_none() {
                    return Err(ValidationError::new(
                        &format!("{f}[{i}].net"),
                        &p.net,
                        "not a valid CIDR or IP address",
                    ));
                }
            }
        }
        if let Some(v) = &self.default_endpoint_to_host_action {
            validate::one_of(
                "spec.defaultEndpointToHostAction",
                v,
                &["Drop", "Return", "Accept"],
            )?;
        }
        for (field, v) in [
            (
                "spec.nftablesFilterAllowAction",
                &self.nftables_filter_allow_action,
            ),
            (
                "spec.nftablesMangleAllowAction",
                &self.nftables_mangle_allow_action,
            ),
            (
                "spec.iptablesFilterAllowAction",
                &self.iptables_filter_allow_action,
            ),
            (
                "spec.iptablesMangleAllowAction",
                &self.iptables_mangle_allow_action,
            ),
        ] {
            // Calico's pattern `^(?i)(Accept|Return)?$`.
            if let Some(v) = v {
                let ok = v.is_empty()
                    || v.eq_ignore_ascii_case("accept")
                    || v.eq_ignore_ascii_case("return");
                validate::require(ok, field, v, "must be Accept or Return")?;
            }
        }
        if let Some(v) = &self.log_prefix {
            // Calico's pattern `^([a-zA-Z0-9%: /_-])*$`.
            let ok = v
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "%: /_-".contains(c));
            validate::require(
                ok,
                "spec.logPrefix",
                v,
                "may hold only letters, digits, '%', ':', ' ', '/', '_' and '-'",
            )?;
        }
        if let Some(v) = self.vxlan_vni
            && !(1..=16_777_215).contains(&v)
        {
            return Err(ValidationError::new(
                "spec.vxlanVNI",
                v,
                "VNI must be between 1 and 16777215",
            ));
        }
        if let Some(v) = self.device_route_protocol
            && v > 255
        {
            return Err(ValidationError::new(
                "spec.deviceRouteProtocol",
                v,
                "route protocol must be between 0 and 255",
            ));
        }
        for (f, v) in [
            ("spec.ipipMTU", self.ipip_mtu),
            ("spec.vxlanMTU", self.vxlan_mtu),
        ] {
            if let Some(v) = v
                && v != 0
                && !(68..=65535).contains(&v)
            {
                return Err(ValidationError::new(
                    f,
                    v,
                    "MTU must be 0 (auto) or between 68 and 65535",
                ));
            }
        }
        if let Some(p) = &self.interface_prefix
            && (p.is_empty() || p.len() > 14)
        {
            return Err(ValidationError::new(
                "spec.interfacePrefix",
                p,
                "must be between 1 and 14 characters",
            ));
        }
        if let Some(s) = &self.log_severity_screen {
            validate::log_severity("spec.logSeverityScreen", s)?;
        }
        if let Some(a) = &self.nat_outgoing_address
            && !a.is_empty()
            && a.parse::<std::net::Ipv4Addr>().is_err()
        {
            return Err(ValidationError::new(
                "spec.natOutgoingAddress",
                a,
                "not a valid IPv4 address",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Felix's port-list cases (felix/config/config_params_test.go): old and new syntax,
    /// nets (IPv6 in brackets), `none`; empty is unset (the defaults); bad ones refused
    /// naming the variable.
    /// `logPrefix` and the allow actions are checked as Calico's patterns say, and
    /// reach `FELIX_*` variables too.
    #[test]
    fn log_prefix_and_allow_actions_are_validated() {
        let spec = |json: &str| -> FelixConfigurationSpec { serde_json::from_str(json).unwrap() };
        let meta = ObjectMeta::default();
        assert!(
            spec(r#"{"logPrefix":"drop %k/%n: x_y-z"}"#)
                .validate(&meta)
                .is_ok()
        );
        let e = spec(r#"{"logPrefix":"a\"b"}"#).validate(&meta).unwrap_err();
        assert!(e.to_string().contains("spec.logPrefix"), "{e}");
        assert_eq!(spec("{}").log_prefix(), "calico-packet");
        assert!(
            spec(r#"{"nftablesFilterAllowAction":"return"}"#)
                .validate(&meta)
                .is_ok()
        );
        let e = spec(r#"{"nftablesMangleAllowAction":"Drop"}"#)
            .validate(&meta)
            .unwrap_err();
        assert!(
            e.to_string().contains("spec.nftablesMangleAllowAction"),
            "{e}"
        );
        let mut s = FelixConfigurationSpec::default();
        assert!(s.apply_env("FELIX_LOGPREFIX", "calico-%t").unwrap());
        assert_eq!(s.log_prefix(), "calico-%t");
        assert!(
            s.apply_env("FELIX_IPTABLESFILTERALLOWACTION", "Reject")
                .is_err()
        );
    }

    #[test]
    fn failsafe_ports_parse_as_felix_does() {
        let pp = |proto: &str, port: u16, net: &str| ProtoPort {
            protocol: proto.into(),
            port,
            net: net.into(),
        };
        assert_eq!(
            parse_port_list("1,2").unwrap(),
            [pp("TCP", 1, ""), pp("TCP", 2, "")]
        );
        assert_eq!(
            parse_port_list("tcp:1,udp:2").unwrap(),
            [pp("TCP", 1, ""), pp("UDP", 2, "")]
        );
        assert_eq!(
            parse_port_list("tcp:0.0.0.0/0:1,udp:[::/0]:2, 3").unwrap(),
            [
                pp("TCP", 1, "0.0.0.0/0"),
                pp("UDP", 2, "::/0"),
                pp("TCP", 3, "")
            ]
        );
        assert_eq!(
            parse_port_list("udp:10.0.0.1:53").unwrap(),
            [pp("UDP", 53, "10.0.0.1/32")]
        );
        assert_eq!(parse_port_list("none").unwrap(), []);
        for bad in [
            "foo:1",
            "tcp:0.0.0.0/0:1:bar",
            "tcp:http",
            "tcp:70000",
            "udp:10.0.0.300:53",
        ] {
            assert!(parse_port_list(bad).is_err(), "{bad}");
        }

        let mut c = FelixConfigurationSpec::default();
        let defaults = c.failsafe_inbound();
        assert_eq!(defaults.len(), 9);
        assert_eq!(defaults[0], pp("TCP", 22, ""));
        assert_eq!(c.failsafe_outbound()[0], pp("UDP", 53, ""));
        assert!(
            c.apply_env("FELIX_FAILSAFEINBOUNDHOSTPORTS", "udp:68,tcp:179")
                .unwrap()
        );
        assert_eq!(
            c.failsafe_inbound(),
            [pp("UDP", 68, ""), pp("TCP", 179, "")]
        );
        assert!(
            c.apply_env("FELIX_FAILSAFEOUTBOUNDHOSTPORTS", "none")
                .unwrap()
        );
        assert!(c.failsafe_outbound().is_empty());
        assert!(c.apply_env("FELIX_FAILSAFEINBOUNDHOSTPORTS", "").unwrap());
        assert_eq!(c.failsafe_inbound(), defaults);
        let err = c
            .apply_env("FELIX_FAILSAFEINBOUNDHOSTPORTS", "sctp:9")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("FELIX_FAILSAFEINBOUNDHOSTPORTS") && err.contains("unknown protocol"),
            "{err}"
        );

        // In the datastore: Calico's JSON, validated.
        let stored: FelixConfigurationSpec = serde_json::from_str(
            r#"{"failsafeInboundHostPorts":[{"protocol":"TCP","port":22},{"port":80,"net":"10.0.0.0/8"}],"failsafeOutboundHostPorts":[]}"#,
        )
        .unwrap();
        assert!(stored.validate(&ObjectMeta::default()).is_ok());
        assert_eq!(stored.failsafe_inbound()[1].protocol(), "TCP");
        assert!(stored.failsafe_outbound().is_empty());
        let bad: FelixConfigurationSpec =
            serde_json::from_str(r#"{"failsafeInboundHostPorts":[{"protocol":"ICMP","port":22}]}"#)
                .unwrap();
        let err = bad
            .validate(&ObjectMeta::default())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("spec.failsafeInboundHostPorts[0].protocol"),
            "{err}"
        );
    }

    #[test]
    fn per_node_values_override_global_and_unknown_fields_survive() {
        let g: FelixConfigurationSpec = serde_json::from_str(
            r#"{"routeRefreshInterval":"60s","healthPort":9099,"bpfEnabled":false}"#,
        )
        .unwrap();
        let n: FelixConfigurationSpec =
            serde_json::from_str(r#"{"healthPort":9199,"ipipMTU":1400}"#).unwrap();
        let m = FelixConfigurationSpec::merged(&g, &n);
        assert_eq!(m.health_port(), 9199);
        assert_eq!(m.route_refresh_interval(), Duration::from_secs(60));
        assert_eq!(m.ipip_mtu, Some(1400));
        assert_eq!(m.other.get("bpfEnabled"), Some(&Value::Bool(false)));
        assert!(
            serde_json::to_string(&m)
                .unwrap()
                .contains("\"bpfEnabled\":false")
        );
    }

    #[test]
    fn env_overrides_parse_like_felix() {
        let mut s = FelixConfigurationSpec::default();
        assert!(
            s.apply_env("FELIX_PROMETHEUSMETRICSENABLED", "true")
                .unwrap()
        );
        assert!(s.prometheus_enabled());
        assert!(s.apply_env("FELIX_ROUTEREFRESHINTERVAL", "30").unwrap());
        assert_eq!(s.route_refresh_interval(), Duration::from_secs(30));
        assert!(s.apply_env("FELIX_HEALTHPORT", "9199").unwrap());
        assert_eq!(s.health_port(), 9199);
        assert!(!s.apply_env("FELIX_SOMETHINGELSE", "x").unwrap());
        // A bad value stored in the datastore for another field does not fail the variable.
        let mut stored: FelixConfigurationSpec =
            serde_json::from_str(r#"{"routeRefreshInterval":"10000000000000000h"}"#).unwrap();
        assert!(stored.apply_env("FELIX_HEALTHPORT", "9199").unwrap());
        assert_eq!(stored.health_port(), 9199);
        assert_eq!(stored.route_refresh_interval(), Duration::from_secs(90));
        assert_eq!(
            s.apply_env("FELIX_ROUTEREFRESHINTERVAL", "1e300")
                .unwrap_err()
                .to_string(),
            "error with field FELIX_ROUTEREFRESHINTERVAL = '1e300' (expected a number of seconds (0 to about 292 years))"
        );
        assert_eq!(
            s.apply_env("FELIX_HEALTHPORT", "abc")
                .unwrap_err()
                .to_string(),
            "error with field FELIX_HEALTHPORT = 'abc' (expected a non-negative integer)"
        );
        assert_eq!(
            s.apply_env("FELIX_HEALTHPORT", "70000")
                .unwrap_err()
                .to_string(),
            "error with field spec.healthPort = '70000' (port must be between 1 and 65535)"
        );
        assert_eq!(
            s.apply_env("FELIX_PROMETHEUSMETRICSENABLED", "maybe")
                .unwrap_err()
                .to_string(),
            "error with field FELIX_PROMETHEUSMETRICSENABLED = 'maybe' (expected a boolean (true or false))"
        );
    }
}
