//! The Felix actor: folds the syncer's events and BGP's best routes into [`State`], and
//! once the datastore is in sync makes the kernel match the desired dataplane (tunnels,
//! routes, neighbours and FDB, NAT outgoing, workload sysctls). It applies again after
//! every change and every `routeRefreshInterval` (default 90 s). Shortly after link or
//! route events (so a route of ours deleted by another tool comes back within a second)
//! it repairs what they touched: a workload interface's routes, sysctls and neighbours, or
//! the routes through another interface; a full pass only when they touched something
//! else (another link, or notifications were lost).
//!
//! ```text
//! syncer --SyncerEvent--> felix <--Vec<RouteUpdate>-- bgp speaker
//!                           |
//!                       netlink, nft (this node's network namespace)
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus::{Histogram, HistogramOpts, IntGauge, IntGaugeVec, Registry};
use rtnetlink::Handle;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::FelixInput;
use super::calc::Desired;
use super::events::{Events, Touched};
use super::nlbatch::Writer;
use super::state::State;
use super::tunnels::TunnelError;
use super::{nat, neigh, routes, sysctls, tunnel_addr, tunnels};
use crate::bgp::RouteUpdate;
use crate::datastore::Datastore;
use crate::datastore::client::Client;
use crate::datastore::syncer::SyncerEvent;
use crate::health::{ActorResult, FaultInput, HealthReporter, next_fault};
use crate::ipam::Ipam;

/// Felix's Prometheus metrics (REFERENCE §5 names, Calico's help texts and labels).
#[derive(Clone)]
pub struct FelixMetrics {
    apply_time: Histogram,
    // Gauges that only grow: Calico's names, which lack the `_total` of counters.
    failures: IntGauge,
    resyncs: IntGauge,
    messages: IntGauge,
    /// 1 waiting for the datastore, 2 resync in progress, 3 in sync (Calico's values).
    resync_state: IntGauge,
    calc_time: Histogram,
    route_resync_time: Histogram,
    partial_resync_time: Histogram,
    routes: IntGaugeVec,
    ifaces: IntGaugeVec,
    local_endpoints: IntGauge,
    cluster_endpoints: IntGauge,
    hosts: IntGauge,
    ipsets: IntGaugeVec,
    rules: IntGaugeVec,
}

impl FelixMetrics {
    pub fn new(registry: &Registry) -> prometheus::Result<FelixMetrics> {
        let histogram =
            |name: &str, help: &str| Histogram::with_opts(HistogramOpts::new(name, help));
        let gauge_vec = |name: &str, help: &str, labels: &[&str]| {
            IntGaugeVec::new(prometheus::Opts::new(name, help), labels)
        };
        let m = FelixMetrics {
            apply_time: histogram(
                "felix_int_dataplane_apply_time_seconds",
                "Time in seconds that it took to apply a dataplane update.",
            )?,
            failures: IntGauge::new(
                "felix_int_dataplane_failures",
                "Number of times dataplane updates failed and will be retried.",
            )?,
            resyncs: IntGauge::new(
                "felix_resyncs_started",
                "Number of times Felix has started resyncing with the datastore.",
            )?,
            messages: IntGauge::new(
                "felix_int_dataplane_messages",
                "Number dataplane messages by type.",
            )?,
            resync_state: IntGauge::new("felix_resync_state", "Current datastore state.")?,
            calc_time: histogram(
                "felix_calc_graph_update_time_seconds",
                "Seconds to update calculation graph for each datastore OnUpdate call.",
            )?,
            route_resync_time: histogram(
                "felix_route_table_resync_seconds",
                "Time taken to list all the routes during a resync.",
            )?,
            partial_resync_time: histogram(
                "felix_route_table_partial_resync_seconds",
                "Time taken to resync the routes of a single interface.",
            )?,
            routes: gauge_vec(
                "felix_route_table_num_routes",
                "Number of routes that Felix is managing in the particular routing table.",
                &["table"],
            )?,
            ifaces: gauge_vec(
                "felix_route_table_num_ifaces",
                "Number of interfaces that Felix is monitoring for the particular routing table.",
                &["table"],
            )?,
            local_endpoints: IntGauge::new(
                "felix_active_local_endpoints",
                "Number of active endpoints on this host.",
            )?,
            cluster_endpoints: IntGauge::new(
                "felix_cluster_num_workload_endpoints",
                "Total number of workload endpoints cluster-wide.",
            )?,
            hosts: IntGauge::new(
                "felix_cluster_num_hosts",
                "Total number of hosts in the cluster.",
            )?,
            ipsets: gauge_vec(
                "felix_ipsets_calico",
                "Number of active Calico IP sets.",
                &["ip_version"],
            )?,
            rules: gauge_vec(
                "felix_iptables_rules",
                "Number of active iptables rules.",
                &["ip_version", "table"],
            )?,
        };
        m.resync_state.set(1);
        registry.register(Box::new(m.apply_time.clone()))?;
        registry.register(Box::new(m.failures.clone()))?;
        registry.register(Box::new(m.resyncs.clone()))?;
        registry.register(Box::new(m.messages.clone()))?;
        registry.register(Box::new(m.resync_state.clone()))?;
        registry.register(Box::new(m.calc_time.clone()))?;
        registry.register(Box::new(m.route_resync_time.clone()))?;
        registry.register(Box::new(m.partial_resync_time.clone()))?;
        registry.register(Box::new(m.routes.clone()))?;
        registry.register(Box::new(m.ifaces.clone()))?;
        registry.register(Box::new(m.local_endpoints.clone()))?;
        registry.register(Box::new(m.cluster_endpoints.clone()))?;
        registry.register(Box::new(m.hosts.clone()))?;
        registry.register(Box::new(m.ipsets.clone()))?;
        registry.register(Box::new(m.rules.clone()))?;
        Ok(m)
    }

