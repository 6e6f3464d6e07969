//! The CNI protocol (spec 1.1.0, also 0.3.x/0.4.0/1.0.0 configurations): environment and
//! stdin in, a result or an error JSON out, and the network configuration keys Calico's
//! plugins read (REFERENCE §4).

pub mod dataplane;
pub mod ipam_plugin;
pub mod plugin;
pub mod profile;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tracing::Instrument;

use crate::env::Env;

/// Spec versions the plugins accept (VERSION lists them).
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// CNI error codes (spec, "Error codes").
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const UNSUPPORTED_FIELD: u32 = 2;
    pub const UNKNOWN_CONTAINER: u32 = 3;
    pub const INVALID_NETWORK_CONFIG: u32 = 4;
    pub const IO_FAILURE: u32 = 5;
    pub const DECODE_FAILURE: u32 = 6;
    pub const INVALID_ENV: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    pub const PLUGIN_NOT_AVAILABLE: u32 = 50;
    /// Plugin-specific: the operation failed (e.g. no address left).
    pub const PLUGIN_FAILURE: u32 = 100;
}

/// A CNI error: printed as JSON on stdout, with a non-zero exit.
#[derive(Debug, Clone, PartialEq, Serialize, thiserror::Error)]
#[error("{msg}: {details}")]
pub struct CniError {
    #[serde(rename = "cniVersion")]
    pub cni_version: String,
    pub code: u32,
    pub msg: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub details: String,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>, details: impl Into<String>) -> Self {
        CniError {
            cni_version: "1.1.0".into(),
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }
}

/// The operation asked for (`CNI_COMMAND`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Version,
    Gc,
    Status,
}

impl Command {
    /// Its `CNI_COMMAND` spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Command::Add => "ADD",
            Command::Del => "DEL",
            Command::Check => "CHECK",
            Command::Version => "VERSION",
            Command::Gc => "GC",
            Command::Status => "STATUS",
        }
    }
}

/// The CNI environment variables.
#[derive(Debug, Clone)]
pub struct CniEnv {
    pub command: Command,
    pub container_id: String,
    pub netns: String,
    pub ifname: String,
    /// `CNI_ARGS`, split into key/value pairs (`K8S_POD_NAME`, `K8S_POD_NAMESPACE`, ...).
    pub args: BTreeMap<String, String>,
    pub path: Vec<PathBuf>,
}

fn env_error(var: &str, reason: &str) -> CniError {
    CniError::new(
        code::INVALID_ENV,
        format!("invalid environment variable {var}"),
        reason,
    )
}

impl CniEnv {
    /// Read and check the variables the command needs.
    pub fn from_env(env: &dyn Env) -> Result<CniEnv, CniError> {
        let command = match env.var("CNI_COMMAND").as_deref() {
            Some("ADD") => Command::Add,
            Some("DEL") => Command::Del,
            Some("CHECK") => Command::Check,
            Some("VERSION") => Command::Version,
            Some("GC") => Command::Gc,
            Some("STATUS") => Command::Status,
            Some(other) => {
                return Err(env_error(
                    "CNI_COMMAND",
                    &format!("unknown command '{other}'"),
                ));
            }
            None => return Err(env_error("CNI_COMMAND", "not set")),
        };
        let needs_container = matches!(command, Command::Add | Command::Del | Command::Check);
        let get = |name: &str, required: bool| -> Result<String, CniError> {
            match env.var(name) {
                Some(v) if !v.is_empty() => Ok(v),
                _ if required => Err(env_error(name, "required for this command but not set")),
                _ => Ok(String::new()),
            }
        };
        let container_id = get("CNI_CONTAINERID", needs_container)?;
        let netns = get(
            "CNI_NETNS",
            matches!(command, Command::Add | Command::Check),
        )?;
        let ifname = get("CNI_IFNAME", needs_container)?;
        let mut args = BTreeMap::new();
        for pair in env
            .var("CNI_ARGS")
            .unwrap_or_default()
            .split(';')
            .filter(|p| !p.is_empty())
        {
            let (k, v) = pair
                .split_once('=')
                .ok_or_else(|| env_error("CNI_ARGS", &format!("'{pair}' is not KEY=VALUE")))?;
            args.insert(k.to_string(), v.to_string());
        }
        let path = env
            .var("CNI_PATH")
            .unwrap_or_default()
            .split(':')
            .filter(|p| !p.is_empty())
            .map(PathBuf::from)
            .collect();
        Ok(CniEnv {
            command,
            container_id,
            netns,
            ifname,
            args,
            path,
        })
    }

