//! Pure rendering of the policy dataplane (and NAT) into nft scripts: [`full`] replaces our
//! tables in one transaction, [`incremental`] writes what a [`Delta`] says changed in one
//! transaction (set elements, the changed chains, dispatch map elements), given what is
//! [`Programmed`]. Names follow Calico's nftables mode (REFERENCE §9): chains carry the
//! layer prefix `filter-`, sets are `cali40<id>` / `cali60<id>` with `:` made `-`.
//!
//! Marks (REFERENCE §9, mask 0xffff0000): a policy's Allow sets the accept mark 0x10000
//! and returns, Pass sets the pass mark 0x20000 and returns; the endpoint chain returns on
//! the accept mark, skips a tier's later policies on the pass mark and drops at the end of
//! a tier unless it passed. `filter-FORWARD` accepts on the accept mark.

use std::collections::BTreeSet;
use std::fmt::Write as _;

use ipnet::IpNet;

use crate::felix::calc::Nat;
use crate::felix::nat;
use crate::felix::policy::{
    Action, Delta, Endpoint, EndpointToHost, IpSet, Match, PolicyDataplane, PortRange, Rule,
    TierEnd,
};

/// The accept mark: set by an Allow, read by the endpoint chain and `filter-FORWARD`.
pub const MARK_ACCEPT: u32 = 0x10000;
/// The pass mark: set by a Pass, ends the tier's evaluation.
pub const MARK_PASS: u32 = 0x20000;
/// The prefix of `log` rules (Calico's default `logPrefix`).
pub const LOG_PREFIX: &str = "calico-packet";
/// Longest chain name nft takes (the kernel's NFT_CHAIN_MAXNAMELEN less the NUL).
const MAX_NAME: usize = 255;

pub const FORWARD: &str = "filter-FORWARD";
pub const INPUT: &str = "filter-INPUT";
pub const CALI_FORWARD: &str = "filter-cali-FORWARD";
pub const CALI_INPUT: &str = "filter-cali-INPUT";
pub const FROM_WL_DISPATCH: &str = "filter-cali-from-wl-dispatch";
pub const TO_WL_DISPATCH: &str = "filter-cali-to-wl-dispatch";
pub const WL_TO_HOST: &str = "filter-cali-wl-to-host";

/// What of the policy dataplane is in the kernel (written by the last successful apply):
/// what an incremental apply adds to, rewrites or deletes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Programmed {
    pub endpoints: BTreeSet<String>,
    pub policies: BTreeSet<String>,
    pub profiles: BTreeSet<String>,
    pub sets: BTreeSet<String>,
}

impl Programmed {
    /// What a full apply of `dp` programs.
    pub fn of(dp: &PolicyDataplane) -> Programmed {
        Programmed {
            endpoints: dp.endpoints.keys().cloned().collect(),
            policies: dp.policies.keys().cloned().collect(),
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
            delta.endpoints.iter().cloned(),
            &dp.endpoints,
        );
        follow(
            &mut self.policies,
            delta.policies.iter().cloned(),
            &dp.policies,
        );
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
    }
}

/// `prefix` + `suffix`, or, when that is too long for nft or `suffix` has characters an
/// nft name cannot carry, `prefix` + `_` + a hash of `suffix` (Calico's
/// GetLengthLimitedID, with SHA-1 hex where Calico uses SHA-256 base64).
pub fn chain_name(prefix: &str, suffix: &str) -> String {
    let plain = suffix
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '/'))
        && !suffix.is_empty()
        && !suffix.starts_with('_');
    if plain && prefix.len() + suffix.len() <= MAX_NAME {
        return format!("{prefix}{suffix}");
    }
    use sha1::Digest;
    let hash = sha1::Sha1::digest(suffix.as_bytes());
    let hex: String = hash.iter().map(|b| format!("{b:02x}")).collect();
    format!("{prefix}_{hex}")
}

/// `cali-pi-<id>` (inbound) or `cali-po-<id>` (outbound) of a policy.
pub fn policy_chain(id: &str, inbound: bool) -> String {
    let p = if inbound { "pi" } else { "po" };
    chain_name(&format!("filter-cali-{p}-"), id)
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
    format!("cali{n}{}", id.replace(':', "-"))
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
    format!("{{ {} }}", v.join(", "))
}

