//! Values read from the datastore: decoded leniently, because other writers share it.
//!
//! A newer Calico (or calicoctl, or a person with etcdctl) may store fields this version
//! does not know, e.g. an IPPool's `namespaceSelector`. Calico's own Go structs ignore
//! unknown JSON fields on read; this project's resource structs refuse them
//! (`deny_unknown_fields`) so that calicoctl input stays strict with the field named. For
//! stored values the unknown fields are taken out one by one (each refusal names the field
//! and its path), remembered in [`UnknownFields`], and put back when the value is written
//! again: a read-modify-write by this node never strips a newer Calico's fields.
//!
//! Decoding stays one pass straight from the bytes when the value has no unknown field
//! (the usual case); the slower path runs only for values that do.

use serde::de::DeserializeOwned;
use serde_json::Value;
use serde_path_to_error::Segment;

use super::DecodeError;

/// Most unknown fields taken out of one value before it is refused (bounds the work a
/// hostile value can cause: each field costs one more decode).
const MAX_UNKNOWN_FIELDS: usize = 64;

/// One step of a path into a JSON document.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    Key(String),
    Index(usize),
}

/// Fields of a stored value that this version does not model, each with its path, kept so
/// that writing the value back loses nothing.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct UnknownFields(Vec<Unknown>);

/// One unknown field: where it was, its value, and for a field inside a list element the
/// element as this version wrote it when it was read (its known fields). A list can be
/// rewritten or reordered before the value is written back: the field goes back only into
/// an element that is still that element, never onto whatever now sits at its index.
#[derive(Debug, Clone, PartialEq)]
struct Unknown {
    path: Vec<Step>,
    value: Value,
    element: Option<Value>,
}

/// The path of the innermost list element that holds `path` (None outside lists).
fn element_path(path: &[Step]) -> Option<&[Step]> {
    let last = path.iter().rposition(|s| matches!(s, Step::Index(_)))?;
    Some(&path[..=last])
}

fn walk<'a>(doc: &'a Value, path: &[Step]) -> Option<&'a Value> {
    let mut at = doc;
    for step in path {
        at = match (step, at) {
            (Step::Key(k), Value::Object(m)) => m.get(k)?,
            (Step::Index(i), Value::Array(a)) => a.get(*i)?,
            _ => return None,
        };
    }
    Some(at)
}

impl UnknownFields {
    /// No unknown field was found.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Dotted paths of the unknown fields (`spec.namespaceSelector`), for logs and tests.
    pub fn paths(&self) -> Vec<String> {
        self.0.iter().map(|u| dotted(&u.path)).collect()
    }

    /// Take the fields at these paths out of `doc`, with the values they have there now
    /// (e.g. after a user's patch changed one), so that the rest of `doc` can be decoded
    /// strictly: a field the user added is still refused by name, one the stored value
    /// already had is carried along.
    pub fn take_from(&self, doc: &mut Value) -> UnknownFields {
        let mut taken = UnknownFields::default();
        for Unknown { path, .. } in &self.0 {
            let Some((Step::Key(last), parents)) = path.split_last() else {
                continue;
            };
            if let Some(Value::Object(parent)) = walk_mut(doc, parents)
                && let Some(value) = parent.remove(last)
            {
                // The user's document places its list elements itself: no check.
                taken.0.push(Unknown {
                    path: path.clone(),
                    value,
                    element: None,
                });
            }
        }
        taken
    }

    /// Remember, for each field inside a list element, that element as `decoded` writes it.
    fn note_elements<T: serde::Serialize>(&mut self, decoded: &T) {
        if !self.0.iter().any(|u| element_path(&u.path).is_some()) {
            return;
        }
        let Ok(written) = serde_json::to_value(decoded) else {
            return;
        };
        for u in &mut self.0 {
            // An element this version does not write at all (never the case for a value
            // it decoded) gets a marker no element equals: its field is not put back.
            u.element =
                element_path(&u.path).map(|at| walk(&written, at).cloned().unwrap_or(Value::Null));
        }
    }

    /// Put the unknown fields back into `doc` (the serialized resource about to be written).
    /// A field goes back only where its parent object still exists and the field is not
    /// set: an object this node removed on purpose is not brought back to life for it. A
    /// field of a list element goes back only when the element at its index is the one it
    /// was read from (its known fields unchanged): the list may have been rewritten.
    pub fn merge_into(&self, doc: &mut Value) {
        // Decided on the document as this version wrote it, before any field goes back.
        let keep: Vec<bool> = self
            .0
            .iter()
            .map(|u| match (&u.element, element_path(&u.path)) {
                (Some(was), Some(at)) => walk(doc, at) == Some(was),
                _ => true,
            })
            .collect();
        for (u, keep) in self.0.iter().zip(keep) {
            let Some((Step::Key(last), parents)) = u.path.split_last() else {
                continue;
            };
            if !keep {
                tracing::debug!(field = %dotted(&u.path), "a list element changed; its unknown field is not written back");
                continue;
            }
            let Some(Value::Object(parent)) = walk_mut(doc, parents) else {
                continue;
            };
            parent
                .entry(last.clone())
                .or_insert_with(|| u.value.clone());
        }
    }
}

