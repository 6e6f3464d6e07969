//! What Felix knows (pure): the syncer's updates and BGP's best routes folded into the
//! tables the calculation reads. Deletes come by key, so every table is keyed by the
//! datastore key; nodes are also indexed by name.

use std::collections::BTreeMap;
use std::sync::Arc;

use ipnet::IpNet;

use super::FelixInput;
use super::calc::{self, Desired, Input, Settings};
use super::policy::calc::{
    EndpointInfo, NetSetInfo, TierInfo, gnp_stage_id, np_id, resolve_gnp, resolve_np,
    resolve_profile,
};
use super::policy::index::PolicyEngine;
use super::policy::{Delta, EncapDrops, EndpointToHost, Failsafe, PolicyDataplane};
use crate::bgp::RouteUpdate;
use crate::datastore::syncer::{SyncStatus, SyncValue, SyncerEvent, UpdateType};
use crate::model::AnyResource;
use crate::model::felix::FelixConfigurationSpec;
use crate::model::ipam::AllocationBlock;
use crate::model::ippool::{Encap, IPPoolSpec, encap};
use crate::model::node::NodeSpec;
use crate::model::workload::WorkloadEndpointSpec;

/// Felix's view of the cluster.
#[derive(Debug, Clone, Default)]
pub struct State {
    node: String,
    /// Node names by key, and specs by name.
    node_keys: BTreeMap<String, String>,
    nodes: BTreeMap<String, NodeSpec>,
    pools: BTreeMap<String, IPPoolSpec>,
    workloads: BTreeMap<String, WorkloadEndpointSpec>,
    /// The keys of every workload endpoint in the cluster (for the count).
    all_workloads: std::collections::HashSet<String>,
    blocks: BTreeMap<String, AllocationBlock>,
    /// FelixConfiguration `default` and `node.<this node>`.
    global: Option<FelixConfigurationSpec>,
    per_node: Option<FelixConfigurationSpec>,
    /// BGPConfiguration `default`'s service ranges.
    service_ranges: Vec<IpNet>,
    bgp: calc::BgpTable,
    /// BGP prefixes changed since the last pass (see [`State::bgp_changes`]).
    bgp_changed: Vec<IpNet>,
    /// Whether a datastore update changed anything since the last full pass.
    pub datastore_changed: bool,
    /// The policy calculation: its inputs (every endpoint of the cluster, policies,
    /// tiers, profiles, network sets), its last result and its indexes.
    policy: PolicyEngine,
    /// What each policy-related datastore key holds (deletes come by key).
    policy_keys: BTreeMap<String, PolicyKey>,
    /// Whether a datastore update changed the policy inputs since the last
    /// [`State::policy_update`].
    pub policy_changed: bool,
    pub datastore_in_sync: bool,
    pub bgp_in_sync: bool,
    /// `FELIX_*` variables: they override the datastore's FelixConfiguration (validated at
    /// start-up).
    env: Vec<(String, String)>,
}

/// What a policy-related datastore key holds.
#[derive(Debug, Clone, PartialEq)]
enum PolicyKey {
    Tier(String),
    Policy(String),
    Profile(String),
}

impl State {
    pub fn new(node: &str) -> State {
        State::with_env(node, Vec::new())
    }

    /// Felix for `node` with `FELIX_*` variables `env`.
    pub fn with_env(node: &str, env: Vec<(String, String)>) -> State {
        let mut s = State {
            node: node.to_string(),
            policy: PolicyEngine::new(node),
            env,
            ..Default::default()
        };
        // Felix's defaults (the failsafe ports above all) before any FelixConfiguration.
        s.config_changed();
        s.policy_changed = false;
        s
    }

    /// Fold one input in; true when it can change the desired dataplane.
    pub fn apply(&mut self, input: &FelixInput) -> bool {
        match input {
            FelixInput::Bgp(RouteUpdate::Best(r)) => {
                let changed = self.bgp.insert(r.prefix, r.next_hop) != Some(r.next_hop);
                if changed {
                    self.bgp_changed.push(r.prefix);
                }
                changed
            }
            FelixInput::Bgp(RouteUpdate::Withdrawn(p)) => {
                let changed = self.bgp.remove(p).is_some();
                if changed {
                    self.bgp_changed.push(*p);
                }
                changed
            }
            FelixInput::Bgp(RouteUpdate::InSync) => {
                // The first time, routes kept for BGP may now go.
                !std::mem::replace(&mut self.bgp_in_sync, true)
            }
            FelixInput::Datastore(SyncerEvent::Status(s)) => {
                self.datastore_in_sync = *s == SyncStatus::InSync;
                false
            }
            FelixInput::Datastore(SyncerEvent::Update(u)) => {
                let key = u.key.as_str();
                let changed = match (&u.update_type, u.value.as_deref()) {
                    (UpdateType::Deleted, _) | (_, None) => self.forget(key),
                    (_, Some(v)) => self.store(key, v),
                };
                self.datastore_changed |= changed;
                changed
            }
        }
    }

