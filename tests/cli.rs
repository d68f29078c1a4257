//! Black-box tests of the user CLI (`flux publish`, `get`, `list`, `batch`, `delete`,
//! `batch-delete`, `history`, `watch`, `namespaces`, `admin-config`, `connectors`, `health`):
//! each runs the real `flux` binary as a user would, with `FLUX_URL` / `FLUX_TOKEN`, against a
//! real server started by the harness, and checks stdout, stderr and the exit code
//! (0 success, 1 HTTP error, 2 usage error, 3 connection failure).
//!
//! `https://` URLs (`--ca-cert`, `watch` over `wss://`) are tested through the load
//! generator's TLS terminator (`loadtest/tests/support/`) in front of the plain-HTTP server.
//!
//! Every run of the CLI has a deadline; a run that overruns is killed and the test fails.

#[path = "../loadtest/tests/support/tls_terminator.rs"]
mod tls_terminator;
mod util;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tls_terminator::TlsTerminator;
use util::*;

/// Longest a CLI run may take.
const RUN_TIMEOUT: Duration = Duration::from_secs(20);
/// The CLI's bound on each read or write of `watch`'s WebSocket handshake.
const CLI_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What one run of the CLI produced.
#[derive(Debug)]
struct Run {
    /// `None` when the process was ended by a signal.
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    /// Asserts exit 0 and returns stdout as JSON.
    fn ok_json(&self) -> Value {
        assert_eq!(self.code, Some(0), "CLI failed: {self:?}");
        serde_json::from_str(self.stdout.trim())
            .unwrap_or_else(|e| panic!("stdout is not one JSON document ({e}): {self:?}"))
    }

    /// Asserts exit 1 and returns the server's error message from stderr.
    fn http_error(&self) -> String {
        assert_eq!(self.code, Some(1), "wanted an HTTP error: {self:?}");
        assert!(self.stdout.is_empty(), "stdout on failure: {self:?}");
        let body: Value = serde_json::from_str(self.stderr.trim())
            .unwrap_or_else(|e| panic!("stderr is not the server's JSON error ({e}): {self:?}"));
        error_message(&body)
    }
}

/// A CLI invocation: arguments, environment, optional stdin.
struct Cli {
    args: Vec<String>,
    env: Vec<(String, String)>,
    stdin: Option<String>,
}

impl Cli {
    /// `flux <args>` pointed at `url` (through `FLUX_URL`), with no other `FLUX_*` variable.
    fn new(url: &str, args: &[&str]) -> Cli {
        Cli {
            args: args.iter().map(|a| a.to_string()).collect(),
            env: vec![("FLUX_URL".to_string(), url.to_string())],
            stdin: None,
        }
    }

    fn env(mut self, name: &str, value: &str) -> Cli {
        self.env.push((name.to_string(), value.to_string()));
        self
    }

    fn stdin(mut self, text: &str) -> Cli {
        self.stdin = Some(text.to_string());
        self
    }

    fn spawn(&self) -> Child {
        let mut command = Command::new(env!("CARGO_BIN_EXE_flux"));
        command.args(&self.args);
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("FLUX_") {
                command.env_remove(&name);
            }
        }
        command.envs(self.env.iter().map(|(k, v)| (k, v)));
        command
            .stdin(if self.stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command.spawn().expect("spawn flux");
        if let (Some(text), Some(mut pipe)) = (self.stdin.clone(), child.stdin.take()) {
            thread::spawn(move || {
                let _ = pipe.write_all(text.as_bytes());
            });
        }
        child
    }

    /// Runs to completion within `RUN_TIMEOUT`.
    fn run(&self) -> Run {
        finish(self.spawn(), RUN_TIMEOUT, &self.args)
    }
}

/// Waits for `child` (at most `limit`, then kills it and fails) and collects its output.
fn finish(mut child: Child, limit: Duration, args: &[String]) -> Run {
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let deadline = Instant::now() + limit;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "flux {args:?} did not finish within {limit:?}\n--- stdout ---\n{}\n\
                     --- stderr ---\n{}",
                    stdout.join().unwrap_or_default(),
                    stderr.join().unwrap_or_default()
                );
            }
            Err(e) => panic!("try_wait: {e}"),
        }
    };
    Run {
        code: status.code(),
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    }
}

/// Reads a pipe to its end on a thread.
fn drain(pipe: Option<impl Read + Send + 'static>) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut bytes = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut bytes);
        }
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

/// `flux <args>` against `server`, without a token.
fn flux(server: &Server, args: &[&str]) -> Run {
    Cli::new(server.url(), args).run()
}

/// The ids of a `flux list` reply, without the built-in `flux-core/` entities.
fn ids(list: &Value) -> Vec<String> {
    list.as_array()
        .unwrap_or_else(|| panic!("list reply is not an array: {list}"))
        .iter()
        .filter_map(|e| e["id"].as_str())
        .filter(|id| !id.starts_with("flux-core/"))
        .map(str::to_string)
        .collect()
}

#[test]
fn publish_then_get() {
    let server = Server::start();
    let before = now_ms();
    let reply = flux(
        &server,
        &[
            "publish",
            "sensors",
            "agent-01",
            "acme/site-3/pump-01",
            r#"{"temperature":22.5,"unit":"celsius"}"#,
        ],
    )
    .ok_json();
    assert_eq!(reply["stream"], "sensors", "{reply}");
    assert!(reply["eventId"].as_str().is_some_and(is_uuid_v7), "{reply}");

    flux(
        &server,
        &[
            "publish",
            "sensors",
            "agent-02",
            "acme/site-3/pump-01",
            r#"{"temperature":23}"#,
        ],
    )
    .ok_json();
    let entity = flux(&server, &["get", "acme/site-3/pump-01"]).ok_json();
    assert_eq!(entity["id"], "acme/site-3/pump-01");
    assert_eq!(
        entity["properties"],
        json!({"temperature": 23, "unit": "celsius"})
    );

    // The timestamp is generated: now, in milliseconds.
    let events = history_items(&flux(&server, &["history", "acme/site-3/pump-01"]).ok_json());
    assert_eq!(events.len(), 2, "{events:?}");
    for event in &events {
        let timestamp = event["timestamp"].as_i64().unwrap_or_default();
        assert!(
            timestamp >= before - 1000 && timestamp <= now_ms() + 1000,
            "timestamp {timestamp} is not now: {event}"
        );
    }
}

