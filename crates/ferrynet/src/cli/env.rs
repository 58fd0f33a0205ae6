//! Every flag can also come from the environment: `FERRYNET_` + the subcommand path + the
//! flag, upper case with `_` for `-` (`ferrynet agent --http` ← `FERRYNET_AGENT_HTTP`,
//! `ferrynet network create --mtu` ← `FERRYNET_NETWORK_CREATE_MTU`); global flags have no
//! path (`--store` ← `FERRYNET_STORE`). Flags that had a variable before keep its name
//! (`--underlay-dev` ← `FERRYNET_UNDERLAY_DEV`). A flag on the command line wins; a
//! repeatable flag takes one value from its variable.
//!
//! The path keeps names apart: `network create --host` (a boolean) must not read the host name
//! `ferrynet render --format env` writes as `FERRYNET_HOST`. Derived here, not in each
//! `#[arg]`, so a new flag cannot be forgotten; `--help` shows each name.

use clap::{Arg, ArgAction, Command};

/// The variable for `flag` under the subcommand `path` (empty for global flags).
pub fn env_name(path: &[&str], flag: &str) -> String {
    let mut parts: Vec<&str> = path.to_vec();
    parts.push(flag);
    let joined = parts.join("_").to_ascii_uppercase().replace('-', "_");
    format!("FERRYNET_{joined}")
}

fn with_env_arg(a: Arg, path: &[&str]) -> Arg {
    let skip = a.get_env().is_some()
        || matches!(
            a.get_action(),
            ArgAction::Help | ArgAction::HelpShort | ArgAction::HelpLong | ArgAction::Version
        );
    match a.get_long() {
        Some(long) if !skip => {
            let name = env_name(if a.is_global_set() { &[] } else { path }, long);
            a.env(name)
        }
        _ => a,
    }
}

fn walk(cmd: Command, path: &[&str]) -> Command {
    let cmd = cmd.mut_args(|a| with_env_arg(a, path));
    let names: Vec<String> = cmd
        .get_subcommands()
        .map(|s| s.get_name().to_string())
        .collect();
    let mut cmd = cmd;
    for name in names {
        let mut sub_path: Vec<&str> = path.to_vec();
        sub_path.push(&name);
        cmd = cmd.mut_subcommand(&name, |s| walk(s, &sub_path));
    }
    cmd
}

/// `cmd` with an environment variable on every flag that has none.
pub fn with_env(cmd: Command) -> Command {
    walk(cmd, &[])
}

/// One flag's variable.
#[derive(Debug, Clone)]
pub struct FlagVar {
    /// The subcommand path (`network create`; empty for global flags).
    pub path: String,
    /// The long flag without dashes.
    pub long: String,
    /// The variable.
    pub var: String,
    /// Whether the flag takes a value (else it is a switch).
    pub takes_value: bool,
}

/// Every flag's variable in `cmd` (built with `with_env`), for documentation and tests.
pub fn all_vars(cmd: &Command) -> Vec<FlagVar> {
    fn go(cmd: &Command, path: &str, out: &mut Vec<FlagVar>) {
        for a in cmd.get_arguments() {
            if let (Some(long), Some(env)) = (a.get_long(), a.get_env()) {
                out.push(FlagVar {
                    path: if a.is_global_set() {
                        String::new()
                    } else {
                        path.to_string()
                    },
                    long: long.to_string(),
                    var: env.to_string_lossy().into_owned(),
                    takes_value: a.get_action().takes_values(),
                });
            }
        }
        for s in cmd.get_subcommands() {
            let p = if path.is_empty() {
                s.get_name().to_string()
            } else {
                format!("{path} {}", s.get_name())
            };
            go(s, &p, out);
        }
    }
    let mut out = Vec::new();
    go(cmd, "", &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_command_path() {
        assert_eq!(env_name(&[], "store"), "FERRYNET_STORE");
        assert_eq!(env_name(&["agent"], "http"), "FERRYNET_AGENT_HTTP");
        assert_eq!(
            env_name(&["network", "create"], "block-size6"),
            "FERRYNET_NETWORK_CREATE_BLOCK_SIZE6"
        );
        assert_eq!(
            env_name(&["docker-plugin"], "socket"),
            "FERRYNET_DOCKER_PLUGIN_SOCKET"
        );
    }
}
