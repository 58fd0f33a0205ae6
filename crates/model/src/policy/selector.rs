//! Label selectors in Kubernetes syntax: `a=b`, `a==b`, `a!=b`, `a in (x,y)`, `a notin (x)`,
//! `a`, `!a`, joined by commas (all must hold); the empty selector selects everything.
//!
//! Hand-written: the grammar is a dozen lines and the crates that parse it come with a
//! Kubernetes client attached.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// One requirement on one label.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Requirement {
    /// The label is present (`a`).
    Exists(String),
    /// The label is absent (`!a`).
    Absent(String),
    /// The label is present with one of the values (`a=b`, `a in (x,y)`).
    In(String, BTreeSet<String>),
    /// The label is absent or has none of the values (`a!=b`, `a notin (x)`).
    NotIn(String, BTreeSet<String>),
}

/// A parsed selector: every requirement must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Selector {
    reqs: Vec<Requirement>,
}

/// A selector that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("selector {text:?}: {why}")]
pub struct SelectorError {
    /// The selector as written.
    pub text: String,
    /// What is wrong.
    pub why: String,
}

impl Selector {
    /// Parse `text`; `""` (or only spaces) selects everything.
    pub fn parse(text: &str) -> Result<Selector, SelectorError> {
        let bad = |why: String| SelectorError {
            text: text.to_string(),
            why,
        };
        let mut reqs = Vec::new();
        for part in split_top(text).map_err(bad)? {
            let part = part.trim();
            if part.is_empty() {
                if text.trim().is_empty() {
                    continue;
                }
                return Err(bad("empty requirement between commas".into()));
            }
            reqs.push(parse_requirement(part).map_err(bad)?);
        }
        reqs.sort();
        reqs.dedup();
        Ok(Selector { reqs })
    }

    /// True when the labels satisfy every requirement.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.reqs.iter().all(|r| match r {
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::Absent(k) => !labels.contains_key(k),
            Requirement::In(k, vs) => labels.get(k).is_some_and(|v| vs.contains(v)),
            Requirement::NotIn(k, vs) => labels.get(k).is_none_or(|v| !vs.contains(v)),
        })
    }

    /// A label every match must have with one of these values (the first `=`/`in`
    /// requirement), for looking candidates up by label instead of testing everyone.
    pub fn required(&self) -> Option<(&str, &BTreeSet<String>)> {
        self.reqs.iter().find_map(|r| match r {
            Requirement::In(k, vs) => Some((k.as_str(), vs)),
            _ => None,
        })
    }

    /// True for the empty selector (everything).
    pub fn is_all(&self) -> bool {
        self.reqs.is_empty()
    }
}

/// The canonical spelling (requirements sorted): equal selectors print equal.
impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list = |vs: &BTreeSet<String>| vs.iter().cloned().collect::<Vec<_>>().join(",");
        let parts: Vec<String> = self
            .reqs
            .iter()
            .map(|r| match r {
                Requirement::Exists(k) => k.clone(),
                Requirement::Absent(k) => format!("!{k}"),
                Requirement::In(k, vs) if vs.len() == 1 => format!("{k}={}", list(vs)),
                Requirement::In(k, vs) => format!("{k} in ({})", list(vs)),
                Requirement::NotIn(k, vs) if vs.len() == 1 => format!("{k}!={}", list(vs)),
                Requirement::NotIn(k, vs) => format!("{k} notin ({})", list(vs)),
            })
            .collect();
        f.write_str(&parts.join(","))
    }
}

/// Split at commas outside parentheses.
fn split_top(text: &str) -> Result<Vec<&str>, String> {
    let mut out = Vec::new();
    let (mut depth, mut start) = (0i32, 0usize);
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
        if !(0..=1).contains(&depth) {
            return Err("unbalanced or nested parentheses".into());
        }
    }
    if depth != 0 {
        return Err("unbalanced parentheses".into());
    }
    out.push(&text[start..]);
    Ok(out)
}

