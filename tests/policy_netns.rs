//! Network policy enforced with real traffic (issue 17): two node namespaces on a bridge,
//! etcd beside it, one `calico-node` each; four Kubernetes-mode pods made by the real CNI
//! plugin (`prod/a` client and `prod/b` db on node-1, `prod/c` db on node-2, `dev/d` client
//! on node-2), each serving TCP and UDP ports; their namespaces' `kns.` profiles written by
//! hand as kube-controllers does (allow all, namespace labels applied as `pcns.`). Policies
//! go in with `calicoctl apply`; every case probes TCP, UDP or ICMP from inside a pod,
//! same node and across nodes, and asserts both what passes and what is dropped.
//!
//! - `default_tier_semantics_with_real_traffic`: default allow with no policy; default deny
//!   once a policy selects the pod; allow by selector (namespaced) and namespaceSelector;
//!   nets and notNets; a port range and a named port; egress deny; ordered policies (the
//!   lower order Deny beats an Allow, and the other way round); a GlobalNetworkPolicy across
//!   namespaces; a NetworkSet used by selector (and its nets changed live), a
//!   GlobalNetworkSet by a GlobalNetworkPolicy's selector; Log counts and continues.
//! - `tiers_pass_live_changes_and_restart_without_gap`: Pass to the next tier, a tier's
//!   end-of-tier drop and its defaultAction Pass; deleting a policy restores the profile's
//!   behaviour; relabelling a pod changes what it can reach (timed from the datastore
//!   write, bound 1 s); restarting calico-node on the receiving node, then on the sending
//!   node, lets no packet of a denied flow through (nft counters in the far pod) while an
//!   allowed flow keeps arriving.
//! - `policy_across_nodes_over_vxlan`: the same enforcement on traffic decapsulated from
//!   vxlan.calico.
//! - `pod_network_profile_hosts_and_endpoint_to_host`: non-Kubernetes pods and their CNI
//!   network's profile; node hosts reaching pods of another node (dropped until the profile
//!   admits them) and their own (never policed); `defaultEndpointToHostAction` Return and
//!   Drop; an endpoint with neither profile nor policy; a foreign nft table and
//!   iptables-nft rules untouched through start, applies and shutdown.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::cluster::{Lab, calicoctl};
use common::policy::{
    Case, Proto, Servers, add_k8s_pod, case, edit_pod_endpoint, expect_traffic, label_pod,
    namespace_profile, nft_counted, nft_ruleset, time_until_reaches,
};
use common::{NetNs, Process};
use serde_json::json;

use Proto::{Icmp, Tcp, Udp};

/// How long a policy change may take to show in the traffic (generous: the machine is
/// shared; the benchmark measures the real latency).
const SETTLE: Duration = Duration::from_secs(10);

const TCP_PORTS: [u16; 4] = [80, 8080, 8081, 9000];
const UDP_PORTS: [u16; 2] = [53, 5353];

/// The lab with its pods and their servers. Fields drop in order: the daemons first, then
/// the servers, the extra pod namespaces and the lab.
struct Cluster {
    daemons: Vec<Option<Process>>,
    /// The environment every `calico-node` of this cluster gets.
    env: &'static [(&'static str, &'static str)],
    _servers: Vec<Servers>,
    c_ns: NetNs,
    d_ns: NetNs,
    ip: BTreeMap<&'static str, String>,
    lab: Lab,
}

