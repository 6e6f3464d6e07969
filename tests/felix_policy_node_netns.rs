//! Policy inside a running calico-node (one node namespace, real etcd): a policy selecting
//! a local workload becomes active (`felix_active_local_policies`,
//! `felix_active_local_selectors`); relabelling the workload so that the policy no longer
//! selects it is applied as a policy-only change, without a full pass over the dataplane
//! (the route table's full resync count does not move while the policy apply count
//! does); deleting the policy leaves nothing active. Calico's etcd-mode start-up wrote
//! `defaultEndpointToHostAction: Return` for this node.

mod common;

use std::time::Duration;

use common::{Etcd, NetNs, free_port, http_get};

const RES: &str = "/calico/resources/v3/projectcalico.org";

fn wep(app: &str) -> String {
    format!(
        r#"{{"kind":"WorkloadEndpoint","apiVersion":"projectcalico.org/v3","metadata":{{"name":"node--a-k8s-db-eth0","namespace":"ns1","labels":{{"app":"{app}","projectcalico.org/namespace":"ns1","projectcalico.org/orchestrator":"k8s"}}}},"spec":{{"orchestrator":"k8s","node":"node-a","pod":"db","endpoint":"eth0","ipNetworks":["10.244.0.5/32"],"interfaceName":"calipol1"}}}}"#
    )
}

#[test]
fn a_relabel_is_a_policy_only_change_and_the_policy_gauges_follow() {
    let Some(ns) = NetNs::new("cn-fpol") else {
        return;
    };
    ns.add_host_veth(&[], &["10.99.9.1/24"]);
    // The workload's host side (its peer stays here too: only the name matters).
    ns.ip(&[
        "link",
        "add",
        "calipol1",
        "type",
        "veth",
        "peer",
        "name",
        "calipol1p",
    ]);
    ns.ip(&["link", "set", "calipol1", "up"]);
    ns.ip(&["link", "set", "calipol1p", "up"]);
    let etcd_port = free_port();
    let Some(etcd) = Etcd::start_on(Some(&ns.name), etcd_port) else {
        return;
    };
    let node = common::VxlanNode::start(&ns, etcd_port);
    let (health_port, metrics_port, state) = (node.health_port, node.metrics_port, &node.state);
    let ready = || {
        ns.run_in(move || http_get(health_port, "/readiness"))
            .is_ok_and(|(s, _)| s == 200)
    };
    let metric = |line: &str| -> Option<f64> {
        let line = line.to_string();
        let (_, body) = ns.run_in(move || http_get(metrics_port, "/metrics")).ok()?;
        body.lines()
            .find_map(|l| l.strip_prefix(&line)?.strip_prefix(' ')?.parse().ok())
    };

    // Calico's etcd-mode start-up: this node's FelixConfiguration says Return.
    let fc = etcd.etcdctl_value(&format!("{RES}/felixconfigurations/node.node-a"));
    assert!(
        fc.contains(r#""defaultEndpointToHostAction":"Return""#),
        "{fc}"
    );

    let wep_key = format!("{RES}/workloadendpoints/ns1/node--a-k8s-db-eth0");
    etcd.etcdctl(&["put", &wep_key, &wep("db")]);
    etcd.etcdctl(&[
        "put",
        &format!("{RES}/globalnetworkpolicies/db"),
        r#"{"kind":"GlobalNetworkPolicy","apiVersion":"projectcalico.org/v3","metadata":{"name":"db"},"spec":{"selector":"app == 'db'","types":["Ingress"],"ingress":[{"action":"Allow","protocol":"TCP","source":{"selector":"role == 'web'"},"destination":{"ports":[5432]}}]}}"#,
    ]);
    common::until(
        "the policy active on this node",
        Duration::from_secs(10),
        || metric("felix_active_local_policies") == Some(1.0),
    );
    assert_eq!(metric("felix_active_local_selectors"), Some(1.0));
    assert_eq!(metric("felix_active_local_endpoints"), Some(1.0));
    // What the executor wrote: the policy's chain, the selector's set (Calico's name), and
    // the workload's chain jumping to the policy.
    use calico_node::felix::nft::render;
    use calico_node::felix::policy::calc::selector_set_id;
    let web = render::set_name(
        &selector_set_id(&calico_node::model::selector::Selector::parse("role == 'web'").unwrap()),
        false,
    );
    let pi = render::policy_chain("gnp/db", true);
    let tw = render::endpoint_chain("calipol1", true);
    let table = || {
        let out = ns
            .command("nft")
            .args(["list", "table", "ip", "calico"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    common::until("the policy in nftables", Duration::from_secs(10), || {
        let t = table();
        t.contains(&format!("chain {pi}")) && t.contains(&format!("set {web}"))
    });
    let chain_of = |name: &str| {
        let t = table();
        let start = t
            .find(&format!("chain {name} {{"))
            .unwrap_or_else(|| panic!("{name}: {t}"));
        t[start..].split("\n\t}").next().unwrap().to_string()
    };
    assert!(chain_of(&tw).contains(&pi), "{}", chain_of(&tw));
    common::until("ready with the workload", Duration::from_secs(10), ready);

    // Settle (kernel events of our own writes are debounced), then relabel.
    std::thread::sleep(Duration::from_millis(500));
    let full_passes = metric("felix_route_table_resync_seconds_count").unwrap();
    let applies = metric("felix_int_dataplane_apply_time_seconds_count").unwrap();
    etcd.etcdctl(&["put", &wep_key, &wep("web")]);
    common::until(
        "the policy no longer active",
        Duration::from_secs(10),
        || metric("felix_active_local_policies") == Some(0.0),
    );
    assert_eq!(metric("felix_active_local_selectors"), Some(0.0));
    assert_eq!(
        metric("felix_route_table_resync_seconds_count"),
        Some(full_passes),
        "a label change made a full pass"
    );
    assert!(
        metric("felix_int_dataplane_apply_time_seconds_count").unwrap() > applies,
        "the policy apply was not timed"
    );
    common::until(
        "the policy gone from nftables",
        Duration::from_secs(10),
        || !table().contains(&format!("chain {pi}")),
    );
    assert!(!chain_of(&tw).contains(&pi), "{}", chain_of(&tw));

    // Back, then the policy goes.
    etcd.etcdctl(&["put", &wep_key, &wep("db")]);
    common::until("active again", Duration::from_secs(10), || {
        metric("felix_active_local_policies") == Some(1.0)
    });
    etcd.etcdctl(&["del", &format!("{RES}/globalnetworkpolicies/db")]);
    common::until("nothing active", Duration::from_secs(10), || {
        metric("felix_active_local_policies") == Some(0.0)
    });
    assert!(
        ready(),
        "not ready at the end: {}",
        std::fs::read_to_string(state.path().join("calico-node.log")).unwrap_or_default()
    );
}
