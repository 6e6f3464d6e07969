//! Policy inside a running calico-node (one node namespace, real etcd): a policy selecting
//! a local workload becomes active (`felix_active_local_policies`,
//! `felix_active_local_selectors`); relabelling the workload so that the policy no longer
//! selects it is applied as a policy-only change, without a full pass over the dataplane
//! (the route table's full resync count does not move while the policy apply count
//! does); deleting the policy leaves nothing active. Calico's etcd-mode start-up wrote
//! `defaultEndpointToHostAction: Return` for this node.

mod common;

use std::process::Stdio;
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
    let (health_port, metrics_port) = (free_port(), free_port());
    let state = tempfile::tempdir().unwrap();
    let log = std::fs::File::create(state.path().join("calico-node.log")).unwrap();
    let child = ns
        .command(env!("CARGO_BIN_EXE_calico-node"))
        .env_clear()
        .env("NODENAME", "node-a")
        .env("ETCD_ENDPOINTS", format!("http://127.0.0.1:{etcd_port}"))
        .env("IP_AUTODETECTION_METHOD", "interface=eth1")
        .env("CALICO_IPV4POOL_CIDR", "10.244.0.0/16")
        .env("CALICO_IPV4POOL_VXLAN", "Always")
        .env("CALICO_STATE_DIR", state.path())
        .env(
            "CALICO_BGP_STATUS_SOCKET",
            state.path().join("bgp-status.sock"),
        )
        .env("FELIX_HEALTHPORT", health_port.to_string())
        .env("FELIX_PROMETHEUSMETRICSENABLED", "true")
        .env("FELIX_PROMETHEUSMETRICSPORT", metrics_port.to_string())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let _daemon = common::Process(child);
    let ready = || {
        ns.run_in(move || http_get(health_port, "/readiness"))
            .is_ok_and(|(s, _)| s == 200)
    };
    common::until("calico-node ready", Duration::from_secs(30), ready);
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
