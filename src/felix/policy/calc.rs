//! The policy calculation (pure): tiers, policies, profiles, network sets and workload
//! endpoints in, the [`PolicyDataplane`] out (REFERENCE §9 "Evaluation").
//!
//! What follows Calico (`libcalico-go/.../updateprocessors`, `felix/calc`):
//! - a NetworkPolicy's selector is ANDed with `projectcalico.org/namespace == '<ns>'`, its
//!   rule selectors stay in its namespace unless `namespaceSelector` is set; namespace
//!   selectors are prefixed `pcns.` (`all()` is any namespaced endpoint, `global()` any
//!   non-namespaced one), service account selectors `pcsa.`;
//! - an endpoint's own labels win over its profiles' `labelsToApply` (the first profile
//!   naming a label wins among profiles); it carries `projectcalico.org/namespace`,
//!   `/orchestrator` and `/serviceaccount`;
//! - a positive selector and a `notSelector` are folded into one set
//!   (`(sel) && (!(not))`); named ports become `n:` sets of (address, protocol, port) of
//!   the endpoints the positive selector matches;
//! - set ids are `s:`/`n:` + base64url(SHA-224) (`hash.MakeUniqueID`);
//! - empty `types` means both directions; tiers by order (none last) then name; policies
//!   by order (none last) then name.
//!
//! [`PolicyCalc::dataplane`] computes the whole dataplane from scratch (the reference);
//! `policy::index::PolicyEngine` keeps it up to date change by change (an endpoint's
//! change costs O(#selectors + #changed members)) with a precise [`Delta`]; [`diff`]
//! computes the delta between any two dataplanes (the property tests hold the engine to
//! both).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;
use sha2::{Digest, Sha224};

use super::{
    ALL_INTERFACES_KEY, Action, Chains, Delta, EncapDrops, Endpoint, EndpointToHost, Failsafe,
    HostEndpoint, HostLayer, Icmp, IpSet, Match, PRE_DNAT_PREFIX, PolicyDataplane, PortRange, Rule,
    Stage, TierEnd, TierPolicies, UNTRACKED_PREFIX,
};
use crate::model::hostendpoint::HostEndpoint as HostEndpointResource;
use crate::model::networkset::networks;
use crate::model::policy::{GlobalNetworkPolicySpec, NetworkPolicySpec, ProfileSpec};
use crate::model::rule::{EntityRule, Port, Protocol, Rule as ModelRule};
use crate::model::selector::Selector;
use crate::model::tier::TierSpec;
use crate::model::workload::{LABEL_NAMESPACE, LABEL_ORCHESTRATOR, WorkloadEndpoint};

/// The label Calico gives an endpoint with a service account.
pub const LABEL_SERVICE_ACCOUNT: &str = "projectcalico.org/serviceaccount";
/// The prefix of namespace labels inherited through `kns.<ns>` profiles.
pub const NAMESPACE_PREFIX: &str = "pcns.";
/// The prefix of service account labels inherited through `ksa.<ns>.<sa>` profiles.
pub const SERVICE_ACCOUNT_PREFIX: &str = "pcsa.";

/// Calico's `hash.MakeUniqueID`: `<prefix>:` + base64url (no padding) of the SHA-224 of
/// `<prefix>:<content>`.
pub fn unique_id(prefix: &str, content: &str) -> String {
    let mut h = Sha224::new();
    h.update(prefix.as_bytes());
    h.update(b":");
    h.update(content.as_bytes());
    format!("{prefix}:{}", base64url(&h.finalize()))
}

/// Base64url without padding (Go's `base64.RawURLEncoding`).
pub(crate) fn base64url(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(bytes.len() * 4 / 3 + 2);
    for c in bytes.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        let chars = c.len() + 1;
        for i in 0..chars {
            out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

/// The id of a selector's set (`s:...`), from its canonical text.
pub fn selector_set_id(sel: &Selector) -> String {
    unique_id("s", &sel.canonical())
}

/// The id of a named-port set (`n:...`), as Calico's `IPSetData.UniqueID`.
pub fn named_port_set_id(sel: &Selector, proto: NamedPortProto, port: &str) -> String {
    let content = format!("{},{},{}", selector_set_id(sel), proto.name(), port);
    unique_id("n", &content)
}

/// The protocol of a named-port match: the rule's, or any.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum NamedPortProto {
    Tcp,
    Udp,
    Sctp,
    Any,
}

impl NamedPortProto {
    fn of_rule(p: Option<u8>) -> NamedPortProto {
        match p {
            None => NamedPortProto::Any,
            Some(17) => NamedPortProto::Udp,
            Some(132) => NamedPortProto::Sctp,
            // Calico's `ProtocolFrom`: anything else is TCP.
            Some(_) => NamedPortProto::Tcp,
        }
    }

    fn name(self) -> &'static str {
        match self {
            NamedPortProto::Tcp => "tcp",
            NamedPortProto::Udp => "udp",
            NamedPortProto::Sctp => "sctp",
            NamedPortProto::Any => "any",
        }
    }

    /// Whether an endpoint port of protocol number `p` (0: unspecified) matches.
    fn matches(self, p: u8) -> bool {
        match self {
            NamedPortProto::Any => true,
            NamedPortProto::Tcp => p == 6,
            NamedPortProto::Udp => p == 17,
            NamedPortProto::Sctp => p == 132,
        }
    }
}

