//! The durable log: one trait, with the embedded [`local`] backend and the shared
//! [`jetstream`] backend (a NATS JetStream stream).
//!
//! A backend accepts [`RecordBatch`]es, makes each durable as one frame at the next positions,
//! and then hands the frame to the [`Dispatcher`] — in log order, from one place — so shards
//! apply records in log order. Only after that does the append's [`Completion`] fire.
//! Errors say whether the log is *unavailable* (retry later, HTTP 503) or *corrupt* (never
//! trusted, refuse to start).

pub mod jetstream;
pub mod local;
pub mod overwrite;
pub mod peers;
pub mod spare;
pub mod watch;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use crate::record::{Frame, LogPosition, RecordBatch};
use crate::shard::{Completion, Dispatcher};

/// Why the log could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// The log cannot take writes now (I/O failure, shutting down); nothing was appended.
    #[error("durable log unavailable: {0}")]
    Unavailable(String),
    /// The stored log is damaged somewhere other than a torn tail.
    #[error("log corrupt: {0}")]
    Corrupt(String),
    #[error("log I/O error: {0}")]
    Io(#[from] std::io::Error),
}

/// Work the log runs on its ordering thread between two frames, given the last durable position.
pub type Barrier = Box<dyn FnOnce(LogPosition, &Dispatcher) + Send>;

/// The operations the engine needs from a durable log backend.
pub trait Log: Send + Sync + 'static {
    /// Queues `batch` (waiting while the queue is full). Once durable, the frame is dispatched
    /// to the shards and `completion` fires with its first position or an error.
    fn append(
        &self,
        batch: RecordBatch,
        completion: Arc<Completion>,
    ) -> Pin<Box<dyn Future<Output = Result<(), LogError>> + Send + '_>>;

    /// Runs `barrier` on the ordering thread after every frame queued before it was dispatched.
    fn barrier(&self, barrier: Barrier) -> Result<(), LogError>;

    /// The frame holding `position`, if the log still has it.
    fn read_frame(&self, position: LogPosition) -> Result<Option<Arc<Frame>>, LogError>;

    /// Position of the oldest record still stored.
    fn first_position(&self) -> LogPosition;

    /// Position the next appended record will get.
    fn next_position(&self) -> LogPosition;

    /// Drops stored records that are covered by a snapshot at `covered` and older than
    /// `older_than_ms` (accept time); backends drop whole segments only.
    fn compact(&self, covered: LogPosition, older_than_ms: u64) -> Result<usize, LogError>;

    /// `None` when writes can be taken, else why not.
    fn unavailable_reason(&self) -> Option<String>;

    /// What health reports: [`Log::unavailable_reason`], or a failure of the last write that
    /// does not stop the next from being tried (a full disk).
    fn health_reason(&self) -> Option<String> {
        self.unavailable_reason()
    }

    /// Events other nodes wrote into `namespace` in the last minute up to `now_ms`, as this
    /// node has applied them ([`peers::PeerWrites`]), by when they stop counting; none for a
    /// log only this node writes.
    fn peer_events(&self, namespace: &str, now_ms: u64) -> Vec<peers::Expiring> {
        let _ = (namespace, now_ms);
        Vec::new()
    }

    /// Stops taking appends, finishes the queued ones, and waits for the writer to exit.
    fn close(&self);

    /// Starts dispatching durable frames (after replay): the writer thread, or the tail of a
    /// shared stream.
    fn start(&self, dispatcher: Dispatcher) -> std::io::Result<()>;

    /// The backend's name: `local`, `jetstream`.
    fn kind(&self) -> &'static str;

    /// How commits are made durable on this node's disk, for the start-up line: `overwrite`
    /// or `fdatasync` (local log, once started); `None` where durability is elsewhere.
    fn sync_method(&self) -> Option<&'static str> {
        None
    }

    /// Registers the backend's metrics.
    fn register_metrics(&self, registry: &mut prometheus_client::registry::Registry);
}