    fn set_route_table(&self, t: &RouteTableStats) {
        for (i, table) in ["IPv4:254", "IPv6:254"].into_iter().enumerate() {
            self.routes.with_label_values(&[table]).set(t.routes[i]);
            self.ifaces
                .with_label_values(&[table])
                .set(t.ifaces[i].len() as i64);
        }
    }

    /// The NAT gauges for what was applied: per family, two sets and two rules when the
    /// family's table is programmed (see `nat::script`).
    fn set_nat(&self, nat: &super::calc::Nat) {
        for (v6, family, version) in [(false, "inet", "4"), (true, "inet6", "6")] {
            let present = !v6 || nat.all.iter().any(|n| n.addr().is_ipv6());
            let n = if present { 2 } else { 0 };
            self.ipsets.with_label_values(&[family]).set(n);
            self.rules.with_label_values(&[version, "nat"]).set(n);
        }
    }
}

/// What the route table gauges show: routes per family (IPv4, IPv6), and the interfaces
/// they go through (None: the uplink). Counted in full at each full pass, and kept up to
/// date by BGP's changes in between (an interface no longer used is dropped at the next
/// full pass).
#[derive(Default)]
struct RouteTableStats {
    routes: [i64; 2],
    ifaces: [Vec<Option<String>>; 2],
}

impl RouteTableStats {
    fn of(routes: &super::calc::RouteTable) -> RouteTableStats {
        let mut t = RouteTableStats::default();
        for (p, r) in routes {
            t.add(p, r);
        }
        t
    }

    fn family(p: &ipnet::IpNet) -> usize {
        usize::from(p.addr().is_ipv6())
    }

    fn add(&mut self, p: &ipnet::IpNet, r: &super::calc::Route) {
        use super::calc::{Dev, Target};
        let f = Self::family(p);
        self.routes[f] += 1;
        let dev = match &r.target {
            Target::Link(dev)
            | Target::Via {
                dev: Dev::Named(dev),
                ..
            } => Some(dev.as_str()),
            Target::Via {
                dev: Dev::Uplink, ..
            } => None,
            Target::Blackhole => return,
        };
        // A handful of interfaces: a scan, and no allocation per route.
        if !self.ifaces[f].iter().any(|d| d.as_deref() == dev) {
            self.ifaces[f].push(dev.map(str::to_string));
        }
    }

    fn change(&mut self, (p, old, new): &routes::Change) {
        if old.is_some() {
            self.routes[Self::family(p)] -= 1;
        }
        if let Some(r) = new {
            self.add(p, r);
        }
    }
}

/// How long to wait after a kernel event before applying (events come in bursts, our own
/// changes among them).
const EVENT_DEBOUNCE: Duration = Duration::from_millis(100);

