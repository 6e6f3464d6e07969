//! The policy kinds (REFERENCE §9): NetworkPolicy, GlobalNetworkPolicy, their staged
//! variants, StagedKubernetesNetworkPolicy and Profile, with Calico's JSON, its write-time
//! defaults (`api/pkg/defaults/networkpolicy.go`) and its validator's checks. Staged kinds
//! are stored and listed but never enforced, as in Calico.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::rule::{Rule, label_name_part, qualified_name, validate_rules};
use super::validate::{self, Validated, ValidationError};
use super::{Kind, ObjectMeta, Resource};

/// Label Calico's client puts on every policy: its tier (`default` when unset).
pub const LABEL_TIER: &str = "projectcalico.org/tier";
/// Name prefix of Kubernetes NetworkPolicies converted into etcd by kube-controllers
/// (`KubernetesNetworkPolicyEtcdPrefix`).
pub const KNP_PREFIX: &str = "knp.default.";
use super::tier::DEFAULT_TIER;

/// A NetworkPolicy resource (namespaced).
pub type NetworkPolicy = Resource<NetworkPolicySpec>;
/// A GlobalNetworkPolicy resource.
pub type GlobalNetworkPolicy = Resource<GlobalNetworkPolicySpec>;
/// A StagedNetworkPolicy resource (namespaced).
pub type StagedNetworkPolicy = Resource<StagedNetworkPolicySpec>;
/// A StagedGlobalNetworkPolicy resource.
pub type StagedGlobalNetworkPolicy = Resource<StagedGlobalNetworkPolicySpec>;
/// A StagedKubernetesNetworkPolicy resource (namespaced).
pub type StagedKubernetesNetworkPolicy = Resource<StagedKubernetesNetworkPolicySpec>;
/// A Profile resource.
pub type Profile = Resource<ProfileSpec>;

/// The fields every Calico policy spec shares, borrowed for the shared checks.
struct Common<'a> {
    tier: &'a str,
    order: Option<f64>,
    ingress: &'a [Rule],
    egress: &'a [Rule],
    selector: &'a str,
    types: &'a [String],
    service_account_selector: &'a str,
    performance_hints: &'a [String],
}

/// Calico's `defaultPolicyTypesField`: with no `types`, egress rules alone mean Egress,
/// both kinds mean both, anything else Ingress.
pub fn default_types(ingress: &[Rule], egress: &[Rule], types: &mut Vec<String>) {
    if !types.is_empty() {
        return;
    }
    *types = match (ingress.is_empty(), egress.is_empty()) {
        (_, true) => vec!["Ingress".into()],
        (true, false) => vec!["Egress".into()],
        (false, false) => vec!["Ingress".into(), "Egress".into()],
    };
}

/// Calico's `setTierLabel`.
fn set_tier_label(meta: &mut ObjectMeta, tier: &str) {
    let tier = if tier.is_empty() { DEFAULT_TIER } else { tier };
    meta.labels.insert(LABEL_TIER.into(), tier.into());
}

fn global_selector_check(field: &str, sel: &str) -> Validated {
    if sel.contains("global(") {
        return Err(ValidationError::new(
            field,
            sel,
            "global() can only be used in an EntityRule namespaceSelector",
        ));
    }
    if sel.is_empty() {
        Ok(())
    } else {
        validate::selector(field, sel)
    }
}

/// Check a list of unique values from a fixed set (`types`, `performanceHints`).
fn unique_of(field: &str, values: &[String], allowed: &[&str], what: &str) -> Validated {
    let mut seen = BTreeSet::new();
    for (i, t) in values.iter().enumerate() {
        validate::one_of(&format!("{field}[{i}]"), t, allowed)?;
        if !seen.insert(t) {
            return Err(ValidationError::new(
                field,
                values.join(","),
                format!("'{t}' {what} specified more than once"),
            ));
        }
    }
    Ok(())
}

