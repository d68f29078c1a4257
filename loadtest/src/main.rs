//! `flux-loadtest`: the bundled load generator of Flux.
//!
//! `flux-loadtest <scenario> --url http://127.0.0.1:3000 [options]` runs one scenario and
//! prints exactly one JSON object on stdout (see README.md); progress and diagnostics go to
//! stderr. Path of a run: `cli` → `scenarios::*` → `driver` (HTTP, via `http` + `payload`) and
//! `subscribers` (WebSocket, via `ws`) → `report` + `system` → stdout.

mod cli;
mod driver;
mod http;
mod interrupt;
mod pacer;
mod payload;
mod progress;
mod report;
mod scenarios;
mod subscribers;
mod system;
mod tls;
mod ws;

use anyhow::Context;
use clap::Parser;

use cli::{Cli, Scenario};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let cli = Cli::parse();
    system::raise_open_files_limit();
    if let Err(error) = run(cli) {
        eprintln!("flux-loadtest: {error:#}");
        let usage = error.downcast_ref::<UsageError>().is_some();
        std::process::exit(if usage { 2 } else { 1 });
    }
}

/// Flags that do not go together, found after parsing: exits 2, as clap's own usage errors do.
#[derive(Debug)]
pub struct UsageError(pub &'static str);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for UsageError {}

fn run(cli: Cli) -> anyhow::Result<()> {
    let threads = match &cli.scenario {
        Scenario::FanoutWorker(args) => {
            interrupt::ignore_in_worker();
            return subscribers::run_worker(args.clone());
        }
        Scenario::Ingest(a) | Scenario::IngestBatch(a) => a.common.threads,
        Scenario::Fleet(a) => a.common.threads,
        Scenario::E2e(a) | Scenario::Fanout(a) => a.common.threads,
        Scenario::Connections(a) => a.common.threads,
        Scenario::Recovery(a) => a.common.threads,
    };
    let threads =
        threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .thread_name("loadtest")
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let scenario = cli.scenario.name();
    let params = cli.scenario.params();
    let outcome = runtime.block_on(async move {
        // Recovery is not cut short: Ctrl-C ends it as it ends any process.
        if !matches!(cli.scenario, Scenario::Recovery(_)) {
            interrupt::install();
        }
        match cli.scenario {
            Scenario::Ingest(args) => scenarios::ingest::ingest(args, false).await,
            Scenario::IngestBatch(args) => scenarios::ingest::ingest(args, true).await,
            Scenario::Fleet(args) => scenarios::ingest::fleet(args).await,
            Scenario::E2e(args) => scenarios::delivery::run(args, false).await,
            Scenario::Fanout(args) => scenarios::delivery::run(args, true).await,
            Scenario::Connections(args) => scenarios::connections::run(args).await,
            Scenario::Recovery(args) => scenarios::recovery::run(args).await,
            Scenario::FanoutWorker(_) => unreachable!("handled before the runtime starts"),
        }
    });
    let mut result = match outcome {
        Ok(result) => result,
        // A run that could not be made still gives its one JSON result, saying why; a usage
        // error is not a run.
        Err(error) if error.downcast_ref::<UsageError>().is_none() => {
            report::emit(&serde_json::json!({
                "scenario": scenario,
                "params": params,
                "error": format!("{error:#}"),
                "generator": system::generator_json(),
            }))?;
            return Err(error);
        }
        Err(error) => return Err(error),
    };
    // Connection tasks still parked in the runtime must not outlive the result.
    runtime.shutdown_timeout(std::time::Duration::from_millis(100));
    if interrupt::stopped_at().is_some() {
        result["interrupted"] = serde_json::json!(true);
    }
    result["generator"] = system::generator_json();
    report::emit(&result)?;
    nothing_succeeded(&result)
}

/// A write scenario that got no event accepted printed its result (the errors are in it), but
/// it is not a successful run: say why on stderr, with the server's first refusal, and exit
/// non-zero.
fn nothing_succeeded(result: &serde_json::Value) -> anyhow::Result<()> {
    let writes = ["ingest", "ingest-batch", "fleet"];
    let scenario = result["scenario"].as_str().unwrap_or_default();
    let accepted = result["total"]["events"].as_u64().unwrap_or(0);
    let failed = &result["errors_by_status"];
    if !writes.contains(&scenario)
        || accepted > 0
        || failed.as_object().is_none_or(|f| f.is_empty())
    {
        return Ok(());
    }
    let mut why = String::new();
    if let Some(refusal) = http::first_refusal() {
        why += &format!("; the server's first refusal: {refusal}");
    }
    if let Some(error) = http::first_connect_error() {
        why += &format!("; {error}");
    }
    anyhow::bail!("no event was accepted (errors by status: {failed}{why})")
}
