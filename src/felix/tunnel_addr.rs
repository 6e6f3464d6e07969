//! This node's tunnel addresses (Calico's `allocateip`): while an enabled pool uses VXLAN
//! (IPIP), the node holds an address from such a pool under Calico's handle
//! `vxlan-tunnel-addr-<node>` (`ipip-tunnel-addr-<node>`), written to
//! `spec.ipv4VXLANTunnelAddr` (`spec.bgp.ipv4IPIPTunnelAddr`); when no pool does, or the
//! address lies outside them, it is released and the field cleared.

use std::net::IpAddr;

use ipnet::IpNet;

use super::calc::{Encap, encap};
use crate::datastore::client::{Client, ClientError};
use crate::ipam::{Ipam, TunnelKind};
use crate::model::ippool::IPPoolSpec;
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
}
