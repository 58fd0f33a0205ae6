//! Policy documents: the schema (`docs/POLICY.md`), read from YAML or JSON, one or many per
//! file, checked whole before anything is stored. Errors name the document and the field path.

use std::collections::BTreeSet;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::selector::Selector;
use crate::names::validate_network_name;

/// One policy, as stored under `/ferrynet/v1/policies/<name>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Unique name (a DNS label).
    pub name: String,
    /// Only endpoints on this network are selected (and selector peers are looked up there);
    /// absent: every network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    /// Which endpoints it applies to (Kubernetes selector syntax; "" = all).
    #[serde(default)]
    pub selector: String,
    /// Lower first; policies without an order come last (then by name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order: Option<u32>,
    /// Present: ingress is restricted for the selected endpoints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress: Option<Vec<Rule>>,
    /// Present: egress is restricted for the selected endpoints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<Vec<Rule>>,
}

/// What a matching rule does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Let the connection through.
    #[default]
    Allow,
    /// Drop it.
    Deny,
}

/// One rule: peers and ports; the first rule that matches decides.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// allow (default) or deny.
    #[serde(default)]
    pub action: Action,
    /// Ingress: where connections come from (absent or empty: anywhere).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from: Vec<Peer>,
    /// Egress: where connections go (absent or empty: anywhere).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<Peer>,
    /// Destination ports (absent or empty: every protocol and port).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortRange>,
}

/// The other end of a connection: endpoints by selector and/or network, or addresses by CIDR.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Peer {
    /// Endpoints whose labels match (on the policy's network unless `network` is given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// Endpoints on this network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    /// Addresses in this block…
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cidr: Option<IpNet>,
    /// …but not in these.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub except: Vec<IpNet>,
}

/// Transport protocols a port rule names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Proto {
    /// TCP (6).
    Tcp,
    /// UDP (17).
    Udp,
    /// SCTP (132).
    Sctp,
}

impl Proto {
    /// nft's and the CLI's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
            Proto::Sctp => "sctp",
        }
    }
    /// The IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            Proto::Tcp => 6,
            Proto::Udp => 17,
            Proto::Sctp => 132,
        }
    }
    /// From an IP protocol number.
    pub fn from_number(n: u8) -> Option<Proto> {
        match n {
            6 => Some(Proto::Tcp),
            17 => Some(Proto::Udp),
            132 => Some(Proto::Sctp),
            _ => None,
        }
    }
}

impl FromStr for Proto {
    type Err = String;
    fn from_str(s: &str) -> Result<Proto, String> {
        match s.to_ascii_lowercase().as_str() {
            "tcp" => Ok(Proto::Tcp),
            "udp" => Ok(Proto::Udp),
            "sctp" => Ok(Proto::Sctp),
            _ => Err(format!("protocol {s:?} must be tcp, udp or sctp")),
        }
    }
}

/// `tcp/80`, `udp/53`, `tcp/8000-8080`, or `udp` (every port of the protocol).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortRange {
    /// The protocol.
    pub proto: Proto,
    /// First port (inclusive).
    pub first: u16,
    /// Last port (inclusive).
    pub last: u16,
}

impl PortRange {
    /// True when it holds `port` of `proto`.
    pub fn contains(&self, proto: Proto, port: u16) -> bool {
        self.proto == proto && (self.first..=self.last).contains(&port)
    }
}

impl FromStr for PortRange {
    type Err = String;
    fn from_str(s: &str) -> Result<PortRange, String> {
        let (proto, ports) = s.split_once('/').unwrap_or((s, ""));
        let proto: Proto = proto.parse()?;
        if ports.is_empty() {
            return Ok(PortRange {
                proto,
                first: 1,
                last: 65535,
            });
        }
        let port = |p: &str| {
            p.parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| format!("{s:?}: {p:?} is not a port (1-65535)"))
        };
        let (first, last) = match ports.split_once('-') {
            Some((a, b)) => (port(a)?, port(b)?),
            None => (port(ports)?, port(ports)?),
        };
        if first > last {
            return Err(format!("{s:?}: the range runs backwards"));
        }
        Ok(PortRange { proto, first, last })
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.first, self.last) {
            (1, 65535) => write!(f, "{}", self.proto.as_str()),
            (a, b) if a == b => write!(f, "{}/{a}", self.proto.as_str()),
            (a, b) => write!(f, "{}/{a}-{b}", self.proto.as_str()),
        }
    }
}

