//! `calico-node -shutdown`, the preStop hook of Calico's manifests. Calico saves the time
//! of the shutdown in `/var/lib/calico/shutdownTS` (`CALICO_SHUTDOWN_TIMESTAMP_FILE`),
//! then sets the Kubernetes node's NetworkUnavailable condition; start-up removes the file
//! once the node is up again, so its presence tells that a node went down and has not
//! finished coming back. With the etcd datastore there is no node condition: the hook
//! writes the timestamp; SIGTERM, which the kubelet sends next, stops the daemon in order.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::env::Env;

/// The file's name as Calico chooses it: `CALICO_SHUTDOWN_TIMESTAMP_FILE`, else
/// `shutdownTS` in the state directory (`/var/lib/calico`).
pub fn timestamp_file(env: &dyn Env, state_dir: &Path) -> PathBuf {
    env.non_empty("CALICO_SHUTDOWN_TIMESTAMP_FILE")
        .map_or_else(|| state_dir.join("shutdownTS"), PathBuf::from)
}

/// Write the current time (RFC 3339, UTC, as Calico) to `path`: a temporary file of a
/// unique name, synced, then renamed, so a reader never sees half a timestamp.
pub fn save_timestamp(path: &Path) -> std::io::Result<String> {
    let ts = crate::datastore::client::now_rfc3339();
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let name = path
        .file_name()
        .map_or_else(|| "shutdownTS".into(), |n| n.to_string_lossy().into_owned());
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(ts.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map(|()| ts)
}

/// Remove the timestamp once start-up is done (absent is fine); its content, if any.
pub fn remove_timestamp(path: &Path) -> std::io::Result<Option<String>> {
    let content = std::fs::read_to_string(path).ok();
    match std::fs::remove_file(path) {
        Ok(()) => Ok(content),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::MapEnv;

    #[test]
    fn saved_then_removed_at_calicos_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = timestamp_file(&MapEnv::default(), dir.path());
        assert_eq!(path, dir.path().join("shutdownTS"));
        let ts = save_timestamp(&path).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), ts);
        assert!(ts.ends_with('Z') && ts.contains('T'), "{ts}");
        assert_eq!(remove_timestamp(&path).unwrap(), Some(ts));
        assert_eq!(remove_timestamp(&path).unwrap(), None);
        let env = MapEnv::from_pairs(&[("CALICO_SHUTDOWN_TIMESTAMP_FILE", "/x/ts")]);
        assert_eq!(timestamp_file(&env, dir.path()), PathBuf::from("/x/ts"));
    }
}
