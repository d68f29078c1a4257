//! Black-box tests of tenancy and operations: namespaces and tokens, write authorization, rate
//! limits, the runtime admin config, persistence of all of it across restarts, secrets at rest,
//! the `flux-core/directory` entity, `/metrics` and connectors (SPEC.md "Errors", "Namespaces
//! and auth", "Limits and admin config", "Connectors", "Operations", "State").
//!
//! Every rule is exercised through the real binary, with auth on and with auth off where it
//! applies. Every reply is checked never to be a 5xx.

mod util;

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};
use util::*;

/// The admin token of the servers that have one.
const ADMIN: &str = "admin-0123456789-secret-token";
/// A 32-byte key as 64 hex characters.
const KEY_HEX: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
/// A 32-byte key in base64 (bytes 0x00..0x1f).
const KEY_BASE64: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
/// Bound of every wait for the directory or a snapshot.
const WAIT: Duration = Duration::from_secs(15);
/// The directory refresh interval used by the tests that read it.
const DIRECTORY_FLAG: [&str; 2] = ["--directory-interval", "200ms"];

// ------------------------------------------------------------------ helpers

/// How a server is set up.
#[derive(Clone, Copy)]
struct Mode {
    auth: bool,
    admin: bool,
}

const AUTH_ADMIN: Mode = Mode {
    auth: true,
    admin: true,
};
const AUTH_OPEN: Mode = Mode {
    auth: true,
    admin: false,
};
const NO_AUTH: Mode = Mode {
    auth: false,
    admin: false,
};
const NO_AUTH_ADMIN: Mode = Mode {
    auth: false,
    admin: true,
};

/// Starts a server in `mode` with extra flags and environment.
fn start(mode: Mode, args: &[&str], env: &[(&str, &str)]) -> Server {
    let mut all: Vec<String> = Vec::new();
    if mode.auth {
        all.push("--auth".into());
    }
    if mode.admin {
        all.extend(["--admin-token".to_string(), ADMIN.to_string()]);
    }
    all.extend(args.iter().map(|a| a.to_string()));
    Server::start_with(Options {
        args: all,
        env: env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Options::default()
    })
}

/// Any request with an optional bearer token and an optional raw JSON body; asserts the
/// reply is not a 5xx.
fn call(s: &Server, method: &str, path: &str, token: Option<&str>, body: Option<&str>) -> Resp {
    let auth = token.map(|t| format!("Bearer {t}"));
    let mut headers: Vec<(&str, &str)> = Vec::new();
    if let Some(a) = &auth {
        headers.push(("Authorization", a));
    }
    if body.is_some() {
        headers.push(("Content-Type", "application/json"));
    }
    let r = s.request(method, path, &headers, body.map(str::as_bytes));
    assert!(
        r.status < 500,
        "{method} {path} -> {} (a 5xx): {}",
        r.status,
        r.text
    );
    r
}

/// `call` with a JSON body, returning status and JSON.
fn send(s: &Server, method: &str, path: &str, token: Option<&str>, body: &Value) -> (u16, Value) {
    call(s, method, path, token, Some(&body.to_string())).status_json()
}

/// Publishes one event with `token`.
fn publish(s: &Server, token: Option<&str>, entity: &str, props: Value) -> (u16, Value) {
    send(s, "POST", "/api/events", token, &event(entity, props))
}

fn publish_ok(s: &Server, token: Option<&str>, entity: &str, props: Value) {
    let (status, body) = publish(s, token, entity, props);
    assert_eq!(status, 200, "publish {entity} -> {body}");
}

/// Publishes a batch (`{"events": [...]}`) with `token`.
fn batch(s: &Server, token: Option<&str>, events: &[Value]) -> (u16, Value) {
    send(
        s,
        "POST",
        "/api/events/batch",
        token,
        &json!({ "events": events }),
    )
}

fn batch_delete(s: &Server, token: Option<&str>, filter: &Value) -> (u16, Value) {
    send(s, "POST", "/api/state/entities/delete", token, filter)
}

fn delete_entity(s: &Server, token: Option<&str>, id: &str) -> (u16, Value) {
    call(
        s,
        "DELETE",
        &format!("/api/state/entities/{id}"),
        token,
        None,
    )
    .status_json()
}

/// Registers `name` (with the admin token when `admin`), asserting 200; returns the token.
fn register(s: &Server, name: &str, admin: bool) -> String {
    let token = admin.then_some(ADMIN);
    let (status, body) = send(
        s,
        "POST",
        "/api/namespaces",
        token,
        &json!({ "name": name }),
    );
    assert_eq!(status, 200, "register {name} -> {body}");
    body["token"]
        .as_str()
        .unwrap_or_else(|| panic!("no token in {body}"))
        .to_string()
}

/// Is `id` of the form `ns_` plus 8 characters of `a-z0-9`?
fn is_namespace_id(id: &str) -> bool {
    id.strip_prefix("ns_").is_some_and(|rest| {
        rest.len() == 8
            && rest
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    })
}

fn exists(s: &Server, id: &str) -> bool {
    let (status, body) = s.entity(id);
    assert!(
        status == 200 || status == 404,
        "GET {id} -> {status} {body}"
    );
    status == 200
}

fn get_config(s: &Server, token: Option<&str>) -> Value {
    let (status, body) = call(s, "GET", "/api/admin/config", token, None).status_json();
    assert_eq!(status, 200, "GET config -> {body}");
    body
}

fn put_config(s: &Server, token: Option<&str>, patch: &Value) -> (u16, Value) {
    send(s, "PUT", "/api/admin/config", token, patch)
}

fn put_config_ok(s: &Server, token: Option<&str>, patch: &Value) -> Value {
    let (status, body) = put_config(s, token, patch);
    assert_eq!(status, 200, "PUT config {patch} -> {body}");
    body
}

fn default_config() -> Value {
    json!({
        "rate_limit_enabled": true,
        "rate_limit_per_namespace_per_minute": 10000,
        "body_size_limit_single_bytes": 1048576,
        "body_size_limit_batch_bytes": 10485760
    })
}

/// Every file under `dir`, recursively, with its bytes (files that vanish meanwhile, such as
/// rotated snapshots, are skipped).
fn read_all_files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            match entry.file_type() {
                Ok(t) if t.is_dir() => pending.push(path),
                Ok(t) if t.is_file() => {
                    if let Ok(bytes) = std::fs::read(&path) {
                        out.push((path, bytes));
                    }
                }
                _ => {}
            }
        }
    }
    out
}

fn contains_bytes(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

/// Asserts no file under `dir` holds any of `secrets` as bytes; returns the files read.
fn assert_not_stored(dir: &Path, secrets: &[&str]) -> usize {
    let files = read_all_files(dir);
    for (path, bytes) in &files {
        for secret in secrets {
            assert!(
                !contains_bytes(bytes, secret.as_bytes()),
                "{} holds the secret {secret:?} in clear",
                path.display()
            );
        }
    }
    files.len()
}

/// The sum of the samples of metric `name` (exact name, after any `_total`/`_count` suffix the
/// caller includes) whose label text contains `label` (all samples when empty).
fn metric(text: &str, name: &str, label: &str) -> f64 {
    let mut total = 0.0;
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        if &line[..name_end] != name {
            continue;
        }
        let (labels, rest) = match line[name_end..].strip_prefix('{') {
            Some(r) => {
                let close = r.rfind('}').unwrap_or_else(|| panic!("bad line {line:?}"));
                (&r[..close], &r[close + 1..])
            }
            None => ("", &line[name_end..]),
        };
        if !labels.contains(label) {
            continue;
        }
        let value = rest
            .split_whitespace()
            .next()
            .unwrap_or_else(|| panic!("no value in {line:?}"));
        total += value
            .parse::<f64>()
            .unwrap_or_else(|e| panic!("bad value in {line:?}: {e}"));
    }
    total
}

fn metrics(s: &Server) -> String {
    let (status, text) = s.get_text("/metrics");
    assert_eq!(status, 200, "{text}");
    text
}

/// The properties of `flux-core/directory` once `ok` accepts them (bounded wait).
fn wait_directory(s: &Server, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
    let mut last = Value::Null;
    wait_for(WAIT, || {
        let (status, body) = s.entity("flux-core/directory");
        if status != 200 {
            last = body;
            return None;
        }
        let props = body["properties"].clone();
        last = props.clone();
        ok(&props).then_some(props)
    })
    .unwrap_or_else(|| panic!("directory never showed {what}; last: {last}"))
}

/// `{name: {"entity_count": n}}` for the directory's `namespaces`.
fn namespaces_json(counts: &[(&str, u64)]) -> Value {
    let mut map = serde_json::Map::new();
    for (name, n) in counts {
        map.insert(name.to_string(), json!({ "entity_count": n }));
    }
    Value::Object(map)
}

/// Opens a WebSocket on `/api/ws`, optionally with a bearer token; returns the upgrade status.
fn websocket_status(s: &Server, token: Option<&str>) -> u16 {
    use tungstenite::client::IntoClientRequest;
    let stream = TcpStream::connect(s.addr()).expect("connect");
    stream
        .set_read_timeout(Some(REQUEST_TIMEOUT))
        .expect("read timeout");
    stream
        .set_write_timeout(Some(REQUEST_TIMEOUT))
        .expect("write timeout");
    let mut request = format!("ws://{}/api/ws", s.addr())
        .into_client_request()
        .expect("ws request");
    if let Some(t) = token {
        request.headers_mut().insert(
            "Authorization",
            format!("Bearer {t}").parse().expect("header value"),
        );
    }
    match tungstenite::client::client(request, stream) {
        Ok((mut socket, response)) => {
            let _ = socket.close(None);
            response.status().as_u16()
        }
        Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(response))) => {
            response.status().as_u16()
        }
        Err(e) => panic!("WebSocket handshake: {e}"),
    }
}

/// Stops the server with SIGTERM (asserting exit 0) and starts it again on the same dir.
fn restart_after_sigterm(s: &mut Server) {
    let status = s.terminate();
    assert!(status.success(), "SIGTERM exit status {status:?}");
    s.restart();
}

/// How a restart is done.
#[derive(Clone, Copy, Debug)]
enum Stop {
    Kill9,
    Sigterm,
}