impl Common<'_> {
    fn validate(&self) -> Validated {
        if !self.tier.is_empty() {
            validate::name("spec.tier", self.tier)?;
        }
        if let Some(o) = self.order
            && !o.is_finite()
        {
            return Err(ValidationError::new(
                "spec.order",
                o,
                "must be a finite number",
            ));
        }
        global_selector_check("spec.selector", self.selector)?;
        global_selector_check("spec.serviceAccountSelector", self.service_account_selector)?;
        unique_of("spec.types", self.types, &["Ingress", "Egress"], "type")?;
        unique_of(
            "spec.performanceHints",
            self.performance_hints,
            &["AssumeNeededOnEveryNode"],
            "hint",
        )?;
        validate_rules("spec.ingress", self.ingress)?;
        validate_rules("spec.egress", self.egress)?;
        validate_directions(self.ingress, self.egress)
    }
}

/// Services only as an ingress source or an egress destination; no L7 match on egress.
fn validate_directions(ingress: &[Rule], egress: &[Rule]) -> Validated {
    for (i, r) in egress.iter().enumerate() {
        if let Some(s) = &r.source.services {
            return Err(ValidationError::new(
                &format!("spec.egress[{i}].source.services"),
                &s.name,
                "not allowed in egress rule source",
            ));
        }
        if r.http.is_some() {
            return Err(ValidationError::new(
                &format!("spec.egress[{i}].http"),
                "",
                "not allowed in egress rule",
            ));
        }
    }
    for (i, r) in ingress.iter().enumerate() {
        if let Some(s) = &r.destination.services {
            return Err(ValidationError::new(
                &format!("spec.ingress[{i}].destination.services"),
                &s.name,
                "not allowed in ingress rule destination",
            ));
        }
    }
    Ok(())
}

/// GNPs have no namespace to qualify a service name with.
fn validate_global_services(ingress: &[Rule], egress: &[Rule]) -> Validated {
    let sides = egress
        .iter()
        .enumerate()
        .map(|(i, r)| (format!("spec.egress[{i}].destination"), &r.destination))
        .chain(
            ingress
                .iter()
                .enumerate()
                .map(|(i, r)| (format!("spec.ingress[{i}].source"), &r.source)),
        );
    for (f, e) in sides {
        if let Some(s) = &e.services
            && s.namespace.is_empty()
        {
            return Err(ValidationError::new(
                &format!("{f}.services.namespace"),
                "",
                "must specify a namespace",
            ));
        }
    }
    Ok(())
}

/// Calico's policy name rules: a DNS label, optionally `<tier>.<label>` (older names), and
/// for NetworkPolicy also `knp.default.`/`ossg.default.` + subdomain; at most 253 bytes.
fn policy_name(name: &str, namespaced: bool) -> Validated {
    let label = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !s.starts_with('-')
            && !s.ends_with('-')
    };
    if name.len() > 253 {
        return Err(ValidationError::new(
            "metadata.name",
            name,
            format!("name is too long by {} bytes", name.len() - 253),
        ));
    }
    let parts: Vec<&str> = name.split('.').collect();
    let ok = match parts.as_slice() {
        [a] => label(a),
        [a, b] => label(a) && label(b),
        [p, "default", rest @ ..] if namespaced && (*p == "knp" || *p == "ossg") => {
            !rest.is_empty() && rest.iter().all(|s| label(s))
        }
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(ValidationError::new(
            "metadata.name",
            name,
            "name must consist of lower case alphanumeric characters or '-' (regex: [a-z0-9]([-a-z0-9]*[a-z0-9])?)",
        ))
    }
}

/// `stagedAction`: Set (the default), Delete, Learn or Ignore.
fn staged_action(value: &str) -> Validated {
    if value.is_empty() {
        return Ok(());
    }
    validate::one_of(
        "spec.stagedAction",
        value,
        &["Set", "Delete", "Learn", "Ignore"],
    )
}

/// Calico's `NetworkPolicySpec`, fields in Calico's order.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NetworkPolicySpec {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub tier: String,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        serialize_with = "crate::model::gofloat::json"
    )]
    pub order: Option<f64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ingress: Vec<Rule>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub egress: Vec<Rule>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub selector: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub types: Vec<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub service_account_selector: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub performance_hints: Vec<String>,
}

