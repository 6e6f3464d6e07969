//! `calico-ipam`, the CNI IPAM plugin: addresses from Calico block IPAM, owned by the
//! handle `<network name>.<container ID>` (REFERENCE §1, §4).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use serde_json::Value;

use super::{CniEnv, CniError, CniResult, Command, NetConf, code, version_result};
use crate::datastore::{Client, ClientError, Datastore, DatastoreError};
use crate::ipam::{AssignArgs, IpUse, Ipam, IpamError, workload_handle};
use crate::model::{ClusterInformationSpec, IPPool, IPPoolSpec};

/// Map IPAM failures to CNI codes: an unreachable datastore is "try again later".
pub fn ipam_error(e: IpamError) -> CniError {
    match e {
        IpamError::Datastore(DatastoreError::Unavailable(d))
        | IpamError::Client(ClientError::Datastore(DatastoreError::Unavailable(d))) => {
            CniError::new(
                code::TRY_AGAIN_LATER,
                "the Calico datastore (etcd) is unreachable; try again later",
                d,
            )
        }
        e @ IpamError::HostLockBusy { .. } => CniError::new(
            code::TRY_AGAIN_LATER,
            "the host-wide IPAM lock is busy; try again later",
            e.to_string(),
        ),
        IpamError::PoolNotUsable(p) => CniError::new(
            code::INVALID_NETWORK_CONFIG,
            format!(
                "invalid network configuration field ipam.{}",
                pools_field(matches!(p, IpNet::V6(_)))
            ),
            format!("IP pool {p} does not exist, is disabled, or does not select this node"),
        ),
        other => CniError::new(
            code::PLUGIN_FAILURE,
            "Calico IPAM failed",
            other.to_string(),
        ),
    }
}

/// The configuration field listing one family's pools.
fn pools_field(v6: bool) -> &'static str {
    if v6 { "ipv6_pools" } else { "ipv4_pools" }
}

/// One family's `ipam.ipv4_pools` / `ipv6_pools` as Calico's `ResolvePools` reads them:
/// a CIDR stands for itself (its network address: `10.1.2.3/16` is `10.1.0.0/16`),
/// anything else is the name of an IPPool and stands for that pool's CIDR. An unknown
/// name, or a pool of the other family, is an error naming the value; whether a CIDR is
/// a usable pool is checked where the pools are chosen.
fn resolve_pools(values: &[String], v6: bool, pools: &[IPPool]) -> Result<Vec<IpNet>, CniError> {
    let field = format!(
        "invalid network configuration field ipam.{}",
        pools_field(v6)
    );
    let family = |v6: bool| if v6 { "IPv6" } else { "IPv4" };
    let mut out = Vec::with_capacity(values.len());
    for v in values {
        let net = match v.parse::<IpNet>() {
            Ok(net) => net.trunc(),
            Err(_) => pools
                .iter()
                .find(|p| p.metadata.name == *v)
                .ok_or_else(|| {
                    CniError::new(
                        code::INVALID_NETWORK_CONFIG,
                        field.clone(),
                        format!("'{v}' is neither a CIDR nor the name of an IP pool"),
                    )
                })?
                .spec
                .net()
                .ok_or_else(|| {
                    CniError::new(
                        code::INVALID_NETWORK_CONFIG,
                        field.clone(),
                        format!("IP pool '{v}' has no valid CIDR"),
                    )
                })?,
        };
        if matches!(net, IpNet::V6(_)) != v6 {
            return Err(CniError::new(
                code::INVALID_NETWORK_CONFIG,
                field.clone(),
                format!(
                    "'{v}' ({net}) is an {} pool, not {}",
                    family(!v6),
                    family(v6)
                ),
            ));
        }
        out.push(net);
    }
    Ok(out)
}

/// Both families' configured pools as CIDRs (the pools are read only when names or
/// CIDRs are configured).
async fn configured_pools(
    client: &Client,
    conf: &NetConf,
) -> Result<(Vec<IpNet>, Vec<IpNet>), CniError> {
    let (v4, v6) = (&conf.ipam.ipv4_pools, &conf.ipam.ipv6_pools);
    if v4.is_empty() && v6.is_empty() {
        return Ok((Vec::new(), Vec::new()));
    }
    let (pools, _) = client
        .list::<IPPoolSpec>(None)
        .await
        .map_err(client_error)?;
    Ok((
        resolve_pools(v4, false, &pools)?,
        resolve_pools(v6, true, &pools)?,
    ))
}

