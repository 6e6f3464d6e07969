//! `calico`, the main CNI plugin (REFERENCE §4): addresses from the IPAM plugin named in
//! `ipam.type` (run from CNI_PATH as the spec says, so `host-local` works too), the pod's
//! veth and routes, and its WorkloadEndpoint. A failure after IPAM releases the addresses
//! and removes what was created.

use std::io::Write;
use std::path::Path;
use std::process::{Command as Process, Stdio};

use ipnet::IpNet;
use serde_json::Value;
use sha1::{Digest, Sha1};

use super::dataplane::{self, PodSpec};
use super::ipam_plugin::{check_datastore_ready, ipam_error};
use super::{CniEnv, CniError, CniResult, Command, Interface, NetConf, code, version_result};
use crate::datastore::{Client, ClientError};
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

/// Run the IPAM plugin named in `ipam.type` from CNI_PATH with our stdin and environment.
pub fn exec_ipam(
    env: &CniEnv,
    conf: &NetConf,
    stdin: &[u8],
    command: &str,
) -> Result<Option<Value>, CniError> {
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
    let mut child = Process::new(&plugin)
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
    let ds = conf
        .datastore()?
        .connect()
        .await
        .map_err(|e| ipam_error(e.into()))?;
    let client = Client::new(ds);
    let host_if = host_ifname(env);
    let (orchestrator, namespace, workload) = identity(env);
    match env.command {
        Command::Add => {
            check_datastore_ready(&client).await?;
            let node = conf.node_name()?;
            let ipam_result = exec_ipam(env, conf, stdin, "ADD")?.ok_or_else(|| {
                CniError::new(
                    code::PLUGIN_FAILURE,
                    "the IPAM plugin returned no result",
                    "",
                )
            })?;
            let ipam_result: CniResult = serde_json::from_value(ipam_result).map_err(|e| {
                CniError::new(
                    code::DECODE_FAILURE,
                    "cannot decode the IPAM result",
                    e.to_string(),
                )
            })?;
            match add(
                env,
                conf,
                &client,
                &node,
                &host_if,
                (orchestrator, &namespace, &workload),
                &ipam_result,
            )
            .await
            {
                Ok(v) => Ok(Some(v)),
                Err(e) => {
                    // Undo: the interface, then the addresses.
                    let _ = dataplane::teardown(&env.netns, &env.ifname, &host_if).await;
                    let _ = exec_ipam(env, conf, stdin, "DEL");
                    Err(e)
                }
            }
        }
        Command::Del => {
            // The three parts are independent: release the addresses, delete the
            // endpoint and remove the interface at the same time, then report the first
            // failure (everything that can be cleaned is cleaned).
            let ipam = {
                let (env, conf, stdin) = (env.clone(), conf.clone(), stdin.to_vec());
                tokio::task::spawn_blocking(move || exec_ipam(&env, &conf, &stdin, "DEL"))
            };
            let wep = async {
                let Ok(node) = conf.node_name() else {
                    return Ok(());
                };
                let name = workload_endpoint_name(&node, orchestrator, &workload, &env.ifname);
                match client
                    .delete::<WorkloadEndpointSpec>(Some(&namespace), &name, None)
                    .await
                {
                    Ok(_) | Err(ClientError::NotFound(_)) => Ok(()),
                    Err(e) => Err(ipam_error(e.into())),
                }
            };
            let link = async {
                dataplane::teardown(&env.netns, &env.ifname, &host_if)
                    .await
                    .map_err(plugin_error("cannot remove the pod interface"))
            };
            let (ipam, wep, link) = tokio::join!(ipam, wep, link);
            let ipam = ipam.unwrap_or_else(|e| {
                Err(CniError::new(
                    code::IO_FAILURE,
                    "the IPAM plugin call failed",
                    e.to_string(),
                ))
            });
            ipam?;
            wep?;
            link?;
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
            exec_ipam(env, conf, stdin, "CHECK")?;
            let spec = PodSpec {
                host_ifname: host_if,
                container_ifname: env.ifname.clone(),
                netns: env.netns.clone(),
                mtu: mtu(conf),
                addrs: host_prefixes(&prev)?,
            };
            dataplane::check(&spec)
                .await
                .map_err(|e| CniError::new(code::PLUGIN_FAILURE, "CHECK failed", e))?;
            Ok(None)
        }
        Command::Gc | Command::Status => {
            exec_ipam(
                env,
                conf,
                stdin,
                if env.command == Command::Gc {
                    "GC"
                } else {
                    "STATUS"
                },
            )?;
            Ok(None)
        }
        Command::Version => Ok(Some(version_result())),
    }
}

async fn add(
    env: &CniEnv,
    conf: &NetConf,
    client: &Client,
    node: &str,
    host_if: &str,
    (orchestrator, namespace, workload): (&str, &str, &str),
    ipam_result: &CniResult,
) -> Result<Value, CniError> {
    let addrs = host_prefixes(ipam_result)?;
    if addrs.is_empty() {
        return Err(CniError::new(
            code::PLUGIN_FAILURE,
            "the IPAM plugin assigned no address",
            "",
        ));
    }
    let spec = PodSpec {
        host_ifname: host_if.into(),
        container_ifname: env.ifname.clone(),
        netns: env.netns.clone(),
        mtu: mtu(conf),
        addrs: addrs.clone(),
    };
    let mac = dataplane::setup(&spec)
        .await
        .map_err(plugin_error("cannot set up the pod network"))?;
    let name = workload_endpoint_name(node, orchestrator, workload, &env.ifname);
    let mut wep = WorkloadEndpoint::new(
        name,
        WorkloadEndpointSpec {
            orchestrator: orchestrator.into(),
            workload: if orchestrator == "k8s" {
                String::new()
            } else {
                workload.into()
            },
            node: node.into(),
            container_id: env.container_id.clone(),
            pod: if orchestrator == "k8s" {
                workload.into()
            } else {
                String::new()
            },
            endpoint: env.ifname.clone(),
            ip_networks: addrs.iter().map(|a| a.to_string()).collect(),
            profiles: if orchestrator == "k8s" {
                vec![format!("kns.{namespace}")]
            } else {
                vec![conf.name.clone()]
            },
            interface_name: host_if.into(),
            mac: mac.clone(),
            ..Default::default()
        },
    );
    wep.metadata.namespace = Some(namespace.into());
    // A new pod's endpoint is one create; an existing one (a re-ADD) is updated.
    match client.create(wep.clone()).await {
        Ok(_) => {}
        Err(ClientError::AlreadyExists(_)) => {
            client.apply(wep).await.map_err(|e| ipam_error(e.into()))?;
        }
        Err(e) => return Err(ipam_error(e.into())),
    }
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
        result.push_ip(a, Some(1));
    }
    Ok(serde_json::to_value(result).expect("results serialize"))
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
