//! Operator and tenant administration: namespaces (auth mode), the runtime config, connector
//! credentials, and the metrics exposition.
//!
//! Invariants: every change goes through the log as a control record, so it survives restarts
//! and reaches every node; a namespace token is returned once and kept only as its SHA-256; a
//! name registered concurrently twice is granted to exactly one caller (the log decides).

use std::time::{SystemTime, UNIX_EPOCH};

use flux_engine::control::{ConfigPatch, ControlChange, Namespace, RuntimeConfig};
use flux_engine::json;
use hyper::StatusCode;
use serde::Deserialize;

use crate::api::Api;
use crate::error::{ApiError, json_response};
use crate::http::{Request, Response, object_body, read_body};
use crate::tenancy::{Caller, new_token, random_id, token_hash};

/// Connectors this build knows. They hold credentials; pulling data comes later.
pub const CONNECTORS: &[(&str, &str)] = &[(
    "github",
    "GitHub: repositories, issues and pull requests, with a personal access token",
)];
/// Largest admin/namespace/connector request body.
const ADMIN_BODY_BYTES: usize = 64 << 10;
/// Bounds of the runtime config's byte limits.
const MIN_BODY_LIMIT_BYTES: u64 = 1024;
const MAX_BODY_LIMIT_BYTES: u64 = 1 << 30;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Checks a namespace name: 3–32 chars of `a-z 0-9 - _`.
pub fn check_namespace_name(name: &str) -> Result<(), ApiError> {
    let valid_chars = name
        .bytes()
        .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_'));
    if (3..=32).contains(&name.len()) && valid_chars {
        Ok(())
    } else {
        Err(ApiError::bad_request(
            "name must be 3-32 characters of a-z 0-9 - _",
        ))
    }
}

fn config_json(config: &RuntimeConfig) -> Vec<u8> {
    // Plain numbers and a bool: serde_json cannot fail on them.
    serde_json::to_vec(config).unwrap_or_default()
}

impl Api {
    /// With auth off the namespace routes do not exist: 404 whatever the method. The router
    /// checks it before any namespace handler runs.
    pub(crate) fn namespaces_enabled(&self) -> Result<(), ApiError> {
        if self.auth.enabled {
            Ok(())
        } else {
            Err(ApiError::not_found(
                "namespaces exist only in auth mode (--auth)",
            ))
        }
    }

    /// `POST /api/namespaces {"name"}`
    pub async fn register_namespace(&self, request: Request) -> Result<Response, ApiError> {
        if self.auth.admin_token.is_some() {
            self.require_admin(&request, true)?;
        }
        #[derive(Deserialize)]
        struct Body {
            name: Option<serde_json::Value>,
        }
        let body = read_body(request, ADMIN_BODY_BYTES, self.request_timeout).await?;
        let body: Body = serde_json::from_str(object_body(&body)?).map_err(|e| {
            ApiError::bad_request(if e.is_data() {
                "body must be a JSON object with a name".to_string()
            } else {
                format!("invalid JSON: {e}")
            })
        })?;
        let name = match body.name {
            Some(serde_json::Value::String(name)) => name,
            Some(_) => return Err(ApiError::bad_request("name must be a string")),
            None => return Err(ApiError::bad_request("name is required")),
        };
        check_namespace_name(&name)?;
        if name == flux_engine::shard::BUILTIN_NAMESPACE
            || self
                .engine
                .with_control(|c| c.namespaces.contains_key(&name))
        {
            return Err(ApiError::conflict(format!("namespace {name:?} is taken")));
        }
        let token = new_token()?;
        let namespace = Namespace {
            name: name.clone(),
            id: format!("ns_{}", random_id(8)?),
            token_sha256: token_hash(&token),
            created_ms: now_ms(),
        };
        let id = namespace.id.clone();
        self.engine
            .append_control(&ControlChange::NamespaceRegistered { namespace })
            .await?;
        // Two concurrent registrations of one name: the first in the log wins.
        let won = self
            .engine
            .with_control(|c| c.namespaces.get(&name).is_some_and(|n| n.id == id));
        if !won {
            return Err(ApiError::conflict(format!("namespace {name:?} is taken")));
        }
        let mut out = Vec::with_capacity(160);
        out.extend_from_slice(b"{\"namespaceId\":");
        json::write_str(&mut out, &id);
        out.extend_from_slice(b",\"name\":");
        json::write_str(&mut out, &name);
        out.extend_from_slice(b",\"token\":");
        json::write_str(&mut out, &token);
        out.push(b'}');
        Ok(json_response(StatusCode::OK, out))
    }

