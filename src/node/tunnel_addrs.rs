//! This node's tunnel addresses (Calico's `allocateip`, run by `calico-node
//! -allocate-tunnel-addrs` apart from Felix): while an enabled pool uses VXLAN (IPIP), the
//! node holds an address from such a pool under Calico's handle `vxlan-tunnel-addr-<node>`
//! (`ipip-tunnel-addr-<node>`), written to `spec.ipv4VXLANTunnelAddr`
//! (`spec.bgp.ipv4IPIPTunnelAddr`); when no pool does, or the address lies outside them,
//! it is released and the field cleared.
//!
//! The daemon runs [`run`], an actor of its own fed by its own syncer subscription: it
//! writes IPAM and the Node, and Felix only reads the Node back (the other nodes route to
//! this one's VXLAN endpoint once its Node carries the address). `-allocate-tunnel-addrs`
//! calls [`reconcile`] once.
//!
//! ```text
//! syncer --SyncerEvent (pools, this Node)--> [tunnel-addrs] --IPAM, Node--> etcd
//! ```

use std::net::IpAddr;

use ipnet::IpNet;

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;
use tracing::Instrument;

use crate::datastore::client::{Client, ClientError};
use crate::datastore::syncer::{SyncStatus, SyncValue, SyncerEvent, UpdateType};
use crate::health::ActorResult;
use crate::health::HealthReporter;
use crate::ipam::{Ipam, TunnelKind};
use crate::model::AnyResource;
use crate::model::ippool::IPPoolSpec;
use crate::model::ippool::{Encap, encap};
use crate::model::keys::{IpamKey, parse_ipam_key};
use crate::model::node::NodeSpec;

fn field(spec: &NodeSpec, kind: TunnelKind) -> Option<String> {
    match kind {
        TunnelKind::Vxlan => spec.ipv4_vxlan_tunnel_addr.clone(),
        TunnelKind::Ipip => spec.bgp.as_ref()?.ipv4_ipip_tunnel_addr.clone(),
    }
}

fn set_field(spec: &mut NodeSpec, kind: TunnelKind, v: Option<String>) {
    match kind {
        TunnelKind::Vxlan => spec.ipv4_vxlan_tunnel_addr = v,
        TunnelKind::Ipip => {
            if let Some(bgp) = spec.bgp.as_mut() {
                bgp.ipv4_ipip_tunnel_addr = v;
            } else if v.is_some() {
                spec.bgp = Some(crate::model::node::NodeBGPSpec {
                    ipv4_ipip_tunnel_addr: v,
                    ..Default::default()
                });
            }
        }
    }
}

/// Make both tunnel addresses of `node` match `pools`; what changed, in words. The Node and
/// both handles are read at once, both kinds settled at once, and the Node written once:
/// a pool's mode change waits on as few datastore round trips as possible, since the other
/// nodes route to this one's VTEP only once its Node carries the address.
pub async fn reconcile(
    client: &Client,
    ipam: &Ipam,
    node: &str,
    pools: impl Iterator<Item = &IPPoolSpec> + Clone,
) -> Result<Vec<String>, String> {
    let wanted = |kind: TunnelKind| -> Vec<IpNet> {
        pools
            .clone()
            .filter(|p| !p.disabled)
            .filter(|p| {
                matches!(
                    (kind, encap(p)),
                    (TunnelKind::Vxlan, Encap::Vxlan { .. })
                        | (TunnelKind::Ipip, Encap::Ipip { .. })
                )
            })
            .filter_map(IPPoolSpec::net)
            .filter(|n| n.addr().is_ipv4())
            .collect()
    };
    let read_node = || async {
        client
            .get::<NodeSpec>(None, node)
            .await
            .map_err(|e| format!("reading node {node}: {e}"))?
            .ok_or_else(|| format!("node {node} is not in the datastore"))
    };
    let handles = [
        TunnelKind::Vxlan.handle(node),
        TunnelKind::Ipip.handle(node),
    ];
    let (n, held_vxlan, held_ipip) = tokio::join!(
        read_node(),
        ipam.ips_of_handle(&handles[0]),
        ipam.ips_of_handle(&handles[1])
    );
    let mut n = n?;
    let (vxlan, ipip) = tokio::join!(
        settle(
            ipam,
            node,
            TunnelKind::Vxlan,
            &n.spec,
            held_vxlan,
            wanted(TunnelKind::Vxlan)
        ),
        settle(
            ipam,
            node,
            TunnelKind::Ipip,
            &n.spec,
            held_ipip,
            wanted(TunnelKind::Ipip)
        )
    );
    let wants = [(TunnelKind::Vxlan, vxlan?), (TunnelKind::Ipip, ipip?)];
    // Up to two tries: the Node may change under us (CAS on its revision).
    for attempt in 0..2 {
        let mut changes = Vec::new();
        for (kind, want) in wants {
            if current(&n.spec, kind) != want {
                set_field(&mut n.spec, kind, want.map(|a| a.to_string()));
                changes.push(format!(
                    "{} tunnel address of {node}: {}",
                    kind.attribute(),
                    want.map_or("released".to_string(), |a| a.to_string())
                ));
            }
        }
        if changes.is_empty() {
            return Ok(changes);
        }
        match client.update(n).await {
            Ok(_) => return Ok(changes),
            Err(ClientError::Conflict(..)) if attempt == 0 => n = read_node().await?,
            Err(e) => return Err(format!("updating node {node}: {e}")),
        }
    }
    Ok(Vec::new())
}

