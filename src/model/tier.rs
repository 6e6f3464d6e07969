//! Tier: an ordered group of policies with the action taken when a policy of the tier
//! selects an endpoint but no rule matches (REFERENCE §9; Calico's `api/.../v3/tier.go`,
//! `libcalico-go/lib/names/policy.go`, `libcalico-go/lib/resources/tier.go`).

use serde::{Deserialize, Serialize};

use super::validate::{self, Validated, ValidationError};
use super::{Kind, ObjectMeta, Resource};

/// A Tier resource.
pub type Tier = Resource<TierSpec>;

/// The tier of a policy that names none (Calico's `names.DefaultTierName`).
pub const DEFAULT_TIER: &str = "default";
/// The tier of Kubernetes AdminNetworkPolicy, before `default`.
pub const KUBE_ADMIN_TIER: &str = "kube-admin";
/// The tier of Kubernetes BaselineAdminNetworkPolicy, after `default`.
pub const KUBE_BASELINE_TIER: &str = "kube-baseline";

/// `order` of the default tier (`apiv3.DefaultTierOrder`); also what a tier without an
/// order gets (Calico's `DefaultTierFields`: nil order used to mean "last", now 1e6).
pub const DEFAULT_TIER_ORDER: f64 = 1_000_000.0;
/// `order` of the kube-admin tier (`apiv3.KubeAdminTierOrder`).
pub const KUBE_ADMIN_TIER_ORDER: f64 = 1_000.0;
/// `order` of the kube-baseline tier (`apiv3.KubeBaselineTierOrder`).
pub const KUBE_BASELINE_TIER_ORDER: f64 = 10_000_000.0;

/// The tiers Calico creates itself (`EnsureInitialized`) and refuses to delete
/// (`names.ProtectedTierNames`), with the order and default action each must keep (the CEL
/// rules on Calico's Tier type).
pub const BUILTIN_TIERS: &[(&str, f64, &str)] = &[
    (DEFAULT_TIER, DEFAULT_TIER_ORDER, "Deny"),
    (KUBE_ADMIN_TIER, KUBE_ADMIN_TIER_ORDER, "Pass"),
    (KUBE_BASELINE_TIER, KUBE_BASELINE_TIER_ORDER, "Pass"),
];

/// Whether Calico refuses to delete this tier (`names.TierIsProtected`).
pub fn is_protected(name: &str) -> bool {
    BUILTIN_TIERS.iter().any(|(n, _, _)| *n == name)
}

/// Calico's `TierSpec`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TierSpec {
    /// Lower orders are applied first; equal orders by name.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        serialize_with = "crate::model::gofloat::json"
    )]
    pub order: Option<f64>,
    /// `Deny` (default) or `Pass`: what happens at the end of the tier when a policy of it
    /// selected the endpoint but none of its rules matched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_action: Option<String>,
}

impl TierSpec {
    /// `order`, defaulted as Calico reads it.
    pub fn order_or_default(&self) -> f64 {
        self.order.unwrap_or(DEFAULT_TIER_ORDER)
    }

    /// `defaultAction`, defaulted (`Deny`).
    pub fn default_action_or_default(&self) -> &str {
        self.default_action.as_deref().unwrap_or("Deny")
    }
}

/// Tier names appear inside other names (policy chains), so Calico allows a DNS label
/// only: lower-case alphanumerics and `-`, no dots, at most 63 characters.
fn tier_name(name: &str) -> Validated {
    if name.len() > 63 {
        return Err(ValidationError::new(
            "metadata.name",
            name,
            format!("name is too long by {} bytes", name.len() - 63),
        ));
    }
    let alnum = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    let ok = name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && alnum(name.chars().next())
        && alnum(name.chars().last());
    if !ok {
        return Err(ValidationError::new(
            "metadata.name",
            name,
            "name must consist of lower case alphanumeric characters or '-' (regex: [a-z0-9]([-a-z0-9]*[a-z0-9])?)",
        ));
    }
    Ok(())
}

