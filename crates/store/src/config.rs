//! Which store to use, from one string: a path (embedded) or an etcd URL.
//!
//! Accepted forms:
//! - `/var/lib/ferrynet/store.redb`, `state/store.redb` or `file:///var/lib/ferrynet/store.redb`:
//!   the embedded redb backend on this host;
//! - `etcd://host:2379[,host2:2379…]`: etcd over plain gRPC;
//! - `etcds://host:2379[,…][?ca=/ca.pem&cert=/client.pem&key=/client-key.pem&timeout=5s]`:
//!   etcd over TLS (`ca` defaults to the system trust store; `cert`+`key` give a client
//!   certificate). `timeout` (e.g. `5s`, `500ms`) bounds every request and works for both.
//! - either with a user (etcd `auth enable`): `etcd://user@host:2379?password-file=/path`,
//!   `etcd://user:password@host:2379`, or `FERRYNET_ETCD_USER` / `FERRYNET_ETCD_PASSWORD` in
//!   the environment ([`open`] reads them when the URL names no user or password). A password
//!   is never shown: not in [`fmt::Display`], not in `Debug`, not in errors.
//!
//! Parsing is pure (no I/O); [`open`] turns a config into a running store.

use std::fmt;
use std::net::Ipv6Addr;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use crate::{EmbeddedStore, EtcdStore, Result, Store, StoreError};

/// The port etcd clients use when an endpoint names none.
pub const DEFAULT_ETCD_PORT: u16 = 2379;
/// How long one etcd request may take before it fails as [`StoreError::Unavailable`].
pub const DEFAULT_ETCD_TIMEOUT: Duration = Duration::from_secs(5);

/// Environment variable naming the etcd user when the URL does not.
pub const ETCD_USER_ENV: &str = "FERRYNET_ETCD_USER";
/// Environment variable holding the etcd password when the URL gives neither one nor a file.
pub const ETCD_PASSWORD_ENV: &str = "FERRYNET_ETCD_PASSWORD";

/// A password, kept out of logs: `Debug` prints `***` and nothing else shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Password(String);

impl Password {
    /// Wrap a password.
    pub fn new(p: impl Into<String>) -> Password {
        Password(p.into())
    }
    /// The password itself, for the client's login only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// Where the store lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreConfig {
    /// A local redb file (one host).
    Embedded(PathBuf),
    /// An etcd v3 cluster.
    Etcd(EtcdConfig),
}

/// How to reach an etcd cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdConfig {
    /// Client endpoints as `host:port` (IPv6 as `[addr]:port`), tried by the client's balancer.
    pub endpoints: Vec<String>,
    /// Speak TLS (`etcds://`).
    pub tls: bool,
    /// PEM CA bundle that signed the servers' certificates; None means the system trust store.
    pub ca: Option<PathBuf>,
    /// PEM client certificate (etcd `--client-cert-auth`); needs `key`.
    pub cert: Option<PathBuf>,
    /// PEM private key of `cert`.
    pub key: Option<PathBuf>,
    /// Limit for each request, so a dead etcd fails a call instead of hanging it.
    pub timeout: Duration,
    /// etcd user to log in as (etcd with `auth enable`).
    pub user: Option<String>,
    /// The user's password, from the URL or the environment.
    pub password: Option<Password>,
    /// A file holding the user's password (`?password-file=`), read when connecting.
    pub password_file: Option<PathBuf>,
}

impl EtcdConfig {
    /// Plain (non-TLS) access to `endpoints` with the default timeout.
    pub fn new(endpoints: impl IntoIterator<Item = impl Into<String>>) -> EtcdConfig {
        EtcdConfig {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            tls: false,
            ca: None,
            cert: None,
            key: None,
            timeout: DEFAULT_ETCD_TIMEOUT,
            user: None,
            password: None,
            password_file: None,
        }
    }

