//! The incremental engine against the calculation from scratch: after any sequence of
//! changes, the dataplane is the one [`PolicyCalc::dataplane`] computes, and the delta of
//! each take is exactly [`diff`] of the two dataplanes.

use proptest::prelude::*;

use super::*;
use crate::felix::policy::calc::{
    TierInfo, diff, gnp_id, gnp_stage_id, np_id, resolve_gnp, resolve_np, resolve_profile,
};
use crate::felix::policy::{Failsafe, PRE_DNAT_PREFIX, UNTRACKED_PREFIX};
use crate::model::Resource;
use crate::model::hostendpoint::HostEndpointSpec;
use crate::model::workload::WorkloadEndpointSpec;

const POLICIES: &[(&str, Option<&str>, &str)] = &[
    (
        "a",
        None,
        r#"{"selector":"role == 'a'","types":["Ingress"],"ingress":[
            {"action":"Allow","protocol":"TCP","source":{"selector":"role == 'b'"},"destination":{"ports":["http"]}},
            {"action":"Deny","source":{"selector":"role == 'c'"}}]}"#,
    ),
    (
        "b",
        None,
        r#"{"selector":"has(role)","types":["Egress"],"order":10,"egress":[
            {"action":"Allow","destination":{"selector":"role in {'b', 'c'}","notSelector":"x == '1'"}},
            {"action":"Pass","destination":{"notSelector":"role == 'a'"}}]}"#,
    ),
    (
        "c",
        Some("ns1"),
        r#"{"tier":"t1","selector":"role == 'b'","ingress":[
            {"action":"Allow","source":{"selector":"role == 'a'"}},
            {"action":"Allow","source":{"namespaceSelector":"team == 'red'"}}]}"#,
    ),
    (
        "d",
        None,
        r#"{"namespaceSelector":"team == 'red'","types":["Ingress","Egress"],"ingress":[
            {"action":"Allow","source":{"nets":["10.9.0.0/16"],"selector":"has(net)"}}],
            "egress":[{"action":"Log"},{"action":"Allow","destination":{"selector":"has(role)"}}]}"#,
    ),
    // For host endpoints: pre-DNAT, untracked, applyOnForward.
    (
        "e",
        None,
        r#"{"selector":"has(role)","preDNAT":true,"applyOnForward":true,"types":["Ingress"],"ingress":[
            {"action":"Deny","source":{"selector":"role == 'b'"}},{"action":"Pass"}]}"#,
    ),
    (
        "f",
        None,
        r#"{"selector":"role == 'a'","doNotTrack":true,"applyOnForward":true,"ingress":[
            {"action":"Allow","destination":{"ports":["http"]}}],"egress":[{"action":"Allow"}]}"#,
    ),
    (
        "g",
        None,
        r#"{"selector":"role != 'c'","applyOnForward":true,"ingress":[
            {"action":"Allow","source":{"selector":"has(x)"}}]}"#,
    ),
];

/// Other versions of the policies above (other selectors and sets, the same ids).
const ALTERNATIVES: &[&str] = &[
    r#"{"selector":"role in {'a', 'c'}","types":["Ingress"],"ingress":[
        {"action":"Allow","source":{"selector":"has(net)"}},
        {"action":"Deny","source":{"selector":"role == 'c'"}}]}"#,
    r#"{"selector":"role == 'c'","types":["Egress"],"egress":[
        {"action":"Allow","destination":{"selector":"role in {'b', 'c'}","notSelector":"x == '1'"}}]}"#,
    r#"{"tier":"t1","selector":"all()","ingress":[
        {"action":"Allow","source":{"selector":"role == 'b'"}}]}"#,
    r#"{"namespaceSelector":"team == 'red'","types":["Egress"],"egress":[{"action":"Log"}]}"#,
    // The pre-DNAT policy moved to the normal stage (another chain id).
    r#"{"selector":"has(role)","applyOnForward":true,"types":["Ingress"],"ingress":[
        {"action":"Deny","source":{"selector":"role == 'b'"}}]}"#,
    r#"{"selector":"role == 'b'","doNotTrack":true,"applyOnForward":true,"ingress":[
        {"action":"Allow"}]}"#,
    r#"{"selector":"all()","egress":[{"action":"Deny"}]}"#,
];

