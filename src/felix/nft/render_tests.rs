//! Rendering, table by table, against the semantics of REFERENCE §9: what each rule
//! field becomes in nft, in which family, and what a delta writes.

use std::collections::BTreeSet;

use ipnet::IpNet;

use super::render::*;
use crate::felix::calc::Nat;
use crate::felix::policy::Stage;
use crate::felix::policy::{
    Action, Chains, Delta, Endpoint, Icmp, IpSet, Match, PolicyDataplane, PortRange, Rule, TierEnd,
    TierPolicies,
};

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

fn rule(action: Action) -> Rule {
    Rule {
        action,
        ip_version: None,
        protocol: None,
        not_protocol: None,
        icmp: None,
        not_icmp: None,
        src: Match::default(),
        dst: Match::default(),
    }
}

const ALLOW: &str = "counter accept";

/// Each action's verdict: Allow accepts (ending its base chain only: the other
/// direction's policy still follows), Pass marks pass and returns, Deny drops, Log logs
/// with Calico's prefix and goes on.
#[test]
fn actions() {
    let cases = [
        (Action::Allow, ALLOW),
        (Action::Deny, "counter drop"),
        (
            Action::Pass,
            "counter meta mark set meta mark | 0x00020000 return",
        ),
        (Action::Log, "counter log prefix \"calico-packet: \""),
    ];
    for (a, want) in cases {
        assert_eq!(
            rule_lines(&rule(a), false, Stage::Normal),
            vec![want.to_string()]
        );
    }
}

/// Ports OR named ports: one rule per alternative; numeric ports as an anonymous set with
/// ranges; named ports as (address, protocol, port) set lookups.
#[test]
fn ports_and_named_ports_are_alternatives() {
    let mut r = rule(Action::Allow);
    r.protocol = Some(6);
    r.dst.ports = vec![
        PortRange { lo: 80, hi: 80 },
        PortRange { lo: 8000, hi: 8080 },
    ];
    r.dst.named_port_sets = vec!["n:web".into()];
    r.src.not_ports = vec![PortRange { lo: 22, hi: 22 }];
    assert_eq!(
        rule_lines(&r, false, Stage::Normal),
        vec![
            format!("meta l4proto 6 th sport != 22 th dport {{ 80, 8000-8080 }} {ALLOW}"),
            format!(
                "meta l4proto 6 th sport != 22 ip daddr . meta l4proto . th dport @cali40n-web {ALLOW}"
            ),
        ]
    );
}

/// Nets are split by family: a rule whose nets are all of the other family is not
/// rendered; selector sets are per family; negations render with `!=`.
#[test]
fn nets_and_sets_per_family() {
    let mut r = rule(Action::Deny);
    r.src.nets = vec![net("10.0.0.0/8"), net("10.1.0.0/16"), net("fd00::/8")];
    r.src.not_nets = vec![net("10.2.0.0/16")];
    r.dst.sets = vec!["s:x".into()];
    r.dst.not_sets = vec!["s:y".into()];
    assert_eq!(
        rule_lines(&r, false, Stage::Normal),
        vec![
            "ip saddr 10.0.0.0/8 ip saddr != 10.2.0.0/16 ip daddr @cali40s-x ip daddr != @cali40s-y counter drop"
                .to_string()
        ]
    );
    // notNets none of which is IPv6: the rule does not apply to IPv6 (Calico's
    // FilterRuleToIPVersion), or an Allow with `notNets: [10.0.0.0/8]` would open all
    // IPv6 traffic.
    assert!(rule_lines(&r, true, Stage::Normal).is_empty());
    r.src.not_nets.clear();
    assert_eq!(
        rule_lines(&r, true, Stage::Normal),
        vec![
            "ip6 saddr fd00::/8 ip6 daddr @cali60s-x ip6 daddr != @cali60s-y counter drop"
                .to_string()
        ]
    );
    r.src.nets = vec![net("fd00::/8")];
    assert!(rule_lines(&r, false, Stage::Normal).is_empty());
    // A negated catch-all matches nothing.
    let mut r = rule(Action::Allow);
    r.dst.not_nets = vec![net("0.0.0.0/0")];
    assert!(rule_lines(&r, false, Stage::Normal).is_empty());
    r.dst.not_nets = vec![net("10.0.0.0/8")];
    assert_eq!(rule_lines(&r, false, Stage::Normal).len(), 1);
    assert!(rule_lines(&r, true, Stage::Normal).is_empty());
}

