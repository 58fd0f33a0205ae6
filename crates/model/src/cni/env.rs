//! The CNI execution environment: `CNI_COMMAND` and friends, validated per command.

use std::fmt;

use super::CniError;

/// The operation the runtime asks for (`CNI_COMMAND`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Command {
    /// Attach a container to the network.
    Add,
    /// Detach a container (best effort, idempotent).
    Del,
    /// Verify an existing attachment.
    Check,
    /// Report whether the plugin is ready for ADD (1.1).
    Status,
    /// Remove state for attachments not in the valid list (1.1).
    Gc,
    /// Report the supported spec versions.
    Version,
}

impl Command {
    /// Parses the `CNI_COMMAND` value (upper case, as the spec spells it).
    pub fn parse(s: &str) -> Result<Command, CniError> {
        Ok(match s {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "STATUS" => Command::Status,
            "GC" => Command::Gc,
            "VERSION" => Command::Version,
            other => {
                return Err(CniError::invalid_env(format!(
                    "CNI_COMMAND: unknown command {other:?} \
                     (expected ADD, DEL, CHECK, STATUS, GC or VERSION)"
                )))
            }
        })
    }

    /// The command as the spec spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Command::Add => "ADD",
            Command::Del => "DEL",
            Command::Check => "CHECK",
            Command::Status => "STATUS",
            Command::Gc => "GC",
            Command::Version => "VERSION",
        }
    }

    /// Whether the command acts on one attachment (needs container id and ifname).
    pub fn is_per_attachment(self) -> bool {
        matches!(self, Command::Add | Command::Del | Command::Check)
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The `CNI_*` environment variables of one invocation, validated for its command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniEnv {
    /// `CNI_COMMAND`.
    pub command: Command,
    /// `CNI_CONTAINERID`; always set for ADD, DEL and CHECK.
    pub container_id: Option<String>,
    /// `CNI_NETNS` (a path); always set for ADD and CHECK, optional for DEL.
    pub netns: Option<String>,
    /// `CNI_IFNAME`; always set for ADD, DEL and CHECK.
    pub ifname: Option<String>,
    /// `CNI_ARGS` as key/value pairs, in order (only parsed for ADD, DEL and CHECK).
    pub args: Vec<(String, String)>,
    /// `CNI_PATH`, split on `:`, empty entries dropped.
    pub path: Vec<String>,
}

impl CniEnv {
    /// Reads and validates the variables through `get` (e.g. `|k| std::env::var(k).ok()`).
    ///
    /// Empty values count as unset, as runtimes sometimes export empty variables.
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<CniEnv, CniError> {
        let var = |k: &str| get(k).filter(|v| !v.is_empty());
        let required = |k: &str, cmd: Command| {
            var(k).ok_or_else(|| {
                CniError::invalid_env(format!("{k} is required for {cmd} but is not set"))
            })
        };
        let command_str =
            var("CNI_COMMAND").ok_or_else(|| CniError::invalid_env("CNI_COMMAND is not set"))?;
        let command = Command::parse(&command_str)?;
        let path = var("CNI_PATH")
            .map(|p| {
                p.split(':')
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();

        let mut env = CniEnv {
            command,
            container_id: None,
            netns: None,
            ifname: None,
            args: Vec::new(),
            path,
        };
        if !command.is_per_attachment() {
            // STATUS, GC and VERSION are about the plugin, not an attachment:
            // ignore whatever else the runtime happened to export.
            return Ok(env);
        }

        let container_id = required("CNI_CONTAINERID", command)?;
        validate_container_id(&container_id)?;
        let netns = match command {
            Command::Del => var("CNI_NETNS"),
            _ => Some(required("CNI_NETNS", command)?),
        };
        let ifname = required("CNI_IFNAME", command)?;
        validate_ifname(&ifname)?;
        env.args = parse_cni_args(&var("CNI_ARGS").unwrap_or_default())?;
        env.container_id = Some(container_id);
        env.netns = netns;
        env.ifname = Some(ifname);
        Ok(env)
    }

    /// The value of a `CNI_ARGS` key, if given (first occurrence wins).
    pub fn arg(&self, key: &str) -> Option<&str> {
        self.args
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// The `CNI_ARGS` keys ferrynet reads: the CNI convention's `IgnoreUnknown`, static `IP`/`MAC`,
/// and the Kubernetes pod identity runtimes pass.
pub const KNOWN_ARGS: [&str; 7] = [
    "IgnoreUnknown",
    "IP",
    "MAC",
    "K8S_POD_NAMESPACE",
    "K8S_POD_NAME",
    "K8S_POD_UID",
    "K8S_POD_INFRA_CONTAINER_ID",
];

/// Applies the CNI convention for `CNI_ARGS` (libcni's `LoadArgs`): a key the plugin does not
/// know is an error (code 4, naming the keys) unless `IgnoreUnknown` is `1` or `true` (any
/// case); `IgnoreUnknown` with another value than `0`/`1`/`true`/`false` is an error too.
/// Keys match exactly, as Go's field lookup there does.
pub fn check_args(args: &[(String, String)], known: &[&str]) -> Result<(), CniError> {
    let ignore = match args.iter().find(|(k, _)| k == "IgnoreUnknown") {
        None => false,
        Some((_, v)) => match v.to_ascii_lowercase().as_str() {
            "1" | "true" => true,
            "0" | "false" => false,
            _ => {
                return Err(CniError::invalid_env(format!(
                    "CNI_ARGS: IgnoreUnknown={v:?} is not a boolean (1, 0, true, false)"
                )))
            }
        },
    };
    let unknown: Vec<&str> = args
        .iter()
        .map(|(k, _)| k.as_str())
        .filter(|k| !known.contains(k))
        .collect();
    if ignore || unknown.is_empty() {
        Ok(())
    } else {
        Err(CniError::invalid_env(format!(
            "CNI_ARGS: unknown keys {unknown:?} (pass IgnoreUnknown=1 to have them ignored)"
        )))
    }
}

/// Parses `CNI_ARGS` (`K=V;K=V`); empty segments are skipped, a segment without `=` or
/// with an empty key is a code 4 error.
pub fn parse_cni_args(s: &str) -> Result<Vec<(String, String)>, CniError> {
    s.split(';')
        .filter(|seg| !seg.is_empty())
        .map(|seg| match seg.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
            _ => Err(CniError::invalid_env(format!(
                "CNI_ARGS: invalid pair {seg:?} (expected KEY=VALUE)"
            ))),
        })
        .collect()
}

/// Checks `CNI_CONTAINERID`: an alphanumeric first character, then alphanumerics, `_`, `.`, `-`.
pub fn validate_container_id(id: &str) -> Result<(), CniError> {
    let mut chars = id.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
    let rest_ok = chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if first_ok && rest_ok {
        Ok(())
    } else {
        Err(CniError::invalid_env(format!(
            "CNI_CONTAINERID: invalid container id {id:?} (must start with a letter or digit \
             and contain only letters, digits, '_', '.' and '-')"
        )))
    }
}

/// Longest Linux interface name (IFNAMSIZ minus the terminating NUL).
const MAX_IFNAME_LEN: usize = 15;

/// Checks `CNI_IFNAME` the way the kernel does (1..=15 bytes, not `.`/`..`, no `/`, `:`,
/// whitespace) and without `%` (the kernel's name template), quotes, `\\` or control characters.
pub fn validate_ifname(name: &str) -> Result<(), CniError> {
    debug_assert_eq!(MAX_IFNAME_LEN, crate::validate::MAX_IFNAME);
    crate::validate::check_ifname("CNI_IFNAME", name).map_err(|e| {
        CniError::invalid_env(format!(
            "CNI_IFNAME: invalid interface name {name:?}: {}",
            e.why
        ))
    })
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn env_of(pairs: &[(&str, &str)]) -> Result<CniEnv, CniError> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        CniEnv::from_vars(|k| m.get(k).cloned())
    }

    fn add_env() -> Vec<(&'static str, &'static str)> {
        vec![
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "abc123_x.y-z"),
            ("CNI_NETNS", "/var/run/netns/test"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAME=web-0"),
            ("CNI_PATH", "/opt/cni/bin::/usr/libexec/cni"),
        ]
    }

    fn without(
        mut v: Vec<(&'static str, &'static str)>,
        key: &str,
    ) -> Vec<(&'static str, &'static str)> {
        v.retain(|(k, _)| *k != key);
        v
    }

    fn with(
        mut v: Vec<(&'static str, &'static str)>,
        key: &'static str,
        val: &'static str,
    ) -> Vec<(&'static str, &'static str)> {
        v.retain(|(k, _)| *k != key);
        v.push((key, val));
        v
    }

    fn assert_env_err(r: Result<CniEnv, CniError>, needle: &str) {
        let e = r.expect_err("expected an error");
        assert_eq!(e.code, 4, "{e}");
        assert!(
            e.msg.contains(needle),
            "{:?} should mention {needle}",
            e.msg
        );
    }

    #[test]
    fn parses_commands() {
        for (s, c) in [
            ("ADD", Command::Add),
            ("DEL", Command::Del),
            ("CHECK", Command::Check),
            ("STATUS", Command::Status),
            ("GC", Command::Gc),
            ("VERSION", Command::Version),
        ] {
            assert_eq!(Command::parse(s).unwrap(), c);
            assert_eq!(c.as_str(), s);
            assert_eq!(c.to_string(), s);
        }
        let e = Command::parse("add").unwrap_err();
        assert_eq!(e.code, 4);
        assert!(e.msg.contains("CNI_COMMAND"));
        assert_eq!(Command::parse("").unwrap_err().code, 4);
    }

    #[test]
    fn full_add_env() {
        let env = env_of(&add_env()).unwrap();
        assert_eq!(env.command, Command::Add);
        assert_eq!(env.container_id.as_deref(), Some("abc123_x.y-z"));
        assert_eq!(env.netns.as_deref(), Some("/var/run/netns/test"));
        assert_eq!(env.ifname.as_deref(), Some("eth0"));
        assert_eq!(
            env.args,
            vec![
                ("IgnoreUnknown".to_owned(), "1".to_owned()),
                ("K8S_POD_NAME".to_owned(), "web-0".to_owned())
            ]
        );
        assert_eq!(env.arg("K8S_POD_NAME"), Some("web-0"));
        assert_eq!(env.arg("nope"), None);
        assert_eq!(env.path, vec!["/opt/cni/bin", "/usr/libexec/cni"]);
    }

    #[test]
    fn add_and_check_require_all_three() {
        for cmd in ["ADD", "CHECK"] {
            let base = with(add_env(), "CNI_COMMAND", cmd);
            assert!(env_of(&base).is_ok());
            for key in ["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"] {
                assert_env_err(env_of(&without(base.clone(), key)), key);
                // An empty value is as good as unset.
                assert_env_err(env_of(&with(base.clone(), key, "")), key);
            }
        }
    }

    #[test]
    fn del_makes_netns_optional() {
        let base = with(without(add_env(), "CNI_NETNS"), "CNI_COMMAND", "DEL");
        let env = env_of(&base).unwrap();
        assert_eq!(env.netns, None);
        assert_eq!(env.ifname.as_deref(), Some("eth0"));
        let env = env_of(&with(base.clone(), "CNI_NETNS", "/proc/1/ns/net")).unwrap();
        assert_eq!(env.netns.as_deref(), Some("/proc/1/ns/net"));
        assert_env_err(
            env_of(&without(base.clone(), "CNI_CONTAINERID")),
            "CNI_CONTAINERID",
        );
        assert_env_err(env_of(&without(base, "CNI_IFNAME")), "CNI_IFNAME");
    }

    #[test]
    fn plugin_level_commands_need_only_command() {
        for cmd in ["GC", "STATUS", "VERSION"] {
            let env = env_of(&[("CNI_COMMAND", cmd)]).unwrap();
            assert_eq!(env.command.as_str(), cmd);
            assert_eq!(env.container_id, None);
            assert!(env.args.is_empty() && env.path.is_empty());
            // Garbage in per-attachment variables is ignored for these commands.
            let env = env_of(&[
                ("CNI_COMMAND", cmd),
                ("CNI_IFNAME", "this-name-is-far-too-long"),
                ("CNI_ARGS", "broken"),
                ("CNI_PATH", "/opt/cni/bin"),
            ])
            .unwrap();
            assert_eq!(env.ifname, None);
            assert_eq!(env.path, vec!["/opt/cni/bin"]);
        }
    }

    #[test]
    fn missing_or_unknown_command() {
        assert_env_err(env_of(&without(add_env(), "CNI_COMMAND")), "CNI_COMMAND");
        assert_env_err(
            env_of(&with(add_env(), "CNI_COMMAND", "ATTACH")),
            "CNI_COMMAND",
        );
    }

    #[test]
    fn rejects_bad_container_ids() {
        for bad in ["-abc", "_abc", ".abc", "a/b", "a b", "a:b", "ä", "abc$"] {
            assert_env_err(
                env_of(&with(add_env(), "CNI_CONTAINERID", bad)),
                "CNI_CONTAINERID",
            );
            assert_eq!(validate_container_id(bad).unwrap_err().code, 4);
        }
        assert_eq!(validate_container_id("").unwrap_err().code, 4);
        for good in ["a", "0", "A-b_c.d", "6b6f2d8e0c8a4f1e9d1c"] {
            validate_container_id(good).unwrap();
        }
    }

    #[test]
    fn rejects_bad_ifnames() {
        for bad in [
            ".",
            "..",
            "eth/0",
            "eth:0",
            "eth 0",
            "eth\t0",
            "abcdefghijklmnop",
            "eth%d",
            "a\"b",
        ] {
            assert_env_err(env_of(&with(add_env(), "CNI_IFNAME", bad)), "CNI_IFNAME");
        }
        assert_eq!(validate_ifname("").unwrap_err().code, 4);
        for good in ["eth0", "abcdefghijklmno", "net1.100", "a"] {
            validate_ifname(good).unwrap();
        }
        // 15 bytes is the limit, counted in bytes, not characters.
        assert!(validate_ifname("ééééééé").is_ok()); // 14 bytes
        assert!(validate_ifname("éééééééé").is_err()); // 16 bytes
    }

    #[test]
    fn unknown_args_follow_the_ignore_unknown_convention() {
        let args = |s: &str| parse_cni_args(s).unwrap();
        check_args(&args("K8S_POD_NAME=a;IP=10.0.0.1"), &KNOWN_ARGS).unwrap();
        let e = check_args(&args("K8S_POD_NAME=a;FOO=1"), &KNOWN_ARGS).unwrap_err();
        assert_eq!(e.code, 4);
        assert!(
            e.msg.contains("FOO") && e.msg.contains("IgnoreUnknown"),
            "{e}"
        );
        for yes in ["1", "true", "TRUE", "True"] {
            check_args(&args(&format!("IgnoreUnknown={yes};FOO=1")), &KNOWN_ARGS).unwrap();
        }
        for no in ["0", "false"] {
            assert!(check_args(&args(&format!("IgnoreUnknown={no};FOO=1")), &KNOWN_ARGS).is_err());
        }
        assert_eq!(
            check_args(&args("IgnoreUnknown=yes"), &KNOWN_ARGS)
                .unwrap_err()
                .code,
            4
        );
        // Keys match exactly (Go's FieldByName).
        assert!(check_args(&args("k8s_pod_name=a"), &KNOWN_ARGS).is_err());
        // What containerd sends.
        check_args(
            &args(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;\
                   K8S_POD_INFRA_CONTAINER_ID=0123abcd;K8S_POD_UID=5f2e-11",
            ),
            &KNOWN_ARGS,
        )
        .unwrap();
    }

    #[test]
    fn cni_args_parsing() {
        assert_eq!(parse_cni_args("").unwrap(), vec![]);
        assert_eq!(
            parse_cni_args("A=1;;B=;C=x=y;").unwrap(),
            vec![
                ("A".to_owned(), "1".to_owned()),
                ("B".to_owned(), String::new()),
                ("C".to_owned(), "x=y".to_owned())
            ]
        );
        for bad in ["A", "A=1;B", "=1"] {
            let e = parse_cni_args(bad).unwrap_err();
            assert_eq!(e.code, 4);
            assert!(e.msg.contains("CNI_ARGS"));
        }
        assert_env_err(env_of(&with(add_env(), "CNI_ARGS", "novalue")), "CNI_ARGS");
    }
}