    /// Fill the user and password from the environment (`var`: a lookup such as
    /// `std::env::var`) where the URL gave none; an explicit URL always wins.
    pub fn with_env_credentials(mut self, var: impl Fn(&str) -> Option<String>) -> EtcdConfig {
        let var = |k: &str| var(k).filter(|v| !v.is_empty());
        if self.user.is_none() {
            self.user = var(ETCD_USER_ENV);
        }
        if self.user.is_some() && self.password.is_none() && self.password_file.is_none() {
            self.password = var(ETCD_PASSWORD_ENV).map(Password::new);
        }
        self
    }

    /// Check what the parser checks, for configs built field by field.
    pub fn validate(&self) -> std::result::Result<(), ConfigError> {
        if self.endpoints.is_empty() {
            return Err(ConfigError::NoEndpoints(self.to_string()));
        }
        for ep in &self.endpoints {
            if parse_endpoint(ep)? != *ep {
                return Err(ConfigError::BadEndpoint {
                    endpoint: ep.clone(),
                    reason: "expected host:port".into(),
                });
            }
        }
        if !self.tls {
            for (name, set) in [
                ("ca", self.ca.is_some()),
                ("cert", self.cert.is_some()),
                ("key", self.key.is_some()),
            ] {
                if set {
                    return Err(ConfigError::TlsOptionWithoutTls(name.into()));
                }
            }
        }
        if self.cert.is_some() != self.key.is_some() {
            return Err(ConfigError::CertWithoutKey);
        }
        if self.timeout.is_zero() {
            return Err(ConfigError::BadTimeout("0".into()));
        }
        if self.user.as_deref() == Some("") {
            return Err(ConfigError::EmptyUser);
        }
        if self.user.is_none() && (self.password.is_some() || self.password_file.is_some()) {
            return Err(ConfigError::PasswordWithoutUser);
        }
        if self.password.is_some() && self.password_file.is_some() {
            return Err(ConfigError::TwoPasswords);
        }
        Ok(())
    }
}

/// Why a store location could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// Nothing was given.
    #[error("the store location is empty (give a path, file:///path or etcd://host:port)")]
    Empty,
    /// A `scheme://` this crate does not know.
    #[error("unknown store scheme `{0}://` (use a path, file:///path, etcd://host:port or etcds://host:port)")]
    UnknownScheme(String),
    /// `etcd:host` and the like: a URL scheme without `//`, almost surely a typo, not a file.
    #[error("`{0}` looks like a URL without `//` (write {1}//…)")]
    MissingSlashes(String, String),
    /// A `file:` URL with a host other than localhost, or without a path.
    #[error("file URL `{0}` must look like file:///absolute/path")]
    BadFileUrl(String),
    /// An etcd URL without endpoints.
    #[error("etcd URL `{0}` names no endpoint (etcd://host:port[,host:port…])")]
    NoEndpoints(String),
    /// One endpoint is malformed.
    #[error("bad etcd endpoint `{endpoint}`: {reason}")]
    BadEndpoint {
        /// The endpoint as written.
        endpoint: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Something after the endpoints that is not a query (key namespaces are not supported).
    #[error("etcd URL has a path `{0}`; only etcd://host:port[,…][?options] is supported")]
    UnexpectedPath(String),
    /// A URL fragment (`#…`).
    #[error("etcd URL has a fragment `#{0}`; remove it")]
    Fragment(String),
    /// A query option this crate does not know.
    #[error("unknown etcd option `{0}` (known: ca, cert, key, timeout, password-file)")]
    UnknownOption(String),
    /// The same query option twice.
    #[error("etcd option `{0}` is given twice")]
    DuplicateOption(String),
    /// An option without a value (`?ca=` or `?ca`).
    #[error("etcd option `{0}` needs a value")]
    EmptyOption(String),
    /// A TLS option on a plain `etcd://` URL.
    #[error("etcd option `{0}` only applies to TLS; use etcds://")]
    TlsOptionWithoutTls(String),
    /// `cert` without `key` or the other way round.
    #[error("a client certificate needs its key: give cert and key together")]
    CertWithoutKey,
    /// A timeout that is not `<n>ms`, `<n>s` or `<n>m`, or is zero.
    #[error("bad timeout `{0}` (use e.g. 5s or 500ms, more than zero)")]
    BadTimeout(String),
    /// `etcd://@host` or `etcd://:pw@host`.
    #[error("the etcd user name before `@` is empty")]
    EmptyUser,
    /// A password (or password file) without a user name.
    #[error(
        "an etcd password needs a user: etcd://user@host?password-file=… or FERRYNET_ETCD_USER"
    )]
    PasswordWithoutUser,
    /// A password in the URL and a password file.
    #[error("give the etcd password once: in the URL or in password-file, not both")]
    TwoPasswords,
    /// A `%` not followed by two hex digits, or an escape that is not UTF-8.
    #[error("bad percent-escape in `{0}`")]
    BadEscape(String),
}