fn braces(v: &[String]) -> String {
    format!("{{ {} }}", v.join(", "))
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
        let _ = write!(s, "{fam} {side}addr {} ", braces(&nets));
    }
    let not_nets = of_family(&m.not_nets);
    if !not_nets.is_empty() {
        let _ = write!(s, "{fam} {side}addr != {} ", braces(&not_nets));
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

fn action_text(a: Action) -> String {
    match a {
        Action::Allow => format!("counter meta mark set meta mark | 0x{MARK_ACCEPT:08x} return"),
        Action::Deny => "counter drop".to_string(),
        Action::Pass => format!("counter meta mark set meta mark | 0x{MARK_PASS:08x} return"),
        Action::Log => format!("counter log prefix \"{LOG_PREFIX}: \""),
    }
}

/// One rule in one family: nft rules (more than one when ports OR named ports; none when
/// the rule does not apply to this family).
pub fn rule_lines(r: &Rule, v6: bool) -> Vec<String> {
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
    let action = action_text(r.action);
    let mut out = Vec::new();
    for sp in port_alternatives(&r.src, 's', v6) {
        for dp in port_alternatives(&r.dst, 'd', v6) {
            out.push(format!("{m}{sp}{dp}{action}"));
        }
    }
    out
}

/// The rules of a policy or profile chain.
pub fn rules_lines(rules: &[Rule], v6: bool) -> Vec<String> {
    rules.iter().flat_map(|r| rule_lines(r, v6)).collect()
}

/// The rules of an endpoint's chain (`to`: `cali-tw-`, else `cali-fw-`).
pub fn endpoint_lines(dp: &PolicyDataplane, ep: &Endpoint, to: bool) -> Vec<String> {
    let mut v = vec![
        "ct state established,related accept".to_string(),
        "ct state invalid counter drop".to_string(),
        format!(
            "meta mark set meta mark & 0x{:08x}",
            !(MARK_ACCEPT | MARK_PASS)
        ),
    ];
    let tiers = if to { &ep.ingress } else { &ep.egress };
    for t in tiers {
        v.push(format!("meta mark set meta mark & 0x{:08x}", !MARK_PASS));
        for id in &t.policies {
            if !dp.policies.contains_key(id) {
                continue;
            }
            v.push(format!(
                "meta mark & 0x{MARK_PASS:08x} == 0 jump {}",
                policy_chain(id, to)
            ));
            v.push(format!(
                "meta mark & 0x{MARK_ACCEPT:08x} == 0x{MARK_ACCEPT:08x} return"
            ));
        }
        if t.end == TierEnd::Deny {
            v.push(format!("meta mark & 0x{MARK_PASS:08x} == 0 counter drop"));
        }
    }
    for p in &ep.profiles {
        if !dp.profiles.contains_key(p) {
            continue;
        }
        v.push(format!("jump {}", profile_chain(p, to)));
        v.push(format!(
            "meta mark & 0x{MARK_ACCEPT:08x} == 0x{MARK_ACCEPT:08x} return"
        ));
    }
    v.push("counter drop".to_string());
    v
}

/// `cali-wl-to-host`: the endpoint's egress policy, then `defaultEndpointToHostAction`
/// (IPv6 neighbour discovery and MLD first, as Calico's ICMPv6 filter).
pub fn wl_to_host_lines(action: EndpointToHost, v6: bool) -> Vec<String> {
    let mut v = Vec::new();
    if v6 {
        v.push("icmpv6 type { 130, 131, 132, 133, 135, 136 } accept".to_string());
    }
    v.push(format!("jump {FROM_WL_DISPATCH}"));
    v.push(
        match action {
            EndpointToHost::Drop => "counter drop",
            EndpointToHost::Return => "return",
            EndpointToHost::Accept => "accept",
        }
        .to_string(),
    );
    v
}

fn dispatch_elements(dp: &PolicyDataplane, to: bool) -> Vec<String> {
    dp.endpoints
        .keys()
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

/// The fixed chains of the filter layer.
fn static_chains(out: &mut String, dp: &PolicyDataplane, prefix: &str, v6: bool) {
    let any = format!("\"{prefix}*\"");
    chain_block(
        out,
        FROM_WL_DISPATCH,
        None,
        &[
            format!("iifname vmap @{FROM_WL_DISPATCH}"),
            "counter drop".to_string(),
        ],
    );
    chain_block(
        out,
        TO_WL_DISPATCH,
        None,
        &[
            format!("oifname vmap @{TO_WL_DISPATCH}"),
            "counter drop".to_string(),
        ],
    );
    chain_block(
        out,
        WL_TO_HOST,
        None,
        &wl_to_host_lines(dp.endpoint_to_host, v6),
    );
    chain_block(
        out,
        CALI_FORWARD,
        None,
        &[
            format!(
                "meta mark set meta mark & 0x{:08x}",
                !(MARK_ACCEPT | MARK_PASS)
            ),
            format!("iifname {any} jump {FROM_WL_DISPATCH}"),
            format!("oifname {any} jump {TO_WL_DISPATCH}"),
        ],
    );
    chain_block(
        out,
        CALI_INPUT,
        None,
        &[format!("iifname {any} goto {WL_TO_HOST}")],
    );
    chain_block(
        out,
        FORWARD,
        Some("type filter hook forward priority filter; policy accept;"),
        &[
            format!("jump {CALI_FORWARD}"),
            format!("meta mark & 0x{MARK_ACCEPT:08x} == 0x{MARK_ACCEPT:08x} accept"),
        ],
    );
    chain_block(
        out,
        INPUT,
        Some("type filter hook input priority filter; policy accept;"),
        &[format!("jump {CALI_INPUT}")],
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
    for (id, c) in &dp.policies {
        chain_block(
            &mut out,
            &policy_chain(id, true),
            None,
            &rules_lines(&c.inbound, v6),
        );
        chain_block(
            &mut out,
            &policy_chain(id, false),
            None,
            &rules_lines(&c.outbound, v6),
        );
    }
    for (name, c) in &dp.profiles {
        chain_block(
            &mut out,
            &profile_chain(name, true),
            None,
            &rules_lines(&c.inbound, v6),
        );
        chain_block(
            &mut out,
            &profile_chain(name, false),
            None,
            &rules_lines(&c.outbound, v6),
        );
    }
    for (iface, ep) in &dp.endpoints {
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
    out
}

/// The script that replaces our tables (both families) with `dp` and `nat`, in one
/// transaction: each table is declared, deleted (so the delete cannot fail) and defined.
/// `prefix` is the workload interface prefix (`cali`).
pub fn full(dp: &PolicyDataplane, nat: &Nat, prefix: &str) -> String {
    let mut s = String::new();
    for v6 in [false, true] {
        let fam = family(v6);
        let _ = writeln!(s, "table {fam} calico\ndelete table {fam} calico");
        let _ = writeln!(
            s,
            "table {fam} calico {{\n{}}}",
            table_body(dp, nat, prefix, v6)
        );
    }
    s
}

/// The script that brings our tables from `programmed` to `dp`, writing only what `delta`
/// names, in one transaction; empty when there is nothing to write. NAT is not touched.
pub fn incremental(dp: &PolicyDataplane, delta: &Delta, programmed: &Programmed) -> String {
    let mut s = String::new();
    for v6 in [false, true] {
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
    for id in &delta.policies {
        if let Some(c) = dp.policies.get(id) {
            let have = programmed.policies.contains(id);
            chains.push((policy_chain(id, true), have, rules_lines(&c.inbound, v6)));
            chains.push((policy_chain(id, false), have, rules_lines(&c.outbound, v6)));
        }
    }
    for name in &delta.profiles {
        if let Some(c) = dp.profiles.get(name) {
            let have = programmed.profiles.contains(name);
            chains.push((profile_chain(name, true), have, rules_lines(&c.inbound, v6)));
            chains.push((
                profile_chain(name, false),
                have,
                rules_lines(&c.outbound, v6),
            ));
        }
    }
    let mut new_endpoints = Vec::new();
    for iface in &delta.endpoints {
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
    if delta.endpoint_to_host {
        chains.push((
            WL_TO_HOST.to_string(),
            true,
            wl_to_host_lines(dp.endpoint_to_host, v6),
        ));
    }
    for (name, have, _) in &chains {
        if !have {
            let _ = writeln!(s, "add chain {t} {name}");
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
