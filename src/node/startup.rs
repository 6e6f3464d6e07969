//! calico-node start-up (what Calico's `calico-node -startup` does): wait for the
//! datastore, choose the node IP, register the Node, create the default pool, mark the
//! datastore ready in ClusterInformation and write the nodename file.

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::{Duration, Instant};

use ipnet::Ipv4Net;
use tracing::{info, warn};

use super::autodetect;
use super::config::{DEFAULT_POOL_NAME, IpSetting, NodeConfig};
use crate::datastore::client::new_uid;
use crate::datastore::{Client, ClientError};
use crate::model::node::NodeBGPSpec;
use crate::model::tier::{BUILTIN_TIERS, builtin_tier};
use crate::model::{
    ClusterInformation, ClusterInformationSpec, IPPool, IPPoolSpec, Node, NodeSpec,
};

/// Why start-up failed; each says what to fix.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    /// The datastore stayed unreachable.
    #[error("datastore not reachable after {waited:?}: {source}")]
    DatastoreUnreachable {
        waited: Duration,
        source: ClientError,
    },
    /// No address could be chosen.
    #[error("cannot determine the node's IPv4 address: {0}")]
    Autodetect(#[from] autodetect::AutodetectError),
    /// Another node already uses our address.
    #[error(
        "Calico node '{other}' is already using the IPv4 address {addr}; set IP or IP_AUTODETECTION_METHOD so that each node has its own"
    )]
    AddressInUse { other: String, addr: Ipv4Addr },
    /// A datastore write failed.
    #[error("{what}: {source}")]
    Datastore { what: String, source: ClientError },
    /// The nodename file could not be written.
    #[error("cannot write {path}: {source}")]
    NodenameFile {
        path: String,
        source: std::io::Error,
    },
}

fn ds_err(what: &str) -> impl FnOnce(ClientError) -> StartupError + '_ {
    move |source| StartupError::Datastore {
        what: what.to_string(),
        source,
    }
}

/// The node's IPv4 address in CIDR form, per the `IP` setting.
pub fn choose_ipv4(setting: &IpSetting) -> Result<Option<Ipv4Net>, StartupError> {
    match setting {
        IpSetting::None => Ok(None),
        IpSetting::Fixed {
            addr,
            prefix: Some(p),
        } => Ok(Ipv4Net::new(*addr, *p).ok()),
        IpSetting::Fixed { addr, prefix: None } => {
            // Calico looks the address up on the interfaces to learn its prefix; /32 if absent.
            let ifaces = autodetect::list_interfaces()?;
            Ok(Some(
                autodetect::find_prefix_for(*addr, &ifaces)
                    .unwrap_or_else(|| Ipv4Net::new(*addr, 32).expect("/32 is a valid prefix")),
            ))
        }
        IpSetting::Autodetect(m) => Ok(Some(autodetect::detect(m)?)),
    }
}

