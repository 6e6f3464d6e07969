//! calicoctl output: Calico's tables (`-o ps|wide`), YAML and JSON (REFERENCE §7).

use serde_json::Value;

use crate::model::gofloat;
use crate::model::{API_VERSION, AnyResource, KindInfo};

/// Output formats of `calicoctl get`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Ps,
    Wide,
    Yaml,
    Json,
}

impl std::str::FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "ps" => Ok(Format::Ps),
            "wide" => Ok(Format::Wide),
            "yaml" => Ok(Format::Yaml),
            "json" => Ok(Format::Json),
            other => Err(format!(
                "unrecognized output format '{other}' (use ps, wide, yaml or json)"
            )),
        }
    }
}

/// Render rows as Go's `tabwriter.NewWriter(w, 5, 1, 3, ' ', 0)` renders calicoctl's
/// templates: every cell (the last included, as the templates end in a tab) is padded to
/// the column's widest text plus 3, with a minimum width of 5.
pub fn tabwriter(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            let w = rows
                .iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0);
            (w + 3).max(5)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        for (c, cell) in r.iter().enumerate() {
            out.push_str(cell);
            out.push_str(&" ".repeat(widths[c] - cell.chars().count()));
        }
        out.push('\n');
    }
    out
}

/// Context a table needs beyond the rows themselves.
pub struct TableContext {
    /// The global AS number (shown in parentheses for nodes that inherit it).
    pub global_as: String,
    /// Whether several namespaces are shown (adds a NAMESPACE column).
    pub all_namespaces: bool,
}

fn headers(info: &KindInfo, wide: bool, ctx: &TableContext) -> Vec<&'static str> {
    match (info.kind, wide) {
        ("IPPool", false) => vec!["NAME", "CIDR", "SELECTOR"],
        ("IPPool", true) => vec![
            "NAME",
            "CIDR",
            "NAT",
            "IPIPMODE",
            "VXLANMODE",
            "DISABLED",
            "DISABLEBGPEXPORT",
            "SELECTOR",
        ],
        ("Node", false) => vec!["NAME"],
        ("Node", true) => vec!["NAME", "ASN", "IPV4", "IPV6"],
        ("BGPPeer", false) => vec!["NAME", "PEERIP", "NODE", "ASN"],
        ("BGPPeer", true) => vec!["NAME", "PEERIP", "NODE", "ASN"],
        ("WorkloadEndpoint", wide) => {
            let mut h = if ctx.all_namespaces {
                vec!["NAMESPACE"]
            } else {
                vec![]
            };
            h.extend(["WORKLOAD", "NODE", "NETWORKS", "INTERFACE"]);
            if wide {
                h.extend(["PROFILES", "NATS"]);
            }
            h
        }
        ("BGPConfiguration", _) => vec!["NAME", "LOGSEVERITY", "MESHENABLED", "ASNUMBER"],
        // calicoctl/resourcemgr/tier.go: the same two columns in both forms.
        ("Tier", _) => vec!["NAME", "ORDER"],
        // resourcemgr/networkset.go, globalnetworkset.go.
        ("NetworkSet", wide) => {
            let mut h = if ctx.all_namespaces {
                vec!["NAMESPACE", "NAME"]
            } else {
                vec!["NAME"]
            };
            if wide {
                h.push("NETS");
            }
            h
        }
        // resourcemgr/hostendpoint.go.
        ("HostEndpoint", false) => vec!["NAME", "NODE"],
        ("HostEndpoint", true) => vec!["NAME", "NODE", "INTERFACE", "IPS", "PROFILES"],
        ("GlobalNetworkSet", false) => vec!["NAME"],
        ("GlobalNetworkSet", true) => vec!["NAME", "NETS"],
        (kind, wide) if policy_kind(kind) => {
            let mut h = namespace_header(info, ctx);
            h.extend(["NAME", "TIER"]);
            if wide {
                h.extend(["ORDER", "SELECTOR"]);
            }
            h
        }
        ("StagedKubernetesNetworkPolicy", wide) => {
            let mut h = namespace_header(info, ctx);
            h.push("NAME");
            if wide {
                h.push("PODSELECTOR");
            }
            h
        }
        ("Profile", true) => vec!["NAME", "LABELS"],
        _ => vec!["NAME"],
    }
}

