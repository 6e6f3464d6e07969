//! IPPool: a range of pod addresses, its encapsulation and NAT (REFERENCE §2).

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::validate::{self, Validated, ValidationError};
use super::{Kind, ObjectMeta, Resource};

/// An IPPool resource.
pub type IPPool = Resource<IPPoolSpec>;

/// Encapsulation mode of a pool (`ipipMode`, `vxlanMode`).
pub const ENCAP_MODES: &[&str] = &["Always", "CrossSubnet", "Never"];

/// Calico's `IPPoolSpec`, fields in Calico's order.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IPPoolSpec {
    pub cidr: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vxlan_mode: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipip_mode: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub nat_outgoing: bool,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub disabled: bool,
    #[serde(
        default,
        rename = "disableBGPExport",
        skip_serializing_if = "std::ops::Not::not"
    )]
    pub disable_bgp_export: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_size: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_uses: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assignment_mode: Option<String>,
}

impl IPPoolSpec {
    /// The pool's network; `None` when the CIDR does not parse (validation refuses that).
    pub fn net(&self) -> Option<IpNet> {
        self.cidr.parse().ok()
    }

    /// `ipipMode`, defaulted.
    pub fn ipip(&self) -> &str {
        self.ipip_mode.as_deref().unwrap_or("Never")
    }

    /// `vxlanMode`, defaulted.
    pub fn vxlan(&self) -> &str {
        self.vxlan_mode.as_deref().unwrap_or("Never")
    }

    /// `blockSize`, defaulted per family (26 for IPv4, 122 for IPv6).
    pub fn block_size_or_default(&self) -> u32 {
        self.block_size.unwrap_or(match self.net() {
            Some(IpNet::V6(_)) => 122,
            _ => 26,
        })
    }

    /// `nodeSelector`, defaulted to `all()`.
    pub fn node_selector_or_default(&self) -> &str {
        self.node_selector.as_deref().unwrap_or("all()")
    }

    /// Whether this pool overlaps `other`.
    pub fn overlaps(&self, other: &IPPoolSpec) -> bool {
        match (self.net(), other.net()) {
            (Some(a), Some(b)) => a.contains(&b.network()) || b.contains(&a.network()),
            _ => false,
        }
    }
}

/// How a pool's traffic crosses nodes: Felix programs its routes by it, confd leaves VXLAN
/// pools out of BGP (Calico's `vxlan` backend needs no BGP).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encap {
    None,
    Ipip { cross_subnet: bool },
    Vxlan { cross_subnet: bool },
}

/// A pool's encapsulation (VXLAN wins if both are set; validation forbids that).
pub fn encap(pool: &IPPoolSpec) -> Encap {
    match (pool.vxlan(), pool.ipip()) {
        ("Always", _) => Encap::Vxlan {
            cross_subnet: false,
        },
        ("CrossSubnet", _) => Encap::Vxlan { cross_subnet: true },
        (_, "Always") => Encap::Ipip {
            cross_subnet: false,
        },
        (_, "CrossSubnet") => Encap::Ipip { cross_subnet: true },
        _ => Encap::None,
    }
}

impl Kind for IPPoolSpec {
    const KIND: &'static str = "IPPool";
    const PLURAL: &'static str = "ippools";

    fn set_defaults(&mut self, _meta: &mut ObjectMeta) {
        if let Ok(net) = self.cidr.parse::<IpNet>() {
            // Calico stores the canonical form (e.g. compressed IPv6).
            self.cidr = net.to_string();
        }
        self.block_size = Some(self.block_size_or_default());
        self.ipip_mode.get_or_insert_with(|| "Never".into());
        self.vxlan_mode.get_or_insert_with(|| "Never".into());
        self.node_selector.get_or_insert_with(|| "all()".into());
        self.allowed_uses
            .get_or_insert_with(|| vec!["Workload".into(), "Tunnel".into()]);
        self.assignment_mode
            .get_or_insert_with(|| "Automatic".into());
    }

