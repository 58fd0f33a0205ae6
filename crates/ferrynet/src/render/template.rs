//! Templates: minijinja (Jinja2 syntax) over a [`RenderContext`], with a few helpers for
//! configuration files. Undefined values may be tested (`{% if x.y %}`) but not printed, so a
//! typo fails the render instead of writing an empty field. Whitespace as config files want
//! it: the final newline is kept, and a line holding only a block tag leaves no blank line
//! (`trim_blocks`, `lstrip_blocks`). No HTML escaping; booleans print as `true`/`false`,
//! `none` (a service without a VIP, say) as nothing.
//!
//! Globals: `host`, `services` (a list in name order that also answers `services.web` /
//! `services["web"]`), `all_producers`, `kv`, `networks`, `endpoints` (also `containers`),
//! `revision`. Functions: `service(name)`, `producers(name)`, `key(name[, default])`.
//! Filters: `sort_by(attribute[, reverse])` (addresses and numbers in numeric order),
//! `shquote` (sh-safe quoting), and minijinja's built-ins (`join`, `map`, `selectattr`,
//! `tojson`, …).

use std::cmp::Ordering;
use std::net::IpAddr;
use std::sync::Arc;

use minijinja::syntax::SyntaxConfig;
use minijinja::value::{Enumerator, Object, ObjectRepr, Serde, Value, ValueKind};
use minijinja::{
    escape_formatter, AutoEscape, Environment, Error, ErrorKind, State, UndefinedBehavior,
};

use super::context::RenderContext;
use super::envfile;

/// A template that failed to compile or render, located in its file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("template {name}{}: {message}", line.map(|l| format!(", line {l}")).unwrap_or_default())]
pub struct TemplateError {
    /// The template's file (as given on the command line).
    pub name: String,
    /// 1-based line of the error, when known.
    pub line: Option<usize>,
    /// What went wrong.
    pub message: String,
}

impl TemplateError {
    fn from_minijinja(name: &str, e: &Error) -> TemplateError {
        let mut message = match e.detail() {
            Some(d) => format!("{}: {d}", e.kind()),
            None => e.kind().to_string(),
        };
        // Errors inside includes or filters carry their cause as a source.
        let mut src = std::error::Error::source(e);
        while let Some(s) = src {
            message.push_str(&format!(": {s}"));
            src = s.source();
        }
        TemplateError {
            name: e.name().unwrap_or(name).to_string(),
            line: e.line(),
            message,
        }
    }
}

/// One compiled template.
pub struct Template {
    name: String,
    env: Environment<'static>,
}

impl std::fmt::Debug for Template {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Template")
            .field("name", &self.name)
            .finish()
    }
}

impl Template {
    /// Compile `source`, reported as `name` in errors.
    pub fn new(name: &str, source: String) -> Result<Template, TemplateError> {
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::SemiStrict);
        // Config-file friendly whitespace: the final newline stays, and a line holding only a
        // block tag (`{% for … %}`) leaves nothing behind.
        let syntax = SyntaxConfig::builder()
            .keep_trailing_newline(true)
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| TemplateError::from_minijinja(name, &e))?;
        env.set_syntax(syntax);
        // Files are not HTML: no escaping whatever the name; `true`/`false` as most config
        // languages spell them; `none` (a missing VIP or port) prints as nothing.
        env.set_auto_escape_callback(|_| AutoEscape::None);
        env.set_formatter(|out, state, v| match v.kind() {
            ValueKind::None => Ok(()),
            ValueKind::Bool => write!(out, "{}", v.is_true())
                .map_err(|e| Error::new(ErrorKind::WriteFailure, e.to_string())),
            _ => escape_formatter(out, state, v),
        });
        env.add_function("service", service);
        env.add_function("producers", producers);
        env.add_function("key", key);
        env.add_filter("sort_by", sort_by);
        env.add_filter("shquote", |v: &str| envfile::quote(v));
        env.add_template_owned(name.to_string(), source)
            .map_err(|e| TemplateError::from_minijinja(name, &e))?;
        Ok(Template {
            name: name.to_string(),
            env,
        })
    }

    /// The template's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Render against `ctx`.
    pub fn render(&self, ctx: &RenderContext) -> Result<String, TemplateError> {
        let err = |e: Error| TemplateError::from_minijinja(&self.name, &e);
        let t = self.env.get_template(&self.name).map_err(err)?;
        t.render(context_value(ctx)).map_err(err)
    }
}

