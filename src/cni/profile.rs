//! The profile of a CNI network (Calico's cni-plugin/pkg/plugin/plugin.go, "Handle profile
//! creation"). Outside Kubernetes a WorkloadEndpoint carries one profile named after the
//! network; the plugin creates it on ADD when it is missing: every egress allowed, ingress
//! allowed from endpoints carrying the label `<network>` (which the profile applies to its
//! own endpoints through `labelsToApply`). So containers on one network reach each other
//! and nothing else reaches them by default. The plugin never updates a profile that
//! exists: a person may have edited it.

use std::collections::BTreeMap;

use super::{CniEnv, CniError, NetConf, code};
use crate::datastore::{Client, ClientError, DatastoreError};
use crate::model::keys::resource_key;
use crate::model::policy::Profile;
use crate::model::rule::{EntityRule, Rule};
use crate::model::{Kind, ProfileSpec};

/// The profile Calico's plugin writes for network `network` (non-Kubernetes orchestrator).
pub fn network_profile(network: &str) -> Profile {
    let allow = |source: EntityRule| Rule {
        action: "Allow".into(),
        source,
        ..Default::default()
    };
    Profile::new(
        network,
        ProfileSpec {
            ingress: vec![allow(EntityRule {
                selector: format!("has({network})"),
                ..Default::default()
            })],
            egress: vec![allow(EntityRule::default())],
            labels_to_apply: BTreeMap::from([(network.to_string(), String::new())]),
        },
    )
}

/// Whether ADD makes sure the network's profile exists. Calico does it when the
/// configuration names no policy handler (`policy.type` empty). For Kubernetes pods this
/// plugin always names the endpoint's profile `kns.<namespace>` (written by hand or by
/// kube-controllers), so a `<network>` profile would select nothing: only non-Kubernetes
/// endpoints (orchestrator `cni`, whose profile is the network's) get one.
pub fn wants_network_profile(env: &CniEnv, conf: &NetConf) -> bool {
    env.k8s_pod().is_none() && conf.policy.kind.is_empty()
}

/// Create the profile of `network` unless a profile of that name exists (whatever its
/// contents: it is never read, decoded or rewritten). True when this call created it. A
/// parallel ADD creating it first is fine.
pub async fn ensure_network_profile(client: &Client, network: &str) -> Result<bool, CniError> {
    let key = resource_key(ProfileSpec::PLURAL, None, network);
    match client.datastore().get(&key).await {
        Ok(Some(_)) => return Ok(false),
        Ok(None) => {}
        Err(e) => return Err(profile_error(network, ClientError::Datastore(e))),
    }
    match client.create(network_profile(network)).await {
        Ok(_) => {
            tracing::info!(profile = network, "created the network's profile");
            Ok(true)
        }
        Err(ClientError::AlreadyExists(_)) => Ok(false),
        Err(e) => Err(profile_error(network, e)),
    }
}

/// A failure to read or create the profile, as a CNI error: the datastore being away is
/// "try again later" (11); a network name that cannot be a profile (the name becomes a label
/// key and a selector) is a configuration error naming `name`.
fn profile_error(network: &str, e: ClientError) -> CniError {
    match e {
        ClientError::Datastore(DatastoreError::Unavailable(d)) => CniError::new(
            code::TRY_AGAIN_LATER,
            "the Calico datastore (etcd) is unreachable; try again later",
            format!("cannot create the profile of network '{network}': {d}"),
        ),
        ClientError::Validation(v) => CniError::new(
            code::INVALID_NETWORK_CONFIG,
            "invalid network configuration field name",
            format!("the network '{network}' cannot name a Calico profile: {v}"),
        ),
        other => CniError::new(
            code::PLUGIN_FAILURE,
            format!("cannot create the profile of network '{network}'"),
            other.to_string(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::MapEnv;
    use std::sync::Arc;

    #[test]
    fn the_profile_is_calicos_for_a_cni_network() {
        let p = network_profile("calico-test");
        assert_eq!(
            serde_json::to_value(&p.spec).unwrap(),
            serde_json::json!({
                "ingress": [{"action": "Allow", "source": {"selector": "has(calico-test)"}}],
                "egress": [{"action": "Allow"}],
                "labelsToApply": {"calico-test": ""}
            })
        );
        assert_eq!(p.metadata.name, "calico-test");
        assert!(p.spec.validate(&p.metadata).is_ok());
    }

    fn env(args: &str) -> CniEnv {
        CniEnv::from_env(&MapEnv::from_pairs(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_NETNS", "/run/netns/x"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_ARGS", args),
        ]))
        .unwrap()
    }

    fn conf(extra: &str) -> NetConf {
        NetConf::parse(format!(r#"{{"cniVersion":"1.0.0","name":"net1"{extra}}}"#).as_bytes())
            .unwrap()
    }

    #[test]
    fn only_non_kubernetes_endpoints_without_a_policy_handler_get_it() {
        let k8s = "K8S_POD_NAMESPACE=ns1;K8S_POD_NAME=p";
        assert!(wants_network_profile(&env("IgnoreUnknown=1"), &conf("")));
        assert!(!wants_network_profile(
            &env("IgnoreUnknown=1"),
            &conf(r#","policy":{"type":"k8s"}"#)
        ));
        assert!(!wants_network_profile(&env(k8s), &conf("")));
        assert!(!wants_network_profile(
            &env(k8s),
            &conf(r#","policy":{"type":"k8s"}"#)
        ));
    }

    #[tokio::test]
    async fn created_once_and_never_overwritten() {
        let client = Client::new(Arc::new(crate::datastore::MemoryDatastore::new()));
        assert!(ensure_network_profile(&client, "net1").await.unwrap());
        assert!(!ensure_network_profile(&client, "net1").await.unwrap());
        // A person's edit stays.
        let mut edited = client
            .get::<ProfileSpec>(None, "net1")
            .await
            .unwrap()
            .unwrap();
        edited.spec.ingress.clear();
        client.update(edited).await.unwrap();
        assert!(!ensure_network_profile(&client, "net1").await.unwrap());
        let kept = client.get::<ProfileSpec>(None, "net1").await.unwrap();
        assert!(kept.unwrap().spec.ingress.is_empty());
    }

    #[tokio::test]
    async fn a_name_that_cannot_be_a_profile_is_a_config_error() {
        let client = Client::new(Arc::new(crate::datastore::MemoryDatastore::new()));
        let long = "n".repeat(64);
        let e = ensure_network_profile(&client, &long).await.unwrap_err();
        assert_eq!(e.code, code::INVALID_NETWORK_CONFIG, "{e:?}");
        assert_eq!(e.msg, "invalid network configuration field name");
        assert!(e.details.contains("labelsToApply"), "{e:?}");
        assert!(
            client
                .get::<ProfileSpec>(None, &long)
                .await
                .unwrap()
                .is_none()
        );
    }
}
