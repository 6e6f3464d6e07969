//! The incremental policy calculation: [`PolicyEngine`] keeps the last
//! [`PolicyDataplane`] and the indexes that let one endpoint's change update it in place
//! (Calico's calculation graph does the same job with its label index and policy
//! resolver):
//! - the active sets (those the rules of programmed policies and profiles use) with a
//!   reference count of their users and a count per member (two endpoints, or an endpoint
//!   and a network set, may give the same address);
//! - per programmed policy and profile, how many local endpoints use it;
//! - every endpoint's labels after profile inheritance.
//!
//! An endpoint's change costs one evaluation of each active set's selector (its old and
//! new labels), and, for a local endpoint, one of each policy's selector: O(#selectors +
//! #changed members), independent of the number of endpoints. A network set's change
//! costs one evaluation per active set; a policy's, one evaluation of its selector per
//! local endpoint and the recomputation of those it selects; a profile's, the endpoints
//! naming it. A tier's change (rare) rebuilds everything.
//!
//! What changed since the last [`PolicyEngine::take`] is kept in a journal of the values
//! as they were then (first touch wins), so the delta handed out is exact: a member added
//! then removed again is no change.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;

use super::calc::{EndpointInfo, NetSetInfo, PolicyCalc, SetDef};
use super::{
    Chains, Delta, EncapDrops, Endpoint, EndpointToHost, Failsafe, HostEndpoint, HostLayer, IpSet,
    PolicyDataplane,
};

/// One member of an IP set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Member {
    Net(IpNet),
    Port(IpAddr, u8, u16),
}

/// The values as they were at the last take, for what was touched since.
#[derive(Debug, Clone, Default)]
struct Journal {
    endpoints: BTreeMap<String, Option<Endpoint>>,
    policies: BTreeMap<String, Option<Chains>>,
    profiles: BTreeMap<String, Option<Chains>>,
    /// Whether the set existed.
    sets: BTreeMap<String, bool>,
    /// Whether the member was in the set.
    members: BTreeMap<String, BTreeMap<Member, bool>>,
    endpoint_to_host: Option<EndpointToHost>,
    encap_drops: Option<EncapDrops>,
    host: Option<HostLayer>,
    log_prefix: Option<String>,
}

/// The policy calculation's inputs, its last result and the indexes to update it.
#[derive(Debug, Clone, Default)]
pub struct PolicyEngine {
    calc: PolicyCalc,
    dp: Arc<PolicyDataplane>,
    journal: Journal,
    /// Inputs changed in ways the indexes do not follow: rebuild at the next take.
    rebuild: bool,
    /// Every endpoint's labels after inheritance, by key.
    labels: BTreeMap<String, BTreeMap<String, String>>,
    /// The active sets.
    set_defs: BTreeMap<String, SetDef>,
    /// How many programmed policies and profiles use each active set.
    set_users: BTreeMap<String, usize>,
    /// How many endpoints and network sets give each member, per active set.
    counts: BTreeMap<String, BTreeMap<Member, u32>>,
    /// How many local endpoints use each programmed policy and profile.
    policy_users: BTreeMap<String, usize>,
    profile_users: BTreeMap<String, usize>,
    /// The interface of each local endpoint in the dataplane, by key.
    ifaces: BTreeMap<String, String>,
    /// The sets each programmed policy and profile holds (what it let go of when it goes
    /// or changes).
    held_policy_sets: BTreeMap<String, BTreeMap<String, SetDef>>,
    held_profile_sets: BTreeMap<String, BTreeMap<String, SetDef>>,
    /// The keys of host endpoints (of any node): without any, a change never touches
    /// the host layer and its recomputation (a scan of every endpoint) is skipped.
    host_keys: BTreeSet<String>,
}

fn members_of(set: &IpSet) -> Vec<Member> {
    match set {
        IpSet::Nets(n) => n.iter().map(|n| Member::Net(*n)).collect(),
        IpSet::Ports(p) => p
            .iter()
            .map(|(a, pr, po)| Member::Port(*a, *pr, *po))
            .collect(),
    }
}

