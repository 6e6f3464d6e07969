//! Per-interface and global sysctls (REFERENCE §4/§5): on every workload interface
//! `proxy_arp=1`, `neigh/<if>/proxy_delay=0`, `forwarding=1`; globally IPv4 forwarding.
//! Written only when they differ, in the namespace of the calling thread.

/// Make the sysctls right; the problems met.
pub fn ensure(prefix: &str) -> Vec<String> {
    let mut problems = Vec::new();
    let mut set = |path: String, value: &str| match std::fs::read_to_string(&path) {
        Ok(v) if v.trim() == value => {}
        _ => {
            if let Err(e) = std::fs::write(&path, value) {
                problems.push(format!("{path}: {e}"));
            }
        }
    };
    set("/proc/sys/net/ipv4/ip_forward".into(), "1");
    let Ok(dir) = std::fs::read_dir("/proc/sys/net/ipv4/conf") else {
        return problems;
    };
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with(prefix) {
            continue;
        }
        set(format!("/proc/sys/net/ipv4/conf/{name}/proxy_arp"), "1");
        set(format!("/proc/sys/net/ipv4/neigh/{name}/proxy_delay"), "0");
        set(format!("/proc/sys/net/ipv4/conf/{name}/forwarding"), "1");
    }
    problems
}