/// The from-workload dispatch: conntrack and the pass mark first, then VXLAN and IPIP
/// packets dropped unless allowed, then the endpoint's chain; several interface
/// prefixes give one rule each.
#[test]
fn encapsulated_packets_from_workloads_and_interface_prefixes() {
    use crate::felix::policy::EncapDrops;
    assert_eq!(
        from_wl_dispatch_lines(EncapDrops::default()),
        vec![
            "ct state established,related accept".to_string(),
            "ct state invalid drop".to_string(),
            "meta mark set meta mark & 0xfffdffff".to_string(),
            "udp dport 4789 counter drop".to_string(),
            "meta l4proto 4 counter drop".to_string(),
            format!("iifname vmap @{FROM_WL_DISPATCH}"),
            "counter drop".to_string(),
        ]
    );
    let allowed = EncapDrops {
        vxlan_port: None,
        ipip: false,
    };
    assert_eq!(from_wl_dispatch_lines(allowed).len(), 5);
    assert_eq!(
        ifname_wildcards("cali, tap"),
        vec!["\"cali*\"".to_string(), "\"tap*\"".to_string()]
    );
    assert_eq!(ifname_wildcards(""), vec!["\"cali*\"".to_string()]);
    let script = full(
        &crate::felix::policy::PolicyDataplane::default(),
        &crate::felix::calc::Nat::default(),
        "cali,tap",
    );
    // From workloads in the first forward base chain, to workloads in the later one (an
    // egress Allow accepts, ending only the first), each prefix in both.
    let chain = |name: &str| {
        let start = script
            .find(&format!("chain {name} {{"))
            .unwrap_or_else(|| panic!("{name} in {script}"));
        let body = &script[start..];
        body[..body.find('}').unwrap()].to_string()
    };
    for w in ["cali", "tap"] {
        assert!(chain(CALI_FORWARD).contains(&format!("iifname \"{w}*\" jump {FROM_WL_DISPATCH}")));
        assert!(chain(FORWARD_TO_WL).contains(&format!("oifname \"{w}*\" jump {TO_WL_DISPATCH}")));
        assert!(chain(CALI_INPUT).contains(&format!("iifname \"{w}*\" goto {WL_TO_HOST}")));
        assert!(
            chain(INPUT_WL_TO_HOST).contains(&format!("iifname \"{w}*\" goto {WL_TO_HOST_ACTION}"))
        );
    }
    assert!(chain(FORWARD).contains("hook forward priority filter;"));
    assert!(chain(FORWARD_TO_WL).contains("hook forward priority filter + 1;"));
    assert!(chain(INPUT_WL_TO_HOST).contains("hook input priority filter + 1;"));
}

