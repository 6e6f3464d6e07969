//! Calico's policy rule model (`api/pkg/apis/projectcalico/v3/policy_common.go`,
//! `api/pkg/lib/numorstring`) with its exact JSON names and omitempty behaviour, and the
//! rule checks of Calico's validator (`libcalico-go/lib/validator/v3/validator.go` plus
//! the CEL rules on `Rule`, `EntityRule` and `ICMPFields`). REFERENCE §9 "Rule model".

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use ipnet::IpNet;
use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

use super::validate::{self, Validated, ValidationError};

/// Protocol names Calico accepts (`protocolRegex`), in their canonical spelling.
pub const PROTOCOL_NAMES: &[&str] = &["TCP", "UDP", "ICMP", "ICMPv6", "SCTP", "UDPLite"];

/// A rule's `protocol` / `notProtocol`: a name or a number (Calico's `numorstring.Protocol`).
/// Names are canonicalised case-insensitively on decode (`tcp` -> `TCP`), as
/// `ProtocolFromString` does; an unknown name is kept so validation can name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Protocol {
    Number(u8),
    Name(String),
}

impl Protocol {
    /// From a name or a decimal number.
    pub fn parse(s: &str) -> Protocol {
        if let Ok(n) = s.parse::<u8>() {
            return Protocol::Number(n);
        }
        match PROTOCOL_NAMES.iter().find(|n| n.eq_ignore_ascii_case(s)) {
            Some(n) => Protocol::Name((*n).to_string()),
            None => Protocol::Name(s.to_string()),
        }
    }

    /// The IP protocol number, when the name is known.
    pub fn number(&self) -> Option<u8> {
        match self {
            Protocol::Number(n) => Some(*n),
            Protocol::Name(n) => match n.as_str() {
                "TCP" => Some(6),
                "UDP" => Some(17),
                "ICMP" => Some(1),
                "ICMPv6" => Some(58),
                "SCTP" => Some(132),
                "UDPLite" => Some(136),
                _ => None,
            },
        }
    }

    /// Calico's `SupportsPorts`: TCP, UDP and SCTP (by name or number).
    pub fn supports_ports(&self) -> bool {
        matches!(self.number(), Some(6 | 17 | 132))
    }

    pub(crate) fn validate(&self, field: &str) -> Validated {
        match self {
            Protocol::Number(0) => Err(ValidationError::new(field, 0, "protocol number invalid")),
            Protocol::Number(_) => Ok(()),
            Protocol::Name(n) if PROTOCOL_NAMES.contains(&n.as_str()) => Ok(()),
            Protocol::Name(n) => Err(ValidationError::new(
                field,
                n,
                "protocol name invalid (TCP, UDP, ICMP, ICMPv6, SCTP, UDPLite or 1-255)",
            )),
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Protocol::Number(n) => write!(f, "{n}"),
            Protocol::Name(n) => f.write_str(n),
        }
    }
}

impl Serialize for Protocol {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Protocol::Number(n) => s.serialize_u8(*n),
            Protocol::Name(n) => s.serialize_str(n),
        }
    }
}

impl<'de> Deserialize<'de> for Protocol {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Protocol;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a protocol name or a number 1-255")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Protocol, E> {
                u8::try_from(v)
                    .map(Protocol::Number)
                    .map_err(|_| E::custom(format!("protocol number {v} is out of range 1-255")))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Protocol, E> {
                u64::try_from(v)
                    .map_err(|_| E::custom(format!("protocol number {v} is out of range 1-255")))
                    .and_then(|v| self.visit_u64(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Protocol, E> {
                Ok(Protocol::parse(v))
            }
        }
        d.deserialize_any(V)
    }
}

/// A port match (Calico's `numorstring.Port`): a number, a `"lo:hi"` range or a named
/// port (resolved against the endpoints' `ports`). A single port is written back as a
/// number, a range as `"lo:hi"`, as Calico's `MarshalJSON` does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Port {
    Range { min: u16, max: u16 },
    Named(String),
}