/// What an IP set holds: the endpoints (and network sets) a selector matches, or the
/// named port of those endpoints.
#[derive(Debug, Clone, PartialEq)]
pub struct SetDef {
    pub selector: Selector,
    pub named_port: Option<(NamedPortProto, String)>,
}

/// A workload endpoint (of any node) as policy sees it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EndpointInfo {
    pub name: String,
    pub node: String,
    pub iface: String,
    /// Own labels with the special ones (namespace, orchestrator, service account); the
    /// `pcns.`/`pcsa.` labels a WEP carries itself are dropped, as Calico does.
    pub labels: BTreeMap<String, String>,
    pub profiles: Vec<String>,
    pub nets: Vec<IpNet>,
    /// Named ports: (name, protocol number or 0, port).
    pub ports: Vec<(String, u8, u16)>,
    /// A HostEndpoint: `iface` is its interface (`*` for all), `nets` its `expectedIPs`;
    /// it gets the host layer's chains, never a workload's.
    pub host: bool,
}

impl EndpointInfo {
    /// From a WorkloadEndpoint resource (Calico's `workloadendpointprocessor`).
    pub fn from_wep(w: &WorkloadEndpoint) -> EndpointInfo {
        let mut labels: BTreeMap<String, String> = w
            .metadata
            .labels
            .iter()
            .filter(|(k, _)| {
                !k.starts_with(NAMESPACE_PREFIX) && !k.starts_with(SERVICE_ACCOUNT_PREFIX)
            })
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let ns = w.metadata.namespace.as_deref().unwrap_or("default");
        labels.insert(LABEL_NAMESPACE.into(), ns.into());
        if !w.spec.orchestrator.is_empty() {
            labels
                .entry(LABEL_ORCHESTRATOR.into())
                .or_insert_with(|| w.spec.orchestrator.clone());
        }
        if !w.spec.service_account_name.is_empty() {
            labels.insert(
                LABEL_SERVICE_ACCOUNT.into(),
                w.spec.service_account_name.clone(),
            );
        }
        let nets = networks(&w.spec.ip_networks);
        let ports = w
            .spec
            .ports
            .iter()
            .filter(|p| !p.name.is_empty())
            .map(|p| {
                let proto = match &p.protocol {
                    serde_json::Value::String(s) => Protocol::parse(s).number().unwrap_or(0),
                    serde_json::Value::Number(n) => {
                        n.as_u64().and_then(|n| u8::try_from(n).ok()).unwrap_or(0)
                    }
                    _ => 0,
                };
                (p.name.clone(), proto, p.port)
            })
            .collect();
        EndpointInfo {
            name: w.metadata.name.clone(),
            node: w.spec.node.clone(),
            iface: w.spec.interface_name.clone(),
            labels,
            profiles: w.spec.profiles.clone(),
            nets,
            ports,
            host: false,
        }
    }

    /// From a HostEndpoint resource: its own labels (no namespace), its expected
    /// addresses as the members it gives selector sets.
    pub fn from_hep(h: &HostEndpointResource) -> EndpointInfo {
        let nets = h
            .spec
            .expected_ips
            .iter()
            .filter_map(|ip| ip.trim().parse::<IpAddr>().ok())
            .map(IpNet::from)
            .collect();
        let ports = h
            .spec
            .ports
            .iter()
            .map(|p| (p.name.clone(), p.protocol.number().unwrap_or(0), p.port))
            .collect();
        EndpointInfo {
            name: h.metadata.name.clone(),
            node: h.spec.node.clone(),
            iface: h.spec.interface_name.clone(),
            labels: h.metadata.labels.clone(),
            profiles: h.spec.profiles.clone(),
            nets,
            ports,
            host: true,
        }
    }
}

/// A NetworkSet or GlobalNetworkSet: labels (a namespaced one carries its namespace) and
/// networks. A namespaced one has the namespace's profile `kns.<ns>` as parent, as in
/// Calico's network-set update processor: it inherits the `pcns.` labels that profile
/// applies, so a rule's `namespaceSelector` reaches it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NetSetInfo {
    pub labels: BTreeMap<String, String>,
    pub profiles: Vec<String>,
    pub nets: Vec<IpNet>,
}

impl NetSetInfo {
    pub fn new(
        labels: &BTreeMap<String, String>,
        namespace: Option<&str>,
        nets: &[String],
    ) -> NetSetInfo {
        let mut labels = labels.clone();
        if let Some(ns) = namespace {
            labels.insert(LABEL_NAMESPACE.into(), ns.into());
        }
        NetSetInfo {
            labels,
            profiles: namespace
                .map(|ns| format!("kns.{ns}"))
                .into_iter()
                .collect(),
            nets: networks(nets),
        }
    }
}