impl FromStr for StoreConfig {
    type Err = ConfigError;

    fn from_str(s: &str) -> std::result::Result<StoreConfig, ConfigError> {
        let s = s.trim();
        if s.is_empty() {
            return Err(ConfigError::Empty);
        }
        let Some((scheme, rest)) = s.split_once("://") else {
            for scheme in ["etcd:", "etcds:", "file:"] {
                // `get`: the prefix may end inside a multi-byte character (found by fuzzing).
                if s.get(..scheme.len())
                    .is_some_and(|p| p.eq_ignore_ascii_case(scheme))
                {
                    return Err(ConfigError::MissingSlashes(s.into(), scheme.into()));
                }
            }
            return Ok(StoreConfig::Embedded(PathBuf::from(s)));
        };
        match scheme.to_ascii_lowercase().as_str() {
            "file" => parse_file_url(s, rest),
            "etcd" => parse_etcd(s, rest, false).map(StoreConfig::Etcd),
            "etcds" => parse_etcd(s, rest, true).map(StoreConfig::Etcd),
            _ => Err(ConfigError::UnknownScheme(scheme.into())),
        }
    }
}

impl StoreConfig {
    /// Parse a store location (same as `str::parse`).
    pub fn parse(s: &str) -> std::result::Result<StoreConfig, ConfigError> {
        s.parse()
    }
}

fn parse_file_url(whole: &str, rest: &str) -> std::result::Result<StoreConfig, ConfigError> {
    // file:///p has an empty host; file://localhost/p names this host, which is the same.
    let path = if rest.starts_with('/') {
        rest
    } else if let Some(p) = rest
        // `get`: the prefix may end inside a multi-byte character (found by fuzzing).
        .get(.."localhost".len())
        .filter(|h| h.eq_ignore_ascii_case("localhost"))
        .and_then(|_| rest.get("localhost".len()..))
        .filter(|p| p.starts_with('/'))
    {
        p
    } else {
        return Err(ConfigError::BadFileUrl(whole.into()));
    };
    let path = percent_decode(path)?;
    if path == "/" {
        return Err(ConfigError::BadFileUrl(whole.into()));
    }
    Ok(StoreConfig::Embedded(PathBuf::from(path)))
}

