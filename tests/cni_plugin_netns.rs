//! The `calico` CNI plugin (with `calico-ipam` from CNI_PATH) on a real kernel: a node
//! namespace (with etcd) and a pod namespace made by the test. The pod gets exactly
//! Calico's interfaces, addresses and routes, reaches the host through proxy ARP, and DEL
//! (also repeated, also with the namespace gone) removes everything; a failed ADD leaks
//! neither an address nor an interface.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::Stdio;

use common::{Etcd, NetNs, free_port, output_with_stdin};
use serde_json::{Value, json};

/// A plugin directory laid out as Calico installs it: `calico`, and `calico-ipam` as the
/// same binary (here a link), so the IPAM step runs inside the `calico` process.
fn calico_install() -> String {
    common::cni_install_dir("cni-install")
        .to_str()
        .unwrap()
        .to_string()
}

/// Cargo's output directory: `calico-ipam` there is a separate binary, run as a process.
fn cargo_bins() -> String {
    Path::new(env!("CARGO_BIN_EXE_calico"))
        .parent()
        .unwrap()
        .to_str()
        .unwrap()
        .to_string()
}

fn cni(host: &NetNs, env: &[(&str, &str)], conf: &Value) -> (i32, Value) {
    cni_in(&calico_install(), host, env, conf)
}

fn cni_in(plugin_dir: &str, host: &NetNs, env: &[(&str, &str)], conf: &Value) -> (i32, Value) {
    let out = output_with_stdin(
        host.command(&format!("{plugin_dir}/calico"))
            .env_clear()
            .env("CNI_PATH", format!("{plugin_dir}:/usr/lib/cni"))
            .envs(env.iter().copied()),
        &conf.to_string(),
    );
    let s = String::from_utf8(out.stdout).unwrap();
    let v = if s.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&s).unwrap_or_else(|_| panic!("not JSON: {s}"))
    };
    (out.status.code().unwrap(), v)
}

fn sh(ns: &NetNs, cmd: &str) -> String {
    let out = ns.command("sh").args(["-c", cmd]).output().unwrap();
    String::from_utf8(out.stdout).unwrap() + &String::from_utf8(out.stderr).unwrap()
}

#[test]
fn pod_gets_calicos_network_and_del_removes_it() {
    pod_network_round_trip(&calico_install());
}

#[test]
fn pod_network_with_calico_ipam_as_its_own_process() {
    pod_network_round_trip(&cargo_bins());
}

