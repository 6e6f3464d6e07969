//! Host protection with real traffic (issue 18): two node namespaces on a bridge, etcd in
//! the hub on port 2379 as a cluster has it, one `calico-node` each, a pod on each node.
//! Host endpoints, policies and FelixConfiguration go in with `calicoctl apply` from
//! node-1 (through the host endpoint itself: etcd is a failsafe port). Every case probes
//! TCP or UDP and asserts both what passes and what is dropped.
//!
//! - `failsafe_policy_prednat_and_untracked`: a host endpoint on node-1's eth0 with no
//!   policy denies other ports both ways while SSH (22), BGP (179, a session made again
//!   after the peer restarts) and etcd (2379) stay reachable, loopback and pods' forwarded
//!   traffic untouched; removing 22 from `failsafeInboundHostPorts` drops it; an allow
//!   policy opens one port to one source only; a host endpoint named for an interface
//!   that does not exist yet polices it from the moment it appears; a pre-DNAT policy
//!   denies a NodePort-style DNAT by source; an untracked (`doNotTrack`) allow works only
//!   with both directions allowed, and leaves no conntrack entry.
//! - `all_interfaces_endpoint_restart_and_drift`: `interfaceName: "*"` polices every
//!   interface; the node's own pods reach the host as `defaultEndpointToHostAction` says
//!   (Return, then Drop); restarting calico-node lets no packet to a denied port through;
//!   a rule of ours deleted by hand comes back.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use common::cluster::{Lab, add_pod, calicoctl, pod_ipv4};
use common::policy::{
    HEP_NODE1_ETH0, NODEPORT_NOT_FROM_NODE2, Proto, Servers, allow_pod_network, case,
    expect_traffic, nft_ruleset, reaches, reaches_from,
};
use common::{NetNs, Process};

const LIMIT: Duration = Duration::from_secs(20);

struct Cluster {
    node1: Option<Process>,
    node2: Option<Process>,
    _servers: Vec<Servers>,
    lab: Lab,
}

impl Cluster {
    /// The lab, both nodes up and ready (BGP established), a pod on each node allowed to
    /// talk to each other and to the hosts, servers on node-1 (TCP 22, 8080, 9090, 7070;
    /// UDP 5353), the hub (TCP 8080) and in each pod (TCP 80).
    fn new(prefix: &str, extra: &'static [(&'static str, &'static str)]) -> Option<Cluster> {
        let lab = Lab::with_etcd_port(prefix, 2, 2379)?;
        if !common::have("nft") {
            common::skip("nft is not installed");
            return None;
        }
        let node1 = lab.start_node(0, extra);
        let node2 = lab.start_node(1, extra);
        lab.wait_ready(LIMIT);
        allow_pod_network(
            &lab.nodes[0],
            &lab.ep,
            lab.states[0].path(),
            &["10.99.0.0/24"],
        );
        add_pod(&lab.nodes[0], "node-1", &lab.ep, &lab.pa);
        add_pod(&lab.nodes[1], "node-2", &lab.ep, &lab.pb);
        let servers = vec![
            Servers::start(&lab.nodes[0], &[22, 8080, 9090, 7070], &[5353]),
            Servers::start(&lab.hub, &[8080], &[]),
            Servers::start(&lab.pa, &[80], &[]),
            Servers::start(&lab.pb, &[80], &[]),
        ];
        Some(Cluster {
            node1: Some(node1),
            node2: Some(node2),
            _servers: servers,
            lab,
        })
    }

    /// `calicoctl <verb> -f -` of `yaml` on node-1.
    fn calicoctl(&self, verb: &str, yaml: &str) {
        calicoctl(
            &self.lab.nodes[0],
            &self.lab.ep,
            self.lab.states[0].path(),
            &[verb, "-f", "-"],
            yaml,
        );
    }

    fn apply(&self, yaml: &str) {
        self.calicoctl("apply", yaml);
    }

