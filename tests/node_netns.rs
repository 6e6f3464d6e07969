//! calico-node started in a fresh network namespace with a real etcd there: readiness says
//! why it is not ready until the datastore is up, then flips; the Node (autodetected IP),
//! the default pool, ClusterInformation and the nodename file are written; the metrics
//! pass `promtool check metrics`; SIGTERM exits 0 within 2 s.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{Etcd, NetNs, free_port, have, http_get, skip, wait_http};

#[test]
fn node_starts_registers_serves_health_and_metrics_and_stops_on_sigterm() {
    let Some(ns) = NetNs::new("cn-node") else {
        return;
    };
    if !have("promtool") {
        skip("promtool is not installed (scripts/test installs prometheus)");
        return;
    }
    // Two interfaces: the autodetection method must pick eth1's address.
    ns.add_host_veth(&["10.99.7.1/24"], &["10.99.8.1/24"]);

    let etcd_port = free_port();
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
        .env("CALICO_IPAM_GC_INTERVAL", "1")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let mut daemon = common::Process(child);

    // No etcd yet: not ready, and the body says why.
    let body = wait_http(&ns, health_port, "/readiness", 503, Duration::from_secs(10));
    let report: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(report["ready"], false);
    let startup = report["reporters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "startup")
        .unwrap();
    assert!(
        startup["reason"]
            .as_str()
            .unwrap()
            .contains("waiting for the datastore"),
        "{body}"
    );
    let live: serde_json::Value = serde_json::from_str(&wait_http(
        &ns,
        health_port,
        "/liveness",
        200,
        Duration::from_secs(5),
    ))
    .unwrap();
    assert_eq!(live["live"], true, "alive while waiting for the datastore");

    // Start etcd in the namespace on the port calico-node is waiting for.
    let Some(etcd) = Etcd::start_on(Some(&ns.name), etcd_port) else {
        return;
    };
    let body = wait_http(&ns, health_port, "/readiness", 200, Duration::from_secs(30));
    let report: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(report["ready"], true, "{body}");

    let node: serde_json::Value = serde_json::from_str(
        &etcd.etcdctl_value("/calico/resources/v3/projectcalico.org/nodes/node-a"),
    )
    .unwrap();
    assert_eq!(node["spec"]["bgp"]["ipv4Address"], "10.99.8.1/24");
    let pool: serde_json::Value = serde_json::from_str(
        &etcd.etcdctl_value("/calico/resources/v3/projectcalico.org/ippools/default-ipv4-ippool"),
    )
    .unwrap();
    assert_eq!(pool["spec"]["cidr"], "10.244.0.0/16");
    assert_eq!(pool["spec"]["vxlanMode"], "Always");
    assert_eq!(pool["spec"]["natOutgoing"], true);
    let ci: serde_json::Value = serde_json::from_str(
        &etcd.etcdctl_value("/calico/resources/v3/projectcalico.org/clusterinformations/default"),
    )
    .unwrap();
    assert_eq!(ci["spec"]["datastoreReady"], true);
    assert_eq!(
        std::fs::read_to_string(state.path().join("nodename")).unwrap(),
        "node-a"
    );

    // Metrics: real syncer values, clean for promtool.
    let metrics = wait_http(&ns, metrics_port, "/metrics", 200, Duration::from_secs(5));
    assert!(metrics.contains("calico_syncer_in_sync 1"), "{metrics}");
    assert!(
        metrics.contains("calico_syncer_resyncs_total 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("calico_syncer_events_total{kind=\"IPPool\",type=\"new\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("process_resident_memory_bytes"),
        "{metrics}"
    );
    let file = state.path().join("metrics.txt");
    std::fs::write(&file, &metrics).unwrap();
    let check = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("promtool check metrics < {}", file.display()))
        .output()
        .unwrap();
    // Calico's nft counters keep Calico's names, without the `_total` promtool's lint wants
    // (felix/nftables/table.go and ipsets.go declare them as counters): that one remark,
    // for those names, is expected; anything else promtool says is a defect.
    let calico_counters = [
        "felix_nft_calls",
        "felix_nft_errors",
        "felix_nft_set_calls",
        "felix_nft_set_errors",
    ];
    let said = String::from_utf8_lossy(&check.stdout).to_string()
        + &String::from_utf8_lossy(&check.stderr);
    let remarks: Vec<&str> = said
        .lines()
        .filter(|l| {
            !calico_counters
                .iter()
                .any(|c| *l == format!("{c} counter metrics should have \"_total\" suffix"))
        })
        .collect();
    assert!(
        check.status.success() || remarks.is_empty(),
        "promtool: {said}"
    );

    // The node's IPAM collector frees an allocation nobody owns, and only that one.
    let endpoint = etcd.endpoint();
    let (leaked, kept) = ns.run_in(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(async move {
                let ds = Etcd::config_for(&endpoint).connect().await.unwrap();
                let ipam = calico_node::ipam::Ipam::new(ds.clone());
                let leaked = ipam
                    .auto_assign(&calico_node::ipam::AssignArgs::v4(
                        "k8s-pod-network.leak",
                        "node-a",
                    ))
                    .await
                    .unwrap()[0];
                let kept = ipam
                    .auto_assign(&calico_node::ipam::AssignArgs::v4(
                        "k8s-pod-network.pod",
                        "node-a",
                    ))
                    .await
                    .unwrap()[0];
                let mut wep = calico_node::model::WorkloadEndpoint::new(
                    "node--a-k8s-pod-eth0",
                    calico_node::model::WorkloadEndpointSpec {
                        node: "node-a".into(),
                        ip_networks: vec![format!("{kept}/32")],
                        ..Default::default()
                    },
                );
                wep.metadata.namespace = Some("default".into());
                calico_node::datastore::Client::new(ds)
                    .create(wep)
                    .await
                    .unwrap();
                (leaked, kept)
            })
    });
    let deadline = Instant::now() + Duration::from_secs(15);
    while !etcd
        .etcdctl_value("/calico/ipam/v2/handle/k8s-pod-network.leak")
        .is_empty()
    {
        assert!(Instant::now() < deadline, "leaked {leaked} never collected");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_ne!(
        etcd.etcdctl_value("/calico/ipam/v2/handle/k8s-pod-network.pod"),
        "",
        "{kept} belongs to a pod and stays"
    );
    let metrics = wait_http(&ns, metrics_port, "/metrics", 200, Duration::from_secs(5));
    assert!(
        metrics.contains("calico_ipam_gc_released_total 1"),
        "{metrics}"
    );

    // BGP peers that cannot be reached: readiness and `calicoctl node status` say why.
    for (name, ip, asn) in [
        ("refuses", "127.0.0.1:1790", 64512),
        ("unreachable", "10.200.0.1", 65000),
    ] {
        etcd.etcdctl(&[
            "put",
            &format!("/calico/resources/v3/projectcalico.org/bgppeers/{name}"),
            &format!(
                r#"{{"kind":"BGPPeer","apiVersion":"projectcalico.org/v3","metadata":{{"name":"{name}"}},"spec":{{"peerIP":"{ip}","asNumber":{asn}}}}}"#
            ),
        ]);
    }
    let body = wait_http(&ns, health_port, "/readiness", 503, Duration::from_secs(10));
    let mut why = body.clone();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !(why.contains("BGP not established with 127.0.0.1: connect failed: Connection refused")
        && why.contains(
            "BGP not established with 10.200.0.1: connect failed: Network is unreachable",
        ))
    {
        assert!(
            Instant::now() < deadline,
            "readiness does not say why: {why}"
        );
        std::thread::sleep(Duration::from_millis(100));
        why = ns
            .run_in(move || http_get(health_port, "/readiness"))
            .unwrap()
            .1;
    }
    let socket = state.path().join("bgp-status.sock");
    let status = ns.run_in(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_calicoctl"))
            .args(["node", "status"])
            .env_clear()
            .env("CALICO_BGP_STATUS_SOCKET", socket)
            .output()
            .unwrap()
    });
    let text = String::from_utf8_lossy(&status.stdout);
    let row = |peer: &str| {
        text.lines()
            .find(|l| l.starts_with(&format!("| {peer} ")))
            .unwrap_or_default()
            .to_string()
    };
    assert!(row("127.0.0.1").contains("| global    | start |"), "{text}");
    assert!(
        row("127.0.0.1").contains("connect failed: Connection refused"),
        "{text}"
    );
    assert!(
        row("10.200.0.1").contains("Network is unreachable"),
        "{text}"
    );

    // SIGTERM: exit 0 within 2 s.
    let pid = nix::unistd::Pid::from_raw(daemon.0.id() as i32);
    let sent = Instant::now();
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = loop {
        if let Some(s) = daemon.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            sent.elapsed() < Duration::from_secs(2),
            "calico-node still running 2 s after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        status.success(),
        "exit status {status:?}; log: {}",
        std::fs::read_to_string(state.path().join("calico-node.log")).unwrap()
    );
}
