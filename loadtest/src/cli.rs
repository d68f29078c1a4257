//! The command line: one subcommand per scenario, each with its own flags.
//!
//! Every args struct is also `Serialize`, so a run's result echoes exactly the parameters it ran
//! with under `"params"`. Defaults live here and only here.

use clap::{Args, Parser, Subcommand};
use serde::Serialize;

/// A count that must be at least 1 (connections, subscribers, events per batch, ...).
fn count(text: &str) -> Result<u64, String> {
    match text.parse::<u64>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("{text:?} is not a whole number")),
    }
}

fn count_usize(text: &str) -> Result<usize, String> {
    count(text).and_then(|n| usize::try_from(n).map_err(|_| "too large".into()))
}

/// Seconds: finite, not negative, at most ~115 days.
fn seconds(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(s) if s.is_finite() && (0.0..=1e7).contains(&s) => Ok(s),
        Ok(_) => Err("must be between 0 and 10000000 seconds".into()),
        Err(_) => Err(format!("{text:?} is not a number of seconds")),
    }
}

/// Seconds a run lasts: as [`seconds`], and above 0 (a run of no time measures nothing).
fn positive_seconds(text: &str) -> Result<f64, String> {
    match seconds(text)? {
        0.0 => Err("must be more than 0 seconds".into()),
        s => Ok(s),
    }
}

/// A server URL, checked before anything runs (resolving it comes later).
fn url(text: &str) -> Result<String, String> {
    crate::http::parse_url(text).map(|_| text.to_string())
}

/// The namespace a run writes into: the part of every entity id before its first `/`. Written
/// into JSON as is, so quotes, backslashes and control characters are refused, as are `/`, `*`
/// and spaces.
fn namespace(text: &str) -> Result<String, String> {
    let refused = |c: char| c.is_control() || c.is_whitespace() || "/*\\\"".contains(c);
    if text.is_empty() || text.len() > 128 {
        Err("must be 1 to 128 bytes".into())
    } else if let Some(c) = text.chars().find(|&c| refused(c)) {
        Err(format!("{c:?} is not allowed in a namespace"))
    } else {
        Ok(text.to_string())
    }
}

/// A rate per second: finite and above 0.
fn rate(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(r) if r.is_finite() && r > 0.0 => Ok(r),
        Ok(_) => Err("must be a positive number per second".into()),
        Err(_) => Err(format!("{text:?} is not a number")),
    }
}

#[derive(Debug, Parser)]
#[command(
    name = "flux-loadtest",
    version,
    about = "Load generator for the Flux world-state server. Prints one JSON result on stdout."
)]
pub struct Cli {
    #[command(subcommand)]
    pub scenario: Scenario,
}

#[derive(Debug, Subcommand)]
pub enum Scenario {
    /// Single-event POSTs to /api/events over keep-alive connections.
    Ingest(IngestArgs),
    /// POST /api/events/batch with --batch events per request.
    IngestBatch(IngestArgs),
    /// A simulated IoT fleet: devices with drifting sensors reporting on an interval.
    Fleet(FleetArgs),
    /// WebSocket subscribers on a pattern while a publisher posts at a fixed rate.
    E2e(DeliveryArgs),
    /// Many subscribers on `*` (over several processes when needed): frames/s, loss, lag.
    Fanout(DeliveryArgs),
    /// Idle subscribers held open; with --server-pid, reports server memory per connection.
    Connections(ConnectionsArgs),
    /// Populate events, restart the server, time until the last event is readable again.
    Recovery(RecoveryArgs),
    /// Internal: one process's share of a fanout or connections run.
    #[command(hide = true)]
    FanoutWorker(WorkerArgs),
}

