//! Calico v3 resources (REFERENCE §1-2): their exact JSON, defaults and validation, the
//! IPAM v2 records, the etcd key layout and the selector language. Pure: no I/O.

pub mod asn;
pub mod bgp;
pub mod cluster;
pub mod felix;
pub mod gofloat;
pub mod hostendpoint;
pub mod ipam;
pub mod ippool;
pub mod keys;
pub mod meta;
pub mod networkset;
pub mod node;
pub mod policy;
pub mod rule;
pub mod selector;
pub mod stored;
pub mod sysctl;
pub mod tier;
pub mod validate;
pub mod workload;

use std::fmt::Debug;

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

pub use asn::AsNumber;
pub use bgp::{BGPConfiguration, BGPConfigurationSpec, BGPPeer, BGPPeerSpec};
pub use cluster::{ClusterInformation, ClusterInformationSpec};
pub use felix::{FelixConfiguration, FelixConfigurationSpec};
pub use hostendpoint::{HostEndpoint, HostEndpointSpec};
pub use ippool::{IPPool, IPPoolSpec};
pub use meta::{API_VERSION, ObjectMeta, Resource};
pub use networkset::{GlobalNetworkSet, GlobalNetworkSetSpec, NetworkSet, NetworkSetSpec};
pub use node::{Node, NodeSpec};
pub use policy::{
    GlobalNetworkPolicySpec, NetworkPolicySpec, ProfileSpec, StagedGlobalNetworkPolicySpec,
    StagedKubernetesNetworkPolicySpec, StagedNetworkPolicySpec,
};
pub use tier::{Tier, TierSpec};
pub use validate::{Validated, ValidationError};
pub use workload::{WorkloadEndpoint, WorkloadEndpointSpec};

/// A kind of v3 resource, implemented by its spec type.
pub trait Kind:
    Serialize + DeserializeOwned + Clone + Default + Debug + PartialEq + Send + Sync + 'static
{
    /// `kind` as Calico spells it (`IPPool`).
    const KIND: &'static str;
    /// The plural used in etcd keys (`ippools`).
    const PLURAL: &'static str;
    /// Namespaced kinds have a namespace segment in their key.
    const NAMESPACED: bool = false;

    /// Fill Calico's defaults (the Calico client does this before validating a write).
    fn set_defaults(&mut self, _meta: &mut ObjectMeta) {}
    /// Field validation of a spec on its own.
    fn validate(&self, _meta: &ObjectMeta) -> Validated {
        Ok(())
    }
    /// Rules that compare an update with the stored version (immutable fields).
    fn validate_update(&self, _old: &Self) -> Validated {
        Ok(())
    }
}

/// Static facts about a kind: names the CLI accepts and where it is stored.
#[derive(Debug)]
pub struct KindInfo {
    pub kind: &'static str,
    pub plural: &'static str,
    pub namespaced: bool,
    /// Names accepted by `calicoctl get` (singular, plural and short forms).
    pub aliases: &'static [&'static str],
}

