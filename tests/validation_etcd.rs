//! Every validation rule, through the client against a real etcd: the exact message a user
//! sees, and nothing written (the whole /calico/ prefix stays empty).

mod common;

use calico_node::datastore::Client;
use calico_node::datastore::client::WriteOp;
use calico_node::model::AnyResource;
use common::Etcd;

/// (kind, metadata JSON, spec JSON, the exact error).
const CASES: &[(&str, &str, &str, &str)] = &[
    (
        "IPPool",
        r#"{"name":"p"}"#,
        r#"{"cidr":"10.65.0.1/16"}"#,
        "error with field spec.cidr = '10.65.0.1/16' (CIDR is not strictly masked; did you mean 10.65.0.0/16?)",
    ),
    (
        "IPPool",
        r#"{"name":"p"}"#,
        r#"{"cidr":"10.65.0.0/16","blockSize":33}"#,
        "error with field spec.blockSize = '33' (block size must be between 20 and 32)",
    ),
    (
        "IPPool",
        r#"{"name":"p"}"#,
        r#"{"cidr":"fd00::/48","blockSize":100}"#,
        "error with field spec.blockSize = '100' (block size must be between 116 and 128)",
    ),
    (
        "IPPool",
        r#"{"name":"p"}"#,
        r#"{"cidr":"10.65.0.0/16","ipipMode":"Always","vxlanMode":"Always"}"#,
        "error with field spec.vxlanMode = 'Always' (ipipMode (Always) and vxlanMode cannot both be enabled on the same pool)",
    ),
    (
        "IPPool",
        r#"{"name":"p"}"#,
        r#"{"cidr":"10.65.0.0/16","nodeSelector":"zone == 'a"}"#,
        "error with field spec.nodeSelector = 'zone == 'a' (invalid selector at position 8: unterminated string literal)",
    ),
    (
        "IPPool",
        r#"{"name":"P1"}"#,
        r#"{"cidr":"10.65.0.0/16"}"#,
        "error with field metadata.name = 'P1' (must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character)",
    ),
    (
        "BGPPeer",
        r#"{"name":"p"}"#,
        r#"{"peerIP":"[fd00::1]:0","asNumber":64512}"#,
        "error with field spec.peerIP = '[fd00::1]:0' (port must be between 1 and 65535)",
    ),
    (
        "BGPPeer",
        r#"{"name":"p"}"#,
        r#"{"peerSelector":"has(rr)","asNumber":64512}"#,
        "error with field spec.asNumber = '64512' (asNumber and peerSelector cannot both be set (the peers' own AS is used))",
    ),
    (
        "BGPPeer",
        r#"{"name":"p"}"#,
        r#"{"peerIP":"10.0.0.1","asNumber":64512,"sourceAddress":"Other"}"#,
        "error with field spec.sourceAddress = 'Other' (must be one of: UseNodeIP, None)",
    ),
    (
        "BGPPeer",
        r#"{"name":"p"}"#,
        r#"{"peerIP":"10.0.0.1","asNumber":64512,"password":{"secretKeyRef":{"name":"s"}}}"#,
        "error with field spec.password.secretKeyRef.key = '' (the secret key is required)",
    ),
    (
        "BGPConfiguration",
        r#"{"name":"node.n1"}"#,
        r#"{"asNumber":64513}"#,
        "error with field spec.asNumber = '64513' (may only be set on the global BGPConfiguration named 'default')",
    ),
    (
        "BGPConfiguration",
        r#"{"name":"default"}"#,
        r#"{"serviceClusterIPs":[{"cidr":"10.96.0.0/33"}]}"#,
        "error with field spec.serviceClusterIPs[0].cidr = '10.96.0.0/33' (not a valid CIDR)",
    ),
    (
        "BGPConfiguration",
        r#"{"name":"default"}"#,
        r#"{"logSeverityScreen":"Verbose"}"#,
        "error with field spec.logSeverityScreen = 'Verbose' (must be one of: Trace, Debug, Info, Warning, Error, Fatal)",
    ),
    (
        "BGPConfiguration",
        r#"{"name":"default"}"#,
        r#"{"communities":[{"name":"c","value":"70000:1"}]}"#,
        "error with field spec.communities[0].value = '70000:1' (community must be aa:nn (each 0-65535) or a large community aa:nn:mm)",
    ),
    (
        "Node",
        r#"{"name":"n1"}"#,
        r#"{"bgp":{"ipv4Address":"10.0.0.1"}}"#,
        "error with field spec.bgp.ipv4Address = '10.0.0.1' (not an address in CIDR form (e.g. 10.0.0.2/24))",
    ),
    (
        "Node",
        r#"{"name":"n1"}"#,
        r#"{"vxlanTunnelMACAddr":"66:00:00"}"#,
        "error with field spec.vxlanTunnelMACAddr = '66:00:00' (not a valid MAC address (e.g. ee:ee:ee:ee:ee:ee))",
    ),
    (
        "Node",
        r#"{"name":"n1"}"#,
        r#"{"addresses":[{"address":"10.0.0.1","type":"Public"}]}"#,
        "error with field spec.addresses[0].type = 'Public' (must be one of: InternalIP, ExternalIP, CalicoNodeIP)",
    ),
    (
        "FelixConfiguration",
        r#"{"name":"default"}"#,
        r#"{"vxlanVNI":0}"#,
        "error with field spec.vxlanVNI = '0' (VNI must be between 1 and 16777215)",
    ),
    (
        "FelixConfiguration",
        r#"{"name":"default"}"#,
        r#"{"routeRefreshInterval":"90"}"#,
        "error with field spec.routeRefreshInterval = '90' (not a valid duration (e.g. 90s, 1m30s, 500ms))",
    ),
    (
        "FelixConfiguration",
        r#"{"name":"default"}"#,
        r#"{"natOutgoingAddress":"10.0.0.300"}"#,
        "error with field spec.natOutgoingAddress = '10.0.0.300' (not a valid IPv4 address)",
    ),
    (
        "WorkloadEndpoint",
        r#"{"name":"n1-cni-abc-eth0","namespace":"default"}"#,
        r#"{"ipNetworks":["10.65.0.1/32"],"ipNATs":[{"internalIP":"10.65.0.2","externalIP":"1.2.3.4"}]}"#,
        "error with field spec.ipNATs[0].internalIP = '10.65.0.2' (must be one of the endpoint's ipNetworks)",
    ),
    (
        "WorkloadEndpoint",
        r#"{"name":"n1-cni-abc-eth0","namespace":"default"}"#,
        r#"{"interfaceName":"cali0123456789abcdef"}"#,
        "error with field spec.interfaceName = 'cali0123456789abcdef' (must be a valid Linux interface name (at most 15 characters: letters, digits, '-', '_', '.'))",
    ),
    (
        "ClusterInformation",
        r#"{"name":"other"}"#,
        r#"{}"#,
        "error with field metadata.name = 'other' (the only ClusterInformation is named 'default')",
    ),
];

