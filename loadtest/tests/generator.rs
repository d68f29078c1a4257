//! Black-box tests of `flux-loadtest` against the real `flux` server: short, small runs whose
//! JSON results must carry the documented fields and agree with what the server holds.
//!
//! The server is the root package's binary (`target/debug/flux`, built on demand); each test
//! starts its own on a free loopback port with a temporary data directory and kills it on drop.
//! Every wait is bounded.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tempfile::TempDir;

#[path = "support/tls_terminator.rs"]
mod tls_terminator;

use tls_terminator::TlsTerminator;

const START_TIMEOUT: Duration = Duration::from_secs(20);
const BUILD_TIMEOUT: Duration = Duration::from_secs(600);
const RUN_TIMEOUT: Duration = Duration::from_secs(60);

fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("loadtest/ has a parent")
        .to_path_buf()
}

/// `target/debug/flux`, built first when it is missing.
fn server_binary() -> PathBuf {
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    let binary = target_dir.join("debug").join("flux");
    if !binary.exists() {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut build = Command::new(cargo)
            .args(["build", "-p", "flux", "--bin", "flux"])
            .current_dir(workspace_root())
            .spawn()
            .expect("run cargo build -p flux");
        let status = wait_with_deadline(&mut build, BUILD_TIMEOUT).expect("cargo build finished");
        assert!(status.success(), "cargo build -p flux failed");
    }
    assert!(binary.exists(), "{} missing after build", binary.display());
    binary
}

fn wait_with_deadline(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A running `flux serve`, killed on drop.
struct Server {
    child: Child,
    url: String,
    port: u16,
    dir: TempDir,
}

impl Server {
    fn start() -> Server {
        Server::start_with(&[])
    }

    /// A server with these extra `flux serve` flags.
    fn start_with(flags: &[&str]) -> Server {
        let dir = tempfile::tempdir().expect("temp data dir");
        let mut child = Command::new(server_binary())
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.path())
            .args(flags)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start flux serve");
        let stdout = child.stdout.take().expect("server stdout");
        let (lines, incoming) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = lines.send(line);
            }
        });
        let deadline = Instant::now() + START_TIMEOUT;
        let url = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match incoming.recv_timeout(left) {
                Ok(line) => {
                    if let Some(at) = line.find("listening on http://") {
                        let rest = &line[at + "listening on ".len()..];
                        break rest.split_whitespace().next().unwrap_or(rest).to_string();
                    }
                }
                Err(_) => {
                    let _ = child.kill();
                    panic!("flux did not print its listening line within {START_TIMEOUT:?}");
                }
            }
        };
        let port = url
            .rsplit(':')
            .next()
            .and_then(|p| p.trim_end_matches('/').parse().ok())
            .expect("port in the listening URL");
        Server {
            child,
            url,
            port,
            dir,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn get(&self, path: &str) -> Value {
        let response = ureq::get(&format!("{}{path}", self.url))
            .timeout(Duration::from_secs(10))
            .call()
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        let body = response.into_string().expect("response body");
        serde_json::from_str(&body).expect("JSON body")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `flux-loadtest <args>` and parses its single stdout line; it must succeed.
fn loadtest(args: &[&str]) -> Value {
    let (status, stdout, stderr) = run_loadtest(args);
    assert!(
        status.success(),
        "flux-loadtest {args:?} failed ({status}): {stderr}"
    );
    single_json(&stdout)
}

/// The one JSON line on stdout.
fn single_json(stdout: &str) -> Value {
    let lines: Vec<&str> = stdout.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(
        lines.len(),
        1,
        "exactly one JSON line on stdout, got {stdout:?}"
    );
    serde_json::from_str(lines[0]).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
}

/// The generator under test: this build's, or `FLUX_LOADTEST_BIN` (to check that a test fails
/// against an older build).
fn loadtest_binary() -> PathBuf {
    std::env::var_os("FLUX_LOADTEST_BIN")
        .filter(|path| !path.is_empty())
        .map_or_else(
            || PathBuf::from(env!("CARGO_BIN_EXE_flux-loadtest")),
            PathBuf::from,
        )
}

/// Starts `flux-loadtest <args>` (no `FLUX_TOKEN`/`FLUX_URL` from our environment, stdin
/// closed, stderr piped), its stdout to `stdout`.
fn spawn_loadtest(args: &[&str], stdout: Stdio) -> Child {
    Command::new(loadtest_binary())
        .env_remove("FLUX_TOKEN")
        .env_remove("FLUX_URL")
        .args(args)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(Stdio::piped())
        .spawn()
        .expect("start flux-loadtest")
}

/// Runs `flux-loadtest <args>` to its end (bounded): exit status, stdout, stderr.
fn run_loadtest(args: &[&str]) -> (std::process::ExitStatus, String, String) {
    let mut child = spawn_loadtest(args, Stdio::piped());
    let mut stdout = child.stdout.take().expect("stdout");
    let mut stderr = child.stderr.take().expect("stderr");
    let out = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stdout.read_to_string(&mut text);
        text
    });
    let err = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let status = wait_with_deadline(&mut child, RUN_TIMEOUT);
    let (stdout, stderr) = (out.join().unwrap(), err.join().unwrap());
    let status = status.unwrap_or_else(|| panic!("flux-loadtest {args:?} timed out: {stderr}"));
    assert!(
        !stderr.contains("panicked"),
        "flux-loadtest {args:?} panicked: {stderr}"
    );
    (status, stdout, stderr)
}

fn u64_at(value: &Value, pointer: &str) -> u64 {
    value
        .pointer(pointer)
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("{pointer} missing or not an integer in {value}"))
}

fn assert_core_fields(result: &Value, scenario: &str) {
    assert_eq!(result["scenario"], scenario, "{result}");
    assert!(result["params"].is_object(), "{result}");
    assert!(result["duration_s"].as_f64().is_some(), "{result}");
    for key in ["requests", "events"] {
        assert!(result[key].as_u64().is_some(), "{key} in {result}");
    }
    assert!(result["throughput_events_per_s"].as_f64().is_some());
    for key in ["p50", "p99", "p999", "max", "count"] {
        assert!(
            result["latency_us"][key].as_u64().is_some(),
            "latency_us.{key} in {result}"
        );
    }
    assert!(result["errors_by_status"].is_object(), "{result}");
    assert!(result["generator"]["cpu_s"].as_f64().is_some(), "{result}");
}