fn pod_network_round_trip(plugin_dir: &str) {
    let Some(host) = NetNs::new("cn-node") else {
        return;
    };
    let Some(pod) = NetNs::new("cn-pod") else {
        return;
    };
    host.add_uplink();
    let port = free_port();
    let Some(etcd) = Etcd::start_on(Some(&host.name), port) else {
        return;
    };
    common::seed_in_netns(&host, etcd.endpoint(), "10.65.0.0/16");

    let netns = format!("/run/netns/{}", pod.name);
    let env = |cmd: &'static str| -> Vec<(&'static str, String)> {
        vec![
            ("CNI_COMMAND", cmd.to_string()),
            ("CNI_CONTAINERID", "c0ffee0123456789".into()),
            ("CNI_NETNS", netns.clone()),
            ("CNI_IFNAME", "eth0".into()),
            (
                "CNI_ARGS",
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=ns1;K8S_POD_NAME=web-0".into(),
            ),
        ]
    };
    let as_refs = |v: &Vec<(&'static str, String)>| {
        v.iter().map(|(k, v)| (*k, v.clone())).collect::<Vec<_>>()
    };
    let conf = json!({"cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "calico",
        "etcd_endpoints": etcd.endpoint(), "nodename": "node-1", "mtu": 1450, "ipam": {"type": "calico-ipam"}});
    let call = |cmd: &'static str, conf: &Value| {
        let e = as_refs(&env(cmd));
        let refs: Vec<(&str, &str)> = e.iter().map(|(k, v)| (*k, v.as_str())).collect();
        cni_in(plugin_dir, &host, &refs, conf)
    };

    let (code, res) = call("ADD", &conf);
    assert_eq!(code, 0, "{res}");
    let cali = res["interfaces"][0]["name"].as_str().unwrap().to_string();
    assert!(cali.starts_with("cali") && cali.len() == 15, "{cali}");
    assert_eq!(res["interfaces"][1]["name"], "eth0");
    assert_eq!(res["interfaces"][1]["sandbox"], netns.as_str());
    assert_eq!(res["ips"][0]["interface"], 1);
    let addr = res["ips"][0]["address"].as_str().unwrap().to_string();
    let ip = addr.trim_end_matches("/32").to_string();

    // Inside the pod: exactly Calico's routes, the /32, the MTU.
    assert_eq!(
        sh(&pod, "ip route"),
        "default via 169.254.1.1 dev eth0 \n169.254.1.1 dev eth0 scope link \n"
    );
    let a = sh(&pod, "ip -o addr show dev eth0");
    assert!(a.contains(&format!("inet {addr} ")), "{a}");
    assert!(sh(&pod, "ip link show eth0").contains("mtu 1450"));
    // On the node: host route, MAC, sysctls.
    let routes = sh(&host, "ip route show proto boot");
    assert!(
        routes.contains(&format!("{ip} dev {cali} scope link")),
        "{routes}"
    );
    assert!(sh(&host, &format!("ip link show {cali}")).contains("link/ether ee:ee:ee:ee:ee:ee"));
    for (path, want) in [
        (format!("/proc/sys/net/ipv4/conf/{cali}/proxy_arp"), "1"),
        (format!("/proc/sys/net/ipv4/neigh/{cali}/proxy_delay"), "0"),
        (format!("/proc/sys/net/ipv4/conf/{cali}/forwarding"), "1"),
    ] {
        assert_eq!(sh(&host, &format!("cat {path}")).trim(), want, "{path}");
    }
    // The pod reaches the node; 169.254.1.1 was answered by proxy ARP with the host MAC.
    let ping = sh(&pod, "ping -c 1 -W 2 10.99.0.1");
    assert!(ping.contains("1 received"), "{ping}");
    assert!(sh(&pod, "ip neigh show 169.254.1.1").contains("lladdr ee:ee:ee:ee:ee:ee"));
    // The WorkloadEndpoint, with Calico's name.
    let wep: Value = serde_json::from_str(&etcd.etcdctl_value(
        "/calico/resources/v3/projectcalico.org/workloadendpoints/ns1/node--1-k8s-web--0-eth0",
    ))
    .unwrap();
    assert_eq!(wep["spec"]["ipNetworks"][0], addr.as_str());
    assert_eq!(wep["spec"]["interfaceName"], cali.as_str());
    assert_eq!(wep["spec"]["pod"], "web-0");
    assert_eq!(
        wep["metadata"]["labels"]["projectcalico.org/namespace"],
        "ns1"
    );
    // The endpoint's and the result's MAC are the pod interface's.
    let pod_link = sh(&pod, "ip link show eth0");
    let mac = res["interfaces"][1]["mac"].as_str().unwrap();
    assert!(
        pod_link.contains(&format!("link/ether {mac} ")),
        "{pod_link} vs {mac}"
    );
    assert_eq!(wep["spec"]["mac"], mac);

    // A repeated ADD (the runtime retrying) gets the same address and a working pod.
    let (code, again) = call("ADD", &conf);
    assert_eq!(code, 0, "{again}");
    assert_eq!(again["ips"][0]["address"], addr.as_str());
    let ping = sh(&pod, "ping -c 1 -W 2 10.99.0.1");
    assert!(ping.contains("1 received"), "{ping}");
    let res = again;

    // CHECK against the result.
    let mut check = conf.clone();
    check["prevResult"] = res.clone();
    assert_eq!(call("CHECK", &check), (0, Value::Null));
    // Someone deletes the host route by hand: CHECK says so.
    sh(&host, &format!("ip route del {ip} dev {cali}"));
    let (code, err) = call("CHECK", &check);
    assert_eq!(code, 1);
    assert!(
        err["details"]
            .as_str()
            .unwrap()
            .contains(&format!("host route {ip}/32 dev {cali} is missing")),
        "{err}"
    );

    // DEL removes everything; again is fine; also once the namespace is gone.
    assert_eq!(call("DEL", &conf), (0, Value::Null));
    assert!(!sh(&pod, "ip link").contains("eth0"));
    assert!(!sh(&host, "ip link").contains(&cali));
    assert!(!sh(&host, "ip route").contains(&ip));
    assert_eq!(
        etcd.etcdctl_value("/calico/ipam/v2/handle/k8s-pod-network.c0ffee0123456789"),
        ""
    );
    assert_eq!(
        etcd.etcdctl(&[
            "get",
            "--prefix",
            "/calico/resources/v3/projectcalico.org/workloadendpoints/",
            "--keys-only"
        ])
        .trim(),
        ""
    );
    assert_eq!(call("DEL", &conf), (0, Value::Null));
    common::run("ip", &["netns", "del", &pod.name]);
    assert_eq!(
        call("DEL", &conf),
        (0, Value::Null),
        "DEL with the namespace gone"
    );
    let (code, _) = call("CHECK", &check);
    assert_eq!(code, 1, "CHECK fails once the pod network is gone");
}

/// A node with etcd and a pool of /32 blocks, where a pod (container `container`) was added
/// then deleted: its address's block is empty and still affine, so the next ADD of that
/// container gets the same address. The pod's namespace, etcd, the plugin's config and
/// that address.
struct EmptiedBlock {
    // Dropped in this order: etcd (in the node's namespace) first, the node's last.
    _etcd: Etcd,
    _pod: NetNs,
    host: NetNs,
    conf: Value,
    netns: String,
    container: &'static str,
    ip: String,
}

impl EmptiedBlock {
    fn new(container: &'static str) -> Option<EmptiedBlock> {
        let host = NetNs::new("cn-node")?;
        let pod = NetNs::new("cn-pod")?;
        host.add_uplink();
        let etcd = Etcd::start_on(Some(&host.name), free_port())?;
        common::seed_in_netns(&host, etcd.endpoint(), "10.65.0.0/16");
        let key = "/calico/resources/v3/projectcalico.org/ippools/pool";
        let mut pool: Value = serde_json::from_str(&etcd.etcdctl_value(key)).unwrap();
        pool["spec"]["blockSize"] = 32.into();
        etcd.etcdctl(&["put", key, &pool.to_string()]);
        let conf = json!({"cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "calico",
            "etcd_endpoints": etcd.endpoint(), "nodename": "node-1", "ipam": {"type": "calico-ipam"}});
        let netns = format!("/run/netns/{}", pod.name);
        let mut lab = EmptiedBlock {
            host,
            _pod: pod,
            _etcd: etcd,
            conf,
            netns,
            container,
            ip: String::new(),
        };
        let (code, res) = lab.cni("ADD");
        assert_eq!(code, 0, "{res}");
        lab.ip = res["ips"][0]["address"]
            .as_str()
            .unwrap()
            .trim_end_matches("/32")
            .to_string();
        let (code, res) = lab.cni("DEL");
        assert_eq!(code, 0, "{res}");
        Some(lab)
    }