/// Every kind this project stores, with calicoctl's names for it.
pub const KINDS: &[KindInfo] = &[
    KindInfo {
        kind: "IPPool",
        plural: "ippools",
        namespaced: false,
        aliases: &["ippool", "ippools", "ipp", "ipps", "pool", "pools"],
    },
    KindInfo {
        kind: "BGPConfiguration",
        plural: "bgpconfigurations",
        namespaced: false,
        aliases: &[
            "bgpconfiguration",
            "bgpconfigurations",
            "bgpconfig",
            "bgpconfigs",
        ],
    },
    KindInfo {
        kind: "BGPPeer",
        plural: "bgppeers",
        namespaced: false,
        aliases: &["bgppeer", "bgppeers", "bgpp", "bgpps", "bp", "bps"],
    },
    KindInfo {
        kind: "Node",
        plural: "nodes",
        namespaced: false,
        aliases: &["node", "nodes", "no", "nos"],
    },
    KindInfo {
        kind: "FelixConfiguration",
        plural: "felixconfigurations",
        namespaced: false,
        aliases: &[
            "felixconfiguration",
            "felixconfigurations",
            "felixconfig",
            "felixconfigs",
        ],
    },
    KindInfo {
        kind: "WorkloadEndpoint",
        plural: "workloadendpoints",
        namespaced: true,
        aliases: &["workloadendpoint", "workloadendpoints", "wep", "weps"],
    },
    KindInfo {
        kind: "HostEndpoint",
        plural: "hostendpoints",
        namespaced: false,
        aliases: &["hostendpoint", "hostendpoints", "hep", "heps"],
    },
    KindInfo {
        kind: "ClusterInformation",
        plural: "clusterinformations",
        namespaced: false,
        aliases: &[
            "clusterinformation",
            "clusterinformations",
            "clusterinfo",
            "clusterinfos",
        ],
    },
    KindInfo {
        kind: "Tier",
        plural: "tiers",
        namespaced: false,
        aliases: &["tier", "tiers"],
    },
    KindInfo {
        kind: "NetworkSet",
        plural: "networksets",
        namespaced: true,
        aliases: &["networkset", "networksets", "netsets"],
    },
    KindInfo {
        kind: "GlobalNetworkSet",
        plural: "globalnetworksets",
        namespaced: false,
        aliases: &["globalnetworkset", "globalnetworksets", "gnetsets"],
    },
    // The policy kinds, with calicoctl's names (calicoctl/calicoctl/resourcemgr/*.go).
    KindInfo {
        kind: "NetworkPolicy",
        plural: "networkpolicies",
        namespaced: true,
        aliases: &[
            "networkpolicy",
            "networkpolicies",
            "policy",
            "np",
            "policies",
            "pol",
            "pols",
        ],
    },
    KindInfo {
        kind: "GlobalNetworkPolicy",
        plural: "globalnetworkpolicies",
        namespaced: false,
        aliases: &[
            "globalnetworkpolicy",
            "globalnetworkpolicies",
            "gnp",
            "gnps",
        ],
    },
    KindInfo {
        kind: "StagedNetworkPolicy",
        plural: "stagednetworkpolicies",
        namespaced: true,
        aliases: &[
            "stagednetworkpolicy",
            "stagednetworkpolicies",
            "stagedpolicy",
            "snp",
            "stagedpolicies",
            "spol",
            "spols",
        ],
    },
    KindInfo {
        kind: "StagedGlobalNetworkPolicy",
        plural: "stagedglobalnetworkpolicies",
        namespaced: false,
        aliases: &[
            "stagedglobalnetworkpolicy",
            "stagedglobalnetworkpolicies",
            "sgnp",
            "sgnps",
        ],
    },
    KindInfo {
        kind: "StagedKubernetesNetworkPolicy",
        plural: "stagedkubernetesnetworkpolicies",
        namespaced: true,
        aliases: &[
            "stagedkubernetesnetworkpolicy",
            "stagedkubernetesnetworkpolicies",
            "stagedkubernetespolicy",
            "sknp",
            "stagedkubernetespolicies",
            "skpol",
            "skpols",
        ],
    },
    KindInfo {
        kind: "Profile",
        plural: "profiles",
        namespaced: false,
        aliases: &["profile", "profiles", "pro", "pros"],
    },
];

/// Find a kind by its `kind` name, plural or calicoctl alias (case-insensitive).
pub fn lookup_kind(name: &str) -> Option<&'static KindInfo> {
    let n = name.to_ascii_lowercase();
    KINDS.iter().find(|k| {
        k.kind.eq_ignore_ascii_case(&n) || k.plural == n || k.aliases.contains(&n.as_str())
    })
}

/// Find a kind by the plural of its etcd key.
pub fn kind_by_plural(plural: &str) -> Option<&'static KindInfo> {
    KINDS.iter().find(|k| k.plural == plural)
}

/// Why a document could not be decoded into a resource.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DecodeError {
    /// The document is not an object with `kind` and `apiVersion`.
    #[error("error with field {field} ({reason})")]
    Envelope { field: String, reason: String },
    /// A field does not decode (unknown field, wrong type, out-of-range value).
    #[error("error with field {path}: {message}")]
    Field { path: String, message: String },
}

/// Validate a whole resource: envelope, name, namespace and spec.
pub fn validate_resource<S: Kind>(r: &Resource<S>) -> Validated {
    if r.kind != S::KIND {
        return Err(ValidationError::new(
            "kind",
            &r.kind,
            format!("expected {}", S::KIND),
        ));
    }
    if r.api_version != API_VERSION {
        return Err(ValidationError::new(
            "apiVersion",
            &r.api_version,
            format!("expected {API_VERSION}"),
        ));
    }
    validate::name("metadata.name", &r.metadata.name)?;
    if S::NAMESPACED {
        if let Some(ns) = &r.metadata.namespace {
            validate::name("metadata.namespace", ns)?;
        }
    } else if let Some(ns) = &r.metadata.namespace
        && !ns.is_empty()
    {
        return Err(ValidationError::new(
            "metadata.namespace",
            ns,
            format!("{} is not a namespaced kind", S::KIND),
        ));
    }
    r.spec.validate(&r.metadata)
}

/// Fill defaults then validate: what the client does before every write.
pub fn prepare_resource<S: Kind>(r: &mut Resource<S>) -> Validated {
    r.spec.set_defaults(&mut r.metadata);
    if !S::NAMESPACED && r.metadata.namespace.as_deref() == Some("") {
        r.metadata.namespace = None;
    }
    validate_resource(r)
}