/// A policy resolved for the dataplane: where it sorts, whom it selects, its chains and
/// the sets they use.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedPolicy {
    pub tier: String,
    pub order: Option<f64>,
    /// The tie-break of equal orders: `<name>/<namespace>/<kind>` compared as text
    /// (Calico's `PolKVLess`).
    pub sort_name: String,
    pub selector: Selector,
    pub ingress: bool,
    pub egress: bool,
    /// Where it is enforced (workloads only see `Normal` ones).
    pub stage: Stage,
    /// `applyOnForward`: a normal policy also for traffic forwarded through host
    /// endpoints.
    pub apply_on_forward: bool,
    pub chains: Chains,
    pub sets: BTreeMap<String, SetDef>,
}

/// A profile resolved: its chains, sets and the labels it gives its endpoints.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedProfile {
    pub chains: Chains,
    pub sets: BTreeMap<String, SetDef>,
    pub labels: BTreeMap<String, String>,
}

/// The chain id of a GlobalNetworkPolicy (normal stage).
pub fn gnp_id(name: &str) -> String {
    format!("gnp/{name}")
}

/// The chain id of a GlobalNetworkPolicy in its stage (see [`super::stage_of`]).
pub fn gnp_stage_id(name: &str, spec: &GlobalNetworkPolicySpec) -> String {
    if spec.do_not_track {
        format!("{UNTRACKED_PREFIX}{}", gnp_id(name))
    } else if spec.pre_dnat {
        format!("{PRE_DNAT_PREFIX}{}", gnp_id(name))
    } else {
        gnp_id(name)
    }
}

/// The chain id of a NetworkPolicy.
pub fn np_id(namespace: &str, name: &str) -> String {
    format!("np/{namespace}/{name}")
}

/// A selector that never matches: what a selector that does not parse (validation refuses
/// them, but others may write the datastore) stands for, so that nothing is opened by it.
fn nothing() -> Selector {
    Selector::parse(
        "has(projectcalico.org/invalid-selector) && !has(projectcalico.org/invalid-selector)",
    )
    .expect("a fixed selector parses")
}

/// Parse a selector written by the rewrites; `""` is `all()`.
fn parse(s: &str) -> Selector {
    Selector::parse(s).unwrap_or_else(|e| {
        tracing::warn!(selector = s, error = %e, "policy selector does not parse; it matches nothing");
        nothing()
    })
}

/// Calico's `parseSelectorAttachPrefix`.
fn attach_prefix(s: &str, prefix: &str) -> Option<String> {
    // `global()` (only in namespace selectors) is not in our grammar: stand in a label.
    let s = s.replace("global()", "!has(__calico_global__)");
    match Selector::parse(&s) {
        Ok(sel) => Some(
            sel.prefixed(prefix)
                .to_string()
                .replace(&format!("{prefix}__calico_global__"), LABEL_NAMESPACE),
        ),
        Err(e) => {
            tracing::warn!(selector = s, error = %e, "namespace/service account selector does not parse");
            None
        }
    }
}

/// Calico's `prefixAndAppendSelector`.
fn prefix_and_append(current: String, new: &str, prefix: &str) -> String {
    if new.is_empty() {
        return current;
    }
    match attach_prefix(new, prefix) {
        Some(p) if current.is_empty() => p,
        Some(p) => format!("({current}) && {p}"),
        // Fail closed: a selector that does not parse matches nothing.
        None => nothing().to_string(),
    }
}

/// Calico's `getEndpointSelector` for one side of a rule.
fn entity_selector(er: &EntityRule, ns: Option<&str>) -> String {
    let ns_sel = if !er.namespace_selector.is_empty() {
        match attach_prefix(&er.namespace_selector, NAMESPACE_PREFIX) {
            Some(s) => s.replace("all()", &format!("has({LABEL_NAMESPACE})")),
            None => nothing().to_string(),
        }
    } else if let Some(ns) = ns {
        format!("{LABEL_NAMESPACE} == '{ns}'")
    } else {
        String::new()
    };
    let mut parts = Vec::new();
    if let Some(sa) = &er.service_accounts {
        let mut s = String::new();
        if !sa.selector.is_empty() {
            s = attach_prefix(&sa.selector, SERVICE_ACCOUNT_PREFIX)
                .unwrap_or_else(|| nothing().to_string());
        }
        if !sa.names.is_empty() {
            let names: Vec<String> = sa.names.iter().map(|n| format!("'{n}'")).collect();
            let by_name = format!("{LABEL_SERVICE_ACCOUNT} in {{ {} }}", names.join(", "));
            s = if s.is_empty() {
                by_name
            } else {
                format!("({s}) && ({by_name})")
            };
        }
        if !s.is_empty() {
            parts.push(s);
        }
    }
    if !er.selector.is_empty() {
        parts.push(er.selector.clone());
    }
    let sel = match parts.len() {
        0 => String::new(),
        1 => parts.remove(0),
        _ => format!("({})", parts.join(") && (")),
    };
    let wants_ns =
        !sel.is_empty() || !er.not_selector.is_empty() || !er.namespace_selector.is_empty();
    if !ns_sel.is_empty() && wants_ns {
        if sel.is_empty() {
            ns_sel
        } else {
            format!("({ns_sel}) && ({sel})")
        }
    } else {
        sel
    }
}

fn action(a: &str) -> Action {
    match a.to_ascii_lowercase().as_str() {
        "allow" => Action::Allow,
        "log" => Action::Log,
        "pass" | "next-tier" => Action::Pass,
        // Deny, and anything unknown (fail closed).
        _ => Action::Deny,
    }
}