fn restart(s: &mut Server, how: Stop) {
    match how {
        Stop::Kill9 => s.restart(),
        Stop::Sigterm => restart_after_sigterm(s),
    }
}

// ------------------------------------------------------------------ registration

#[test]
fn register_replies_with_id_name_token_and_get_describes_the_namespace() {
    let s = start(AUTH_ADMIN, &[], &[]);
    let before = now_ms();
    let (status, body) = send(
        &s,
        "POST",
        "/api/namespaces",
        Some(ADMIN),
        &json!({"name": "acme"}),
    );
    let after = now_ms();
    assert_eq!(status, 200, "{body}");
    let obj = body.as_object().expect("object");
    assert_eq!(obj.len(), 3, "exactly namespaceId, name, token: {body}");
    let id = body["namespaceId"].as_str().expect("namespaceId string");
    assert!(is_namespace_id(id), "namespaceId {id:?}");
    assert_eq!(body["name"], "acme");
    let token = body["token"].as_str().expect("token string");
    assert!(!token.is_empty());

    let (status, got) = s.get("/api/namespaces/acme");
    assert_eq!(status, 200, "{got}");
    assert_eq!(got.as_object().expect("object").len(), 4, "{got}");
    assert_eq!(got["namespaceId"], id);
    assert_eq!(got["name"], "acme");
    assert_eq!(got["entityCount"], 0);
    let created = got["createdAt"].as_str().expect("createdAt string");
    let created_ms = parse_iso_millis(created)
        .unwrap_or_else(|| panic!("createdAt {created:?} is not ISO ms Z"));
    assert!(
        created_ms >= before - 1000 && created_ms <= after + 1000,
        "createdAt {created} outside the request"
    );

    publish_ok(&s, Some(token), "acme/a", json!({"v": 1}));
    publish_ok(&s, Some(token), "acme/site-1/b", json!({"v": 2}));
    publish_ok(&s, Some(ADMIN), "acme2/c", json!({"v": 3}));
    let (_, got) = s.get("/api/namespaces/acme");
    assert_eq!(got["entityCount"], 2, "{got}");

    // Two namespaces get distinct ids and tokens.
    let (status, other) = send(
        &s,
        "POST",
        "/api/namespaces",
        Some(ADMIN),
        &json!({"name": "beta"}),
    );
    assert_eq!(status, 200, "{other}");
    assert_ne!(other["namespaceId"], body["namespaceId"]);
    assert_ne!(other["token"], body["token"]);

    let (status, got) = s.get("/api/namespaces/nosuch");
    assert_error(status, &got, 404, "");
}

#[test]
fn registration_needs_the_admin_token_when_one_is_configured() {
    let s = start(AUTH_ADMIN, &[], &[]);
    let body = json!({"name": "acme"});
    let (status, reply) = send(&s, "POST", "/api/namespaces", None, &body);
    assert_error(status, &reply, 401, "");
    // An unknown token is 401 (SPEC: "401 missing/unknown token"), here and on every
    // admin-only route.
    let (status, reply) = send(&s, "POST", "/api/namespaces", Some("wrong-token"), &body);
    assert_error(status, &reply, 401, "unknown token");
    let (status, reply) = s.get("/api/namespaces/acme");
    assert_error(status, &reply, 404, "");

    let token = register(&s, "acme", true);
    // A namespace token is not the admin token.
    let (status, reply) = send(
        &s,
        "POST",
        "/api/namespaces",
        Some(&token),
        &json!({"name": "other"}),
    );
    assert_error(status, &reply, 403, "");
    // Taken.
    let (status, reply) = send(&s, "POST", "/api/namespaces", Some(ADMIN), &body);
    assert_error(status, &reply, 409, "");
    // The first registration still holds.
    publish_ok(&s, Some(&token), "acme/x", json!({"v": 1}));
}

#[test]
fn registration_is_open_without_an_admin_token() {
    let s = start(AUTH_OPEN, &[], &[]);
    let (status, body) = send(
        &s,
        "POST",
        "/api/namespaces",
        None,
        &json!({"name": "acme"}),
    );
    assert_eq!(status, 200, "{body}");
    assert!(is_namespace_id(body["namespaceId"].as_str().unwrap_or("")));
    let token = body["token"].as_str().expect("token").to_string();
    publish_ok(&s, Some(&token), "acme/x", json!({"v": 1}));
    let (status, body) = send(
        &s,
        "POST",
        "/api/namespaces",
        None,
        &json!({"name": "acme"}),
    );
    assert_error(status, &body, 409, "");
    let (status, body) = s.get("/api/namespaces/acme");
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["entityCount"], 1);
}

#[test]
fn namespace_names_are_validated() {
    for mode in [AUTH_ADMIN, AUTH_OPEN] {
        let s = start(mode, &[], &[]);
        let token = mode.admin.then_some(ADMIN);
        let long = "a".repeat(33);
        let bad_names = [
            json!({"name": "ab"}),
            json!({"name": long}),
            json!({"name": "Acme"}),
            json!({"name": "a b"}),
            json!({"name": "acme/x"}),
            json!({"name": "acme.x"}),
            json!({"name": ""}),
            json!({"name": 123}),
            json!({"name": ["acme"]}),
            json!({"name": null}),
            json!({"nom": "acme"}),
            json!({}),
        ];
        for body in &bad_names {
            let (status, reply) = send(&s, "POST", "/api/namespaces", token, body);
            assert_error(status, &reply, 400, "name");
        }
        for raw in [
            "{\"name\": \"acme\"",
            "not json",
            "",
            "[]",
            "\"acme\"",
            "42",
        ] {
            let r = call(&s, "POST", "/api/namespaces", token, Some(raw));
            assert_error(r.status, &r.json(), 400, "");
        }
        let (status, reply) = s.get("/api/namespaces/acme");
        assert_error(status, &reply, 404, "");
        // Edges that are valid.
        let edge32 = format!("z{}", "9".repeat(31));
        for name in ["abc", "a-_", "x-y_z9", "000", edge32.as_str()] {
            register(&s, name, mode.admin);
            let (status, reply) = s.get(&format!("/api/namespaces/{name}"));
            assert_eq!(status, 200, "GET {name} -> {reply}");
            assert_eq!(reply["name"], name);
        }
    }
}

#[test]
fn a_name_registered_concurrently_goes_to_exactly_one_caller() {
    let s = start(AUTH_OPEN, &[], &[]);
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let client = s.client();
            std::thread::spawn(move || client.post("/api/namespaces", &json!({"name": "race"})))
        })
        .collect();
    let mut tokens = Vec::new();
    let mut conflicts = 0;
    for t in threads {
        let (status, text) = t.join().expect("thread").expect("transport");
        let body = parse_json(status, &text);
        match status {
            200 => tokens.push(body["token"].as_str().expect("token").to_string()),
            409 => {
                error_message(&body);
                conflicts += 1;
            }
            other => panic!("concurrent registration -> {other} {text}"),
        }
    }
    assert_eq!(tokens.len(), 1, "winners: {tokens:?}");
    assert_eq!(conflicts, 7);
    publish_ok(&s, Some(&tokens[0]), "race/x", json!({"v": 1}));
}

