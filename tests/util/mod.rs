//! Black-box test harness: spawns the real `flux` binary on a loopback port with a temporary
//! data directory, and talks to it over HTTP (ureq, or raw `TcpStream` for the odd cases).
//!
//! Every wait in here is bounded; every child process is killed on drop.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use tempfile::TempDir;

/// How long the server may take to print its start-up line.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);
/// Timeout of every HTTP request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `terminate` waits for the process to exit after the signal.
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(15);

pub const SINGLE_LIMIT: usize = 1_048_576;
pub const BATCH_LIMIT: usize = 10_485_760;

/// A data directory shared between successive servers (restarts, second instance).
#[derive(Clone)]
pub enum DataDir {
    /// A temporary directory; removed when the last handle goes away.
    Temp(Arc<TempDir>),
    /// A directory owned by the test.
    Path(PathBuf),
}

impl DataDir {
    pub fn temp() -> DataDir {
        DataDir::Temp(Arc::new(tempfile::tempdir().expect("create temp data dir")))
    }

    pub fn path(&self) -> &Path {
        match self {
            DataDir::Temp(t) => t.path(),
            DataDir::Path(p) => p,
        }
    }
}

/// How to start a server.
#[derive(Clone)]
pub struct Options {
    /// `--listen` value; `None` leaves the flag out (for the env-var tests).
    pub listen_flag: Option<String>,
    /// Pass `--data-dir <dir>` (otherwise the test sets `FLUX_DATA_DIR` itself).
    pub data_dir_flag: bool,
    /// Extra arguments after `serve`.
    pub args: Vec<String>,
    /// Extra environment variables (`PORT` and every `FLUX_*` are removed first).
    pub env: Vec<(String, String)>,
    /// The data directory; a fresh temp dir when `None`.
    pub dir: Option<DataDir>,
    /// The test is about the local log's files: never run it on JetStream (see [`log_mode`]).
    pub local_only: bool,
    /// The nats-server of this server's world, when running on JetStream; kept across restarts.
    pub nats: Option<Arc<NatsServer>>,
    /// How long the start-up line may take.
    pub start_timeout: Duration,
    /// Largest file the server may write (`RLIMIT_FSIZE`, with `SIGXFSZ` ignored): writes
    /// past it fail with `EFBIG`, as on a full disk.
    pub file_size_limit: Option<u64>,
}

impl Options {
    /// Options for a test that is inherently about the embedded log (its files, torn tails,
    /// the data-dir lock): it runs with `--log local` even when `FLUX_TEST_LOG=nats`.
    pub fn local_only() -> Options {
        Options {
            local_only: true,
            ..Options::default()
        }
    }
}

impl Default for Options {
    fn default() -> Self {
        Options {
            listen_flag: Some("127.0.0.1:0".to_string()),
            data_dir_flag: true,
            args: Vec::new(),
            env: Vec::new(),
            dir: None,
            local_only: false,
            nats: None,
            start_timeout: START_TIMEOUT,
            file_size_limit: None,
        }
    }
}

/// Why a server did not come up.
#[derive(Debug)]
pub struct StartFailure {
    pub reason: String,
    pub status: Option<ExitStatus>,
    pub stdout: String,
    pub stderr: String,
}

/// A running `flux serve`.
pub struct Server {
    child: Option<Child>,
    url: String,
    addr: String,
    opts: Options,
    dir: DataDir,
    stdout: Arc<Mutex<Vec<u8>>>,
    stderr: Arc<Mutex<Vec<u8>>>,
    stderr_done: Option<Receiver<()>>,
    agent: ureq::Agent,
}

fn lossy(buf: &Arc<Mutex<Vec<u8>>>) -> String {
    String::from_utf8_lossy(&buf.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
}

/// Extracts `host:port` from a line containing `listening on http://host:port`.
pub fn parse_listen_line(line: &str) -> Option<String> {
    let marker = "listening on http://";
    let start = line.find(marker)? + marker.len();
    let rest = &line[start..];
    let hostport: String = rest
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | ':' | '[' | ']' | '-'))
        .collect();
    let hostport = hostport.trim_end_matches(['.', ':']).to_string();
    let (host, port) = hostport.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    if host.is_empty() {
        return None;
    }
    Some(hostport)
}

/// Picks a currently free loopback port (bind to :0 and release it).
/// Never the same port twice in one test process: a port handed to a test (for `PORT`, say)
/// and then to a nats-server the harness starts would collide.
pub fn free_port() -> u16 {
    static HANDED_OUT: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    loop {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let port = l.local_addr().expect("local addr").port();
        let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
        if !handed_out.contains(&port) {
            handed_out.push(port);
            return port;
        }
    }
}

impl Server {
    /// Starts a server with default options on a fresh temp dir.
    pub fn start() -> Server {
        Server::start_with(Options::default())
    }

    /// Starts a server on the local log whatever `FLUX_TEST_LOG` says (see [`Options::local_only`]).
    pub fn start_local_only() -> Server {
        Server::start_with(Options::local_only())
    }