#[test]
fn ingest_reports_the_documented_fields_and_server_usage() {
    let server = Server::start();
    let pid = server.pid().to_string();
    let result = loadtest(&[
        "ingest",
        "--url",
        &server.url,
        "--duration",
        "1",
        "--warmup",
        "0.2",
        "-c",
        "2",
        "--server-pid",
        &pid,
    ]);
    assert_core_fields(&result, "ingest");
    assert!(u64_at(&result, "/events") > 0, "{result}");
    assert_eq!(
        u64_at(&result, "/events"),
        u64_at(&result, "/latency_us/count")
    );
    assert_eq!(
        result["errors_by_status"],
        serde_json::json!({}),
        "{result}"
    );
    assert_eq!(result["params"]["connections"], 2);
    // A closed loop has no schedule to be late on.
    assert_eq!(result["loop"], "closed");
    assert!(result["params"]["late_ms"].is_null(), "{result}");
    let cpu = result["server"]["cpu_s"].as_f64().expect("server cpu_s");
    let sys = result["server"]["cpu_sys_s"]
        .as_f64()
        .expect("server cpu_sys_s");
    assert!((0.0..=cpu).contains(&sys), "{result}");
    assert!(u64_at(&result, "/server/rss_bytes") > 0);
    assert!(result["server"]["cpu_us_per_event"].as_f64().is_some());
}

#[test]
fn ingest_batch_event_count_matches_the_server() {
    let server = Server::start();
    let result = loadtest(&[
        "ingest-batch",
        "--url",
        &server.url,
        "--duration",
        "1",
        "--warmup",
        "0",
        "-c",
        "2",
        "--batch",
        "50",
        "--props",
        "3",
        "--entities",
        "1000000000",
    ]);
    assert_core_fields(&result, "ingest-batch");
    let events = u64_at(&result, "/events");
    assert!(events > 0 && events.is_multiple_of(50), "{result}");
    assert_eq!(u64_at(&result, "/requests") * 50, events);
    let entities = server.get("/api/state/entities?prefix=loadtest/");
    let entities = entities.as_array().expect("entity list");
    assert_eq!(
        entities.len() as u64,
        events,
        "one entity per accepted event"
    );
    assert_eq!(entities[0]["properties"].as_object().unwrap().len(), 3);
}

#[test]
fn open_loop_holds_the_target_rate() {
    let server = Server::start();
    let result = loadtest(&[
        "ingest",
        "--url",
        &server.url,
        "--duration",
        "1",
        "--warmup",
        "0.5",
        "-c",
        "4",
        "--rate",
        "200",
        "--drop-after-ms",
        "1000",
        "--max-in-flight",
        "100",
    ]);
    assert_core_fields(&result, "ingest");
    assert_eq!(result["loop"], "open");
    // Given or not, the open-loop flags are echoed as they ran.
    assert_eq!(result["params"]["drop_after_ms"], 1000, "{result}");
    assert_eq!(result["params"]["max_in_flight"], 100, "{result}");
    assert_eq!(result["params"]["late_ms"], 10, "{result}");
    let events = u64_at(&result, "/events") + u64_at(&result, "/dropped");
    assert!(
        (150..=210).contains(&events),
        "about 200 due in 1 s: {result}"
    );
    assert!(result["late"].as_u64().is_some());
}

#[test]
fn fleet_reports_every_device() {
    let server = Server::start();
    let result = loadtest(&[
        "fleet",
        "--url",
        &server.url,
        "--devices",
        "30",
        "--devices-per-site",
        "10",
        "--interval-ms",
        "200",
        "--duration",
        "1",
        "--warmup",
        "0.3",
        "--seed",
        "7",
    ]);
    assert_core_fields(&result, "fleet");
    assert!(u64_at(&result, "/events") > 0, "{result}");
    let devices = server.get("/api/state/entities?prefix=fleet/");
    let devices = devices.as_array().expect("entity list");
    assert_eq!(devices.len(), 30);
    assert!(devices.iter().any(|d| d["id"] == "fleet/site-2/device-29"));
    assert_eq!(devices[0]["properties"].as_object().unwrap().len(), 4);
}

#[test]
fn e2e_with_three_subscribers_loses_nothing() {
    let server = Server::start();
    let (status, stdout, stderr) = run_loadtest(&[
        "e2e",
        "--url",
        &server.url,
        "--subscribers",
        "3",
        "--rate",
        "200",
        "--duration",
        "1",
        "--warmup",
        "0.2",
    ]);
    assert!(status.success(), "{status}: {stderr}");
    assert!(!stderr.contains("lost"), "{stderr}");
    let result = single_json(&stdout);
    assert_core_fields(&result, "e2e");
    let published = u64_at(&result, "/loss/expected_per_subscriber");
    assert!(published > 0, "{result}");
    assert_eq!(u64_at(&result, "/loss/expected"), 3 * published);
    assert_eq!(u64_at(&result, "/loss/received"), 3 * published, "{result}");
    assert_eq!(u64_at(&result, "/loss/lost"), 0, "{result}");
    assert!(u64_at(&result, "/latency_us/count") > 0);
    assert_eq!(u64_at(&result, "/subscribers/connected"), 3);
}

#[test]
fn e2e_detects_loss_when_a_subscriber_goes_away() {
    let server = Server::start();
    let (status, stdout, stderr) = run_loadtest(&[
        "e2e",
        "--url",
        &server.url,
        "--subscribers",
        "3",
        "--rate",
        "200",
        "--duration",
        "1",
        "--warmup",
        "0.2",
        "--drain-ms",
        "500",
        "--drop-subscriber-after",
        "20",
    ]);
    // Loss is a measurement: the run still succeeds, and says how much on stderr.
    assert!(status.success(), "{status}: {stderr}");
    let result = single_json(&stdout);
    assert!(u64_at(&result, "/loss/lost") > 0, "{result}");
    let said = format!(
        "{} of {} expected frames were lost",
        u64_at(&result, "/loss/lost"),
        u64_at(&result, "/loss/expected")
    );
    assert_eq!(stderr.matches(&said).count(), 1, "{stderr}");
    assert_eq!(
        u64_at(&result, "/loss/subscribers_with_loss"),
        1,
        "{result}"
    );
    assert_eq!(u64_at(&result, "/subscribers/closed_on_purpose"), 1);
    // The ratio as printed: 6 significant digits, not every digit of the division.
    let ratio = result["loss"]["loss_ratio"].as_f64().expect("loss_ratio");
    let exact = u64_at(&result, "/loss/lost") as f64 / u64_at(&result, "/loss/expected") as f64;
    let six: f64 = format!("{exact:.5e}").parse().unwrap();
    assert_eq!(ratio, six, "{result}");
}

