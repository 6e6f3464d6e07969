//! Pure rendering of the policy dataplane (and NAT) into nft scripts: [`full`] replaces our
//! tables in one transaction, [`incremental`] writes what a [`Delta`] says changed in one
//! transaction (set elements, the changed chains, dispatch map elements), given what is
//! [`Programmed`]. Names follow Calico's nftables mode (REFERENCE §9): chains carry the
//! layer prefix `filter-`, sets are `cali40<id>` / `cali60<id>` with `:` made `-`.
//!
//! Verdicts (REFERENCE §9 gives Calico's marks, mask 0xffff0000): an Allow accepts. The
//! workload's egress policy runs in a base chain of its own (`filter-FORWARD`,
//! `filter-INPUT`, priority filter) and its ingress policy, or
//! `defaultEndpointToHostAction`, in a later one (`filter-FORWARD-to-wl`,
//! `filter-INPUT-wl-to-host`, priority filter + 1): an accept ends only its base chain,
//! so the destination's policy still follows, as after Calico's accept mark and return,
//! without a mark check after every policy jump. Pass sets the pass mark 0x20000 and
//! returns; the endpoint chain checks it before a tier's later policies and its drop only
//! where a policy of the tier can pass. Conntrack (established and related accepted,
//! invalid dropped) and the clearing of the pass mark run once, in the dispatch chains
//! every packet to or from a workload passes, not in each endpoint chain.

use std::collections::BTreeSet;
use std::fmt::Write as _;

use ipnet::IpNet;

use crate::felix::calc::Nat;
use crate::felix::nat;
use crate::felix::policy::{
    ALL_INTERFACES_KEY, Action, Chains, Delta, EncapDrops, Endpoint, EndpointToHost, Failsafe,
    HostEndpoint, IpSet, Match, PRE_DNAT_PREFIX, PolicyDataplane, PortRange, Rule, Stage, TierEnd,
    TierPolicies, UNTRACKED_PREFIX, stage_of,
};

/// The accept mark: set when a pre-DNAT or untracked policy allowed a packet (the filter
/// layer's host endpoint policy is then skipped, as in Calico), and on forwarded packets
/// (so that the host endpoints' egress policy for DNAT'd host traffic skips them).
pub const MARK_ACCEPT: u32 = 0x10000;
/// The pass mark: set by a Pass, ends the tier's evaluation.
pub const MARK_PASS: u32 = 0x20000;
/// The prefix of `log` rules (Calico's default `logPrefix`).
pub const LOG_PREFIX: &str = "calico-packet";
/// Longest chain name nft takes (the kernel's NFT_CHAIN_MAXNAMELEN less the NUL).
const MAX_NAME: usize = 255;

pub const FORWARD: &str = "filter-FORWARD";
pub const FORWARD_TO_WL: &str = "filter-FORWARD-to-wl";
pub const INPUT: &str = "filter-INPUT";
pub const INPUT_WL_TO_HOST: &str = "filter-INPUT-wl-to-host";
pub const RAW_PREROUTING: &str = "raw-PREROUTING";
pub const CALI_FORWARD: &str = "filter-cali-FORWARD";
pub const CALI_INPUT: &str = "filter-cali-INPUT";
pub const FROM_WL_DISPATCH: &str = "filter-cali-from-wl-dispatch";
pub const TO_WL_DISPATCH: &str = "filter-cali-to-wl-dispatch";
pub const WL_TO_HOST: &str = "filter-cali-wl-to-host";
pub const WL_TO_HOST_ACTION: &str = "filter-cali-wl-to-host-action";

/// What of the policy dataplane is in the kernel (written by the last successful apply):
/// what an incremental apply adds to, rewrites or deletes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Programmed {
    pub endpoints: BTreeSet<String>,
    pub policies: BTreeSet<String>,
    pub profiles: BTreeSet<String>,
    pub sets: BTreeSet<String>,
    /// The policies with a Pass rule: the endpoint chains that jump to one check the pass
    /// mark after it (see [`endpoint_lines`]), so they are rewritten when this changes.
    pub passes: BTreeSet<String>,
    /// Whether the IPv6 table holds the filter layer (there are IPv6 pools).
    pub ipv6: bool,
    /// The chains of the host layer (see [`host_chains`]), rewritten whole when it changes.
    pub host: BTreeSet<String>,
    /// The workload interface prefix the tables were written with.
    pub prefix: String,
}

impl Programmed {
    /// What a full apply of `dp` programs.
    pub fn of(dp: &PolicyDataplane, ipv6: bool, prefix: &str) -> Programmed {
        Programmed {
            ipv6,
            host: host_chains(dp, prefix, false)
                .into_iter()
                .map(|c| c.name)
                .collect(),
            prefix: prefix.to_string(),
            endpoints: dp
                .endpoints
                .keys()
                .filter(|i| valid_iface(i))
                .cloned()
                .collect(),
            policies: dp.policies.keys().cloned().collect(),
            passes: dp
                .policies
                .iter()
                .filter(|(_, c)| passes(c))
                .map(|(id, _)| id.clone())
                .collect(),
            profiles: dp.profiles.keys().cloned().collect(),
            sets: dp.sets.keys().cloned().collect(),
        }
    }

    /// What is programmed after an incremental apply of `delta` to `dp` succeeded.
    pub fn update(&mut self, dp: &PolicyDataplane, delta: &Delta) {
        fn follow<V>(
            have: &mut BTreeSet<String>,
            names: impl Iterator<Item = String>,
            now: &std::collections::BTreeMap<String, V>,
        ) {
            for n in names {
                if now.contains_key(&n) {
                    have.insert(n);
                } else {
                    have.remove(&n);
                }
            }
        }
        follow(
            &mut self.endpoints,
            delta.endpoints.iter().filter(|i| valid_iface(i)).cloned(),
            &dp.endpoints,
        );
        follow(
            &mut self.policies,
            delta.policies.iter().cloned(),
            &dp.policies,
        );
        for id in &delta.policies {
            if dp.policies.get(id).is_some_and(passes) {
                self.passes.insert(id.clone());
            } else {
                self.passes.remove(id);
            }
        }
        follow(
            &mut self.profiles,
            delta.profiles.iter().cloned(),
            &dp.profiles,
        );
        let sets = delta
            .sets
            .iter()
            .chain(delta.added.keys())
            .chain(delta.removed.keys())
            .cloned();
        follow(&mut self.sets, sets, &dp.sets);
        if rewrites_host(dp, delta, self) {
            self.host = host_chains(dp, &self.prefix, false)
                .into_iter()
                .map(|c| c.name)
                .collect();
        }
    }
}

/// `prefix` + `suffix`, or, when that is too long for nft (or exactly as long and
/// `suffix` starts with `_`), `prefix` + `_` + the base64url SHA-256 of `suffix`, cut to
/// fit: Calico's `GetLengthLimitedID`. A `suffix` with characters an nft name cannot
/// carry is hashed too (Calico's names are validated before they get here).
pub fn chain_name(prefix: &str, suffix: &str) -> String {
    let suffix = if suffix.is_empty() { "_" } else { suffix };
    let plain = suffix
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '/'));
    let len = prefix.len() + suffix.len();
    if plain && (len < MAX_NAME || (len == MAX_NAME && !suffix.starts_with('_'))) {
        return format!("{prefix}{suffix}");
    }
    use sha2::Digest;
    let hash = crate::felix::policy::calc::base64url(&sha2::Sha256::digest(suffix.as_bytes()));
    let room = MAX_NAME.saturating_sub(prefix.len() + 1).min(hash.len());
    format!("{prefix}_{}", &hash[..room])
}