impl Serialize for PortRange {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for PortRange {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<PortRange, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A document that cannot be applied: which one, which field, why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("document {index}{}: {path}: {why}", name.as_ref().map(|n| format!(" ({n})")).unwrap_or_default())]
pub struct DocError {
    /// 1-based position of the document in the file.
    pub index: usize,
    /// Its name, when it got that far.
    pub name: Option<String>,
    /// The field path (`ingress[0].ports[1]`), or `.` for the document itself.
    pub path: String,
    /// What is wrong.
    pub why: String,
}

/// Read every policy of a file: YAML documents separated by `---`, or JSON (one object or an
/// array of them; JSON is YAML too). Each is checked ([`Policy::check`]); two documents with
/// one name are refused. Any error refuses the whole file.
pub fn parse_documents(text: &str) -> Result<Vec<Policy>, DocError> {
    let mut values = Vec::new();
    for (i, doc) in serde_norway::Deserializer::from_str(text).enumerate() {
        let v = serde_norway::Value::deserialize(doc).map_err(|e| DocError {
            index: i + 1,
            name: None,
            path: ".".into(),
            why: e.to_string(),
        })?;
        match v {
            serde_norway::Value::Null => {}
            serde_norway::Value::Sequence(items) => values.extend(items),
            v => values.push(v),
        }
    }
    let mut out: Vec<Policy> = Vec::new();
    for (i, v) in values.into_iter().enumerate() {
        let name = v.get("name").and_then(|n| n.as_str()).map(str::to_string);
        let err = |path: String, why: String| DocError {
            index: i + 1,
            name: name.clone(),
            path,
            why,
        };
        let p: Policy = serde_path_to_error::deserialize(v)
            .map_err(|e| err(e.path().to_string(), e.inner().to_string()))?;
        p.check().map_err(|(path, why)| err(path, why))?;
        if out.iter().any(|o| o.name == p.name) {
            return Err(err("name".into(), format!("{:?} is given twice", p.name)));
        }
        out.push(p);
    }
    if out.is_empty() {
        return Err(DocError {
            index: 0,
            name: None,
            path: ".".into(),
            why: "no policy in the file".into(),
        });
    }
    Ok(out)
}

type FieldError = (String, String);

impl Policy {
    /// Everything serde cannot check: names, selectors, peers, the direction of each rule.
    /// The error is (field path, why). Stored records are checked again when read.
    pub fn check(&self) -> Result<(), FieldError> {
        if !crate::validate::is_dns_name(&self.name) || self.name.contains('.') {
            return Err((
                "name".into(),
                format!(
                    "{:?} must be one DNS label of [A-Za-z0-9_-] (1-63 bytes)",
                    self.name
                ),
            ));
        }
        if let Some(n) = &self.network {
            validate_network_name(n).map_err(|e| ("network".into(), e.to_string()))?;
        }
        Selector::parse(&self.selector).map_err(|e| ("selector".into(), e.to_string()))?;
        for (dir, rules, wrong) in [
            ("ingress", &self.ingress, "to"),
            ("egress", &self.egress, "from"),
        ] {
            for (i, r) in rules.iter().flatten().enumerate() {
                let at = |f: &str| format!("{dir}[{i}].{f}");
                let stray = if dir == "ingress" { &r.to } else { &r.from };
                if !stray.is_empty() {
                    let right = if dir == "ingress" { "from" } else { "to" };
                    return Err((at(wrong), format!("{dir} rules name peers in `{right}`")));
                }
                let peers = if dir == "ingress" { &r.from } else { &r.to };
                let right = if dir == "ingress" { "from" } else { "to" };
                for (j, p) in peers.iter().enumerate() {
                    p.check().map_err(|(f, why)| {
                        let f = if f.is_empty() { f } else { format!(".{f}") };
                        (format!("{dir}[{i}].{right}[{j}]{f}"), why)
                    })?;
                }
                let mut seen = BTreeSet::new();
                for (j, p) in r.ports.iter().enumerate() {
                    if !seen.insert(*p) {
                        return Err((at(&format!("ports[{j}]")), format!("{p} is given twice")));
                    }
                }
            }
        }
        Ok(())
    }