    fn forget(&mut self, key: &str) -> bool {
        self.all_workloads.remove(key);
        let mut policy = false;
        if self.policy.calc().endpoints.contains_key(key) {
            self.policy.endpoint(key, None);
            policy = true;
        }
        if self.policy.calc().net_sets.contains_key(key) {
            self.policy.net_set(key, None);
            policy = true;
        }
        policy |= match self.policy_keys.remove(key) {
            Some(PolicyKey::Tier(t)) => self.policy.inputs_mut().tiers.remove(&t).is_some(),
            Some(PolicyKey::Policy(id)) => {
                let had = self.policy.calc().policies.contains_key(&id);
                self.policy.policy(&id, None);
                had
            }
            Some(PolicyKey::Profile(p)) => {
                let had = self.policy.calc().profiles.contains_key(&p);
                self.policy.profile(&p, None);
                had
            }
            None => false,
        };
        self.policy_changed |= policy;
        let mut gone = self.pools.remove(key).is_some()
            | self.workloads.remove(key).is_some()
            | self.blocks.remove(key).is_some();
        if let Some(name) = self.node_keys.remove(key) {
            gone |= self.nodes.remove(&name).is_some();
        }
        if key.ends_with("/felixconfigurations/default") {
            gone |= self.global.take().is_some();
        }
        if key.ends_with(&format!("/felixconfigurations/node.{}", self.node)) {
            gone |= self.per_node.take().is_some();
        }
        if key.ends_with("/bgpconfigurations/default") {
            gone |= !std::mem::take(&mut self.service_ranges).is_empty();
        }
        if key.contains("/felixconfigurations/") {
            self.config_changed();
        }
        gone
    }

    /// The policy settings of FelixConfiguration may have changed.
    fn config_changed(&mut self) {
        let e2h = match self.config().endpoint_to_host_action() {
            "Return" => EndpointToHost::Return,
            "Accept" => EndpointToHost::Accept,
            _ => EndpointToHost::Drop,
        };
        if self.policy.calc().endpoint_to_host != e2h {
            self.policy.set_endpoint_to_host(e2h);
            self.policy_changed = true;
        }
        let c = self.config();
        let drops = EncapDrops {
            vxlan_port: (!c.allow_vxlan_packets_from_workloads.unwrap_or(false))
                .then(|| c.vxlan_port()),
            ipip: !c.allow_ipip_packets_from_workloads.unwrap_or(false),
        };
        if self.policy.calc().encap_drops != drops {
            self.policy.set_encap_drops(drops);
            self.policy_changed = true;
        }
        if self.policy.calc().log_prefix != c.log_prefix() {
            self.policy.set_log_prefix(c.log_prefix());
            self.policy_changed = true;
        }
        let (fin, fout) = (
            failsafes(&c.failsafe_inbound()),
            failsafes(&c.failsafe_outbound()),
        );
        let calc = self.policy.calc();
        if calc.failsafe_in != fin || calc.failsafe_out != fout || calc.vxlan_port != c.vxlan_port()
        {
            self.policy.set_host_config(fin, fout, c.vxlan_port());
            self.policy_changed = true;
        }
    }

    fn put_policy(&mut self, id: &str, p: Option<super::policy::calc::ResolvedPolicy>) {
        if self.policy.calc().policies.get(id) != p.as_ref() {
            self.policy.policy(id, p);
            self.policy_changed = true;
        }
    }

    fn net_set(&mut self, key: &str, info: NetSetInfo) {
        if self.policy.calc().net_sets.get(key) != Some(&info) {
            self.policy.net_set(key, Some(info));
            self.policy_changed = true;
        }
    }

    /// Record what a policy-related key holds.
    fn policy_key(&mut self, key: &str, what: PolicyKey) {
        self.policy_keys.insert(key.to_string(), what);
    }