/// Who Felix runs for, and where it writes.
pub struct Config {
    pub node: String,
    /// For this node's tunnel addresses (IPAM and the Node); None: not managed.
    pub datastore: Option<Arc<dyn Datastore>>,
    /// Where the pods' MTU is written for the CNI plugin.
    pub mtu_file: Option<std::path::PathBuf>,
    /// A test's failures, acted out in Felix's loop; `None` in production.
    pub faults: FaultInput,
}

/// Run Felix until cancelled (then `Ok`); an `Err` says why it ended before.
pub async fn run(
    cfg: Config,
    mut datastore: mpsc::Receiver<SyncerEvent>,
    mut bgp: mpsc::Receiver<Vec<RouteUpdate>>,
    metrics: FelixMetrics,
    health: HealthReporter,
    cancel: CancellationToken,
) -> ActorResult {
    health.set_ready(false, Some("waiting for the datastore".into()));
    // Requests on one socket, notifications on another (see `events`).
    let (conn, handle, _) = match rtnetlink::new_connection() {
        Ok(c) => c,
        Err(e) => {
            let why = format!("cannot open netlink: {e}");
            health.set_ready(false, Some(why.clone()));
            return Err(why);
        }
    };
    tokio::spawn(conn);
    let (writer, mut writer_failures) = match Writer::spawn() {
        Ok(w) => w,
        Err(e) => {
            let why = format!("cannot open netlink: {e}");
            health.set_ready(false, Some(why.clone()));
            return Err(why);
        }
    };
    let mut events = match Events::open() {
        Ok(e) => Some(e),
        Err(e) => {
            tracing::warn!(error = %e, "no netlink events; repairs wait for the periodic resync");
            None
        }
    };
    let Config {
        node,
        datastore: ds,
        mtu_file,
        mut faults,
    } = cfg;
    let mut state = State::new(&node);
    // A full pass (every part, the kernel's tables read back) is due; else only BGP's
    // changes are applied, straight to the kernel.
    let mut full = false;
    let mut due: Option<tokio::time::Instant> = None;
    let mut last_nat = None;
    let mut next_resync = tokio::time::Instant::now() + state.config().route_refresh_interval();
    let mut warned_ipip = false;
    // A removal of vxlan.calico under way.
    let mut vxlan_removal = None;
    let mut bgp_open = true;
    // What the last full pass programmed (its routes kept up to date by BGP's changes), and
    // the uplink it used.
    let mut last: Option<(Desired, Option<u32>)> = None;
    // What kernel events touched since the last pass, repaired when `due`.
    let mut touched = Touched::default();
    let mut repair = false;
    let mut table_stats = RouteTableStats::default();
    loop {
        let wake = due.map_or(next_resync, |d| d.min(next_resync));
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            fault = next_fault(&mut faults) => return Err(fault.strike()),
            ev = datastore.recv() => match ev {
                Some(ev) => {
                    full |= fold(&mut state, &metrics, ev);
                    // The first time in sync: apply even if nothing changed.
                    if state.datastore_in_sync && last.is_none() {
                        full = true;
                    }
                }
                None => return Err("its datastore feed closed".into()),
            },
            batch = bgp.recv(), if bgp_open => match batch {
                Some(batch) => for u in batch {
                    metrics.messages.inc();
                    // BGP's "in sync" lets routes kept for it go: a full pass.
                    full |= matches!(u, RouteUpdate::InSync) & state.apply(&FelixInput::Bgp(u));
                },
                // No speaker (yet): only the datastore drives the dataplane.
                None => bgp_open = false,
            },
            Some(failure) = writer_failures.recv() => {
                // A queued change the kernel refused: say so, read the kernel back soon.
                tracing::warn!(problem = %failure, "dataplane");
                metrics.failures.inc();
                health.set_ready(false, Some(failure.to_string()));
                touched.unknown = true;
                due.get_or_insert(tokio::time::Instant::now() + EVENT_DEBOUNCE);
            }
            r = next_event(&mut events) => {
                match r {
                    Ok(t) => touched.merge(t),
                    Err(e) => {
                        tracing::warn!(error = %e, "netlink events failed; repairs wait for the periodic resync");
                        events = None;
                        touched.unknown = true;
                    }
                }
                due.get_or_insert(tokio::time::Instant::now() + EVENT_DEBOUNCE);
            }
            _ = tokio::time::sleep_until(wake) => {
                if tokio::time::Instant::now() >= next_resync {
                    next_resync = tokio::time::Instant::now() + state.config().route_refresh_interval();
                    full = true;
                }
                if due.is_some_and(|d| d <= tokio::time::Instant::now()) {
                    due = None;
                    // Links other than workload interfaces (the uplink, the tunnels) are
                    // settings of the whole pass.
                    let cfg = state.config();
                    let prefix = cfg.interface_prefix();
                    let other_link = touched
                        .links
                        .values()
                        .any(|n| !n.as_deref().is_some_and(|n| n.starts_with(prefix)));
                    if touched.unknown || other_link {
                        full = true;
                    } else {
                        repair = true;
                    }
                }
            }
        }
        if !state.datastore_in_sync {
            continue;
        }
        // Drain what is already queued before computing.
        while let Ok(ev) = datastore.try_recv() {
            full |= fold(&mut state, &metrics, ev);
        }
        if !full && state.bgp_pending() {
            if let Some((desired, uplink)) = &mut last {
                let started = Instant::now();
                let changes = state.bgp_changes(&mut desired.routes);
                if changes.is_empty() {
                    continue;
                }
                for c in &changes {
                    table_stats.change(c);
                }
                let problems =
                    match routes::apply_changes(&handle, &writer, &changes, *uplink).await {
                        Ok(p) => p.failures.iter().map(ToString::to_string).collect(),
                        Err(e) => vec![e.to_string()],
                    };
                metrics.apply_time.observe(started.elapsed().as_secs_f64());
                metrics.set_route_table(&table_stats);
                if !problems.is_empty() {
                    for p in &problems {
                        tracing::warn!(problem = %p, "dataplane");
                    }
                    metrics.failures.inc();
                    health.set_ready(false, Some(problems.join("; ")));
                    // Read the kernel back and retry everything soon.
                    touched.unknown = true;
                    due.get_or_insert(tokio::time::Instant::now() + EVENT_DEBOUNCE);
                }
                continue;
            }
            full = true;
        }
        if repair && !full {
            repair = false;
            if let Some((desired, uplink)) = &last {
                let started = Instant::now();
                let t = std::mem::take(&mut touched);
                let problems = repair_touched(
                    (&handle, &writer),
                    &state,
                    desired,
                    *uplink,
                    bgp_open,
                    &t,
                    &metrics,
                )
                .await;
                metrics.apply_time.observe(started.elapsed().as_secs_f64());
                if !problems.is_empty() {
                    metrics.failures.inc();
                    health.set_ready(false, Some(problems.join("; ")));
                    // A full pass soon: it retries, and says when all is well again.
                    touched.unknown = true;
                    due.get_or_insert(tokio::time::Instant::now() + EVENT_DEBOUNCE);
                }
                continue;
            }
            full = true;
        }
        if !full {
            continue;
        }
        full = false;
        repair = false;
        touched = Touched::default();
        let started = Instant::now();
        // Tunnel addresses alongside the dataplane pass, in a task of their own: the other
        // nodes route to this node's VXLAN endpoint only once its Node carries the
        // address, so the allocation's etcd round trips wait neither for this node's
        // programming (nor its blocking parts: sysctls, nft) nor the other way round. The
        // Node update comes back through the syncer and into the next pass.
        let desired = state.desired();
        let keep = kept(&state, bgp_open);
        let tunnels = ds.clone().map(|ds| {
            let node = state.node().to_string();
            let pools: Vec<_> = state.pools().cloned().collect();
            tokio::spawn(async move {
                let (client, ipam) = (Client::new(ds.clone()), Ipam::new(ds));
                tunnel_addr::reconcile(&client, &ipam, &node, pools.iter()).await
            })
        });
        let (mut problems, uplink) = apply(
            (&handle, &writer),
            &metrics,
            &state,
            &desired,
            &keep,
            &mut last_nat,
            &mut warned_ipip,
            &mut vxlan_removal,
            mtu_file.as_deref(),
        )
        .await;
        let tunnel_problem = match tunnels {
            None => None,
            Some(t) => match t.await {
                Ok(Ok(changes)) => {
                    for c in changes {
                        tracing::info!("{c}");
                    }
                    None
                }
                Ok(Err(e)) => Some(format!("tunnel addresses: {e}")),
                Err(e) => Some(format!("tunnel addresses: {e}")),
            },
        };
        problems.extend(tunnel_problem);
        metrics.apply_time.observe(started.elapsed().as_secs_f64());
        table_stats = RouteTableStats::of(&desired.routes);
        metrics.set_route_table(&table_stats);
        if problems.is_empty() {
            health.set_ready(true, None);
        } else {
            metrics.failures.inc();
            health.set_ready(false, Some(problems.join("; ")));
        }
        last = Some((desired, uplink));
    }
}