/// `cali-pi-<id>` (inbound) or `cali-po-<id>` (outbound) of a policy, in its stage's
/// layer: `filter-`, `mangle-` (pre-DNAT) or `raw-` (untracked).
pub fn policy_chain(id: &str, inbound: bool) -> String {
    let p = if inbound { "pi" } else { "po" };
    let (layer, id) = match stage_of(id) {
        Stage::Normal => ("filter", id),
        Stage::PreDnat => ("mangle", &id[PRE_DNAT_PREFIX.len()..]),
        Stage::Untracked => ("raw", &id[UNTRACKED_PREFIX.len()..]),
    };
    chain_name(&format!("{layer}-cali-{p}-"), id)
}

/// `cali-pri-<name>` (inbound) or `cali-pro-<name>` (outbound) of a profile.
pub fn profile_chain(name: &str, inbound: bool) -> String {
    let p = if inbound { "pri" } else { "pro" };
    chain_name(&format!("filter-cali-{p}-"), name)
}

/// `cali-tw-<iface>` (to the workload) or `cali-fw-<iface>` (from it).
pub fn endpoint_chain(iface: &str, to: bool) -> String {
    let p = if to { "tw" } else { "fw" };
    chain_name(&format!("filter-cali-{p}-"), iface)
}

/// `cali40<id>` / `cali60<id>` with `:` made `-` (Calico's set names).
pub fn set_name(id: &str, v6: bool) -> String {
    let n = if v6 { "60" } else { "40" };
    let plain = id
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, ':' | '-' | '_' | '.'));
    if plain {
        format!("cali{n}{}", id.replace(':', "-"))
    } else {
        chain_name(&format!("cali{n}"), id)
    }
}

fn family(v6: bool) -> &'static str {
    if v6 { "ip6" } else { "ip" }
}

/// The members of an interval set as nft takes them: no member inside another (nft
/// refuses overlapping intervals; CIDRs either nest or are disjoint, so keeping the
/// outermost ones gives the same addresses).
pub fn outermost(nets: impl Iterator<Item = IpNet>) -> Vec<IpNet> {
    let mut v: Vec<IpNet> = nets.map(|n| n.trunc()).collect();
    v.sort_by_key(|n| (n.network(), n.prefix_len()));
    v.dedup();
    let mut out: Vec<IpNet> = Vec::with_capacity(v.len());
    for n in v {
        if out.last().is_some_and(|l| l.contains(&n)) {
            continue;
        }
        out.push(n);
    }
    out
}

fn net_text(n: &IpNet) -> String {
    if n.prefix_len() == n.max_prefix_len() {
        n.addr().to_string()
    } else {
        n.to_string()
    }
}

/// The elements of `set` in one family, as nft text (no braces).
fn elements(set: &IpSet, v6: bool) -> Vec<String> {
    match set {
        IpSet::Nets(nets) => outermost(nets.iter().copied().filter(|n| n.addr().is_ipv6() == v6))
            .iter()
            .map(net_text)
            .collect(),
        IpSet::Ports(ports) => ports
            .iter()
            .filter(|(a, _, _)| a.is_ipv6() == v6)
            .map(|(a, proto, port)| format!("{a} . {proto} . {port}"))
            .collect(),
    }
}

fn set_type(set: &IpSet, v6: bool) -> &'static str {
    match (set, v6) {
        (IpSet::Nets(_), false) => "type ipv4_addr; flags interval;",
        (IpSet::Nets(_), true) => "type ipv6_addr; flags interval;",
        (IpSet::Ports(_), false) => "type ipv4_addr . inet_proto . inet_service;",
        (IpSet::Ports(_), true) => "type ipv6_addr . inet_proto . inet_service;",
    }
}

fn ports_text(ports: &[PortRange]) -> String {
    let v: Vec<String> = ports
        .iter()
        .map(|p| {
            if p.lo == p.hi {
                p.lo.to_string()
            } else {
                format!("{}-{}", p.lo, p.hi)
            }
        })
        .collect();
    match_values(&v)
}

fn braces(v: &[String]) -> String {
    format!("{{ {} }}", v.join(", "))
}

/// The right-hand side of a match on `v`: one value as it is, several as an anonymous set
/// (each of which is a set object in the kernel, the costliest part of a rule to load).
fn match_values(v: &[String]) -> String {
    match v {
        [one] => one.clone(),
        _ => braces(v),
    }
}

/// The address and negated-port matches of one side of a rule; `None` when the rule
/// cannot match in this family (it names nets, none of them of this family).
fn side_matches(m: &Match, side: char, v6: bool) -> Option<String> {
    let fam = family(v6);
    let mut s = String::new();
    let of_family = |nets: &[IpNet]| -> Vec<String> {
        outermost(nets.iter().copied().filter(|n| n.addr().is_ipv6() == v6))
            .iter()
            .map(net_text)
            .collect()
    };
    if !m.nets.is_empty() {
        let nets = of_family(&m.nets);
        if nets.is_empty() {
            return None;
        }
        let _ = write!(s, "{fam} {side}addr {} ", match_values(&nets));
    }
    // As Calico (`FilterRuleToIPVersion`): `notNets` none of whose entries is of this
    // family make the rule not apply to it, and a negated catch-all matches nothing.
    let not_nets = of_family(&m.not_nets);
    if !m.not_nets.is_empty()
        && (not_nets.is_empty()
            || m.not_nets
                .iter()
                .any(|n| n.addr().is_ipv6() == v6 && n.prefix_len() == 0))
    {
        return None;
    }
    if !not_nets.is_empty() {
        let _ = write!(s, "{fam} {side}addr != {} ", match_values(&not_nets));
    }
    for id in &m.sets {
        let _ = write!(s, "{fam} {side}addr @{} ", set_name(id, v6));
    }
    for id in &m.not_sets {
        let _ = write!(s, "{fam} {side}addr != @{} ", set_name(id, v6));
    }
    if !m.not_ports.is_empty() {
        let _ = write!(s, "th {side}port != {} ", ports_text(&m.not_ports));
    }
    for id in &m.not_named_port_sets {
        let _ = write!(
            s,
            "{fam} {side}addr . meta l4proto . th {side}port != @{} ",
            set_name(id, v6)
        );
    }
    Some(s)
}

/// The port alternatives of one side (any of them matches): numeric ports, or one of the
/// named-port sets. One empty alternative when the side has no port match.
fn port_alternatives(m: &Match, side: char, v6: bool) -> Vec<String> {
    let mut alts = Vec::new();
    if !m.ports.is_empty() {
        alts.push(format!("th {side}port {} ", ports_text(&m.ports)));
    }
    for id in &m.named_port_sets {
        alts.push(format!(
            "{} {side}addr . meta l4proto . th {side}port @{} ",
            family(v6),
            set_name(id, v6)
        ));
    }
    if alts.is_empty() {
        alts.push(String::new());
    }
    alts
}

/// An action's verdict (see the module documentation: an Allow accepts, ending the base
/// chain of this direction's policy; before DNAT or conntrack it also sets the accept
/// mark, and an untracked Allow leaves the packet untracked).
fn action_text(a: Action, stage: Stage, log: &str) -> String {
    match a {
        Action::Allow => match stage {
            Stage::Normal => "counter accept".to_string(),
            Stage::PreDnat => {
                format!("counter meta mark set meta mark | 0x{MARK_ACCEPT:08x} accept")
            }
            Stage::Untracked => {
                format!("counter meta mark set meta mark | 0x{MARK_ACCEPT:08x} notrack accept")
            }
        },
        Action::Deny => "counter drop".to_string(),
        Action::Pass => format!("counter meta mark set meta mark | 0x{MARK_PASS:08x} return"),
        Action::Log => format!("counter log prefix \"{log}: \""),
    }
}

/// One rule in one family: nft rules (more than one when ports OR named ports; none when
/// the rule does not apply to this family).
pub fn rule_lines(r: &Rule, v6: bool, stage: Stage) -> Vec<String> {
    rule_lines_logging(r, v6, stage, LOG_PREFIX)
}

