//! Felix's Prometheus metrics (REFERENCE §5 names, Calico's help texts and labels), and
//! the route-table statistics behind two of them.

use std::time::Instant;

use prometheus::{Histogram, HistogramOpts, IntCounter, IntGauge, IntGaugeVec, Registry};

use super::routes;
use crate::datastore::syncer::{SyncStatus, SyncerEvent};

/// Felix's Prometheus metrics (REFERENCE §5 names, Calico's help texts and labels).
#[derive(Clone)]
pub struct FelixMetrics {
    pub(crate) apply_time: Histogram,
    // Gauges that only grow: Calico's names, which lack the `_total` of counters.
    pub(crate) failures: IntGauge,
    pub(crate) resyncs: IntGauge,
    pub(crate) messages: IntGauge,
    /// 1 waiting for the datastore, 2 resync in progress, 3 in sync (Calico's values).
    pub(crate) resync_state: IntGauge,
    pub(crate) calc_time: Histogram,
    pub(crate) route_resync_time: Histogram,
    pub(crate) partial_resync_time: Histogram,
    routes: IntGaugeVec,
    ifaces: IntGaugeVec,
    local_endpoints: IntGauge,
    cluster_endpoints: IntGauge,
    hosts: IntGauge,
    ipsets: IntGaugeVec,
    rules: IntGaugeVec,
    // Policy (issue 17).
    local_policies: IntGauge,
    local_selectors: IntGauge,
    nft: NftMetrics,
}

/// The nftables executor's metrics (Calico's names, types, labels and help texts:
/// felix/nftables/table.go and ipsets.go).
#[derive(Clone)]
struct NftMetrics {
    calls: IntCounter,
    errors: IntCounter,
    set_calls: IntCounter,
    set_errors: IntCounter,
    chains: IntGaugeVec,
    rules: IntGaugeVec,
    sets: IntGaugeVec,
}