fn decode_typed<S: Kind>(v: Value) -> Result<Resource<S>, DecodeError> {
    serde_path_to_error::deserialize(v).map_err(|e| {
        let path = e.path().to_string();
        DecodeError::Field {
            path: if path == "." {
                "(document)".into()
            } else {
                path
            },
            message: e.into_inner().to_string(),
        }
    })
}

/// Decode a stored resource leniently, keeping its unknown fields in `unknown`.
pub fn decode_stored<S: Kind>(bytes: &[u8]) -> Result<Resource<S>, DecodeError> {
    let (mut r, unknown) = stored::decode_lenient::<Resource<S>>(bytes)?;
    r.unknown = unknown;
    Ok(r)
}

macro_rules! any_resource {
    ($($variant:ident => $spec:ty),* $(,)?) => {
        /// A resource of any kind, for code that handles several (calicoctl, the syncer).
        #[derive(Debug, Clone, PartialEq)]
        pub enum AnyResource {
            $($variant(Resource<$spec>)),*
        }

        impl AnyResource {
            /// `kind` as Calico spells it.
            pub fn kind(&self) -> &'static str {
                match self { $(AnyResource::$variant(_) => <$spec as Kind>::KIND),* }
            }
            /// Static facts about the kind.
            pub fn info(&self) -> &'static KindInfo {
                lookup_kind(self.kind()).expect("every AnyResource kind is in KINDS")
            }
            /// Metadata.
            pub fn meta(&self) -> &ObjectMeta {
                match self { $(AnyResource::$variant(r) => &r.metadata),* }
            }
            /// Mutable metadata.
            pub fn meta_mut(&mut self) -> &mut ObjectMeta {
                match self { $(AnyResource::$variant(r) => &mut r.metadata),* }
            }
            /// The etcd key of the resource.
            pub fn key(&self) -> String {
                match self { $(AnyResource::$variant(r) => r.key()),* }
            }
            /// The resource as a JSON value (fields in Calico's order), with the fields of
            /// a newer Calico it was read with.
            pub fn to_value(&self) -> Value {
                let (v, unknown) = match self { $(AnyResource::$variant(r) => (serde_json::to_value(r), &r.unknown)),* };
                let mut v = v.expect("resources always serialize");
                unknown.merge_into(&mut v);
                v
            }
            /// The fields of a newer Calico the resource was read with.
            pub fn unknown(&self) -> &stored::UnknownFields {
                match self { $(AnyResource::$variant(r) => &r.unknown),* }
            }
            /// Mutable access to those fields.
            pub fn unknown_mut(&mut self) -> &mut stored::UnknownFields {
                match self { $(AnyResource::$variant(r) => &mut r.unknown),* }
            }
            /// Fill defaults and validate.
            pub fn prepare(&mut self) -> Validated {
                match self { $(AnyResource::$variant(r) => prepare_resource(r)),* }
            }
            /// Validate without changing anything.
            pub fn validate(&self) -> Validated {
                match self { $(AnyResource::$variant(r) => validate_resource(r)),* }
            }
            /// Decode a resource of the named kind from JSON.
            pub fn decode(kind: &str, v: Value) -> Result<AnyResource, DecodeError> {
                match kind {
                    $(k if k == <$spec as Kind>::KIND => Ok(AnyResource::$variant(decode_typed::<$spec>(v)?)),)*
                    other => Err(DecodeError::Envelope {
                        field: "kind".into(),
                        reason: format!(
                            "'{other}' is not a supported kind (supported: {})",
                            KINDS.iter().map(|k| k.kind).collect::<Vec<_>>().join(", ")
                        ),
                    }),
                }
            }
            /// Decode stored JSON of the named kind, leniently: fields this version does not
            /// know are kept for a later write (see [`stored`]); user input goes through
            /// the strict [`AnyResource::from_document`].
            pub fn decode_slice(kind: &str, bytes: &[u8]) -> Result<AnyResource, DecodeError> {
                match kind {
                    $(k if k == <$spec as Kind>::KIND => Ok(AnyResource::$variant(decode_stored::<$spec>(bytes)?)),)*
                    other => Err(DecodeError::Envelope { field: "kind".into(), reason: format!("'{other}' is not a supported kind") }),
                }
            }
        }
    };
}