    /// Starts a server with extra command-line arguments.
    pub fn start_args(args: &[&str]) -> Server {
        Server::start_with(Options {
            args: args.iter().map(|s| s.to_string()).collect(),
            ..Options::default()
        })
    }

    /// Starts a server; panics with its output when it does not come up.
    pub fn start_with(opts: Options) -> Server {
        match Server::try_start(opts) {
            Ok(s) => s,
            Err(f) => panic!(
                "flux did not start: {}\nexit status: {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
                f.reason, f.status, f.stdout, f.stderr
            ),
        }
    }

    /// Starts a server, or reports why it did not come up (within `opts.start_timeout`).
    pub fn try_start(mut opts: Options) -> Result<Server, StartFailure> {
        let start_timeout = opts.start_timeout;
        let dir = opts.dir.clone().unwrap_or_else(DataDir::temp);
        opts.dir = Some(dir.clone());

        let mut cmd = Command::new(env!("CARGO_BIN_EXE_flux"));
        cmd.arg("serve");
        let log_chosen = opts
            .args
            .iter()
            .any(|a| a == "--log" || a.starts_with("--log="))
            || opts.env.iter().any(|(k, _)| k == "FLUX_LOG");
        if log_mode() == LogMode::Nats && !opts.local_only && !log_chosen {
            let nats = opts
                .nats
                .get_or_insert_with(|| Arc::new(NatsServer::start()))
                .clone();
            cmd.arg("--log").arg(nats.url());
        }
        if let Some(listen) = &opts.listen_flag {
            cmd.arg("--listen").arg(listen);
        }
        if opts.data_dir_flag {
            cmd.arg("--data-dir").arg(dir.path());
        }
        cmd.args(&opts.args);
        for (k, _) in std::env::vars_os() {
            let k = k.to_string_lossy().into_owned();
            if k == "PORT" || k.starts_with("FLUX_") {
                cmd.env_remove(&k);
            }
        }
        for (k, v) in &opts.env {
            cmd.env(k, v);
        }
        cmd.current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(limit) = opts.file_size_limit {
            use std::os::unix::process::CommandExt;
            // SAFETY: between fork and exec the closure makes only async-signal-safe calls.
            unsafe {
                cmd.pre_exec(move || {
                    let bound = libc::rlimit {
                        rlim_cur: limit,
                        rlim_max: limit,
                    };
                    if libc::setrlimit(libc::RLIMIT_FSIZE, &bound) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
                    Ok(())
                });
            }
        }
        let mut child = cmd.spawn().expect("spawn flux binary");

        let stdout_buf = Arc::new(Mutex::new(Vec::new()));
        let stderr_buf = Arc::new(Mutex::new(Vec::new()));

        let (line_tx, line_rx) = mpsc::channel::<Option<String>>();
        let out = child.stdout.take().expect("stdout pipe");
        let out_buf = stdout_buf.clone();
        thread::spawn(move || {
            let mut reader = BufReader::new(out);
            let mut sent = false;
            loop {
                let mut line = Vec::new();
                match reader.read_until(b'\n', &mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        out_buf
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .extend_from_slice(&line);
                        let text = String::from_utf8_lossy(&line).into_owned();
                        if !sent && text.contains("listening on http://") {
                            sent = true;
                            let _ = line_tx.send(Some(text));
                        }
                    }
                }
            }
            if !sent {
                let _ = line_tx.send(None);
            }
        });