impl NftMetrics {
    fn new(registry: &Registry) -> prometheus::Result<NftMetrics> {
        let c = |name: &str, help: &str| -> prometheus::Result<IntCounter> {
            let c = IntCounter::new(name, help)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let g = |name: &str, help: &str| -> prometheus::Result<IntGaugeVec> {
            let g = IntGaugeVec::new(prometheus::Opts::new(name, help), &["ip_version"])?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        Ok(NftMetrics {
            calls: c("felix_nft_calls", "Number of nft rule write transactions.")?,
            errors: c(
                "felix_nft_errors",
                "Number of nft errors when writing rules.",
            )?,
            set_calls: c(
                "felix_nft_set_calls",
                "Number of nftables set transactions executed.",
            )?,
            set_errors: c(
                "felix_nft_set_errors",
                "Number of nftables set transaction failures.",
            )?,
            chains: g(
                "felix_nft_chains",
                "Number of active nft chains in the Calico table.",
            )?,
            rules: g(
                "felix_nft_rules",
                "Number of active nftables rules in the Calico table.",
            )?,
            sets: g("felix_nft_sets", "Number of active Calico nftables sets.")?,
        })
    }
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
            local_policies: IntGauge::new(
                "felix_active_local_policies",
                "Number of active policies on this host.",
            )?,
            local_selectors: IntGauge::new(
                "felix_active_local_selectors",
                "Number of active selectors on this host.",
            )?,
            nft: NftMetrics::new(registry)?,
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
        registry.register(Box::new(m.local_policies.clone()))?;
        registry.register(Box::new(m.local_selectors.clone()))?;
        Ok(m)
    }

    pub(crate) fn set_route_table(&self, t: &RouteTableStats) {
        for (i, table) in ["IPv4:254", "IPv6:254"].into_iter().enumerate() {
            self.routes.with_label_values(&[table]).set(t.routes[i]);
            self.ifaces
                .with_label_values(&[table])
                .set(t.ifaces[i].len() as i64);
        }
    }

    /// The nftables executor's counts (`felix_nft_*`).
    pub(crate) fn set_nft(&self, s: &super::nft::exec::NftStats) {
        let up = |c: &IntCounter, to: u64| c.inc_by(to.saturating_sub(c.get()));
        up(&self.nft.calls, s.calls);
        up(&self.nft.errors, s.errors);
        up(&self.nft.set_calls, s.set_calls);
        up(&self.nft.set_errors, s.set_errors);
        for (i, v) in ["4", "6"].into_iter().enumerate() {
            self.nft.chains.with_label_values(&[v]).set(s.chains[i]);
            self.nft.rules.with_label_values(&[v]).set(s.rules[i]);
            self.nft.sets.with_label_values(&[v]).set(s.sets[i]);
        }
    }

    /// The NAT gauges for what was applied: per family, two sets and two rules when the
    /// family's table is programmed (see `nat::script`).
    pub(crate) fn set_nat(&self, nat: &super::calc::Nat) {
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
pub(crate) struct RouteTableStats {
    routes: [i64; 2],
    ifaces: [Vec<Option<String>>; 2],
}

impl RouteTableStats {
    pub(crate) fn of(routes: &super::calc::RouteTable) -> RouteTableStats {
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

    pub(crate) fn change(&mut self, (p, old, new): &routes::Change) {
        if old.is_some() {
            self.routes[Self::family(p)] -= 1;
        }
        if let Some(r) = new {
            self.add(p, r);
        }
    }
}

impl FelixMetrics {
    /// The policy gauges for the policy dataplane written: the policies and the selector
    /// sets active on this host.
    pub(crate) fn set_policy(&self, dp: &super::policy::PolicyDataplane) {
        self.local_policies.set(dp.policies.len() as i64);
        self.local_selectors.set(dp.sets.len() as i64);
    }

    /// Count a datastore event (and the resyncs it announces) before it is folded.
    pub(crate) fn datastore_event(&self, ev: &SyncerEvent) {
        self.messages.inc();
        match ev {
            SyncerEvent::Status(SyncStatus::ResyncInProgress) => {
                self.resyncs.inc();
                self.resync_state.set(2);
            }
            SyncerEvent::Status(SyncStatus::InSync) => self.resync_state.set(3),
            SyncerEvent::Update(_) => {}
        }
    }

    /// The time a datastore event took to fold, and the counts after it: this node's
    /// workload endpoints, the cluster's, and the nodes.
    pub(crate) fn folded(&self, started: Instant, (eps, all_eps, hosts): (usize, usize, usize)) {
        self.calc_time.observe(started.elapsed().as_secs_f64());
        self.local_endpoints.set(eps as i64);
        self.cluster_endpoints.set(all_eps as i64);
        self.hosts.set(hosts as i64);
    }
}

#[cfg(test)]
mod nft_metrics_tests {
    use prometheus::Encoder;

    use super::*;
    use crate::felix::nft::exec::NftStats;

    /// The felix_nft_* metrics show the executor's counts with Calico's types and labels;
    /// counters do not double when the same counts are reported again.
    #[test]
    fn nft_metrics_follow_the_executor_counts() {
        let r = Registry::new();
        let m = FelixMetrics::new(&r).unwrap();
        let s = NftStats {
            calls: 3,
            errors: 1,
            set_calls: 5,
            set_errors: 0,
            chains: [10, 0],
            rules: [40, 0],
            sets: [2, 0],
        };
        m.set_nft(&s);
        m.set_nft(&s);
        let mut buf = Vec::new();
        prometheus::TextEncoder::new()
            .encode(&r.gather(), &mut buf)
            .unwrap();
        let text = String::from_utf8(buf).unwrap();
        for want in [
            "# TYPE felix_nft_calls counter\nfelix_nft_calls 3\n",
            "felix_nft_errors 1\n",
            "felix_nft_set_calls 5\n",
            "felix_nft_chains{ip_version=\"4\"} 10\n",
            "felix_nft_rules{ip_version=\"4\"} 40\n",
            "felix_nft_sets{ip_version=\"6\"} 0\n",
        ] {
            assert!(text.contains(want), "{want:?} not in\n{text}");
        }
    }
}
