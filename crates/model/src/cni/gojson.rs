//! Field names matched the way Go's `encoding/json` matches them, before serde sees the value.
//!
//! Runtimes and CNI libraries are written in Go, and Go's decoder maps a JSON key to a struct
//! field by exact name first and then case-insensitively. containerd's CNI library sends its
//! capability arguments from structs without JSON tags (`{"HostPort":18090,"ContainerPort":8080,
//! "Protocol":"tcp","HostIP":"127.0.0.1"}`), and every Go plugin accepts them. serde matches
//! names exactly, so [`fold_keys`] first rewrites the keys of a JSON value to the spelling a
//! [`Shape`] knows, recursively, and then the serde types decode the canonical form.
//!
//! Go's rules, as applied here:
//! - a key equal to a known name is that field; otherwise a key that equals a known name under
//!   Go's case folding (ASCII letters, plus `ſ` ≡ `s` and the Kelvin sign `K` ≡ `k`, the two
//!   non-ASCII runes in the fold orbits of ASCII letters) is that field;
//! - keys matching no field are unknown and stay as they are (serde ignores them, or a
//!   `flatten`ed map keeps them);
//! - `null` for a field leaves it at its zero value, as if the key were absent;
//! - an exact key wins over a folded spelling of the same field. Two folded spellings of one
//!   field without the exact one (`{"HostPort":1,"HOSTPORT":2}`) are refused: Go takes the one
//!   that comes last in the document, an order a parsed object no longer has.

use serde_json::{Map, Value};

/// The known keys of one JSON value, and the shapes of their values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// A scalar, or a value whose keys are data (a Go map, matched exactly): left as it is.
    Leaf,
    /// An object with these fields.
    Object(&'static [Field]),
    /// A list whose elements have this shape.
    List(&'static Shape),
}

/// One known field of an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Field {
    /// The canonical spelling (what the serde type expects).
    pub name: &'static str,
    /// The shape of its value.
    pub shape: Shape,
}

/// A field of `shape` called `name`.
pub const fn field(name: &'static str, shape: Shape) -> Field {
    Field { name, shape }
}

/// A scalar field called `name`.
pub const fn leaf(name: &'static str) -> Field {
    Field {
        name,
        shape: Shape::Leaf,
    }
}

/// Two spellings of one field, neither of them exact.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: keys {first:?} and {second:?} both spell field {field:?}")]
pub struct AmbiguousKey {
    /// Where in the document (`runtimeConfig.portMappings[0]`).
    pub path: String,
    /// The field both keys fold to.
    pub field: &'static str,
    /// One spelling.
    pub first: String,
    /// The other.
    pub second: String,
}

/// Go's fold of one character: the smallest rune of its simple-fold orbit, for the runes whose
/// orbit holds an ASCII letter; every other rune stays itself (it never equals an ASCII name).
fn fold_char(c: char) -> char {
    match c {
        'a'..='z' => c.to_ascii_uppercase(),
        '\u{017F}' => 'S', // LATIN SMALL LETTER LONG S folds with s and S
        '\u{212A}' => 'K', // KELVIN SIGN folds with k and K
        _ => c,
    }
}

/// Whether `key` equals `name` under Go's case folding.
pub fn fold_eq(key: &str, name: &str) -> bool {
    let mut k = key.chars().map(fold_char);
    let mut n = name.chars().map(fold_char);
    loop {
        match (k.next(), n.next()) {
            (None, None) => return true,
            (Some(a), Some(b)) if a == b => {}
            _ => return false,
        }
    }
}

/// Rewrites the keys of `value` (recursively, as far as `shape` describes it) to their
/// canonical spelling, dropping `null` fields; `path` names the value in errors.
pub fn fold_keys(value: Value, shape: &Shape, path: &str) -> Result<Value, AmbiguousKey> {
    match (shape, value) {
        (Shape::Object(fields), Value::Object(obj)) => {
            fold_object(obj, fields, path).map(Value::Object)
        }
        (Shape::List(inner), Value::Array(items)) => items
            .into_iter()
            .enumerate()
            .map(|(i, v)| fold_keys(v, inner, &format!("{path}[{i}]")))
            .collect::<Result<Vec<_>, _>>()
            .map(Value::Array),
        // A leaf, or a value of another type than the shape says: serde reports the mismatch.
        (_, v) => Ok(v),
    }
}