/// Kinds printed with calicoctl's policy columns (`NAME TIER` / `+ ORDER SELECTOR`).
fn policy_kind(kind: &str) -> bool {
    matches!(
        kind,
        "NetworkPolicy"
            | "GlobalNetworkPolicy"
            | "StagedNetworkPolicy"
            | "StagedGlobalNetworkPolicy"
    )
}

/// calicoctl adds a leading NAMESPACE column for namespaced kinds across namespaces.
fn namespace_header(info: &KindInfo, ctx: &TableContext) -> Vec<&'static str> {
    if ctx.all_namespaces && info.namespaced {
        vec!["NAMESPACE"]
    } else {
        vec![]
    }
}

/// A policy row: `[NAMESPACE] NAME TIER [ORDER SELECTOR]`; ORDER prints as Go's `%v`
/// of a float (`100`, `1.5`, `1e+06`), `<nil>` when unset.
fn policy_row(
    r: &AnyResource,
    (tier, order, selector): (&str, Option<f64>, &str),
    wide: bool,
    ctx: &TableContext,
) -> Vec<String> {
    let mut v = namespace_cell(r, ctx);
    v.extend([r.meta().name.clone(), tier.to_string()]);
    if wide {
        // A Go template over a nil *float64 prints `<nil>`.
        v.push(order.map(gofloat::fmt_v).unwrap_or_else(|| "<nil>".into()));
        v.push(selector.to_string());
    }
    v
}

fn namespace_cell(r: &AnyResource, ctx: &TableContext) -> Vec<String> {
    match r.namespace() {
        Some(ns) if ctx.all_namespaces => vec![ns.to_string()],
        _ => vec![],
    }
}

fn row(r: &AnyResource, wide: bool, ctx: &TableContext) -> Vec<String> {
    let name = r.meta().name.clone();
    match r {
        AnyResource::IPPool(p) => {
            let s = &p.spec;
            let sel = s.node_selector_or_default().to_string();
            if wide {
                vec![
                    name,
                    s.cidr.clone(),
                    s.nat_outgoing.to_string(),
                    s.ipip().to_string(),
                    s.vxlan().to_string(),
                    s.disabled.to_string(),
                    s.disable_bgp_export.to_string(),
                    sel,
                ]
            } else {
                vec![name, s.cidr.clone(), sel]
            }
        }
        AnyResource::Node(n) => {
            if !wide {
                return vec![name];
            }
            let bgp = n.spec.bgp.clone().unwrap_or_default();
            let asn = match bgp.as_number {
                Some(a) => a.to_string(),
                None => format!("({})", ctx.global_as),
            };
            vec![
                name,
                asn,
                bgp.ipv4_address.unwrap_or_default(),
                bgp.ipv6_address.unwrap_or_default(),
            ]
        }
        AnyResource::BGPPeer(p) => {
            let s = &p.spec;
            let node = if !s.node.is_empty() {
                s.node.clone()
            } else if !s.node_selector.is_empty() {
                s.node_selector.clone()
            } else {
                "(global)".into()
            };
            let peer = if s.peer_selector.is_empty() {
                s.peer_ip.clone()
            } else {
                s.peer_selector.clone()
            };
            let asn = s.as_number.map(|a| a.to_string()).unwrap_or_default();
            vec![name, peer, node, asn]
        }
        AnyResource::WorkloadEndpoint(w) => {
            let s = &w.spec;
            let workload = if s.workload.is_empty() {
                s.pod.clone()
            } else {
                s.workload.clone()
            };
            let mut v = Vec::new();
            if ctx.all_namespaces {
                v.push(
                    w.metadata
                        .namespace
                        .clone()
                        .unwrap_or_else(|| "default".into()),
                );
            }
            v.extend([
                workload,
                s.node.clone(),
                s.ip_networks.join(","),
                s.interface_name.clone(),
            ]);
            if wide {
                v.push(s.profiles.join(","));
                v.push(
                    s.ip_nats
                        .iter()
                        .map(|n| format!("{}:{}", n.internal_ip, n.external_ip))
                        .collect::<Vec<_>>()
                        .join(","),
                );
            }
            v
        }
        AnyResource::BGPConfiguration(c) => {
            let s = &c.spec;
            vec![
                name,
                s.log_severity_screen
                    .clone()
                    .unwrap_or_else(|| "Info".into()),
                s.node_to_node_mesh_enabled
                    .map(|b| b.to_string())
                    .unwrap_or_default(),
                s.as_number.map(|a| a.to_string()).unwrap_or_default(),
            ]
        }
        AnyResource::Tier(t) => vec![name, gofloat::fmt_v(t.spec.order_or_default())],
        AnyResource::NetworkSet(n) => {
            let mut v = Vec::new();
            if ctx.all_namespaces {
                v.push(n.namespace().unwrap_or("default").to_string());
            }
            v.push(name);
            if wide {
                v.push(join_and_truncate(&n.spec.nets, 80));
            }
            v
        }
        AnyResource::HostEndpoint(h) => {
            let s = &h.spec;
            let mut v = vec![name, s.node.clone()];
            if wide {
                v.extend([
                    s.interface_name.clone(),
                    s.expected_ips.join(","),
                    s.profiles.join(","),
                ]);
            }
            v
        }
        AnyResource::GlobalNetworkSet(n) if wide => {
            vec![name, join_and_truncate(&n.spec.nets, 80)]
        }
        AnyResource::NetworkPolicy(p) => {
            let s = &p.spec;
            policy_row(r, (&s.tier, s.order, &s.selector), wide, ctx)
        }
        AnyResource::GlobalNetworkPolicy(p) => {
            let s = &p.spec;
            policy_row(r, (&s.tier, s.order, &s.selector), wide, ctx)
        }
        AnyResource::StagedNetworkPolicy(p) => {
            let s = &p.spec;
            policy_row(r, (&s.tier, s.order, &s.selector), wide, ctx)
        }
        AnyResource::StagedGlobalNetworkPolicy(p) => {
            let s = &p.spec;
            policy_row(r, (&s.tier, s.order, &s.selector), wide, ctx)
        }
        AnyResource::StagedKubernetesNetworkPolicy(p) => {
            let mut v = namespace_cell(r, ctx);
            v.push(name);
            if wide {
                v.push(p.spec.pod_selector_display());
            }
            v
        }
        AnyResource::Profile(p) if wide => {
            // calicoctl's `join` sorts the `k=v` strings, not the keys.
            let mut labels = p
                .spec
                .labels_to_apply
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>();
            labels.sort();
            let labels = labels.join(",");
            vec![name, labels]
        }
        _ => vec![name],
    }
}