/// Bodies documented as JSON objects (`{"name"}`, `{"token"}`, `{"namespace"|"prefix"|
/// "entity_ids"}`) are refused with 400 when they are arrays, even arrays whose items would
/// fill the fields in order. Every case is tried before the verdict, so one run lists them all.
#[test]
fn object_bodies_refuse_arrays() {
    let s = start(AUTH_ADMIN, &[], &[("FLUX_ENCRYPTION_KEY", KEY_HEX)]);
    publish_ok(&s, Some(ADMIN), "victim/x", json!({"v": 1}));
    let cases = [
        ("/api/namespaces", "[\"acme\"]"),
        ("/api/namespaces", "[\"acme2\", 1]"),
        ("/api/connectors/github/token", "[\"ghp_array\"]"),
        ("/api/state/entities/delete", "[\"victim\", null, null]"),
        ("/api/state/entities/delete", "[null, \"victim/\", null]"),
    ];
    let mut wrong = Vec::new();
    for (path, raw) in cases {
        let r = call(&s, "POST", path, Some(ADMIN), Some(raw));
        if r.status != 400 {
            wrong.push(format!("POST {path} {raw} -> {} {}", r.status, r.text));
        }
    }
    let (status, _) = s.get("/api/namespaces/acme");
    if status != 404 {
        wrong.push("namespace acme was registered from an array body".into());
    }
    if connector_status(&s, "github") != "needs_token" {
        wrong.push("a connector token was stored from an array body".into());
    }
    if !exists(&s, "victim/x") {
        wrong.push("victim/x was deleted by an array body".into());
    }
    assert!(
        wrong.is_empty(),
        "array bodies accepted:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn deleting_a_namespace_needs_admin_and_revokes_its_token() {
    let mut s = start(AUTH_ADMIN, &[], &[]);
    let token = register(&s, "acme", true);
    publish_ok(&s, Some(&token), "acme/x", json!({"v": 1}));

    let r = call(&s, "DELETE", "/api/namespaces/acme", None, None);
    assert_error(r.status, &r.json(), 401, "");
    assert_eq!(
        r.header("www-authenticate"),
        Some("Bearer"),
        "a 401 names its scheme"
    );
    let r = call(&s, "DELETE", "/api/namespaces/acme", Some("wrong"), None);
    assert_error(r.status, &r.json(), 401, "unknown token");
    assert_eq!(r.header("www-authenticate"), Some("Bearer"));
    let r = call(&s, "DELETE", "/api/namespaces/acme", Some(&token), None);
    assert_error(r.status, &r.json(), 403, "");
    let r = call(&s, "DELETE", "/api/namespaces/nosuch", Some(ADMIN), None);
    assert_error(r.status, &r.json(), 404, "");
    // Still there after the refused deletes.
    publish_ok(&s, Some(&token), "acme/x", json!({"v": 2}));

    let r = call(&s, "DELETE", "/api/namespaces/acme", Some(ADMIN), None);
    assert_eq!(r.status, 204, "{}", r.text);
    assert!(r.text.is_empty(), "204 with a body: {:?}", r.text);
    let (status, body) = s.get("/api/namespaces/acme");
    assert_error(status, &body, 404, "");
    let (status, body) = publish(&s, Some(&token), "acme/x", json!({"v": 3}));
    assert_error(status, &body, 401, "");
    let (status, body) = batch(&s, Some(&token), &[event("acme/y", json!({"v": 1}))]);
    assert_error(status, &body, 401, "");
    assert!(!exists(&s, "acme/y"));

    // Deleted stays deleted across restarts.
    for how in [Stop::Kill9, Stop::Sigterm] {
        restart(&mut s, how);
        let (status, body) = s.get("/api/namespaces/acme");
        assert_eq!(status, 404, "{how:?}: {body}");
        assert_error(status, &body, 404, "");
        let (status, body) = publish(&s, Some(&token), "acme/x", json!({"v": 4}));
        assert_error(status, &body, 401, "");
    }

    // The name can be taken again; the old token does not come back with it.
    let fresh = register(&s, "acme", true);
    assert_ne!(fresh, token);
    let (status, body) = publish(&s, Some(&token), "acme/x", json!({"v": 5}));
    assert_error(status, &body, 401, "");
    publish_ok(&s, Some(&fresh), "acme/x", json!({"v": 6}));
}

#[test]
fn deleting_a_namespace_is_refused_without_a_configured_admin_token() {
    let s = start(AUTH_OPEN, &[], &[]);
    let token = register(&s, "acme", false);
    // A missing or unknown token is 401, a namespace's 403 (SPEC's errors).
    for (t, code) in [
        (None, 401),
        (Some(token.as_str()), 403),
        (Some("anything"), 401),
    ] {
        let r = call(&s, "DELETE", "/api/namespaces/acme", t, None);
        assert_error(r.status, &r.json(), code, "none is configured");
    }
    let (status, body) = s.get("/api/namespaces/acme");
    assert_eq!(status, 200, "{body}");
    publish_ok(&s, Some(&token), "acme/x", json!({"v": 1}));
}

/// `FLUX_AUTH_ENABLED` takes the usual spellings of a yes or a no (`1`, `TRUE`, `yes`, `off`
/// …), not only `true` and `false`.
#[test]
fn auth_mode_from_the_environment_takes_usual_boolean_spellings() {
    for (value, on) in [
        ("1", true),
        ("TRUE", true),
        ("yes", true),
        ("0", false),
        ("off", false),
    ] {
        let s = start(NO_AUTH, &[], &[("FLUX_AUTH_ENABLED", value)]);
        assert!(
            s.stdout_text().contains(&format!("auth={on}")),
            "FLUX_AUTH_ENABLED={value}: {}",
            s.stdout_text()
        );
        let (status, body) = publish(&s, None, "acme/x", json!({"v": 1}));
        assert_eq!(
            status,
            if on { 401 } else { 200 },
            "FLUX_AUTH_ENABLED={value}: {body}"
        );
    }
}

#[test]
fn namespace_routes_answer_404_with_auth_off() {
    for mode in [NO_AUTH, NO_AUTH_ADMIN] {
        let s = start(mode, &[], &[]);
        let admin = mode.admin.then_some(ADMIN);
        let (status, body) = send(
            &s,
            "POST",
            "/api/namespaces",
            admin,
            &json!({"name": "acme"}),
        );
        assert_error(status, &body, 404, "");
        let r = call(&s, "GET", "/api/namespaces/acme", admin, None);
        assert_error(r.status, &r.json(), 404, "");
        let r = call(&s, "DELETE", "/api/namespaces/acme", admin, None);
        assert_error(r.status, &r.json(), 404, "");
        s.put("acme/x", json!({"v": 1}));
        let r = call(&s, "GET", "/api/namespaces/acme", None, None);
        assert_error(r.status, &r.json(), 404, "");
        // Whatever the method: the routes do not exist, rather than taking other methods.
        for (method, path) in [
            ("GET", "/api/namespaces"),
            ("PUT", "/api/namespaces"),
            ("PUT", "/api/namespaces/acme"),
            ("GET", "/api/namespaces/%ZZ"),
        ] {
            let r = call(&s, method, path, admin, None);
            assert_error(r.status, &r.json(), 404, "auth mode");
        }
    }
}

// ------------------------------------------------------------------ writes

#[test]
fn every_write_needs_a_known_token() {
    let s = start(AUTH_ADMIN, &[], &[]);
    let token = register(&s, "acme", true);
    publish_ok(&s, Some(&token), "acme/keep", json!({"v": 1}));
    let unknown = "flux_0000000000000000000000000000000000000000000000000000000000000000";

    for bad in [None, Some(unknown), Some("garbage")] {
        let (status, body) = publish(&s, bad, "acme/x", json!({"v": 1}));
        assert_error(status, &body, 401, "");
        let (status, body) = batch(&s, bad, &[event("acme/y", json!({"v": 1}))]);
        assert_error(status, &body, 401, "");
        let (status, body) = delete_entity(&s, bad, "acme/keep");
        assert_error(status, &body, 401, "");
        for filter in [
            json!({"namespace": "acme"}),
            json!({"prefix": "acme/"}),
            json!({"entity_ids": ["acme/keep"]}),
        ] {
            let (status, body) = batch_delete(&s, bad, &filter);
            assert_error(status, &body, 401, "");
        }
    }
    // Other spellings of the header that carry no bearer token.
    let body = event("acme/x", json!({"v": 1})).to_string();
    for header in ["Basic YWRtaW46eA==", "Bearer", "Bearer ", token.as_str()] {
        let r = s.request(
            "POST",
            "/api/events",
            &[
                ("Authorization", header),
                ("Content-Type", "application/json"),
            ],
            Some(body.as_bytes()),
        );
        assert_error(r.status, &r.json(), 401, "");
    }
    assert!(!exists(&s, "acme/x"));
    assert!(!exists(&s, "acme/y"));
    assert_eq!(s.props("acme/keep"), json!({"v": 1}));
}

#[test]
fn a_token_writes_only_its_own_namespace() {
    let s = start(AUTH_ADMIN, &[], &[]);
    // `abc` is a prefix of `abcd`: ownership is by whole segment, not by string prefix.
    let abc = register(&s, "abc", true);
    let abcd = register(&s, "abcd", true);

    publish_ok(&s, Some(&abc), "abc/x", json!({"v": 1}));
    publish_ok(&s, Some(&abc), "abc/site-3/pump-01", json!({"v": 1}));
    publish_ok(&s, Some(&abcd), "abcd/x", json!({"v": 1}));

    let (status, body) = publish(&s, Some(&abc), "abcd/x", json!({"v": 2}));
    assert_error(status, &body, 403, "");
    let (status, body) = publish(&s, Some(&abc), "abc-x/y", json!({"v": 2}));
    assert_error(status, &body, 403, "");
    let (status, body) = publish(&s, Some(&abc), "other/y", json!({"v": 2}));
    assert_error(status, &body, 403, "");
    let (status, body) = publish(&s, Some(&abcd), "abc/x", json!({"v": 2}));
    assert_error(status, &body, 403, "");
    // No namespace at all.
    let (status, body) = publish(&s, Some(&abc), "noslash", json!({"v": 2}));
    assert_error(status, &body, 400, "entity_id");
    let (status, body) = publish(&s, Some(&abc), "abc", json!({"v": 2}));
    assert_error(status, &body, 400, "entity_id");

    assert_eq!(s.props("abcd/x"), json!({"v": 1}));
    assert_eq!(s.props("abc/x"), json!({"v": 1}));
    assert!(!exists(&s, "abc-x/y"));
    assert!(!exists(&s, "other/y"));
    assert!(!exists(&s, "noslash"));

    // DELETE of one entity.
    let (status, body) = delete_entity(&s, Some(&abc), "abcd/x");
    assert_error(status, &body, 403, "");
    assert!(exists(&s, "abcd/x"));
    let (status, body) = delete_entity(&s, Some(&abc), "noslash");
    assert_error(status, &body, 400, "");
    let (status, body) = delete_entity(&s, Some(&abc), "abc/x");
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["entity_id"], "abc/x");
    assert!(!exists(&s, "abc/x"));
    // The encoded form names the same entity, and is judged the same way.
    let (status, body) = delete_entity(&s, Some(&abc), "abcd%2Fx");
    assert_error(status, &body, 403, "");
    assert!(exists(&s, "abcd/x"));
}

#[test]
fn a_batch_commits_own_items_and_refuses_foreign_ones_per_item() {
    let s = start(AUTH_ADMIN, &[], &[]);
    let acme = register(&s, "acme", true);
    register(&s, "beta", true);
    let mut invalid = event("acme/bad", json!({"v": 1}));
    invalid.as_object_mut().expect("object").remove("stream");
    let items = [
        event("acme/a", json!({"v": 1})),
        event("beta/b", json!({"v": 1})),
        event("noslash", json!({"v": 1})),
        invalid,
        event("acme/c", json!({"v": 1})),
        event("acmeX/d", json!({"v": 1})),
    ];
    // Both batch shapes.
    for (i, body) in [json!({ "events": items }), json!(items)]
        .iter()
        .enumerate()
    {
        let (status, reply) = send(&s, "POST", "/api/events/batch", Some(&acme), body);
        assert_eq!(status, 200, "shape {i}: {reply}");
        assert_eq!(reply["successful"], 2, "{reply}");
        assert_eq!(reply["failed"], 4, "{reply}");
        let results = reply["results"].as_array().expect("results");
        assert_eq!(results.len(), 6, "{reply}");
        for ok in [0, 4] {
            assert!(results[ok]["eventId"].is_string(), "{reply}");
            assert_eq!(results[ok]["stream"], "sensors");
        }
        for bad in [1, 2, 3, 5] {
            let msg = error_message(&results[bad]);
            assert!(!msg.is_empty());
        }
        assert!(
            error_message(&results[3]).contains("stream"),
            "{}",
            results[3]
        );
    }
    assert_eq!(s.props("acme/a"), json!({"v": 1}));
    assert_eq!(s.props("acme/c"), json!({"v": 1}));
    for id in ["beta/b", "noslash", "acme/bad", "acmeX/d"] {
        assert!(!exists(&s, id), "{id} was written by a foreign token");
    }
    // A batch of only foreign items commits nothing and still answers per item.
    let (status, reply) = batch(&s, Some(&acme), &[event("beta/z", json!({"v": 1}))]);
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["successful"], 0);
    assert_eq!(reply["failed"], 1);
    error_message(&reply["results"][0]);
    assert!(!exists(&s, "beta/z"));
}

