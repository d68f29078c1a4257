//! Flux egress: WebSocket subscriptions and serialize-once fan-out.
//!
//! Claim: every applied change reaches every matching subscriber in log order per entity, its
//! frames encoded once and shared by reference; a slow or dead client can neither grow server
//! memory without bound nor slow anyone else (its bounded queue overflows and it is closed with
//! 1008). Evidence: the black-box tests in `tests/websocket.rs` and the runs in `perf/`.
//!
//! The path of a change: a shard applies a record → [`hub::Hub`] (the engine's
//! `ChangeObserver`) looks up matching connections in the [`index`] → builds the frames once
//! ([`frame`]) → pushes handles onto each [`connection`]'s bounded queue, or, for connections
//! subscribed to `*`, appends them once to the [`stream`] → each connection's writer task
//! sends what is queued and what it has not sent of the stream with vectored writes (under
//! heavy fan-out, the [`sweep`] thread sends the stream to the `*` connections instead).

pub mod connection;
pub mod frame;
pub mod hub;
pub mod index;
pub mod stream;
pub mod sweep;

pub use hub::Hub;