    fn validate(&self, _meta: &ObjectMeta) -> Validated {
        let net = validate::cidr("spec.cidr", &self.cidr, true)?;
        let (min, max) = match net {
            IpNet::V4(_) => (20, 32),
            IpNet::V6(_) => (116, 128),
        };
        let bs = self.block_size_or_default();
        if !(min..=max).contains(&bs) {
            return Err(ValidationError::new(
                "spec.blockSize",
                bs,
                format!("block size must be between {min} and {max}"),
            ));
        }
        if u32::from(net.prefix_len()) > bs {
            return Err(ValidationError::new(
                "spec.cidr",
                &self.cidr,
                format!("IP pool is smaller than its block size /{bs}"),
            ));
        }
        let link_local: IpNet = match net {
            IpNet::V4(_) => "169.254.0.0/16".parse().expect("constant CIDR"),
            IpNet::V6(_) => "fe80::/10".parse().expect("constant CIDR"),
        };
        if link_local.contains(&net.network()) || net.contains(&link_local.network()) {
            return Err(ValidationError::new(
                "spec.cidr",
                &self.cidr,
                "IP pool range overlaps with the reserved link-local range",
            ));
        }
        validate::one_of("spec.ipipMode", self.ipip(), ENCAP_MODES)?;
        validate::one_of("spec.vxlanMode", self.vxlan(), ENCAP_MODES)?;
        if self.ipip() != "Never" && self.vxlan() != "Never" {
            return Err(ValidationError::new(
                "spec.vxlanMode",
                self.vxlan(),
                format!(
                    "ipipMode ({}) and vxlanMode cannot both be enabled on the same pool",
                    self.ipip()
                ),
            ));
        }
        if matches!(net, IpNet::V6(_)) && self.ipip() != "Never" {
            return Err(ValidationError::new(
                "spec.ipipMode",
                self.ipip(),
                "IPIP is not supported on an IPv6 pool",
            ));
        }
        validate::selector("spec.nodeSelector", self.node_selector_or_default())?;
        for (i, u) in self.allowed_uses.iter().flatten().enumerate() {
            validate::one_of(
                &format!("spec.allowedUses[{i}]"),
                u,
                &["Workload", "Tunnel", "LoadBalancer"],
            )?;
        }
        if let Some(m) = &self.assignment_mode {
            validate::one_of("spec.assignmentMode", m, &["Automatic", "Manual"])?;
        }
        Ok(())
    }