/// The address a workload asked for in CNI_ARGS (`IP=<addr>`, what Calico's CNI plugin
/// passes for the `cni.projectcalico.org/ipAddrs` annotation and calico-ipam honours).
fn requested_ip(env: &CniEnv) -> Result<Option<IpAddr>, CniError> {
    let Some(v) = env.args.get("IP").filter(|v| !v.is_empty()) else {
        return Ok(None);
    };
    v.parse().map(Some).map_err(|_| {
        CniError::new(
            code::INVALID_ENV,
            "invalid environment variable CNI_ARGS",
            format!("IP='{v}' is not an IP address"),
        )
    })
}

/// ADD of a requested address: the one the handle already holds (a repeated ADD), else
/// that address if it is free in an enabled pool allowing workloads.
async fn assign_requested(
    ipam: &Ipam,
    handle: &str,
    attrs: &BTreeMap<String, String>,
    ip: IpAddr,
) -> Result<Vec<IpAddr>, CniError> {
    if ipam
        .ips_of_handle(handle)
        .await
        .map_err(ipam_error)?
        .contains(&ip)
    {
        return Ok(vec![ip]);
    }
    match ipam
        .assign_requested_ip(ip, handle, attrs, IpUse::Workload)
        .await
    {
        Ok(()) => Ok(vec![ip]),
        Err(
            e @ (IpamError::NotInPool(_) | IpamError::InUse(_) | IpamError::UseNotAllowed { .. }),
        ) => Err(CniError::new(
            code::PLUGIN_FAILURE,
            format!("cannot assign the requested address {ip} (CNI_ARGS IP)"),
            e.to_string(),
        )),
        Err(e) => Err(ipam_error(e)),
    }
}

fn client_error(e: ClientError) -> CniError {
    ipam_error(IpamError::Client(e))
}

/// Refuse to act until calico-node has marked the datastore ready (Calico's rule).
pub async fn check_datastore_ready(client: &Client) -> Result<(), CniError> {
    match client
        .get::<ClusterInformationSpec>(None, "default")
        .await
        .map_err(client_error)?
    {
        Some(ci) if ci.spec.datastore_ready == Some(true) => Ok(()),
        _ => Err(CniError::new(
            code::TRY_AGAIN_LATER,
            "the Calico datastore is not ready",
            "ClusterInformation 'default' does not say datastoreReady: true (is calico-node running?)",
        )),
    }
}

/// Where the host-wide IPAM lock lives unless `ipam_lock_file` says otherwise (Calico's
/// path and key).
pub const IPAM_LOCK: &str = "/var/run/calico/ipam.lock";

/// How long ADD waits for the host-wide IPAM lock unless `ipam_lock_timeout` (seconds)
/// says otherwise. Calico waits without bound; a lock held that long means a stuck
/// process, and the runtime is better told to try again (code 11) than left hanging.
pub const IPAM_LOCK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Take the host-wide IPAM lock at `path` (created mode 0600: only root's CNI processes
/// take it), polling a non-blocking `flock` for at most `timeout`; held until dropped.
/// Held elsewhere the whole time: [`IpamError::HostLockBusy`]. Without a usable lock
/// file the plugin proceeds, as Calico's best-effort lock does (the allocator stays
/// correct, only extra blocks may be claimed).
fn host_lock(
    path: &std::path::Path,
    timeout: std::time::Duration,
) -> Result<Box<dyn std::any::Any + Send>, IpamError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let file = match std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(path)
    {
        Ok(f) => f,
        Err(e) => {
            tracing::warn!(error = %e, path = %path.display(), "cannot open the IPAM lock file; continuing without it");
            return Ok(Box::new(()));
        }
    };
    // A file left by an older plugin with wider permissions is narrowed.
    if file
        .metadata()
        .is_ok_and(|m| m.permissions().mode() & 0o777 != 0o600)
    {
        let _ = file.set_permissions(std::fs::Permissions::from_mode(0o600));
    }
    // The lock is waited for on a thread of its own, handed over the moment the kernel
    // grants it (polling would leave it idle between tries: parallel ADDs queue on it),
    // and given up after `timeout`. A grant that comes after that finds nobody waiting
    // and is dropped at once, which releases it.
    // One grant, one slot: the send never waits, and fails (dropping the lock) when
    // nobody is waiting any more.
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    std::thread::spawn(move || {
        let _ = tx.send(nix::fcntl::Flock::lock(
            file,
            nix::fcntl::FlockArg::LockExclusive,
        ));
    });
    let start = std::time::Instant::now();
    match rx.recv_timeout(timeout) {
        Ok(Ok(l)) => Ok(Box::new(l)),
        Ok(Err((_, e))) => {
            tracing::warn!(error = %e, path = %path.display(), "cannot take the IPAM lock; continuing without it");
            Ok(Box::new(()))
        }
        Err(_) => Err(IpamError::HostLockBusy {
            path: path.display().to_string(),
            waited_ms: start.elapsed().as_millis() as u64,
        }),
    }
}