        let (err_done_tx, err_done_rx) = mpsc::channel::<()>();
        let err = child.stderr.take().expect("stderr pipe");
        let err_buf = stderr_buf.clone();
        thread::spawn(move || {
            let mut err = err;
            let mut chunk = [0u8; 8192];
            loop {
                match err.read(&mut chunk) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => err_buf
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .extend_from_slice(&chunk[..n]),
                }
            }
            let _ = err_done_tx.send(());
        });

        let fail = |mut child: Child, reason: String| -> StartFailure {
            // Give a process that is exiting on its own the rest of the start-up budget.
            let deadline = Instant::now() + start_timeout;
            let mut status = None;
            while Instant::now() < deadline {
                match child.try_wait() {
                    Ok(Some(s)) => {
                        status = Some(s);
                        break;
                    }
                    Ok(None) => thread::sleep(Duration::from_millis(20)),
                    Err(_) => break,
                }
            }
            if status.is_none() {
                let _ = child.kill();
                status = child.wait().ok();
            }
            let _ = err_done_rx.recv_timeout(Duration::from_secs(5));
            StartFailure {
                reason,
                status,
                stdout: lossy(&stdout_buf),
                stderr: lossy(&stderr_buf),
            }
        };

        let line = match line_rx.recv_timeout(start_timeout) {
            Ok(Some(line)) => line,
            Ok(None) => {
                return Err(fail(child, "stdout closed before the start-up line".into()));
            }
            Err(RecvTimeoutError::Timeout) => {
                let _ = child.kill();
                return Err(fail(
                    child,
                    format!("no start-up line within {start_timeout:?}"),
                ));
            }
            Err(RecvTimeoutError::Disconnected) => {
                return Err(fail(child, "stdout reader ended".into()));
            }
        };
        let Some(hostport) = parse_listen_line(&line) else {
            let _ = child.kill();
            return Err(fail(child, format!("cannot parse start-up line: {line:?}")));
        };
        // A wildcard bind is reached over loopback.
        let addr = if let Some(port) = hostport.strip_prefix("0.0.0.0:") {
            format!("127.0.0.1:{port}")
        } else if let Some(port) = hostport.strip_prefix("[::]:") {
            format!("127.0.0.1:{port}")
        } else {
            hostport
        };

        // No connection reuse: a server may close a kept-alive connection after answering
        // without reading the whole body, and a reused stale connection would make tests racy.
        let agent = ureq::AgentBuilder::new()
            .timeout(REQUEST_TIMEOUT)
            .redirects(0)
            .max_idle_connections(0)
            .build();
        Ok(Server {
            child: Some(child),
            url: format!("http://{addr}"),
            addr,
            opts,
            dir,
            stdout: stdout_buf,
            stderr: stderr_buf,
            stderr_done: Some(err_done_rx),
            agent,
        })
    }

    /// `http://127.0.0.1:<port>`
    pub fn url(&self) -> &str {
        &self.url
    }

    /// `127.0.0.1:<port>` for raw sockets.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse().ok())
            .expect("port")
    }

    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    /// A handle on the data dir, to start another server on it.
    pub fn dir_handle(&self) -> DataDir {
        self.dir.clone()
    }

    pub fn stderr_text(&self) -> String {
        lossy(&self.stderr)
    }

    pub fn stdout_text(&self) -> String {
        lossy(&self.stdout)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// SIGKILL and wait; the data dir stays.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends `sig` and waits up to `EXIT_TIMEOUT` for the exit; panics (after SIGKILL) if the
    /// process is still running then.
    pub fn signal_and_wait(&mut self, sig: libc::c_int) -> ExitStatus {
        let mut child = self.child.take().expect("server is running");
        let pid = child.id() as libc::pid_t;
        // SAFETY: `pid` is our own child, not yet waited for, so the id cannot have been reused.
        let rc = unsafe { libc::kill(pid, sig) };
        assert_eq!(rc, 0, "kill({pid}, {sig}) failed");
        let deadline = Instant::now() + EXIT_TIMEOUT;
        loop {
            match child.try_wait() {
                Ok(Some(status)) => {
                    if let Some(rx) = self.stderr_done.take() {
                        let _ = rx.recv_timeout(Duration::from_secs(5));
                    }
                    return status;
                }
                Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
                Ok(None) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "flux did not exit within {EXIT_TIMEOUT:?} of signal {sig}\n--- stderr ---\n{}",
                        self.stderr_text()
                    );
                }
                Err(e) => panic!("try_wait: {e}"),
            }
        }
    }

    /// SIGTERM, wait (bounded), return the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        self.signal_and_wait(libc::SIGTERM)
    }

    /// Starts a new process on the same data dir with the same options (SIGKILLs the old one
    /// first if it is still running).
    pub fn restart(&mut self) {
        self.restart_changed(|_| {});
    }

    /// [`Server::restart`] with its options changed by `change` first (another key, flag…).
    pub fn restart_changed(&mut self, change: impl FnOnce(&mut Options)) {
        self.kill9();
        let mut opts = self.opts.clone();
        change(&mut opts);
        let fresh = Server::start_with(opts);
        *self = fresh;
    }

    /// Is the process still running?
    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    // ---------------------------------------------------------------- HTTP via ureq

    /// Any request; never panics on 4xx/5xx. Panics (with the server's stderr) on transport
    /// errors such as timeouts or refused connections.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> Resp {
        let mut req = self.agent.request(method, &format!("{}{}", self.url, path));
        for (k, v) in headers {
            req = req.set(k, v);
        }
        let result = match body {
            Some(b) => req.send_bytes(b),
            None => req.call(),
        };
        let resp = match result {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(ureq::Error::Transport(t)) => panic!(
                "{method} {path}: transport error: {t}\n--- server stderr ---\n{}",
                self.stderr_text()
            ),
        };
        let status = resp.status();
        let headers = resp
            .headers_names()
            .into_iter()
            .map(|n| {
                let v = resp.header(&n).unwrap_or("").to_string();
                (n, v)
            })
            .collect();
        let mut bytes = Vec::new();
        if let Err(e) = resp.into_reader().read_to_end(&mut bytes) {
            panic!(
                "{method} {path}: reading body: {e}\n--- server stderr ---\n{}",
                self.stderr_text()
            );
        }
        Resp {
            status,
            headers,
            text: String::from_utf8_lossy(&bytes).into_owned(),
        }
    }

    pub fn get_resp(&self, path: &str) -> Resp {
        self.request("GET", path, &[], None)
    }

    pub fn get(&self, path: &str) -> (u16, Value) {
        self.get_resp(path).status_json()
    }

    pub fn get_text(&self, path: &str) -> (u16, String) {
        let r = self.get_resp(path);
        (r.status, r.text)
    }

    pub fn post_raw(&self, path: &str, body: &[u8]) -> Resp {
        self.request(
            "POST",
            path,
            &[("Content-Type", "application/json")],
            Some(body),
        )
    }

    pub fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        self.post_raw(path, body.to_string().as_bytes())
            .status_json()
    }

    pub fn post_text(&self, path: &str, body: &str) -> (u16, String) {
        let r = self.post_raw(path, body.as_bytes());
        (r.status, r.text)
    }

    pub fn delete(&self, path: &str) -> (u16, Value) {
        self.request("DELETE", path, &[], None).status_json()
    }

    // ---------------------------------------------------------------- flux shortcuts

    /// Publishes one event, asserting 200; returns the reply.
    pub fn publish_ok(&self, event: &Value) -> Value {
        let (status, body) = self.post("/api/events", event);
        assert_eq!(status, 200, "publish {event} -> {body}");
        body
    }

    /// Publishes `props` to `entity` with the default envelope, asserting 200.
    pub fn put(&self, entity: &str, props: Value) -> Value {
        self.publish_ok(&event(entity, props))
    }

    /// GET one entity (the id is sent with raw slashes).
    pub fn entity(&self, id: &str) -> (u16, Value) {
        self.get(&format!("/api/state/entities/{id}"))
    }

    /// The entity's properties, asserting it exists.
    pub fn props(&self, id: &str) -> Value {
        let (status, body) = self.entity(id);
        assert_eq!(status, 200, "GET entity {id} -> {body}");
        body["properties"].clone()
    }

    /// The list endpoint, asserting 200 and an array.
    pub fn list(&self, query: &str) -> Vec<Value> {
        let (status, body) = self.get(&format!("/api/state/entities{query}"));
        assert_eq!(status, 200, "list {query} -> {body}");
        body.as_array()
            .unwrap_or_else(|| panic!("list {query} is not an array: {body}"))
            .clone()
    }

    /// Ids from the list endpoint, without the built-in `flux-core/` entities.
    pub fn list_ids(&self, query: &str) -> Vec<String> {
        self.list(query)
            .iter()
            .map(|e| {
                e["id"]
                    .as_str()
                    .unwrap_or_else(|| panic!("entity without id: {e}"))
                    .to_string()
            })
            .filter(|id| !id.starts_with("flux-core/"))
            .collect()
    }

    /// History of `entity` (query-encoded) plus extra query text, asserting 200.
    pub fn history(&self, entity: &str, extra: &str) -> Vec<Value> {
        let (status, body) = self.get(&format!("/api/events?entity={}{extra}", enc(entity)));
        assert_eq!(status, 200, "history {entity}{extra} -> {body}");
        history_items(&body)
    }

    /// Raw HTTP over a fresh connection to this server.
    pub fn raw(&self, request: &[u8]) -> RawOutcome {
        raw_request(&self.addr, request, false)
    }

    /// Raw request that must produce a response.
    pub fn raw_ok(&self, request: &[u8]) -> RawResponse {
        match self.raw(request) {
            RawOutcome::Response(r) => r,
            other => panic!(
                "raw request got no response: {other:?}\n--- server stderr ---\n{}",
                self.stderr_text()
            ),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A client detached from `Server` (for threads that outlive a signal to it): never panics,
/// transport errors come back as `Err`.
#[derive(Clone)]
pub struct Client {
    base: String,
    agent: ureq::Agent,
}

impl Client {
    pub fn new(base: &str) -> Client {
        let agent = ureq::AgentBuilder::new()
            .timeout(REQUEST_TIMEOUT)
            .redirects(0)
            .max_idle_connections(0)
            .build();
        Client {
            base: base.to_string(),
            agent,
        }
    }

    /// POSTs JSON; `Ok((status, body text))` for any HTTP status, `Err` on transport errors.
    pub fn post(&self, path: &str, body: &Value) -> Result<(u16, String), String> {
        let result = self
            .agent
            .post(&format!("{}{}", self.base, path))
            .set("Content-Type", "application/json")
            .send_string(&body.to_string());
        let resp = match result {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(ureq::Error::Transport(t)) => return Err(t.to_string()),
        };
        let status = resp.status();
        let text = resp.into_string().map_err(|e| e.to_string())?;
        Ok((status, text))
    }

    /// GET; `Ok((status, body text))` for any HTTP status, `Err` on transport errors.
    pub fn get(&self, path: &str) -> Result<(u16, String), String> {
        let resp = match self.agent.get(&format!("{}{}", self.base, path)).call() {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(ureq::Error::Transport(t)) => return Err(t.to_string()),
        };
        let status = resp.status();
        let text = resp.into_string().map_err(|e| e.to_string())?;
        Ok((status, text))
    }
}

impl Server {
    /// A detached client for this server's current address.
    pub fn client(&self) -> Client {
        Client::new(&self.url)
    }
}

// -------------------------------------------------------------------- responses

#[derive(Debug, Clone)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub text: String,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON (`Null` when empty); panics when it is not JSON.
    pub fn json(&self) -> Value {
        parse_json(self.status, &self.text)
    }

    pub fn status_json(&self) -> (u16, Value) {
        (self.status, self.json())
    }
}

pub fn parse_json(status: u16, text: &str) -> Value {
    if text.is_empty() {
        return Value::Null;
    }
    serde_json::from_str(text)
        .unwrap_or_else(|e| panic!("status {status}: body is not JSON ({e}): {text:?}"))
}

/// History replies are an array of events; an object holding them under `events` is tolerated.
pub fn history_items(body: &Value) -> Vec<Value> {
    if let Some(a) = body.as_array() {
        return a.clone();
    }
    if let Some(a) = body.get("events").and_then(Value::as_array) {
        return a.clone();
    }
    panic!("history reply is not a list of events: {body}");
}

/// Asserts an error reply: the status, a body that is exactly `{"error": "<non-empty>"}`, and
/// that the message names `field` (case-insensitive; skipped when `field` is empty).
pub fn assert_error(status: u16, body: &Value, want_status: u16, field: &str) {
    assert_eq!(
        status, want_status,
        "wanted {want_status} naming {field:?}, got {status}: {body}"
    );
    let msg = error_message(body);
    if !field.is_empty() {
        assert!(
            msg.to_lowercase().contains(&field.to_lowercase()),
            "error message {msg:?} does not name {field:?}"
        );
    }
}

/// The `error` string of an error body that is exactly `{"error": "..."}`.
pub fn error_message(body: &Value) -> String {
    let obj = body
        .as_object()
        .unwrap_or_else(|| panic!("error body is not an object: {body}"));
    let msg = obj
        .get("error")
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("error body has no string `error`: {body}"));
    assert!(!msg.trim().is_empty(), "empty error message: {body}");
    assert_eq!(
        obj.len(),
        1,
        "error body has fields besides `error`: {body}"
    );
    msg.to_string()
}

