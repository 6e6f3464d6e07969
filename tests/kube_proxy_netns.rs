//! kube-proxy in iptables mode beside calico-node (issue 18, point 4), through
//! iptables-nft and through iptables-legacy: two node namespaces on a bridge, etcd in the
//! hub on 2379, a Service `default/web:http` (ClusterIP 10.96.0.10:80, NodePort 30080)
//! whose one backend is pod a on node-1, written in both nodes with kube-proxy's own rule
//! shapes (`common::kube_proxy`). Clients: pod c on node-1 (same node), pod b on node-2
//! (other node), the hub and node-2's host for the NodePort (from outside).
//!
//! - Service traffic reaches the backend while policy allows it; a policy on the backend
//!   denying pod b drops pod b's ClusterIP traffic and not pod c's; a pre-DNAT policy on
//!   node-1's host endpoint denies the NodePort from node-2 and not from the hub.
//! - kube-proxy writing its chains again (its periodic sync) changes nothing of ours, and
//!   none of this (calico-node's start, applies and restart) changes kube-proxy's rules.

mod common;

use std::time::Duration;

use common::NetNs;
use common::cluster::{Lab, add_pod, calicoctl, pod_ipv4};
use common::kube_proxy::{Backend, Service, saved, sync};
use common::policy::{
    Case, HEP_NODE1_ETH0, NODEPORT_NOT_FROM_NODE2, Proto, Servers, allow_pod_network, case,
    expect_traffic, nft_ruleset,
};

const LIMIT: Duration = Duration::from_secs(20);
const CLUSTER_IP: &str = "10.96.0.10";
const CLUSTER_CIDR: &str = "10.244.0.0/16";