    fn cni(&self, command: &str) -> (i32, Value) {
        let env = [
            ("CNI_COMMAND", command),
            ("CNI_CONTAINERID", self.container),
            ("CNI_NETNS", self.netns.as_str()),
            ("CNI_IFNAME", "eth0"),
        ];
        cni(&self.host, &env, &self.conf)
    }
}

/// The pod's host route meets a route to its address through another interface (the
/// kernel answers EEXIST; the existing route is read back): ADD fails naming the conflict,
/// and the other route stays.
#[test]
fn a_route_to_the_pods_address_through_another_interface_is_a_conflict() {
    let Some(lab) = EmptiedBlock::new("c0f11c") else {
        return;
    };
    let (host, ip) = (&lab.host, &lab.ip);
    // Someone else's route to the address the block gives again.
    host.ip(&["route", "add", &format!("{ip}/32"), "dev", "eth0"]);
    let eth0 = host.ifindex("eth0");
    let (code, res) = lab.cni("ADD");
    assert_ne!(code, 0, "{res}");
    assert!(
        res.to_string().contains(&format!(
            "route to {ip}/32 already exists via ifindex {eth0}"
        )),
        "{res}"
    );
    assert!(
        sh(host, &format!("ip route show {ip}")).contains("dev eth0"),
        "the other route stays"
    );
}

/// With /32 blocks the pod's address is a whole block, for which Felix programs a
/// blackhole: the pod's route takes its place instead of failing the ADD.
#[test]
fn felixs_blackhole_for_a_32_block_gives_way_to_the_pods_route() {
    let Some(lab) = EmptiedBlock::new("b1ac0e") else {
        return;
    };
    let (host, ip) = (&lab.host, &lab.ip);
    // Felix's blackhole for the (now empty, still affine) /32 block.
    host.ip(&[
        "route",
        "add",
        "blackhole",
        &format!("{ip}/32"),
        "proto",
        "80",
    ]);
    let (code, res) = lab.cni("ADD");
    assert_eq!(code, 0, "{res}");
    assert_eq!(
        res["ips"][0]["address"],
        format!("{ip}/32"),
        "the same block again"
    );
    let cali = res["interfaces"][0]["name"].as_str().unwrap();
    assert_eq!(
        sh(host, &format!("ip route show {ip}")).trim(),
        format!("{ip} dev {cali} scope link")
    );
}

#[test]
fn failed_add_leaks_no_address_and_no_interface() {
    let Some(host) = NetNs::new("cn-node") else {
        return;
    };
    let port = free_port();
    let Some(etcd) = Etcd::start_on(Some(&host.name), port) else {
        return;
    };
    common::seed_in_netns(&host, etcd.endpoint(), "10.65.0.0/16");
    let conf = json!({"cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "calico",
        "etcd_endpoints": etcd.endpoint(), "nodename": "node-1", "ipam": {"type": "calico-ipam"}});
    let env = [
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "deadbeef"),
        ("CNI_NETNS", "/run/netns/cn-no-such-namespace"),
        ("CNI_IFNAME", "eth0"),
    ];
    let (code, err) = cni(&host, &env, &conf);
    assert_eq!(code, 1);
    assert_eq!(err["code"], 100);
    assert!(
        err["details"]
            .as_str()
            .unwrap()
            .contains("cn-no-such-namespace"),
        "{err}"
    );
    assert_eq!(
        etcd.etcdctl(&["get", "--prefix", "/calico/ipam/v2/handle/", "--keys-only"])
            .trim(),
        "",
        "address released"
    );
    let blocks = etcd.etcdctl(&[
        "get",
        "--prefix",
        "/calico/ipam/v2/assignment/",
        "--print-value-only",
    ]);
    assert!(!blocks.contains("deadbeef"), "{blocks}");
    assert!(!sh(&host, "ip link").contains("cali"), "no interface left");
}

