//! How to reach the datastore: Calico's `DATASTORE_TYPE`, `ETCD_ENDPOINTS` and TLS
//! variables, or calicoctl's `CalicoAPIConfig` file.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use super::{Datastore, DatastoreError, EtcdDatastore};
use crate::env::Env;

/// Default etcd endpoint when none is configured (Calico's default).
pub const DEFAULT_ETCD_ENDPOINT: &str = "http://127.0.0.1:2379";

/// Datastore connection settings.
#[derive(Debug, Clone, PartialEq)]
pub struct DatastoreConfig {
    pub endpoints: Vec<String>,
    pub ca_cert_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// Per-request timeout.
    pub timeout: Duration,
}

/// Why the datastore configuration is unusable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A variable or field has a value we cannot use.
    #[error("invalid {field} '{value}': {reason}")]
    Invalid {
        field: String,
        value: String,
        reason: String,
    },
    /// The calicoctl config file could not be read or parsed.
    #[error("cannot read datastore config file {path}: {reason}")]
    File { path: PathBuf, reason: String },
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ApiConfigSpec {
    #[serde(default)]
    datastore_type: Option<String>,
    #[serde(default)]
    etcd_endpoints: Option<String>,
    #[serde(default)]
    etcd_key_file: Option<String>,
    #[serde(default)]
    etcd_cert_file: Option<String>,
    #[serde(default, rename = "etcdCACertFile")]
    etcd_ca_cert_file: Option<String>,
}

#[derive(Deserialize)]
struct ApiConfig {
    kind: String,
    #[serde(default)]
    spec: Option<ApiConfigSpec>,
}

fn check_type(field: &str, t: &str) -> Result<(), ConfigError> {
    match t {
        "etcdv3" | "" => Ok(()),
        other => Err(ConfigError::Invalid {
            field: field.into(),
            value: other.into(),
            reason: "only etcdv3 is supported".into(),
        }),
    }
}

fn build(
    field: &str,
    endpoints: Option<String>,
    ca: Option<String>,
    cert: Option<String>,
    key: Option<String>,
) -> Result<DatastoreConfig, ConfigError> {
    let raw = endpoints.unwrap_or_else(|| DEFAULT_ETCD_ENDPOINT.into());
    let endpoints: Vec<String> = raw
        .split(',')
        .map(|e| e.trim().to_string())
        .filter(|e| !e.is_empty())
        .collect();
    if endpoints.is_empty() {
        return Err(ConfigError::Invalid {
            field: field.into(),
            value: raw,
            reason: "no endpoint given".into(),
        });
    }
    for e in &endpoints {
        if !(e.starts_with("http://") || e.starts_with("https://")) {
            return Err(ConfigError::Invalid {
                field: field.into(),
                value: e.clone(),
                reason: "endpoints must start with http:// or https://".into(),
            });
        }
    }
    let path = |v: Option<String>| v.filter(|s| !s.is_empty()).map(PathBuf::from);
    Ok(DatastoreConfig {
        endpoints,
        ca_cert_file: path(ca),
        cert_file: path(cert),
        key_file: path(key),
        timeout: Duration::from_secs(10),
    })
}

impl DatastoreConfig {
    /// From Calico's environment variables.
    pub fn from_env(env: &dyn Env) -> Result<Self, ConfigError> {
        check_type(
            "DATASTORE_TYPE",
            env.var("DATASTORE_TYPE").as_deref().unwrap_or(""),
        )?;
        build(
            "ETCD_ENDPOINTS",
            env.non_empty("ETCD_ENDPOINTS"),
            env.var("ETCD_CA_CERT_FILE"),
            env.var("ETCD_CERT_FILE"),
            env.var("ETCD_KEY_FILE"),
        )
    }