    fn store(&mut self, key: &str, value: &SyncValue) -> bool {
        match value {
            SyncValue::Block(b) => {
                self.blocks.insert(key.to_string(), b.clone());
                true
            }
            SyncValue::Resource(AnyResource::IPPool(p)) => {
                self.pools.insert(key.to_string(), p.spec.clone());
                true
            }
            SyncValue::Resource(AnyResource::Node(n)) => {
                self.node_keys
                    .insert(key.to_string(), n.metadata.name.clone());
                self.nodes.insert(n.metadata.name.clone(), n.spec.clone());
                true
            }
            SyncValue::Resource(AnyResource::WorkloadEndpoint(w)) => {
                if !self.all_workloads.contains(key) {
                    self.all_workloads.insert(key.to_string());
                }
                // Policy sees every endpoint of the cluster (their addresses fill the
                // selector sets); a change of labels alone is no routing change.
                let info = EndpointInfo::from_wep(w);
                if self.policy.calc().endpoints.get(key) != Some(&info) {
                    self.policy.endpoint(key, Some(info));
                    self.policy_changed = true;
                }
                if w.spec.node == self.node {
                    // Profiles, named ports and the service account are policy's alone.
                    let routing = |s: &WorkloadEndpointSpec| WorkloadEndpointSpec {
                        profiles: Vec::new(),
                        ports: Vec::new(),
                        service_account_name: String::new(),
                        ..s.clone()
                    };
                    let old = self.workloads.insert(key.to_string(), w.spec.clone());
                    old.as_ref().map(routing) != Some(routing(&w.spec))
                } else {
                    // Moved to another node: it is not ours any more.
                    self.workloads.remove(key).is_some()
                }
            }
            SyncValue::Resource(AnyResource::BGPConfiguration(b))
                if b.metadata.name == "default" =>
            {
                let ranges = b.spec.service_ranges();
                ranges != std::mem::replace(&mut self.service_ranges, ranges.clone())
            }
            SyncValue::Resource(AnyResource::FelixConfiguration(f)) => {
                let changed = if f.metadata.name == "default" {
                    self.global = Some(f.spec.clone());
                    true
                } else if f.metadata.name == format!("node.{}", self.node) {
                    self.per_node = Some(f.spec.clone());
                    true
                } else {
                    false
                };
                self.config_changed();
                changed
            }
            SyncValue::Resource(AnyResource::Tier(t)) => {
                let name = t.metadata.name.clone();
                self.policy_key(key, PolicyKey::Tier(name.clone()));
                let info = TierInfo::from_spec(&t.spec);
                if self.policy.calc().tiers.get(&name) != Some(&info) {
                    self.policy_changed |=
                        keep(&mut self.policy.inputs_mut().tiers, &name, Some(info));
                }
                false
            }
            SyncValue::Resource(AnyResource::GlobalNetworkPolicy(p)) => {
                // The id carries the stage: a policy that moved (preDNAT, doNotTrack
                // toggled) leaves its old chain.
                let id = gnp_stage_id(&p.metadata.name, &p.spec);
                if let Some(PolicyKey::Policy(old)) = self.policy_keys.get(key)
                    && *old != id
                {
                    let old = old.clone();
                    self.put_policy(&old, None);
                }
                self.policy_key(key, PolicyKey::Policy(id.clone()));
                let r = resolve_gnp(&p.metadata.name, &p.spec);
                self.put_policy(&id, Some(r));
                false
            }
            SyncValue::Resource(AnyResource::HostEndpoint(h)) => {
                // Every node's host endpoints give selector sets their expected
                // addresses; this node's are programmed.
                let info = EndpointInfo::from_hep(h);
                // One of this node matched by address: a full pass reads the host's
                // addresses for it.
                let by_address = info.node == self.node && info.iface.is_empty();
                if self.policy.calc().endpoints.get(key) != Some(&info) {
                    self.policy.endpoint(key, Some(info));
                    self.policy_changed = true;
                    return by_address;
                }
                false
            }
            SyncValue::Resource(AnyResource::NetworkPolicy(p)) => {
                let ns = p.metadata.namespace.as_deref().unwrap_or("default");
                let id = np_id(ns, &p.metadata.name);
                self.policy_key(key, PolicyKey::Policy(id.clone()));
                let r = resolve_np(ns, &p.metadata.name, &p.spec);
                self.put_policy(&id, Some(r));
                false
            }
            SyncValue::Resource(AnyResource::Profile(p)) => {
                let name = p.metadata.name.clone();
                self.policy_key(key, PolicyKey::Profile(name.clone()));
                let r = resolve_profile(&p.spec);
                if self.policy.calc().profiles.get(&name) != Some(&r) {
                    self.policy.profile(&name, Some(r));
                    self.policy_changed = true;
                }
                false
            }
            SyncValue::Resource(AnyResource::NetworkSet(n)) => {
                let ns = n.metadata.namespace.as_deref().unwrap_or("default");
                let info = NetSetInfo::new(&n.metadata.labels, Some(ns), &n.spec.nets);
                self.net_set(key, info);
                false
            }
            SyncValue::Resource(AnyResource::GlobalNetworkSet(n)) => {
                let info = NetSetInfo::new(&n.metadata.labels, None, &n.spec.nets);
                self.net_set(key, info);
                false
            }
            // Staged policies are never enforced (Calico).
            _ => false,
        }
    }