#[test]
fn batch_delete_is_limited_to_the_tokens_namespace() {
    let s = start(AUTH_ADMIN, &[], &[]);
    let acme = register(&s, "acme", true);
    let beta = register(&s, "beta", true);
    for id in ["acme/tmp-1", "acme/tmp-2", "acme/keep", "acme/x"] {
        publish_ok(&s, Some(&acme), id, json!({"v": 1}));
    }
    for id in ["beta/tmp-1", "beta/x"] {
        publish_ok(&s, Some(&beta), id, json!({"v": 1}));
    }

    // The error names the field the request gave.
    let (status, body) = batch_delete(&s, Some(&acme), &json!({"namespace": "beta"}));
    assert_error(status, &body, 403, "namespace \"beta\"");
    let (status, body) = batch_delete(&s, Some(&acme), &json!({"prefix": "beta/"}));
    assert_error(status, &body, 403, "prefix \"beta/\"");
    let (status, body) = batch_delete(&s, Some(&acme), &json!({"prefix": "beta/tmp-"}));
    assert_error(status, &body, 403, "prefix \"beta/tmp-\"");
    // A prefix that is not inside `acme/` could reach other namespaces (`acme2/`, `acmeX/`).
    for prefix in ["acme", "ac", ""] {
        let (status, body) = batch_delete(&s, Some(&acme), &json!({ "prefix": prefix }));
        assert!(
            status == 403 || status == 400,
            "prefix {prefix:?} -> {status} {body}"
        );
        error_message(&body);
    }
    assert!(exists(&s, "beta/tmp-1") && exists(&s, "beta/x"));

    let (status, body) = batch_delete(&s, Some(&acme), &json!({"prefix": "acme/tmp-"}));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["deleted"], 2, "{body}");
    assert_eq!(body["failed"], 0, "{body}");
    assert!(!exists(&s, "acme/tmp-1") && !exists(&s, "acme/tmp-2"));

    let ids = json!({"entity_ids": ["acme/keep", "beta/x", "noslash", "acme/missing"]});
    let (status, body) = batch_delete(&s, Some(&acme), &ids);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["deleted"], 1, "{body}");
    assert_eq!(body["failed"], 3, "{body}");
    let errors = body["errors"].as_array().expect("errors array");
    assert_eq!(errors.len(), 3, "{body}");
    let mut failed: Vec<&str> = errors
        .iter()
        .map(|e| {
            assert!(
                e["error"].as_str().is_some_and(|m| !m.is_empty()),
                "error item without message: {e}"
            );
            e["entity_id"].as_str().expect("entity_id in error item")
        })
        .collect();
    failed.sort_unstable();
    assert_eq!(failed, ["acme/missing", "beta/x", "noslash"]);
    assert!(!exists(&s, "acme/keep"));
    assert!(exists(&s, "beta/x"));

    let (status, body) = batch_delete(&s, Some(&beta), &json!({"namespace": "beta"}));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["deleted"], 2, "{body}");
    assert!(!exists(&s, "beta/x"));
    assert!(exists(&s, "acme/x"));
}

#[test]
fn reads_and_websocket_need_no_token() {
    let s = start(AUTH_ADMIN, &[], &[]);
    let acme = register(&s, "acme", true);
    publish_ok(&s, Some(&acme), "acme/sensor-01", json!({"t": 21}));
    for token in [None, Some("unknown-token")] {
        let get = |path: &str| call(&s, "GET", path, token, None);
        let r = get("/api/state/entities/acme/sensor-01");
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(r.json()["properties"], json!({"t": 21}));
        let r = get("/api/state/entities/acme%2Fsensor-01");
        assert_eq!(r.status, 200, "{}", r.text);
        for path in [
            "/api/state/entities",
            "/api/state/entities?namespace=acme",
            "/api/state/entities?prefix=acme/",
        ] {
            let r = get(path);
            assert_eq!(r.status, 200, "{path}: {}", r.text);
            let ids: Vec<Value> = r.json().as_array().expect("list").clone();
            assert!(ids.iter().any(|e| e["id"] == "acme/sensor-01"), "{path}");
        }
        let r = get("/api/events?entity=acme%2Fsensor-01");
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(history_items(&r.json()).len(), 1);
        let r = get("/api/namespaces/acme");
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(get("/api/health").status, 200);
        assert_eq!(get("/metrics").status, 200);
        assert_eq!(get("/api/connectors").status, 200);
        assert_eq!(websocket_status(&s, token), 101);
    }
    assert_eq!(websocket_status(&s, Some(&acme)), 101);
}

#[test]
fn the_admin_token_writes_anywhere() {
    let s = start(AUTH_ADMIN, &[], &[]);
    let acme = register(&s, "acme", true);
    let a = Some(ADMIN);
    publish_ok(&s, a, "acme/x", json!({"v": 1}));
    publish_ok(&s, a, "unregistered/y", json!({"v": 1}));
    let (status, body) = batch(
        &s,
        a,
        &[
            event("acme/b1", json!({"v": 1})),
            event("other/b2", json!({"v": 1})),
        ],
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["successful"], 2, "{body}");
    // The namespace's own token sees the admin's writes as its own.
    publish_ok(&s, Some(&acme), "acme/x", json!({"w": 2}));
    assert_eq!(s.props("acme/x"), json!({"v": 1, "w": 2}));

    let (status, body) = delete_entity(&s, a, "unregistered/y");
    assert_eq!(status, 200, "{body}");
    let (status, body) = batch_delete(&s, a, &json!({"namespace": "other"}));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["deleted"], 1, "{body}");
    let (status, body) = batch_delete(&s, a, &json!({"entity_ids": ["acme/b1"]}));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["deleted"], 1, "{body}");
    assert_eq!(s.list_ids(""), ["acme/x"]);
}

#[test]
fn with_auth_off_writes_need_no_token() {
    for mode in [NO_AUTH, NO_AUTH_ADMIN] {
        let s = start(mode, &[], &[]);
        for token in [None, Some("anything")] {
            publish_ok(&s, token, "acme/x", json!({"v": 1}));
            publish_ok(&s, token, "noslash", json!({"v": 1}));
            let (status, body) = batch(&s, token, &[event("beta/y", json!({"v": 1}))]);
            assert_eq!(status, 200, "{body}");
            assert_eq!(body["successful"], 1);
            let (status, body) = delete_entity(&s, token, "acme/x");
            assert_eq!(status, 200, "{body}");
            let (status, body) = batch_delete(&s, token, &json!({"namespace": "beta"}));
            assert_eq!(status, 200, "{body}");
            assert_eq!(body["deleted"], 1);
        }
        assert_eq!(s.list_ids(""), ["noslash"]);
        assert_eq!(websocket_status(&s, None), 101);
    }
}

// ------------------------------------------------------------------ rate limits

fn retry_after(r: &Resp) -> u64 {
    let v = r
        .header("retry-after")
        .unwrap_or_else(|| panic!("429 without Retry-After; headers {:?}", r.headers));
    let n: u64 = v
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("Retry-After {v:?} is not integer seconds"));
    assert!((1..=60).contains(&n), "Retry-After {n} outside 1..=60");
    n
}

fn publish_resp(s: &Server, token: &str, entity: &str, props: Value) -> Resp {
    call(
        s,
        "POST",
        "/api/events",
        Some(token),
        Some(&event(entity, props).to_string()),
    )
}

fn batch_resp(s: &Server, token: &str, events: &[Value]) -> Resp {
    call(
        s,
        "POST",
        "/api/events/batch",
        Some(token),
        Some(&json!(events).to_string()),
    )
}

fn events_for(prefix: &str, n: usize) -> Vec<Value> {
    (0..n)
        .map(|i| event(&format!("{prefix}{i}"), json!({ "i": i })))
        .collect()
}

// Recovery after the 60 s window is not waited for (no test sleeps a minute): Retry-After is
// checked to be 1..=60 and lifting the limit is checked to work at once.
#[test]
fn rate_limit_counts_every_event_and_answers_429_with_retry_after() {
    let s = start(AUTH_ADMIN, &[], &[]);
    let acme = register(&s, "acme", true);
    let beta = register(&s, "beta", true);
    let gamma = register(&s, "gamma", true);
    let config = put_config_ok(
        &s,
        Some(ADMIN),
        &json!({"rate_limit_per_namespace_per_minute": 5}),
    );
    assert_eq!(config["rate_limit_per_namespace_per_minute"], 5);
    let limited_before = metric(&metrics(&s), "flux_rate_limited_requests_total", "");

    // 3 events in a batch, then a batch of 3 is over (6 > 5) and commits nothing.
    let r = batch_resp(&s, &acme, &events_for("acme/a", 3));
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json()["successful"], 3);
    let r = batch_resp(&s, &acme, &events_for("acme/b", 3));
    assert_error(r.status, &r.json(), 429, "");
    retry_after(&r);
    for i in 0..3 {
        assert!(
            !exists(&s, &format!("acme/b{i}")),
            "refused batch committed"
        );
    }
    // Two singles fill the budget exactly; the next is refused.
    for i in 0..2 {
        let r = publish_resp(&s, &acme, &format!("acme/c{i}"), json!({"v": 1}));
        assert_eq!(r.status, 200, "single {i}: {}", r.text);
    }
    let r = publish_resp(&s, &acme, "acme/over", json!({"v": 1}));
    assert_error(r.status, &r.json(), 429, "");
    retry_after(&r);
    assert!(!exists(&s, "acme/over"));
    let r = publish_resp(&s, &acme, "acme/c0", json!({"v": 2}));
    assert_eq!(r.status, 429, "{}", r.text);
    assert_eq!(s.props("acme/c0"), json!({"v": 1}));

    // Other namespaces have their own budget.
    let r = batch_resp(&s, &beta, &events_for("beta/a", 5));
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json()["successful"], 5);
    let r = publish_resp(&s, &beta, "beta/over", json!({"v": 1}));
    assert_eq!(r.status, 429, "{}", r.text);
    // A batch bigger than a whole budget is refused outright, nothing committed.
    let r = batch_resp(&s, &gamma, &events_for("gamma/a", 6));
    assert_error(r.status, &r.json(), 429, "");
    retry_after(&r);
    assert!(s.list_ids("?namespace=gamma").is_empty());
    let r = publish_resp(&s, &gamma, "gamma/one", json!({"v": 1}));
    assert_eq!(r.status, 200, "{}", r.text);

    let limited_after = metric(&metrics(&s), "flux_rate_limited_requests_total", "");
    assert!(
        limited_after >= limited_before + 5.0,
        "flux_rate_limited_requests went {limited_before} -> {limited_after} after five 429s"
    );
}

