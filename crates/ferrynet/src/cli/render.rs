//! `ferrynet render` and `ferrynet kv`: arguments in, a [`Job`] out; the work is in
//! `crate::render`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Subcommand, ValueEnum};

use super::{parse_duration, JsonFlag, Table};
use crate::control::Control;
use crate::render::watch::{Format, Job, Target, Wait};

/// Output formats on the command line.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum FormatArg {
    /// The template's output as it is.
    Text,
    /// KEY=VALUE lines, values quoted for sh (`. FILE`) and systemd's EnvironmentFile=; the
    /// template writes raw `KEY=VALUE` lines, or without --template the built-in set
    /// FERRYNET_HOST and per service S: S_VIP, S_VIP6, S_PORT, S_<PORTNAME>_PORT,
    /// S_ADDRS (healthy producers' addr:port, comma-separated), S_IPS, S_COUNT.
    Env,
}

#[derive(Args, Debug)]
pub struct RenderArgs {
    /// Template file (Jinja2 syntax), or TEMPLATE:OUT to name its output file; repeat for
    /// several files (one --exec runs after any of them changed).
    #[arg(long = "template", short = 't', value_name = "T[:OUT]")]
    templates: Vec<String>,
    /// Output file of a --template given without :OUT (or of the built-in env file).
    #[arg(long, short = 'o', value_name = "FILE")]
    out: Option<PathBuf>,
    /// Command run with `sh -c` after a file changed (e.g. "nginx -s reload"); its failure is
    /// logged and rendering goes on.
    #[arg(long, value_name = "CMD")]
    exec: Option<String>,
    /// How long --exec may run before it is killed.
    #[arg(long, default_value = "30s", value_parser = parse_duration, value_name = "DURATION")]
    exec_timeout: Duration,
    /// Render once and exit: non-zero when a template, a write or --exec failed.
    #[arg(long)]
    once: bool,
    /// Output format.
    #[arg(long, value_enum, default_value = "text")]
    format: FormatArg,
    /// Debounce bursts: render after MIN without changes, at most MAX (default 4×MIN) after
    /// the first one. E.g. 500ms or 2s:10s.
    #[arg(long, value_name = "MIN[:MAX]", value_parser = parse_wait)]
    wait: Option<Wait>,
}

fn parse_wait(s: &str) -> Result<Wait, String> {
    let (min, max) = match s.split_once(':') {
        Some((a, b)) => (parse_duration(a)?, Some(parse_duration(b)?)),
        None => (parse_duration(s)?, None),
    };
    let max = max.unwrap_or(min * 4);
    if max < min {
        return Err(format!("{s:?}: MAX is shorter than MIN"));
    }
    Ok(Wait { min, max })
}

/// The output targets the arguments name, templates read and compiled.
fn targets(a: &RenderArgs, format: Format) -> anyhow::Result<Vec<Target>> {
    let mut out = Vec::new();
    let mut bare = 0;
    for spec in &a.templates {
        let (tpl, file) = match spec.split_once(':') {
            Some((t, o)) if !o.is_empty() => (t, PathBuf::from(o)),
            _ => {
                bare += 1;
                let o = a.out.clone().with_context(|| {
                    format!("--template {spec} needs --out FILE (or write it as {spec}:FILE)")
                })?;
                (spec.trim_end_matches(':'), o)
            }
        };
        if bare > 1 {
            bail!("only one --template may go without :OUT (to --out)");
        }
        out.push(Target::load(PathBuf::from(tpl), file)?);
    }
    if out.is_empty() {
        match (format, &a.out) {
            (Format::Env, Some(o)) => out.push(Target::builtin_env(o.clone())),
            (Format::Env, None) => bail!("--format env needs --out FILE"),
            (Format::Text, _) => bail!("give --template FILE (with --out FILE) or --format env"),
        }
    } else if bare == 0 && a.out.is_some() {
        bail!("--out is only for a --template given without :OUT");
    }
    Ok(out)
}

