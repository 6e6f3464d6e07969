//! Carries out the core's decisions (`felix::core`) against the kernel: a full pass over
//! every part of the dataplane, a repair of what kernel events touched, and BGP's route
//! changes. Holds what only the executor needs between passes: the netlink handle and
//! route writer, our nftables tables (policy and NAT) as last written, a removal of `vxlan.calico` under way, the MTU
//! file, and the route-table statistics behind the metrics. Each part calls the
//! reconcilers (`routes`, `neigh`, `tunnels`, `nft` for policy and NAT, `sysctls`) and runs even when
//! another failed; the problems go back to the core.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use rtnetlink::Handle;

use super::core::{Pass, Repair};
use super::metrics::{FelixMetrics, RouteTableStats};
use super::nft::PolicyTables;
use super::policy::{Delta, PolicyDataplane};
use super::problem::Problem;
use super::routes::{self, Change};
use super::{neigh, sysctls, tunnels};
use crate::netlink::Writer;

/// The dataplane executor; see the module documentation.
pub struct Dataplane {
    handle: Handle,
    writer: Writer,
    metrics: FelixMetrics,
    mtu_file: Option<PathBuf>,
    /// Our nftables tables (policy and NAT) as last written.
    tables: PolicyTables,
    vxlan_removal: Option<tunnels::PendingRemoval>,
    table_stats: RouteTableStats,
}

/// A reconciler's pass: its failures, or the netlink request that failed as a whole.
fn reported<F: Into<Problem>, E: Into<Problem>>(r: Result<Vec<F>, E>) -> Vec<Problem> {
    match r {
        Ok(failures) => failures.into_iter().map(Into::into).collect(),
        Err(e) => vec![e.into()],
    }
}

fn log(problems: &[Problem], what: &str) {
    for p in problems {
        tracing::warn!(problem = %p, "{what}");
    }
}

impl Dataplane {
    pub fn new(
        handle: Handle,
        writer: Writer,
        metrics: FelixMetrics,
        mtu_file: Option<PathBuf>,
    ) -> Dataplane {
        Dataplane {
            handle,
            writer,
            metrics,
            mtu_file,
            tables: PolicyTables::new(),
            vxlan_removal: None,
            table_stats: RouteTableStats::default(),
        }
    }

    /// Make the policy dataplane `dp`, writing only what `delta` says changed (all of it
    /// when `delta.full`, or when the tables are not known to be right), in one nft
    /// transaction. The problems met (at most one: the transaction is all or nothing).
    pub async fn apply_policy(&mut self, dp: &Arc<PolicyDataplane>, delta: &Delta) -> Vec<Problem> {
        let started = Instant::now();
        let tables = &mut self.tables;
        let r = blocking(|| tables.apply(dp, delta));
        if r.is_ok() {
            self.tables.written(dp);
        }
        self.metrics
            .apply_time
            .observe(started.elapsed().as_secs_f64());
        self.metrics.set_nft(&self.tables.stats);
        match r {
            Ok(()) => Vec::new(),
            Err(e) => {
                let problems = vec![Problem::from(e)];
                log(&problems, "policy dataplane");
                problems
            }
        }
    }

    /// One pass over every part of the dataplane; the problems met (each part runs
    /// anyway), and the uplink used.
    /// The host's interface addresses by interface name.
    pub async fn host_addresses(
        &self,
    ) -> Result<
        std::collections::BTreeMap<String, Vec<std::net::IpAddr>>,
        crate::netlink::NetlinkError,
    > {
        crate::netlink::links::addresses(&self.handle).await
    }

    pub async fn full_pass(&mut self, pass: &Pass) -> (Vec<Problem>, Option<u32>) {
        let started = Instant::now();
        let (problems, uplink) = self.apply(pass).await;
        self.metrics
            .apply_time
            .observe(started.elapsed().as_secs_f64());
        self.table_stats = RouteTableStats::of(&pass.desired.routes);
        self.metrics.set_route_table(&self.table_stats);
        (problems, uplink)
    }