/// [`rule_lines`] with Log rules logging with prefix `log`.
pub fn rule_lines_logging(r: &Rule, v6: bool, stage: Stage, log: &str) -> Vec<String> {
    if r.ip_version.is_some_and(|v| (v == 6) != v6)
        || r.icmp.is_some_and(|i| i.v6 != v6)
        || r.not_icmp.is_some_and(|i| i.v6 != v6)
    {
        return Vec::new();
    }
    let mut m = String::new();
    if let Some(p) = r.protocol {
        let _ = write!(m, "meta l4proto {p} ");
    }
    if let Some(p) = r.not_protocol {
        let _ = write!(m, "meta l4proto != {p} ");
    }
    let icmp = if v6 { "icmpv6" } else { "icmp" };
    if let Some(i) = r.icmp {
        let _ = write!(m, "{icmp} type {} ", i.icmp_type);
        if let Some(c) = i.code {
            let _ = write!(m, "{icmp} code {c} ");
        }
    }
    if let Some(i) = r.not_icmp {
        match i.code {
            None => {
                let _ = write!(m, "{icmp} type != {} ", i.icmp_type);
            }
            Some(c) => {
                let _ = write!(
                    m,
                    "{icmp} type . {icmp} code != {{ {} . {c} }} ",
                    i.icmp_type
                );
            }
        }
    }
    let (Some(src), Some(dst)) = (side_matches(&r.src, 's', v6), side_matches(&r.dst, 'd', v6))
    else {
        return Vec::new();
    };
    m += &src;
    m += &dst;
    let action = action_text(r.action, stage, log);
    let mut out = Vec::new();
    for sp in port_alternatives(&r.src, 's', v6) {
        for dp in port_alternatives(&r.dst, 'd', v6) {
            out.push(format!("{m}{sp}{dp}{action}"));
        }
    }
    out
}

/// The rules of a policy or profile chain, in `stage`'s layer, Log rules logging with
/// prefix `log`.
pub fn rules_lines(rules: &[Rule], v6: bool, stage: Stage, log: &str) -> Vec<String> {
    rules
        .iter()
        .flat_map(|r| rule_lines_logging(r, v6, stage, log))
        .collect()
}

/// The chains of policy `id`: (name, rules), inbound then outbound.
pub fn policy_chains(
    dp: &PolicyDataplane,
    id: &str,
    c: &Chains,
    v6: bool,
) -> [(String, Vec<String>); 2] {
    let stage = stage_of(id);
    let log = log_prefix(dp, id, false);
    [
        (
            policy_chain(id, true),
            rules_lines(&c.inbound, v6, stage, &log),
        ),
        (
            policy_chain(id, false),
            rules_lines(&c.outbound, v6, stage, &log),
        ),
    ]
}

/// The chains of profile `name`: (name, rules), inbound then outbound.
pub fn profile_chains(
    dp: &PolicyDataplane,
    name: &str,
    c: &Chains,
    v6: bool,
) -> [(String, Vec<String>); 2] {
    let log = log_prefix(dp, name, true);
    [
        (
            profile_chain(name, true),
            rules_lines(&c.inbound, v6, Stage::Normal, &log),
        ),
        (
            profile_chain(name, false),
            rules_lines(&c.outbound, v6, Stage::Normal, &log),
        ),
    ]
}

/// Whether a policy or profile has a Log rule.
pub fn logs(c: &Chains) -> bool {
    c.inbound
        .iter()
        .chain(&c.outbound)
        .any(|r| r.action == Action::Log)
}

/// The log prefix of policy (or profile) `id`'s Log rules: `logPrefix` with Calico's
/// specifiers expanded (`%t` tier, `%k` kind `gnp`/`np`/`pro`, `%n` name, `%p`
/// namespace/name), characters an nft string cannot carry made `_`, cut to fit nft's
/// 127 bytes with the `: ` after it.
pub fn log_prefix(dp: &PolicyDataplane, id: &str, profile: bool) -> String {
    let format = if dp.log_prefix.is_empty() {
        LOG_PREFIX
    } else {
        dp.log_prefix.as_str()
    };
    let mut out = String::new();
    if !format.contains('%') {
        out.push_str(format);
    } else {
        let plain = match stage_of(id) {
            Stage::Normal => id,
            Stage::PreDnat => &id[PRE_DNAT_PREFIX.len()..],
            Stage::Untracked => &id[UNTRACKED_PREFIX.len()..],
        };
        let (kind, namespace, name) = if profile {
            ("pro", "", plain)
        } else {
            match plain.split('/').collect::<Vec<_>>()[..] {
                ["gnp", name] => ("gnp", "", name),
                ["np", ns, name] => ("np", ns, name),
                _ => ("unknown", "", "unknown"),
            }
        };
        let tier = if profile {
            String::new()
        } else {
            tier_of(dp, id)
        };
        let mut chars = format.chars().peekable();
        while let Some(c) = chars.next() {
            let spec = (c == '%').then(|| chars.peek().copied()).flatten();
            let value = match spec {
                Some('t') => Some(tier.clone()),
                Some('k') => Some(kind.to_string()),
                Some('n') => Some(name.to_string()),
                Some('p') if namespace.is_empty() => Some(name.to_string()),
                Some('p') => Some(format!("{namespace}/{name}")),
                _ => None,
            };
            match value {
                Some(v) => {
                    chars.next();
                    out.push_str(&v);
                }
                None => out.push(c),
            }
        }
    }
    let mut clean: String = out
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "%: /_-.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    clean.truncate(125);
    clean
}

/// The tier of policy `id`, from an endpoint that uses it.
fn tier_of(dp: &PolicyDataplane, id: &str) -> String {
    let workload = dp
        .endpoints
        .values()
        .flat_map(|e| e.ingress.iter().chain(&e.egress));
    let host = dp.host.endpoints.values().flat_map(|h| {
        [
            &h.ingress,
            &h.egress,
            &h.forward_ingress,
            &h.forward_egress,
            &h.pre_dnat,
            &h.untracked_ingress,
            &h.untracked_egress,
        ]
        .into_iter()
        .flatten()
    });
    workload
        .chain(host)
        .find(|t| t.policies.iter().any(|p| p == id))
        .map(|t| t.tier.clone())
        .unwrap_or_default()
}

/// Whether a policy has a Pass rule (in either direction).
pub fn passes(c: &Chains) -> bool {
    passes_to(c, true) || passes_to(c, false)
}

/// Whether a policy has a Pass rule among its inbound (`to`) or outbound rules.
fn passes_to(c: &Chains, to: bool) -> bool {
    let rules = if to { &c.inbound } else { &c.outbound };
    rules.iter().any(|r| r.action == Action::Pass)
}

/// The rules of an endpoint's chain (`to`: `cali-tw-`, else `cali-fw-`): each tier's
/// policies in order, the tier's drop, the profiles, the final drop. The pass mark is
/// checked (and cleared before the next tier) only after a policy with a Pass rule, and
/// nothing follows a drop that nothing can skip.
pub fn endpoint_lines(dp: &PolicyDataplane, ep: &Endpoint, to: bool) -> Vec<String> {
    let mut v = Vec::new();
    let tiers = if to { &ep.ingress } else { &ep.egress };
    if tier_lines(dp, tiers, to, &mut v) {
        return v;
    }
    profiles_and_drop(dp, &ep.profiles, to, &mut v);
    v
}

/// The profiles' chains, then the final drop.
fn profiles_and_drop(dp: &PolicyDataplane, profiles: &[String], to: bool, v: &mut Vec<String>) {
    for p in profiles {
        if dp.profiles.contains_key(p) {
            v.push(format!("jump {}", profile_chain(p, to)));
        }
    }
    v.push("counter drop".to_string());
}

