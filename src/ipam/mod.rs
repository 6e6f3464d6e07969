//! Calico block IPAM: pure block operations (`block`), the allocator over the datastore's
//! compare-and-swap (`allocator`), and Calico's handle names. The records and their keys
//! are in `model::ipam` and `model::keys`.

pub mod allocator;
pub mod block;
pub mod gc;

pub use allocator::{AssignArgs, IpUse, Ipam, IpamError, TunnelKind};

/// Handle of a node's IPIP tunnel address.
pub fn ipip_tunnel_handle(node: &str) -> String {
    format!("ipip-tunnel-addr-{node}")
}

/// Handle of a node's VXLAN tunnel address.
pub fn vxlan_tunnel_handle(node: &str) -> String {
    format!("vxlan-tunnel-addr-{node}")
}

/// Handle of a workload's addresses: `<cni-network-name>.<containerID>`.
pub fn workload_handle(network: &str, container_id: &str) -> String {
    format!("{network}.{container_id}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_use_calicos_names() {
        assert_eq!(ipip_tunnel_handle("node-1"), "ipip-tunnel-addr-node-1");
        assert_eq!(vxlan_tunnel_handle("node-1"), "vxlan-tunnel-addr-node-1");
        assert_eq!(
            workload_handle("k8s-pod-network", "abc"),
            "k8s-pod-network.abc"
        );
    }
}