// -------------------------------------------------------------------- event builders

pub const TS: u64 = 1_708_694_400_000;

/// A valid event for `entity` with the given properties.
pub fn event(entity: &str, props: Value) -> Value {
    json!({
        "stream": "sensors",
        "source": "test-suite",
        "timestamp": TS,
        "payload": {"entity_id": entity, "properties": props}
    })
}

/// Percent-encodes everything but unreserved characters (as `flux.sh` does for ids).
pub fn enc(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Is `s` a UUID whose version nibble is 7 (and RFC 4122 variant)?
pub fn is_uuid_v7(s: &str) -> bool {
    let b = s.as_bytes();
    if b.len() != 36 {
        return false;
    }
    for (i, c) in b.iter().enumerate() {
        let dash = matches!(i, 8 | 13 | 18 | 23);
        if dash != (*c == b'-') {
            return false;
        }
        if !dash && !c.is_ascii_hexdigit() {
            return false;
        }
    }
    b[14] == b'7' && matches!(b[19].to_ascii_lowercase(), b'8' | b'9' | b'a' | b'b')
}

// -------------------------------------------------------------------- time

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as i64
}

fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + if m <= 2 { 1 } else { 0 };
    (y, m, d)
}

/// Parses exactly `YYYY-MM-DDTHH:MM:SS.mmmZ` into Unix milliseconds.
pub fn parse_iso_millis(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() != 24 {
        return None;
    }
    let shape = b"dddd-dd-ddTdd:dd:dd.dddZ";
    for (c, want) in b.iter().zip(shape.iter()) {
        let ok = if *want == b'd' {
            c.is_ascii_digit()
        } else {
            c == want
        };
        if !ok {
            return None;
        }
    }
    let n = |from: usize, to: usize| s[from..to].parse::<i64>().ok();
    let (y, mo, d) = (n(0, 4)?, n(5, 7)?, n(8, 10)?);
    let (h, mi, se, ms) = (n(11, 13)?, n(14, 16)?, n(17, 19)?, n(20, 23)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || se > 60 {
        return None;
    }
    let days = days_from_civil(y, mo, d);
    Some((((days * 24 + h) * 60 + mi) * 60 + se) * 1000 + ms)
}

/// Formats Unix milliseconds as `YYYY-MM-DDTHH:MM:SS.mmmZ`.
pub fn format_iso_millis(ms: i64) -> String {
    let days = ms.div_euclid(86_400_000);
    let rem = ms.rem_euclid(86_400_000);
    let (y, m, d) = civil_from_days(days);
    let (h, mi, s, milli) = (
        rem / 3_600_000,
        rem / 60_000 % 60,
        rem / 1000 % 60,
        rem % 1000,
    );
    format!("{y:04}-{m:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{milli:03}Z")
}

/// Reads `stream` until the server ends the connection, each read waiting at most `idle`:
/// what arrived, and how it ended (`Ok` for EOF, the error otherwise: a reset, or a timeout
/// when the server kept the connection open).
pub fn read_until_end(stream: &mut TcpStream, idle: Duration) -> (Vec<u8>, std::io::Result<()>) {
    stream.set_read_timeout(Some(idle)).expect("read timeout");
    let mut received = Vec::new();
    let mut chunk = [0u8; 64 << 10];
    loop {
        match stream.read(&mut chunk) {
            Ok(0) => return (received, Ok(())),
            Ok(n) => received.extend_from_slice(&chunk[..n]),
            Err(e) => return (received, Err(e)),
        }
    }
}

/// Polls `f` until it returns `Some`, for at most `limit`.
pub fn wait_for<T>(limit: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(100));
    }
}

