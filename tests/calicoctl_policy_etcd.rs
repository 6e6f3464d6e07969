//! calicoctl against a real etcd with the policy kinds (issue 17 point 1): a
//! NetworkPolicy, a GlobalNetworkPolicy and a Profile written as a Calico user writes
//! them are stored at Calico's keys with Calico's JSON, listed with calicoctl's columns,
//! patched, delivered by the syncer's decoder, refused with the field named when a rule is
//! bad (nothing written), and deleted.

mod common;

use calico_node::datastore::KeyValue;
use calico_node::datastore::syncer::{SyncValue, decode};
use calico_node::model::AnyResource;
use common::{Etcd, calicoctl, ok};
use serde_json::{Value, json};

const RES: &str = "/calico/resources/v3/projectcalico.org";

fn stored(etcd: &Etcd, key: &str) -> Value {
    serde_json::from_str(&etcd.etcdctl_value(key)).expect("stored JSON")
}

/// Calico's documentation examples, as a user writes them (YAML, types omitted on the GNP).
const POLICIES: &str = "\
apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata:
  name: allow-tcp-6379
  namespace: production
spec:
  selector: role == 'database'
  order: 100
  types:
    - Ingress
    - Egress
  ingress:
    - action: Allow
      metadata:
        annotations:
          from: frontend
          to: database
      protocol: TCP
      source:
        selector: role == 'frontend'
      destination:
        ports:
          - 6379
          - 7000:7010
  egress:
    - action: Allow
---
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata:
  name: deny-blue
spec:
  order: 10.5
  selector: color == 'red'
  ingress:
    - action: Deny
      protocol: icmp
      icmp:
        type: 8
      source:
        selector: color == 'blue'
        notNets:
          - 10.0.0.0/8
---
apiVersion: projectcalico.org/v3
kind: Profile
metadata:
  name: dev-apps
spec:
  ingress:
    - action: Deny
      source:
        nets:
          - 10.0.20.0/24
    - action: Allow
      source:
        selector: profile == 'dev'
  egress:
    - action: Allow
  labelsToApply:
    profile: dev
";