/// Each tier's policies in order (their inbound chains when `inbound`) and its end, onto
/// `v`; true when a drop nothing can skip ended it (nothing may follow). The pass mark is
/// clear on entry.
fn tier_lines(dp: &PolicyDataplane, tiers: &[TierPolicies], to: bool, v: &mut Vec<String>) -> bool {
    let unpassed = format!("meta mark & 0x{MARK_PASS:08x} == 0");
    // Whether a Pass may have set the mark since it was last cleared (the dispatch chain
    // clears it before the endpoint chain).
    let mut marked = false;
    for (i, t) in tiers.iter().enumerate() {
        if i > 0 && marked {
            v.push(format!("meta mark set meta mark & 0x{:08x}", !MARK_PASS));
            marked = false;
        }
        for id in &t.policies {
            let Some(c) = dp.policies.get(id) else {
                continue;
            };
            let chain = policy_chain(id, to);
            v.push(if marked {
                format!("{unpassed} jump {chain}")
            } else {
                format!("jump {chain}")
            });
            marked |= passes_to(c, to);
        }
        if t.end == TierEnd::Deny {
            if !marked {
                v.push("counter drop".to_string());
                return true;
            }
            v.push(format!("{unpassed} counter drop"));
        }
    }
    false
}

/// `cali-wl-to-host`, in `filter-INPUT`: the endpoint's egress policy (IPv6 neighbour
/// discovery and MLD accepted first, as Calico's ICMPv6 filter); what it accepts meets
/// `defaultEndpointToHostAction` in `filter-INPUT-wl-to-host` (see
/// [`wl_to_host_action_lines`]).
pub fn wl_to_host_lines(v6: bool) -> Vec<String> {
    let mut v = Vec::new();
    if v6 {
        v.push(format!("icmpv6 type {ND_TYPES} accept"));
    }
    v.push(format!("goto {FROM_WL_DISPATCH}"));
    v
}

/// Neighbour discovery and MLD (ICMPv6 130-133, 135, 136).
const ND_TYPES: &str = "{ 130, 131, 132, 133, 135, 136 }";

/// `cali-wl-to-host-action`: `defaultEndpointToHostAction` for what a workload's egress
/// policy let through to the host. Drop keeps the replies of the host's own connections
/// (conntrack, as Calico's endpoint chain accepts them before the action) and neighbour
/// discovery.
pub fn wl_to_host_action_lines(action: EndpointToHost, v6: bool) -> Vec<String> {
    match action {
        EndpointToHost::Drop => {
            let mut v = vec!["ct state established,related accept".to_string()];
            if v6 {
                v.push(format!("icmpv6 type {ND_TYPES} accept"));
            }
            v.push("counter drop".to_string());
            v
        }
        EndpointToHost::Return => vec!["return".to_string()],
        EndpointToHost::Accept => vec!["accept".to_string()],
    }
}

/// Conntrack and the pass mark, at the top of both dispatch chains.
fn dispatch_head() -> [String; 3] {
    [
        "ct state established,related accept".to_string(),
        "ct state invalid drop".to_string(),
        format!("meta mark set meta mark & 0x{:08x}", !MARK_PASS),
    ]
}

/// `filter-cali-from-wl-dispatch`: conntrack, the encapsulated packets workloads may not
/// send (Calico drops them in every from-workload chain), then the endpoint's chain by
/// interface; an interface we do not know is dropped.
pub fn from_wl_dispatch_lines(drops: EncapDrops) -> Vec<String> {
    let mut v = dispatch_head().to_vec();
    if let Some(port) = drops.vxlan_port {
        v.push(format!("udp dport {port} counter drop"));
    }
    if drops.ipip {
        v.push("meta l4proto 4 counter drop".to_string());
    }
    v.push(format!("iifname vmap @{FROM_WL_DISPATCH}"));
    v.push("counter drop".to_string());
    v
}

/// The interface-name wildcards of `interfacePrefix`, which may list several prefixes
/// separated by commas (`cali,tap`), as Felix reads it: one rule each.
pub fn ifname_wildcards(prefix: &str) -> Vec<String> {
    let all: Vec<String> = prefix
        .split(',')
        .map(str::trim)
        .filter(|p| valid_iface(p))
        .map(|p| format!("\"{p}*\""))
        .collect();
    if all.is_empty() {
        vec!["\"cali*\"".to_string()]
    } else {
        all
    }
}

/// Whether `name` can be a Linux interface name (at most 15 bytes, no `/`, space or
/// quote): an endpoint whose name is not is left out, so that one bad WorkloadEndpoint
/// cannot make the whole transaction fail.
pub fn valid_iface(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 15
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '@' | ':'))
}

fn dispatch_elements(dp: &PolicyDataplane, to: bool) -> Vec<String> {
    dp.endpoints
        .keys()
        .filter(|i| valid_iface(i))
        .map(|i| dispatch_element(i, to))
        .collect()
}

fn dispatch_element(iface: &str, to: bool) -> String {
    format!("\"{iface}\" : goto {}", endpoint_chain(iface, to))
}

fn chain_block(out: &mut String, name: &str, head: Option<&str>, rules: &[String]) {
    let _ = writeln!(out, "\tchain {name} {{");
    if let Some(h) = head {
        let _ = writeln!(out, "\t\t{h}");
    }
    for r in rules {
        let _ = writeln!(out, "\t\t{r}");
    }
    out.push_str("\t}\n");
}

/// The fixed chains of the filter layer (see the module documentation for the two base
/// chains of each hook).
fn static_chains(out: &mut String, dp: &PolicyDataplane, prefix: &str, v6: bool) {
    let any = ifname_wildcards(prefix);
    chain_block(
        out,
        FROM_WL_DISPATCH,
        None,
        &from_wl_dispatch_lines(dp.encap_drops),
    );
    let mut to_wl = dispatch_head().to_vec();
    to_wl.push(format!("oifname vmap @{TO_WL_DISPATCH}"));
    to_wl.push("counter drop".to_string());
    chain_block(out, TO_WL_DISPATCH, None, &to_wl);
    chain_block(out, WL_TO_HOST, None, &wl_to_host_lines(v6));
    chain_block(
        out,
        WL_TO_HOST_ACTION,
        None,
        &wl_to_host_action_lines(dp.endpoint_to_host, v6),
    );
    let each = |f: &dyn Fn(&String) -> String| any.iter().map(f).collect::<Vec<_>>();
    chain_block(
        out,
        CALI_FORWARD,
        None,
        &each(&|w| format!("iifname {w} jump {FROM_WL_DISPATCH}")),
    );
    chain_block(
        out,
        CALI_INPUT,
        None,
        &each(&|w| format!("iifname {w} goto {WL_TO_HOST}")),
    );
    let base = |hook: &str, later: bool| {
        let then = if later { " + 1" } else { "" };
        format!("type filter hook {hook} priority filter{then}; policy accept;")
    };
    chain_block(
        out,
        FORWARD,
        Some(&base("forward", false)),
        &[format!("jump {CALI_FORWARD}")],
    );
    chain_block(
        out,
        FORWARD_TO_WL,
        Some(&base("forward", true)),
        &each(&|w| format!("oifname {w} jump {TO_WL_DISPATCH}")),
    );
    chain_block(
        out,
        INPUT,
        Some(&base("input", false)),
        &[format!("jump {CALI_INPUT}")],
    );
    chain_block(
        out,
        INPUT_WL_TO_HOST,
        Some(&base("input", true)),
        &each(&|w| format!("iifname {w} goto {WL_TO_HOST_ACTION}")),
    );
    // Strict reverse-path check of what workloads send, before conntrack (Calico's raw
    // PREROUTING): a source the workload's interface does not route to is spoofed.
    // IPv4 has the interface's rp_filter sysctl too; IPv6 has only this.
    chain_block(
        out,
        RAW_PREROUTING,
        Some("type filter hook prerouting priority raw; policy accept;"),
        &each(&|w| format!("iifname {w} fib saddr . mark . iif oif 0 counter drop")),
    );
}