#[test]
fn publish_options_are_stored() {
    let server = Server::start();
    let reply = flux(
        &server,
        &[
            "publish",
            "sensors",
            "agent-01",
            "acme/sensor-01",
            r#"{"on":true}"#,
            "--event-id",
            "evt-1",
            "--key",
            "k1",
            "--schema",
            "reading.v1",
        ],
    )
    .ok_json();
    assert_eq!(reply["eventId"], "evt-1", "{reply}");
    let events = history_items(&flux(&server, &["history", "acme/sensor-01"]).ok_json());
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["eventId"], "evt-1");
    assert_eq!(events[0]["key"], "k1");
    assert_eq!(events[0]["schema"], "reading.v1");
}

/// An empty entity id is a usage error (exit 2) for every command that takes one, and so is an
/// empty `watch` pattern.
#[test]
fn empty_entity_ids_are_usage_errors() {
    let server = Server::start();
    for args in [
        &["get", ""][..],
        &["delete", ""],
        &["history", ""],
        &["watch", ""],
    ] {
        let run = flux(&server, args);
        assert_eq!(run.code, Some(2), "{args:?}: {run:?}");
        assert!(run.stderr.contains("empty"), "{args:?}: {run:?}");
    }
}

#[test]
fn publish_with_bad_json_is_a_usage_error() {
    let server = Server::start();
    for properties in ["{not json", "[1,2]"] {
        let run = flux(&server, &["publish", "s", "a", "acme/x", properties]);
        assert_eq!(run.code, Some(2), "{run:?}");
        assert!(run.stderr.contains("properties_json"), "{run:?}");
    }
    let run = flux(&server, &["publish", "s", "a"]);
    assert_eq!(run.code, Some(2), "missing arguments: {run:?}");
    let run = flux(&server, &["batch", "{\"nope\": 1}"]);
    assert_eq!(run.code, Some(2), "{run:?}");
    // Nothing was published.
    assert_eq!(server.list_ids(""), Vec::<String>::new());
}