#[test]
fn lifting_the_rate_limit_takes_effect_at_once() {
    let s = start(AUTH_ADMIN, &[], &[]);
    let acme = register(&s, "acme", true);
    put_config_ok(
        &s,
        Some(ADMIN),
        &json!({"rate_limit_per_namespace_per_minute": 2}),
    );
    let r = batch_resp(&s, &acme, &events_for("acme/a", 2));
    assert_eq!(r.status, 200, "{}", r.text);
    let r = publish_resp(&s, &acme, "acme/x", json!({"v": 1}));
    assert_eq!(r.status, 429, "{}", r.text);

    let config = put_config_ok(&s, Some(ADMIN), &json!({"rate_limit_enabled": false}));
    assert_eq!(config["rate_limit_enabled"], false);
    assert_eq!(config["rate_limit_per_namespace_per_minute"], 2);
    for i in 0..5 {
        let r = publish_resp(&s, &acme, &format!("acme/free{i}"), json!({"v": 1}));
        assert_eq!(r.status, 200, "with limits disabled: {}", r.text);
    }
    let r = batch_resp(&s, &acme, &events_for("acme/b", 10));
    assert_eq!(r.status, 200, "{}", r.text);

    // Re-enabled with a higher limit: the new limit applies at once as well.
    put_config_ok(
        &s,
        Some(ADMIN),
        &json!({"rate_limit_enabled": true, "rate_limit_per_namespace_per_minute": 1000}),
    );
    let r = publish_resp(&s, &acme, "acme/again", json!({"v": 1}));
    assert_eq!(r.status, 200, "{}", r.text);
    put_config_ok(
        &s,
        Some(ADMIN),
        &json!({"rate_limit_per_namespace_per_minute": 1}),
    );
    let r = publish_resp(&s, &acme, "acme/again", json!({"v": 2}));
    assert_eq!(r.status, 429, "{}", r.text);
    retry_after(&r);
}

#[test]
fn rate_limits_do_not_apply_with_auth_off() {
    let s = start(NO_AUTH, &[], &[]);
    put_config_ok(&s, None, &json!({"rate_limit_per_namespace_per_minute": 2}));
    for i in 0..6 {
        s.put(&format!("acme/x{i}"), json!({"v": 1}));
    }
    let (status, body) = batch(&s, None, &events_for("acme/b", 10));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["successful"], 10);
}

// ------------------------------------------------------------------ admin config

#[test]
fn admin_config_has_defaults_and_put_changes_only_given_fields() {
    for mode in [NO_AUTH, AUTH_ADMIN] {
        let s = start(mode, &[], &[]);
        let token = mode.admin.then_some(ADMIN);
        assert_eq!(get_config(&s, token), default_config());

        let got = put_config_ok(
            &s,
            token,
            &json!({"rate_limit_per_namespace_per_minute": 77}),
        );
        let mut want = default_config();
        want["rate_limit_per_namespace_per_minute"] = json!(77);
        assert_eq!(got, want);
        assert_eq!(get_config(&s, token), want);

        let got = put_config_ok(
            &s,
            token,
            &json!({"rate_limit_enabled": false, "body_size_limit_batch_bytes": 5000000}),
        );
        want["rate_limit_enabled"] = json!(false);
        want["body_size_limit_batch_bytes"] = json!(5000000);
        assert_eq!(got, want);
        let got = put_config_ok(&s, token, &json!({}));
        assert_eq!(got, want, "an empty PUT changes nothing");
        assert_eq!(get_config(&s, token), want);
    }
}

#[test]
fn admin_config_put_is_validated_and_never_half_applied() {
    let s = start(NO_AUTH, &[], &[]);
    let cases = [
        (json!({"rate_limit_enabled": "yes"}), "rate_limit_enabled"),
        (json!({"rate_limit_enabled": 1}), "rate_limit_enabled"),
        (json!({"rate_limit_enabled": null}), "rate_limit_enabled"),
        (
            json!({"rate_limit_per_namespace_per_minute": "10"}),
            "rate_limit_per_namespace_per_minute",
        ),
        (
            json!({"rate_limit_per_namespace_per_minute": 0}),
            "rate_limit_per_namespace_per_minute",
        ),
        (
            json!({"rate_limit_per_namespace_per_minute": -1}),
            "rate_limit_per_namespace_per_minute",
        ),
        (
            json!({"rate_limit_per_namespace_per_minute": 1.5}),
            "rate_limit_per_namespace_per_minute",
        ),
        (
            json!({"body_size_limit_single_bytes": 0}),
            "body_size_limit_single_bytes",
        ),
        (
            json!({"body_size_limit_single_bytes": true}),
            "body_size_limit_single_bytes",
        ),
        (
            json!({"body_size_limit_batch_bytes": 0}),
            "body_size_limit_batch_bytes",
        ),
        (
            json!({"body_size_limit_batch_bytes": [1]}),
            "body_size_limit_batch_bytes",
        ),
        (json!({"no_such_field": 1}), "no_such_field"),
        // One good field with one bad: nothing is applied.
        (
            json!({"rate_limit_per_namespace_per_minute": 3, "body_size_limit_single_bytes": "x"}),
            "body_size_limit_single_bytes",
        ),
        (json!({"rate_limit_enabled": false, "bogus": true}), "bogus"),
    ];
    for (patch, field) in &cases {
        let (status, body) = put_config(&s, None, patch);
        assert_error(status, &body, 400, field);
        assert_eq!(get_config(&s, None), default_config(), "after {patch}");
    }
    for raw in [
        "{",
        "not json",
        "",
        "[]",
        "[{\"rate_limit_enabled\": false}]",
        "5",
        "null",
    ] {
        let r = call(&s, "PUT", "/api/admin/config", None, Some(raw));
        assert_error(r.status, &r.json(), 400, "");
    }
    assert_eq!(get_config(&s, None), default_config());
}

#[test]
fn body_size_limits_from_the_config_take_effect_at_once() {
    for mode in [NO_AUTH, AUTH_ADMIN] {
        let s = start(mode, &[], &[]);
        let token = mode.admin.then_some(ADMIN);
        let writer = if mode.auth {
            Some(register(&s, "acme", true))
        } else {
            None
        };
        let writer = writer.as_deref();
        let post = |path: &str, body: &[u8]| {
            let auth = writer.map(|t| format!("Bearer {t}"));
            let mut headers = vec![("Content-Type", "application/json")];
            if let Some(a) = &auth {
                headers.push(("Authorization", a));
            }
            let r = s.request("POST", path, &headers, Some(body));
            assert!(r.status < 500, "{path}: {} {}", r.status, r.text);
            r
        };
        assert_eq!(
            post("/api/events", &padded_event("acme/big", 3000)).status,
            200
        );

        put_config_ok(&s, token, &json!({"body_size_limit_single_bytes": 2048}));
        let r = post("/api/events", &padded_event("acme/big", 3000));
        assert_error(r.status, &r.json(), 413, "payload too large");
        let r = post("/api/events", &padded_event("acme/small", 1500));
        assert_eq!(r.status, 200, "{}", r.text);
        // The batch limit is separate.
        let events: Vec<Value> = (0..10)
            .map(|i| event(&format!("acme/b{i}"), json!({"pad": "x".repeat(400)})))
            .collect();
        let batch_body = json!(events).to_string();
        assert!(batch_body.len() > 4096 && batch_body.len() < 10_000);
        let r = post("/api/events/batch", batch_body.as_bytes());
        assert_eq!(r.status, 200, "{}", r.text);
        put_config_ok(&s, token, &json!({"body_size_limit_batch_bytes": 4096}));
        let r = post("/api/events/batch", batch_body.as_bytes());
        assert_error(r.status, &r.json(), 413, "payload too large");
        let r = post("/api/events", &padded_event("acme/small", 1500));
        assert_eq!(r.status, 200, "{}", r.text);

        // Raised above the default: a 1.5 MiB event is taken.
        put_config_ok(
            &s,
            token,
            &json!({"body_size_limit_single_bytes": 2 * SINGLE_LIMIT}),
        );
        let r = post(
            "/api/events",
            &padded_event("acme/huge", SINGLE_LIMIT * 3 / 2),
        );
        assert_eq!(r.status, 200, "{}", r.text);
        // Over the raised limit: sent raw, as the server may answer before reading the body.
        let auth = writer.map(|t| format!("Bearer {t}"));
        let mut headers = vec![("Content-Type", "application/json")];
        if let Some(a) = &auth {
            headers.push(("Authorization", a));
        }
        let body = padded_event("acme/huge", 2 * SINGLE_LIMIT + 1);
        let r = s.raw_ok(&http_request("POST", "/api/events", &headers, &body));
        assert_error(r.status, &r.json(), 413, "payload too large");
    }
}