fn dotted(path: &[Step]) -> String {
    let mut s = String::new();
    for step in path {
        match step {
            Step::Key(k) => {
                if !s.is_empty() {
                    s.push('.');
                }
                s.push_str(k);
            }
            Step::Index(i) => s.push_str(&format!("[{i}]")),
        }
    }
    s
}

fn walk_mut<'a>(doc: &'a mut Value, path: &[Step]) -> Option<&'a mut Value> {
    let mut at = doc;
    for step in path {
        at = match (step, at) {
            (Step::Key(k), Value::Object(m)) => m.get_mut(k)?,
            (Step::Index(i), Value::Array(a)) => a.get_mut(*i)?,
            _ => return None,
        };
    }
    Some(at)
}

/// The path serde_path_to_error reports, in our steps (None for a shape we cannot follow).
fn steps(path: &serde_path_to_error::Path) -> Option<Vec<Step>> {
    path.iter()
        .map(|seg| match seg {
            Segment::Map { key } => Some(Step::Key(key.clone())),
            Segment::Seq { index } => Some(Step::Index(*index)),
            Segment::Enum { .. } | Segment::Unknown => None,
        })
        .collect()
}

/// Whether a decode error is serde's "unknown field" refusal (the only one skipped).
fn is_unknown_field(e: &serde_json::Error) -> bool {
    e.to_string().starts_with("unknown field `")
}

fn field_error(path: &serde_path_to_error::Path, e: &serde_json::Error) -> DecodeError {
    let p = path.to_string();
    DecodeError::Field {
        path: if p == "." { "(document)".into() } else { p },
        message: e.to_string(),
    }
}

/// Decode a stored value of type `T`, keeping the fields `T` does not know.
/// Any other problem (bad JSON, a known field of the wrong type) is an error naming the
/// field's path.
pub fn decode_lenient<T: DeserializeOwned + serde::Serialize>(
    bytes: &[u8],
) -> Result<(T, UnknownFields), DecodeError> {
    if let Ok(v) = serde_json::from_slice::<T>(bytes) {
        return Ok((v, UnknownFields::default()));
    }
    let mut doc: Value = serde_json::from_slice(bytes).map_err(|e| DecodeError::Field {
        path: "(document)".into(),
        message: format!("not valid JSON: {e}"),
    })?;
    let mut unknown = UnknownFields::default();
    loop {
        let err = match serde_path_to_error::deserialize::<_, T>(&doc) {
            Ok(v) => {
                unknown.note_elements(&v);
                return Ok((v, unknown));
            }
            Err(err) => err,
        };
        let (path, inner) = (err.path().clone(), err.into_inner());
        let located = steps(&path).filter(|p| !p.is_empty());
        let (Some(path_steps), true) = (located, is_unknown_field(&inner)) else {
            return Err(field_error(&path, &inner));
        };
        if unknown.0.len() >= MAX_UNKNOWN_FIELDS {
            return Err(DecodeError::Field {
                path: dotted(&path_steps),
                message: format!("more than {MAX_UNKNOWN_FIELDS} unknown fields"),
            });
        }
        let removed = match path_steps.split_last() {
            Some((Step::Key(k), parents)) => match walk_mut(&mut doc, parents) {
                Some(Value::Object(m)) => m.remove(k),
                _ => None,
            },
            _ => None,
        };
        let Some(value) = removed else {
            // The reported field is not where the path says: refuse rather than loop.
            return Err(field_error(&path, &inner));
        };
        unknown.0.push(Unknown {
            path: path_steps,
            value,
            element: None,
        });
    }
}