impl PolicyEngine {
    pub fn new(node: &str) -> PolicyEngine {
        PolicyEngine {
            calc: PolicyCalc::new(node),
            rebuild: true,
            ..Default::default()
        }
    }

    /// The inputs.
    pub fn calc(&self) -> &PolicyCalc {
        &self.calc
    }

    /// Change inputs the indexes do not follow (tiers, policies, profiles): everything is
    /// recomputed at the next take.
    pub fn inputs_mut(&mut self) -> &mut PolicyCalc {
        self.rebuild = true;
        &mut self.calc
    }

    /// The dataplane as last taken or updated.
    pub fn dataplane(&self) -> &Arc<PolicyDataplane> {
        &self.dp
    }

    /// `defaultEndpointToHostAction`.
    pub fn set_endpoint_to_host(&mut self, v: EndpointToHost) {
        self.calc.endpoint_to_host = v;
        if self.rebuild || self.dp.endpoint_to_host == v {
            return;
        }
        self.journal
            .endpoint_to_host
            .get_or_insert(self.dp.endpoint_to_host);
        Arc::make_mut(&mut self.dp).endpoint_to_host = v;
    }

    /// `allowVXLANPacketsFromWorkloads` / `allowIPIPPacketsFromWorkloads`.
    pub fn set_encap_drops(&mut self, v: EncapDrops) {
        self.calc.encap_drops = v;
        if self.rebuild || self.dp.encap_drops == v {
            return;
        }
        self.journal.encap_drops.get_or_insert(self.dp.encap_drops);
        Arc::make_mut(&mut self.dp).encap_drops = v;
    }

    /// The host's interface addresses (for host endpoints matched by address).
    pub fn set_host_addrs(&mut self, addrs: BTreeMap<String, Vec<IpAddr>>) {
        if self.calc.host_addrs == addrs {
            return;
        }
        self.calc.host_addrs = addrs;
        self.refresh_host();
    }

    /// `logPrefix`.
    pub fn set_log_prefix(&mut self, v: &str) {
        self.calc.log_prefix = v.to_string();
        if self.rebuild || self.dp.log_prefix == v {
            return;
        }
        self.journal
            .log_prefix
            .get_or_insert_with(|| self.dp.log_prefix.clone());
        Arc::make_mut(&mut self.dp).log_prefix = v.to_string();
    }

    /// `failsafeInboundHostPorts` / `failsafeOutboundHostPorts`, and `vxlanPort`.
    pub fn set_host_config(
        &mut self,
        inbound: Vec<Failsafe>,
        outbound: Vec<Failsafe>,
        vxlan_port: u16,
    ) {
        self.calc.failsafe_in = inbound.clone();
        self.calc.failsafe_out = outbound.clone();
        self.calc.vxlan_port = vxlan_port;
        let h = &self.dp.host;
        if self.rebuild
            || (h.failsafe_in == inbound
                && h.failsafe_out == outbound
                && h.vxlan_port == vxlan_port)
        {
            return;
        }
        self.journal.host.get_or_insert_with(|| h.clone());
        let h = &mut Arc::make_mut(&mut self.dp).host;
        h.failsafe_in = inbound;
        h.failsafe_out = outbound;
        h.vxlan_port = vxlan_port;
    }

    /// This node's host endpoints computed again (they are few): what they use is taken
    /// before what they used is let go.
    fn refresh_host(&mut self) {
        if self.rebuild || (self.host_keys.is_empty() && self.dp.host.endpoints.is_empty()) {
            return;
        }
        let new = self.calc.host_endpoints(&self.labels);
        if new == self.dp.host.endpoints {
            return;
        }
        for h in new.values() {
            self.use_refs(host_policies(h), dedup(&h.profiles), true);
        }
        let old = self.dp.host.clone();
        for h in old.endpoints.values() {
            self.use_refs(host_policies(h), dedup(&h.profiles), false);
        }
        self.journal.host.get_or_insert(old);
        Arc::make_mut(&mut self.dp).host.endpoints = new;
    }