any_resource! {
    IPPool => IPPoolSpec,
    BGPConfiguration => BGPConfigurationSpec,
    BGPPeer => BGPPeerSpec,
    Node => NodeSpec,
    FelixConfiguration => FelixConfigurationSpec,
    WorkloadEndpoint => WorkloadEndpointSpec,
    HostEndpoint => HostEndpointSpec,
    ClusterInformation => ClusterInformationSpec,
    Tier => TierSpec,
    NetworkSet => NetworkSetSpec,
    GlobalNetworkSet => GlobalNetworkSetSpec,
    NetworkPolicy => NetworkPolicySpec,
    GlobalNetworkPolicy => GlobalNetworkPolicySpec,
    StagedNetworkPolicy => StagedNetworkPolicySpec,
    StagedGlobalNetworkPolicy => StagedGlobalNetworkPolicySpec,
    StagedKubernetesNetworkPolicy => StagedKubernetesNetworkPolicySpec,
    Profile => ProfileSpec,
}

impl AnyResource {
    /// Decode a user document: checks `apiVersion` and `kind`, then every field.
    pub fn from_document(v: Value) -> Result<AnyResource, DecodeError> {
        let obj = v.as_object().ok_or_else(|| DecodeError::Envelope {
            field: "(document)".into(),
            reason: "a resource must be a mapping with apiVersion, kind, metadata and spec".into(),
        })?;
        let api = obj.get("apiVersion").and_then(Value::as_str).unwrap_or("");
        if api != API_VERSION {
            return Err(DecodeError::Envelope {
                field: "apiVersion".into(),
                reason: format!("'{api}' is not supported, expected {API_VERSION}"),
            });
        }
        let kind = obj
            .get("kind")
            .and_then(Value::as_str)
            .ok_or_else(|| DecodeError::Envelope {
                field: "kind".into(),
                reason: "kind is required".into(),
            })?
            .to_string();
        AnyResource::decode(&kind, v)
    }

    /// The namespace (namespaced kinds only).
    pub fn namespace(&self) -> Option<&str> {
        if self.info().namespaced {
            Some(self.meta().namespace.as_deref().unwrap_or("default"))
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calicoctl_short_names_resolve() {
        assert_eq!(lookup_kind("ipp").unwrap().kind, "IPPool");
        assert_eq!(lookup_kind("IPPools").unwrap().kind, "IPPool");
        assert_eq!(lookup_kind("wep").unwrap().kind, "WorkloadEndpoint");
        assert_eq!(lookup_kind("bgpp").unwrap().kind, "BGPPeer");
        assert_eq!(lookup_kind("node").unwrap().kind, "Node");
        assert_eq!(
            lookup_kind("felixconfig").unwrap().kind,
            "FelixConfiguration"
        );
        assert!(lookup_kind("pods").is_none());
    }

    #[test]
    fn documents_decode_with_field_paths_in_errors() {
        let v = serde_json::json!({"apiVersion": API_VERSION, "kind": "IPPool",
            "metadata": {"name": "p"}, "spec": {"cidr": "10.0.0.0/16", "blockSize": "big"}});
        let e = AnyResource::from_document(v).unwrap_err().to_string();
        assert!(
            e.starts_with("error with field spec.blockSize: invalid type: string \"big\""),
            "{e}"
        );
        let v = serde_json::json!({"apiVersion": API_VERSION, "kind": "IPPool",
            "metadata": {"name": "p"}, "spec": {"cidr": "10.0.0.0/16", "ipipmode": "Always"}});
        let e = AnyResource::from_document(v).unwrap_err().to_string();
        assert!(
            e.starts_with(
                "error with field spec.ipipmode: unknown field `ipipmode`, expected one of"
            ),
            "{e}"
        );
        let v = serde_json::json!({"apiVersion": "v1", "kind": "IPPool"});
        assert_eq!(
            AnyResource::from_document(v).unwrap_err().to_string(),
            "error with field apiVersion ('v1' is not supported, expected projectcalico.org/v3)"
        );
    }

    #[test]
    fn stored_json_has_calicos_order_and_no_resource_version() {
        let mut p = IPPool::new(
            "default-ipv4-ippool",
            IPPoolSpec {
                cidr: "192.168.0.0/16".into(),
                nat_outgoing: true,
                ..Default::default()
            },
        );
        prepare_resource(&mut p).unwrap();
        assert_eq!(
            serde_json::to_string(&p).unwrap(),
            r#"{"kind":"IPPool","apiVersion":"projectcalico.org/v3","metadata":{"name":"default-ipv4-ippool"},"spec":{"cidr":"192.168.0.0/16","vxlanMode":"Never","ipipMode":"Never","natOutgoing":true,"blockSize":26,"nodeSelector":"all()","allowedUses":["Workload","Tunnel"],"assignmentMode":"Automatic"}}"#
        );
    }

    #[test]
    fn names_are_validated() {
        let p = IPPool::new(
            "Bad_Name",
            IPPoolSpec {
                cidr: "10.0.0.0/16".into(),
                ..Default::default()
            },
        );
        assert_eq!(
            validate_resource(&p).unwrap_err().to_string(),
            "error with field metadata.name = 'Bad_Name' (must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character)"
        );
    }
}
