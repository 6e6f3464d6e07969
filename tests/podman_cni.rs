//! podman as a real CNI client of the `calico` plugin: `podman run --network <ours>` gets a
//! pod interface with its Calico address and routes, and removing the container releases
//! the address and the WorkloadEndpoint. podman runs inside a node namespace made by the
//! test (nsenter --net), so nothing lands in the machine's own namespace.

mod common;

use std::path::Path;
use std::process::Command;

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

#[test]
fn podman_run_gets_a_calico_address_and_removal_releases_it() {
    let Some(node) = NetNs::new("cn-podman") else {
        return;
    };
    for tool in ["podman", "runc", "nsenter", "/bin/busybox"] {
        if !have(tool) && !Path::new(tool).exists() {
            skip(&format!(
                "{tool} is not installed (scripts/test installs podman, runc, busybox-static)"
            ));
            return;
        }
    }
    node.add_uplink();
    let Some(etcd) = Etcd::start_on(Some(&node.name), free_port()) else {
        return;
    };
    common::seed_in_netns(&node, etcd.endpoint(), "10.66.0.0/16");

    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_calico")).parent().unwrap();
    std::fs::create_dir_all(d.join("net.d")).unwrap();
    std::fs::write(
        d.join("net.d/10-calico.conflist"),
        serde_json::json!({"name": "calico-test", "cniVersion": "1.0.0", "plugins": [{
            "type": "calico", "log_level": "debug", "log_file_path": d.join("cni.log"),
            "datastore_type": "etcdv3", "etcd_endpoints": etcd.endpoint(), "nodename": "node-1",
            "mtu": 1400, "ipam": {"type": "calico-ipam"}}]})
        .to_string(),
    )
    .unwrap();
    std::fs::write(
        d.join("containers.conf"),
        format!(
            "[containers]\ndefault_ulimits = [\"nofile=20000:20000\", \"nproc=32768:32768\"]\n[engine]\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\nruntime = \"runc\"\n[network]\nnetwork_backend = \"cni\"\ncni_plugin_dirs = [\"{}\", \"/usr/lib/cni\"]\nnetwork_config_dir = \"{}\"\n",
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
    let ns_path = format!("/run/netns/{}", node.name);
    let podman = || {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={ns_path}"))
            .arg("podman")
            .env("CONTAINERS_CONF", d.join("containers.conf"))
            .env("CONTAINERS_STORAGE_CONF", d.join("storage.conf"));
        c
    };
    busybox_image(d, &podman);

    run_ok(podman().args([
        "run",
        "-d",
        "--name",
        "web",
        "--network",
        "calico-test",
        "localhost/busybox:test",
        "sleep",
        "120",
    ]));
    // Remove the container even if an assertion below fails.
    struct Container<'a>(&'a dyn Fn() -> Command);
    impl Drop for Container<'_> {
        fn drop(&mut self) {
            let _ = (self.0)().args(["rm", "-f", "-t", "0", "web"]).output();
        }
    }
    let _container = Container(&podman);
    let out = run_ok(podman().args([
        "exec",
        "web",
        "sh",
        "-c",
        "ip -o addr show eth0; ip -o link show eth0; ip route; ping -c 1 -W 2 10.99.0.1",
    ]));
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

    run_ok(podman().args(["rm", "-f", "-t", "0", "web"]));
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
    let _ = podman()
        .args(["rmi", "-f", "localhost/busybox:test"])
        .output();
}