    /// An endpoint (of any node) added, changed (`Some`) or removed (`None`).
    pub fn endpoint(&mut self, key: &str, info: Option<EndpointInfo>) {
        let host = info.as_ref().is_some_and(|i| i.host)
            || self.calc.endpoints.get(key).is_some_and(|i| i.host);
        if info.as_ref().is_some_and(|i| i.host) {
            self.host_keys.insert(key.to_string());
        } else {
            self.host_keys.remove(key);
        }
        self.endpoint_inner(key, info);
        if host {
            self.refresh_host();
        }
    }

    fn endpoint_inner(&mut self, key: &str, info: Option<EndpointInfo>) {
        if self.rebuild {
            match info {
                Some(i) => self.calc.endpoints.insert(key.to_string(), i),
                None => self.calc.endpoints.remove(key),
            };
            return;
        }
        let new_labels = info.as_ref().map(|i| self.calc.labels(i));
        let old = match &info {
            Some(i) => self.calc.endpoints.insert(key.to_string(), i.clone()),
            None => self.calc.endpoints.remove(key),
        };
        let old_labels = match &new_labels {
            Some(l) => self.labels.insert(key.to_string(), l.clone()),
            None => self.labels.remove(key),
        };
        // Set members.
        let ids: Vec<String> = self.set_defs.keys().cloned().collect();
        for id in ids {
            let def = &self.set_defs[&id];
            let before = match (&old, &old_labels) {
                (Some(e), Some(l)) if def.selector.matches(l) => endpoint_members(e, def),
                _ => Vec::new(),
            };
            let after = match (&info, &new_labels) {
                (Some(e), Some(l)) if def.selector.matches(l) => endpoint_members(e, def),
                _ => Vec::new(),
            };
            if before != after {
                for m in after {
                    self.count(&id, m, true);
                }
                for m in before {
                    self.count(&id, m, false);
                }
            }
        }
        // The endpoint's own chains, when local: take the new users before letting the
        // old go, so that a policy both use is not dropped and made again.
        let new_ep = match (&info, &new_labels) {
            (Some(i), Some(l)) if self.calc.is_local(i) => {
                Some((i.iface.clone(), self.calc.endpoint(i, l)))
            }
            _ => None,
        };
        let old_iface = self.ifaces.remove(key);
        let old_ep = old_iface
            .as_ref()
            .and_then(|i| self.dp.endpoints.get(i).cloned());
        if let Some((iface, ep)) = &new_ep {
            self.use_chains(ep, true);
            self.ifaces.insert(key.to_string(), iface.clone());
            self.put_endpoint(iface, Some(ep.clone()));
        }
        if let Some(ep) = &old_ep {
            self.use_chains(ep, false);
        }
        if let Some(old_iface) = old_iface
            && new_ep.as_ref().is_none_or(|(i, _)| *i != old_iface)
        {
            self.put_endpoint(&old_iface, None);
        }
    }

    /// A network set added, changed or removed.
    pub fn net_set(&mut self, key: &str, info: Option<NetSetInfo>) {
        let old = match &info {
            Some(i) => self.calc.net_sets.insert(key.to_string(), i.clone()),
            None => self.calc.net_sets.remove(key),
        };
        if self.rebuild {
            return;
        }
        // Labels with the namespace profile's, as it is now (a profile change takes the
        // set out under the old labels first: see `profile`).
        let labels = |s: &Option<NetSetInfo>| s.as_ref().map(|s| self.calc.net_set_labels(s));
        let (old_labels, new_labels) = (labels(&old), labels(&info));
        let ids: Vec<String> = self.set_defs.keys().cloned().collect();
        for id in ids {
            let def = &self.set_defs[&id];
            if def.named_port.is_some() {
                continue;
            }
            let nets =
                |s: &Option<NetSetInfo>, l: &Option<BTreeMap<String, String>>| -> Vec<Member> {
                    match (s, l) {
                        (Some(s), Some(l)) if def.selector.matches(l) => {
                            s.nets.iter().map(|n| Member::Net(*n)).collect()
                        }
                        _ => Vec::new(),
                    }
                };
            let (before, after) = (nets(&old, &old_labels), nets(&info, &new_labels));
            if before != after {
                for m in after {
                    self.count(&id, m, true);
                }
                for m in before {
                    self.count(&id, m, false);
                }
            }
        }
    }

