//! Per-interface and global sysctls (REFERENCE §4/§5): on every workload interface the
//! settings Felix keeps ([`crate::model::sysctl::kept_by_felix`]: `proxy_arp=1`,
//! `neigh/<if>/proxy_delay=0`, `forwarding=1`); globally IPv4 forwarding. Written only
//! when they differ, in the namespace of the calling thread.
//!
//! Plan and execute: [`plan`] decides from what was read (pure), [`write()`] does it.

use super::problem::Problem;
use crate::model::sysctl::kept_by_felix;

/// IPv4 forwarding, for the whole node (Felix's alone).
const IP_FORWARD: (&str, &str) = ("/proc/sys/net/ipv4/ip_forward", "1");

/// One sysctl to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Write {
    pub path: String,
    pub value: &'static str,
}

/// The settings Felix keeps on workload interface `name`: (file, value).
pub fn wanted_on(name: &str) -> Vec<(String, &'static str)> {
    kept_by_felix().map(|s| (s.path(name), s.value)).collect()
}

/// The writes that make `wanted` true given what `read` returns for each file (`None`:
/// unreadable): a setting already right is not written; one that differs, or that cannot
/// be read, is.
pub fn plan(
    wanted: impl IntoIterator<Item = (String, &'static str)>,
    read: impl Fn(&str) -> Option<String>,
) -> Vec<Write> {
    wanted
        .into_iter()
        .filter(|(path, value)| read(path).is_none_or(|v| v.trim() != *value))
        .map(|(path, value)| Write { path, value })
        .collect()
}

/// The workload interfaces among `/proc/sys/net/ipv4/conf`'s entries.
pub fn workload_interfaces<'a>(
    names: impl IntoIterator<Item = &'a str>,
    prefix: &'a str,
) -> impl Iterator<Item = &'a str> {
    names.into_iter().filter(move |n| n.starts_with(prefix))
}

fn read(path: &str) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

/// Carry out `writes`; the problems met.
pub fn write(writes: Vec<Write>) -> Vec<Problem> {
    writes
        .into_iter()
        .filter_map(|w| {
            std::fs::write(&w.path, w.value)
                .err()
                .map(|error| Problem::Sysctl {
                    path: w.path,
                    error,
                })
        })
        .collect()
}

/// Make the sysctls right; the problems met.
pub fn ensure(prefix: &str) -> Vec<Problem> {
    let (path, value) = IP_FORWARD;
    let mut problems = write(plan([(path.to_string(), value)], read));
    let Ok(dir) = std::fs::read_dir("/proc/sys/net/ipv4/conf") else {
        return problems;
    };
    let names: Vec<String> = dir
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    for name in workload_interfaces(names.iter().map(String::as_str), prefix) {
        problems.extend(ensure_interface(name));
    }
    problems
}

/// Make one workload interface's sysctls right (an interface gone meanwhile is no
/// problem); the problems met.
pub fn ensure_interface(name: &str) -> Vec<Problem> {
    if !std::path::Path::new(&format!("/proc/sys/net/ipv4/conf/{name}")).exists() {
        return Vec::new();
    }
    write(plan(wanted_on(name), read))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn kernel(files: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let files: HashMap<String, String> = files
            .iter()
            .map(|(p, v)| (p.to_string(), v.to_string()))
            .collect();
        move |p| files.get(p).cloned()
    }

    #[test]
    fn felix_keeps_proxy_arp_its_delay_and_forwarding_on_each_workload_interface() {
        assert_eq!(
            wanted_on("cali1"),
            [
                ("/proc/sys/net/ipv4/conf/cali1/proxy_arp".to_string(), "1"),
                (
                    "/proc/sys/net/ipv4/neigh/cali1/proxy_delay".to_string(),
                    "0"
                ),
                ("/proc/sys/net/ipv4/conf/cali1/forwarding".to_string(), "1"),
            ]
        );
    }

    /// Written only when they differ (the kernel's files end in a newline).
    #[test]
    fn a_setting_already_right_is_not_written_and_one_that_differs_is() {
        let read = kernel(&[
            ("/proc/sys/net/ipv4/conf/cali1/proxy_arp", "1\n"),
            ("/proc/sys/net/ipv4/neigh/cali1/proxy_delay", "200\n"),
            ("/proc/sys/net/ipv4/conf/cali1/forwarding", "1\n"),
        ]);
        assert_eq!(
            plan(wanted_on("cali1"), read),
            [Write {
                path: "/proc/sys/net/ipv4/neigh/cali1/proxy_delay".into(),
                value: "0"
            }]
        );
    }

    /// A file that cannot be read is written anyway: its error, if any, is the problem.
    #[test]
    fn an_unreadable_setting_is_written() {
        let w = plan([(IP_FORWARD.0.to_string(), "1")], kernel(&[]));
        assert_eq!(w.len(), 1);
        let w = plan(
            [(IP_FORWARD.0.to_string(), "1")],
            kernel(&[(IP_FORWARD.0, "0\n")]),
        );
        assert_eq!(w.len(), 1);
        let w = plan(
            [(IP_FORWARD.0.to_string(), "1")],
            kernel(&[(IP_FORWARD.0, "1\n")]),
        );
        assert!(w.is_empty());
    }

    #[test]
    fn only_interfaces_with_the_workload_prefix_are_touched() {
        let names = [
            "all",
            "default",
            "lo",
            "eth0",
            "cali1",
            "vxlan.calico",
            "cali2",
        ];
        assert_eq!(
            workload_interfaces(names, "cali").collect::<Vec<_>>(),
            ["cali1", "cali2"]
        );
    }
}
