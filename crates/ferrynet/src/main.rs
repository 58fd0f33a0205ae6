//! ferrynet: container networking. One binary: a CNI plugin (when `CNI_COMMAND` is set), a CLI.

use ferrynet::logging::{self, LogFormat};
use ferrynet::{cli, cni};
use std::process::ExitCode;

fn main() -> ExitCode {
    // A CNI runtime selects the command with an environment variable, not argv.
    let has_cli_args = std::env::args_os().len() > 1;
    if ferrynet_model::cni::is_cni_invocation(|k| std::env::var(k).ok(), has_cli_args) {
        // No command line: the format comes from FERRYNET_LOG_FORMAT alone.
        logging::init("warn", LogFormat::from_env());
        return ExitCode::from(cni::main() as u8);
    }
    // `ferrynet status | head` should end quietly when the reader goes away, like other tools.
    // SAFETY: restoring the default disposition of one signal before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    // The CLI sets up logging once its flags (--log-format) are parsed.
    cli::main()
}
