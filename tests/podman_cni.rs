//! podman as a real CNI client of the `calico` plugin: `podman run --network <ours>` gets a
//! pod interface with its Calico address and routes, and removing the container releases
//! the address and the WorkloadEndpoint. podman runs inside a node namespace made by the
//! test (nsenter --net), so nothing lands in the machine's own namespace.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Etcd, NetNs, free_port, have, skip};

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A busybox image imported from a rootfs (no registry needed).
fn busybox_image(dir: &Path, podman: &dyn Fn() -> Command) {
    let root = dir.join("rootfs");
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
    let applets = run_ok(Command::new("/bin/busybox").arg("--list"));
    for a in applets.lines().filter(|a| *a != "busybox") {
        let _ = std::os::unix::fs::symlink("busybox", root.join("bin").join(a));
    }
    run_ok(
        Command::new("tar")
            .arg("-C")
            .arg(&root)
            .args(["-cf"])
            .arg(dir.join("rootfs.tar"))
            .arg("."),
    );
    run_ok(
        podman()
            .args(["import", "--change", "CMD [\"/bin/sh\"]"])
            .arg(dir.join("rootfs.tar"))
            .arg("localhost/busybox:test"),
    );
}

/// podman, runc, nsenter and busybox-static are there (else a loud skip).
fn have_podman() -> bool {
    for tool in ["podman", "runc", "nsenter", "/bin/busybox"] {
        if !have(tool) && !Path::new(tool).exists() {
            skip(&format!(
                "{tool} is not installed (scripts/test installs podman, runc, busybox-static)"
            ));
            return false;
        }
    }
    true
}

/// podman configured as TESTING.md says, all its state in a temp dir: our plugins first in
/// its plugin path, one conflist per network (each the `calico` plugin on `etcd` as node
/// `node-1`), run inside the node namespace with `nsenter --net` (so pods' host sides land
/// there), and a busybox image imported from a rootfs.
struct Podman {
    dir: tempfile::TempDir,
    ns_path: String,
}

impl Podman {
    fn new(node: &NetNs, etcd: &str, networks: &[&str]) -> Podman {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let bin_dir = Path::new(env!("CARGO_BIN_EXE_calico")).parent().unwrap();
        std::fs::create_dir_all(d.join("net.d")).unwrap();
        std::fs::create_dir_all(d.join("tmp")).unwrap();
        for net in networks {
            std::fs::write(
                d.join(format!("net.d/10-{net}.conflist")),
                serde_json::json!({"name": net, "cniVersion": "1.0.0", "plugins": [{
                    "type": "calico", "log_level": "info", "log_file_path": d.join("cni.log"),
                    "datastore_type": "etcdv3", "etcd_endpoints": etcd, "nodename": "node-1",
                    "mtu": 1400, "ipam": {"type": "calico-ipam"}}]})
                .to_string(),
            )
            .unwrap();
        }
        std::fs::write(
            d.join("containers.conf"),
            format!(
                "[containers]\ndefault_ulimits = [\"nofile=20000:20000\", \"nproc=32768:32768\"]\n[engine]\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\nruntime = \"runc\"\ntmp_dir = \"{}\"\n[network]\nnetwork_backend = \"cni\"\ncni_plugin_dirs = [\"{}\", \"/usr/lib/cni\"]\nnetwork_config_dir = \"{}\"\n",
                d.join("tmp").display(),
                bin_dir.display(),
                d.join("net.d").display()
            ),
        )
        .unwrap();
        std::fs::write(
            d.join("storage.conf"),
            format!(
                "[storage]\ndriver = \"overlay\"\ngraphroot = \"{}\"\nrunroot = \"{}\"\n",
                d.join("graph").display(),
                d.join("run").display()
            ),
        )
        .unwrap();
        let podman = Podman {
            dir,
            ns_path: format!("/run/netns/{}", node.name),
        };
        busybox_image(podman.dir.path(), &|| podman.cmd());
        podman
    }

    /// `podman` inside the node namespace with this configuration.
    fn cmd(&self) -> Command {
        let d = self.dir.path();
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", self.ns_path))
            .arg("podman")
            .env("CONTAINERS_CONF", d.join("containers.conf"))
            .env("CONTAINERS_STORAGE_CONF", d.join("storage.conf"));
        c
    }

    /// The CNI plugin's log (for failure messages).
    fn cni_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("cni.log")).unwrap_or_default()
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let _ = self
            .cmd()
            .args(["rmi", "-f", "localhost/busybox:test"])
            .output();
    }
}

/// Containers a test started, removed (`podman rm -f`, which runs CNI DEL) when dropped,
/// also when an assertion fails.
struct Containers<'a>(&'a Podman, Vec<String>);

