//! `ferrynet completions SHELL` and `ferrynet man DIR`: shell completions (clap_complete) and
//! man pages (clap_mangen) from the same definitions `--help` prints, so packages never ship
//! stale ones. Both run without root and without a store.

use std::path::Path;

use anyhow::Context;
use clap::Command;

/// The shells completions are generated for.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Shell {
    /// bash (bash-completion).
    Bash,
    /// zsh.
    Zsh,
    /// fish.
    Fish,
}

/// Write the completion script for `shell` to `out`.
pub fn completions(mut cmd: Command, shell: Shell, out: &mut dyn std::io::Write) {
    use clap_complete::{generate, shells};
    let name = cmd.get_name().to_string();
    match shell {
        Shell::Bash => generate(shells::Bash, &mut cmd, name, out),
        Shell::Zsh => generate(shells::Zsh, &mut cmd, name, out),
        Shell::Fish => generate(shells::Fish, &mut cmd, name, out),
    }
}

/// Write `ferrynet.1` and one `ferrynet-SUB.1` per subcommand (and nested ones) into `dir`;
/// the number of pages written.
pub fn man_pages(cmd: Command, dir: &Path) -> anyhow::Result<usize> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    // Built once so each subcommand carries its global flags, its usage line
    // (`ferrynet network create`) and its page name (`ferrynet-network-create`).
    let mut cmd = cmd.version(crate::failpoint::VERSION);
    cmd.build();
    let mut n = 0;
    write_page(&cmd, dir, &mut n)?;
    Ok(n)
}

fn write_page(cmd: &Command, dir: &Path, n: &mut usize) -> anyhow::Result<()> {
    let name = cmd
        .get_display_name()
        .unwrap_or_else(|| cmd.get_name())
        .to_string();
    let mut buf = Vec::new();
    clap_mangen::Man::new(cmd.clone())
        .render(&mut buf)
        .with_context(|| format!("rendering the man page of {name}"))?;
    let path = dir.join(format!("{name}.1"));
    std::fs::write(&path, buf).with_context(|| format!("writing {}", path.display()))?;
    *n += 1;
    for sub in cmd.get_subcommands() {
        if sub.is_hide_set() || sub.get_name() == "help" {
            continue;
        }
        write_page(sub, dir, n)?;
    }
    Ok(())
}