    /// Whether a host endpoint of this node is matched by address: the full pass then
    /// reads the host's interface addresses.
    pub fn wants_host_addrs(&self) -> bool {
        self.policy.calc().wants_host_addrs()
    }

    /// The host's interface addresses (workload interfaces and kube-ipvs0 left out), as
    /// read.
    pub fn set_host_addrs(&mut self, addrs: BTreeMap<String, Vec<std::net::IpAddr>>) {
        // `interfacePrefix` may list several prefixes (`cali,tap`).
        let config = self.config();
        let prefixes: Vec<&str> = config
            .interface_prefix()
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .collect();
        // kube-ipvs0 holds kube-proxy's service addresses: Felix's default
        // `interfaceExclude` leaves it out of host endpoint resolution.
        let addrs: BTreeMap<String, Vec<std::net::IpAddr>> = addrs
            .into_iter()
            .filter(|(name, _)| {
                name != "kube-ipvs0" && !prefixes.iter().any(|p| name.starts_with(p))
            })
            .collect();
        if self.policy.calc().host_addrs != addrs {
            let before = self.policy.dataplane().host.clone();
            self.policy.set_host_addrs(addrs);
            self.policy_changed |= self.policy.dataplane().host != before;
        }
    }

    /// The policy dataplane for what is known now, and what changed since the last call.
    pub fn policy_update(&mut self) -> (Arc<PolicyDataplane>, Delta) {
        self.policy_changed = false;
        self.policy.take()
    }

    /// The policy dataplane last computed.
    pub fn policy_dataplane(&self) -> &Arc<PolicyDataplane> {
        self.policy.dataplane()
    }

    /// The FelixConfiguration in force: `node.<name>` over `default`.
    pub fn config(&self) -> FelixConfigurationSpec {
        let empty = FelixConfigurationSpec::default();
        let mut c = FelixConfigurationSpec::merged(
            self.global.as_ref().unwrap_or(&empty),
            self.per_node.as_ref().unwrap_or(&empty),
        );
        for (k, v) in &self.env {
            // Checked at start-up: a value that does not parse stopped it there.
            let _ = c.apply_env(k, v);
        }
        c
    }

    /// The settings the calculation uses.
    pub fn settings(&self) -> Settings {
        let c = self.config();
        Settings {
            vxlan_vni: c.vxlan_vni(),
            vxlan_port: c.vxlan_port(),
            device_route_protocol: c.device_route_protocol(),
            nat_outgoing_address: c
                .nat_outgoing_address
                .as_deref()
                .and_then(|a| a.parse().ok()),
            service_ranges: self.service_ranges.clone(),
        }
    }

    /// The desired dataplane for what is known now (a full pass: BGP's pending changes are
    /// part of it).
    pub fn desired(&mut self) -> Desired {
        self.bgp_changed.clear();
        self.datastore_changed = false;
        let settings = self.settings();
        calc::calculate(&self.input(&settings))
    }

    fn input<'a>(&'a self, settings: &'a Settings) -> Input<'a> {
        Input {
            node: &self.node,
            nodes: &self.nodes,
            pools: &self.pools,
            workloads: &self.workloads,
            blocks: &self.blocks,
            bgp: &self.bgp,
            settings,
        }
    }