/// The container ID of a handle of this network: `<network>.<containerID>`, where the
/// container ID has no `.` (runtimes use hex IDs), so a handle of network `<network>.b`
/// (`<network>.b.<id>`) is not taken for one of `<network>`.
fn container_of_handle<'a>(network: &str, handle: &'a str) -> Option<&'a str> {
    let id = handle.strip_prefix(network)?.strip_prefix('.')?;
    (!id.is_empty() && !id.contains('.')).then_some(id)
}

/// GC (CNI 1.1.0): release this network's addresses on this node whose container the
/// runtime no longer lists in `cni.dev/valid-attachments`. The runtime only knows its own
/// node's containers, so only allocations whose `node` attribute is this node are
/// considered; other nodes' pods, other networks' handles and other IPAM users are never
/// touched.
async fn gc(conf: &NetConf, ipam: &Ipam) -> Result<(), CniError> {
    let node = conf.node_name()?;
    let keep: std::collections::HashSet<&str> = conf
        .valid_attachments
        .iter()
        .flatten()
        .map(|a| a.container_id.as_str())
        .collect();
    let handles = ipam
        .handles_on_node(&format!("{}.", conf.name), &node)
        .await
        .map_err(ipam_error)?;
    for h in handles {
        match container_of_handle(&conf.name, &h) {
            Some(id) if !keep.contains(id) => {
                tracing::info!(handle = %h, node = %node, "GC: releasing the addresses of a container the runtime no longer has");
                ipam.release_by_handle(&h).await.map_err(ipam_error)?;
            }
            _ => {}
        }
    }
    Ok(())
}

/// ADD's result: each address as a host prefix.
fn add_result(conf: &NetConf, ips: Vec<IpAddr>) -> Value {
    let mut result = CniResult::new(&conf.cni_version);
    for ip in ips {
        result.push_ip(prefix_of(ip), None);
    }
    serde_json::to_value(result).expect("results serialize")
}

fn prefix_of(ip: IpAddr) -> IpNet {
    IpNet::new(ip, if ip.is_ipv4() { 32 } else { 128 }).expect("host prefix is valid")
}

/// Run one IPAM command. ADD returns the CNI result; DEL, CHECK, GC and STATUS return None.
pub async fn execute(env: &CniEnv, conf: &NetConf) -> Result<Option<Value>, CniError> {
    if env.command == Command::Version {
        return Ok(Some(version_result()));
    }
    let ds = conf
        .datastore()?
        .connect()
        .await
        .map_err(|e| ipam_error(e.into()))?;
    execute_on(env, conf, ds).await
}