/// [`fold_keys`] for one object whose known fields are `fields`.
pub fn fold_object(
    obj: Map<String, Value>,
    fields: &[Field],
    path: &str,
) -> Result<Map<String, Value>, AmbiguousKey> {
    // Which field each key belongs to: exact names first (whatever the key order), then
    // folded ones for the fields no exact key names.
    let mut out = Map::new();
    let mut exact: Vec<(&Field, Value)> = Vec::new();
    let mut folded: Vec<(&Field, String, Value)> = Vec::new();
    for (key, value) in obj {
        if let Some(f) = fields.iter().find(|f| f.name == key) {
            exact.push((f, value));
        } else if let Some(f) = fields.iter().find(|f| fold_eq(&key, f.name)) {
            folded.push((f, key, value));
        } else {
            out.insert(key, value);
        }
    }
    let exact_names: Vec<&str> = exact.iter().map(|(f, _)| f.name).collect();
    let mut chosen = exact;
    let mut spelled: Vec<(&'static str, String)> = Vec::new();
    for (f, key, value) in folded {
        if exact_names.contains(&f.name) {
            continue; // the exact spelling is there and wins
        }
        if let Some((_, other)) = spelled.iter().find(|(n, _)| *n == f.name) {
            return Err(AmbiguousKey {
                path: path.to_string(),
                field: f.name,
                first: other.clone(),
                second: key,
            });
        }
        spelled.push((f.name, key));
        chosen.push((f, value));
    }
    for (field, value) in chosen {
        if value.is_null() {
            continue; // Go leaves the field at its zero value
        }
        let sub = join(path, field.name);
        out.insert(
            field.name.to_string(),
            fold_keys(value, &field.shape, &sub)?,
        );
    }
    Ok(out)
}

fn join(path: &str, name: &str) -> String {
    if path.is_empty() {
        name.to_string()
    } else {
        format!("{path}.{name}")
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const INNER: &[Field] = &[leaf("hostPort"), leaf("hostIP")];
    const OUTER: &[Field] = &[
        leaf("name"),
        field("portMappings", Shape::List(&Shape::Object(INNER))),
        field("nested", Shape::Object(INNER)),
        leaf("args"),
    ];

    fn fold(v: Value) -> Result<Value, AmbiguousKey> {
        fold_keys(v, &Shape::Object(OUTER), "")
    }

    #[test]
    fn go_folding_of_ascii_and_the_two_special_runes() {
        assert!(fold_eq("HostPort", "hostPort"));
        assert!(fold_eq("HOSTPORT", "hostPort"));
        assert!(fold_eq("hostport", "hostPort"));
        assert!(fold_eq("HostIP", "hostIP"));
        assert!(fold_eq("hostIp", "hostIP"));
        // Go's bytes.EqualFold: ſ folds with s, the Kelvin sign with k.
        assert!(fold_eq("hoſtPort", "hostPort"));
        assert!(fold_eq("\u{212A}ind", "kind"));
        assert!(!fold_eq("hostPorts", "hostPort"));
        assert!(!fold_eq("host_port", "hostPort"));
        assert!(!fold_eq("höstPort", "hostPort"));
        assert!(!fold_eq("", "a"));
    }

    #[test]
    fn keys_are_rewritten_recursively_and_unknown_ones_kept() {
        let v = fold(json!({
            "NAME": "n",
            "PortMappings": [{"HostPort": 1, "HostIP": "0.0.0.0", "Extra": true}],
            "Nested": {"hostport": 2},
            "Args": {"K8S": {"HostPort": 3}},
            "unknownKey": {"HostPort": 4}
        }))
        .unwrap();
        assert_eq!(
            v,
            json!({
                "name": "n",
                "portMappings": [{"hostPort": 1, "hostIP": "0.0.0.0", "Extra": true}],
                "nested": {"hostPort": 2},
                // A leaf's keys are data (a Go map): untouched.
                "args": {"K8S": {"HostPort": 3}},
                "unknownKey": {"HostPort": 4}
            })
        );
    }

    #[test]
    fn exact_spelling_wins_and_null_means_absent() {
        let v = fold(json!({"name": "exact", "NAME": "folded"})).unwrap();
        assert_eq!(v, json!({"name": "exact"}));
        // Whatever the key order, and however many other spellings.
        let v = fold(json!({"Name": 1, "NAME": 2, "name": 3, "nAME": 4})).unwrap();
        assert_eq!(v, json!({"name": 3}));
        let v = fold(json!({"Name": null, "nested": null, "args": {"a": null}})).unwrap();
        assert_eq!(v, json!({"args": {"a": null}}));
        // An exact null still shadows a folded value (the exact key is the field).
        assert_eq!(fold(json!({"name": null, "Name": "x"})).unwrap(), json!({}));
    }

    #[test]
    fn two_folded_spellings_are_ambiguous() {
        let e = fold(json!({"PortMappings": [{"HostPort": 1, "HOSTPORT": 2}]})).unwrap_err();
        assert_eq!(e.field, "hostPort");
        assert_eq!(e.path, "portMappings[0]");
        assert!(e.to_string().contains("HOSTPORT") && e.to_string().contains("HostPort"));
    }

    #[test]
    fn mismatched_types_are_left_for_serde() {
        assert_eq!(
            fold(json!({"portMappings": {"HostPort": 1}})).unwrap(),
            json!({"portMappings": {"HostPort": 1}})
        );
        assert_eq!(fold(json!([1, 2])).unwrap(), json!([1, 2]));
    }
}
