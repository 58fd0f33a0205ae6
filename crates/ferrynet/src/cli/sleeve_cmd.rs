//! `ferrynet sleeve`: this host's sleeve key, and a handshake test against a sleeve endpoint.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Subcommand;
use ferrynet_model::sleeve::{decode_key, encode_key, KEY_FILE_NAME};

use crate::control::Paths;

/// Sleeve subcommands.
#[derive(Subcommand, Debug)]
pub enum SleeveCmd {
    /// Print this host's public key (from `<state-dir>/sleeve.key`, which the agent makes).
    PublicKey,
    /// Try a WireGuard handshake with a sleeve: exit 0 when it answers, 1 when not. With a
    /// fresh key (the default) no ferrynet host answers: it drops and counts (`unknownKey`)
    /// handshakes from keys no registered host holds.
    Hello {
        /// The sleeve's address and port.
        #[arg(long)]
        endpoint: SocketAddr,
        /// Its public key (base64; `ferrynet status` shows each peer's).
        #[arg(long)]
        public_key: String,
        /// Our private key (base64 in a file); default: a fresh random key.
        #[arg(long)]
        key_file: Option<PathBuf>,
        /// How long to wait for the answer.
        #[arg(long, default_value = "1s", value_parser = super::parse_duration)]
        wait: Duration,
    },
}

/// Run a sleeve subcommand.
pub fn run(paths: &Paths, cmd: SleeveCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        SleeveCmd::PublicKey => {
            let p = paths.state_dir.join(KEY_FILE_NAME);
            let s = std::fs::read_to_string(&p)
                .with_context(|| format!("reading {} (does the agent run here?)", p.display()))?;
            let private = decode_key(&s)?;
            println!("{}", encode_key(&ferrynet_sleeve::public_of(private)));
            Ok(ExitCode::SUCCESS)
        }
        SleeveCmd::Hello {
            endpoint,
            public_key,
            key_file,
            wait,
        } => {
            let peer = decode_key(&public_key)?;
            let private = match key_file {
                Some(f) => decode_key(
                    &std::fs::read_to_string(&f)
                        .with_context(|| format!("reading {}", f.display()))?,
                )?,
                None => rand::random(),
            };
            let ok = ferrynet_sleeve::hello(private, peer, endpoint, wait)
                .with_context(|| format!("sending to {endpoint}"))?;
            println!("{}", if ok { "answered" } else { "no answer" });
            Ok(if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
    }
}