/// calicoctl's `joinAndTruncate`: items joined by `,`, cut to `max` bytes ending in `...`
/// once longer.
pub fn join_and_truncate(items: &[String], max: usize) -> String {
    let mut out = String::new();
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(item);
        if out.len() > max {
            let mut cut = max - 3;
            while !out.is_char_boundary(cut) {
                cut -= 1;
            }
            out.truncate(cut);
            out.push_str("...");
            break;
        }
    }
    out
}

/// A table of resources of one kind.
pub fn table(info: &KindInfo, items: &[AnyResource], wide: bool, ctx: &TableContext) -> String {
    let mut rows = vec![
        headers(info, wide, ctx)
            .into_iter()
            .map(String::from)
            .collect::<Vec<_>>(),
    ];
    rows.extend(items.iter().map(|r| row(r, wide, ctx)));
    tabwriter(&rows)
}

/// Sort object keys recursively (Calico's YAML comes from JSON through ghodss/yaml, which
/// orders keys alphabetically).
fn sorted(v: Value) -> Value {
    match v {
        Value::Object(m) => {
            let mut pairs: Vec<(String, Value)> =
                m.into_iter().map(|(k, v)| (k, sorted(v))).collect();
            pairs.sort_by(|a, b| a.0.cmp(&b.0));
            Value::Object(pairs.into_iter().collect())
        }
        Value::Array(a) => Value::Array(a.into_iter().map(sorted).collect()),
        other => other,
    }
}

fn list_value(info: &KindInfo, items: &[AnyResource], revision: i64) -> Value {
    serde_json::json!({
        "kind": format!("{}List", info.kind),
        "apiVersion": API_VERSION,
        "metadata": {"resourceVersion": revision.to_string()},
        "items": items.iter().map(AnyResource::to_value).collect::<Vec<_>>(),
    })
}

