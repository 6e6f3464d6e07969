//! kube-proxy in iptables mode, as tests need it beside calico-node (issue 18): a script
//! that reproduces kube-proxy's exact rule shapes. Which: the `iptables-restore` input of
//! kube-proxy's `syncProxyRules` (Kubernetes `pkg/proxy/iptables/proxier.go`, v1.26 and
//! later, as its `proxier_test.go` `TestOverallIPTablesRules` expects it) for ClusterIP
//! and NodePort services with `externalTrafficPolicy: Cluster` and no load balancer, and the jump rules
//! kube-proxy ensures in the built-in chains (`iptablesJumpChains`, the comments as
//! kube-proxy writes them). Chain names are kube-proxy's hashes
//! (`KUBE-SVC-` + base32 of the SHA-256 of `ns/name:port` + protocol, cut to
//! 16; `KUBE-SEP-` with the endpoint too). Loaded with `iptables-restore --noflush`, as
//! kube-proxy does, through iptables-nft or iptables-legacy.

use sha2::{Digest, Sha256};

use super::NetNs;

/// Which iptables kube-proxy runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Nft,
    Legacy,
}

impl Backend {
    pub fn restore(self) -> &'static str {
        match self {
            Backend::Nft => "iptables-nft-restore",
            Backend::Legacy => "iptables-legacy-restore",
        }
    }

    pub fn save(self) -> &'static str {
        match self {
            Backend::Nft => "iptables-nft-save",
            Backend::Legacy => "iptables-legacy-save",
        }
    }

    pub fn iptables(self) -> &'static str {
        match self {
            Backend::Nft => "iptables-nft",
            Backend::Legacy => "iptables-legacy",
        }
    }
}

/// One service port: `namespace/name:port`, its cluster IP and port, its node port (0:
/// none) and its endpoints (`ip:port`), TCP.
#[derive(Debug, Clone)]
pub struct Service {
    pub namespace: String,
    pub name: String,
    pub port_name: String,
    pub cluster_ip: String,
    pub port: u16,
    pub node_port: u16,
    pub endpoints: Vec<String>,
}

/// RFC 4648 base32 (Go's `base32.StdEncoding`), enough of it for 16 characters.
fn base32(bytes: &[u8]) -> String {
    const A: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut out = String::new();
    let (mut acc, mut bits) = (0u32, 0u32);
    for &b in bytes {
        acc = (acc << 8) | b as u32;
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(A[((acc >> bits) & 31) as usize] as char);
        }
    }
    out
}

fn hashed(prefix: &str, content: &str) -> String {
    format!(
        "{prefix}{}",
        &base32(&Sha256::digest(content.as_bytes()))[..16]
    )
}

impl Service {
    fn port_name(&self) -> String {
        format!("{}/{}:{}", self.namespace, self.name, self.port_name)
    }

    /// `KUBE-SVC-…` (`servicePortChainName`).
    pub fn svc_chain(&self) -> String {
        hashed("KUBE-SVC-", &format!("{}tcp", self.port_name()))
    }

    /// `KUBE-SEP-…` of one endpoint (`servicePortEndpointChainName`).
    pub fn sep_chain(&self, endpoint: &str) -> String {
        hashed("KUBE-SEP-", &format!("{}tcp{endpoint}", self.port_name()))
    }
}

/// The jump rules kube-proxy ensures in the built-in chains (`-I`, so first).
const JUMPS: &[(&str, &str, &str)] = &[
    (
        "filter",
        "INPUT",
        "-m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL",
    ),
    (
        "filter",
        "INPUT",
        "-m comment --comment \"kubernetes health check service ports\" -j KUBE-NODEPORTS",
    ),
    (
        "filter",
        "INPUT",
        "-m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES",
    ),
    (
        "filter",
        "FORWARD",
        "-m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL",
    ),
    (
        "filter",
        "FORWARD",
        "-m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD",
    ),
    (
        "filter",
        "FORWARD",
        "-m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
    ),
    (
        "filter",
        "FORWARD",
        "-m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES",
    ),
    (
        "filter",
        "OUTPUT",
        "-m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL",
    ),
    (
        "filter",
        "OUTPUT",
        "-m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
    ),
    (
        "nat",
        "OUTPUT",
        "-m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
    ),
    (
        "nat",
        "PREROUTING",
        "-m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
    ),
    (
        "nat",
        "POSTROUTING",
        "-m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING",
    ),
];