/// ipVersion and ICMP versions limit the family; notICMP with a code negates the pair.
#[test]
fn icmp_and_ip_version() {
    let mut r = rule(Action::Allow);
    r.ip_version = Some(6);
    assert!(rule_lines(&r, false, Stage::Normal).is_empty());
    assert_eq!(rule_lines(&r, true, Stage::Normal).len(), 1);
    let mut r = rule(Action::Allow);
    r.protocol = Some(1);
    r.icmp = Some(Icmp {
        v6: false,
        icmp_type: 8,
        code: Some(0),
    });
    assert_eq!(
        rule_lines(&r, false, Stage::Normal),
        vec![format!("meta l4proto 1 icmp type 8 icmp code 0 {ALLOW}")]
    );
    assert!(rule_lines(&r, true, Stage::Normal).is_empty());
    let mut r = rule(Action::Deny);
    r.not_icmp = Some(Icmp {
        v6: true,
        icmp_type: 128,
        code: Some(0),
    });
    r.not_protocol = Some(17);
    assert_eq!(
        rule_lines(&r, true, Stage::Normal),
        vec![
            "meta l4proto != 17 icmpv6 type . icmpv6 code != { 128 . 0 } counter drop".to_string()
        ]
    );
}

fn tier(policies: &[&str], end: TierEnd) -> TierPolicies {
    TierPolicies {
        tier: "t".into(),
        policies: policies.iter().map(|s| s.to_string()).collect(),
        end,
    }
}

/// The endpoint chain: per tier its policies, the end-of-tier drop unless the tier
/// passes, then the profiles that exist, then the final drop. Without a Pass rule no mark
/// is checked and nothing follows a tier's drop; after a policy that can pass, the later
/// policies of its tier and its drop check the pass mark, and the next tier clears it.
#[test]
fn endpoint_chain_order() {
    let mut dp = PolicyDataplane::default();
    dp.policies.insert("gnp/a".into(), Chains::default());
    let passing = Chains {
        inbound: vec![rule(Action::Pass)],
        outbound: vec![],
    };
    dp.policies.insert("gnp/pass".into(), passing);
    dp.profiles.insert("p".into(), Chains::default());
    let ep = Endpoint {
        name: "w".into(),
        ingress: vec![
            tier(&["gnp/a", "gnp/missing"], TierEnd::Pass),
            tier(&["gnp/a"], TierEnd::Deny),
        ],
        egress: vec![],
        profiles: vec!["p".into(), "missing".into()],
    };
    // No Pass rule: plain jumps, and the drop of the second tier ends the chain.
    assert_eq!(
        endpoint_lines(&dp, &ep, true),
        [
            "jump filter-cali-pi-gnp/a",
            "jump filter-cali-pi-gnp/a",
            "counter drop"
        ]
    );
    // A policy that passes: what follows it in its tier checks the mark, the next tier
    // clears it.
    let ep = Endpoint {
        ingress: vec![
            tier(&["gnp/a", "gnp/pass", "gnp/a"], TierEnd::Deny),
            tier(&["gnp/a"], TierEnd::Pass),
        ],
        ..ep
    };
    assert_eq!(
        endpoint_lines(&dp, &ep, true),
        [
            "jump filter-cali-pi-gnp/a",
            "jump filter-cali-pi-gnp/pass",
            "meta mark & 0x00020000 == 0 jump filter-cali-pi-gnp/a",
            "meta mark & 0x00020000 == 0 counter drop",
            "meta mark set meta mark & 0xfffdffff",
            "jump filter-cali-pi-gnp/a",
            "jump filter-cali-pri-p",
            "counter drop",
        ]
    );
    // Outbound: the passing policy has no egress Pass rule; no mark is checked.
    let ep = Endpoint {
        egress: vec![tier(&["gnp/pass", "gnp/a"], TierEnd::Pass)],
        ..ep
    };
    assert_eq!(
        endpoint_lines(&dp, &ep, false),
        [
            "jump filter-cali-po-gnp/pass",
            "jump filter-cali-po-gnp/a",
            "jump filter-cali-pro-p",
            "counter drop"
        ]
    );
}