impl Containers<'_> {
    /// `podman run -d --name <name> --network <network> busybox sh -c <script>`.
    fn run(&mut self, name: &str, network: &str, script: &str) {
        self.1.push(name.to_string());
        run_ok(self.0.cmd().args([
            "run",
            "-d",
            "--name",
            name,
            "--network",
            network,
            "localhost/busybox:test",
            "sh",
            "-c",
            script,
        ]));
    }

    /// `podman exec <name> sh -c <script>`: success and stdout + stderr.
    fn exec(&self, name: &str, script: &str) -> (bool, String) {
        let out = self
            .0
            .cmd()
            .args(["exec", name, "sh", "-c", script])
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    }

    /// The container's IPv4 address on eth0.
    fn addr(&self, name: &str) -> String {
        let (ok, out) = self.exec(name, "ip -o -4 addr show eth0");
        assert!(ok, "{out}");
        let cidr = out
            .split_whitespace()
            .nth(3)
            .unwrap_or_else(|| panic!("no address on {name}: {out}"));
        cidr.trim_end_matches("/32").to_string()
    }
}

impl Drop for Containers<'_> {
    fn drop(&mut self) {
        for name in self.1.iter().rev() {
            let _ = self.0.cmd().args(["rm", "-f", "-t", "0", name]).output();
        }
    }
}