    fn delete(&self, yaml: &str) {
        self.calicoctl("delete", yaml);
    }

    fn context(&self) -> String {
        format!(
            "node-1 ruleset:\n{}\nlogs:\n{}",
            nft_ruleset(&self.lab.nodes[0]),
            self.lab.logs()
        )
    }

    fn expect(&self, phase: &str, cases: &[common::policy::Case]) {
        expect_traffic(phase, LIMIT, cases, || self.context());
    }

    /// Whether node-1's `calicoctl node status` shows its BGP peer Established.
    fn bgp_established(&self) -> bool {
        self.lab.node_status(0).contains("Established")
    }
}

/// The default failsafe inbound list without SSH (22).
const NO_SSH: &str = r#"
apiVersion: projectcalico.org/v3
kind: FelixConfiguration
metadata:
  name: default
spec:
  defaultEndpointToHostAction: Return
  failsafeInboundHostPorts:
  - {protocol: UDP, port: 68}
  - {protocol: TCP, port: 179}
  - {protocol: TCP, port: 2379}
  - {protocol: TCP, port: 2380}
  - {protocol: TCP, port: 5473}
  - {protocol: TCP, port: 6443}
  - {protocol: TCP, port: 6666}
  - {protocol: TCP, port: 6667}
"#;

#[test]
fn failsafe_policy_prednat_and_untracked() {
    let Some(mut c) = Cluster::new("hep", &[]) else {
        return;
    };
    let (n1, n2, hub) = (&c.lab.nodes[0], &c.lab.nodes[1], &c.lab.hub);
    let (pa, pb) = (pod_ipv4(&c.lab.pa), pod_ipv4(&c.lab.pb));
    let node1 = "10.99.0.1";
    let open = [
        case("hub -> node-1 tcp/8080", hub, node1, Proto::Tcp(8080), true),
        case(
            "node-1 -> hub tcp/8080",
            n1,
            "10.99.0.254",
            Proto::Tcp(8080),
            true,
        ),
        case(
            "pod b -> pod a tcp/80",
            &c.lab.pb,
            &pa,
            Proto::Tcp(80),
            true,
        ),
    ];
    c.expect("no host endpoint: host traffic is not policed", &open);

    // A host endpoint with no policy: default deny, failsafe ports open.
    c.apply(HEP_NODE1_ETH0);
    let denied = [
        case(
            "hub -> node-1 tcp/22 (failsafe)",
            hub,
            node1,
            Proto::Tcp(22),
            true,
        ),
        case(
            "hub -> node-1 tcp/8080",
            hub,
            node1,
            Proto::Tcp(8080),
            false,
        ),
        case(
            "node-2 -> node-1 udp/5353",
            n2,
            node1,
            Proto::Udp(5353),
            false,
        ),
        case(
            "node-1 -> hub tcp/8080 (egress)",
            n1,
            "10.99.0.254",
            Proto::Tcp(8080),
            false,
        ),
        case(
            "node-1 -> its loopback tcp/8080",
            n1,
            "127.0.0.1",
            Proto::Tcp(8080),
            true,
        ),
        case(
            "node-1 -> its own address tcp/8080",
            n1,
            node1,
            Proto::Tcp(8080),
            true,
        ),
        case(
            "pod b -> pod a tcp/80 (forwarded)",
            &c.lab.pb,
            &pa,
            Proto::Tcp(80),
            true,
        ),
        case(
            "pod a -> pod b tcp/80 (forwarded)",
            &c.lab.pa,
            &pb,
            Proto::Tcp(80),
            true,
        ),
    ];
    c.expect("host endpoint, no policy", &denied);
    // etcd (2379) through the host endpoint: calicoctl on node-1 still works, and BGP
    // (179): a session made again after node-2's calico-node restarts.
    let nodes = calicoctl(n1, &c.lab.ep, c.lab.states[0].path(), &["get", "nodes"], "");
    assert!(nodes.contains("node-2"), "{nodes}");
    drop(c.node2.take());
    c.node2 = Some(c.lab.start_node(1, &[]));
    common::bgp::wait_for(
        LIMIT,
        "BGP established again through the host endpoint",
        || c.bgp_established().then_some(()),
    );
    assert!(!reaches(
        n1,
        "10.99.0.254",
        Proto::Tcp(8080),
        Duration::from_millis(500)
    ));

    // Failsafe inbound without 22: SSH dropped (the test can fail), etcd still open.
    c.apply(NO_SSH);
    c.expect(
        "failsafe without 22",
        &[
            case("hub -> node-1 tcp/22", hub, node1, Proto::Tcp(22), false),
            case(
                "node-2 -> node-1 tcp/8080",
                n2,
                node1,
                Proto::Tcp(8080),
                false,
            ),
        ],
    );

    // An allow policy for the host endpoint: one port, one source net.
    c.apply(
        r#"
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata:
  name: node-8080-from-hub
spec:
  selector: role == 'node'
  types: [Ingress]
  ingress:
  - action: Allow
    protocol: TCP
    source: {nets: ["10.99.0.254/32"]}
    destination: {ports: [8080]}
"#,
    );
    c.expect(
        "allow tcp/8080 from the hub only",
        &[
            case("hub -> node-1 tcp/8080", hub, node1, Proto::Tcp(8080), true),
            case(
                "node-2 -> node-1 tcp/8080",
                n2,
                node1,
                Proto::Tcp(8080),
                false,
            ),
            case(
                "hub -> node-1 tcp/9090",
                hub,
                node1,
                Proto::Tcp(9090),
                false,
            ),
            case(
                "node-1 -> hub tcp/8080 (egress)",
                n1,
                "10.99.0.254",
                Proto::Tcp(8080),
                false,
            ),
        ],
    );

    // A host endpoint for an interface that does not exist yet: eth1 (10.98.0.0/24 to the
    // hub) is policed from the moment it appears.
    c.apply(
        r#"
apiVersion: projectcalico.org/v3
kind: HostEndpoint
metadata:
  name: node-1-eth1
spec:
  node: node-1
  interfaceName: eth1
"#,
    );
    std::thread::sleep(Duration::from_millis(500));
    hub.ip(&[
        "link", "add", "hv1", "type", "veth", "peer", "name", "eth1", "netns", &n1.name,
    ]);
    hub.ip(&["addr", "add", "10.98.0.254/24", "dev", "hv1"]);
    hub.ip(&["link", "set", "hv1", "up"]);
    n1.ip(&["addr", "add", "10.98.0.1/24", "dev", "eth1"]);
    n1.ip(&["link", "set", "eth1", "up"]);
    c.expect(
        "eth1 policed as soon as it exists",
        &[
            case(
                "hub -> node-1 eth1 tcp/8080",
                hub,
                "10.98.0.1",
                Proto::Tcp(8080),
                false,
            ),
            case(
                "hub -> node-1 eth1 tcp/7070",
                hub,
                "10.98.0.1",
                Proto::Tcp(7070),
                false,
            ),
        ],
    );

    // Pre-DNAT: a NodePort-style DNAT (a table of its own, as kube-proxy's) of
    // node-1:30080 to pod a; a pre-DNAT policy denies it from node-2 and nobody else.
    let kp = format!(
        "table ip kp {{\n chain pre {{\n  type nat hook prerouting priority dstnat; policy accept;\n  \
         tcp dport 30080 dnat to {pa}:80\n }}\n}}\n"
    );
    let out = common::output_with_stdin(n1.command("nft").args(["-f", "-"]), &kp);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The NodePort from `from` (named `who`), expected to pass or not.
    let nodeport = |who: &str, from: &NetNs, passes: bool| {
        let what = format!("{who} -> node-1:30080 -> pod a");
        case(&what, from, node1, Proto::Tcp(30080), passes)
    };
    c.expect(
        "NodePort before the pre-DNAT policy",
        &[nodeport("hub", hub, true), nodeport("node-2", n2, true)],
    );
    c.apply(NODEPORT_NOT_FROM_NODE2);
    c.expect(
        "pre-DNAT denies the NodePort from node-2 only",
        &[
            nodeport("hub", hub, true),
            nodeport("node-2", n2, false),
            case("node-2 -> pod a direct", n2, &pa, Proto::Tcp(80), true),
        ],
    );

    // Untracked: an ingress-only allow of tcp/9090 is not enough (the replies meet the
    // tracked host endpoint policy without a connection); with the egress side too the
    // flow passes and conntrack holds nothing of it.
    let untracked = |egress: bool| {
        let egress = if egress {
            "  egress:\n  - action: Allow\n    protocol: TCP\n    source: {ports: [9090]}\n"
        } else {
            ""
        };
        format!(
            r#"
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata:
  name: untracked-9090
spec:
  selector: role == 'node'
  doNotTrack: true
  applyOnForward: true
  types: [Ingress, Egress]
  ingress:
  - action: Allow
    protocol: TCP
    destination: {{ports: [9090]}}
{egress}"#
        )
    };
    c.apply(&untracked(false));
    // Give the apply time to land before asserting a drop (a drop holds either way).
    std::thread::sleep(Duration::from_secs(1));
    c.expect(
        "untracked, one direction only",
        &[case(
            "hub -> node-1 tcp/9090",
            hub,
            node1,
            Proto::Tcp(9090),
            false,
        )],
    );
    c.apply(&untracked(true));
    c.expect(
        "untracked, both directions",
        &[
            case("hub -> node-1 tcp/9090", hub, node1, Proto::Tcp(9090), true),
            case(
                "hub -> node-1 tcp/8080 (tracked policy)",
                hub,
                node1,
                Proto::Tcp(8080),
                true,
            ),
        ],
    );
    let ct = n1
        .command("cat")
        .arg("/proc/net/nf_conntrack")
        .output()
        .unwrap();
    let ct = String::from_utf8_lossy(&ct.stdout);
    assert!(
        !ct.contains("dport=9090"),
        "untracked flow in conntrack:\n{ct}"
    );
    assert!(
        ct.contains("dport=8080"),
        "the tracked flow is in conntrack:\n{ct}"
    );

    // Removing the host endpoints: nothing of the host layer stays.
    c.delete(HEP_NODE1_ETH0);
    c.delete(
        "apiVersion: projectcalico.org/v3\nkind: HostEndpoint\nmetadata:\n  name: node-1-eth1\n",
    );
    c.expect(
        "host endpoints removed",
        &[
            case(
                "node-2 -> node-1 tcp/9090",
                n2,
                node1,
                Proto::Tcp(9090),
                true,
            ),
            case(
                "node-1 -> hub tcp/8080",
                n1,
                "10.99.0.254",
                Proto::Tcp(8080),
                true,
            ),
        ],
    );
    // The second deletion may land after the traffic above already holds.
    common::bgp::wait_for(LIMIT, "the host layer removed", || {
        let rules = nft_ruleset(n1);
        [
            "filter-INPUT-host",
            "cali-failsafe",
            "cali-fh-",
            "mangle-PREROUTING-host",
        ]
        .iter()
        .all(|gone| !rules.contains(gone))
        .then_some(())
    });
    drop(c.node1.take());
}