impl Scenario {
    /// The scenario's name, as given on the command line and in its result.
    pub fn name(&self) -> &'static str {
        match self {
            Scenario::Ingest(_) => "ingest",
            Scenario::IngestBatch(_) => "ingest-batch",
            Scenario::Fleet(_) => "fleet",
            Scenario::E2e(_) => "e2e",
            Scenario::Fanout(_) => "fanout",
            Scenario::Connections(_) => "connections",
            Scenario::Recovery(_) => "recovery",
            Scenario::FanoutWorker(_) => "fanout-worker",
        }
    }

    /// The flags every scenario shares; none for the hidden worker.
    pub fn common(&self) -> Option<&CommonArgs> {
        match self {
            Scenario::Ingest(args) | Scenario::IngestBatch(args) => Some(&args.common),
            Scenario::Fleet(args) => Some(&args.common),
            Scenario::E2e(args) | Scenario::Fanout(args) => Some(&args.common),
            Scenario::Connections(args) => Some(&args.common),
            Scenario::Recovery(args) => Some(&args.common),
            Scenario::FanoutWorker(_) => None,
        }
    }

    /// The flags as given (defaults included), for the result of a run that fails before it
    /// has one of its own. A scenario may settle some (e2e's pattern) in its own `params`.
    pub fn params(&self) -> serde_json::Value {
        let params = match self {
            Scenario::Ingest(args) | Scenario::IngestBatch(args) => serde_json::to_value(args),
            Scenario::Fleet(args) => serde_json::to_value(args),
            Scenario::E2e(args) | Scenario::Fanout(args) => serde_json::to_value(args),
            Scenario::Connections(args) => serde_json::to_value(args),
            Scenario::Recovery(args) => serde_json::to_value(args),
            Scenario::FanoutWorker(args) => serde_json::to_value(args),
        };
        params.unwrap_or(serde_json::Value::Null)
    }
}

/// Flags every scenario shares.
#[derive(Debug, Clone, Args, Serialize)]
pub struct CommonArgs {
    /// Base URL of the server.
    #[arg(long, env = "FLUX_URL", default_value = "http://127.0.0.1:3000", value_parser = url)]
    pub url: String,
    /// Bearer token sent with every HTTP request (a server in auth mode: a namespace token, or
    /// the admin token). Never echoed in the result.
    #[arg(long, env = "FLUX_TOKEN", hide_env_values = true)]
    #[serde(skip)]
    pub token: Option<String>,
    /// Server process id: sample its CPU time and RSS from /proc before and after (a process
    /// not named `flux` is warned about).
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Worker threads of the generator's runtime (default: available cores).
    #[arg(long, value_parser = count_usize)]
    pub threads: Option<usize>,
    /// PEM certificates to trust for an `https://` URL, besides the system's roots (a private
    /// CA or a self-signed certificate).
    #[arg(long)]
    pub ca_cert: Option<std::path::PathBuf>,
}

/// How long a rate scenario runs.
#[derive(Debug, Clone, Args, Serialize)]
pub struct TimingArgs {
    /// Measured seconds.
    #[arg(long, default_value_t = 10.0, value_parser = positive_seconds)]
    pub duration: f64,
    /// Seconds of load before measuring starts (not counted in the measured figures; the
    /// result's `total` counts them).
    #[arg(long, default_value_t = 1.0, value_parser = seconds)]
    pub warmup: f64,
}

/// How requests are issued: connections, pacing, and what counts as late.
#[derive(Debug, Clone, Args, Serialize)]
pub struct LoadArgs {
    /// Keep-alive HTTP connections (one request in flight each).
    #[arg(long, short = 'c', default_value_t = 16, value_parser = count_usize)]
    pub connections: usize,
    /// Open loop: requests are due at this many events per second. Without it: closed loop.
    #[arg(long, value_parser = rate)]
    pub rate: Option<f64>,
    /// Open loop only (with --rate): requests due but not yet started beyond this many are
    /// dropped.
    #[arg(long, value_parser = count)]
    pub max_in_flight: Option<u64>,
    /// Open loop only (with --rate): a request this far behind schedule is dropped instead of
    /// sent [default: 1000].
    #[arg(long)]
    pub drop_after_ms: Option<u64>,
    /// Open loop only (with --rate): a request started this far behind schedule is counted as
    /// late [default: 10].
    #[arg(long)]
    pub late_ms: Option<u64>,
    /// A request without a response after this long is a `timeout` error.
    #[arg(long, default_value_t = 10_000, value_parser = count)]
    pub timeout_ms: u64,
}

