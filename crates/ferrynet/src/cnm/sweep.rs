//! Docker endpoints Docker has forgotten. When dockerd starts while the driver is away for
//! longer than Docker retries it (about 15 s per call), Docker removes the old containers'
//! sandboxes and endpoints without the driver: their endpoint records, addresses and published
//! ports stay in ferrynet's store, and the restarted container is refused its own host port.
//! So whenever the driver starts and whenever Docker activates it (a dockerd start), it compares
//! its Docker endpoints with the Engine API's and removes those Docker lists in neither of two
//! looks a few seconds apart (an endpoint being created is recorded by the driver just before
//! Docker stores it).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ferrynet_model::gc::legacy_owner;
use ferrynet_model::names::host_veth_name;
use ferrynet_model::network::{Endpoint, EndpointOwner};
use serde_json::Value;

use super::names::get_json;
use super::records::{DockerNetwork, DOCKER_IFNAME, IPAM_OWNER};
use super::Plugin;

/// How long a sweep waits for the Engine API (dockerd activates plugins before it listens, and
/// its start can take minutes while it retries an absent driver).
const API_WAIT: Duration = Duration::from_secs(300);
/// Pause between two looks at the API while it does not answer.
const API_RETRY: Duration = Duration::from_secs(1);
/// Between the two looks: longer than Docker takes from the driver's `CreateEndpoint` to
/// storing the endpoint.
const GRACE: Duration = Duration::from_secs(3);

/// The endpoint ids Docker lists on its network `docker_id` (`GET /networks/<id>`: every
/// endpoint, joined ones under their container's id, others as `ep-<id>`); None when the answer
/// is not that network's.
pub fn listed_endpoints(network: &Value, docker_id: &str) -> Option<BTreeSet<String>> {
    if network.get("Id")?.as_str()? != docker_id {
        return None;
    }
    let ids = match network.get("Containers") {
        None | Some(Value::Null) => BTreeSet::new(),
        Some(c) => c
            .as_object()?
            .values()
            .filter_map(|e| e.get("EndpointID")?.as_str())
            .map(str::to_string)
            .collect(),
    };
    Some(ids)
}

/// The Docker endpoints among `recorded` that Docker does not list, of this host (`me`): an
/// engine lists only its own containers, so on a multi-host (global) network another host's
/// endpoints are not its to judge.
pub fn unlisted(recorded: &[Endpoint], listed: &BTreeSet<String>, me: &str) -> BTreeSet<String> {
    recorded
        .iter()
        .filter(|e| e.host.as_deref().is_none_or(|h| h == me))
        .filter(|e| e.ifname == DOCKER_IFNAME && !listed.contains(&e.container_id))
        // A CNI attachment that happens to be called `docker` is not Docker's either.
        .filter(|e| legacy_owner(e, &BTreeSet::new()) == EndpointOwner::Docker)
        .map(|e| e.container_id.clone())
        .collect()
}

/// Wait until the Engine API answers; false if it does not within [`API_WAIT`].
async fn api_up(socket: &Path) -> bool {
    let deadline = tokio::time::Instant::now() + API_WAIT;
    loop {
        if matches!(get_json(socket, "/version").await, Ok(Some(_))) {
            return true;
        }
        if tokio::time::Instant::now() + API_RETRY >= deadline {
            return false;
        }
        tokio::time::sleep(API_RETRY).await;
    }
}

impl Plugin {
    /// What Docker lists on a bound network; None when Docker does not know the network (it
    /// may be another engine's, or Docker's state was reset: nothing is removed then).
    async fn docker_listed(
        &self,
        socket: &Path,
        b: &DockerNetwork,
    ) -> anyhow::Result<Option<BTreeSet<String>>> {
        Ok(get_json(socket, &format!("/networks/{}", b.docker_id))
            .await?
            .and_then(|v| listed_endpoints(&v, &b.docker_id)))
    }

    /// One sweep: endpoints unlisted in two looks [`GRACE`] apart are removed. The count.
    async fn sweep(&self, socket: &Path) -> anyhow::Result<usize> {
        if !api_up(socket).await {
            anyhow::bail!(
                "the Docker API at {} did not answer within {API_WAIT:?}",
                socket.display()
            );
        }
        let mut suspects = Vec::new();
        for b in self.ctl.docker_bindings().await? {
            let Some(listed) = self.docker_listed(socket, &b).await? else {
                continue;
            };
            let missing = unlisted(
                &self.ctl.endpoints(&b.name).await?,
                &listed,
                self.ctl.host(),
            );
            if !missing.is_empty() {
                suspects.push((b, missing));
            }
        }
        if suspects.is_empty() {
            return Ok(0);
        }
        tokio::time::sleep(GRACE).await;
        let mut removed = 0;
        for (b, first) in suspects {
            let Some(listed) = self.docker_listed(socket, &b).await? else {
                continue;
            };
            let now = unlisted(
                &self.ctl.endpoints(&b.name).await?,
                &listed,
                self.ctl.host(),
            );
            for id in first.intersection(&now) {
                if self.drop_stale(&b, id).await? {
                    removed += 1;
                }
            }
        }
        Ok(removed)
    }

