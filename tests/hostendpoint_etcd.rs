//! HostEndpoint against a real etcd (issue 18 point 1): calicoctl writes Calico's JSON at
//! Calico's key, shows Calico's `-o ps|wide|yaml|json` columns, patches and replaces,
//! refuses a bad value naming the field with nothing written, deletes.

mod common;

use std::process::Output;

use common::{Etcd, calicoctl, ok};
use serde_json::{Value, json};

const KEY: &str = "/calico/resources/v3/projectcalico.org/hostendpoints";

fn fails(out: &Output) -> String {
    assert!(!out.status.success(), "calicoctl should have failed");
    String::from_utf8(out.stderr.clone()).unwrap()
}

fn stored(etcd: &Etcd, name: &str) -> Option<Value> {
    let v = etcd.etcdctl_value(&format!("{KEY}/{name}"));
    (!v.is_empty()).then(|| serde_json::from_str(&v).unwrap())
}

const HEPS: &str = "\
apiVersion: projectcalico.org/v3
kind: HostEndpoint
metadata:
  name: node-1-eth0
  labels:
    role: ingress
spec:
  node: node-1
  interfaceName: eth0
  expectedIPs:
  - 10.99.0.1
  - fd00:99::1
  profiles:
  - edge
  ports:
  - name: web
    protocol: TCP
    port: 8080
---
apiVersion: projectcalico.org/v3
kind: HostEndpoint
metadata:
  name: node-2-all
spec:
  node: node-2
  interfaceName: \"*\"
";

#[test]
fn calicoctl_writes_shows_patches_and_deletes_host_endpoints() {
    let Some(etcd) = Etcd::start() else { return };
    assert_eq!(
        ok(&calicoctl(&etcd, &["create", "-f", "-"], HEPS)),
        "Successfully created 2 'HostEndpoint' resource(s)\n"
    );
    let h = stored(&etcd, "node-1-eth0").unwrap();
    assert_eq!(h["kind"], "HostEndpoint");
    assert_eq!(h["metadata"]["labels"], json!({"role": "ingress"}));
    assert_eq!(
        h["spec"],
        json!({
            "node": "node-1",
            "interfaceName": "eth0",
            "expectedIPs": ["10.99.0.1", "fd00:99::1"],
            "profiles": ["edge"],
            "ports": [{"name": "web", "protocol": "TCP", "port": 8080}]
        })
    );
    assert_eq!(
        stored(&etcd, "node-2-all").unwrap()["spec"],
        json!({"node": "node-2", "interfaceName": "*"})
    );

    // Calico's columns (calicoctl/resourcemgr/hostendpoint.go) and aliases.
    assert_eq!(
        ok(&calicoctl(&etcd, &["get", "hostendpoints"], "")),
        "NAME          NODE     \nnode-1-eth0   node-1   \nnode-2-all    node-2   \n"
    );
    assert_eq!(
        ok(&calicoctl(
            &etcd,
            &["get", "hep", "node-1-eth0", "-o", "wide"],
            ""
        )),
        "NAME          NODE     INTERFACE   IPS                    PROFILES   \nnode-1-eth0   node-1   eth0        10.99.0.1,fd00:99::1   edge       \n"
    );
    let yaml = ok(&calicoctl(
        &etcd,
        &["get", "heps", "node-2-all", "-o", "yaml"],
        "",
    ));
    assert!(
        yaml.contains("kind: HostEndpoint")
            && (yaml.contains("interfaceName: '*'") || yaml.contains("interfaceName: \"*\"")),
        "{yaml}"
    );
    let js: Value = serde_json::from_str(&ok(&calicoctl(
        &etcd,
        &["get", "hep", "node-2-all", "-o", "json"],
        "",
    )))
    .unwrap();
    assert_eq!(js["spec"]["node"], "node-2");

    // Patch and replace change what is stored.
    ok(&calicoctl(
        &etcd,
        &[
            "patch",
            "hostendpoint",
            "node-2-all",
            "-p",
            r#"{"spec":{"profiles":["edge"]}}"#,
        ],
        "",
    ));
    assert_eq!(
        stored(&etcd, "node-2-all").unwrap()["spec"]["profiles"],
        json!(["edge"])
    );

    // A bad value: refused naming the field, nothing written (the stored one unchanged).
    let before = stored(&etcd, "node-1-eth0").unwrap();
    let bad = HEPS
        .split("---")
        .next()
        .unwrap()
        .replace("port: 8080", "port: 0")
        .replace("protocol: TCP", "protocol: ICMP");
    let err = fails(&calicoctl(&etcd, &["replace", "-f", "-"], &bad));
    assert!(err.contains("spec.ports[0].protocol"), "{err}");
    assert_eq!(stored(&etcd, "node-1-eth0").unwrap(), before);
    let no_node = "apiVersion: projectcalico.org/v3\nkind: HostEndpoint\nmetadata:\n  name: lost\nspec:\n  interfaceName: eth1\n";
    let err = fails(&calicoctl(&etcd, &["create", "-f", "-"], no_node));
    assert!(
        err.contains("spec.node") && err.contains("node must be specified"),
        "{err}"
    );
    assert!(stored(&etcd, "lost").is_none());
    let no_iface = "apiVersion: projectcalico.org/v3\nkind: HostEndpoint\nmetadata:\n  name: lost\nspec:\n  node: node-1\n";
    let err = fails(&calicoctl(&etcd, &["create", "-f", "-"], no_iface));
    assert!(err.contains("interfaceName or expectedIPs"), "{err}");
    assert!(stored(&etcd, "lost").is_none());

    assert_eq!(
        ok(&calicoctl(&etcd, &["delete", "hep", "node-1-eth0"], "")),
        "Successfully deleted 1 'HostEndpoint' resource(s)\n"
    );
    assert!(stored(&etcd, "node-1-eth0").is_none());
    assert!(stored(&etcd, "node-2-all").is_some());
}