/// One family's table, whole (inside `table <family> calico { … }`).
fn table_body(dp: &PolicyDataplane, nat: &Nat, prefix: &str, v6: bool) -> String {
    let mut out = nat::body(nat, v6).unwrap_or_default();
    for (id, set) in &dp.sets {
        let _ = writeln!(out, "\tset {} {{", set_name(id, v6));
        let _ = writeln!(out, "\t\t{}", set_type(set, v6));
        let e = elements(set, v6);
        if !e.is_empty() {
            let _ = writeln!(out, "\t\telements = {}", braces(&e));
        }
        out.push_str("\t}\n");
    }
    for (name, to) in [(FROM_WL_DISPATCH, false), (TO_WL_DISPATCH, true)] {
        let _ = writeln!(out, "\tmap {name} {{\n\t\ttype ifname : verdict;");
        let e = dispatch_elements(dp, to);
        if !e.is_empty() {
            let _ = writeln!(out, "\t\telements = {}", braces(&e));
        }
        out.push_str("\t}\n");
    }
    let policies = dp
        .policies
        .iter()
        .flat_map(|(id, c)| policy_chains(dp, id, c, v6));
    let profiles = dp
        .profiles
        .iter()
        .flat_map(|(n, c)| profile_chains(dp, n, c, v6));
    for (name, rules) in policies.chain(profiles) {
        chain_block(&mut out, &name, None, &rules);
    }
    for (iface, ep) in dp.endpoints.iter().filter(|(i, _)| valid_iface(i)) {
        for to in [true, false] {
            chain_block(
                &mut out,
                &endpoint_chain(iface, to),
                None,
                &endpoint_lines(dp, ep, to),
            );
        }
    }
    static_chains(&mut out, dp, prefix, v6);
    for c in host_chains(dp, prefix, v6) {
        chain_block(&mut out, &c.name, c.head.as_deref(), &c.rules);
    }
    out
}

/// The script that replaces our tables (both families) with `dp` and `nat`, in one
/// transaction: each table is declared, deleted (so the delete cannot fail) and defined.
/// `prefix` is the workload interface prefix (`cali`). Without IPv6 pools (Felix's
/// `ipv6Support` in effect off) the IPv6 table is not written: workloads have no IPv6
/// address to police, and it halves the work.
pub fn full(dp: &PolicyDataplane, nat: &Nat, prefix: &str) -> String {
    let mut s = String::new();
    for v6 in [false, true] {
        let fam = family(v6);
        let _ = writeln!(s, "table {fam} calico\ndelete table {fam} calico");
        if v6 && !ipv6(nat) {
            continue;
        }
        let _ = writeln!(
            s,
            "table {fam} calico {{\n{}}}",
            table_body(dp, nat, prefix, v6)
        );
    }
    s
}

/// Whether the IPv6 table is written: there is an IPv6 pool.
pub fn ipv6(nat: &Nat) -> bool {
    nat.all.iter().any(|n| n.addr().is_ipv6())
}

/// The families written: IPv4, and IPv6 when `programmed.ipv6`.
pub fn families(programmed: &Programmed) -> &'static [bool] {
    if programmed.ipv6 {
        &[false, true]
    } else {
        &[false]
    }
}

/// The script that brings our tables from `programmed` to `dp`, writing only what `delta`
/// names, in one transaction; empty when there is nothing to write. NAT is not touched.
pub fn incremental(dp: &PolicyDataplane, delta: &Delta, programmed: &Programmed) -> String {
    let mut s = String::new();
    for &v6 in families(programmed) {
        incremental_family(&mut s, dp, delta, programmed, v6);
    }
    s
}

fn incremental_family(
    s: &mut String,
    dp: &PolicyDataplane,
    delta: &Delta,
    programmed: &Programmed,
    v6: bool,
) {
    let t = format!("{} calico", family(v6));
    // 1. Sets: created whole, rewritten whole, or their members changed.
    let set_ids: BTreeSet<&String> = delta
        .sets
        .iter()
        .chain(delta.added.keys())
        .chain(delta.removed.keys())
        .collect();
    let mut gone_sets = Vec::new();
    for id in set_ids {
        let name = set_name(id, v6);
        let have = programmed.sets.contains(id);
        match dp.sets.get(id) {
            None => {
                if have {
                    gone_sets.push(name);
                }
            }
            Some(set) if !have || delta.sets.contains(id) => {
                if have {
                    let _ = writeln!(s, "flush set {t} {name}");
                } else {
                    let _ = writeln!(s, "add set {t} {name} {{ {} }}", set_type(set, v6));
                }
                let e = elements(set, v6);
                if !e.is_empty() {
                    let _ = writeln!(s, "add element {t} {name} {}", braces(&e));
                }
            }
            Some(set) => {
                let (del, add) = member_changes(
                    set,
                    delta.added.get(id.as_str()),
                    delta.removed.get(id.as_str()),
                    v6,
                );
                let text = |v: Vec<Element>| v.iter().map(Element::text).collect::<Vec<_>>();
                if !del.is_empty() {
                    let _ = writeln!(s, "delete element {t} {name} {}", braces(&text(del)));
                }
                if !add.is_empty() {
                    let _ = writeln!(s, "add element {t} {name} {}", braces(&text(add)));
                }
            }
        }
    }
    // 2. Chains: every chain to write is declared first, so jumps between them resolve in
    // any order; those that exist are flushed and refilled.
    let mut chains: Vec<(String, bool, Vec<String>)> = Vec::new();
    // A new log prefix: every policy and profile with a Log rule too.
    let logging = |c: &&Chains| delta.log_prefix && logs(c);
    let policies = delta.policies.iter().cloned().chain(
        dp.policies
            .iter()
            .filter(|(id, c)| logging(c) && programmed.policies.contains(*id))
            .map(|(id, _)| id.clone()),
    );
    for id in policies.collect::<BTreeSet<String>>() {
        if let Some(c) = dp.policies.get(&id) {
            let have = programmed.policies.contains(&id);
            chains.extend(policy_chains(dp, &id, c, v6).map(|(n, r)| (n, have, r)));
        }
    }
    let profiles = delta.profiles.iter().cloned().chain(
        dp.profiles
            .iter()
            .filter(|(n, c)| logging(c) && programmed.profiles.contains(*n))
            .map(|(n, _)| n.clone()),
    );
    for name in profiles.collect::<BTreeSet<String>>() {
        if let Some(c) = dp.profiles.get(&name) {
            let have = programmed.profiles.contains(&name);
            chains.extend(profile_chains(dp, &name, c, v6).map(|(n, r)| (n, have, r)));
        }
    }
    let mut new_endpoints = Vec::new();
    let endpoints = endpoints_to_write(dp, delta, programmed);
    for iface in endpoints.iter().filter(|i| valid_iface(i)) {
        if let Some(ep) = dp.endpoints.get(iface) {
            let have = programmed.endpoints.contains(iface);
            for to in [true, false] {
                chains.push((endpoint_chain(iface, to), have, endpoint_lines(dp, ep, to)));
            }
            if !have {
                new_endpoints.push(iface);
            }
        }
    }
    if delta.encap_drops {
        chains.push((
            FROM_WL_DISPATCH.to_string(),
            true,
            from_wl_dispatch_lines(dp.encap_drops),
        ));
    }
    if delta.endpoint_to_host {
        chains.push((
            WL_TO_HOST_ACTION.to_string(),
            true,
            wl_to_host_action_lines(dp.endpoint_to_host, v6),
        ));
    }
    // The host layer, whole, when it or what it refers to changed: its chains that stay
    // are flushed and refilled, new ones added, those that go flushed now and deleted
    // at the end (nothing refers to them then).
    let mut heads: Vec<(String, String)> = Vec::new();
    let mut host_gone: Vec<&String> = Vec::new();
    if rewrites_host(dp, delta, programmed) {
        let host = host_chains(dp, &programmed.prefix, v6);
        let names: BTreeSet<&str> = host.iter().map(|c| c.name.as_str()).collect();
        host_gone = programmed
            .host
            .iter()
            .filter(|n| !names.contains(n.as_str()))
            .collect();
        for c in host {
            let have = programmed.host.contains(&c.name);
            if let (Some(h), false) = (&c.head, have) {
                heads.push((c.name.clone(), h.clone()));
            }
            chains.push((c.name, have, c.rules));
        }
        for name in &host_gone {
            let _ = writeln!(s, "flush chain {t} {name}");
        }
    }
    for (name, have, _) in &chains {
        if !have {
            match heads.iter().find(|(n, _)| n == name) {
                Some((_, head)) => {
                    let _ = writeln!(s, "add chain {t} {name} {{ {head} }}");
                }
                None => {
                    let _ = writeln!(s, "add chain {t} {name}");
                }
            }
        }
    }
    for (name, have, rules) in &chains {
        if *have {
            let _ = writeln!(s, "flush chain {t} {name}");
        }
        for r in rules {
            let _ = writeln!(s, "add rule {t} {name} {r}");
        }
    }
    for name in host_gone {
        let _ = writeln!(s, "delete chain {t} {name}");
    }
    // 3. Dispatch: new endpoints in, removed ones out (then their chains).
    for (map, to) in [(FROM_WL_DISPATCH, false), (TO_WL_DISPATCH, true)] {
        let add: Vec<String> = new_endpoints
            .iter()
            .map(|i| dispatch_element(i, to))
            .collect();
        if !add.is_empty() {
            let _ = writeln!(s, "add element {t} {map} {}", braces(&add));
        }
        let del: Vec<String> = delta
            .endpoints
            .iter()
            .filter(|i| !dp.endpoints.contains_key(*i) && programmed.endpoints.contains(*i))
            .map(|i| format!("\"{i}\""))
            .collect();
        if !del.is_empty() {
            let _ = writeln!(s, "delete element {t} {map} {}", braces(&del));
        }
    }
    for iface in &delta.endpoints {
        if !dp.endpoints.contains_key(iface) && programmed.endpoints.contains(iface) {
            for to in [true, false] {
                let _ = writeln!(s, "delete chain {t} {}", endpoint_chain(iface, to));
            }
        }
    }
    // 4. Policies and profiles gone (no endpoint chain jumps to them any more), then sets.
    for id in &delta.policies {
        if !dp.policies.contains_key(id) && programmed.policies.contains(id) {
            for inbound in [true, false] {
                let _ = writeln!(s, "delete chain {t} {}", policy_chain(id, inbound));
            }
        }
    }
    for name in &delta.profiles {
        if !dp.profiles.contains_key(name) && programmed.profiles.contains(name) {
            for inbound in [true, false] {
                let _ = writeln!(s, "delete chain {t} {}", profile_chain(name, inbound));
            }
        }
    }
    for name in gone_sets {
        let _ = writeln!(s, "delete set {t} {name}");
    }
}

