//! DESIGN's layering, checked on the source (no root, no build of its own).
//!
//! DESIGN ("Layout"): model and health; datastore and netlink; ipam; cni, confd, bgp,
//! felix; node; bin. A module imports only from the layers below it, and the CNI plugin (a
//! short-lived process) links no daemon module. This test reads every file under `src/`,
//! collects the `crate::<module>` and `calico_node::<module>` paths it names (comments left
//! out), and holds them to that order. Siblings of one layer may share message types:
//! each such path is listed in [`SAME_LAYER`] with the reason it is allowed, and an
//! allowance no code uses any more fails the test, so the list stays exact.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The layers, from the ground up. Besides DESIGN's modules, the ground holds four small
/// process utilities every layer may use: `env` (environment variables read through a
/// trait, and the node name), `accept` (accept loops that survive EMFILE), `state_file`
/// (atomic writes of the files calico-node leaves for the CNI plugin), `prefix_map` (the
/// prefix-keyed hash maps of the RIB and Felix). `ctl` (calicoctl)
/// sits with `node`: it reads the node's status socket and IPAM, above every actor.
const LAYERS: &[(&str, &[&str])] = &[
    (
        "ground",
        &[
            "model",
            "health",
            "env",
            "accept",
            "state_file",
            "prefix_map",
        ],
    ),
    ("datastore and netlink", &["datastore", "netlink"]),
    ("ipam", &["ipam"]),
    ("actors", &["cni", "confd", "bgp", "felix"]),
    ("node", &["node", "ctl"]),
    ("bin", &["bin"]),
];

/// Modules of the daemon, which the CNI binaries must not link.
const DAEMON: &[&str] = &["felix", "bgp", "confd", "node", "ctl"];

/// The CNI plugins' binaries.
const CNI_BINARIES: &[&str] = &["src/bin/calico.rs", "src/bin/calico-ipam.rs"];

/// Same-layer imports that are allowed: (importing module, path prefix it may name, why).
const SAME_LAYER: &[(&str, &str, &str)] = &[
    (
        "felix",
        "bgp::RouteUpdate",
        "message type: the speaker hands Felix its learned routes (DESIGN's data flow)",
    ),
    (
        "felix",
        "bgp::LearnedRoute",
        "message type: one learned route inside a RouteUpdate",
    ),
    (
        "confd",
        "bgp::config",
        "message type: DesiredBgpConfig, the snapshot confd hands the speaker on a watch",
    ),
    (
        "confd",
        "bgp::RouteUpdate",
        "message type: the route channel confd passes to the speaker it starts",
    ),
    (
        "confd",
        "bgp::fsm::State",
        "message type: a peer's session state in the speaker's status, confd's readiness",
    ),
    (
        "confd",
        "bgp::speaker",
        "confd runs and restarts the speaker it configures (as Calico's calico-node runs \
         BIRD beside confd); not a message type, kept as it is by issue 16",
    ),
];

/// Imports that run downward-to-upward today and are removed by another branch of issue
/// 16: (importing module, path prefix, why). Each must still be used (else delete it).
const PENDING_UPWARD: &[(&str, &str, &str)] = &[];

/// One `crate::`/`calico_node::` path found in a file.
#[derive(Debug, Clone)]
struct Use {
    file: PathBuf,
    line: usize,
    /// The path after the crate name, as written up to its end (`bgp::rib::FastMap`).
    path: String,
}

