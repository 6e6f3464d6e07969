//! The calicoctl binary against a real etcd: apply -> get -o yaml round trip, a bad
//! document in a multi-document file writes nothing, Calico's `-o wide` columns, exit
//! codes and the config file.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use common::{Etcd, assert_golden, calicoctl, ok};

const RESOURCES: &str = "\
apiVersion: projectcalico.org/v3
kind: IPPool
metadata:
  name: pool-a
spec:
  cidr: 10.65.0.0/16
  ipipMode: CrossSubnet
  natOutgoing: true
---
apiVersion: projectcalico.org/v3
kind: IPPool
metadata:
  name: pool-b
spec:
  cidr: 10.66.0.0/16
  vxlanMode: Always
  blockSize: 24
  nodeSelector: \"zone == 'a'\"
---
apiVersion: projectcalico.org/v3
kind: Node
metadata:
  name: node-1
spec:
  bgp:
    ipv4Address: 10.99.0.1/24
    asNumber: 65001
---
apiVersion: projectcalico.org/v3
kind: Node
metadata:
  name: node-2
spec:
  bgp:
    ipv4Address: 10.99.0.2/24
---
apiVersion: projectcalico.org/v3
kind: BGPPeer
metadata:
  name: tor
spec:
  peerIP: 10.99.0.254:1179
  asNumber: 64600
";

#[test]
fn apply_get_yaml_round_trip_and_wide_columns() {
    let Some(etcd) = Etcd::start() else { return };
    assert_eq!(
        ok(&calicoctl(&etcd, &["apply", "-f", "-"], RESOURCES)),
        "Successfully applied 5 resource(s)\n"
    );

    assert_golden(
        "calicoctl_get_ippools_wide.txt",
        &ok(&calicoctl(&etcd, &["get", "ippools", "-o", "wide"], "")),
    );
    assert_golden(
        "calicoctl_get_nodes_wide.txt",
        &ok(&calicoctl(&etcd, &["get", "nodes", "-o", "wide"], "")),
    );
    assert_golden(
        "calicoctl_get_bgpp.txt",
        &ok(&calicoctl(&etcd, &["get", "bgpp"], "")),
    );
    assert_eq!(
        ok(&calicoctl(&etcd, &["get", "ipp"], "")),
        "NAME     CIDR           SELECTOR      \npool-a   10.65.0.0/16   all()         \npool-b   10.66.0.0/16   zone == 'a'   \n"
    );

    // get -o yaml of one resource, applied again, changes nothing but the revision.
    let yaml = ok(&calicoctl(
        &etcd,
        &["get", "ippool", "pool-b", "-o", "yaml"],
        "",
    ));
    let doc: serde_yaml::Value = serde_yaml::from_str(&yaml).unwrap();
    assert_eq!(doc["kind"], "IPPool");
    assert_eq!(doc["spec"]["cidr"], "10.66.0.0/16");
    assert_eq!(doc["spec"]["blockSize"], 24);
    assert_eq!(doc["spec"]["vxlanMode"], "Always");
    assert_eq!(doc["spec"]["ipipMode"], "Never");
    assert!(doc["metadata"]["resourceVersion"].as_str().is_some());
    let before = etcd.etcdctl_value("/calico/resources/v3/projectcalico.org/ippools/pool-b");
    assert_eq!(
        ok(&calicoctl(&etcd, &["apply", "-f", "-"], &yaml)),
        "Successfully applied 1 'IPPool' resource(s)\n"
    );
    assert_eq!(
        etcd.etcdctl_value("/calico/resources/v3/projectcalico.org/ippools/pool-b"),
        before
    );
    // A list round trips too.
    let list = ok(&calicoctl(&etcd, &["get", "nodes", "-o", "yaml"], ""));
    assert!(list.contains("kind: NodeList"), "{list}");
    assert_eq!(
        ok(&calicoctl(&etcd, &["replace", "-f", "-"], &list)),
        "Successfully replaced 2 'Node' resource(s)\n"
    );
    // JSON output parses back to the same spec.
    let json: serde_json::Value = serde_json::from_str(&ok(&calicoctl(
        &etcd,
        &["get", "node", "node-1", "-o", "json"],
        "",
    )))
    .unwrap();
    assert_eq!(json["spec"]["bgp"]["asNumber"], 65001);
}

