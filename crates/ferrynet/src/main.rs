//! ferrynet: container networking. One binary: a CNI plugin (when `CNI_COMMAND` is set), a CLI.

use ferrynet::{cli, cni};
use std::process::ExitCode;

use tracing_subscriber::EnvFilter;

fn init_logging(default: &str) {
    // stdout is the CNI protocol channel, so logs always go to stderr.
    let filter =
        EnvFilter::try_from_env("FERRYNET_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}

fn main() -> ExitCode {
    // A CNI runtime selects the command with an environment variable, not argv.
    let has_cli_args = std::env::args_os().len() > 1;
    if ferrynet_model::cni::is_cni_invocation(|k| std::env::var(k).ok(), has_cli_args) {
        init_logging("warn");
        return ExitCode::from(cni::main() as u8);
    }
    init_logging("info");
    // `ferrynet status | head` should end quietly when the reader goes away, like other tools.
    // SAFETY: restoring the default disposition of one signal before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    cli::main()
}
