//! `calico`, the main CNI plugin (REFERENCE §4): addresses from the IPAM plugin named in
//! `ipam.type` (run from CNI_PATH as the spec says, so `host-local` works too), the pod's
//! veth and routes, its WorkloadEndpoint and, outside Kubernetes, the network's profile
//! (`profile`). A failure after IPAM releases the addresses and removes what was created.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command as Process, Stdio};
use std::sync::Arc;

use ipnet::IpNet;
use serde_json::Value;
use sha1::{Digest, Sha1};

use super::dataplane::{self, PodSpec};
use super::ipam_plugin::{self, check_datastore_ready, ipam_error};
use super::profile;
use super::{CniEnv, CniError, CniResult, Command, Interface, NetConf, code, version_result};
use crate::datastore::{Client, ClientError, Datastore};
use crate::model::workload::{WorkloadEndpoint, WorkloadEndpointSpec, workload_endpoint_name};

/// The host-side interface name: `cali` + 11 hex chars of SHA1(`<namespace>.<pod>`) for
/// Kubernetes pods, `cali` + the first 11 characters of the container ID otherwise.
pub fn host_ifname(env: &CniEnv) -> String {
    match env.k8s_pod() {
        Some((ns, pod)) => {
            let digest = Sha1::digest(format!("{ns}.{pod}").as_bytes());
            let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
            format!("cali{}", &hex[..11])
        }
        None => format!(
            "cali{}",
            env.container_id.chars().take(11).collect::<String>()
        ),
    }
}

/// Orchestrator, namespace and workload name of the endpoint.
fn identity(env: &CniEnv) -> (&'static str, String, String) {
    match env.k8s_pod() {
        Some((ns, pod)) => ("k8s", ns.to_string(), pod.to_string()),
        None => ("cni", "default".to_string(), env.container_id.clone()),
    }
}

/// MTU: `mtu` in the config, else the file calico-node writes, else 1500.
fn mtu(conf: &NetConf) -> u32 {
    if let Some(m) = conf.mtu.filter(|m| *m > 0) {
        return m;
    }
    let dir = conf
        .nodename_file
        .as_deref()
        .and_then(|f| Path::new(f).parent())
        .unwrap_or(Path::new("/var/lib/calico"));
    std::fs::read_to_string(dir.join("mtu"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1500)
}

/// How the IPAM step runs: in this process when `ipam.type` is `calico-ipam` and the file
/// CNI_PATH gives for it is this very executable (Calico ships one binary under both names;
/// the result is the same, without a second process and a second etcd connection), else by
/// running the named plugin from CNI_PATH as the spec says (`host-local`, or any other).
#[derive(Debug, Clone)]
pub enum IpamRunner {
    InProcess,
    Exec(PathBuf),
}

fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// Find the IPAM plugin named in `ipam.type` in CNI_PATH and decide how to run it.
pub fn ipam_runner(env: &CniEnv, conf: &NetConf) -> Result<IpamRunner, CniError> {
    let kind = if conf.ipam.kind.is_empty() {
        "calico-ipam"
    } else {
        conf.ipam.kind.as_str()
    };
    let plugin = env
        .path
        .iter()
        .map(|d| d.join(kind))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            CniError::new(
                code::INVALID_NETWORK_CONFIG,
                "invalid network configuration field ipam.type",
                format!("IPAM plugin '{kind}' not found in CNI_PATH"),
            )
        })?;
    if kind == "calico-ipam" && same_file(&plugin, Path::new("/proc/self/exe")) {
        return Ok(IpamRunner::InProcess);
    }
    Ok(IpamRunner::Exec(plugin))
}

/// Run one IPAM command (`command` replaces CNI_COMMAND) the way `runner` says.
async fn run_ipam(
    runner: &IpamRunner,
    env: &CniEnv,
    conf: &NetConf,
    stdin: &[u8],
    ds: &Arc<dyn Datastore>,
    command: Command,
) -> Result<Option<Value>, CniError> {
    match runner {
        IpamRunner::InProcess => {
            let mut env = env.clone();
            env.command = command;
            ipam_plugin::execute_on(&env, conf, ds.clone()).await
        }
        IpamRunner::Exec(plugin) => {
            let (plugin, stdin) = (plugin.clone(), stdin.to_vec());
            tokio::task::spawn_blocking(move || exec_ipam(&plugin, &stdin, command.as_str()))
                .await
                .unwrap_or_else(|e| {
                    Err(CniError::new(
                        code::IO_FAILURE,
                        "the IPAM plugin call failed",
                        e.to_string(),
                    ))
                })
        }
    }
}

