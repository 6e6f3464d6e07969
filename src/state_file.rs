//! The small state files calico-node leaves for the CNI plugin (`/var/lib/calico/nodename`,
//! `/var/lib/calico/mtu`), written so that a reader sees the old content or the new, never
//! a partial file, and so that two writers (a restarted node overlapping the old one, or
//! start-up and Felix) never rename each other's half-written temporary file.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// A temporary name next to `path`, unique to this process and call:
/// `.<name>.<pid>.<counter>.tmp`.
fn temp_name(path: &Path) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    path.with_file_name(format!(".{name}.{}.{n}.tmp", std::process::id()))
}

/// Write `contents` to `path` atomically and durably: a new file under a unique temporary
/// name (created exclusively), written and fsynced, renamed over `path`, and the directory
/// fsynced so the rename survives a crash. The directory is created when missing. On
/// failure the temporary file is removed and `path` is unchanged.
pub fn write_atomic(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir)?;
    let tmp = temp_name(path);
    let written = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        f.write_all(contents)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
        return written;
    }
    // The rename is durable once the directory is; a directory that cannot be opened
    // for that (unusual permissions) still has the new file in place.
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concurrent_writers_each_succeed_and_leave_one_whole_value() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mtu");
        let writers: Vec<_> = (0..8)
            .map(|w| {
                let path = path.clone();
                std::thread::spawn(move || {
                    for i in 0..100 {
                        let v = format!("{w}-{i}-{}\n", "x".repeat(w * 512));
                        write_atomic(&path, v.as_bytes()).unwrap();
                    }
                })
            })
            .collect();
        for w in writers {
            w.join().unwrap();
        }
        let v = std::fs::read_to_string(&path).unwrap();
        let (w, rest) = v.split_once('-').unwrap();
        let w: usize = w.parse().unwrap();
        assert!(
            rest.ends_with(&format!("-{}\n", "x".repeat(w * 512))),
            "{v}"
        );
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            left,
            vec![std::ffi::OsString::from("mtu")],
            "no temporary file left"
        );
    }

    #[test]
    fn a_failed_write_leaves_the_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nodename");
        write_atomic(&path, b"node-1").unwrap();
        // The target is now a non-empty directory: the rename fails.
        let blocked = dir.path().join("blocked");
        std::fs::create_dir_all(blocked.join("inside")).unwrap();
        assert!(write_atomic(&blocked, b"x").is_err());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "node-1");
        let tmp_left = std::fs::read_dir(dir.path())
            .unwrap()
            .any(|e| e.unwrap().file_name().to_string_lossy().ends_with(".tmp"));
        assert!(!tmp_left);
    }
}