impl Cluster {
    /// The cluster; `env` is given to every `calico-node` (e.g. the pool's VXLAN mode).
    fn new(prefix: &str, env: &'static [(&'static str, &'static str)]) -> Option<Cluster> {
        if !common::have("nft") {
            common::skip("nft is not installed");
            return None;
        }
        let lab = Lab::new(prefix, 2)?;
        let c_ns = NetNs::new(&format!("{prefix}pc"))?;
        let d_ns = NetNs::new(&format!("{prefix}pd"))?;
        let daemons = (0..2).map(|i| Some(lab.start_node(i, env))).collect();
        lab.wait_ready(Duration::from_secs(40));
        let mut cl = Cluster {
            daemons,
            env,
            _servers: Vec::new(),
            c_ns,
            d_ns,
            ip: BTreeMap::new(),
            lab,
        };
        // What kube-controllers writes for the two namespaces.
        cl.apply(&namespace_profile("prod", &[("env", "prod")]));
        cl.apply(&namespace_profile("dev", &[("env", "dev")]));
        let l = &cl.lab;
        let (n1, n2) = (&l.nodes[0], &l.nodes[1]);
        let pods: [(&'static str, &NetNs, &NetNs, &str, &str); 4] = [
            ("a", n1, &l.pa, "node-1", "prod"),
            ("b", n1, &l.pb, "node-1", "prod"),
            ("c", n2, &cl.c_ns, "node-2", "prod"),
            ("d", n2, &cl.d_ns, "node-2", "dev"),
        ];
        let mut servers = Vec::new();
        for (name, node, ns, nodename, namespace) in pods {
            let addr = add_k8s_pod(node, nodename, &l.ep, ns, namespace, name);
            cl.ip.insert(name, addr);
            servers.push(Servers::start(ns, &TCP_PORTS, &UDP_PORTS));
        }
        // Pod labels as Kubernetes' side would write them; b and c name port 8080 `http`.
        label_pod(&l.etcd, "prod", "a", &[("app", "a"), ("role", "client")]);
        label_pod(&l.etcd, "dev", "d", &[("app", "d"), ("role", "client")]);
        for pod in ["b", "c"] {
            edit_pod_endpoint(&l.etcd, "prod", pod, |wep| {
                wep["metadata"]["labels"] = json!({"app": pod, "role": "db"});
                wep["spec"]["ports"] = json!([{"name": "http", "protocol": "TCP", "port": 8080}]);
            });
        }
        cl._servers = servers;
        Some(cl)
    }

    fn ns(&self, pod: &str) -> &NetNs {
        match pod {
            "a" => &self.lab.pa,
            "b" => &self.lab.pb,
            "c" => &self.c_ns,
            "d" => &self.d_ns,
            _ => &self.lab.hub,
        }
    }

    fn ip(&self, pod: &str) -> &str {
        &self.ip[pod]
    }

    /// A case from pod `from` to pod `to` (`hub` for the hub namespace as source).
    fn case(&self, from: &str, to: &str, proto: Proto, passes: bool) -> Case {
        let where_ = if self.node_of(from) == self.node_of(to) {
            "same node"
        } else {
            "other node"
        };
        case(
            &format!("{from} -> {to} ({where_})"),
            self.ns(from),
            self.ip(to),
            proto,
            passes,
        )
    }

    fn node_of(&self, pod: &str) -> usize {
        match pod {
            "a" | "b" => 0,
            "c" | "d" => 1,
            _ => 2,
        }
    }

    fn apply(&self, yaml: &str) {
        let l = &self.lab;
        calicoctl(
            &l.nodes[0],
            &l.ep,
            l.states[0].path(),
            &["apply", "-f", "-"],
            yaml,
        );
    }

    fn delete(&self, yaml: &str) {
        let l = &self.lab;
        calicoctl(
            &l.nodes[0],
            &l.ep,
            l.states[0].path(),
            &["delete", "-f", "-"],
            yaml,
        );
    }

    /// Waits until every case holds; panics with the rulesets and logs.
    fn expect(&self, phase: &str, cases: &[Case]) -> Duration {
        let took = expect_traffic(phase, SETTLE, cases, || self.context());
        eprintln!("{phase}: as expected after {took:?}");
        took
    }

    /// Restarts `calico-node` on node `i` (SIGKILL, then a new one until ready, then 2 s
    /// more for its first full pass) while a sender in pod a sends a datagram to c's UDP 53
    /// and one to its 5353 every millisecond; nft counters inside c's namespace (what
    /// reaches the pod) must see the 53s keep arriving and never a 5353 (the policy in
    /// place denies it).
    fn restart_without_gap(&mut self, i: usize) {
        // Counters in c's own namespace: what reaches the pod. Created afresh each time.
        let _ = self
            .c_ns
            .command("nft")
            .args(["delete", "table", "inet", "gapcount"])
            .output();
        self.c_ns.nft(
            "table inet gapcount {
  chain in {
    type filter hook input priority -300; policy accept;
    udp dport 53 counter
    udp dport 5353 counter
  }
}
",
        );
        let stop = Arc::new(AtomicBool::new(false));
        let sender = {
            let stop = stop.clone();
            let path = format!("/run/netns/{}", self.lab.pa.name);
            let to = self.ip("c").to_string();
            std::thread::spawn(move || {
                let fd = std::fs::File::open(&path).unwrap();
                nix::sched::setns(fd, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
                let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
                let mut sent = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    for port in [53u16, 5353] {
                        let _ = s.send_to(b"gap", (to.as_str(), port));
                    }
                    sent += 1;
                    std::thread::sleep(Duration::from_millis(1));
                }
                sent
            })
        };
        let counted = |port: u16| nft_counted(&self.c_ns, &format!("udp dport {port} counter"));
        std::thread::sleep(Duration::from_millis(300));
        let before = counted(53);
        assert!(before > 0, "the allowed flow arrives before the restart");
        let started = Instant::now();
        self.daemons[i] = None;
        std::thread::sleep(Duration::from_millis(500));
        let during = counted(53);
        self.daemons[i] = Some(self.lab.start_node(i, self.env));
        self.lab.wait_ready(Duration::from_secs(40));
        // Its first full pass after the start rewrites the table: keep sending through it.
        std::thread::sleep(Duration::from_secs(2));
        stop.store(true, Ordering::Relaxed);
        let sent = sender.join().unwrap();
        let counted = |port: u16| nft_counted(&self.c_ns, &format!("udp dport {port} counter"));
        let (allowed, denied) = (counted(53), counted(5353));
        eprintln!(
            "restart of calico-node on node-{} ({:?}): {sent} pairs sent, udp/53 arrived {allowed}, udp/5353 arrived {denied}",
            i + 1,
            started.elapsed()
        );
        assert!(
            during > before && allowed > during,
            "the allowed flow kept arriving while calico-node was down and after ({before}, {during}, {allowed})"
        );
        assert_eq!(
            denied,
            0,
            "a packet of the denied flow arrived during the restart of node-{}:\n{}",
            i + 1,
            self.context()
        );
    }

