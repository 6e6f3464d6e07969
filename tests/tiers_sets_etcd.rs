//! Tier, NetworkSet and GlobalNetworkSet against a real etcd (issue 17 point 1): calicoctl
//! writes Calico's JSON at Calico's keys, shows Calico's `-o ps|wide|yaml` columns, refuses
//! a bad value naming the field with nothing written, refuses to delete the built-in and
//! non-empty tiers; calico-node's start-up creates the built-in tiers once and never
//! rewrites a tier a user edited.

mod common;

use std::process::{Command, Output};

use common::{Etcd, calicoctl, ok};
use serde_json::{Value, json};

const RES: &str = "/calico/resources/v3/projectcalico.org";

fn fails(out: &Output) -> String {
    assert!(!out.status.success(), "calicoctl should have failed");
    String::from_utf8(out.stderr.clone()).unwrap()
}

fn stored(etcd: &Etcd, key: &str) -> Option<Value> {
    let v = etcd.etcdctl_value(key);
    (!v.is_empty()).then(|| serde_json::from_str(&v).unwrap())
}

fn mod_revision(etcd: &Etcd, key: &str) -> i64 {
    let v: Value = serde_json::from_str(&etcd.etcdctl(&["get", key, "-w", "json"])).unwrap();
    v["kvs"][0]["mod_revision"].as_i64().unwrap()
}

const RESOURCES: &str = "\
apiVersion: projectcalico.org/v3
kind: Tier
metadata:
  name: security
spec:
  order: 100
  defaultAction: Pass
---
apiVersion: projectcalico.org/v3
kind: Tier
metadata:
  name: app
---
apiVersion: projectcalico.org/v3
kind: NetworkSet
metadata:
  name: external-database
  namespace: staging
  labels:
    role: db
spec:
  nets:
  - 198.51.100.0/28
  - 203.0.113.0/24
---
apiVersion: projectcalico.org/v3
kind: NetworkSet
metadata:
  name: cache
  labels:
    role: cache
spec:
  nets:
  - 10.9.0.1
---
apiVersion: projectcalico.org/v3
kind: GlobalNetworkSet
metadata:
  name: dns-servers
  labels:
    role: dns
spec:
  nets:
  - 8.8.8.8/32
  - 2001:4860:4860::8888/128
";

#[test]
fn calicoctl_writes_lists_and_deletes_tiers_and_network_sets() {
    let Some(etcd) = Etcd::start() else { return };
    assert_eq!(
        ok(&calicoctl(&etcd, &["apply", "-f", "-"], RESOURCES)),
        "Successfully applied 5 resource(s)\n"
    );

    // Calico's JSON at Calico's keys, defaults filled (a tier without order gets 1e6).
    let t = stored(&etcd, &format!("{RES}/tiers/security")).unwrap();
    assert_eq!(t["spec"], json!({"order": 100, "defaultAction": "Pass"}));
    let t = stored(&etcd, &format!("{RES}/tiers/app")).unwrap();
    assert_eq!(
        t["spec"],
        json!({"order": 1000000, "defaultAction": "Deny"})
    );
    let ns = stored(
        &etcd,
        &format!("{RES}/networksets/staging/external-database"),
    )
    .unwrap();
    assert_eq!(ns["metadata"]["labels"], json!({"role": "db"}));
    assert_eq!(
        ns["spec"],
        json!({"nets": ["198.51.100.0/28", "203.0.113.0/24"]})
    );
    assert!(stored(&etcd, &format!("{RES}/networksets/default/cache")).is_some());
    let g = stored(&etcd, &format!("{RES}/globalnetworksets/dns-servers")).unwrap();
    assert_eq!(g["kind"], "GlobalNetworkSet");

    // Calico's columns (calicoctl/resourcemgr/{tier,networkset,globalnetworkset}.go).
    let tiers = ok(&calicoctl(&etcd, &["get", "tiers"], ""));
    assert_eq!(
        tiers,
        "NAME       ORDER   \nsecurity   100     \napp        1e+06   \n"
    );
    assert_eq!(
        ok(&calicoctl(
            &etcd,
            &["get", "tier", "security", "-o", "wide"],
            ""
        )),
        "NAME       ORDER   \nsecurity   100     \n"
    );
    assert_eq!(
        ok(&calicoctl(
            &etcd,
            &["get", "networksets", "-n", "staging"],
            ""
        )),
        "NAME                \nexternal-database   \n"
    );
    assert_eq!(
        ok(&calicoctl(
            &etcd,
            &["get", "netsets", "-n", "staging", "-o", "wide"],
            ""
        )),
        "NAME                NETS                             \nexternal-database   198.51.100.0/28,203.0.113.0/24   \n"
    );
    assert_eq!(
        ok(&calicoctl(
            &etcd,
            &["get", "networksets", "--all-namespaces"],
            ""
        )),
        "NAMESPACE   NAME                \ndefault     cache               \nstaging     external-database   \n"
    );
    assert_eq!(
        ok(&calicoctl(&etcd, &["get", "networksets"], "")),
        "NAME    \ncache   \n"
    );
    assert_eq!(
        ok(&calicoctl(&etcd, &["get", "gnetsets", "-o", "wide"], "")),
        "NAME          NETS                                  \ndns-servers   8.8.8.8/32,2001:4860:4860::8888/128   \n"
    );
    let yaml = ok(&calicoctl(
        &etcd,
        &["get", "tier", "security", "-o", "yaml"],
        "",
    ));
    assert!(
        yaml.contains("kind: Tier\n") && yaml.contains("  defaultAction: Pass\n  order: 100\n"),
        "{yaml}"
    );
    let yaml = ok(&calicoctl(
        &etcd,
        &[
            "get",
            "networkset",
            "external-database",
            "-n",
            "staging",
            "-o",
            "yaml",
        ],
        "",
    ));
    assert!(
        yaml.contains("  namespace: staging\n")
            && yaml.contains("  nets:\n  - 198.51.100.0/28\n  - 203.0.113.0/24\n"),
        "{yaml}"
    );
    // The YAML goes back in unchanged.
    assert_eq!(
        ok(&calicoctl(&etcd, &["replace", "-f", "-"], &yaml)),
        "Successfully replaced 1 'NetworkSet' resource(s)\n"
    );

    // Patch goes through validation too.
    ok(&calicoctl(
        &etcd,
        &[
            "patch",
            "networkset",
            "external-database",
            "-n",
            "staging",
            "-p",
            r#"{"spec":{"nets":["10.1.0.0/16"]}}"#,
        ],
        "",
    ));
    let ns = stored(
        &etcd,
        &format!("{RES}/networksets/staging/external-database"),
    )
    .unwrap();
    assert_eq!(ns["spec"], json!({"nets": ["10.1.0.0/16"]}));
    let e = fails(&calicoctl(
        &etcd,
        &[
            "patch",
            "gnetsets",
            "dns-servers",
            "-p",
            r#"{"spec":{"nets":["8.8.8.8/40"]}}"#,
        ],
        "",
    ));
    assert!(
        e.contains("error with field spec.nets[0] = '8.8.8.8/40' (not a valid CIDR or IP address)"),
        "{e}"
    );

    // Deleting, by name and namespace.
    assert_eq!(
        ok(&calicoctl(
            &etcd,
            &["delete", "networkset", "external-database", "-n", "staging"],
            ""
        )),
        "Successfully deleted 1 'NetworkSet' resource(s)\n"
    );
    assert!(
        stored(
            &etcd,
            &format!("{RES}/networksets/staging/external-database")
        )
        .is_none()
    );
    ok(&calicoctl(
        &etcd,
        &["delete", "globalnetworkset", "dns-servers"],
        "",
    ));
    assert!(stored(&etcd, &format!("{RES}/globalnetworksets/dns-servers")).is_none());
}

