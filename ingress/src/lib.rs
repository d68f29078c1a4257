//! Flux ingress: the HTTP/1.1 API on hyper and tokio.
//!
//! The path of a request: [`serve`] accepts a connection → [`route`] picks the handler by
//! method and path → [`api::Api`] reads the body within its limit ([`http::read_body`]),
//! parses and validates ([`event`]), appends to the engine, and answers. Errors are
//! [`error::ApiError`]s, rendered once as `{"error": ...}`; every response carries CORS headers.
//!
//! Invariants: nothing here holds entity state (the engine's shards do); a write is answered
//! only after the engine reports it durable and applied; bad input never yields a 500.

pub mod admin;
pub mod api;
pub mod directory;
pub mod error;
pub mod event;
pub mod http;
pub mod io;
pub mod metrics;
pub mod scan;
pub mod sealer;
pub mod tenancy;

use std::future::Future;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use hyper::Method;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioTimer;
use tokio::net::TcpListener;

pub use api::{Api, WebSocketHandler};
use error::ApiError;
use http::{Request, Response, add_cors, decode_path, preflight};

/// How long shutdown waits for in-flight requests before closing connections anyway.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

const ENTITIES: &str = "/api/state/entities";

/// Routes one request to its handler. An answer to a request whose body its handler did not
/// read to the end (refused before reading it, or cut off) says `Connection: close`, and its
/// connection drains what the client still sends before it closes (`linger`): the client learns
/// not to reuse the connection, and reads its answer instead of a reset.
pub async fn route(api: Arc<Api>, request: Request) -> Response {
    let has_body = http::declares_body(&request);
    http::body_read_starts();
    let mut response = dispatch(&api, request)
        .await
        .unwrap_or_else(ApiError::into_response);
    if has_body && !http::body_was_read() {
        response.headers_mut().insert(
            hyper::header::CONNECTION,
            hyper::header::HeaderValue::from_static("close"),
        );
        http::note_answered_unread();
    }
    add_cors(&mut response);
    response
}

async fn dispatch(api: &Api, request: Request) -> Result<Response, ApiError> {
    http::refuse_framing(&request)?;
    let method = request.method().clone();
    if method == Method::OPTIONS {
        return Ok(preflight());
    }
    // HEAD is answered as GET would be; hyper leaves the body out and keeps its length.
    let head = method == Method::HEAD;
    let asked = method.clone();
    let method = if head { Method::GET } else { method };
    let path = request.uri().path().to_string();
    match path.as_str() {
        "/api/events" => match method {
            Method::POST => observe_write(api, api.publish(request)).await,
            Method::GET => api.history(request).await,
            _ => Err(ApiError::method_not_allowed("GET, HEAD, POST")),
        },
        "/api/events/batch" => match method {
            Method::POST => observe_write(api, api.publish_batch(request)).await,
            _ => Err(ApiError::method_not_allowed("POST")),
        },
        "/api/state/entities" | "/api/state/entities/" => match method {
            Method::GET => api.list(&request),
            _ => Err(ApiError::method_not_allowed("GET, HEAD")),
        },
        "/api/state/entities/delete" if method == Method::POST => api.batch_delete(request).await,
        "/api/ws" => match (&method, &api.websocket) {
            (&Method::GET, Some(upgrade)) if !head => Ok(upgrade(request)),
            // HEAD gets the head of GET's answer to a plain request (426), never an upgrade.
            (&Method::GET, Some(upgrade)) => {
                let mut request = request;
                request.headers_mut().remove(hyper::header::UPGRADE);
                Ok(upgrade(request))
            }
            (&Method::GET, None) => Err(ApiError::not_found("WebSocket is not enabled")),
            _ => Err(ApiError::method_not_allowed("GET")),
        },
        "/api/health" => match method {
            Method::GET => Ok(api.health().await),
            _ => Err(ApiError::method_not_allowed("GET, HEAD")),
        },
        "/metrics" => match method {
            Method::GET => {
                let accept = request
                    .headers()
                    .get(hyper::header::ACCEPT)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default();
                Ok(api.metrics_text(accept).await)
            }
            _ => Err(ApiError::method_not_allowed("GET, HEAD")),
        },
        "/api/namespaces" => {
            api.namespaces_enabled()?;
            match method {
                Method::POST => api.register_namespace(request).await,
                _ => Err(ApiError::method_not_allowed("POST")),
            }
        }
        "/api/admin/config" => match method {
            Method::GET => api.get_config(&request),
            Method::PUT => api.put_config(request).await,
            _ => Err(ApiError::method_not_allowed("GET, HEAD, PUT")),
        },
        "/api/connectors" => match method {
            Method::GET => Ok(api.list_connectors()),
            _ => Err(ApiError::method_not_allowed("GET, HEAD")),
        },
        _ => {
            if let Some(raw_id) = path
                .strip_prefix(ENTITIES)
                .and_then(|p| p.strip_prefix('/'))
            {
                let id = decode_path(raw_id, "entity id")?;
                return match method {
                    Method::GET => api.get(&id).await,
                    Method::DELETE => observe_write(api, api.delete(&request, &id)).await,
                    // `…/entities/delete` is also the batch delete's route.
                    _ if raw_id == "delete" => {
                        Err(ApiError::method_not_allowed("GET, HEAD, DELETE, POST"))
                    }
                    _ => Err(ApiError::method_not_allowed("GET, HEAD, DELETE")),
                };
            }
            if let Some(raw) = path.strip_prefix("/api/namespaces/") {
                api.namespaces_enabled()?;
                let name = decode_path(raw, "namespace name")?;
                return match method {
                    Method::GET => api.get_namespace(&name).await,
                    Method::DELETE => api.delete_namespace(&request, &name).await,
                    _ => Err(ApiError::method_not_allowed("GET, HEAD, DELETE")),
                };
            }
            if let Some(rest) = path.strip_prefix("/api/connectors/") {
                // The `/token` suffix is matched before decoding, so an encoded `%2Ftoken`
                // stays part of the name.
                let (raw, token) = match rest.strip_suffix("/token") {
                    Some(raw) => (raw, true),
                    None => (rest, false),
                };
                let name = decode_path(raw, "connector name")?;
                return match (token, method) {
                    (true, Method::POST) => api.store_connector_token(request, &name).await,
                    (true, Method::DELETE) => api.remove_connector_token(&request, &name).await,
                    (true, _) => Err(ApiError::method_not_allowed("POST, DELETE")),
                    (false, Method::GET) => api.get_connector(&name),
                    (false, _) => Err(ApiError::method_not_allowed("GET, HEAD")),
                };
            }
            Err(ApiError::not_found(format!("no route for {asked} {path}")))
        }
    }
}