#[test]
fn host_local_works_as_the_ipam_plugin() {
    if !std::path::Path::new("/usr/lib/cni/host-local").exists() {
        common::skip(
            "host-local is not installed (scripts/test installs containernetworking-plugins)",
        );
        return;
    }
    let Some(host) = NetNs::new("cn-node") else {
        return;
    };
    let Some(pod) = NetNs::new("cn-pod") else {
        return;
    };
    let Some(etcd) = Etcd::start_on(Some(&host.name), free_port()) else {
        return;
    };
    common::seed_in_netns(&host, etcd.endpoint(), "10.65.0.0/16");
    let data = tempfile::tempdir().unwrap();
    let conf = json!({"cniVersion": "1.0.0", "name": "hl-net", "type": "calico",
        "etcd_endpoints": etcd.endpoint(), "nodename": "node-1",
        "ipam": {"type": "host-local", "dataDir": data.path(), "ranges": [[{"subnet": "10.77.0.0/24"}]]}});
    let netns = format!("/run/netns/{}", pod.name);
    let env = [
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "hl1"),
        ("CNI_NETNS", netns.as_str()),
        ("CNI_IFNAME", "eth0"),
    ];
    let (code, res) = cni(&host, &env, &conf);
    assert_eq!(code, 0, "{res}");
    let addr = res["ips"][0]["address"].as_str().unwrap().to_string();
    assert!(
        addr.starts_with("10.77.0.") && addr.ends_with("/32"),
        "{addr}"
    );
    assert!(sh(&pod, "ip -o addr show dev eth0").contains(&format!("inet {addr} ")));
    assert_eq!(
        sh(&pod, "ip route"),
        "default via 169.254.1.1 dev eth0 \n169.254.1.1 dev eth0 scope link \n"
    );
    let del = [
        ("CNI_COMMAND", "DEL"),
        ("CNI_CONTAINERID", "hl1"),
        ("CNI_NETNS", netns.as_str()),
        ("CNI_IFNAME", "eth0"),
    ];
    assert_eq!(cni(&host, &del, &conf), (0, Value::Null));
    assert!(!sh(&pod, "ip link").contains("eth0"));
}