/// Fold a datastore event into `state` (timed; status changes shown): whether it can
/// change the desired dataplane.
fn fold(state: &mut State, metrics: &FelixMetrics, ev: SyncerEvent) -> bool {
    use crate::datastore::syncer::SyncStatus;
    metrics.messages.inc();
    match &ev {
        SyncerEvent::Status(SyncStatus::ResyncInProgress) => {
            metrics.resyncs.inc();
            metrics.resync_state.set(2);
        }
        SyncerEvent::Status(SyncStatus::InSync) => metrics.resync_state.set(3),
        SyncerEvent::Update(_) => {}
    }
    let started = Instant::now();
    let changed = state.apply(&FelixInput::Datastore(ev));
    metrics.calc_time.observe(started.elapsed().as_secs_f64());
    let (eps, all_eps, hosts) = state.counts();
    metrics.local_endpoints.set(eps as i64);
    metrics.cluster_endpoints.set(all_eps as i64);
    metrics.hosts.set(hosts as i64);
    changed
}

/// Until the speaker has delivered its table, BGP's routes in the kernel stay.
fn kept(state: &State, bgp_open: bool) -> Vec<ipnet::IpNet> {
    if bgp_open && !state.bgp_in_sync {
        state.bgp_routed_pools()
    } else {
        Vec::new()
    }
}