    /// The dataplane now and what changed since the last take.
    pub fn take(&mut self) -> (Arc<PolicyDataplane>, Delta) {
        if self.rebuild {
            self.rebuild_all();
        }
        let j = std::mem::take(&mut self.journal);
        let dp = &*self.dp;
        let mut d = Delta {
            endpoints: changed(j.endpoints, &dp.endpoints),
            policies: changed(j.policies, &dp.policies),
            profiles: changed(j.profiles, &dp.profiles),
            endpoint_to_host: j.endpoint_to_host.is_some_and(|v| v != dp.endpoint_to_host),
            encap_drops: j.encap_drops.is_some_and(|v| v != dp.encap_drops),
            host: j.host.is_some_and(|v| v != dp.host),
            log_prefix: j.log_prefix.is_some_and(|v| v != dp.log_prefix),
            ..Default::default()
        };
        for (id, existed) in &j.sets {
            if *existed != dp.sets.contains_key(id) {
                d.sets.insert(id.clone());
            }
        }
        for (id, members) in j.members {
            if d.sets.contains(&id) {
                continue;
            }
            let Some(set) = dp.sets.get(&id) else {
                continue;
            };
            let mut add = Vec::new();
            let mut del = Vec::new();
            for (m, was) in members {
                let now = contains(set, m);
                if was && !now {
                    del.push(m);
                } else if !was && now {
                    add.push(m);
                }
            }
            if !add.is_empty() {
                d.added.insert(id.clone(), collect(set, add));
            }
            if !del.is_empty() {
                d.removed.insert(id, collect(set, del));
            }
        }
        (self.dp.clone(), d)
    }

