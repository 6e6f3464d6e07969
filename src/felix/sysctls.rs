//! Per-interface and global sysctls (REFERENCE §4/§5): on every workload interface
//! `proxy_arp=1`, `neigh/<if>/proxy_delay=0`, `forwarding=1`; globally IPv4 forwarding.
//! Written only when they differ, in the namespace of the calling thread.

/// Make the sysctls right; the problems met.
pub fn ensure(prefix: &str) -> Vec<String> {
    let mut problems = Vec::new();
    set(&mut problems, "/proc/sys/net/ipv4/ip_forward".into(), "1");
    let Ok(dir) = std::fs::read_dir("/proc/sys/net/ipv4/conf") else {
        return problems;
    };
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with(prefix) {
            problems.extend(ensure_interface(&name));
        }
    }
    problems
}

/// Make one workload interface's sysctls right (an interface gone meanwhile is no
/// problem); the problems met.
pub fn ensure_interface(name: &str) -> Vec<String> {
    let mut problems = Vec::new();
    if !std::path::Path::new(&format!("/proc/sys/net/ipv4/conf/{name}")).exists() {
        return problems;
    }
    set(
        &mut problems,
        format!("/proc/sys/net/ipv4/conf/{name}/proxy_arp"),
        "1",
    );
    set(
        &mut problems,
        format!("/proc/sys/net/ipv4/neigh/{name}/proxy_delay"),
        "0",
    );
    set(
        &mut problems,
        format!("/proc/sys/net/ipv4/conf/{name}/forwarding"),
        "1",
    );
    problems
}

fn set(problems: &mut Vec<String>, path: String, value: &str) {
    match std::fs::read_to_string(&path) {
        Ok(v) if v.trim() == value => {}
        _ => {
            if let Err(e) = std::fs::write(&path, value) {
                problems.push(format!("{path}: {e}"));
            }
        }
    }
}