#[test]
fn one_bad_document_writes_nothing_and_names_the_field() {
    let Some(etcd) = Etcd::start() else { return };
    let bad = format!(
        "{RESOURCES}---\napiVersion: projectcalico.org/v3\nkind: BGPPeer\nmetadata:\n  name: bad-peer\nspec:\n  peerIP: 10.99.0.1:99999\n  asNumber: 64600\n"
    );
    let out = calicoctl(&etcd, &["apply", "-f", "-"], &bad);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "Failed to apply any resources: document 6 (BGPPeer \"bad-peer\"): error with field spec.peerIP = '10.99.0.1:99999' (must be an IP address, IPv4:port or [IPv6]:port)\n"
    );
    assert!(out.stdout.is_empty());
    assert_eq!(
        etcd.etcdctl(&["get", "--prefix", "/calico/", "--keys-only"])
            .trim(),
        "",
        "nothing written"
    );

    // A decode error (wrong type) also names the document and the field.
    let out = calicoctl(
        &etcd,
        &["create", "-f", "-"],
        "apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata:\n  name: p\nspec:\n  cidr: 10.1.0.0/16\n  natOutgoing: sometimes\n",
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("document 1 (IPPool \"p\"): error with field spec.natOutgoing: invalid type: string \"sometimes\", expected a boolean"), "{err}");
}