impl Port {
    /// From Calico's string form: `"80"`, `"1000:2000"` or a name.
    pub fn parse(s: &str) -> Result<Port, String> {
        if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
            let n = s
                .parse::<u16>()
                .map_err(|_| format!("invalid port format ({s})"))?;
            return Ok(Port::Range { min: n, max: n });
        }
        if let Some((lo, hi)) = s.split_once(':')
            && !lo.is_empty()
            && !hi.is_empty()
            && lo.bytes().chain(hi.bytes()).all(|b| b.is_ascii_digit())
        {
            let p = |x: &str| {
                x.parse::<u16>()
                    .map_err(|_| format!("invalid minimum/maximum port in range ({s})"))
            };
            return Ok(Port::Range {
                min: p(lo)?,
                max: p(hi)?,
            });
        }
        let name_ok = (1..=128).contains(&s.len())
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
        if name_ok {
            Ok(Port::Named(s.to_string()))
        } else {
            Err(format!("invalid name for named port ({s})"))
        }
    }

    /// Whether this is a named port (allowed without a protocol).
    pub fn is_named(&self) -> bool {
        matches!(self, Port::Named(_))
    }

    /// Calico's `validatePort`: a range in order, numbers 1-65535.
    fn validate(&self, field: &str) -> Validated {
        match self {
            Port::Named(_) => Ok(()),
            Port::Range { min, max } if min > max => {
                Err(ValidationError::new(field, self, "port range invalid"))
            }
            Port::Range { min: 0, .. } => Err(ValidationError::new(
                field,
                self,
                "port range invalid, port number must be between 1 and 65535",
            )),
            Port::Range { .. } => Ok(()),
        }
    }
}

impl fmt::Display for Port {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Port::Range { min, max } if min == max => write!(f, "{min}"),
            Port::Range { min, max } => write!(f, "{min}:{max}"),
            Port::Named(n) => f.write_str(n),
        }
    }
}

impl Serialize for Port {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Port::Range { min, max } if min == max => s.serialize_u16(*min),
            other => s.serialize_str(&other.to_string()),
        }
    }
}

impl<'de> Deserialize<'de> for Port {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Port;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a port number, a \"min:max\" range or a port name")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Port, E> {
                u16::try_from(v)
                    .map(|n| Port::Range { min: n, max: n })
                    .map_err(|_| E::custom(format!("port {v} is out of range 0-65535")))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Port, E> {
                u64::try_from(v)
                    .map_err(|_| E::custom(format!("port {v} is out of range 0-65535")))
                    .and_then(|v| self.visit_u64(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Port, E> {
                Port::parse(v).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// `icmp` / `notICMP`: type 0-254 and code 0-255 (code needs a type).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IcmpFields {
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub icmp_type: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<i64>,
}

impl IcmpFields {
    fn validate(&self, field: &str) -> Validated {
        if let Some(t) = self.icmp_type
            && !(0..=254).contains(&t)
        {
            return Err(ValidationError::new(
                &format!("{field}.type"),
                t,
                "must be between 0 and 254",
            ));
        }
        match (self.icmp_type, self.code) {
            (_, Some(c)) if !(0..=255).contains(&c) => Err(ValidationError::new(
                &format!("{field}.code"),
                c,
                "must be between 0 and 255",
            )),
            (None, Some(c)) => Err(ValidationError::new(
                &format!("{field}.code"),
                c,
                "ICMP code specified without an ICMP type",
            )),
            _ => Ok(()),
        }
    }
}

/// `services`: a Kubernetes Service (Kubernetes datastore only; stored as Calico does).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceMatch {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub namespace: String,
}

/// `serviceAccounts`: names and a selector, ANDed.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceAccountMatch {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub names: Vec<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub selector: String,
}

/// `source` / `destination`, fields in Calico's order.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EntityRule {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nets: Vec<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub selector: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub namespace_selector: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub services: Option<ServiceMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<Port>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_nets: Vec<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub not_selector: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_ports: Vec<Port>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_accounts: Option<ServiceAccountMatch>,
}

impl EntityRule {
    /// Go's `omitzero`: an entity rule with nothing set is left out.
    pub fn is_empty(&self) -> bool {
        *self == EntityRule::default()
    }