#[test]
fn podman_run_gets_a_calico_address_and_removal_releases_it() {
    let Some(node) = NetNs::new("cn-podman") else {
        return;
    };
    if !have_podman() {
        return;
    }
    node.add_uplink();
    let Some(etcd) = Etcd::start_on(Some(&node.name), free_port()) else {
        return;
    };
    common::seed_in_netns(&node, etcd.endpoint(), "10.66.0.0/16");

    let podman = Podman::new(&node, &etcd.endpoint(), &["calico-test"]);
    let mut containers = Containers(&podman, Vec::new());
    containers.run("web", "calico-test", "sleep 120");
    let (ok, out) = containers.exec(
        "web",
        "ip -o addr show eth0; ip -o link show eth0; ip route; ping -c 1 -W 2 10.99.0.1",
    );
    assert!(ok, "{out}");
    let addr_line = out
        .lines()
        .find(|l| l.contains("inet "))
        .unwrap_or_else(|| panic!("no address: {out}"));
    let addr = addr_line.split_whitespace().nth(3).unwrap().to_string();
    assert!(addr.starts_with("10.66.") && addr.ends_with("/32"), "{out}");
    assert!(out.contains("default via 169.254.1.1 dev eth0"), "{out}");
    assert!(out.contains("169.254.1.1 dev eth0 scope link"), "{out}");
    assert!(out.contains("mtu 1400"), "the configured MTU: {out}");
    assert!(
        out.contains("1 packets received"),
        "the container reaches the node: {out}"
    );
    // While it runs, its WorkloadEndpoint (cni orchestrator: podman passes only the name).
    let weps = etcd.etcdctl(&[
        "get",
        "--prefix",
        "/calico/resources/v3/projectcalico.org/workloadendpoints/default/",
        "--print-value-only",
    ]);
    assert!(
        weps.contains(&format!("\"ipNetworks\":[\"{addr}\"]")),
        "{weps}"
    );
    assert!(weps.contains("\"orchestrator\":\"cni\""), "{weps}");
    assert!(
        weps.contains("\"profiles\":[\"calico-test\"]"),
        "the network's profile: {weps}"
    );
    assert!(
        etcd.etcdctl_value("/calico/resources/v3/projectcalico.org/profiles/calico-test")
            .contains("has(calico-test)"),
        "the plugin created the network's profile"
    );

    run_ok(podman.cmd().args(["rm", "-f", "-t", "0", "web"]));
    // Removal: podman called DEL; the address and the endpoint are gone.
    assert_eq!(
        etcd.etcdctl(&["get", "--prefix", "/calico/ipam/v2/handle/", "--keys-only"])
            .trim(),
        "",
        "handle released"
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
    let ip = addr.trim_end_matches("/32");
    assert!(
        !run_ok(Command::new("ip").args(["-n", &node.name, "route"])).contains(ip),
        "host route removed"
    );
}

/// A GlobalNetworkPolicy that denies TCP 8080 to the network's containers and passes
/// everything else on to their profile (Calico: Pass goes to the next tier, the profiles
/// after the last).
const DENY_8080: &str = "apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata:
  name: deny-8080
spec:
  selector: has(calico-test)
  types: [Ingress]
  ingress:
  - action: Deny
    protocol: TCP
    destination:
      ports: [8080]
  - action: Pass
";

/// Issue 17: policy enforced for podman containers, with calico-node (Felix) running in the
/// node namespace. Two containers on the calico network reach each other through the
/// network's profile (created by the plugin: ingress from `has(calico-test)`); a container
/// of another network does not reach them. A GlobalNetworkPolicy denying TCP 8080 between
/// them takes effect while 8081 and ping still pass; deleting it opens 8080 again.
#[test]
fn podman_containers_reach_each_other_through_the_profile_and_a_gnp_denies_one_port() {
    let Some(node) = NetNs::new("cn-podpol") else {
        return;
    };
    if !have_podman() || !have("nft") {
        skip("podman or nft missing");
        return;
    }
    node.add_uplink();
    let Some(etcd) = Etcd::start_on(Some(&node.name), free_port()) else {
        return;
    };
    let state = tempfile::tempdir().unwrap();
    let health = free_port();
    let _calico_node =
        common::cluster::calico_node(&node, "node-1", &etcd.endpoint(), state.path(), health, &[]);
    let log = || std::fs::read_to_string(state.path().join("calico-node.log")).unwrap_or_default();
    // calico-node creates the default pool and marks the datastore ready.
    common::wait_http(&node, health, "/readiness", 200, Duration::from_secs(60));

    let podman = Podman::new(&node, &etcd.endpoint(), &["calico-test", "other-net"]);
    let mut c = Containers(&podman, Vec::new());
    let serve = "mkdir -p /www && echo hello-from-web > /www/index.html \
                 && httpd -p 8080 -h /www && httpd -p 8081 -h /www && exec sleep 600";
    c.run("web", "calico-test", serve);
    c.run("cli", "calico-test", "exec sleep 600");
    c.run("stranger", "other-net", "exec sleep 600");
    let web = c.addr("web");
    let cli = c.addr("cli");
    let get = |port: u16| format!("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 2 {web} {port}");
    let ctx = || {
        let sh = |cmd: &str| {
            let out = node.command("sh").args(["-c", cmd]).output().unwrap();
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr)
        };
        format!(
            "\nweb {web}, cli {cli}; cli -> web:8080: {:?}\nnode: {}\ncalico-node log:\n{}\nCNI log:\n{}",
            c.exec("cli", &get(8080)),
            sh("ip route; ip -o link; sysctl net.ipv4.ip_forward; nft list ruleset"),
            log(),
            podman.cni_log()
        )
    };

    // What `from` gets from web's port: the page, or nothing within 2 s. (busybox nc, not
    // wget: a static busybox's wget crashes in a rootfs without NSS files.)
    let http = |from: &str, port: u16| {
        let (ok, out) = c.exec(from, &get(port));
        ok && out.contains("hello-from-web")
    };
    let ping = |from: &str, to: &str| c.exec(from, &format!("ping -c 1 -W 2 {to}")).0;
    let wait = |what: &str, f: &dyn Fn() -> bool| {
        let start = Instant::now();
        while !f() {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "timed out waiting for {what}{}",
                ctx()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    };

    // The profile: containers of the network reach each other (TCP both ports, ICMP both
    // ways), once Felix has programmed their endpoints.
    wait("cli reaching web on 8080", &|| http("cli", 8080));
    assert!(http("cli", 8081), "cli -> web:8081{}", ctx());
    assert!(ping("cli", &web), "cli -> web ping{}", ctx());
    assert!(ping("web", &cli), "web -> cli ping{}", ctx());
    // ... and nothing else by default: another network's container is not admitted.
    assert!(
        !http("stranger", 8081),
        "stranger -> web:8081 must be dropped{}",
        ctx()
    );
    assert!(
        !ping("stranger", &web),
        "stranger -> web ping must be dropped{}",
        ctx()
    );

    // The policy: TCP 8080 to the network's containers is denied, the rest passes on to
    // the profile.
    common::cluster::calicoctl(
        &node,
        &etcd.endpoint(),
        state.path(),
        &["apply", "-f", "-"],
        DENY_8080,
    );
    wait("the policy denying 8080", &|| !http("cli", 8080));
    assert!(http("cli", 8081), "8081 still passes{}", ctx());
    assert!(ping("cli", &web), "ping still passes{}", ctx());
    assert!(
        !http("stranger", 8081),
        "the profile still keeps strangers out{}",
        ctx()
    );
    // A denied connection stays denied (not a one-off).
    assert!(!http("cli", 8080), "8080 stays denied{}", ctx());

    // Deleting the policy restores the profile's behaviour.
    common::cluster::calicoctl(
        &node,
        &etcd.endpoint(),
        state.path(),
        &["delete", "globalnetworkpolicy", "deny-8080"],
        "",
    );
    wait("8080 open again", &|| http("cli", 8080));
    assert!(!http("stranger", 8081), "strangers still kept out{}", ctx());
}
