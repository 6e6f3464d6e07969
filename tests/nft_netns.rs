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
    ALL_INTERFACES_KEY, Action, Chains, Delta, Endpoint, EndpointToHost, Failsafe, HostEndpoint,
    Icmp, IpSet, Match, PolicyDataplane, PortRange, Rule, TierEnd, TierPolicies,
};
use common::NetNs;

/// The route refresh interval the executor is given (Felix's default).
const REFRESH: std::time::Duration = std::time::Duration::from_secs(90);
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
    // Both families in notNets: a family with none would not get the rule at all.
    deny.src.not_nets = vec![net("192.168.1.0/24"), net("fd00:1:0:1::/64")];
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
        host: old.host != new.host,
        ..Default::default()
    };
    // Endpoints whose policies or profiles come or go are not named: the executor
    // rewrites them itself.
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

/// Pools of both families: both tables hold the filter layer.
fn dual_stack() -> Nat {
    Nat {
        masquerade: BTreeSet::from([net("10.65.0.0/16")]),
        all: BTreeSet::from([net("10.65.0.0/16"), net("fd00::/48")]),
        snat_to: None,
    }
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
    let nat = dual_stack();
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
            .write_full(&dp, &dual_stack(), "cali")
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
        "ct state invalid drop",
        "ip daddr . meta l4proto . tcp dport @cali40n-cccc",
        "tcp dport { 80, 1000-2000 }",
        "iifname \"cali*\" jump filter-cali-from-wl-dispatch",
        "type filter hook forward priority filter; policy accept;",
        "type filter hook forward priority filter + 1; policy accept;",
        "oifname \"cali*\" jump filter-cali-to-wl-dispatch",
        "iifname \"cali*\" goto filter-cali-wl-to-host",
        "iifname \"cali*\" goto filter-cali-wl-to-host-action",
    ] {
        assert!(v4.contains(want), "{want:?} not in\n{v4}");
    }
    // The missing profile is skipped, the IPv6-only rule not rendered in IPv4.
    assert!(!v4.contains("missing-profile"), "{v4}");
    assert!(!v4.contains("icmpv6"), "{v4}");
    // NAT and policy in one table.
    assert!(v4.contains("chain cali-POSTROUTING {"), "{v4}");
    let v6 = nft_out(&ns, &["list", "table", "ip6", "calico"]);
    assert!(v6.contains("elements = { fd00::1 }"), "{v6}");
    assert!(
        v6.contains(
            "ip6 saddr fd00:1::/64 ip6 saddr != fd00:1:0:1::/64 ip6 saddr != @cali60s-bbbb"
        ),
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
        s.remove(&net("fd00::1/128"));
        s.insert(net("fd00::9/128"));
        s.insert(net("fd00::a/128"));
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
    // The host layer: a host endpoint with a normal policy and failsafe ports, then one
    // for all interfaces with pre-DNAT, untracked and forward policies, a policy of the
    // layer changed, the failsafe ports changed, the layer gone.
    let mut host = to_host.clone();
    host.host.failsafe_in = vec![Failsafe {
        protocol: 6,
        port: 22,
        net: None,
    }];
    host.host.failsafe_out = vec![Failsafe {
        protocol: 17,
        port: 53,
        net: Some(net("10.0.0.0/8")),
    }];
    host.host.vxlan_port = 4789;
    host.host.endpoints.insert(
        "eth0".into(),
        HostEndpoint {
            name: "node-eth0".into(),
            ingress: vec![tier("default", &["gnp/web"], TierEnd::Deny)],
            profiles: vec!["kns.default".into()],
            ..Default::default()
        },
    );
    let mut host_all = host.clone();
    for (id, inbound) in [("prednat/gnp/np", true), ("untracked/gnp/raw", false)] {
        let mut allow = rule(Action::Allow);
        allow.dst.ports = vec![PortRange {
            lo: 30080,
            hi: 30080,
        }];
        host_all.policies.insert(
            id.into(),
            if inbound {
                Chains {
                    inbound: vec![allow],
                    outbound: vec![],
                }
            } else {
                Chains {
                    inbound: vec![allow.clone()],
                    outbound: vec![allow],
                }
            },
        );
    }
    host_all.host.endpoints.insert(
        ALL_INTERFACES_KEY.into(),
        HostEndpoint {
            name: "node-all".into(),
            egress: vec![tier("default", &["gnp/web"], TierEnd::Pass)],
            forward_ingress: vec![tier("default", &["gnp/web"], TierEnd::Deny)],
            pre_dnat: vec![tier("default", &["prednat/gnp/np"], TierEnd::Pass)],
            ..Default::default()
        },
    );
    host_all
        .host
        .endpoints
        .get_mut("eth0")
        .unwrap()
        .untracked_ingress = vec![tier("default", &["untracked/gnp/raw"], TierEnd::Pass)];
    host_all
        .host
        .endpoints
        .get_mut("eth0")
        .unwrap()
        .untracked_egress = vec![tier("default", &["untracked/gnp/raw"], TierEnd::Pass)];
    let mut host_policy = host_all.clone();
    host_policy
        .policies
        .get_mut("prednat/gnp/np")
        .unwrap()
        .inbound
        .push(rule(Action::Pass));
    let mut host_failsafe = host_policy.clone();
    host_failsafe.host.failsafe_in.push(Failsafe {
        protocol: 6,
        port: 179,
        net: None,
    });
    let mut host_gone = host_failsafe.clone();
    host_gone.host.endpoints.clear();
    host_gone.policies.remove("prednat/gnp/np");
    host_gone.policies.remove("untracked/gnp/raw");
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
        ("a host endpoint", host),
        ("all interfaces, pre-DNAT and untracked", host_all),
        ("a pre-DNAT policy changed", host_policy),
        ("failsafe ports changed", host_failsafe),
        ("host endpoints gone", host_gone),
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

/// One ping, waiting a second: for what must be dropped.
fn ping(from: &NetNs, to: &str) -> bool {
    common::cluster::ping(from, to)
}

/// Up to five pings (a loaded machine may lose the first to ARP): for what must pass.
fn reaches(from: &NetNs, to: &str) -> bool {
    (0..5).any(|_| ping(from, to))
}

/// Up to five connection attempts: for what must pass.
fn connects_eventually(ns: &NetNs, ip: &str, port: u16) -> bool {
    (0..5).any(|_| connects(ns, ip, port))
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
    assert!(reaches(&a, "10.65.0.2") && reaches(&c, "10.65.0.2") && reaches(&b, "10.65.0.1"));

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
    assert!(reaches(&a, "10.65.0.2"), "allowed by the selector set");
    assert!(!ping(&c, "10.65.0.2"), "denied by the selector set");
    assert!(connects_eventually(&a, "10.65.0.2", 8080), "allowed port");
    assert!(!connects(&a, "10.65.0.2", 9090), "end-of-tier drop");
    assert!(!connects(&c, "10.65.0.2", 8080), "denied by set, TCP too");
    assert!(
        !ping(&b, "10.65.0.1"),
        "no egress policy, no profile: dropped"
    );
    assert!(reaches(&a, "10.65.0.3"), "the profile allows");
    // To the host: dropped by default.
    assert!(!ping(&a, "10.99.0.1"), "defaultEndpointToHostAction Drop");
    let v4 = nft_out(
        &node,
        &["list", "chain", "ip", "calico", "filter-cali-pi-gnp/b"],
    );
    let logged = v4
        .lines()
        .find(|l| l.contains("log prefix"))
        .and_then(|l| l.split("counter packets ").nth(1))
        .and_then(|n| n.split(' ').next())
        .and_then(|n| n.parse::<u64>().ok());
    assert!(
        logged >= Some(2),
        "the Log rule counted the pings (a's and c's) that reached b's policy:\n{v4}"
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
    assert!(reaches(&c, "10.65.0.2"), "c no longer denied");
    assert!(connects_eventually(&c, "10.65.0.2", 8080));
    assert!(!connects(&c, "10.65.0.2", 9090));
    assert!(
        reaches(&a, "10.99.0.1"),
        "defaultEndpointToHostAction Accept"
    );

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
    assert!(reaches(&c, "10.65.0.2"), "c still allowed");
}

/// Spoofing: a workload sending from an address its interface does not route to is
/// dropped in `raw-PREROUTING` (Calico's strict reverse-path check), in IPv4 and IPv6,
/// while its own address passes. Before our table the same spoofed packets arrive (the
/// interfaces' rp_filter sysctl is off here), so the drop is ours.
#[test]
fn spoofed_sources_from_workloads_are_dropped() {
    let Some(node) = NetNs::new("nft-rpf") else {
        return;
    };
    if !have_nft() {
        return;
    }
    node.add_uplink();
    sysctl(&node, "net.ipv4.ip_forward", "1");
    sysctl(&node, "net.ipv6.conf.all.forwarding", "1");
    sysctl(&node, "net.ipv4.conf.all.rp_filter", "0");
    let a = pod(&node, "nft-ra", "calia", "10.65.0.1");
    let b = pod(&node, "nft-rb", "calib", "10.65.0.2");
    for (p, iface, own) in [(&a, "calia", "fd00::1"), (&b, "calib", "fd00::2")] {
        sysctl(&node, &format!("net.ipv4.conf.{iface}.rp_filter"), "0");
        node.ip(&["-6", "addr", "add", "fe80::1/64", "dev", iface, "nodad"]);
        node.ip(&["-6", "route", "add", &format!("{own}/128"), "dev", iface]);
        p.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{own}/128"),
            "dev",
            "eth0",
            "nodad",
        ]);
        p.ip(&[
            "-6", "route", "add", "default", "via", "fe80::1", "dev", "eth0",
        ]);
    }
    // a also holds the addresses it will spoof.
    a.ip(&["addr", "add", "10.65.0.9/32", "dev", "eth0"]);
    a.ip(&["-6", "addr", "add", "fd00::9/128", "dev", "eth0", "nodad"]);
    // What reaches b from the spoofed addresses, counted in b.
    b.nft(
        "table inet spy {
  chain input { type filter hook input priority 0; policy accept;
    ip saddr 10.65.0.9 counter
    ip6 saddr fd00::9 counter
  }
}
",
    );
    let arrived = || {
        let out = nft_out(&b, &["list", "table", "inet", "spy"]);
        let counts: Vec<u64> = out
            .lines()
            .filter_map(|l| l.split("counter packets ").nth(1))
            .filter_map(|n| n.split(' ').next()?.parse().ok())
            .collect();
        assert_eq!(counts.len(), 2, "{out}");
        (counts[0], counts[1])
    };
    let spoof = |src: &str, dst: &str| {
        let _ = a
            .command("ping")
            .args(["-c", "2", "-i", "0.2", "-W", "1", "-I", src, dst])
            .output();
    };
    // The pods' link-local addresses finish duplicate address detection first.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while !(ping(&a, "10.65.0.2") && ping(&a, "fd00::2")) {
        assert!(
            std::time::Instant::now() < deadline,
            "genuine sources: IPv4 {}, IPv6 {}",
            ping(&a, "10.65.0.2"),
            ping(&a, "fd00::2")
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    spoof("10.65.0.9", "10.65.0.2");
    spoof("fd00::9", "fd00::2");
    let before = arrived();
    assert!(
        before.0 > 0 && before.1 > 0,
        "without our table the spoofed packets arrive: {before:?}"
    );

    let mut dp = PolicyDataplane::default();
    dp.profiles.insert(
        "open".into(),
        Chains {
            inbound: vec![rule(Action::Allow)],
            outbound: vec![rule(Action::Allow)],
        },
    );
    for (iface, name) in [("calia", "a"), ("calib", "b")] {
        dp.endpoints
            .insert(iface.into(), endpoint(name, vec![], &["open"]));
    }
    node.run_in(move || {
        PolicyTables::new()
            .write_full(&dp, &dual_stack(), "cali")
            .unwrap()
    });
    spoof("10.65.0.9", "10.65.0.2");
    spoof("fd00::9", "fd00::2");
    assert_eq!(arrived(), before, "spoofed sources dropped, both families");
    assert!(
        reaches(&a, "10.65.0.2") && reaches(&a, "fd00::2"),
        "genuine sources pass"
    );
    for fam in ["ip", "ip6"] {
        let raw = nft_out(&node, &["list", "chain", fam, "calico", "raw-PREROUTING"]);
        assert!(
            !raw.contains("counter packets 0 "),
            "{fam}: the check counted the spoofed packets:\n{raw}"
        );
    }
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
    let started = std::time::Instant::now();
    let script = calico_node::felix::nft::render::full(&dp, &Nat::default(), "cali");
    let render_ms = started.elapsed().as_secs_f64() * 1e3;
    let rules = script
        .lines()
        .filter(|l| l.starts_with("\t\t") && !l.contains("type "))
        .count();
    let (full_ms, times, add_ms) = ns.run_in(move || {
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
        // A new endpoint (a pod added): its chains and dispatch entries, by nft -f.
        let mut next = cur.clone();
        let ep = cur.endpoints.values().next().expect("endpoints").clone();
        next.endpoints.insert("calinew0000001".into(), ep);
        let delta = diff(&cur, &next);
        let started = std::time::Instant::now();
        t.apply(&next, &delta).unwrap();
        let add_ms = started.elapsed().as_secs_f64() * 1e3;
        (full_ms, times, add_ms)
    });
    let mut sorted = times.clone();
    sorted.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let p50 = sorted[sorted.len() / 2];
    let max = sorted[sorted.len() - 1];
    eprintln!(
        "nft with 1000 endpoints ({rules} rules): full apply {full_ms:.1} ms (render {render_ms:.1} ms); one relabel: p50 {p50:.2} ms, max {max:.2} ms; one endpoint added (nft -f): {add_ms:.1} ms"
    );
    assert!(p50 < 50.0, "one small transaction took {p50} ms");
}