/// YAML of one resource, or of a `<Kind>List` when `list` is set.
pub fn yaml(info: &KindInfo, items: &[AnyResource], revision: i64, list: bool) -> String {
    let v = if list || items.len() != 1 {
        list_value(info, items, revision)
    } else {
        items[0].to_value()
    };
    serde_yaml::to_string(&sorted(v)).expect("JSON values always serialize as YAML")
}

/// JSON of one resource, or of a `<Kind>List`, indented by two spaces.
pub fn json(info: &KindInfo, items: &[AnyResource], revision: i64, list: bool) -> String {
    let v = if list || items.len() != 1 {
        list_value(info, items, revision)
    } else {
        items[0].to_value()
    };
    let mut s = serde_json::to_string_pretty(&v).expect("JSON values always serialize");
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tabwriter_pads_like_go_with_min_width_and_trailing_padding() {
        let rows = vec![
            vec!["NAME".to_string(), "CIDR".into(), "SELECTOR".into()],
            vec![
                "default-ipv4-ippool".into(),
                "192.168.0.0/16".into(),
                "all()".into(),
            ],
        ];
        assert_eq!(
            tabwriter(&rows),
            "NAME                  CIDR             SELECTOR   \ndefault-ipv4-ippool   192.168.0.0/16   all()      \n"
        );
        assert_eq!(tabwriter(&[vec!["A".into()]]), "A    \n");
    }

    #[test]
    fn nets_are_joined_and_truncated_like_calicoctl() {
        let nets: Vec<String> = (0..10).map(|i| format!("10.{i}.0.0/16")).collect();
        let s = join_and_truncate(&nets, 80);
        assert_eq!(s.len(), 80);
        assert!(
            s.starts_with("10.0.0.0/16,10.1.0.0/16,") && s.ends_with("..."),
            "{s}"
        );
        assert_eq!(join_and_truncate(&nets[..2], 80), "10.0.0.0/16,10.1.0.0/16");
    }
}

/// Calico's boxed tables (olekukonko/tablewriter as calicoctl uses it): headers centred,
/// numeric cells right-aligned, other cells left-aligned, one space of padding.
pub fn boxed_table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let cols = headers.len();
    let width = |c: usize| {
        rows.iter()
            .filter_map(|r| r.get(c))
            .map(|s| s.chars().count())
            .chain([headers[c].len()])
            .max()
            .unwrap_or(0)
    };
    let widths: Vec<usize> = (0..cols).map(width).collect();
    let line = format!(
        "+{}+\n",
        widths
            .iter()
            .map(|w| "-".repeat(w + 2))
            .collect::<Vec<_>>()
            .join("+")
    );
    let mut out = line.clone();
    out.push('|');
    for (h, w) in headers.iter().zip(&widths) {
        let pad = w - h.len();
        let left = pad / 2;
        out.push_str(&format!(
            " {}{}{} |",
            " ".repeat(left),
            h,
            " ".repeat(pad - left)
        ));
    }
    out.push('\n');
    out.push_str(&line);
    for r in rows {
        out.push('|');
        for (c, w) in widths.iter().enumerate() {
            let cell = r.get(c).map(String::as_str).unwrap_or("");
            let numeric = !cell.is_empty() && cell.parse::<f64>().is_ok();
            if numeric {
                out.push_str(&format!(" {cell:>w$} |"));
            } else {
                out.push_str(&format!(" {cell:<w$} |"));
            }
        }
        out.push('\n');
    }
    out.push_str(&line);
    out
}

#[cfg(test)]
mod boxed_tests {
    use super::*;

    #[test]
    fn boxed_table_matches_calicos_layout() {
        let t = boxed_table(
            &["GROUPING", "CIDR", "IPS TOTAL", "IPS IN USE", "IPS FREE"],
            &[vec![
                "IP Pool".into(),
                "10.65.0.0/16".into(),
                "65536".into(),
                "3 (0%)".into(),
                "65533 (100%)".into(),
            ]],
        );
        assert_eq!(
            t,
            "+----------+--------------+-----------+------------+--------------+\n\
             | GROUPING |     CIDR     | IPS TOTAL | IPS IN USE |   IPS FREE   |\n\
             +----------+--------------+-----------+------------+--------------+\n\
             | IP Pool  | 10.65.0.0/16 |     65536 | 3 (0%)     | 65533 (100%) |\n\
             +----------+--------------+-----------+------------+--------------+\n"
        );
    }
}