    fn validate(&self, field: &str) -> Validated {
        let f = |s: &str| format!("{field}.{s}");
        for (name, sel) in [
            ("selector", &self.selector),
            ("notSelector", &self.not_selector),
        ] {
            if sel.contains("global(") {
                return Err(ValidationError::new(
                    &f(name),
                    sel,
                    "global() can only be used in an EntityRule namespaceSelector",
                ));
            }
            if !sel.is_empty() {
                validate::selector(&f(name), sel)?;
            }
        }
        let ns = &self.namespace_selector;
        if ns.contains("global(") && ns.trim() != "global()" {
            return Err(ValidationError::new(
                &f("namespaceSelector"),
                ns,
                "global() cannot be combined with other selectors",
            ));
        }
        if !ns.is_empty() && ns.trim() != "global()" {
            validate::selector(&f("namespaceSelector"), ns)?;
        }
        if let Some(sa) = &self.service_accounts
            && !sa.selector.is_empty()
        {
            validate::selector(&f("serviceAccounts.selector"), &sa.selector)?;
        }
        for (name, ports) in [("ports", &self.ports), ("notPorts", &self.not_ports)] {
            for (i, p) in ports.iter().enumerate() {
                p.validate(&format!("{field}.{name}[{i}]"))?;
            }
        }
        self.validate_services(field)
    }

    /// The CEL rules on `services`: a name, and nothing else that picks endpoints.
    fn validate_services(&self, field: &str) -> Validated {
        let Some(svc) = &self.services else {
            return Ok(());
        };
        let f = format!("{field}.services");
        let clash = |what: &str| {
            Err(ValidationError::new(
                &f,
                &svc.name,
                format!("cannot specify {what} and Services on the same rule"),
            ))
        };
        if svc.name.is_empty() {
            return Err(ValidationError::new(
                &format!("{f}.name"),
                "",
                "services must specify a service name",
            ));
        }
        validate::name(&format!("{f}.name"), &svc.name)?;
        if !svc.namespace.is_empty() {
            validate::name(&format!("{f}.namespace"), &svc.namespace)?;
        }
        if !self.namespace_selector.is_empty() {
            return clash("NamespaceSelector");
        }
        if self.service_accounts.is_some() {
            return clash("ServiceAccounts");
        }
        if !self.selector.is_empty() || !self.not_selector.is_empty() {
            return clash("Selector/NotSelector");
        }
        if !self.nets.is_empty() || !self.not_nets.is_empty() {
            return clash("Nets/NotNets");
        }
        Ok(())
    }
}

/// One `http.paths` entry: exactly one of `exact` and `prefix`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpPath {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub exact: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub prefix: String,
}

/// `http`: an L7 match (Felix enforces L3/L4 only; stored for Calico's L7 components).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpMatch {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<HttpPath>,
}

impl HttpMatch {
    /// Calico's `validateHTTPMethods` and `validateHTTPPaths`.
    fn validate(&self, field: &str) -> Validated {
        let unique: BTreeSet<&String> = self.methods.iter().collect();
        if unique.len() != self.methods.len() {
            return Err(ValidationError::new(
                &format!("{field}.methods"),
                self.methods.join(","),
                "invalid methods (duplicates)",
            ));
        }
        for (i, p) in self.paths.iter().enumerate() {
            let f = format!("{field}.paths[{i}]");
            if !p.exact.is_empty() && !p.prefix.is_empty() {
                return Err(ValidationError::new(
                    &f,
                    &p.exact,
                    "invalid path match: both 'exact' and 'prefix' are set",
                ));
            }
            let v = if p.exact.is_empty() {
                &p.prefix
            } else {
                &p.exact
            };
            if v.is_empty() {
                return Err(ValidationError::new(
                    &f,
                    v,
                    "invalid path match: either 'exact' or 'prefix' must be set",
                ));
            }
            if !v.starts_with('/') || v.contains(['?', ' ', '#']) {
                return Err(ValidationError::new(
                    &f,
                    v,
                    "invalid path (must start with `/` and not contain `?` or `#`)",
                ));
            }
        }
        Ok(())
    }
}

