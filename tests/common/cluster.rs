//! Whole-node helpers for multi-node tests: `calico-node` in a node namespace, pods made by
//! the real `calico` CNI plugin, our calicoctl run inside a node, and what the kernel shows.

use std::path::Path;
use std::process::{Command, Stdio};

use serde_json::{Value, json};

use super::{Etcd, NetNs, Process, free_port, http_get, output_with_stdin};

/// A cluster laid out as hosts are: node namespaces on one bridge in a hub (see
/// [`bridged`]), etcd in the hub on 10.99.0.254, two pod namespaces, and each node's state
/// directory and health port. Nodes are named `node-1`, `node-2`, ... as in Calico's
/// walkthrough. Fields drop in order: the state first, then etcd, the pods, the nodes and
/// the hub last; `calico-node`s a test starts are its own locals, dropped before.
pub struct Lab {
    pub states: Vec<tempfile::TempDir>,
    pub health: Vec<u16>,
    /// etcd's endpoint, reachable from every node.
    pub ep: String,
    pub etcd: Etcd,
    pub pa: NetNs,
    pub pb: NetNs,
    pub nodes: Vec<NetNs>,
    pub hub: NetNs,
}

impl Lab {
    /// `count` bridged nodes and etcd, in namespaces named from `prefix`; None (after a
    /// loud skip) without root, iproute2, etcd or ping (the pods are there to reach each
    /// other).
    pub fn new(prefix: &str, count: usize) -> Option<Lab> {
        Lab::with_etcd_port(prefix, count, free_port())
    }

    /// Like [`Lab::new`], etcd's client port `port` (in the hub's own namespace: 2379, as
    /// a cluster has it, takes nothing from the machine).
    pub fn with_etcd_port(prefix: &str, count: usize, port: u16) -> Option<Lab> {
        if !super::have("ping") {
            super::skip("ping is not installed");
            return None;
        }
        let hub = NetNs::new(&format!("{prefix}hub"))?;
        let nodes: Vec<NetNs> = (0..count)
            .filter_map(|_| NetNs::new(&format!("{prefix}n")))
            .collect();
        let pa = NetNs::new(&format!("{prefix}pa"))?;
        let pb = NetNs::new(&format!("{prefix}pb"))?;
        assert_eq!(nodes.len(), count);
        bridged(&hub, &nodes);
        let etcd = Etcd::start_on_also(&hub.name, port, "10.99.0.254")?;
        Some(Lab {
            states: (0..count).map(|_| tempfile::tempdir().unwrap()).collect(),
            health: (0..count).map(|_| free_port()).collect(),
            ep: format!("http://10.99.0.254:{port}"),
            etcd,
            pa,
            pb,
            nodes,
            hub,
        })
    }

    /// `calico-node` on node `i` (0-based) as `node-{i+1}`; `extra` as in [`calico_node`].
    pub fn start_node(&self, i: usize, extra: &[(&str, &str)]) -> Process {
        calico_node(
            &self.nodes[i],
            &format!("node-{}", i + 1),
            &self.ep,
            self.states[i].path(),
            self.health[i],
            extra,
        )
    }