    /// `GET /api/namespaces/<name>`
    pub async fn get_namespace(&self, name: &str) -> Result<Response, ApiError> {
        let Some(namespace) = self
            .engine
            .with_control(|c| c.namespaces.get(name).cloned())
        else {
            return Err(ApiError::not_found(format!("namespace {name:?} not found")));
        };
        let entity_count = self.engine.count_with_prefix(&format!("{name}/")).await;
        let mut out = Vec::with_capacity(160);
        out.extend_from_slice(b"{\"namespaceId\":");
        json::write_str(&mut out, &namespace.id);
        out.extend_from_slice(b",\"name\":");
        json::write_str(&mut out, &namespace.name);
        out.extend_from_slice(b",\"createdAt\":");
        json::write_time_ms(&mut out, namespace.created_ms);
        out.extend_from_slice(b",\"entityCount\":");
        json::write_u64(&mut out, entity_count as u64);
        out.push(b'}');
        Ok(json_response(StatusCode::OK, out))
    }

    /// `DELETE /api/namespaces/<name>` (admin): the name and its token stop working.
    pub async fn delete_namespace(
        &self,
        request: &Request,
        name: &str,
    ) -> Result<Response, ApiError> {
        self.require_admin(request, false)?;
        if !self
            .engine
            .with_control(|c| c.namespaces.contains_key(name))
        {
            return Err(ApiError::not_found(format!("namespace {name:?} not found")));
        }
        self.engine
            .append_control(&ControlChange::NamespaceDeleted {
                name: name.to_string(),
            })
            .await?;
        let mut response = json_response(StatusCode::NO_CONTENT, Vec::new());
        response.headers_mut().remove(hyper::header::CONTENT_TYPE);
        Ok(response)
    }

    /// `GET /api/admin/config`: the admin token, or in auth mode any namespace's token (the
    /// skill script reads the config with its namespace token; only changing it needs the
    /// admin's), or nothing when no admin token is configured.
    pub fn get_config(&self, request: &Request) -> Result<Response, ApiError> {
        let namespace_reader =
            self.auth.enabled && matches!(self.writer(request), Ok(Caller::Namespace(_)));
        if !namespace_reader {
            self.require_admin(request, true)?;
        }
        let config = self.engine.with_control(|c| c.config);
        Ok(json_response(StatusCode::OK, config_json(&config)))
    }