impl LoadArgs {
    /// Refuses the open-loop flags without `--rate` (a closed loop has no schedule to be
    /// behind), and fills in their defaults with it, so that `params` echoes what ran.
    pub fn settle_open_loop(&mut self) -> Result<(), crate::UsageError> {
        if self.rate.is_none() {
            let open_loop_only = [
                (
                    self.max_in_flight.is_some(),
                    "--max-in-flight is for an open loop: give --rate too",
                ),
                (
                    self.drop_after_ms.is_some(),
                    "--drop-after-ms is for an open loop: give --rate too",
                ),
                (
                    self.late_ms.is_some(),
                    "--late-ms is for an open loop: give --rate too",
                ),
            ];
            return match open_loop_only.into_iter().find(|(given, _)| *given) {
                Some((_, why)) => Err(crate::UsageError(why)),
                None => Ok(()),
            };
        }
        self.drop_after_ms.get_or_insert(1000);
        self.late_ms.get_or_insert(10);
        Ok(())
    }
}

#[derive(Debug, Clone, Args, Serialize)]
pub struct IngestArgs {
    #[command(flatten)]
    #[serde(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    #[serde(flatten)]
    pub timing: TimingArgs,
    #[command(flatten)]
    #[serde(flatten)]
    pub load: LoadArgs,
    /// Events per request: ingest-batch only [default: 100]; ingest sends one.
    #[arg(long, short = 'b', value_parser = count)]
    pub batch: Option<u64>,
    /// Properties per event.
    #[arg(long, default_value_t = 5)]
    pub props: usize,
    /// Distinct entity ids (`<namespace>/dev-<n>`, n = event sequence modulo this).
    #[arg(long, default_value_t = 10_000, value_parser = count)]
    pub entities: u64,
    /// Namespace of the written ids (a server in auth mode takes a namespace token's writes
    /// only inside its namespace).
    #[arg(long, default_value = "loadtest", value_parser = namespace)]
    pub namespace: String,
}

#[derive(Debug, Clone, Args, Serialize)]
pub struct FleetArgs {
    #[command(flatten)]
    #[serde(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    #[serde(flatten)]
    pub timing: TimingArgs,
    /// Keep-alive HTTP connections shared by all devices.
    #[arg(long, short = 'c', default_value_t = 16, value_parser = count_usize)]
    pub connections: usize,
    /// Simulated devices.
    #[arg(long, default_value_t = 1000, value_parser = count)]
    pub devices: u64,
    /// Devices per site (`<namespace>/site-<k>/device-<n>`).
    #[arg(long, default_value_t = 100, value_parser = count)]
    pub devices_per_site: u64,
    /// Sensors per device; each value drifts as a random walk.
    #[arg(long, default_value_t = 4, value_parser = count_usize)]
    pub sensors: usize,
    /// Each device reports once per interval (open loop).
    #[arg(long, default_value_t = 1000, value_parser = count)]
    pub interval_ms: u64,
    /// Seed of the random walks: the same seed gives the same values.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// A report this far behind schedule is dropped instead of sent.
    #[arg(long, default_value_t = 1000)]
    pub drop_after_ms: u64,
    /// A report started this far behind schedule is counted as late.
    #[arg(long, default_value_t = 10)]
    pub late_ms: u64,
    /// A request without a response after this long is a `timeout` error.
    #[arg(long, default_value_t = 10_000, value_parser = count)]
    pub timeout_ms: u64,
    /// Namespace of the devices' ids.
    #[arg(long, default_value = "fleet", value_parser = namespace)]
    pub namespace: String,
}

