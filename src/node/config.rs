//! calico-node's configuration from Calico's environment variables.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use ipnet::Ipv4Net;

use super::autodetect::AutodetectionMethod;
use crate::datastore::DatastoreConfig;
use crate::env::Env;
use crate::model::{
    AsNumber, FelixConfigurationSpec, IPPoolSpec, Kind, ObjectMeta, ValidationError,
};

/// Name of the pool calico-node creates when there is none.
pub const DEFAULT_POOL_NAME: &str = "default-ipv4-ippool";
/// Default CIDR of that pool.
pub const DEFAULT_POOL_CIDR: &str = "192.168.0.0/16";
/// Where calico-node writes the nodename (and later the MTU) file for the CNI plugin.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/calico";

/// How the node's IPv4 address is chosen (`IP`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IpSetting {
    /// `IP` unset or `autodetect`.
    Autodetect(AutodetectionMethod),
    /// `IP=10.0.0.2/24` (or without a mask: the interface's prefix is looked up).
    Fixed { addr: Ipv4Addr, prefix: Option<u8> },
    /// `IP=none`: the node has no IPv4 address (no BGP over IPv4).
    None,
}

/// `CALICO_NETWORKING_BACKEND`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetworkingBackend {
    /// `bird` (default): BGP, here by the native speaker.
    Bird,
    /// `vxlan`: VXLAN routes from the datastore, no BGP.
    Vxlan,
    /// `none`: policy only, no routing.
    None,
    /// `bird-external`: confd writes BIRD 2 configuration for a BIRD the user runs; the
    /// native speaker stays off.
    BirdExternal,
}

/// Settings of the default pool.
#[derive(Debug, Clone, PartialEq)]
pub struct DefaultPool {
    pub spec: IPPoolSpec,
}

/// Everything calico-node reads from its environment.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub nodename: String,
    pub datastore: DatastoreConfig,
    pub ip: IpSetting,
    pub as_number: Option<AsNumber>,
    /// `None` with `NO_DEFAULT_POOLS=true`.
    pub default_pool: Option<DefaultPool>,
    pub backend: NetworkingBackend,
    /// `FELIX_*` variables, applied over the datastore's FelixConfiguration.
    pub felix_env: Vec<(String, String)>,
    /// Directory of the nodename file (`CALICO_STATE_DIR`, default /var/lib/calico).
    pub state_dir: PathBuf,
    /// `CLUSTER_TYPE`, recorded in ClusterInformation.
    pub cluster_type: String,
    /// `CALICO_IPAM_GC_INTERVAL` (seconds, default 300, 0 = off): how often the node looks
    /// for leaked addresses; a leak is freed after two sightings this far apart.
    pub ipam_gc_interval: Option<std::time::Duration>,
    /// `CALICO_BGP_STATUS_SOCKET`: where `calicoctl node status` reads the BGP sessions
    /// (default /var/run/calico/bgp-status.sock).
    pub bgp_status_socket: PathBuf,
    /// `CALICO_BIRD_CONFIG_DIR` (backend `bird-external`): where BIRD's configuration is
    /// written (default /etc/calico/confd/config).
    pub bird_config_dir: PathBuf,
    /// `CALICO_BIRD_SOCKET`: BIRD's control socket, told to reload after each change
    /// (default /var/run/calico/bird.ctl).
    pub bird_socket: PathBuf,
    /// `CALICO_SHUTDOWN_TIMESTAMP_FILE` (default `<state dir>/shutdownTS`): written by
    /// `calico-node -shutdown`, removed once start-up is done (Calico's).
    pub shutdown_timestamp_file: PathBuf,
}

/// A variable with a value calico-node cannot use.
#[derive(Debug, thiserror::Error)]
#[error("invalid {var}='{value}': {reason}")]
pub struct NodeConfigError {
    pub var: String,
    pub value: String,
    pub reason: String,
}

fn bad(var: &str, value: &str, reason: impl Into<String>) -> NodeConfigError {
    NodeConfigError {
        var: var.into(),
        value: value.into(),
        reason: reason.into(),
    }
}

fn parse_bool(var: &str, v: &str) -> Result<bool, NodeConfigError> {
    match v.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "y" | "t" => Ok(true),
        "false" | "0" | "no" | "n" | "f" => Ok(false),
        _ => Err(bad(var, v, "expected true or false")),
    }
}

