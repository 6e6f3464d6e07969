//! The policy dataplane in a real nft, in fresh network namespaces, from hand-built
//! `PolicyDataplane` values (no etcd): the full render loads; every incremental delta
//! leaves the same tables as a full apply of the same dataplane; tables of others
//! (a foreign nft table, iptables-nft rules) stay byte-identical; and real traffic
//! between pods is allowed and dropped as the policy says, also after a set change.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use calico_node::felix::calc::Nat;
use calico_node::felix::nft::PolicyTables;
use calico_node::felix::policy::{
    Action, Chains, Delta, Endpoint, EndpointToHost, Icmp, IpSet, Match, PolicyDataplane,
    PortRange, Rule, TierEnd, TierPolicies,
};
use common::NetNs;
use ipnet::IpNet;

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

fn nets(v: &[&str]) -> IpSet {
    IpSet::Nets(v.iter().map(|s| net(s)).collect())
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

fn tier(name: &str, policies: &[&str], end: TierEnd) -> TierPolicies {
    TierPolicies {
        tier: name.to_string(),
        policies: policies.iter().map(|s| s.to_string()).collect(),
        end,
    }
}

fn endpoint(name: &str, ingress: Vec<TierPolicies>, profiles: &[&str]) -> Endpoint {
    Endpoint {
        name: name.to_string(),
        ingress,
        egress: Vec::new(),
        profiles: profiles.iter().map(|s| s.to_string()).collect(),
    }
}

/// A dataplane using every kind of rule the renderer knows.
fn rich() -> PolicyDataplane {
    let mut dp = PolicyDataplane::default();
    dp.sets.insert(
        "s:aaaa".into(),
        nets(&["10.65.0.1/32", "10.65.0.2/32", "10.0.0.0/8", "fd00::1/128"]),
    );
    dp.sets.insert("s:bbbb".into(), nets(&["10.65.0.3/32"]));
    dp.sets.insert(
        "n:cccc".into(),
        IpSet::Ports(BTreeSet::from([
            ("10.65.0.2".parse::<IpAddr>().unwrap(), 6, 8080),
            ("fd00::2".parse::<IpAddr>().unwrap(), 6, 8080),
        ])),
    );
    let mut allow_web = rule(Action::Allow);
    allow_web.protocol = Some(6);
    allow_web.src.sets = vec!["s:aaaa".into()];
    allow_web.dst.ports = vec![
        PortRange { lo: 80, hi: 80 },
        PortRange { lo: 1000, hi: 2000 },
    ];
    allow_web.dst.named_port_sets = vec!["n:cccc".into()];
    let mut deny = rule(Action::Deny);
    deny.src.not_sets = vec!["s:bbbb".into()];
    deny.src.nets = vec![net("192.168.0.0/16"), net("fd00:1::/64")];
    deny.src.not_nets = vec![net("192.168.1.0/24")];
    deny.dst.not_ports = vec![PortRange { lo: 22, hi: 22 }];
    deny.protocol = Some(17);
    let mut ping = rule(Action::Allow);
    ping.protocol = Some(1);
    ping.icmp = Some(Icmp {
        v6: false,
        icmp_type: 8,
        code: Some(0),
    });
    let mut not_ping = rule(Action::Log);
    not_ping.not_icmp = Some(Icmp {
        v6: true,
        icmp_type: 128,
        code: Some(0),
    });
    let mut v4_only = rule(Action::Pass);
    v4_only.ip_version = Some(4);
    v4_only.not_protocol = Some(6);
    dp.policies.insert(
        "gnp/web".into(),
        Chains {
            inbound: vec![allow_web, deny, ping],
            outbound: vec![not_ping, v4_only],
        },
    );
    dp.policies.insert(
        "np/default/db".into(),
        Chains {
            inbound: vec![rule(Action::Pass)],
            outbound: vec![],
        },
    );
    dp.profiles.insert(
        "kns.default".into(),
        Chains {
            inbound: vec![rule(Action::Allow)],
            outbound: vec![rule(Action::Allow)],
        },
    );
    let mut a = endpoint(
        "default/a",
        vec![
            tier("kube-admin", &["np/default/db"], TierEnd::Pass),
            tier("default", &["gnp/web", "np/default/db"], TierEnd::Deny),
        ],
        &["kns.default", "missing-profile"],
    );
    a.egress = vec![tier("default", &["gnp/web"], TierEnd::Deny)];
    dp.endpoints.insert("calia".into(), a);
    dp.endpoints.insert(
        "calib".into(),
        endpoint("default/b", vec![], &["kns.default"]),
    );
    dp
}

/// What changed from `old` to `new` (a test's own diff, the contract's meaning).
fn diff(old: &PolicyDataplane, new: &PolicyDataplane) -> Delta {
    fn changed<V: PartialEq>(a: &BTreeMap<String, V>, b: &BTreeMap<String, V>) -> BTreeSet<String> {
        a.keys()
            .chain(b.keys())
            .filter(|k| a.get(*k) != b.get(*k))
            .cloned()
            .collect()
    }
    let mut d = Delta {
        endpoints: changed(&old.endpoints, &new.endpoints),
        policies: changed(&old.policies, &new.policies),
        profiles: changed(&old.profiles, &new.profiles),
        endpoint_to_host: old.endpoint_to_host != new.endpoint_to_host,
        ..Default::default()
    };
    // An endpoint whose profile appears or goes is rewritten (its chain skips missing
    // ones).
    for (i, ep) in &new.endpoints {
        if ep.profiles.iter().any(|p| d.profiles.contains(p))
            || ep
                .ingress
                .iter()
                .chain(ep.egress.iter())
                .any(|t| t.policies.iter().any(|p| d.policies.contains(p)))
        {
            d.endpoints.insert(i.clone());
        }
    }
    for k in old.sets.keys().chain(new.sets.keys()) {
        match (old.sets.get(k), new.sets.get(k)) {
            (Some(IpSet::Nets(a)), Some(IpSet::Nets(b))) if a != b => {
                d.added
                    .insert(k.clone(), IpSet::Nets(b.difference(a).copied().collect()));
                d.removed
                    .insert(k.clone(), IpSet::Nets(a.difference(b).copied().collect()));
            }
            (Some(IpSet::Ports(a)), Some(IpSet::Ports(b))) if a != b => {
                d.added
                    .insert(k.clone(), IpSet::Ports(b.difference(a).copied().collect()));
                d.removed
                    .insert(k.clone(), IpSet::Ports(a.difference(b).copied().collect()));
            }
            (a, b) if a != b => {
                d.sets.insert(k.clone());
            }
            _ => {}
        }
    }
    d
}

fn nft_out(ns: &NetNs, args: &[&str]) -> String {
    let out = ns.command("nft").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "nft {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Our tables as nft lists them in JSON, normalised: handles dropped, objects sorted
/// (creation order differs between a full and an incremental apply), set elements sorted;
/// rules stay in their chain's order.
fn normalised(ns: &NetNs) -> Vec<String> {
    let mut out = Vec::new();
    for fam in ["ip", "ip6"] {
        let json = nft_out(ns, &["-j", "list", "table", fam, "calico"]);
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        let mut objects = Vec::new();
        let mut rules: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for o in v["nftables"].as_array().unwrap() {
            let mut o = o.clone();
            strip(&mut o);
            if let Some(r) = o.get("rule") {
                let chain = r["chain"].as_str().unwrap().to_string();
                rules.entry(chain).or_default().push(r["expr"].to_string());
            } else if o.get("metainfo").is_none() {
                objects.push(o.to_string());
            }
        }
        objects.sort();
        out.extend(objects);
        for (c, r) in rules {
            out.push(format!("{fam} {c}: {}", r.join("\n")));
        }
    }
    out
}

fn strip(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(m) => {
            m.remove("handle");
            if let Some(serde_json::Value::Array(e)) = m.get_mut("elem") {
                e.sort_by_key(|x| x.to_string());
            }
            for (_, x) in m.iter_mut() {
                strip(x);
            }
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(strip),
        _ => {}
    }
}

fn have_nft() -> bool {
    if !common::have("nft") {
        common::skip("nft is not installed");
        return false;
    }
    true
}

/// Apply `steps` one after the other incrementally in one namespace, and each step in
/// full in another: the tables must be the same after every step.
fn incremental_equals_full(steps: Vec<(&'static str, PolicyDataplane)>) {
    let Some(inc) = NetNs::new("nft-inc") else {
        return;
    };
    let Some(full) = NetNs::new("nft-full") else {
        return;
    };
    if !have_nft() {
        return;
    }
    let nat = Nat {
        masquerade: BTreeSet::from([net("10.65.0.0/16")]),
        all: BTreeSet::from([net("10.65.0.0/16")]),
        snat_to: None,
    };
    let mut prev = PolicyDataplane::default();
    let mut tables = Some(PolicyTables::new());
    {
        let t = tables.take().unwrap();
        let nat = nat.clone();
        tables = Some(inc.run_in(move || {
            let mut t = t;
            t.write_full(&PolicyDataplane::default(), &nat, "cali")
                .unwrap();
            t
        }));
    }
    for (what, dp) in steps {
        let delta = diff(&prev, &dp);
        let t = tables.take().unwrap();
        let (d2, delta2) = (dp.clone(), delta.clone());
        tables = Some(inc.run_in(move || {
            let mut t = t;
            if let Err(e) = t.apply(&d2, &delta2) {
                panic!("incremental apply: {e}\ndelta: {delta2:?}");
            }
            t
        }));
        let (d3, nat3) = (dp.clone(), nat.clone());
        full.run_in(move || PolicyTables::new().write_full(&d3, &nat3, "cali").unwrap());
        assert_eq!(
            normalised(&inc),
            normalised(&full),
            "after {what} (delta {delta:?})"
        );
        prev = dp;
    }
}

/// The full render of every kind of rule, set and chain loads in a real nft, in our
/// tables only, with Calico's names.
#[test]
fn full_render_loads_with_calicos_names() {
    let Some(ns) = NetNs::new("nft-full") else {
        return;
    };
    if !have_nft() {
        return;
    }
    let dp = rich();
    ns.run_in(move || {
        PolicyTables::new()
            .write_full(&dp, &Nat::default(), "cali")
            .unwrap()
    });
    let v4 = nft_out(&ns, &["list", "table", "ip", "calico"]);
    for want in [
        "set cali40s-aaaa {",
        "elements = { 10.0.0.0/8 }",
        "set cali40n-cccc {",
        "type ipv4_addr . inet_proto . inet_service",
        "map filter-cali-from-wl-dispatch {",
        "\"calia\" : goto filter-cali-fw-calia",
        "\"calib\" : goto filter-cali-tw-calib",
        "chain filter-cali-pi-gnp/web {",
        "chain filter-cali-po-np/default/db {",
        "chain filter-cali-pri-kns.default {",
        "chain filter-cali-tw-calia {",
        "jump filter-cali-pi-np/default/db",
        "ct state established,related accept",
        "ct state invalid counter packets 0 bytes 0 drop",
        "ip daddr . meta l4proto . tcp dport @cali40n-cccc",
        "tcp dport { 80, 1000-2000 }",
        "iifname \"cali*\" jump filter-cali-from-wl-dispatch",
        "type filter hook forward priority filter; policy accept;",
        "iifname \"cali*\" goto filter-cali-wl-to-host",
    ] {
        assert!(v4.contains(want), "{want:?} not in\n{v4}");
    }
    // The missing profile is skipped, the IPv6-only rule not rendered in IPv4.
    assert!(!v4.contains("missing-profile"), "{v4}");
    assert!(!v4.contains("icmpv6"), "{v4}");
    let v6 = nft_out(&ns, &["list", "table", "ip6", "calico"]);
    assert!(v6.contains("elements = { fd00::1 }"), "{v6}");
    assert!(
        v6.contains("ip6 saddr fd00:1::/64 ip6 saddr != @cali60s-bbbb"),
        "{v6}"
    );
    assert!(!v6.contains("192.168"), "{v6}");
    assert!(v6.contains("log prefix \"calico-packet: \""), "{v6}");
    assert!(
        v6.contains("icmpv6 type . icmpv6 code != { echo-request . no-route }"),
        "{v6}"
    );
}

/// Every kind of change, applied as a delta, leaves the tables a full apply of the same
/// dataplane makes.
#[test]
fn incremental_deltas_equal_a_full_apply() {
    let base = rich();
    let mut relabel = base.clone();
    // A label change: one member moves from one selector set to another.
    if let Some(IpSet::Nets(s)) = relabel.sets.get_mut("s:aaaa") {
        s.remove(&net("10.65.0.1/32"));
        s.insert(net("10.65.0.9/32"));
    }
    if let Some(IpSet::Nets(s)) = relabel.sets.get_mut("s:bbbb") {
        s.insert(net("10.65.0.1/32"));
    }
    let mut outer_gone = relabel.clone();
    // The outer net goes: the members inside it must appear.
    if let Some(IpSet::Nets(s)) = outer_gone.sets.get_mut("s:aaaa") {
        s.remove(&net("10.0.0.0/8"));
    }
    let mut outer_back = outer_gone.clone();
    if let Some(IpSet::Nets(s)) = outer_back.sets.get_mut("s:aaaa") {
        s.insert(net("10.0.0.0/8"));
    }
    let mut named = outer_back.clone();
    if let Some(IpSet::Ports(s)) = named.sets.get_mut("n:cccc") {
        s.insert(("10.65.0.7".parse().unwrap(), 17, 53));
        s.remove(&("fd00::2".parse().unwrap(), 6, 8080));
    }
    let mut new_endpoint = named.clone();
    new_endpoint.endpoints.insert(
        "calic".into(),
        endpoint(
            "default/c",
            vec![tier("default", &["gnp/web"], TierEnd::Deny)],
            &["kns.default"],
        ),
    );
    let mut gone_endpoint = new_endpoint.clone();
    gone_endpoint.endpoints.remove("calia");
    let mut new_policy = gone_endpoint.clone();
    new_policy
        .sets
        .insert("s:dddd".into(), nets(&["10.65.0.4/32"]));
    let mut r = rule(Action::Deny);
    r.dst.sets = vec!["s:dddd".into()];
    new_policy.policies.insert(
        "gnp/deny-d".into(),
        Chains {
            inbound: vec![],
            outbound: vec![r],
        },
    );
    if let Some(ep) = new_policy.endpoints.get_mut("calib") {
        ep.egress = vec![tier("default", &["gnp/deny-d"], TierEnd::Deny)];
    }
    let mut policy_changed = new_policy.clone();
    policy_changed
        .policies
        .get_mut("gnp/web")
        .unwrap()
        .inbound
        .push(rule(Action::Deny));
    let mut profile_appears = policy_changed.clone();
    profile_appears.profiles.insert(
        "missing-profile".into(),
        Chains {
            inbound: vec![rule(Action::Deny)],
            outbound: vec![],
        },
    );
    if let Some(ep) = profile_appears.endpoints.get_mut("calic") {
        ep.profiles.push("missing-profile".into());
    }
    let mut policy_gone = profile_appears.clone();
    policy_gone.policies.remove("gnp/deny-d");
    policy_gone.sets.remove("s:dddd");
    if let Some(ep) = policy_gone.endpoints.get_mut("calib") {
        ep.egress.clear();
    }
    let mut to_host = policy_gone.clone();
    to_host.endpoint_to_host = EndpointToHost::Return;
    incremental_equals_full(vec![
        ("the first dataplane", base),
        ("a label change", relabel),
        ("an outer net removed", outer_gone),
        ("an outer net back", outer_back),
        ("named-port members", named),
        ("a new endpoint", new_endpoint),
        ("an endpoint removed", gone_endpoint),
        ("a new policy and set", new_policy),
        ("a policy changed", policy_changed),
        ("a profile appearing", profile_appears),
        ("a policy and set removed", policy_gone),
        ("defaultEndpointToHostAction", to_host),
        ("everything removed", PolicyDataplane::default()),
    ]);
}

/// A pod namespace behind `iface` in `node`, addressed `ip`/32, routed as Calico's CNI
/// plugin does (default via 169.254.1.1, proxy ARP on the host side).
fn pod(node: &NetNs, prefix: &str, iface: &str, ip: &str) -> NetNs {
    let p = NetNs::new(prefix).expect("root was checked");
    node.ip(&[
        "link", "add", iface, "type", "veth", "peer", "name", "eth0", "netns", &p.name,
    ]);
    node.ip(&["link", "set", iface, "up"]);
    p.ip(&["link", "set", "eth0", "up"]);
    p.ip(&["addr", "add", &format!("{ip}/32"), "dev", "eth0"]);
    p.ip(&[
        "route",
        "add",
        "169.254.1.1",
        "dev",
        "eth0",
        "scope",
        "link",
    ]);
    p.ip(&[
        "route",
        "add",
        "default",
        "via",
        "169.254.1.1",
        "dev",
        "eth0",
    ]);
    node.ip(&["route", "add", &format!("{ip}/32"), "dev", iface]);
    sysctl(node, &format!("net.ipv4.conf.{iface}.proxy_arp"), "1");
    p
}

fn sysctl(ns: &NetNs, key: &str, value: &str) {
    let out = ns
        .command("sysctl")
        .args(["-qw", &format!("{key}={value}")])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A TCP listener on `port` in `ns` (accepting until the namespace goes).
fn listen(ns: &NetNs, port: u16) {
    let l = ns.run_in(move || std::net::TcpListener::bind(("0.0.0.0", port)).unwrap());
    std::thread::spawn(move || {
        for c in l.incoming() {
            drop(c);
        }
    });
}

/// Whether a TCP connection from `ns` to `ip`:`port` is set up within a second.
fn connects(ns: &NetNs, ip: &str, port: u16) -> bool {
    let addr = std::net::SocketAddr::new(ip.parse().unwrap(), port);
    ns.run_in(move || {
        std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(1)).is_ok()
    })
}

fn ping(from: &NetNs, to: &str) -> bool {
    common::cluster::ping(from, to)
}

/// Real traffic between pods: an allow by selector set passes, a deny by set drops, a port
/// no rule allows meets the end-of-tier drop, an endpoint with no policy and no profile
/// sends nothing; a set change (a relabel) and `defaultEndpointToHostAction` take effect
/// incrementally; the Log rule counts.
#[test]
fn traffic_follows_the_policy_and_its_changes() {
    let Some(node) = NetNs::new("nft-node") else {
        return;
    };
    if !have_nft() {
        return;
    }
    node.add_uplink();
    sysctl(&node, "net.ipv4.ip_forward", "1");
    let a = pod(&node, "nft-pa", "calia", "10.65.0.1");
    let b = pod(&node, "nft-pb", "calib", "10.65.0.2");
    let c = pod(&node, "nft-pc", "calic", "10.65.0.3");
    listen(&b, 8080);
    listen(&b, 9090);
    // Before any policy: everything passes.
    assert!(ping(&a, "10.65.0.2") && ping(&c, "10.65.0.2") && ping(&b, "10.65.0.1"));

    let mut dp = PolicyDataplane::default();
    dp.sets
        .insert("s:allowed".into(), nets(&["10.65.0.1/32", "10.65.0.3/32"]));
    dp.sets.insert("s:denied".into(), nets(&["10.65.0.3/32"]));
    let mut log = rule(Action::Log);
    log.protocol = Some(1);
    let mut deny = rule(Action::Deny);
    deny.src.sets = vec!["s:denied".into()];
    let mut icmp = rule(Action::Allow);
    icmp.protocol = Some(1);
    icmp.src.sets = vec!["s:allowed".into()];
    let mut web = rule(Action::Allow);
    web.protocol = Some(6);
    web.src.sets = vec!["s:allowed".into()];
    web.dst.ports = vec![PortRange { lo: 8080, hi: 8080 }];
    dp.policies.insert(
        "gnp/b".into(),
        Chains {
            inbound: vec![log, deny, icmp, web],
            outbound: vec![],
        },
    );
    dp.profiles.insert(
        "open".into(),
        Chains {
            inbound: vec![rule(Action::Allow)],
            outbound: vec![rule(Action::Allow)],
        },
    );
    dp.endpoints
        .insert("calia".into(), endpoint("a", vec![], &["open"]));
    dp.endpoints.insert(
        "calib".into(),
        endpoint(
            "b",
            vec![tier("default", &["gnp/b"], TierEnd::Deny)],
            &["open"],
        ),
    );
    dp.endpoints
        .insert("calic".into(), endpoint("c", vec![], &["open"]));
    // b sends nothing: no egress policy and no profile for that direction... (its
    // profile allows egress; give b none to see the final drop).
    dp.endpoints.get_mut("calib").unwrap().profiles.clear();

    let tables = PolicyTables::new();
    let d = dp.clone();
    let tables = node.run_in(move || {
        let mut t = tables;
        t.write_full(&d, &Nat::default(), "cali").unwrap();
        t
    });
    assert!(ping(&a, "10.65.0.2"), "allowed by the selector set");
    assert!(!ping(&c, "10.65.0.2"), "denied by the selector set");
    assert!(connects(&a, "10.65.0.2", 8080), "allowed port");
    assert!(!connects(&a, "10.65.0.2", 9090), "end-of-tier drop");
    assert!(!connects(&c, "10.65.0.2", 8080), "denied by set, TCP too");
    assert!(
        !ping(&b, "10.65.0.1"),
        "no egress policy, no profile: dropped"
    );
    assert!(ping(&a, "10.65.0.3"), "the profile allows");
    // To the host: dropped by default.
    assert!(!ping(&a, "10.99.0.1"), "defaultEndpointToHostAction Drop");
    let v4 = nft_out(
        &node,
        &["list", "chain", "ip", "calico", "filter-cali-pi-gnp/b"],
    );
    assert!(
        v4.contains("meta l4proto icmp counter packets 2 ")
            || v4.contains("ip protocol icmp counter packets 2 "),
        "the Log rule counted the two pings that reached b's policy:\n{v4}"
    );

    // c is relabelled out of the denied set; the host is made reachable.
    let mut next = dp.clone();
    if let Some(IpSet::Nets(s)) = next.sets.get_mut("s:denied") {
        s.clear();
    }
    next.endpoint_to_host = EndpointToHost::Accept;
    let delta = diff(&dp, &next);
    assert!(delta.endpoints.is_empty() && delta.policies.is_empty());
    let n = next.clone();
    let tables = node.run_in(move || {
        let mut t = tables;
        t.apply(&n, &delta).unwrap();
        t
    });
    assert!(ping(&c, "10.65.0.2"), "c no longer denied");
    assert!(connects(&c, "10.65.0.2", 8080));
    assert!(!connects(&c, "10.65.0.2", 9090));
    assert!(ping(&a, "10.99.0.1"), "defaultEndpointToHostAction Accept");

    // A relabel alone (set elements only, the netlink batch): a denied again.
    let mut last = next.clone();
    if let Some(IpSet::Nets(s)) = last.sets.get_mut("s:denied") {
        s.insert(net("10.65.0.1/32"));
    }
    let delta = diff(&next, &last);
    assert!(delta.sets.is_empty() && !delta.endpoint_to_host);
    node.run_in(move || {
        let mut t = tables;
        t.apply(&last, &delta).unwrap();
    });
    assert!(!ping(&a, "10.65.0.2"), "a now denied by the set");
    assert!(ping(&c, "10.65.0.2"), "c still allowed");
}

/// A benchmark-sized dataplane: `n` endpoints, 100 policies whose selectors match ~5% of
/// them each, 20 network-set nets in the selector sets.
fn large(n: u32) -> PolicyDataplane {
    let mut dp = PolicyDataplane::default();
    let ip = |i: u32| -> IpNet {
        IpNet::new(
            IpAddr::from([10, 65, (i / 250) as u8, (i % 250) as u8 + 1]),
            32,
        )
        .unwrap()
    };
    for p in 0..100u32 {
        let members: BTreeSet<IpNet> = (0..n)
            .filter(|i| (i + p) % 20 == 0)
            .map(ip)
            .collect::<BTreeSet<_>>();
        let mut members = members;
        members.insert(IpNet::new(IpAddr::from([172, 16, (p % 20) as u8, 0]), 24).unwrap());
        dp.sets.insert(format!("s:sel{p}"), IpSet::Nets(members));
        let mut r = rule(Action::Allow);
        r.protocol = Some(6);
        r.src.sets = vec![format!("s:sel{p}")];
        r.dst.ports = vec![PortRange { lo: 80, hi: 80 }];
        dp.policies.insert(
            format!("gnp/p{p}"),
            Chains {
                inbound: vec![r.clone()],
                outbound: vec![r],
            },
        );
    }
    dp.profiles.insert(
        "open".into(),
        Chains {
            inbound: vec![rule(Action::Allow)],
            outbound: vec![rule(Action::Allow)],
        },
    );
    for i in 0..n {
        let pols: Vec<String> = (0..100u32)
            .filter(|p| (i + p) % 20 == 0)
            .map(|p| format!("gnp/p{p}"))
            .collect();
        let pols: Vec<&str> = pols.iter().map(|s| s.as_str()).collect();
        let mut ep = endpoint(
            &format!("w{i}"),
            vec![tier("default", &pols, TierEnd::Deny)],
            &["open"],
        );
        ep.egress = ep.ingress.clone();
        dp.endpoints.insert(format!("cali{i:011}"), ep);
    }
    dp
}

/// The cost of one small transaction (a relabel: one member out of one set, into another)
/// with 1,000 endpoints loaded, against the full apply: printed, and bounded loosely.
#[test]
fn one_small_transaction_with_1000_endpoints_is_cheap() {
    let Some(ns) = NetNs::new("nft-big") else {
        return;
    };
    if !have_nft() {
        return;
    }
    let dp = large(1000);
    let (full_ms, times) = ns.run_in(move || {
        let mut t = PolicyTables::new();
        let started = std::time::Instant::now();
        t.write_full(&dp, &Nat::default(), "cali").unwrap();
        let full_ms = started.elapsed().as_secs_f64() * 1e3;
        let mut times = Vec::new();
        let mut cur = dp;
        for k in 0..40u32 {
            let mut next = cur.clone();
            let m = IpNet::new(IpAddr::from([10, 65, 9, (k % 200) as u8 + 1]), 32).unwrap();
            let (from, to) = if k % 2 == 0 {
                ("s:sel1", "s:sel2")
            } else {
                ("s:sel2", "s:sel1")
            };
            if let Some(IpSet::Nets(s)) = next.sets.get_mut(from) {
                s.remove(&m);
            }
            if let Some(IpSet::Nets(s)) = next.sets.get_mut(to) {
                s.insert(m);
            }
            let delta = diff(&cur, &next);
            let started = std::time::Instant::now();
            t.apply(&next, &delta).unwrap();
            times.push(started.elapsed().as_secs_f64() * 1e3);
            cur = next;
        }
        (full_ms, times)
    });
    let mut sorted = times.clone();
    sorted.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let p50 = sorted[sorted.len() / 2];
    let max = sorted[sorted.len() - 1];
    eprintln!(
        "nft with 1000 endpoints: full apply {full_ms:.1} ms; one relabel: p50 {p50:.2} ms, max {max:.2} ms"
    );
    assert!(p50 < 50.0, "one small transaction took {p50} ms");
}

#[test]
#[ignore]
fn dump_large_script() {
    let s = calico_node::felix::nft::render::full(&large(1000), &Nat::default(), "cali");
    std::fs::write("/tmp/wtb-large.nft", s).unwrap();
}