#[test]
fn list_with_prefix_namespace_and_pages() {
    let server = Server::start();
    for id in ["acme/a", "acme/b", "acme/site-3/c", "other/d"] {
        flux(&server, &["publish", "sensors", "t", id, r#"{"n":1}"#]).ok_json();
    }
    let all = flux(&server, &["list"]).ok_json();
    assert_eq!(ids(&all), ["acme/a", "acme/b", "acme/site-3/c", "other/d"]);
    let acme = flux(&server, &["list", "--prefix", "acme/site-3/"]).ok_json();
    assert_eq!(ids(&acme), ["acme/site-3/c"]);
    let other = flux(&server, &["list", "--namespace", "other"]).ok_json();
    assert_eq!(ids(&other), ["other/d"]);
    let page = flux(
        &server,
        &[
            "list", "--prefix", "acme/", "--limit", "1", "--after", "acme/a",
        ],
    )
    .ok_json();
    assert_eq!(ids(&page), ["acme/b"]);

    let run = flux(&server, &["list", "--prefix", "a", "--namespace", "b"]);
    assert_eq!(run.code, Some(2), "--prefix with --namespace: {run:?}");
}

#[test]
fn batch_from_argument_and_stdin() {
    let server = Server::start();
    // A `null` timestamp counts as none: it is filled in too.
    let array = json!([
        {"stream": "sensors", "source": "agent-01", "timestamp": null,
         "payload": {"entity_id": "acme/sensor-01", "properties": {"temp": 22}}},
        {"stream": "sensors", "source": "agent-01", "timestamp": TS,
         "payload": {"entity_id": "acme/sensor-02", "properties": {"temp": 23}}},
    ]);
    let reply = flux(&server, &["batch", &array.to_string()]).ok_json();
    assert_eq!(reply["successful"], 2, "{reply}");
    assert_eq!(reply["failed"], 0, "{reply}");
    assert_eq!(server.props("acme/sensor-01"), json!({"temp": 22}));
    assert_eq!(server.props("acme/sensor-02"), json!({"temp": 23}));
    // A timestamp that was given is kept.
    assert_eq!(
        server.history("acme/sensor-02", "&since=2024-01-01T00:00:00Z")[0]["timestamp"],
        TS
    );

    let wrapped = json!({"events": [
        {"stream": "sensors", "source": "agent-02",
         "payload": {"entity_id": "acme/sensor-03", "properties": {"temp": 24}}},
        {"stream": "BAD STREAM", "source": "agent-02",
         "payload": {"entity_id": "acme/sensor-04", "properties": {"temp": 25}}},
    ]});
    let run = Cli::new(server.url(), &["batch", "-"])
        .stdin(&wrapped.to_string())
        .run();
    let reply = run.ok_json();
    assert_eq!(reply["successful"], 1, "{reply}");
    assert_eq!(reply["failed"], 1, "{reply}");
    assert_eq!(server.props("acme/sensor-03"), json!({"temp": 24}));
    assert_eq!(server.entity("acme/sensor-04").0, 404);
}

#[test]
fn delete_then_get_fails_with_the_servers_error() {
    let server = Server::start();
    flux(
        &server,
        &["publish", "s", "a", "test/old-entity", r#"{"x":1}"#],
    )
    .ok_json();
    let reply = flux(&server, &["delete", "test/old-entity"]).ok_json();
    assert_eq!(reply["entity_id"], "test/old-entity", "{reply}");

    let message = flux(&server, &["get", "test/old-entity"]).http_error();
    assert!(message.contains("not found"), "{message}");
    let message = flux(&server, &["delete", "test/old-entity"]).http_error();
    assert!(!message.is_empty());
}

#[test]
fn batch_delete_by_prefix_ids_and_namespace() {
    let server = Server::start();
    for id in [
        "acme/tmp-1",
        "acme/tmp-2",
        "acme/keep",
        "other/a",
        "other/b",
        "third/x",
    ] {
        server.put(id, json!({"n": 1}));
    }
    let reply = flux(&server, &["batch-delete", "--prefix", "acme/tmp-"]).ok_json();
    assert_eq!(reply["deleted"], 2, "{reply}");
    assert_eq!(
        server.list_ids(""),
        ["acme/keep", "other/a", "other/b", "third/x"]
    );

    let reply = flux(&server, &["batch-delete", "--ids", "acme/keep,third/x"]).ok_json();
    assert_eq!(reply["deleted"], 2, "{reply}");
    assert_eq!(server.list_ids(""), ["other/a", "other/b"]);

    let reply = flux(&server, &["batch-delete", "--namespace", "other"]).ok_json();
    assert_eq!(reply["deleted"], 2, "{reply}");
    assert_eq!(server.list_ids(""), Vec::<String>::new());

    // The request body itself, as flux.sh batch-delete takes it.
    for id in ["acme/tmp-3", "acme/keep"] {
        server.put(id, json!({"n": 1}));
    }
    let reply = flux(&server, &["batch-delete", r#"{"prefix":"acme/tmp-"}"#]).ok_json();
    assert_eq!(reply["deleted"], 1, "{reply}");
    assert_eq!(server.list_ids(""), ["acme/keep"]);
    let reply = flux(
        &server,
        &["batch-delete", r#"{"entity_ids":["acme/keep"]}"#],
    )
    .ok_json();
    assert_eq!(reply["deleted"], 1, "{reply}");
    let run = flux(&server, &["batch-delete", "{not json"]);
    assert_eq!(run.code, Some(2), "a filter that is not JSON: {run:?}");
    let run = flux(
        &server,
        &["batch-delete", r#"{"prefix":"a"}"#, "--prefix", "b"],
    );
    assert_eq!(run.code, Some(2), "a filter and a flag: {run:?}");
    let run = flux(&server, &["batch-delete", r#"{"color":"red"}"#]);
    assert_eq!(run.code, Some(1), "a filter the server refuses: {run:?}");

    let run = flux(&server, &["batch-delete"]);
    assert_eq!(run.code, Some(2), "no selector: {run:?}");
    let run = flux(
        &server,
        &["batch-delete", "--prefix", "a", "--namespace", "b"],
    );
    assert_eq!(run.code, Some(2), "two selectors: {run:?}");
}

#[test]
fn history_with_limit_and_since() {
    let server = Server::start();
    for n in 1..=3 {
        flux(
            &server,
            &["publish", "s", "a", "acme/h", &format!(r#"{{"n":{n}}}"#)],
        )
        .ok_json();
    }
    let events = history_items(&flux(&server, &["history", "acme/h", "--limit", "2"]).ok_json());
    assert_eq!(events.len(), 2, "{events:?}");
    assert_eq!(
        events[0]["payload"]["properties"]["n"], 3,
        "newest first: {events:?}"
    );
    assert_eq!(events[1]["payload"]["properties"]["n"], 2, "{events:?}");

    let future = format_iso_millis(now_ms() + 3_600_000);
    let events =
        history_items(&flux(&server, &["history", "acme/h", "--since", &future]).ok_json());
    assert!(events.is_empty(), "{events:?}");
    let past = format_iso_millis(now_ms() - 3_600_000);
    let events = history_items(&flux(&server, &["history", "acme/h", "--since", &past]).ok_json());
    assert_eq!(events.len(), 3, "{events:?}");
}

#[test]
fn health_and_connectors() {
    let server = Server::start();
    let reply = flux(&server, &["health"]).ok_json();
    assert_eq!(reply["status"], "ok", "{reply}");
    flux(&server, &["connectors"]).ok_json();
    let message = flux(&server, &["connectors", "no-such-connector"]).http_error();
    assert!(!message.is_empty());
}

#[test]
fn admin_config_read_and_update() {
    let server = Server::start();
    let config = flux(&server, &["admin-config"]).ok_json();
    assert_eq!(
        config["rate_limit_per_namespace_per_minute"], 10_000,
        "{config}"
    );

    let reply = flux(
        &server,
        &[
            "admin-config",
            r#"{"rate_limit_per_namespace_per_minute": 5000}"#,
        ],
    )
    .ok_json();
    assert_eq!(
        reply["rate_limit_per_namespace_per_minute"], 5000,
        "{reply}"
    );
    let config = flux(&server, &["admin-config"]).ok_json();
    assert_eq!(
        config["rate_limit_per_namespace_per_minute"], 5000,
        "{config}"
    );
    assert_eq!(
        config["body_size_limit_single_bytes"], SINGLE_LIMIT,
        "{config}"
    );

    let run = flux(&server, &["admin-config", "{oops"]);
    assert_eq!(run.code, Some(2), "{run:?}");
}

#[test]
fn auth_mode_tokens() {
    let server = Server::start_args(&["--auth", "--admin-token", "adm"]);
    let url = server.url();

    let message = flux(&server, &["namespaces", "register", "acme"]).http_error();
    assert!(message.contains("admin token"), "{message}");
    let acme = Cli::new(url, &["namespaces", "register", "acme"])
        .env("FLUX_ADMIN_TOKEN", "adm")
        .run()
        .ok_json();
    assert_eq!(acme["name"], "acme", "{acme}");
    let acme_token = acme["token"].as_str().expect("a token").to_string();
    let other = Cli::new(
        url,
        &["namespaces", "register", "other", "--admin-token", "adm"],
    )
    .run()
    .ok_json();
    let other_token = other["token"].as_str().expect("a token").to_string();
    let info = flux(&server, &["namespaces", "get", "acme"]).ok_json();
    assert_eq!(info["namespaceId"], acme["namespaceId"], "{info}");

    let publish = [
        "publish",
        "sensors",
        "agent-01",
        "acme/sensor-01",
        r#"{"t":1}"#,
    ];
    Cli::new(url, &publish)
        .env("FLUX_TOKEN", &acme_token)
        .run()
        .ok_json();
    assert_eq!(server.props("acme/sensor-01"), json!({"t": 1}));

    let message = flux(&server, &publish).http_error();
    assert!(message.contains("token"), "401 text: {message}");
    let message = Cli::new(url, &publish)
        .env("FLUX_TOKEN", &other_token)
        .run()
        .http_error();
    assert!(message.contains("namespace"), "403 text: {message}");
    let message = Cli::new(url, &publish)
        .env("FLUX_TOKEN", "not-a-token")
        .run()
        .http_error();
    assert!(message.contains("unknown token"), "{message}");

    // Reads stay open. The config is read with a namespace's token (as the skill script
    // does with FLUX_TOKEN) or the admin's; changing it needs the admin's.
    flux(&server, &["get", "acme/sensor-01"]).ok_json();
    flux(&server, &["admin-config"]).http_error();
    Cli::new(url, &["admin-config"])
        .env("FLUX_TOKEN", &acme_token)
        .run()
        .ok_json();
    let change = [
        "admin-config",
        r#"{"rate_limit_per_namespace_per_minute":5000}"#,
    ];
    let message = Cli::new(url, &change)
        .env("FLUX_TOKEN", &acme_token)
        .run()
        .http_error();
    assert!(message.contains("admin token"), "{message}");
    Cli::new(url, &["admin-config"])
        .env("FLUX_ADMIN_TOKEN", "adm")
        .run()
        .ok_json();

    // Deleting a namespace takes the admin token, prints nothing, and the name is gone.
    let message = flux(&server, &["namespaces", "delete", "other"]).http_error();
    assert!(message.contains("admin token"), "{message}");
    let run = Cli::new(url, &["namespaces", "delete", "other"])
        .env("FLUX_ADMIN_TOKEN", "adm")
        .run();
    assert_eq!((run.code, run.stdout.as_str()), (Some(0), ""), "{run:?}");
    flux(&server, &["namespaces", "get", "other"]).http_error();
}

#[test]
fn watch_prints_updates_published_meanwhile() {
    let server = Server::start();
    let args = ["watch", "acme/*", "--count", "2"];
    let mut watcher = Cli::new(server.url(), &args).spawn();

    // A subscribe has no reply, so keep publishing (to a matching and a non-matching entity)
    // until the watcher has seen its two updates and exited.
    let deadline = Instant::now() + RUN_TIMEOUT;
    let mut n = 0;
    while Instant::now() < deadline && matches!(watcher.try_wait(), Ok(None)) {
        n += 1;
        server.put("other/ignored", json!({"n": n}));
        server.put(&format!("acme/site-{n}/pump"), json!({"n": n}));
        thread::sleep(Duration::from_millis(100));
    }
    let run = finish(watcher, Duration::from_secs(5), &[]);
    assert_eq!(run.code, Some(0), "{run:?}");
    let lines: Vec<Value> = run
        .stdout
        .lines()
        .map(|line| {
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"))
        })
        .collect();
    assert_eq!(lines.len(), 2, "{run:?}");
    for message in &lines {
        assert_eq!(message["type"], "state_update", "{message}");
        assert_eq!(message["property"], "n", "{message}");
        let id = message["entity_id"].as_str().unwrap_or_default();
        assert!(id.starts_with("acme/"), "{message}");
    }
}

/// The server's messages are printed as they came: numbers beyond a double, trailing zeros and
/// exponents keep their exact text (a parse and re-print would change or drop them).
#[test]
fn watch_prints_values_exactly_as_sent() {
    let server = Server::start();
    let args = ["watch", "exact/*", "--count", "3"];
    let watcher = Cli::new(server.url(), &args).spawn();
    let body = br#"{"stream":"s","source":"a","timestamp":1764000000000,
        "payload":{"entity_id":"exact/x","properties":
        {"big":123456789012345678901234567890,"f":1.10,"e":1e400}}}"#;
    let run = publish_until_it_exits(&server, watcher, body);
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{run:?}");
    for line in lines {
        let wanted = if line.contains(r#""property":"big""#) {
            r#""value":123456789012345678901234567890"#
        } else if line.contains(r#""property":"f""#) {
            r#""value":1.10"#
        } else {
            r#""value":1e400"#
        };
        assert!(line.contains(wanted), "{line} lacks {wanted}");
    }
}

/// Publishes the event `body` every 100 ms (a subscribe has no reply, so an event may come
/// before the server took it) until `watcher` exits, which it must do with exit 0.
fn publish_until_it_exits(server: &Server, mut watcher: Child, body: &[u8]) -> Run {
    let deadline = Instant::now() + RUN_TIMEOUT;
    while Instant::now() < deadline && matches!(watcher.try_wait(), Ok(None)) {
        let reply = server.post_raw("/api/events", body);
        assert_eq!(reply.status, 200, "{reply:?}");
        thread::sleep(Duration::from_millis(100));
    }
    let run = finish(watcher, Duration::from_secs(5), &[]);
    assert_eq!(run.code, Some(0), "{run:?}");
    run
}

/// `flux watch … | head -1`: once stdout's reader is gone, watch ends without waiting for the
/// next message (the server stays quiet after the one update read).
#[test]
fn watch_ends_when_its_reader_goes_away() {
    let server = Server::start();
    watch_until_the_reader_goes_away(&server, Cli::new(server.url(), &["watch", "gone/*"]));
}

/// As [`watch_ends_when_its_reader_goes_away`], over `wss://`: the read timeouts that let watch
/// look at stdout are on the socket under the TLS session.
#[test]
fn watch_over_wss_ends_when_its_reader_goes_away() {
    let server = Server::start();
    let tls = TlsTerminator::start(server.port());
    let cert = tls.cert.to_str().expect("UTF-8 path");
    let args = ["watch", "gone/*", "--ca-cert", cert];
    watch_until_the_reader_goes_away(&server, Cli::new(&tls.url, &args));
}

/// The line `watch` prints when subscribed does not echo credentials the URL carries.
#[test]
fn watch_does_not_print_the_url_credentials() {
    let server = Server::start();
    let url = format!("http://user:s3cret@127.0.0.1:{}", server.port());
    let mut watcher = Cli::new(&url, &["watch", "creds/*"]).spawn();
    let mut stderr = BufReader::new(watcher.stderr.take().expect("stderr"));
    let mut said = String::new();
    let read = stderr.read_line(&mut said);
    let _ = watcher.kill();
    let _ = watcher.wait();
    read.expect("stderr");
    assert!(said.contains("watching"), "{said}");
    assert!(!said.contains("s3cret") && !said.contains("user"), "{said}");
    assert!(
        said.contains(&format!("127.0.0.1:{}", server.port())),
        "{said}"
    );
}

/// Runs `watcher` (a `watch "gone/*"`), reads one line of its stdout, drops the pipe as
/// `head -1` does, and checks that watch then ends by itself with exit 0.
fn watch_until_the_reader_goes_away(server: &Server, watcher: Cli) {
    let mut watcher = watcher.spawn();
    let mut stderr = BufReader::new(watcher.stderr.take().expect("stderr"));
    let mut said = String::new();
    stderr.read_line(&mut said).expect("stderr");
    assert!(said.contains("watching"), "{said}");
    thread::spawn(move || std::io::copy(&mut stderr, &mut std::io::sink()));
    let mut stdout = BufReader::new(watcher.stdout.take().expect("stdout"));
    let (lines, line) = std::sync::mpsc::channel();
    thread::spawn(move || {
        let mut text = String::new();
        let _ = stdout.read_line(&mut text);
        let _ = lines.send(text);
        // `stdout`, the pipe's only reader, is dropped here, as `head -1` exits.
    });
    // The subscribe is on its way once watch says so; one update, published again only if the
    // first came before the server took the subscription.
    let mut published = 0;
    let text = loop {
        published += 1;
        server.put("gone/a", json!({"n": published}));
        if let Ok(text) = line.recv_timeout(Duration::from_secs(2)) {
            break text;
        }
        assert!(published < 5, "watch printed nothing");
    };
    assert!(text.contains("gone/a"), "{text}");
    let run = finish(watcher, Duration::from_secs(10), &[]);
    assert_eq!(run.code, Some(0), "{run:?}");
}

#[test]
fn watch_prints_deletes() {
    let server = Server::start();
    let args = ["watch", "acme/doomed", "--count", "4"];
    let mut watcher = Cli::new(server.url(), &args).spawn();
    // Each round is an update then a delete, so any 4 messages in a row hold both kinds.
    let deadline = Instant::now() + RUN_TIMEOUT;
    let mut n = 0;
    while Instant::now() < deadline && matches!(watcher.try_wait(), Ok(None)) {
        n += 1;
        server.put("acme/doomed", json!({"n": n}));
        let (status, body) = server.delete("/api/state/entities/acme/doomed");
        assert_eq!(status, 200, "{body}");
        thread::sleep(Duration::from_millis(100));
    }
    let run = finish(watcher, Duration::from_secs(5), &[]);
    assert_eq!(run.code, Some(0), "{run:?}");
    let kinds: Vec<String> = run
        .stdout
        .lines()
        .map(|line| {
            let message: Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
            assert_eq!(message["entity_id"], "acme/doomed", "{message}");
            message["type"].as_str().unwrap_or_default().to_string()
        })
        .collect();
    assert_eq!(kinds.len(), 4, "{run:?}");
    assert!(kinds.iter().any(|k| k == "entity_deleted"), "{kinds:?}");
    assert!(kinds.iter().any(|k| k == "state_update"), "{kinds:?}");
}

/// The server deletes at most 10,000 entities a call; the CLI calls again while more match and
/// prints the sum.
#[test]
fn batch_delete_goes_on_past_10000_matches() {
    let server = Server::start();
    let events: Vec<Value> = (0..10_050)
        .map(|i| event(&format!("bulk/e{i}"), json!({"i": i})))
        .collect();
    let (status, reply) = server.post("/api/events/batch", &json!(events));
    assert_eq!((status, &reply["failed"]), (200, &json!(0)), "{reply}");
    let reply = flux(&server, &["batch-delete", "--prefix", "bulk/"]).ok_json();
    assert_eq!(reply["deleted"], 10_050, "{reply}");
    assert_eq!(reply["failed"], 0, "{reply}");
    assert!(reply.get("remaining").is_none(), "{reply}");
    assert!(server.list_ids("?prefix=bulk/").is_empty());
}

/// A server in auth mode (admin token `adm`) with `namespace` registered through the CLI,
/// and that namespace's token.
fn auth_server_with(namespace: &str) -> (Server, String) {
    let server = Server::start_args(&["--auth", "--admin-token", "adm"]);
    let registered = Cli::new(server.url(), &["namespaces", "register", namespace])
        .env("FLUX_ADMIN_TOKEN", "adm")
        .run()
        .ok_json();
    let token = registered["token"].as_str().expect("a token").to_string();
    (server, token)
}

/// A rate-limited write says on stderr how long to wait (the server's `Retry-After`).
#[test]
fn a_rate_limited_write_says_when_to_retry() {
    let (server, token) = auth_server_with("acme");
    let url = server.url();
    Cli::new(
        url,
        &[
            "admin-config",
            r#"{"rate_limit_per_namespace_per_minute": 1}"#,
        ],
    )
    .env("FLUX_ADMIN_TOKEN", "adm")
    .run()
    .ok_json();
    let publish = ["publish", "s", "a", "acme/x", r#"{"n":1}"#];
    Cli::new(url, &publish)
        .env("FLUX_TOKEN", &token)
        .run()
        .ok_json();
    let run = Cli::new(url, &publish).env("FLUX_TOKEN", &token).run();
    assert_eq!(run.code, Some(1), "{run:?}");
    let mut lines = run.stderr.lines();
    let body: Value = serde_json::from_str(lines.next().unwrap_or_default()).expect("JSON body");
    assert!(error_message(&body).contains("rate"), "{run:?}");
    let retry = lines.next().unwrap_or_default();
    assert!(
        retry.starts_with("flux: retry after ") && retry.ends_with(" s"),
        "{run:?}"
    );
}

/// Properties too large for an argument come from stdin with `-`.
#[test]
fn publish_reads_large_properties_from_stdin() {
    let server = Server::start();
    let big = "x".repeat(300_000);
    let properties = json!({"blob": big, "n": 12345678901234567890u64}).to_string();
    Cli::new(server.url(), &["publish", "s", "a", "stdin/x", "-"])
        .stdin(&format!("{properties}\n"))
        .run()
        .ok_json();
    let props = server.props("stdin/x");
    assert_eq!(props["blob"].as_str().map(str::len), Some(300_000));
    assert_eq!(props["n"], json!(12345678901234567890u64));
}

#[test]
fn connection_refused_exits_3() {
    let url = format!("http://127.0.0.1:{}", free_port());
    for args in [
        vec!["health"],
        vec!["get", "acme/x"],
        vec!["publish", "s", "a", "acme/x", "{}"],
        vec!["watch", "*", "--count", "1"],
    ] {
        let run = Cli::new(&url, &args).run();
        assert_eq!(run.code, Some(3), "{args:?}: {run:?}");
        assert!(run.stdout.is_empty(), "{run:?}");
        assert_eq!(
            run.stderr,
            format!("flux: cannot reach {url}: connection refused\n"),
            "{args:?}"
        );
    }
}

#[test]
fn a_connection_reset_is_said_once() {
    // Takes each connection, reads one byte of the request and drops it: closing a socket
    // with unread bytes answers the client with a reset.
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("local_addr"));
    thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            let _ = stream.read(&mut [0u8; 1]);
        }
    });
    for args in [vec!["health"], vec!["watch", "*"]] {
        let run = Cli::new(&url, &args).run();
        assert_eq!(run.code, Some(3), "{args:?}: {run:?}");
        assert_eq!(
            run.stderr,
            format!("flux: cannot reach {url}: connection reset by the server\n"),
            "{args:?}"
        );
    }
}

/// A server that answers every request with `reply` (after reading its head) and closes;
/// counts the requests it gets. Stands for what may sit at a URL instead of Flux: a
/// redirecting front, a proxy's error page.
fn answering(reply: Vec<u8>) -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("local_addr"));
    let seen = Arc::new(AtomicUsize::new(0));
    let counter = seen.clone();
    thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            counter.fetch_add(1, Ordering::SeqCst);
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && stream.read(&mut byte).is_ok_and(|n| n == 1) {
                head.push(byte[0]);
            }
            let _ = stream.write_all(&reply);
        }
    });
    (url, seen)
}

/// [`answering`] with `status` and a `Location` to `to`, as a deployment redirecting
/// http:// to https:// does.
fn redirecting(status: &str, to: &str) -> (String, Arc<AtomicUsize>) {
    answering(
        format!(
            "HTTP/1.1 {status}\r\nLocation: {to}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
        .into_bytes(),
    )
}

/// What is not Flux's answer is no success: a 2xx that is not JSON (a proxy's or captive
/// portal's page) exits 1, and an error page that is not UTF-8 is still the server's answer
/// (exit 1, not "unreachable").
#[test]
fn replies_that_are_not_flux_fail() {
    let page = "<html>sign in first</html>";
    let (url, _) = answering(
        format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n{page}",
            page.len()
        )
        .into_bytes(),
    );
    let message = Cli::new(&url, &["health"]).run().http_error();
    assert!(
        message.contains("not JSON") && message.contains(page),
        "{message}"
    );
    let mut reply =
        b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 3\r\nConnection: close\r\n\r\n".to_vec();
    reply.extend_from_slice(&[0xff, 0xfe, b'!']);
    let (url, _) = answering(reply);
    let run = Cli::new(&url, &["health"]).run();
    assert_eq!(run.code, Some(1), "{run:?}");
}

/// A URL with a query or fragment would take the paths into them: a usage error.
#[test]
fn a_url_with_a_query_is_a_usage_error() {
    for url in ["http://127.0.0.1:1/?x=1", "http://127.0.0.1:1/#top"] {
        for args in [vec!["health"], vec!["watch", "*"]] {
            let run = Cli::new(url, &args).run();
            assert_eq!(run.code, Some(2), "{url} {args:?}: {run:?}");
            assert!(run.stderr.contains("query"), "{run:?}");
        }
    }
}

/// A redirect is reported, never followed: a followed redirect turns a POST or DELETE into a
/// GET, which "succeeded" without writing anything.
#[test]
fn redirects_are_reported_not_followed() {
    let server = Server::start();
    server.put("acme/kept", json!({"v": 1}));
    for status in [
        "301 Moved Permanently",
        "302 Found",
        "307 Temporary Redirect",
    ] {
        let (url, seen) = redirecting(status, server.url());
        for args in [
            vec!["publish", "s", "a", "acme/new", r#"{"v":2}"#],
            vec!["delete", "acme/kept"],
            vec!["get", "acme/kept"],
        ] {
            let run = Cli::new(&url, &args).run();
            let message = run.http_error();
            assert!(
                message.contains("redirected") && message.contains(server.url()),
                "{status} {args:?}: {message}"
            );
        }
        assert_eq!(seen.load(Ordering::SeqCst), 3, "{status}: one request each");
    }
    assert_eq!(server.props("acme/kept"), json!({"v": 1}));
    assert_eq!(server.entity("acme/new").0, 404);
}

/// A token an HTTP header cannot carry is a usage error that does not print the token; the
/// line break a token file ends with is trimmed.
#[test]
fn tokens_are_checked_before_they_are_sent() {
    let (server, token) = auth_server_with("acme");
    let url = server.url();
    let publish = ["publish", "s", "a", "acme/t", r#"{"v":1}"#];
    Cli::new(url, &publish)
        .env("FLUX_TOKEN", &format!("{token}\r\n"))
        .run()
        .ok_json();
    for bad in [
        format!("{token}\nx"),
        format!("tö{token}"),
        format!("a {token}"),
    ] {
        let run = Cli::new(url, &publish).env("FLUX_TOKEN", &bad).run();
        assert_eq!(run.code, Some(2), "{run:?}");
        assert!(run.stderr.contains("FLUX_TOKEN"), "{run:?}");
        assert!(
            !run.stderr.contains(&token),
            "the token is printed: {run:?}"
        );
    }
    // The admin token may come as FLUX_TOKEN too, for admin operations.
    let change = [
        "admin-config",
        r#"{"rate_limit_per_namespace_per_minute":5000}"#,
    ];
    let config = Cli::new(url, &change)
        .env("FLUX_TOKEN", "adm")
        .run()
        .ok_json();
    assert_eq!(
        config["rate_limit_per_namespace_per_minute"], 5000,
        "{config}"
    );
}

/// `watch` refuses a port that does not fit, as the other commands do, instead of
/// connecting somewhere else.
#[test]
fn watch_refuses_an_invalid_port() {
    let run = Cli::new("http://127.0.0.1:99999", &["watch", "*"]).run();
    assert_eq!(run.code, Some(2), "{run:?}");
    assert!(run.stderr.contains("port"), "{run:?}");
}

/// A pattern the CLI passes on and the server refuses (no id holds a control character).
#[test]
fn watch_exits_1_when_the_server_refuses_the_subscription() {
    let server = Server::start();
    let run = flux(&server, &["watch", "a\tb"]);
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(run.stdout.is_empty(), "{run:?}");
    let last = run.stderr.lines().last().unwrap_or_default();
    let refusal: Value = serde_json::from_str(last)
        .unwrap_or_else(|e| panic!("the last stderr line is not the server's JSON ({e}): {run:?}"));
    assert_eq!(refusal["type"], "error", "{refusal}");
    let message = refusal["message"].as_str().unwrap_or_default();
    assert!(message.contains("entity_id"), "{refusal}");
}

#[test]
fn watch_gives_up_on_a_server_that_never_answers_the_handshake() {
    // Never accepted: the kernel completes the TCP handshake, nobody reads the request.
    let silent = TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}", silent.local_addr().expect("local_addr"));
    let args = ["watch", "*"];
    let run = finish(
        Cli::new(&url, &args).spawn(),
        CLI_HANDSHAKE_TIMEOUT + RUN_TIMEOUT,
        &args.map(String::from),
    );
    assert_eq!(run.code, Some(3), "{run:?}");
    assert!(
        run.stderr
            .starts_with(&format!("flux: cannot reach {url}: ")),
        "{run:?}"
    );
    // Gave up for the handshake's silence, not for a refused or failed connect.
    assert!(
        run.stderr.contains("no answer to the WebSocket handshake"),
        "{run:?}"
    );
    drop(silent);
}

#[test]
fn watch_keeps_waiting_while_a_subscribed_server_is_silent() {
    let server = Server::start();
    let pid = server.pid().expect("the server runs") as libc::pid_t;
    let args = ["watch", "acme/*", "--count", "1"];
    let mut watcher = Cli::new(server.url(), &args).spawn();
    let mut stderr = BufReader::new(watcher.stderr.take().expect("stderr is piped"));
    let mut line = String::new();
    let _ = stderr.read_line(&mut line);
    assert!(line.contains("watching"), "not subscribed: {line:?}");

    // Frozen for longer than the handshake's bound: no message at all, not even
    // metrics_update.
    // SAFETY: plain kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0, "SIGSTOP");
    thread::sleep(CLI_HANDSHAKE_TIMEOUT + Duration::from_secs(5));
    let waiting = matches!(watcher.try_wait(), Ok(None));
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGCONT) }, 0, "SIGCONT");
    assert!(
        waiting,
        "watch gave up on a quiet server: {:?}",
        watcher.try_wait()
    );

    let deadline = Instant::now() + RUN_TIMEOUT;
    let mut n = 0;
    while Instant::now() < deadline && matches!(watcher.try_wait(), Ok(None)) {
        n += 1;
        server.put("acme/after-the-pause", json!({"n": n}));
        thread::sleep(Duration::from_millis(100));
    }
    let run = finish(watcher, Duration::from_secs(5), &[]);
    assert_eq!(run.code, Some(0), "{run:?}");
    assert_eq!(run.stdout.lines().count(), 1, "{run:?}");
}