    /// Recompute everything from the inputs; the journal records what differs.
    fn rebuild_all(&mut self) {
        self.rebuild = false;
        self.host_keys = self
            .calc
            .endpoints
            .iter()
            .filter(|(_, e)| e.host)
            .map(|(k, _)| k.clone())
            .collect();
        self.labels = self.calc.all_labels();
        let (mut new, defs) = self.calc.without_members(&self.labels);
        let defs: BTreeMap<String, SetDef> =
            defs.into_iter().map(|(k, v)| (k, v.clone())).collect();
        self.ifaces = self
            .calc
            .endpoints
            .iter()
            .filter(|(_, e)| self.calc.is_local(e))
            .map(|(k, e)| (k.clone(), e.iface.clone()))
            .collect();
        self.policy_users.clear();
        self.profile_users.clear();
        let users = new
            .endpoints
            .values()
            .map(|ep| (endpoint_policies(ep), dedup(&ep.profiles)))
            .chain(
                new.host
                    .endpoints
                    .values()
                    .map(|h| (host_policies(h), dedup(&h.profiles))),
            );
        for (policies, profiles) in users {
            for id in policies {
                *self.policy_users.entry(id).or_default() += 1;
            }
            for p in profiles {
                *self.profile_users.entry(p.clone()).or_default() += 1;
            }
        }
        self.set_defs.clear();
        self.set_users.clear();
        self.held_policy_sets.clear();
        self.held_profile_sets.clear();
        for id in self.policy_users.keys() {
            let sets = &self.calc.policies[id].sets;
            for (sid, def) in sets {
                self.set_defs.insert(sid.clone(), def.clone());
                *self.set_users.entry(sid.clone()).or_default() += 1;
            }
            self.held_policy_sets.insert(id.clone(), sets.clone());
        }
        for name in self.profile_users.keys() {
            let sets = &self.calc.profiles[name].sets;
            for (sid, def) in sets {
                self.set_defs.insert(sid.clone(), def.clone());
                *self.set_users.entry(sid.clone()).or_default() += 1;
            }
            self.held_profile_sets.insert(name.clone(), sets.clone());
        }
        debug_assert_eq!(
            self.set_defs.keys().collect::<Vec<_>>(),
            defs.keys().collect::<Vec<_>>()
        );
        self.counts = self
            .set_defs
            .iter()
            .map(|(id, def)| (id.clone(), self.count_from_scratch(def)))
            .collect();
        for (id, def) in &self.set_defs {
            new.sets.insert(id.clone(), set_of(def, &self.counts[id]));
        }
        // Journal: everything of the old and the new dataplane.
        let old = std::mem::take(&mut self.dp);
        for k in old.endpoints.keys().chain(new.endpoints.keys()) {
            self.journal
                .endpoints
                .entry(k.clone())
                .or_insert_with(|| old.endpoints.get(k).cloned());
        }
        for k in old.policies.keys().chain(new.policies.keys()) {
            self.journal
                .policies
                .entry(k.clone())
                .or_insert_with(|| old.policies.get(k).cloned());
        }
        for k in old.profiles.keys().chain(new.profiles.keys()) {
            self.journal
                .profiles
                .entry(k.clone())
                .or_insert_with(|| old.profiles.get(k).cloned());
        }
        for (id, set) in &old.sets {
            self.journal.sets.entry(id.clone()).or_insert(true);
            let j = self.journal.members.entry(id.clone()).or_default();
            for m in members_of(set) {
                j.entry(m).or_insert(true);
            }
        }
        for (id, set) in &new.sets {
            self.journal.sets.entry(id.clone()).or_insert(false);
            let j = self.journal.members.entry(id.clone()).or_default();
            for m in members_of(set) {
                j.entry(m).or_insert(false);
            }
        }
        if old.endpoint_to_host != new.endpoint_to_host {
            self.journal
                .endpoint_to_host
                .get_or_insert(old.endpoint_to_host);
        }
        if old.encap_drops != new.encap_drops {
            self.journal.encap_drops.get_or_insert(old.encap_drops);
        }
        if old.host != new.host {
            self.journal.host.get_or_insert_with(|| old.host.clone());
        }
        if old.log_prefix != new.log_prefix {
            self.journal
                .log_prefix
                .get_or_insert_with(|| old.log_prefix.clone());
        }
        self.dp = Arc::new(new);
    }

    fn count_from_scratch(&self, def: &SetDef) -> BTreeMap<Member, u32> {
        let mut c = BTreeMap::new();
        for (k, e) in &self.calc.endpoints {
            if def.selector.matches(&self.labels[k]) {
                for m in endpoint_members(e, def) {
                    *c.entry(m).or_default() += 1;
                }
            }
        }
        if def.named_port.is_none() {
            for s in self.calc.net_sets.values() {
                if def.selector.matches(&self.calc.net_set_labels(s)) {
                    for n in &s.nets {
                        *c.entry(Member::Net(*n)).or_default() += 1;
                    }
                }
            }
        }
        c
    }

