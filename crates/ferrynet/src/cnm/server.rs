//! HTTP/1.1 over a unix socket: one POST per plugin method, JSON in and out.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use tokio::net::UnixListener;

use super::error::{CnmError, Result};
use super::Plugin;

/// Content type of Docker plugin answers.
pub const CONTENT_TYPE: &str = "application/vnd.docker.plugins.v1+json";
/// Largest request body accepted.
pub const MAX_BODY: usize = 1 << 20;
/// How long open connections may finish their request after shutdown starts.
const DRAIN: Duration = Duration::from_secs(5);

/// How long the store stays open after a Docker call, idle or not. Docker's calls come in
/// bursts: a container's six within ~10 ms, and `docker compose up` or a loop of `docker run`s
/// starting the next container within a second or two. Closing the embedded store between
/// them costs each container a close and a reopen (about eight fsyncs, ~1 ms of it before
/// `RequestAddress` answers); holding it costs only a hand-off to a CLI or CNI call that comes
/// meanwhile.
const DOCKER_BURST: Duration = Duration::from_secs(2);

fn parse<T: DeserializeOwned>(method: &str, body: &[u8]) -> Result<T> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(CnmError::Malformed {
            method: method.into(),
            why: "the body is empty; a JSON object is expected".into(),
        });
    }
    let v: Value = serde_json::from_slice(body).map_err(|e| CnmError::Malformed {
        method: method.into(),
        why: format!("invalid JSON: {e}"),
    })?;
    if !v.is_object() {
        return Err(CnmError::Malformed {
            method: method.into(),
            why: format!("expected a JSON object, got {v}"),
        });
    }
    serde_json::from_value(v).map_err(|e| CnmError::Malformed {
        method: method.into(),
        why: format!("unexpected JSON: {e}"),
    })
}

/// Decode a request body the way [`Plugin::dispatch`] does for `method`, with the option maps
/// a network and an endpoint carry parsed too, without acting on it: what the fuzz target
/// `cnm_request` drives. Unknown methods are an error, as in `dispatch`.
pub fn decode_request(method: &str, body: &[u8]) -> Result<()> {
    use super::options::{network_options, port_bindings};
    use super::protocol::*;
    match method {
        "Plugin.Activate"
        | "NetworkDriver.GetCapabilities"
        | "IpamDriver.GetCapabilities"
        | "IpamDriver.GetDefaultAddressSpaces" => Ok(()),
        "NetworkDriver.CreateNetwork" => {
            let r: CreateNetworkRequest = parse(method, body)?;
            network_options(&r.options).map(drop)
        }
        "NetworkDriver.DeleteNetwork" | "NetworkDriver.FreeNetwork" => {
            parse::<NetworkRequest>(method, body).map(drop)
        }
        "NetworkDriver.AllocateNetwork" => parse::<AllocateNetworkRequest>(method, body).map(drop),
        "NetworkDriver.CreateEndpoint" => parse::<CreateEndpointRequest>(method, body).map(drop),
        "NetworkDriver.EndpointOperInfo"
        | "NetworkDriver.DeleteEndpoint"
        | "NetworkDriver.Leave"
        | "NetworkDriver.RevokeExternalConnectivity" => {
            parse::<EndpointRequest>(method, body).map(drop)
        }
        "NetworkDriver.Join" => parse::<JoinRequest>(method, body).map(drop),
        "NetworkDriver.DiscoverNew" | "NetworkDriver.DiscoverDelete" => {
            parse::<serde_json::Map<String, Value>>(method, body).map(drop)
        }
        "NetworkDriver.ProgramExternalConnectivity" => {
            let r: ProgramExternalRequest = parse(method, body)?;
            port_bindings(&r.options).map(drop)
        }
        "IpamDriver.RequestPool" => parse::<RequestPoolRequest>(method, body).map(drop),
        "IpamDriver.ReleasePool" => parse::<ReleasePoolRequest>(method, body).map(drop),
        "IpamDriver.RequestAddress" => parse::<RequestAddressRequest>(method, body).map(drop),
        "IpamDriver.ReleaseAddress" => parse::<ReleaseAddressRequest>(method, body).map(drop),
        other => Err(CnmError::Invalid(format!("unknown method {other}"))),
    }
}

fn to_value<T: Serialize>(v: T) -> Result<Value> {
    serde_json::to_value(v).map_err(|e| CnmError::Invalid(format!("encoding the answer: {e}")))
}