    /// From a calicoctl `CalicoAPIConfig` YAML file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let ferr = |reason: String| ConfigError::File {
            path: path.into(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| ferr(e.to_string()))?;
        let cfg: ApiConfig = serde_yaml::from_str(&text).map_err(|e| ferr(e.to_string()))?;
        if cfg.kind != "CalicoAPIConfig" {
            return Err(ferr(format!(
                "kind is '{}', expected CalicoAPIConfig",
                cfg.kind
            )));
        }
        let spec = cfg.spec.unwrap_or(ApiConfigSpec {
            datastore_type: None,
            etcd_endpoints: None,
            etcd_key_file: None,
            etcd_cert_file: None,
            etcd_ca_cert_file: None,
        });
        check_type(
            "spec.datastoreType",
            spec.datastore_type.as_deref().unwrap_or(""),
        )?;
        build(
            "spec.etcdEndpoints",
            spec.etcd_endpoints,
            spec.etcd_ca_cert_file,
            spec.etcd_cert_file,
            spec.etcd_key_file,
        )
    }

    /// calicoctl's rule: the config file when it exists, else the environment.
    pub fn for_calicoctl(path: &Path, env: &dyn Env) -> Result<Self, ConfigError> {
        if path.exists() {
            Self::from_file(path)
        } else {
            Self::from_env(env)
        }
    }

    /// Connect to etcd (lazily: an unreachable etcd shows up on the first request).
    pub async fn connect(&self) -> Result<Arc<dyn Datastore>, DatastoreError> {
        Ok(Arc::new(EtcdDatastore::connect(self).await?))
    }

    /// [`DatastoreConfig::connect`], with the datastore's tasks (watch pumps) on `tasks`:
    /// the daemon's tracker, so that shutdown waits for them.
    pub async fn connect_on(
        &self,
        tasks: tokio_util::task::TaskTracker,
    ) -> Result<Arc<dyn Datastore>, DatastoreError> {
        Ok(Arc::new(
            EtcdDatastore::connect(self).await?.with_tasks(tasks),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::MapEnv;

    #[test]
    fn env_gives_endpoints_and_tls_files() {
        let env = MapEnv::from_pairs(&[
            (
                "ETCD_ENDPOINTS",
                "https://10.0.0.1:2379, https://10.0.0.2:2379",
            ),
            ("ETCD_CA_CERT_FILE", "/etc/ca.pem"),
            ("ETCD_CERT_FILE", "/etc/cert.pem"),
            ("ETCD_KEY_FILE", "/etc/key.pem"),
        ]);
        let c = DatastoreConfig::from_env(&env).unwrap();
        assert_eq!(
            c.endpoints,
            vec!["https://10.0.0.1:2379", "https://10.0.0.2:2379"]
        );
        assert_eq!(c.ca_cert_file.as_deref(), Some(Path::new("/etc/ca.pem")));
        let c = DatastoreConfig::from_env(&MapEnv::default()).unwrap();
        assert_eq!(c.endpoints, vec![DEFAULT_ETCD_ENDPOINT]);
    }

    #[test]
    fn bad_values_name_the_variable() {
        let env = MapEnv::from_pairs(&[("DATASTORE_TYPE", "kubernetes")]);
        assert_eq!(
            DatastoreConfig::from_env(&env).unwrap_err().to_string(),
            "invalid DATASTORE_TYPE 'kubernetes': only etcdv3 is supported"
        );
        let env = MapEnv::from_pairs(&[("ETCD_ENDPOINTS", "10.0.0.1:2379")]);
        assert_eq!(
            DatastoreConfig::from_env(&env).unwrap_err().to_string(),
            "invalid ETCD_ENDPOINTS '10.0.0.1:2379': endpoints must start with http:// or https://"
        );
    }

    #[test]
    fn calicoctl_file_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("calicoctl.cfg");
        std::fs::write(
            &p,
            "apiVersion: projectcalico.org/v3\nkind: CalicoAPIConfig\nmetadata:\nspec:\n  datastoreType: etcdv3\n  etcdEndpoints: http://127.0.0.1:23790\n",
        )
        .unwrap();
        let c = DatastoreConfig::for_calicoctl(&p, &MapEnv::default()).unwrap();
        assert_eq!(c.endpoints, vec!["http://127.0.0.1:23790"]);
        let missing = dir.path().join("nope.cfg");
        let env = MapEnv::from_pairs(&[("ETCD_ENDPOINTS", "http://127.0.0.1:1")]);
        let c = DatastoreConfig::for_calicoctl(&missing, &env).unwrap();
        assert_eq!(c.endpoints, vec!["http://127.0.0.1:1"]);
    }
}