/// Our table as nft lists it without counters.
fn ours(ns: &NetNs) -> String {
    let out = ns
        .command("nft")
        .args(["-s", "list", "table", "ip", "calico"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn services_with_kube_proxy(backend: Backend) {
    let prefix = match backend {
        Backend::Nft => "kpn",
        Backend::Legacy => "kpl",
    };
    let Some(lab) = Lab::with_etcd_port(prefix, 2, 2379) else {
        return;
    };
    for tool in ["nft", backend.restore(), backend.save()] {
        if !common::have(tool) {
            common::skip(&format!("{tool} is not installed"));
            return;
        }
    }
    let Some(pc) = NetNs::new("kppc") else {
        return;
    };
    let (n1, n2, hub) = (&lab.nodes[0], &lab.nodes[1], &lab.hub);
    let mut node1 = Some(lab.start_node(0, &[]));
    let _node2 = lab.start_node(1, &[]);
    lab.wait_ready(LIMIT);
    allow_pod_network(n1, &lab.ep, lab.states[0].path(), &["10.99.0.0/24"]);
    let pa = add_pod(n1, "node-1", &lab.ep, &lab.pa);
    add_pod(n2, "node-2", &lab.ep, &lab.pb);
    add_pod(n1, "node-1", &lab.ep, &pc);
    let pb = pod_ipv4(&lab.pb);
    let _servers = Servers::start(&lab.pa, &[80], &[]);
    let apply = |yaml: &str| {
        calicoctl(
            n1,
            &lab.ep,
            lab.states[0].path(),
            &["apply", "-f", "-"],
            yaml,
        );
    };

    // kube-proxy on both nodes, after calico-node (the order a node's agents start in
    // is anyone's).
    let services = vec![
        Service {
            namespace: "default".into(),
            name: "web".into(),
            port_name: "http".into(),
            cluster_ip: CLUSTER_IP.into(),
            port: 80,
            node_port: 30080,
            endpoints: vec![format!("{pa}:80")],
        },
        // Two endpoints (kube-proxy's statistic match); not probed.
        Service {
            namespace: "default".into(),
            name: "both".into(),
            port_name: "http".into(),
            cluster_ip: "10.96.0.11".into(),
            port: 80,
            node_port: 0,
            endpoints: vec![format!("{pa}:80"), format!("{pb}:80")],
        },
    ];
    for n in [n1, n2] {
        sync(n, backend, &services, CLUSTER_CIDR);
    }
    let kube_rules = [saved(n1, backend), saved(n2, backend)];
    assert!(kube_rules[0].contains("KUBE-SVC-"), "{}", kube_rules[0]);
    let context = || {
        format!(
            "node-1 nft:\n{}\nnode-1 {}:\n{}\nlogs:\n{}",
            nft_ruleset(n1),
            backend.save(),
            saved(n1, backend),
            lab.logs()
        )
    };
    let expect = |phase: &str, cases: &[Case]| {
        expect_traffic(phase, LIMIT, cases, context);
    };
    let cluster_ip = |who: &str, from: &NetNs, passes: bool| {
        case(
            &format!("{who} -> ClusterIP"),
            from,
            CLUSTER_IP,
            Proto::Tcp(80),
            passes,
        )
    };
    let node_port = |who: &str, from: &NetNs, passes: bool| {
        case(
            &format!("{who} -> NodePort"),
            from,
            "10.99.0.1",
            Proto::Tcp(30080),
            passes,
        )
    };
    expect(
        "services with policy allowing",
        &[
            cluster_ip("pod c (same node)", &pc, true),
            cluster_ip("pod b (other node)", &lab.pb, true),
            node_port("hub", hub, true),
            node_port("node-2 host", n2, true),
        ],
    );

    // The backend's ingress policy denies pod b.
    apply(&format!(
        r#"
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata:
  name: backend-not-from-b
spec:
  selector: all()
  types: [Ingress]
  ingress:
  - action: Deny
    source: {{nets: ["{pb}/32"]}}
    destination: {{nets: ["{pa}/32"]}}
  - action: Allow
"#
    ));
    let denied_b = [
        cluster_ip("pod c (same node)", &pc, true),
        cluster_ip("pod b (other node)", &lab.pb, false),
    ];
    expect("backend policy denies pod b", &denied_b);

    // A pre-DNAT policy on node-1's host endpoint denies the NodePort from node-2.
    apply(HEP_NODE1_ETH0);
    apply(NODEPORT_NOT_FROM_NODE2);
    let all = [
        denied_b[0].clone(),
        denied_b[1].clone(),
        node_port("hub", hub, true),
        node_port("node-2 host", n2, false),
    ];
    expect("pre-DNAT on the NodePort", &all);

    // kube-proxy's periodic sync rewrites its chains: nothing of ours moves, and the
    // traffic stays as it was.
    let before = ours(n1);
    for n in [n1, n2] {
        sync(n, backend, &services, CLUSTER_CIDR);
    }
    assert_eq!(ours(n1), before, "kube-proxy's sync changed our table");
    expect("after kube-proxy's sync", &all);

    // A calico-node restart: kube-proxy's rules untouched through it all.
    drop(node1.take());
    node1 = Some(lab.start_node(0, &[]));
    lab.wait_ready(LIMIT);
    expect("after calico-node's restart", &all);
    assert_eq!(
        saved(n1, backend),
        kube_rules[0],
        "calico-node changed kube-proxy's rules"
    );
    assert_eq!(
        saved(n2, backend),
        kube_rules[1],
        "calico-node changed kube-proxy's rules"
    );
    drop(node1);
}

#[test]
fn services_with_kube_proxy_iptables_nft() {
    services_with_kube_proxy(Backend::Nft);
}

#[test]
fn services_with_kube_proxy_iptables_legacy() {
    services_with_kube_proxy(Backend::Legacy);
}

/// kube-proxy's chain names, from its own tests: `ns1/svc1:p80` over TCP, endpoint
/// 10.180.0.1:80.
#[test]
fn chain_names_are_kube_proxys() {
    let s = Service {
        namespace: "ns1".into(),
        name: "svc1".into(),
        port_name: "p80".into(),
        cluster_ip: "172.30.0.41".into(),
        port: 80,
        node_port: 0,
        endpoints: vec![],
    };
    assert_eq!(s.svc_chain(), "KUBE-SVC-XPGD46QRK7WJZT7O");
    assert_eq!(s.sep_chain("10.180.0.1:80"), "KUBE-SEP-SXIVWICOYRO3J4NJ");
}