#[tokio::test]
async fn every_rule_refuses_with_its_message_and_writes_nothing() {
    let Some(etcd) = Etcd::start() else { return };
    let client = Client::new(etcd.datastore().await);
    for (kind, meta, spec, want) in CASES {
        let doc = format!(
            r#"{{"apiVersion":"projectcalico.org/v3","kind":"{kind}","metadata":{meta},"spec":{spec}}}"#
        );
        let res = AnyResource::from_document(serde_json::from_str(&doc).unwrap()).unwrap();
        for op in [WriteOp::Create, WriteOp::Apply] {
            let err = client.write_any(res.clone(), op).await.unwrap_err();
            assert_eq!(err.to_string(), *want, "{kind} {spec} ({op:?})");
        }
    }
    assert_eq!(
        etcd.etcdctl(&["get", "--prefix", "/calico/", "--keys-only"])
            .trim(),
        "",
        "nothing written"
    );
}

#[tokio::test]
async fn update_rules_compare_with_the_stored_version_and_write_nothing() {
    let Some(etcd) = Etcd::start() else { return };
    let client = Client::new(etcd.datastore().await);
    let doc = |cidr: &str, bs: u32| {
        let v = serde_json::json!({"apiVersion":"projectcalico.org/v3","kind":"IPPool","metadata":{"name":"p"},"spec":{"cidr":cidr,"blockSize":bs}});
        AnyResource::from_document(v).unwrap()
    };
    client
        .write_any(doc("10.65.0.0/16", 26), WriteOp::Create)
        .await
        .unwrap();
    let key = "/calico/resources/v3/projectcalico.org/ippools/p";
    let before = etcd.etcdctl(&["get", key, "-w", "json"]);
    let e = client
        .write_any(doc("10.66.0.0/16", 26), WriteOp::Apply)
        .await
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "error with field spec.cidr = '10.66.0.0/16' (IPPool CIDR cannot be modified (was 10.65.0.0/16))"
    );
    let e = client
        .write_any(doc("10.65.0.0/16", 24), WriteOp::Replace)
        .await
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "error with field spec.blockSize = '24' (IPPool blockSize cannot be modified (was 26))"
    );
    let overlap = serde_json::json!({"apiVersion":"projectcalico.org/v3","kind":"IPPool","metadata":{"name":"q"},"spec":{"cidr":"10.65.128.0/17"}});
    let e = client
        .write_any(
            AnyResource::from_document(overlap).unwrap(),
            WriteOp::Create,
        )
        .await
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "error with field spec.cidr = '10.65.128.0/17' (IPPool CIDR overlaps with IPPool p (10.65.0.0/16))"
    );
    assert_eq!(
        etcd.etcdctl(&["get", key, "-w", "json"])
            .split("\"kvs\"")
            .nth(1),
        before.split("\"kvs\"").nth(1),
        "stored pool unchanged"
    );
    assert_eq!(
        etcd.etcdctl(&["get", "--prefix", "/calico/", "--keys-only"])
            .trim(),
        key
    );
}