    /// The route changes BGP's updates since the last pass make to `routes` (the desired
    /// routes of that pass, updated here): prefixes inside VXLAN pools and those a local
    /// workload or block owns are left alone, as the full calculation does.
    pub fn bgp_changes(&mut self, routes: &mut calc::RouteTable) -> Vec<super::routes::Change> {
        let mut changed = std::mem::take(&mut self.bgp_changed);
        changed.sort_unstable();
        changed.dedup();
        let settings = self.settings();
        let input = self.input(&settings);
        let bgp = calc::BgpRoutes::new(&input);
        let mut out = Vec::new();
        for p in changed {
            if bgp.in_vxlan_pool(&p) {
                continue;
            }
            let old = routes.get(&p).cloned();
            if matches!(
                old,
                Some(calc::Route {
                    target: calc::Target::Link(_) | calc::Target::Blackhole,
                    ..
                })
            ) {
                continue;
            }
            let new = self.bgp.get(&p).and_then(|nh| bgp.route(&p, nh));
            if old == new {
                continue;
            }
            match &new {
                Some(r) => routes.insert(p, r.clone()),
                None => routes.remove(&p),
            };
            out.push((p, old, new));
        }
        out
    }

    /// Whether BGP changed since the last pass.
    pub fn bgp_pending(&self) -> bool {
        !self.bgp_changed.is_empty()
    }

    /// The IP pools.
    pub fn pools(&self) -> impl Iterator<Item = &IPPoolSpec> + Clone {
        self.pools.values()
    }

    /// The pools whose routes come from BGP (all but VXLAN pools).
    pub fn bgp_routed_pools(&self) -> Vec<IpNet> {
        self.pools
            .values()
            .filter(|p| !matches!(encap(p), Encap::Vxlan { .. }))
            .filter_map(|p| p.net())
            .collect()
    }

    /// This node's name.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// This node's IPv4 address (`spec.bgp.ipv4Address`).
    pub fn node_ipv4(&self) -> Option<std::net::Ipv4Addr> {
        let a = self
            .nodes
            .get(&self.node)?
            .bgp
            .as_ref()?
            .ipv4_address
            .as_deref()?;
        a.parse::<ipnet::Ipv4Net>()
            .map(|n| n.addr())
            .or_else(|_| a.parse())
            .ok()
    }

    /// Workload endpoints on this node, and nodes in the cluster (for metrics).
    /// This node's workload endpoints, the cluster's, and the nodes.
    pub fn counts(&self) -> (usize, usize, usize) {
        (
            self.workloads.len(),
            self.all_workloads.len(),
            self.nodes.len(),
        )
    }
}

/// Keep `value` under `name` (or remove it); true when that changed anything.
/// Failsafe ports as the dataplane takes them; an entry whose protocol or net does not
/// parse is left out (with a warning: validation refuses them, others may write them).
fn failsafes(ports: &[crate::model::felix::ProtoPort]) -> Vec<Failsafe> {
    ports
        .iter()
        .filter_map(|p| {
            let protocol = match p.protocol().as_str() {
                "TCP" => 6,
                "UDP" => 17,
                "SCTP" => 132,
                other => {
                    tracing::warn!(
                        protocol = other,
                        port = p.port,
                        "failsafe port with an unknown protocol left out"
                    );
                    return None;
                }
            };
            let net = if p.net.is_empty() {
                None
            } else {
                let n = p
                    .net
                    .parse::<IpNet>()
                    .ok()
                    .or_else(|| p.net.parse::<std::net::IpAddr>().ok().map(IpNet::from));
                if n.is_none() {
                    tracing::warn!(
                        net = p.net,
                        port = p.port,
                        "failsafe port with a net that does not parse left out"
                    );
                    return None;
                }
                n
            };
            Some(Failsafe {
                protocol,
                port: p.port,
                net,
            })
        })
        .collect()
}

fn keep<V: PartialEq>(map: &mut BTreeMap<String, V>, name: &str, value: Option<V>) -> bool {
    match value {
        Some(v) if map.get(name) == Some(&v) => false,
        Some(v) => {
            map.insert(name.to_string(), v);
            true
        }
        None => map.remove(name).is_some(),
    }
}

#[cfg(test)]
mod tests {

    use super::*;
    use crate::bgp::LearnedRoute;
    use crate::model::Resource;