#[test]
fn admin_config_changes_need_the_admin_token_when_configured() {
    for mode in [AUTH_ADMIN, NO_AUTH_ADMIN] {
        let s = start(mode, &[], &[]);
        let patch = json!({"rate_limit_per_namespace_per_minute": 9});
        let (status, body) = put_config(&s, None, &patch);
        assert_error(status, &body, 401, "");
        // An unknown token is 401; a namespace token, known but not the admin's, 403.
        let (status, body) = put_config(&s, Some("wrong"), &patch);
        assert_error(status, &body, 401, "unknown token");
        if mode.auth {
            let token = register(&s, "acme", true);
            let (status, body) = put_config(&s, Some(&token), &patch);
            assert_error(status, &body, 403, "");
            // Reading needs no more than a namespace's token: the skill script's
            // `admin-config` reads with FLUX_TOKEN, and only its update needs the admin's.
            assert_eq!(get_config(&s, Some(&token)), default_config());
        }
        let r = call(&s, "GET", "/api/admin/config", None, None);
        assert_error(r.status, &r.json(), 401, "");
        let r = call(&s, "GET", "/api/admin/config", Some("wrong"), None);
        assert_error(r.status, &r.json(), 401, "unknown token");
        assert_eq!(get_config(&s, Some(ADMIN)), default_config());
        let got = put_config_ok(&s, Some(ADMIN), &patch);
        assert_eq!(got["rate_limit_per_namespace_per_minute"], 9);
    }
}

#[test]
fn admin_config_put_is_refused_in_auth_mode_without_an_admin_token() {
    let s = start(AUTH_OPEN, &[], &[]);
    let token = register(&s, "acme", false);
    let patch = json!({"rate_limit_enabled": false});
    for (t, code) in [
        (None, 401),
        (Some(token.as_str()), 403),
        (Some("anything"), 401),
    ] {
        let (status, body) = put_config(&s, t, &patch);
        assert_error(status, &body, code, "none is configured");
    }
    // With no admin token configured, reading stays open, with a token or without.
    assert_eq!(get_config(&s, None), default_config());
    assert_eq!(get_config(&s, Some(&token)), default_config());
}

#[test]
fn admin_config_survives_sigterm_and_kill9() {
    for mode in [NO_AUTH, AUTH_ADMIN] {
        let mut s = start(mode, &[], &[]);
        let token = mode.admin.then_some(ADMIN);
        let mut want = put_config_ok(
            &s,
            token,
            &json!({"rate_limit_per_namespace_per_minute": 123, "body_size_limit_single_bytes": 2048}),
        );
        restart(&mut s, Stop::Sigterm);
        assert_eq!(get_config(&s, token), want, "after SIGTERM");
        want = put_config_ok(
            &s,
            token,
            &json!({"rate_limit_enabled": false, "body_size_limit_batch_bytes": 65536}),
        );
        restart(&mut s, Stop::Kill9);
        assert_eq!(get_config(&s, token), want, "after kill -9");
        assert_eq!(want["rate_limit_per_namespace_per_minute"], 123);
        // Still enforced, not only reported.
        let writer = if mode.auth {
            Some(register(&s, "acme", true))
        } else {
            None
        };
        let r = call(
            &s,
            "POST",
            "/api/events",
            writer.as_deref(),
            Some(std::str::from_utf8(&padded_event("acme/big", 3000)).expect("utf8")),
        );
        assert_error(r.status, &r.json(), 413, "payload too large");
    }
}

// ------------------------------------------------------------------ persistence

#[test]
fn namespaces_and_tokens_survive_kill9_and_sigterm() {
    for how in [Stop::Kill9, Stop::Sigterm] {
        let mut s = start(AUTH_ADMIN, &[], &[]);
        let acme = register(&s, "acme", true);
        let beta = register(&s, "beta", true);
        publish_ok(&s, Some(&acme), "acme/x", json!({"v": 1}));
        let (_, before) = s.get("/api/namespaces/acme");
        restart(&mut s, how);
        let (status, after) = s.get("/api/namespaces/acme");
        assert_eq!(status, 200, "{how:?}: {after}");
        assert_eq!(after, before, "{how:?}");
        publish_ok(&s, Some(&acme), "acme/x", json!({"w": 2}));
        publish_ok(&s, Some(&beta), "beta/y", json!({"v": 1}));
        assert_eq!(s.props("acme/x"), json!({"v": 1, "w": 2}));
        let (status, body) = publish(&s, Some(&acme), "beta/y", json!({"v": 2}));
        assert_error(status, &body, 403, "");
        let (status, body) = send(
            &s,
            "POST",
            "/api/namespaces",
            Some(ADMIN),
            &json!({"name": "acme"}),
        );
        assert_error(status, &body, 409, "");
    }
}

/// The snapshot position from the start-up line (`recovered snapshot=<n>`), if one was used.
fn recovered_snapshot(s: &Server) -> Option<String> {
    let out = s.stdout_text();
    let line = out.lines().find(|l| l.contains("listening on http://"))?;
    let rest = &line[line.find("recovered snapshot=")? + "recovered snapshot=".len()..];
    let value: String = rest
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric())
        .collect();
    (value != "none").then_some(value)
}

#[test]
fn namespaces_config_and_credentials_survive_a_restart_from_a_snapshot() {
    let mut s = start(
        AUTH_ADMIN,
        &["--snapshot-interval", "200ms"],
        &[("FLUX_ENCRYPTION_KEY", KEY_HEX)],
    );
    let acme = register(&s, "acme", true);
    publish_ok(&s, Some(&acme), "acme/x", json!({"v": 1}));
    let config = put_config_ok(
        &s,
        Some(ADMIN),
        &json!({"rate_limit_per_namespace_per_minute": 4321}),
    );
    let (status, body) = send(
        &s,
        "POST",
        "/api/connectors/github/token",
        Some(ADMIN),
        &json!({"token": "ghp_snapshotsecret0000000000"}),
    );
    assert_eq!(status, 200, "{body}");
    let (_, namespace) = s.get("/api/namespaces/acme");
    // Wait until a snapshot covers the writes above: a snapshot directory holds the namespace.
    let snapshots = s.data_dir().join("snapshots");
    wait_for(WAIT, || {
        read_all_files(&snapshots)
            .iter()
            .any(|(p, bytes)| {
                !p.strip_prefix(&snapshots)
                    .unwrap_or(p)
                    .to_string_lossy()
                    .contains(".tmp")
                    && contains_bytes(bytes, b"acme")
                    && contains_bytes(bytes, b"4321")
            })
            .then_some(())
    })
    .unwrap_or_else(|| panic!("no snapshot with the namespace within {WAIT:?}"));
    let beta = register(&s, "beta", true);

    for how in [Stop::Kill9, Stop::Sigterm] {
        restart(&mut s, how);
        assert!(
            recovered_snapshot(&s).is_some(),
            "{how:?}: the restart did not use a snapshot: {}",
            s.stdout_text()
        );
        let (status, got) = s.get("/api/namespaces/acme");
        assert_eq!(status, 200, "{how:?}: {got}");
        assert_eq!(got["namespaceId"], namespace["namespaceId"]);
        assert_eq!(got["createdAt"], namespace["createdAt"]);
        assert_eq!(get_config(&s, Some(ADMIN)), config, "{how:?}");
        publish_ok(&s, Some(&acme), "acme/x", json!({"v": 2}));
        publish_ok(&s, Some(&beta), "beta/x", json!({"v": 1}));
        let (status, body) = publish(&s, Some(&acme), "beta/x", json!({"v": 2}));
        assert_error(status, &body, 403, "");
        let (status, c) = s.get("/api/connectors/github");
        assert_eq!(status, 200, "{c}");
        assert_eq!(c["status"], "ready", "{how:?}: {c}");
    }
}

#[test]
fn tokens_and_secrets_are_not_stored_in_clear() {
    let secret = "ghp_TopSecretConnectorCredential0123456789";
    let mut s = start(
        AUTH_ADMIN,
        &["--snapshot-interval", "200ms"],
        &[("FLUX_ENCRYPTION_KEY", KEY_HEX)],
    );
    let acme = register(&s, "acme", true);
    let beta = register(&s, "beta", true);
    publish_ok(&s, Some(&acme), "acme/x", json!({"v": 1}));
    let (status, body) = send(
        &s,
        "POST",
        "/api/connectors/github/token",
        Some(ADMIN),
        &json!({ "token": secret }),
    );
    assert_eq!(status, 200, "{body}");
    let secrets = [acme.as_str(), beta.as_str(), secret, ADMIN, KEY_HEX];
    // While running (log only, and whatever snapshots the interval wrote) ...
    let files = assert_not_stored(s.data_dir(), &secrets);
    assert!(files > 0, "nothing in the data dir");
    // ... and after a clean stop, which writes a final snapshot.
    let status = s.terminate();
    assert!(status.success(), "{status:?}");
    assert_not_stored(s.data_dir(), &secrets);
    // The namespace itself is stored (this scan reads real data).
    assert!(
        read_all_files(s.data_dir())
            .iter()
            .any(|(_, b)| contains_bytes(b, b"acme/x")),
        "the data dir does not hold the written entity; the scan reads nothing useful"
    );
    s.restart();
    publish_ok(&s, Some(&acme), "acme/x", json!({"v": 2}));
    let (_, c) = s.get("/api/connectors/github");
    assert_eq!(c["status"], "ready", "{c}");
    assert_not_stored(s.data_dir(), &secrets);
}

// ------------------------------------------------------------------ directory

#[test]
fn directory_lists_namespaces_with_counts_in_auth_mode() {
    let s = start(AUTH_ADMIN, &DIRECTORY_FLAG, &[]);
    let acme = register(&s, "acme", true);
    let beta = register(&s, "beta", true);
    register(&s, "gamma", true);
    for id in ["acme/a", "acme/site-3/b", "acme/c"] {
        publish_ok(&s, Some(&acme), id, json!({"v": 1}));
    }
    publish_ok(&s, Some(&beta), "beta/a", json!({"v": 1}));

    let want = json!({
        "namespaces": namespaces_json(&[("acme", 3), ("beta", 1), ("gamma", 0)]),
        "namespace_count": 3,
        "entity_count": 4
    });
    wait_directory(&s, &want.to_string(), |p| *p == want);
    let (status, entity) = s.entity("flux-core/directory");
    assert_eq!(status, 200);
    assert_eq!(entity["id"], "flux-core/directory");
    assert!(parse_iso_millis(entity["lastUpdated"].as_str().unwrap_or("")).is_some());

    // Deletes show up.
    let (status, body) = delete_entity(&s, Some(&acme), "acme/c");
    assert_eq!(status, 200, "{body}");
    let (status, body) = batch_delete(&s, Some(&beta), &json!({"namespace": "beta"}));
    assert_eq!(status, 200, "{body}");
    let want = json!({
        "namespaces": namespaces_json(&[("acme", 2), ("beta", 0), ("gamma", 0)]),
        "namespace_count": 3,
        "entity_count": 2
    });
    wait_directory(&s, &want.to_string(), |p| *p == want);

    // A new namespace and new entities, too.
    let delta = register(&s, "delta", true);
    publish_ok(&s, Some(&delta), "delta/a", json!({"v": 1}));
    let want = json!({
        "namespaces": namespaces_json(&[("acme", 2), ("beta", 0), ("delta", 1), ("gamma", 0)]),
        "namespace_count": 4,
        "entity_count": 3
    });
    wait_directory(&s, &want.to_string(), |p| *p == want);
}

