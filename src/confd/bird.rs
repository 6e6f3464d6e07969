//! BIRD 2 configuration from the speaker's desired configuration (backend `bird-external`):
//! the same peers, filters, aggregates and blackholes, for a user who runs real BIRD.
//!
//! Three files, as Calico's confd writes them: `bird.cfg` (router ID, protocols, one BGP
//! protocol per peer), `bird_aggr.cfg` (this node's blocks as blackhole aggregates, and the
//! function that exports them while rejecting their more specific routes) and
//! `bird_ipam.cfg` (the export filter toward peers and the kernel programming filter).
//! Files are replaced atomically and only when their text changes.
//!
//! Service ranges (BGPConfiguration `serviceClusterIPs` and the ranges of
//! `serviceExternalIPs` and `serviceLoadBalancerIPs`) are static blackholes in BIRD only:
//! exported with the routes inside them, never programmed into the kernel. Communities of
//! `prefixAdvertisements` are added on export to routes inside their CIDRs.
//!
//! IPv6, as the native speaker does it: when this node has an IPv6 address, every IPv4
//! session also carries IPv6 routes with that address as their next hop, and IPv6 peers
//! carry IPv6 routes; IPv6 blocks, pools and kernel programming get their own static and
//! kernel protocols, and the filters test each prefix against those of its own family.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use ipnet::IpNet;

use crate::bgp::config::{CommunityValue, DesiredBgpConfig, DesiredPeer, PeerType};

/// The rendered files by name.
pub type Files = BTreeMap<&'static str, String>;

fn protocol_name(p: &DesiredPeer) -> String {
    let kind = match p.peer_type {
        PeerType::NodeToNodeMesh => "Mesh",
        PeerType::Global => "Global",
        PeerType::NodeSpecific => "Node",
    };
    let id: String = p
        .address
        .to_string()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    format!("{kind}_{id}")
}

/// A value BIRD's configuration cannot hold: its strings have no escapes, so a double
/// quote or a line break cannot appear. Nothing is written (the running BIRD keeps its
/// configuration), and readiness says which value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RenderError {
    /// A BGPPeer's password.
    #[error(
        "the password of peer {peer} contains a double quote or a line break, which BIRD's configuration cannot express"
    )]
    Password { peer: std::net::IpAddr },
    /// An entry of BGPConfiguration `ignoredInterfaces`.
    #[error(
        "an ignored interface contains a double quote or a line break, which BIRD's configuration cannot express"
    )]
    IgnoredInterface { name: String },
}

/// A BIRD string, or `refused` when `s` cannot be one.
fn quoted(s: &str, refused: impl FnOnce() -> RenderError) -> Result<String, RenderError> {
    if s.contains(['"', '\n', '\r']) {
        return Err(refused());
    }
    Ok(format!("\"{s}\""))
}

/// Render the configuration. `kernel_pools` are the pools whose routes BIRD programs into
/// the kernel (all but VXLAN pools, whose routes Felix programs from the datastore).
pub fn render(cfg: &DesiredBgpConfig, kernel_pools: &[IpNet]) -> Result<Files, RenderError> {
    let mut files = Files::new();
    files.insert("bird.cfg", main(cfg)?);
    files.insert("bird_aggr.cfg", aggregates(cfg));
    files.insert("bird_ipam.cfg", filters(cfg, kernel_pools));
    Ok(files)
}

/// True when any IPv6 route can be exchanged.
fn has_v6(cfg: &DesiredBgpConfig) -> bool {
    cfg.ipv6_next_hop.is_some() || cfg.peers.iter().any(|p| p.address.is_ipv6())
}

/// Filter statements for prefixes of both families, each family's statements run only on
/// routes of that family (BIRD does not compare prefixes across families).
fn per_family(v6: bool, prefixes: &[&IpNet], line: impl Fn(&IpNet) -> String) -> String {
    let (four, six): (Vec<&IpNet>, Vec<&IpNet>) = prefixes.iter().partition(|n| n.addr().is_ipv4());
    if !v6 {
        return four.iter().map(|n| line(n)).collect();
    }
    let mut s = String::new();
    for (kind, nets) in [("NET_IP4", four), ("NET_IP6", six)] {
        if nets.is_empty() {
            continue;
        }
        s += &format!(
            "  if ( net.type = {kind} ) then {{
"
        );
        for l in nets
            .iter()
            .flat_map(|n| line(n).lines().map(str::to_owned).collect::<Vec<_>>())
        {
            s += &format!("  {l}\n");
        }
        s += "  }
";
    }
    s
}