/// One element of an IP set in the kernel: a net of an interval set, or an (address,
/// protocol, port) of a named-port set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Element {
    Net(IpNet),
    Port(std::net::IpAddr, u8, u16),
}

impl Element {
    fn text(&self) -> String {
        match self {
            Element::Net(n) => net_text(n),
            Element::Port(a, proto, port) => format!("{a} . {proto} . {port}"),
        }
    }
}

/// The endpoints whose chains a delta rewrites: those it names, and those that refer to
/// a policy or profile that comes into being or goes, or to a policy that gains or loses
/// a Pass rule (an endpoint chain skips the ones that do not exist and checks the pass
/// mark after the ones that pass, so it changes with them even when the delta does not
/// name it).
fn endpoints_to_write(
    dp: &PolicyDataplane,
    delta: &Delta,
    programmed: &Programmed,
) -> BTreeSet<String> {
    let mut out = delta.endpoints.clone();
    let policies: BTreeSet<&String> = delta
        .policies
        .iter()
        .filter(|id| {
            dp.policies.contains_key(*id) != programmed.policies.contains(*id)
                || dp.policies.get(*id).is_some_and(passes) != programmed.passes.contains(*id)
        })
        .collect();
    let profiles: BTreeSet<&String> = delta
        .profiles
        .iter()
        .filter(|p| dp.profiles.contains_key(*p) != programmed.profiles.contains(*p))
        .collect();
    if policies.is_empty() && profiles.is_empty() {
        return out;
    }
    for (iface, ep) in &dp.endpoints {
        let tiers = ep.ingress.iter().chain(ep.egress.iter());
        let refers = tiers
            .flat_map(|t| t.policies.iter())
            .any(|id| policies.contains(id))
            || ep.profiles.iter().any(|p| profiles.contains(p));
        if refers && programmed.endpoints.contains(iface) {
            out.insert(iface.clone());
        }
    }
    out
}

/// The elements to delete and to add in one family when `added` and `removed` changed a
/// set that now holds `now`. For nets, what changes is the outermost members, computed
/// before and after, among the members that nest with a changed one.
pub fn member_changes(
    now: &IpSet,
    added: Option<&IpSet>,
    removed: Option<&IpSet>,
    v6: bool,
) -> (Vec<Element>, Vec<Element>) {
    match now {
        IpSet::Nets(now) => {
            let empty = BTreeSet::new();
            let add = match added {
                Some(IpSet::Nets(a)) => a,
                _ => &empty,
            };
            let rem = match removed {
                Some(IpSet::Nets(r)) => r,
                _ => &empty,
            };
            let fam = |n: &&IpNet| n.addr().is_ipv6() == v6;
            let changed: Vec<IpNet> = add.iter().chain(rem.iter()).filter(fam).copied().collect();
            if changed.is_empty() {
                return (Vec::new(), Vec::new());
            }
            // Only members that nest with a changed one can change their outermost-ness
            // (a member containing a touched one nests with the change too).
            let touched = nested(now, &changed);
            let after: BTreeSet<IpNet> = outermost(touched.iter().copied().filter(|n| fam(&n)))
                .into_iter()
                .collect();
            let before_members = touched
                .iter()
                .copied()
                .filter(|n| !add.contains(n))
                .chain(rem.iter().copied())
                .filter(|n| fam(&n));
            let before: BTreeSet<IpNet> = outermost(before_members).into_iter().collect();
            (
                before
                    .difference(&after)
                    .map(|n| Element::Net(*n))
                    .collect(),
                after
                    .difference(&before)
                    .map(|n| Element::Net(*n))
                    .collect(),
            )
        }
        IpSet::Ports(_) => {
            let of = |s: Option<&IpSet>| match s {
                Some(IpSet::Ports(p)) => p
                    .iter()
                    .filter(|(a, _, _)| a.is_ipv6() == v6)
                    .map(|(a, proto, port)| Element::Port(*a, *proto, *port))
                    .collect(),
                _ => Vec::new(),
            };
            (of(removed), of(added))
        }
    }
}

/// The members of `set` that nest with one of `changed` (contain it or are inside it).
fn nested(set: &BTreeSet<IpNet>, changed: &[IpNet]) -> Vec<IpNet> {
    set.iter()
        .filter(|n| changed.iter().any(|c| c.contains(*n) || n.contains(c)))
        .copied()
        .collect()
}

// The host layer (REFERENCE §10; Calico's `HostEndpointTo*Chains`, `failsafe*Chain` and
// the static chains that dispatch to them). Each stage has a base chain of its own, so
// that an Allow (an accept) ends only its stage:
//
//   prerouting  raw + 1    raw-PREROUTING-host     untracked policy in (`raw-cali-fh-`)
//               mangle     mangle-PREROUTING-host  pre-DNAT policy (`mangle-cali-fh-`)
//   input       filter + 2 filter-INPUT-host       normal policy in (`filter-cali-fh-`)
//   forward     filter - 1 filter-FORWARD-from-host  applyOnForward in (`filter-cali-fhfw-`)
//               filter + 2 filter-FORWARD-to-host    applyOnForward out (`filter-cali-thfw-`)
//   output      raw        raw-OUTPUT-host         untracked policy out (`raw-cali-th-`)
//               filter     filter-OUTPUT-host      normal policy out (`filter-cali-th-`)
//   postrouting mangle     mangle-POSTROUTING-host normal policy out for DNAT'd host
//                                                  traffic (its interface is known here)
//
// Loopback is never policed; workload traffic meets the workload chains (and
// `defaultEndpointToHostAction`) instead of normal host endpoint policy; what a pre-DNAT
// or untracked policy allowed carries the accept mark and skips the filter layer's host
// endpoint policy. Each host endpoint chain starts with conntrack (not before conntrack)
// and Felix's failsafe ports.

