//! The engine's metrics: durable-log write costs, for the `/metrics` exposition.
//! Observed by the log writer once per group commit, so they cost nothing per event.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Metrics of the local log's writer.
pub struct LogMetrics {
    /// `write` + `fdatasync` of one group commit.
    pub append_seconds: Histogram,
    /// The `fdatasync` alone.
    pub fsync_seconds: Histogram,
    /// Records made durable by one group commit.
    pub group_records: Histogram,
    pub records_appended: Counter,
    pub bytes_appended: Counter,
}

impl Default for LogMetrics {
    fn default() -> Self {
        LogMetrics {
            // 10 µs .. ~2.6 s
            append_seconds: Histogram::new(exponential_buckets(0.00001, 2.0, 19)),
            fsync_seconds: Histogram::new(exponential_buckets(0.00001, 2.0, 19)),
            group_records: Histogram::new(exponential_buckets(1.0, 4.0, 10)),
            records_appended: Counter::default(),
            bytes_appended: Counter::default(),
        }
    }
}

impl LogMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "flux_log_append_seconds",
            "Write plus fdatasync of one group commit",
            self.append_seconds.clone(),
        );
        registry.register(
            "flux_log_fsync_seconds",
            "fdatasync of one group commit",
            self.fsync_seconds.clone(),
        );
        registry.register(
            "flux_log_group_commit_records",
            "Records made durable by one group commit",
            self.group_records.clone(),
        );
        registry.register(
            "flux_log_records_appended",
            "Records appended to the durable log",
            self.records_appended.clone(),
        );
        registry.register(
            "flux_log_bytes_appended",
            "Bytes appended to the durable log",
            self.bytes_appended.clone(),
        );
    }
}