    /// The Kubernetes pod, when the runtime passed one (`K8S_POD_NAMESPACE`, `K8S_POD_NAME`).
    pub fn k8s_pod(&self) -> Option<(&str, &str)> {
        Some((
            self.args.get("K8S_POD_NAMESPACE")?.as_str(),
            self.args.get("K8S_POD_NAME")?.as_str(),
        ))
    }
}

/// The `ipam` section.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct IpamConf {
    #[serde(rename = "type", default)]
    pub kind: String,
    #[serde(default)]
    pub assign_ipv4: Option<String>,
    #[serde(default)]
    pub assign_ipv6: Option<String>,
    #[serde(default)]
    pub ipv4_pools: Vec<String>,
    #[serde(default)]
    pub ipv6_pools: Vec<String>,
}

/// The `policy` section (Calico's `types.Policy`): `type: k8s` names Kubernetes policy as
/// the handler; empty means the plugin manages the network's profile itself.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct PolicyConf {
    #[serde(rename = "type", default)]
    pub kind: String,
}

/// The network configuration Calico's plugins read from stdin.
#[derive(Debug, Clone, Deserialize)]
pub struct NetConf {
    #[serde(rename = "cniVersion", default)]
    pub cni_version: String,
    #[serde(default)]
    pub name: String,
    #[serde(rename = "type", default)]
    pub kind: String,
    #[serde(default)]
    pub ipam: IpamConf,
    #[serde(default)]
    pub policy: PolicyConf,
    #[serde(default)]
    pub datastore_type: Option<String>,
    #[serde(default)]
    pub etcd_endpoints: Option<String>,
    #[serde(default)]
    pub etcd_key_file: Option<String>,
    #[serde(default)]
    pub etcd_cert_file: Option<String>,
    #[serde(default)]
    pub etcd_ca_cert_file: Option<String>,
    #[serde(default)]
    pub nodename: Option<String>,
    #[serde(default)]
    pub nodename_file: Option<String>,
    #[serde(default)]
    pub nodename_file_optional: bool,
    /// The host-wide IPAM lock's path (Calico's key; default `/var/run/calico/ipam.lock`).
    #[serde(default)]
    pub ipam_lock_file: Option<String>,
    /// How long, in seconds, ADD waits for that lock before answering "try again later"
    /// (ours; Calico waits without bound). Default 30.
    #[serde(default)]
    pub ipam_lock_timeout: Option<u64>,
    #[serde(default)]
    pub mtu: Option<u32>,
    #[serde(default)]
    pub log_level: Option<String>,
    #[serde(default)]
    pub log_file_path: Option<String>,
    #[serde(rename = "prevResult", default)]
    pub prev_result: Option<Value>,
    /// GC (1.1.0): the attachments that are still valid.
    #[serde(rename = "cni.dev/valid-attachments", default)]
    pub valid_attachments: Option<Vec<Attachment>>,
}

/// A container attachment (GC's keep list).
#[derive(Debug, Clone, Deserialize)]
pub struct Attachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    #[serde(default)]
    pub ifname: String,
}

fn conf_error(field: &str, reason: impl std::fmt::Display) -> CniError {
    CniError::new(
        code::INVALID_NETWORK_CONFIG,
        format!("invalid network configuration field {field}"),
        reason.to_string(),
    )
}