pub const RAW_PREROUTING_HOST: &str = "raw-PREROUTING-host";
pub const RAW_OUTPUT_HOST: &str = "raw-OUTPUT-host";
pub const MANGLE_PREROUTING_HOST: &str = "mangle-PREROUTING-host";
pub const MANGLE_POSTROUTING_HOST: &str = "mangle-POSTROUTING-host";
pub const INPUT_HOST: &str = "filter-INPUT-host";
pub const OUTPUT_HOST: &str = "filter-OUTPUT-host";
pub const FORWARD_FROM_HOST: &str = "filter-FORWARD-from-host";
pub const FORWARD_TO_HOST: &str = "filter-FORWARD-to-host";
pub const FROM_HOST_DISPATCH: &str = "filter-cali-from-host-endpoint";
pub const TO_HOST_DISPATCH: &str = "filter-cali-to-host-endpoint";
pub const FROM_HOST_FWD_DISPATCH: &str = "filter-cali-from-hep-forward";
pub const TO_HOST_FWD_DISPATCH: &str = "filter-cali-to-hep-forward";
pub const MANGLE_FROM_HOST_DISPATCH: &str = "mangle-cali-from-host-endpoint";
pub const RAW_FROM_HOST_DISPATCH: &str = "raw-cali-from-host-endpoint";
pub const RAW_TO_HOST_DISPATCH: &str = "raw-cali-to-host-endpoint";
pub const FAILSAFE_IN: &str = "filter-cali-failsafe-in";
pub const FAILSAFE_OUT: &str = "filter-cali-failsafe-out";
pub const MANGLE_FAILSAFE_IN: &str = "mangle-cali-failsafe-in";
pub const RAW_FAILSAFE_IN: &str = "raw-cali-failsafe-in";
pub const RAW_FAILSAFE_OUT: &str = "raw-cali-failsafe-out";

/// One chain of the host layer; `head` is a base chain's hook.
#[derive(Debug, Clone, PartialEq)]
pub struct HostChain {
    pub name: String,
    pub head: Option<String>,
    pub rules: Vec<String>,
}

/// A host endpoint chain: `<layer>-cali-<kind>-<iface>` (`fh`, `th`, `fhfw`, `thfw`).
pub fn host_endpoint_chain(layer: &str, kind: &str, iface: &str) -> String {
    chain_name(&format!("{layer}-cali-{kind}-"), iface)
}

/// Whether the host layer is rewritten for `delta`: it changed, or a policy or profile
/// it refers to did (an endpoint chain skips the ones that do not exist and checks the
/// pass mark after the ones that pass).
fn rewrites_host(dp: &PolicyDataplane, delta: &Delta, programmed: &Programmed) -> bool {
    if delta.host {
        return true;
    }
    if programmed.host.is_empty() && dp.host.endpoints.is_empty() {
        return false;
    }
    let eps = dp.host.endpoints.values();
    eps.clone()
        .flat_map(HostEndpoint::policies)
        .any(|id| delta.policies.contains(id))
        || eps
            .flat_map(|h| h.profiles.iter())
            .any(|p| delta.profiles.contains(p))
}

/// The failsafe rules for `ports`: `dport` (or `sport`) matches, the net on the side
/// `net_side` (`s` or `d`); an entry with a net of the other family is left out.
fn failsafe_rules(ports: &[Failsafe], port_side: char, net_side: char, v6: bool) -> Vec<String> {
    ports
        .iter()
        .filter(|f| f.net.is_none_or(|n| n.addr().is_ipv6() == v6))
        .map(|f| {
            let net = f
                .net
                .map(|n| format!("{} {net_side}addr {} ", family(v6), net_text(&n.trunc())))
                .unwrap_or_default();
            format!(
                "meta l4proto {} th {port_side}port {} {net}accept",
                f.protocol, f.port
            )
        })
        .collect()
}

/// The head of a tracked host endpoint chain: conntrack, IPv6 neighbour discovery (the
/// node must keep resolving its neighbours), the failsafe chain, the pass mark cleared.
fn host_head(failsafe: &str, v6: bool) -> Vec<String> {
    let mut v = vec![
        "ct state established,related accept".to_string(),
        "ct state invalid drop".to_string(),
    ];
    if v6 {
        v.push(format!("icmpv6 type {ND_TYPES} accept"));
    }
    v.push(format!("jump {failsafe}"));
    v.push(clear_pass());
    v
}

fn clear_pass() -> String {
    format!("meta mark set meta mark & 0x{:08x}", !MARK_PASS)
}

/// A stage's chain for one direction of a host endpoint: nothing when it has no tiers
/// (the stage lets the packet through), else `head` and the tiers; pre-DNAT, untracked
/// and forward stages end without a drop (their tiers do, where they deny).
fn stage_lines(
    dp: &PolicyDataplane,
    head: Vec<String>,
    tiers: &[TierPolicies],
    inbound: bool,
) -> Vec<String> {
    if tiers.is_empty() {
        return Vec::new();
    }
    let mut v = head;
    tier_lines(dp, tiers, inbound, &mut v);
    v
}

/// The normal chain of one direction of a host endpoint: its tiers, profiles, drop.
fn normal_lines(dp: &PolicyDataplane, h: &HostEndpoint, inbound: bool, v6: bool) -> Vec<String> {
    let failsafe = if inbound { FAILSAFE_IN } else { FAILSAFE_OUT };
    let mut v = host_head(failsafe, v6);
    let tiers = if inbound { &h.ingress } else { &h.egress };
    if !tier_lines(dp, tiers, inbound, &mut v) {
        profiles_and_drop(dp, &h.profiles, inbound, &mut v);
    }
    v
}

/// The dispatch rules to `chain(iface)` for the endpoints `eps` (by interface, the
/// all-interfaces one last as the default; `dir` is `iif` or `oif`); `before_default`
/// goes before the default.
fn host_dispatch(
    eps: &[(&String, &HostEndpoint)],
    dir: &str,
    chain: impl Fn(&str) -> String,
    before_default: &[String],
) -> Vec<String> {
    let mut v: Vec<String> = eps
        .iter()
        .filter(|(i, _)| i.as_str() != ALL_INTERFACES_KEY)
        .map(|(i, _)| format!("{dir}name \"{i}\" goto {}", chain(i)))
        .collect();
    if eps.iter().any(|(i, _)| i.as_str() == ALL_INTERFACES_KEY) {
        v.extend(before_default.iter().cloned());
        v.push(format!("goto {}", chain(ALL_INTERFACES_KEY)));
    }
    v
}

fn base(hook: &str, priority: &str) -> Option<String> {
    Some(format!(
        "type filter hook {hook} priority {priority}; policy accept;"
    ))
}