#[test]
fn directory_lists_namespaces_with_counts_with_auth_off() {
    let s = start(NO_AUTH, &DIRECTORY_FLAG, &[]);
    for id in ["acme/a", "acme/b", "beta/a", "beta/site/b", "beta/c"] {
        s.put(id, json!({"v": 1}));
    }
    let want = json!({
        "namespaces": namespaces_json(&[("acme", 2), ("beta", 3)]),
        "namespace_count": 2,
        "entity_count": 5
    });
    wait_directory(&s, &want.to_string(), |p| *p == want);

    let (status, body) = s.post("/api/state/entities/delete", &json!({"namespace": "beta"}));
    assert_eq!(status, 200, "{body}");
    let (status, body) = s.delete("/api/state/entities/acme/a");
    assert_eq!(status, 200, "{body}");
    // A namespace left without entities may be listed with 0 or dropped; the totals say 1.
    let props = wait_directory(&s, "acme 1, beta gone or 0, total 1", |p| {
        let beta = &p["namespaces"]["beta"];
        p["namespaces"]["acme"] == json!({"entity_count": 1})
            && (beta.is_null() || *beta == json!({"entity_count": 0}))
            && p["entity_count"] == 1
    });
    let listed = props["namespaces"].as_object().expect("namespaces").len();
    assert_eq!(props["namespace_count"], listed, "{props}");
}

// ------------------------------------------------------------------ metrics

/// The metric families `/metrics` must expose.
const FAMILIES: [&str; 8] = [
    "flux_events_accepted",
    "flux_events_rejected",
    "flux_ingest_latency_seconds",
    "flux_log_fsync_seconds",
    "flux_entities",
    "flux_websocket_connections",
    "flux_websocket_overflow_closes",
    "flux_rate_limited_requests",
];

fn assert_family(text: &str, name: &str) {
    assert!(
        text.lines()
            .any(|l| l.starts_with(&format!("# TYPE {name} ")) || l.starts_with(name)),
        "/metrics lacks {name}:\n{text}"
    );
}

#[test]
fn metrics_expose_the_required_families_and_counters_move() {
    let s = start(AUTH_ADMIN, &[], &[]);
    let acme = register(&s, "acme", true);
    // A labelled family (`flux_events_rejected`) appears with its first sample; the others
    // are there from the start.
    let text = metrics(&s);
    for name in FAMILIES.iter().filter(|n| **n != "flux_events_rejected") {
        assert_family(&text, name);
    }
    let accepted = |t: &str| metric(t, "flux_events_accepted_total", "");
    let rejected = |t: &str, reason: &str| {
        metric(
            t,
            "flux_events_rejected_total",
            &format!("reason=\"{reason}\""),
        )
    };
    let latency = |t: &str| metric(t, "flux_ingest_latency_seconds_count", "");
    let fsyncs = |t: &str| metric(t, "flux_log_fsync_seconds_count", "");

    let before = metrics(&s);
    publish_ok(&s, Some(&acme), "acme/a", json!({"v": 1}));
    publish_ok(&s, Some(&acme), "acme/b", json!({"v": 1}));
    let (status, body) = batch(
        &s,
        Some(&acme),
        &[
            event("acme/c", json!({"v": 1})),
            event("acme/d", json!({"v": 1})),
            event("acme/e", json!({"v": 1})),
        ],
    );
    assert_eq!(status, 200, "{body}");
    let (status, _) = publish(&s, None, "acme/f", json!({"v": 1}));
    assert_eq!(status, 401);
    let (status, _) = publish(&s, Some(&acme), "beta/f", json!({"v": 1}));
    assert_eq!(status, 403);
    put_config_ok(
        &s,
        Some(ADMIN),
        &json!({"rate_limit_per_namespace_per_minute": 5}),
    );
    let (status, _) = publish(&s, Some(&acme), "acme/g", json!({"v": 1}));
    assert_eq!(status, 429);
    let after = metrics(&s);
    for name in FAMILIES {
        assert_family(&after, name);
    }

    assert_eq!(
        accepted(&after) - accepted(&before),
        5.0,
        "flux_events_accepted should grow by the 5 events published"
    );
    assert!(
        latency(&after) >= latency(&before) + 3.0,
        "ingest latency count did not grow"
    );
    assert!(fsyncs(&after) > fsyncs(&before) || fsyncs(&after) > 0.0);
    assert!(rejected(&after, "unauthorized") >= rejected(&before, "unauthorized") + 1.0);
    assert!(rejected(&after, "forbidden") >= rejected(&before, "forbidden") + 1.0);
    assert!(rejected(&after, "rate_limited") >= rejected(&before, "rate_limited") + 1.0);
    assert_eq!(
        metric(&after, "flux_rate_limited_requests_total", "")
            - metric(&before, "flux_rate_limited_requests_total", ""),
        1.0
    );
    assert!(metric(&after, "flux_entities", "") >= 5.0, "{after}");

    // The WebSocket gauge follows an open connection.
    use tungstenite::client::IntoClientRequest;
    let stream = TcpStream::connect(s.addr()).expect("connect");
    stream
        .set_read_timeout(Some(REQUEST_TIMEOUT))
        .expect("read timeout");
    let request = format!("ws://{}/api/ws", s.addr())
        .into_client_request()
        .expect("request");
    let (mut socket, _) = tungstenite::client::client(request, stream).expect("handshake");
    wait_for(WAIT, || {
        (metric(&metrics(&s), "flux_websocket_connections", "") >= 1.0).then_some(())
    })
    .unwrap_or_else(|| panic!("flux_websocket_connections stayed 0 with a connection open"));
    // A complete close handshake: our close frame, then read until the server's reply ends it
    // (each read bounded by the socket's read timeout).
    let _ = socket.close(None);
    while socket.read().is_ok() {}
    drop(socket);
    let mut last = f64::NAN;
    wait_for(WAIT, || {
        last = metric(&metrics(&s), "flux_websocket_connections", "");
        (last == 0.0).then_some(())
    })
    .unwrap_or_else(|| {
        panic!("flux_websocket_connections stayed {last} after the only connection closed")
    });
}

// ------------------------------------------------------------------ connectors

fn connectors(s: &Server) -> Vec<Value> {
    let (status, body) = s.get("/api/connectors");
    assert_eq!(status, 200, "{body}");
    let list = body
        .as_array()
        .or_else(|| body["connectors"].as_array())
        .unwrap_or_else(|| panic!("connector list is not an array: {body}"))
        .clone();
    assert!(!list.is_empty(), "no connectors listed");
    for c in &list {
        assert!(c["name"].is_string(), "connector without a name: {c}");
        assert!(c["status"].is_string(), "connector without a status: {c}");
    }
    list
}

fn connector_status(s: &Server, name: &str) -> String {
    let (status, body) = s.get(&format!("/api/connectors/{name}"));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["name"], name);
    body["status"].as_str().expect("status").to_string()
}

#[test]
fn connectors_are_not_configured_without_a_key() {
    for mode in [NO_AUTH, AUTH_ADMIN] {
        let s = start(mode, &[], &[]);
        let admin = mode.admin.then_some(ADMIN);
        for c in connectors(&s) {
            assert_eq!(c["status"], "not_configured", "{c}");
        }
        assert!(connectors(&s).iter().any(|c| c["name"] == "github"));
        assert_eq!(connector_status(&s, "github"), "not_configured");
        let (status, body) = send(
            &s,
            "POST",
            "/api/connectors/github/token",
            admin,
            &json!({"token": "ghp_abc"}),
        );
        assert_error(status, &body, 400, "");
        assert_eq!(connector_status(&s, "github"), "not_configured");
        let (status, body) = s.get("/api/connectors/nosuch");
        assert_error(status, &body, 404, "");
    }
}

#[test]
fn connector_token_lifecycle_with_a_key() {
    for (mode, key) in [(NO_AUTH, KEY_HEX), (AUTH_ADMIN, KEY_BASE64)] {
        let mut s = start(mode, &[], &[("FLUX_ENCRYPTION_KEY", key)]);
        let admin = mode.admin.then_some(ADMIN);
        for c in connectors(&s) {
            assert_eq!(c["status"], "needs_token", "{c}");
        }
        assert_eq!(connector_status(&s, "github"), "needs_token");

        // Wrong bodies.
        for raw in [
            "{",
            "not json",
            "",
            "[]",
            "{}",
            "{\"token\": 5}",
            "{\"token\": \"\"}",
            "{\"token\": null}",
            "{\"tok\": \"ghp_x\"}",
        ] {
            let r = call(&s, "POST", "/api/connectors/github/token", admin, Some(raw));
            assert_error(r.status, &r.json(), 400, "");
            if raw.starts_with('{') && raw.len() > 2 && raw.contains(':') {
                assert_error(r.status, &r.json(), 400, "token");
            }
        }
        assert_eq!(connector_status(&s, "github"), "needs_token");

        // Unknown connector.
        let (status, body) = send(
            &s,
            "POST",
            "/api/connectors/nosuch/token",
            admin,
            &json!({"token": "x"}),
        );
        assert_error(status, &body, 404, "");
        let r = call(&s, "DELETE", "/api/connectors/nosuch/token", admin, None);
        assert_error(r.status, &r.json(), 404, "");
        let (status, body) = s.get("/api/connectors/nosuch");
        assert_error(status, &body, 404, "");

        let (status, body) = send(
            &s,
            "POST",
            "/api/connectors/github/token",
            admin,
            &json!({"token": "ghp_0123456789abcdefghij"}),
        );
        assert_eq!(status, 200, "{body}");
        assert!(
            !body.to_string().contains("ghp_0123456789abcdefghij"),
            "the credential is echoed back: {body}"
        );
        assert_eq!(connector_status(&s, "github"), "ready");
        let listed = connectors(&s);
        let github = listed
            .iter()
            .find(|c| c["name"] == "github")
            .expect("github listed");
        assert_eq!(github["status"], "ready");

        for how in [Stop::Kill9, Stop::Sigterm] {
            restart(&mut s, how);
            assert_eq!(connector_status(&s, "github"), "ready", "{how:?}");
        }

        let r = call(&s, "DELETE", "/api/connectors/github/token", admin, None);
        assert!(
            r.status == 200 || r.status == 204,
            "{} {}",
            r.status,
            r.text
        );
        assert_eq!(connector_status(&s, "github"), "needs_token");
        restart(&mut s, Stop::Kill9);
        assert_eq!(connector_status(&s, "github"), "needs_token");
    }
}

