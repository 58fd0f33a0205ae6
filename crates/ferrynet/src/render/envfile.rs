//! Env-file output (`--format env`): `KEY=VALUE` lines in POSIX sh syntax, so `. FILE` in a
//! script, systemd's `EnvironmentFile=` and `docker run --env-file` (for plain values) read it.
//! Values are written raw by the template (or by the built-in default below) and quoted here.

use super::context::RenderContext;

/// A line of template output that is not `KEY=VALUE`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("env output line {line}: {reason}: {text:?}")]
pub struct EnvError {
    /// 1-based line of the rendered output.
    pub line: usize,
    /// What is wrong.
    pub reason: &'static str,
    /// The line.
    pub text: String,
}

/// True for a shell variable name: `[A-Za-z_][A-Za-z0-9_]*`.
pub fn is_env_name(s: &str) -> bool {
    let mut b = s.bytes();
    matches!(b.next(), Some(c) if c.is_ascii_alphabetic() || c == b'_')
        && b.all(|c| c.is_ascii_alphanumeric() || c == b'_')
}

/// The variable-name form of a service or key name: upper case, anything else `_`.
pub fn env_name(s: &str) -> String {
    let mut out: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect();
    if out.starts_with(|c: char| c.is_ascii_digit()) {
        out.insert(0, '_');
    }
    out
}

/// A value as sh reads it back unchanged: bare when it holds only safe characters, else in
/// double quotes with `\`, `"`, `$` and `` ` `` escaped (newlines stay literal inside quotes).
pub fn quote(v: &str) -> String {
    let safe = |c: char| c.is_ascii_alphanumeric() || "_-.,:/@%+=".contains(c);
    if !v.is_empty() && v.chars().all(safe) {
        return v.to_string();
    }
    let mut out = String::with_capacity(v.len() + 2);
    out.push('"');
    for c in v.chars() {
        if matches!(c, '\\' | '"' | '$' | '`') {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// The file for `pairs`, one `KEY=VALUE` line each, in the order given.
pub fn format(pairs: &[(String, String)]) -> String {
    let mut out = String::new();
    for (k, v) in pairs {
        out.push_str(k);
        out.push('=');
        out.push_str(&quote(v));
        out.push('\n');
    }
    out
}

/// Read template output in env mode: `KEY=VALUE` per line, the value raw up to the end of the
/// line; blank lines and `#` comments are skipped. A later line for a key replaces the value.
pub fn parse(text: &str) -> Result<Vec<(String, String)>, EnvError> {
    let mut pairs: Vec<(String, String)> = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim_start();
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        let err = |reason| EnvError {
            line: i + 1,
            reason,
            text: raw.to_string(),
        };
        let (k, v) = line.split_once('=').ok_or_else(|| err("no '='"))?;
        let k = k.trim_end();
        if !is_env_name(k) {
            return Err(err("not a variable name before '='"));
        }
        let v = v.strip_suffix('\r').unwrap_or(v);
        match pairs.iter_mut().find(|(pk, _)| pk == k) {
            Some(p) => p.1 = v.to_string(),
            None => pairs.push((k.to_string(), v.to_string())),
        }
    }
    Ok(pairs)
}

/// The built-in env file (no `--template`): `FERRYNET_HOST`, then per service `S` (name in
/// variable form) `S_VIP`, `S_VIP6`, `S_PORT` (first port), `S_<PORT NAME>_PORT`, `S_ADDRS`
/// (healthy producers' `addr:port` for the first port, comma-separated; `[v6]:port`),
/// `S_IPS` (their addresses) and `S_COUNT`.
pub fn default_pairs(ctx: &RenderContext) -> Vec<(String, String)> {
    let mut out = vec![("FERRYNET_HOST".to_string(), ctx.host.clone())];
    for s in &ctx.services {
        let n = env_name(&s.name);
        let mut put = |k: String, v: String| out.push((k, v));
        put(
            format!("{n}_VIP"),
            s.vip4.clone().or(s.vip.clone()).unwrap_or_default(),
        );
        if let Some(v6) = &s.vip6 {
            put(format!("{n}_VIP6"), v6.clone());
        }
        if let Some(p) = s.port {
            put(format!("{n}_PORT"), p.to_string());
        }
        for p in &s.ports {
            put(
                format!("{n}_{}_PORT", env_name(&p.name)),
                p.port.to_string(),
            );
        }
        let addrs: Vec<String> = s
            .producers
            .iter()
            .map(|p| match p.port {
                Some(port) if p.addr.contains(':') => format!("[{}]:{port}", p.addr),
                Some(port) => format!("{}:{port}", p.addr),
                None => p.addr.clone(),
            })
            .collect();
        put(format!("{n}_ADDRS"), addrs.join(","));
        let ips: Vec<&str> = s.producers.iter().map(|p| p.addr.as_str()).collect();
        put(format!("{n}_IPS"), ips.join(","));
        put(format!("{n}_COUNT"), s.producers.len().to_string());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::render::context::{build, tests::sample};

    /// What `sh` makes of `NAME=<quoted>`: the value read back.
    fn sh_reads(quoted: &str) -> String {
        let script = format!("V={quoted}\nprintf %s \"$V\"");
        let out = std::process::Command::new("sh")
            .args(["-c", &script])
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap()
    }

    #[test]
    fn quoting_round_trips_through_sh() {
        for v in [
            "",
            "plain",
            "10.0.0.1:80,10.0.0.2:80",
            "two words",
            "it's",
            "a \"b\" $HOME `id` \\ end",
            "line1\nline2",
            "*",
            "; rm -rf /",
        ] {
            assert_eq!(sh_reads(&quote(v)), v, "value {v:?} as {}", quote(v));
        }
        assert_eq!(quote("10.96.0.1"), "10.96.0.1", "plain values stay bare");
    }

    #[test]
    fn names() {
        assert_eq!(env_name("web-api"), "WEB_API");
        assert_eq!(env_name("9x"), "_9X");
        assert!(is_env_name("A_1") && is_env_name("_x"));
        assert!(!is_env_name("1A") && !is_env_name("A-B") && !is_env_name(""));
    }

    #[test]
    fn parse_reads_raw_values_and_names_bad_lines() {
        let p = parse("# c\n\nA=1\n1B=x\nA=2\n").unwrap_err();
        assert_eq!(p.line, 4, "{p}");
        let p = parse("# c\n\nA=1\nB=x y\r\nA=2\nC=\n").unwrap();
        assert_eq!(
            p,
            [
                ("A".to_string(), "2".to_string()),
                ("B".to_string(), "x y".to_string()),
                ("C".to_string(), String::new()),
            ]
        );
        let e = parse("A=1\njust text\n").unwrap_err();
        assert_eq!((e.line, e.reason), (2, "no '='"));
    }

    #[test]
    fn default_exports_each_service() {
        let text = format(&default_pairs(&build(&sample(), "h1")));
        assert_eq!(
            text,
            "FERRYNET_HOST=h1\n\
             DB_VIP=\"\"\n\
             DB_ADDRS=\"\"\n\
             DB_IPS=\"\"\n\
             DB_COUNT=0\n\
             WEB_VIP=10.96.0.10\n\
             WEB_VIP6=fd00:96::a\n\
             WEB_PORT=80\n\
             WEB_HTTP_PORT=80\n\
             WEB_METRICS_PORT=9100\n\
             WEB_ADDRS=10.20.0.2:8080\n\
             WEB_IPS=10.20.0.2\n\
             WEB_COUNT=1\n"
        );
    }
}
