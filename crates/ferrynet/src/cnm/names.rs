//! Container names of Docker endpoints. libnetwork never passes them to a network driver, so
//! after a `Join` the driver asks the Engine API which container holds the endpoint and records
//! its name and network aliases on the endpoint (`Endpoint.name`, `Endpoint.aliases`), where
//! ferrynet's name service reads them like those of CLI containers.
//!
//! Best effort and off the call path: Docker lists the container on the network only once its
//! start has gone past the `Join`, so a background task asks, with retries, and the `Join`
//! answers at once. Without a reachable Engine API nothing is named and nothing else changes.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use bytes::Bytes;
use ferrynet_model::network::keys;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::Request;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::sync::mpsc;

use super::records::DOCKER_IFNAME;
use super::Plugin;
use ferrynet_model::validate::is_dns_name;

/// Where the Engine API listens by default.
pub const DEFAULT_DOCKER_API: &str = "/var/run/docker.sock";
/// How long a Join's container is looked for.
const LOOK_FOR: Duration = Duration::from_secs(30);
/// Before the first look: Docker lists the container once its start is through, and asking
/// earlier only competes with that start.
const FIRST_LOOK: Duration = Duration::from_millis(500);
/// Pause between two looks.
const RETRY: Duration = Duration::from_millis(250);
/// Largest Engine API answer read.
const MAX_ANSWER: usize = 8 << 20;
/// Longest one Engine API request may take (a hung daemon must not hold a task forever).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// A joined endpoint to name.
#[derive(Debug, Clone)]
pub struct NameJob {
    /// Docker's network id.
    pub docker_network: String,
    /// Docker's endpoint id (the endpoint record's container id).
    pub endpoint_id: String,
    /// The ferrynet network.
    pub network: String,
}

/// The Engine API socket: `DOCKER_HOST` when it is a `unix://` path, else the default.
pub fn docker_api_socket() -> PathBuf {
    match std::env::var("DOCKER_HOST") {
        Ok(h) if h.starts_with("unix://") => PathBuf::from(&h["unix://".len()..]),
        _ => PathBuf::from(DEFAULT_DOCKER_API),
    }
}

/// What Docker says about the container holding an endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerName {
    /// The container's id.
    pub id: String,
    /// Its name, without Docker's leading `/`.
    pub name: String,
    /// Its aliases on the network (`--network-alias`, the short id Docker adds), without the
    /// name itself.
    pub aliases: Vec<String>,
    /// Its labels (`docker run --label`) for network policy: those an endpoint can hold
    /// (keys of `[A-Za-z0-9_./-]`, values of at most 63 `[A-Za-z0-9_.-]`); others are skipped.
    pub labels: std::collections::BTreeMap<String, String>,
}

/// From `GET /containers/json?filters={"network":[…]}`: the id of the container whose
/// endpoint on the network is `endpoint_id`.
pub fn container_of_endpoint(list: &Value, endpoint_id: &str) -> Option<String> {
    list.as_array()?
        .iter()
        .find(|c| {
            c.get("NetworkSettings")
                .and_then(|n| n.get("Networks"))
                .and_then(Value::as_object)
                .is_some_and(|nets| {
                    nets.values()
                        .any(|n| n.get("EndpointID").and_then(Value::as_str) == Some(endpoint_id))
                })
        })?
        .get("Id")?
        .as_str()
        .map(str::to_string)
}

/// The Engine API path listing the containers on Docker network `network` (its id, which
/// Docker made of hex digits; anything else is refused rather than put into a URL).
fn containers_on(network: &str) -> Option<String> {
    if network.is_empty() || !network.chars().all(|c| c.is_ascii_alphanumeric()) {
        return None;
    }
    // filters={"network":["<id>"]}, percent-encoded.
    Some(format!(
        "/containers/json?filters=%7B%22network%22%3A%5B%22{network}%22%5D%7D"
    ))
}