#[test]
fn fifty_parallel_adds_in_one_node() {
    let Some(host) = NetNs::new("cn-node") else {
        return;
    };
    let Some(etcd) = Etcd::start_on(Some(&host.name), free_port()) else {
        return;
    };
    common::seed_in_netns(&host, etcd.endpoint(), "10.65.0.0/16");
    let pods: Vec<NetNs> = (0..50).map(|_| NetNs::new("cn-pod").unwrap()).collect();
    let conf = json!({"cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "calico",
        "etcd_endpoints": etcd.endpoint(), "nodename": "node-1", "ipam": {"type": "calico-ipam"}});
    let host = std::sync::Arc::new(host);
    let results: Vec<(i32, Value)> = std::thread::scope(|s| {
        let handles: Vec<_> = pods
            .iter()
            .enumerate()
            .map(|(i, pod)| {
                let (host, conf) = (host.clone(), conf.clone());
                s.spawn(move || {
                    let netns = format!("/run/netns/{}", pod.name);
                    let cid = format!("par{i:02}");
                    let args = format!("K8S_POD_NAMESPACE=ns1;K8S_POD_NAME=pod-{i}");
                    let env = [
                        ("CNI_COMMAND", "ADD"),
                        ("CNI_CONTAINERID", cid.as_str()),
                        ("CNI_NETNS", netns.as_str()),
                        ("CNI_IFNAME", "eth0"),
                        ("CNI_ARGS", args.as_str()),
                    ];
                    cni(&host, &env, &conf)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut addrs = std::collections::HashSet::new();
    for (code, res) in &results {
        assert_eq!(*code, 0, "{res}");
        assert!(addrs.insert(res["ips"][0]["address"].as_str().unwrap().to_string()));
    }
    assert_eq!(addrs.len(), 50);
    assert_eq!(sh(&host, "ip -o link show").matches("cali").count(), 50);
    let weps = etcd.etcdctl(&[
        "get",
        "--prefix",
        "/calico/resources/v3/projectcalico.org/workloadendpoints/ns1/",
        "--keys-only",
    ]);
    assert_eq!(weps.lines().filter(|l| !l.is_empty()).count(), 50);
}

#[test]
fn dual_stack_pod_gets_a_128_and_the_link_local_gateway() {
    let Some(host) = NetNs::new("cn-node") else {
        return;
    };
    let Some(pod) = NetNs::new("cn-pod") else {
        return;
    };
    host.add_uplink();
    host.ip(&["-6", "addr", "add", "fd00:99::1/64", "dev", "eth0", "nodad"]);
    let Some(etcd) = Etcd::start_on(Some(&host.name), free_port()) else {
        return;
    };
    common::seed_in_netns(&host, etcd.endpoint(), "10.65.0.0/16");
    let endpoint = etcd.endpoint();
    host.run_in(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(async move {
                let client = calico_node::datastore::Client::new(
                    Etcd::config_for(&endpoint).connect().await.unwrap(),
                );
                let spec = calico_node::model::IPPoolSpec {
                    cidr: "fd00:65::/64".into(),
                    ..Default::default()
                };
                client
                    .create(calico_node::model::IPPool::new("pool6", spec))
                    .await
                    .unwrap();
            })
    });
    let conf = json!({"cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "calico",
        "etcd_endpoints": etcd.endpoint(), "nodename": "node-1",
        "ipam": {"type": "calico-ipam", "assign_ipv4": "true", "assign_ipv6": "true"}});
    let netns = format!("/run/netns/{}", pod.name);
    let env = [
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "ds1"),
        ("CNI_NETNS", netns.as_str()),
        ("CNI_IFNAME", "eth0"),
    ];
    let (code, res) = cni(&host, &env, &conf);
    assert_eq!(code, 0, "{res}");
    let v6 = res["ips"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["address"].as_str().unwrap().to_string())
        .find(|a| a.contains(':'))
        .unwrap();
    assert!(v6.starts_with("fd00:65::") && v6.ends_with("/128"), "{v6}");
    assert!(sh(&pod, "ip -6 -o addr show dev eth0").contains(&format!("inet6 {v6} ")));
    let r6 = sh(&pod, "ip -6 route");
    assert!(
        r6.contains("default via fe80::ecee:eeff:feee:eeee dev eth0"),
        "{r6}"
    );
    let ip6 = v6.trim_end_matches("/128");
    assert!(
        sh(&host, "ip -6 route show proto boot").contains(&format!("{ip6} dev ")),
        "host /128 route"
    );
    // The pod reaches the node over IPv6 through its link-local gateway.
    let ping = sh(&pod, "ping -6 -c 1 -W 3 fd00:99::1");
    assert!(ping.contains("1 received"), "{ping}");
}

#[test]
fn etcd_lost_after_ipam_gives_code_11_and_no_interface() {
    let Some(host) = NetNs::new("cn-node") else {
        return;
    };
    let Some(pod) = NetNs::new("cn-pod") else {
        return;
    };
    let Some(mut etcd) = Etcd::start_on(Some(&host.name), free_port()) else {
        return;
    };
    common::seed_in_netns(&host, etcd.endpoint(), "10.65.0.0/16");
    // An IPAM plugin that runs calico-ipam, then kills etcd (by the PID this test started)
    // before the main plugin writes the WorkloadEndpoint.
    let dir = tempfile::tempdir().unwrap();
    let ipam = Path::new(env!("CARGO_BIN_EXE_calico-ipam"));
    let wrapper = dir.path().join("ipam-then-etcd-dies");
    std::fs::write(&wrapper, format!("#!/bin/sh\nout=$({})\nrc=$?\n[ \"$CNI_COMMAND\" = ADD ] && kill -9 {}\necho \"$out\"\nexit $rc\n", ipam.display(), etcd.pid().unwrap())).unwrap();
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let conf = json!({"cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "calico",
        "etcd_endpoints": etcd.endpoint(), "nodename": "node-1", "ipam": {"type": "ipam-then-etcd-dies"}});
    let netns = format!("/run/netns/{}", pod.name);
    let out = host
        .command(env!("CARGO_BIN_EXE_calico"))
        .env_clear()
        .env("CNI_PATH", dir.path())
        .env("CNI_COMMAND", "ADD")
        .env("CNI_CONTAINERID", "lost1")
        .env("CNI_NETNS", &netns)
        .env("CNI_IFNAME", "eth0")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            c.stdin
                .take()
                .unwrap()
                .write_all(conf.to_string().as_bytes())?;
            c.wait_with_output()
        })
        .unwrap();
    let err: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(err["code"], 11, "{err}");
    assert!(
        !sh(&host, "ip link").contains("cali"),
        "no host interface left"
    );
    assert!(
        !sh(&pod, "ip link").contains("eth0"),
        "no pod interface left"
    );
    // The address could not be released while etcd was down; with no WorkloadEndpoint it
    // is a leak the checker reports (and the GC frees).
    etcd.restart();
    let endpoint = etcd.endpoint();
    let leaks = host.run_in(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(async move {
                let ds = Etcd::config_for(&endpoint).connect().await.unwrap();
                let client = calico_node::datastore::Client::new(ds.clone());
                let ipam = calico_node::ipam::Ipam::new(ds);
                let snap = calico_node::ipam::gc::snapshot(&ipam, &client)
                    .await
                    .unwrap();
                calico_node::ipam::gc::find_leaks(&snap)
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
            })
    });
    // (No Node resource exists in this test, so node-1's block affinity is reported too.)
    let allocations: Vec<&String> = leaks.iter().filter(|l| l.contains("(handle")).collect();
    assert_eq!(allocations.len(), 1, "{leaks:?}");
    assert!(
        allocations[0].contains("k8s-pod-network.lost1"),
        "{leaks:?}"
    );
}

#[test]
fn wep_deleted_behind_the_plugins_back_is_a_leak_freed_on_the_second_pass() {
    let Some(host) = NetNs::new("cn-node") else {
        return;
    };
    let Some(pod) = NetNs::new("cn-pod") else {
        return;
    };
    let Some(etcd) = Etcd::start_on(Some(&host.name), free_port()) else {
        return;
    };
    common::seed_in_netns(&host, etcd.endpoint(), "10.65.0.0/16");
    let conf = json!({"cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "calico",
        "etcd_endpoints": etcd.endpoint(), "nodename": "node-1", "ipam": {"type": "calico-ipam"}});
    let netns = format!("/run/netns/{}", pod.name);
    let env = [
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "gc1"),
        ("CNI_NETNS", netns.as_str()),
        ("CNI_IFNAME", "eth0"),
    ];
    let (code, res) = cni(&host, &env, &conf);
    assert_eq!(code, 0, "{res}");
    let ip = res["ips"][0]["address"]
        .as_str()
        .unwrap()
        .trim_end_matches("/32")
        .to_string();
    etcd.etcdctl(&[
        "del",
        "--prefix",
        "/calico/resources/v3/projectcalico.org/workloadendpoints/",
    ]);
    let ctl = |args: &[&str]| {
        let out = host
            .command(env!("CARGO_BIN_EXE_calicoctl"))
            .env("ETCD_ENDPOINTS", etcd.endpoint())
            .args(["-c", "/nonexistent"])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let check = ctl(&["ipam", "check"]);
    assert!(
        check.contains(&format!("leaked: {ip} (handle \"k8s-pod-network.gc1\")")),
        "{check}"
    );
    // Pass by pass: the collector's first sighting frees nothing, the second frees it.
    let ds_endpoint = etcd.endpoint();
    let (first, second) = host.run_in(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(async move {
                use calico_node::ipam::gc;
                let ds = Etcd::config_for(&ds_endpoint).connect().await.unwrap();
                let (client, ipam) = (
                    calico_node::datastore::Client::new(ds.clone()),
                    calico_node::ipam::Ipam::new(ds),
                );
                let mut t = gc::LeakTracker::default();
                let grace = std::time::Duration::from_millis(100);
                let pass = |t: &mut gc::LeakTracker, leaks| {
                    t.observe(leaks, std::time::Instant::now(), grace)
                };
                let first = pass(
                    &mut t,
                    gc::find_leaks(&gc::snapshot(&ipam, &client).await.unwrap()),
                );
                let freed_first = gc::free(&ipam, &first).await.unwrap().len();
                tokio::time::sleep(grace).await;
                let second = pass(
                    &mut t,
                    gc::find_leaks(&gc::snapshot(&ipam, &client).await.unwrap()),
                );
                let freed_second = gc::free(&ipam, &second).await.unwrap();
                (
                    freed_first,
                    freed_second
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>(),
                )
            })
    });
    assert_eq!(first, 0, "nothing freed on the first pass");
    assert!(
        second.iter().any(|l| l.contains("k8s-pod-network.gc1")),
        "{second:?}"
    );
    assert_eq!(
        etcd.etcdctl_value("/calico/ipam/v2/handle/k8s-pod-network.gc1"),
        ""
    );
}