/// The template globals for `ctx`.
fn context_value(ctx: &RenderContext) -> Value {
    let services = ByName(
        ctx.services
            .iter()
            .map(|s| (s.name.clone(), Value::from(Serde(s))))
            .collect(),
    );
    let endpoints = Value::from(Serde(&ctx.endpoints));
    minijinja::context! {
        host => ctx.host.clone(),
        services => Value::from_object(services),
        all_producers => Value::from(Serde(&ctx.all_producers)),
        kv => Value::from(Serde(&ctx.kv)),
        networks => Value::from(Serde(&ctx.networks)),
        endpoints => endpoints.clone(),
        containers => endpoints,
        revision => ctx.revision,
    }
}

/// A list that also answers lookups by name (`services.web`, `services["web"]`).
#[derive(Debug)]
struct ByName(Vec<(String, Value)>);

impl Object for ByName {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        ObjectRepr::Seq
    }
    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        if let Some(name) = key.as_str() {
            return self
                .0
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.clone());
        }
        self.0.get(key.as_usize()?).map(|(_, v)| v.clone())
    }
    fn enumerate(self: &Arc<Self>) -> Enumerator {
        Enumerator::Values(self.0.iter().map(|(_, v)| v.clone()).collect())
    }
}

/// `service("web")`: the service, undefined when there is none (so `{% if service("web") %}`).
fn service(state: &State, name: &str) -> Result<Value, Error> {
    let services = state.lookup("services").unwrap_or_default();
    Ok(services
        .as_object()
        .and_then(|o| o.get_value(&Value::from(name)))
        .unwrap_or(Value::UNDEFINED))
}

/// `producers("web")`: the healthy producers of a service, empty when there is none.
fn producers(state: &State, name: &str) -> Result<Value, Error> {
    let s = service(state, name)?;
    if s.is_undefined() {
        return Ok(Value::from(Vec::<Value>::new()));
    }
    s.get_attr("producers")
}

/// `key("name")`: a `ferrynet kv` value; an error when it is not set, unless a default is given.
fn key(state: &State, name: &str, default: Option<Value>) -> Result<Value, Error> {
    let kv = state.lookup("kv").unwrap_or_default();
    match kv.get_attr(name) {
        Ok(v) if !v.is_undefined() => Ok(v),
        _ => default.ok_or_else(|| {
            Error::new(
                ErrorKind::InvalidOperation,
                format!("kv key {name:?} is not set (give a default: key({name:?}, \"…\"))"),
            )
        }),
    }
}

/// Sort key: numbers and addresses compare numerically, other values as text.
#[derive(PartialEq, PartialOrd)]
enum SortKey {
    Num(f64),
    Addr(bool, IpAddr),
    Text(String),
    Missing,
}

fn sort_key(v: &Value) -> SortKey {
    if v.is_undefined() || v.is_none() {
        return SortKey::Missing;
    }
    if let Some(n) = v.as_i64() {
        return SortKey::Num(n as f64);
    }
    if let Ok(f) = f64::try_from(v.clone()) {
        return SortKey::Num(f);
    }
    let s = v.to_string();
    match s.parse::<IpAddr>() {
        Ok(a) => SortKey::Addr(a.is_ipv6(), a),
        Err(_) => SortKey::Text(s),
    }
}