#[test]
fn bad_values_are_refused_naming_the_field_and_nothing_is_written() {
    let Some(etcd) = Etcd::start() else { return };
    let cases = [
        (
            "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkSet\nmetadata:\n  name: good\nspec:\n  nets: [10.0.0.0/8]\n---\napiVersion: projectcalico.org/v3\nkind: NetworkSet\nmetadata:\n  name: bad\n  namespace: ns1\nspec:\n  nets: [10.0.0.0/8, not-a-net]\n",
            "error with field spec.nets[1] = 'not-a-net' (not a valid CIDR or IP address)",
        ),
        (
            "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkSet\nmetadata:\n  name: good\nspec:\n  nets: [10.0.0.0/8]\n---\napiVersion: projectcalico.org/v3\nkind: Tier\nmetadata:\n  name: a.b\n",
            "error with field metadata.name = 'a.b' (name must consist of lower case alphanumeric characters or '-'",
        ),
        (
            "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkSet\nmetadata:\n  name: good\nspec:\n  nets: [10.0.0.0/8]\n---\napiVersion: projectcalico.org/v3\nkind: Tier\nmetadata:\n  name: t\nspec:\n  defaultAction: Allow\n",
            "error with field spec.defaultAction = 'Allow' (must be one of: Deny, Pass)",
        ),
        (
            "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkSet\nmetadata:\n  name: good\nspec:\n  nets: [10.0.0.0/8]\n---\napiVersion: projectcalico.org/v3\nkind: Tier\nmetadata:\n  name: default\nspec:\n  order: 5\n",
            "error with field spec.order = '5' (default tier order must be 1000000)",
        ),
        (
            "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkSet\nmetadata:\n  name: good\nspec:\n  nets: [10.0.0.0/8]\n---\napiVersion: projectcalico.org/v3\nkind: Tier\nmetadata:\n  name: t\nspec:\n  order: high\n",
            "error with field spec.order: invalid type: string \"high\"",
        ),
    ];
    for (doc, want) in cases {
        let e = fails(&calicoctl(&etcd, &["create", "-f", "-"], doc));
        assert!(e.contains(want), "want {want:?} in {e}");
        let keys = etcd.etcdctl(&["get", RES, "--prefix", "--keys-only"]);
        assert!(keys.trim().is_empty(), "something was written: {keys}");
    }
}