/// `metadata` of a rule.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleMetadata {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// Calico's `Rule`, fields in Calico's order.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rule {
    /// `Allow`, `Deny`, `Log` or `Pass` (always written, as Calico has no omitempty).
    #[serde(default)]
    pub action: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_version: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<Protocol>,
    #[serde(default, rename = "icmp", skip_serializing_if = "Option::is_none")]
    pub icmp: Option<IcmpFields>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_protocol: Option<Protocol>,
    #[serde(default, rename = "notICMP", skip_serializing_if = "Option::is_none")]
    pub not_icmp: Option<IcmpFields>,
    #[serde(default, skip_serializing_if = "EntityRule::is_empty")]
    pub source: EntityRule,
    #[serde(default, skip_serializing_if = "EntityRule::is_empty")]
    pub destination: EntityRule,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpMatch>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<RuleMetadata>,
}

/// Rule actions.
pub const ACTIONS: &[&str] = &["Allow", "Deny", "Log", "Pass"];

const PORTS_NEED_PROTOCOL: &str =
    "rules with numeric port or port range must set protocol to TCP or UDP or SCTP";
const PORTS_NEED_PORT_PROTOCOL: &str =
    "rules that specify ports must set protocol to TCP or UDP or SCTP";

impl Rule {
    /// Every check Calico's validator and CRD rules make on one rule; `field` is the
    /// rule's path (`spec.ingress[0]`).
    pub fn validate(&self, field: &str) -> Validated {
        let f = |s: &str| format!("{field}.{s}");
        validate::one_of(&f("action"), &self.action, ACTIONS)?;
        if let Some(v) = self.ip_version
            && v != 4
            && v != 6
        {
            return Err(ValidationError::new(&f("ipVersion"), v, "must be 4 or 6"));
        }
        if let Some(p) = &self.protocol {
            p.validate(&f("protocol"))?;
        }
        if let Some(p) = &self.not_protocol {
            p.validate(&f("notProtocol"))?;
        }
        self.validate_icmp(field)?;
        self.source.validate(&f("source"))?;
        self.destination.validate(&f("destination"))?;
        self.validate_ports(field)?;
        self.validate_nets(field)?;
        if let Some(h) = &self.http {
            self.validate_http(field, h)?;
        }
        if let Some(m) = &self.metadata {
            m.validate(&f("metadata"))?;
        }
        Ok(())
    }

    /// ICMP fields need an ICMP protocol, and ICMP / ICMPv6 need a matching ipVersion.
    fn validate_icmp(&self, field: &str) -> Validated {
        for (name, icmp) in [("icmp", &self.icmp), ("notICMP", &self.not_icmp)] {
            let Some(icmp) = icmp else { continue };
            let f = format!("{field}.{name}");
            icmp.validate(&f)?;
            let proto = self.protocol.as_ref().and_then(Protocol::number);
            if !matches!(proto, Some(1 | 58)) {
                return Err(ValidationError::new(
                    &f,
                    self.protocol
                        .as_ref()
                        .map(|p| p.to_string())
                        .unwrap_or_default(),
                    "ICMP fields require protocol to be ICMP or ICMPv6",
                ));
            }
        }
        for (name, p) in [
            ("protocol", &self.protocol),
            ("notProtocol", &self.not_protocol),
        ] {
            let want = match p.as_ref().and_then(Protocol::number) {
                Some(1) => 4,
                Some(58) => 6,
                _ => continue,
            };
            if let Some(v) = self.ip_version
                && v != want
            {
                let p = p.as_ref().map(|p| p.to_string()).unwrap_or_default();
                return Err(ValidationError::new(
                    &format!("{field}.{name}"),
                    &p,
                    format!("protocol {p} requires ipVersion {want}"),
                ));
            }
        }
        Ok(())
    }

    /// Numeric ports need TCP/UDP/SCTP; with another protocol no ports at all.
    fn validate_ports(&self, field: &str) -> Validated {
        for (side, e) in [("source", &self.source), ("destination", &self.destination)] {
            for (name, ports) in [("ports", &e.ports), ("notPorts", &e.not_ports)] {
                let f = format!("{field}.{side}.{name}");
                let shown = || {
                    ports
                        .iter()
                        .map(Port::to_string)
                        .collect::<Vec<_>>()
                        .join(",")
                };
                match &self.protocol {
                    None if !ports.iter().all(Port::is_named) => {
                        return Err(ValidationError::new(&f, shown(), PORTS_NEED_PROTOCOL));
                    }
                    Some(p) if !p.supports_ports() && !ports.is_empty() => {
                        return Err(ValidationError::new(&f, shown(), PORTS_NEED_PORT_PROTOCOL));
                    }
                    _ => {}
                }
            }
        }
        if let Some(svc) = &self.destination.services
            && (!self.destination.ports.is_empty() || !self.destination.not_ports.is_empty())
        {
            return Err(ValidationError::new(
                &format!("{field}.destination.services"),
                &svc.name,
                "ports and notPorts cannot be specified with services",
            ));
        }
        Ok(())
    }