fn parse_etcd(whole: &str, rest: &str, tls: bool) -> std::result::Result<EtcdConfig, ConfigError> {
    let (rest, fragment) = match rest.split_once('#') {
        Some((r, f)) => (r, Some(f)),
        None => (rest, None),
    };
    if let Some(f) = fragment {
        return Err(ConfigError::Fragment(f.into()));
    }
    let (rest, query) = match rest.split_once('?') {
        Some((r, q)) => (r, Some(q)),
        None => (rest, None),
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    if !path.is_empty() && path != "/" {
        return Err(ConfigError::UnexpectedPath(path.into()));
    }
    // `user[:password]@` before the endpoints (the endpoints themselves hold no `@`).
    let (userinfo, authority) = match authority.split_once('@') {
        Some((u, a)) => (Some(u), a),
        None => (None, authority),
    };
    if authority.is_empty() {
        return Err(ConfigError::NoEndpoints(whole.into()));
    }
    let endpoints = authority
        .split(',')
        .map(parse_endpoint)
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let mut cfg = EtcdConfig {
        tls,
        ..EtcdConfig::new(endpoints)
    };
    if let Some(u) = userinfo {
        let (user, password) = match u.split_once(':') {
            Some((user, pw)) => (user, Some(pw)),
            None => (u, None),
        };
        cfg.user = Some(percent_decode(user)?);
        cfg.password = password.map(percent_decode).transpose()?.map(Password::new);
    }
    let mut seen: Vec<&str> = Vec::new();
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        if seen.contains(&name) {
            return Err(ConfigError::DuplicateOption(name.into()));
        }
        seen.push(name);
        let value = percent_decode(value)?;
        if value.is_empty() {
            return Err(ConfigError::EmptyOption(name.into()));
        }
        match name {
            "ca" => cfg.ca = Some(PathBuf::from(value)),
            "cert" => cfg.cert = Some(PathBuf::from(value)),
            "key" => cfg.key = Some(PathBuf::from(value)),
            "timeout" => cfg.timeout = parse_timeout(&value)?,
            "password-file" => cfg.password_file = Some(PathBuf::from(value)),
            _ => return Err(ConfigError::UnknownOption(name.into())),
        }
    }
    cfg.validate()?;
    Ok(cfg)
}

/// Normalise one endpoint to `host:port` (adding the default port).
fn parse_endpoint(ep: &str) -> std::result::Result<String, ConfigError> {
    let bad = |reason: &str| ConfigError::BadEndpoint {
        endpoint: ep.into(),
        reason: reason.into(),
    };
    if ep.is_empty() {
        return Err(bad("empty (two commas in a row?)"));
    }
    if ep.contains('@') {
        return Err(bad("user names in the URL are not supported"));
    }
    let (host, port) = if let Some(v6) = ep.strip_prefix('[') {
        let (addr, after) = v6
            .split_once(']')
            .ok_or_else(|| bad("unclosed `[` around an IPv6 address"))?;
        addr.parse::<Ipv6Addr>()
            .map_err(|_| bad("not an IPv6 address inside `[…]`"))?;
        let port = match after {
            "" => None,
            p => Some(
                p.strip_prefix(':')
                    .ok_or_else(|| bad("expected `:port` after `]`"))?,
            ),
        };
        (format!("[{addr}]"), port)
    } else {
        let (host, port) = match ep.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (ep, None),
        };
        if host.is_empty() {
            return Err(bad("no host"));
        }
        if !host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
        {
            return Err(bad(
                "the host may hold only letters, digits, `.`, `-` and `_` (IPv6 goes in […])",
            ));
        }
        (host.to_string(), port)
    };
    let port = match port {
        None => DEFAULT_ETCD_PORT,
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n != 0 => n,
            _ => return Err(bad("the port must be a number from 1 to 65535")),
        },
    };
    Ok(format!("{host}:{port}"))
}

fn parse_timeout(s: &str) -> std::result::Result<Duration, ConfigError> {
    let bad = || ConfigError::BadTimeout(s.into());
    let split = s.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let n: u64 = s[..split].parse().map_err(|_| bad())?;
    let d = match &s[split..] {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.checked_mul(60).ok_or_else(bad)?),
        _ => return Err(bad()),
    };
    if d.is_zero() {
        return Err(bad());
    }
    Ok(d)
}

fn percent_decode(s: &str) -> std::result::Result<String, ConfigError> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| ConfigError::BadEscape(s.into()))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| ConfigError::BadEscape(s.into()))
}