    fn context(&self) -> String {
        let mut s = format!("pods: {:?}\n", self.ip);
        for (i, n) in self.lab.nodes.iter().enumerate() {
            s += &format!("== node-{} nft ruleset\n{}", i + 1, nft_ruleset(n));
        }
        let logs = self.lab.logs();
        let tail: String = logs
            .chars()
            .skip(logs.chars().count().saturating_sub(6000))
            .collect();
        s + "== logs (tail)\n" + &tail
    }
}

#[test]
fn default_tier_semantics_with_real_traffic() {
    let Some(cl) = Cluster::new("cn-pt", &[]) else {
        return;
    };
    let c = |from, to, proto, passes| cl.case(from, to, proto, passes);

    // No policy: the namespaces' profiles allow everything, same node and across nodes.
    cl.expect(
        "default allow",
        &[
            c("a", "b", Tcp(80), true),
            c("a", "b", Udp(53), true),
            c("a", "b", Icmp, true),
            c("a", "c", Tcp(80), true),
            c("a", "c", Udp(53), true),
            c("a", "c", Icmp, true),
            c("d", "b", Tcp(9000), true),
            c("c", "a", Udp(5353), true),
        ],
    );

    // A policy selecting the db pods: what it allows passes, everything else to them is
    // dropped; its rule selector stays in its namespace (d, in dev, is not a client of
    // prod) unless a namespaceSelector says otherwise.
    let allow_clients = "apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata:
  name: db-from-clients
  namespace: prod
spec:
  selector: role == 'db'
  ingress:
  - action: Allow
    protocol: TCP
    source:
      selector: role == 'client'
    destination:
      ports: [80]
  - action: Allow
    protocol: UDP
    source:
      namespaceSelector: env == 'dev'
      selector: role == 'client'
    destination:
      ports: [53]
";
    cl.apply(allow_clients);
    cl.expect(
        "default deny once selected; allow by selector and namespaceSelector",
        &[
            c("a", "b", Tcp(80), true),
            c("a", "c", Tcp(80), true),
            c("a", "b", Tcp(8080), false),
            c("a", "c", Tcp(8080), false),
            c("a", "c", Udp(53), false),
            c("a", "b", Icmp, false),
            c("a", "c", Icmp, false),
            c("d", "c", Tcp(80), false),
            c("d", "b", Tcp(80), false),
            c("d", "c", Udp(53), true),
            c("d", "b", Udp(53), true),
            c("d", "c", Udp(5353), false),
            // Not selected: a's ingress and b's egress are untouched.
            c("b", "a", Tcp(80), true),
            c("c", "a", Udp(53), true),
        ],
    );
    cl.delete(allow_clients);

    // nets and notNets, a port range, a named port (resolved from the endpoints' ports).
    let a_net = format!("{}/32", cl.ip("a"));
    let d_net = format!("{}/32", cl.ip("d"));
    let nets = format!(
        "apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata:
  name: db-by-nets
  namespace: prod
spec:
  selector: role == 'db'
  ingress:
  - action: Allow
    protocol: TCP
    source:
      nets: [{a_net}]
    destination:
      ports: ['8000:8100']
  - action: Allow
    protocol: TCP
    source:
      notNets: [{a_net}]
    destination:
      ports: [http]
  - action: Allow
    protocol: ICMP
    source:
      nets: [10.244.0.0/16]
      notNets: [{d_net}]
"
    );
    cl.apply(&nets);
    cl.expect(
        "nets, notNets, port range, named port",
        &[
            c("a", "c", Tcp(8080), true),
            c("a", "c", Tcp(8081), true),
            c("a", "b", Tcp(8081), true),
            c("a", "c", Tcp(80), false),
            c("a", "c", Tcp(9000), false),
            c("d", "c", Tcp(8080), true),
            c("d", "b", Tcp(8080), true),
            c("d", "c", Tcp(8081), false),
            c("d", "c", Tcp(80), false),
            c("a", "c", Icmp, true),
            c("a", "b", Icmp, true),
            c("d", "c", Icmp, false),
            c("d", "b", Icmp, false),
        ],
    );
    cl.delete(&nets);

    // Egress: a GlobalNetworkPolicy across namespaces selects the clients (a in prod, d in
    // dev); a lower order Deny of UDP beats a higher order Allow of everything.
    let ordered = |deny_order: u32| {
        format!(
            "apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata:
  name: clients-no-udp
spec:
  order: {deny_order}
  selector: role == 'client'
  types: [Egress]
  egress:
  - action: Deny
    protocol: UDP
---
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata:
  name: clients-allow-all
spec:
  order: 20
  selector: role == 'client'
  types: [Egress]
  egress:
  - action: Allow
"
        )
    };
    cl.apply(&ordered(10));
    cl.expect(
        "egress deny; lower order Deny beats Allow; GNP across namespaces",
        &[
            c("a", "b", Udp(53), false),
            c("a", "c", Udp(53), false),
            c("d", "b", Udp(5353), false),
            c("d", "c", Udp(53), false),
            c("a", "b", Tcp(80), true),
            c("a", "c", Tcp(9000), true),
            c("d", "b", Tcp(80), true),
            c("a", "c", Icmp, true),
            // Not a client: its egress is its profile's.
            c("b", "c", Udp(53), true),
            c("c", "b", Udp(5353), true),
        ],
    );
    // The Allow now comes first: UDP passes.
    cl.apply(&ordered(30));
    cl.expect(
        "lower order Allow beats Deny",
        &[
            c("a", "b", Udp(53), true),
            c("a", "c", Udp(53), true),
            c("d", "b", Udp(5353), true),
            c("a", "c", Tcp(80), true),
        ],
    );
    cl.delete(&ordered(30));

    // A NetworkSet used by a rule's selector: its nets join the selector's set; changing
    // them changes what passes.
    let set = |net: &str| {
        format!(
            "apiVersion: projectcalico.org/v3
kind: NetworkSet
metadata:
  name: trusted
  namespace: prod
  labels:
    trusted: 'yes'
spec:
  nets: [{net}]
"
        )
    };
    let from_set = "apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata:
  name: db-from-trusted
  namespace: prod
spec:
  selector: role == 'db'
  ingress:
  - action: Allow
    source:
      selector: trusted == 'yes'
";
    cl.apply(&set(&d_net));
    cl.apply(from_set);
    cl.expect(
        "NetworkSet by selector",
        &[
            c("d", "c", Tcp(80), true),
            c("d", "b", Udp(53), true),
            c("d", "c", Icmp, true),
            c("a", "c", Tcp(80), false),
            c("a", "b", Udp(53), false),
            c("a", "c", Icmp, false),
        ],
    );
    cl.apply(&set(&a_net));
    cl.expect(
        "NetworkSet nets changed",
        &[
            c("a", "c", Tcp(80), true),
            c("a", "b", Icmp, true),
            c("d", "c", Tcp(80), false),
            c("d", "b", Udp(53), false),
        ],
    );
    cl.delete(from_set);
    cl.delete(&set(&a_net));

    // The same with a GlobalNetworkSet and a GlobalNetworkPolicy.
    let global = format!(
        "apiVersion: projectcalico.org/v3
kind: GlobalNetworkSet
metadata:
  name: trusted-hosts
  labels:
    trusted-global: 'yes'
spec:
  nets: [{d_net}]
---
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata:
  name: db-from-global-set
spec:
  selector: role == 'db'
  ingress:
  - action: Allow
    source:
      selector: trusted-global == 'yes'
"
    );
    cl.apply(&global);
    cl.expect(
        "GlobalNetworkSet by selector",
        &[
            c("d", "c", Tcp(80), true),
            c("d", "b", Icmp, true),
            c("a", "c", Tcp(80), false),
            c("a", "b", Udp(53), false),
        ],
    );
    cl.delete(&global);

    // Log logs (an nft counter on the rule with Calico's prefix) and goes on: the Allow
    // after it decides; what nothing allows is still dropped at the end of the tier.
    let log = "apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata:
  name: db-log
  namespace: prod
spec:
  selector: role == 'db'
  ingress:
  - action: Log
    protocol: TCP
  - action: Allow
    protocol: TCP
    destination:
      ports: [80]
";
    let node2 = &cl.lab.nodes[1];
    let logged_before = nft_counted(node2, "calico-packet");
    cl.apply(log);
    cl.expect(
        "Log continues",
        &[
            c("a", "c", Tcp(80), true),
            c("d", "c", Tcp(80), true),
            c("a", "c", Tcp(8080), false),
            c("a", "c", Udp(53), false),
        ],
    );
    let logged = nft_counted(node2, "calico-packet");
    assert!(
        logged >= logged_before + 3,
        "the Log rule counted the TCP packets to c ({logged_before} -> {logged}):\n{}",
        nft_ruleset(node2)
    );
    cl.delete(log);
    cl.expect(
        "no policy left: allow again",
        &[c("a", "c", Tcp(8080), true), c("a", "c", Udp(53), true)],
    );
}