/// Serialize `value`, putting back the unknown fields it was read with.
pub fn encode_with<T: serde::Serialize>(value: &T, unknown: &UnknownFields) -> Vec<u8> {
    if unknown.is_empty() {
        return serde_json::to_vec(value).expect("model values always serialize");
    }
    let mut doc = serde_json::to_value(value).expect("model values always serialize");
    unknown.merge_into(&mut doc);
    serde_json::to_vec(&doc).expect("JSON values always serialize")
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::model::{
        AnyResource, BGPConfigurationSpec, FelixConfigurationSpec, IPPoolSpec, Kind, NodeSpec,
        Resource, decode_stored,
    };

    const POOL: &str = include_str!("../../tests/fixtures/newer-calico/ippool.json");
    const NODE: &str = include_str!("../../tests/fixtures/newer-calico/node.json");
    const BGP: &str = include_str!("../../tests/fixtures/newer-calico/bgpconfiguration.json");
    const FELIX: &str = include_str!("../../tests/fixtures/newer-calico/felixconfiguration.json");

    /// Decode a golden, change a known field both in the resource and (by hand) in the
    /// golden's JSON, write it back: the result is the golden with only that change.
    fn round_trip<S: Kind>(
        golden: &str,
        edit: impl Fn(&mut Resource<S>),
        by_hand: impl Fn(&mut Value),
    ) -> Vec<String> {
        let mut r = decode_stored::<S>(golden.as_bytes()).unwrap();
        let unknown = r.unknown.paths();
        edit(&mut r);
        let written: Value = serde_json::from_slice(&encode_with(&r, &r.unknown)).unwrap();
        let mut want: Value = serde_json::from_str(golden).unwrap();
        by_hand(&mut want);
        assert_eq!(written, want, "{}", S::KIND);
        unknown
    }

    #[test]
    fn newer_calico_values_round_trip_with_unknown_fields_intact() {
        let unknown = round_trip::<IPPoolSpec>(
            POOL,
            |p| p.spec.nat_outgoing = true,
            |v| v["spec"]["natOutgoing"] = json!(true),
        );
        assert_eq!(unknown, ["spec.namespaceSelector"]);
        let unknown = round_trip::<NodeSpec>(
            NODE,
            |n| {
                n.spec.bgp.as_mut().unwrap().ipv4_address = Some("1.2.3.9/24".into());
            },
            |v| v["spec"]["bgp"]["ipv4Address"] = json!("1.2.3.9/24"),
        );
        assert_eq!(unknown, ["spec.interfaces"]);
        let unknown = round_trip::<BGPConfigurationSpec>(
            BGP,
            |b| b.spec.log_severity_screen = Some("Debug".into()),
            |v| v["spec"]["logSeverityScreen"] = json!("Debug"),
        );
        assert_eq!(
            unknown,
            [
                "spec.ipv4NormalRoutePriority",
                "spec.ipv6NormalRoutePriority",
                "spec.programClusterRoutes",
            ]
        );
        // FelixConfiguration keeps every setting it does not model in `other`.
        round_trip::<FelixConfigurationSpec>(
            FELIX,
            |f| f.spec.interface_prefix = Some("cali".into()),
            |v| v["spec"]["interfacePrefix"] = json!("cali"),
        );
    }

    #[test]
    fn unknown_metadata_and_nested_fields_are_kept_too() {
        let stored = r#"{"kind":"Node","apiVersion":"projectcalico.org/v3",
            "metadata":{"name":"n1","futureMeta":{"a":1}},
            "spec":{"bgp":{"ipv4Address":"10.0.0.1/24","futureBgp":"x"},
                    "addresses":[{"address":"10.0.0.1","type":"InternalIP","zone":"z1"}]}}"#;
        let r = decode_stored::<NodeSpec>(stored.as_bytes()).unwrap();
        assert_eq!(
            r.unknown.paths(),
            [
                "metadata.futureMeta",
                "spec.addresses[0].zone",
                "spec.bgp.futureBgp",
            ]
        );
        let written: Value = serde_json::from_slice(&encode_with(&r, &r.unknown)).unwrap();
        assert_eq!(written, serde_json::from_str::<Value>(stored).unwrap());
        // An object this node removes is not brought back for its unknown field.
        let mut cleared = r.clone();
        cleared.spec.bgp = None;
        let written: Value =
            serde_json::from_slice(&encode_with(&cleared, &cleared.unknown)).unwrap();
        assert!(written["spec"].get("bgp").is_none(), "{written}");
        assert_eq!(written["metadata"]["futureMeta"], json!({"a": 1}));
        // A list this node rewrote: the element's unknown field is not put onto whatever
        // now sits at its index (before: `zone` landed on the new first address).
        let mut reordered = decode_stored::<NodeSpec>(
            stored
                .replace(
                    r#"[{"address":"10.0.0.1","type":"InternalIP","zone":"z1"}]"#,
                    r#"[{"address":"10.0.0.1","type":"InternalIP","zone":"z1"},
                        {"address":"10.0.0.2","type":"ExternalIP"}]"#,
                )
                .as_bytes(),
        )
        .unwrap();
        reordered.spec.addresses.reverse();
        let written: Value =
            serde_json::from_slice(&encode_with(&reordered, &reordered.unknown)).unwrap();
        assert_eq!(
            written["spec"]["addresses"],
            json!([
                {"address": "10.0.0.2", "type": "ExternalIP"},
                {"address": "10.0.0.1", "type": "InternalIP"}
            ])
        );
    }

    #[test]
    fn calicoctl_input_stays_strict_and_names_the_field() {
        let doc: Value = serde_json::from_str(POOL).unwrap();
        let e = AnyResource::from_document(doc).unwrap_err().to_string();
        assert!(
            e.starts_with(
                "error with field spec.namespaceSelector: unknown field `namespaceSelector`, expected one of"
            ),
            "{e}"
        );
    }

    #[test]
    fn a_known_field_of_the_wrong_type_is_an_error_naming_it() {
        let stored = r#"{"kind":"IPPool","apiVersion":"projectcalico.org/v3",
            "metadata":{"name":"p"},"spec":{"cidr":"10.0.0.0/16","future":1,"blockSize":"big"}}"#;
        let e = decode_stored::<IPPoolSpec>(stored.as_bytes())
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("error with field spec.blockSize: invalid type: string \"big\""),
            "{e}"
        );
        let e = decode_stored::<IPPoolSpec>(b"{not json")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("error with field (document): not valid JSON"),
            "{e}"
        );
    }
}