fn kernel_protocol(name: &str, family: &str) -> String {
    let mut s = format!(
        "protocol kernel {name}{{
"
    );
    s += &format!(
        "  {family} {{
"
    );
    s += "    # Workload routes (and addresses borrowed from other nodes' blocks) are learned;
";
    s += "    # BGP's routes of non-VXLAN pools are programmed.
";
    s += "    import filter { if ( ifname ~ \"cali*\" ) then accept; reject; };
";
    s += "    export filter calico_kernel_programming;
";
    s += "  };
";
    s += "  learn;
  persist;
  scan time 2;
  merge paths on;
  graceful restart;
}

";
    s
}

fn main(cfg: &DesiredBgpConfig) -> Result<String, RenderError> {
    let mut s = String::from("# Generated by calico-node (confd). Do not edit.\n");
    s += &format!("router id {};\n\n", cfg.router_id);
    s += "include \"bird_aggr.cfg\";\ninclude \"bird_ipam.cfg\";\n\n";
    s += "protocol device {\n  scan time 2;\n}\n\n";
    // Connected routes resolve recursive next hops; workload routes come from the kernel.
    let v6 = has_v6(cfg);
    let six = if v6 { "  ipv6;\n" } else { "" };
    // BGPConfiguration's ignoredInterfaces first.
    let mut ignored = String::new();
    for i in &cfg.ignored_interfaces {
        let refused = || RenderError::IgnoredInterface { name: i.clone() };
        ignored += &format!("-{}, ", quoted(i, refused)?);
    }
    s += &format!(
        "protocol direct {{\n  ipv4;\n{six}  interface {ignored}-\"cali*\", -\"vxlan.calico\", -\"tunl0\", \"*\";\n}}\n\n"
    );
    s += &kernel_protocol("", "ipv4");
    if v6 {
        s += &kernel_protocol("kernel6 ", "ipv6");
    }
    s += "template bgp bgp_template {\n";
    s += &format!("  local as {};\n", cfg.local_as.0);
    if cfg.listen_port != 179 {
        s += &format!("  local port {};\n", cfg.listen_port);
    }
    if let Some(id) = cfg.cluster_id {
        s += &format!("  rr cluster id {id};\n");
    }
    s += "  connect delay time 2;\n  connect retry time 5;\n  error wait time 5, 30;\n";
    s += "}\n";
    for p in &cfg.peers {
        s += &peer(cfg, p)?;
    }
    Ok(s)
}

fn peer(cfg: &DesiredBgpConfig, p: &DesiredPeer) -> Result<String, RenderError> {
    let mut s = format!("\nprotocol bgp {} from bgp_template {{\n", protocol_name(p));
    s += &format!("  description \"{}\";\n", p.peer_type.label());
    let port = if p.port == 179 {
        String::new()
    } else {
        format!(" port {}", p.port)
    };
    s += &format!("  neighbor {}{port} as {};\n", p.address, p.remote_as.0);
    if let Some(a) = p.local_address {
        s += &format!("  source address {a};\n");
    }
    if p.passive {
        s += "  passive on;\n";
    }
    if p.rr_client {
        s += "  rr client;\n";
    }
    if let Some(pw) = &p.password {
        let refused = || RenderError::Password { peer: p.address };
        s += &format!("  password {};\n", quoted(pw, refused)?);
    }
    if let Some(hops) = p.ttl_security {
        s += &format!("  ttl security on;\n  multihop {hops};\n");
    } else if let Some(hops) = p.multihop {
        s += &format!("  multihop {hops};\n");
    }
    s += &format!("  hold time {};\n", p.hold_time);
    if p.graceful_restart_secs > 0 {
        s += &format!(
            "  graceful restart on;\n  graceful restart time {};\n",
            p.graceful_restart_secs
        );
    }
    // Our own routes always carry our address; learned ones keep theirs when asked, and
    // on a reflector (reflected routes keep the client's next hop).
    let next_hop = if p.keep_next_hop || cfg.cluster_id.is_some() {
        "next hop keep"
    } else {
        "next hop self"
    };
    let channel = |family: &str, address: Option<String>| {
        let mut c = format!(
            "  {family} {{\n    import all;\n    export filter calico_export_to_bgp_peers;\n"
        );
        c += &format!("    {next_hop};\n");
        if let Some(a) = address {
            c += &format!("    next hop address {a};\n");
        }
        c += "    gateway recursive;\n    add paths on;\n  };\n";
        c
    };
    if p.address.is_ipv6() {
        s += &channel("ipv6", None);
    } else {
        s += &channel("ipv4", None);
        // IPv6 routes over this IPv4 session, with this node's IPv6 address as next hop.
        if let Some(a) = cfg.ipv6_next_hop {
            s += &channel("ipv6", Some(a.to_string()));
        }
    }
    s += "}\n";
    Ok(s)
}