    /// One more (or one less) giver of `m` in set `id`.
    fn count(&mut self, id: &str, m: Member, add: bool) {
        let counts = self.counts.entry(id.to_string()).or_default();
        let n = counts.entry(m).or_default();
        if add {
            *n += 1;
            if *n == 1 {
                self.put_member(id, m, true);
            }
        } else {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.remove(&m);
                self.put_member(id, m, false);
            }
        }
    }

    fn put_member(&mut self, id: &str, m: Member, present: bool) {
        let Some(set) = Arc::make_mut(&mut self.dp).sets.get_mut(id) else {
            return;
        };
        let was = contains(set, m);
        if was == present {
            return;
        }
        self.journal
            .members
            .entry(id.to_string())
            .or_default()
            .entry(m)
            .or_insert(was);
        match (set, m) {
            (IpSet::Nets(s), Member::Net(n)) => {
                if present {
                    s.insert(n);
                } else {
                    s.remove(&n);
                }
            }
            (IpSet::Ports(s), Member::Port(a, p, o)) => {
                if present {
                    s.insert((a, p, o));
                } else {
                    s.remove(&(a, p, o));
                }
            }
            _ => {}
        }
    }

    fn put_endpoint(&mut self, iface: &str, ep: Option<Endpoint>) {
        if self.dp.endpoints.get(iface) == ep.as_ref() {
            return;
        }
        let prev = self.dp.endpoints.get(iface).cloned();
        self.journal
            .endpoints
            .entry(iface.to_string())
            .or_insert(prev);
        let dp = Arc::make_mut(&mut self.dp);
        match ep {
            Some(ep) => dp.endpoints.insert(iface.to_string(), ep),
            None => dp.endpoints.remove(iface),
        };
    }

    /// Take (`acquire`) or let go of the policies and profiles an endpoint uses.
    fn use_chains(&mut self, ep: &Endpoint, acquire: bool) {
        self.use_refs(endpoint_policies(ep), dedup(&ep.profiles), acquire);
    }

    /// Take or let go of policies and profiles for one user.
    fn use_refs(&mut self, policies: BTreeSet<String>, profiles: BTreeSet<&String>, acquire: bool) {
        for id in policies {
            let n = self.policy_users.entry(id.clone()).or_default();
            if acquire {
                *n += 1;
                if *n == 1 {
                    self.activate(&id, true, true);
                }
            } else {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.policy_users.remove(&id);
                    self.activate(&id, true, false);
                }
            }
        }
        for name in profiles {
            let n = self.profile_users.entry(name.clone()).or_default();
            if acquire {
                *n += 1;
                if *n == 1 {
                    self.activate(name, false, true);
                }
            } else {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.profile_users.remove(name);
                    self.activate(name, false, false);
                }
            }
        }
    }

    /// Program (or remove) a policy's (or profile's) chains and take (or let go of) the
    /// sets it holds.
    fn activate(&mut self, id: &str, policy: bool, on: bool) {
        let held = if policy {
            &mut self.held_policy_sets
        } else {
            &mut self.held_profile_sets
        };
        let sets = if on {
            let sets = if policy {
                self.calc.policies[id].sets.clone()
            } else {
                self.calc.profiles[id].sets.clone()
            };
            held.insert(id.to_string(), sets.clone());
            sets
        } else {
            held.remove(id).unwrap_or_default()
        };
        let chains = on.then(|| {
            if policy {
                self.calc.policies[id].chains.clone()
            } else {
                self.calc.profiles[id].chains.clone()
            }
        });
        self.put_chains(id, policy, chains);
        self.hold_sets(sets, on);
    }

    /// Put (or remove) a policy's or profile's chains.
    fn put_chains(&mut self, id: &str, policy: bool, chains: Option<Chains>) {
        let (map, journal) = if policy {
            (
                &mut Arc::make_mut(&mut self.dp).policies,
                &mut self.journal.policies,
            )
        } else {
            (
                &mut Arc::make_mut(&mut self.dp).profiles,
                &mut self.journal.profiles,
            )
        };
        journal
            .entry(id.to_string())
            .or_insert_with(|| map.get(id).cloned());
        match chains {
            Some(c) => map.insert(id.to_string(), c),
            None => map.remove(id),
        };
    }

    /// Take (or let go of) sets for one user.
    fn hold_sets(&mut self, sets: BTreeMap<String, SetDef>, on: bool) {
        for (sid, def) in sets {
            let n = self.set_users.entry(sid.clone()).or_default();
            if on {
                *n += 1;
                if *n == 1 {
                    self.create_set(&sid, def);
                }
            } else {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.set_users.remove(&sid);
                    self.remove_set(&sid);
                }
            }
        }
    }

    /// A profile added, changed or removed: its chains and sets are swapped in place when
    /// it is programmed, and the endpoints naming it are looked at again (its
    /// `labelsToApply` may change their labels, hence their sets and policies).
    pub fn profile(&mut self, name: &str, new: Option<super::calc::ResolvedProfile>) {
        // The network sets whose namespace profile this is: out under the old labels now,
        // back in under the new ones at the end.
        let sets: Vec<(String, NetSetInfo)> = if self.rebuild {
            Vec::new()
        } else {
            self.calc
                .net_sets
                .iter()
                .filter(|(_, s)| s.profiles.iter().any(|p| p == name))
                .map(|(k, s)| (k.clone(), s.clone()))
                .collect()
        };
        for (key, _) in &sets {
            self.net_set(key, None);
        }
        self.profile_inner(name, new);
        for (key, s) in sets {
            self.net_set(&key, Some(s));
        }
    }

    fn profile_inner(&mut self, name: &str, new: Option<super::calc::ResolvedProfile>) {
        let old = match &new {
            Some(p) => self.calc.profiles.insert(name.to_string(), p.clone()),
            None => self.calc.profiles.remove(name),
        };
        if self.rebuild || old == new {
            return;
        }
        if self.profile_users.contains_key(name) {
            let sets = new.as_ref().map(|p| p.sets.clone()).unwrap_or_default();
            self.hold_sets(sets.clone(), true);
            let old_sets = self
                .held_profile_sets
                .insert(name.to_string(), sets)
                .unwrap_or_default();
            self.hold_sets(old_sets, false);
            if let Some(p) = &new {
                self.put_chains(name, false, Some(p.chains.clone()));
            }
        }
        let naming: Vec<(String, EndpointInfo)> = self
            .calc
            .endpoints
            .iter()
            .filter(|(_, e)| e.profiles.iter().any(|p| p == name))
            .map(|(k, e)| (k.clone(), e.clone()))
            .collect();
        for (key, info) in naming {
            self.endpoint(&key, Some(info));
        }
    }

    /// A policy added, changed or removed (tiers and profiles unchanged): its chains and
    /// sets are swapped in place when it is programmed, and the local endpoints its old
    /// or new selector matches are recomputed. Costs one selector evaluation per local
    /// endpoint, plus the recomputation of the endpoints it selects.
    pub fn policy(&mut self, id: &str, new: Option<super::calc::ResolvedPolicy>) {
        let old = match &new {
            Some(p) => self.calc.policies.insert(id.to_string(), p.clone()),
            None => self.calc.policies.remove(id),
        };
        if self.rebuild || old == new {
            return;
        }
        if self.policy_users.contains_key(id) {
            // Programmed: the new version's sets before the old version's go (those both
            // use stay), then its chains.
            let sets = new.as_ref().map(|p| p.sets.clone()).unwrap_or_default();
            self.hold_sets(sets.clone(), true);
            let old_sets = self
                .held_policy_sets
                .insert(id.to_string(), sets)
                .unwrap_or_default();
            self.hold_sets(old_sets, false);
            if let Some(p) = &new {
                self.put_chains(id, true, Some(p.chains.clone()));
            }
        }
        let affected: Vec<(String, String)> = self
            .ifaces
            .iter()
            .filter(|(k, _)| {
                let l = &self.labels[*k];
                old.as_ref().is_some_and(|p| p.selector.matches(l))
                    || new.as_ref().is_some_and(|p| p.selector.matches(l))
            })
            .map(|(k, i)| (k.clone(), i.clone()))
            .collect();
        for (key, iface) in affected {
            let info = &self.calc.endpoints[&key];
            let ep = self.calc.endpoint(info, &self.labels[&key]);
            let old_ep = self.dp.endpoints.get(&iface).cloned();
            self.use_chains(&ep, true);
            if let Some(o) = &old_ep {
                self.use_chains(o, false);
            }
            self.put_endpoint(&iface, Some(ep));
        }
        self.refresh_host();
    }

    fn create_set(&mut self, id: &str, def: SetDef) {
        let counts = self.count_from_scratch(&def);
        let set = set_of(&def, &counts);
        self.journal.sets.entry(id.to_string()).or_insert(false);
        // Members a set had at the last take were journaled when it went; others were
        // not in it then.
        let j = self.journal.members.entry(id.to_string()).or_default();
        for m in members_of(&set) {
            j.entry(m).or_insert(false);
        }
        self.set_defs.insert(id.to_string(), def);
        self.counts.insert(id.to_string(), counts);
        Arc::make_mut(&mut self.dp).sets.insert(id.to_string(), set);
    }

    fn remove_set(&mut self, id: &str) {
        self.set_defs.remove(id);
        self.counts.remove(id);
        let Some(set) = Arc::make_mut(&mut self.dp).sets.remove(id) else {
            return;
        };
        self.journal.sets.entry(id.to_string()).or_insert(true);
        let j = self.journal.members.entry(id.to_string()).or_default();
        for m in members_of(&set) {
            j.entry(m).or_insert(true);
        }
    }
}