#[test]
fn fanout_spreads_subscribers_over_worker_processes() {
    let server = Server::start();
    let result = loadtest(&[
        "fanout",
        "--url",
        &server.url,
        "--subscribers",
        "6",
        "--subscribers-per-process",
        "2",
        "--subscriber-threads",
        "1",
        "--rate",
        "100",
        "--duration",
        "1",
        "--warmup",
        "0.2",
    ]);
    assert_core_fields(&result, "fanout");
    assert_eq!(u64_at(&result, "/processes"), 3, "{result}");
    assert_eq!(u64_at(&result, "/subscribers/connected"), 6, "{result}");
    assert_eq!(u64_at(&result, "/loss/lost"), 0, "{result}");
    assert!(u64_at(&result, "/delivered_frames") > 0);
    assert!(result["generator"]["cpu_s_children"].as_f64().unwrap() > 0.0);
}

#[test]
fn connections_holds_idle_subscribers_and_reports_memory() {
    let server = Server::start();
    let pid = server.pid().to_string();
    let result = loadtest(&[
        "connections",
        "--url",
        &server.url,
        "--connections",
        "50",
        "--hold",
        "0.5",
        "--server-pid",
        &pid,
    ]);
    assert_core_fields(&result, "connections");
    assert_eq!(u64_at(&result, "/connections/connected"), 50, "{result}");
    assert_eq!(u64_at(&result, "/connections/open_at_end"), 50, "{result}");
    assert!(u64_at(&result, "/server/rss_bytes") > 0);
    assert!(
        result["server"]["rss_per_connection_bytes"]
            .as_f64()
            .is_some()
    );
}

/// Kills the server a restart command started (its pid is in a file) when dropped.
struct RestartedServer(PathBuf);

impl Drop for RestartedServer {
    fn drop(&mut self) {
        let pid = std::fs::read_to_string(&self.0).unwrap_or_default();
        if pid.trim().parse::<u32>().is_ok_and(|pid| pid > 1) {
            let _ = Command::new("kill").args(["-9", pid.trim()]).status();
        }
    }
}

/// A `--restart-cmd` that kills `server`, waits until it is gone (a zombie until the test
/// reaps it, but its sockets and lock are released) and starts it again on the same port with
/// data directory `dir` (its pid into `restarted`'s file), then runs `then`.
fn restart_command(server: &Server, restarted: &RestartedServer, dir: &Path, then: &str) -> String {
    format!(
        "kill -9 {pid}; i=0; while [ $i -lt 500 ] && [ -e /proc/{pid} ] && \
         ! grep -q '^State:[[:space:]]*Z' /proc/{pid}/status 2>/dev/null; do \
         sleep 0.01; i=$((i+1)); done; \
         nohup {bin} serve --listen 127.0.0.1:{port} --data-dir {dir} >/dev/null 2>&1 & \
         echo $! > {pidfile}; {then}",
        pid = server.pid(),
        port = server.port,
        bin = server_binary().display(),
        dir = dir.display(),
        pidfile = restarted.0.display(),
    )
}

#[test]
fn recovery_times_a_kill_9_restart() {
    let mut server = Server::start();
    let restarted = RestartedServer(server.dir.path().join("restarted.pid"));
    let pid = server.pid().to_string();
    let restart = restart_command(&server, &restarted, server.dir.path(), "true");
    let result = loadtest(&[
        "recovery",
        "--url",
        &server.url,
        "--events",
        "2000",
        "--batch",
        "250",
        "--restart-cmd",
        &restart,
        "--restart-timeout",
        "30",
        "--server-pid",
        &pid,
    ]);
    let _ = server.child.wait();
    assert_core_fields(&result, "recovery");
    // The server as it was while being populated.
    assert_eq!(u64_at(&result, "/server/pid").to_string(), pid, "{result}");
    assert!(
        result["server"]["cpu_us_per_event"].as_f64().is_some(),
        "{result}"
    );
    assert_eq!(u64_at(&result, "/events"), 2000, "{result}");
    assert_eq!(result["recovery"]["mode"], "command");
    let seconds = result["recovery"]["seconds"]
        .as_f64()
        .expect("recovery seconds");
    assert!(seconds > 0.0, "{result}");
    // 2000 events over the default 10,000 ids: 2000 entities, all back, a sample compared.
    assert_eq!(
        u64_at(&result, "/recovery/entities_checked"),
        2000,
        "{result}"
    );
    assert!(
        u64_at(&result, "/recovery/entities_sampled") > 0,
        "{result}"
    );
    drop(restarted);
}

/// A restart onto an empty data directory with only the marker written again is not a
/// recovery: the run fails, its result says the populated entities are missing.
#[test]
fn recovery_fails_when_only_the_marker_came_back() {
    let mut server = Server::start();
    let restarted = RestartedServer(server.dir.path().join("restarted.pid"));
    let empty = tempfile::tempdir().expect("an empty data dir");
    let marker_url = format!("{}/api/state/entities/loadtest/recovery-marker", server.url);
    let repost = format!(
        "i=0; until curl -sf {url}/api/health >/dev/null || [ $i -ge 1000 ]; do \
         sleep 0.01; i=$((i+1)); done; \
         curl -s -X POST {url}/api/events -H 'Content-Type: application/json' -d \
         '{{\"stream\":\"t\",\"source\":\"t\",\"timestamp\":1,\"payload\":\
         {{\"entity_id\":\"loadtest/recovery-marker\",\"properties\":{{\"marker\":\"'$m'\"}}}}}}' \
         >/dev/null",
        url = server.url,
    );
    let restart = format!(
        "m=$(curl -s {marker_url} | sed -n 's/.*\"marker\":\"\\([^\"]*\\)\".*/\\1/p'); {}",
        restart_command(&server, &restarted, empty.path(), &repost)
    );
    let (status, stdout, stderr) = run_loadtest(&[
        "recovery",
        "--url",
        &server.url,
        "--events",
        "400",
        "--batch",
        "100",
        "--entities",
        "200",
        "--restart-cmd",
        &restart,
        "--restart-timeout",
        "20",
    ]);
    let _ = server.child.wait();
    assert_eq!(status.code(), Some(1), "{stdout} {stderr}");
    let result = single_json(&stdout);
    let error = result["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("the populated data did not")
            && error.contains("holds 0 of the 200 entities loadtest/dev-*"),
        "{result}"
    );
    assert_eq!(result["params"]["events"], 400, "{result}");
}

/// A recovery that fails tells a server that never came back from one that came back
/// without the marker (and what it answered).
#[test]
fn a_failed_recovery_says_what_the_server_answered() {
    for came_back in [false, true] {
        let mut server = Server::start();
        let restarted = RestartedServer(server.dir.path().join("restarted.pid"));
        let empty = tempfile::tempdir().expect("an empty data dir");
        let restart = if came_back {
            restart_command(&server, &restarted, empty.path(), "true")
        } else {
            format!("kill -9 {}", server.pid())
        };
        let (status, stdout, _) = run_loadtest(&[
            "recovery",
            "--url",
            &server.url,
            "--events",
            "100",
            "--batch",
            "50",
            "--restart-cmd",
            &restart,
            "--restart-timeout",
            "1.5",
        ]);
        let _ = server.child.wait();
        assert_eq!(status.code(), Some(1), "{stdout}");
        let result = single_json(&stdout);
        let error = result["error"].as_str().unwrap_or_default();
        if came_back {
            assert!(
                error.contains("came back") && error.contains("404"),
                "{result}"
            );
        } else {
            assert!(error.contains("never answered"), "{result}");
        }
        assert!(result["params"].is_object(), "{result}");
    }
}