/// `ferrynet render`.
pub async fn render(ctl: &Control, a: RenderArgs) -> anyhow::Result<()> {
    let format = match a.format {
        FormatArg::Text => Format::Text,
        FormatArg::Env => Format::Env,
    };
    let mut job = Job {
        targets: targets(&a, format)?,
        format,
        exec: a.exec.clone(),
        exec_timeout: a.exec_timeout,
        wait: a.wait,
        host: ctl.host().to_string(),
    };
    if a.once {
        job.once(ctl.store_handle()).await
    } else {
        job.watch(ctl.store_handle()).await
    }
}

/// `ferrynet kv`.
#[derive(Subcommand, Debug)]
pub enum KvCmd {
    /// Set a key to VALUE (or to standard input, byte for byte, when VALUE is left out).
    Put {
        /// Key name: letters, digits, `_ . - /`, at most 256 bytes.
        name: String,
        /// The value.
        value: Option<String>,
    },
    /// Print a key's value (exit 1 when it is not set).
    Get {
        /// Key name.
        name: String,
    },
    /// Remove a key (exit 1 when it is not set).
    Rm {
        /// Key name.
        name: String,
    },
    /// List keys with their values.
    Ls(JsonFlag),
}

/// True for a key name `ferrynet kv` accepts.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 256
        && !name.starts_with('/')
        && !name.ends_with('/')
        && !name.contains("//")
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-/".contains(&b))
}

fn checked(name: &str) -> anyhow::Result<&str> {
    if !valid_name(name) {
        bail!("key name {name:?} must be 1-256 letters, digits or '_.-/' (no leading, trailing or double '/')");
    }
    Ok(name)
}

/// `ferrynet kv …`.
pub async fn kv(ctl: &Control, cmd: KvCmd) -> anyhow::Result<std::process::ExitCode> {
    use std::io::{Read, Write};
    use std::process::ExitCode;
    match cmd {
        KvCmd::Put { name, value } => {
            let value = match value {
                Some(v) => v.into_bytes(),
                None => {
                    let mut b = Vec::new();
                    std::io::stdin()
                        .read_to_end(&mut b)
                        .context("reading the value from standard input")?;
                    b
                }
            };
            ctl.kv_set(checked(&name)?, value).await?;
        }
        KvCmd::Get { name } => match ctl.kv_get(checked(&name)?).await? {
            Some(value) => {
                let mut o = std::io::stdout().lock();
                o.write_all(&value)?;
                if !value.ends_with(b"\n") {
                    o.write_all(b"\n")?;
                }
            }
            None => {
                eprintln!("ferrynet: key {name:?} is not set");
                return Ok(ExitCode::from(1));
            }
        },
        KvCmd::Rm { name } => {
            if !ctl.kv_remove(checked(&name)?).await? {
                eprintln!("ferrynet: key {name:?} is not set");
                return Ok(ExitCode::from(1));
            }
        }
        KvCmd::Ls(f) => {
            let pairs: Vec<(String, String)> = ctl
                .kv_list()
                .await?
                .into_iter()
                .map(|(name, value)| (name, String::from_utf8_lossy(&value).into_owned()))
                .collect();
            if f.json {
                let m: std::collections::BTreeMap<_, _> = pairs.into_iter().collect();
                println!("{}", serde_json::to_string_pretty(&m)?);
            } else {
                let mut t = Table::new(&["NAME", "VALUE"]);
                for (k, v) in pairs {
                    let first = v.lines().next().unwrap_or("");
                    let mut shown: String = first.chars().take(60).collect();
                    if shown.len() < v.trim_end_matches('\n').len() {
                        shown.push('…');
                    }
                    t.row(vec![k, shown]);
                }
                print!("{t}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_forms() {
        let w = parse_wait("500ms").unwrap();
        assert_eq!(
            (w.min, w.max),
            (Duration::from_millis(500), Duration::from_secs(2))
        );
        let w = parse_wait("2s:10s").unwrap();
        assert_eq!(
            (w.min, w.max),
            (Duration::from_secs(2), Duration::from_secs(10))
        );
        assert!(parse_wait("5s:1s").is_err());
        assert!(parse_wait("soon").is_err());
    }

    #[test]
    fn kv_names() {
        for ok in ["greeting", "app/db.url", "A_1-x"] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in ["", "/a", "a/", "a//b", "a b", "ä"] {
            assert!(!valid_name(bad), "{bad:?}");
        }
    }
}