impl Use {
    fn module(&self) -> &str {
        self.path.split("::").next().unwrap_or("")
    }
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The top-level module a file under `src/` belongs to (`src/felix/calc.rs` is `felix`,
/// `src/env.rs` is `env`, every binary is `bin`); `None` for the crate root.
fn module_of(file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src()).ok()?;
    let first = rel.components().next()?.as_os_str().to_str()?;
    match first.strip_suffix(".rs") {
        Some("lib") => None,
        Some(m) => Some(m.to_string()),
        None => Some(first.to_string()),
    }
}

/// The line without its `//` comment (doc comments name paths that link nothing). A `//`
/// inside a string literal cuts the line short, which only loses a path in a string.
fn code_of(line: &str) -> &str {
    line.find("//").map_or(line, |i| &line[..i])
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// The paths that start at `rest` (just after `crate::`): identifiers joined by `::`; a
/// group (`crate::{a::X, b::{c, d}}`) yields one full path per member.
fn paths_at(rest: &str) -> Vec<String> {
    let mut prefix = String::new();
    let mut s = rest;
    loop {
        let end = s.find(|c: char| !is_ident(c)).unwrap_or(s.len());
        if end == 0 {
            break;
        }
        if !prefix.is_empty() {
            prefix.push_str("::");
        }
        prefix.push_str(&s[..end]);
        s = &s[end..];
        match s.strip_prefix("::") {
            Some(more) => s = more,
            None => return vec![prefix],
        }
    }
    let Some(group) = s.strip_prefix('{') else {
        return if prefix.is_empty() {
            Vec::new()
        } else {
            vec![prefix]
        };
    };
    let mut depth = 0usize;
    let mut members = vec![String::new()];
    for c in group.chars() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => break,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                members.push(String::new());
                continue;
            }
            _ => {}
        }
        members.last_mut().expect("never empty").push(c);
    }
    members
        .iter()
        .flat_map(|m| paths_at(m.trim()))
        .map(|p| match (prefix.as_str(), p.as_str()) {
            ("", _) => p,
            (pre, "self") => pre.to_string(),
            (pre, _) => format!("{pre}::{p}"),
        })
        .collect()
}

/// Every crate path named by code in `file`.
fn uses_in(file: &Path) -> Vec<Use> {
    let text = std::fs::read_to_string(file).unwrap();
    // Join the lines of one statement so a group split over lines is read whole; keep the
    // line number of where each path starts.
    let lines: Vec<&str> = text.lines().map(code_of).collect();
    let mut out = Vec::new();
    for (n, line) in lines.iter().enumerate() {
        for anchor in ["crate::", "calico_node::"] {
            let mut from = 0;
            while let Some(i) = line[from..].find(anchor) {
                let at = from + i;
                from = at + anchor.len();
                if line[..at].ends_with(is_ident) || line[..at].ends_with("::") {
                    continue; // `foo_crate::` or `$crate::`-like, not ours
                }
                // A group may go on over the next lines: read until its braces close.
                let mut rest = line[from..].to_string();
                let mut k = n + 1;
                while rest.matches('{').count() > rest.matches('}').count() && k < lines.len() {
                    rest.push_str(lines[k]);
                    k += 1;
                }
                for path in paths_at(&rest) {
                    out.push(Use {
                        file: file.to_path_buf(),
                        line: n + 1,
                        path,
                    });
                }
            }
        }
    }
    out
}

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|(_, ms)| ms.contains(&module))
}

/// Every path named in `src/`, by the module whose code names it.
fn all_uses() -> Vec<(String, Use)> {
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    files
        .iter()
        .filter_map(|f| module_of(f).map(|m| (m, f)))
        .flat_map(|(m, f)| uses_in(f).into_iter().map(move |u| (m.clone(), u)))
        .collect()
}

fn allowed(list: &[(&str, &str, &str)], from: &str, path: &str) -> Option<usize> {
    list.iter().position(|(m, prefix, _)| {
        *m == from
            && (path == *prefix
                || path
                    .strip_prefix(prefix)
                    .is_some_and(|rest| rest.starts_with("::")))
    })
}

fn show(u: &Use) -> String {
    format!(
        "{}:{}: crate::{}",
        u.file
            .strip_prefix(src().parent().unwrap())
            .unwrap()
            .display(),
        u.line,
        u.path
    )
}

#[test]
fn every_top_level_module_has_a_layer() {
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    let missing: BTreeSet<String> = files
        .iter()
        .filter_map(|f| module_of(f))
        .filter(|m| layer_of(m).is_none())
        .collect();
    assert!(
        missing.is_empty(),
        "modules with no place in DESIGN's layering (add them to LAYERS): {missing:?}"
    );
}