/// A node namespace with an uplink and etcd, seeded with a pool: the common start of the
/// sandbox tests below.
fn node_with_etcd() -> Option<(NetNs, Etcd, Value)> {
    let host = NetNs::new("cn-node")?;
    host.add_uplink();
    let etcd = Etcd::start_on(Some(&host.name), free_port())?;
    common::seed_in_netns(&host, etcd.endpoint(), "10.65.0.0/16");
    let conf = json!({"cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "calico",
        "etcd_endpoints": etcd.endpoint(), "nodename": "node-1", "ipam": {"type": "calico-ipam"}});
    Some((host, etcd, conf))
}

/// One CNI call for container `cid` in namespace `pod` (`args`: CNI_ARGS).
fn call_for(
    host: &NetNs,
    cmd: &str,
    cid: &str,
    pod: &NetNs,
    args: &str,
    conf: &Value,
) -> (i32, Value) {
    let netns = format!("/run/netns/{}", pod.name);
    let env = [
        ("CNI_COMMAND", cmd),
        ("CNI_CONTAINERID", cid),
        ("CNI_NETNS", netns.as_str()),
        ("CNI_IFNAME", "eth0"),
        ("CNI_ARGS", args),
    ];
    cni(host, &env, conf)
}

const POD_P: &str = "IgnoreUnknown=1;K8S_POD_NAMESPACE=ns1;K8S_POD_NAME=p";
const WEP_P: &str =
    "/calico/resources/v3/projectcalico.org/workloadendpoints/ns1/node--1-k8s-p-eth0";

/// Calico's CmdDelK8s: the kubelet replaces a pod's sandbox (same pod, new container and
/// namespace) and only then sends DEL for the old one. That DEL must leave the new
/// sandbox's veth (same `cali…` name: it is derived from the pod), host route,
/// WorkloadEndpoint and address alone.
#[test]
fn del_of_an_old_sandbox_leaves_the_pods_new_sandbox_alone() {
    let Some((host, etcd, conf)) = node_with_etcd() else {
        return;
    };
    let (Some(pod1), Some(pod2)) = (NetNs::new("cn-sb1"), NetNs::new("cn-sb2")) else {
        return;
    };
    let (code, res1) = call_for(&host, "ADD", "sandbox1", &pod1, POD_P, &conf);
    assert_eq!(code, 0, "{res1}");
    let (code, res2) = call_for(&host, "ADD", "sandbox2", &pod2, POD_P, &conf);
    assert_eq!(code, 0, "{res2}");
    let cali = res2["interfaces"][0]["name"].as_str().unwrap().to_string();
    assert_eq!(
        res1["interfaces"][0]["name"],
        cali.as_str(),
        "one name per pod"
    );
    let addr2 = res2["ips"][0]["address"].as_str().unwrap().to_string();
    let ip2 = addr2.trim_end_matches("/32").to_string();
    assert_ne!(res1["ips"][0]["address"], addr2.as_str());

    let (code, res) = call_for(&host, "DEL", "sandbox1", &pod1, POD_P, &conf);
    assert_eq!(code, 0, "{res}");

    assert!(
        sh(&host, "ip link").contains(&cali),
        "sandbox 2's veth stays"
    );
    assert!(sh(&pod2, "ip -o addr show dev eth0").contains(&format!("inet {addr2} ")));
    let routes = sh(&host, "ip route");
    assert!(
        routes.contains(&format!("{ip2} dev {cali} scope link")),
        "{routes}"
    );
    let wep: Value = serde_json::from_str(&etcd.etcdctl_value(WEP_P)).expect("WEP stays");
    assert_eq!(wep["spec"]["containerID"], "sandbox2");
    assert_eq!(wep["spec"]["ipNetworks"][0], addr2.as_str());
    assert_ne!(
        etcd.etcdctl_value("/calico/ipam/v2/handle/k8s-pod-network.sandbox2"),
        ""
    );
    assert_eq!(
        etcd.etcdctl_value("/calico/ipam/v2/handle/k8s-pod-network.sandbox1"),
        "",
        "the old sandbox's address is released"
    );
    let ping = sh(&host, &format!("ping -c 1 -W 2 {ip2}"));
    assert!(ping.contains("1 received"), "{ping}");

    // Sandbox 2's own DEL then removes it all.
    let (code, res) = call_for(&host, "DEL", "sandbox2", &pod2, POD_P, &conf);
    assert_eq!(code, 0, "{res}");
    assert!(!sh(&host, "ip link").contains(&cali));
    assert_eq!(etcd.etcdctl_value(WEP_P), "");
    assert_eq!(
        etcd.etcdctl_value("/calico/ipam/v2/handle/k8s-pod-network.sandbox2"),
        ""
    );
}

