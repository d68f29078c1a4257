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
    if let Scenario::FanoutWorker(args) = &cli.scenario {
        interrupt::ignore_in_worker();
        return subscribers::run_worker(args.clone());
    }
    let Some(common) = cli.scenario.common() else {
        unreachable!("every scenario but the worker has the common flags");
    };
    if let Some(pid) = common.server_pid
        && let Some(name) = system::not_a_flux_process(pid)
    {
        eprintln!(
            "flux-loadtest: warning: --server-pid {pid} is {name:?}, not flux: the `server` \
             figures will be that process's (a wrapper's pid, such as timeout's?)"
        );
    }
    let threads = common
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
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
    judge(&result)
}

/// Whether a run that printed its result worked, judged on its measured window: a write
/// scenario (`ingest`, `ingest-batch`, `fleet`) whose window had errors and no event accepted,
/// an `e2e`/`fanout` whose window had failed publishes and none accepted, or whose every
/// subscriber the server closed, is not a successful run: say why on stderr (with the server's
/// first refusal) and exit non-zero. Loss in a working run is a measurement, not a failure: one
/// stderr line says how much.
fn judge(result: &serde_json::Value) -> anyhow::Result<()> {
    let scenario = result["scenario"].as_str().unwrap_or_default();
    let (writes, delivery) = (
        ["ingest", "ingest-batch", "fleet"].contains(&scenario),
        ["e2e", "fanout"].contains(&scenario),
    );
    if !writes && !delivery {
        return Ok(());
    }
    let accepted = result["events"].as_u64().unwrap_or(0);
    let failed = &result["errors_by_status"];
    if accepted == 0 && failed.as_object().is_some_and(|f| !f.is_empty()) {
        let mut why = String::new();
        if let Some(refusal) = http::first_refusal() {
            why += &format!("; the server's first refusal: {refusal}");
        }
        if let Some(error) = http::first_connect_error() {
            why += &format!("; {error}");
        }
        let what = if writes { "event" } else { "publish" };
        anyhow::bail!(
            "no {what} was accepted in the measured window (errors by status: {failed}{why})"
        );
    }
    if delivery {
        let subscribers = &result["subscribers"];
        let connected = subscribers["connected"].as_u64().unwrap_or(0);
        if connected > 0 && subscribers["closed_by_server"].as_u64() == Some(connected) {
            anyhow::bail!(
                "the server closed every subscriber ({connected}; close codes: {})",
                subscribers["close_codes"]
            );
        }
        let lost = result["loss"]["lost"].as_u64().unwrap_or(0);
        if lost > 0 {
            eprintln!(
                "flux-loadtest: {lost} of {} expected frames were lost (one `sent_ns` frame per \
                 event per subscriber; {} subscribers with loss)",
                result["loss"]["expected"], result["loss"]["subscribers_with_loss"]
            );
        }
    }
    Ok(())
}