#[test]
fn tiers_pass_live_changes_and_restart_without_gap() {
    let Some(mut cl) = Cluster::new("cn-pl", &[]) else {
        return;
    };
    let c = |cl: &Cluster, from, to, proto, passes| cl.case(from, to, proto, passes);

    // A tier before the default one: its policy denies UDP to the dbs and passes the rest
    // on; in the default tier a policy allows TCP 80, and its end-of-tier drop takes the
    // rest.
    let tier = |action: &str| {
        format!(
            "apiVersion: projectcalico.org/v3
kind: Tier
metadata:
  name: security
spec:
  order: 100
  defaultAction: {action}
"
        )
    };
    let security = |pass_rest: bool| {
        let pass = if pass_rest { "\n  - action: Pass" } else { "" };
        format!(
            "apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata:
  name: security-db
spec:
  tier: security
  selector: role == 'db'
  types: [Ingress]
  ingress:
  - action: Deny
    protocol: UDP{pass}
"
        )
    };
    let allow_80 = "apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata:
  name: db-allow-80
  namespace: prod
spec:
  selector: role == 'db'
  ingress:
  - action: Allow
    protocol: TCP
    destination:
      ports: [80]
";
    cl.apply(&tier("Deny"));
    cl.apply(&security(true));
    cl.apply(allow_80);
    cl.expect(
        "Pass to the next tier",
        &[
            c(&cl, "a", "c", Udp(53), false),
            c(&cl, "a", "b", Udp(53), false),
            c(&cl, "d", "c", Tcp(80), true),
            c(&cl, "a", "b", Tcp(80), true),
            c(&cl, "a", "c", Tcp(8080), false),
            c(&cl, "d", "b", Tcp(9000), false),
        ],
    );
    // Deleting the default tier's policy: the Pass now reaches the profiles.
    cl.delete(allow_80);
    cl.expect(
        "policy deleted: the profile's behaviour again",
        &[
            c(&cl, "a", "c", Tcp(8080), true),
            c(&cl, "d", "b", Tcp(9000), true),
            c(&cl, "a", "c", Icmp, true),
            c(&cl, "a", "c", Udp(53), false),
        ],
    );
    // Without the Pass rule, the security tier's end drops what its policy did not decide;
    // with the tier's defaultAction Pass, it goes on to the profiles.
    cl.apply(&security(false));
    cl.expect(
        "end of tier drops",
        &[
            c(&cl, "a", "c", Tcp(80), false),
            c(&cl, "a", "b", Icmp, false),
            c(&cl, "a", "c", Udp(53), false),
            c(&cl, "c", "a", Tcp(80), true),
        ],
    );
    cl.apply(&tier("Pass"));
    cl.expect(
        "tier defaultAction Pass",
        &[
            c(&cl, "a", "c", Tcp(80), true),
            c(&cl, "a", "b", Icmp, true),
            c(&cl, "a", "c", Udp(53), false),
        ],
    );
    cl.delete(&security(false));
    cl.delete(&tier("Pass"));

    // Relabelling: the dbs admit clients only; a relabelled client loses access, a
    // relabelled db stops being selected.
    let clients_only = "apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata:
  name: db-clients-only
  namespace: prod
spec:
  selector: role == 'db'
  ingress:
  - action: Allow
    source:
      selector: role == 'client'
";
    cl.apply(clients_only);
    cl.expect(
        "clients only",
        &[
            c(&cl, "a", "c", Tcp(80), true),
            c(&cl, "a", "b", Tcp(80), true),
            c(&cl, "d", "c", Tcp(80), false),
            c(&cl, "b", "c", Tcp(80), false),
        ],
    );
    let etcd = &cl.lab.etcd;
    // The time from the relabel's start (etcdctl reads and writes the WorkloadEndpoint) to
    // the first probe that is dropped (probes of 50 ms; the benchmark measures the
    // dataplane's own latency); at most a second more than etcdctl took.
    let relabel = |role: &str, passes: bool| {
        let started = Instant::now();
        label_pod(etcd, "prod", "a", &[("app", "a"), ("role", role)]);
        let put = started.elapsed();
        let took = time_until_reaches(&cl.lab.pa, cl.ip("c"), Tcp(80), passes, started, SETTLE);
        eprintln!(
            "relabel to {role}: a -> c passes={passes} {took:?} after the relabel started (etcdctl get + put: {put:?})"
        );
        assert!(
            took < put + Duration::from_secs(1),
            "a relabel took {took:?} to be enforced (etcdctl: {put:?})"
        );
    };
    relabel("guest", false);
    cl.expect(
        "client relabelled",
        &[
            c(&cl, "a", "c", Tcp(80), false),
            c(&cl, "a", "b", Tcp(80), false),
        ],
    );
    relabel("client", true);
    cl.expect(
        "client again",
        &[
            c(&cl, "a", "c", Tcp(80), true),
            c(&cl, "a", "b", Tcp(80), true),
        ],
    );
    edit_pod_endpoint(etcd, "prod", "b", |wep| {
        wep["metadata"]["labels"] = json!({"app": "b", "role": "cache"});
    });
    cl.expect(
        "db relabelled: no longer selected",
        &[
            c(&cl, "d", "b", Tcp(80), true),
            c(&cl, "c", "b", Udp(53), true),
            c(&cl, "d", "c", Tcp(80), false),
        ],
    );

    // Restart without a gap: c admits UDP 53 only. A sender in a alternates datagrams to
    // c's 53 and 5353 every millisecond while calico-node on c's node is killed and
    // started again; counters inside c's namespace see every 53 and never a 5353.
    cl.delete(clients_only);
    let only_dns = "apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata:
  name: c-dns-only
  namespace: prod
spec:
  selector: app == 'c'
  ingress:
  - action: Allow
    protocol: UDP
    destination:
      ports: [53]
";
    cl.apply(only_dns);
    cl.expect(
        "c admits UDP 53 only",
        &[
            c(&cl, "a", "c", Udp(53), true),
            c(&cl, "a", "c", Udp(5353), false),
            c(&cl, "a", "c", Tcp(80), false),
        ],
    );
    cl.restart_without_gap(1);
    cl.expect(
        "after the restart",
        &[
            c(&cl, "a", "c", Udp(53), true),
            c(&cl, "a", "c", Udp(5353), false),
            c(&cl, "d", "c", Tcp(80), false),
        ],
    );
    cl.delete(only_dns);
    cl.expect(
        "policy deleted after the restart",
        &[
            c(&cl, "a", "c", Udp(5353), true),
            c(&cl, "d", "c", Tcp(80), true),
        ],
    );

    // The same on the sending side: a's egress denies UDP 5353, and calico-node on a's
    // node restarts.
    let a_egress = "apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata:
  name: a-no-5353-out
spec:
  selector: app == 'a'
  types: [Egress]
  egress:
  - action: Deny
    protocol: UDP
    destination:
      ports: [5353]
  - action: Allow
";
    cl.apply(a_egress);
    cl.expect(
        "a's egress denies UDP 5353",
        &[
            c(&cl, "a", "c", Udp(53), true),
            c(&cl, "a", "c", Udp(5353), false),
            c(&cl, "a", "b", Udp(5353), false),
            c(&cl, "b", "c", Udp(5353), true),
        ],
    );
    cl.restart_without_gap(0);
    cl.expect(
        "after the restart of a's node",
        &[
            c(&cl, "a", "c", Udp(53), true),
            c(&cl, "a", "c", Udp(5353), false),
        ],
    );
}

