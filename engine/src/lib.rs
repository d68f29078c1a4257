//! The Flux engine: everything between "a validated event" and "durable, applied state".
//!
//! It owns the record format ([`record`]), the durable log ([`log`]) and its embedded backend,
//! the shard workers that alone own entity state ([`shard`]) and each entity's history index
//! ([`history`]), snapshots ([`snapshot`]) and the
//! [`Engine`] handle that ingress and egress call. The engine knows nothing of HTTP or WebSocket.
//!
//! Invariants kept here (see `ARCHITECTURE.md`):
//! 1. Only the owning shard touches an entity; reads are answered by the shard.
//! 2. State is a pure function of the log: shards apply records in log order and `lastUpdated`
//!    is the accept time stored in the record.
//! 3. An append completes only after the log made it durable *and* every owning shard applied it.

pub mod alloc;
pub mod control;
pub mod engine;
pub mod entity;
pub mod history;
pub mod json;
pub mod log;
pub mod metrics;
pub mod record;
pub mod shard;
pub mod snapshot;
pub mod threads;

pub use engine::{Engine, EngineConfig, EngineError};
pub use record::{EventFields, LogPosition, RecordBatch};