#[test]
fn policies_and_profiles_apply_store_list_patch_and_delete() {
    let Some(etcd) = Etcd::start() else { return };
    assert_eq!(
        ok(&calicoctl(&etcd, &["apply", "-f", "-"], POLICIES)),
        "Successfully applied 3 resource(s)\n"
    );

    // Calico's keys and JSON: namespace segment for NetworkPolicy, the tier label the
    // client adds, types defaulted (Ingress: the GNP has no egress rules), ranges as
    // "lo:hi", protocol names canonical.
    let np = stored(
        &etcd,
        &format!("{RES}/networkpolicies/production/allow-tcp-6379"),
    );
    assert_eq!(np["kind"], "NetworkPolicy");
    assert_eq!(np["metadata"]["namespace"], "production");
    assert_eq!(
        np["metadata"]["labels"]["projectcalico.org/tier"],
        "default"
    );
    assert_eq!(
        np["spec"],
        json!({"order": 100, "ingress": [{"action": "Allow", "protocol": "TCP",
            "source": {"selector": "role == 'frontend'"},
            "destination": {"ports": [6379, "7000:7010"]},
            "metadata": {"annotations": {"from": "frontend", "to": "database"}}}],
            "egress": [{"action": "Allow"}], "selector": "role == 'database'",
            "types": ["Ingress", "Egress"]})
    );
    assert!(np["metadata"].get("resourceVersion").is_none());
    // Go's encoding/json writes an integral float64 without a fraction.
    assert!(
        etcd.etcdctl_value(&format!("{RES}/networkpolicies/production/allow-tcp-6379"))
            .contains(r#""order":100,"#)
    );
    let gnp = stored(&etcd, &format!("{RES}/globalnetworkpolicies/deny-blue"));
    assert_eq!(
        gnp["spec"],
        json!({"order": 10.5, "ingress": [{"action": "Deny", "protocol": "ICMP",
            "icmp": {"type": 8},
            "source": {"selector": "color == 'blue'", "notNets": ["10.0.0.0/8"]}}],
            "selector": "color == 'red'", "types": ["Ingress"]})
    );
    let pro = stored(&etcd, &format!("{RES}/profiles/dev-apps"));
    assert_eq!(pro["spec"]["labelsToApply"], json!({"profile": "dev"}));
    assert_eq!(
        pro["spec"]["ingress"][0]["source"]["nets"],
        json!(["10.0.20.0/24"])
    );

    // calicoctl's columns: NAME TIER for ps, + ORDER SELECTOR for wide; NAMESPACE first
    // across namespaces; a namespaced get looks in -n's namespace only.
    assert_eq!(
        ok(&calicoctl(&etcd, &["get", "gnp", "-o", "wide"], "")),
        "NAME        TIER   ORDER   SELECTOR         \ndeny-blue          10.5    color == 'red'   \n"
    );
    assert_eq!(
        ok(&calicoctl(
            &etcd,
            &["get", "networkpolicy", "-n", "production"],
            ""
        )),
        "NAME             TIER   \nallow-tcp-6379          \n"
    );
    assert_eq!(
        ok(&calicoctl(
            &etcd,
            &["get", "policies", "-A", "-o", "wide"],
            ""
        )),
        "NAMESPACE    NAME             TIER   ORDER   SELECTOR             \nproduction   allow-tcp-6379          100     role == 'database'   \n"
    );
    assert_eq!(
        ok(&calicoctl(&etcd, &["get", "np"], "")),
        "NAME   TIER   \n",
        "nothing in namespace default"
    );
    assert_eq!(
        ok(&calicoctl(&etcd, &["get", "profile", "-o", "wide"], "")),
        "NAME       LABELS        \ndev-apps   profile=dev   \n"
    );

    // Staged kinds are stored and listed too; an unset order prints as Go's `<nil>`.
    ok(&calicoctl(
        &etcd,
        &["apply", "-f", "-"],
        "apiVersion: projectcalico.org/v3\nkind: StagedGlobalNetworkPolicy\nmetadata:\n  name: try-deny\nspec:\n  stagedAction: Set\n  selector: all()\n  egress:\n    - action: Deny\n---\napiVersion: projectcalico.org/v3\nkind: StagedKubernetesNetworkPolicy\nmetadata:\n  name: knp\n  namespace: production\nspec:\n  podSelector:\n    matchLabels:\n      app: web\n  policyTypes: [Ingress]\n",
    ));
    assert_eq!(
        stored(
            &etcd,
            &format!("{RES}/stagedglobalnetworkpolicies/try-deny")
        )["spec"],
        json!({"stagedAction": "Set", "egress": [{"action": "Deny"}],
            "selector": "all()", "types": ["Egress"]})
    );
    assert_eq!(
        ok(&calicoctl(&etcd, &["get", "sgnp", "-o", "wide"], "")),
        "NAME       TIER   ORDER   SELECTOR   \ntry-deny          <nil>   all()      \n"
    );
    assert_eq!(
        ok(&calicoctl(
            &etcd,
            &["get", "sknp", "-n", "production", "-o", "wide"],
            ""
        )),
        "NAME   PODSELECTOR         \nknp    {map[app:web] []}   \n"
    );
    ok(&calicoctl(&etcd, &["delete", "sgnp", "try-deny"], ""));
    ok(&calicoctl(
        &etcd,
        &["delete", "sknp", "knp", "-n", "production"],
        "",
    ));

    // The syncer's decoder delivers them to Felix as typed resources.
    for key in [
        format!("{RES}/networkpolicies/production/allow-tcp-6379"),
        format!("{RES}/globalnetworkpolicies/deny-blue"),
        format!("{RES}/profiles/dev-apps"),
    ] {
        let kv = KeyValue {
            key: key.clone(),
            value: etcd.etcdctl_value(&key).into_bytes(),
            mod_revision: 1,
            create_revision: 1,
        };
        let v = decode(&kv).expect("a modelled key").expect("decodes");
        assert!(
            matches!(
                v,
                SyncValue::Resource(
                    AnyResource::NetworkPolicy(_)
                        | AnyResource::GlobalNetworkPolicy(_)
                        | AnyResource::Profile(_)
                )
            ),
            "{key}: {v:?}"
        );
    }

    // patch goes through validation too: a good patch is stored, a bad one refused.
    ok(&calicoctl(
        &etcd,
        &[
            "patch",
            "gnp",
            "deny-blue",
            "-p",
            r#"{"spec":{"order":20}}"#,
        ],
        "",
    ));
    assert_eq!(
        stored(&etcd, &format!("{RES}/globalnetworkpolicies/deny-blue"))["spec"]["order"],
        20
    );
    let out = calicoctl(
        &etcd,
        &[
            "patch",
            "gnp",
            "deny-blue",
            "-p",
            r#"{"spec":{"doNotTrack":true}}"#,
        ],
        "",
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("spec.applyOnForward"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // delete, namespaced by -n.
    ok(&calicoctl(
        &etcd,
        &[
            "delete",
            "networkpolicy",
            "allow-tcp-6379",
            "-n",
            "production",
        ],
        "",
    ));
    ok(&calicoctl(
        &etcd,
        &["delete", "globalnetworkpolicy", "deny-blue"],
        "",
    ));
    ok(&calicoctl(&etcd, &["delete", "profile", "dev-apps"], ""));
    assert_eq!(
        etcd.etcdctl(&["get", "--prefix", "/calico/resources/", "--keys-only"])
            .trim(),
        "",
        "all deleted"
    );
}

#[test]
fn a_bad_rule_is_refused_naming_the_field_and_nothing_is_written() {
    let Some(etcd) = Etcd::start() else { return };
    let bad = format!(
        "{POLICIES}---\napiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata:\n  name: bad\nspec:\n  ingress:\n    - action: Allow\n      destination:\n        ports: [80]\n"
    );
    let out = calicoctl(&etcd, &["apply", "-f", "-"], &bad);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "Failed to apply any resources: document 4 (GlobalNetworkPolicy \"bad\"): error with field spec.ingress[0].destination.ports = '80' (rules with numeric port or port range must set protocol to TCP or UDP or SCTP)\n"
    );
    assert_eq!(
        etcd.etcdctl(&["get", "--prefix", "/calico/", "--keys-only"])
            .trim(),
        "",
        "nothing written"
    );

    // A port out of range is a decode error naming the path.
    let out = calicoctl(
        &etcd,
        &["create", "-f", "-"],
        "apiVersion: projectcalico.org/v3\nkind: NetworkPolicy\nmetadata:\n  name: p\nspec:\n  egress:\n    - action: Allow\n      protocol: UDP\n      destination:\n        ports: [70000]\n",
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("spec.egress[0].destination.ports[0]") && err.contains("70000"),
        "{err}"
    );
    assert_eq!(
        etcd.etcdctl(&["get", "--prefix", "/calico/", "--keys-only"])
            .trim(),
        ""
    );
}

/// A policy is created only in a tier that exists (Calico's clientv3 reads the tier
/// first): refused naming the tier, nothing written; the built-in tiers always pass
/// (calicoctl creates them), and so does a tier created earlier in the same file.
#[test]
fn a_policy_in_a_tier_that_does_not_exist_is_refused() {
    let Some(etcd) = Etcd::start() else { return };
    let gnp = "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata:\n  name: guard\nspec:\n  tier: security\n  selector: all()\n";
    let out = calicoctl(&etcd, &["create", "-f", "-"], gnp);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("resource does not exist: Tier(security)"),
        "{err}"
    );
    assert_eq!(
        etcd.etcdctl(&["get", "--prefix", "/calico/", "--keys-only"])
            .trim(),
        "",
        "nothing written"
    );
    let np = "apiVersion: projectcalico.org/v3\nkind: NetworkPolicy\nmetadata:\n  name: p\nspec:\n  tier: kube-admin\n  selector: all()\n";
    ok(&calicoctl(&etcd, &["apply", "-f", "-"], np));
    let tier = "apiVersion: projectcalico.org/v3\nkind: Tier\nmetadata:\n  name: security\nspec:\n  order: 100\n";
    ok(&calicoctl(
        &etcd,
        &["apply", "-f", "-"],
        &format!("{tier}---\n{gnp}"),
    ));
    assert!(
        !etcd
            .etcdctl_value(&format!("{RES}/globalnetworkpolicies/guard"))
            .is_empty()
    );
}