/// Without the datastore DEL cannot tell whose endpoint it is: it deletes nothing (not the
/// interface either) and answers 11, so the runtime retries (Calico: "to protect the
/// endpoint from false DEL").
#[test]
fn del_with_etcd_down_deletes_nothing_and_says_try_again() {
    let Some((host, mut etcd, conf)) = node_with_etcd() else {
        return;
    };
    let Some(pod) = NetNs::new("cn-pod") else {
        return;
    };
    let (code, res) = call_for(&host, "ADD", "down1", &pod, POD_P, &conf);
    assert_eq!(code, 0, "{res}");
    let cali = res["interfaces"][0]["name"].as_str().unwrap().to_string();
    etcd.kill();
    let (code, err) = call_for(&host, "DEL", "down1", &pod, POD_P, &conf);
    assert_eq!((code, err["code"].as_u64()), (1, Some(11)), "{err}");
    assert!(
        sh(&pod, "ip link").contains("eth0"),
        "the pod keeps its interface"
    );
    assert!(
        sh(&host, "ip link").contains(&cali),
        "the host keeps its veth"
    );
    // Also without a node name (no endpoint to read): the release fails first.
    let mut nameless = conf.clone();
    nameless.as_object_mut().unwrap().remove("nodename");
    nameless["nodename_file"] = json!("/nonexistent/calico/nodename");
    let (code, err) = call_for(&host, "DEL", "down1", &pod, POD_P, &nameless);
    assert_eq!((code, err["code"].as_u64()), (1, Some(11)), "{err}");
    assert!(
        sh(&pod, "ip link").contains("eth0"),
        "the pod keeps its interface"
    );
    etcd.restart();
    assert_ne!(etcd.etcdctl_value(WEP_P), "", "the endpoint stays");
    assert_ne!(
        etcd.etcdctl_value("/calico/ipam/v2/handle/k8s-pod-network.down1"),
        ""
    );
    // Once etcd is back the retried DEL cleans up.
    let (code, res) = call_for(&host, "DEL", "down1", &pod, POD_P, &conf);
    assert_eq!(code, 0, "{res}");
    assert!(!sh(&host, "ip link").contains(&cali));
    assert_eq!(etcd.etcdctl_value(WEP_P), "");
}

/// Outside Kubernetes the host name is `cali` + the first 11 characters of the container
/// ID: a second container sharing them must not take (delete) the first one's veth.
#[test]
fn add_never_deletes_another_containers_veth_of_the_same_name() {
    let Some((host, etcd, conf)) = node_with_etcd() else {
        return;
    };
    let (Some(pod1), Some(pod2)) = (NetNs::new("cn-c1"), NetNs::new("cn-c2")) else {
        return;
    };
    let (code, res) = call_for(&host, "ADD", "abcdef0123456789aa", &pod1, "", &conf);
    assert_eq!(code, 0, "{res}");
    assert_eq!(res["interfaces"][0]["name"], "caliabcdef01234");
    let ip1 = res["ips"][0]["address"]
        .as_str()
        .unwrap()
        .trim_end_matches("/32")
        .to_string();
    // A repeated ADD of the same container still replaces its own veth.
    let (code, res) = call_for(&host, "ADD", "abcdef0123456789aa", &pod1, "", &conf);
    assert_eq!(code, 0, "{res}");
    let (code, err) = call_for(&host, "ADD", "abcdef0123456789bb", &pod2, "", &conf);
    assert_eq!((code, err["code"].as_u64()), (1, Some(100)), "{err}");
    assert!(
        err["details"]
            .as_str()
            .unwrap()
            .contains("caliabcdef01234 already exists and belongs to another container"),
        "{err}"
    );
    let ping = sh(&pod1, "ping -c 1 -W 2 10.99.0.1");
    assert!(
        ping.contains("1 received"),
        "the first container keeps its network: {ping}"
    );
    assert!(sh(&host, "ip route").contains(&format!("{ip1} dev caliabcdef01234")));
    assert_eq!(
        etcd.etcdctl_value("/calico/ipam/v2/handle/k8s-pod-network.abcdef0123456789bb"),
        "",
        "the refused container's address is released"
    );
    assert_ne!(
        etcd.etcdctl_value("/calico/ipam/v2/handle/k8s-pod-network.abcdef0123456789aa"),
        ""
    );
}

const PROFILES: &str = "/calico/resources/v3/projectcalico.org/profiles/";

/// The etcd mod_revision of `key` (0 when absent).
fn mod_revision(etcd: &Etcd, key: &str) -> i64 {
    let v: Value = serde_json::from_str(&etcd.etcdctl(&["get", key, "-w", "json"])).unwrap();
    v["kvs"][0]["mod_revision"].as_i64().unwrap_or(0)
}