/// Pods made in non-Kubernetes mode carry their CNI network's profile: they reach each
/// other, across nodes; a node host reaching a pod of another node is dropped until the
/// user's profile admits the hosts' network; a host reaches its own pods (Calico
/// does not police host-to-local-workload traffic); a pod reaches its own host as
/// `defaultEndpointToHostAction` says (Return, which calico-node writes in etcd mode, then
/// Drop set by the user); an endpoint with no profile and no policy is denied both ways.
/// A foreign nftables table and iptables-nft rules in the node namespace are byte-identical
/// after start, every apply and shutdown; policy stays enforced after shutdown.
#[test]
fn pod_network_profile_hosts_and_endpoint_to_host() {
    use common::cluster::add_pod;
    use common::policy::allow_pod_network;
    if !common::have("nft") {
        common::skip("nft is not installed");
        return;
    }
    let Some(lab) = Lab::new("cn-ph", 2) else {
        return;
    };
    let (n1, n2) = (&lab.nodes[0], &lab.nodes[1]);
    // Others' rules in node-2 before calico-node starts: a foreign nftables table and
    // iptables-nft rules (Docker-style chains, a NAT rule). They must stay byte-identical.
    n2.nft(
        "table inet foreign {
  set blocked { type ipv4_addr; elements = { 192.0.2.1 } }
  chain input { type filter hook input priority 10; policy accept; ip saddr @blocked drop; }
  chain forward { type filter hook forward priority 5; policy accept; ip saddr @blocked drop; }
}
",
    );
    for args in [
        &["-N", "DOCKER-USER"][..],
        &["-A", "DOCKER-USER", "-s", "192.0.2.2", "-j", "DROP"],
        &["-A", "FORWARD", "-j", "DOCKER-USER"],
        &[
            "-t",
            "nat",
            "-A",
            "POSTROUTING",
            "-s",
            "192.0.2.0/24",
            "-j",
            "MASQUERADE",
        ],
    ] {
        let out = n2.command("iptables-nft").args(args).output().unwrap();
        assert!(out.status.success(), "iptables-nft {args:?}: {out:?}");
    }
    let others = || {
        let foreign = n2
            .command("nft")
            .args(["list", "table", "inet", "foreign"])
            .output()
            .unwrap();
        let saved = n2.command("iptables-nft-save").output().unwrap();
        let saved: String = String::from_utf8_lossy(&saved.stdout)
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| format!("{l}\n"))
            .collect();
        String::from_utf8_lossy(&foreign.stdout).to_string() + &saved
    };
    let others_before = others();
    assert!(
        others_before.contains("DOCKER-USER -s 192.0.2.2/32 -j DROP"),
        "{others_before}"
    );
    let mut daemons: Vec<Process> = (0..2).map(|i| lab.start_node(i, &[])).collect();
    lab.wait_ready(Duration::from_secs(40));
    let ctl = |args: &[&str], stdin: &str| {
        calicoctl(n1, &lab.ep, lab.states[0].path(), args, stdin);
    };
    // The CNI plugin creates the network's profile at the first ADD.
    let a = add_pod(n1, "node-1", &lab.ep, &lab.pa);
    let b = add_pod(n2, "node-2", &lab.ep, &lab.pb);
    let _servers = [
        Servers::start(&lab.pa, &TCP_PORTS, &UDP_PORTS),
        Servers::start(&lab.pb, &TCP_PORTS, &UDP_PORTS),
        Servers::start(n2, &[7000], &[]),
    ];
    let context = || {
        let mut s = format!("pods a {a} (node-1), b {b} (node-2)\n");
        for (i, n) in lab.nodes.iter().enumerate() {
            s += &format!("== node-{} nft ruleset\n{}", i + 1, nft_ruleset(n));
        }
        s + &lab.logs()
    };
    let expect = |phase: &str, cases: &[Case]| {
        let took = expect_traffic(phase, SETTLE, cases, context);
        eprintln!("{phase}: as expected after {took:?}");
    };
    expect(
        "the network's profile",
        &[
            case("a -> b (other node)", &lab.pa, &b, Tcp(80), true),
            case("b -> a (other node)", &lab.pb, &a, Udp(53), true),
            case("a -> b (other node)", &lab.pa, &b, Icmp, true),
            case("node-1 -> b (other node)", n1, &b, Tcp(80), false),
            case("node-2 -> a (other node)", n2, &a, Icmp, false),
            case("node-2 -> b (its own pod)", n2, &b, Tcp(80), true),
            case("node-1 -> a (its own pod)", n1, &a, Icmp, true),
            case("b -> its host", &lab.pb, "10.99.0.2", Tcp(7000), true),
            case(
                "b -> hub (outside the pools)",
                &lab.pb,
                "10.99.0.254",
                Icmp,
                true,
            ),
        ],
    );
    // The user admits the hosts' network in the profile.
    allow_pod_network(n1, &lab.ep, lab.states[0].path(), &["10.99.0.0/24"]);
    expect(
        "the hosts admitted",
        &[
            case("node-1 -> b (other node)", n1, &b, Tcp(80), true),
            case("node-2 -> a (other node)", n2, &a, Icmp, true),
            case("a -> b (other node)", &lab.pa, &b, Tcp(80), true),
        ],
    );
    // defaultEndpointToHostAction Drop on node-2: b no longer reaches its host (the host
    // still reaches b, and b the others).
    let to_host = |action: &str| {
        format!(
            "apiVersion: projectcalico.org/v3
kind: FelixConfiguration
metadata:
  name: node.node-2
spec:
  defaultEndpointToHostAction: {action}
"
        )
    };
    ctl(&["apply", "-f", "-"], &to_host("Drop"));
    expect(
        "defaultEndpointToHostAction Drop",
        &[
            case("b -> its host", &lab.pb, "10.99.0.2", Tcp(7000), false),
            case("b -> its host", &lab.pb, "10.99.0.2", Icmp, false),
            case("node-2 -> b (its own pod)", n2, &b, Tcp(80), true),
            case("b -> a (other node)", &lab.pb, &a, Tcp(80), true),
        ],
    );
    ctl(&["apply", "-f", "-"], &to_host("Return"));
    expect(
        "defaultEndpointToHostAction Return",
        &[case("b -> its host", &lab.pb, "10.99.0.2", Tcp(7000), true)],
    );
    // No profile and no policy: b is denied both ways (a still reaches the hub).
    let etcd = &lab.etcd;
    let prefix = "/calico/resources/v3/projectcalico.org/workloadendpoints/";
    let out = etcd.etcdctl(&["get", "--prefix", prefix]);
    let lines: Vec<&str> = out.lines().collect();
    let (key, value) = lines
        .chunks(2)
        .find_map(|kv| match kv {
            [k, v] if v.contains(&b) => Some((k.to_string(), v.to_string())),
            _ => None,
        })
        .unwrap_or_else(|| panic!("b's endpoint: {out}"));
    let mut wep: serde_json::Value = serde_json::from_str(&value).unwrap();
    wep["spec"]["profiles"] = json!([]);
    etcd.etcdctl(&["put", &key, &wep.to_string()]);
    expect(
        "no profile, no policy",
        &[
            case("a -> b (other node)", &lab.pa, &b, Tcp(80), false),
            case("a -> b (other node)", &lab.pa, &b, Icmp, false),
            case("b -> a (other node)", &lab.pb, &a, Udp(53), false),
            case("b -> hub", &lab.pb, "10.99.0.254", Icmp, false),
            case("a -> hub", &lab.pa, "10.99.0.254", Icmp, true),
        ],
    );
    assert_eq!(
        others(),
        others_before,
        "others' nftables and iptables-nft rules on node-2 changed while policy was applied"
    );
    // SIGTERM: calico-node drains and exits; our table stays (policy stays enforced),
    // others' rules are still untouched.
    let pid = nix::unistd::Pid::from_raw(daemons[1].0.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let exited = Instant::now();
    while daemons[1].0.try_wait().unwrap().is_none() {
        assert!(
            exited.elapsed() < Duration::from_secs(10),
            "calico-node did not exit on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        others(),
        others_before,
        "others' rules on node-2 changed at shutdown"
    );
    expect(
        "after calico-node's shutdown",
        &[
            case("a -> b (other node)", &lab.pa, &b, Tcp(80), false),
            case("node-2 -> b (its own pod)", n2, &b, Tcp(80), true),
            case("a -> hub", &lab.pa, "10.99.0.254", Icmp, true),
        ],
    );
}

/// Across nodes over VXLAN (the pool's vxlanMode Always): the receiving node enforces the
/// policy on traffic decapsulated from vxlan.calico as on traffic routed directly.
#[test]
fn policy_across_nodes_over_vxlan() {
    let env = &[
        ("CALICO_IPV4POOL_VXLAN", "Always"),
        ("FELIX_PROMETHEUSMETRICSENABLED", "true"),
    ];
    let Some(cl) = Cluster::new("cn-pv", env) else {
        return;
    };
    let c = |from, to, proto, passes| cl.case(from, to, proto, passes);
    cl.expect(
        "default allow over VXLAN",
        &[
            c("a", "c", Tcp(80), true),
            c("a", "c", Udp(53), true),
            c("d", "b", Icmp, true),
        ],
    );
    let r = common::cluster::routes(&cl.lab.nodes[0]);
    assert!(r.contains("dev vxlan.calico"), "routes over VXLAN: {r}");
    let policy = "apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata:
  name: db-from-clients
  namespace: prod
spec:
  selector: role == 'db'
  ingress:
  - action: Allow
    protocol: TCP
    source:
      selector: role == 'client'
    destination:
      ports: [80]
---
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata:
  name: clients-no-icmp-out
spec:
  selector: role == 'client'
  types: [Egress]
  egress:
  - action: Deny
    protocol: ICMP
  - action: Allow
";
    cl.apply(policy);
    cl.expect(
        "policy over VXLAN",
        &[
            c("a", "c", Tcp(80), true),
            c("c", "a", Tcp(80), true),
            c("a", "c", Tcp(8080), false),
            c("a", "c", Udp(53), false),
            c("d", "b", Tcp(80), false),
            c("a", "b", Tcp(80), true),
            c("d", "a", Icmp, false),
            c("c", "a", Icmp, true),
        ],
    );
    // Felix's policy gauges on each node: two local endpoints, each selected by one of
    // the two policies.
    let metric = |node: usize, name: &str| -> Option<f64> {
        let (_, body) = cl.lab.nodes[node]
            .run_in(|| common::http_get(9091, "/metrics"))
            .ok()?;
        body.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))?
            .rsplit(' ')
            .next()?
            .parse()
            .ok()
    };
    for node in 0..2 {
        common::until("the policy gauges", SETTLE, || {
            metric(node, "felix_active_local_endpoints") == Some(2.0)
                && metric(node, "felix_active_local_policies") == Some(2.0)
                && metric(node, "felix_active_local_selectors").is_some_and(|n| n > 0.0)
        });
    }
}
