//! Control state: the engine's own state, kept in the log beside the entities — registered
//! namespaces (with the SHA-256 of their tokens, never the tokens), the runtime config, and
//! sealed connector credentials.
//!
//! Invariants: it changes only by applying [`ControlChange`] records, in log order, on the
//! thread that dispatches frames (so a change is visible before its append completes); it is
//! written into every snapshot and restored from it, so it survives restarts like entities do.
//! Applying is deterministic: a namespace name registered twice keeps the first registration.

use std::collections::BTreeMap;

use hashbrown::HashMap;
use serde::{Deserialize, Serialize};

use crate::record::LogPosition;

/// A registered namespace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Namespace {
    pub name: String,
    /// `ns_` plus 8 characters.
    pub id: String,
    /// Hex SHA-256 of the namespace's bearer token.
    pub token_sha256: String,
    pub created_ms: u64,
}

/// Runtime-changeable limits (admin config).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuntimeConfig {
    pub rate_limit_enabled: bool,
    pub rate_limit_per_namespace_per_minute: u64,
    pub body_size_limit_single_bytes: u64,
    pub body_size_limit_batch_bytes: u64,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            rate_limit_enabled: true,
            rate_limit_per_namespace_per_minute: 10_000,
            body_size_limit_single_bytes: 1_048_576,
            body_size_limit_batch_bytes: 10_485_760,
        }
    }
}

/// The fields of a config change; absent fields stay as they are.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigPatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit_enabled: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit_per_namespace_per_minute: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body_size_limit_single_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body_size_limit_batch_bytes: Option<u64>,
}

/// One change to the control state, as stored in a control record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ControlChange {
    NamespaceRegistered {
        namespace: Namespace,
    },
    NamespaceDeleted {
        name: String,
    },
    ConfigChanged {
        patch: ConfigPatch,
    },
    /// A connector credential, sealed (encrypted) by the caller.
    ConnectorCredentialSet {
        connector: String,
        sealed: String,
    },
    ConnectorCredentialRemoved {
        connector: String,
    },
}

/// The engine's own state. See the module docs.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ControlState {
    pub namespaces: BTreeMap<String, Namespace>,
    pub config: RuntimeConfig,
    pub connector_credentials: BTreeMap<String, String>,
    /// Token hash → namespace name; derived from `namespaces`.
    #[serde(skip)]
    tokens: HashMap<String, String>,
    /// Changes at or below this position are already included (from a snapshot).
    #[serde(skip)]
    pub(crate) covered: LogPosition,
}

impl ControlState {
    /// Applies `change` (a record at `position`); changes a snapshot already covers are skipped.
    pub fn apply(&mut self, position: LogPosition, change: ControlChange) {
        if position <= self.covered {
            return;
        }
        match change {
            ControlChange::NamespaceRegistered { namespace } => {
                if !self.namespaces.contains_key(&namespace.name) {
                    self.tokens
                        .insert(namespace.token_sha256.clone(), namespace.name.clone());
                    self.namespaces.insert(namespace.name.clone(), namespace);
                }
            }
            ControlChange::NamespaceDeleted { name } => {
                if let Some(ns) = self.namespaces.remove(&name) {
                    self.tokens.remove(&ns.token_sha256);
                }
            }
            ControlChange::ConfigChanged { patch } => {
                let c = &mut self.config;
                c.rate_limit_enabled = patch.rate_limit_enabled.unwrap_or(c.rate_limit_enabled);
                c.rate_limit_per_namespace_per_minute = patch
                    .rate_limit_per_namespace_per_minute
                    .unwrap_or(c.rate_limit_per_namespace_per_minute);
                c.body_size_limit_single_bytes = patch
                    .body_size_limit_single_bytes
                    .unwrap_or(c.body_size_limit_single_bytes);
                c.body_size_limit_batch_bytes = patch
                    .body_size_limit_batch_bytes
                    .unwrap_or(c.body_size_limit_batch_bytes);
            }
            ControlChange::ConnectorCredentialSet { connector, sealed } => {
                self.connector_credentials.insert(connector, sealed);
            }
            ControlChange::ConnectorCredentialRemoved { connector } => {
                self.connector_credentials.remove(&connector);
            }
        }
    }

    /// The namespace whose token hashes to `token_sha256`.
    pub fn namespace_for_token(&self, token_sha256: &str) -> Option<&Namespace> {
        self.namespaces.get(self.tokens.get(token_sha256)?)
    }

    /// Restores a snapshot's control state, covering positions up to `covered`.
    pub(crate) fn restored(mut self, covered: LogPosition) -> Self {
        self.tokens = self
            .namespaces
            .values()
            .map(|ns| (ns.token_sha256.clone(), ns.name.clone()))
            .collect();
        self.covered = covered;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ns(name: &str, hash: &str) -> ControlChange {
        ControlChange::NamespaceRegistered {
            namespace: Namespace {
                name: name.into(),
                id: format!("ns_{name}"),
                token_sha256: hash.into(),
                created_ms: 1,
            },
        }
    }

    #[test]
    fn first_registration_wins_and_tokens_follow_namespaces() {
        let mut state = ControlState::default();
        state.apply(1, ns("acme", "h1"));
        state.apply(2, ns("acme", "h2"));
        assert_eq!(
            state.namespace_for_token("h1").map(|n| n.id.as_str()),
            Some("ns_acme")
        );
        assert!(state.namespace_for_token("h2").is_none());
        let json = serde_json::to_string(&state).expect("serialize");
        let restored: ControlState = serde_json::from_str(&json).expect("parse");
        let mut restored = restored.restored(2);
        assert!(restored.namespace_for_token("h1").is_some());
        restored.apply(
            2,
            ControlChange::NamespaceDeleted {
                name: "acme".into(),
            },
        );
        assert!(
            restored.namespaces.contains_key("acme"),
            "covered changes are skipped"
        );
        restored.apply(
            3,
            ControlChange::NamespaceDeleted {
                name: "acme".into(),
            },
        );
        assert!(restored.namespace_for_token("h1").is_none());
    }

    #[test]
    fn config_patch_changes_only_given_fields_and_round_trips() {
        let mut state = ControlState::default();
        let patch = ConfigPatch {
            rate_limit_per_namespace_per_minute: Some(5),
            ..Default::default()
        };
        let change = ControlChange::ConfigChanged { patch };
        let json = serde_json::to_string(&change).expect("serialize");
        assert_eq!(
            json,
            r#"{"type":"config_changed","patch":{"rate_limit_per_namespace_per_minute":5}}"#
        );
        state.apply(1, serde_json::from_str(&json).expect("parse"));
        assert_eq!(state.config.rate_limit_per_namespace_per_minute, 5);
        assert!(state.config.rate_limit_enabled);
        assert_eq!(state.config.body_size_limit_single_bytes, 1_048_576);
    }
}