/// Names: Calico's prefixes; a name too long or with characters nft cannot carry is
/// hashed behind `_`.
#[test]
fn chain_and_set_names() {
    assert_eq!(
        policy_chain("np/ns/name", true),
        "filter-cali-pi-np/ns/name"
    );
    assert_eq!(
        profile_chain("kns.default", false),
        "filter-cali-pro-kns.default"
    );
    assert_eq!(
        endpoint_chain("cali12345", true),
        "filter-cali-tw-cali12345"
    );
    assert_eq!(set_name("s:abc_-D", true), "cali60s-abc_-D");
    // Too long: Calico's GetLengthLimitedID (base64url SHA-256 of the suffix).
    let long = format!("gnp/{}", "x".repeat(300));
    assert_eq!(
        policy_chain(&long, true),
        "filter-cali-pi-_srRkbVAhl8ZbV5_s1j4GwKsjO-nalRlPX1Ewh7cNCPY"
    );
    assert_ne!(policy_chain("a b", true), policy_chain("a c", true));
    assert!(policy_chain("a b", true).starts_with("filter-cali-pi-_"));
}

/// Interval sets hold no member inside another (nft refuses overlaps).
#[test]
fn outermost_members_only() {
    let got = outermost(
        [
            "10.0.0.0/8",
            "10.1.2.3/32",
            "11.0.0.1/32",
            "10.0.0.0/8",
            "11.0.0.0/31",
        ]
        .iter()
        .map(|s| net(s)),
    );
    assert_eq!(got, vec![net("10.0.0.0/8"), net("11.0.0.0/31")]);
}

/// A member change inside an outer net writes nothing; the outer net going brings the
/// inner members in.
#[test]
fn member_changes_follow_the_outermost() {
    let now = IpSet::Nets(BTreeSet::from([net("10.0.0.0/8"), net("10.1.1.1/32")]));
    let added = IpSet::Nets(BTreeSet::from([net("10.1.1.1/32")]));
    assert_eq!(
        member_changes(&now, Some(&added), None, false),
        (vec![], vec![])
    );
    let now = IpSet::Nets(BTreeSet::from([net("10.1.1.1/32"), net("10.2.2.2/32")]));
    let removed = IpSet::Nets(BTreeSet::from([net("10.0.0.0/8")]));
    assert_eq!(
        member_changes(&now, None, Some(&removed), false),
        (
            vec![Element::Net(net("10.0.0.0/8"))],
            vec![
                Element::Net(net("10.1.1.1/32")),
                Element::Net(net("10.2.2.2/32"))
            ]
        )
    );
    // The other family: nothing.
    assert_eq!(
        member_changes(&now, None, Some(&removed), true),
        (vec![], vec![])
    );
}

fn small() -> PolicyDataplane {
    let mut dp = PolicyDataplane::default();
    dp.sets.insert(
        "s:a".into(),
        IpSet::Nets(BTreeSet::from([net("10.65.0.1/32")])),
    );
    dp.endpoints.insert("calia".into(), Endpoint::default());
    dp
}

/// A label change writes set elements, not chains; an endpoint removed leaves the
/// dispatch maps, then its chains go.
#[test]
fn incremental_writes_only_what_changed() {
    let old = small();
    let programmed = Programmed::of(&old, false, "cali");
    let mut new = old.clone();
    new.sets.insert(
        "s:a".into(),
        IpSet::Nets(BTreeSet::from([net("10.65.0.2/32")])),
    );
    let delta = Delta {
        added: [(
            "s:a".to_string(),
            IpSet::Nets(BTreeSet::from([net("10.65.0.2/32")])),
        )]
        .into(),
        removed: [(
            "s:a".to_string(),
            IpSet::Nets(BTreeSet::from([net("10.65.0.1/32")])),
        )]
        .into(),
        ..Default::default()
    };
    assert_eq!(
        incremental(&new, &delta, &programmed),
        "delete element ip calico cali40s-a { 10.65.0.1 }\nadd element ip calico cali40s-a { 10.65.0.2 }\n"
    );
    new.endpoints.clear();
    let delta = Delta {
        endpoints: BTreeSet::from(["calia".to_string()]),
        ..Default::default()
    };
    assert_eq!(
        incremental(&new, &delta, &programmed),
        "delete element ip calico filter-cali-from-wl-dispatch { \"calia\" }\n\
         delete element ip calico filter-cali-to-wl-dispatch { \"calia\" }\n\
         delete chain ip calico filter-cali-tw-calia\n\
         delete chain ip calico filter-cali-fw-calia\n"
    );
}