/// The Node's address for one tunnel kind, when it is one.
fn current(spec: &NodeSpec, kind: TunnelKind) -> Option<IpAddr> {
    field(spec, kind).and_then(|a| a.split('/').next().and_then(|a| a.parse::<IpAddr>().ok()))
}

/// The address one tunnel kind should have (None: none), its handle made to hold exactly
/// that: kept when the handle holds it inside `wanted`, else released and, while a pool
/// wants this kind, a new one assigned.
async fn settle(
    ipam: &Ipam,
    node: &str,
    kind: TunnelKind,
    spec: &NodeSpec,
    held: Result<Vec<IpAddr>, crate::ipam::IpamError>,
    wanted: Vec<IpNet>,
) -> Result<Option<IpAddr>, String> {
    let held = held.map_err(|e| e.to_string())?;
    let in_wanted = |ip: &IpAddr| wanted.iter().any(|p| p.contains(ip));
    if !wanted.is_empty()
        && let Some(ip) = current(spec, kind).filter(|ip| in_wanted(ip) && held.contains(ip))
    {
        return Ok(Some(ip));
    }
    if wanted.is_empty() || held.iter().any(|ip| !in_wanted(ip)) {
        if !held.is_empty() {
            ipam.release_tunnel_address(node, kind)
                .await
                .map_err(|e| e.to_string())?;
        }
        if wanted.is_empty() {
            return Ok(None);
        }
    } else if let Some(ip) = held.iter().copied().find(IpAddr::is_ipv4) {
        // Held inside the pools, but not what the Node says: the Node is corrected.
        return Ok(Some(ip));
    }
    ipam.assign_tunnel_address_in(node, kind, &wanted)
        .await
        .map_err(|e| e.to_string())
}

/// Both kinds of tunnel address a node may hold.
const TUNNEL_KINDS: [TunnelKind; 2] = [TunnelKind::Vxlan, TunnelKind::Ipip];

/// First pause before a failed reconcile is tried again; it doubles up to [`MAX_RETRY`].
const FIRST_RETRY: Duration = Duration::from_secs(1);
const MAX_RETRY: Duration = Duration::from_secs(30);
/// How often the addresses are checked with nothing changed (a handle or Node edited by
/// hand is corrected): Felix's default `routeRefreshInterval`, at which its full passes
/// reconciled them before this actor took them over.
pub const RECHECK: Duration = Duration::from_secs(90);

/// What the tunnel addresses depend on, from the syncer: the IP pools and this Node.
#[derive(Debug, Default)]
pub struct View {
    node: String,
    pools: BTreeMap<String, IPPoolSpec>,
    /// This Node's key and spec.
    me: Option<(String, NodeSpec)>,
    in_sync: bool,
    /// Whether the pools or this Node changed since the last reconcile (or it never ran).
    dirty: bool,
}

impl View {
    pub fn new(node: &str) -> View {
        View {
            node: node.to_string(),
            dirty: true,
            ..Default::default()
        }
    }

