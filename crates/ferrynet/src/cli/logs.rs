//! `ferrynet logs NAME [-f]`: the output of a container started with `ferrynet run`.
//!
//! `run` sends the command's stdout and stderr to `<state-dir>/containers/NAME/log`
//! (`container::spawn_in`); this prints that file, and with `--follow` keeps printing what
//! is appended until the container's process ends, like `docker logs -f`.

use std::io::{Read, Seek, SeekFrom, Write};
use std::time::Duration;

use anyhow::Context;
use ferrynet_model::names::validate_container_name;

use super::exit::{not_found, CliError};
use crate::control::Control;

/// Arguments of `ferrynet logs`.
#[derive(clap::Args, Debug)]
pub struct LogsArgs {
    /// Container name (one started with `ferrynet run`).
    name: String,
    /// Keep printing new output until the container's process ends.
    #[arg(long, short)]
    follow: bool,
}

/// How often a followed log is checked for more output (no inotify: a log file of a
/// container is small and this keeps the code path one loop).
const POLL: Duration = Duration::from_millis(200);

/// Print the log (and follow it).
pub async fn logs(ctl: &Control, a: LogsArgs) -> anyhow::Result<()> {
    // The name must be a container name before it becomes part of a path.
    validate_container_name(&a.name).map_err(|e| CliError::Usage(e.to_string()))?;
    let c = ctl
        .container(&a.name)
        .await?
        .ok_or_else(|| not_found(format!("no container named {}", a.name)))?;
    let path = ctl.paths().container_dir(&a.name).join("log");
    let mut file = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(not_found(format!(
                "container {} has no log (started by an older ferrynet, or removed)",
                a.name
            )))
        }
        Err(e) => return Err(e).with_context(|| format!("opening {}", path.display())),
    };
    let mut out = std::io::stdout().lock();
    let mut pos = copy_new(&mut file, 0, &mut out)?;
    if !a.follow {
        return Ok(());
    }
    loop {
        let alive = c.running();
        pos = copy_new(&mut file, pos, &mut out)?;
        // Read once more after the process ended: what it wrote last is printed too.
        if !alive {
            return Ok(());
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Copy what the file holds past `pos` to `out`; the new position. A file shorter than `pos`
/// was truncated: start again from its beginning.
fn copy_new(file: &mut std::fs::File, pos: u64, out: &mut impl Write) -> anyhow::Result<u64> {
    let len = file.metadata().context("reading the log's size")?.len();
    let from = if len < pos { 0 } else { pos };
    file.seek(SeekFrom::Start(from))
        .context("seeking the log")?;
    let mut buf = Vec::new();
    file.read_to_end(&mut buf).context("reading the log")?;
    out.write_all(&buf).context("writing to stdout")?;
    out.flush().context("writing to stdout")?;
    Ok(from + buf.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_only_what_is_new_and_restarts_after_truncation() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("log");
        std::fs::write(&p, "one\n").unwrap();
        let mut f = std::fs::File::open(&p).unwrap();
        let mut out = Vec::new();
        let pos = copy_new(&mut f, 0, &mut out).unwrap();
        std::fs::OpenOptions::new()
            .append(true)
            .open(&p)
            .unwrap()
            .write_all(b"two\n")
            .unwrap();
        let pos = copy_new(&mut f, pos, &mut out).unwrap();
        assert_eq!(out, b"one\ntwo\n");
        std::fs::write(&p, "3\n").unwrap();
        let mut out = Vec::new();
        assert_eq!(copy_new(&mut f, pos, &mut out).unwrap(), 2);
        assert_eq!(out, b"3\n");
    }
}