#[test]
fn builtin_and_non_empty_tiers_cannot_be_deleted() {
    let Some(etcd) = Etcd::start() else { return };
    // Calico refuses a protected tier before looking it up (it need not exist).
    for name in ["default", "kube-admin", "kube-baseline"] {
        let e = fails(&calicoctl(&etcd, &["delete", "tier", name], ""));
        assert!(
            e.contains(&format!(
                "operation Delete is not supported on {name}: Cannot delete {name} tier"
            )),
            "{e}"
        );
    }
    ok(&calicoctl(
        &etcd,
        &["create", "-f", "-"],
        "apiVersion: projectcalico.org/v3\nkind: Tier\nmetadata:\n  name: app\n",
    ));
    // A policy (written as Calico stores it) still in the tier keeps it.
    let policy = format!("{RES}/networkpolicies/ns1/app.allow-dns");
    etcd.etcdctl(&[
        "put",
        &policy,
        r#"{"kind":"NetworkPolicy","apiVersion":"projectcalico.org/v3","metadata":{"name":"app.allow-dns","namespace":"ns1"},"spec":{"tier":"app","order":10,"selector":"all()","types":["Ingress"]}}"#,
    ]);
    let e = fails(&calicoctl(&etcd, &["delete", "tier", "app"], ""));
    assert!(
        e.contains("operation delete is not supported on app: Cannot delete a non-empty tier"),
        "{e}"
    );
    assert!(stored(&etcd, &format!("{RES}/tiers/app")).is_some());
    etcd.etcdctl(&["del", &policy]);
    ok(&calicoctl(&etcd, &["delete", "tier", "app"], ""));
    assert!(stored(&etcd, &format!("{RES}/tiers/app")).is_none());
}

fn node_startup(etcd: &Etcd, state: &std::path::Path) {
    let out = Command::new(env!("CARGO_BIN_EXE_calico-node"))
        .arg("-startup")
        .env_clear()
        .env("ETCD_ENDPOINTS", etcd.endpoint())
        .env("NODENAME", "node-1")
        .env("IP", "10.99.0.1/24")
        .env("CALICO_STATE_DIR", state)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "calico-node -startup: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn node_startup_creates_the_builtin_tiers_once_and_keeps_a_users_edits() {
    let Some(etcd) = Etcd::start() else { return };
    let state = tempfile::tempdir().unwrap();
    node_startup(&etcd, state.path());
    let want = [
        ("default", 1000000, "Deny"),
        ("kube-admin", 1000, "Pass"),
        ("kube-baseline", 10000000, "Pass"),
    ];
    for (name, order, action) in want {
        let t = stored(&etcd, &format!("{RES}/tiers/{name}"))
            .unwrap_or_else(|| panic!("tier {name} not created"));
        assert_eq!(t["spec"], json!({"order": order, "defaultAction": action}));
        assert!(t["metadata"]["uid"].is_string() && t["metadata"]["creationTimestamp"].is_string());
    }
    assert_eq!(
        ok(&calicoctl(&etcd, &["get", "tiers"], "")),
        "NAME            ORDER   \nkube-admin      1000    \ndefault         1e+06   \nkube-baseline   1e+07   \n"
    );

    // A user labels the default tier; an older Calico's kube-admin tier (no order, as
    // Calico stored its tiers before v3.30) is there too.
    let yaml = ok(&calicoctl(
        &etcd,
        &["get", "tier", "default", "-o", "yaml"],
        "",
    ));
    let edited = yaml.replace("metadata:\n", "metadata:\n  labels:\n    owner: secops\n");
    ok(&calicoctl(&etcd, &["apply", "-f", "-"], &edited));
    let old_admin = r#"{"kind":"Tier","apiVersion":"projectcalico.org/v3","metadata":{"name":"kube-admin","uid":"u1"},"spec":{"defaultAction":"Pass"}}"#;
    etcd.etcdctl(&["put", &format!("{RES}/tiers/kube-admin"), old_admin]);
    let before: Vec<(String, i64)> = want
        .iter()
        .map(|(name, _, _)| {
            let key = format!("{RES}/tiers/{name}");
            (etcd.etcdctl_value(&key), mod_revision(&etcd, &key))
        })
        .collect();
    assert!(
        before[0].0.contains(r#""labels":{"owner":"secops"}"#),
        "{}",
        before[0].0
    );

    // A second start writes none of them.
    node_startup(&etcd, state.path());
    let after: Vec<(String, i64)> = want
        .iter()
        .map(|(name, _, _)| {
            let key = format!("{RES}/tiers/{name}");
            (etcd.etcdctl_value(&key), mod_revision(&etcd, &key))
        })
        .collect();
    assert_eq!(before, after);
    assert_eq!(after[1].0, old_admin);

    // A deleted built-in tier (by etcdctl; calicoctl refuses) comes back at the next start.
    etcd.etcdctl(&["del", &format!("{RES}/tiers/kube-baseline")]);
    node_startup(&etcd, state.path());
    let t = stored(&etcd, &format!("{RES}/tiers/kube-baseline")).unwrap();
    assert_eq!(
        t["spec"],
        json!({"order": 10000000, "defaultAction": "Pass"})
    );
}