impl NetConf {
    /// Parse stdin and check the version and fields every command relies on.
    pub fn parse(stdin: &[u8]) -> Result<NetConf, CniError> {
        let conf: NetConf =
            serde_path_to_error::deserialize(&mut serde_json::Deserializer::from_slice(stdin))
                .map_err(|e| {
                    let path = e.path().to_string();
                    CniError::new(
                        code::DECODE_FAILURE,
                        format!("cannot decode network configuration at {path}"),
                        e.into_inner().to_string(),
                    )
                })?;
        if !SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()) {
            return Err(CniError::new(
                code::INCOMPATIBLE_VERSION,
                format!("incompatible CNI version {}", conf.cni_version),
                format!("supported versions: {}", SUPPORTED_VERSIONS.join(", ")),
            ));
        }
        if conf.name.is_empty() {
            return Err(conf_error("name", "the network name is required"));
        }
        for (field, v) in [
            ("ipam.assign_ipv4", &conf.ipam.assign_ipv4),
            ("ipam.assign_ipv6", &conf.ipam.assign_ipv6),
        ] {
            if let Some(v) = v
                && v != "true"
                && v != "false"
            {
                return Err(conf_error(
                    field,
                    format!("'{v}' is not \"true\" or \"false\""),
                ));
            }
        }
        for (field, pools) in [
            ("ipam.ipv4_pools", &conf.ipam.ipv4_pools),
            ("ipam.ipv6_pools", &conf.ipam.ipv6_pools),
        ] {
            // Each is a CIDR or an IPPool's name (resolved at ADD, as Calico does); a
            // name never holds a '/', so a value with one must be a CIDR.
            for p in pools {
                if p.is_empty() {
                    return Err(conf_error(field, "an empty pool name"));
                }
                if p.contains('/') && p.parse::<ipnet::IpNet>().is_err() {
                    return Err(conf_error(field, format!("'{p}' is not a CIDR")));
                }
            }
        }
        // libcni runs `ipam.type` from CNI_PATH and refuses a name with a path separator
        // ("invalid plugin name"): a name must not reach outside CNI_PATH.
        if conf.ipam.kind.contains('/') {
            return Err(conf_error(
                "ipam.type",
                format!(
                    "'{}' is not a plugin name: it contains '/' (plugins are found by name in CNI_PATH)",
                    conf.ipam.kind
                ),
            ));
        }
        if let Some(t) = &conf.datastore_type
            && t != "etcdv3"
        {
            return Err(conf_error(
                "datastore_type",
                format!("'{t}' is not supported (only etcdv3)"),
            ));
        }
        Ok(conf)
    }

    /// The datastore settings (REFERENCE §4 keys).
    pub fn datastore(&self) -> Result<crate::datastore::DatastoreConfig, CniError> {
        let pairs: Vec<(&str, String)> = [
            ("ETCD_ENDPOINTS", self.etcd_endpoints.clone()),
            ("ETCD_KEY_FILE", self.etcd_key_file.clone()),
            ("ETCD_CERT_FILE", self.etcd_cert_file.clone()),
            ("ETCD_CA_CERT_FILE", self.etcd_ca_cert_file.clone()),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.map(|v| (k, v)))
        .collect();
        let env = crate::env::MapEnv(pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect());
        let mut cfg = crate::datastore::DatastoreConfig::from_env(&env)
            .map_err(|e| conf_error("etcd_endpoints", e))?;
        cfg.timeout = std::time::Duration::from_secs(10);
        Ok(cfg)
    }

    /// The node name: `nodename`, else the nodename file, else the hostname (when the file
    /// is optional).
    pub fn node_name(&self) -> Result<String, CniError> {
        if let Some(n) = self.nodename.as_deref().filter(|n| !n.is_empty()) {
            return Ok(n.to_string());
        }
        let file = self
            .nodename_file
            .clone()
            .unwrap_or_else(|| "/var/lib/calico/nodename".into());
        match std::fs::read_to_string(&file) {
            Ok(n) if !n.trim().is_empty() => Ok(n.trim().to_string()),
            _ if self.nodename_file_optional => Ok(crate::env::determine_nodename(
                &crate::env::MapEnv::default(),
            )),
            Ok(_) | Err(_) => Err(conf_error(
                "nodename",
                format!(
                    "not set, and {file} is missing or empty: is calico-node running on this host?"
                ),
            )),
        }
    }
}

/// A result IP.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IpConfig {
    /// Only in results for spec versions before 1.0.0.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    pub address: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interface: Option<usize>,
}

/// A result interface.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Interface {
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
}

/// A CNI result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CniResult {
    #[serde(rename = "cniVersion")]
    pub cni_version: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<Interface>,
    #[serde(default)]
    pub ips: Vec<IpConfig>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<Value>,
    #[serde(default)]
    pub dns: Value,
}

impl CniResult {
    /// An empty result in the configuration's version.
    pub fn new(cni_version: &str) -> Self {
        CniResult {
            cni_version: cni_version.into(),
            interfaces: Vec::new(),
            ips: Vec::new(),
            routes: Vec::new(),
            dns: Value::Object(Default::default()),
        }
    }