fn aggregates(cfg: &DesiredBgpConfig) -> String {
    let v6 = has_v6(cfg);
    let (services, blocks): (Vec<&IpNet>, Vec<&IpNet>) = cfg
        .export
        .iter()
        .filter(|n| n.prefix_len() < n.max_prefix_len())
        .filter(|n| v6 || n.addr().is_ipv4())
        .partition(|n| cfg.service_ranges.contains(n));
    let mut s = String::from("# Generated by calico-node (confd). Do not edit.\n");
    s += "# This node's blocks: exported as aggregates, their more specific routes not.\n";
    for (name, family, is_v4) in [
        ("static_aggr", "ipv4", true),
        ("static_aggr6", "ipv6", false),
    ] {
        if !is_v4 && !v6 {
            continue;
        }
        s += &format!("protocol static {name} {{\n  {family};\n");
        for b in blocks.iter().filter(|b| b.addr().is_ipv4() == is_v4) {
            s += &format!("  route {b} blackhole;\n");
        }
        let mine: Vec<&&IpNet> = services
            .iter()
            .filter(|b| b.addr().is_ipv4() == is_v4)
            .collect();
        if !mine.is_empty() {
            s += "  # Service ranges: advertised, never programmed.\n";
        }
        for b in mine {
            s += &format!("  route {b} blackhole;\n");
        }
        s += "}\n\n";
    }
    s += "function calico_aggr()\n{\n";
    s += &per_family(v6, &blocks, |b| {
        format!("  if ( net = {b} ) then {{ accept; }}\n  if ( net ~ {b} ) then {{ reject; }}\n")
    });
    s += "}\n";
    s
}

fn filters(cfg: &DesiredBgpConfig, kernel_pools: &[IpNet]) -> String {
    let v6 = has_v6(cfg);
    fn all(v6: bool, nets: &[IpNet]) -> Vec<&IpNet> {
        nets.iter().filter(|n| v6 || n.addr().is_ipv4()).collect()
    }
    let mut s = String::from("# Generated by calico-node (confd). Do not edit.\n");
    s += "filter calico_export_to_bgp_peers {\n";
    // Communities first: calico_aggr() may accept, which ends the filter.
    let tagged: Vec<&IpNet> = cfg
        .policy
        .communities
        .iter()
        .map(|(n, _)| n)
        .filter(|n| v6 || n.addr().is_ipv4())
        .collect();
    s += &per_family(v6, &tagged, |n| {
        let mut block = format!("  if ( net ~ {n} ) then {{\n");
        for (_, values) in cfg.policy.communities.iter().filter(|(c, _)| c == n) {
            for v in values {
                block += &match v {
                    CommunityValue::Standard(c) => {
                        format!("    bgp_community.add(({}, {}));\n", c >> 16, c & 0xffff)
                    }
                    CommunityValue::Large([a, b, c]) => {
                        format!("    bgp_large_community.add(({a}, {b}, {c}));\n")
                    }
                };
            }
        }
        block + "  }\n"
    });
    s += "  calico_aggr();\n";
    s += &per_family(v6, &all(v6, &cfg.policy.denied), |d| {
        format!("  if ( net ~ {d} ) then {{ reject; }}\n")
    });
    s += &per_family(v6, &all(v6, &cfg.policy.allowed), |a| {
        format!("  if ( net ~ {a} ) then {{ accept; }}\n")
    });
    s += "  reject;\n}\n\n";
    s += "filter calico_kernel_programming {\n";
    // Felix programs this node's blackholes itself.
    if v6 {
        s += "  if ( proto = \"static_aggr\" || proto = \"static_aggr6\" ) then { reject; }\n";
    } else {
        s += "  if ( proto = \"static_aggr\" ) then { reject; }\n";
    }
    s += &per_family(v6, &all(v6, &cfg.service_ranges), |p| {
        format!("  if ( net ~ {p} ) then {{ reject; }}\n")
    });
    s += &per_family(v6, &all(v6, kernel_pools), |p| {
        format!("  if ( net ~ {p} ) then {{ accept; }}\n")
    });
    s += "  reject;\n}\n";
    s
}

/// Write the files into `dir`, each atomically (a temporary file renamed over it) and only
/// when its text changed; true when any file changed.
pub fn write(dir: &Path, files: &Files) -> std::io::Result<bool> {
    std::fs::create_dir_all(dir)?;
    let mut changed = false;
    for (name, text) in files {
        let path = dir.join(name);
        if std::fs::read_to_string(&path).is_ok_and(|t| t == *text) {
            continue;
        }
        let tmp = dir.join(format!(".{name}.tmp"));
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        changed = true;
    }
    Ok(changed)
}