    fn validate_update(&self, old: &Self) -> Validated {
        if old.net() != self.net() {
            return Err(ValidationError::new(
                "spec.cidr",
                &self.cidr,
                format!("IPPool CIDR cannot be modified (was {})", old.cidr),
            ));
        }
        if old.block_size_or_default() != self.block_size_or_default() {
            return Err(ValidationError::new(
                "spec.blockSize",
                self.block_size_or_default(),
                format!(
                    "IPPool blockSize cannot be modified (was {})",
                    old.block_size_or_default()
                ),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(cidr: &str) -> IPPoolSpec {
        IPPoolSpec {
            cidr: cidr.into(),
            ..Default::default()
        }
    }

    fn err(spec: &IPPoolSpec) -> String {
        spec.validate(&ObjectMeta::default())
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn defaults_are_calicos() {
        let mut p = pool("10.65.0.0/16");
        p.set_defaults(&mut ObjectMeta::default());
        assert_eq!(p.block_size, Some(26));
        assert_eq!(p.ipip_mode.as_deref(), Some("Never"));
        assert_eq!(p.vxlan_mode.as_deref(), Some("Never"));
        assert_eq!(p.node_selector.as_deref(), Some("all()"));
        assert_eq!(
            p.allowed_uses,
            Some(vec!["Workload".into(), "Tunnel".into()])
        );
        assert_eq!(p.assignment_mode.as_deref(), Some("Automatic"));
        let mut p6 = pool("fd00:0::/48");
        p6.set_defaults(&mut ObjectMeta::default());
        assert_eq!(p6.block_size, Some(122));
        assert_eq!(p6.cidr, "fd00::/48");
    }

    #[test]
    fn rules_give_exact_messages() {
        assert_eq!(
            err(&pool("10.65.0.1/16")),
            "error with field spec.cidr = '10.65.0.1/16' (CIDR is not strictly masked; did you mean 10.65.0.0/16?)"
        );
        assert_eq!(
            err(&pool("10.65.0.0/33")),
            "error with field spec.cidr = '10.65.0.0/33' (not a valid CIDR)"
        );
        let mut p = pool("10.65.0.0/16");
        p.block_size = Some(19);
        assert_eq!(
            err(&p),
            "error with field spec.blockSize = '19' (block size must be between 20 and 32)"
        );
        let mut p = pool("10.65.0.0/28");
        p.block_size = Some(26);
        assert_eq!(
            err(&p),
            "error with field spec.cidr = '10.65.0.0/28' (IP pool is smaller than its block size /26)"
        );
        let mut p = pool("10.65.0.0/16");
        p.ipip_mode = Some("Always".into());
        p.vxlan_mode = Some("CrossSubnet".into());
        assert_eq!(
            err(&p),
            "error with field spec.vxlanMode = 'CrossSubnet' (ipipMode (Always) and vxlanMode cannot both be enabled on the same pool)"
        );
        let mut p = pool("10.65.0.0/16");
        p.ipip_mode = Some("always".into());
        assert_eq!(
            err(&p),
            "error with field spec.ipipMode = 'always' (must be one of: Always, CrossSubnet, Never)"
        );
        assert_eq!(
            err(&pool("169.254.0.0/20")),
            "error with field spec.cidr = '169.254.0.0/20' (IP pool range overlaps with the reserved link-local range)"
        );
        let mut p = pool("fd00::/48");
        p.ipip_mode = Some("Always".into());
        assert_eq!(
            err(&p),
            "error with field spec.ipipMode = 'Always' (IPIP is not supported on an IPv6 pool)"
        );
        let mut p = pool("fd00::/48");
        p.block_size = Some(26);
        assert_eq!(
            err(&p),
            "error with field spec.blockSize = '26' (block size must be between 116 and 128)"
        );
        let mut p = pool("10.65.0.0/16");
        p.allowed_uses = Some(vec!["Workload".into(), "Pods".into()]);
        assert_eq!(
            err(&p),
            "error with field spec.allowedUses[1] = 'Pods' (must be one of: Workload, Tunnel, LoadBalancer)"
        );
        let mut p = pool("10.65.0.0/16");
        p.node_selector = Some("has(a".into());
        assert!(err(&p).starts_with(
            "error with field spec.nodeSelector = 'has(a' (invalid selector at position"
        ));
    }

    #[test]
    fn cidr_and_block_size_are_immutable() {
        let old = pool("10.65.0.0/16");
        let e = pool("10.66.0.0/16").validate_update(&old).unwrap_err();
        assert_eq!(
            e.to_string(),
            "error with field spec.cidr = '10.66.0.0/16' (IPPool CIDR cannot be modified (was 10.65.0.0/16))"
        );
        let mut p = pool("10.65.0.0/16");
        p.block_size = Some(24);
        assert_eq!(
            p.validate_update(&old).unwrap_err().to_string(),
            "error with field spec.blockSize = '24' (IPPool blockSize cannot be modified (was 26))"
        );
        let mut p = pool("10.65.0.0/16");
        p.nat_outgoing = true;
        assert!(p.validate_update(&old).is_ok());
    }

    #[test]
    fn overlap_is_symmetric() {
        assert!(pool("10.0.0.0/8").overlaps(&pool("10.1.0.0/16")));
        assert!(pool("10.1.0.0/16").overlaps(&pool("10.0.0.0/8")));
        assert!(!pool("10.1.0.0/16").overlaps(&pool("10.2.0.0/16")));
    }
}