    /// Every node's `calico-node` log, separated, for failure messages.
    pub fn logs(&self) -> String {
        self.states
            .iter()
            .map(|s| std::fs::read_to_string(s.path().join("calico-node.log")).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n----\n")
    }

    /// Node `i`'s `/readiness` answer.
    pub fn readiness(&self, i: usize) -> std::io::Result<(u16, String)> {
        let port = self.health[i];
        self.nodes[i].run_in(move || http_get(port, "/readiness"))
    }

    /// Waits until every node is ready (readiness includes every BGP session being
    /// Established); panics after `limit` with the answer and every log.
    pub fn wait_ready(&self, limit: std::time::Duration) {
        for i in 0..self.nodes.len() {
            let start = std::time::Instant::now();
            while !self.readiness(i).is_ok_and(|(s, _)| s == 200) {
                assert!(
                    start.elapsed() < limit,
                    "node-{} not ready: {:?}\n{}",
                    i + 1,
                    self.readiness(i),
                    self.logs()
                );
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        }
    }

    /// `calicoctl node status` on node `i`.
    pub fn node_status(&self, i: usize) -> String {
        calicoctl(
            &self.nodes[i],
            &self.ep,
            self.states[i].path(),
            &["node", "status"],
            "",
        )
    }
}

/// `calico-node` in `ns` as node `name`, its state (log, status socket, MTU file) in
/// `state`, health on `health`; `extra` adds or overrides environment variables.
pub fn calico_node(
    ns: &NetNs,
    name: &str,
    etcd: &str,
    state: &Path,
    health: u16,
    extra: &[(&str, &str)],
) -> Process {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(state.join("calico-node.log"))
        .unwrap();
    let mut c = ns.command(env!("CARGO_BIN_EXE_calico-node"));
    c.env_clear()
        .env("NODENAME", name)
        .env("ETCD_ENDPOINTS", etcd)
        .env("IP_AUTODETECTION_METHOD", "interface=eth0")
        .env("CALICO_IPV4POOL_CIDR", "10.244.0.0/16")
        .env("CALICO_STATE_DIR", state)
        .env("CALICO_BGP_STATUS_SOCKET", state.join("bgp-status.sock"))
        .env("FELIX_HEALTHPORT", health.to_string());
    for (k, v) in extra {
        c.env(k, v);
    }
    let child = c.stdout(Stdio::null()).stderr(log).spawn().unwrap();
    Process(child)
}

/// Run the `calico` plugin with `command` for container `id` and the pod namespace `pod`,
/// inside the node namespace; its parsed stdout (null when empty) and success.
pub fn cni(
    node: &NetNs,
    name: &str,
    etcd: &str,
    pod: &NetNs,
    command: &str,
    id: &str,
) -> (bool, Value) {
    let dir = super::cni_install_dir("cni-install-cluster");
    let conf = json!({"cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "calico",
        "etcd_endpoints": etcd, "nodename": name, "ipam": {"type": "calico-ipam"}});
    let out = output_with_stdin(
        node.command(dir.join("calico").to_str().unwrap())
            .env_clear()
            .env("CNI_PATH", &dir)
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", id)
            .env("CNI_NETNS", format!("/run/netns/{}", pod.name))
            .env("CNI_IFNAME", "eth0"),
        &conf.to_string(),
    );
    let v = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    (out.status.success(), v)
}

/// CNI ADD of a pod on node `name`; the pod's IPv4 address.
pub fn add_pod(node: &NetNs, name: &str, etcd: &str, pod: &NetNs) -> String {
    let (ok, v) = cni(node, name, etcd, pod, "ADD", &format!("pod-{}", pod.name));
    assert!(ok, "ADD on {name}: {v}");
    let addr = v["ips"][0]["address"].as_str().unwrap();
    addr.split('/').next().unwrap().to_string()
}

/// CNI DEL of the pod `add_pod` made.
pub fn del_pod(node: &NetNs, name: &str, etcd: &str, pod: &NetNs) {
    let (ok, v) = cni(node, name, etcd, pod, "DEL", &format!("pod-{}", pod.name));
    assert!(ok, "DEL on {name}: {v}");
}

/// Our calicoctl run inside `node` (where etcd and the node's status socket are); its
/// success and its stdout (and stderr on failure).
pub fn calicoctl_try(
    node: &NetNs,
    etcd: &str,
    state: &Path,
    args: &[&str],
    stdin: &str,
) -> (bool, String) {
    let out = output_with_stdin(
        node.command(env!("CARGO_BIN_EXE_calicoctl"))
            .args(args)
            .env_clear()
            .env("ETCD_ENDPOINTS", etcd)
            .env("CALICO_BGP_STATUS_SOCKET", state.join("bgp-status.sock")),
        stdin,
    );
    let mut text = String::from_utf8_lossy(&out.stdout).to_string();
    if !out.status.success() {
        text += &String::from_utf8_lossy(&out.stderr);
    }
    (out.status.success(), text)
}

/// calicoctl that must succeed; its stdout.
pub fn calicoctl(node: &NetNs, etcd: &str, state: &Path, args: &[&str], stdin: &str) -> String {
    let (ok, text) = calicoctl_try(node, etcd, state, args, stdin);
    assert!(ok, "calicoctl {args:?}: {text}");
    text
}

/// `ip <args>` inside `ns`, its stdout.
pub fn ip_show(ns: &NetNs, args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(["-n", &ns.name])
        .args(args)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// `ip route` of the main table.
pub fn routes(ns: &NetNs) -> String {
    ip_show(ns, &["route"])
}

/// Whether `vxlan.calico` exists in `ns`.
pub fn has_vxlan_device(ns: &NetNs) -> bool {
    Command::new("ip")
        .args(["-n", &ns.name, "link", "show", "vxlan.calico"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap()
        .success()
}

/// One ping from `from` to `to`, waiting at most a second.
pub fn ping(from: &NetNs, to: &str) -> bool {
    from.command("ping")
        .args(["-c", "1", "-W", "1", to])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The /26 block holding an address.
pub fn block_of(addr: &str) -> String {
    let (net, last) = addr.rsplit_once('.').unwrap();
    format!("{net}.{}/26", last.parse::<u8>().unwrap() / 64 * 64)
}

/// Nodes on one link, as hosts are: `hub` holds a bridge (fixed MAC, 10.99.0.254/24); node
/// `i` gets eth0 10.99.0.(i+1)/24 on it and a default route via the hub (proxy ARP answers
/// pods only for addresses the node routes elsewhere than their own interface).
pub fn bridged(hub: &NetNs, nodes: &[NetNs]) {
    // A fixed MAC: else the bridge takes its ports' lowest and changes it as nodes join.
    hub.ip(&[
        "link",
        "add",
        "br0",
        "address",
        "02:ca:11:c0:00:01",
        "type",
        "bridge",
    ]);
    hub.ip(&["addr", "add", "10.99.0.254/24", "dev", "br0"]);
    hub.ip(&["link", "set", "br0", "up"]);
    for (i, n) in nodes.iter().enumerate() {
        let port = format!("vn{i}");
        hub.ip(&[
            "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &n.name,
        ]);
        hub.ip(&["link", "set", &port, "master", "br0", "up"]);
        n.ip(&[
            "addr",
            "add",
            &format!("10.99.0.{}/24", i + 1),
            "dev",
            "eth0",
        ]);
        n.ip(&["link", "set", "eth0", "up"]);
        default_route(n);
    }
}

/// Two nodes on one veth pair: eth0 10.99.0.1/24 and 10.99.0.2/24, each with a default
/// route (via an address nobody has: only its existence matters, see [`bridged`]).
pub fn paired(n1: &NetNs, n2: &NetNs) {
    n1.ip(&[
        "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", &n2.name,
    ]);
    for (n, ip) in [(n1, "10.99.0.1/24"), (n2, "10.99.0.2/24")] {
        n.ip(&["addr", "add", ip, "dev", "eth0"]);
        n.ip(&["link", "set", "eth0", "up"]);
        default_route(n);
    }
}

fn default_route(n: &NetNs) {
    n.ip(&[
        "route",
        "add",
        "default",
        "via",
        "10.99.0.254",
        "dev",
        "eth0",
    ]);
}

/// The IPv4 address of a pod's `eth0`.
pub fn pod_ipv4(pod: &NetNs) -> String {
    let out = pod
        .command("ip")
        .args(["-4", "-o", "addr", "show", "eth0"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let addr = text
        .split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .unwrap_or_else(|| panic!("no IPv4 address on {}'s eth0: {text}", pod.name));
    addr.split('/').next().unwrap().to_string()
}