/// Calico's spellings of an encapsulation mode in `CALICO_IPV4POOL_IPIP` / `_VXLAN`.
fn parse_encap(var: &str, v: Option<String>) -> Result<String, NodeConfigError> {
    let Some(v) = v else {
        return Ok("Never".into());
    };
    match v.trim().to_ascii_lowercase().as_str() {
        "" | "off" | "never" => Ok("Never".into()),
        "always" => Ok("Always".into()),
        "crosssubnet" | "cross-subnet" => Ok("CrossSubnet".into()),
        _ => Err(bad(var, &v, "expected Always, CrossSubnet or Never")),
    }
}

fn pool_error(var: &str, e: ValidationError) -> NodeConfigError {
    bad(var, &e.value, e.reason)
}

impl NodeConfig {
    /// Read and check every variable; the first bad one is reported by name.
    pub fn from_env(env: &dyn Env) -> Result<Self, NodeConfigError> {
        let nodename = crate::env::determine_nodename(env);
        crate::model::validate::name("NODENAME", &nodename)
            .map_err(|e| bad("NODENAME", &nodename, e.reason))?;
        let datastore =
            DatastoreConfig::from_env(env).map_err(|e| bad("datastore", "", e.to_string()))?;
        let ip = match env.non_empty("IP") {
            None => None,
            Some(v) if v.eq_ignore_ascii_case("autodetect") => None,
            Some(v) if v.eq_ignore_ascii_case("none") => Some(IpSetting::None),
            Some(v) => Some(if let Ok(net) = v.parse::<Ipv4Net>() {
                IpSetting::Fixed {
                    addr: net.addr(),
                    prefix: Some(net.prefix_len()),
                }
            } else if let Ok(addr) = v.parse::<Ipv4Addr>() {
                IpSetting::Fixed { addr, prefix: None }
            } else {
                return Err(bad(
                    "IP",
                    &v,
                    "expected an IPv4 address, address/prefix, 'autodetect' or 'none'",
                ));
            }),
        };
        let ip = match ip {
            Some(ip) => ip,
            None => {
                let m = env.var("IP_AUTODETECTION_METHOD").unwrap_or_default();
                IpSetting::Autodetect(
                    AutodetectionMethod::parse(&m)
                        .map_err(|e| bad("IP_AUTODETECTION_METHOD", &m, e.to_string()))?,
                )
            }
        };
        let as_number = match env.non_empty("AS") {
            Some(v) => Some(
                AsNumber::parse(&v).ok_or_else(|| bad("AS", &v, crate::model::asn::AS_RANGE))?,
            ),
            None => None,
        };
        let no_default = match env.non_empty("NO_DEFAULT_POOLS") {
            Some(v) => parse_bool("NO_DEFAULT_POOLS", &v)?,
            None => false,
        };
        let default_pool = if no_default {
            None
        } else {
            Some(Self::default_pool(env)?)
        };
        let backend = match env
            .non_empty("CALICO_NETWORKING_BACKEND")
            .as_deref()
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            None | Some("bird") => NetworkingBackend::Bird,
            Some("vxlan") => NetworkingBackend::Vxlan,
            Some("none") => NetworkingBackend::None,
            Some("bird-external") => NetworkingBackend::BirdExternal,
            Some(other) => {
                return Err(bad(
                    "CALICO_NETWORKING_BACKEND",
                    other,
                    "expected bird, bird-external, vxlan or none",
                ));
            }
        };
        let felix_env: Vec<(String, String)> = env
            .vars()
            .into_iter()
            .filter(|(k, _)| k.starts_with("FELIX_"))
            .collect();
        // Check the overrides now so a typo stops start-up with the variable's name.
        let mut probe = FelixConfigurationSpec::default();
        for (k, v) in &felix_env {
            probe.apply_env(k, v).map_err(|e| bad(k, v, e.reason))?;
        }
        let state_dir = env
            .non_empty("CALICO_STATE_DIR")
            .map_or_else(|| PathBuf::from(DEFAULT_STATE_DIR), PathBuf::from);
        Ok(NodeConfig {
            shutdown_timestamp_file: super::shutdown::timestamp_file(env, &state_dir),
            state_dir,
            nodename,
            datastore,
            ip,
            as_number,
            default_pool,
            backend,
            felix_env,
            cluster_type: env.var("CLUSTER_TYPE").unwrap_or_default(),
            bird_config_dir: env
                .non_empty("CALICO_BIRD_CONFIG_DIR")
                .map_or_else(|| PathBuf::from("/etc/calico/confd/config"), PathBuf::from),
            bird_socket: env
                .non_empty("CALICO_BIRD_SOCKET")
                .map_or_else(|| PathBuf::from("/var/run/calico/bird.ctl"), PathBuf::from),
            bgp_status_socket: env.non_empty("CALICO_BGP_STATUS_SOCKET").map_or_else(
                || PathBuf::from(crate::bgp::status::DEFAULT_SOCKET),
                PathBuf::from,
            ),
            ipam_gc_interval: match env.non_empty("CALICO_IPAM_GC_INTERVAL") {
                None => Some(std::time::Duration::from_secs(300)),
                Some(v) => match v.trim().parse::<u64>() {
                    Ok(0) => None,
                    Ok(s) => Some(std::time::Duration::from_secs(s)),
                    Err(_) => {
                        return Err(bad(
                            "CALICO_IPAM_GC_INTERVAL",
                            &v,
                            "expected a number of seconds (0 disables)",
                        ));
                    }
                },
            },
        })
    }

    fn default_pool(env: &dyn Env) -> Result<DefaultPool, NodeConfigError> {
        let cidr = env
            .non_empty("CALICO_IPV4POOL_CIDR")
            .unwrap_or_else(|| DEFAULT_POOL_CIDR.into());
        let ipip = parse_encap("CALICO_IPV4POOL_IPIP", env.var("CALICO_IPV4POOL_IPIP"))?;
        let vxlan = parse_encap("CALICO_IPV4POOL_VXLAN", env.var("CALICO_IPV4POOL_VXLAN"))?;
        let block_size = match env.non_empty("CALICO_IPV4POOL_BLOCK_SIZE") {
            Some(v) => Some(v.trim().parse::<u32>().map_err(|_| {
                bad(
                    "CALICO_IPV4POOL_BLOCK_SIZE",
                    &v,
                    "expected a number between 20 and 32",
                )
            })?),
            None => None,
        };
        let nat = match env.non_empty("CALICO_IPV4POOL_NAT_OUTGOING") {
            Some(v) => parse_bool("CALICO_IPV4POOL_NAT_OUTGOING", &v)?,
            None => true,
        };
        let mut spec = IPPoolSpec {
            cidr: cidr.clone(),
            ipip_mode: Some(ipip),
            vxlan_mode: Some(vxlan),
            nat_outgoing: nat,
            block_size,
            node_selector: env.non_empty("CALICO_IPV4POOL_NODE_SELECTOR"),
            ..Default::default()
        };
        if cidr.contains(':') {
            return Err(bad("CALICO_IPV4POOL_CIDR", &cidr, "not an IPv4 CIDR"));
        }
        let mut meta = ObjectMeta::default();
        spec.set_defaults(&mut meta);
        spec.validate(&meta).map_err(|e| {
            let var = match e.field.as_str() {
                "spec.cidr" => "CALICO_IPV4POOL_CIDR",
                "spec.blockSize" => "CALICO_IPV4POOL_BLOCK_SIZE",
                "spec.ipipMode" => "CALICO_IPV4POOL_IPIP",
                "spec.vxlanMode" => "CALICO_IPV4POOL_VXLAN",
                "spec.nodeSelector" => "CALICO_IPV4POOL_NODE_SELECTOR",
                _ => "CALICO_IPV4POOL_*",
            };
            pool_error(var, e)
        })?;
        Ok(DefaultPool { spec })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::MapEnv;

    fn cfg(pairs: &[(&str, &str)]) -> Result<NodeConfig, NodeConfigError> {
        NodeConfig::from_env(&MapEnv::from_pairs(pairs))
    }

    #[test]
    fn defaults_match_calico_node() {
        let c = cfg(&[("NODENAME", "Node-1")]).unwrap();
        assert_eq!(c.nodename, "node-1");
        assert_eq!(c.ip, IpSetting::Autodetect(AutodetectionMethod::FirstFound));
        assert_eq!(c.backend, NetworkingBackend::Bird);
        let p = c.default_pool.unwrap().spec;
        assert_eq!(p.cidr, "192.168.0.0/16");
        assert_eq!(p.ipip(), "Never");
        assert!(p.nat_outgoing);
        assert_eq!(p.block_size, Some(26));
        assert_eq!(c.state_dir, PathBuf::from("/var/lib/calico"));
    }

    #[test]
    fn pool_and_ip_variables_are_read() {
        let c = cfg(&[
            ("NODENAME", "n1"),
            ("IP", "10.0.0.2/24"),
            ("AS", "65001"),
            ("CALICO_IPV4POOL_CIDR", "10.244.0.0/16"),
            ("CALICO_IPV4POOL_VXLAN", "CrossSubnet"),
            ("CALICO_IPV4POOL_BLOCK_SIZE", "24"),
            ("CALICO_IPV4POOL_NAT_OUTGOING", "false"),
            ("CALICO_NETWORKING_BACKEND", "vxlan"),
            ("FELIX_HEALTHPORT", "9199"),
        ])
        .unwrap();
        assert_eq!(
            c.ip,
            IpSetting::Fixed {
                addr: "10.0.0.2".parse().unwrap(),
                prefix: Some(24)
            }
        );
        assert_eq!(c.as_number, Some(AsNumber(65001)));
        let p = c.default_pool.unwrap().spec;
        assert_eq!(
            (p.cidr.as_str(), p.vxlan(), p.block_size, p.nat_outgoing),
            ("10.244.0.0/16", "CrossSubnet", Some(24), false)
        );
        assert_eq!(c.backend, NetworkingBackend::Vxlan);
        assert_eq!(
            c.felix_env,
            vec![("FELIX_HEALTHPORT".to_string(), "9199".to_string())]
        );
        assert!(
            cfg(&[("NODENAME", "n1"), ("NO_DEFAULT_POOLS", "true")])
                .unwrap()
                .default_pool
                .is_none()
        );
        assert_eq!(
            cfg(&[("NODENAME", "n1"), ("IP", "none")]).unwrap().ip,
            IpSetting::None
        );
    }

    #[test]
    fn bad_values_name_the_variable() {
        let e = |p: &[(&str, &str)]| cfg(p).unwrap_err().to_string();
        assert_eq!(
            e(&[("NODENAME", "n1"), ("IP", "10.0.0.300")]),
            "invalid IP='10.0.0.300': expected an IPv4 address, address/prefix, 'autodetect' or 'none'"
        );
        assert_eq!(
            e(&[("NODENAME", "n1"), ("AS", "0")]),
            format!("invalid AS='0': {}", crate::model::asn::AS_RANGE)
        );
        assert_eq!(
            e(&[
                ("NODENAME", "n1"),
                ("CALICO_IPV4POOL_CIDR", "10.244.0.1/16")
            ]),
            "invalid CALICO_IPV4POOL_CIDR='10.244.0.1/16': CIDR is not strictly masked; did you mean 10.244.0.0/16?"
        );
        assert_eq!(
            e(&[
                ("NODENAME", "n1"),
                ("CALICO_IPV4POOL_IPIP", "Always"),
                ("CALICO_IPV4POOL_VXLAN", "Always")
            ]),
            "invalid CALICO_IPV4POOL_VXLAN='Always': ipipMode (Always) and vxlanMode cannot both be enabled on the same pool"
        );
        assert_eq!(
            e(&[("NODENAME", "n1"), ("CALICO_IPV4POOL_BLOCK_SIZE", "40")]),
            "invalid CALICO_IPV4POOL_BLOCK_SIZE='40': block size must be between 20 and 32"
        );
        assert_eq!(
            e(&[("NODENAME", "n1"), ("CALICO_NETWORKING_BACKEND", "gobgp")]),
            "invalid CALICO_NETWORKING_BACKEND='gobgp': expected bird, bird-external, vxlan or none"
        );
        assert_eq!(
            e(&[("NODENAME", "n1"), ("CALICO_IPV4POOL_IPIP", "sometimes")]),
            "invalid CALICO_IPV4POOL_IPIP='sometimes': expected Always, CrossSubnet or Never"
        );
        assert_eq!(
            e(&[("NODENAME", "n1"), ("FELIX_HEALTHPORT", "x")]),
            "invalid FELIX_HEALTHPORT='x': expected a non-negative integer"
        );
        assert_eq!(
            e(&[("NODENAME", "bad_name")]),
            "invalid NODENAME='bad_name': must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character"
        );
    }
}