impl NetworkPolicySpec {
    fn common(&self) -> Common<'_> {
        Common {
            tier: &self.tier,
            order: self.order,
            ingress: &self.ingress,
            egress: &self.egress,
            selector: &self.selector,
            types: &self.types,
            service_account_selector: &self.service_account_selector,
            performance_hints: &self.performance_hints,
        }
    }
}

impl Kind for NetworkPolicySpec {
    const KIND: &'static str = "NetworkPolicy";
    const PLURAL: &'static str = "networkpolicies";
    const NAMESPACED: bool = true;

    fn set_defaults(&mut self, meta: &mut ObjectMeta) {
        meta.namespace.get_or_insert_with(|| "default".into());
        default_types(&self.ingress, &self.egress, &mut self.types);
        set_tier_label(meta, &self.tier);
    }

    fn validate(&self, meta: &ObjectMeta) -> Validated {
        policy_name(&meta.name, true)?;
        // In etcd mode kube-controllers stores Kubernetes NetworkPolicies under this
        // prefix; calicoctl refuses to write Calico policies there.
        if meta.name.starts_with(KNP_PREFIX) {
            return Err(ValidationError::new(
                "metadata.name",
                &meta.name,
                "kubernetes network policies must be managed through the kubernetes API",
            ));
        }
        self.common().validate()
    }
}

/// Calico's `GlobalNetworkPolicySpec`, fields in Calico's order.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GlobalNetworkPolicySpec {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub tier: String,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        serialize_with = "crate::model::gofloat::json"
    )]
    pub order: Option<f64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ingress: Vec<Rule>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub egress: Vec<Rule>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub selector: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub types: Vec<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub do_not_track: bool,
    #[serde(
        default,
        rename = "preDNAT",
        skip_serializing_if = "std::ops::Not::not"
    )]
    pub pre_dnat: bool,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub apply_on_forward: bool,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub service_account_selector: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub namespace_selector: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub performance_hints: Vec<String>,
}

impl GlobalNetworkPolicySpec {
    fn common(&self) -> Common<'_> {
        Common {
            tier: &self.tier,
            order: self.order,
            ingress: &self.ingress,
            egress: &self.egress,
            selector: &self.selector,
            types: &self.types,
            service_account_selector: &self.service_account_selector,
            performance_hints: &self.performance_hints,
        }
    }

    /// The CRD's rules on host-endpoint placement: doNotTrack xor preDNAT, each needs
    /// applyOnForward, preDNAT has no egress.
    fn validate_placement(&self) -> Validated {
        if self.do_not_track && self.pre_dnat {
            return Err(ValidationError::new(
                "spec.preDNAT",
                true,
                "preDNAT and doNotTrack cannot both be true",
            ));
        }
        if (self.do_not_track || self.pre_dnat) && !self.apply_on_forward {
            return Err(ValidationError::new(
                "spec.applyOnForward",
                false,
                "applyOnForward must be true if either preDNAT or doNotTrack is true",
            ));
        }
        if self.pre_dnat && !self.egress.is_empty() {
            return Err(ValidationError::new(
                "spec.egress",
                self.egress.len(),
                "preDNAT policy cannot have any egress rules",
            ));
        }
        if self.pre_dnat && self.types.iter().any(|t| t == "Egress") {
            return Err(ValidationError::new(
                "spec.types",
                self.types.join(","),
                "preDNAT policy cannot have 'Egress' type",
            ));
        }
        Ok(())
    }

    fn validate_spec(&self) -> Validated {
        self.common().validate()?;
        global_selector_check("spec.namespaceSelector", &self.namespace_selector)?;
        validate_global_services(&self.ingress, &self.egress)?;
        self.validate_placement()
    }
}

impl Kind for GlobalNetworkPolicySpec {
    const KIND: &'static str = "GlobalNetworkPolicy";
    const PLURAL: &'static str = "globalnetworkpolicies";

    fn set_defaults(&mut self, meta: &mut ObjectMeta) {
        default_types(&self.ingress, &self.egress, &mut self.types);
        set_tier_label(meta, &self.tier);
    }

    fn validate(&self, meta: &ObjectMeta) -> Validated {
        policy_name(&meta.name, false)?;
        self.validate_spec()
    }
}

