//! ClusterInformation `default`: cluster identity and the `datastoreReady` switch the CNI
//! plugin checks before doing anything.

use serde::{Deserialize, Serialize};

use super::validate::{Validated, ValidationError};
use super::{Kind, ObjectMeta, Resource};

/// A ClusterInformation resource.
pub type ClusterInformation = Resource<ClusterInformationSpec>;

/// Calico's `ClusterInformationSpec`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClusterInformationSpec {
    #[serde(
        default,
        rename = "clusterGUID",
        skip_serializing_if = "String::is_empty"
    )]
    pub cluster_guid: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub cluster_type: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub calico_version: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub datastore_ready: Option<bool>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub variant: String,
}

impl Kind for ClusterInformationSpec {
    const KIND: &'static str = "ClusterInformation";
    const PLURAL: &'static str = "clusterinformations";

    fn validate(&self, meta: &ObjectMeta) -> Validated {
        if meta.name != "default" {
            return Err(ValidationError::new(
                "metadata.name",
                &meta.name,
                "the only ClusterInformation is named 'default'",
            ));
        }
        Ok(())
    }
}