    /// Fold one syncer event in.
    pub fn apply(&mut self, ev: &SyncerEvent) {
        let u = match ev {
            SyncerEvent::Status(s) => {
                self.in_sync = *s == SyncStatus::InSync;
                return;
            }
            SyncerEvent::Update(u) => u,
        };
        let key = u.key.as_str();
        // The IPAM records the addresses live in (a block holding one of them, this node's
        // tunnel handles): edited or released by someone else (`calicoctl ipam release`),
        // they are put right at once, as Felix's full pass after any block change did.
        if let Some(k) = parse_ipam_key(key) {
            self.dirty |= match k {
                IpamKey::Block(cidr) => self.addresses().any(|ip| cidr.contains(&ip)),
                IpamKey::Handle(id) => TUNNEL_KINDS.iter().any(|t| t.handle(&self.node) == id),
                IpamKey::Affinity { .. } | IpamKey::Config => false,
            };
            return;
        }
        let value = match (&u.update_type, u.value.as_deref()) {
            (UpdateType::Deleted, _) | (_, None) => None,
            (_, Some(v)) => Some(v),
        };
        let changed = match value {
            Some(SyncValue::Resource(AnyResource::IPPool(p))) => {
                self.pools.insert(key.to_string(), p.spec.clone()) != Some(p.spec.clone())
            }
            Some(SyncValue::Resource(AnyResource::Node(n))) if n.metadata.name == self.node => {
                let new = Some((key.to_string(), n.spec.clone()));
                std::mem::replace(&mut self.me, new.clone()) != new
            }
            Some(_) => false,
            None => {
                let mine = self.me.as_ref().is_some_and(|(k, _)| k == key);
                if mine {
                    self.me = None;
                }
                self.pools.remove(key).is_some() || mine
            }
        };
        self.dirty |= changed;
    }

    /// The tunnel addresses this Node carries.
    fn addresses(&self) -> impl Iterator<Item = IpAddr> + '_ {
        let spec = self.me.as_ref().map(|(_, spec)| spec);
        TUNNEL_KINDS
            .iter()
            .filter_map(move |t| spec.and_then(|s| current(s, *t)))
    }

    /// Whether a reconcile is due now: in sync, and something changed.
    pub fn due(&self) -> bool {
        self.in_sync && self.dirty
    }

    /// The pools, for a reconcile about to run (which clears `due`).
    pub fn take(&mut self) -> Vec<IPPoolSpec> {
        self.dirty = false;
        self.pools.values().cloned().collect()
    }

    /// Ask for a reconcile (a retry or the periodic check).
    pub fn recheck(&mut self) {
        self.dirty = true;
    }
}