/// Calico's `StagedNetworkPolicySpec`: `stagedAction` then the NetworkPolicy fields.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StagedNetworkPolicySpec {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub staged_action: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub tier: String,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        serialize_with = "crate::model::gofloat::json"
    )]
    pub order: Option<f64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ingress: Vec<Rule>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub egress: Vec<Rule>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub selector: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub types: Vec<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub service_account_selector: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub performance_hints: Vec<String>,
}

impl StagedNetworkPolicySpec {
    /// The policy it would enforce (Calico's `ConvertStagedPolicyToEnforced`).
    pub fn enforced(&self) -> NetworkPolicySpec {
        NetworkPolicySpec {
            tier: self.tier.clone(),
            order: self.order,
            ingress: self.ingress.clone(),
            egress: self.egress.clone(),
            selector: self.selector.clone(),
            types: self.types.clone(),
            service_account_selector: self.service_account_selector.clone(),
            performance_hints: self.performance_hints.clone(),
        }
    }
}

impl Kind for StagedNetworkPolicySpec {
    const KIND: &'static str = "StagedNetworkPolicy";
    const PLURAL: &'static str = "stagednetworkpolicies";
    const NAMESPACED: bool = true;

    fn set_defaults(&mut self, meta: &mut ObjectMeta) {
        meta.namespace.get_or_insert_with(|| "default".into());
        default_types(&self.ingress, &self.egress, &mut self.types);
        set_tier_label(meta, &self.tier);
    }

    fn validate(&self, meta: &ObjectMeta) -> Validated {
        staged_action(&self.staged_action)?;
        policy_name(&meta.name, true)?;
        if self.staged_action == "Delete" {
            // Calico only checks the name of a staged deletion.
            return Ok(());
        }
        self.enforced().common().validate()
    }
}

/// Calico's `StagedGlobalNetworkPolicySpec`: `stagedAction` then the GNP fields.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StagedGlobalNetworkPolicySpec {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub staged_action: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub tier: String,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        serialize_with = "crate::model::gofloat::json"
    )]
    pub order: Option<f64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ingress: Vec<Rule>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub egress: Vec<Rule>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub selector: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub types: Vec<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub do_not_track: bool,
    #[serde(
        default,
        rename = "preDNAT",
        skip_serializing_if = "std::ops::Not::not"
    )]
    pub pre_dnat: bool,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub apply_on_forward: bool,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub service_account_selector: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub namespace_selector: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub performance_hints: Vec<String>,
}

impl StagedGlobalNetworkPolicySpec {
    /// The policy it would enforce (Calico's `ConvertStagedGlobalPolicyToEnforced`).
    pub fn enforced(&self) -> GlobalNetworkPolicySpec {
        GlobalNetworkPolicySpec {
            tier: self.tier.clone(),
            order: self.order,
            ingress: self.ingress.clone(),
            egress: self.egress.clone(),
            selector: self.selector.clone(),
            types: self.types.clone(),
            do_not_track: self.do_not_track,
            pre_dnat: self.pre_dnat,
            apply_on_forward: self.apply_on_forward,
            service_account_selector: self.service_account_selector.clone(),
            namespace_selector: self.namespace_selector.clone(),
            performance_hints: self.performance_hints.clone(),
        }
    }
}

impl Kind for StagedGlobalNetworkPolicySpec {
    const KIND: &'static str = "StagedGlobalNetworkPolicy";
    const PLURAL: &'static str = "stagedglobalnetworkpolicies";

    fn set_defaults(&mut self, meta: &mut ObjectMeta) {
        default_types(&self.ingress, &self.egress, &mut self.types);
        set_tier_label(meta, &self.tier);
    }

    fn validate(&self, meta: &ObjectMeta) -> Validated {
        staged_action(&self.staged_action)?;
        policy_name(&meta.name, false)?;
        if self.staged_action == "Delete" {
            return Ok(());
        }
        self.enforced().validate_spec()
    }
}

/// A Kubernetes `LabelSelector` (`matchLabels`, `matchExpressions`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LabelSelector {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub match_expressions: Vec<Value>,
}

