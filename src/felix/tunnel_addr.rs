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

/// Make both tunnel addresses of `node` match `pools`; what changed, in words.
pub async fn reconcile(
    client: &Client,
    ipam: &Ipam,
    node: &str,
    pools: impl Iterator<Item = &IPPoolSpec> + Clone,
) -> Result<Vec<String>, String> {
    let mut changes = Vec::new();
    for kind in [TunnelKind::Vxlan, TunnelKind::Ipip] {
        let wanted: Vec<IpNet> = pools
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
            .collect();
        // Up to two tries: the Node may change under us (CAS on its revision).
        for attempt in 0..2 {
            let Some(mut n) = client
                .get::<NodeSpec>(None, node)
                .await
                .map_err(|e| format!("reading node {node}: {e}"))?
            else {
                return Err(format!("node {node} is not in the datastore"));
            };
            let current = field(&n.spec, kind)
                .and_then(|a| a.split('/').next().and_then(|a| a.parse::<IpAddr>().ok()));
            let in_wanted = |ip: &IpAddr| wanted.iter().any(|p| p.contains(ip));
            let held = ipam
                .ips_of_handle(&kind.handle(node))
                .await
                .map_err(|e| e.to_string())?;
            let want = if wanted.is_empty() {
                None
            } else if let Some(ip) = current.filter(|ip| in_wanted(ip) && held.contains(ip)) {
                Some(ip)
            } else {
                if held.iter().any(|ip| !in_wanted(ip)) {
                    ipam.release_tunnel_address(node, kind)
                        .await
                        .map_err(|e| e.to_string())?;
                }
                ipam.ensure_tunnel_address_in(node, kind, &wanted)
                    .await
                    .map_err(|e| e.to_string())?
            };
            if want.is_none() && !held.is_empty() {
                ipam.release_tunnel_address(node, kind)
                    .await
                    .map_err(|e| e.to_string())?;
            }
            if want == current {
                break;
            }
            set_field(&mut n.spec, kind, want.map(|a| a.to_string()));
            match client.update(n).await {
                Ok(_) => {
                    changes.push(format!(
                        "{} tunnel address of {node}: {}",
                        kind.attribute(),
                        want.map_or("released".to_string(), |a| a.to_string())
                    ));
                    break;
                }
                Err(ClientError::Conflict(..)) if attempt == 0 => continue,
                Err(e) => return Err(format!("updating node {node}: {e}")),
            }
        }
    }
    Ok(changes)
}