    /// The parsed selector (checked by [`Policy::check`]; a bad one selects nothing).
    pub fn parsed_selector(&self) -> Option<Selector> {
        Selector::parse(&self.selector).ok()
    }
}

impl Peer {
    fn check(&self) -> Result<(), FieldError> {
        if let Some(s) = &self.selector {
            Selector::parse(s).map_err(|e| ("selector".to_string(), e.to_string()))?;
        }
        if let Some(n) = &self.network {
            validate_network_name(n).map_err(|e| ("network".to_string(), e.to_string()))?;
        }
        match &self.cidr {
            None if self.selector.is_none() && self.network.is_none() => {
                return Err((
                    String::new(),
                    "a peer needs a selector, a network or a cidr".into(),
                ))
            }
            None if !self.except.is_empty() => {
                return Err(("except".into(), "except needs a cidr".into()))
            }
            None => {}
            Some(c) => {
                if self.selector.is_some() || self.network.is_some() {
                    return Err((
                        "cidr".into(),
                        "a cidr peer has no selector or network (use two peers)".into(),
                    ));
                }
                if c.trunc() != *c {
                    return Err(("cidr".into(), format!("{c} has host bits set")));
                }
                for (k, e) in self.except.iter().enumerate() {
                    let inside = same_family(c.addr(), e.addr()) && c.contains(e);
                    if !inside || e.trunc() != *e {
                        return Err((
                            format!("except[{k}]"),
                            format!("{e} must be a block inside {c}"),
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}

/// A stored policy is input: checked again when read, and it must sit under its own name.
impl crate::validate::Validate for Policy {
    fn validate(&self) -> Result<(), crate::validate::RecordError> {
        self.check()
            .map_err(|(path, why)| crate::validate::RecordError::new("policy", path, why))
    }
    fn check_key(&self, key: &str) -> Result<(), crate::validate::RecordError> {
        if key == keys::policy(&self.name) {
            return Ok(());
        }
        Err(crate::validate::RecordError::new(
            "name",
            &self.name,
            "does not match its key",
        ))
    }
}

fn same_family(a: IpAddr, b: IpAddr) -> bool {
    a.is_ipv4() == b.is_ipv4()
}

/// Store keys of policies.
pub mod keys {
    use crate::network::keys::ROOT;

    /// Key of one policy.
    pub fn policy(name: &str) -> String {
        format!("{ROOT}policies/{name}")
    }
    /// Prefix of every policy.
    pub fn policies() -> String {
        format!("{ROOT}policies/")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
name: web-ingress
network: blue
selector: app=web
order: 100
ingress:
  - action: allow
    from: [{selector: role=client}, {network: green}, {cidr: 10.0.0.0/8, except: [10.1.0.0/16]}]
    ports: [tcp/80, udp/53, tcp/8000-8080]
egress:
  - action: deny
    to: [{cidr: 0.0.0.0/0}]
---
name: db
selector: app=db
ingress: []
"#;

    #[test]
    fn the_issue_example_parses_with_many_documents() {
        let ps = parse_documents(EXAMPLE).unwrap();
        assert_eq!(ps.len(), 2);
        let r = &ps[0].ingress.as_ref().unwrap()[0];
        assert_eq!(r.from.len(), 3);
        assert_eq!(r.ports[2].to_string(), "tcp/8000-8080");
        assert_eq!(ps[0].egress.as_ref().unwrap()[0].action, Action::Deny);
        assert_eq!(ps[1].ingress, Some(vec![]));
        assert_eq!(ps[1].egress, None);
        // JSON, one object or an array, reads the same.
        let json = serde_json::to_string(&ps).unwrap();
        assert_eq!(parse_documents(&json).unwrap(), ps);
        let one = serde_json::to_string(&ps[0]).unwrap();
        assert_eq!(parse_documents(&one).unwrap()[0], ps[0]);
    }

    fn err(text: &str) -> DocError {
        parse_documents(text).unwrap_err()
    }

    #[test]
    fn errors_name_the_document_and_the_field() {
        let e = err("name: a\nselector: x=y\ningress: [{from: [{selektor: a=b}]}]\n");
        assert_eq!(
            (e.index, e.path.as_str()),
            (1, "ingress[0].from[0].selektor")
        );
        assert!(e.why.contains("unknown field `selektor`"), "{e}");
        let e = err("name: a\n---\nname: b\nordr: 3\n");
        assert_eq!((e.index, e.name.as_deref()), (2, Some("b")));
        assert!(e.why.contains("ordr"), "{e}");
        let e = err("name: a\ningress: [{ports: [tcp/80, tcp/99999]}]\n");
        assert_eq!(e.path, "ingress[0].ports[1]");
        let e = err("name: a\negress: [{from: [{cidr: 10.0.0.0/8}]}]\n");
        assert_eq!(e.path, "egress[0].from");
        let e = err("name: a\ningress: [{from: [{cidr: 10.0.0.0/8, except: [11.0.0.0/16]}]}]\n");
        assert_eq!(e.path, "ingress[0].from[0].except[0]");
        let e = err("name: a\ningress: [{from: [{cidr: 10.0.0.1/8}]}]\n");
        assert_eq!(e.path, "ingress[0].from[0].cidr");
        let e = err("name: a\ningress: [{from: [{}]}]\n");
        assert_eq!(e.path, "ingress[0].from[0]");
        let e = err("name: a\nselector: app in (x\n");
        assert_eq!(e.path, "selector");
        let e = err("name: A.b\n");
        assert_eq!(e.path, "name");
        let e = err("name: a\n---\nname: a\n");
        assert!(e.why.contains("twice"));
        let e = err("name: a\ningress: [{action: maybe}]\n");
        assert_eq!(e.path, "ingress[0].action");
        let e = err("name: a\norder: -1\n");
        assert_eq!(e.path, "order");
        assert_eq!(err("").why, "no policy in the file");
        assert_eq!(err("name: [").path, ".");
    }

    #[test]
    fn port_ranges_read_and_print() {
        for (s, want) in [("tcp/80", "tcp/80"), ("UDP/53", "udp/53"), ("sctp", "sctp")] {
            assert_eq!(s.parse::<PortRange>().unwrap().to_string(), want);
        }
        for bad in ["tcp/0", "tcp/9-8", "icmp/1", "tcp/x", "tcp/1-", "80"] {
            assert!(bad.parse::<PortRange>().is_err(), "{bad}");
        }
    }
}