/// Every chain of the host layer in one family; none without a host endpoint.
pub fn host_chains(dp: &PolicyDataplane, prefix: &str, v6: bool) -> Vec<HostChain> {
    let host = &dp.host;
    // Loopback is never policed, even when a host endpoint names it.
    let eps: Vec<(&String, &HostEndpoint)> = host
        .endpoints
        .iter()
        .filter(|(i, _)| i.as_str() == ALL_INTERFACES_KEY || (valid_iface(i) && *i != "lo"))
        .collect();
    if eps.is_empty() {
        return Vec::new();
    }
    let mut out: Vec<HostChain> = Vec::new();
    let mut chain = |name: &str, head: Option<String>, rules: Vec<String>| {
        out.push(HostChain {
            name: name.to_string(),
            head,
            rules,
        })
    };
    let wl = ifname_wildcards(prefix);
    let accepted = format!("meta mark & 0x{MARK_ACCEPT:08x} == 0x{MARK_ACCEPT:08x}");
    let clear = format!(
        "meta mark set meta mark & 0x{:08x}",
        !(MARK_ACCEPT | MARK_PASS)
    );
    let vxlan = host.vxlan_port;

    // Failsafe ports.
    let (fin, fout) = (&host.failsafe_in, &host.failsafe_out);
    chain(FAILSAFE_IN, None, failsafe_rules(fin, 'd', 's', v6));
    chain(FAILSAFE_OUT, None, failsafe_rules(fout, 'd', 'd', v6));
    chain(MANGLE_FAILSAFE_IN, None, failsafe_rules(fin, 'd', 's', v6));
    // Before conntrack the replies of the other direction's failsafe connections too.
    let mut raw_in = failsafe_rules(fin, 'd', 's', v6);
    raw_in.extend(failsafe_rules(fout, 's', 's', v6));
    chain(RAW_FAILSAFE_IN, None, raw_in);
    let mut raw_out = failsafe_rules(fout, 'd', 'd', v6);
    raw_out.extend(failsafe_rules(fin, 's', 'd', v6));
    chain(RAW_FAILSAFE_OUT, None, raw_out);

    // Each endpoint's chains.
    for (iface, h) in &eps {
        for inbound in [true, false] {
            let kind = if inbound { "fh" } else { "th" };
            chain(
                &host_endpoint_chain("filter", kind, iface),
                None,
                normal_lines(dp, h, inbound, v6),
            );
            let tracked = vec![
                "ct state established,related accept".to_string(),
                "ct state invalid drop".to_string(),
                clear_pass(),
            ];
            let tiers = if inbound {
                &h.forward_ingress
            } else {
                &h.forward_egress
            };
            chain(
                &host_endpoint_chain("filter", &format!("{kind}fw"), iface),
                None,
                stage_lines(dp, tracked, tiers, inbound),
            );
        }
        if !h.pre_dnat.is_empty() {
            let head = vec![
                "ct state established,related accept".to_string(),
                "ct state invalid drop".to_string(),
                format!("jump {MANGLE_FAILSAFE_IN}"),
                clear_pass(),
            ];
            chain(
                &host_endpoint_chain("mangle", "fh", iface),
                None,
                stage_lines(dp, head, &h.pre_dnat, true),
            );
        }
        if untracked(iface, h) {
            for inbound in [true, false] {
                let (kind, failsafe, tiers) = if inbound {
                    ("fh", RAW_FAILSAFE_IN, &h.untracked_ingress)
                } else {
                    ("th", RAW_FAILSAFE_OUT, &h.untracked_egress)
                };
                let mut v = vec![format!("jump {failsafe}"), clear_pass()];
                tier_lines(dp, tiers, inbound, &mut v);
                chain(&host_endpoint_chain("raw", kind, iface), None, v);
            }
        }
    }

    // Dispatch.
    let to_wl: Vec<String> = wl.iter().map(|w| format!("oifname {w} return")).collect();
    let filter = |kind: &'static str| move |i: &str| host_endpoint_chain("filter", kind, i);
    chain(
        FROM_HOST_DISPATCH,
        None,
        host_dispatch(&eps, "iif", filter("fh"), &[]),
    );
    chain(
        TO_HOST_DISPATCH,
        None,
        host_dispatch(&eps, "oif", filter("th"), &to_wl),
    );
    chain(
        FROM_HOST_FWD_DISPATCH,
        None,
        host_dispatch(&eps, "iif", filter("fhfw"), &[]),
    );
    chain(
        TO_HOST_FWD_DISPATCH,
        None,
        host_dispatch(&eps, "oif", filter("thfw"), &[]),
    );
    let pre: Vec<_> = eps
        .iter()
        .copied()
        .filter(|(_, h)| !h.pre_dnat.is_empty())
        .collect();
    let mangle = |i: &str| host_endpoint_chain("mangle", "fh", i);
    chain(
        MANGLE_FROM_HOST_DISPATCH,
        None,
        host_dispatch(&pre, "iif", mangle, &[]),
    );
    let raw: Vec<_> = eps
        .iter()
        .copied()
        .filter(|(i, h)| untracked(i, h))
        .collect();
    let raw_chain = |kind: &'static str| move |i: &str| host_endpoint_chain("raw", kind, i);
    chain(
        RAW_FROM_HOST_DISPATCH,
        None,
        host_dispatch(&raw, "iif", raw_chain("fh"), &[]),
    );
    chain(
        RAW_TO_HOST_DISPATCH,
        None,
        host_dispatch(&raw, "oif", raw_chain("th"), &[]),
    );

    // Base chains.
    let each = |f: &dyn Fn(&String) -> String| wl.iter().map(f).collect::<Vec<_>>();
    let mut rules = vec![clear.clone()];
    rules.extend(each(&|w| format!("iifname {w} return")));
    rules.push("iifname \"lo\" return".to_string());
    rules.push(format!("jump {RAW_FROM_HOST_DISPATCH}"));
    chain(RAW_PREROUTING_HOST, base("prerouting", "raw + 1"), rules);
    let rules = vec![
        clear,
        "oifname \"lo\" return".to_string(),
        format!("jump {RAW_TO_HOST_DISPATCH}"),
    ];
    chain(RAW_OUTPUT_HOST, base("output", "raw"), rules);
    let rules = vec![
        "iifname \"lo\" return".to_string(),
        "ct state established,related accept".to_string(),
        format!("{accepted} accept"),
        format!("jump {MANGLE_FROM_HOST_DISPATCH}"),
    ];
    chain(MANGLE_PREROUTING_HOST, base("prerouting", "mangle"), rules);
    // Encapsulated traffic between nodes is not held up by a host endpoint (Calico
    // allows it from and to its own hosts).
    let tunnels = [
        "meta l4proto 4 return".to_string(),
        format!("udp dport {vxlan} return"),
    ];
    let mut rules = each(&|w| format!("iifname {w} return"));
    rules.push("iifname \"lo\" return".to_string());
    rules.push(format!("{accepted} return"));
    rules.extend(tunnels.iter().cloned());
    rules.push(format!("jump {FROM_HOST_DISPATCH}"));
    chain(INPUT_HOST, base("input", "filter + 2"), rules);
    let mut rules = vec![
        "oifname \"lo\" return".to_string(),
        format!("{accepted} return"),
    ];
    rules.extend(each(&|w| format!("oifname {w} return")));
    rules.extend(tunnels.iter().cloned());
    // DNAT'd host traffic: its interface is only known after routing again.
    rules.push("ct status dnat return".to_string());
    rules.push(format!("jump {TO_HOST_DISPATCH}"));
    chain(OUTPUT_HOST, base("output", "filter"), rules);
    let rules = vec![
        format!("{accepted} return"),
        format!("jump {FROM_HOST_FWD_DISPATCH}"),
    ];
    chain(FORWARD_FROM_HOST, base("forward", "filter - 1"), rules);
    let rules = vec![
        format!("meta mark set meta mark | 0x{MARK_ACCEPT:08x}"),
        format!("jump {TO_HOST_FWD_DISPATCH}"),
    ];
    chain(FORWARD_TO_HOST, base("forward", "filter + 2"), rules);
    let rules = vec![
        format!("{accepted} return"),
        "oifname \"lo\" return".to_string(),
        format!("ct status dnat jump {TO_HOST_DISPATCH}"),
    ];
    chain(
        MANGLE_POSTROUTING_HOST,
        base("postrouting", "mangle"),
        rules,
    );
    out
}

/// Whether a host endpoint has untracked policy (never the all-interfaces one: Calico
/// does not support it there).
fn untracked(iface: &str, h: &HostEndpoint) -> bool {
    iface != ALL_INTERFACES_KEY
        && !(h.untracked_ingress.is_empty() && h.untracked_egress.is_empty())
}