// -------------------------------------------------------------------- raw HTTP

#[derive(Debug, Clone)]
pub struct RawResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> Value {
        parse_json(self.status, &self.text())
    }
}

#[derive(Debug)]
pub enum RawOutcome {
    /// A complete response arrived.
    Response(RawResponse),
    /// The server closed the connection without a complete response.
    Closed { partial: Vec<u8> },
    /// Nothing complete within the deadline.
    TimedOut { partial: Vec<u8> },
}

/// Sends `request` bytes (written from a separate thread, so a server that answers early is not
/// blocked by us) and reads one response. With `half_close`, the write side is shut down after
/// the request. Bounded: 10 s per read, 20 s overall.
pub fn raw_request(addr: &str, request: &[u8], half_close: bool) -> RawOutcome {
    let stream = TcpStream::connect(addr).expect("connect to flux");
    stream
        .set_read_timeout(Some(REQUEST_TIMEOUT))
        .expect("read timeout");
    stream
        .set_write_timeout(Some(REQUEST_TIMEOUT))
        .expect("write timeout");
    let mut writer = stream.try_clone().expect("clone stream");
    let data = request.to_vec();
    let writer_thread = thread::spawn(move || {
        for part in data.chunks(64 * 1024) {
            if writer.write_all(part).is_err() {
                return;
            }
        }
        let _ = writer.flush();
        if half_close {
            let _ = writer.shutdown(Shutdown::Write);
        }
    });

    let deadline = Instant::now() + Duration::from_secs(20);
    let mut reader = stream;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    let outcome = loop {
        if let Some(resp) = parse_response(&buf, false) {
            break RawOutcome::Response(resp);
        }
        if Instant::now() >= deadline {
            break RawOutcome::TimedOut { partial: buf };
        }
        match reader.read(&mut chunk) {
            Ok(0) => {
                break match parse_response(&buf, true) {
                    Some(resp) => RawOutcome::Response(resp),
                    None => RawOutcome::Closed { partial: buf },
                };
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                break RawOutcome::TimedOut { partial: buf };
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => {
                break match parse_response(&buf, true) {
                    Some(resp) => RawOutcome::Response(resp),
                    None => RawOutcome::Closed { partial: buf },
                };
            }
        }
    };
    let _ = reader.shutdown(Shutdown::Both);
    let _ = writer_thread.join();
    outcome
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Parses one complete HTTP/1.x response from `buf` (skipping 1xx responses); `eof` says the
/// peer closed, which completes a body delimited by the connection's end.
fn parse_response(buf: &[u8], eof: bool) -> Option<RawResponse> {
    parse_response_len(buf, eof).map(|(r, _)| r)
}

/// Like `parse_response`, also returning how many bytes of `buf` the response took.
fn parse_response_len(buf: &[u8], eof: bool) -> Option<(RawResponse, usize)> {
    let mut offset = 0;
    loop {
        let buf_here = &buf[offset..];
        let head_end = find(buf_here, b"\r\n\r\n")?;
        let head = String::from_utf8_lossy(&buf_here[..head_end]).into_owned();
        let rest = &buf_here[head_end + 4..];
        let mut lines = head.split("\r\n");
        let status_line = lines.next()?;
        let status: u16 = status_line.split_whitespace().nth(1)?.parse().ok()?;
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect();
        if (100..200).contains(&status) {
            offset += head_end + 4;
            continue;
        }
        let get = |n: &str| {
            headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(n))
                .map(|(_, v)| v)
        };
        let chunked =
            get("transfer-encoding").is_some_and(|v| v.to_lowercase().contains("chunked"));
        let (body, used) = if status == 204 || status == 304 {
            (Vec::new(), 0)
        } else if chunked {
            decode_chunked(rest)?
        } else if let Some(len) = get("content-length") {
            let len: usize = len.parse().ok()?;
            if rest.len() < len {
                return None;
            }
            (rest[..len].to_vec(), len)
        } else if eof {
            (rest.to_vec(), rest.len())
        } else {
            return None;
        };
        let consumed = offset + head_end + 4 + used;
        return Some((
            RawResponse {
                status,
                headers,
                body,
            },
            consumed,
        ));
    }
}

/// Decodes a chunked body; returns it and the number of bytes it took.
fn decode_chunked(data: &[u8]) -> Option<(Vec<u8>, usize)> {
    let mut out = Vec::new();
    let mut pos = 0;
    loop {
        let line_end = find(&data[pos..], b"\r\n")?;
        let size_text = String::from_utf8_lossy(&data[pos..pos + line_end]).into_owned();
        let size_text = size_text.split(';').next()?.trim().to_string();
        let size = usize::from_str_radix(&size_text, 16).ok()?;
        pos += line_end + 2;
        if size == 0 {
            // Trailers end with an empty line.
            loop {
                let end = find(&data[pos..], b"\r\n")?;
                pos += end + 2;
                if end == 0 {
                    return Some((out, pos));
                }
            }
        }
        if data.len() < pos + size + 2 {
            return None;
        }
        out.extend_from_slice(&data[pos..pos + size]);
        pos += size + 2;
    }
}

/// One kept-alive HTTP/1.1 connection, for sequential requests on the same socket.
pub struct RawConn {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl RawConn {
    pub fn connect(addr: &str) -> RawConn {
        let stream = TcpStream::connect(addr).expect("connect to flux");
        stream
            .set_read_timeout(Some(REQUEST_TIMEOUT))
            .expect("read timeout");
        stream
            .set_write_timeout(Some(REQUEST_TIMEOUT))
            .expect("write timeout");
        RawConn {
            stream,
            buf: Vec::new(),
        }
    }

    pub fn send(&mut self, request: &[u8]) {
        self.stream.write_all(request).expect("write request");
    }

    /// Reads the next response (bounded by the read timeout); `None` when the connection
    /// ends first.
    pub fn read_response(&mut self) -> Option<RawResponse> {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut chunk = [0u8; 16 * 1024];
        loop {
            if let Some((resp, used)) = parse_response_len(&self.buf, false) {
                self.buf.drain(..used);
                return Some(resp);
            }
            if Instant::now() >= deadline {
                return None;
            }
            match self.stream.read(&mut chunk) {
                Ok(0) | Err(_) => {
                    let (resp, used) = parse_response_len(&self.buf, true)?;
                    self.buf.drain(..used);
                    return Some(resp);
                }
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Sends one request and reads its response, panicking when none comes.
    pub fn roundtrip(&mut self, request: &[u8]) -> RawResponse {
        self.send(request);
        self.read_response()
            .expect("response on the kept-alive connection")
    }

    /// The underlying socket (to leave it idle, or half-written).
    pub fn stream(&mut self) -> &mut TcpStream {
        &mut self.stream
    }
}

/// A raw HTTP/1.1 request that keeps the connection alive.
pub fn keepalive_request(
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Vec<u8> {
    let mut out = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n");
    for (k, v) in headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() || matches!(method, "POST" | "PUT" | "PATCH") {
        out.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    out.push_str("\r\n");
    let mut bytes = out.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

/// Builds a raw HTTP/1.1 request with `Content-Length` (unless given in `headers`).
pub fn http_request(method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut out = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n");
    let has_len = headers.iter().any(|(k, _)| {
        k.eq_ignore_ascii_case("content-length") || k.eq_ignore_ascii_case("transfer-encoding")
    });
    for (k, v) in headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    if !has_len && (!body.is_empty() || matches!(method, "POST" | "PUT" | "PATCH")) {
        out.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    out.push_str("\r\n");
    let mut bytes = out.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

/// Encodes `body` as a chunked transfer in pieces of `piece` bytes.
pub fn chunked(body: &[u8], piece: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + body.len() / piece * 12 + 16);
    for part in body.chunks(piece) {
        out.extend_from_slice(format!("{:x}\r\n", part.len()).as_bytes());
        out.extend_from_slice(part);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

/// A valid single-event body padded (via a `pad` string property) to exactly `size` bytes.
pub fn padded_event(entity: &str, size: usize) -> Vec<u8> {
    let head = format!(
        r#"{{"stream":"sensors","source":"test-suite","timestamp":{TS},"payload":{{"entity_id":"{entity}","properties":{{"pad":""#
    );
    let tail = r#""}}}"#;
    let fixed = head.len() + tail.len();
    assert!(size >= fixed, "size {size} too small for an event");
    let mut body = head.into_bytes();
    body.resize(size - tail.len(), b'x');
    body.extend_from_slice(tail.as_bytes());
    assert_eq!(body.len(), size);
    body
}

// ---------------------------------------------------------------- nats-server

/// Which log the black-box tests run on: `FLUX_TEST_LOG=nats` runs every server on a JetStream
/// stream of its own nats-server; anything else (the default) on the local log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogMode {
    Local,
    Nats,
}

pub fn log_mode() -> LogMode {
    match std::env::var("FLUX_TEST_LOG").as_deref() {
        Ok("nats") => LogMode::Nats,
        _ => LogMode::Local,
    }
}

/// How long a nats-server may take to accept connections (and, in a cluster, to be healthy).
pub const NATS_START_TIMEOUT: Duration = Duration::from_secs(20);

/// A `nats-server -js` on a free loopback port with its own store dir; killed on drop.
/// `stop` and `start_again` keep the port and the store (a NATS outage and its return).
pub struct NatsServer {
    child: Mutex<Option<Child>>,
    port: u16,
    monitor_port: u16,
    args: Vec<String>,
    /// Holds the store (`<dir>/store`) and the server's log (`<dir>/nats.log`).
    dir: TempDir,
}

impl NatsServer {
    /// A standalone JetStream server.
    pub fn start() -> NatsServer {
        NatsServer::spawn(Vec::new())
    }

    /// `n` JetStream servers routed into one cluster on loopback, each healthy on return.
    pub fn cluster(n: usize) -> Vec<NatsServer> {
        let cluster_ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let servers: Vec<NatsServer> = (0..n)
            .map(|i| {
                let routes: Vec<String> = cluster_ports
                    .iter()
                    .enumerate()
                    .filter(|&(j, _)| j != i)
                    .map(|(_, p)| format!("nats://127.0.0.1:{p}"))
                    .collect();
                NatsServer::spawn(vec![
                    "-n".into(),
                    format!("flux-test-{i}"),
                    "--cluster_name".into(),
                    "flux-test".into(),
                    "--cluster".into(),
                    format!("nats://127.0.0.1:{}", cluster_ports[i]),
                    "--routes".into(),
                    routes.join(","),
                ])
            })
            .collect();
        for server in &servers {
            server.wait_healthy();
        }
        servers
    }

    fn spawn(extra: Vec<String>) -> NatsServer {
        let dir = tempfile::tempdir().expect("nats temp dir");
        let server = NatsServer {
            child: Mutex::new(None),
            port: free_port(),
            monitor_port: free_port(),
            args: extra,
            dir,
        };
        server.start_again();
        server
    }

    /// (Re)starts the process on the same port and store; waits until it accepts connections.
    pub fn start_again(&self) {
        let mut child = self.child.lock().unwrap_or_else(|e| e.into_inner());
        assert!(child.is_none(), "nats-server is already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("nats.log"))
            .expect("nats log file");
        let spawned = Command::new("nats-server")
            .arg("-js")
            .args(["-a", "127.0.0.1"])
            .args(["-p", &self.port.to_string()])
            .args(["-m", &self.monitor_port.to_string()])
            .arg("-sd")
            .arg(self.dir.path().join("store"))
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn nats-server (apt-get install -y nats-server)");
        *child = Some(spawned);
        drop(child);
        let port = self.port;
        let up = wait_for(NATS_START_TIMEOUT, || {
            TcpStream::connect(("127.0.0.1", port)).ok().map(|_| ())
        });
        assert!(
            up.is_some(),
            "nats-server did not listen on {port}:\n{}",
            self.log_text()
        );
    }

    /// Waits until the monitoring endpoint says the server (and its JetStream) is healthy.
    pub fn wait_healthy(&self) {
        let url = format!("http://127.0.0.1:{}/healthz", self.monitor_port);
        let agent = ureq::AgentBuilder::new()
            .timeout(Duration::from_secs(2))
            .build();
        let healthy = wait_for(NATS_START_TIMEOUT, || {
            agent
                .get(&url)
                .call()
                .ok()
                .filter(|r| r.status() == 200)
                .map(|_| ())
        });
        assert!(
            healthy.is_some(),
            "nats-server {} never healthy:\n{}",
            self.port,
            self.log_text()
        );
    }

    /// The server name (`-n`) of `stream`'s leader as this server sees it, if it has one.
    pub fn stream_leader(&self, stream: &str) -> Option<String> {
        let url = format!(
            "http://127.0.0.1:{}/jsz?accounts=true&streams=true",
            self.monitor_port
        );
        let jsz: Value = ureq::AgentBuilder::new()
            .timeout(Duration::from_secs(2))
            .build()
            .get(&url)
            .call()
            .ok()?
            .into_string()
            .ok()
            .and_then(|text| serde_json::from_str(&text).ok())?;
        jsz["account_details"]
            .as_array()?
            .iter()
            .filter_map(|account| account["stream_detail"].as_array())
            .flatten()
            .find(|detail| detail["name"] == stream)
            .and_then(|detail| detail["cluster"]["leader"].as_str())
            .map(str::to_string)
    }

    /// Kills the process (SIGKILL) and waits; port and store stay for `start_again`.
    pub fn stop(&self) {
        if let Some(mut child) = self.child.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Freezes the process (SIGSTOP) for `stall`, then lets it go on (SIGCONT): a server that
    /// stops answering while its connections stay open.
    pub fn stall(&self, stall: Duration) {
        let pid = self.pid().expect("nats-server is running") as libc::pid_t;
        // SAFETY: plain kill(2) on our own child's pid.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0, "SIGSTOP");
        std::thread::sleep(stall);
        // SAFETY: as above.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGCONT) }, 0, "SIGCONT");
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:<port>`, for a `--log nats://` list.
    pub fn host_port(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `nats://127.0.0.1:<port>`, the `--log` value of a standalone server.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|c| c.id())
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("nats.log")).unwrap_or_default()
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}