    /// Tiers and network sets are policy inputs: no routing change, a policy change (and
    /// a delete of one too).
    #[test]
    fn tiers_and_sets_are_policy_changes_not_routing_changes() {
        use crate::model::networkset::{
            GlobalNetworkSet, GlobalNetworkSetSpec, NetworkSet, NetworkSetSpec,
        };
        let p = "/calico/resources/v3/projectcalico.org";
        let values = [
            (
                format!("{p}/tiers/default"),
                AnyResource::Tier(crate::model::tier::builtin_tier("default", 1e6, "Deny")),
            ),
            (
                format!("{p}/networksets/default/s"),
                AnyResource::NetworkSet(NetworkSet::new("s", NetworkSetSpec::default())),
            ),
            (
                format!("{p}/globalnetworksets/g"),
                AnyResource::GlobalNetworkSet(GlobalNetworkSet::new(
                    "g",
                    GlobalNetworkSetSpec::default(),
                )),
            ),
        ];
        let mut s = State::new("node-a");
        for (key, v) in values {
            let put = SyncerEvent::update(&key, Some(SyncValue::Resource(v)));
            assert!(!s.apply(&FelixInput::Datastore(put)), "{key}");
            assert!(std::mem::take(&mut s.policy_changed), "{key}");
            let del = SyncerEvent::update(&key, None);
            assert!(!s.apply(&FelixInput::Datastore(del)), "{key}");
            assert!(std::mem::take(&mut s.policy_changed), "{key}");
        }
    }

    fn update(key: &str, value: Option<SyncValue>) -> FelixInput {
        FelixInput::Datastore(SyncerEvent::update(key, value))
    }

    fn resource<S: crate::model::Kind>(name: &str, spec: S) -> Resource<S> {
        Resource::new(name, spec)
    }

    fn wep(node: &str, ip: &str) -> SyncValue {
        SyncValue::Resource(AnyResource::WorkloadEndpoint(resource(
            "w",
            WorkloadEndpointSpec {
                node: node.into(),
                interface_name: "cali1".into(),
                ip_networks: vec![ip.into()],
                ..Default::default()
            },
        )))
    }

    /// A policy is a policy change, never a routing change; a staged one is neither
    /// (Calico never enforces them).
    #[test]
    fn policies_change_policy_only_and_staged_ones_change_nothing() {
        let mut s = State::new("node-a");
        let np = SyncValue::Resource(AnyResource::NetworkPolicy(resource(
            "p",
            crate::model::NetworkPolicySpec::default(),
        )));
        let key = "/calico/resources/v3/projectcalico.org/networkpolicies/ns/p";
        assert!(!s.apply(&update(key, Some(np.clone()))));
        assert!(std::mem::take(&mut s.policy_changed));
        assert!(!s.apply(&update(key, Some(np))));
        assert!(!s.policy_changed, "the same policy again");
        assert!(!s.apply(&update(key, None)));
        assert!(std::mem::take(&mut s.policy_changed));
        let staged = SyncValue::Resource(AnyResource::StagedNetworkPolicy(resource(
            "p",
            crate::model::policy::StagedNetworkPolicySpec::default(),
        )));
        let key = "/calico/resources/v3/projectcalico.org/stagednetworkpolicies/ns/p";
        assert!(!s.apply(&update(key, Some(staged))));
        assert!(!s.policy_changed);
        assert!(!s.apply(&update(key, None)));
        assert!(!s.policy_changed);
    }

    /// A label change on a local endpoint is policy-only; an address change is both.
    #[test]
    fn a_label_change_is_policy_only_and_an_address_change_is_both() {
        let mut s = State::new("node-a");
        let key = "/calico/resources/v3/projectcalico.org/workloadendpoints/ns/w";
        let labelled = |ip: &str, app: &str| {
            let SyncValue::Resource(AnyResource::WorkloadEndpoint(mut w)) = wep("node-a", ip)
            else {
                unreachable!()
            };
            w.metadata.labels.insert("app".into(), app.into());
            SyncValue::Resource(AnyResource::WorkloadEndpoint(w))
        };
        assert!(s.apply(&update(key, Some(labelled("10.244.0.3/32", "a")))));
        assert!(std::mem::take(&mut s.policy_changed));
        assert!(!s.apply(&update(key, Some(labelled("10.244.0.3/32", "b")))));
        assert!(std::mem::take(&mut s.policy_changed));
        assert!(s.apply(&update(key, Some(labelled("10.244.0.4/32", "b")))));
        assert!(std::mem::take(&mut s.policy_changed));
        let (dp, delta) = s.policy_update();
        assert!(dp.endpoints.contains_key("cali1"));
        assert!(delta.endpoints.contains("cali1"));
    }

