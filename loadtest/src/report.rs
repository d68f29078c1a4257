//! Measurements and their machine-readable form: latency histograms (microseconds), error
//! counts keyed by status, and the one JSON object a run prints.
//!
//! Invariant: stdout carries exactly one JSON object per run, written by [`emit`]; everything
//! else goes to stderr.

use std::collections::BTreeMap;
use std::io::Write;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// Highest latency a histogram records (one hour, in µs); above it values saturate.
const MAX_LATENCY_US: u64 = 3_600_000_000;

/// A latency histogram in microseconds with 3 significant digits.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("static histogram bounds are valid")
}

/// Records `micros`, clamped into the histogram's range (0 counts as 1 µs).
pub fn record(histogram: &mut Histogram<u64>, micros: u64) {
    histogram.saturating_record(micros.clamp(1, MAX_LATENCY_US));
}

/// `{"p50","p99","p999","max","count"}` of a histogram, in µs.
pub fn latency_json(histogram: &Histogram<u64>) -> Value {
    if histogram.is_empty() {
        return json!({"p50": 0, "p99": 0, "p999": 0, "max": 0, "count": 0});
    }
    json!({
        "p50": histogram.value_at_quantile(0.50),
        "p99": histogram.value_at_quantile(0.99),
        "p999": histogram.value_at_quantile(0.999),
        "max": histogram.max(),
        "count": histogram.len(),
    })
}

/// A histogram as (value, count) pairs of its non-empty buckets, to cross a process boundary.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Buckets(pub Vec<(u64, u64)>);

impl Buckets {
    pub fn from_histogram(histogram: &Histogram<u64>) -> Buckets {
        Buckets(
            histogram
                .iter_recorded()
                .map(|v| (v.value_iterated_to(), v.count_at_value()))
                .collect(),
        )
    }

    pub fn add_to(&self, histogram: &mut Histogram<u64>) {
        for &(value, count) in &self.0 {
            histogram.saturating_record_n(value.clamp(1, MAX_LATENCY_US), count);
        }
    }
}

/// Failed requests by cause: an HTTP status (`"400"`), `"transport"` or `"timeout"`.
#[derive(Debug, Default, Clone)]
pub struct Errors(BTreeMap<String, u64>);

impl Errors {
    pub fn add(&mut self, key: &str, count: u64) {
        if let Some(n) = self.0.get_mut(key) {
            *n += count;
        } else {
            self.0.insert(key.to_string(), count);
        }
    }

    pub fn add_status(&mut self, status: u16) {
        self.add(&status.to_string(), 1);
    }

    pub fn merge(&mut self, other: &Errors) {
        for (key, n) in &other.0 {
            self.add(key, *n);
        }
    }

    pub fn to_json(&self) -> Value {
        json!(self.0)
    }
}

/// The keys a result starts with, in this order; the rest follow alphabetically.
const LEADING_KEYS: [&str; 8] = [
    "scenario",
    "params",
    "duration_s",
    "requests",
    "events",
    "throughput_events_per_s",
    "latency_us",
    "errors_by_status",
];

/// Writes the run's result as one line of JSON on stdout, core fields first.
pub fn emit(result: &Value) -> anyhow::Result<()> {
    let line = render(result)?;
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(line.as_bytes())?;
    stdout.write_all(b"\n")?;
    stdout.flush()?;
    Ok(())
}

fn render(result: &Value) -> anyhow::Result<String> {
    let Some(object) = result.as_object() else {
        return Ok(serde_json::to_string(result)?);
    };
    let leading = LEADING_KEYS.iter().filter_map(|k| object.get_key_value(*k));
    let rest = object
        .iter()
        .filter(|(k, _)| !LEADING_KEYS.contains(&k.as_str()));
    let mut line = String::from("{");
    for (i, (key, value)) in leading.chain(rest).enumerate() {
        if i > 0 {
            line.push(',');
        }
        line.push_str(&serde_json::to_string(key)?);
        line.push(':');
        line.push_str(&serde_json::to_string(value)?);
    }
    line.push('}');
    Ok(line)
}

/// Rounds to 3 decimals for readable seconds and rates.
pub fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Rounds to 6 significant digits, for ratios: a small one stays non-zero (`3.33333e-7`).
pub fn round_significant6(x: f64) -> f64 {
    if !x.is_finite() || x == 0.0 {
        return x;
    }
    format!("{x:.5e}").parse().unwrap_or(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_round_trip() {
        let mut histogram = new_histogram();
        for v in [1, 5, 5, 100, 12_345, 9_999_999] {
            record(&mut histogram, v);
        }
        let buckets = Buckets::from_histogram(&histogram);
        let mut copy = new_histogram();
        buckets.add_to(&mut copy);
        assert_eq!(copy.len(), histogram.len());
        assert_eq!(copy.max(), histogram.max());
        assert_eq!(
            copy.value_at_quantile(0.5),
            histogram.value_at_quantile(0.5)
        );
    }

    #[test]
    fn renders_core_fields_first() {
        let result = json!({"zeta": 1, "events": 2, "scenario": "x", "alpha": [3]});
        let line = render(&result).unwrap();
        assert_eq!(line, r#"{"scenario":"x","events":2,"alpha":[3],"zeta":1}"#);
        assert_eq!(serde_json::from_str::<Value>(&line).unwrap(), result);
    }

    #[test]
    fn ratios_keep_six_significant_digits() {
        assert_eq!(round_significant6(1.0 / 3.0), 0.333333);
        assert_eq!(round_significant6(2.0 / 3.0e7), 6.66667e-8);
        assert_eq!(round_significant6(0.0), 0.0);
        assert_eq!(round_significant6(1.0), 1.0);
        assert_eq!(json!(round_significant6(1.0 / 7.0)).to_string(), "0.142857");
    }

    #[test]
    fn errors_merge_by_key() {
        let mut a = Errors::default();
        a.add_status(400);
        a.add("transport", 2);
        let mut b = Errors::default();
        b.add_status(400);
        a.merge(&b);
        assert_eq!(a.to_json(), json!({"400": 2, "transport": 2}));
    }
}