#[test]
fn ingest_sends_its_token_to_a_server_in_auth_mode() {
    let server = Server::start_with(&["--auth", "--admin-token", "admin-secret"]);
    let token = &register(&server, "loadtest");
    let args = [
        "ingest",
        "--url",
        &server.url,
        "--duration",
        "1",
        "--warmup",
        "0",
        "-c",
        "2",
    ];

    let with_token = [&args[..], &["--token", token]].concat();
    let result = loadtest(&with_token);
    assert!(u64_at(&result, "/events") > 0, "{result}");
    assert_eq!(
        result["errors_by_status"],
        serde_json::json!({}),
        "{result}"
    );
    assert!(
        !result.to_string().contains(token),
        "the token is echoed in the result: {result}"
    );

    // Without it every request is refused: the result says so, and the run fails.
    let (status, stdout, stderr) = run_loadtest(&args);
    assert!(!status.success(), "a run of nothing but 401s succeeded");
    let result = single_json(&stdout);
    assert!(u64_at(&result, "/errors_by_status/401") > 0, "{result}");
    assert!(stderr.contains("no event was accepted"), "{stderr}");
    // With the server's own reason.
    assert!(
        stderr.contains("first refusal: 401") && stderr.contains("token"),
        "{stderr}"
    );
}

/// Registers namespace `name` on a server started with admin token `admin-secret`; its token.
fn register(server: &Server, name: &str) -> String {
    let registered = ureq::post(&format!("{}/api/namespaces", server.url))
        .set("Authorization", "Bearer admin-secret")
        .timeout(Duration::from_secs(10))
        .set("Content-Type", "application/json")
        .send_string(&format!(r#"{{"name":"{name}"}}"#))
        .expect("register the namespace");
    let registered: Value =
        serde_json::from_str(&registered.into_string().expect("registration body"))
            .expect("registration JSON");
    registered["token"]
        .as_str()
        .expect("namespace token")
        .to_string()
}

#[test]
fn a_namespace_token_loads_its_own_namespace() {
    let server = Server::start_with(&["--auth", "--admin-token", "admin-secret"]);
    let token = register(&server, "acme");
    // A load test goes past the default 10,000 events a minute per namespace.
    ureq::put(&format!("{}/api/admin/config", server.url))
        .set("Authorization", "Bearer admin-secret")
        .timeout(Duration::from_secs(10))
        .send_string(r#"{"rate_limit_enabled":false}"#)
        .expect("turn the rate limit off");
    let short = ["--duration", "0.6", "--warmup", "0", "--token", &token];
    let url = ["--url", &server.url];

    // Every writing scenario, told the namespace, writes there and only there.
    let batch = loadtest(
        &[
            &[
                "ingest-batch",
                "-c",
                "2",
                "--batch",
                "50",
                "--entities",
                "40",
            ][..],
            &["--namespace", "acme"],
            &url,
            &short,
        ]
        .concat(),
    );
    assert!(u64_at(&batch, "/events") > 0, "{batch}");
    assert_eq!(batch["errors_by_status"], serde_json::json!({}), "{batch}");
    let fleet = loadtest(
        &[
            &["fleet", "--devices", "6", "--devices-per-site", "3"][..],
            &["--interval-ms", "100", "--namespace", "acme"],
            &url,
            &short,
        ]
        .concat(),
    );
    assert!(u64_at(&fleet, "/events") > 0, "{fleet}");
    let e2e = loadtest(
        &[
            &["e2e", "-s", "2", "--rate", "100", "--namespace", "acme"][..],
            &url,
            &short,
        ]
        .concat(),
    );
    assert_eq!(e2e["pattern"], "acme/*", "{e2e}");
    assert!(u64_at(&e2e, "/loss/expected_per_subscriber") > 0, "{e2e}");
    assert_eq!(u64_at(&e2e, "/loss/lost"), 0, "{e2e}");

    let ids: Vec<String> = server
        .get("/api/state/entities")
        .as_array()
        .expect("entity list")
        .iter()
        .map(|e| e["id"].as_str().expect("id").to_string())
        .filter(|id| !id.starts_with("flux-core/"))
        .collect();
    assert!(ids.iter().all(|id| id.starts_with("acme/")), "{ids:?}");
    for id in ["acme/dev-39", "acme/site-1/device-5", "acme/e2e-0"] {
        assert!(ids.iter().any(|i| i == id), "{id} missing from {ids:?}");
    }

    // Left at its default namespace, the run is refused and says why in the server's words.
    let (status, stdout, stderr) = run_loadtest(
        &[
            &["ingest-batch", "-c", "1", "--batch", "5"][..],
            &url,
            &short,
        ]
        .concat(),
    );
    assert!(!status.success(), "a run of refused events succeeded");
    let result = single_json(&stdout);
    assert_eq!(u64_at(&result, "/total/events"), 0, "{result}");
    assert!(
        stderr.contains("no event was accepted")
            && stderr.contains("first refusal: an event of a batch: payload.entity_id")
            && stderr.contains("this token writes only namespace \"acme\""),
        "{stderr}"
    );
}

#[test]
fn a_server_that_is_not_there_fails_the_run_and_says_why() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let url = format!("http://127.0.0.1:{port}");
    // The write scenarios probe the server once and fail at once, not after a whole run of
    // failed requests (the long duration would make one that did fail the run's time bound).
    for scenario in ["ingest", "ingest-batch", "fleet"] {
        let (status, stdout, stderr) = run_loadtest(&[
            scenario,
            "--url",
            &url,
            "--duration",
            "20",
            "--warmup",
            "0",
            "-c",
            "1",
        ]);
        assert_eq!(status.code(), Some(1), "{scenario}: {stdout} {stderr}");
        let result = single_json(&stdout);
        assert_eq!(result["scenario"], scenario, "{result}");
        assert_eq!(result["params"]["url"], url, "{result}");
        assert!(result["generator"]["cpu_s"].as_f64().is_some(), "{result}");
        let error = result["error"].as_str().unwrap_or_default();
        assert!(
            error.contains("cannot reach the server") && error.to_lowercase().contains("refused"),
            "{result}"
        );
        assert!(stderr.contains("cannot reach the server"), "{stderr}");
    }
    // Runs that cannot start still print their one JSON result, saying why.
    for (scenario, args) in [
        ("connections", &["-c", "3", "--hold", "0.2"][..]),
        ("e2e", &["--subscribers", "2", "--duration", "0.5"][..]),
    ] {
        let mut all = vec![scenario, "--url", &url];
        all.extend_from_slice(args);
        let (status, stdout, stderr) = run_loadtest(&all);
        assert!(
            !status.success(),
            "{scenario} against a closed port succeeded"
        );
        assert!(stderr.contains("no subscriber could connect"), "{stderr}");
        let result = single_json(&stdout);
        assert_eq!(result["scenario"], scenario, "{result}");
        let error = result["error"].as_str().unwrap_or_default();
        assert!(error.contains("no subscriber could connect"), "{result}");
        assert_eq!(result["params"]["url"], url, "{result}");
    }
}

#[test]
fn a_reply_that_closes_the_connection_is_not_counted_as_a_transport_error() {
    let server = Server::start();
    // A batch body limit below what the generator sends: every request is a 413, which
    // closes its connection.
    ureq::put(&format!("{}/api/admin/config", server.url))
        .timeout(Duration::from_secs(10))
        .set("Content-Type", "application/json")
        .send_string(r#"{"body_size_limit_batch_bytes":2000}"#)
        .expect("lower the batch body limit");
    let (_, stdout, _) = run_loadtest(&[
        "ingest-batch",
        "--url",
        &server.url,
        "--duration",
        "1",
        "--warmup",
        "0",
        "-c",
        "2",
        "--batch",
        "50",
    ]);
    let result = single_json(&stdout);
    let errors = result["errors_by_status"].as_object().expect("errors");
    assert!(u64_at(&result, "/errors_by_status/413") > 0, "{result}");
    assert_eq!(errors.len(), 1, "only 413s: {result}");
}

#[test]
fn the_total_counts_the_warmup_and_matches_the_server() {
    let server = Server::start();
    let result = loadtest(&[
        "ingest",
        "--url",
        &server.url,
        "--duration",
        "1",
        "--warmup",
        "1",
        "-c",
        "2",
        "--entities",
        "1000000000",
    ]);
    let total = u64_at(&result, "/total/events");
    assert!(total > u64_at(&result, "/events"), "{result}");
    let entities = server.get("/api/state/entities?prefix=loadtest/");
    assert_eq!(
        entities.as_array().expect("entity list").len() as u64,
        total,
        "one entity per accepted event, warmup included"
    );
}

#[test]
fn recovery_refuses_a_restart_command_that_restarted_nothing() {
    let server = Server::start();
    let (status, _, stderr) = run_loadtest(&[
        "recovery",
        "--url",
        &server.url,
        "--events",
        "100",
        "--batch",
        "10",
        "--restart-cmd",
        "true",
    ]);
    assert!(!status.success(), "a restart of nothing was timed");
    assert!(stderr.contains("not restarted"), "{stderr}");
}

#[test]
fn bad_values_are_refused_before_anything_runs() {
    for args in [
        &["ingest", "--duration", "inf"][..],
        &["ingest", "--warmup", "1e30"],
        &["ingest", "-c", "0"],
        &["ingest", "--rate", "0"],
        &["ingest", "--batch", "5"],
        &["ingest-batch", "--batch", "0"],
        &["fleet", "--sensors", "0"],
        &["e2e", "-s", "0"],
        &["e2e", "--rate", "0"],
        &["e2e", "--props", "0"],
        &["connections", "-c", "0"],
        &["ingest", "--duration", "0"],
        &["connections", "--hold", "0"],
        &["recovery", "--restart-timeout", "0"],
        &["ingest", "--url", "http://127.0.0.1:1?x=1"],
        &["ingest", "--url", "http://127.0.0.1:notaport"],
        &["ingest", "--url", "http://user:pw@127.0.0.1:1"],
        &["ingest", "--namespace", "a/b"],
        &["fleet", "--namespace", ""],
        &["recovery", "--namespace", "a\"b"],
        &["e2e", "--namespace", "a b"],
        &["ingest", "--threads", "0"],
        &["e2e", "--threads", "0"],
        &["ingest", "--rate", "100", "--max-in-flight", "0"],
        &["fanout", "--subscriber-threads", "0"],
        &["ingest", "--late-ms", "5"],
        &["ingest-batch", "--drop-after-ms", "5"],
        &["ingest", "--max-in-flight", "5"],
        &[
            "ingest",
            "--url",
            "http://127.0.0.1:1",
            "--ca-cert",
            "ca.pem",
        ],
        &["e2e", "--url", "http://127.0.0.1:1", "--ca-cert", "ca.pem"],
        &[
            "recovery",
            "--url",
            "http://127.0.0.1:1",
            "--ca-cert",
            "ca.pem",
        ],
    ] {
        let (status, stdout, stderr) = run_loadtest(args);
        assert_eq!(status.code(), Some(2), "{args:?}: a usage error");
        assert!(
            stdout.trim().is_empty(),
            "{args:?} printed a result: {stdout}"
        );
        assert!(!stderr.trim().is_empty(), "{args:?} failed without a word");
    }
}

#[test]
fn https_urls_reach_a_server_behind_a_tls_terminator() {
    let server = Server::start();
    let tls = TlsTerminator::start(server.port);
    let cert = tls.cert.to_str().expect("UTF-8 path");
    let over_tls = ["--url", &tls.url, "--ca-cert", cert];
    let short = ["--duration", "0.6", "--warmup", "0"];

    let batch = loadtest(
        &[
            &[
                "ingest-batch",
                "-c",
                "2",
                "--batch",
                "20",
                "--entities",
                "30",
            ][..],
            &over_tls,
            &short,
        ]
        .concat(),
    );
    assert!(u64_at(&batch, "/events") > 0, "{batch}");
    assert_eq!(batch["errors_by_status"], serde_json::json!({}), "{batch}");
    let held = server.get("/api/state/entities?prefix=loadtest/dev-");
    assert_eq!(held.as_array().expect("entity list").len(), 30);

    // WebSockets through the terminator: in this process, and spread over worker processes
    // (which must be handed the URL's scheme and the certificate).
    let e2e = loadtest(&[&["e2e", "-s", "3", "--rate", "100"][..], &over_tls, &short].concat());
    assert!(u64_at(&e2e, "/loss/expected_per_subscriber") > 0, "{e2e}");
    assert_eq!(u64_at(&e2e, "/loss/lost"), 0, "{e2e}");
    let fanout = loadtest(
        &[
            &["fanout", "-s", "4", "--subscribers-per-process", "2"][..],
            &["--rate", "100"],
            &over_tls,
            &short,
        ]
        .concat(),
    );
    assert_eq!(u64_at(&fanout, "/processes"), 2, "{fanout}");
    assert_eq!(u64_at(&fanout, "/subscribers/connected"), 4, "{fanout}");
    assert_eq!(u64_at(&fanout, "/loss/lost"), 0, "{fanout}");

    // The certificate is checked: without --ca-cert nothing trusts it.
    let (status, stdout, stderr) =
        run_loadtest(&[&["ingest", "-c", "1", "--url", &tls.url][..], &short].concat());
    assert_eq!(
        status.code(),
        Some(1),
        "an untrusted certificate was accepted"
    );
    let error = single_json(&stdout)["error"].to_string();
    assert!(error.contains("certificate is not trusted"), "{error}");
    assert!(stderr.contains("certificate"), "{stderr}");
}

/// The self-signed certificate `openssl req -x509` makes by default is marked as a CA's; given
/// with `--ca-cert`, it is trusted as that exact certificate. Another self-signed certificate
/// still is not.
#[test]
fn the_default_openssl_self_signed_certificate_is_trusted_when_given() {
    let server = Server::start();
    let tls = TlsTerminator::start_with(server.port, &[]);
    let cert = tls.cert.to_str().expect("UTF-8 path");
    let short = ["--duration", "0.6", "--warmup", "0"];
    let run = ["ingest", "-c", "1", "--url", &tls.url];
    let trusted = loadtest(&[&run[..], &["--ca-cert", cert], &short].concat());
    assert!(u64_at(&trusted, "/events") > 0, "{trusted}");
    assert_eq!(
        trusted["errors_by_status"],
        serde_json::json!({}),
        "{trusted}"
    );
    let e2e = loadtest(
        &[
            &[
                "e2e",
                "-s",
                "2",
                "--rate",
                "100",
                "--url",
                &tls.url,
                "--ca-cert",
                cert,
            ][..],
            &short,
        ]
        .concat(),
    );
    assert_eq!(u64_at(&e2e, "/loss/lost"), 0, "{e2e}");

    let other = TlsTerminator::start_with(server.port, &[]);
    let other_cert = other.cert.to_str().expect("UTF-8 path");
    let (status, stdout, stderr) =
        run_loadtest(&[&run[..], &["--ca-cert", other_cert], &short].concat());
    assert_eq!(
        status.code(),
        Some(1),
        "a certificate nobody gave was accepted"
    );
    let error = single_json(&stdout)["error"].to_string();
    assert!(error.contains("certificate is not trusted"), "{error}");
    assert!(stderr.contains("certificate"), "{stderr}");
}

/// With no warmup the measured window opens as publishing starts: every frame received is a
/// measured one (a subscriber's first read, begun before the window opened, counts too).
#[test]
fn e2e_without_warmup_measures_every_frame() {
    let server = Server::start();
    let result = loadtest(&[
        "e2e",
        "--url",
        &server.url,
        "--subscribers",
        "3",
        "--rate",
        "200",
        "--duration",
        "1",
        "--warmup",
        "0",
    ]);
    let received = u64_at(&result, "/loss/received");
    assert!(received > 0, "{result}");
    assert_eq!(u64_at(&result, "/delivered_frames"), received, "{result}");
    assert_eq!(u64_at(&result, "/latency_us/count"), received, "{result}");
    assert_eq!(
        u64_at(&result, "/latency_from_due_us/count"),
        received,
        "{result}"
    );
    // An event is never delivered before it was due.
    assert!(
        u64_at(&result, "/latency_from_due_us/p50") >= u64_at(&result, "/latency_us/p50"),
        "{result}"
    );
}

/// Waits (at most `limit`) for `child` to exit 0 and returns its one JSON result from stdout.
fn successful_result(child: &mut Child, limit: Duration) -> Value {
    let status = wait_with_deadline(child, limit).expect("the run ends");
    let mut stdout = String::new();
    child
        .stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut stdout)
        .expect("read stdout");
    assert!(status.success(), "{status}");
    single_json(&stdout)
}

/// `fanout` of `subscribers` at 100 events/s for `duration` seconds, two subscribers per worker
/// process (one thread each), stderr piped.
fn fanout_in_workers(url: &str, subscribers: usize, duration: &str, stdout: Stdio) -> Child {
    let subscribers = subscribers.to_string();
    spawn_loadtest(
        &[
            "fanout",
            "--url",
            url,
            "-s",
            &subscribers,
            "--subscribers-per-process",
            "2",
            "--subscriber-threads",
            "1",
            "--rate",
            "100",
            "--duration",
            duration,
            "--warmup",
            "0",
        ],
        stdout,
    )
}

/// The pids of `child`'s child processes once there are `count` of them (at most 10 s).
fn worker_pids(child: &Child, count: usize) -> Vec<i32> {
    let children = format!("/proc/{}/task/{}/children", child.id(), child.id());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let listed = std::fs::read_to_string(&children).unwrap_or_default();
        let pids: Vec<i32> = listed
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect();
        if pids.len() >= count {
            return pids;
        }
        assert!(
            Instant::now() < deadline,
            "the workers never started: {listed:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A fanout worker process killed mid-run costs its subscribers, not the run: the result is
/// still printed, with the dead worker's subscribers closed as `worker_exited` and the frames
/// they missed counted as lost.
#[test]
fn a_fanout_worker_killed_mid_run_counts_as_loss() {
    let server = Server::start();
    let mut child = fanout_in_workers(&server.url, 6, "2.5", Stdio::piped());
    let worker = worker_pids(&child, 3)[1];
    std::thread::sleep(Duration::from_millis(1200));
    // SAFETY: `worker` is a child of our own child, still running (the run lasts 2.5 s).
    assert_eq!(unsafe { libc::kill(worker, libc::SIGKILL) }, 0);
    let result = successful_result(&mut child, Duration::from_secs(60));
    assert_eq!(u64_at(&result, "/subscribers/connected"), 6, "{result}");
    assert_eq!(
        u64_at(&result, "/subscribers/close_codes/worker_exited"),
        2,
        "{result}"
    );
    assert!(u64_at(&result, "/loss/lost") > 0, "{result}");
    assert_eq!(
        u64_at(&result, "/loss/subscribers_with_loss"),
        2,
        "{result}"
    );
}

/// Ctrl-C ends a run early with a result for what was measured until then: rates over the
/// window as it ran, counts that match the server, and `"interrupted": true`.
#[test]
fn ctrl_c_ends_the_run_with_what_was_measured() {
    let server = Server::start();
    let mut child = spawn_loadtest(
        &[
            "ingest",
            "--url",
            &server.url,
            "-c",
            "2",
            "--rate",
            "400",
            "--duration",
            "30",
            "--warmup",
            "0.2",
            "--entities",
            "1000000000",
        ],
        Stdio::piped(),
    );
    std::thread::sleep(Duration::from_millis(1500));
    // SAFETY: our own child, still running (its run lasts 30 s).
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
    let result = successful_result(&mut child, Duration::from_secs(15));
    assert_eq!(result["interrupted"], true, "{result}");
    // Cut short, and its rate taken over the window as it ran, not the 30 s asked for.
    let duration = result["duration_s"].as_f64().expect("duration_s");
    assert!(duration > 0.0 && duration < 30.0, "{result}");
    let rate = result["throughput_events_per_s"].as_f64().expect("rate");
    let events = u64_at(&result, "/events") as f64;
    assert!((rate - events / duration).abs() < 1.0, "{result}");
    let entities = server.get("/api/state/entities?prefix=loadtest/");
    assert_eq!(
        entities.as_array().expect("entity list").len() as u64,
        u64_at(&result, "/total/events"),
        "{result}"
    );
}

/// Every `state_update` frame counts as delivered, not only the `sent_ns` one: with `--props
/// 4` an event is four frames per subscriber, while latency and loss stay per event. In this
/// process and across worker processes alike.
#[test]
fn delivered_frames_count_every_property_frame() {
    let server = Server::start();
    for per_process in ["8000", "1"] {
        let result = loadtest(&[
            "e2e",
            "--url",
            &server.url,
            "-s",
            "2",
            "--subscribers-per-process",
            per_process,
            "--subscriber-threads",
            "1",
            "--rate",
            "200",
            "--props",
            "4",
            "--duration",
            "1",
            "--warmup",
            "0",
        ]);
        let received = u64_at(&result, "/loss/received");
        assert!(received > 0, "{result}");
        assert_eq!(u64_at(&result, "/loss/lost"), 0, "{result}");
        assert_eq!(u64_at(&result, "/latency_us/count"), received, "{result}");
        assert_eq!(
            u64_at(&result, "/delivered_frames"),
            4 * received,
            "{result}"
        );
    }
}

/// Two SIGINTs back to back, as coreutils `timeout` sends them (to the child, then to its
/// process group), are one Ctrl-C: the run still ends with its one result.
#[test]
fn a_sigint_repeated_at_once_still_gives_the_result() {
    let server = Server::start();
    let mut child = spawn_loadtest(
        &[
            "ingest",
            "--url",
            &server.url,
            "-c",
            "1",
            "--rate",
            "200",
            "--duration",
            "30",
            "--warmup",
            "0",
        ],
        Stdio::piped(),
    );
    std::thread::sleep(Duration::from_millis(1000));
    // The server paused: a request stays in flight, so the run is still finishing (not gone
    // already) when the second signal comes.
    let server_pid = server.pid() as i32;
    // SAFETY: `server_pid` is our own running child; SIGSTOP/SIGCONT only pause and resume it.
    assert_eq!(unsafe { libc::kill(server_pid, libc::SIGSTOP) }, 0);
    std::thread::sleep(Duration::from_millis(100));
    for _ in 0..2 {
        // SAFETY: our own child, still running (its run lasts 30 s).
        assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(100));
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(server_pid, libc::SIGCONT) }, 0);
    let result = successful_result(&mut child, Duration::from_secs(15));
    assert_eq!(result["interrupted"], true, "{result}");
}

/// SIGTERM (what `timeout` and supervisors send) ends a run as Ctrl-C does: one result, exit
/// 0. `timeout` signals the whole process group: the fanout workers leave it to their parent,
/// which still collects their counts, and nothing complains of a broken pipe.
#[test]
fn sigterm_from_timeout_ends_the_run_with_its_result() {
    let server = Server::start();
    let output = Command::new("timeout")
        .args(["--preserve-status", "-s", "TERM", "2"])
        .arg(loadtest_binary())
        .args(["fanout", "--url", &server.url, "-s", "4"])
        .args([
            "--subscribers-per-process",
            "2",
            "--subscriber-threads",
            "1",
        ])
        .args(["--rate", "100", "--duration", "30", "--warmup", "0"])
        .stdin(Stdio::null())
        .output()
        .expect("run timeout flux-loadtest");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{}: {stderr}", output.status);
    let result = single_json(&stdout);
    assert_eq!(result["interrupted"], true, "{result}");
    assert_eq!(u64_at(&result, "/processes"), 2, "{result}");
    assert_eq!(u64_at(&result, "/subscribers/connected"), 4, "{result}");
    assert_eq!(
        result["subscribers"]["close_codes"],
        serde_json::json!({}),
        "{result}"
    );
    assert_eq!(u64_at(&result, "/loss/lost"), 0, "{result}");
    assert!(!stderr.to_lowercase().contains("broken pipe"), "{stderr}");
}

/// Fanout workers whose parent is gone (killed outright) end quietly: no "Broken pipe" errors
/// from their reports to nobody.
#[test]
fn fanout_workers_end_quietly_when_their_parent_is_killed() {
    let server = Server::start();
    let mut child = fanout_in_workers(&server.url, 4, "30", Stdio::null());
    let mut stderr = child.stderr.take().expect("stderr");
    // Workers inherit stderr: it ends when the last of them has exited.
    let (done, ended) = mpsc::channel();
    std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        let _ = done.send(text);
    });
    worker_pids(&child, 2);
    // Past the workers' first once-a-second report.
    std::thread::sleep(Duration::from_millis(1500));
    let _ = child.kill();
    let _ = child.wait();
    let stderr = ended
        .recv_timeout(Duration::from_secs(20))
        .expect("the workers exit once their parent is gone");
    assert!(!stderr.to_lowercase().contains("broken pipe"), "{stderr}");
}