/// A short route refresh (the full pass that repairs drift comes within seconds) and the
/// inbound failsafe ports from the environment, over the datastore's (Felix's defaults).
const ENV: &[(&str, &str)] = &[
    ("FELIX_ROUTEREFRESHINTERVAL", "2"),
    ("FELIX_FAILSAFEINBOUNDHOSTPORTS", "tcp:22,tcp:179"),
];

#[test]
fn all_interfaces_endpoint_restart_and_drift() {
    let Some(mut c) = Cluster::new("hepall", ENV) else {
        return;
    };
    let (n1, n2, hub) = (&c.lab.nodes[0], &c.lab.nodes[1], &c.lab.hub);
    let node1 = "10.99.0.1";
    hub.ip(&[
        "link", "add", "hv1", "type", "veth", "peer", "name", "eth1", "netns", &n1.name,
    ]);
    hub.ip(&["addr", "add", "10.98.0.254/24", "dev", "hv1"]);
    hub.ip(&["link", "set", "hv1", "up"]);
    n1.ip(&["addr", "add", "10.98.0.1/24", "dev", "eth1"]);
    n1.ip(&["link", "set", "eth1", "up"]);
    c.apply(
        r#"
apiVersion: projectcalico.org/v3
kind: HostEndpoint
metadata:
  name: node-1-all
  labels:
    role: node
spec:
  node: node-1
  interfaceName: "*"
"#,
    );
    let pa = &c.lab.pa;
    let star = [
        case(
            "hub -> node-1 eth0 tcp/22",
            hub,
            node1,
            Proto::Tcp(22),
            true,
        ),
        case(
            "hub -> node-1 eth0 tcp/8080",
            hub,
            node1,
            Proto::Tcp(8080),
            false,
        ),
        case(
            "hub -> node-1 eth1 tcp/22",
            hub,
            "10.98.0.1",
            Proto::Tcp(22),
            true,
        ),
        case(
            "hub -> node-1 eth1 tcp/8080",
            hub,
            "10.98.0.1",
            Proto::Tcp(8080),
            false,
        ),
        case(
            "node-1 -> hub tcp/8080",
            n1,
            "10.99.0.254",
            Proto::Tcp(8080),
            false,
        ),
        case(
            "node-1 -> loopback tcp/8080",
            n1,
            "127.0.0.1",
            Proto::Tcp(8080),
            true,
        ),
        // calico-node writes Return in etcd mode: the host's own rules decide (accept).
        case(
            "pod a -> its host tcp/8080 (Return)",
            pa,
            node1,
            Proto::Tcp(8080),
            true,
        ),
        case(
            "node-2 -> node-1 tcp/8080",
            n2,
            node1,
            Proto::Tcp(8080),
            false,
        ),
    ];
    c.expect("all-interfaces host endpoint", &star);
    // FELIX_FAILSAFEINBOUNDHOSTPORTS replaced the default list (DHCP 68, etcd, ...).
    let failsafe = n1
        .command("nft")
        .args(["list", "chain", "ip", "calico", "filter-cali-failsafe-in"])
        .output()
        .unwrap();
    let failsafe = String::from_utf8_lossy(&failsafe.stdout);
    assert!(
        failsafe.contains("dport 22 accept")
            && failsafe.contains("dport 179 accept")
            && !failsafe.contains("dport 68")
            && !failsafe.contains("dport 2379"),
        "{failsafe}"
    );
    c.apply(
        r#"
apiVersion: projectcalico.org/v3
kind: FelixConfiguration
metadata:
  name: node.node-1
spec:
  defaultEndpointToHostAction: Drop
"#,
    );
    c.expect(
        "defaultEndpointToHostAction Drop",
        &[
            case(
                "pod a -> its host tcp/8080 (Drop)",
                pa,
                node1,
                Proto::Tcp(8080),
                false,
            ),
            case(
                "hub -> node-1 eth0 tcp/22",
                hub,
                node1,
                Proto::Tcp(22),
                true,
            ),
        ],
    );

    // A host endpoint with no interface name, matched by its expected address (eth1's):
    // it governs eth1 instead of the all-interfaces one, and lets go when the address
    // moves away.
    c.apply(
        r#"
apiVersion: projectcalico.org/v3
kind: HostEndpoint
metadata:
  name: node-1-by-address
  labels:
    role: open
spec:
  node: node-1
  expectedIPs: ["10.98.0.1"]
---
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata:
  name: open-8080
spec:
  selector: role == 'open'
  types: [Ingress]
  ingress:
  - action: Allow
    protocol: TCP
    destination: {ports: [8080]}
"#,
    );
    c.expect(
        "host endpoint matched by address",
        &[
            case(
                "hub -> node-1 eth1 tcp/8080",
                hub,
                "10.98.0.1",
                Proto::Tcp(8080),
                true,
            ),
            case(
                "hub -> node-1 eth1 tcp/9090",
                hub,
                "10.98.0.1",
                Proto::Tcp(9090),
                false,
            ),
            case(
                "hub -> node-1 eth0 tcp/8080",
                hub,
                node1,
                Proto::Tcp(8080),
                false,
            ),
        ],
    );
    n1.ip(&["addr", "del", "10.98.0.1/24", "dev", "eth1"]);
    n1.ip(&["addr", "add", "10.98.0.2/24", "dev", "eth1"]);
    c.expect(
        "the address moved: eth1 back under the all-interfaces endpoint",
        &[case(
            "hub -> node-1 eth1 tcp/8080",
            hub,
            "10.98.0.2",
            Proto::Tcp(8080),
            false,
        )],
    );

    // Restart: a prober knocks on the denied port the whole time; not one gets through.
    let stop = Arc::new(AtomicBool::new(false));
    let passed = Arc::new(AtomicU32::new(0));
    let tries = Arc::new(AtomicU32::new(0));
    let prober = {
        let (stop, passed, tries) = (stop.clone(), passed.clone(), tries.clone());
        let hub = hub.name.clone();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                tries.fetch_add(1, Ordering::Relaxed);
                if reaches_from(&hub, node1, Proto::Tcp(8080), Duration::from_millis(100)) {
                    passed.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    drop(c.node1.take());
    std::thread::sleep(Duration::from_secs(1));
    c.node1 = Some(c.lab.start_node(0, ENV));
    c.lab.wait_ready(LIMIT);
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Relaxed);
    prober.join().unwrap();
    assert!(tries.load(Ordering::Relaxed) > 5);
    assert_eq!(
        passed.load(Ordering::Relaxed),
        0,
        "a denied port answered during the restart"
    );
    c.expect("after the restart", &star[..2]);

    // Drift: our host endpoint chain flushed by hand comes back with the next full pass.
    let chain = calico_node::felix::nft::render::host_endpoint_chain(
        "filter",
        "fh",
        calico_node::felix::policy::ALL_INTERFACES_KEY,
    );
    let out = n1
        .command("nft")
        .args(["flush", "chain", "ip", "calico", &chain])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The flush opens the port (unless the repair already came: then the chain is full).
    let opened = reaches(hub, node1, Proto::Tcp(8080), Duration::from_millis(300));
    let listed = n1
        .command("nft")
        .args(["list", "chain", "ip", "calico", &chain])
        .output()
        .unwrap();
    assert!(
        opened || String::from_utf8_lossy(&listed.stdout).contains("drop"),
        "the flush neither opened the port nor was repaired"
    );
    c.expect("drift repaired", &star[..2]);

    // logPrefix at run time: a Log rule's prefix follows the FelixConfiguration, with
    // Calico's specifiers (kind, name).
    c.apply(
        r#"
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata:
  name: log-ssh
spec:
  selector: role == 'node'
  types: [Ingress]
  ingress:
  - action: Log
    protocol: TCP
    destination: {ports: [22]}
"#,
    );
    let prefix_shows = |want: &str| {
        common::bgp::wait_for(LIMIT, &format!("log prefix {want}"), || {
            nft_ruleset(n1)
                .contains(&format!("log prefix \"{want}: \""))
                .then_some(())
        })
    };
    prefix_shows("calico-packet");
    c.apply(
        r#"
apiVersion: projectcalico.org/v3
kind: FelixConfiguration
metadata:
  name: node.node-1
spec:
  defaultEndpointToHostAction: Drop
  logPrefix: "hep-%k-%n"
"#,
    );
    prefix_shows("hep-gnp-log-ssh");
}