    #[test]
    fn updates_and_deletes_by_key_reach_the_desired_dataplane() {
        let mut s = State::new("node-a");
        let wk = "/calico/resources/v3/projectcalico.org/workloadendpoints/ns/node--a-k8s-p-eth0";
        assert!(s.apply(&update(wk, Some(wep("node-a", "10.244.0.3/32")))));
        let d = s.desired();
        assert!(d.routes.contains_key(&"10.244.0.3/32".parse().unwrap()));
        // Another node's endpoint is not ours; one that moves away goes.
        assert!(!s.apply(&update("/other", Some(wep("node-b", "10.244.1.3/32")))));
        assert!(s.apply(&update(wk, Some(wep("node-b", "10.244.0.3/32")))));
        assert!(s.desired().routes.is_empty());

        let nk = "/calico/resources/v3/projectcalico.org/nodes/node-b";
        let node = SyncValue::Resource(AnyResource::Node(resource("node-b", NodeSpec::default())));
        assert!(s.apply(&update(nk, Some(node))));
        // None here, two in the cluster, one node.
        assert_eq!(s.counts(), (0, 2, 1));
        assert!(s.apply(&update(nk, None)));
        assert_eq!(s.counts(), (0, 2, 0));
        s.apply(&update("/other", None));
        assert_eq!(s.counts(), (0, 1, 0));
        assert!(
            !s.apply(&update(nk, None)),
            "deleting twice changes nothing"
        );
    }

    fn pool(cidr: &str, vxlan: &str) -> SyncValue {
        SyncValue::Resource(AnyResource::IPPool(resource(
            "p",
            IPPoolSpec {
                cidr: cidr.into(),
                vxlan_mode: Some(vxlan.into()),
                ..Default::default()
            },
        )))
    }

    proptest::proptest! {
        /// BGP's changes applied one by one to the last full pass's routes give exactly the
        /// routes a full calculation gives: VXLAN pools and prefixes a local workload or
        /// block owns are left alone, next-hop changes replace, withdrawals remove.
        #[test]
        fn bgp_changes_keep_routes_equal_to_a_full_calculation(
            ops in proptest::collection::vec((0usize..8, proptest::option::of(0u8..3)), 1..60),
            every in 1usize..6,
        ) {
            let mut s = State::new("node-a");
            s.apply(&update("/pools/a", Some(pool("10.244.0.0/16", "Never"))));
            s.apply(&update("/pools/b", Some(pool("10.245.0.0/16", "Always"))));
            s.apply(&update("/weps/w", Some(wep("node-a", "10.244.0.5/32"))));
            let block = crate::model::ipam::AllocationBlock {
                cidr: "10.244.0.0/26".into(),
                affinity: Some("host:node-a".into()),
                ..Default::default()
            };
            s.apply(&update("/blocks/b", Some(SyncValue::Block(block))));
            let prefixes: Vec<IpNet> = [
                "10.244.1.0/26", "10.244.2.0/26", "10.244.0.0/26", "10.244.0.5/32",
                "10.245.1.0/26", "10.9.0.0/24", "10.244.0.9/32", "10.244.3.0/26",
            ]
            .iter()
            .map(|p| p.parse().unwrap())
            .collect();
            let mut routes = s.desired().routes;
            for (i, (p, nh)) in ops.iter().enumerate() {
                let prefix = prefixes[*p];
                let u = match nh {
                    Some(n) => RouteUpdate::Best(LearnedRoute {
                        prefix,
                        next_hop: format!("10.0.0.{}", n + 2).parse().unwrap(),
                    }),
                    None => RouteUpdate::Withdrawn(prefix),
                };
                s.apply(&FelixInput::Bgp(u));
                if i % every == 0 {
                    for (p, old, new) in s.bgp_changes(&mut routes) {
                        proptest::prop_assert_ne!(old, new, "{} changed to itself", p);
                    }
                    let mut full = s.clone();
                    proptest::prop_assert_eq!(&routes, &full.desired().routes);
                }
            }
        }
    }

    #[test]
    fn bgp_routes_and_sync_markers() {
        let mut s = State::new("node-a");
        let p: IpNet = "10.9.0.0/24".parse().unwrap();
        let best = |nh: &str| {
            FelixInput::Bgp(RouteUpdate::Best(LearnedRoute {
                prefix: p,
                next_hop: nh.parse().unwrap(),
            }))
        };
        assert!(s.apply(&best("10.0.0.2")));
        assert!(!s.apply(&best("10.0.0.2")), "the same route again");
        assert!(s.apply(&best("10.0.0.3")));
        assert!(s.desired().routes.contains_key(&p));
        assert!(s.apply(&FelixInput::Bgp(RouteUpdate::Withdrawn(p))));
        assert!(s.desired().routes.is_empty());
        assert!(!s.bgp_in_sync);
        s.apply(&FelixInput::Bgp(RouteUpdate::InSync));
        assert!(s.bgp_in_sync);
        s.apply(&FelixInput::Datastore(SyncerEvent::Status(
            SyncStatus::InSync,
        )));
        assert!(s.datastore_in_sync);
    }