    /// `PUT /api/admin/config`: changes only the fields given.
    pub async fn put_config(&self, request: Request) -> Result<Response, ApiError> {
        self.require_admin(&request, !self.auth.enabled)?;
        let body = read_body(request, ADMIN_BODY_BYTES, self.request_timeout).await?;
        let fields: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&body)
            .map_err(|e| {
                ApiError::bad_request(if e.is_data() {
                    "body must be a JSON object of config fields".to_string()
                } else {
                    format!("invalid JSON: {e}")
                })
            })?;
        let mut patch = ConfigPatch::default();
        for (field, value) in &fields {
            let positive = |min: u64, max: u64| -> Result<u64, ApiError> {
                value
                    .as_u64()
                    .filter(|n| (min..=max).contains(n))
                    .ok_or_else(|| {
                        ApiError::bad_request(format!(
                            "{field} must be an integer from {min} to {max}"
                        ))
                    })
            };
            match field.as_str() {
                "rate_limit_enabled" => {
                    let enabled = value.as_bool().ok_or_else(|| {
                        ApiError::bad_request("rate_limit_enabled must be true or false")
                    })?;
                    patch.rate_limit_enabled = Some(enabled);
                }
                "rate_limit_per_namespace_per_minute" => {
                    patch.rate_limit_per_namespace_per_minute = Some(positive(1, 1 << 40)?);
                }
                "body_size_limit_single_bytes" => {
                    patch.body_size_limit_single_bytes =
                        Some(positive(MIN_BODY_LIMIT_BYTES, MAX_BODY_LIMIT_BYTES)?);
                }
                "body_size_limit_batch_bytes" => {
                    patch.body_size_limit_batch_bytes =
                        Some(positive(MIN_BODY_LIMIT_BYTES, MAX_BODY_LIMIT_BYTES)?);
                }
                other => {
                    return Err(ApiError::bad_request(format!(
                        "unknown config field {other:?}; fields: rate_limit_enabled, \
                         rate_limit_per_namespace_per_minute, body_size_limit_single_bytes, \
                         body_size_limit_batch_bytes"
                    )));
                }
            }
        }
        if patch != ConfigPatch::default() {
            self.engine
                .append_control(&ControlChange::ConfigChanged { patch })
                .await?;
        }
        let config = self.engine.with_control(|c| c.config);
        Ok(json_response(StatusCode::OK, config_json(&config)))
    }

    fn connector_json(&self, out: &mut Vec<u8>, name: &str, description: &str) {
        let sealed = self
            .engine
            .with_control(|c| c.connector_credentials.get(name).cloned());
        // A stored credential is ready only if this server's key opens it: after the key
        // changed it is there but unusable, and says so.
        let (status, error) = match (&self.sealer, &sealed) {
            (None, _) => ("not_configured", None),
            (Some(_), None) => ("needs_token", None),
            (Some(sealer), Some(sealed)) => match sealer.open(sealed) {
                Ok(_) => ("ready", None),
                Err(reason) => (
                    "error",
                    Some(format!(
                        "the stored token cannot be opened with this server's \
                         FLUX_ENCRYPTION_KEY ({reason}); store the token again"
                    )),
                ),
            },
        };
        out.extend_from_slice(b"{\"name\":");
        json::write_str(out, name);
        out.extend_from_slice(b",\"description\":");
        json::write_str(out, description);
        out.extend_from_slice(b",\"status\":");
        json::write_str(out, status);
        out.extend_from_slice(b",\"token_stored\":");
        out.extend_from_slice(if sealed.is_some() { b"true" } else { b"false" });
        if let Some(error) = error {
            out.extend_from_slice(b",\"error\":");
            json::write_str(out, &error);
        }
        out.push(b'}');
    }

    /// `GET /api/connectors`
    pub fn list_connectors(&self) -> Response {
        let mut out = b"{\"connectors\":[".to_vec();
        for (i, (name, description)) in CONNECTORS.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            self.connector_json(&mut out, name, description);
        }
        out.extend_from_slice(b"]}");
        json_response(StatusCode::OK, out)
    }

    fn connector(name: &str) -> Result<&'static (&'static str, &'static str), ApiError> {
        CONNECTORS
            .iter()
            .find(|(n, _)| *n == name)
            .ok_or_else(|| ApiError::not_found(format!("connector {name:?} not found")))
    }

    /// `GET /api/connectors/<name>`
    pub fn get_connector(&self, name: &str) -> Result<Response, ApiError> {
        let (name, description) = Self::connector(name)?;
        let mut out = Vec::with_capacity(160);
        self.connector_json(&mut out, name, description);
        Ok(json_response(StatusCode::OK, out))
    }

    /// `POST /api/connectors/<name>/token {"token"}`: stores the credential sealed.
    pub async fn store_connector_token(
        &self,
        request: Request,
        name: &str,
    ) -> Result<Response, ApiError> {
        let (name, _) = Self::connector(name)?;
        self.require_admin(&request, !self.auth.enabled)?;
        let Some(sealer) = &self.sealer else {
            return Err(ApiError::bad_request(
                "connectors are not_configured: start the server with FLUX_ENCRYPTION_KEY set",
            ));
        };
        #[derive(Deserialize)]
        struct Body {
            token: Option<serde_json::Value>,
        }
        let body = read_body(request, ADMIN_BODY_BYTES, self.request_timeout).await?;
        let body: Body = serde_json::from_str(object_body(&body)?)
            .map_err(|_| ApiError::bad_request("body must be a JSON object with a token"))?;
        let token = match body.token {
            Some(serde_json::Value::String(t)) if !t.is_empty() => t,
            _ => return Err(ApiError::bad_request("token must be a non-empty string")),
        };
        let sealed = sealer.seal(&token).map_err(ApiError::unavailable)?;
        let change = ControlChange::ConnectorCredentialSet {
            connector: name.to_string(),
            sealed,
        };
        self.engine.append_control(&change).await?;
        self.get_connector(name)
    }

    /// `DELETE /api/connectors/<name>/token`
    pub async fn remove_connector_token(
        &self,
        request: &Request,
        name: &str,
    ) -> Result<Response, ApiError> {
        let (name, _) = Self::connector(name)?;
        self.require_admin(request, !self.auth.enabled)?;
        if !self
            .engine
            .with_control(|c| c.connector_credentials.contains_key(*name))
        {
            return Err(ApiError::not_found(format!(
                "connector {name:?} has no stored token"
            )));
        }
        let change = ControlChange::ConnectorCredentialRemoved {
            connector: name.to_string(),
        };
        self.engine.append_control(&change).await?;
        self.get_connector(name)
    }

    /// `GET /metrics`: Prometheus text, or OpenMetrics text when `accept` (the request's
    /// `Accept` header) names it.
    pub async fn metrics_text(&self, accept: &str) -> Response {
        let stats = self.engine.stats().await;
        self.metrics.entities.set(stats.entities as i64);
        self.metrics
            .deleted_entity_ids
            .set(stats.deleted_ids as i64);
        self.metrics
            .log_position
            .set(stats.next_position.saturating_sub(1) as i64);
        let text = crate::metrics::render(&self.registry);
        let (text, content_type) = if accept.contains("application/openmetrics-text") {
            (text, crate::metrics::OPENMETRICS_CONTENT_TYPE)
        } else {
            (
                crate::metrics::to_prometheus_text(&text),
                crate::metrics::PROMETHEUS_CONTENT_TYPE,
            )
        };
        let mut response = json_response(StatusCode::OK, text);
        response.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static(content_type),
        );
        response
    }
}