/// Calico's `StagedKubernetesNetworkPolicySpec`: a Kubernetes NetworkPolicy spec plus
/// `stagedAction`. Its rules are Kubernetes' shape and are kept as written (staged
/// policies are stored and listed, never enforced).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StagedKubernetesNetworkPolicySpec {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub staged_action: String,
    #[serde(default)]
    pub pod_selector: LabelSelector,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ingress: Vec<Value>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub egress: Vec<Value>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policy_types: Vec<String>,
}

impl StagedKubernetesNetworkPolicySpec {
    /// The `PODSELECTOR` column: calicoctl prints the Go struct with `%v`
    /// (`{map[app:web] [{tier In [a b]}]}`).
    pub fn pod_selector_display(&self) -> String {
        let labels = self
            .pod_selector
            .match_labels
            .iter()
            .map(|(k, v)| format!("{k}:{v}"))
            .collect::<Vec<_>>()
            .join(" ");
        let exprs = self
            .pod_selector
            .match_expressions
            .iter()
            .map(|e| {
                let s = |k: &str| e.get(k).and_then(Value::as_str).unwrap_or("").to_string();
                let values = e
                    .get("values")
                    .and_then(Value::as_array)
                    .map(|v| v.iter().filter_map(Value::as_str).collect::<Vec<_>>())
                    .unwrap_or_default()
                    .join(" ");
                format!("{{{} {} [{values}]}}", s("key"), s("operator"))
            })
            .collect::<Vec<_>>()
            .join(" ");
        format!("{{map[{labels}] [{exprs}]}}")
    }
}

impl Kind for StagedKubernetesNetworkPolicySpec {
    const KIND: &'static str = "StagedKubernetesNetworkPolicy";
    const PLURAL: &'static str = "stagedkubernetesnetworkpolicies";
    const NAMESPACED: bool = true;

    fn set_defaults(&mut self, meta: &mut ObjectMeta) {
        meta.namespace.get_or_insert_with(|| "default".into());
    }

    fn validate(&self, _meta: &ObjectMeta) -> Validated {
        staged_action(&self.staged_action)?;
        unique_of(
            "spec.policyTypes",
            &self.policy_types,
            &["Ingress", "Egress"],
            "type",
        )
    }
}

/// Calico's `ProfileSpec`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProfileSpec {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ingress: Vec<Rule>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub egress: Vec<Rule>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels_to_apply: BTreeMap<String, String>,
}

impl Kind for ProfileSpec {
    const KIND: &'static str = "Profile";
    const PLURAL: &'static str = "profiles";