fn icmp(f: &Option<crate::model::rule::IcmpFields>, protocol: Option<u8>) -> Option<Icmp> {
    let f = f.as_ref()?;
    let icmp_type = u8::try_from(f.icmp_type?).ok()?;
    Some(Icmp {
        v6: protocol == Some(58),
        icmp_type,
        code: f.code.and_then(|c| u8::try_from(c).ok()),
    })
}

fn split_ports(ports: &[Port]) -> (Vec<PortRange>, Vec<String>) {
    let mut numeric = Vec::new();
    let mut named = Vec::new();
    for p in ports {
        match p {
            Port::Range { min, max } => numeric.push(PortRange { lo: *min, hi: *max }),
            Port::Named(n) => named.push(n.clone()),
        }
    }
    (numeric, named)
}

/// One side of a rule (Calico's `ruleToParsedRule`, one direction).
fn entity(
    er: &EntityRule,
    ns: Option<&str>,
    proto: NamedPortProto,
    sets: &mut BTreeMap<String, SetDef>,
) -> Match {
    let mut m = Match {
        nets: networks(&er.nets),
        not_nets: networks(&er.not_nets),
        ..Default::default()
    };
    let raw = entity_selector(er, ns);
    // combineMatchesIfPossible
    let (pos, neg) = if raw.is_empty() {
        (raw, er.not_selector.clone())
    } else if !er.not_selector.is_empty() {
        (
            format!("({raw}) && (!({}))", er.not_selector),
            String::new(),
        )
    } else {
        (raw, String::new())
    };
    let pos = (!pos.is_empty()).then(|| parse(&pos));
    let (numeric, named) = split_ports(&er.ports);
    let (not_numeric, not_named) = split_ports(&er.not_ports);
    let np_sel = pos.clone().unwrap_or_else(Selector::all);
    let named_set = |name: &String, sets: &mut BTreeMap<String, SetDef>| {
        let id = named_port_set_id(&np_sel, proto, name);
        sets.entry(id.clone()).or_insert_with(|| SetDef {
            selector: np_sel.clone(),
            named_port: Some((proto, name.clone())),
        });
        id
    };
    m.named_port_sets = named.iter().map(|n| named_set(n, sets)).collect();
    m.not_named_port_sets = not_named.iter().map(|n| named_set(n, sets)).collect();
    let sel_set = |sel: Selector, sets: &mut BTreeMap<String, SetDef>| {
        let id = selector_set_id(&sel);
        sets.entry(id.clone()).or_insert_with(|| SetDef {
            selector: sel,
            named_port: None,
        });
        id
    };
    if let Some(pos) = pos
        && (!numeric.is_empty() || named.is_empty())
    {
        m.sets.push(sel_set(pos, sets));
    }
    if !neg.is_empty() {
        m.not_sets.push(sel_set(parse(&neg), sets));
    }
    // `services` (Kubernetes Services' endpoints): no Service exists in etcd mode, so the
    // side matches nothing (an empty set), as Calico's service IP set would be.
    if er.services.is_some() {
        m.sets.push(sel_set(nothing(), sets));
    }
    m.ports = numeric;
    m.not_ports = not_numeric;
    m
}

/// One rule resolved; `ns` is the namespace of a NetworkPolicy's rules.
pub fn resolve_rule(r: &ModelRule, ns: Option<&str>, sets: &mut BTreeMap<String, SetDef>) -> Rule {
    let protocol = r.protocol.as_ref().and_then(Protocol::number);
    let np = NamedPortProto::of_rule(protocol);
    Rule {
        action: action(&r.action),
        ip_version: r.ip_version.and_then(|v| u8::try_from(v).ok()),
        protocol,
        not_protocol: r.not_protocol.as_ref().and_then(Protocol::number),
        icmp: icmp(&r.icmp, protocol),
        not_icmp: icmp(&r.not_icmp, protocol),
        src: entity(&r.source, ns, np, sets),
        dst: entity(&r.destination, ns, np, sets),
    }
}

fn directions(types: &[String]) -> (bool, bool) {
    if types.is_empty() {
        // Felix's back compatibility: no types means both.
        return (true, true);
    }
    (
        types.iter().any(|t| t.eq_ignore_ascii_case("ingress")),
        types.iter().any(|t| t.eq_ignore_ascii_case("egress")),
    )
}

fn tier_or_default(t: &str) -> String {
    if t.is_empty() {
        crate::model::tier::DEFAULT_TIER.to_string()
    } else {
        t.to_string()
    }
}