#[test]
fn a_credential_the_key_cannot_open_is_not_ready() {
    let mut s = start(NO_AUTH, &[], &[("FLUX_ENCRYPTION_KEY", KEY_HEX)]);
    let token = json!({"token": "ghp_x"});
    let (status, body) = send(&s, "POST", "/api/connectors/github/token", None, &token);
    assert_eq!(status, 200, "{body}");
    assert_eq!(connector_status(&s, "github"), "ready");

    // Another valid key: the credential is still stored, but this server cannot use it.
    let other_key = "ff".repeat(32);
    s.restart_changed(|o| o.env = vec![("FLUX_ENCRYPTION_KEY".into(), other_key.clone())]);
    let (status, c) = s.get("/api/connectors/github");
    assert_eq!(status, 200, "{c}");
    assert_eq!(
        (&c["status"], &c["token_stored"]),
        (&json!("error"), &json!(true)),
        "{c}"
    );
    let error = c["error"].as_str().unwrap_or_default();
    assert!(error.contains("FLUX_ENCRYPTION_KEY"), "{c}");
    assert!(!c.to_string().contains("ghp_x"), "{c}");

    // Storing the token again under the new key makes it ready.
    let (status, body) = send(&s, "POST", "/api/connectors/github/token", None, &token);
    assert_eq!(status, 200, "{body}");
    assert_eq!(connector_status(&s, "github"), "ready");
    let (_, c) = s.get("/api/connectors/github");
    assert!(c.get("error").is_none(), "{c}");
}

#[test]
fn connector_names_in_the_path_are_percent_decoded() {
    let s = start(NO_AUTH, &[], &[("FLUX_ENCRYPTION_KEY", KEY_HEX)]);
    let (status, body) = s.get("/api/connectors/git%68ub");
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["name"], "github", "{body}");

    let token = json!({"token": "ghp_x"});
    let (status, body) = send(&s, "POST", "/api/connectors/%67ithub/token", None, &token);
    assert_eq!(status, 200, "{body}");
    assert_eq!(connector_status(&s, "github"), "ready");
    let r = call(&s, "DELETE", "/api/connectors/githu%62/token", None, None);
    assert!(
        r.status == 200 || r.status == 204,
        "{} {}",
        r.status,
        r.text
    );
    assert_eq!(connector_status(&s, "github"), "needs_token");

    // An encoded `/` is part of the name, not the `/token` of the route.
    let (status, body) = s.get("/api/connectors/github%2Ftoken");
    assert_error(status, &body, 404, "");

    // A name that is not UTF-8 once decoded is a 400 naming it, as an entity id's is.
    let (status, body) = s.get("/api/state/entities/%FF");
    assert_error(status, &body, 400, "entity id");
    let (status, body) = s.get("/api/connectors/%FF");
    assert_error(status, &body, 400, "connector name");
    for method in ["POST", "DELETE"] {
        let r = call(&s, method, "/api/connectors/%FF/token", None, Some("{}"));
        assert_error(r.status, &r.json(), 400, "connector name");
    }
}

#[test]
fn connector_credentials_need_the_admin_token_in_auth_mode() {
    let s = start(AUTH_ADMIN, &[], &[("FLUX_ENCRYPTION_KEY", KEY_HEX)]);
    let acme = register(&s, "acme", true);
    let body = json!({"token": "ghp_x"});
    let path = "/api/connectors/github/token";
    let (status, reply) = send(&s, "POST", path, None, &body);
    assert_error(status, &reply, 401, "");
    let (status, reply) = send(&s, "POST", path, Some("wrong"), &body);
    assert_error(status, &reply, 401, "unknown token");
    let (status, reply) = send(&s, "POST", path, Some(&acme), &body);
    assert_error(status, &reply, 403, "");
    assert_eq!(connector_status(&s, "github"), "needs_token");
    let (status, reply) = send(&s, "POST", path, Some(ADMIN), &body);
    assert_eq!(status, 200, "{reply}");
    let r = call(&s, "DELETE", path, None, None);
    assert_error(r.status, &r.json(), 401, "");
    let r = call(&s, "DELETE", path, Some(&acme), None);
    assert_error(r.status, &r.json(), 403, "");
    assert_eq!(connector_status(&s, "github"), "ready");

    // Auth on without an admin token: nobody may set credentials; a missing token is 401
    // (as anywhere), a namespace's 403, and both say no admin token is configured.
    let s = start(AUTH_OPEN, &[], &[("FLUX_ENCRYPTION_KEY", KEY_HEX)]);
    let acme = register(&s, "acme", false);
    for (t, code) in [(None, 401), (Some(acme.as_str()), 403)] {
        let (status, reply) = send(&s, "POST", path, t, &body);
        assert_error(status, &reply, code, "none is configured");
    }
    assert_eq!(connector_status(&s, "github"), "needs_token");
}

// ------------------------------------------------------------------ bad input

#[test]
fn bad_bodies_on_tenancy_routes_are_400_never_500() {
    let s = start(AUTH_ADMIN, &[], &[("FLUX_ENCRYPTION_KEY", KEY_HEX)]);
    let acme = register(&s, "acme", true);
    let bodies = [
        "",
        "{",
        "nul",
        "[",
        "{\"name\":",
        "\u{0}\u{1}",
        "{\"a\":1}{",
        "\"\\ud800\"",
    ];
    let routes: [(&str, &str, Option<&str>); 6] = [
        ("POST", "/api/namespaces", Some(ADMIN)),
        ("PUT", "/api/admin/config", Some(ADMIN)),
        ("POST", "/api/connectors/github/token", Some(ADMIN)),
        ("POST", "/api/events", Some(acme.as_str())),
        ("POST", "/api/events/batch", Some(acme.as_str())),
        ("POST", "/api/state/entities/delete", Some(acme.as_str())),
    ];
    for (method, path, token) in routes {
        for body in bodies {
            let r = call(&s, method, path, token, Some(body));
            assert_error(r.status, &r.json(), 400, "");
        }
    }
    // Wrong types in the write bodies name the field.
    let (status, body) = batch_delete(&s, Some(&acme), &json!({"namespace": 5}));
    assert_error(status, &body, 400, "namespace");
    let (status, body) = batch_delete(&s, Some(&acme), &json!({"prefix": ["acme/"]}));
    assert_error(status, &body, 400, "prefix");
    let (status, body) = batch_delete(&s, Some(&acme), &json!({"entity_ids": "acme/x"}));
    assert_error(status, &body, 400, "entity_ids");
    let (status, body) = send(
        &s,
        "POST",
        "/api/events",
        Some(&acme),
        &json!({"stream": "s", "source": "t", "timestamp": 1, "payload": {"entity_id": 5, "properties": {}}}),
    );
    assert_error(status, &body, 400, "entity_id");
    assert_eq!(get_config(&s, Some(ADMIN)), default_config());
    let (status, body) = s.get("/api/health");
    assert_eq!(status, 200, "{body}");
}

/// No caller writes the built-in `flux-core` namespace: not the admin, not an open server,
/// not a namespace token (the name cannot be registered). A wider prefix delete skips the
/// built-in entities, and the directory keeps being Flux's own.
#[test]
fn nobody_writes_the_built_in_namespace() {
    for mode in [AUTH_ADMIN, NO_AUTH] {
        let s = start(mode, &[], &[]);
        let token = mode.admin.then_some(ADMIN);
        let (status, body) = publish(&s, token, "flux-core/directory", json!({"x": 1}));
        assert_error(status, &body, 403, "flux-core");
        let (status, body) = publish(&s, token, "flux-core/other", json!({"x": 1}));
        assert_error(status, &body, 403, "flux-core");
        let (status, body) = batch(
            &s,
            token,
            &[
                event("flux-core/directory", json!({"x": 1})),
                event("fleet/a", json!({"x": 1})),
            ],
        );
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            (&body["successful"], &body["failed"]),
            (&json!(1), &json!(1))
        );
        assert!(
            body["results"][0]["error"]
                .as_str()
                .is_some_and(|e| e.contains("flux-core"))
        );
        let (status, body) = delete_entity(&s, token, "flux-core/directory");
        assert_error(status, &body, 403, "flux-core");
        for filter in [
            json!({"namespace": "flux-core"}),
            json!({"prefix": "flux-core/dir"}),
        ] {
            let (status, body) = batch_delete(&s, token, &filter);
            assert_error(status, &body, 403, "flux-core");
        }
        let (status, body) =
            batch_delete(&s, token, &json!({"entity_ids": ["flux-core/directory"]}));
        assert_eq!(status, 200, "{body}");
        assert_eq!((&body["deleted"], &body["failed"]), (&json!(0), &json!(1)));
        // "f" takes in fleet/a and the directory: only fleet/a goes.
        let (status, body) = batch_delete(&s, token, &json!({"prefix": "f"}));
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["deleted"], 1, "{body}");
        let (status, directory) = s.entity("flux-core/directory");
        assert_eq!(status, 200, "{directory}");
        assert!(directory["properties"].get("x").is_none(), "{directory}");
        if mode.auth {
            let (status, body) = send(
                &s,
                "POST",
                "/api/namespaces",
                Some(ADMIN),
                &json!({"name": "flux-core"}),
            );
            assert_error(status, &body, 409, "flux-core");
        }
    }
}