/// The keys whose value at the last take differs from now.
fn changed<V: PartialEq>(
    prev: BTreeMap<String, Option<V>>,
    now: &BTreeMap<String, V>,
) -> BTreeSet<String> {
    prev.into_iter()
        .filter(|(k, v)| v.as_ref() != now.get(k))
        .map(|(k, _)| k)
        .collect()
}

fn dedup(v: &[String]) -> BTreeSet<&String> {
    v.iter().collect()
}

/// The policies an endpoint uses, each once.
fn endpoint_policies(ep: &Endpoint) -> BTreeSet<String> {
    ep.ingress
        .iter()
        .chain(&ep.egress)
        .flat_map(|t| t.policies.iter().cloned())
        .collect()
}

/// The policies a host endpoint uses, each once.
fn host_policies(h: &HostEndpoint) -> BTreeSet<String> {
    h.policies().cloned().collect()
}

/// What an endpoint the selector matches gives the set.
fn endpoint_members(e: &EndpointInfo, def: &SetDef) -> Vec<Member> {
    match &def.named_port {
        None => e.nets.iter().map(|n| Member::Net(*n)).collect(),
        Some((proto, name)) => super::calc::port_members(e, *proto, name)
            .into_iter()
            .map(|(a, p, o)| Member::Port(a, p, o))
            .collect(),
    }
}