/// A policy that gains a Pass rule rewrites the chains of the endpoints that jump to it
/// (what follows it must check the pass mark), though the delta names only the policy;
/// one that loses it again does too, and a change that keeps it does not.
#[test]
fn a_policy_gaining_a_pass_rewrites_its_endpoints() {
    let mut old = small();
    old.policies.insert("gnp/a".into(), Chains::default());
    old.policies.insert("gnp/b".into(), Chains::default());
    let ep = Endpoint {
        name: "a".into(),
        ingress: vec![tier(&["gnp/a", "gnp/b"], TierEnd::Deny)],
        ..Default::default()
    };
    old.endpoints.insert("calia".into(), ep);
    let mut programmed = Programmed::of(&old, false, "cali");
    let mut new = old.clone();
    new.policies.get_mut("gnp/a").unwrap().inbound = vec![rule(Action::Pass)];
    let delta = Delta {
        policies: BTreeSet::from(["gnp/a".to_string()]),
        ..Default::default()
    };
    let s = incremental(&new, &delta, &programmed);
    assert!(
        s.contains(
            "add rule ip calico filter-cali-tw-calia meta mark & 0x00020000 == 0 jump filter-cali-pi-gnp/b"
        ),
        "{s}"
    );
    programmed.update(&new, &delta);
    assert!(programmed.passes.contains("gnp/a"));
    // A change that keeps the Pass: the policy's chains only.
    new.policies.get_mut("gnp/a").unwrap().outbound = vec![rule(Action::Deny)];
    let s = incremental(&new, &delta, &programmed);
    assert!(!s.contains("filter-cali-tw-calia"), "{s}");
    // The Pass gone: plain jumps again.
    new.policies.get_mut("gnp/a").unwrap().inbound.clear();
    let s = incremental(&new, &delta, &programmed);
    assert!(
        s.contains("add rule ip calico filter-cali-tw-calia jump filter-cali-pi-gnp/b"),
        "{s}"
    );
    programmed.update(&new, &delta);
    assert!(programmed.passes.is_empty());
}

/// An endpoint whose interface name nft cannot carry is left out (not the whole
/// transaction refused).
#[test]
fn an_endpoint_with_a_bad_interface_name_is_left_out() {
    let mut dp = small();
    dp.endpoints.insert("cali\"x".into(), Endpoint::default());
    dp.endpoints
        .insert("cali0123456789abcdef".into(), Endpoint::default());
    let s = full(&dp, &Nat::default(), "cali");
    assert!(
        !s.contains("cali\"x") && !s.contains("cali0123456789abcdef"),
        "{s}"
    );
    assert_eq!(Programmed::of(&dp, false, "cali").endpoints.len(), 1);
    let delta = Delta {
        endpoints: dp.endpoints.keys().cloned().collect(),
        ..Default::default()
    };
    let s = incremental(&dp, &delta, &Programmed::default());
    assert!(!s.contains("cali\"x") && s.contains("calia"), "{s}");
}

/// The full script replaces both tables; without IPv6 pools the IPv6 table is only
/// removed.
#[test]
fn full_replaces_our_tables_only() {
    let s = full(&small(), &Nat::default(), "cali");
    assert!(s.starts_with("table ip calico\ndelete table ip calico\ntable ip calico {\n"));
    assert!(
        s.ends_with("table ip6 calico\ndelete table ip6 calico\n"),
        "{s}"
    );
    assert!(s.contains("\"calia\" : goto filter-cali-fw-calia"), "{s}");
    let nat = Nat {
        all: BTreeSet::from([net("fd00::/48")]),
        ..Default::default()
    };
    let s = full(&small(), &nat, "cali");
    assert!(s.contains("table ip6 calico {\n"), "{s}");
    assert!(!s.contains("table inet"), "{s}");
}