fn resolved(
    tier: &str,
    order: Option<f64>,
    sort_name: (String, String, &'static str),
    selector: String,
    types: &[String],
    rules: (&[ModelRule], &[ModelRule]),
    ns: Option<&str>,
) -> ResolvedPolicy {
    let (ingress, egress) = directions(types);
    let mut sets = BTreeMap::new();
    let mut chains = Chains::default();
    if ingress {
        chains.inbound = rules
            .0
            .iter()
            .map(|r| resolve_rule(r, ns, &mut sets))
            .collect();
    }
    if egress {
        chains.outbound = rules
            .1
            .iter()
            .map(|r| resolve_rule(r, ns, &mut sets))
            .collect();
    }
    ResolvedPolicy {
        tier: tier_or_default(tier),
        order,
        sort_name: format!("{}/{}/{}", sort_name.0, sort_name.1, sort_name.2),
        selector: parse(&selector),
        ingress,
        egress,
        stage: Stage::Normal,
        apply_on_forward: false,
        chains,
        sets,
    }
}

/// A GlobalNetworkPolicy resolved (`globalnetworkpolicyprocessor`), under
/// [`gnp_stage_id`]. Pre-DNAT and untracked policies apply to host endpoints only; a
/// pre-DNAT one has no egress (validation refuses egress rules; others may write them).
pub fn resolve_gnp(name: &str, spec: &GlobalNetworkPolicySpec) -> ResolvedPolicy {
    let mut sel = spec.selector.clone();
    if !spec.namespace_selector.is_empty() {
        sel = prefix_and_append(sel, &spec.namespace_selector, NAMESPACE_PREFIX)
            .replace("all()", &format!("has({LABEL_NAMESPACE})"));
    }
    if !spec.service_account_selector.is_empty() {
        sel = prefix_and_append(sel, &spec.service_account_selector, SERVICE_ACCOUNT_PREFIX)
            .replace("all()", &format!("has({LABEL_SERVICE_ACCOUNT})"));
    }
    let mut p = resolved(
        &spec.tier,
        spec.order,
        (name.to_string(), String::new(), "GlobalNetworkPolicy"),
        sel,
        &spec.types,
        (&spec.ingress, &spec.egress),
        None,
    );
    p.apply_on_forward = spec.apply_on_forward;
    p.stage = if spec.do_not_track {
        Stage::Untracked
    } else if spec.pre_dnat {
        p.egress = false;
        p.chains.outbound.clear();
        Stage::PreDnat
    } else {
        Stage::Normal
    };
    p
}

/// A NetworkPolicy resolved (`networkpolicyprocessor`).
pub fn resolve_np(namespace: &str, name: &str, spec: &NetworkPolicySpec) -> ResolvedPolicy {
    let ns_sel = format!("{LABEL_NAMESPACE} == '{namespace}'");
    let sel = if spec.selector.is_empty() {
        ns_sel
    } else {
        format!("({}) && {ns_sel}", spec.selector)
    };
    let sel = prefix_and_append(sel, &spec.service_account_selector, SERVICE_ACCOUNT_PREFIX);
    resolved(
        &spec.tier,
        spec.order,
        (name.to_string(), namespace.to_string(), "NetworkPolicy"),
        sel,
        &spec.types,
        (&spec.ingress, &spec.egress),
        Some(namespace),
    )
}

/// A Profile resolved (its rules are not namespaced).
pub fn resolve_profile(spec: &ProfileSpec) -> ResolvedProfile {
    let mut sets = BTreeMap::new();
    let chains = Chains {
        inbound: spec
            .ingress
            .iter()
            .map(|r| resolve_rule(r, None, &mut sets))
            .collect(),
        outbound: spec
            .egress
            .iter()
            .map(|r| resolve_rule(r, None, &mut sets))
            .collect(),
    };
    ResolvedProfile {
        chains,
        sets,
        labels: spec.labels_to_apply.clone(),
    }
}

/// A tier as the calculation needs it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TierInfo {
    pub order: Option<f64>,
    pub end: TierEnd,
}

impl TierInfo {
    pub fn from_spec(t: &TierSpec) -> TierInfo {
        TierInfo {
            order: t.order,
            end: if t.default_action.as_deref() == Some("Pass") {
                TierEnd::Pass
            } else {
                TierEnd::Deny
            },
        }
    }
}

/// Order then name, `None` (no order) last.
fn order_key(o: Option<f64>) -> (bool, f64) {
    match o {
        Some(o) if !o.is_nan() => (false, o),
        _ => (true, 0.0),
    }
}

fn cmp_order(a: Option<f64>, b: Option<f64>) -> std::cmp::Ordering {
    let (a, b) = (order_key(a), order_key(b));
    a.0.cmp(&b.0).then(a.1.total_cmp(&b.1))
}

/// Everything the calculation reads, kept between changes.
#[derive(Debug, Clone, Default)]
pub struct PolicyCalc {
    /// Tiers by name.
    pub tiers: BTreeMap<String, TierInfo>,
    /// Policies by chain id.
    pub policies: BTreeMap<String, ResolvedPolicy>,
    /// Profiles by name.
    pub profiles: BTreeMap<String, ResolvedProfile>,
    /// Network sets by datastore key.
    pub net_sets: BTreeMap<String, NetSetInfo>,
    /// Every workload endpoint of the cluster, by datastore key.
    pub endpoints: BTreeMap<String, EndpointInfo>,
    /// This node's name: its endpoints get chains.
    pub node: String,
    pub endpoint_to_host: EndpointToHost,
    pub encap_drops: EncapDrops,
    /// `failsafeInboundHostPorts` / `failsafeOutboundHostPorts`.
    pub failsafe_in: Vec<Failsafe>,
    pub failsafe_out: Vec<Failsafe>,
    /// `vxlanPort`.
    pub vxlan_port: u16,
    /// `logPrefix`.
    pub log_prefix: String,
    /// This host's interfaces (not workloads') and their addresses, for host endpoints
    /// with no `interfaceName` (matched by `expectedIPs`).
    pub host_addrs: BTreeMap<String, Vec<IpAddr>>,
}

