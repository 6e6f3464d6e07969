//! The policy calculation against REFERENCE §9 "Evaluation", one table or case per
//! semantic: no root, no kernel.

use super::*;
use crate::felix::policy::{Action, TierEnd};
use crate::model::Resource;
use crate::model::workload::WorkloadEndpointSpec;

fn spec<T: serde::de::DeserializeOwned>(json: &str) -> T {
    serde_json::from_str(json).unwrap_or_else(|e| panic!("{json}: {e}"))
}

/// A workload endpoint `name` in `ns` on `node`, interface `cali-<name>`.
fn wep(
    node: &str,
    ns: &str,
    name: &str,
    ip: &str,
    labels: &[(&str, &str)],
    profiles: &[&str],
) -> EndpointInfo {
    let mut w: Resource<WorkloadEndpointSpec> = Resource::new(
        name,
        WorkloadEndpointSpec {
            node: node.into(),
            orchestrator: "k8s".into(),
            interface_name: format!("cali-{name}"),
            ip_networks: vec![ip.into()],
            profiles: profiles.iter().map(|p| p.to_string()).collect(),
            ..Default::default()
        },
    );
    w.metadata.namespace = Some(ns.into());
    w.metadata.labels = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    EndpointInfo::from_wep(&w)
}

struct World {
    calc: PolicyCalc,
}

impl World {
    fn new() -> World {
        let mut calc = PolicyCalc::new("node-a");
        for (name, order, action) in [
            ("kube-admin", 1000.0, "Pass"),
            ("default", 1e6, "Deny"),
            ("kube-baseline", 1e7, "Pass"),
        ] {
            calc.tiers.insert(
                name.into(),
                TierInfo::from_spec(&spec(&format!(
                    r#"{{"order":{order},"defaultAction":"{action}"}}"#
                ))),
            );
        }
        World { calc }
    }

    fn ep(&mut self, e: EndpointInfo) -> &mut Self {
        self.calc
            .endpoints
            .insert(format!("{}/{}", e.node, e.name), e);
        self
    }

    fn gnp(&mut self, name: &str, json: &str) -> &mut Self {
        let spec = spec(json);
        let p = resolve_gnp(name, &spec);
        self.calc.policies.insert(gnp_stage_id(name, &spec), p);
        self
    }

    fn np(&mut self, ns: &str, name: &str, json: &str) -> &mut Self {
        let p = resolve_np(ns, name, &spec(json));
        self.calc.policies.insert(np_id(ns, name), p);
        self
    }

    fn profile(&mut self, name: &str, json: &str) -> &mut Self {
        self.calc
            .profiles
            .insert(name.into(), resolve_profile(&spec(json)));
        self
    }

    fn tier(&mut self, name: &str, json: &str) -> &mut Self {
        self.calc
            .tiers
            .insert(name.into(), TierInfo::from_spec(&spec(json)));
        self
    }

    fn net_set(&mut self, key: &str, ns: Option<&str>, labels: &[(&str, &str)], nets: &[&str]) {
        let labels = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let nets: Vec<String> = nets.iter().map(|n| n.to_string()).collect();
        self.calc
            .net_sets
            .insert(key.into(), NetSetInfo::new(&labels, ns, &nets));
    }

    fn dp(&self) -> PolicyDataplane {
        self.calc.dataplane()
    }
}

/// The policy ids per tier of one direction.
fn tiers(ts: &[TierPolicies]) -> Vec<(String, Vec<String>, TierEnd)> {
    ts.iter()
        .map(|t| (t.tier.clone(), t.policies.clone(), t.end))
        .collect()
}

fn nets(dp: &PolicyDataplane, id: &str) -> Vec<String> {
    match &dp.sets[id] {
        IpSet::Nets(n) => n.iter().map(|n| n.to_string()).collect(),
        other => panic!("{id} is {other:?}"),
    }
}