/// Escape what would end a path or query value early (`%`, `&`, `#`, `?`, `=`, `,`, space).
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'/' | b'.' | b'-' | b'_' | b'~' | b'+' | b':')
        {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl fmt::Display for EtcdConfig {
    /// The URL form, which parses back to an equal config except for a password given inline.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "etcds" } else { "etcd" };
        // The user but never the password: this string ends up in logs and errors.
        let user = self
            .user
            .as_deref()
            .map(|u| format!("{}@", percent_encode(u).replace(':', "%3A")))
            .unwrap_or_default();
        write!(f, "{scheme}://{user}{}", self.endpoints.join(","))?;
        let mut sep = '?';
        for (name, path) in [
            ("ca", &self.ca),
            ("cert", &self.cert),
            ("key", &self.key),
            ("password-file", &self.password_file),
        ] {
            if let Some(p) = path {
                write!(f, "{sep}{name}={}", percent_encode(&p.to_string_lossy()))?;
                sep = '&';
            }
        }
        if self.timeout != DEFAULT_ETCD_TIMEOUT {
            let ms = self.timeout.as_millis();
            if ms.is_multiple_of(1000) {
                write!(f, "{sep}timeout={}s", ms / 1000)?;
            } else {
                write!(f, "{sep}timeout={ms}ms")?;
            }
        }
        Ok(())
    }
}

impl fmt::Display for StoreConfig {
    /// A string that parses back to this config (embedded paths as `file://` URLs when absolute).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreConfig::Embedded(p) if p.is_absolute() => {
                write!(f, "file://{}", percent_encode(&p.to_string_lossy()))
            }
            StoreConfig::Embedded(p) => write!(f, "{}", p.display()),
            StoreConfig::Etcd(c) => c.fmt(f),
        }
    }
}

/// `url` with the password of an `etcd://user:password@…` replaced by `***`, for logs and
/// status; works on strings that do not parse, too.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    // The last `@`: a password with an unescaped `@` is still hidden whole.
    let Some(at) = rest[..authority_end].rfind('@') else {
        return url.to_string();
    };
    match rest[..at].split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***{}", &rest[at..]),
        None => url.to_string(),
    }
}