/// The host layer: nothing without a host endpoint; with one, failsafe rules per family
/// (a net of the other family left out, replies before conntrack), loopback and
/// workloads skipped before the dispatch, the stage's Allow (mark, notrack), and a
/// policy's chain in its stage's layer.
#[test]
fn host_layer_chains() {
    use crate::felix::policy::{ALL_INTERFACES_KEY, Failsafe, HostEndpoint};
    let mut dp = PolicyDataplane::default();
    assert!(host_chains(&dp, "cali", false).is_empty());
    dp.host.failsafe_in = vec![
        Failsafe {
            protocol: 6,
            port: 22,
            net: None,
        },
        Failsafe {
            protocol: 6,
            port: 179,
            net: Some(net("fd00::/64")),
        },
    ];
    dp.host.failsafe_out = vec![Failsafe {
        protocol: 17,
        port: 53,
        net: Some(net("10.0.0.0/8")),
    }];
    dp.host.vxlan_port = 4789;
    dp.policies.insert(
        "untracked/gnp/u".into(),
        Chains {
            inbound: vec![rule(Action::Allow)],
            outbound: vec![],
        },
    );
    dp.policies.insert(
        "prednat/gnp/p".into(),
        Chains {
            inbound: vec![rule(Action::Allow)],
            outbound: vec![],
        },
    );
    dp.host.endpoints.insert(
        "eth0".into(),
        HostEndpoint {
            untracked_ingress: vec![tier(&["untracked/gnp/u"], TierEnd::Pass)],
            ..Default::default()
        },
    );
    dp.host.endpoints.insert(
        ALL_INTERFACES_KEY.into(),
        HostEndpoint {
            pre_dnat: vec![tier(&["prednat/gnp/p"], TierEnd::Pass)],
            ..Default::default()
        },
    );
    // A host endpoint for loopback is never programmed.
    dp.host
        .endpoints
        .insert("lo".into(), HostEndpoint::default());
    let chains = host_chains(&dp, "cali", false);
    let get = |n: &str| {
        chains
            .iter()
            .find(|c| c.name == n)
            .map(|c| c.rules.clone())
            .unwrap_or_default()
    };
    assert_eq!(get(FAILSAFE_IN), vec!["meta l4proto 6 th dport 22 accept"]);
    assert_eq!(
        get(FAILSAFE_OUT),
        vec!["meta l4proto 17 th dport 53 ip daddr 10.0.0.0/8 accept"]
    );
    assert_eq!(
        get(RAW_FAILSAFE_IN),
        vec![
            "meta l4proto 6 th dport 22 accept",
            "meta l4proto 17 th sport 53 ip saddr 10.0.0.0/8 accept"
        ]
    );
    let v6 = host_chains(&dp, "cali", true);
    let in6 = &v6.iter().find(|c| c.name == FAILSAFE_IN).unwrap().rules;
    assert!(in6.contains(&"meta l4proto 6 th dport 179 ip6 saddr fd00::/64 accept".to_string()));
    assert!(
        !chains.iter().any(|c| c.name.ends_with("-lo")),
        "{chains:?}"
    );
    assert_eq!(
        get(FROM_HOST_DISPATCH),
        vec![
            "iifname \"eth0\" goto filter-cali-fh-eth0",
            "goto filter-cali-fh-any-interface-at-all"
        ]
    );
    // The all-interfaces endpoint is pre-DNAT's default; untracked only for eth0.
    assert_eq!(
        get(MANGLE_FROM_HOST_DISPATCH),
        vec!["goto mangle-cali-fh-any-interface-at-all"]
    );
    assert_eq!(
        get(RAW_FROM_HOST_DISPATCH),
        vec!["iifname \"eth0\" goto raw-cali-fh-eth0"]
    );
    let to = get(TO_HOST_DISPATCH);
    assert_eq!(to[1], "oifname \"cali*\" return", "{to:?}");
    let input = get(INPUT_HOST);
    assert!(input.starts_with(&[
        "iifname \"cali*\" return".into(),
        "iifname \"lo\" return".into()
    ]));
    assert_eq!(
        get("raw-cali-fh-eth0"),
        vec![
            "jump raw-cali-failsafe-in",
            "meta mark set meta mark & 0xfffdffff",
            "jump raw-cali-pi-gnp/u"
        ]
    );
    assert_eq!(policy_chain("prednat/gnp/p", true), "mangle-cali-pi-gnp/p");
    let (_, raw) = &policy_chains(
        &dp,
        "untracked/gnp/u",
        &dp.policies["untracked/gnp/u"],
        false,
    )[0];
    assert_eq!(
        raw,
        &vec!["counter meta mark set meta mark | 0x00010000 notrack accept"]
    );
    let (_, mangle) = &policy_chains(&dp, "prednat/gnp/p", &dp.policies["prednat/gnp/p"], false)[0];
    assert_eq!(
        mangle,
        &vec!["counter meta mark set meta mark | 0x00010000 accept"]
    );
    // The normal chain of a host endpoint without policy or profile: failsafe, then drop.
    assert_eq!(
        get("filter-cali-fh-eth0"),
        vec![
            "ct state established,related accept",
            "ct state invalid drop",
            "jump filter-cali-failsafe-in",
            "meta mark set meta mark & 0xfffdffff",
            "counter drop"
        ]
    );
}