/// Kubernetes' label-name rule (`k8svalidation.IsQualifiedName`) as Calico checks a
/// tier's label keys: an optional DNS-subdomain prefix and `/`, then a name of at most 63
/// alphanumerics, `-`, `_` or `.`, starting and ending alphanumeric.
fn qualified_name_problem(key: &str) -> Option<String> {
    let (prefix, name) = match key.split('/').collect::<Vec<_>>().as_slice() {
        [name] => (None, *name),
        [prefix, name] => (Some(*prefix), *name),
        _ => return Some(format!("a qualified name {QUALIFIED}")),
    };
    if let Some(p) = prefix {
        if p.is_empty() {
            return Some("prefix part must be non-empty".into());
        }
        if let Err(e) = validate::name("prefix", p) {
            return Some(format!("prefix part {}", e.reason));
        }
    }
    if name.is_empty() {
        return Some("name part must be non-empty".into());
    }
    if name.len() > 63 {
        return Some("name part must be no more than 63 characters".into());
    }
    (!label_word(name)).then(|| format!("name part {QUALIFIED}"))
}

const QUALIFIED: &str = "must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character";

/// `([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]`
fn label_word(s: &str) -> bool {
    let alnum = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    alnum(s.chars().next())
        && alnum(s.chars().last())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Calico's `validateObjectMetaLabels` for a tier: keys are qualified names, values empty
/// or label words of at most 63 characters.
fn tier_labels(meta: &ObjectMeta) -> Validated {
    for (k, v) in &meta.labels {
        if let Some(reason) = qualified_name_problem(k) {
            return Err(ValidationError::new("metadata.labels", k, reason));
        }
        if v.len() > 63 {
            return Err(ValidationError::new(
                &format!("metadata.labels.{k}"),
                v,
                "must be no more than 63 characters",
            ));
        }
        if !v.is_empty() && !label_word(v) {
            return Err(ValidationError::new(
                &format!("metadata.labels.{k}"),
                v,
                format!("a valid label must be an empty string or {QUALIFIED}"),
            ));
        }
    }
    Ok(())
}

impl Kind for TierSpec {
    const KIND: &'static str = "Tier";
    const PLURAL: &'static str = "tiers";

    /// Calico's `DefaultTierFields`, applied on every write and read.
    fn set_defaults(&mut self, _meta: &mut ObjectMeta) {
        self.order.get_or_insert(DEFAULT_TIER_ORDER);
        self.default_action.get_or_insert_with(|| "Deny".into());
    }

    fn validate(&self, meta: &ObjectMeta) -> Validated {
        tier_name(&meta.name)?;
        tier_labels(meta)?;
        let action = self.default_action_or_default();
        validate::one_of("spec.defaultAction", action, &["Deny", "Pass"])?;
        let order = self.order_or_default();
        if !order.is_finite() {
            return Err(ValidationError::new(
                "spec.order",
                order,
                "order must be a finite number",
            ));
        }
        // The CEL rules of Calico's Tier type: the built-in tiers keep their place.
        if let Some((name, want_order, want_action)) =
            BUILTIN_TIERS.iter().find(|(n, _, _)| *n == meta.name)
        {
            if action != *want_action {
                return Err(ValidationError::new(
                    "spec.defaultAction",
                    action,
                    format!("The '{name}' tier must have default action '{want_action}'"),
                ));
            }
            if order != *want_order {
                return Err(ValidationError::new(
                    "spec.order",
                    crate::model::gofloat::fmt_v(order),
                    format!("{name} tier order must be {want_order}"),
                ));
            }
        }
        Ok(())
    }
}

/// The built-in tier `name` as Calico's `ensureTierExists` creates it.
pub fn builtin_tier(name: &str, order: f64, action: &str) -> Tier {
    Tier::new(
        name,
        TierSpec {
            order: Some(order),
            default_action: Some(action.into()),
        },
    )
}

/// What calicoctl's tier lister does to a list (not to a get by name): Calico's client
/// defaults every tier read by `List` (`DefaultTierFields`), and calicoctl sorts the tiers
/// by order, stably (name order among equals).
pub fn calicoctl_list(items: &mut [super::AnyResource]) {
    for r in items.iter_mut() {
        if let super::AnyResource::Tier(t) = r {
            t.spec.set_defaults(&mut t.metadata);
        }
    }
    let order = |r: &super::AnyResource| match r {
        super::AnyResource::Tier(t) => t.spec.order_or_default(),
        _ => f64::INFINITY,
    };
    items.sort_by(|a, b| order(a).total_cmp(&order(b)));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{AnyResource, prepare_resource};

    fn err(name: &str, spec: TierSpec) -> String {
        let mut t = Tier::new(name, spec);
        prepare_resource(&mut t).unwrap_err().to_string()
    }

    #[test]
    fn calicos_json_round_trips_with_integral_orders() {
        // As Calico's client stores the default tier in etcd.
        let calico = r#"{"kind":"Tier","apiVersion":"projectcalico.org/v3","metadata":{"name":"default","uid":"3b2c","creationTimestamp":"2026-01-01T00:00:00Z"},"spec":{"order":1000000,"defaultAction":"Deny"}}"#;
        let t: Tier = serde_json::from_str(calico).unwrap();
        assert_eq!(t.spec.order, Some(1e6));
        assert_eq!(serde_json::to_string(&t).unwrap(), calico);
        let frac = r#"{"kind":"Tier","apiVersion":"projectcalico.org/v3","metadata":{"name":"a"},"spec":{"order":100.5,"defaultAction":"Pass"}}"#;
        let t: Tier = serde_json::from_str(frac).unwrap();
        assert_eq!(serde_json::to_string(&t).unwrap(), frac);
    }

    #[test]
    fn defaults_are_order_1e6_and_deny() {
        let mut t = Tier::new("app", TierSpec::default());
        prepare_resource(&mut t).unwrap();
        assert_eq!(t.spec.order, Some(1e6));
        assert_eq!(t.spec.default_action.as_deref(), Some("Deny"));
    }

    #[test]
    fn names_are_dns_labels_without_dots() {
        assert_eq!(
            err("app.tier", TierSpec::default()),
            "error with field metadata.name = 'app.tier' (name must consist of lower case alphanumeric characters or '-' (regex: [a-z0-9]([-a-z0-9]*[a-z0-9])?))"
        );
        let long = "a".repeat(64);
        assert_eq!(
            err(&long, TierSpec::default()),
            format!("error with field metadata.name = '{long}' (name is too long by 1 bytes)")
        );
        let mut ok = Tier::new("a".repeat(63), TierSpec::default());
        assert!(prepare_resource(&mut ok).is_ok());
    }

    #[test]
    fn labels_follow_kubernetes_rules() {
        let with = |k: &str, v: &str| {
            let mut t = Tier::new("app", TierSpec::default());
            t.metadata.labels.insert(k.into(), v.into());
            prepare_resource(&mut t).map_err(|e| e.to_string())
        };
        assert!(with("example.com/Owner_1", "sec-ops.2").is_ok());
        assert!(with("owner", "").is_ok());
        assert_eq!(
            with("a/b/c", "x").unwrap_err(),
            "error with field metadata.labels = 'a/b/c' (a qualified name must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character)"
        );
        assert_eq!(
            with("/b", "x").unwrap_err(),
            "error with field metadata.labels = '/b' (prefix part must be non-empty)"
        );
        assert_eq!(
            with("owner", "-x").unwrap_err(),
            "error with field metadata.labels.owner = '-x' (a valid label must be an empty string or must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character)"
        );
        assert_eq!(
            with(&"k".repeat(64), "x").unwrap_err(),
            format!(
                "error with field metadata.labels = '{}' (name part must be no more than 63 characters)",
                "k".repeat(64)
            )
        );
    }

    #[test]
    fn default_action_is_deny_or_pass() {
        let spec = TierSpec {
            default_action: Some("Allow".into()),
            ..Default::default()
        };
        assert_eq!(
            err("app", spec),
            "error with field spec.defaultAction = 'Allow' (must be one of: Deny, Pass)"
        );
    }

    #[test]
    fn builtin_tiers_keep_their_order_and_action() {
        let spec = |order: f64, action: &str| TierSpec {
            order: Some(order),
            default_action: Some(action.into()),
        };
        assert_eq!(
            err("default", spec(100.0, "Deny")),
            "error with field spec.order = '100' (default tier order must be 1000000)"
        );
        assert_eq!(
            err("default", spec(1e6, "Pass")),
            "error with field spec.defaultAction = 'Pass' (The 'default' tier must have default action 'Deny')"
        );
        assert_eq!(
            err("kube-admin", spec(1e6, "Pass")),
            "error with field spec.order = '1e+06' (kube-admin tier order must be 1000)"
        );
        assert_eq!(
            err("kube-baseline", TierSpec::default()),
            "error with field spec.defaultAction = 'Deny' (The 'kube-baseline' tier must have default action 'Pass')"
        );
        for (name, order, action) in BUILTIN_TIERS {
            let mut t = builtin_tier(name, *order, action);
            assert!(prepare_resource(&mut t).is_ok(), "{name}");
        }
        assert!(is_protected("default") && is_protected("kube-admin"));
        assert!(!is_protected("app"));
    }

    #[test]
    fn calicoctl_lists_tiers_by_order_with_defaults() {
        let mut old = Tier::new("zeta", TierSpec::default());
        old.spec.default_action = Some("Pass".into());
        let mut items = vec![
            AnyResource::Tier(builtin_tier("default", 1e6, "Deny")),
            AnyResource::Tier(builtin_tier("kube-admin", 1000.0, "Pass")),
            AnyResource::Tier(builtin_tier("kube-baseline", 1e7, "Pass")),
            AnyResource::Tier(old),
        ];
        calicoctl_list(&mut items);
        let names: Vec<&str> = items.iter().map(|r| r.meta().name.as_str()).collect();
        assert_eq!(names, ["kube-admin", "default", "zeta", "kube-baseline"]);
        let AnyResource::Tier(z) = &items[2] else {
            panic!("not a tier")
        };
        assert_eq!(z.spec.order, Some(1e6));
    }

    #[test]
    fn orders_print_as_go_prints_them() {
        assert_eq!(crate::model::gofloat::fmt_v(1e6), "1e+06");
        assert_eq!(crate::model::gofloat::fmt_v(1e7), "1e+07");
        assert_eq!(crate::model::gofloat::fmt_v(1000.0), "1000");
        assert_eq!(crate::model::gofloat::fmt_v(100000.0), "100000");
        assert_eq!(crate::model::gofloat::fmt_v(100.5), "100.5");
        assert_eq!(crate::model::gofloat::fmt_v(1234567.5), "1.2345675e+06");
        assert_eq!(crate::model::gofloat::fmt_v(0.00001), "1e-05");
        assert_eq!(crate::model::gofloat::fmt_v(0.0), "0");
    }

    #[test]
    fn unknown_fields_are_refused_by_name() {
        let v = serde_json::json!({"apiVersion": "projectcalico.org/v3", "kind": "Tier",
            "metadata": {"name": "a"}, "spec": {"ordre": 1}});
        let e = AnyResource::from_document(v).unwrap_err().to_string();
        assert!(
            e.starts_with("error with field spec.ordre: unknown field `ordre`"),
            "{e}"
        );
    }
}