impl PolicyCalc {
    pub fn new(node: &str) -> PolicyCalc {
        PolicyCalc {
            node: node.to_string(),
            ..Default::default()
        }
    }

    fn tier(&self, name: &str) -> TierInfo {
        self.tiers.get(name).copied().unwrap_or_else(|| {
            if name == crate::model::tier::DEFAULT_TIER {
                TierInfo {
                    order: Some(1e6),
                    end: TierEnd::Deny,
                }
            } else {
                // A tier that does not exist (yet): last, and it denies (fail closed).
                TierInfo {
                    order: None,
                    end: TierEnd::Deny,
                }
            }
        })
    }

    /// An endpoint's labels with its profiles' `labelsToApply` (own labels win; among
    /// profiles, the first naming a label).
    pub fn labels(&self, e: &EndpointInfo) -> BTreeMap<String, String> {
        self.inherited(&e.labels, &e.profiles)
    }

    /// A network set's labels with its namespace profile's `labelsToApply` (own win).
    pub fn net_set_labels(&self, s: &NetSetInfo) -> BTreeMap<String, String> {
        self.inherited(&s.labels, &s.profiles)
    }

    fn inherited(
        &self,
        own: &BTreeMap<String, String>,
        profiles: &[String],
    ) -> BTreeMap<String, String> {
        let mut labels = own.clone();
        for p in profiles {
            if let Some(p) = self.profiles.get(p) {
                for (k, v) in &p.labels {
                    labels.entry(k.clone()).or_insert_with(|| v.clone());
                }
            }
        }
        labels
    }

    /// A local endpoint gets chains; as in Calico, one without addresses is left out
    /// (its interface then has no dispatch entry: dropped).
    pub(crate) fn is_local(&self, e: &EndpointInfo) -> bool {
        !e.host && e.node == self.node && !e.iface.is_empty() && !e.nets.is_empty()
    }

    /// The policies selecting `labels`, in evaluation order.
    fn selecting(&self, labels: &BTreeMap<String, String>) -> Vec<(&String, &ResolvedPolicy)> {
        let mut selecting: Vec<(&String, &ResolvedPolicy)> = self
            .policies
            .iter()
            .filter(|(_, p)| p.selector.matches(labels))
            .collect();
        self.sort(&mut selecting);
        selecting
    }

    /// The tiers of `selecting` that have a policy `keep` takes, each with the policies
    /// it takes, in order; a tier ends in `end` when given, else in its `defaultAction`.
    fn tiers(
        &self,
        selecting: &[(&String, &ResolvedPolicy)],
        keep: impl Fn(&ResolvedPolicy) -> bool,
        end: Option<TierEnd>,
    ) -> Vec<TierPolicies> {
        let mut out: Vec<TierPolicies> = Vec::new();
        for (id, p) in selecting.iter().filter(|(_, p)| keep(p)) {
            match out.last_mut() {
                Some(t) if t.tier == p.tier => t.policies.push((*id).clone()),
                _ => out.push(TierPolicies {
                    tier: p.tier.clone(),
                    policies: vec![(*id).clone()],
                    end: end.unwrap_or_else(|| self.tier(&p.tier).end),
                }),
            }
        }
        out
    }

    /// The endpoint's profiles that exist.
    fn existing_profiles(&self, e: &EndpointInfo) -> Vec<String> {
        e.profiles
            .iter()
            .filter(|p| self.profiles.contains_key(*p))
            .cloned()
            .collect()
    }

    /// One local endpoint's policy, given its labels: normal-stage policies only.
    pub(crate) fn endpoint(&self, e: &EndpointInfo, labels: &BTreeMap<String, String>) -> Endpoint {
        let selecting = self.selecting(labels);
        let normal = |ingress: bool| {
            move |p: &ResolvedPolicy| {
                p.stage == Stage::Normal && if ingress { p.ingress } else { p.egress }
            }
        };
        Endpoint {
            name: e.name.clone(),
            ingress: self.tiers(&selecting, normal(true), None),
            egress: self.tiers(&selecting, normal(false), None),
            profiles: self.existing_profiles(e),
        }
    }

    /// One host endpoint's policy, split by stage as Calico's `tierInfoToProtoTierInfo`
    /// does: pre-DNAT and untracked tiers end in Pass.
    pub(crate) fn host_endpoint(
        &self,
        e: &EndpointInfo,
        labels: &BTreeMap<String, String>,
    ) -> HostEndpoint {
        let selecting = self.selecting(labels);
        let of = |stage: Stage, ingress: bool, forward: bool| {
            move |p: &ResolvedPolicy| {
                p.stage == stage
                    && (!forward || p.apply_on_forward)
                    && if ingress { p.ingress } else { p.egress }
            }
        };
        let pass = Some(TierEnd::Pass);
        HostEndpoint {
            name: e.name.clone(),
            ingress: self.tiers(&selecting, of(Stage::Normal, true, false), None),
            egress: self.tiers(&selecting, of(Stage::Normal, false, false), None),
            forward_ingress: self.tiers(&selecting, of(Stage::Normal, true, true), None),
            forward_egress: self.tiers(&selecting, of(Stage::Normal, false, true), None),
            pre_dnat: self.tiers(&selecting, of(Stage::PreDnat, true, false), pass),
            untracked_ingress: self.tiers(&selecting, of(Stage::Untracked, true, false), pass),
            untracked_egress: self.tiers(&selecting, of(Stage::Untracked, false, false), pass),
            profiles: self.existing_profiles(e),
        }
    }