    /// Add an address, with the `version` field older specs require.
    pub fn push_ip(&mut self, address: ipnet::IpNet, interface: Option<usize>) {
        let legacy = self.cni_version.starts_with("0.");
        let version = legacy.then(|| {
            if address.addr().is_ipv4() {
                "4".to_string()
            } else {
                "6".to_string()
            }
        });
        self.ips.push(IpConfig {
            version,
            address: address.to_string(),
            gateway: None,
            interface,
        });
    }
}

/// Log to `log_file_path` at `log_level` (stdout carries only the result). Without a
/// file, logs go to stderr at `warn`.
pub fn init_logging(conf: &NetConf) {
    let level = match conf
        .log_level
        .as_deref()
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        Some("debug") => "debug",
        Some("info") => "info",
        Some("error") => "error",
        _ => "warn",
    };
    let filter = tracing_subscriber::EnvFilter::new(level);
    let file = conf.log_file_path.as_deref().and_then(|p| {
        if let Some(dir) = std::path::Path::new(p).parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .ok()
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false);
    let _ = match file {
        Some(f) => builder.with_writer(std::sync::Mutex::new(f)).try_init(),
        None => builder.with_writer(std::io::stderr).try_init(),
    };
}

/// Which of the two plugins a binary is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plugin {
    Calico,
    CalicoIpam,
}

/// The whole life of a plugin process: read env and stdin, run, print; the exit code.
pub fn plugin_main(plugin: Plugin, env: &dyn Env, stdin: &[u8], out: &mut dyn Write) -> i32 {
    let version = serde_json::from_slice::<Value>(stdin)
        .ok()
        .and_then(|v| {
            v.get("cniVersion")
                .and_then(Value::as_str)
                .map(str::to_string)
        })
        .unwrap_or_else(|| "1.1.0".into());
    let outcome = (|| {
        let cni_env = CniEnv::from_env(env)?;
        if cni_env.command == Command::Version {
            return Ok(Some(version_result()));
        }
        let conf = NetConf::parse(stdin)?;
        init_logging(&conf);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| CniError::new(code::IO_FAILURE, "cannot start", e.to_string()))?;
        let run = async {
            match plugin {
                Plugin::Calico => plugin::execute(&cni_env, &conf, stdin).await,
                Plugin::CalicoIpam => ipam_plugin::execute(&cni_env, &conf).await,
            }
        };
        rt.block_on(run.instrument(pod_span(&cni_env)))
    })();
    finish(out, outcome, &version)
}

/// The span every line of one call is logged in (STYLE: spans per pod): the command, the
/// container and, when the runtime passed them, the pod's namespace and name, as Calico's
/// plugin logs `ContainerID`, `Namespace` and `Workload` on each line. At ERROR level, so it
/// is enabled whatever the log level and the warnings carry it too.
pub fn pod_span(env: &CniEnv) -> tracing::Span {
    let span = tracing::error_span!(
        "pod",
        command = %env.command.as_str(),
        container_id = %env.container_id,
        namespace = tracing::field::Empty,
        pod = tracing::field::Empty,
    );
    if let Some((namespace, pod)) = env.k8s_pod() {
        span.record("namespace", tracing::field::display(namespace));
        span.record("pod", tracing::field::display(pod));
    }
    span
}

/// `VERSION`'s answer.
pub fn version_result() -> Value {
    serde_json::json!({"cniVersion": "1.1.0", "supportedVersions": SUPPORTED_VERSIONS})
}