/// Calico's plugin outside Kubernetes (cni-plugin/pkg/plugin/plugin.go): ADD creates the
/// profile named after the network when it is missing (egress allowed, ingress from
/// `has(<network>)`, `labelsToApply {<network>: ""}`) and never rewrites one that exists,
/// even one a person edited. Kubernetes pods (profile `kns.<ns>`) and a configuration
/// naming a policy handler get none.
#[test]
fn add_creates_the_networks_profile_once_and_keeps_a_hand_edited_one() {
    let Some((host, etcd, conf)) = node_with_etcd() else {
        return;
    };
    let pods: Vec<NetNs> = (0..5).filter_map(|_| NetNs::new("cn-prof")).collect();
    if pods.len() < 5 {
        return;
    }
    let key = format!("{PROFILES}k8s-pod-network");
    assert_eq!(etcd.etcdctl_value(&key), "");
    let (code, res) = call_for(&host, "ADD", "prof-c1", &pods[0], "", &conf);
    assert_eq!(code, 0, "{res}");
    let stored: Value = serde_json::from_str(&etcd.etcdctl_value(&key)).unwrap();
    assert_eq!(stored["kind"], "Profile");
    assert_eq!(stored["metadata"]["name"], "k8s-pod-network");
    assert_eq!(
        stored["spec"],
        json!({"ingress": [{"action": "Allow", "source": {"selector": "has(k8s-pod-network)"}}],
            "egress": [{"action": "Allow"}], "labelsToApply": {"k8s-pod-network": ""}})
    );
    let wep = etcd.etcdctl(&[
        "get",
        "--prefix",
        "/calico/resources/v3/projectcalico.org/workloadendpoints/default/",
        "--print-value-only",
    ]);
    assert!(wep.contains(r#""profiles":["k8s-pod-network"]"#), "{wep}");

    // A second container on the network: the profile is not written again.
    let created = mod_revision(&etcd, &key);
    let (code, res) = call_for(&host, "ADD", "prof-c2", &pods[1], "", &conf);
    assert_eq!(code, 0, "{res}");
    assert_eq!(mod_revision(&etcd, &key), created, "written once");

    // A person's edit (ingress from anywhere) survives the next ADD byte for byte.
    let mut edited = stored.clone();
    edited["spec"]["ingress"] = json!([{"action": "Allow"}]);
    etcd.etcdctl(&["put", &key, &edited.to_string()]);
    let before = etcd.etcdctl_value(&key);
    let (code, res) = call_for(&host, "ADD", "prof-c3", &pods[2], "", &conf);
    assert_eq!(code, 0, "{res}");
    assert_eq!(
        etcd.etcdctl_value(&key),
        before,
        "a hand-edited profile is kept"
    );

    // Kubernetes mode, and a network with a policy handler: no profile of their network.
    let mut k8s = conf.clone();
    k8s["name"] = json!("k8s-net");
    let (code, res) = call_for(&host, "ADD", "prof-c4", &pods[3], POD_P, &k8s);
    assert_eq!(code, 0, "{res}");
    let mut handled = conf.clone();
    handled["name"] = json!("handled-net");
    handled["policy"] = json!({"type": "k8s"});
    let (code, res) = call_for(&host, "ADD", "prof-c5", &pods[4], "", &handled);
    assert_eq!(code, 0, "{res}");
    let names = etcd.etcdctl(&["get", "--prefix", PROFILES, "--keys-only"]);
    assert_eq!(
        names.split_whitespace().collect::<Vec<_>>(),
        vec![key.as_str()]
    );
}

/// A network whose profile cannot be created (its name, 64 characters, is not a valid
/// label key for `labelsToApply`) fails the ADD with a configuration error naming the
/// field, and leaves no address, no endpoint, no interface and no profile behind.
#[test]
fn a_profile_that_cannot_be_created_fails_add_without_leaks() {
    let Some((host, etcd, mut conf)) = node_with_etcd() else {
        return;
    };
    let Some(pod) = NetNs::new("cn-prof") else {
        return;
    };
    conf["name"] = json!("n".repeat(64));
    let (code, err) = call_for(&host, "ADD", "badprof", &pod, "", &conf);
    assert_eq!((code, err["code"].as_u64()), (1, Some(4)), "{err}");
    assert_eq!(
        err["msg"], "invalid network configuration field name",
        "{err}"
    );
    assert!(
        err["details"].as_str().unwrap().contains("labelsToApply"),
        "{err}"
    );
    for prefix in [
        "/calico/ipam/v2/handle/",
        "/calico/resources/v3/projectcalico.org/workloadendpoints/",
        PROFILES,
    ] {
        assert_eq!(
            etcd.etcdctl(&["get", "--prefix", prefix, "--keys-only"])
                .trim(),
            "",
            "{prefix}"
        );
    }
    let blocks = etcd.etcdctl(&[
        "get",
        "--prefix",
        "/calico/ipam/v2/assignment/",
        "--print-value-only",
    ]);
    assert!(!blocks.contains("badprof"), "{blocks}");
    assert!(!sh(&host, "ip link").contains("cali"), "no interface left");
    assert!(
        !sh(&pod, "ip link").contains("eth0"),
        "no pod interface left"
    );
}