/// Run an IPAM plugin with our stdin and environment (CNI_COMMAND replaced).
fn exec_ipam(plugin: &Path, stdin: &[u8], command: &str) -> Result<Option<Value>, CniError> {
    let kind = plugin
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut child = Process::new(plugin)
        .env("CNI_COMMAND", command)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| {
            CniError::new(
                code::IO_FAILURE,
                format!("cannot run {}", plugin.display()),
                e.to_string(),
            )
        })?;
    if let Some(mut s) = child.stdin.take() {
        let _ = s.write_all(stdin);
    }
    let out = child.wait_with_output().map_err(|e| {
        CniError::new(
            code::IO_FAILURE,
            format!("{} failed", plugin.display()),
            e.to_string(),
        )
    })?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        // Pass the IPAM plugin's own error through (it has the right code).
        return Err(serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|v| {
                Some(CniError::new(
                    v["code"].as_u64()? as u32,
                    v["msg"].as_str()?.to_string(),
                    v["details"].as_str().unwrap_or("").to_string(),
                ))
            })
            .unwrap_or_else(|| {
                CniError::new(
                    code::PLUGIN_FAILURE,
                    format!("IPAM plugin {kind} failed"),
                    text.trim().to_string(),
                )
            }));
    }
    if text.trim().is_empty() {
        return Ok(None);
    }
    serde_json::from_str(&text).map(Some).map_err(|e| {
        CniError::new(
            code::DECODE_FAILURE,
            format!("cannot decode the result of {kind}"),
            e.to_string(),
        )
    })
}

fn plugin_error(what: &str) -> impl FnOnce(dataplane::DataplaneError) -> CniError + '_ {
    move |e| CniError::new(code::PLUGIN_FAILURE, what.to_string(), e.to_string())
}

fn host_prefixes(result: &CniResult) -> Result<Vec<IpNet>, CniError> {
    result
        .ips
        .iter()
        .map(|ip| {
            let net: IpNet = ip.address.parse().map_err(|_| {
                CniError::new(
                    code::DECODE_FAILURE,
                    "bad address from IPAM",
                    ip.address.clone(),
                )
            })?;
            Ok(IpNet::new(net.addr(), net.max_prefix_len()).expect("host prefix"))
        })
        .collect()
}