    /// Nets parse; a rule never mixes IPv4 and IPv6, nor disagrees with `ipVersion`;
    /// a catch-all in `notNets` matches nothing and is refused.
    fn validate_nets(&self, field: &str) -> Validated {
        let (mut seen4, mut seen6) = (false, false);
        for (side, e) in [("source", &self.source), ("destination", &self.destination)] {
            for (name, nets) in [("nets", &e.nets), ("notNets", &e.not_nets)] {
                let (mut v4, mut v6) = (false, false);
                for (i, n) in nets.iter().enumerate() {
                    let f = format!("{field}.{side}.{name}[{i}]");
                    let net = parse_net(&f, n)?;
                    v4 |= matches!(net, IpNet::V4(_));
                    v6 |= matches!(net, IpNet::V6(_));
                    if name == "notNets" && net.prefix_len() == 0 {
                        return Err(ValidationError::new(
                            &f,
                            n,
                            "catch-all CIDR in negation creates logical contradiction (matches no traffic)",
                        ));
                    }
                }
                let f = format!("{field}.{side}.{name}");
                if let Some(v) = self.ip_version
                    && ((v4 && v != 4) || (v6 && v != 6))
                {
                    return Err(ValidationError::new(
                        &f,
                        nets.join(","),
                        "rule IP version doesn't match CIDR version",
                    ));
                }
                if (v4 && (v6 || seen6)) || (v6 && seen4) {
                    return Err(ValidationError::new(
                        &f,
                        nets.join(","),
                        "rule contains both IPv4 and IPv6 CIDRs",
                    ));
                }
                seen4 |= v4;
                seen6 |= v6;
            }
        }
        Ok(())
    }

    /// The CEL rules on `http`: Allow rules only, protocol TCP or unset.
    fn validate_http(&self, field: &str, h: &HttpMatch) -> Validated {
        let f = format!("{field}.http");
        if self.action != "Allow" {
            return Err(ValidationError::new(
                &f,
                &self.action,
                "HTTP match is only valid on Allow rules",
            ));
        }
        if let Some(p) = &self.protocol
            && p.number() != Some(6)
        {
            return Err(ValidationError::new(
                &f,
                p,
                "rules with HTTP match must have protocol TCP or unset",
            ));
        }
        h.validate(&f)
    }
}

/// A rule net: a CIDR or a bare address (a /32 or /128), as Calico's `ParseCIDROrIP`.
fn parse_net(field: &str, n: &str) -> Result<IpNet, ValidationError> {
    if let Ok(ip) = n.parse::<std::net::IpAddr>() {
        return Ok(IpNet::from(ip));
    }
    validate::cidr(field, n, false)
}

/// Kubernetes' label name part (`IsQualifiedName` without prefix, `IsValidLabelValue`):
/// 1-63 characters of alphanumerics, `-`, `_`, `.`, starting and ending alphanumeric.
pub(crate) fn label_name_part(s: &str) -> bool {
    let alnum = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    (1..=63).contains(&s.len())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        && alnum(s.chars().next())
        && alnum(s.chars().last())
}

/// Kubernetes' `IsQualifiedName`: `[<DNS subdomain>/]<name part>`, as Calico's `labels`
/// validator requires of `labelsToApply` keys.
pub(crate) fn qualified_name(k: &str) -> bool {
    match k.split_once('/') {
        Some((prefix, name)) => validate::name("", prefix).is_ok() && label_name_part(name),
        None => label_name_part(k),
    }
}

/// Calico's limit on the total size of annotations (keys plus values).
const ANNOTATIONS_MAX_BYTES: usize = 256 * 1024;