#[test]
fn no_module_imports_from_its_own_layer_or_above_unless_listed() {
    let mut wrong = Vec::new();
    let mut used_same = vec![false; SAME_LAYER.len()];
    let mut used_pending = vec![false; PENDING_UPWARD.len()];
    for (from, u) in all_uses() {
        let to = u.module();
        if to == from || from == "bin" {
            continue;
        }
        let (Some(lf), Some(lt)) = (layer_of(&from), layer_of(to)) else {
            // A module outside LAYERS fails `every_top_level_module_has_a_layer`; a path
            // such as `crate::Foo` at the root names no module.
            continue;
        };
        if lt < lf {
            continue;
        }
        if lt == lf {
            if let Some(i) = allowed(SAME_LAYER, &from, &u.path) {
                used_same[i] = true;
                continue;
            }
        } else if let Some(i) = allowed(PENDING_UPWARD, &from, &u.path) {
            used_pending[i] = true;
            continue;
        }
        let how = if lt == lf { "beside" } else { "above" };
        wrong.push(format!(
            "{} ({from}, layer '{}', imports from {how}: '{to}', layer '{}')",
            show(&u),
            LAYERS[lf].0,
            LAYERS[lt].0
        ));
    }
    let stale: Vec<String> = SAME_LAYER
        .iter()
        .zip(&used_same)
        .chain(PENDING_UPWARD.iter().zip(&used_pending))
        .filter(|(_, used)| !**used)
        .map(|((m, p, _), _)| format!("{m} -> {p}"))
        .collect();
    assert!(
        wrong.is_empty(),
        "imports against DESIGN's layering:\n{}",
        wrong.join("\n")
    );
    assert!(
        stale.is_empty(),
        "allowances no code uses any more (delete them from tests/layering.rs): {stale:?}"
    );
}

/// Which top-level modules each module's code names (the module graph).
fn module_graph() -> BTreeMap<String, BTreeSet<String>> {
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (from, u) in all_uses() {
        if from != "bin" && u.module() != from {
            g.entry(from).or_default().insert(u.module().to_string());
        }
    }
    g
}

/// The modules `file` reaches: those it names, and all they reach in turn.
fn reach(file: &Path, graph: &BTreeMap<String, BTreeSet<String>>) -> BTreeMap<String, String> {
    // Each reached module with the chain that reaches it, for the failure message.
    let mut seen: BTreeMap<String, String> = BTreeMap::new();
    let mut todo: Vec<(String, String)> = uses_in(file)
        .iter()
        .map(|u| (u.module().to_string(), u.module().to_string()))
        .collect();
    while let Some((m, via)) = todo.pop() {
        if seen.contains_key(&m) {
            continue;
        }
        for next in graph.get(&m).into_iter().flatten() {
            todo.push((next.clone(), format!("{via} -> {next}")));
        }
        seen.insert(m, via);
    }
    seen
}

#[test]
fn the_cni_binaries_reach_no_daemon_module() {
    let graph = module_graph();
    for bin in CNI_BINARIES {
        let file = src().parent().unwrap().join(bin);
        let reached = reach(&file, &graph);
        assert!(
            reached.contains_key("cni"),
            "{bin} should reach the CNI plugin: {reached:?}"
        );
        let daemon: Vec<&String> = DAEMON.iter().filter_map(|d| reached.get(*d)).collect();
        assert!(
            daemon.is_empty(),
            "{bin} links daemon modules, by these imports: {daemon:?}"
        );
    }
}

#[test]
fn the_scanner_finds_paths_in_uses_groups_and_expressions() {
    assert_eq!(paths_at("model::ippool::Encap;"), ["model::ippool::Encap"]);
    assert_eq!(
        paths_at("{bgp::RouteUpdate, health::{self, Fault,\n HealthReporter}};"),
        [
            "bgp::RouteUpdate",
            "health",
            "health::Fault",
            "health::HealthReporter"
        ]
    );
    assert_eq!(
        paths_at("bgp::speaker::{PeerStatus, Speaker};"),
        ["bgp::speaker::PeerStatus", "bgp::speaker::Speaker"]
    );
    assert_eq!(
        paths_at("ipam::block::nth_ip(&cidr, 2)"),
        ["ipam::block::nth_ip"]
    );
    assert_eq!(code_of("let x = 1; // crate::node"), "let x = 1; ");
    assert_eq!(
        module_of(&src().join("felix/calc.rs")).as_deref(),
        Some("felix")
    );
    assert_eq!(module_of(&src().join("env.rs")).as_deref(), Some("env"));
    assert_eq!(module_of(&src().join("lib.rs")), None);
}