/// Run one command of the main plugin.
pub async fn execute(
    env: &CniEnv,
    conf: &NetConf,
    stdin: &[u8],
) -> Result<Option<Value>, CniError> {
    if env.command == Command::Version {
        return Ok(Some(version_result()));
    }
    // A missing IPAM plugin fails ADD at once, but DEL still cleans everything else.
    let runner = ipam_runner(env, conf);
    if env.command == Command::Add {
        runner.clone()?;
    }
    let host_if = host_ifname(env);
    let in_process = matches!(runner, Ok(IpamRunner::InProcess));
    // The kernel work needs nothing from the datastore: it starts first, on its own
    // thread, and runs while we talk to etcd.
    let spec = PodSpec {
        host_ifname: host_if.clone(),
        container_ifname: env.ifname.clone(),
        netns: env.netns.clone(),
        mtu: mtu(conf),
        addrs: Vec::new(),
        name_from_pod: env.k8s_pod().is_some(),
    };
    let pod_mac = dataplane::random_mac();
    let veth = if env.command == Command::Add {
        conf.node_name()?;
        // With our own IPAM the families are known before it answers.
        let expect = dataplane::Families {
            v4: in_process && conf.ipam.assign_ipv4.as_deref() != Some("false"),
            v6: in_process && conf.ipam.assign_ipv6.as_deref() == Some("true"),
        };
        Some(dataplane::create_veth(&spec, pod_mac, expect))
    } else {
        None
    };
    let ds = match conf.datastore() {
        Ok(cfg) => cfg.connect().await.map_err(|e| ipam_error(e.into())),
        Err(e) => Err(e),
    };
    let ds = match ds {
        Ok(ds) => ds,
        Err(e) => {
            if let Some(veth) = veth
                && veth.await.is_ok()
            {
                let _ = dataplane::teardown(&env.netns, &env.ifname).await;
            }
            // DEL deletes nothing without the datastore (Calico: "to protect the
            // endpoint from false DEL"): the runtime retries.
            return Err(e);
        }
    };
    let client = Client::new(ds.clone());
    let (orchestrator, namespace, workload) = identity(env);
    let (runner, ds) = (&runner, &ds);
    let ipam = move |command| async move {
        match runner {
            Ok(r) => run_ipam(r, env, conf, stdin, ds, command).await,
            Err(e) => Err(e.clone()),
        }
    };
    match env.command {
        Command::Add => {
            let node = conf.node_name()?;
            let id = (orchestrator, namespace.as_str(), workload.as_str());
            let veth = veth.expect("made for ADD");
            let pod = (spec, pod_mac, veth);
            add(env, conf, &client, in_process, &node, id, pod, &ipam).await
        }
        Command::Del => {
            del(
                env,
                conf,
                &client,
                orchestrator,
                &namespace,
                &workload,
                &ipam,
            )
            .await?;
            Ok(None)
        }
        Command::Check => {
            let prev: CniResult = conf
                .prev_result
                .clone()
                .and_then(|v| serde_json::from_value(v).ok())
                .ok_or_else(|| {
                    CniError::new(
                        code::INVALID_NETWORK_CONFIG,
                        "invalid network configuration field prevResult",
                        "CHECK needs a valid prevResult",
                    )
                })?;
            ipam(Command::Check).await?;
            let spec = PodSpec {
                host_ifname: host_if,
                container_ifname: env.ifname.clone(),
                netns: env.netns.clone(),
                mtu: mtu(conf),
                addrs: host_prefixes(&prev)?,
                name_from_pod: env.k8s_pod().is_some(),
            };
            dataplane::check(&spec)
                .await
                .map_err(|e| CniError::new(code::PLUGIN_FAILURE, "CHECK failed", e))?;
            Ok(None)
        }
        Command::Gc | Command::Status => {
            ipam(env.command).await?;
            Ok(None)
        }
        Command::Version => Ok(Some(version_result())),
    }
}

/// How often DEL re-reads the WorkloadEndpoint when it changed between the read and the
/// delete (Calico's CmdDelK8s: 5 retries, then the error, and the runtime retries DEL).
const DEL_WEP_ATTEMPTS: usize = 6;

/// DEL, as Calico's `CmdDelK8s`: the WorkloadEndpoint is read first. When it cannot be
/// read the datastore state is unknown and nothing is deleted (an error, code 11 when
/// etcd is unreachable). It is deleted at the revision read, and only when it is this
/// container's: a pod's endpoint is named by pod, so a DEL for an old sandbox must leave
/// the new sandbox's endpoint alone. Then, independently, the interface is removed inside
/// CNI_NETNS by CNI_IFNAME (never a host-side `cali…` link by name: a newer sandbox of
/// the same pod owns that name now) and the addresses of this container's handle are
/// released.
async fn del<F, Fut>(
    env: &CniEnv,
    conf: &NetConf,
    client: &Client,
    orchestrator: &str,
    namespace: &str,
    workload: &str,
    ipam: &F,
) -> Result<(), CniError>
where
    F: Fn(Command) -> Fut,
    Fut: std::future::Future<Output = Result<Option<Value>, CniError>>,
{
    let link = || async {
        dataplane::teardown(&env.netns, &env.ifname)
            .await
            .map_err(plugin_error("cannot remove the pod interface"))
    };
    let Ok(node) = conf.node_name() else {
        // No endpoint name to read: the release is what reaches the datastore, and the
        // interface goes only once it succeeded.
        ipam(Command::Del).await?;
        return link().await;
    };
    let name = workload_endpoint_name(&node, orchestrator, workload, &env.ifname);
    delete_own_endpoint(client, namespace, &name, &env.container_id).await?;
    let (released, link) = tokio::join!(ipam(Command::Del), link());
    released?;
    link
}

