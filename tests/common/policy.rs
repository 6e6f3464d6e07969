//! Network policy in tests (issue 17): what a Calico user sets up so that traffic the tests
//! rely on is admitted, pods in Kubernetes namespaces with labels, and traffic probes
//! (TCP, UDP, ICMP) run from inside pod namespaces, many at once.
//!
//! Once Felix enforces policy, a pod made by the CNI plugin in non-Kubernetes mode carries
//! the profile named after its CNI network (`k8s-pod-network` here): egress allowed,
//! ingress only from endpoints with the label `k8s-pod-network` (Calico's cni-plugin
//! `plugin.go`). Anything else that sends to a pod of another node (a node host, the hub,
//! a BGP test peer) is then dropped, as in Calico.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::cluster::calicoctl;
use super::{Etcd, NetNs, output_with_stdin};

/// The CNI network name the cluster helpers use ([`super::cluster::cni`]).
pub const POD_NETWORK: &str = "k8s-pod-network";

/// Makes the pods of the CNI network [`POD_NETWORK`] admit each other and traffic from
/// `from_nets` (the test's hosts: nodes, the hub, BGP peers), as a Calico user does: the
/// network's profile as Calico's CNI plugin creates it (egress allowed, ingress from
/// `has(k8s-pod-network)`, that label applied to its endpoints), plus an ingress rule for
/// those networks. `calicoctl apply` through `node` (where `etcd` is reachable).
pub fn allow_pod_network(node: &NetNs, etcd: &str, state: &Path, from_nets: &[&str]) {
    let mut ingress =
        vec![json!({"action": "Allow", "source": {"selector": format!("has({POD_NETWORK})")}})];
    if !from_nets.is_empty() {
        ingress.push(json!({"action": "Allow", "source": {"nets": from_nets}}));
    }
    let profile = json!({
        "apiVersion": "projectcalico.org/v3",
        "kind": "Profile",
        "metadata": {"name": POD_NETWORK},
        "spec": {
            "ingress": ingress,
            "egress": [{"action": "Allow"}],
            "labelsToApply": {POD_NETWORK: ""},
        },
    });
    calicoctl(
        node,
        etcd,
        state,
        &["apply", "-f", "-"],
        &profile.to_string(),
    );
}

/// The profile kube-controllers writes for Kubernetes namespace `ns` (`kns.<ns>`: allow
/// everything, the namespace's labels applied as `pcns.<key>`, and
/// `pcns.projectcalico.org/name`), for pods made with [`add_k8s_pod`].
pub fn namespace_profile(ns: &str, labels: &[(&str, &str)]) -> String {
    let mut apply = serde_json::Map::new();
    apply.insert("pcns.projectcalico.org/name".into(), ns.into());
    for (k, v) in labels {
        apply.insert(format!("pcns.{k}"), (*v).into());
    }
    json!({
        "apiVersion": "projectcalico.org/v3",
        "kind": "Profile",
        "metadata": {"name": format!("kns.{ns}")},
        "spec": {
            "ingress": [{"action": "Allow"}],
            "egress": [{"action": "Allow"}],
            "labelsToApply": apply,
        },
    })
    .to_string()
}

/// CNI ADD of Kubernetes pod `namespace/pod` on node `nodename` (Kubernetes mode: the
/// endpoint gets the profile `kns.<namespace>`); the pod's IPv4 address.
pub fn add_k8s_pod(
    node: &NetNs,
    nodename: &str,
    etcd: &str,
    netns: &NetNs,
    namespace: &str,
    pod: &str,
) -> String {
    let dir = super::cni_install_dir("cni-install-cluster");
    let conf = json!({"cniVersion": "1.0.0", "name": POD_NETWORK, "type": "calico",
        "etcd_endpoints": etcd, "nodename": nodename, "ipam": {"type": "calico-ipam"}});
    let out = output_with_stdin(
        node.command(dir.join("calico").to_str().unwrap())
            .env_clear()
            .env("CNI_PATH", &dir)
            .env("CNI_COMMAND", "ADD")
            .env("CNI_CONTAINERID", format!("pod-{}", netns.name))
            .env("CNI_NETNS", format!("/run/netns/{}", netns.name))
            .env("CNI_IFNAME", "eth0")
            .env(
                "CNI_ARGS",
                format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={pod}"),
            ),
        &conf.to_string(),
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    assert!(
        out.status.success(),
        "ADD {namespace}/{pod} on {nodename}: {v} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let addr = v["ips"][0]["address"].as_str().unwrap();
    addr.split('/').next().unwrap().to_string()
}

/// Edits the WorkloadEndpoint of Kubernetes pod `namespace/pod` in etcd (what Calico's
/// Kubernetes side does when a pod's labels change): `edit` gets its JSON.
pub fn edit_pod_endpoint(etcd: &Etcd, namespace: &str, pod: &str, edit: impl FnOnce(&mut Value)) {
    let prefix = format!("/calico/resources/v3/projectcalico.org/workloadendpoints/{namespace}/");
    let out = etcd.etcdctl(&["get", "--prefix", &prefix]);
    let lines: Vec<&str> = out.lines().collect();
    for kv in lines.chunks(2) {
        let [key, value] = kv else { continue };
        let mut wep: Value = serde_json::from_str(value).unwrap();
        if wep["spec"]["pod"] == pod {
            edit(&mut wep);
            etcd.etcdctl(&["put", key, &wep.to_string()]);
            return;
        }
    }
    panic!("no WorkloadEndpoint for pod {namespace}/{pod}: {out}");
}

/// Sets the labels of pod `namespace/pod`'s WorkloadEndpoint.
pub fn label_pod(etcd: &Etcd, namespace: &str, pod: &str, labels: &[(&str, &str)]) {
    let labels: serde_json::Map<String, Value> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), Value::from(*v)))
        .collect();
    edit_pod_endpoint(etcd, namespace, pod, |wep| {
        wep["metadata"]["labels"] = Value::Object(labels)
    });
}