impl RuleMetadata {
    /// Calico's `validateObjectMetaAnnotations`: keys are qualified names (compared in
    /// lower case), and all of them together at most 256 KiB.
    fn validate(&self, field: &str) -> Validated {
        let f = format!("{field}.annotations");
        let mut total = 0;
        for (k, v) in &self.annotations {
            if !qualified_name(&k.to_ascii_lowercase()) {
                return Err(ValidationError::new(
                    &f,
                    k,
                    "not a valid annotation key ([prefix/]name, name at most 63 alphanumerics, '-', '_' or '.')",
                ));
            }
            total += k.len() + v.len();
        }
        if total > ANNOTATIONS_MAX_BYTES {
            return Err(ValidationError::new(
                &f,
                total,
                format!(
                    "total size of annotations is too large by {} bytes",
                    total - ANNOTATIONS_MAX_BYTES
                ),
            ));
        }
        Ok(())
    }
}

/// Check a list of rules (`spec.ingress`), each named by its index.
pub fn validate_rules(field: &str, rules: &[Rule]) -> Validated {
    rules
        .iter()
        .enumerate()
        .try_for_each(|(i, r)| r.validate(&format!("{field}[{i}]")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rule(v: serde_json::Value) -> Rule {
        serde_json::from_value(v).expect("rule decodes")
    }

    /// The field a rule is refused for, and its reason.
    fn refused(v: serde_json::Value) -> (String, String) {
        let e = rule(v).validate("spec.ingress[0]").unwrap_err();
        (e.field, e.reason)
    }

    #[test]
    fn ports_round_trip_in_calicos_three_forms() {
        let r = rule(json!({"action": "Allow", "protocol": "tcp",
            "destination": {"ports": [80, "8080", "1000:2000", "http-alt"]}}));
        assert_eq!(r.protocol, Some(Protocol::Name("TCP".into())));
        assert_eq!(
            r.destination.ports,
            vec![
                Port::Range { min: 80, max: 80 },
                Port::Range {
                    min: 8080,
                    max: 8080
                },
                Port::Range {
                    min: 1000,
                    max: 2000
                },
                Port::Named("http-alt".into()),
            ]
        );
        // Calico writes single ports as numbers, ranges as strings, and drops the empty
        // source (omitzero).
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"action":"Allow","protocol":"TCP","destination":{"ports":[80,8080,"1000:2000","http-alt"]}}"#
        );
        assert!(
            serde_json::from_value::<Rule>(json!({"action": "Allow",
            "destination": {"ports": [70000]}}))
            .is_err()
        );
        assert!(
            serde_json::from_value::<Rule>(json!({"action": "Allow",
            "destination": {"ports": ["bad name!"]}}))
            .is_err()
        );
    }

    #[test]
    fn protocol_by_number_and_field_order() {
        let r = rule(
            json!({"metadata": {"annotations": {"a": "b"}}, "notICMP": {"type": 3},
            "notProtocol": 17, "icmp": {"type": 8, "code": 0}, "protocol": "ICMP",
            "ipVersion": 4, "action": "Deny", "source": {"notNets": ["10.0.0.0/8"]}}),
        );
        assert!(r.validate("spec.ingress[0]").is_ok());
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"action":"Deny","ipVersion":4,"protocol":"ICMP","icmp":{"type":8,"code":0},"notProtocol":17,"notICMP":{"type":3},"source":{"notNets":["10.0.0.0/8"]},"metadata":{"annotations":{"a":"b"}}}"#
        );
    }

    #[test]
    fn each_rule_check_names_its_field() {
        let cases = [
            (json!({"action": "allow"}), "spec.ingress[0].action"),
            (
                json!({"action": "Allow", "ipVersion": 5}),
                "spec.ingress[0].ipVersion",
            ),
            (
                json!({"action": "Allow", "protocol": "GRE"}),
                "spec.ingress[0].protocol",
            ),
            (
                json!({"action": "Allow", "notProtocol": 0}),
                "spec.ingress[0].notProtocol",
            ),
            (
                json!({"action": "Allow", "destination": {"ports": [80]}}),
                "spec.ingress[0].destination.ports",
            ),
            (
                json!({"action": "Allow", "protocol": "ICMP", "source": {"notPorts": ["http"]}}),
                "spec.ingress[0].source.notPorts",
            ),
            (
                json!({"action": "Allow", "protocol": "TCP", "destination": {"ports": ["90:80"]}}),
                "spec.ingress[0].destination.ports[0]",
            ),
            (
                json!({"action": "Allow", "protocol": "TCP", "destination": {"ports": [0]}}),
                "spec.ingress[0].destination.ports[0]",
            ),
            (
                json!({"action": "Allow", "protocol": "ICMP", "icmp": {"code": 1}}),
                "spec.ingress[0].icmp.code",
            ),
            (
                json!({"action": "Allow", "protocol": "ICMP", "icmp": {"type": 255}}),
                "spec.ingress[0].icmp.type",
            ),
            (
                json!({"action": "Allow", "protocol": "TCP", "icmp": {"type": 8}}),
                "spec.ingress[0].icmp",
            ),
            (
                json!({"action": "Allow", "protocol": "ICMPv6", "ipVersion": 4}),
                "spec.ingress[0].protocol",
            ),
            (
                json!({"action": "Allow", "source": {"nets": ["10.0.0.0/33"]}}),
                "spec.ingress[0].source.nets[0]",
            ),
            (
                json!({"action": "Allow", "source": {"nets": ["10.0.0.0/8", "fd00::/64"]}}),
                "spec.ingress[0].source.nets",
            ),
            (
                json!({"action": "Allow", "source": {"nets": ["10.0.0.0/8"]},
                    "destination": {"notNets": ["fd00::/64"]}}),
                "spec.ingress[0].destination.notNets",
            ),
            (
                json!({"action": "Allow", "ipVersion": 6, "source": {"nets": ["10.0.0.0/8"]}}),
                "spec.ingress[0].source.nets",
            ),
            (
                json!({"action": "Allow", "source": {"notNets": ["0.0.0.0/0"]}}),
                "spec.ingress[0].source.notNets[0]",
            ),
            (
                json!({"action": "Allow", "source": {"selector": "role =="}}),
                "spec.ingress[0].source.selector",
            ),
            (
                json!({"action": "Allow", "source": {"namespaceSelector": "global() && a == 'b'"}}),
                "spec.ingress[0].source.namespaceSelector",
            ),
            (
                json!({"action": "Allow", "source": {"serviceAccounts": {"selector": "x in"}}}),
                "spec.ingress[0].source.serviceAccounts.selector",
            ),
            (
                json!({"action": "Allow", "source": {"services": {"name": "s"}, "selector": "a == 'b'"}}),
                "spec.ingress[0].source.services",
            ),
            (
                json!({"action": "Allow", "metadata": {"annotations": {"no spaces": "x"}}}),
                "spec.ingress[0].metadata.annotations",
            ),
            (
                json!({"action": "Deny", "http": {"methods": ["GET"]}}),
                "spec.ingress[0].http",
            ),
            (
                json!({"action": "Allow", "http": {"paths": [{"exact": "nope"}]}}),
                "spec.ingress[0].http.paths[0]",
            ),
        ];
        for (v, field) in cases {
            let (f, reason) = refused(v.clone());
            assert_eq!(f, field, "{v} refused as: {reason}");
        }
    }

    #[test]
    fn valid_rules_pass() {
        for v in [
            json!({"action": "Pass"}),
            json!({"action": "Log", "protocol": 132, "destination": {"ports": ["1:65535"]}}),
            json!({"action": "Allow", "destination": {"ports": ["metrics"]}}),
            json!({"action": "Allow", "ipVersion": 6, "protocol": "ICMPv6",
                "icmp": {"type": 128}, "source": {"nets": ["fd00::/64"], "notNets": ["fd00::1"]}}),
            json!({"action": "Allow", "source": {"namespaceSelector": "global()",
                "serviceAccounts": {"names": ["api"], "selector": "app == 'x'"}}}),
            json!({"action": "Allow", "protocol": "TCP",
                "http": {"methods": ["GET"], "paths": [{"prefix": "/api"}]}}),
        ] {
            assert_eq!(rule(v.clone()).validate("r"), Ok(()), "{v}");
        }
    }
}