impl Plugin {
    /// Run one plugin method on a request body; the JSON answer or the error.
    pub async fn dispatch(&self, method: &str, body: &[u8]) -> Result<Value> {
        match method {
            "Plugin.Activate" => {
                // Docker activates its plugins once per start: check what it may have forgotten.
                self.activated.notify_one();
                to_value(super::protocol::ActivateResponse {
                    implements: vec!["NetworkDriver".into(), "IpamDriver".into()],
                })
            }
            "NetworkDriver.GetCapabilities" => to_value(self.capabilities().await),
            "NetworkDriver.CreateNetwork" => {
                to_value(self.create_network(parse(method, body)?).await?)
            }
            "NetworkDriver.DeleteNetwork" => {
                to_value(self.delete_network(parse(method, body)?).await?)
            }
            "NetworkDriver.AllocateNetwork" => {
                to_value(self.allocate_network(parse(method, body)?)?)
            }
            "NetworkDriver.FreeNetwork" => to_value(self.free_network(parse(method, body)?)?),
            "NetworkDriver.CreateEndpoint" => {
                to_value(self.create_endpoint(parse(method, body)?).await?)
            }
            "NetworkDriver.EndpointOperInfo" => {
                to_value(self.endpoint_info(parse(method, body)?).await?)
            }
            "NetworkDriver.DeleteEndpoint" => {
                to_value(self.delete_endpoint(parse(method, body)?).await?)
            }
            "NetworkDriver.Join" => to_value(self.join(parse(method, body)?).await?),
            "NetworkDriver.Leave" => to_value(self.leave(parse(method, body)?).await?),
            "NetworkDriver.DiscoverNew" | "NetworkDriver.DiscoverDelete" => {
                // Node discovery is for multi-host drivers; a local driver only acknowledges it.
                let _: serde_json::Map<String, Value> = parse(method, body)?;
                to_value(super::protocol::Empty {})
            }
            "NetworkDriver.ProgramExternalConnectivity" => {
                to_value(self.program_external(parse(method, body)?).await?)
            }
            "NetworkDriver.RevokeExternalConnectivity" => {
                to_value(self.revoke_external(parse(method, body)?).await?)
            }
            "IpamDriver.GetCapabilities" => to_value(self.ipam_capabilities()),
            "IpamDriver.GetDefaultAddressSpaces" => to_value(self.address_spaces()),
            "IpamDriver.RequestPool" => to_value(self.request_pool(parse(method, body)?).await?),
            "IpamDriver.ReleasePool" => to_value(self.release_pool(parse(method, body)?).await?),
            "IpamDriver.RequestAddress" => {
                to_value(self.request_address(parse(method, body)?).await?)
            }
            "IpamDriver.ReleaseAddress" => {
                to_value(self.release_address(parse(method, body)?).await?)
            }
            other => Err(CnmError::UnknownMethod(other.to_string())),
        }
    }
}

/// The error body libnetwork reads: `Err` from the network driver and from any non-200
/// answer, `Error` from a 200 answer of the IPAM driver.
pub fn error_body(method: &str, status: u16, msg: &str) -> Value {
    let key = if status == 200 && method.starts_with("IpamDriver.") {
        "Error"
    } else {
        "Err"
    };
    let mut m = serde_json::Map::new();
    m.insert(key.into(), Value::String(msg.to_string()));
    Value::Object(m)
}

fn respond(status: u16, body: &Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if let Ok(v) = hyper::header::HeaderValue::from_str(CONTENT_TYPE) {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

async fn handle(
    plugin: Arc<Plugin>,
    req: Request<Incoming>,
) -> std::result::Result<Response<Full<Bytes>>, std::convert::Infallible> {
    let method = req.uri().path().trim_start_matches('/').to_string();
    if req.method() != Method::POST {
        let msg = format!(
            "{} {} : plugin methods are called with POST",
            req.method(),
            req.uri().path()
        );
        return Ok(respond(405, &error_body(&method, 405, &msg)));
    }
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            let msg = format!("reading the request to {method}: {e} (at most {MAX_BODY} bytes)");
            return Ok(respond(400, &error_body(&method, 400, &msg)));
        }
    };
    let started = std::time::Instant::now();
    let out = plugin.dispatch(&method, &body).await;
    plugin.ctl.hold_store_for(DOCKER_BURST);
    // Microseconds: a handler's share of `docker run` is a few hundred of them.
    let us = started.elapsed().as_micros();
    Ok(match out {
        Ok(v) => {
            tracing::debug!(%method, us, "ok");
            respond(200, &v)
        }
        Err(e) => {
            let status = e.status();
            let msg = e.to_string();
            tracing::warn!(%method, status, us, error = %msg, "request failed");
            respond(status, &error_body(&method, status, &msg))
        }
    })
}

/// Accept connections until `shutdown` completes, then let open requests finish (up to a few
/// seconds) and return.
pub async fn run(
    plugin: Arc<Plugin>,
    listener: UnixListener,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut conns = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let p = plugin.clone();
                    let mut stop = stop_rx.clone();
                    conns.spawn(async move {
                        let svc = service_fn(move |req| handle(p.clone(), req));
                        let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), svc);
                        tokio::pin!(conn);
                        let res = tokio::select! {
                            r = conn.as_mut() => r,
                            _ = stop.changed() => {
                                conn.as_mut().graceful_shutdown();
                                conn.as_mut().await
                            }
                        };
                        if let Err(e) = res {
                            tracing::debug!(error = %e, "connection ended with an error");
                        }
                    });
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    let _ = stop_tx.send(true);
    let drained =
        tokio::time::timeout(DRAIN, async { while conns.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tracing::warn!("some plugin requests did not finish in time; abandoning them");
        conns.abort_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_bodies_use_the_key_libnetwork_reads() {
        assert_eq!(
            error_body("NetworkDriver.Join", 200, "x"),
            serde_json::json!({"Err": "x"})
        );
        assert_eq!(
            error_body("IpamDriver.RequestPool", 200, "x"),
            serde_json::json!({"Error": "x"})
        );
        assert_eq!(
            error_body("IpamDriver.RequestPool", 400, "x"),
            serde_json::json!({"Err": "x"})
        );
    }

    #[test]
    fn parse_rejects_empty_and_invalid_bodies() {
        let e = parse::<super::super::protocol::EndpointRequest>("M", b"  ").unwrap_err();
        assert_eq!(e.status(), 400);
        assert!(e.to_string().contains("empty"));
        let e =
            parse::<super::super::protocol::EndpointRequest>("M", b"{\"NetworkID\":").unwrap_err();
        assert_eq!(e.status(), 400);
        assert!(parse::<super::super::protocol::EndpointRequest>("M", b"[]").is_err());
    }
}