fn parse_requirement(part: &str) -> Result<Requirement, String> {
    if let Some(k) = part.strip_prefix('!') {
        return Ok(Requirement::Absent(key(k.trim())?));
    }
    let end = part.find(|c: char| !is_key_char(c)).unwrap_or(part.len());
    let k = key(&part[..end])?;
    let rest = part[end..].trim_start();
    if rest.is_empty() {
        return Ok(Requirement::Exists(k));
    }
    let one = |v: &str| value(v.trim()).map(|v| BTreeSet::from([v]));
    if let Some(v) = rest.strip_prefix("!=") {
        return Ok(Requirement::NotIn(k, one(v)?));
    }
    if let Some(v) = rest.strip_prefix("==").or_else(|| rest.strip_prefix('=')) {
        return Ok(Requirement::In(k, one(v)?));
    }
    if let Some(l) = word(rest, "notin") {
        return Ok(Requirement::NotIn(k, values(l)?));
    }
    if let Some(l) = word(rest, "in") {
        return Ok(Requirement::In(k, values(l)?));
    }
    Err(format!(
        "{part:?}: expected =, ==, !=, in (…) or notin (…) after {k:?}"
    ))
}

/// `rest` without the operator word `w`, when it starts with it followed by a space or `(`.
fn word<'a>(rest: &'a str, w: &str) -> Option<&'a str> {
    let after = rest.strip_prefix(w)?;
    after
        .starts_with(|c: char| c.is_whitespace() || c == '(')
        .then(|| after.trim())
}

fn values(list: &str) -> Result<BTreeSet<String>, String> {
    let inner = list
        .strip_prefix('(')
        .and_then(|l| l.strip_suffix(')'))
        .ok_or_else(|| format!("{list:?}: expected a list in parentheses, like (a,b)"))?;
    let vs = inner
        .split(',')
        .map(|v| value(v.trim()))
        .collect::<Result<BTreeSet<_>, _>>()?;
    Ok(vs)
}

fn is_key_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '/' | '-')
}

/// A label key: 1-253 of `[A-Za-z0-9_./-]` (what endpoint labels may hold).
fn key(k: &str) -> Result<String, String> {
    if k.is_empty() || k.len() > 253 || !k.chars().all(is_key_char) {
        return Err(format!("label key {k:?} must be 1-253 of [A-Za-z0-9_./-]"));
    }
    Ok(k.to_string())
}

/// A label value: at most 63 of `[A-Za-z0-9_.-]`; empty is a value too.
fn value(v: &str) -> Result<String, String> {
    let ok = v.len() <= 63
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if !ok {
        return Err(format!(
            "label value {v:?} must be at most 63 of [A-Za-z0-9_.-]"
        ));
    }
    Ok(v.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn every_operator_matches_as_in_kubernetes() {
        let web = labels(&[("app", "web"), ("tier", "front")]);
        let db = labels(&[("app", "db")]);
        let none = labels(&[]);
        let cases: &[(&str, [bool; 3])] = &[
            ("", [true, true, true]),
            ("app=web", [true, false, false]),
            ("app==web", [true, false, false]),
            ("app!=web", [false, true, true]),
            ("app in (web, db)", [true, true, false]),
            ("app notin (web)", [false, true, true]),
            ("tier", [true, false, false]),
            ("!tier", [false, true, true]),
            ("app=web,tier=front", [true, false, false]),
            ("app in (db),!tier", [false, true, false]),
            ("app=", [false, false, false]),
        ];
        for (text, want) in cases {
            let s = Selector::parse(text).unwrap();
            let got = [s.matches(&web), s.matches(&db), s.matches(&none)];
            assert_eq!(&got, want, "{text}");
        }
    }

    #[test]
    fn bad_selectors_say_why() {
        for bad in [
            "app=web,",
            "app in web",
            "app in (a,(b))",
            "app in (a",
            "a b",
            "app=we b",
            "=web",
            "!",
            "app<3",
            "app=x;y",
        ] {
            let e = Selector::parse(bad).unwrap_err();
            assert_eq!(e.text, bad);
            assert!(!e.why.is_empty());
        }
    }

    #[test]
    fn canonical_spelling_is_order_free() {
        let a = Selector::parse("b in (y,x), a=1").unwrap();
        let b = Selector::parse("a==1,b in (x, y)").unwrap();
        assert_eq!(a.to_string(), "a=1,b in (x,y)");
        assert_eq!(a, b);
        assert_eq!(Selector::parse(&a.to_string()).unwrap(), a);
        assert!(Selector::parse(" ").unwrap().is_all());
    }
}