#[test]
fn set_ids_are_calicos_sha224_of_the_canonical_selector() {
    // The expected ids are those of libcalico-go's parser tests.
    for (sel, id) in [
        ("", "s:5y5I3VdRZfDU01O--xXAPx2yxCQQqMf0M6IWug"),
        (" (all() )", "s:5y5I3VdRZfDU01O--xXAPx2yxCQQqMf0M6IWug"),
        (
            "! (has( b)||! has(a ))",
            "s:Iss0uCleLYv1GSv_pNm7hAO58kE9jAx1NKyG3Q",
        ),
        (
            r#"! (a == "b"&&! c != "d")"#,
            "s:lh3haoY1ikTRkd4UZu0nWSaIBknYLPJLX16d-w",
        ),
        // Single quotes in the source are the same selector.
        (
            "! (a == 'b'&&! c != 'd')",
            "s:lh3haoY1ikTRkd4UZu0nWSaIBknYLPJLX16d-w",
        ),
    ] {
        let s = Selector::parse(sel).unwrap();
        assert_eq!(selector_set_id(&s), id, "{sel} -> {}", s.canonical());
        assert_eq!(id.len(), 2 + 38);
    }
    // Chains are flat, groups on the right stay groups (Calico's AndNode/OrNode).
    for (sel, canonical) in [
        (
            "a == 'x' && b == 'y' && has(c)",
            r#"(a == "x" && b == "y" && has(c))"#,
        ),
        (
            "(projectcalico.org/namespace == 'ns1') && (role == 'db' && tier in {'b', 'a'})",
            r#"(projectcalico.org/namespace == "ns1" && (role == "db" && tier in {"a", "b"}))"#,
        ),
        (
            "a == 'x' || (b == 'y' || c == 'z')",
            r#"(a == "x" || (b == "y" || c == "z"))"#,
        ),
        (
            "a == 'x' && (b == 'y' || c == 'z')",
            r#"(a == "x" && (b == "y" || c == "z"))"#,
        ),
        // A parenthesized chain first stays a group too.
        (
            "(a == 'x' && b == 'y') && c == 'z'",
            r#"((a == "x" && b == "y") && c == "z")"#,
        ),
        (
            "((a == 'x' || b == 'y')) || c == 'z'",
            r#"((a == "x" || b == "y") || c == "z")"#,
        ),
        (
            "(a == 'x' || b == 'y') && c == 'z'",
            r#"((a == "x" || b == "y") && c == "z")"#,
        ),
        ("!(a == 'x' && b == 'y')", r#"!(a == "x" && b == "y")"#),
        ("((all()))", "all()"),
    ] {
        assert_eq!(Selector::parse(sel).unwrap().canonical(), canonical);
    }
    // A named-port set hashes the selector's id, the protocol and the name.
    let all = Selector::all();
    let n = named_port_set_id(&all, NamedPortProto::Tcp, "http");
    assert!(n.starts_with("n:") && n.len() == 40, "{n}");
    assert_ne!(n, named_port_set_id(&all, NamedPortProto::Udp, "http"));
}

#[test]
fn an_endpoint_without_policy_or_profile_has_nothing_that_allows() {
    let mut w = World::new();
    w.ep(wep("node-a", "ns1", "a", "10.0.0.1/32", &[], &["missing"]));
    let dp = w.dp();
    let e = &dp.endpoints["cali-a"];
    assert!(e.ingress.is_empty() && e.egress.is_empty());
    assert!(
        e.profiles.is_empty(),
        "a profile that does not exist is left out: {e:?}"
    );
    assert!(dp.policies.is_empty() && dp.profiles.is_empty() && dp.sets.is_empty());
}

#[test]
fn only_local_endpoints_get_chains() {
    let mut w = World::new();
    w.ep(wep("node-a", "ns1", "a", "10.0.0.1/32", &[], &[]));
    w.ep(wep("node-b", "ns1", "b", "10.0.0.2/32", &[], &[]));
    let dp = w.dp();
    assert_eq!(dp.endpoints.keys().collect::<Vec<_>>(), vec!["cali-a"]);
}

#[test]
fn types_choose_the_directions_and_empty_types_mean_both() {
    let mut w = World::new();
    w.ep(wep("node-a", "ns1", "a", "10.0.0.1/32", &[], &[]));
    w.gnp(
        "in",
        r#"{"types":["Ingress"],"ingress":[{"action":"Allow"}]}"#,
    );
    w.gnp(
        "out",
        r#"{"types":["Egress"],"egress":[{"action":"Allow"}]}"#,
    );
    // Stored without types (another writer): both directions, as Felix reads it.
    w.gnp("both", r#"{"ingress":[{"action":"Deny"}]}"#);
    let dp = w.dp();
    let e = &dp.endpoints["cali-a"];
    assert_eq!(e.ingress[0].policies, vec!["gnp/both", "gnp/in"]);
    assert_eq!(e.egress[0].policies, vec!["gnp/both", "gnp/out"]);
    assert!(dp.policies["gnp/in"].outbound.is_empty());
    assert_eq!(dp.policies["gnp/both"].inbound[0].action, Action::Deny);
    assert!(
        dp.policies["gnp/both"].outbound.is_empty(),
        "no egress rules"
    );
}

#[test]
fn tiers_sort_by_order_then_name_and_policies_by_order_then_name() {
    let mut w = World::new();
    w.ep(wep(
        "node-a",
        "ns1",
        "a",
        "10.0.0.1/32",
        &[("app", "x")],
        &[],
    ));
    w.tier("security", r#"{"order":100,"defaultAction":"Pass"}"#);
    w.tier("zz-no-order", r#"{}"#);
    let pol = |tier: &str, order: Option<f64>| {
        let o = order
            .map(|o| format!(r#""order":{o},"#))
            .unwrap_or_default();
        format!(r#"{{"tier":"{tier}",{o}"selector":"app == 'x'","types":["Ingress"]}}"#)
    };
    w.gnp("d-late", &pol("default", Some(500.0)));
    w.gnp("d-none", &pol("default", None));
    w.gnp("d-b", &pol("default", Some(100.0)));
    w.gnp("d-a", &pol("default", Some(100.0)));
    w.gnp("s-1", &pol("security", Some(1.0)));
    w.gnp("z-1", &pol("zz-no-order", Some(1.0)));
    w.gnp("admin", &pol("kube-admin", None));
    // A tier that does not exist sorts after every tier that does.
    w.gnp("ghost", &pol("aaa-missing", Some(1.0)));
    // Equal orders: `name/namespace/kind` as text ('-' sorts before '/').
    w.gnp("d-b-x", &pol("default", Some(100.0)));
    w.np("ns1", "d-a", &pol("default", Some(100.0)));
    let dp = w.dp();
    let got = tiers(&dp.endpoints["cali-a"].ingress);
    let ids = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert_eq!(
        got,
        vec![
            ("security".into(), ids(&["gnp/s-1"]), TierEnd::Pass),
            ("kube-admin".into(), ids(&["gnp/admin"]), TierEnd::Pass),
            (
                "default".into(),
                ids(&[
                    "gnp/d-a",
                    "np/ns1/d-a",
                    "gnp/d-b-x",
                    "gnp/d-b",
                    "gnp/d-late",
                    "gnp/d-none"
                ]),
                TierEnd::Deny
            ),
            // A tier without an order comes last; its default action is Deny.
            ("zz-no-order".into(), ids(&["gnp/z-1"]), TierEnd::Deny),
            // A tier that does not exist: after every tier that does.
            ("aaa-missing".into(), ids(&["gnp/ghost"]), TierEnd::Deny),
        ]
    );
    assert!(dp.endpoints["cali-a"].egress.is_empty());
}

#[test]
fn only_tiers_with_a_selecting_policy_apply() {
    let mut w = World::new();
    w.ep(wep(
        "node-a",
        "ns1",
        "a",
        "10.0.0.1/32",
        &[("app", "x")],
        &[],
    ));
    w.ep(wep(
        "node-a",
        "ns1",
        "b",
        "10.0.0.2/32",
        &[("app", "y")],
        &[],
    ));
    w.gnp("x", r#"{"selector":"app == 'x'","types":["Ingress"]}"#);
    let dp = w.dp();
    assert_eq!(dp.endpoints["cali-a"].ingress.len(), 1);
    assert!(dp.endpoints["cali-b"].ingress.is_empty());
    // A policy selecting no local endpoint is not programmed.
    w.gnp("none", r#"{"selector":"app == 'z'","ingress":[{"action":"Allow","source":{"selector":"app == 'q'"}}]}"#);
    let dp = w.dp();
    assert!(!dp.policies.contains_key("gnp/none"));
    assert_eq!(dp.sets.len(), 0);
}

#[test]
fn a_network_policy_selects_and_matches_in_its_namespace_only() {
    let mut w = World::new();
    w.ep(wep(
        "node-a",
        "ns1",
        "a",
        "10.0.0.1/32",
        &[("app", "x")],
        &[],
    ));
    w.ep(wep(
        "node-a",
        "ns2",
        "b",
        "10.0.0.2/32",
        &[("app", "x")],
        &[],
    ));
    w.ep(wep(
        "node-b",
        "ns1",
        "c",
        "10.0.1.1/32",
        &[("role", "db")],
        &[],
    ));
    w.ep(wep(
        "node-b",
        "ns2",
        "d",
        "10.0.1.2/32",
        &[("role", "db")],
        &[],
    ));
    w.np(
        "ns1",
        "p",
        r#"{"selector":"app == 'x'","types":["Ingress"],"ingress":[
            {"action":"Allow","source":{"selector":"role == 'db'"}},
            {"action":"Allow","source":{"namespaceSelector":"all()","selector":"role == 'db'"}},
            {"action":"Allow","source":{"nets":["10.9.0.0/16"]}}]}"#,
    );
    let dp = w.dp();
    assert_eq!(dp.endpoints["cali-a"].ingress.len(), 1);
    assert!(
        dp.endpoints["cali-b"].ingress.is_empty(),
        "ns2 is not selected"
    );
    let rules = &dp.policies["np/ns1/p"].inbound;
    assert_eq!(nets(&dp, &rules[0].src.sets[0]), vec!["10.0.1.1/32"]);
    assert_eq!(
        nets(&dp, &rules[1].src.sets[0]),
        vec!["10.0.1.1/32", "10.0.1.2/32"],
        "namespaceSelector all() is every namespace"
    );
    // Nets alone are not limited to the namespace (Calico adds no selector then).
    assert!(rules[2].src.sets.is_empty());
    assert_eq!(
        rules[2].src.nets,
        vec!["10.9.0.0/16".parse::<IpNet>().unwrap()]
    );
}

#[test]
fn namespace_selectors_match_profile_labels_and_own_labels_win() {
    let mut w = World::new();
    // kube-controllers' namespace profile: labels of the namespace, prefixed pcns.
    w.profile(
        "kns.ns1",
        r#"{"ingress":[{"action":"Allow"}],"egress":[{"action":"Allow"}],
            "labelsToApply":{"pcns.team":"red","pcns.projectcalico.org/name":"ns1","app":"from-profile"}}"#,
    );
    w.profile(
        "kns.ns2",
        r#"{"labelsToApply":{"pcns.team":"blue","pcns.projectcalico.org/name":"ns2"}}"#,
    );
    w.ep(wep(
        "node-a",
        "ns1",
        "a",
        "10.0.0.1/32",
        &[("app", "own")],
        &["kns.ns1"],
    ));
    w.ep(wep("node-a", "ns2", "b", "10.0.0.2/32", &[], &["kns.ns2"]));
    w.gnp(
        "red",
        r#"{"namespaceSelector":"team == 'red'","types":["Ingress"],
            "ingress":[{"action":"Allow","source":{"namespaceSelector":"team == 'blue'"}}]}"#,
    );
    w.gnp("own", r#"{"selector":"app == 'own'","types":["Egress"]}"#);
    w.gnp(
        "inherited",
        r#"{"selector":"app == 'from-profile'","types":["Egress"]}"#,
    );
    let dp = w.dp();
    let a = &dp.endpoints["cali-a"];
    assert_eq!(a.ingress[0].policies, vec!["gnp/red"]);
    assert_eq!(a.egress[0].policies, vec!["gnp/own"], "own labels win");
    assert_eq!(a.profiles, vec!["kns.ns1"]);
    assert!(dp.endpoints["cali-b"].ingress.is_empty());
    let r = &dp.policies["gnp/red"].inbound[0];
    assert_eq!(nets(&dp, &r.src.sets[0]), vec!["10.0.0.2/32"]);
    assert!(dp.profiles.contains_key("kns.ns1") && dp.profiles.contains_key("kns.ns2"));
}

#[test]
fn special_labels_namespace_orchestrator_and_service_account() {
    let mut e = wep(
        "node-a",
        "ns1",
        "a",
        "10.0.0.1/32",
        &[("pcns.x", "forged")],
        &[],
    );
    let mut w: Resource<WorkloadEndpointSpec> = Resource::new(
        "a",
        WorkloadEndpointSpec {
            service_account_name: "sa1".into(),
            orchestrator: "k8s".into(),
            ..Default::default()
        },
    );
    w.metadata.namespace = Some("ns1".into());
    let sa = EndpointInfo::from_wep(&w);
    assert_eq!(sa.labels[LABEL_SERVICE_ACCOUNT], "sa1");
    assert_eq!(sa.labels[LABEL_NAMESPACE], "ns1");
    assert_eq!(sa.labels[LABEL_ORCHESTRATOR], "k8s");
    assert!(
        !e.labels.contains_key("pcns.x"),
        "an endpoint cannot forge pcns. labels"
    );
    e.labels.clear();
}

#[test]
fn service_accounts_by_name_and_selector() {
    let mut w = World::new();
    let mut sa = |name: &str, ip: &str, account: &str, profiles: &[&str]| {
        let mut r: Resource<WorkloadEndpointSpec> = Resource::new(
            name,
            WorkloadEndpointSpec {
                node: "node-b".into(),
                interface_name: format!("cali-{name}"),
                ip_networks: vec![ip.into()],
                service_account_name: account.into(),
                profiles: profiles.iter().map(|p| p.to_string()).collect(),
                ..Default::default()
            },
        );
        r.metadata.namespace = Some("ns1".into());
        w.ep(EndpointInfo::from_wep(&r));
    };
    sa("s1", "10.0.1.1/32", "web", &["ksa.ns1.web"]);
    sa("s2", "10.0.1.2/32", "db", &["ksa.ns1.db"]);
    w.profile("ksa.ns1.web", r#"{"labelsToApply":{"pcsa.tier":"front"}}"#);
    w.profile("ksa.ns1.db", r#"{"labelsToApply":{"pcsa.tier":"back"}}"#);
    w.ep(wep("node-a", "ns1", "a", "10.0.0.1/32", &[], &[]));
    w.np(
        "ns1",
        "p",
        r#"{"types":["Ingress"],"ingress":[
            {"action":"Allow","source":{"serviceAccounts":{"names":["db"]}}},
            {"action":"Allow","source":{"serviceAccounts":{"selector":"tier == 'front'"}}}]}"#,
    );
    let dp = w.dp();
    let r = &dp.policies["np/ns1/p"].inbound;
    assert_eq!(nets(&dp, &r[0].src.sets[0]), vec!["10.0.1.2/32"]);
    assert_eq!(nets(&dp, &r[1].src.sets[0]), vec!["10.0.1.1/32"]);
}

#[test]
fn selector_sets_hold_endpoints_of_every_node_and_network_sets_nets() {
    let mut w = World::new();
    w.ep(wep(
        "node-a",
        "ns1",
        "a",
        "10.0.0.1/32",
        &[("role", "db")],
        &[],
    ));
    w.ep(wep(
        "node-b",
        "ns1",
        "b",
        "10.0.1.1/32",
        &[("role", "db")],
        &[],
    ));
    w.ep(wep(
        "node-b",
        "ns1",
        "c",
        "10.0.1.2/32",
        &[("role", "web")],
        &[],
    ));
    w.net_set(
        "/gns/ext",
        None,
        &[("role", "db")],
        &["192.168.0.0/24", "10.0.0.1"],
    );
    w.net_set(
        "/ns/ns1/ext",
        Some("ns1"),
        &[("role", "db")],
        &["172.16.0.0/12"],
    );
    w.gnp(
        "p",
        r#"{"ingress":[{"action":"Allow","source":{"selector":"role == 'db'"}}]}"#,
    );
    let dp = w.dp();
    let id = &dp.policies["gnp/p"].inbound[0].src.sets[0];
    assert_eq!(
        nets(&dp, id),
        vec![
            "10.0.0.1/32",
            "10.0.1.1/32",
            "172.16.0.0/12",
            "192.168.0.0/24"
        ]
    );
    assert_eq!(
        *id,
        selector_set_id(&Selector::parse("role == 'db'").unwrap())
    );
}

/// A namespaced NetworkSet inherits the `pcns.` labels of its namespace's profile
/// `kns.<ns>` (Calico's network-set processor gives it that parent), so a rule's
/// `namespaceSelector` plus selector reaches its nets; a global one has no namespace.
#[test]
fn a_namespace_selector_reaches_the_network_sets_of_the_namespace() {
    let mut w = World::new();
    w.ep(wep(
        "node-a",
        "ns1",
        "a",
        "10.0.0.1/32",
        &[("app", "x")],
        &[],
    ));
    w.profile("kns.ns1", r#"{"labelsToApply":{"pcns.team":"red"}}"#);
    w.profile("kns.ns2", r#"{"labelsToApply":{"pcns.team":"blue"}}"#);
    w.net_set(
        "/ns/ns1/ext",
        Some("ns1"),
        &[("k", "v")],
        &["172.16.0.0/12"],
    );
    w.net_set(
        "/ns/ns2/ext",
        Some("ns2"),
        &[("k", "v")],
        &["172.17.0.0/16"],
    );
    w.net_set("/gns/ext", None, &[("k", "v")], &["172.18.0.0/16"]);
    w.gnp(
        "p",
        r#"{"ingress":[{"action":"Allow","source":{"namespaceSelector":"team == 'red'","selector":"k == 'v'"}}]}"#,
    );
    let dp = w.dp();
    let id = &dp.policies["gnp/p"].inbound[0].src.sets[0];
    assert_eq!(nets(&dp, id), vec!["172.16.0.0/12"]);
}

#[test]
fn a_not_selector_folds_into_the_positive_selector_and_alone_is_a_negative_set() {
    let mut w = World::new();
    w.ep(wep(
        "node-a",
        "ns1",
        "a",
        "10.0.0.1/32",
        &[("role", "db"), ("x", "1")],
        &[],
    ));
    w.ep(wep(
        "node-a",
        "ns1",
        "b",
        "10.0.0.2/32",
        &[("role", "db")],
        &[],
    ));
    w.gnp(
        "p",
        r#"{"ingress":[
            {"action":"Allow","source":{"selector":"role == 'db'","notSelector":"has(x)"}},
            {"action":"Deny","source":{"notSelector":"has(x)"}}]}"#,
    );
    let dp = w.dp();
    let r = &dp.policies["gnp/p"].inbound;
    assert!(r[0].src.not_sets.is_empty());
    assert_eq!(nets(&dp, &r[0].src.sets[0]), vec!["10.0.0.2/32"]);
    assert!(r[1].src.sets.is_empty());
    assert_eq!(nets(&dp, &r[1].src.not_sets[0]), vec!["10.0.0.1/32"]);
}

#[test]
fn named_ports_resolve_to_address_protocol_port_sets() {
    let mut w = World::new();
    let mut r: Resource<WorkloadEndpointSpec> = Resource::new(
        "srv",
        spec(
            r#"{"node":"node-b","interfaceName":"cali-srv","ipNetworks":["10.0.1.5/32"],
                "ports":[{"name":"http","protocol":"TCP","port":8080},
                         {"name":"dns","protocol":"UDP","port":53}]}"#,
        ),
    );
    r.metadata.namespace = Some("ns1".into());
    r.metadata.labels.insert("app".into(), "srv".into());
    w.ep(EndpointInfo::from_wep(&r));
    w.ep(wep("node-a", "ns1", "a", "10.0.0.1/32", &[], &[]));
    w.gnp(
        "p",
        r#"{"egress":[
            {"action":"Allow","protocol":"TCP","destination":{"selector":"app == 'srv'","ports":["http"]}},
            {"action":"Allow","protocol":"TCP","destination":{"ports":["dns", 80, "1000:2000"]}}]}"#,
    );
    let dp = w.dp();
    let r = &dp.policies["gnp/p"].outbound;
    // A named port with a selector: the selector's set is folded into the port set.
    assert!(r[0].dst.sets.is_empty() && r[0].dst.ports.is_empty());
    let IpSet::Ports(p) = &dp.sets[&r[0].dst.named_port_sets[0]] else {
        panic!()
    };
    let srv: IpAddr = "10.0.1.5".parse().unwrap();
    assert_eq!(p.iter().copied().collect::<Vec<_>>(), vec![(srv, 6, 8080)]);
    // dns is UDP: a TCP rule's named-port set holds nothing; numbers stay numbers.
    let IpSet::Ports(p) = &dp.sets[&r[1].dst.named_port_sets[0]] else {
        panic!()
    };
    assert!(p.is_empty());
    assert_eq!(
        r[1].dst.ports,
        vec![
            PortRange { lo: 80, hi: 80 },
            PortRange { lo: 1000, hi: 2000 }
        ]
    );
}

#[test]
fn protocols_by_name_become_numbers_and_icmp_is_resolved() {
    let mut w = World::new();
    w.ep(wep("node-a", "ns1", "a", "10.0.0.1/32", &[], &[]));
    w.gnp(
        "p",
        r#"{"ingress":[
            {"action":"Allow","protocol":"UDP"},
            {"action":"Allow","protocol":"SCTP","notProtocol":"TCP"},
            {"action":"Allow","protocol":"ICMP","icmp":{"type":8,"code":0}},
            {"action":"Deny","protocol":"ICMPv6","ipVersion":6,"notICMP":{"type":128}},
            {"action":"Log","protocol":132},
            {"action":"Pass","protocol":"UDPLite"}]}"#,
    );
    let dp = w.dp();
    let r = &dp.policies["gnp/p"].inbound;
    let protos: Vec<Option<u8>> = r.iter().map(|r| r.protocol).collect();
    assert_eq!(
        protos,
        vec![Some(17), Some(132), Some(1), Some(58), Some(132), Some(136)]
    );
    assert_eq!(r[1].not_protocol, Some(6));
    assert_eq!(
        r[2].icmp,
        Some(Icmp {
            v6: false,
            icmp_type: 8,
            code: Some(0)
        })
    );
    assert_eq!(
        r[3].not_icmp,
        Some(Icmp {
            v6: true,
            icmp_type: 128,
            code: None
        })
    );
    assert_eq!(r[3].ip_version, Some(6));
    let actions: Vec<Action> = r.iter().map(|r| r.action).collect();
    assert_eq!(
        actions,
        vec![
            Action::Allow,
            Action::Allow,
            Action::Allow,
            Action::Deny,
            Action::Log,
            Action::Pass
        ]
    );
}

#[test]
fn profiles_follow_the_endpoint_in_order_and_host_only_policies_never_apply() {
    let mut w = World::new();
    w.profile(
        "p1",
        r#"{"ingress":[{"action":"Allow","source":{"selector":"has(p1)"}}]}"#,
    );
    w.profile("p2", r#"{"egress":[{"action":"Allow"}]}"#);
    w.ep(wep(
        "node-a",
        "ns1",
        "a",
        "10.0.0.1/32",
        &[],
        &["p2", "gone", "p1"],
    ));
    let dp = w.dp();
    assert_eq!(dp.endpoints["cali-a"].profiles, vec!["p2", "p1"]);
    assert_eq!(dp.profiles["p1"].inbound.len(), 1);
    assert_eq!(dp.sets.len(), 1, "the profile's selector set");
    // Pre-DNAT and untracked policies are for host endpoints only.
    w.gnp(
        "pre",
        r#"{"preDNAT":true,"applyOnForward":true,"ingress":[{"action":"Deny"}]}"#,
    );
    w.gnp(
        "untracked",
        r#"{"doNotTrack":true,"applyOnForward":true,"ingress":[{"action":"Deny"}]}"#,
    );
    let dp = w.dp();
    assert!(dp.endpoints["cali-a"].ingress.is_empty());
    assert!(dp.policies.is_empty());
}

#[test]
fn a_global_policys_namespace_selector_global_matches_non_namespaced_sets() {
    let mut w = World::new();
    w.ep(wep("node-a", "ns1", "a", "10.0.0.1/32", &[("k", "v")], &[]));
    w.net_set("/gns/g", None, &[("k", "v")], &["192.168.1.0/24"]);
    w.net_set("/ns/ns1/n", Some("ns1"), &[("k", "v")], &["192.168.2.0/24"]);
    w.gnp(
        "p",
        r#"{"ingress":[{"action":"Allow","source":{"namespaceSelector":"global()","selector":"k == 'v'"}}]}"#,
    );
    let dp = w.dp();
    let id = &dp.policies["gnp/p"].inbound[0].src.sets[0];
    assert_eq!(nets(&dp, id), vec!["192.168.1.0/24"]);
}

#[test]
fn endpoint_to_host_follows_the_configuration() {
    let mut w = World::new();
    assert_eq!(w.dp().endpoint_to_host, EndpointToHost::Drop);
    w.calc.endpoint_to_host = EndpointToHost::Return;
    assert_eq!(w.dp().endpoint_to_host, EndpointToHost::Return);
}

#[test]
fn diff_of_a_label_change_names_set_members_and_the_endpoints_whose_tiers_changed() {
    let mut w = World::new();
    w.ep(wep(
        "node-a",
        "ns1",
        "a",
        "10.0.0.1/32",
        &[("role", "web")],
        &[],
    ));
    w.ep(wep(
        "node-a",
        "ns1",
        "b",
        "10.0.0.2/32",
        &[("role", "web")],
        &[],
    ));
    w.gnp(
        "p",
        r#"{"selector":"role == 'db'","types":["Ingress"],"ingress":[{"action":"Allow","source":{"selector":"role == 'web'"}}]}"#,
    );
    w.gnp(
        "q",
        r#"{"selector":"role == 'web'","types":["Ingress"],"ingress":[{"action":"Allow","source":{"selector":"role == 'web'"}}]}"#,
    );
    let old = w.dp();
    assert_eq!(diff(&old, &old), Delta::default());
    // b becomes a db: it leaves the web set, q no longer selects it, p does.
    w.ep(wep(
        "node-a",
        "ns1",
        "b",
        "10.0.0.2/32",
        &[("role", "db")],
        &[],
    ));
    let new = w.dp();
    let d = diff(&old, &new);
    assert!(!d.full);
    assert_eq!(d.endpoints, ["cali-b".to_string()].into());
    assert_eq!(d.policies, ["gnp/p".to_string()].into(), "p is new");
    assert!(d.sets.is_empty(), "the web set stays: {d:?}");
    let web = selector_set_id(&Selector::parse("role == 'web'").unwrap());
    assert_eq!(
        d.removed[&web],
        IpSet::Nets(["10.0.0.2/32".parse().unwrap()].into())
    );
    assert!(d.added.is_empty());
    assert!(!d.endpoint_to_host);
}

#[test]
fn a_services_match_matches_nothing_in_etcd_mode() {
    let mut w = World::new();
    w.ep(wep("node-a", "ns1", "a", "10.0.0.1/32", &[], &[]));
    w.gnp(
        "p",
        r#"{"egress":[{"action":"Allow","destination":{"services":{"name":"kubernetes","namespace":"default"}}}]}"#,
    );
    let dp = w.dp();
    let r = &dp.policies["gnp/p"].outbound[0];
    assert_eq!(r.dst.sets.len(), 1);
    assert!(nets(&dp, &r.dst.sets[0]).is_empty());
}
