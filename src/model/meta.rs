//! The v3 resource envelope (`kind`, `apiVersion`, `metadata`, `spec`) shared by every kind.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// `apiVersion` of every Calico v3 resource.
pub const API_VERSION: &str = "projectcalico.org/v3";

/// Kubernetes object metadata, every field of Kubernetes' `ObjectMeta` in its order, so
/// that nothing a user (or Calico) wrote is lost on a read-modify-write. An unknown field is
/// refused by name, as Calico's strict decoding does. (No `#[serde(flatten)]`: it would
/// buffer every document and make decoding several times slower.)
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ObjectMeta {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generate_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub self_link: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    /// The etcd ModRevision of the key; never stored (Calico fills it on read).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creation_timestamp: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deletion_timestamp: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deletion_grace_period_seconds: Option<i64>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner_references: Option<Value>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub finalizers: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub managed_fields: Option<Value>,
}

/// A v3 resource: `Resource<IPPoolSpec>` is an IPPool.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Resource<S> {
    pub kind: String,
    #[serde(rename = "apiVersion")]
    pub api_version: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: S,
    /// Status sub-resource (Node has one); passed through untouched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Value>,
    /// Fields of the stored value this version does not model (a newer Calico's), put
    /// back when the resource is written (see [`super::stored`]). Never part of user input.
    #[serde(skip)]
    pub unknown: super::stored::UnknownFields,
}

impl<S: super::Kind> Resource<S> {
    /// A new resource of this kind with the given name and spec.
    pub fn new(name: impl Into<String>, spec: S) -> Self {
        Resource {
            kind: S::KIND.to_string(),
            api_version: API_VERSION.to_string(),
            metadata: ObjectMeta {
                name: name.into(),
                ..Default::default()
            },
            spec,
            status: None,
            unknown: Default::default(),
        }
    }

    /// The resource's namespace, defaulted to `default` for namespaced kinds.
    pub fn namespace(&self) -> Option<&str> {
        if S::NAMESPACED {
            Some(self.metadata.namespace.as_deref().unwrap_or("default"))
        } else {
            None
        }
    }

    /// `resourceVersion` parsed as an etcd revision.
    pub fn revision(&self) -> Option<i64> {
        self.metadata
            .resource_version
            .as_deref()
            .and_then(|r| r.parse().ok())
    }

    /// The etcd key this resource lives at (REFERENCE §1).
    pub fn key(&self) -> String {
        super::keys::resource_key(S::PLURAL, self.namespace(), &self.metadata.name)
    }
}