/// From `GET /containers/<id>/json`: its name and its aliases on the endpoint `endpoint_id`.
pub fn name_of_container(container: &Value, endpoint_id: &str) -> Option<ContainerName> {
    let id = container.get("Id")?.as_str()?.to_string();
    let name = container
        .get("Name")?
        .as_str()?
        .trim_start_matches('/')
        .to_string();
    // Names become DNS names and are checked again when read back: refuse here what every
    // reader would refuse (ferrynet_model::validate).
    if !is_dns_name(&name) {
        return None;
    }
    let net = container
        .get("NetworkSettings")?
        .get("Networks")?
        .as_object()?
        .values()
        .find(|n| n.get("EndpointID").and_then(Value::as_str) == Some(endpoint_id))?;
    let mut aliases: Vec<String> = Vec::new();
    for a in net
        .get("Aliases")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
    {
        if a != name && is_dns_name(a) && !aliases.iter().any(|x| x == a) {
            aliases.push(a.to_string());
        }
    }
    let labels = container
        .get("Config")
        .and_then(|c| c.get("Labels"))
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
        .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
        .filter(|(k, v)| {
            let one = std::collections::BTreeMap::from([(k.clone(), v.clone())]);
            ferrynet_model::pod::check_labels(&one, None).is_ok()
        })
        .collect();
    Some(ContainerName {
        id,
        name,
        aliases,
        labels,
    })
}

/// One `GET` of the Engine API over its unix socket: the JSON answer, None for a 404.
pub(crate) async fn get_json(socket: &Path, path: &str) -> anyhow::Result<Option<Value>> {
    tokio::time::timeout(REQUEST_TIMEOUT, get_json_once(socket, path))
        .await
        .map_err(|_| {
            anyhow::anyhow!("GET {path} on the Docker API: no answer within {REQUEST_TIMEOUT:?}")
        })?
}

async fn get_json_once(socket: &Path, path: &str) -> anyhow::Result<Option<Value>> {
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .with_context(|| format!("connecting to the Docker API at {}", socket.display()))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .context("HTTP handshake with the Docker API")?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = Request::get(path)
        .header(hyper::header::HOST, "docker")
        .body(Empty::<Bytes>::new())
        .context("building a Docker API request")?;
    let resp = sender
        .send_request(req)
        .await
        .with_context(|| format!("GET {path} on the Docker API"))?;
    let status = resp.status();
    let body = Limited::new(resp.into_body(), MAX_ANSWER)
        .collect()
        .await
        .map_err(|e| anyhow::anyhow!("reading the Docker API's answer to GET {path}: {e}"))?
        .to_bytes();
    if status == hyper::StatusCode::NOT_FOUND {
        return Ok(None);
    }
    if !status.is_success() {
        bail!(
            "GET {path} on the Docker API: {status}: {}",
            String::from_utf8_lossy(&body).trim()
        );
    }
    Ok(Some(serde_json::from_slice(&body).with_context(|| {
        format!("the Docker API's answer to GET {path} is not JSON")
    })?))
}

/// Ask Docker which container holds the endpoint: None while it does not list it (yet).
///
/// The container list comes from the daemon's in-memory view, without the network's locks and
/// store reads that `GET /networks/<id>` takes, so asking does not slow the next container's
/// start on the same network; the list has no aliases, so the one container is then inspected.
async fn look_up(socket: &Path, job: &NameJob) -> anyhow::Result<Option<ContainerName>> {
    let Some(path) = containers_on(&job.docker_network) else {
        bail!("Docker network id {:?} is not an id", job.docker_network);
    };
    let Some(list) = get_json(socket, &path).await? else {
        return Ok(None);
    };
    let Some(cid) = container_of_endpoint(&list, &job.endpoint_id) else {
        return Ok(None);
    };
    if !cid.chars().all(|c| c.is_ascii_alphanumeric()) {
        bail!("Docker listed a container id {cid:?} that is not an id");
    }
    let Some(c) = get_json(socket, &format!("/containers/{cid}/json")).await? else {
        return Ok(None);
    };
    Ok(name_of_container(&c, &job.endpoint_id))
}

impl Plugin {
    /// Record the name and aliases on the endpoint if it is still there; false if it is gone.
    async fn record_name(&self, job: &NameJob, found: &ContainerName) -> anyhow::Result<bool> {
        let key = keys::endpoint(&job.network, &job.endpoint_id, DOCKER_IFNAME);
        // Not under the handlers' lock, so Docker's calls for the next containers do not wait
        // for this write.
        let named = self
            .ctl
            .set_endpoint_name(&key, &found.name, &found.aliases, &found.labels)
            .await?;
        // Labels select policies; without an agent nobody else applies them.
        self.ctl.sync_policy_without_agent().await;
        Ok(named)
    }