/// Servers inside a pod namespace: every TCP port answers `ok` to a connection, every UDP
/// port echoes a datagram. They stop (and their thread ends) when this is dropped.
pub struct Servers {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Servers {
    pub fn start(ns: &NetNs, tcp: &[u16], udp: &[u16]) -> Servers {
        let path = format!("/run/netns/{}", ns.name);
        let (tcp, udp) = (tcp.to_vec(), udp.to_vec());
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let fd = std::fs::File::open(&path).unwrap();
            nix::sched::setns(fd, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            let listeners: Vec<TcpListener> = tcp
                .iter()
                .map(|p| {
                    let l = TcpListener::bind(("0.0.0.0", *p)).unwrap();
                    l.set_nonblocking(true).unwrap();
                    l
                })
                .collect();
            let sockets: Vec<UdpSocket> = udp
                .iter()
                .map(|p| {
                    let s = UdpSocket::bind(("0.0.0.0", *p)).unwrap();
                    s.set_nonblocking(true).unwrap();
                    s
                })
                .collect();
            ready_tx.send(()).unwrap();
            let mut buf = [0u8; 1500];
            while !stopped.load(Ordering::Relaxed) {
                for l in &listeners {
                    while let Ok((mut s, _)) = l.accept() {
                        let _ = s.set_nonblocking(false);
                        let _ = s.write_all(b"ok\n");
                    }
                }
                for s in &sockets {
                    while let Ok((n, peer)) = s.recv_from(&mut buf) {
                        let _ = s.send_to(&buf[..n], peer);
                    }
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("servers listening");
        Servers {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A kind of traffic a probe sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    /// A TCP connection that must get the server's `ok`.
    Tcp(u16),
    /// A UDP datagram that must come back.
    Udp(u16),
    /// One ICMP echo (iputils `ping`).
    Icmp,
}

/// How long a probe waits before it counts as dropped.
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(800);

/// Whether `proto` traffic from inside `from` (a namespace path under /run/netns) to `to`
/// gets through (and its answer back).
fn probe_in(from: &str, to: &str, proto: Proto, timeout: Duration) -> bool {
    if let Proto::Icmp = proto {
        return std::process::Command::new("ip")
            .args(["netns", "exec", from, "ping", "-c", "1", "-W", "1", to])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
    }
    let path = format!("/run/netns/{from}");
    let to = to.to_string();
    std::thread::spawn(move || {
        let fd = std::fs::File::open(&path).unwrap();
        nix::sched::setns(fd, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        match proto {
            Proto::Tcp(port) => {
                let addr: SocketAddr = format!("{to}:{port}").parse().unwrap();
                let Ok(mut s) = TcpStream::connect_timeout(&addr, timeout) else {
                    return false;
                };
                let _ = s.set_read_timeout(Some(timeout));
                let mut buf = [0u8; 3];
                s.read_exact(&mut buf).is_ok() && &buf == b"ok\n"
            }
            Proto::Udp(port) => {
                let s = UdpSocket::bind("0.0.0.0:0").unwrap();
                let _ = s.set_read_timeout(Some(timeout));
                if s.send_to(b"probe", (to.as_str(), port)).is_err() {
                    return false;
                }
                let mut buf = [0u8; 16];
                matches!(s.recv_from(&mut buf), Ok((5, _)))
            }
            Proto::Icmp => unreachable!(),
        }
    })
    .join()
    .unwrap()
}

/// Whether `proto` traffic from `from` to `to` gets through within `timeout` (TCP and UDP;
/// ICMP waits a second).
pub fn reaches(from: &NetNs, to: &str, proto: Proto, timeout: Duration) -> bool {
    probe_in(&from.name, to, proto, timeout)
}

/// [`reaches`] from the namespace named `from` (for a thread that cannot borrow it).
pub fn reaches_from(from: &str, to: &str, proto: Proto, timeout: Duration) -> bool {
    probe_in(from, to, proto, timeout)
}

/// Polls [`reaches`] (with a short timeout) until it gives `want`; how long after `since`
/// that was, within about `timeout`. Panics after `limit`.
pub fn time_until_reaches(
    from: &NetNs,
    to: &str,
    proto: Proto,
    want: bool,
    since: Instant,
    limit: Duration,
) -> Duration {
    let timeout = Duration::from_millis(50);
    loop {
        let probed = Instant::now();
        if reaches(from, to, proto, timeout) == want {
            return probed.saturating_duration_since(since);
        }
        assert!(
            since.elapsed() < limit,
            "{proto:?} from {} to {to} never became {}",
            from.name,
            if want { "pass" } else { "drop" }
        );
    }
}

/// One expectation: traffic from a pod (or host) namespace to an address passes or is
/// dropped.
#[derive(Debug, Clone)]
pub struct Case {
    /// What the case is (for failure messages), e.g. "a -> c (other node) tcp/80".
    pub what: String,
    pub from: String,
    pub to: String,
    pub proto: Proto,
    pub passes: bool,
}

/// Builds a [`Case`].
pub fn case(what: &str, from: &NetNs, to: &str, proto: Proto, passes: bool) -> Case {
    Case {
        what: what.to_string(),
        from: from.name.clone(),
        to: to.to_string(),
        proto,
        passes,
    }
}

/// Runs every case at once; the ones whose outcome differs from what they expect, each
/// described.
pub fn mismatches(cases: &[Case]) -> Vec<String> {
    let handles: Vec<_> = cases
        .iter()
        .cloned()
        .map(|c| std::thread::spawn(move || (probe_in(&c.from, &c.to, c.proto, PROBE_TIMEOUT), c)))
        .collect();
    handles
        .into_iter()
        .filter_map(|h| {
            let (got, c) = h.join().unwrap();
            (got != c.passes).then(|| {
                format!(
                    "{} ({:?} to {}): expected {}, got {}",
                    c.what,
                    c.proto,
                    c.to,
                    if c.passes { "pass" } else { "drop" },
                    if got { "pass" } else { "drop" }
                )
            })
        })
        .collect()
}

/// Waits until every case holds at once (policy is applied asynchronously after the
/// datastore write); how long that took. Panics after `limit` with the cases that did not
/// hold and `context()` (e.g. the rulesets and logs).
pub fn expect_traffic(
    phase: &str,
    limit: Duration,
    cases: &[Case],
    context: impl Fn() -> String,
) -> Duration {
    let start = Instant::now();
    loop {
        let bad = mismatches(cases);
        if bad.is_empty() {
            return start.elapsed();
        }
        if start.elapsed() > limit {
            panic!(
                "{phase}: traffic not as expected after {:?}:\n  {}\n{}",
                start.elapsed(),
                bad.join("\n  "),
                context()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `nft list ruleset` inside `ns` (for failure messages and counters).
pub fn nft_ruleset(ns: &NetNs) -> String {
    let out = ns
        .command("nft")
        .args(["list", "ruleset"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr)
}

/// The packets counted by the `counter` of every rule of `ns`'s ruleset whose line
/// contains `needle`, summed.
pub fn nft_counted(ns: &NetNs, needle: &str) -> u64 {
    nft_ruleset(ns)
        .lines()
        .filter(|l| l.contains(needle))
        .filter_map(|l| {
            let rest = l.split("counter packets ").nth(1)?;
            rest.split_whitespace().next()?.parse::<u64>().ok()
        })
        .sum()
}

/// A HostEndpoint for node-1's eth0 (10.99.0.1 in the lab), labelled `role: node`.
pub const HEP_NODE1_ETH0: &str = r#"
apiVersion: projectcalico.org/v3
kind: HostEndpoint
metadata:
  name: node-1-eth0
  labels:
    role: node
spec:
  node: node-1
  interfaceName: eth0
  expectedIPs: ["10.99.0.1"]
"#;

/// A pre-DNAT policy for `role == 'node'` host endpoints denying TCP 30080 (a NodePort)
/// from node-2's address (10.99.0.2).
pub const NODEPORT_NOT_FROM_NODE2: &str = r#"
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata:
  name: nodeport-not-from-node-2
spec:
  selector: role == 'node'
  preDNAT: true
  applyOnForward: true
  types: [Ingress]
  ingress:
  - action: Deny
    protocol: TCP
    source: {nets: ["10.99.0.2/32"]}
    destination: {ports: [30080]}
"#;
