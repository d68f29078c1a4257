//! `flux-core/directory`: a built-in entity listing every namespace with its entity count,
//! plus `namespace_count` and `entity_count`, refreshed every [`DIRECTORY_INTERVAL`].
//!
//! It is written through the log like any event (so it replays, and subscribers see it):
//! before a server takes its first request when none is stored (so it exists from then on,
//! even on an empty server), then only when its content changed, so an idle server does not
//! grow its log.

use std::time::Duration;

use flux_engine::record::EventId;
use flux_engine::{EventFields, RecordBatch, json};

use crate::api::Api;

/// The built-in entity's id; its namespace is left out of the listing.
pub const DIRECTORY_ID: &str = "flux-core/directory";
const DIRECTORY_NAMESPACE: &str = flux_engine::shard::BUILTIN_NAMESPACE;
/// How often the directory is recomputed by default (`--directory-interval`).
pub const DIRECTORY_INTERVAL: Duration = Duration::from_secs(3);

impl Api {
    /// The directory's properties as `(name, raw JSON)` pairs, from current state.
    async fn directory_properties(&self) -> Vec<(&'static str, String)> {
        let mut counts = self.engine.namespace_counts().await;
        counts.remove(DIRECTORY_NAMESPACE);
        // Every entity counts in the total, ids without a namespace included (the engine's
        // count leaves the built-in ones out).
        let total = self.engine.stats().await.entities;
        if self.auth.enabled {
            for name in self
                .engine
                .with_control(|c| c.namespaces.keys().cloned().collect::<Vec<_>>())
            {
                counts.entry(name).or_insert(0);
            }
        }
        let mut namespaces = Vec::with_capacity(32 * counts.len() + 2);
        namespaces.push(b'{');
        for (i, (name, count)) in counts.iter().enumerate() {
            if i > 0 {
                namespaces.push(b',');
            }
            json::write_str(&mut namespaces, name);
            namespaces.extend_from_slice(b":{\"entity_count\":");
            json::write_u64(&mut namespaces, *count as u64);
            namespaces.push(b'}');
        }
        namespaces.push(b'}');
        vec![
            (
                "namespaces",
                String::from_utf8(namespaces).unwrap_or_default(),
            ),
            ("namespace_count", counts.len().to_string()),
            ("entity_count", total.to_string()),
        ]
    }

    /// The stored directory's properties, to compare with a fresh computation.
    async fn stored_directory(&self) -> Option<serde_json::Value> {
        let json = self.engine.get(DIRECTORY_ID).await?;
        let mut entity: serde_json::Value = serde_json::from_slice(&json).ok()?;
        Some(entity.get_mut("properties")?.take())
    }

    /// Recomputes the directory every `interval`, the first time one interval after the call
    /// ([`Api::ensure_directory`] runs before the server takes requests).
    pub async fn run_directory(&self, interval: Duration) {
        let start = tokio::time::Instant::now() + interval;
        let mut ticker = tokio::time::interval_at(start, interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            self.refresh_directory().await;
        }
    }

    /// Writes the directory unless one is stored, so the built-in entity exists from a
    /// server's first request on, even on a server that never took a write. A stored one is
    /// brought up to date by the next refresh (a restart alone writes nothing).
    pub async fn ensure_directory(&self) {
        if self.engine.get(DIRECTORY_ID).await.is_none() {
            self.refresh_directory().await;
        }
    }

    /// Writes the directory if it differs from the stored one (also across restarts), so an
    /// idle server does not grow its log.
    pub async fn refresh_directory(&self) {
        let properties = self.directory_properties().await;
        let fresh: serde_json::Map<String, serde_json::Value> = properties
            .iter()
            .filter_map(|(k, v)| Some((k.to_string(), serde_json::from_str(v).ok()?)))
            .collect();
        if self
            .stored_directory()
            .await
            .is_some_and(|stored| stored == serde_json::Value::Object(fresh))
        {
            return;
        }
        let fields = EventFields {
            event_id: EventId::Uuid(uuid::Uuid::now_v7().into_bytes()),
            stream: "flux.directory",
            source: DIRECTORY_NAMESPACE,
            timestamp: flux_engine::engine::now_ms() as i64,
            entity_id: DIRECTORY_ID,
            key: None,
            schema: None,
        };
        let mut batch = RecordBatch::default();
        let pairs = properties.iter().map(|(k, v)| (*k, v.as_str()));
        batch.push_event(self.engine.shard_of(DIRECTORY_ID), &fields, pairs);
        if let Err(error) = self.engine.append(batch).await {
            tracing::warn!(%error, "could not write the directory");
        }
    }
}
