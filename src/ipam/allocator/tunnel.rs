//! Node tunnel addresses (IPIP, VXLAN): one per node and kind, under Calico's handle
//! (`ipip-tunnel-addr-<node>`), from pools allowing `Tunnel` use.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;

use super::{AssignArgs, IpUse, Ipam, IpamError, IpamResult};

/// Which tunnel a node address is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TunnelKind {
    Ipip,
    Vxlan,
}

impl TunnelKind {
    /// Calico's handle: `ipip-tunnel-addr-<node>` / `vxlan-tunnel-addr-<node>`.
    pub fn handle(self, host: &str) -> String {
        match self {
            TunnelKind::Ipip => crate::ipam::ipip_tunnel_handle(host),
            TunnelKind::Vxlan => crate::ipam::vxlan_tunnel_handle(host),
        }
    }

    /// The allocation's `type` attribute.
    pub fn attribute(self) -> &'static str {
        match self {
            TunnelKind::Ipip => "ipipTunnelAddress",
            TunnelKind::Vxlan => "vxlanTunnelAddress",
        }
    }
}

impl Ipam {
    /// A node's tunnel address (IPIP or VXLAN): the one it already holds, else a new one
    /// from a pool allowing `Tunnel` use, owned by Calico's handle for it. None when no
    /// pool allows tunnel addresses on this node.
    pub async fn ensure_tunnel_address(
        &self,
        host: &str,
        kind: TunnelKind,
    ) -> IpamResult<Option<IpAddr>> {
        self.ensure_tunnel_address_in(host, kind, &[]).await
    }

    /// [`Ipam::ensure_tunnel_address`] from the given pools only (empty: any pool).
    pub async fn ensure_tunnel_address_in(
        &self,
        host: &str,
        kind: TunnelKind,
        pools: &[IpNet],
    ) -> IpamResult<Option<IpAddr>> {
        let handle = kind.handle(host);
        if let Some(ip) = self
            .ips_of_handle(&handle)
            .await?
            .into_iter()
            .find(IpAddr::is_ipv4)
        {
            return Ok(Some(ip));
        }
        self.assign_tunnel_address_in(host, kind, pools).await
    }

    /// A new tunnel address for `host` from the given pools (empty: any pool), for a caller
    /// that knows the handle holds none; None when no pool allows tunnel addresses.
    pub async fn assign_tunnel_address_in(
        &self,
        host: &str,
        kind: TunnelKind,
        pools: &[IpNet],
    ) -> IpamResult<Option<IpAddr>> {
        let handle = kind.handle(host);
        let attrs = BTreeMap::from([
            ("node".to_string(), host.to_string()),
            ("type".to_string(), kind.attribute().to_string()),
        ]);
        let args = AssignArgs {
            attrs,
            use_: IpUse::Tunnel,
            v4_pools: pools.to_vec(),
            ..AssignArgs::v4(&handle, host)
        };
        match self.auto_assign(&args).await {
            Ok(ips) => Ok(ips.into_iter().next()),
            Err(IpamError::NoPools { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Release a node's tunnel address (the pool's mode no longer needs it).
    pub async fn release_tunnel_address(
        &self,
        host: &str,
        kind: TunnelKind,
    ) -> IpamResult<Vec<IpAddr>> {
        self.release_by_handle(&kind.handle(host)).await
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::setup;
    use super::super::*;
    use super::*;

    #[tokio::test]
    async fn tunnel_addresses_are_stable_and_use_calicos_handles() {
        let (ipam, mem) = setup(&[("p", "10.65.0.0/24", 26)]).await;
        let ip = ipam
            .ensure_tunnel_address("node-1", TunnelKind::Vxlan)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            ipam.ensure_tunnel_address("node-1", TunnelKind::Vxlan)
                .await
                .unwrap(),
            Some(ip),
            "same address again"
        );
        let (block, _) = ipam
            .blocks(false)
            .await
            .unwrap()
            .into_iter()
            .next()
            .unwrap();
        let raw = String::from_utf8(
            mem.get(&keys::block_key(&block))
                .await
                .unwrap()
                .unwrap()
                .value,
        )
        .unwrap();
        assert!(raw.contains(r#""handle_id":"vxlan-tunnel-addr-node-1","secondary":{"node":"node-1","type":"vxlanTunnelAddress"}"#), "{raw}");
        assert_eq!(
            ipam.release_tunnel_address("node-1", TunnelKind::Vxlan)
                .await
                .unwrap(),
            vec![ip]
        );
        // No pool allows tunnels: no address, no error.
        let (ipam, _) = setup(&[]).await;
        assert_eq!(
            ipam.ensure_tunnel_address("node-1", TunnelKind::Ipip)
                .await
                .unwrap(),
            None
        );
    }
}