/// `list|sort_by("attr.path")`: a stable sort by an attribute (dotted for nested ones).
fn sort_by(values: Value, attribute: &str, reverse: Option<bool>) -> Result<Value, Error> {
    let mut items: Vec<(SortKey, Value)> = Vec::new();
    for item in values.try_iter()? {
        let mut k = item.clone();
        for part in attribute.split('.') {
            k = match part.parse::<usize>() {
                Ok(i) => k.get_item_by_index(i).unwrap_or(Value::UNDEFINED),
                Err(_) => k.get_attr(part).unwrap_or(Value::UNDEFINED),
            };
        }
        items.push((sort_key(&k), item));
    }
    items.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap_or(Ordering::Equal));
    if reverse.unwrap_or(false) {
        items.reverse();
    }
    Ok(Value::from(
        items.into_iter().map(|(_, v)| v).collect::<Vec<_>>(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::render::context::{build, tests::sample};

    fn render(src: &str) -> Result<String, TemplateError> {
        Template::new("t.tmpl", src.to_string())?.render(&build(&sample(), "h1"))
    }

    #[test]
    fn services_by_list_and_by_name() {
        let out = render(
            "{% for s in services %}{{ s.name }}={{ s.vip or '-' }};{% endfor %}\
             {{ services.web.port }} {{ services['web'].vip6 }} {{ services|length }}",
        )
        .unwrap();
        assert_eq!(out, "db=-;web=10.96.0.10;80 fd00:96::a 2");
    }

    #[test]
    fn upstream_block_from_healthy_producers() {
        let out = render(
            "upstream web {\n\
             {% for p in producers('web') %}\n  server {{ p.addr }}:{{ p.ports.http }};\n\
             {% endfor %}\n}\n",
        )
        .unwrap();
        assert_eq!(out, "upstream web {\n  server 10.20.0.2:8080;\n}\n");
        assert_eq!(render("{{ producers('nope')|length }}").unwrap(), "0");
        assert_eq!(
            render("{% if service('nope') %}yes{% else %}no{% endif %}").unwrap(),
            "no"
        );
        assert_eq!(
            render("[{{ services.db.vip }}]<{{ '<&>' }}>").unwrap(),
            "[]<<&>>"
        );
    }

    #[test]
    fn all_producers_and_kv() {
        let out = render(
            "{% for p in all_producers %}{{ p.id }}:{{ p.healthy }} {% endfor %}\
             {{ key('greeting') }} {{ key('missing', 'dflt') }} {{ kv.greeting }}",
        )
        .unwrap();
        assert_eq!(out, "a:true b:false hello dflt hello");
    }

    #[test]
    fn sort_by_orders_addresses_numerically() {
        let out = render(
            "{% set l = [{'a': '10.0.0.10'}, {'a': '10.0.0.9'}, {'a': '10.0.0.100'}] %}\
             {{ l|sort_by('a')|map(attribute='a')|join(',') }} \
             {{ all_producers|sort_by('addr', true)|map(attribute='id')|join(',') }}",
        )
        .unwrap();
        assert_eq!(out, "10.0.0.9,10.0.0.10,10.0.0.100 b,a");
    }

    #[test]
    fn errors_name_the_file_and_line() {
        let e = render("line one\n{{ services.web.nope }}\n").unwrap_err();
        assert_eq!((e.name.as_str(), e.line), ("t.tmpl", Some(2)), "{e}");
        assert!(
            e.to_string()
                .starts_with("template t.tmpl, line 2: undefined value"),
            "{e}"
        );
        let e = render("a\nb\n{% for x in %}\n").unwrap_err();
        assert_eq!(e.line, Some(3), "{e}");
        assert!(e.message.contains("syntax error"), "{e}");
        let e = render("\n{{ key('missing') }}").unwrap_err();
        assert_eq!(e.line, Some(2));
        assert!(e.message.contains("kv key \"missing\" is not set"), "{e}");
    }

    #[test]
    fn shquote_filter() {
        assert_eq!(render("{{ 'a b'|shquote }}").unwrap(), "\"a b\"");
    }
}