/// `logPrefix`: Calico's specifiers expanded per policy (tier, kind, name,
/// namespace/name), profiles as `pro`, the default when unset, nothing an nft string
/// cannot carry; a new prefix rewrites every chain with a Log rule and no other.
#[test]
fn log_prefix_specifiers_and_rewrite() {
    let mut dp = PolicyDataplane::default();
    assert_eq!(log_prefix(&dp, "gnp/a", false), "calico-packet");
    dp.log_prefix = "drop %t %k %p %n%x\"".into();
    dp.endpoints.insert(
        "calia".into(),
        Endpoint {
            ingress: vec![tier(&["np/ns1/web"], TierEnd::Deny)],
            ..Default::default()
        },
    );
    assert_eq!(
        log_prefix(&dp, "np/ns1/web", false),
        "drop t np ns1/web web%x_"
    );
    assert_eq!(log_prefix(&dp, "prednat/gnp/g", false), "drop  gnp g g%x_");
    assert_eq!(
        log_prefix(&dp, "kns.ns1", true),
        "drop  pro kns.ns1 kns.ns1%x_"
    );
    dp.log_prefix = "x".repeat(300);
    assert_eq!(log_prefix(&dp, "gnp/a", false).len(), 125);

    let logged = Chains {
        inbound: vec![rule(Action::Log), rule(Action::Allow)],
        outbound: vec![],
    };
    let plain = Chains {
        inbound: vec![rule(Action::Allow)],
        outbound: vec![],
    };
    let mut dp = PolicyDataplane::default();
    dp.policies.insert("np/ns1/web".into(), logged.clone());
    dp.policies.insert("gnp/quiet".into(), plain);
    dp.profiles.insert("kns.ns1".into(), logged);
    let programmed = Programmed::of(&dp, false, "cali");
    dp.log_prefix = "calico-%k".into();
    let delta = Delta {
        log_prefix: true,
        ..Default::default()
    };
    let s = incremental(&dp, &delta, &programmed);
    assert!(s.contains("log prefix \"calico-np: \""), "{s}");
    assert!(s.contains("log prefix \"calico-pro: \""), "{s}");
    assert!(!s.contains("gnp/quiet"), "{s}");
}