    /// This node's host endpoints by interface: per interface name (and for `*`), the
    /// one whose name sorts first among those naming it and those naming no interface
    /// whose `expectedIPs` hold one of its addresses (Calico's `resolveHostEndpoints`).
    pub(crate) fn host_endpoints(
        &self,
        labels: &BTreeMap<String, BTreeMap<String, String>>,
    ) -> BTreeMap<String, HostEndpoint> {
        let mut best: BTreeMap<String, (&String, &EndpointInfo)> = BTreeMap::new();
        for (key, e) in &self.endpoints {
            if !e.host || e.node != self.node {
                continue;
            }
            let ifaces: Vec<String> = if e.iface == crate::model::hostendpoint::ALL_INTERFACES {
                vec![ALL_INTERFACES_KEY.to_string()]
            } else if !e.iface.is_empty() {
                vec![e.iface.clone()]
            } else {
                // No interface named: the interfaces holding one of its expected addresses.
                self.host_addrs
                    .iter()
                    .filter(|(_, addrs)| {
                        addrs.iter().any(|a| e.nets.iter().any(|n| n.addr() == *a))
                    })
                    .map(|(name, _)| name.clone())
                    .collect()
            };
            for iface in ifaces {
                match best.get(&iface) {
                    Some((_, b)) if b.name <= e.name => {}
                    _ => {
                        best.insert(iface, (key, e));
                    }
                }
            }
        }
        best.into_iter()
            .map(|(iface, (key, e))| (iface, self.host_endpoint(e, &labels[key])))
            .collect()
    }

    /// Whether a host endpoint of this node is matched by its addresses (the host's
    /// interface addresses are then needed).
    pub fn wants_host_addrs(&self) -> bool {
        self.endpoints
            .values()
            .any(|e| e.host && e.node == self.node && e.iface.is_empty())
    }

    /// The host layer: this node's host endpoints and the failsafe ports.
    pub(crate) fn host_layer(
        &self,
        labels: &BTreeMap<String, BTreeMap<String, String>>,
    ) -> HostLayer {
        HostLayer {
            endpoints: self.host_endpoints(labels),
            failsafe_in: self.failsafe_in.clone(),
            failsafe_out: self.failsafe_out.clone(),
            vxlan_port: self.vxlan_port,
        }
    }

    /// Whether a tier exists (`default` always does): Calico sorts the tiers that do
    /// not after all others (`TierLess`).
    fn tier_exists(&self, name: &str) -> bool {
        name == crate::model::tier::DEFAULT_TIER || self.tiers.contains_key(name)
    }

    /// Sort policies by tier (existing first, then order, then name), then order, then
    /// `name/namespace/kind`.
    fn sort(&self, ps: &mut [(&String, &ResolvedPolicy)]) {
        ps.sort_by(|(_, a), (_, b)| {
            let (ta, tb) = (self.tier(&a.tier), self.tier(&b.tier));
            (!self.tier_exists(&a.tier))
                .cmp(&!self.tier_exists(&b.tier))
                .then_with(|| cmp_order(ta.order, tb.order))
                .then_with(|| a.tier.cmp(&b.tier))
                .then_with(|| cmp_order(a.order, b.order))
                .then_with(|| a.sort_name.cmp(&b.sort_name))
        });
    }

    /// The members of a set, over every endpoint and network set.
    fn members(&self, def: &SetDef, labels: &BTreeMap<String, BTreeMap<String, String>>) -> IpSet {
        match &def.named_port {
            None => {
                let mut nets = BTreeSet::new();
                for (key, e) in &self.endpoints {
                    if def.selector.matches(&labels[key]) {
                        nets.extend(e.nets.iter().copied());
                    }
                }
                for s in self.net_sets.values() {
                    if def.selector.matches(&self.net_set_labels(s)) {
                        nets.extend(s.nets.iter().copied());
                    }
                }
                IpSet::Nets(nets)
            }
            Some((proto, name)) => {
                let mut out = BTreeSet::new();
                for (key, e) in &self.endpoints {
                    if def.selector.matches(&labels[key]) {
                        out.extend(port_members(e, *proto, name));
                    }
                }
                IpSet::Ports(out)
            }
        }
    }

    /// The whole dataplane, computed from scratch.
    pub fn dataplane(&self) -> PolicyDataplane {
        let labels = self.all_labels();
        let (mut dp, defs) = self.without_members(&labels);
        for (id, def) in defs {
            dp.sets.insert(id, self.members(def, &labels));
        }
        dp
    }

    /// Every endpoint's labels after inheritance, by key.
    pub(crate) fn all_labels(&self) -> BTreeMap<String, BTreeMap<String, String>> {
        self.endpoints
            .iter()
            .map(|(k, e)| (k.clone(), self.labels(e)))
            .collect()
    }

