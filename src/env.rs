//! Environment variables read through a small trait, so tests never set process env
//! (linkerd2-proxy's approach).

use std::collections::BTreeMap;

/// A source of environment variables.
pub trait Env: Send + Sync {
    /// The value of `name`, if set.
    fn var(&self, name: &str) -> Option<String>;
    /// Every variable (for `FELIX_*` overrides).
    fn vars(&self) -> Vec<(String, String)>;

    /// The value of `name` if set and not empty.
    fn non_empty(&self, name: &str) -> Option<String> {
        self.var(name).filter(|v| !v.trim().is_empty())
    }
}

/// The real process environment.
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
    fn vars(&self) -> Vec<(String, String)> {
        std::env::vars().collect()
    }
}

/// A fixed set of variables, for tests.
#[derive(Debug, Clone, Default)]
pub struct MapEnv(pub BTreeMap<String, String>);

impl MapEnv {
    /// Build from pairs.
    pub fn from_pairs(pairs: &[(&str, &str)]) -> Self {
        MapEnv(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }
}

impl Env for MapEnv {
    fn var(&self, name: &str) -> Option<String> {
        self.0.get(name).cloned()
    }
    fn vars(&self) -> Vec<(String, String)> {
        self.0.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }
}

/// The node name: `NODENAME`, else `HOSTNAME`, else the kernel's hostname; lower-cased
/// (Calico's `DetermineNodeName`). calico-node names itself so, and the CNI plugin falls
/// back to it when the nodename file is optional and missing.
pub fn determine_nodename(env: &dyn Env) -> String {
    env.non_empty("NODENAME")
        .or_else(|| env.non_empty("HOSTNAME"))
        .or_else(|| {
            nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
        })
        .unwrap_or_else(|| "localhost".into())
        .trim()
        .to_ascii_lowercase()
}

/// A system program from PATH, else from where distributions install it (a daemon's PATH
/// may be empty or lack the sbin directories); the bare name when not found.
pub fn program(name: &str) -> std::path::PathBuf {
    let in_path = std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(name))
            .find(|f| f.is_file())
    });
    in_path
        .or_else(|| {
            ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
                .iter()
                .map(|d| std::path::Path::new(d).join(name))
                .find(|f| f.is_file())
        })
        .unwrap_or_else(|| name.into())
}