/// A run is judged on its measured window: a rate limit the warmup used up leaves the window
/// nothing but 429s, and the run fails (exit 1, its result still printed) although the warmup
/// got events accepted. For a write scenario and for e2e's publisher alike.
#[test]
fn a_window_with_nothing_accepted_fails_even_after_a_good_warmup() {
    let server = Server::start_with(&["--auth", "--admin-token", "admin-secret"]);
    // 20 events a minute per namespace: the warmup (50 due at 100/s) uses them all.
    ureq::put(&format!("{}/api/admin/config", server.url))
        .set("Authorization", "Bearer admin-secret")
        .timeout(Duration::from_secs(10))
        .send_string(r#"{"rate_limit_enabled":true,"rate_limit_per_namespace_per_minute":20}"#)
        .expect("set the rate limit");
    let timing = ["--rate", "100", "--warmup", "0.5", "--duration", "0.5"];
    for (scenario, namespace) in [("ingest", "acme"), ("e2e", "beta")] {
        let token = register(&server, namespace);
        let mut args = vec![scenario, "--url", &server.url, "--token", &token];
        args.extend(["--namespace", namespace]);
        args.extend(if scenario == "e2e" {
            ["-s", "2"]
        } else {
            ["-c", "1"]
        });
        args.extend(timing);
        let (status, stdout, stderr) = run_loadtest(&args);
        assert_eq!(status.code(), Some(1), "{scenario}: {stdout} {stderr}");
        let result = single_json(&stdout);
        assert!(u64_at(&result, "/total/events") > 0, "{result}");
        assert_eq!(u64_at(&result, "/events"), 0, "{result}");
        assert!(u64_at(&result, "/errors_by_status/429") > 0, "{result}");
        let what = if scenario == "e2e" {
            "publish"
        } else {
            "event"
        };
        assert!(
            stderr.contains(&format!("no {what} was accepted in the measured window"))
                && stderr.contains("rate limit exceeded"),
            "{stderr}"
        );
    }
}

/// An e2e whose every subscriber the server closed measured nothing worth a success: exit 1,
/// its result still printed.
#[test]
fn e2e_fails_when_the_server_closes_every_subscriber() {
    let mut server = Server::start();
    let mut child = spawn_loadtest(
        &[
            "e2e",
            "--url",
            &server.url,
            "-s",
            "2",
            "--rate",
            "100",
            "--duration",
            "20",
            "--warmup",
            "0",
            "--drain-ms",
            "500",
        ],
        Stdio::piped(),
    );
    // Publishing has begun (the sync probes write `e2e-0` only): the window has accepted
    // events. Then the server goes, and every subscriber's socket with it.
    let published = format!("{}/api/state/entities/loadtest/e2e-1", server.url);
    let deadline = Instant::now() + Duration::from_secs(20);
    while ureq::get(&published)
        .timeout(Duration::from_secs(2))
        .call()
        .is_err()
    {
        assert!(Instant::now() < deadline, "the publisher never published");
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = server.child.kill();
    let _ = server.child.wait();
    let mut stderr = child.stderr.take().expect("stderr");
    let err = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let mut stdout = child.stdout.take().expect("stdout");
    let status = wait_with_deadline(&mut child, RUN_TIMEOUT).expect("the run ends");
    let mut out = String::new();
    stdout.read_to_string(&mut out).expect("read stdout");
    let stderr = err.join().expect("stderr reader");
    assert_eq!(status.code(), Some(1), "{out} {stderr}");
    let result = single_json(&out);
    assert!(u64_at(&result, "/events") > 0, "{result}");
    assert_eq!(u64_at(&result, "/subscribers/connected"), 2, "{result}");
    assert_eq!(
        u64_at(&result, "/subscribers/closed_by_server"),
        2,
        "{result}"
    );
    assert!(
        stderr.contains("the server closed every subscriber"),
        "{stderr}"
    );
}

/// The open-loop flags mean nothing without `--rate`: refused, naming the flag.
#[test]
fn open_loop_flags_without_a_rate_are_usage_errors() {
    for (scenario, flag) in [
        ("ingest", "--max-in-flight"),
        ("ingest", "--drop-after-ms"),
        ("ingest-batch", "--late-ms"),
    ] {
        let (status, stdout, stderr) = run_loadtest(&[scenario, flag, "5"]);
        assert_eq!(status.code(), Some(2), "{scenario} {flag}: {stderr}");
        assert!(stdout.trim().is_empty(), "{stdout}");
        assert!(
            stderr.contains(&format!("{flag} is for an open loop: give --rate too")),
            "{stderr}"
        );
    }
    let (status, _, stderr) = run_loadtest(&["ingest", "--ca-cert", "ca.pem"]);
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("--ca-cert is for https:// URLs"),
        "{stderr}"
    );
}

/// A `--server-pid` that is not the server (here a `sleep`, as a `timeout` wrapper's would be)
/// is warned about once; the run goes on. The server's own pid is not.
#[test]
fn a_server_pid_that_is_not_flux_is_warned_about() {
    let server = Server::start();
    let mut sleeper = Command::new("sleep")
        .arg("30")
        .stdin(Stdio::null())
        .spawn()
        .expect("start sleep");
    let run = |pid: u32| {
        let pid = pid.to_string();
        run_loadtest(&[
            "ingest",
            "--url",
            &server.url,
            "-c",
            "1",
            "--duration",
            "0.3",
            "--warmup",
            "0",
            "--server-pid",
            &pid,
        ])
    };
    let (status, stdout, stderr) = run(sleeper.id());
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    assert!(status.success(), "{status}: {stderr}");
    assert_eq!(stderr.matches("warning").count(), 1, "{stderr}");
    assert!(
        stderr.contains(&format!("--server-pid {} is \"sleep\"", sleeper.id())),
        "{stderr}"
    );
    assert_eq!(
        u64_at(&single_json(&stdout), "/server/pid"),
        u64::from(sleeper.id())
    );
    let (status, _, stderr) = run(server.pid());
    assert!(status.success(), "{status}: {stderr}");
    assert!(!stderr.contains("warning"), "{stderr}");
}

/// A refused server certificate is explained: not trusted (a certificate no root vouches for,
/// or one marked as a CA's), or not naming the URL's host; and what `--ca-cert` takes. For the
/// HTTP and the WebSocket clients alike.
#[test]
fn an_untrusted_certificate_says_what_to_give() {
    let server = Server::start();
    let tls = TlsTerminator::start(server.port);
    let marked_ca = TlsTerminator::start_with(server.port, &[]);
    let cert = tls.cert.to_str().expect("UTF-8 path");
    let by_name = tls.url.replace("127.0.0.1", "localhost");
    let short = ["--duration", "0.5", "--warmup", "0", "-c", "1"];
    for (url, ca_cert, wanted) in [
        (
            &tls.url,
            None,
            "the server's certificate is not trusted (UnknownIssuer)",
        ),
        (
            &marked_ca.url,
            None,
            "CaUsedAsEndEntity: it is marked as a CA's",
        ),
        (
            &by_name,
            Some(cert),
            "the server's certificate does not name localhost",
        ),
    ] {
        let mut args = vec!["ingest", "--url", url];
        args.extend(ca_cert.map(|cert| ["--ca-cert", cert]).iter().flatten());
        args.extend(short);
        let (status, stdout, stderr) = run_loadtest(&args);
        assert_eq!(status.code(), Some(1), "{args:?}: {stdout} {stderr}");
        let error = single_json(&stdout)["error"].to_string();
        assert!(
            error.contains(wanted)
                && error.contains("--ca-cert takes a PEM file with the server's certificate"),
            "{error}"
        );
    }
    let (status, _, stderr) = run_loadtest(&[
        "e2e",
        "--url",
        &tls.url,
        "-s",
        "1",
        "--duration",
        "0.5",
        "--warmup",
        "0",
    ]);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("the server's certificate is not trusted")
            && stderr.contains("--ca-cert takes"),
        "{stderr}"
    );
}