/// A set's members from their counts.
fn set_of(def: &SetDef, counts: &BTreeMap<Member, u32>) -> IpSet {
    match def.named_port {
        None => IpSet::Nets(
            counts
                .keys()
                .filter_map(|m| match m {
                    Member::Net(n) => Some(*n),
                    Member::Port(..) => None,
                })
                .collect(),
        ),
        Some(_) => IpSet::Ports(
            counts
                .keys()
                .filter_map(|m| match m {
                    Member::Port(a, p, o) => Some((*a, *p, *o)),
                    Member::Net(_) => None,
                })
                .collect(),
        ),
    }
}

fn contains(set: &IpSet, m: Member) -> bool {
    match (set, m) {
        (IpSet::Nets(s), Member::Net(n)) => s.contains(&n),
        (IpSet::Ports(s), Member::Port(a, p, o)) => s.contains(&(a, p, o)),
        _ => false,
    }
}

fn collect(set: &IpSet, ms: Vec<Member>) -> IpSet {
    match set {
        IpSet::Nets(_) => IpSet::Nets(
            ms.into_iter()
                .filter_map(|m| match m {
                    Member::Net(n) => Some(n),
                    Member::Port(..) => None,
                })
                .collect(),
        ),
        IpSet::Ports(_) => IpSet::Ports(
            ms.into_iter()
                .filter_map(|m| match m {
                    Member::Port(a, p, o) => Some((a, p, o)),
                    Member::Net(_) => None,
                })
                .collect(),
        ),
    }
}

#[cfg(test)]
#[path = "index_tests.rs"]
mod tests;
