//! Ingress metrics and the `GET /metrics` exposition (via prometheus-client).
//!
//! Every component registers its own metrics into one [`Registry`] at start-up; gauges that
//! mirror engine state (entities) are refreshed when scraped. Scraping never blocks ingest.
//! The exposition is the Prometheus text format (0.0.4), or OpenMetrics text for a scraper
//! that asks for it in `Accept` (as Prometheus itself does).

use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Why a request or event was refused.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Reason {
    pub reason: String,
}

/// Counters and histograms of the HTTP write path.
pub struct IngressMetrics {
    pub events_accepted: Counter,
    /// Refused events (per item for batches) and refused write requests, by reason.
    pub events_rejected: Family<Reason, Counter>,
    pub rate_limited_requests: Counter,
    /// Time from request start to reply for event writes (durable and applied).
    pub ingest_latency_seconds: Histogram,
    /// Refreshed at scrape time from the engine.
    pub entities: Gauge,
    pub deleted_entity_ids: Gauge,
    pub log_position: Gauge,
}

impl IngressMetrics {
    /// Creates the metrics and registers them under `flux_`.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = IngressMetrics {
            events_accepted: Counter::default(),
            events_rejected: Family::default(),
            rate_limited_requests: Counter::default(),
            // 20 µs .. ~5 s
            ingest_latency_seconds: Histogram::new(exponential_buckets(0.00002, 2.0, 18)),
            entities: Gauge::default(),
            deleted_entity_ids: Gauge::default(),
            log_position: Gauge::default(),
        };
        registry.register(
            "flux_events_accepted",
            "Events accepted (durable)",
            metrics.events_accepted.clone(),
        );
        registry.register(
            "flux_events_rejected",
            "Events or write requests refused, by reason",
            metrics.events_rejected.clone(),
        );
        registry.register(
            "flux_rate_limited_requests",
            "Write requests refused by a namespace rate limit",
            metrics.rate_limited_requests.clone(),
        );
        registry.register(
            "flux_ingest_latency_seconds",
            "Event write requests, from arrival to the durable reply",
            metrics.ingest_latency_seconds.clone(),
        );
        registry.register(
            "flux_entities",
            "Entities in state",
            metrics.entities.clone(),
        );
        registry.register(
            "flux_deleted_entity_ids",
            "Deleted entities whose ids and history are held until retention drops their log records",
            metrics.deleted_entity_ids.clone(),
        );
        registry.register(
            "flux_log_position",
            "Position of the newest log record",
            metrics.log_position.clone(),
        );
        metrics
    }

    /// Counts `n` events refused as invalid (batch items).
    pub fn count_rejected(&self, n: u64) {
        if n > 0 {
            self.reject("invalid", n);
        }
    }

    pub fn reject(&self, reason: &str, n: u64) {
        self.events_rejected
            .get_or_create(&Reason {
                reason: reason.to_string(),
            })
            .inc_by(n);
    }

    /// Records a finished event write that started at `started` with `status`.
    pub fn observe_write(&self, started: Instant, status: hyper::StatusCode) {
        if status.is_success() {
            self.ingest_latency_seconds
                .observe(started.elapsed().as_secs_f64());
            return;
        }
        let reason = match status.as_u16() {
            400 => "invalid",
            401 => "unauthorized",
            403 => "forbidden",
            413 => "too_large",
            429 => "rate_limited",
            503 => "unavailable",
            _ => "other",
        };
        self.reject(reason, 1);
    }
}

/// Content type of the OpenMetrics text [`render`] writes.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// Content type of the Prometheus text [`to_prometheus_text`] writes.
pub const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Renders `registry` as OpenMetrics text.
pub fn render(registry: &Registry) -> String {
    let mut out = String::with_capacity(8 << 10);
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, registry);
    out
}

/// Rewrites OpenMetrics text (as [`render`] writes it) into the Prometheus text format: a
/// counter family is named by its sample (`# TYPE x_total counter` where OpenMetrics writes
/// `# TYPE x counter`), and the `# EOF` and `# UNIT` lines, which that format has no place
/// for, are left out. Samples and every other line stay as they are.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let mut counters = std::collections::HashSet::new();
    for line in openmetrics.lines() {
        if let Some(name) = line
            .strip_prefix("# TYPE ")
            .and_then(|rest| rest.strip_suffix(" counter"))
        {
            counters.insert(name);
        }
    }
    let mut out = String::with_capacity(openmetrics.len() + 8 * counters.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let family = ["# HELP ", "# TYPE "].into_iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let name = rest.split(' ').next()?;
            counters
                .contains(name)
                .then(|| (prefix, name, &rest[name.len()..]))
        });
        match family {
            Some((prefix, name, rest)) => {
                out.push_str(prefix);
                out.push_str(name);
                out.push_str("_total");
                out.push_str(rest);
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::to_prometheus_text;

    #[test]
    fn counters_are_named_by_their_samples_and_eof_goes() {
        let open = "# HELP flux_a Things.\n# TYPE flux_a counter\nflux_a_total 3\n\
                    # HELP flux_b Level.\n# TYPE flux_b gauge\n# UNIT flux_b bytes\nflux_b 7\n\
                    # HELP flux_c Spread.\n# TYPE flux_c histogram\nflux_c_bucket{le=\"1.0\"} 1\n\
                    flux_c_sum 0.5\nflux_c_count 1\n# EOF\n";
        assert_eq!(
            to_prometheus_text(open),
            "# HELP flux_a_total Things.\n# TYPE flux_a_total counter\nflux_a_total 3\n\
             # HELP flux_b Level.\n# TYPE flux_b gauge\nflux_b 7\n\
             # HELP flux_c Spread.\n# TYPE flux_c histogram\nflux_c_bucket{le=\"1.0\"} 1\n\
             flux_c_sum 0.5\nflux_c_count 1\n"
        );
    }
}