/// What others wrote in the node's namespace: a foreign nft table and iptables-nft rules
/// (Docker style: FORWARD policy DROP, a DOCKER-USER chain, a MASQUERADE rule), as nft and
/// iptables-nft-save list them.
fn foreign_state(ns: &NetNs) -> String {
    let mut s = String::new();
    for (fam, t) in [
        ("inet", "foreign"),
        ("ip", "filter"),
        ("ip", "nat"),
        ("ip6", "filter"),
    ] {
        s += &nft_out(ns, &["list", "table", fam, t]);
    }
    let save = ns.command("iptables-nft-save").output().unwrap();
    assert!(save.status.success());
    // Without the lines that carry the time of the dump.
    for l in String::from_utf8_lossy(&save.stdout).lines() {
        if !l.starts_with('#') {
            s += l;
            s.push('\n');
        }
    }
    s
}

/// A foreign nft table and iptables-nft rules are byte-identical after our full apply,
/// incremental changes (nft -f and the netlink batch), and the removal of every
/// endpoint; our tables stay. With iptables-nft's FORWARD policy DROP (Docker), a flow our
/// policy allows is still dropped by that other table: an accept in table `calico` is
/// final for our table only (nft semantics); with the policy ACCEPT it passes.
#[test]
fn foreign_tables_and_iptables_nft_rules_stay_byte_identical() {
    let Some(node) = NetNs::new("nft-foreign") else {
        return;
    };
    if !have_nft() {
        return;
    }
    if !common::have("iptables-nft") {
        common::skip("iptables-nft is not installed");
        return;
    }
    node.add_uplink();
    sysctl(&node, "net.ipv4.ip_forward", "1");
    let a = pod(&node, "nft-fa", "calia", "10.65.0.1");
    let _b = pod(&node, "nft-fb", "calib", "10.65.0.2");
    node.nft(
        "table inet foreign {\n\
         \tset blocked { type ipv4_addr; elements = { 192.0.2.1 } }\n\
         \tchain input { type filter hook input priority 10; policy accept; ip saddr @blocked drop; }\n\
         }\n",
    );
    let ipt = |args: &[&str]| {
        let out = node.command("iptables-nft").args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    ipt(&["-N", "DOCKER-USER"]);
    ipt(&["-A", "DOCKER-USER", "-j", "RETURN"]);
    ipt(&["-A", "FORWARD", "-j", "DOCKER-USER"]);
    ipt(&[
        "-t",
        "nat",
        "-A",
        "POSTROUTING",
        "-s",
        "172.17.0.0/16",
        "!",
        "-o",
        "docker0",
        "-j",
        "MASQUERADE",
    ]);
    let ip6t = node
        .command("ip6tables-nft")
        .args(["-A", "INPUT", "-p", "tcp", "--dport", "9", "-j", "DROP"])
        .output()
        .unwrap();
    assert!(ip6t.status.success());
    let before = foreign_state(&node);

    // Full apply: a allowed to b by a set.
    let mut dp = PolicyDataplane::default();
    dp.sets.insert("s:a".into(), nets(&["10.65.0.1/32"]));
    let mut allow = rule(Action::Allow);
    allow.src.sets = vec!["s:a".into()];
    dp.policies.insert(
        "gnp/allow-a".into(),
        Chains {
            inbound: vec![allow],
            outbound: vec![],
        },
    );
    dp.profiles.insert(
        "open".into(),
        Chains {
            inbound: vec![],
            outbound: vec![rule(Action::Allow)],
        },
    );
    dp.endpoints
        .insert("calia".into(), endpoint("a", vec![], &["open"]));
    dp.endpoints.insert(
        "calib".into(),
        endpoint(
            "b",
            vec![tier("default", &["gnp/allow-a"], TierEnd::Deny)],
            &["open"],
        ),
    );
    let d = dp.clone();
    let tables = node.run_in(move || {
        let mut t = PolicyTables::new();
        t.write_full(&d, &dual_stack(), "cali").unwrap();
        t
    });
    assert_eq!(foreign_state(&node), before, "after the full apply");
    assert!(
        reaches(&a, "10.65.0.2"),
        "allowed by our policy, FORWARD policy ACCEPT"
    );

    // Docker's FORWARD policy DROP: the other table drops what ours accepted.
    ipt(&["-P", "FORWARD", "DROP"]);
    assert!(
        !ping(&a, "10.65.0.2"),
        "an accept in table calico does not override another table's drop"
    );
    ipt(&["-P", "FORWARD", "ACCEPT"]);
    let before = foreign_state(&node);

    // Incremental: a set element (netlink batch), then a new endpoint (nft -f).
    let mut next = dp.clone();
    if let Some(IpSet::Nets(s)) = next.sets.get_mut("s:a") {
        s.insert(net("10.65.0.3/32"));
    }
    let d1 = diff(&dp, &next);
    let mut last = next.clone();
    last.endpoints
        .insert("calic".into(), endpoint("c", vec![], &["open"]));
    let d2 = diff(&next, &last);
    let (n2, l2) = (next.clone(), last.clone());
    let tables = node.run_in(move || {
        let mut t = tables;
        t.apply(&n2, &d1).unwrap();
        t.apply(&l2, &d2).unwrap();
        t
    });
    assert_eq!(foreign_state(&node), before, "after incremental applies");

    // Every endpoint and policy gone: our tables stay (empty), others unchanged.
    let empty = PolicyDataplane::default();
    let d3 = diff(&last, &empty);
    node.run_in(move || {
        let mut t = tables;
        t.apply(&empty, &d3).unwrap();
    });
    assert_eq!(foreign_state(&node), before, "after removing everything");
    let ours = nft_out(&node, &["list", "table", "ip", "calico"]);
    assert!(ours.contains("chain filter-cali-FORWARD"), "{ours}");
    assert!(!ours.contains("calia"), "{ours}");
}

/// A transaction nft refuses names the step and nft's message, changes nothing, and the
/// next apply rewrites everything; a full pass with the same dataplane skips the rewrite
/// until the drift-repair interval, and then repairs drift.
#[test]
fn a_refused_delta_is_reported_and_the_next_apply_is_full() {
    use std::sync::Arc;
    use std::time::{Duration, Instant};
    let Some(ns) = NetNs::new("nft-fail") else {
        return;
    };
    if !have_nft() {
        return;
    }
    let mut dp = PolicyDataplane::default();
    dp.policies.insert("gnp/x".into(), Chains::default());
    dp.endpoints.insert(
        "calia".into(),
        endpoint("a", vec![tier("default", &["gnp/x"], TierEnd::Deny)], &[]),
    );
    let dp = Arc::new(dp);
    let d = dp.clone();
    let (err, before, t) = ns.run_in(move || {
        let mut t = PolicyTables::new();
        let now = Instant::now();
        assert!(
            t.ensure_full(&d, &Delta::full(), &Nat::default(), "cali", now, REFRESH)
                .unwrap()
        );
        assert!(
            !t.ensure_full(&d, &Delta::default(), &Nat::default(), "cali", now, REFRESH)
                .unwrap(),
            "unchanged: skipped"
        );
        let before = t.stats;
        // The policy changes to refer to a set the dataplane lacks (an inconsistent
        // calc), along with a second policy change in the same transaction.
        let mut next = (*d).clone();
        let mut r = rule(Action::Deny);
        r.src.sets = vec!["s:nope".into()];
        next.policies.insert(
            "gnp/x".into(),
            Chains {
                inbound: vec![r],
                outbound: vec![],
            },
        );
        next.policies.insert("gnp/y".into(), Chains::default());
        let delta = Delta {
            policies: BTreeSet::from(["gnp/x".to_string(), "gnp/y".to_string()]),
            ..Default::default()
        };
        let err = t.apply(&next, &delta).unwrap_err();
        (err, before, t)
    });
    let msg = err.to_string();
    assert!(
        msg.starts_with("incremental apply of table calico: nft refused"),
        "{msg}"
    );
    assert!(msg.contains("cali40s-nope"), "{msg}");
    assert_eq!(t.stats.errors, before.errors + 1);
    let listed = nft_out(&ns, &["list", "table", "ip", "calico"]);
    assert!(!listed.contains("gnp/y"), "nothing applied: {listed}");
    // A set element the kernel does not have, removed: the netlink batch is refused,
    // naming the set.
    let d = dp.clone();
    let (err, t) = ns.run_in(move || {
        let mut t = t;
        t.apply(&d, &Delta::default()).unwrap();
        let mut next = (*d).clone();
        next.sets.insert("s:a".into(), nets(&[]));
        t.apply(&next, &diff(&d, &next)).unwrap();
        let delta = Delta {
            removed: [("s:a".to_string(), nets(&["10.9.9.9/32"]))].into(),
            ..Default::default()
        };
        (t.apply(&next, &delta).unwrap_err(), t)
    });
    let msg = err.to_string();
    assert!(
        msg.contains("netlink batch") && msg.contains("set cali40s-a"),
        "{msg}"
    );

    // The next apply, whatever its delta, is full.
    let d = dp.clone();
    let mut t = ns.run_in(move || {
        let mut t = t;
        t.apply(&d, &Delta::default()).unwrap();
        t
    });
    // nft -f: the refused one, two fulls and the set's creation; one netlink batch,
    // refused.
    assert_eq!(t.stats.calls, before.calls + 4);
    assert_eq!((t.stats.set_calls, t.stats.set_errors), (1, 1));
    // Drift: our table flushed by someone; the full pass after the interval repairs it.
    let out = ns
        .command("nft")
        .args(["flush", "table", "ip", "calico"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let d = dp.clone();
    ns.run_in(move || {
        let later = Instant::now() + Duration::from_secs(91);
        let none = Delta::default();
        assert!(
            t.ensure_full(&d, &none, &Nat::default(), "cali", later, REFRESH)
                .unwrap()
        );
        assert!(
            !t.ensure_full(&d, &none, &Nat::default(), "cali", later, REFRESH)
                .unwrap()
        );
    });
    let listed = nft_out(&ns, &["list", "table", "ip", "calico"]);
    assert!(
        listed.contains("\"calia\" : goto filter-cali-fw-calia"),
        "{listed}"
    );
}

/// A full pass after an incremental apply of an equal dataplane (another `Arc`) writes
/// nothing; one with a different dataplane, NAT or prefix rewrites.
#[test]
fn a_full_pass_skips_what_an_apply_already_wrote() {
    use std::sync::Arc;
    use std::time::Instant;
    let Some(ns) = NetNs::new("nft-skip") else {
        return;
    };
    if !have_nft() {
        return;
    }
    let t = ns.run_in(|| {
        let mut t = PolicyTables::new();
        let now = Instant::now();
        let base = Arc::new(rich());
        assert!(
            t.ensure_full(&base, &Delta::full(), &Nat::default(), "cali", now, REFRESH)
                .unwrap()
        );
        let mut next = rich();
        next.endpoints.remove("calib");
        let next = Arc::new(next);
        t.apply(&next, &diff(&base, &next)).unwrap();
        t.written(&next);
        let calls = t.stats.calls;
        let equal = Arc::new((*next).clone());
        let none = Delta::default();
        assert!(
            !t.ensure_full(&equal, &none, &Nat::default(), "cali", now, REFRESH)
                .unwrap()
        );
        assert_eq!(t.stats.calls, calls, "nothing written");
        // Another dataplane, its delta known, tables untouched since our write: the delta
        // is written, not the table (it keeps its handle, and the rule handles of what
        // did not change).
        let handle = || {
            let out = std::process::Command::new("nft")
                .args(["-a", "list", "table", "ip", "calico"])
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            text.lines().next().unwrap_or_default().to_string()
        };
        let before = handle();
        let back = diff(&next, &base);
        assert!(
            t.ensure_full(&base, &back, &Nat::default(), "cali", now, REFRESH)
                .unwrap()
        );
        assert_eq!(handle(), before, "the delta only, not a new table");
        assert!(
            !t.ensure_full(&base, &none, &Nat::default(), "cali", now, REFRESH)
                .unwrap()
        );
        // NAT or prefix changed: rewritten whole (a new table).
        assert!(
            t.ensure_full(&base, &none, &dual_stack(), "cali", now, REFRESH)
                .unwrap()
        );
        assert_ne!(handle(), before, "a new table");
        assert!(
            t.ensure_full(&base, &none, &dual_stack(), "tap", now, REFRESH)
                .unwrap()
        );
        assert!(
            !t.ensure_full(&base, &none, &dual_stack(), "tap", now, REFRESH)
                .unwrap()
        );
        // Much later, nothing has written nftables since: still nothing to repair.
        let later = now + std::time::Duration::from_secs(600);
        assert!(
            !t.ensure_full(&base, &none, &dual_stack(), "tap", later, REFRESH)
                .unwrap()
        );
        t
    });
    // Someone writes nftables (their own table): the next full pass past the interval
    // rewrites ours (it cannot tell what changed).
    ns.nft("table inet theirs {\n}\n");
    ns.run_in(move || {
        let mut t = t;
        let base = Arc::new(rich());
        let later = Instant::now() + std::time::Duration::from_secs(600);
        let none = Delta::default();
        assert!(
            t.ensure_full(&base, &none, &dual_stack(), "tap", later, REFRESH)
                .unwrap()
        );
        assert!(
            !t.ensure_full(&base, &none, &dual_stack(), "tap", later, REFRESH)
                .unwrap()
        );
    });
}

/// The kept netlink socket: batches of set elements and generation reads, many on one
/// socket; a batch the kernel refuses (an unknown set) leaves nothing half-written and
/// the next batches on the same socket are answered for themselves (their own sequence
/// numbers), each transaction moving the generation by one.
#[test]
fn one_netlink_socket_carries_many_batches_and_survives_a_refused_one() {
    use calico_node::felix::nft::netlink::{BatchError, Conn, ElementChange};
    use calico_node::felix::nft::render::Element;
    let Some(ns) = NetNs::new("nft-conn") else {
        return;
    };
    if !have_nft() {
        return;
    }
    ns.nft("table ip calico {\n  set cali40s-a { type ipv4_addr; flags interval; }\n}\n");
    let change = |set: &str, add: bool, last: u8| ElementChange {
        v6: false,
        set: set.to_string(),
        add,
        elements: vec![Element::Net(net(&format!("10.65.0.{last}/32")))],
    };
    let errors = ns.run_in(move || {
        let mut c = Conn::open().unwrap();
        let mut errors = Vec::new();
        let g0 = c.generation().unwrap();
        for k in 1..=20u8 {
            c.write(&[change("cali40s-a", true, k)]).unwrap();
        }
        assert_eq!(c.generation().unwrap(), g0.wrapping_add(20));
        // Refused whole: the good half of the batch is not written either.
        let refused = c.write(&[
            change("cali40s-a", true, 100),
            change("cali40s-nope", true, 101),
        ]);
        match refused {
            Err(BatchError::Refused { set, .. }) => errors.push(set),
            other => panic!("refused batch: {other:?}"),
        }
        assert_eq!(
            c.generation().unwrap(),
            g0.wrapping_add(20),
            "nothing committed"
        );
        for k in 1..=10u8 {
            c.write(&[change("cali40s-a", false, k)]).unwrap();
        }
        assert_eq!(c.generation().unwrap(), g0.wrapping_add(30));
        errors
    });
    assert_eq!(errors, ["cali40s-nope"]);
    let listed = nft_out(&ns, &["list", "set", "ip", "calico", "cali40s-a"]);
    for k in 1..=20 {
        let a = format!("10.65.0.{k}");
        let present = listed.contains(&format!("{a},")) || listed.contains(&format!("{a} "));
        assert_eq!(present, k > 10, "{a} in\n{listed}");
    }
    assert!(!listed.contains("10.65.0.100"), "{listed}");
}