/// The tunnel-address actor: reconcile whenever the pools or this Node change (once the
/// datastore is in sync), every [`RECHECK`], and after a failure with backoff; not ready
/// while the last reconcile failed. Runs until cancelled (`Ok`) or its feed closes.
pub async fn run(
    node: String,
    client: Client,
    mut feed: mpsc::Receiver<SyncerEvent>,
    health: HealthReporter,
    cancel: CancellationToken,
) -> ActorResult {
    health.set_ready(false, Some("waiting for the datastore".into()));
    let ipam = Ipam::new(client.datastore().clone());
    let mut view = View::new(&node);
    let mut retry = FIRST_RETRY;
    let mut wake = tokio::time::Instant::now() + RECHECK;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            ev = feed.recv() => match ev {
                Some(ev) => view.apply(&ev),
                None => return Err("its datastore feed closed".into()),
            },
            _ = tokio::time::sleep_until(wake) => {
                view.recheck();
                wake = tokio::time::Instant::now() + RECHECK;
            }
        }
        // Everything queued first: one reconcile for a burst of changes.
        while let Ok(ev) = feed.try_recv() {
            view.apply(&ev);
        }
        if !view.due() {
            continue;
        }
        let pools = view.take();
        // In a task of its own, awaited here and aborted with this actor: a panic in the
        // IPAM code becomes a failed reconcile, retried with backoff (as when Felix's pass
        // ran it), not the end of the actor.
        let task = {
            let (client, ipam, node) = (client.clone(), ipam.clone(), node.clone());
            let job = async move { reconcile(&client, &ipam, &node, pools.iter()).await };
            AbortOnDropHandle::new(tokio::spawn(job.in_current_span()))
        };
        let result = tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            r = task => r.unwrap_or_else(|e| Err(format!("the reconcile failed: {e}"))),
        };
        match result {
            Ok(changes) => {
                for c in changes {
                    tracing::info!("{c}");
                }
                health.set_ready(true, None);
                retry = FIRST_RETRY;
                wake = tokio::time::Instant::now() + RECHECK;
            }
            Err(e) => {
                let why = format!("tunnel addresses: {e}");
                tracing::warn!(retry_in = ?retry, "{why}");
                health.set_ready(false, Some(why));
                wake = tokio::time::Instant::now() + retry;
                retry = (retry * 2).min(MAX_RETRY);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::datastore::{Datastore, MemoryDatastore};
    use crate::model::{IPPool, Node};

    fn pool(cidr: &str, vxlan: &str, ipip: &str) -> IPPoolSpec {
        IPPoolSpec {
            cidr: cidr.into(),
            block_size: Some(30),
            vxlan_mode: Some(vxlan.into()),
            ipip_mode: Some(ipip.into()),
            ..Default::default()
        }
    }

    async fn setup() -> (Client, Ipam) {
        let ds: Arc<dyn Datastore> = Arc::new(MemoryDatastore::new());
        let client = Client::new(ds.clone());
        client
            .create(Node::new("node-a", NodeSpec::default()))
            .await
            .unwrap();
        (client, Ipam::new(ds))
    }

    async fn node(client: &Client) -> Node {
        client
            .get::<NodeSpec>(None, "node-a")
            .await
            .unwrap()
            .unwrap()
    }

    async fn held(ipam: &Ipam, kind: TunnelKind) -> Vec<IpAddr> {
        ipam.ips_of_handle(&kind.handle("node-a")).await.unwrap()
    }

    #[tokio::test]
    async fn addresses_follow_the_pools_both_kinds_at_once() {
        let (client, ipam) = setup().await;
        client
            .create(IPPool::new("p", pool("10.5.0.0/24", "Always", "Never")))
            .await
            .unwrap();
        let pools = [pool("10.5.0.0/24", "Always", "Never")];
        let changes = reconcile(&client, &ipam, "node-a", pools.iter())
            .await
            .unwrap();
        assert_eq!(changes.len(), 1, "{changes:?}");
        let vxlan = held(&ipam, TunnelKind::Vxlan).await;
        assert_eq!(vxlan.len(), 1);
        let n = node(&client).await;
        assert_eq!(n.spec.ipv4_vxlan_tunnel_addr, Some(vxlan[0].to_string()));
        // Nothing to do: nothing written.
        let rev = n.metadata.resource_version.clone();
        assert!(
            reconcile(&client, &ipam, "node-a", pools.iter())
                .await
                .unwrap()
                .is_empty()
        );
        assert_eq!(node(&client).await.metadata.resource_version, rev);

        // VXLAN -> IPIP: one address released and one assigned, in one pass.
        let pools = [pool("10.5.0.0/24", "Never", "Always")];
        let changes = reconcile(&client, &ipam, "node-a", pools.iter())
            .await
            .unwrap();
        assert_eq!(changes.len(), 2, "{changes:?}");
        assert!(held(&ipam, TunnelKind::Vxlan).await.is_empty());
        let ipip = held(&ipam, TunnelKind::Ipip).await;
        assert_eq!(ipip.len(), 1);
        let n = node(&client).await;
        assert_eq!(n.spec.ipv4_vxlan_tunnel_addr, None);
        let bgp = n.spec.bgp.as_ref().unwrap();
        assert_eq!(bgp.ipv4_ipip_tunnel_addr, Some(ipip[0].to_string()));

        // A Node edited by hand is corrected to the address its handle holds.
        let mut edited = n.clone();
        edited.spec.bgp.as_mut().unwrap().ipv4_ipip_tunnel_addr = Some("10.5.0.200".into());
        client.update(edited).await.unwrap();
        reconcile(&client, &ipam, "node-a", pools.iter())
            .await
            .unwrap();
        let n = node(&client).await;
        assert_eq!(
            n.spec.bgp.as_ref().unwrap().ipv4_ipip_tunnel_addr,
            Some(ipip[0].to_string())
        );
        assert_eq!(held(&ipam, TunnelKind::Ipip).await, ipip);

        // An address outside the pools now in use is replaced by one inside them.
        let pools = [pool("10.6.0.0/24", "Never", "Always")];
        client
            .create(IPPool::new("q", pool("10.6.0.0/24", "Never", "Always")))
            .await
            .unwrap();
        reconcile(&client, &ipam, "node-a", pools.iter())
            .await
            .unwrap();
        let moved = held(&ipam, TunnelKind::Ipip).await;
        assert_eq!(moved.len(), 1);
        assert!(pools[0].net().unwrap().contains(&moved[0]), "{moved:?}");

        // No pool wants a tunnel: everything released, the fields cleared.
        reconcile(&client, &ipam, "node-a", [].iter())
            .await
            .unwrap();
        assert!(held(&ipam, TunnelKind::Ipip).await.is_empty());
        let n = node(&client).await;
        assert_eq!(n.spec.bgp.as_ref().unwrap().ipv4_ipip_tunnel_addr, None);
        assert_eq!(n.spec.ipv4_vxlan_tunnel_addr, None);
    }

    fn event(key: &str, value: Option<AnyResource>) -> SyncerEvent {
        SyncerEvent::update(key, value.map(SyncValue::Resource))
    }

    fn pool_event(name: &str, spec: IPPoolSpec) -> SyncerEvent {
        let key = format!("/calico/resources/v3/projectcalico.org/ippools/{name}");
        event(&key, Some(AnyResource::IPPool(IPPool::new(name, spec))))
    }

    fn node_event(name: &str, spec: NodeSpec) -> SyncerEvent {
        let key = format!("/calico/resources/v3/projectcalico.org/nodes/{name}");
        event(&key, Some(AnyResource::Node(Node::new(name, spec))))
    }

    const IN_SYNC: SyncerEvent = SyncerEvent::Status(SyncStatus::InSync);

    #[test]
    fn the_view_asks_for_a_reconcile_when_pools_or_this_node_change_once_in_sync() {
        let mut v = View::new("node-a");
        v.apply(&pool_event("p", pool("10.5.0.0/24", "Always", "Never")));
        assert!(!v.due(), "not in sync yet");
        v.apply(&IN_SYNC);
        assert!(v.due(), "the first time in sync");
        assert_eq!(v.take().len(), 1);
        assert!(!v.due());
        // The same pool again, another node, a resync: nothing to do.
        v.apply(&pool_event("p", pool("10.5.0.0/24", "Always", "Never")));
        v.apply(&node_event("node-b", NodeSpec::default()));
        v.apply(&IN_SYNC);
        assert!(!v.due());
        // This node changed (a field edited by hand, or our own write).
        v.apply(&node_event("node-a", NodeSpec::default()));
        assert!(v.due());
        v.take();
        v.apply(&node_event("node-a", NodeSpec::default()));
        assert!(!v.due(), "unchanged");
        // A pool's mode changes, a pool goes, this Node goes.
        v.apply(&pool_event("p", pool("10.5.0.0/24", "Never", "Always")));
        assert!(v.due());
        v.take();
        let pools = "/calico/resources/v3/projectcalico.org/ippools/";
        v.apply(&event(&format!("{pools}p"), None));
        assert!(v.due());
        assert!(v.take().is_empty());
        v.apply(&event(&format!("{pools}unknown"), None));
        assert!(!v.due());
        v.apply(&event(
            "/calico/resources/v3/projectcalico.org/nodes/node-a",
            None,
        ));
        assert!(v.due());
        // While a resync is in progress, nothing is done.
        v.apply(&SyncerEvent::Status(SyncStatus::ResyncInProgress));
        assert!(!v.due());
    }

    /// The block holding one of this Node's tunnel addresses and this node's tunnel
    /// handles are watched (an address released by hand is put back at once); other IPAM
    /// records are not.
    #[test]
    fn the_ipam_records_of_this_nodes_addresses_ask_for_a_reconcile() {
        let ipam = "/calico/ipam/v2";
        let mut v = View::new("node-a");
        v.apply(&IN_SYNC);
        v.take();
        let spec = NodeSpec {
            ipv4_vxlan_tunnel_addr: Some("10.5.0.7".into()),
            ..Default::default()
        };
        v.apply(&node_event("node-a", spec));
        v.take();
        v.apply(&event(
            &format!("{ipam}/assignment/ipv4/block/10.6.0.0-26"),
            None,
        ));
        v.apply(&event(
            &format!("{ipam}/handle/vxlan-tunnel-addr-node-b"),
            None,
        ));
        v.apply(&event(
            &format!("{ipam}/host/node-a/ipv4/block/10.5.0.0-26"),
            None,
        ));
        assert!(
            !v.due(),
            "another block, another node's handle, an affinity"
        );
        v.apply(&event(
            &format!("{ipam}/assignment/ipv4/block/10.5.0.0-26"),
            None,
        ));
        assert!(v.due(), "the block holding 10.5.0.7");
        v.take();
        v.apply(&event(
            &format!("{ipam}/handle/ipip-tunnel-addr-node-a"),
            None,
        ));
        assert!(v.due(), "this node's handle");
    }

    fn ready(health: &crate::health::HealthAggregator) -> (bool, Option<String>) {
        let r = health.snapshot();
        let me = r
            .reporters
            .iter()
            .find(|r| r.name == "tunnel-addrs")
            .unwrap();
        (me.ready, me.reason.clone())
    }

    /// The actor allocates from the syncer's view alone (no Felix), and a failed reconcile
    /// (the Node not written yet) makes it not ready and is retried with backoff until it
    /// succeeds, with no datastore event to prompt it.
    #[tokio::test(start_paused = true)]
    async fn the_actor_follows_the_pools_and_retries_failures() {
        let ds: Arc<dyn Datastore> = Arc::new(MemoryDatastore::new());
        let client = Client::new(ds.clone());
        let ipam = Ipam::new(ds);
        let health = crate::health::HealthAggregator::new();
        let (tx, rx) = mpsc::channel(16);
        let cancel = CancellationToken::new();
        let actor = tokio::spawn(run(
            "node-a".into(),
            client.clone(),
            rx,
            health.register("tunnel-addrs"),
            cancel.clone(),
        ));
        let spec = pool("10.5.0.0/24", "Always", "Never");
        client.create(IPPool::new("p", spec.clone())).await.unwrap();
        tx.send(pool_event("p", spec)).await.unwrap();
        tx.send(IN_SYNC).await.unwrap();
        // No Node yet: not ready, saying why.
        let mut waited = 0;
        while matches!(
            ready(&health).1.as_deref(),
            Some("starting" | "waiting for the datastore")
        ) {
            tokio::time::sleep(Duration::from_millis(10)).await;
            waited += 1;
            assert!(waited < 100, "no reconcile");
        }
        let (ok, why) = ready(&health);
        assert!(!ok);
        let why = why.unwrap_or_default();
        assert!(
            why.contains("tunnel addresses: node node-a is not in the datastore"),
            "{why}"
        );
        // The Node appears (its event not even delivered): the retry allocates.
        client
            .create(Node::new("node-a", NodeSpec::default()))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(ready(&health), (true, None));
        let vxlan = held(&ipam, TunnelKind::Vxlan).await;
        assert_eq!(vxlan.len(), 1);
        assert_eq!(
            node(&client).await.spec.ipv4_vxlan_tunnel_addr,
            Some(vxlan[0].to_string())
        );
        // The pool turns to IPIP: the addresses follow.
        let mut p = client.get::<IPPoolSpec>(None, "p").await.unwrap().unwrap();
        p.spec = pool("10.5.0.0/24", "Never", "Always");
        client.update(p.clone()).await.unwrap();
        tx.send(pool_event("p", p.spec)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(held(&ipam, TunnelKind::Vxlan).await.is_empty());
        assert_eq!(held(&ipam, TunnelKind::Ipip).await.len(), 1);
        cancel.cancel();
        assert_eq!(actor.await.unwrap(), Ok(()));
        // A feed that closes ends the actor with the cause.
        let (tx, rx) = mpsc::channel(1);
        drop(tx);
        let r = run(
            "node-a".into(),
            client,
            rx,
            health.register("x"),
            CancellationToken::new(),
        );
        assert_eq!(r.await, Err("its datastore feed closed".to_string()));
    }
}