const PROFILES: &[(&str, &str)] = &[
    (
        "p0",
        r#"{"labelsToApply":{"pcns.team":"red","role":"c"},"ingress":[{"action":"Allow","source":{"selector":"has(pcns.team)"}}]}"#,
    ),
    (
        "p1",
        r#"{"labelsToApply":{"x":"1"},"egress":[{"action":"Allow","destination":{"selector":"role == 'a'"}}]}"#,
    ),
    // The namespace profile a namespaced network set inherits labels from (endpoints'
    // bit masks never name it).
    ("kns.ns1", r#"{"labelsToApply":{"pcns.team":"red"}}"#),
];

/// Other versions of the profiles above (other labels, rules and sets).
const PROFILE_ALTERNATIVES: &[&str] = &[
    r#"{"labelsToApply":{"pcns.team":"blue","role":"a"},"egress":[{"action":"Allow","destination":{"selector":"role == 'b'"}}]}"#,
    r#"{"ingress":[{"action":"Deny","source":{"selector":"has(x)"}}]}"#,
    r#"{"labelsToApply":{"pcns.team":"blue"}}"#,
];

#[derive(Debug, Clone)]
enum Op {
    Ep {
        idx: u8,
        local: bool,
        role: u8,
        ip: u8,
        profiles: u8,
        port: bool,
    },
    DelEp(u8),
    NetSet {
        idx: u8,
        label: bool,
        net: u8,
    },
    DelNetSet(u8),
    /// A policy on or off, through the incremental path or a rebuild.
    Policy(usize, bool, bool, bool),
    /// A profile on or off (or its other version), through the incremental path or a
    /// rebuild.
    Profile(usize, bool, bool, bool),
    Tier(bool),
    EndpointToHost(u8),
    /// A host endpoint: index, local, interface (eth0, eth1, `*`), role, profiles.
    Hep(u8, bool, u8, u8, u8),
    DelHep(u8),
    /// Failsafe ports: the defaults or one other list.
    HostConfig(bool),
    /// The host's addresses: which endpoint address eth1 holds (none: 4).
    HostAddrs(u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0u8..6, any::<bool>(), 0u8..4, 0u8..4, 0u8..4, any::<bool>()).prop_map(
            |(idx, local, role, ip, profiles, port)| Op::Ep { idx, local, role, ip, profiles, port }
        ),
        1 => (0u8..6).prop_map(Op::DelEp),
        2 => (0u8..3, any::<bool>(), 0u8..3).prop_map(|(idx, label, net)| Op::NetSet { idx, label, net }),
        1 => (0u8..3).prop_map(Op::DelNetSet),
        4 => (0..POLICIES.len(), any::<bool>(), any::<bool>(), any::<bool>())
            .prop_map(|(i, on, r, alt)| Op::Policy(i, on, r, alt)),
        2 => (0..PROFILES.len(), any::<bool>(), any::<bool>(), any::<bool>())
            .prop_map(|(i, on, r, alt)| Op::Profile(i, on, r, alt)),
        1 => any::<bool>().prop_map(Op::Tier),
        1 => (0u8..3).prop_map(Op::EndpointToHost),
        3 => (0u8..4, any::<bool>(), 0u8..4, 0u8..4, 0u8..4)
            .prop_map(|(i, l, f, r, p)| Op::Hep(i, l, f, r, p)),
        1 => (0u8..4).prop_map(Op::DelHep),
        1 => any::<bool>().prop_map(Op::HostConfig),
        1 => (0u8..5).prop_map(Op::HostAddrs),
    ]
}