/// Print a plugin's outcome as the spec wants (result or error JSON on stdout) and return
/// the exit code.
pub fn finish(
    out: &mut dyn Write,
    outcome: Result<Option<Value>, CniError>,
    cni_version: &str,
) -> i32 {
    match outcome {
        Ok(Some(v)) => {
            let _ = writeln!(out, "{v}");
            0
        }
        Ok(None) => 0,
        Err(mut e) => {
            if SUPPORTED_VERSIONS.contains(&cni_version) {
                e.cni_version = cni_version.to_string();
            }
            let _ = writeln!(
                out,
                "{}",
                serde_json::to_string(&e).expect("errors serialize")
            );
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::MapEnv;

    #[test]
    fn env_is_read_and_checked_per_command() {
        let env = MapEnv::from_pairs(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_NETNS", "/run/netns/x"),
            ("CNI_IFNAME", "eth0"),
            (
                "CNI_ARGS",
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=ns1;K8S_POD_NAME=web-0",
            ),
            ("CNI_PATH", "/opt/cni/bin:/usr/lib/cni"),
        ]);
        let e = CniEnv::from_env(&env).unwrap();
        assert_eq!(e.command, Command::Add);
        assert_eq!(e.k8s_pod(), Some(("ns1", "web-0")));
        assert_eq!(e.path.len(), 2);
        let e = CniEnv::from_env(&MapEnv::from_pairs(&[("CNI_COMMAND", "ADD")])).unwrap_err();
        assert_eq!(
            (e.code, e.msg.as_str()),
            (7, "invalid environment variable CNI_CONTAINERID")
        );
        let e = CniEnv::from_env(&MapEnv::from_pairs(&[("CNI_COMMAND", "JUMP")])).unwrap_err();
        assert_eq!(e.details, "unknown command 'JUMP'");
        assert!(CniEnv::from_env(&MapEnv::from_pairs(&[("CNI_COMMAND", "VERSION")])).is_ok());
        // DEL needs no netns (the namespace may already be gone).
        let del = MapEnv::from_pairs(&[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_IFNAME", "eth0"),
        ]);
        assert!(CniEnv::from_env(&del).is_ok());
    }

    #[test]
    fn config_errors_name_the_field() {
        let e = NetConf::parse(br#"{"cniVersion":"2.0.0","name":"n"}"#).unwrap_err();
        assert_eq!(
            (e.code, e.msg.as_str()),
            (1, "incompatible CNI version 2.0.0")
        );
        let e =
            NetConf::parse(br#"{"cniVersion":"1.0.0","name":"n","ipam":{"assign_ipv4":"yes"}}"#)
                .unwrap_err();
        assert_eq!(
            (e.code, e.msg.as_str(), e.details.as_str()),
            (
                4,
                "invalid network configuration field ipam.assign_ipv4",
                "'yes' is not \"true\" or \"false\""
            )
        );
        let e = NetConf::parse(br#"{"cniVersion":"1.0.0","name":"n","mtu":"big"}"#).unwrap_err();
        assert_eq!(
            (e.code, e.msg.as_str()),
            (6, "cannot decode network configuration at mtu")
        );
        let e = NetConf::parse(
            br#"{"cniVersion":"0.3.1","name":"n","ipam":{"ipv4_pools":["10.0.0.0/33"]}}"#,
        )
        .unwrap_err();
        assert_eq!(e.msg, "invalid network configuration field ipam.ipv4_pools");
        for kind in ["../../bin/sh", "/usr/bin/x", "sub/calico-ipam"] {
            let e = NetConf::parse(
                format!(r#"{{"cniVersion":"1.0.0","name":"n","ipam":{{"type":"{kind}"}}}}"#)
                    .as_bytes(),
            )
            .unwrap_err();
            assert_eq!(
                (e.code, e.msg.as_str()),
                (4, "invalid network configuration field ipam.type"),
                "{kind}"
            );
            assert!(e.details.contains(kind), "{}", e.details);
        }
        // Pool names pass (they are resolved at ADD).
        assert!(
            NetConf::parse(br#"{"cniVersion":"1.0.0","name":"n","ipam":{"ipv4_pools":["blue"]}}"#)
                .is_ok()
        );
        let e = NetConf::parse(
            br#"{"cniVersion":"1.0.0","name":"n","etcd_endpoints":"127.0.0.1:2379"}"#,
        )
        .unwrap()
        .datastore()
        .unwrap_err();
        assert_eq!(e.msg, "invalid network configuration field etcd_endpoints");
    }

    #[test]
    fn legacy_results_carry_the_ip_version() {
        let mut r = CniResult::new("0.3.1");
        r.push_ip("10.65.0.5/32".parse().unwrap(), None);
        assert_eq!(r.ips[0].version.as_deref(), Some("4"));
        let mut r = CniResult::new("1.0.0");
        r.push_ip("fd00::5/128".parse().unwrap(), Some(1));
        assert_eq!(
            serde_json::to_string(&r.ips[0]).unwrap(),
            r#"{"address":"fd00::5/128","interface":1}"#
        );
    }
}