/// Repair what kernel events touched, against the last full pass's desired state: the
/// routes through each touched interface (the whole table's when interface-less routes
/// changed) and, for workload interfaces, their sysctls and the neighbour entries. The
/// problems met.
async fn repair_touched(
    (h, writer): (&Handle, &Writer),
    state: &State,
    desired: &Desired,
    uplink: Option<u32>,
    bgp_open: bool,
    t: &Touched,
    metrics: &FelixMetrics,
) -> Vec<String> {
    let prefix = state.config().interface_prefix().to_string();
    let keep = kept(state, bgp_open);
    let mut problems = Vec::new();
    let scopes: Vec<Option<u32>> = if t.routes {
        vec![None]
    } else {
        t.route_ifaces
            .iter()
            .chain(t.links.keys())
            .copied()
            .collect::<std::collections::BTreeSet<u32>>()
            .into_iter()
            .map(Some)
            .collect()
    };
    for only in scopes {
        let started = Instant::now();
        match routes::reconcile(h, writer, &desired.routes, (&prefix, uplink), &keep, only).await {
            Ok(p) => problems.extend(p.failures.iter().map(ToString::to_string)),
            Err(e) => problems.push(e.to_string()),
        }
        let took = started.elapsed().as_secs_f64();
        match only {
            Some(_) => metrics.partial_resync_time.observe(took),
            None => metrics.route_resync_time.observe(took),
        }
    }
    let workloads: Vec<&str> = t.links.values().flatten().map(String::as_str).collect();
    for name in &workloads {
        problems.extend(
            sysctls::ensure_interface(name)
                .iter()
                .map(|p| p.to_string()),
        );
    }
    if !workloads.is_empty() {
        match neigh::reconcile(h, &desired.neighbours, &desired.fdb, &prefix).await {
            Ok(p) => problems.extend(p.failures.iter().map(|p| p.to_string())),
            Err(e) => problems.push(e.to_string()),
        }
    }
    for p in &problems {
        tracing::warn!(problem = %p, "dataplane repair");
    }
    problems
}

async fn next_event(events: &mut Option<Events>) -> std::io::Result<Touched> {
    match events {
        Some(e) => e.next().await,
        None => std::future::pending().await,
    }
}

