//! The agent API: a unix socket answering one JSON document per request line.
//! Requests: `status`. Small on purpose: the CLI is its only client today.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use super::status::AgentStatus;

/// Where the agent socket lives for the default state directory: a tmpfs, so no stale
/// socket outlives a reboot, and where operators look for a daemon's socket.
pub const RUN_DIR: &str = "/run/ferrynet";

/// The default agent socket for a state directory: `/run/ferrynet/agent.sock` for the default
/// one; a state directory of its own (a lab host, a test) keeps its socket inside, so several
/// agents on one machine stay apart. `--agent-socket` overrides both.
pub fn socket_path(state_dir: &Path) -> PathBuf {
    if state_dir == Path::new(crate::control::DEFAULT_STATE_DIR) {
        Path::new(RUN_DIR).join("agent.sock")
    } else {
        state_dir.join("agent.sock")
    }
}

/// The answer to one request line.
pub fn answer(request: &str, status: &AgentStatus) -> String {
    match request.trim() {
        "status" => serde_json::to_string(status).unwrap_or_else(|e| error_json(&e.to_string())),
        other => error_json(&format!("unknown request {other:?}; try \"status\"")),
    }
}

fn error_json(msg: &str) -> String {
    serde_json::json!({ "error": msg }).to_string()
}

/// Bind the socket (replacing a stale one) and serve until the task is dropped.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let _ = std::fs::remove_file(path);
    UnixListener::bind(path)
}

/// Serve requests on `listener` from the shared status.
pub async fn serve(listener: UnixListener, status: Arc<Mutex<AgentStatus>>) {
    loop {
        let Ok((conn, _)) = listener.accept().await else {
            continue;
        };
        let status = status.clone();
        tokio::spawn(async move {
            if let Err(e) = handle(conn, status).await {
                tracing::debug!(error = %e, "agent API connection ended with an error");
            }
        });
    }
}

async fn handle(conn: UnixStream, status: Arc<Mutex<AgentStatus>>) -> std::io::Result<()> {
    let (r, mut w) = conn.into_split();
    let mut lines = BufReader::new(r.take(4096)).lines();
    let line = tokio::time::timeout(Duration::from_secs(5), lines.next_line())
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "request timed out"))??
        .unwrap_or_default();
    let reply = {
        let s = status.lock().map(|s| s.clone()).unwrap_or_default();
        answer(&line, &s)
    };
    w.write_all(reply.as_bytes()).await?;
    w.write_all(b"\n").await?;
    w.shutdown().await
}

/// Ask the agent behind `path` for its status.
pub async fn query_status(path: &Path) -> anyhow::Result<AgentStatus> {
    use anyhow::Context;
    let mut conn = UnixStream::connect(path).await.with_context(|| {
        format!(
            "cannot reach the agent at {} (is `ferrynet agent` running on this host?)",
            path.display()
        )
    })?;
    conn.write_all(b"status\n").await?;
    let mut buf = String::new();
    tokio::time::timeout(Duration::from_secs(5), conn.read_to_string(&mut buf))
        .await
        .context("the agent did not answer within 5 s")??;
    serde_json::from_str(&buf).with_context(|| format!("unexpected answer from the agent: {buf}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_status_and_rejects_the_rest() {
        let s = AgentStatus {
            host: "h1".into(),
            ..Default::default()
        };
        assert!(answer("status\n", &s).contains("\"host\":\"h1\""));
        assert!(answer("reboot", &s).contains("unknown request"));
    }
}