    /// The dataplane without its sets, and the sets its chains use.
    pub(crate) fn without_members(
        &self,
        labels: &BTreeMap<String, BTreeMap<String, String>>,
    ) -> (PolicyDataplane, BTreeMap<String, &SetDef>) {
        let mut dp = PolicyDataplane {
            endpoint_to_host: self.endpoint_to_host,
            encap_drops: self.encap_drops,
            log_prefix: self.log_prefix.clone(),
            ..Default::default()
        };
        let mut defs: BTreeMap<String, &SetDef> = BTreeMap::new();
        for (key, e) in &self.endpoints {
            if !self.is_local(e) {
                continue;
            }
            let ep = self.endpoint(e, &labels[key]);
            let policies = ep
                .ingress
                .iter()
                .chain(&ep.egress)
                .flat_map(|t| &t.policies);
            self.take_chains(&mut dp, &mut defs, policies, &ep.profiles);
            dp.endpoints.insert(e.iface.clone(), ep);
        }
        let host = self.host_layer(labels);
        for h in host.endpoints.values() {
            self.take_chains(&mut dp, &mut defs, h.policies(), &h.profiles);
        }
        dp.host = host;
        (dp, defs)
    }

    /// Put the chains of `policies` and `profiles` in `dp` (once each) and the sets they
    /// use in `defs`.
    fn take_chains<'a, 'b>(
        &'a self,
        dp: &mut PolicyDataplane,
        defs: &mut BTreeMap<String, &'a SetDef>,
        policies: impl Iterator<Item = &'b String>,
        profiles: &[String],
    ) {
        for id in policies {
            if !dp.policies.contains_key(id) {
                let p = &self.policies[id];
                dp.policies.insert(id.clone(), p.chains.clone());
                defs.extend(p.sets.iter().map(|(k, v)| (k.clone(), v)));
            }
        }
        for name in profiles {
            if !dp.profiles.contains_key(name) {
                let p = &self.profiles[name];
                dp.profiles.insert(name.clone(), p.chains.clone());
                defs.extend(p.sets.iter().map(|(k, v)| (k.clone(), v)));
            }
        }
    }
}

/// The (address, protocol, port) members an endpoint gives a named-port set.
pub(crate) fn port_members(
    e: &EndpointInfo,
    proto: NamedPortProto,
    name: &str,
) -> Vec<(IpAddr, u8, u16)> {
    let mut out = Vec::new();
    for (n, p, port) in &e.ports {
        if n != name || !proto.matches(*p) {
            continue;
        }
        // An unspecified endpoint protocol counts as TCP (Calico's default).
        let p = if *p == 0 { 6 } else { *p };
        for net in &e.nets {
            out.push((net.addr(), p, *port));
        }
    }
    out
}

/// What changed from `old` to `new` (see [`Delta`]).
pub fn diff(old: &PolicyDataplane, new: &PolicyDataplane) -> Delta {
    fn changed<V: PartialEq>(a: &BTreeMap<String, V>, b: &BTreeMap<String, V>) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        for (k, v) in a {
            if b.get(k) != Some(v) {
                out.insert(k.clone());
            }
        }
        for k in b.keys() {
            if !a.contains_key(k) {
                out.insert(k.clone());
            }
        }
        out
    }
    let mut d = Delta {
        endpoints: changed(&old.endpoints, &new.endpoints),
        policies: changed(&old.policies, &new.policies),
        profiles: changed(&old.profiles, &new.profiles),
        endpoint_to_host: old.endpoint_to_host != new.endpoint_to_host,
        encap_drops: old.encap_drops != new.encap_drops,
        host: old.host != new.host,
        log_prefix: old.log_prefix != new.log_prefix,
        ..Default::default()
    };
    for (id, set) in &new.sets {
        match (old.sets.get(id), set) {
            (None, _) => {
                d.sets.insert(id.clone());
            }
            (Some(IpSet::Nets(a)), IpSet::Nets(b)) => {
                let add: BTreeSet<IpNet> = b.difference(a).copied().collect();
                let del: BTreeSet<IpNet> = a.difference(b).copied().collect();
                if !add.is_empty() {
                    d.added.insert(id.clone(), IpSet::Nets(add));
                }
                if !del.is_empty() {
                    d.removed.insert(id.clone(), IpSet::Nets(del));
                }
            }
            (Some(IpSet::Ports(a)), IpSet::Ports(b)) => {
                let add: BTreeSet<_> = b.difference(a).copied().collect();
                let del: BTreeSet<_> = a.difference(b).copied().collect();
                if !add.is_empty() {
                    d.added.insert(id.clone(), IpSet::Ports(add));
                }
                if !del.is_empty() {
                    d.removed.insert(id.clone(), IpSet::Ports(del));
                }
            }
            // Ids tell the kinds apart; a change of kind is a new set.
            (Some(_), _) => {
                d.sets.insert(id.clone());
            }
        }
    }
    for id in old.sets.keys() {
        if !new.sets.contains_key(id) {
            d.sets.insert(id.clone());
        }
    }
    d
}

#[cfg(test)]
#[path = "calc_tests.rs"]
mod tests;