/// Run one IPAM command over an open datastore (the `calico` plugin calls this directly
/// when `ipam.type` names this very binary, sharing its connection).
pub async fn execute_on(
    env: &CniEnv,
    conf: &NetConf,
    ds: Arc<dyn Datastore>,
) -> Result<Option<Value>, CniError> {
    let client = Client::new(ds.clone());
    // One host's block claims at a time across CNI processes (Calico's ipam.lock):
    // concurrent first pods would otherwise each claim a block.
    let lock_path = std::path::PathBuf::from(conf.ipam_lock_file.as_deref().unwrap_or(IPAM_LOCK));
    let lock_timeout = conf
        .ipam_lock_timeout
        .map_or(IPAM_LOCK_TIMEOUT, std::time::Duration::from_secs);
    let ipam = Ipam::new(ds)
        .with_cross_process_lock(Arc::new(move || host_lock(&lock_path, lock_timeout)));
    let handle = workload_handle(&conf.name, &env.container_id);
    match env.command {
        Command::Add => {
            let host = conf.node_name()?;
            let mut attrs = BTreeMap::from([
                ("node".to_string(), host.clone()),
                (
                    "timestamp".to_string(),
                    crate::datastore::client::now_rfc3339(),
                ),
            ]);
            if let Some((ns, pod)) = env.k8s_pod() {
                attrs.insert("namespace".into(), ns.into());
                attrs.insert("pod".into(), pod.into());
            }
            if let Some(ip) = requested_ip(env)? {
                check_datastore_ready(&client).await?;
                let ips = assign_requested(&ipam, &handle, &attrs, ip).await?;
                return Ok(Some(add_result(conf, ips)));
            }
            let (v4_pools, v6_pools) = configured_pools(&client, conf).await?;
            let args = AssignArgs {
                handle: handle.clone(),
                attrs,
                host,
                num_v4: usize::from(conf.ipam.assign_ipv4.as_deref() != Some("false")),
                num_v6: usize::from(conf.ipam.assign_ipv6.as_deref() == Some("true")),
                v4_pools,
                v6_pools,
                use_: IpUse::Workload,
            };
            // The readiness check, the lookup of a previous assignment (a repeated ADD for
            // the same container gets the addresses it already has) and the first reads
            // of a new assignment go out together.
            let (ready, held, pre) = tokio::join!(
                check_datastore_ready(&client),
                ipam.ips_of_handle(&handle),
                ipam.prefetch(&args)
            );
            ready?;
            let mut ips = held.map_err(ipam_error)?;
            if ips.is_empty() {
                let pre = pre.map_err(ipam_error)?;
                ips = ipam
                    .auto_assign_prefetched(&args, pre)
                    .await
                    .map_err(ipam_error)?;
            }
            Ok(Some(add_result(conf, ips)))
        }
        Command::Del => {
            ipam.release_by_handle(&handle).await.map_err(ipam_error)?;
            Ok(None)
        }
        Command::Check => {
            let held = ipam.ips_of_handle(&handle).await.map_err(ipam_error)?;
            let prev: CniResult = conf
                .prev_result
                .clone()
                .ok_or_else(|| {
                    CniError::new(
                        code::INVALID_NETWORK_CONFIG,
                        "invalid network configuration field prevResult",
                        "CHECK needs prevResult",
                    )
                })
                .and_then(|v| {
                    serde_json::from_value(v).map_err(|e| {
                        CniError::new(
                            code::DECODE_FAILURE,
                            "cannot decode prevResult",
                            e.to_string(),
                        )
                    })
                })?;
            for ip in &prev.ips {
                let addr = ip.address.parse::<IpNet>().map(|n| n.addr()).map_err(|e| {
                    CniError::new(
                        code::DECODE_FAILURE,
                        "cannot decode prevResult",
                        e.to_string(),
                    )
                })?;
                if !held.contains(&addr) {
                    return Err(CniError::new(
                        code::PLUGIN_FAILURE,
                        format!("{addr} is not allocated to {handle}"),
                        "the address was released or reassigned",
                    ));
                }
            }
            Ok(None)
        }
        Command::Gc => {
            gc(conf, &ipam).await?;
            Ok(None)
        }
        Command::Status => {
            check_datastore_ready(&client).await.map_err(|e| {
                CniError::new(
                    code::PLUGIN_NOT_AVAILABLE,
                    "Calico IPAM cannot assign addresses",
                    e.to_string(),
                )
            })?;
            Ok(None)
        }
        Command::Version => Ok(Some(version_result())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_handle_belongs_to_a_network_only_with_a_dotless_container_id() {
        assert_eq!(container_of_handle("net", "net.c1"), Some("c1"));
        assert_eq!(container_of_handle("net", "net.b.c1"), None);
        assert_eq!(container_of_handle("net", "netb.c1"), None);
        assert_eq!(container_of_handle("net", "net."), None);
        assert_eq!(container_of_handle("net.b", "net.b.c1"), Some("c1"));
    }

    #[test]
    fn pools_resolve_from_names_and_cidrs_as_calico_does() {
        let pool = |name: &str, cidr: &str| {
            IPPool::new(
                name,
                IPPoolSpec {
                    cidr: cidr.into(),
                    ..Default::default()
                },
            )
        };
        let pools = [pool("blue", "10.77.0.0/16"), pool("six", "fd00::/64")];
        let v = |s: &[&str]| s.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            resolve_pools(&v(&["blue", "10.1.2.3/16"]), false, &pools).unwrap(),
            vec![
                "10.77.0.0/16".parse::<IpNet>().unwrap(),
                "10.1.0.0/16".parse().unwrap()
            ]
        );
        assert_eq!(
            resolve_pools(&v(&["six"]), true, &pools).unwrap(),
            vec!["fd00::/64".parse::<IpNet>().unwrap()]
        );
        let e = resolve_pools(&v(&["red"]), false, &pools).unwrap_err();
        assert_eq!(
            (e.code, e.msg.as_str(), e.details.as_str()),
            (
                code::INVALID_NETWORK_CONFIG,
                "invalid network configuration field ipam.ipv4_pools",
                "'red' is neither a CIDR nor the name of an IP pool"
            )
        );
        let e = resolve_pools(&v(&["blue"]), true, &pools).unwrap_err();
        assert_eq!(e.msg, "invalid network configuration field ipam.ipv6_pools");
        assert_eq!(e.details, "'blue' (10.77.0.0/16) is an IPv4 pool, not IPv6");
    }
}
