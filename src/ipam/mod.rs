//! Calico block IPAM. The records (blocks, affinities, handles, config) and their keys are
//! in `model::ipam` and `model::keys`; the allocator over a CAS store, its etcd store and
//! the garbage collector arrive with the pod-networking issue. The handle names below are
//! Calico's and are shared by the CNI plugin, Felix and `calicoctl ipam check`.

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