    /// Name one joined endpoint: look for its container until Docker lists it, then record.
    async fn name_endpoint(&self, socket: &Path, job: &NameJob) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + LOOK_FOR;
        tokio::time::sleep(FIRST_LOOK).await;
        loop {
            match look_up(socket, job).await {
                Ok(Some(found)) => {
                    if self.record_name(job, &found).await? {
                        tracing::info!(endpoint = %job.endpoint_id, container = %found.id, name = %found.name, aliases = ?found.aliases, labels = ?found.labels, "Docker endpoint named");
                    }
                    return Ok(());
                }
                Ok(None) => {}
                // The API may be starting or busy: keep trying until the deadline.
                Err(e) if tokio::time::Instant::now() + RETRY < deadline => {
                    tracing::debug!(error = %format!("{e:#}"), "asking Docker for a container name")
                }
                Err(e) => return Err(e),
            }
            if tokio::time::Instant::now() + RETRY >= deadline {
                bail!(
                    "Docker did not list endpoint {} on its network within {LOOK_FOR:?}",
                    job.endpoint_id
                );
            }
            tokio::time::sleep(RETRY).await;
        }
    }
}

/// Serve name jobs until the senders are gone, each in its own task.
pub async fn run(plugin: Arc<Plugin>, socket: PathBuf, mut jobs: mpsc::UnboundedReceiver<NameJob>) {
    let socket = Arc::new(socket);
    while let Some(job) = jobs.recv().await {
        let (plugin, socket) = (plugin.clone(), socket.clone());
        tokio::spawn(async move {
            if let Err(e) = plugin.name_endpoint(&socket, &job).await {
                tracing::warn!(endpoint = %job.endpoint_id, error = %format!("{e:#}"), "no container name for the Docker endpoint");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn finds_the_container_by_endpoint() {
        let list = json!([
            {"Id": "c1", "NetworkSettings": {"Networks": {"front": {"EndpointID": "e1"}}}},
            {"Id": "c2", "NetworkSettings": {"Networks": {
                "other": {"EndpointID": "e9"}, "front": {"EndpointID": "e2"}}}},
            {"Id": "c3", "NetworkSettings": null}]);
        assert_eq!(container_of_endpoint(&list, "e2").as_deref(), Some("c2"));
        assert_eq!(container_of_endpoint(&list, "e3"), None);
        assert_eq!(container_of_endpoint(&json!({"message": "x"}), "e1"), None);
        assert_eq!(container_of_endpoint(&json!([]), "e1"), None);
    }

    #[test]
    fn only_ids_go_into_the_list_path() {
        assert_eq!(
            containers_on("ab12").as_deref(),
            Some("/containers/json?filters=%7B%22network%22%3A%5B%22ab12%22%5D%7D")
        );
        for bad in ["", "a/b", "a?b", "a%22", "a b", "é"] {
            assert_eq!(containers_on(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn name_and_aliases_of_the_endpoint() {
        let c = json!({"Id": "abc123", "Name": "/web", "Config": {"Labels": {"app": "web", "bad": "a b"}}, "NetworkSettings": {"Networks": {
            "other": {"EndpointID": "e9", "Aliases": ["x"]},
            "front": {"EndpointID": "e1", "Aliases": ["web", "www", "abc123", "www"]}}}});
        assert_eq!(
            name_of_container(&c, "e1"),
            Some(ContainerName {
                id: "abc123".into(),
                name: "web".into(),
                aliases: vec!["www".into(), "abc123".into()],
                labels: [("app".to_string(), "web".to_string())].into(),
            })
        );
        assert_eq!(name_of_container(&c, "e5"), None);
        let nameless = json!({"Id": "x", "Name": "/", "NetworkSettings": {"Networks": {}}});
        assert_eq!(name_of_container(&nameless, "e1"), None);
        let no_aliases = json!({"Id": "x", "Name": "/n", "NetworkSettings": {"Networks": {
            "front": {"EndpointID": "e1", "Aliases": null}}}});
        assert_eq!(
            name_of_container(&no_aliases, "e1").unwrap().aliases,
            Vec::<String>::new()
        );
        // Names and aliases that are not DNS names are not recorded.
        let hostile = json!({"Id": "x", "Name": "/n", "NetworkSettings": {"Networks": {
            "front": {"EndpointID": "e1", "Aliases": ["a b", "x}", "ok"]}}}});
        assert_eq!(name_of_container(&hostile, "e1").unwrap().aliases, ["ok"]);
        let bad_name = json!({"Id": "x", "Name": "/a\nb", "NetworkSettings": {"Networks": {}}});
        assert_eq!(name_of_container(&bad_name, "e1"), None);
    }
}