/// Delete the endpoint `name` if it belongs to `container_id` (or names no container),
/// at the revision read, re-reading on a conflict.
async fn delete_own_endpoint(
    client: &Client,
    namespace: &str,
    name: &str,
    container_id: &str,
) -> Result<(), CniError> {
    for _ in 0..DEL_WEP_ATTEMPTS {
        let wep = client
            .get::<WorkloadEndpointSpec>(Some(namespace), name)
            .await
            .map_err(|e| ipam_error(e.into()))?;
        let Some(wep) = wep else {
            tracing::info!(endpoint = name, "no WorkloadEndpoint; cleaning up the rest");
            return Ok(());
        };
        if !wep.spec.container_id.is_empty() && wep.spec.container_id != container_id {
            tracing::warn!(
                endpoint = name,
                stored = %wep.spec.container_id,
                container = container_id,
                "CNI_CONTAINERID does not match the WorkloadEndpoint's containerID: the endpoint belongs to a newer sandbox and is left alone"
            );
            return Ok(());
        }
        let revision = wep
            .metadata
            .resource_version
            .as_deref()
            .and_then(|r| r.parse::<i64>().ok());
        match client
            .delete::<WorkloadEndpointSpec>(Some(namespace), name, revision)
            .await
        {
            Ok(_) | Err(ClientError::NotFound(_)) => return Ok(()),
            Err(ClientError::Conflict(..)) => continue,
            Err(e) => return Err(ipam_error(e.into())),
        }
    }
    Err(CniError::new(
        code::TRY_AGAIN_LATER,
        format!("WorkloadEndpoint {namespace}/{name} was modified before it could be deleted"),
        format!("it changed {DEL_WEP_ATTEMPTS} times between read and delete; try again later"),
    ))
}

async fn delete_endpoint(client: &Client, namespace: &str, name: &str) -> Result<(), CniError> {
    match client
        .delete::<WorkloadEndpointSpec>(Some(namespace), name, None)
        .await
    {
        Ok(_) | Err(ClientError::NotFound(_)) => Ok(()),
        Err(e) => Err(ipam_error(e.into())),
    }
}