#[test]
fn errors_exit_1_on_stderr_and_config_file_is_honoured() {
    let Some(etcd) = Etcd::start() else { return };
    let out = calicoctl(&etcd, &["get", "ippool", "missing"], "");
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "resource does not exist: IPPool(missing)\n"
    );
    let out = calicoctl(&etcd, &["get", "pods"], "");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).starts_with("resource type 'pods' is not supported")
    );

    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("calicoctl.cfg");
    std::fs::write(&cfg, format!("apiVersion: projectcalico.org/v3\nkind: CalicoAPIConfig\nmetadata:\nspec:\n  datastoreType: etcdv3\n  etcdEndpoints: {}\n", etcd.endpoint())).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_calicoctl"))
        .args(["-c", cfg.to_str().unwrap(), "create", "-f", "-"])
        .env("ETCD_ENDPOINTS", "http://127.0.0.1:1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            c.stdin.take().unwrap().write_all(b"apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata:\n  name: p\nspec:\n  cidr: 10.1.0.0/16\n")?;
            c.wait_with_output()
        })
        .unwrap();
    assert_eq!(ok(&out), "Successfully created 1 'IPPool' resource(s)\n");
    let out = calicoctl(
        &etcd,
        &["create", "-f", "-"],
        "apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata:\n  name: p\nspec:\n  cidr: 10.1.0.0/16\n",
    );
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "Failed to create any resources: document 1 (IPPool \"p\"): resource already exists: IPPool(p)\n"
    );
    // Unreachable etcd: a clear error, exit 1.
    let out = Command::new(env!("CARGO_BIN_EXE_calicoctl"))
        .args(["-c", "/nonexistent", "get", "ippools"])
        .env(
            "ETCD_ENDPOINTS",
            format!("http://127.0.0.1:{}", common::free_port()),
        )
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("datastore unavailable"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn ipam_show_configure_and_release_against_etcd() {
    let Some(etcd) = Etcd::start() else { return };
    ok(&calicoctl(&etcd, &["apply", "-f", "-"], RESOURCES));
    let ipam = calico_node::ipam::Ipam::new(etcd.datastore().await);
    let args = calico_node::ipam::AssignArgs {
        num_v4: 2,
        ..calico_node::ipam::AssignArgs::v4("k8s-pod-network.x", "node-1")
    };
    let ips = ipam.auto_assign(&args).await.unwrap();
    let show = ok(&calicoctl(&etcd, &["ipam", "show"], ""));
    assert!(
        show.contains("| IP Pool  | 10.65.0.0/16 |     65536 | 2 (0%)     | 65534 (100%) |"),
        "{show}"
    );
    assert_eq!(
        ok(&calicoctl(
            &etcd,
            &["ipam", "configure", "--strictaffinity=true"],
            ""
        )),
        "Successfully set IPAM configuration\n"
    );
    assert_eq!(
        etcd.etcdctl_value("/calico/ipam/v2/config"),
        r#"{"strict_affinity":true,"auto_allocate_blocks":true}"#
    );
    let ip = ips[0].to_string();
    assert_eq!(
        ok(&calicoctl(
            &etcd,
            &["ipam", "release", &format!("--ip={ip}")],
            ""
        )),
        format!("Successfully released IP address {ip}\n")
    );
    assert_eq!(
        ok(&calicoctl(
            &etcd,
            &["ipam", "show", &format!("--ip={ip}")],
            ""
        )),
        format!("IP {ip} is not currently assigned\n")
    );
}

#[tokio::test]
async fn ipam_check_reports_and_gc_frees_only_leaks() {
    let Some(etcd) = Etcd::start() else { return };
    ok(&calicoctl(&etcd, &["apply", "-f", "-"], RESOURCES));
    let ipam = calico_node::ipam::Ipam::new(etcd.datastore().await);
    let assign = |handle: &'static str, host: &'static str| {
        let ipam = ipam.clone();
        async move {
            ipam.auto_assign(&calico_node::ipam::AssignArgs::v4(handle, host))
                .await
                .unwrap()[0]
        }
    };
    let live = assign("k8s-pod-network.live", "node-1").await;
    let dead = assign("k8s-pod-network.dead", "node-1").await;
    let gone = assign("k8s-pod-network.other", "node-gone").await;
    ipam.release_ips(&[gone]).await.unwrap(); // node-gone keeps an empty affine block
    let wep = format!(
        "apiVersion: projectcalico.org/v3\nkind: WorkloadEndpoint\nmetadata:\n  name: node--1-k8s-web-eth0\n  namespace: default\nspec:\n  orchestrator: k8s\n  node: node-1\n  pod: web\n  endpoint: eth0\n  containerID: live\n  ipNetworks: [\"{live}/32\"]\n  interfaceName: cali1\n"
    );
    ok(&calicoctl(&etcd, &["apply", "-f", "-"], &wep));
    let check = ok(&calicoctl(&etcd, &["ipam", "check"], ""));
    assert!(
        check.contains(&format!(
            "leaked: {dead} (handle \"k8s-pod-network.dead\"): no WorkloadEndpoint has this address"
        )),
        "{check}"
    );
    assert!(
        check.contains("affine to node node-gone, which does not exist"),
        "{check}"
    );
    assert!(
        check.ends_with("Check complete; found 2 problem(s).\n"),
        "{check}"
    );
    assert!(!check.contains(&live.to_string()), "{check}");

    let gc = ok(&calicoctl(&etcd, &["ipam", "gc", "--grace", "1"], ""));
    assert!(gc.ends_with("Released 2 leak(s).\n"), "{gc}");
    assert!(ok(&calicoctl(&etcd, &["ipam", "check"], "")).ends_with("found 0 problem(s).\n"));
    assert!(
        ipam.lookup(live).await.unwrap().is_some(),
        "the live address stays"
    );
    assert!(ipam.lookup(dead).await.unwrap().is_none());
    assert_eq!(
        etcd.etcdctl(&[
            "get",
            "--prefix",
            "/calico/ipam/v2/host/node-gone/",
            "--keys-only"
        ])
        .trim(),
        ""
    );
}
