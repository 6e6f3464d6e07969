//! Graceful restart (RFC 4724) with BIRD as the helper: our speaker (a child process) is
//! killed with SIGKILL; BIRD keeps our route as stale, so a third peer (GoBGP, peering
//! only with BIRD) never sees it withdrawn; we come back, re-announce, and the route stays.
//! Our OPENs carry the Restart State and Forwarding State bits while we recover, and not
//! afterwards.

mod common;

use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use calico_node::bgp::config::{DesiredBgpConfig, DesiredPeer, PeerType};
use common::bgp::{bird, birdc, gobgp, gobgp_cli, pool_policy, wait_for};

const US: &str = "10.99.0.1";
const BIRD: &str = "10.99.0.2";
const GOBGP: &str = "10.99.0.3";

/// Not a test: the speaker process the test below starts and kills (run with
/// `--ignored --exact speaker_process`, the namespace in CALICO_TEST_SPEAKER_NETNS).
#[test]
#[ignore = "helper process for graceful_restart_keeps_our_routes_across_a_kill"]
fn speaker_process() {
    let ns = std::env::var("CALICO_TEST_SPEAKER_NETNS").expect("started by the GR test");
    let f = std::fs::File::open(format!("/run/netns/{ns}")).unwrap();
    nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
    let mut cfg = DesiredBgpConfig::new(US.parse().unwrap(), 64512);
    cfg.peers = vec![DesiredPeer::new(
        BIRD.parse().unwrap(),
        64512,
        PeerType::Global,
    )];
    cfg.export = vec!["10.244.1.0/26".parse().unwrap()];
    cfg.policy = pool_policy();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let (felix, mut routes) = tokio::sync::mpsc::channel(1000);
        let (status, _) = tokio::sync::watch::channel(Vec::new());
        let (_cfg_tx, cfg_rx) = tokio::sync::watch::channel(cfg.clone());
        let speaker = calico_node::bgp::speaker::Speaker::new(cfg, felix, status);
        tokio::spawn(async move { while routes.recv().await.is_some() {} });
        speaker
            .run(cfg_rx, tokio_util::sync::CancellationToken::new())
            .await
            .unwrap();
    });
}

fn start_speaker(ns: &common::NetNs) -> Child {
    std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--ignored", "--exact", "speaker_process", "--nocapture"])
        .env("CALICO_TEST_SPEAKER_NETNS", &ns.name)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

#[test]
fn graceful_restart_keeps_our_routes_across_a_kill() {
    let Some((us_ns, bird_ns, gobgp_ns)) = common::bgp::us_bird_gobgp_lan() else {
        return;
    };
    let conf = format!(
        r#"router id {BIRD};
protocol device {{ }}
protocol bgp calico {{
  local {BIRD} as 64512; neighbor {US} as 64512; direct;
  connect delay time 1; connect retry time 1; error wait time 1, 5;
  graceful restart on;
  ipv4 {{ import all; export none; }};
}}
protocol bgp observer {{
  local {BIRD} as 64512; neighbor {GOBGP} as 64512; direct; rr client;
  connect delay time 1; connect retry time 1; error wait time 1, 5;
  ipv4 {{ import all; export all; }};
}}
"#
    );
    let Some(b) = bird(&bird_ns, &conf) else {
        return;
    };
    let gconf = format!(
        "[global.config]\n  as = 64512\n  router-id = \"{GOBGP}\"\n  local-address-list = [\"{GOBGP}\"]\n[[neighbors]]\n  [neighbors.config]\n    neighbor-address = \"{BIRD}\"\n    peer-as = 64512\n  [neighbors.timers.config]\n    connect-retry = 1\n"
    );
    let Some(_g) = gobgp(&gobgp_ns, &gconf) else {
        return;
    };
    let at_gobgp = || gobgp_cli(&gobgp_ns, "global rib -a ipv4").contains("10.244.1.0/26");
    let mut child = start_speaker(&us_ns);
    wait_for(
        Duration::from_secs(30),
        "our route at GoBGP (via BIRD)",
        || at_gobgp().then_some(()),
    );

    // SIGKILL: no NOTIFICATION, the connection just drops.
    child.kill().unwrap();
    child.wait().unwrap();
    wait_for(Duration::from_secs(10), "BIRD to notice", || {
        (!birdc(&b, "show protocols calico").contains("Established")).then_some(())
    });
    let kept = birdc(&b, "show route all 10.244.1.0/26");
    assert!(
        kept.contains("10.244.1.0/26"),
        "BIRD keeps our route as stale: {kept}"
    );
    // Down for a while, then back: GoBGP must hold the route at every moment.
    let check_until = |until: Instant| {
        while Instant::now() < until {
            assert!(at_gobgp(), "GoBGP saw our route withdrawn");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    check_until(Instant::now() + Duration::from_secs(3));
    let mut child = start_speaker(&us_ns);
    let back = Instant::now();
    wait_for(Duration::from_secs(30), "the session to come back", || {
        assert!(
            at_gobgp(),
            "GoBGP saw our route withdrawn during the restart"
        );
        birdc(&b, "show protocols calico")
            .contains("Established")
            .then_some(())
    });
    // Restarting, our OPEN said so (R bit) and that forwarding was kept (F bit).
    let caps = neighbor_caps(&birdc(&b, "show protocols all calico"));
    assert!(
        caps.contains("Restart recovery") && caps.contains("AF preserved: ipv4"),
        "{caps}"
    );
    // After our End-of-RIB BIRD drops what is still stale: ours was refreshed, so it stays.
    check_until(Instant::now() + Duration::from_secs(3));
    let r = birdc(&b, "show route all 10.244.1.0/26");
    assert!(r.contains(&format!("via {US}")), "{r}");
    assert!(back.elapsed() < Duration::from_secs(60));

    // Our restart is over (BIRD's End-of-RIB came long ago): a new session's OPEN carries
    // neither bit, as BIRD's own do outside recovery.
    birdc(&b, "restart calico");
    wait_for(Duration::from_secs(30), "a new session", || {
        let all = birdc(&b, "show protocols all calico");
        (all.contains("Established") && !neighbor_caps(&all).is_empty()).then_some(all)
    });
    let caps = neighbor_caps(&birdc(&b, "show protocols all calico"));
    assert!(caps.contains("Graceful restart"), "{caps}");
    assert!(
        !caps.contains("Restart recovery") && !caps.contains("AF preserved: ipv4"),
        "{caps}"
    );
    child.kill().unwrap();
    child.wait().unwrap();
}

/// The "Neighbor capabilities" section of `show protocols all` (empty when absent).
fn neighbor_caps(all: &str) -> String {
    let Some(start) = all.find("Neighbor capabilities") else {
        return String::new();
    };
    all[start..]
        .lines()
        .skip(1)
        .take_while(|l| l.starts_with("      "))
        .collect::<Vec<_>>()
        .join("\n")
}