/// Wait until the datastore answers (Calico retries its connection the same way).
/// `report` hears why we are still waiting (for readiness and logs).
pub async fn wait_for_datastore(
    client: &Client,
    limit: Duration,
    report: &(dyn Fn(String) + Sync),
) -> Result<(), StartupError> {
    let start = Instant::now();
    let mut delay = Duration::from_millis(100);
    loop {
        match client.get::<ClusterInformationSpec>(None, "default").await {
            Ok(_) => return Ok(()),
            Err(e) if start.elapsed() >= limit => {
                return Err(StartupError::DatastoreUnreachable {
                    waited: start.elapsed(),
                    source: e,
                });
            }
            Err(e) => {
                warn!(error = %e, "waiting for the datastore");
                report(format!("waiting for the datastore: {e}"));
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// Create or update this node's Node resource with its address and AS.
pub async fn register_node(
    client: &Client,
    cfg: &NodeConfig,
    ipv4: Option<Ipv4Net>,
) -> Result<Node, StartupError> {
    if let Some(ip) = ipv4 {
        let (nodes, _) = client
            .list::<NodeSpec>(None)
            .await
            .map_err(ds_err("listing nodes"))?;
        for n in nodes.iter().filter(|n| n.metadata.name != cfg.nodename) {
            let theirs = n
                .spec
                .ipv4_address()
                .and_then(|a| a.parse::<Ipv4Net>().ok());
            if theirs.is_some_and(|t| t.addr() == ip.addr()) {
                return Err(StartupError::AddressInUse {
                    other: n.metadata.name.clone(),
                    addr: ip.addr(),
                });
            }
        }
    }
    for _ in 0..10 {
        let existing = client
            .get::<NodeSpec>(None, &cfg.nodename)
            .await
            .map_err(ds_err("reading this node"))?;
        let mut node = existing
            .clone()
            .unwrap_or_else(|| Node::new(&cfg.nodename, NodeSpec::default()));
        let bgp = node.spec.bgp.get_or_insert_with(NodeBGPSpec::default);
        bgp.ipv4_address = ipv4.map(|n| n.to_string());
        if cfg.as_number.is_some() {
            bgp.as_number = cfg.as_number;
        }
        if node
            .spec
            .bgp
            .as_ref()
            .is_some_and(|b| *b == NodeBGPSpec::default())
        {
            node.spec.bgp = None;
        }
        if existing.as_ref() == Some(&node) {
            return Ok(node);
        }
        let result = match existing {
            None => client.create(node).await,
            Some(_) => client.update(node).await,
        };
        match result {
            Ok(n) => {
                info!(node = %cfg.nodename, ipv4 = ?ipv4, "node registered");
                return Ok(n);
            }
            Err(ClientError::Conflict(..)) | Err(ClientError::AlreadyExists(_)) => continue,
            Err(e) => return Err(ds_err("writing this node")(e)),
        }
    }
    Err(ds_err("writing this node")(ClientError::Conflict(
        format!("Node({})", cfg.nodename),
        0,
    )))
}

/// Create the default IPv4 pool when no IPv4 pool exists. Returns it when created.
pub async fn ensure_default_pool(
    client: &Client,
    cfg: &NodeConfig,
) -> Result<Option<IPPool>, StartupError> {
    let Some(default) = &cfg.default_pool else {
        return Ok(None);
    };
    let (pools, _) = client
        .list::<IPPoolSpec>(None)
        .await
        .map_err(ds_err("listing IP pools"))?;
    if pools
        .iter()
        .any(|p| matches!(p.spec.net(), Some(ipnet::IpNet::V4(_))))
    {
        return Ok(None);
    }
    match client
        .create(IPPool::new(DEFAULT_POOL_NAME, default.spec.clone()))
        .await
    {
        Ok(p) => {
            info!(cidr = %p.spec.cidr, "created the default IPv4 pool");
            Ok(Some(p))
        }
        // Another node created it at the same moment.
        Err(ClientError::AlreadyExists(_)) => Ok(None),
        Err(e) => Err(ds_err("creating the default IP pool")(e)),
    }
}

/// Create or refresh ClusterInformation `default`, setting `datastoreReady: true` unless an
/// administrator set it to false (Calico's rule: only an unset value is turned on).
pub async fn ensure_cluster_information(
    client: &Client,
    cfg: &NodeConfig,
) -> Result<ClusterInformation, StartupError> {
    let version = format!("v{}", env!("CARGO_PKG_VERSION"));
    for _ in 0..10 {
        let existing = client
            .get::<ClusterInformationSpec>(None, "default")
            .await
            .map_err(ds_err("reading ClusterInformation"))?;
        let result = match existing {
            None => {
                let spec = ClusterInformationSpec {
                    cluster_guid: new_uid().replace('-', ""),
                    cluster_type: cfg.cluster_type.clone(),
                    calico_version: version.clone(),
                    datastore_ready: Some(true),
                    variant: "Calico".into(),
                };
                client
                    .create(ClusterInformation::new("default", spec))
                    .await
            }
            Some(mut ci) => {
                let before = ci.clone();
                ci.spec.datastore_ready.get_or_insert(true);
                ci.spec.calico_version = version.clone();
                if !cfg.cluster_type.is_empty() {
                    ci.spec.cluster_type = cfg.cluster_type.clone();
                }
                if ci.spec.cluster_guid.is_empty() {
                    ci.spec.cluster_guid = new_uid().replace('-', "");
                }
                if ci == before {
                    return Ok(ci);
                }
                client.update(ci).await
            }
        };
        match result {
            Ok(ci) => return Ok(ci),
            Err(ClientError::Conflict(..)) | Err(ClientError::AlreadyExists(_)) => continue,
            Err(e) => return Err(ds_err("writing ClusterInformation")(e)),
        }
    }
    Err(ds_err("writing ClusterInformation")(ClientError::Conflict(
        "ClusterInformation(default)".into(),
        0,
    )))
}

/// Create the built-in tiers that do not exist (Calico's `EnsureInitialized`, which
/// calico-node's start-up calls in etcd mode): `default` (order 1e6, Deny), `kube-admin`
/// (1000, Pass) and `kube-baseline` (1e7, Pass). Create-only, as Calico's
/// `ensureTierExists`: a tier that exists, whoever wrote it and whatever it holds, is left
/// alone. Returns the names of the tiers it created.
pub async fn ensure_builtin_tiers(client: &Client) -> Result<Vec<String>, StartupError> {
    let mut created = Vec::new();
    for (name, order, action) in BUILTIN_TIERS {
        match client.create(builtin_tier(name, *order, action)).await {
            Ok(_) => {
                info!(tier = name, "Tier is now available");
                created.push(name.to_string());
            }
            Err(ClientError::AlreadyExists(_)) => {}
            Err(e) => return Err(ds_err("creating the built-in tiers")(e)),
        }
    }
    Ok(created)
}

/// In etcd mode calico-node makes workload-to-host traffic go on to the host's own rules:
/// FelixConfiguration `node.<name>` gets `defaultEndpointToHostAction: Return`, created
/// when missing and set when empty; a value someone chose is left alone (Calico's
/// `configureFelix...` in `node/pkg/lifecycle/startup/startup.go`). Felix's own default,
/// without this, is Drop.
pub async fn ensure_felix_node_config(client: &Client, nodename: &str) -> Result<(), StartupError> {
    use crate::model::felix::{FelixConfiguration, FelixConfigurationSpec};
    let name = format!("node.{nodename}");
    for _ in 0..10 {
        let existing = client
            .get::<FelixConfigurationSpec>(None, &name)
            .await
            .map_err(ds_err("reading the node's FelixConfiguration"))?;
        let result = match existing {
            None => {
                let spec = FelixConfigurationSpec {
                    default_endpoint_to_host_action: Some("Return".into()),
                    ..Default::default()
                };
                client.create(FelixConfiguration::new(&name, spec)).await
            }
            Some(c)
                if c.spec
                    .default_endpoint_to_host_action
                    .as_deref()
                    .is_some_and(|a| !a.is_empty()) =>
            {
                return Ok(());
            }
            Some(mut c) => {
                c.spec.default_endpoint_to_host_action = Some("Return".into());
                client.update(c).await
            }
        };
        match result {
            Ok(_) => return Ok(()),
            Err(ClientError::Conflict(..)) | Err(ClientError::AlreadyExists(_)) => continue,
            Err(e) => return Err(ds_err("writing the node's FelixConfiguration")(e)),
        }
    }
    Err(ds_err("writing the node's FelixConfiguration")(
        ClientError::Conflict(format!("FelixConfiguration({name})"), 0),
    ))
}

/// Write `<dir>/nodename` atomically and durably (the CNI plugin reads it; see
/// [`crate::state_file::write_atomic`]).
pub fn write_nodename_file(dir: &Path, nodename: &str) -> Result<(), StartupError> {
    let path = dir.join("nodename");
    crate::state_file::write_atomic(&path, nodename.as_bytes()).map_err(|source| {
        StartupError::NodenameFile {
            path: path.display().to_string(),
            source,
        }
    })
}

/// What start-up established.
#[derive(Debug)]
pub struct StartupResult {
    pub node: Node,
    pub ipv4: Option<Ipv4Net>,
    pub created_pool: Option<IPPool>,
}

/// The whole start-up sequence.
pub async fn startup(
    client: &Client,
    cfg: &NodeConfig,
    datastore_wait: Duration,
    report: &(dyn Fn(String) + Sync),
) -> Result<StartupResult, StartupError> {
    wait_for_datastore(client, datastore_wait, report).await?;
    let ipv4 = choose_ipv4(&cfg.ip)?;
    if let (IpSetting::Autodetect(m), Some(ip)) = (&cfg.ip, ipv4) {
        info!(%ip, method = %m.describe(), "autodetected the node's IPv4 address");
    }
    let node = register_node(client, cfg, ipv4).await?;
    let created_pool = ensure_default_pool(client, cfg).await?;
    ensure_cluster_information(client, cfg).await?;
    ensure_builtin_tiers(client).await?;
    ensure_felix_node_config(client, &cfg.nodename).await?;
    write_nodename_file(&cfg.state_dir, &cfg.nodename)?;
    Ok(StartupResult {
        node,
        ipv4,
        created_pool,
    })
}

/// Calico's default for `AUTODETECT_POLL_INTERVAL`.
pub const MONITOR_POLL_INTERVAL: Duration = Duration::from_secs(60);

/// `calico-node -monitor-addresses` (Calico's `MonitorIPAddressSubnets`): every `interval`
/// choose the node's IPv4 address again and update the Node when it changed, until
/// `cancel`. A detection failure is logged and tried again; an address another node holds
/// ends it with the error, as Calico terminates then.
pub async fn monitor_addresses(
    client: &Client,
    cfg: &NodeConfig,
    interval: Duration,
    cancel: &tokio_util::sync::CancellationToken,
) -> Result<(), StartupError> {
    let mut last: Option<Option<Ipv4Net>> = None;
    loop {
        match choose_ipv4(&cfg.ip) {
            Ok(ip) if last != Some(ip) => {
                register_node(client, cfg, ip).await?;
                info!(ipv4 = ?ip, "node address checked");
                last = Some(ip);
            }
            Ok(_) => {}
            Err(e) => warn!(error = %e, "cannot detect the node's address"),
        }
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            _ = tokio::time::sleep(interval) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::datastore::MemoryDatastore;
    use crate::env::MapEnv;

    /// Two calico-node processes (a restart overlapping the old one) write the nodename
    /// file at once: every write succeeds and the file always holds one whole name.
    #[test]
    fn concurrent_nodename_writes_never_fail_or_mix() {
        let dir = tempfile::tempdir().unwrap();
        let writers: Vec<_> = (0..6)
            .map(|w| {
                let dir = dir.path().to_path_buf();
                std::thread::spawn(move || {
                    for i in 0..200 {
                        let name = format!("node-{w}-{i}-{}", "n".repeat(w * 300));
                        write_nodename_file(&dir, &name).unwrap();
                        let read = std::fs::read_to_string(dir.join("nodename")).unwrap();
                        let w: usize = read.split('-').nth(1).unwrap().parse().unwrap();
                        assert!(read.ends_with(&"n".repeat(w * 300)), "{read}");
                    }
                })
            })
            .collect();
        for w in writers {
            w.join().unwrap();
        }
    }

    fn cfg(dir: &Path, pairs: &[(&str, &str)]) -> NodeConfig {
        let mut all = vec![("CALICO_STATE_DIR", dir.to_str().unwrap())];
        all.extend_from_slice(pairs);
        NodeConfig::from_env(&MapEnv::from_pairs(&all)).unwrap()
    }

    /// Calico's etcd-mode start-up: `node.<name>` gets Return when missing or empty, and
    /// an administrator's value stays.
    #[tokio::test]
    async fn startup_sets_endpoint_to_host_return_unless_chosen() {
        use crate::model::felix::{FelixConfiguration, FelixConfigurationSpec};
        let client = Client::new(Arc::new(MemoryDatastore::new()));
        let action = |client: Client, name: &'static str| async move {
            client
                .get::<FelixConfigurationSpec>(None, name)
                .await
                .unwrap()
                .unwrap()
                .spec
                .default_endpoint_to_host_action
        };
        ensure_felix_node_config(&client, "n1").await.unwrap();
        assert_eq!(
            action(client.clone(), "node.n1").await.as_deref(),
            Some("Return")
        );
        // Empty: set; another field is kept.
        let spec = FelixConfigurationSpec {
            vxlan_mtu: Some(1400),
            ..Default::default()
        };
        client
            .create(FelixConfiguration::new("node.n2", spec))
            .await
            .unwrap();
        ensure_felix_node_config(&client, "n2").await.unwrap();
        assert_eq!(
            action(client.clone(), "node.n2").await.as_deref(),
            Some("Return")
        );
        let n2 = client
            .get::<FelixConfigurationSpec>(None, "node.n2")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(n2.spec.vxlan_mtu, Some(1400));
        // Chosen: left alone.
        let spec = FelixConfigurationSpec {
            default_endpoint_to_host_action: Some("Drop".into()),
            ..Default::default()
        };
        client
            .create(FelixConfiguration::new("node.n3", spec))
            .await
            .unwrap();
        ensure_felix_node_config(&client, "n3").await.unwrap();
        assert_eq!(
            action(client.clone(), "node.n3").await.as_deref(),
            Some("Drop")
        );
    }

    #[tokio::test]
    async fn monitor_addresses_registers_the_node_and_stops_on_cancel() {
        let dir = tempfile::tempdir().unwrap();
        let client = Client::new(Arc::new(MemoryDatastore::new()));
        let c = cfg(dir.path(), &[("NODENAME", "n1"), ("IP", "10.99.0.7/24")]);
        let cancel = tokio_util::sync::CancellationToken::new();
        let (cl, cc, ct) = (client.clone(), c.clone(), cancel.clone());
        let task = tokio::spawn(async move {
            monitor_addresses(&cl, &cc, Duration::from_millis(10), &ct).await
        });
        let mut addr = None;
        for _ in 0..200 {
            addr = client
                .get::<NodeSpec>(None, "n1")
                .await
                .unwrap()
                .and_then(|n| n.spec.bgp)
                .and_then(|b| b.ipv4_address);
            if addr.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(addr.as_deref(), Some("10.99.0.7/24"));
        cancel.cancel();
        task.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn startup_registers_node_pool_and_cluster_information() {
        let dir = tempfile::tempdir().unwrap();
        let client = Client::new(Arc::new(MemoryDatastore::new()));
        let c = cfg(
            dir.path(),
            &[("NODENAME", "n1"), ("IP", "10.99.0.1/24"), ("AS", "65001")],
        );
        let r = startup(&client, &c, Duration::from_secs(1), &|_| {})
            .await
            .unwrap();
        let bgp = r.node.spec.bgp.unwrap();
        assert_eq!(bgp.ipv4_address.as_deref(), Some("10.99.0.1/24"));
        assert_eq!(bgp.as_number.map(|a| a.0), Some(65001));
        assert_eq!(r.created_pool.unwrap().spec.cidr, "192.168.0.0/16");
        let ci = client
            .get::<ClusterInformationSpec>(None, "default")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(ci.spec.datastore_ready, Some(true));
        assert_eq!(
            std::fs::read_to_string(dir.path().join("nodename")).unwrap(),
            "n1"
        );
        // A second start changes nothing and creates no second pool.
        let again = startup(&client, &c, Duration::from_secs(1), &|_| {})
            .await
            .unwrap();
        assert!(again.created_pool.is_none());
    }

    #[tokio::test]
    async fn admin_datastore_ready_false_is_respected() {
        let dir = tempfile::tempdir().unwrap();
        let client = Client::new(Arc::new(MemoryDatastore::new()));
        let spec = ClusterInformationSpec {
            datastore_ready: Some(false),
            ..Default::default()
        };
        client
            .create(ClusterInformation::new("default", spec))
            .await
            .unwrap();
        let c = cfg(dir.path(), &[("NODENAME", "n1"), ("IP", "none")]);
        startup(&client, &c, Duration::from_secs(1), &|_| {})
            .await
            .unwrap();
        let ci = client
            .get::<ClusterInformationSpec>(None, "default")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(ci.spec.datastore_ready, Some(false));
    }

    #[tokio::test]
    async fn duplicate_node_address_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let client = Client::new(Arc::new(MemoryDatastore::new()));
        startup(
            &client,
            &cfg(dir.path(), &[("NODENAME", "n1"), ("IP", "10.99.0.1/24")]),
            Duration::from_secs(1),
            &|_| {},
        )
        .await
        .unwrap();
        let e = startup(
            &client,
            &cfg(dir.path(), &[("NODENAME", "n2"), ("IP", "10.99.0.1/24")]),
            Duration::from_secs(1),
            &|_| {},
        )
        .await
        .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("Calico node 'n1' is already using the IPv4 address 10.99.0.1"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn existing_pool_means_no_default_pool() {
        let dir = tempfile::tempdir().unwrap();
        let client = Client::new(Arc::new(MemoryDatastore::new()));
        client
            .create(IPPool::new(
                "mine",
                IPPoolSpec {
                    cidr: "10.244.0.0/16".into(),
                    ..Default::default()
                },
            ))
            .await
            .unwrap();
        let r = startup(
            &client,
            &cfg(dir.path(), &[("NODENAME", "n1"), ("IP", "none")]),
            Duration::from_secs(1),
            &|_| {},
        )
        .await
        .unwrap();
        assert!(r.created_pool.is_none());
        assert_eq!(client.list::<IPPoolSpec>(None).await.unwrap().0.len(), 1);
    }
}