fn endpoint(idx: u8, local: bool, role: u8, ip: u8, profiles: u8, port: bool) -> EndpointInfo {
    let ns = if idx.is_multiple_of(2) { "ns1" } else { "ns2" };
    let mut spec = WorkloadEndpointSpec {
        node: if local { "node-a" } else { "node-b" }.into(),
        interface_name: format!("cali{idx}"),
        ip_networks: vec![format!("10.0.0.{ip}/32")],
        profiles: (0..PROFILES.len())
            .filter(|i| profiles & (1 << i) != 0)
            .map(|i| PROFILES[i].0.to_string())
            .collect(),
        ..Default::default()
    };
    if port {
        spec.ports =
            vec![serde_json::from_str(r#"{"name":"http","protocol":"TCP","port":80}"#).unwrap()];
    }
    let mut w: Resource<WorkloadEndpointSpec> = Resource::new(format!("e{idx}"), spec);
    w.metadata.namespace = Some(ns.into());
    if role < 3 {
        w.metadata
            .labels
            .insert("role".into(), ["a", "b", "c"][role as usize].into());
    }
    if ip == 3 {
        w.metadata.labels.insert("x".into(), "1".into());
    }
    EndpointInfo::from_wep(&w)
}

fn host_endpoint(idx: u8, local: bool, iface: u8, role: u8, profiles: u8) -> EndpointInfo {
    let spec = HostEndpointSpec {
        node: if local { "node-a" } else { "node-b" }.into(),
        interface_name: ["eth0", "eth1", "*", ""][iface as usize].into(),
        expected_ips: vec![format!("10.0.1.{idx}")],
        profiles: (0..PROFILES.len())
            .filter(|i| profiles & (1 << i) != 0)
            .map(|i| PROFILES[i].0.to_string())
            .collect(),
        ports: vec![
            serde_json::from_str(r#"{"name":"http","protocol":"TCP","port":8080}"#).unwrap(),
        ],
    };
    let mut h: Resource<HostEndpointSpec> = Resource::new(format!("h{idx}"), spec);
    if role < 3 {
        h.metadata
            .labels
            .insert("role".into(), ["a", "b", "c"][role as usize].into());
    }
    EndpointInfo::from_hep(&h)
}

fn apply(e: &mut PolicyEngine, op: &Op) {
    match op {
        Op::Hep(idx, local, iface, role, profiles) => e.endpoint(
            &format!("h{idx}"),
            Some(host_endpoint(*idx, *local, *iface, *role, *profiles)),
        ),
        Op::DelHep(idx) => e.endpoint(&format!("h{idx}"), None),
        Op::HostAddrs(i) => {
            let mut addrs = BTreeMap::new();
            if *i < 4 {
                addrs.insert(
                    "eth1".to_string(),
                    vec![format!("10.0.1.{i}").parse().unwrap()],
                );
            }
            e.set_host_addrs(addrs);
        }
        Op::HostConfig(other) => {
            let ports = if *other {
                vec![Failsafe {
                    protocol: 6,
                    port: 22,
                    net: Some("10.1.0.0/16".parse().unwrap()),
                }]
            } else {
                vec![Failsafe {
                    protocol: 6,
                    port: 22,
                    net: None,
                }]
            };
            e.set_host_config(ports.clone(), ports, if *other { 4790 } else { 4789 });
        }
        Op::Ep {
            idx,
            local,
            role,
            ip,
            profiles,
            port,
        } => e.endpoint(
            &format!("k{idx}"),
            Some(endpoint(*idx, *local, *role, *ip, *profiles, *port)),
        ),
        Op::DelEp(idx) => e.endpoint(&format!("k{idx}"), None),
        Op::NetSet { idx, label, net } => {
            let labels = if *label {
                [
                    ("role".to_string(), "b".to_string()),
                    ("net".into(), "".into()),
                ]
                .into()
            } else {
                Default::default()
            };
            let nets = vec![format!("10.0.0.{net}/32"), "10.9.1.0/24".into()];
            let ns = (*idx == 0).then_some("ns1");
            e.net_set(
                &format!("n{idx}"),
                Some(NetSetInfo::new(&labels, ns, &nets)),
            );
        }
        Op::DelNetSet(idx) => e.net_set(&format!("n{idx}"), None),
        Op::Policy(i, on, rebuild, alt) => {
            let alt = *alt;
            let (name, ns, json) = POLICIES[*i];
            // The incremental path also sees other versions of the same policy.
            let json = if !*rebuild && *on && alt {
                ALTERNATIVES[*i]
            } else {
                json
            };
            let (id, p) = match ns {
                None => {
                    let spec = serde_json::from_str(json).unwrap();
                    let id = gnp_stage_id(name, &spec);
                    // A policy that moved stage leaves its other chain ids (as Felix's
                    // state does with the key's previous id).
                    for other in [PRE_DNAT_PREFIX, UNTRACKED_PREFIX, ""] {
                        let other = format!("{other}{}", gnp_id(name));
                        if other != id {
                            if *rebuild {
                                e.inputs_mut().policies.remove(&other);
                            } else {
                                e.policy(&other, None);
                            }
                        }
                    }
                    (id, resolve_gnp(name, &spec))
                }
                Some(ns) => (
                    np_id(ns, name),
                    resolve_np(ns, name, &serde_json::from_str(json).unwrap()),
                ),
            };
            // A changed version of the policy too: another rule order.
            let p = if *i % 2 == 1 && !*rebuild && !alt {
                let mut q = p;
                q.chains.inbound.reverse();
                q.chains.outbound.reverse();
                q
            } else {
                p
            };
            if *rebuild {
                let calc = e.inputs_mut();
                if *on {
                    calc.policies.insert(id, p);
                } else {
                    calc.policies.remove(&id);
                }
            } else {
                e.policy(&id, on.then_some(p));
            }
        }
        Op::Profile(i, on, rebuild, alt) => {
            let (name, json) = PROFILES[*i];
            let json = if *alt { PROFILE_ALTERNATIVES[*i] } else { json };
            let p = on.then(|| resolve_profile(&serde_json::from_str(json).unwrap()));
            if *rebuild {
                let calc = e.inputs_mut();
                match p {
                    Some(p) => calc.profiles.insert(name.into(), p),
                    None => calc.profiles.remove(name),
                };
            } else {
                e.profile(name, p);
            }
        }
        Op::Tier(pass) => {
            let spec = if *pass {
                r#"{"order":10,"defaultAction":"Pass"}"#
            } else {
                r#"{"order":2000000}"#
            };
            e.inputs_mut().tiers.insert(
                "t1".into(),
                TierInfo::from_spec(&serde_json::from_str(spec).unwrap()),
            );
        }
        Op::EndpointToHost(v) => e.set_endpoint_to_host(
            [
                EndpointToHost::Drop,
                EndpointToHost::Return,
                EndpointToHost::Accept,
            ][*v as usize],
        ),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]
    #[test]
    fn incremental_updates_equal_a_recompute_and_deltas_equal_the_diff(
        ops in proptest::collection::vec(op(), 1..40),
        every in 1usize..5,
    ) {
        let mut e = PolicyEngine::new("node-a");
        let (mut last, first) = e.take();
        prop_assert!(first.is_empty());
        for (i, op) in ops.iter().enumerate() {
            apply(&mut e, op);
            if i % every == 0 || i + 1 == ops.len() {
                let (dp, delta) = e.take();
                let scratch = e.calc().dataplane();
                prop_assert_eq!(&*dp, &scratch, "after {:?}", &ops[..=i]);
                let want = diff(&last, &dp);
                prop_assert_eq!(&delta, &want, "after {:?}", &ops[..=i]);
                last = dp;
            }
        }
    }
}

#[test]
fn a_label_change_touches_only_its_sets_and_its_endpoint() {
    let mut e = PolicyEngine::new("node-a");
    {
        let calc = e.inputs_mut();
        let (name, _, json) = POLICIES[0];
        calc.policies.insert(
            gnp_id(name),
            resolve_gnp(name, &serde_json::from_str(json).unwrap()),
        );
    }
    for i in 0..6 {
        e.endpoint(&format!("k{i}"), Some(endpoint(i, true, 0, i % 3, 0, true)));
    }
    e.take();
    // e5 becomes a b: it leaves a's endpoints (its chains change) and joins the b set.
    e.endpoint("k5", Some(endpoint(5, true, 1, 2, 0, true)));
    let (dp, d) = e.take();
    assert_eq!(d.endpoints, ["cali5".to_string()].into());
    assert!(d.policies.is_empty() && d.sets.is_empty(), "{d:?}");
    assert_eq!(d.added.len(), 1, "{d:?}");
    assert!(dp.endpoints["cali5"].ingress.is_empty());
}

/// 1,000 local endpoints, 100 policies each selecting ~5% and using two selector sets,
/// 20 network sets (the benchmark's shape): the cost of a label change does not depend on the number of
/// endpoints (what it writes stays a few members and one endpoint). Prints the times
/// (`--nocapture`); the bound is loose (debug build, shared machine).
#[test]
fn a_label_change_at_scale_writes_a_few_members_and_is_fast() {
    let mut e = PolicyEngine::new("node-a");
    let calc = e.inputs_mut();
    for i in 0..100 {
        let json = format!(
            r#"{{"selector":"app == 'a{}'","ingress":[{{"action":"Allow","source":{{"selector":"app == 'a{}'"}}}}],"egress":[{{"action":"Allow","destination":{{"selector":"group == 'g{}'"}}}}]}}"#,
            i % 20,
            (i + 1) % 20,
            i % 20
        );
        let name = format!("p{i}");
        calc.policies.insert(
            gnp_id(&name),
            resolve_gnp(&name, &serde_json::from_str(&json).unwrap()),
        );
    }
    let ep = |i: usize, app: usize| {
        let mut w: Resource<WorkloadEndpointSpec> = Resource::new(
            format!("e{i}"),
            WorkloadEndpointSpec {
                node: "node-a".into(),
                interface_name: format!("cali{i}"),
                ip_networks: vec![format!(
                    "10.{}.{}.{}/32",
                    i / 65536,
                    (i / 256) % 256,
                    i % 256
                )],
                ..Default::default()
            },
        );
        w.metadata.namespace = Some("ns".into());
        w.metadata.labels.insert("app".into(), format!("a{app}"));
        w.metadata
            .labels
            .insert("group".into(), format!("g{}", i % 20));
        EndpointInfo::from_wep(&w)
    };
    for i in 0..1000 {
        e.endpoint(&format!("k{i}"), Some(ep(i, i % 20)));
    }
    for i in 0..20 {
        let labels = [("group".to_string(), format!("g{i}"))].into();
        e.net_set(
            &format!("n{i}"),
            Some(NetSetInfo::new(
                &labels,
                None,
                &[format!("192.168.{i}.0/24")],
            )),
        );
    }
    let t = std::time::Instant::now();
    let (dp, _) = e.take();
    let cold = t.elapsed();
    assert_eq!(dp.endpoints.len(), 1000);
    assert!(!dp.policies.is_empty() && !dp.sets.is_empty());
    drop(dp);
    let mut times = Vec::new();
    for n in 0..50 {
        let i = 17 * n;
        let t = std::time::Instant::now();
        e.endpoint(&format!("k{i}"), Some(ep(i, (i + n + 1) % 20)));
        let (dp, d) = e.take();
        times.push(t.elapsed());
        drop(dp);
        let members: usize = d
            .added
            .values()
            .chain(d.removed.values())
            .map(|s| match s {
                IpSet::Nets(n) => n.len(),
                IpSet::Ports(p) => p.len(),
            })
            .sum();
        assert!(d.endpoints.len() <= 1 && members <= 4, "{d:?}");
    }
    times.sort();
    let (median, worst) = (times[times.len() / 2], times[times.len() - 1]);
    // A policy change: what it costs, and that its delta is the policy and its endpoints.
    let json = r#"{"selector":"app == 'a3'","ingress":[{"action":"Deny"}]}"#;
    let t = std::time::Instant::now();
    e.policy(
        &gnp_id("new"),
        Some(resolve_gnp("new", &serde_json::from_str(json).unwrap())),
    );
    let (_, d) = e.take();
    let policy_change = t.elapsed();
    assert_eq!(d.policies, [gnp_id("new")].into());
    assert!(d.sets.is_empty() && d.added.is_empty() && d.removed.is_empty());
    let a3 = e
        .calc()
        .endpoints
        .values()
        .filter(|x| x.labels["app"] == "a3")
        .count();
    assert_eq!(d.endpoints.len(), a3, "the endpoints with app a3");
    println!(
        "cold calculation {cold:?}, label change median {median:?} worst {worst:?}, policy change {policy_change:?}"
    );
    assert!(median < std::time::Duration::from_millis(20), "{median:?}");
}