    /// `defaultEndpointToHostAction` (node over global) reaches the policy dataplane;
    /// without it, Felix's default Drop.
    #[test]
    fn endpoint_to_host_action_follows_the_felix_configuration() {
        let mut s = State::new("node-a");
        let prefix = "/calico/resources/v3/projectcalico.org/felixconfigurations/";
        let fc = |name: &str, action: &str| {
            SyncValue::Resource(AnyResource::FelixConfiguration(resource(
                name,
                FelixConfigurationSpec {
                    default_endpoint_to_host_action: Some(action.into()),
                    ..Default::default()
                },
            )))
        };
        assert_eq!(s.policy_update().0.endpoint_to_host, EndpointToHost::Drop);
        s.apply(&update(
            &format!("{prefix}default"),
            Some(fc("default", "Accept")),
        ));
        assert!(std::mem::take(&mut s.policy_changed));
        let (dp, delta) = s.policy_update();
        assert_eq!(dp.endpoint_to_host, EndpointToHost::Accept);
        assert!(delta.endpoint_to_host);
        s.apply(&update(
            &format!("{prefix}node.node-a"),
            Some(fc("node.node-a", "Return")),
        ));
        assert_eq!(s.policy_update().0.endpoint_to_host, EndpointToHost::Return);
        s.apply(&update(&format!("{prefix}node.node-a"), None));
        s.apply(&update(&format!("{prefix}default"), None));
        let (dp, delta) = s.policy_update();
        assert_eq!(dp.endpoint_to_host, EndpointToHost::Drop);
        assert!(delta.endpoint_to_host);
    }

    /// `allowVXLANPacketsFromWorkloads` / `allowIPIPPacketsFromWorkloads` (default false)
    /// and `vxlanPort` decide which encapsulated packets from workloads are dropped.
    #[test]
    fn encapsulated_packets_from_workloads_follow_the_felix_configuration() {
        let mut s = State::new("node-a");
        let key = "/calico/resources/v3/projectcalico.org/felixconfigurations/default";
        assert_eq!(s.policy_update().0.encap_drops, EncapDrops::default());
        let spec = FelixConfigurationSpec {
            vxlan_port: Some(4790),
            allow_ipip_packets_from_workloads: Some(true),
            ..Default::default()
        };
        s.apply(&update(
            key,
            Some(SyncValue::Resource(AnyResource::FelixConfiguration(
                resource("default", spec),
            ))),
        ));
        let (dp, delta) = s.policy_update();
        let want = EncapDrops {
            vxlan_port: Some(4790),
            ipip: false,
        };
        assert_eq!((dp.encap_drops, delta.encap_drops), (want, true));
        let spec = FelixConfigurationSpec {
            allow_vxlan_packets_from_workloads: Some(true),
            ..Default::default()
        };
        s.apply(&update(
            key,
            Some(SyncValue::Resource(AnyResource::FelixConfiguration(
                resource("default", spec),
            ))),
        ));
        let want = EncapDrops {
            vxlan_port: None,
            ipip: true,
        };
        assert_eq!(s.policy_update().0.encap_drops, want);
    }

    #[test]
    fn per_node_felix_configuration_overrides_the_default() {
        let mut s = State::new("node-a");
        let fc = |name: &str, vni: u32| {
            SyncValue::Resource(AnyResource::FelixConfiguration(resource(
                name,
                FelixConfigurationSpec {
                    vxlan_vni: Some(vni),
                    ..Default::default()
                },
            )))
        };
        let prefix = "/calico/resources/v3/projectcalico.org/felixconfigurations/";
        assert_eq!(s.settings().vxlan_vni, 4096);
        s.apply(&update(
            &format!("{prefix}default"),
            Some(fc("default", 5000)),
        ));
        assert_eq!(s.settings().vxlan_vni, 5000);
        s.apply(&update(
            &format!("{prefix}node.node-a"),
            Some(fc("node.node-a", 6000)),
        ));
        assert!(!s.apply(&update(
            &format!("{prefix}node.node-b"),
            Some(fc("node.node-b", 7000))
        )));
        assert_eq!(s.settings().vxlan_vni, 6000);
        s.apply(&update(&format!("{prefix}node.node-a"), None));
        assert_eq!(s.settings().vxlan_vni, 5000);
    }
}