/// kube-proxy's `iptables-restore` input for `services` (cluster CIDR `cluster_cidr`,
/// masquerade bit 14, as its defaults).
pub fn restore_input(services: &[Service], cluster_cidr: &str) -> String {
    let mut filter = vec![
        "*filter".to_string(),
        ":KUBE-NODEPORTS - [0:0]".into(),
        ":KUBE-SERVICES - [0:0]".into(),
        ":KUBE-EXTERNAL-SERVICES - [0:0]".into(),
        ":KUBE-FIREWALL - [0:0]".into(),
        ":KUBE-FORWARD - [0:0]".into(),
        ":KUBE-PROXY-FIREWALL - [0:0]".into(),
        "-A KUBE-FIREWALL -m comment --comment \"block incoming localnet connections\" -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP".into(),
        "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP".into(),
        "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark 0x4000/0x4000 -j ACCEPT".into(),
        "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT".into(),
        "COMMIT".into(),
    ];
    let mut chains = vec![
        "*nat".to_string(),
        ":KUBE-NODEPORTS - [0:0]".into(),
        ":KUBE-SERVICES - [0:0]".into(),
        ":KUBE-MARK-MASQ - [0:0]".into(),
        ":KUBE-POSTROUTING - [0:0]".into(),
    ];
    let mut rules = vec![
        "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN".to_string(),
        "-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000".into(),
        "-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully".into(),
        "-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000".into(),
    ];
    for s in services {
        let (name, svc) = (s.port_name(), s.svc_chain());
        chains.push(format!(":{svc} - [0:0]"));
        rules.push(format!(
            "-A KUBE-SERVICES -m comment --comment \"{name} cluster IP\" -m tcp -p tcp -d {} --dport {} -j {svc}",
            s.cluster_ip, s.port
        ));
        rules.push(format!(
            "-A {svc} -m comment --comment \"{name} cluster IP\" -m tcp -p tcp -d {} --dport {} ! -s {cluster_cidr} -j KUBE-MARK-MASQ",
            s.cluster_ip, s.port
        ));
        if s.node_port != 0 {
            // Cluster traffic policy, no load balancer: straight to the service chain,
            // which masquerades what came by the node port.
            rules.push(format!(
                "-A KUBE-NODEPORTS -m comment --comment {name} -m tcp -p tcp --dport {} -j {svc}",
                s.node_port
            ));
            rules.push(format!(
                "-A {svc} -m comment --comment {name} -m tcp -p tcp --dport {} -j KUBE-MARK-MASQ",
                s.node_port
            ));
        }
        let n = s.endpoints.len();
        for (i, ep) in s.endpoints.iter().enumerate() {
            let sep = s.sep_chain(ep);
            chains.push(format!(":{sep} - [0:0]"));
            let left = n - i;
            if left > 1 {
                rules.push(format!(
                    "-A {svc} -m comment --comment {name} -m statistic --mode random --probability {:.10} -j {sep}",
                    1.0 / left as f64
                ));
            } else {
                rules.push(format!("-A {svc} -m comment --comment {name} -j {sep}"));
            }
            let ip = ep.rsplit_once(':').unwrap().0;
            rules.push(format!(
                "-A {sep} -m comment --comment {name} -s {ip} -j KUBE-MARK-MASQ"
            ));
            rules.push(format!(
                "-A {sep} -m comment --comment {name} -m tcp -p tcp -j DNAT --to-destination {ep}"
            ));
        }
    }
    rules.push("-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS".into());
    filter.extend(chains);
    filter.extend(rules);
    filter.push("COMMIT".into());
    filter.join("\n") + "\n"
}

/// What kube-proxy does on each sync, in `ns`: its jump rules ensured (inserted when
/// missing), then its chains restored (`--noflush`: the built-in chains keep everyone
/// else's rules; its own chains are declared, so rewritten whole).
pub fn sync(ns: &NetNs, backend: Backend, services: &[Service], cluster_cidr: &str) {
    for (table, chain, rule) in JUMPS {
        let target = rule.rsplit(' ').next().unwrap();
        // Its chains must exist before a jump to them.
        let _ = ns
            .command(backend.iptables())
            .args(["-w", "-t", table, "-N", target])
            .output();
        let args = shell_words(rule);
        let check = ns
            .command(backend.iptables())
            .args(["-w", "-t", table, "-C", chain])
            .args(&args)
            .output()
            .unwrap();
        if !check.status.success() {
            let out = ns
                .command(backend.iptables())
                .args(["-w", "-t", table, "-I", chain])
                .args(&args)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{} -t {table} -I {chain} {rule}: {}",
                backend.iptables(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    let out = super::output_with_stdin(
        ns.command(backend.restore()).args(["-w", "--noflush"]),
        &restore_input(services, cluster_cidr),
    );
    assert!(
        out.status.success(),
        "{}: {}",
        backend.restore(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// kube-proxy's rules as `iptables-save` shows them (without counters and comments of
/// the tool): what must never change under calico-node.
pub fn saved(ns: &NetNs, backend: Backend) -> String {
    let out = ns.command(backend.save()).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| {
            if l.starts_with(':') {
                // `:CHAIN POLICY [packets:bytes]`
                l.rsplit_once(' ').map_or(l, |(a, _)| a).to_string()
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Split a rule on spaces, keeping quoted comments whole.
fn shell_words(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for c in s.chars() {
        match c {
            '"' => quoted = !quoted,
            ' ' if !quoted => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
            }
            _ => cur.push(c),
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}