    /// Remove a Docker endpoint Docker has forgotten, as `DeleteEndpoint` and the
    /// `ReleaseAddress` Docker never sent would have; false if it is gone already.
    async fn drop_stale(&self, b: &DockerNetwork, endpoint_id: &str) -> anyhow::Result<bool> {
        let _g = self.lock.lock().await;
        let Some(ep) = self
            .ctl
            .endpoint(&b.name, endpoint_id, DOCKER_IFNAME)
            .await?
        else {
            return Ok(false);
        };
        let host = ep
            .host_veth
            .clone()
            .unwrap_or_else(|| host_veth_name(&b.name, endpoint_id, DOCKER_IFNAME));
        self.ctl.delete_host_link(&host).await?;
        self.ctl.forget_endpoint(&ep).await?;
        // Addresses from ferrynet's IPAM stay with it until Docker's ReleaseAddress, which
        // will not come: released unless another endpoint refers to them.
        let others = self.ctl.endpoints(&b.name).await?;
        for ip in &ep.ips {
            let used = others
                .iter()
                .any(|o| o.ips.iter().any(|x| x.addr() == ip.addr()));
            if !used {
                self.ctl
                    .release_address(&b.name, ip.addr(), IPAM_OWNER)
                    .await?;
            }
        }
        tracing::info!(endpoint = %endpoint_id, network = %b.name, ips = ?ep.ips, "removed a Docker endpoint Docker no longer knows");
        Ok(true)
    }
}

/// Sweep once now and again after every `Plugin.Activate`, until the task is aborted.
pub async fn run(plugin: Arc<Plugin>, socket: PathBuf) {
    loop {
        match plugin.sweep(&socket).await {
            Ok(0) => tracing::debug!("every Docker endpoint is known to Docker"),
            Ok(n) => tracing::info!(
                removed = n,
                "removed Docker endpoints Docker no longer knows"
            ),
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "checking the Docker endpoints against Docker failed")
            }
        }
        plugin.activated.notified().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn lists_joined_and_unjoined_endpoints_of_that_network() {
        let net = json!({"Id": "n1", "Containers": {
            "c1": {"Name": "a", "EndpointID": "e1"},
            "ep-e2": {"Name": "b", "EndpointID": "e2"}}});
        assert_eq!(
            listed_endpoints(&net, "n1"),
            Some(BTreeSet::from(["e1".to_string(), "e2".to_string()]))
        );
        // Another network's answer never counts as "nothing listed".
        assert_eq!(listed_endpoints(&net, "n2"), None);
        assert_eq!(listed_endpoints(&json!({"message": "x"}), "n1"), None);
        assert_eq!(
            listed_endpoints(&json!({"Id": "n1", "Containers": null}), "n1"),
            Some(BTreeSet::new())
        );
        assert_eq!(
            listed_endpoints(&json!({"Id": "n1", "Containers": []}), "n1"),
            None
        );
    }

    #[test]
    fn only_docker_endpoints_docker_does_not_list_are_unlisted() {
        let ep = |id: &str, ifname: &str| Endpoint::new("net", id, ifname);
        let on = |id: &str, host: &str| Endpoint {
            host: Some(host.into()),
            ..ep(id, DOCKER_IFNAME)
        };
        let recorded = vec![
            ep("e1", DOCKER_IFNAME),
            ep("e2", DOCKER_IFNAME),
            // A CNI or CLI container on the same network is not Docker's to judge.
            ep("cni", "eth0"),
            Endpoint {
                owner: EndpointOwner::Cni,
                ..ep("cni2", DOCKER_IFNAME)
            },
            // Nor is another host's endpoint on a multi-host network; this host's is.
            on("far", "h2"),
            on("near", "h1"),
        ];
        let listed = BTreeSet::from(["e1".to_string()]);
        assert_eq!(
            unlisted(&recorded, &listed, "h1"),
            BTreeSet::from(["e2".to_string(), "near".to_string()])
        );
        let all = BTreeSet::from(["e1".to_string(), "e2".to_string(), "near".to_string()]);
        assert!(unlisted(&recorded, &all, "h1").is_empty());
    }
}