/// ADD: the addresses and the veth pair at the same time (the pair needs no address), then
/// the pod's addresses and routes at the same time as the WorkloadEndpoint (its MAC was
/// chosen up front). Any failure after IPAM releases the addresses and removes the
/// interface and the endpoint this call created.
#[allow(clippy::too_many_arguments)]
async fn add<F, Fut, V>(
    env: &CniEnv,
    conf: &NetConf,
    client: &Client,
    in_process: bool,
    node: &str,
    (orchestrator, namespace, workload): (&str, &str, &str),
    (mut spec, pod_mac, veth): (PodSpec, [u8; 6], V),
    ipam: &F,
) -> Result<Option<Value>, CniError>
where
    F: Fn(Command) -> Fut,
    Fut: std::future::Future<Output = Result<Option<Value>, CniError>>,
    V: std::future::Future<Output = Result<dataplane::Veth, dataplane::DataplaneError>>,
{
    let host_if = spec.host_ifname.clone();
    let host_if = host_if.as_str();
    let assigned = async {
        if !in_process {
            // calico-ipam checks readiness itself; another IPAM plugin does not.
            check_datastore_ready(client).await?;
        }
        let result = ipam(Command::Add).await?.ok_or_else(|| {
            CniError::new(
                code::PLUGIN_FAILURE,
                "the IPAM plugin returned no result",
                "",
            )
        })?;
        Ok::<_, CniError>(result)
    };
    // The network's profile (non-Kubernetes mode) is made sure of at the same time: it
    // exists before the endpoint that names it, so Felix never sees the endpoint without
    // its profile (which would deny all its traffic for a moment).
    let profile = async {
        if profile::wants_network_profile(env, conf) {
            profile::ensure_network_profile(client, &conf.name).await?;
        }
        Ok::<_, CniError>(())
    };
    // The pair is made on threads of its own meanwhile; it is awaited only where needed.
    // Both steps run to their end (IPAM is never cut off half-way), then a failure of
    // either undoes what the other did.
    let (assigned, profile) = tokio::join!(assigned, profile);
    let assigned = match (assigned, profile) {
        (Ok(v), Ok(())) => v,
        (assigned, profile) => {
            // The IPAM plugin undoes its own partial work; the pair is ours to remove, and
            // the addresses too when only the profile failed.
            if assigned.is_ok() {
                let _ = ipam(Command::Del).await;
            }
            if veth.await.is_ok() {
                let _ = dataplane::teardown(&env.netns, &env.ifname).await;
            }
            return Err(assigned.err().or(profile.err()).expect("one step failed"));
        }
    };
    let mut wep_created = false;
    // Taken by the step that waits for it; on failure, whoever did not must still wait
    // for the pair to exist before removing it.
    let mut veth = Some(veth);
    let outcome = async {
        let result: CniResult = serde_json::from_value(assigned).map_err(|e| {
            CniError::new(
                code::DECODE_FAILURE,
                "cannot decode the IPAM result",
                e.to_string(),
            )
        })?;
        spec.addrs = host_prefixes(&result)?;
        if spec.addrs.is_empty() {
            return Err(CniError::new(
                code::PLUGIN_FAILURE,
                "the IPAM plugin assigned no address",
                "",
            ));
        }
        let mac = dataplane::mac_string(&pod_mac);
        let name = workload_endpoint_name(node, orchestrator, workload, &env.ifname);
        let wep = endpoint(
            conf,
            env,
            node,
            host_if,
            (orchestrator, namespace, workload),
            &spec.addrs,
            &name,
            &mac,
        );
        let write = async {
            // A new pod's endpoint is one create; an existing one (a re-ADD) is updated.
            match client.create(wep.clone()).await {
                Ok(_) => Ok(true),
                Err(ClientError::AlreadyExists(_)) => client
                    .apply(wep)
                    .await
                    .map(|_| false)
                    .map_err(|e| ipam_error(e.into())),
                Err(e) => Err(ipam_error(e.into())),
            }
        };
        // The endpoint needs only the address and the MAC chosen up front: it is written
        // while the pair is finished and configured.
        let configure = async {
            let veth = veth
                .take()
                .expect("taken once")
                .await
                .map_err(plugin_error("cannot create the pod interface"))?;
            dataplane::configure(&spec, veth)
                .await
                .map_err(plugin_error("cannot set up the pod network"))
        };
        let (written, configured) = tokio::join!(write, configure);
        wep_created = matches!(written, Ok(true));
        written?;
        configured?;
        Ok(cni_result(conf, env, host_if, &spec.addrs, mac))
    }
    .await;
    if outcome.is_err() {
        // Undo: the interface, the endpoint if this call made it, then the addresses.
        if let Some(v) = veth.take() {
            let _ = v.await;
        }
        let _ = dataplane::teardown(&env.netns, &env.ifname).await;
        if wep_created {
            let name = workload_endpoint_name(node, orchestrator, workload, &env.ifname);
            let _ = delete_endpoint(client, namespace, &name).await;
        }
        let _ = ipam(Command::Del).await;
    }
    outcome.map(Some)
}

#[allow(clippy::too_many_arguments)]
fn endpoint(
    conf: &NetConf,
    env: &CniEnv,
    node: &str,
    host_if: &str,
    (orchestrator, namespace, workload): (&str, &str, &str),
    addrs: &[IpNet],
    name: &str,
    mac: &str,
) -> WorkloadEndpoint {
    let k8s = orchestrator == "k8s";
    let mut wep = WorkloadEndpoint::new(
        name.to_string(),
        WorkloadEndpointSpec {
            orchestrator: orchestrator.into(),
            workload: if k8s { String::new() } else { workload.into() },
            node: node.into(),
            container_id: env.container_id.clone(),
            pod: if k8s { workload.into() } else { String::new() },
            endpoint: env.ifname.clone(),
            ip_networks: addrs.iter().map(|a| a.to_string()).collect(),
            profiles: if k8s {
                vec![format!("kns.{namespace}")]
            } else {
                vec![conf.name.clone()]
            },
            interface_name: host_if.into(),
            mac: mac.into(),
            ..Default::default()
        },
    );
    wep.metadata.namespace = Some(namespace.into());
    wep
}