    fn validate(&self, _meta: &ObjectMeta) -> Validated {
        validate_rules("spec.ingress", &self.ingress)?;
        validate_rules("spec.egress", &self.egress)?;
        for (k, v) in &self.labels_to_apply {
            if !qualified_name(k) {
                return Err(ValidationError::new(
                    "spec.labelsToApply",
                    k,
                    "not a valid label key ([prefix/]name, name at most 63 alphanumerics, '-', '_' or '.')",
                ));
            }
            if !v.is_empty() && !label_name_part(v) {
                return Err(ValidationError::new(
                    &format!("spec.labelsToApply.{k}"),
                    v,
                    "not a valid label value (at most 63 alphanumerics, '-', '_' or '.', starting and ending alphanumeric)",
                ));
            }
        }
        validate_directions(&self.ingress, &self.egress)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{API_VERSION, AnyResource};
    use serde_json::json;

    fn doc(kind: &str, name: &str, spec: Value) -> Value {
        json!({"apiVersion": API_VERSION, "kind": kind, "metadata": {"name": name}, "spec": spec})
    }

    /// Decode as calicoctl does, fill defaults, validate: the stored JSON or the error.
    fn write(v: Value) -> Result<String, String> {
        let mut r = AnyResource::from_document(v).map_err(|e| e.to_string())?;
        r.prepare().map_err(|e| e.to_string())?;
        Ok(serde_json::to_string(&r.to_value()).unwrap())
    }

    fn refused_field(v: Value) -> String {
        let mut r = AnyResource::from_document(v).expect("decodes");
        r.prepare().expect_err("refused").field
    }

    /// Calico's documentation example (reference/resources/networkpolicy), stored as
    /// Calico's client stores it: tier label added, types kept, Go's field order.
    #[test]
    fn calico_docs_network_policy_round_trips() {
        let mut v = doc(
            "NetworkPolicy",
            "allow-tcp-6379",
            json!({
                "selector": "role == 'database'",
                "types": ["Ingress", "Egress"],
                "ingress": [{"action": "Allow",
                    "metadata": {"annotations": {"from": "frontend", "to": "database"}},
                    "protocol": "TCP", "source": {"selector": "role == 'frontend'"},
                    "destination": {"ports": [6379]}}],
                "egress": [{"action": "Allow"}]
            }),
        );
        v["metadata"]["namespace"] = json!("production");
        assert_eq!(
            write(v).unwrap(),
            r#"{"apiVersion":"projectcalico.org/v3","kind":"NetworkPolicy","metadata":{"labels":{"projectcalico.org/tier":"default"},"name":"allow-tcp-6379","namespace":"production"},"spec":{"egress":[{"action":"Allow"}],"ingress":[{"action":"Allow","destination":{"ports":[6379]},"metadata":{"annotations":{"from":"frontend","to":"database"}},"protocol":"TCP","source":{"selector":"role == 'frontend'"}}],"selector":"role == 'database'","types":["Ingress","Egress"]}}"#
        );
    }

    #[test]
    fn stored_field_order_is_calicos() {
        let spec: GlobalNetworkPolicySpec = serde_json::from_value(json!({
            "performanceHints": ["AssumeNeededOnEveryNode"], "namespaceSelector": "has(x)",
            "serviceAccountSelector": "a == 'b'", "applyOnForward": true, "preDNAT": true,
            "types": ["Ingress"], "selector": "all()", "ingress": [{"action": "Deny"}],
            "order": 10.5, "tier": "security"}))
        .unwrap();
        assert_eq!(
            serde_json::to_string(&spec).unwrap(),
            r#"{"tier":"security","order":10.5,"ingress":[{"action":"Deny"}],"selector":"all()","types":["Ingress"],"preDNAT":true,"applyOnForward":true,"serviceAccountSelector":"a == 'b'","namespaceSelector":"has(x)","performanceHints":["AssumeNeededOnEveryNode"]}"#
        );
        let staged: StagedNetworkPolicySpec =
            serde_json::from_value(json!({"selector": "a == 'b'", "stagedAction": "Set"})).unwrap();
        assert_eq!(
            serde_json::to_string(&staged).unwrap(),
            r#"{"stagedAction":"Set","selector":"a == 'b'"}"#
        );
    }

    #[test]
    fn order_is_written_and_printed_as_go_does() {
        let spec = |o: f64| GlobalNetworkPolicySpec {
            order: Some(o),
            ..Default::default()
        };
        assert_eq!(
            serde_json::to_string(&spec(100.0)).unwrap(),
            r#"{"order":100}"#
        );
        assert_eq!(
            serde_json::to_string(&spec(1e6)).unwrap(),
            r#"{"order":1000000}"#
        );
        assert_eq!(
            serde_json::to_string(&spec(10.5)).unwrap(),
            r#"{"order":10.5}"#
        );
        for (f, go) in [
            (100.0, "100"),
            (10.5, "10.5"),
            (123456.0, "123456"),
            (1e6, "1e+06"),
            (1234567.0, "1.234567e+06"),
            (0.0001, "0.0001"),
            (0.000015, "1.5e-05"),
            (-3.0, "-3"),
            (0.0, "0"),
        ] {
            assert_eq!(crate::model::gofloat::fmt_v(f), go, "{f}");
        }
    }

    #[test]
    fn types_default_as_calico() {
        let allow = || {
            vec![Rule {
                action: "Allow".into(),
                ..Default::default()
            }]
        };
        let cases = [
            (vec![], vec![], vec!["Ingress"]),
            (allow(), vec![], vec!["Ingress"]),
            (vec![], allow(), vec!["Egress"]),
            (allow(), allow(), vec!["Ingress", "Egress"]),
        ];
        for (ingress, egress, want) in cases {
            let mut types = vec![];
            default_types(&ingress, &egress, &mut types);
            assert_eq!(types, want);
        }
        // Explicit types are kept.
        let mut types = vec!["Egress".to_string()];
        default_types(&allow(), &[], &mut types);
        assert_eq!(types, vec!["Egress"]);
        // And the write path applies it (GNP with egress rules only).
        let out = write(doc(
            "GlobalNetworkPolicy",
            "g",
            json!({"egress": [{"action": "Deny"}]}),
        ));
        assert!(out.unwrap().contains(r#""types":["Egress"]"#));
    }

    #[test]
    fn policy_checks_name_their_field() {
        let gnp = |spec: Value| doc("GlobalNetworkPolicy", "g", spec);
        let cases = [
            (
                gnp(json!({"doNotTrack": true, "preDNAT": true, "applyOnForward": true})),
                "spec.preDNAT",
            ),
            (gnp(json!({"doNotTrack": true})), "spec.applyOnForward"),
            (
                gnp(
                    json!({"preDNAT": true, "applyOnForward": true, "egress": [{"action": "Allow"}]}),
                ),
                "spec.egress",
            ),
            (gnp(json!({"types": ["Ingress", "Ingress"]})), "spec.types"),
            (gnp(json!({"types": ["Forward"]})), "spec.types[0]"),
            (gnp(json!({"selector": "global()"})), "spec.selector"),
            (
                gnp(json!({"namespaceSelector": "a =="})),
                "spec.namespaceSelector",
            ),
            (
                gnp(json!({"performanceHints": ["Fast"]})),
                "spec.performanceHints[0]",
            ),
            (gnp(json!({"tier": "Bad_Tier"})), "spec.tier"),
            (
                gnp(
                    json!({"egress": [{"action": "Allow", "destination": {"services": {"name": "svc"}}}]}),
                ),
                "spec.egress[0].destination.services.namespace",
            ),
            (
                gnp(
                    json!({"egress": [{"action": "Allow", "source": {"services": {"name": "svc", "namespace": "n"}}}]}),
                ),
                "spec.egress[0].source.services",
            ),
            (
                gnp(
                    json!({"egress": [{"action": "Allow", "protocol": "TCP", "destination": {"ports": ["5:1"]}}]}),
                ),
                "spec.egress[0].destination.ports[0]",
            ),
            (
                doc("GlobalNetworkPolicy", "a.b.c", json!({})),
                "metadata.name",
            ),
            (
                doc(
                    "NetworkPolicy",
                    "n",
                    json!({"ingress": [{"action": "Reject"}]}),
                ),
                "spec.ingress[0].action",
            ),
            (
                doc("StagedNetworkPolicy", "n", json!({"stagedAction": "Maybe"})),
                "spec.stagedAction",
            ),
            (
                doc(
                    "StagedGlobalNetworkPolicy",
                    "n",
                    json!({"doNotTrack": true}),
                ),
                "spec.applyOnForward",
            ),
            (
                doc(
                    "StagedKubernetesNetworkPolicy",
                    "k",
                    json!({"policyTypes": ["Sideways"]}),
                ),
                "spec.policyTypes[0]",
            ),
            (
                doc(
                    "Profile",
                    "p",
                    json!({"egress": [{"action": "Allow", "protocol": "UDP", "icmp": {"type": 1}}]}),
                ),
                "spec.egress[0].icmp",
            ),
        ];
        for (v, field) in cases {
            assert_eq!(refused_field(v.clone()), field, "{v}");
        }
    }

    /// A value a newer Calico stored (fields this version does not know, at the top of the
    /// spec and inside a rule) decodes leniently and is written back with them intact.
    #[test]
    fn stored_values_of_a_newer_calico_keep_unknown_fields() {
        let stored = json!({"kind": "GlobalNetworkPolicy", "apiVersion": API_VERSION,
            "metadata": {"name": "g", "labels": {"projectcalico.org/tier": "default"}},
            "spec": {"order": 5, "futureKnob": {"a": 1},
                "ingress": [{"action": "Allow", "protocol": "TCP",
                    "destination": {"ports": [443], "newMatch": "x"}}],
                "selector": "all()", "types": ["Ingress"]}});
        let bytes = serde_json::to_vec(&stored).unwrap();
        let r = crate::model::decode_stored::<GlobalNetworkPolicySpec>(&bytes).unwrap();
        assert_eq!(r.spec.order, Some(5.0));
        assert_eq!(
            r.spec.ingress[0].destination.ports,
            vec![crate::model::rule::Port::Range { min: 443, max: 443 }]
        );
        let written: Value =
            serde_json::from_slice(&crate::model::stored::encode_with(&r, &r.unknown)).unwrap();
        assert_eq!(written, stored);
        // User input stays strict: the same document is refused, naming the field.
        let e = AnyResource::from_document(stored).unwrap_err().to_string();
        assert!(
            e.contains("spec.futureKnob") || e.contains("newMatch"),
            "{e}"
        );
    }

    #[test]
    fn pod_selector_prints_as_calicoctl_does() {
        let s: StagedKubernetesNetworkPolicySpec = serde_json::from_value(json!({
            "podSelector": {"matchLabels": {"b": "2", "a": "1"},
                "matchExpressions": [{"key": "tier", "operator": "In", "values": ["x", "y"]}]}}))
        .unwrap();
        assert_eq!(s.pod_selector_display(), "{map[a:1 b:2] [{tier In [x y]}]}");
        assert_eq!(
            StagedKubernetesNetworkPolicySpec::default().pod_selector_display(),
            "{map[] []}"
        );
    }

    #[test]
    fn names_follow_calicos_policy_regexes() {
        for ok in ["allow-dns", "security.allow-dns"] {
            assert_eq!(policy_name(ok, false), Ok(()), "{ok}");
        }
        assert_eq!(policy_name("knp.default.allow.all", true), Ok(()));
        for bad in ["Allow", "-a", "a.b.c", "a..b", "knp.default.x", ""] {
            assert!(policy_name(bad, false).is_err(), "{bad}");
        }
    }

    #[test]
    fn staged_delete_is_checked_by_name_only_and_profile_round_trips() {
        let v = doc(
            "StagedGlobalNetworkPolicy",
            "g",
            json!({"stagedAction": "Delete", "doNotTrack": true}),
        );
        assert!(write(v).is_ok());
        // Calico's documentation example (reference/resources/profile).
        let v = doc(
            "Profile",
            "dev-apps",
            json!({
            "ingress": [{"action": "Deny", "source": {"nets": ["10.0.20.0/24"]}},
                        {"action": "Allow", "source": {"selector": "profile == 'dev'"}}],
            "egress": [{"action": "Allow"}],
            "labelsToApply": {"profile": "dev"}}),
        );
        assert_eq!(
            write(v).unwrap(),
            r#"{"apiVersion":"projectcalico.org/v3","kind":"Profile","metadata":{"name":"dev-apps"},"spec":{"egress":[{"action":"Allow"}],"ingress":[{"action":"Deny","source":{"nets":["10.0.20.0/24"]}},{"action":"Allow","source":{"selector":"profile == 'dev'"}}],"labelsToApply":{"profile":"dev"}}}"#
        );
        // The profiles kube-controllers writes in etcd mode are accepted.
        let v = doc(
            "Profile",
            "kns.default",
            json!({"ingress": [{"action": "Allow"}],
            "egress": [{"action": "Allow"}],
            "labelsToApply": {"pcns.projectcalico.org/name": "default", "pcns.team": ""}}),
        );
        assert!(write(v).is_ok());
        let v = doc(
            "StagedKubernetesNetworkPolicy",
            "k",
            json!({"stagedAction": "Set",
            "podSelector": {"matchLabels": {"app": "web"}},
            "ingress": [{"from": [{"podSelector": {}}]}], "policyTypes": ["Ingress"]}),
        );
        assert!(
            write(v)
                .unwrap()
                .contains(r#""ingress":[{"from":[{"podSelector":{}}]}]"#)
        );
    }
}