/// Open the store `cfg` names: the embedded file (created if missing) or an etcd client.
///
/// The etcd client connects lazily: an unreachable cluster shows up as
/// [`StoreError::Unavailable`] from the first operation, within the configured timeout.
pub async fn open(cfg: &StoreConfig) -> Result<Arc<dyn Store>> {
    match cfg {
        StoreConfig::Embedded(path) => {
            let path = path.clone();
            // Opening takes the cross-process flock, which may block for a while.
            let store = tokio::task::spawn_blocking(move || EmbeddedStore::open(path))
                .await
                .map_err(|e| StoreError::Io(format!("opening the embedded store: {e}")))??;
            Ok(Arc::new(store))
        }
        StoreConfig::Etcd(c) => {
            let c = c.clone().with_env_credentials(|k| std::env::var(k).ok());
            Ok(Arc::new(EtcdStore::connect(&c).await?))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn etcd(s: &str) -> EtcdConfig {
        match s.parse::<StoreConfig>().unwrap() {
            StoreConfig::Etcd(c) => c,
            other => panic!("{s}: expected etcd, got {other:?}"),
        }
    }

    fn err(s: &str) -> ConfigError {
        s.parse::<StoreConfig>().unwrap_err()
    }

    #[test]
    fn paths_and_file_urls_are_embedded() {
        for (s, want) in [
            (
                "/var/lib/ferrynet/store.redb",
                "/var/lib/ferrynet/store.redb",
            ),
            ("state/store.redb", "state/store.redb"),
            ("  /x/y  ", "/x/y"),
            ("file:///var/lib/f.redb", "/var/lib/f.redb"),
            ("FILE:///a%20b/c.redb", "/a b/c.redb"),
            ("file://localhost/srv/s.redb", "/srv/s.redb"),
            ("./etcd:store", "./etcd:store"),
        ] {
            assert_eq!(
                s.parse::<StoreConfig>().unwrap(),
                StoreConfig::Embedded(PathBuf::from(want)),
                "{s}"
            );
        }
    }

    #[test]
    fn bad_file_urls() {
        assert_eq!(
            err("file://otherhost/x"),
            ConfigError::BadFileUrl("file://otherhost/x".into())
        );
        assert!(matches!(err("file:///"), ConfigError::BadFileUrl(_)));
        assert!(matches!(err("file://"), ConfigError::BadFileUrl(_)));
        assert!(matches!(err("file:///a%zz"), ConfigError::BadEscape(_)));
        assert!(matches!(err("file:///a%ff"), ConfigError::BadEscape(_)));
    }

    #[test]
    fn plain_etcd_endpoints() {
        let c = etcd("etcd://10.0.0.1:2379,node-b.example:32379,node_c");
        assert_eq!(
            c.endpoints,
            ["10.0.0.1:2379", "node-b.example:32379", "node_c:2379"]
        );
        assert!(!c.tls);
        assert_eq!((c.ca, c.cert, c.key), (None, None, None));
        assert_eq!(c.timeout, DEFAULT_ETCD_TIMEOUT);
        assert_eq!(etcd("ETCD://h:1/").endpoints, ["h:1"]);
        assert_eq!(
            etcd("etcd://[::1]:2379,[fd00::2]").endpoints,
            ["[::1]:2379", "[fd00::2]:2379"]
        );
    }

    #[test]
    fn tls_options_from_query() {
        let c = etcd("etcds://h1:2379,h2:2379?ca=/etc/ca.pem&cert=/etc/c.pem&key=/etc/k%20x.pem&timeout=1500ms");
        assert!(c.tls);
        assert_eq!(c.ca, Some(PathBuf::from("/etc/ca.pem")));
        assert_eq!(c.cert, Some(PathBuf::from("/etc/c.pem")));
        assert_eq!(c.key, Some(PathBuf::from("/etc/k x.pem")));
        assert_eq!(c.timeout, Duration::from_millis(1500));
        // No CA: the system trust store; no client certificate.
        let c = etcd("etcds://h");
        assert!(c.tls && c.ca.is_none() && c.cert.is_none());
        assert_eq!(
            etcd("etcd://h?timeout=2m").timeout,
            Duration::from_secs(120)
        );
    }

    #[test]
    fn bad_etcd_urls_have_typed_errors() {
        assert_eq!(err(""), ConfigError::Empty);
        assert_eq!(err("   "), ConfigError::Empty);
        assert_eq!(
            err("http://h:2379"),
            ConfigError::UnknownScheme("http".into())
        );
        assert!(matches!(
            err("etcd:h:2379"),
            ConfigError::MissingSlashes(..)
        ));
        assert!(matches!(err("etcds:h"), ConfigError::MissingSlashes(..)));
        // Fuzzing regression: a scheme-length prefix ending inside a multi-byte character.
        assert!(matches!(
            ";/./\u{478}".parse::<StoreConfig>(),
            Ok(StoreConfig::Embedded(_))
        ));
        // Fuzzing regression: a file URL whose host ends inside a multi-byte character.
        assert!(matches!(
            err("file://&&00\u{14}\u{0}\u{85}\u{85}/\u{6}&0"),
            ConfigError::BadFileUrl(_)
        ));
        assert!(matches!(
            "file://LOCALHOST/var/x".parse::<StoreConfig>(),
            Ok(StoreConfig::Embedded(p)) if p == std::path::Path::new("/var/x")
        ));
        assert_eq!(err("etcd://"), ConfigError::NoEndpoints("etcd://".into()));
        assert_eq!(err("etcd:///x"), ConfigError::UnexpectedPath("/x".into()));
        assert_eq!(
            err("etcd://h:2379/ns"),
            ConfigError::UnexpectedPath("/ns".into())
        );
        assert_eq!(err("etcd://h#frag"), ConfigError::Fragment("frag".into()));
        for (s, ep) in [
            ("etcd://h:0", "h:0"),
            ("etcd://h:65536", "h:65536"),
            ("etcd://h:x", "h:x"),
            ("etcd://h:", "h:"),
            ("etcd://:2379", ":2379"),
            ("etcd://a,,b", ""),
            ("etcd://u@h@x", "h@x"),
            ("etcd://h h", "h h"),
            ("etcd://::1", "::1"),
            ("etcd://[::1", "[::1"),
            ("etcd://[zz]:1", "[zz]:1"),
            ("etcd://[::1]2379", "[::1]2379"),
        ] {
            match err(s) {
                ConfigError::BadEndpoint { endpoint, .. } => assert_eq!(endpoint, ep, "{s}"),
                other => panic!("{s}: expected BadEndpoint, got {other:?}"),
            }
        }
        assert_eq!(
            err("etcds://h?cafile=/x"),
            ConfigError::UnknownOption("cafile".into())
        );
        assert_eq!(
            err("etcds://h?ca=/x&ca=/y"),
            ConfigError::DuplicateOption("ca".into())
        );
        assert_eq!(err("etcds://h?ca="), ConfigError::EmptyOption("ca".into()));
        assert_eq!(err("etcds://h?ca"), ConfigError::EmptyOption("ca".into()));
        assert_eq!(
            err("etcd://h?ca=/x"),
            ConfigError::TlsOptionWithoutTls("ca".into())
        );
        assert_eq!(err("etcds://h?cert=/c"), ConfigError::CertWithoutKey);
        assert_eq!(err("etcds://h?key=/k"), ConfigError::CertWithoutKey);
        for t in ["5", "0s", "s", "5h", "-1s", "1.5s", "99999999999999999999s"] {
            assert_eq!(
                err(&format!("etcd://h?timeout={t}")),
                ConfigError::BadTimeout(t.into()),
                "{t}"
            );
        }
        assert!(matches!(err("etcds://h?ca=%4"), ConfigError::BadEscape(_)));
    }

    #[test]
    fn errors_read_well() {
        assert_eq!(
            err("etcd://h:99999").to_string(),
            "bad etcd endpoint `h:99999`: the port must be a number from 1 to 65535"
        );
        assert_eq!(
            err("etcd://h?ca=/x").to_string(),
            "etcd option `ca` only applies to TLS; use etcds://"
        );
    }

    #[test]
    fn display_round_trips() {
        for s in [
            "etcd://h:2379",
            "etcd://a:1,[::1]:2",
            "etcds://h:2379?ca=/c%20a.pem&cert=/c&key=/k%26x&timeout=250ms",
            "etcds://h:2379?timeout=7s",
            "file:///var/lib/x%23y.redb",
            "rel/path.redb",
        ] {
            let c: StoreConfig = s.parse().unwrap();
            assert_eq!(c.to_string(), s);
            assert_eq!(c.to_string().parse::<StoreConfig>().unwrap(), c);
        }
        // The default port and timeout are written out / left out canonically.
        assert_eq!(etcd("etcd://h?timeout=5s").to_string(), "etcd://h:2379");
    }

    #[test]
    fn users_and_passwords_never_shown() {
        let c = etcd("etcd://ferry:s%40cr3t@h1,h2:2380");
        assert_eq!(c.user.as_deref(), Some("ferry"));
        assert_eq!(c.password.as_ref().map(Password::expose), Some("s@cr3t"));
        assert_eq!(c.endpoints, ["h1:2379", "h2:2380"]);
        assert_eq!(c.to_string(), "etcd://ferry@h1:2379,h2:2380");
        assert!(!format!("{c:?}").contains("cr3t"), "{c:?}");
        let f = etcd("etcds://ferry@h?password-file=/etc/ferrynet/etcd.pw");
        assert_eq!(
            f.password_file,
            Some(PathBuf::from("/etc/ferrynet/etcd.pw"))
        );
        assert_eq!(
            f.to_string().parse::<StoreConfig>().unwrap(),
            StoreConfig::Etcd(f.clone())
        );
        assert_eq!(err("etcd://@h"), ConfigError::EmptyUser);
        assert_eq!(err("etcd://:pw@h"), ConfigError::EmptyUser);
        assert_eq!(
            err("etcd://h?password-file=/p"),
            ConfigError::PasswordWithoutUser
        );
        assert_eq!(
            err("etcd://u:pw@h?password-file=/p"),
            ConfigError::TwoPasswords
        );
    }

    #[test]
    fn redacted_urls_hide_only_the_password() {
        assert_eq!(redact_url("etcd://u:pw@h:1,h2"), "etcd://u:***@h:1,h2");
        assert_eq!(redact_url("etcds://u:p@w@h?ca=/x"), "etcds://u:***@h?ca=/x");
        assert_eq!(redact_url("etcd://u@h"), "etcd://u@h");
        assert_eq!(redact_url("etcd://h?x=a@b"), "etcd://h?x=a@b");
        assert_eq!(redact_url("/var/lib/x.redb"), "/var/lib/x.redb");
    }

    #[test]
    fn the_environment_fills_in_credentials_the_url_lacks() {
        let env = |k: &str| match k {
            ETCD_USER_ENV => Some("envuser".to_string()),
            ETCD_PASSWORD_ENV => Some("envpw".to_string()),
            _ => None,
        };
        let c = etcd("etcd://h").with_env_credentials(env);
        assert_eq!(c.user.as_deref(), Some("envuser"));
        assert_eq!(c.password.as_ref().map(Password::expose), Some("envpw"));
        let c = etcd("etcd://u:urlpw@h").with_env_credentials(env);
        assert_eq!(c.user.as_deref(), Some("u"));
        assert_eq!(c.password.as_ref().map(Password::expose), Some("urlpw"));
        // A password file in the URL wins over the environment's password.
        let c = etcd("etcd://u@h?password-file=/p").with_env_credentials(env);
        assert_eq!(c.password, None);
        assert!(c.validate().is_ok());
        let c = etcd("etcd://h").with_env_credentials(|_| None);
        assert_eq!((c.user, c.password), (None, None));
    }

    #[test]
    fn validate_catches_hand_built_configs() {
        assert!(EtcdConfig::new(["h:2379"]).validate().is_ok());
        assert!(matches!(
            EtcdConfig::new(Vec::<String>::new()).validate(),
            Err(ConfigError::NoEndpoints(_))
        ));
        assert!(matches!(
            EtcdConfig::new(["h"]).validate(),
            Err(ConfigError::BadEndpoint { .. })
        ));
        let mut c = EtcdConfig::new(["h:1"]);
        c.ca = Some("/ca".into());
        assert_eq!(
            c.validate(),
            Err(ConfigError::TlsOptionWithoutTls("ca".into()))
        );
        c.tls = true;
        assert!(c.validate().is_ok());
        c.key = Some("/k".into());
        assert_eq!(c.validate(), Err(ConfigError::CertWithoutKey));
        c.cert = Some("/c".into());
        c.timeout = Duration::ZERO;
        assert!(matches!(c.validate(), Err(ConfigError::BadTimeout(_))));
    }

    #[tokio::test]
    async fn open_embedded_from_a_file_url() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/store.redb");
        let cfg: StoreConfig = format!("file://{}", path.display()).parse().unwrap();
        let store = open(&cfg).await.unwrap();
        assert_eq!(store.put("/k", b"v".to_vec()).await.unwrap(), 1);
        assert!(path.exists());
    }
}