/// One pass over every part of the dataplane; the problems met (each part runs anyway).
#[allow(clippy::too_many_arguments)]
async fn apply(
    (h, writer): (&Handle, &Writer),
    metrics: &FelixMetrics,
    state: &State,
    desired: &Desired,
    keep: &[ipnet::IpNet],
    last_nat: &mut Option<super::calc::Nat>,
    warned_ipip: &mut bool,
    vxlan_removal: &mut Option<tunnels::PendingRemoval>,
    mtu_file: Option<&std::path::Path>,
) -> (Vec<String>, Option<u32>) {
    let mut problems: Vec<String> = desired.problems.iter().map(|p| p.to_string()).collect();
    let prefix = state.config().interface_prefix().to_string();
    let node_ip = desired
        .vxlan
        .as_ref()
        .and_then(|v| v.local)
        .or_else(|| state.node_ipv4());
    let uplink = match node_ip {
        Some(ip) => routes::interface_with(h, ip.into()).await.ok().flatten(),
        None => None,
    };
    let host_mtu = match uplink {
        Some(i) => routes::mtu_of(h, i).await.unwrap_or(1500),
        None => 1500,
    };
    let cfg = state.config();
    let vxlan_mtu = cfg.vxlan_mtu.unwrap_or(host_mtu.saturating_sub(50));
    let ipip_mtu = cfg.ipip_mtu.unwrap_or(host_mtu.saturating_sub(20));
    // The pods' MTU, for the CNI plugin: the tunnel's when there is one.
    let pod_mtu = if desired.vxlan.is_some() {
        vxlan_mtu
    } else if desired.ipip.is_some() {
        ipip_mtu
    } else {
        host_mtu
    };
    if let Some(f) = mtu_file
        && let Err(e) = write_if_changed(f, &format!("{pod_mtu}\n"))
    {
        problems.push(format!("{}: {e}", f.display()));
    }
    // A VXLAN device no longer wanted goes after the routes, without waiting for the
    // kernel to finish (see `tunnels::remove_vxlan`); one wanted again waits for that.
    if desired.vxlan.is_some() {
        if let Err(e) = tunnels::removal_done(vxlan_removal).await {
            problems.push(e.to_string());
        }
        if let Err(e) = tunnels::ensure_vxlan(h, desired.vxlan.as_ref(), uplink, vxlan_mtu).await {
            problems.push(e.to_string());
        }
    }
    match tunnels::ensure_ipip(h, desired.ipip.as_ref(), ipip_mtu).await {
        Err(e @ TunnelError::NoIpip(_)) => {
            if !*warned_ipip {
                tracing::error!("{e}");
                *warned_ipip = true;
            }
            problems.push(e.to_string());
        }
        Err(e) => problems.push(e.to_string()),
        Ok(_) => {}
    }
    let started = Instant::now();
    match routes::reconcile(h, writer, &desired.routes, (&prefix, uplink), keep, None).await {
        Ok(p) => problems.extend(p.failures.iter().map(ToString::to_string)),
        Err(e) => problems.push(e.to_string()),
    }
    metrics
        .route_resync_time
        .observe(started.elapsed().as_secs_f64());
    match neigh::reconcile(h, &desired.neighbours, &desired.fdb, &prefix).await {
        Ok(p) => problems.extend(p.failures.iter().map(|p| p.to_string())),
        Err(e) => problems.push(e.to_string()),
    }
    if desired.vxlan.is_none()
        && let Err(e) = tunnels::remove_vxlan(h, vxlan_removal).await
    {
        problems.push(e.to_string());
    }
    if last_nat.as_ref() != Some(&desired.nat) {
        match nat::apply(&desired.nat) {
            Ok(()) => {
                metrics.set_nat(&desired.nat);
                *last_nat = Some(desired.nat.clone());
            }
            Err(e) => problems.push(e.to_string()),
        }
    }
    problems.extend(sysctls::ensure(&prefix).iter().map(|p| p.to_string()));
    for p in &problems {
        tracing::warn!(problem = %p, "dataplane");
    }
    (problems, uplink)
}

/// Replace a small file atomically, only when its content differs.
fn write_if_changed(path: &std::path::Path, content: &str) -> std::io::Result<()> {
    if std::fs::read_to_string(path).is_ok_and(|c| c == content) {
        return Ok(());
    }
    crate::state_file::write_atomic(path, content.as_bytes())
}