/// Runs an event write, recording its latency or the reason it was refused.
async fn observe_write(
    api: &Api,
    write: impl Future<Output = Result<Response, ApiError>>,
) -> Result<Response, ApiError> {
    let started = std::time::Instant::now();
    let result = write.await;
    let status = match &result {
        Ok(response) => response.status(),
        Err(error) => error.status,
    };
    api.metrics.observe_write(started, status);
    result
}

/// How long a stopping server waits for hyper to read a request that has arrived on a
/// connection but is not read yet ([`serve_arrived_requests`]).
const ARRIVED_GRACE: Duration = Duration::from_millis(200);

/// Runs `connection` until hyper has read what its socket (`fd`) holds, up to
/// [`ARRIVED_GRACE`]; returns whether the connection ended meanwhile. Telling hyper to shut
/// down closes an idle connection at once, and closing a socket with unread bytes answers the
/// client with a reset: a request already sent when the server stopped would be lost from the
/// client's side. Once hyper has read it, the connection is not idle, and a graceful shutdown
/// finishes that request (answered with `connection: close`) before it closes.
async fn serve_arrived_requests<C: Future>(mut connection: Pin<&mut C>, fd: RawFd) -> bool {
    let read_or_ended = std::future::poll_fn(|cx| {
        if connection.as_mut().poll(cx).is_ready() {
            return Poll::Ready(true);
        }
        // Pending with bytes unread: hyper is waiting for the socket and is woken with it.
        if io::unread_bytes(fd) {
            Poll::Pending
        } else {
            Poll::Ready(false)
        }
    });
    tokio::time::timeout(ARRIVED_GRACE, read_or_ended)
        .await
        .unwrap_or(false)
}

/// Serves the API on `listener` until `shutdown` resolves, then stops accepting, lets in-flight
/// requests finish (up to [`SHUTDOWN_GRACE`]) and returns.
pub async fn serve(listener: TcpListener, api: Arc<Api>, shutdown: impl Future<Output = ()>) {
    // Each connection task holds a clone of `alive`; when all are dropped, `drained` ends.
    let (stop, stopping) = tokio::sync::watch::channel(false);
    let (alive, mut drained) = tokio::sync::mpsc::channel::<()>(1);
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(api.request_timeout)
        .keep_alive(true);
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(error) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let fd = stream.as_raw_fd();
        let io = io::ApiIo::new(stream, api.request_timeout);
        let api = api.clone();
        let service = service_fn(move |request| {
            let api = api.clone();
            async move { Ok::<_, std::convert::Infallible>(route(api, request).await) }
        });
        let connection = builder.serve_connection(io, service).with_upgrades();
        let (alive, mut stopping) = (alive.clone(), stopping.clone());
        let state = http::ConnectionState::default();
        tokio::spawn(http::CONNECTION.scope(state, async move {
            tokio::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                _ = stopping.changed() => {
                    if !serve_arrived_requests(connection.as_mut(), fd).await {
                        connection.as_mut().graceful_shutdown();
                        let _ = connection.await;
                    }
                }
            }
            drop(alive);
        }));
    }
    drop(listener);
    let _ = stop.send(true);
    drop(alive);
    tokio::select! {
        _ = drained.recv() => {}
        () = tokio::time::sleep(SHUTDOWN_GRACE) => {
            tracing::warn!("in-flight requests did not finish within the grace period");
        }
    }
}