#[test]
fn empty_environment_variables_count_as_unset() {
    // An empty FLUX_URL is the default URL, whatever answers there (or nothing).
    let run = Cli::new("", &["health"]).run();
    assert_ne!(run.code, Some(2), "{run:?}");
    if run.code == Some(3) {
        assert!(run.stderr.contains("http://127.0.0.1:3000"), "{run:?}");
    }

    // Empty tokens are not sent, so the server asks for one.
    let server = Server::start_args(&["--auth", "--admin-token", "adm"]);
    let message = Cli::new(server.url(), &["publish", "s", "a", "acme/x", "{}"])
        .env("FLUX_TOKEN", "")
        .run()
        .http_error();
    assert!(message.contains("token"), "{message}");
    let message = Cli::new(server.url(), &["namespaces", "register", "acme"])
        .env("FLUX_ADMIN_TOKEN", "")
        .run()
        .http_error();
    assert!(message.contains("admin token"), "{message}");
}

#[test]
fn help_documents_exit_codes() {
    let run = Cli::new("http://127.0.0.1:1", &["--help"]).run();
    assert_eq!(run.code, Some(0), "{run:?}");
    for needle in [
        "publish",
        "watch",
        "admin-config",
        "Exit codes",
        "3  could not reach",
    ] {
        assert!(
            run.stdout.contains(needle),
            "--help lacks {needle:?}: {run:?}"
        );
    }
}