#[derive(Debug, Clone, Args, Serialize)]
pub struct DeliveryArgs {
    #[command(flatten)]
    #[serde(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    #[serde(flatten)]
    pub timing: TimingArgs,
    /// WebSocket subscribers.
    #[arg(long, short = 's', default_value_t = 100, value_parser = count_usize)]
    pub subscribers: usize,
    /// Subscription pattern (default: `<namespace>/*` for e2e, `*` for fanout). Events are
    /// published to ids it matches: `<prefix>e2e-<n>` for `<prefix>*`, `<namespace>/e2e-<n>` for
    /// `*`, the id itself for an exact id.
    #[arg(long)]
    pub pattern: Option<String>,
    /// Namespace of the published ids when the pattern does not name them (`*`, the default).
    #[arg(long, default_value = "loadtest", value_parser = namespace)]
    pub namespace: String,
    /// Published events per second (open loop).
    #[arg(long, default_value_t = 1000.0, value_parser = rate)]
    pub rate: f64,
    /// Publisher connections.
    #[arg(long, default_value_t = 4, value_parser = count_usize)]
    pub connections: usize,
    /// Events per publish request (1: POST /api/events, more: /api/events/batch).
    #[arg(long, default_value_t = 1, value_parser = count)]
    pub batch: u64,
    /// Properties per published event (at least 1); the first is always `sent_ns`.
    #[arg(long, default_value_t = 1, value_parser = count_usize)]
    pub props: usize,
    /// Distinct published entity ids.
    #[arg(long, default_value_t = 64, value_parser = count)]
    pub entities: u64,
    /// Subscribers per process; more are spread over child processes. Lowered to fit the
    /// open-files limit (raised to its hard maximum first).
    #[arg(long, default_value_t = 8000, value_parser = count_usize)]
    pub subscribers_per_process: usize,
    /// Subscriber threads per process (default: available cores).
    #[arg(long, value_parser = count_usize)]
    pub subscriber_threads: Option<usize>,
    /// After publishing stops, how long to wait for the last frames.
    #[arg(long, default_value_t = 3000)]
    pub drain_ms: u64,
    /// Testing aid: subscriber 0 closes its socket after this many frames.
    #[arg(long, hide = true)]
    pub drop_subscriber_after: Option<u64>,
}

#[derive(Debug, Clone, Args, Serialize)]
pub struct ConnectionsArgs {
    #[command(flatten)]
    #[serde(flatten)]
    pub common: CommonArgs,
    /// Idle WebSocket subscribers to hold open.
    #[arg(long, short = 'c', default_value_t = 1000, value_parser = count_usize)]
    pub connections: usize,
    /// Seconds to hold them open.
    #[arg(long, default_value_t = 10.0, value_parser = positive_seconds)]
    pub hold: f64,
    /// Subscription of every idle connection (a pattern no traffic matches).
    #[arg(long, default_value = "loadtest/idle")]
    pub pattern: String,
    /// Connections per process; more are spread over child processes. Lowered to fit the
    /// open-files limit (raised to its hard maximum first).
    #[arg(long, default_value_t = 8000, value_parser = count_usize)]
    pub subscribers_per_process: usize,
    /// Subscriber threads per process (default: available cores).
    #[arg(long, value_parser = count_usize)]
    pub subscriber_threads: Option<usize>,
}

#[derive(Debug, Clone, Args, Serialize)]
pub struct RecoveryArgs {
    #[command(flatten)]
    #[serde(flatten)]
    pub common: CommonArgs,
    /// Events to populate before the restart.
    #[arg(long, default_value_t = 100_000, value_parser = count)]
    pub events: u64,
    /// Events per populating batch.
    #[arg(long, default_value_t = 1000, value_parser = count)]
    pub batch: u64,
    /// Populating connections.
    #[arg(long, short = 'c', default_value_t = 4, value_parser = count_usize)]
    pub connections: usize,
    /// Properties per event.
    #[arg(long, default_value_t = 5)]
    pub props: usize,
    /// Distinct entity ids.
    #[arg(long, default_value_t = 10_000, value_parser = count)]
    pub entities: u64,
    /// Namespace of the written ids and of the marker (`<namespace>/recovery-marker`).
    #[arg(long, default_value = "loadtest", value_parser = namespace)]
    pub namespace: String,
    /// Shell command that kills the server (kill -9) and starts it again in the background; it
    /// must return. Without it, the tool waits for you to restart the server.
    #[arg(long)]
    pub restart_cmd: Option<String>,
    /// Give up when the server is not back after this many seconds.
    #[arg(long, default_value_t = 120.0, value_parser = positive_seconds)]
    pub restart_timeout: f64,
}

/// What the parent tells a worker process; not for people.
#[derive(Debug, Clone, Args, Serialize)]
pub struct WorkerArgs {
    #[arg(long)]
    pub url: String,
    #[arg(long)]
    pub ca_cert: Option<std::path::PathBuf>,
    #[arg(long)]
    pub subscribers: usize,
    #[arg(long)]
    pub pattern: String,
    #[arg(long)]
    pub threads: usize,
    /// Expect no traffic: connect, subscribe, hold.
    #[arg(long)]
    pub idle: bool,
    #[arg(long)]
    pub drop_subscriber_after: Option<u64>,
}