fn cni_result(conf: &NetConf, env: &CniEnv, host_if: &str, addrs: &[IpNet], mac: String) -> Value {
    let mut result = CniResult::new(&conf.cni_version);
    result.interfaces = vec![
        Interface {
            name: host_if.into(),
            mac: None,
            sandbox: None,
        },
        Interface {
            name: env.ifname.clone(),
            mac: Some(mac),
            sandbox: Some(env.netns.clone()),
        },
    ];
    for a in addrs {
        result.push_ip(*a, Some(1));
    }
    serde_json::to_value(result).expect("results serialize")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::MapEnv;

    fn env(pairs: &[(&str, &str)]) -> CniEnv {
        let mut all = vec![
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "0123456789abcdef"),
            ("CNI_NETNS", "/run/netns/x"),
            ("CNI_IFNAME", "eth0"),
        ];
        all.extend_from_slice(pairs);
        CniEnv::from_env(&MapEnv::from_pairs(&all)).unwrap()
    }

    #[test]
    fn host_interface_names_follow_calico() {
        // SHA1("default.nginx") = c5f5c3ca2a3... ; Calico names it caliC5f5... lower-case.
        let k8s = env(&[("CNI_ARGS", "K8S_POD_NAMESPACE=default;K8S_POD_NAME=nginx")]);
        let digest: String = Sha1::digest(b"default.nginx")
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(host_ifname(&k8s), format!("cali{}", &digest[..11]));
        assert_eq!(host_ifname(&k8s).len(), 15);
        assert_eq!(host_ifname(&env(&[])), "cali0123456789a");
    }

    #[test]
    fn calico_ipam_runs_in_process_only_when_it_is_this_binary() {
        let dir = tempfile::tempdir().unwrap();
        let me = std::fs::read_link("/proc/self/exe").unwrap();
        std::os::unix::fs::symlink(&me, dir.path().join("calico-ipam")).unwrap();
        std::fs::write(dir.path().join("host-local"), "#!/bin/sh\n").unwrap();
        let other = tempfile::tempdir().unwrap();
        std::fs::write(other.path().join("calico-ipam"), "#!/bin/sh\n").unwrap();
        let conf = |kind: &str| {
            NetConf::parse(
                format!(r#"{{"cniVersion":"1.0.0","name":"n","type":"calico","ipam":{{"type":"{kind}"}}}}"#)
                    .as_bytes(),
            )
            .unwrap()
        };
        let mut e = env(&[]);
        e.path = vec![dir.path().to_path_buf()];
        assert!(matches!(
            ipam_runner(&e, &conf("calico-ipam")),
            Ok(IpamRunner::InProcess)
        ));
        assert!(matches!(
            ipam_runner(&e, &conf("host-local")),
            Ok(IpamRunner::Exec(p)) if p == dir.path().join("host-local")
        ));
        // A different file named calico-ipam is run as a process.
        e.path = vec![other.path().to_path_buf(), dir.path().to_path_buf()];
        assert!(matches!(
            ipam_runner(&e, &conf("calico-ipam")),
            Ok(IpamRunner::Exec(p)) if p == other.path().join("calico-ipam")
        ));
        let missing = ipam_runner(&e, &conf("nope")).unwrap_err();
        assert_eq!(missing.code, code::INVALID_NETWORK_CONFIG);
        assert!(missing.details.contains("'nope' not found in CNI_PATH"));
    }

    /// A datastore where a new sandbox of the pod rewrites the endpoint between DEL's read
    /// and its delete (the first delete of the key only).
    struct NewSandboxDuringDel {
        inner: crate::datastore::MemoryDatastore,
        replaced: std::sync::atomic::AtomicBool,
        replacement: Vec<u8>,
    }

    #[async_trait::async_trait]
    impl Datastore for NewSandboxDuringDel {
        async fn get(
            &self,
            key: &str,
        ) -> crate::datastore::DsResult<Option<crate::datastore::KeyValue>> {
            self.inner.get(key).await
        }
        async fn list(
            &self,
            prefix: &str,
        ) -> crate::datastore::DsResult<(Vec<crate::datastore::KeyValue>, i64)> {
            self.inner.list(prefix).await
        }
        async fn create(&self, key: &str, value: Vec<u8>) -> crate::datastore::DsResult<i64> {
            self.inner.create(key, value).await
        }
        async fn update(
            &self,
            key: &str,
            value: Vec<u8>,
            revision: i64,
        ) -> crate::datastore::DsResult<i64> {
            self.inner.update(key, value, revision).await
        }
        async fn apply(&self, key: &str, value: Vec<u8>) -> crate::datastore::DsResult<i64> {
            self.inner.apply(key, value).await
        }
        async fn delete(
            &self,
            key: &str,
            revision: Option<i64>,
        ) -> crate::datastore::DsResult<crate::datastore::KeyValue> {
            if !self
                .replaced
                .swap(true, std::sync::atomic::Ordering::SeqCst)
            {
                self.inner.apply(key, self.replacement.clone()).await?;
            }
            self.inner.delete(key, revision).await
        }
        async fn watch(
            &self,
            prefix: &str,
            from_revision: i64,
        ) -> crate::datastore::DsResult<crate::datastore::WatchReceiver> {
            self.inner.watch(prefix, from_revision).await
        }
    }

    fn wep_of(container: &str) -> WorkloadEndpoint {
        let mut w = WorkloadEndpoint::new(
            "node--1-k8s-p-eth0",
            WorkloadEndpointSpec {
                orchestrator: "k8s".into(),
                node: "node-1".into(),
                pod: "p".into(),
                endpoint: "eth0".into(),
                container_id: container.into(),
                interface_name: "cali0123456789a".into(),
                ..Default::default()
            },
        );
        w.metadata.namespace = Some("ns1".into());
        w
    }

    #[tokio::test]
    async fn del_deletes_only_its_own_endpoint_at_the_revision_read() {
        let name = "node--1-k8s-p-eth0";
        let get = |c: Client| async move {
            c.get::<WorkloadEndpointSpec>(Some("ns1"), name)
                .await
                .unwrap()
                .map(|w| w.spec.container_id)
        };
        // Its own endpoint goes; another sandbox's stays; none is fine.
        let client = Client::new(Arc::new(crate::datastore::MemoryDatastore::new()));
        client.create(wep_of("sb1")).await.unwrap();
        delete_own_endpoint(&client, "ns1", name, "sb0")
            .await
            .unwrap();
        assert_eq!(get(client.clone()).await.as_deref(), Some("sb1"));
        delete_own_endpoint(&client, "ns1", name, "sb1")
            .await
            .unwrap();
        assert_eq!(get(client.clone()).await, None);
        delete_own_endpoint(&client, "ns1", name, "sb1")
            .await
            .unwrap();
        // Sandbox 2 rewrites the endpoint between the read and the delete: the delete at
        // the old revision conflicts, the re-read shows sandbox 2's, which stays.
        let inner = crate::datastore::MemoryDatastore::new();
        let seed = Client::new(Arc::new(inner.clone()));
        seed.create(wep_of("sb1")).await.unwrap();
        let mut replacement = wep_of("sb2");
        replacement.metadata.resource_version = None;
        let ds = NewSandboxDuringDel {
            inner,
            replaced: false.into(),
            replacement: crate::datastore::client::encode(&replacement),
        };
        let client = Client::new(Arc::new(ds));
        delete_own_endpoint(&client, "ns1", name, "sb1")
            .await
            .unwrap();
        assert_eq!(get(client).await.as_deref(), Some("sb2"));
    }

    #[test]
    fn identity_is_k8s_only_with_both_pod_args() {
        assert_eq!(
            identity(&env(&[(
                "CNI_ARGS",
                "K8S_POD_NAMESPACE=ns1;K8S_POD_NAME=p"
            )])),
            ("k8s", "ns1".into(), "p".into())
        );
        assert_eq!(
            identity(&env(&[("CNI_ARGS", "K8S_POD_NAME=p")])),
            ("cni", "default".into(), "0123456789abcdef".into())
        );
    }
}