    async fn apply(&mut self, pass: &Pass) -> (Vec<Problem>, Option<u32>) {
        let h = &self.handle;
        let desired = &*pass.desired;
        let mut problems: Vec<Problem> = desired
            .problems
            .iter()
            .cloned()
            .map(Problem::Calc)
            .collect();
        let uplink = match pass.node_ip {
            Some(ip) => routes::interface_with(h, ip.into()).await.ok().flatten(),
            None => None,
        };
        let host_mtu = match uplink {
            Some(i) => routes::mtu_of(h, i).await.unwrap_or(1500),
            None => 1500,
        };
        let vxlan_mtu = pass.vxlan_mtu.unwrap_or(host_mtu.saturating_sub(50));
        let ipip_mtu = pass.ipip_mtu.unwrap_or(host_mtu.saturating_sub(20));
        // The pods' MTU, for the CNI plugin: the tunnel's when there is one.
        let pod_mtu = if desired.vxlan.is_some() {
            vxlan_mtu
        } else if desired.ipip.is_some() {
            ipip_mtu
        } else {
            host_mtu
        };
        if let Some(f) = &self.mtu_file
            && let Err(error) = write_if_changed(f, &format!("{pod_mtu}\n"))
        {
            problems.push(Problem::MtuFile {
                path: f.clone(),
                error,
            });
        }
        // A VXLAN device no longer wanted goes after the routes, without waiting for the
        // kernel to finish (see `tunnels::remove_vxlan`); one wanted again waits for that.
        if desired.vxlan.is_some() {
            if let Err(e) = tunnels::removal_done(&mut self.vxlan_removal).await {
                problems.push(e.into());
            }
            if let Err(e) =
                tunnels::ensure_vxlan(h, desired.vxlan.as_ref(), uplink, vxlan_mtu).await
            {
                problems.push(e.into());
            }
        }
        if let Err(e) = tunnels::ensure_ipip(h, desired.ipip.as_ref(), ipip_mtu).await {
            problems.push(e.into());
        }
        // Policy and NAT first, one transaction (our tables replaced, drift repaired,
        // unless they are known untouched: then what changed): a workload's route comes
        // after its policy, so no packet reaches it unpoliced.
        let tables = &mut self.tables;
        let r = blocking(|| {
            tables.ensure_full(
                &pass.policy,
                &pass.policy_delta,
                &desired.nat,
                &pass.prefix,
                Instant::now(),
                pass.refresh,
            )
        });
        match r {
            Ok(true) => self.metrics.set_nat(&desired.nat),
            Ok(false) => {}
            Err(e) => problems.push(e.into()),
        }
        self.metrics.set_nft(&self.tables.stats);
        let started = Instant::now();
        let scope = (pass.prefix.as_str(), uplink);
        let r = routes::reconcile(h, &self.writer, &desired.routes, scope, &pass.keep, None);
        problems.extend(reported(r.await.map(|p| p.failures)));
        self.metrics
            .route_resync_time
            .observe(started.elapsed().as_secs_f64());
        let r = neigh::reconcile(h, &desired.neighbours, &desired.fdb, &pass.prefix).await;
        problems.extend(reported(r.map(|p| p.failures).map_err(Problem::Neighbours)));
        if desired.vxlan.is_none()
            && let Err(e) = tunnels::remove_vxlan(h, &mut self.vxlan_removal).await
        {
            problems.push(e.into());
        }
        problems.extend(sysctls::ensure(&pass.prefix));
        log(&problems, "dataplane");
        (problems, uplink)
    }

    /// Repair what kernel events touched, against the last full pass's desired state: the
    /// routes of each scope and, for workload interfaces, their sysctls and the neighbour
    /// entries. The problems met.
    pub async fn repair(&mut self, r: &Repair) -> Vec<Problem> {
        let started = Instant::now();
        let h = &self.handle;
        let mut problems = Vec::new();
        for only in &r.scopes {
            let began = Instant::now();
            let scope = (r.prefix.as_str(), r.uplink);
            let pass = routes::reconcile(h, &self.writer, &r.desired.routes, scope, &r.keep, *only);
            problems.extend(reported(pass.await.map(|p| p.failures)));
            let took = began.elapsed().as_secs_f64();
            match only {
                Some(_) => self.metrics.partial_resync_time.observe(took),
                None => self.metrics.route_resync_time.observe(took),
            }
        }
        for name in &r.workloads {
            problems.extend(sysctls::ensure_interface(name));
        }
        if !r.workloads.is_empty() {
            let d = &r.desired;
            let pass = neigh::reconcile(h, &d.neighbours, &d.fdb, &r.prefix).await;
            problems.extend(reported(
                pass.map(|p| p.failures).map_err(Problem::Neighbours),
            ));
        }
        log(&problems, "dataplane repair");
        self.metrics
            .apply_time
            .observe(started.elapsed().as_secs_f64());
        problems
    }

    /// Queue BGP's route changes on the writer (the kernel's refusals come later, on the
    /// writer's failure channel); the problems met.
    pub async fn apply_changes(&mut self, changes: &[Change], uplink: Option<u32>) -> Vec<Problem> {
        let started = Instant::now();
        for c in changes {
            self.table_stats.change(c);
        }
        let r = routes::apply_changes(&self.handle, &self.writer, changes, uplink).await;
        let problems = reported(r.map(|p| p.failures));
        self.metrics
            .apply_time
            .observe(started.elapsed().as_secs_f64());
        self.metrics.set_route_table(&self.table_stats);
        log(&problems, "dataplane");
        problems
    }
}

/// Run `f`, which blocks (nft, ~1 s for a full write with 1,000 endpoints), telling a
/// multi-threaded runtime so that its other tasks move to other workers. `f` runs on
/// this very thread, so in this thread's network namespace.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

/// Replace a small file atomically, only when its content differs.
fn write_if_changed(path: &std::path::Path, content: &str) -> std::io::Result<()> {
    if std::fs::read_to_string(path).is_ok_and(|c| c == content) {
        return Ok(());
    }
    crate::state_file::write_atomic(path, content.as_bytes())
}
