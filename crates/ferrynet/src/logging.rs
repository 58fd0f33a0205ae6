//! Logging setup: human text or one JSON object per line, always on stderr (stdout is the CNI
//! protocol channel and the CLI's output).

use tracing_subscriber::EnvFilter;

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable text (colour on a terminal).
    #[default]
    Text,
    /// One JSON object per line (timestamp, level, fields), for journald, Loki or Elasticsearch.
    Json,
}

impl LogFormat {
    /// The format `FERRYNET_LOG_FORMAT` asks for (text when unset or unknown), for the CNI
    /// plugin, which has no command line.
    pub fn from_env() -> LogFormat {
        match std::env::var("FERRYNET_LOG_FORMAT").as_deref() {
            Ok("json") => LogFormat::Json,
            _ => LogFormat::Text,
        }
    }
}

/// Install the global subscriber; `FERRYNET_LOG` (an env-filter) overrides `default`.
pub fn init(default: &str, format: LogFormat) {
    let filter =
        EnvFilter::try_from_env("FERRYNET_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    let _ = match format {
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init(),
        LogFormat::Json => builder.json().with_ansi(false).try_init(),
    };
}
