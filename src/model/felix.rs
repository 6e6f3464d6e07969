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
    /// Every other Felix setting, passed through untouched.
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
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
        ]
    }

    fn default_value_kind(field: &str) -> FieldKind {
        if DURATION_FIELDS.contains(&field) {
            FieldKind::Duration
        } else if field.ends_with("Enabled") || field == "removeExternalRoutes" {
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
    Bool,
    Int,
    Duration,
    String,
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
        if let Some(v) = &self.default_endpoint_to_host_action {
            validate::one_of(
                "spec.defaultEndpointToHostAction",
                v,
                &["Drop", "Return", "Accept"],
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