#[test]
fn publish_and_batch_keep_numbers_beyond_64_bits_exactly() {
    let server = Server::start();
    let digits = "123456789012345678901234567890";
    let properties = format!(r#"{{"n":{digits},"f":1.50}}"#);
    flux(&server, &["publish", "s", "cli", "big/one", &properties]).ok_json();
    let batch = format!(
        r#"[{{"stream":"s","source":"cli","payload":{{"entity_id":"big/two","properties":{{"n":{digits}}}}}}}]"#
    );
    flux(&server, &["batch", &batch]).ok_json();
    for id in ["big/one", "big/two"] {
        let (status, text) = server.get_text(&format!("/api/state/entities/{id}"));
        assert_eq!(status, 200, "{text}");
        assert!(text.contains(&format!("\"n\":{digits}")), "{id}: {text}");
    }
    let (_, text) = server.get_text("/api/state/entities/big/one");
    assert!(
        text.contains("\"f\":1.50"),
        "values travel as typed: {text}"
    );
}

/// Through a TLS terminator whose self-signed certificate is given with `--ca-cert` (or
/// `FLUX_CA_CERT`), the HTTP commands work as over plain HTTP.
#[test]
fn https_commands_trust_the_ca_cert_given() {
    let server = Server::start();
    let tls = TlsTerminator::start(server.port());
    let cert = tls.cert.to_str().expect("UTF-8 path");
    let reply = Cli::new(
        &tls.url,
        &[
            "publish",
            "s",
            "cli",
            "tls/one",
            r#"{"n":1.50}"#,
            "--ca-cert",
            cert,
        ],
    )
    .run()
    .ok_json();
    assert!(reply["eventId"].as_str().is_some_and(is_uuid_v7), "{reply}");
    let url = tls.url.as_str();
    let entity = Cli::new("", &["get", "tls/one", "--url", url, "--ca-cert", cert])
        .run()
        .ok_json();
    assert_eq!(entity["properties"], json!({"n": 1.50}), "{entity}");
    // The variable, as `FLUX_URL` / `FLUX_TOKEN` are given.
    let run = Cli::new(url, &["list", "--prefix", "tls/"])
        .env("FLUX_CA_CERT", cert)
        .run();
    assert_eq!(ids(&run.ok_json()), ["tls/one"], "{run:?}");
    // What the terminator forwarded is what the server holds.
    assert_eq!(server.props("tls/one"), json!({"n": 1.50}));
}

/// A certificate that is not trusted (none given, another one given, or one that does not name
/// the host of `--url`, even the exact certificate given) ends every command, `watch` too, with exit 3 and one line that says so.
#[test]
fn an_untrusted_certificate_is_refused_with_one_clear_line() {
    let server = Server::start();
    let tls = TlsTerminator::start(server.port());
    let other = TlsTerminator::start(server.port());
    let other_cert = other.cert.to_str().expect("UTF-8 path");
    let cert = tls.cert.to_str().expect("UTF-8 path");
    // Same port and certificate, but a host name the certificate (for 127.0.0.1) does not name.
    let by_name = tls.url.replace("127.0.0.1", "localhost");
    // `openssl req -x509`'s default certificate, marked as a CA's: trusted as that exact
    // certificate when given, but the host name is still checked.
    let pinned = TlsTerminator::start_with(server.port(), &[]);
    let pinned_cert = pinned.cert.to_str().expect("UTF-8 path");
    let pinned_by_name = pinned.url.replace("127.0.0.1", "localhost");
    let cases = [
        (tls.url.as_str(), None, "UnknownIssuer"),
        // Both certificates have the same subject: the other one is taken for the issuer,
        // whose signature then does not match.
        (tls.url.as_str(), Some(other_cert), "BadSignature"),
        (by_name.as_str(), Some(cert), "not valid for name"),
        (
            pinned_by_name.as_str(),
            Some(pinned_cert),
            "not valid for name",
        ),
    ];
    for (url, ca_cert, why) in cases {
        for command in [
            vec!["health"],
            vec!["get", "acme/x"],
            vec!["publish", "s", "a", "acme/x", "{}"],
            vec!["watch", "*", "--count", "1"],
        ] {
            let mut args = command.clone();
            if let Some(path) = ca_cert {
                args.extend(["--ca-cert", path]);
            }
            let run = Cli::new(url, &args).run();
            assert_eq!(run.code, Some(3), "{args:?} at {url}: {run:?}");
            assert!(run.stdout.is_empty(), "{run:?}");
            assert_eq!(run.stderr.lines().count(), 1, "{args:?}: {run:?}");
            let line = run.stderr.trim_end();
            assert!(
                line.starts_with(&format!("flux: cannot reach {url}: ")),
                "{args:?}: {line}"
            );
            for needle in ["certificate is not trusted", "--ca-cert", why] {
                assert!(line.contains(needle), "{args:?} lacks {needle:?}: {line}");
            }
        }
    }
    assert_eq!(server.list("?prefix=acme/").len(), 0, "a write got through");
}

/// `watch` over `wss://` (from an `https://` URL): an update published after the subscription
/// is printed exactly as the server sent it.
#[test]
fn watch_over_wss_prints_updates_exactly_as_sent() {
    let server = Server::start();
    let tls = TlsTerminator::start(server.port());
    let cert = tls.cert.to_str().expect("UTF-8 path");
    let args = ["watch", "exact/*", "--count", "1", "--ca-cert", cert];
    let mut watcher = Cli::new(&tls.url, &args).spawn();
    let mut stderr = BufReader::new(watcher.stderr.take().expect("stderr"));
    let mut said = String::new();
    stderr.read_line(&mut said).expect("stderr");
    let wss = format!("{}/api/ws", tls.url.replace("https://", "wss://"));
    assert!(said.contains("watching") && said.contains(&wss), "{said}");
    let body = br#"{"stream":"s","source":"a","timestamp":1764000000000,
        "payload":{"entity_id":"exact/x","properties":{"big":123456789012345678901234567890}}}"#;
    let run = publish_until_it_exits(&server, watcher, body);
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(lines.len(), 1, "{run:?}");
    let message: Value = serde_json::from_str(lines[0]).expect("a JSON line");
    assert_eq!(message["type"], "state_update", "{message}");
    assert_eq!(message["entity_id"], "exact/x", "{message}");
    assert!(
        lines[0].contains(r#""value":123456789012345678901234567890"#),
        "{}",
        lines[0]
    );
}
