//! Black-box tests of health, metrics, CORS, routing, hostile input, and how the server runs:
//! start-up, signals, restarts, the data-dir lock, and the listen settings (SPEC.md,
//! "Errors", "Operations", "Running").

mod util;

use serde_json::{Value, json};
use util::*;

// ------------------------------------------------------------------ operations

#[test]
fn health_is_ok() {
    let s = Server::start();
    let (status, body) = s.get("/api/health");
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "ok", "{body}");
}

// ------------------------------------------------------------------ CORS

const ORIGIN: &str = "https://example.com";

fn assert_allow_origin(r: &Resp, what: &str) {
    let v = r.header("access-control-allow-origin").unwrap_or_else(|| {
        panic!(
            "{what}: no Access-Control-Allow-Origin; headers {:?}",
            r.headers
        )
    });
    assert!(
        v == "*" || v == ORIGIN,
        "{what}: Access-Control-Allow-Origin {v:?}"
    );
}

#[test]
fn cors_headers_on_responses() {
    let s = Server::start();
    let o = [("Origin", ORIGIN)];
    assert_allow_origin(&s.request("GET", "/api/health", &o, None), "GET health");
    let body = event("acme/cors", json!({"v": 1})).to_string();
    let r = s.request(
        "POST",
        "/api/events",
        &[("Origin", ORIGIN), ("Content-Type", "application/json")],
        Some(body.as_bytes()),
    );
    assert_eq!(r.status, 200, "{}", r.text);
    assert_allow_origin(&r, "POST event");
    assert_allow_origin(
        &s.request("GET", "/api/state/entities", &o, None),
        "GET list",
    );
    assert_allow_origin(
        &s.request("GET", "/api/state/entities/acme/cors", &o, None),
        "GET one",
    );
    let r = s.request("GET", "/api/state/entities/acme/missing", &o, None);
    assert_eq!(r.status, 404);
    assert_allow_origin(&r, "404");
    let r = s.request(
        "POST",
        "/api/events",
        &[("Origin", ORIGIN), ("Content-Type", "application/json")],
        Some(b"{bad"),
    );
    assert_eq!(r.status, 400);
    assert_allow_origin(&r, "400");
}

fn list_allows(value: Option<&str>, wanted: &str) -> bool {
    value.is_some_and(|v| {
        v.split(',')
            .map(str::trim)
            .any(|x| x == "*" || x.eq_ignore_ascii_case(wanted))
    })
}

#[test]
fn cors_preflight() {
    let s = Server::start();
    for (path, method) in [
        ("/api/events", "POST"),
        ("/api/events/batch", "POST"),
        ("/api/state/entities/acme/x", "DELETE"),
        ("/api/state/entities/delete", "POST"),
    ] {
        let r = s.request(
            "OPTIONS",
            path,
            &[
                ("Origin", ORIGIN),
                ("Access-Control-Request-Method", method),
                (
                    "Access-Control-Request-Headers",
                    "content-type,authorization",
                ),
            ],
            None,
        );
        assert!(
            r.status == 200 || r.status == 204,
            "preflight {path}: {} {}",
            r.status,
            r.text
        );
        assert_allow_origin(&r, path);
        let methods = r.header("access-control-allow-methods");
        assert!(
            list_allows(methods, method),
            "{path}: allow-methods {methods:?}"
        );
        let headers = r.header("access-control-allow-headers");
        assert!(
            list_allows(headers, "content-type"),
            "{path}: allow-headers {headers:?}"
        );
        assert!(
            list_allows(headers, "authorization"),
            "{path}: allow-headers {headers:?}"
        );
    }
}

// ------------------------------------------------------------------ routing

#[test]
fn unknown_routes_are_404_json() {
    let s = Server::start();
    for path in [
        "/api/nope",
        "/nope",
        "/api",
        "/api/events/extra/stuff",
        "/api/state",
        "/api/healthz",
    ] {
        let r = s.get_resp(path);
        assert_eq!(r.status, 404, "{path}: {} {}", r.status, r.text);
        error_message(&r.json());
    }
    let r = s.post_raw("/api/unknown", b"{}");
    assert_eq!(r.status, 404, "{}", r.text);
    error_message(&r.json());
}

#[test]
fn namespace_routes_are_404_with_auth_off() {
    let s = Server::start();
    let (status, body) = s.post("/api/namespaces", &json!({"name": "acme"}));
    assert_error(status, &body, 404, "");
    let (status, body) = s.get("/api/namespaces/acme");
    assert_error(status, &body, 404, "");
}

#[test]
fn wrong_methods_are_404_or_405() {
    let s = Server::start();
    for (method, path) in [
        ("PUT", "/api/events"),
        ("DELETE", "/api/events"),
        ("PATCH", "/api/events"),
        ("GET", "/api/events/batch"),
        ("PUT", "/api/events/batch"),
        ("PATCH", "/api/state/entities/acme/x"),
        ("PUT", "/api/state/entities/acme/x"),
        ("POST", "/api/state/entities"),
        ("DELETE", "/api/state/entities"),
        ("GET", "/api/state/entities/delete/"),
        ("POST", "/api/health"),
        ("DELETE", "/api/health"),
    ] {
        let body: Option<&[u8]> = if method == "GET" || method == "DELETE" {
            None
        } else {
            Some(b"{}")
        };
        let r = s.request(method, path, &[("Content-Type", "application/json")], body);
        assert!(
            r.status == 404 || r.status == 405,
            "{method} {path}: {} {}",
            r.status,
            r.text
        );
        error_message(&r.json());
        if r.status == 405 {
            let allow = r
                .header("allow")
                .unwrap_or_else(|| panic!("{method} {path}: 405 without an Allow header"));
            assert!(
                !allow.contains(method) && allow.contains("OPTIONS"),
                "{method} {path}: Allow: {allow}"
            );
        }
    }
    let r = s.request("PUT", "/api/events", &[], Some(b"{}"));
    assert_eq!(r.header("allow"), Some("GET, HEAD, POST, OPTIONS"));
    // `…/entities/delete` is an entity's path and the batch delete's route at once.
    let r = s.request("PUT", "/api/state/entities/delete", &[], Some(b"{}"));
    assert_eq!(r.header("allow"), Some("GET, HEAD, DELETE, POST, OPTIONS"));
}

/// What HTTP/1.1 forbids and hyper lets through (RFC 9112 §3.2, §6.1): two `Host` headers,
/// a transfer coding the server cannot undo (501), `chunked` twice. Each gets a JSON error,
/// and no such body is taken for an event. A request without `Host` is served (hand-written
/// clients leave it out).
#[test]
fn requests_framed_against_http_1_1_are_refused() {
    let s = Server::start();
    let event = br#"{"stream":"s","source":"x","timestamp":1,"payload":{"entity_id":"frame/x","properties":{"v":1}}}"#;
    let with_headers = |head: &str, body: &[u8]| {
        let mut request = format!("POST /api/events HTTP/1.1\r\n{head}Content-Type: application/json\r\nConnection: close\r\n\r\n").into_bytes();
        request.extend_from_slice(body);
        s.raw_ok(&request)
    };
    let length = format!("Content-Length: {}\r\n", event.len());
    let chunked_body = chunked(event, 40);
    for (head, body, status, words) in [
        (
            format!("Host: a\r\nHost: b\r\n{length}"),
            &event[..],
            400,
            "Host",
        ),
        (
            "Host: a\r\nTransfer-Encoding: gzip, chunked\r\n".to_string(),
            &chunked_body[..],
            501,
            "gzip",
        ),
        (
            "Host: a\r\nTransfer-Encoding: chunked, chunked\r\n".to_string(),
            &chunked_body[..],
            400,
            "chunked",
        ),
        (
            "Host: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n".to_string(),
            &chunked_body[..],
            400,
            "chunked",
        ),
    ] {
        let r = with_headers(&head, body);
        assert_eq!(r.status, status, "{head:?}: {}", r.text());
        assert!(
            error_message(&r.json()).contains(words),
            "{head:?}: {}",
            r.text()
        );
        assert_eq!(r.header("access-control-allow-origin"), Some("*"));
    }
    assert_eq!(s.entity("frame/x").0, 404, "no refused request was applied");
    for version in ["HTTP/1.0", "HTTP/1.1"] {
        let mut request =
            format!("POST /api/events {version}\r\nConnection: close\r\n{length}\r\n").into_bytes();
        request.extend_from_slice(event);
        assert_eq!(s.raw_ok(&request).status, 200, "{version} without Host");
    }
    assert_eq!(
        with_headers("Host: a\r\nTransfer-Encoding: chunked\r\n", &chunked_body).status,
        200
    );
}

/// Query strings decode as forms encode them: `+` is a space (and `%2B` a plus), so a
/// client's form encoder finds ids with spaces; a value that is not UTF-8 is a 400 naming
/// its parameter. A `since` whose offset's `+` arrived unencoded still parses.
#[test]
fn query_strings_decode_as_forms_encode_them() {
    let s = Server::start();
    s.put("form/a b", json!({"v": 1}));
    s.put("form/a+b", json!({"v": 2}));
    assert_eq!(s.list_ids("?prefix=form/a+"), ["form/a b"]);
    assert_eq!(s.list_ids("?prefix=form/a%2B"), ["form/a+b"]);
    assert_eq!(s.history("form/a b", "").len(), 1);
    let (status, body) = s.get("/api/events?entity=form/a+b&since=2020-01-01T00:00:00.000+00:00");
    assert_eq!(status, 200, "{body}");
    assert_eq!(history_items(&body).len(), 1);
    assert_eq!(history_items(&body)[0]["payload"]["properties"]["v"], 1);
    let (status, body) = s.get("/api/state/entities?prefix=form/%FF");
    assert_error(status, &body, 400, "prefix");
}

/// HEAD answers what GET would, without the body: same status, type and length.
#[test]
fn head_is_answered_like_get_without_a_body() {
    let s = Server::start();
    let (status, body) = s.post(
        "/api/events",
        &json!({"stream": "s", "source": "t", "timestamp": 1708694400000u64,
                "payload": {"entity_id": "acme/h1", "properties": {"v": 1}}}),
    );
    assert_eq!(status, 200, "{body}");
    for path in [
        "/api/health",
        "/api/state/entities",
        "/api/state/entities/acme%2Fh1",
        "/api/state/entities/acme/missing",
        "/api/events?entity=acme/h1",
        "/metrics",
        // A plain GET here is refused with 426 (no upgrade asked for); so is HEAD.
        "/api/ws",
    ] {
        let get = s.request("GET", path, &[], None);
        // Everything the server sends until it closes: the head, and no body after it.
        let request = format!("HEAD {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let (status, headers) = match s.raw(request.as_bytes()) {
            // A chunked head with nothing after it parses as a complete, empty response.
            RawOutcome::Response(r) => {
                assert!(r.body.is_empty(), "HEAD {path} sent a body: {}", r.text());
                (r.status, r.headers)
            }
            // A head with a Content-Length and no body parses as cut short.
            RawOutcome::Closed { partial } => {
                let text = String::from_utf8_lossy(&partial).into_owned();
                let (head, after) = text
                    .split_once("\r\n\r\n")
                    .unwrap_or_else(|| panic!("HEAD {path}: no complete head: {text}"));
                assert_eq!(after, "", "HEAD {path} sent a body");
                let mut lines = head.lines();
                let status = lines
                    .next()
                    .and_then(|l| l.split(' ').nth(1))
                    .and_then(|c| c.parse().ok())
                    .unwrap_or_else(|| panic!("HEAD {path}: status line of {head}"));
                let headers = lines
                    .filter_map(|l| l.split_once(':'))
                    .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                    .collect();
                (status, headers)
            }
            RawOutcome::TimedOut { partial } => panic!(
                "HEAD {path}: the server neither finished nor closed: {}",
                String::from_utf8_lossy(&partial)
            ),
        };
        let header = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.clone())
        };
        assert_eq!(status, get.status, "HEAD {path}");
        assert_eq!(
            header("content-type").as_deref(),
            get.header("content-type"),
            "HEAD {path}"
        );
        if let Some(length) = header("content-length")
            && path != "/metrics"
        {
            // Same length (the metrics text changes between two requests).
            assert_eq!(length, get.text.len().to_string(), "HEAD {path}");
        }
    }
    // No WebSocket upgrade by HEAD, even when one is asked for.
    let upgrade = [
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ("Sec-WebSocket-Version", "13"),
    ];
    let r = s.request("HEAD", "/api/ws", &upgrade, None);
    assert_eq!(r.status, 426);
}

// ------------------------------------------------------------------ hostile input

fn assert_not_5xx(s: &Server, what: &str, req: &[u8]) {
    match s.raw(req) {
        RawOutcome::Response(r) => {
            assert!(r.status < 500, "{what}: {} {}", r.status, r.text());
            if r.status >= 400 {
                let v: Value = serde_json::from_slice(&r.body).unwrap_or_else(|e| {
                    panic!("{what}: {} body not JSON ({e}): {}", r.status, r.text())
                });
                error_message(&v);
            }
        }
        RawOutcome::Closed { partial } => {
            // A malformed request line may be answered by closing; that is not a hang.
            assert!(
                partial.is_empty(),
                "{what}: connection closed mid-response: {:?}",
                String::from_utf8_lossy(&partial)
            );
        }
        RawOutcome::TimedOut { partial } => panic!(
            "{what}: no response (hang); got {:?}\n--- stderr ---\n{}",
            String::from_utf8_lossy(&partial),
            s.stderr_text()
        ),
    }
}

#[test]
fn no_500_for_hostile_bodies() {
    let s = Server::start();
    let json_ct = [("Content-Type", "application/json")];
    let deep_array = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    let deep_object = format!("{}1{}", r#"{"a":"#.repeat(10_000), "}".repeat(10_000));
    let deep_props = format!(
        r#"{{"stream":"s","source":"s","timestamp":1,"payload":{{"entity_id":"acme/deep","properties":{{"x":{}1{}}}}}}}"#,
        r#"{"a":"#.repeat(10_000),
        "}".repeat(10_000)
    );
    let deep_props_arr = format!(
        r#"{{"stream":"s","source":"s","timestamp":1,"payload":{{"entity_id":"acme/deep2","properties":{{"x":{}{}}}}}}}"#,
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    let mut bad_utf8 =
        br#"{"stream":"s","source":"s","timestamp":1,"payload":{"entity_id":"acme/"#.to_vec();
    bad_utf8.extend_from_slice(&[0xff, 0xfe, 0xc3, 0x28]);
    bad_utf8.extend_from_slice(br#"","properties":{"v":"#);
    bad_utf8.extend_from_slice(&[b'"', 0xed, 0xa0, 0x80, b'"']);
    bad_utf8.extend_from_slice(b"}}}");
    let bodies: Vec<(String, Vec<u8>)> = vec![
        ("empty".into(), Vec::new()),
        ("invalid utf-8".into(), bad_utf8.clone()),
        ("raw bytes".into(), vec![0xff, 0x00, 0x80, 0x7f, 0xc0]),
        ("nul".into(), b"\0\0\0\0".to_vec()),
        ("deep array".into(), deep_array.into_bytes()),
        ("deep object".into(), deep_object.into_bytes()),
        ("deep properties".into(), deep_props.into_bytes()),
        ("deep properties array".into(), deep_props_arr.into_bytes()),
        (
            "huge timestamp".into(),
            br#"{"stream":"s","source":"s","timestamp":99999999999999999999999999,"payload":{"entity_id":"a/b","properties":{}}}"#.to_vec(),
        ),
        (
            "timestamp 1e400".into(),
            br#"{"stream":"s","source":"s","timestamp":1e400,"payload":{"entity_id":"a/b","properties":{}}}"#.to_vec(),
        ),
        (
            "timestamp u64 max".into(),
            br#"{"stream":"s","source":"s","timestamp":18446744073709551615,"payload":{"entity_id":"a/b","properties":{}}}"#.to_vec(),
        ),
        (
            "huge property numbers".into(),
            br#"{"stream":"s","source":"s","timestamp":1,"payload":{"entity_id":"a/n","properties":{"a":1e400,"b":-1e400,"c":1e-400,"d":123456789012345678901234567890123456789012345678901234567890}}}"#.to_vec(),
        ),
        (
            "lone surrogate escape".into(),
            br#"{"stream":"s","source":"s","timestamp":1,"payload":{"entity_id":"a/\ud800","properties":{"s":"\udc00"}}}"#.to_vec(),
        ),
        (
            "duplicate keys".into(),
            br#"{"stream":"s","stream":"t","source":"s","timestamp":1,"payload":{"entity_id":"a/d","properties":{"k":1,"k":2}}}"#.to_vec(),
        ),
        ("number".into(), b"1e999999".to_vec()),
        ("string".into(), b"\"\\u0000\"".to_vec()),
        ("truncated".into(), br#"{"stream":"s","source":"#.to_vec()),
        ("whitespace".into(), b"   \r\n\t ".to_vec()),
        ("bom".into(), b"\xef\xbb\xbf{}".to_vec()),
    ];
    for path in [
        "/api/events",
        "/api/events/batch",
        "/api/state/entities/delete",
    ] {
        for (name, body) in &bodies {
            let req = http_request("POST", path, &json_ct, body);
            assert_not_5xx(&s, &format!("POST {path} {name}"), &req);
        }
        // Wrong or missing content type.
        let good = event("acme/ct", json!({"v": 1})).to_string();
        for ct in [
            Some("text/plain"),
            Some("application/x-www-form-urlencoded"),
            Some("garbage"),
            None,
        ] {
            let headers: Vec<(&str, &str)> = ct.map(|c| ("Content-Type", c)).into_iter().collect();
            let req = http_request("POST", path, &headers, good.as_bytes());
            assert_not_5xx(&s, &format!("POST {path} content-type {ct:?}"), &req);
        }
        let req = http_request(
            "POST",
            path,
            &[("Content-Type", "application/json")],
            &bad_utf8,
        );
        assert_not_5xx(&s, &format!("POST {path} bad utf8"), &req);
    }
    // Batches of hostile items.
    let batch = format!(
        "[{},{},{}]",
        r#"{"stream":"s","source":"s","timestamp":1e400,"payload":{"entity_id":"a/b","properties":{}}}"#,
        format_args!("{}{}", "[".repeat(5_000), "]".repeat(5_000)),
        r#"{"payload":[]}"#
    );
    let req = http_request("POST", "/api/events/batch", &json_ct, batch.as_bytes());
    assert_not_5xx(&s, "hostile batch items", &req);
    // The server survived all of that.
    let (status, body) = s.get("/api/health");
    assert_eq!(status, 200, "{body}");
    s.put("acme/still-alive", json!({"v": 1}));
}

#[test]
fn no_500_for_hostile_paths_and_queries() {
    let s = Server::start();
    s.put("acme/x", json!({"v": 1}));
    let long = "a".repeat(4000);
    let paths = vec![
        "/api/state/entities/%ZZ".to_string(),
        "/api/state/entities/%".to_string(),
        "/api/state/entities/%00".to_string(),
        "/api/state/entities/%FF%FE".to_string(),
        "/api/state/entities/%C3%28".to_string(),
        "/api/state/entities/".to_string(),
        "/api/state/entities//".to_string(),
        "/api/state/entities/acme/../acme/x".to_string(),
        "/api/state/entities/acme%2F..%2Fx".to_string(),
        format!("/api/state/entities/{long}"),
        "/api/state/entities?limit=-1".to_string(),
        "/api/state/entities?limit=abc".to_string(),
        "/api/state/entities?limit=99999999999999999999999".to_string(),
        "/api/state/entities?limit=0".to_string(),
        "/api/state/entities?after=%FF".to_string(),
        "/api/state/entities?prefix=%ZZ".to_string(),
        "/api/state/entities?namespace=%00".to_string(),
        "/api/state/entities?&&&=&=".to_string(),
        "/api/events?entity=%FF".to_string(),
        "/api/events?entity=%ZZ".to_string(),
        "/api/events?entity=".to_string(),
        "/api/events?entity=acme%2Fx&limit=-5".to_string(),
        "/api/events?entity=acme%2Fx&limit=0".to_string(),
        "/api/events?entity=acme%2Fx&limit=99999999999999999999".to_string(),
        "/api/events?entity=acme%2Fx&since=garbage".to_string(),
        "/api/events?entity=acme%2Fx&since=9999-99-99T99:99:99Z".to_string(),
        "/api/events?entity=acme%2Fx&since=-1".to_string(),
        "/api/events?entity=acme%2Fx&since=".to_string(),
        "/api/events?entity=acme%2Fx&entity=other".to_string(),
        format!("/api/events?entity={long}"),
        "/api/health?x=%ZZ".to_string(),
        "/%2e%2e/%2e%2e/etc/passwd".to_string(),
        "//api//health".to_string(),
    ];
    for path in &paths {
        for method in ["GET", "DELETE"] {
            let req = http_request(method, path, &[], b"");
            assert_not_5xx(&s, &format!("{method} {path}"), &req);
        }
    }
    let (status, body) = s.get("/api/health");
    assert_eq!(status, 200, "{body}");
    assert_eq!(s.props("acme/x"), json!({"v": 1}));
}

#[test]
fn no_hang_on_short_body() {
    let s = Server::start();
    // Content-Length promises more than is sent, then the client stops writing.
    let req = b"POST /api/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
        Content-Length: 100\r\n\r\n{\"stream\":";
    match raw_request(s.addr(), req, true) {
        RawOutcome::Response(r) => {
            assert!((400..500).contains(&r.status), "{} {}", r.status, r.text());
        }
        RawOutcome::Closed { .. } => {}
        RawOutcome::TimedOut { partial } => {
            panic!(
                "server hung on a short body: {:?}",
                String::from_utf8_lossy(&partial)
            )
        }
    }
    let (status, _) = s.get("/api/health");
    assert_eq!(status, 200);
}

#[test]
fn content_length_shorter_than_body() {
    let s = Server::start();
    let body = event("acme/cl", json!({"v": 1})).to_string();
    let req = format!(
        "POST /api/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Content-Length: 10\r\n\r\n{body}"
    );
    // Only the first 10 bytes are the body: that is not a valid event.
    let r = s.raw_ok(req.as_bytes());
    assert_eq!(r.status, 400, "{}", r.text());
    error_message(&r.json());
    assert_eq!(s.entity("acme/cl").0, 404);
}

/// A write that fails without stopping the log (a full disk; here a file-size limit) is a 503
/// naming the cause and applies nothing, and health reports the failure until a write
/// succeeds again.
#[test]
fn health_reports_a_failing_disk_until_a_write_succeeds() {
    let s = Server::start_with(Options {
        file_size_limit: Some(1 << 20),
        // No directory refresh may write (and heal health) between the checks.
        args: vec!["--directory-interval".into(), "1h".into()],
        ..Options::local_only()
    });
    let big = "x".repeat(50_000);
    let failed = (0..100).find_map(|i| {
        let entity = format!("disk/e{}", i % 5);
        let (status, body) = s.post("/api/events", &event(&entity, json!({"v": big, "i": i})));
        (status != 200).then_some((i, entity, status, body))
    });
    let (i, entity, status, body) = failed.expect("the 1 MiB file limit was reached");
    assert_error(status, &body, 503, "log write failed");
    assert!(i >= 5, "failed at write {i}");
    assert_eq!(
        s.props(&entity)["i"],
        i - 5,
        "the failed write was not applied"
    );
    let (status, health) = s.get("/api/health");
    assert_eq!(status, 503, "{health}");
    assert_eq!(health["status"], "unavailable", "{health}");
    assert!(
        health["error"]
            .as_str()
            .is_some_and(|e| e.contains("log write failed")),
        "{health}"
    );
    // A small write still fits: the log took it, and health is back.
    s.put("disk/small", json!({"v": 1}));
    let (status, health) = s.get("/api/health");
    assert_eq!((status, &health["status"]), (200, &json!("ok")), "{health}");
}

/// Requests hyper cannot parse are answered by it before any handler runs; those answers too
/// carry SPEC's `{"error": ...}` body and the CORS headers (`ingress::io`).
#[test]
fn garbage_request_lines_do_not_kill_the_server() {
    let s = Server::start();
    let long_uri = format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(70_000));
    let many_headers = format!(
        "GET /api/health HTTP/1.1\r\n{}\r\n",
        (0..120)
            .map(|i| format!("X-H{i}: v\r\n"))
            .collect::<String>()
    );
    let mut statuses = Vec::new();
    for req in [
        long_uri.as_bytes(),
        many_headers.as_bytes(),
        &b"\r\n\r\n"[..],
        b"GARBAGE\r\n\r\n",
        b"GET\r\n\r\n",
        b"GET / HTTP/9.9\r\n\r\n",
        b"\xff\xfe\xfd\r\n\r\n",
        b"POST /api/events HTTP/1.1\r\nContent-Length: -5\r\n\r\n",
        b"POST /api/events HTTP/1.1\r\nContent-Length: abc\r\n\r\n",
        b"POST /api/events HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\n",
        b"POST /api/events HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"POST /api/events HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n",
    ] {
        let shown = String::from_utf8_lossy(&req[..req.len().min(80)]).into_owned();
        match raw_request(s.addr(), req, true) {
            RawOutcome::Response(r) => {
                assert!(r.status < 500, "{shown:?}: {} {}", r.status, r.text());
                if r.status >= 400 {
                    let body: Value = serde_json::from_slice(&r.body).unwrap_or_else(|e| {
                        panic!("{shown:?}: {} body not JSON ({e}): {}", r.status, r.text())
                    });
                    error_message(&body);
                    assert_eq!(
                        r.header("access-control-allow-origin"),
                        Some("*"),
                        "{shown:?}"
                    );
                }
                statuses.push(r.status);
            }
            RawOutcome::Closed { .. } => {}
            RawOutcome::TimedOut { partial } => panic!(
                "{:?}: hang; got {:?}",
                String::from_utf8_lossy(req),
                String::from_utf8_lossy(&partial)
            ),
        }
    }
    assert!(
        statuses.starts_with(&[414, 431]) && statuses.iter().filter(|s| **s == 400).count() >= 5,
        "statuses: {statuses:?}"
    );
    let (status, _) = s.get("/api/health");
    assert_eq!(status, 200);
}

// ------------------------------------------------------------------ running

#[test]
fn startup_line_names_the_address() {
    let s = Server::start();
    let out = s.stdout_text();
    // One line (SPEC "Running"); anything else a start logs goes to stderr.
    let [line] = out.lines().collect::<Vec<_>>()[..] else {
        panic!("stdout at start is not one line: {out:?}");
    };
    assert!(line.contains("listening on http://"), "{line}");
    assert!(line.contains(&format!("127.0.0.1:{}", s.port())), "{line}");
    // How the local log's commits reach the disk is part of the effective settings.
    assert!(
        line.contains("log=jetstream ")
            || line.contains("log=local, log_sync=overwrite,")
            || line.contains("log=local, log_sync=fdatasync,"),
        "{line}"
    );
    // The effective settings include the data directory.
    let dir = s.data_dir().display().to_string();
    assert!(
        line.contains(&dir),
        "start-up line does not show the data dir {dir}: {line}"
    );
}

#[test]
fn sigterm_right_after_the_start_up_line_exits_zero() {
    // The start-up line comes before the server answers its first request. A SIGTERM sent the
    // moment it appears once found no handler yet and ended the process by the signal's
    // default action (status 143), so a supervisor saw a crash instead of a clean stop.
    for _ in 0..3 {
        let mut s = Server::start();
        let status = s.terminate();
        assert_eq!(
            status.code(),
            Some(0),
            "exit status after an early SIGTERM: {status:?}\n{}",
            s.stderr_text()
        );
    }
}

/// SIGTERM finishes in-flight requests (SPEC): a request already in the server's socket when the
/// signal comes is answered, never cut off by the close of a connection hyper had not read yet
/// (that close would reset it). Keep-alive clients post in a loop through each stop; any request
/// written before the signal must get its whole answer. A request written after it may find its
/// connection closed, as HTTP/1.1 allows.
#[test]
fn sigterm_answers_every_request_sent_before_it() {
    use std::io::Write;
    use std::net::TcpStream;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::thread;
    use std::time::{Duration, Instant};

    let mut s = Server::start();
    for round in 0..3 {
        let epoch = Instant::now();
        // Nanoseconds after `epoch` just before the signal; 0 until then.
        let term_at = Arc::new(AtomicU64::new(0));
        let clients: Vec<_> = (0..24)
            .map(|c| {
                let (addr, term_at) = (s.addr().to_string(), term_at.clone());
                thread::spawn(move || -> (u32, Vec<String>) {
                    let mut stream = TcpStream::connect(&addr).expect("connect");
                    stream.set_nodelay(true).expect("nodelay");
                    stream
                        .set_read_timeout(Some(Duration::from_secs(10)))
                        .expect("timeout");
                    let mut answered = 0;
                    for n in 0.. {
                        let body = event(&format!("stop/c{c}"), json!({"n": n})).to_string();
                        let request = format!(
                            "POST /api/events HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
                            body.len()
                        );
                        let written = stream.write_all(request.as_bytes());
                        let sent = epoch.elapsed().as_nanos() as u64;
                        let term = term_at.load(Ordering::SeqCst);
                        let before_term = written.is_ok() && (term == 0 || sent < term);
                        let complete = read_one_answer(&mut stream);
                        match complete {
                            Some(head) if head.starts_with("http/1.1 200") => {
                                answered += 1;
                                if head.contains("connection: close") {
                                    return (answered, Vec::new());
                                }
                            }
                            Some(head) => return (answered, vec![format!("request {n}: {head}")]),
                            None if before_term => {
                                return (answered, vec![format!("request {n}, sent before the signal, got no answer")]);
                            }
                            None => return (answered, Vec::new()),
                        }
                    }
                    unreachable!()
                })
            })
            .collect();
        thread::sleep(Duration::from_millis(400));
        term_at.store(epoch.elapsed().as_nanos() as u64, Ordering::SeqCst);
        let status = s.terminate();
        assert_eq!(status.code(), Some(0), "round {round}: {status:?}");
        let mut answered = 0;
        for client in clients {
            let (n, failures) = client.join().expect("client thread");
            answered += n;
            assert!(failures.is_empty(), "round {round}: {failures:?}");
        }
        assert!(
            answered > 0,
            "round {round}: no request was answered at all"
        );
        s.restart();
    }
}

#[test]
fn sigterm_exits_zero_and_data_survives() {
    let mut s = Server::start();
    for i in 0..20 {
        s.put(&format!("acme/t-{i:02}"), json!({"i": i}));
    }
    s.put("acme/t-00", json!({"extra": true}));
    assert_eq!(s.delete("/api/state/entities/acme/t-19").0, 200);
    let before = s.list("?namespace=acme");
    let hist_before = s.history("acme/t-00", "");
    let status = s.terminate();
    assert_eq!(
        status.code(),
        Some(0),
        "exit status after SIGTERM: {status:?}\n{}",
        s.stderr_text()
    );

    s.restart();
    let after = s.list("?namespace=acme");
    assert_eq!(
        after, before,
        "state (lastUpdated included) changed across a clean restart"
    );
    assert_eq!(s.props("acme/t-00"), json!({"i": 0, "extra": true}));
    assert_eq!(s.entity("acme/t-19").0, 404);
    assert_eq!(
        s.history("acme/t-00", ""),
        hist_before,
        "history changed across a clean restart"
    );
    assert_eq!(s.history("acme/t-00", "").len(), 2);
    assert_eq!(s.history("acme/t-19", "").len(), 2);
    // Still writable after the restart.
    s.put("acme/t-20", json!({"i": 20}));
    assert_eq!(s.props("acme/t-20"), json!({"i": 20}));
}

#[test]
fn sigint_exits_zero_and_data_survives() {
    let mut s = Server::start();
    s.put("acme/int", json!({"v": 1}));
    let status = s.signal_and_wait(libc::SIGINT);
    assert_eq!(
        status.code(),
        Some(0),
        "exit status after SIGINT: {status:?}\n{}",
        s.stderr_text()
    );
    s.restart();
    assert_eq!(s.props("acme/int"), json!({"v": 1}));
}

#[test]
fn kill9_loses_no_acknowledged_write() {
    let mut s = Server::start();
    for i in 0..50 {
        s.put(&format!("acme/k-{i:02}"), json!({"i": i}));
    }
    let events: Vec<Value> = (0..50)
        .map(|i| event(&format!("acme/kb-{i:02}"), json!({"i": i})))
        .collect();
    let (status, body) = s.post("/api/events/batch", &Value::Array(events));
    assert_eq!(status, 200, "{body}");
    assert_eq!(s.delete("/api/state/entities/acme/k-00").0, 200);
    let before = s.list("?namespace=acme");
    s.kill9();
    s.restart();
    let after = s.list("?namespace=acme");
    assert_eq!(after.len(), 99);
    assert_eq!(after, before, "state changed across kill -9");
    // Twice, with writes in between.
    s.put("acme/k-00", json!({"back": true}));
    s.kill9();
    s.restart();
    assert_eq!(s.props("acme/k-00"), json!({"back": true}));
    assert_eq!(s.list("?namespace=acme").len(), 100);
}

#[test]
fn second_server_on_same_data_dir_refuses() {
    let first = Server::start();
    first.put("acme/first", json!({"v": 1}));
    let second = Server::try_start(Options {
        dir: Some(first.dir_handle()),
        ..Options::default()
    });
    match second {
        Ok(s) => panic!(
            "a second server started on {} at {}",
            first.data_dir().display(),
            s.url()
        ),
        Err(f) => {
            let status = f.status.expect("second server exit status");
            assert!(!status.success(), "second server exited with {status:?}");
            let dir = first.data_dir().display().to_string();
            let err = f.stderr.to_lowercase();
            assert!(
                f.stderr.contains(&dir)
                    || ["lock", "data dir", "data-dir", "data_dir", "in use"]
                        .iter()
                        .any(|w| err.contains(w)),
                "stderr does not say why: {}",
                f.stderr
            );
        }
    }
    // The first one is unharmed.
    assert_eq!(first.props("acme/first"), json!({"v": 1}));
    first.put("acme/first", json!({"v": 2}));
}

#[test]
fn data_dir_lock_is_released_on_exit() {
    let mut s = Server::start();
    s.put("acme/lock", json!({"v": 1}));
    assert_eq!(s.terminate().code(), Some(0));
    s.restart();
    s.kill9();
    // A kill -9 leaves no stale lock behind either.
    s.restart();
    assert_eq!(s.props("acme/lock"), json!({"v": 1}));
}

#[test]
fn port_env_sets_the_port() {
    let port = free_port();
    let s = Server::start_with(Options {
        listen_flag: None,
        env: vec![("PORT".into(), port.to_string())],
        ..Options::default()
    });
    assert_eq!(s.port(), port, "start-up line: {}", s.stdout_text());
    let (status, body) = s.get("/api/health");
    assert_eq!(status, 200, "{body}");
}

#[test]
fn flux_listen_env_sets_the_address() {
    let port = free_port();
    let s = Server::start_with(Options {
        listen_flag: None,
        env: vec![("FLUX_LISTEN".into(), format!("127.0.0.1:{port}"))],
        ..Options::default()
    });
    assert_eq!(s.port(), port, "start-up line: {}", s.stdout_text());
    assert_eq!(s.url(), format!("http://127.0.0.1:{port}"));
    let (status, body) = s.get("/api/health");
    assert_eq!(status, 200, "{body}");
}

#[test]
fn flux_data_dir_env_sets_the_data_dir() {
    let dir = DataDir::temp();
    let data = dir.path().join("flux-data-env");
    let opts = Options {
        data_dir_flag: false,
        env: vec![("FLUX_DATA_DIR".into(), data.display().to_string())],
        dir: Some(dir.clone()),
        ..Options::default()
    };
    let mut s = Server::start_with(opts);
    s.put("acme/env-dir", json!({"v": 1}));
    assert_eq!(s.terminate().code(), Some(0));
    let entries = std::fs::read_dir(&data)
        .unwrap_or_else(|e| panic!("FLUX_DATA_DIR {} was not used: {e}", data.display()))
        .count();
    assert!(entries > 0, "FLUX_DATA_DIR {} is empty", data.display());
    s.restart();
    assert_eq!(s.props("acme/env-dir"), json!({"v": 1}));
}

#[test]
fn log_and_retention_flags_are_accepted() {
    let s = Server::start_args(&["--log", "local", "--retention", "7d"]);
    s.put("acme/flags", json!({"v": 1}));
    assert_eq!(s.history("acme/flags", "").len(), 1);
    let s = Server::start_with(Options {
        env: vec![
            ("FLUX_LOG".into(), "local".into()),
            ("FLUX_RETENTION".into(), "2d".into()),
        ],
        ..Options::default()
    });
    s.put("acme/flags", json!({"v": 1}));
    assert_eq!(s.props("acme/flags"), json!({"v": 1}));
}

// ------------------------------------------------------------------ signals under load

/// Starts `writers` threads that each publish an increasing counter to `crash/w-<k>` until the
/// server stops answering; once `acks` writes in total are acknowledged, `stop` is called (it
/// signals the server). Returns, per writer, the highest acknowledged counter, and every
/// unexpected status seen.
fn write_until_stopped(
    s: &mut Server,
    writers: usize,
    acks: usize,
    stop: impl FnOnce(&mut Server),
) -> (Vec<Option<i64>>, Vec<String>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    let acked = Arc::new(AtomicUsize::new(0));
    let odd = Arc::new(Mutex::new(Vec::new()));
    let handles: Vec<_> = (0..writers)
        .map(|k| {
            let c = s.client();
            let acked = acked.clone();
            let odd = odd.clone();
            std::thread::spawn(move || {
                let mut last = None;
                for n in 0..20_000i64 {
                    let ev = event(&format!("crash/w-{k}"), json!({"n": n}));
                    match c.post("/api/events", &ev) {
                        Ok((200, _)) => {
                            last = Some(n);
                            acked.fetch_add(1, Ordering::SeqCst);
                        }
                        // Refused while shutting down: allowed, nothing was accepted.
                        Ok((503, _)) => {}
                        Ok((status, text)) => {
                            odd.lock().unwrap().push(format!("{status} {text}"));
                        }
                        Err(_) => break,
                    }
                }
                last
            })
        })
        .collect();
    let reached = wait_for(std::time::Duration::from_secs(30), || {
        (acked.load(Ordering::SeqCst) >= acks).then_some(())
    });
    stop(s);
    let lasts: Vec<Option<i64>> = handles
        .into_iter()
        .map(|h| h.join().expect("writer"))
        .collect();
    assert!(
        reached.is_some(),
        "writers never reached {acks} acknowledged writes"
    );
    let odd = odd.lock().unwrap().clone();
    (lasts, odd)
}

fn assert_acknowledged_survive(s: &Server, lasts: &[Option<i64>]) {
    for (k, last) in lasts.iter().enumerate() {
        let Some(last) = last else { continue };
        let id = format!("crash/w-{k}");
        let props = s.props(&id);
        let n = props["n"].as_i64().expect("n");
        assert!(
            n >= *last,
            "{id}: acknowledged n={last} but after restart n={n}"
        );
        let hist = s.history(&id, "&limit=1");
        assert_eq!(
            hist[0]["payload"]["properties"]["n"],
            json!(n),
            "{id}: history head"
        );
    }
}

#[test]
fn sigterm_under_load_keeps_acknowledged_writes() {
    let mut s = Server::start();
    let (lasts, odd) = write_until_stopped(&mut s, 4, 200, |s| {
        let status = s.terminate();
        assert_eq!(
            status.code(),
            Some(0),
            "exit after SIGTERM under load: {status:?}"
        );
    });
    assert!(
        odd.is_empty(),
        "unexpected statuses during shutdown: {odd:?}"
    );
    s.restart();
    assert_acknowledged_survive(&s, &lasts);
}

#[test]
fn kill9_under_load_loses_no_acknowledged_write() {
    let mut s = Server::start();
    let (lasts, odd) = write_until_stopped(&mut s, 4, 200, |s| s.kill9());
    assert!(odd.is_empty(), "unexpected statuses: {odd:?}");
    s.restart();
    assert_acknowledged_survive(&s, &lasts);
}

#[test]
fn snapshot_plus_tail_equals_state() {
    let mut s = Server::start();
    let events: Vec<Value> = (0..300)
        .map(|i| {
            event(
                &format!("snap/e-{:02}", i % 30),
                json!({"i": i, format!("k{}", i % 7): i}),
            )
        })
        .collect();
    let (status, body) = s.post("/api/events/batch", &Value::Array(events));
    assert_eq!(status, 200, "{body}");
    assert_eq!(s.delete("/api/state/entities/snap/e-03").0, 200);
    // A clean stop writes a snapshot.
    assert_eq!(s.terminate().code(), Some(0));
    s.restart();
    // The tail: more writes, deletes and re-creations after the snapshot.
    for i in 0..40 {
        s.put(&format!("snap/e-{:02}", i % 35), json!({"tail": i}));
    }
    let (status, body) = s.post(
        "/api/state/entities/delete",
        &json!({"entity_ids": ["snap/e-05", "snap/e-06"]}),
    );
    assert_eq!(status, 200, "{body}");
    s.put("snap/e-05", json!({"reborn": true}));
    let state = s.list("?namespace=snap");
    let hists: Vec<Vec<Value>> = (0..35)
        .map(|i| s.history(&format!("snap/e-{i:02}"), "&limit=500"))
        .collect();
    s.kill9();
    s.restart();
    assert_eq!(
        s.list("?namespace=snap"),
        state,
        "snapshot + tail differs from the live state"
    );
    for (i, h) in hists.iter().enumerate() {
        assert_eq!(
            &s.history(&format!("snap/e-{i:02}"), "&limit=500"),
            h,
            "history of e-{i:02}"
        );
    }
    // And once more after a clean stop (a fresh snapshot).
    assert_eq!(s.terminate().code(), Some(0));
    s.restart();
    assert_eq!(
        s.list("?namespace=snap"),
        state,
        "state differs after a second snapshot"
    );
}

// ------------------------------------------------------------------ connections

#[test]
fn keepalive_connection_serves_sequential_requests() {
    let s = Server::start();
    let mut conn = RawConn::connect(s.addr());
    let json_ct = [("Content-Type", "application/json")];
    for i in 0..5 {
        let body = event("acme/ka", json!({"i": i})).to_string();
        let r = conn.roundtrip(&keepalive_request(
            "POST",
            "/api/events",
            &json_ct,
            body.as_bytes(),
        ));
        assert_eq!(r.status, 200, "{}", r.text());
        let r = conn.roundtrip(&keepalive_request(
            "GET",
            "/api/state/entities/acme/ka",
            &[],
            b"",
        ));
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["properties"]["i"], json!(i));
        // An error reply on a fully sent body leaves the connection usable.
        let r = conn.roundtrip(&keepalive_request("POST", "/api/events", &json_ct, b"{bad"));
        assert_eq!(r.status, 400, "{}", r.text());
        let r = conn.roundtrip(&keepalive_request("GET", "/api/nope", &[], b""));
        assert_eq!(r.status, 404, "{}", r.text());
    }
}

#[test]
fn sigterm_with_idle_and_stalled_connections_exits_zero() {
    let mut s = Server::start();
    s.put("acme/idle", json!({"v": 1}));
    // A kept-alive connection that has finished a request and now sits idle.
    let mut idle = RawConn::connect(s.addr());
    let r = idle.roundtrip(&keepalive_request("GET", "/api/health", &[], b""));
    assert_eq!(r.status, 200);
    // A connection that never sends anything.
    let silent = RawConn::connect(s.addr());
    // A connection stuck in the middle of its headers.
    let stalled = stalled_after(s.addr(), b"GET /api/health HTTP/1.1\r\nHost: x\r\n");
    // A connection stuck in the middle of its body.
    let half_body = stalled_after(
        s.addr(),
        b"POST /api/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
          Content-Length: 500\r\n\r\n{\"stream\":",
    );
    let status = s.terminate();
    assert_eq!(
        status.code(),
        Some(0),
        "exit after SIGTERM with open connections: {status:?}\n{}",
        s.stderr_text()
    );
    drop((idle, silent, stalled, half_body));
    s.restart();
    assert_eq!(s.props("acme/idle"), json!({"v": 1}));
}

/// A connection that sent `partial` (a request cut short) and then nothing more.
fn stalled_after(addr: &str, partial: &[u8]) -> RawConn {
    use std::io::Write;
    let mut conn = RawConn::connect(addr);
    conn.stream().write_all(partial).expect("partial request");
    conn
}

/// A client that stops sending in the middle of its body (or its headers) is not waited for
/// forever: with `--request-timeout 1s` the body gets a 408 naming the timeout, the headers a
/// closed connection, and the server goes on serving.
#[test]
fn stalled_bodies_and_headers_time_out() {
    let s = Server::start_args(&["--request-timeout", "1s"]);
    assert!(
        s.stdout_text().contains("request_timeout=1s"),
        "the start-up line names the setting: {}",
        s.stdout_text()
    );
    let mut half_body = stalled_after(
        s.addr(),
        b"POST /api/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
          Content-Length: 100\r\n\r\n{\"str",
    );
    let mut stalled = stalled_after(s.addr(), b"GET /api/health HTTP/1.1\r\nHost: x\r\n");
    // `read_response` gives up after 20 s: without the timeout there is no response at all.
    let r = half_body
        .read_response()
        .expect("a response to the stalled body");
    assert_eq!(r.status, 408, "{}", r.text());
    let error = r.json()["error"].as_str().unwrap_or_default().to_string();
    assert!(error.contains("timeout"), "{error}");
    assert!(
        stalled.read_response().is_none(),
        "stalled headers get no response"
    );
    assert_eq!(s.get("/api/health").0, 200);
}

/// A client that trickles its body, each byte well within the request timeout of the last,
/// still gets a 408 once the body falls below the minimum rate: it cannot hold a request open
/// for ever by never quite stalling.
#[test]
fn a_trickled_body_gets_a_408_while_it_is_still_sending() {
    use std::io::Write;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::time::Duration;
    let s = Server::start_args(&["--request-timeout", "1s"]);
    let body = br#"{"stream":"s","source":"t","timestamp":1,"payload":{"entity_id":"acme/slow","properties":{"v":1}}}"#;
    let mut conn = stalled_after(
        s.addr(),
        format!(
            "POST /api/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    );
    let sent = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut writer = conn.stream().try_clone().expect("clone the socket");
    let trickle = {
        let (sent, stop) = (sent.clone(), stop.clone());
        std::thread::spawn(move || {
            for byte in body.iter() {
                // Each gap is well under the 1 s request timeout.
                std::thread::sleep(Duration::from_millis(250));
                if stop.load(Ordering::Relaxed) || writer.write_all(&[*byte]).is_err() {
                    return;
                }
                sent.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let r = conn
        .read_response()
        .expect("an answer to the trickled body");
    let sent_before = sent.load(Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    trickle.join().expect("the trickling thread");
    assert_eq!(r.status, 408, "{}", r.text());
    let error = r.json()["error"].as_str().unwrap_or_default().to_string();
    assert!(
        error.contains("bytes/s"),
        "the error names the rate: {error}"
    );
    assert!(
        sent_before < body.len(),
        "the 408 came while the client was still sending ({sent_before} of {} bytes)",
        body.len()
    );
    assert_eq!(s.get("/api/state/entities/acme/slow").0, 404);
}

/// A client that stops reading a large answer loses its connection after the request
/// timeout: it cannot hold a socket and the answer's buffers for ever. A client that reads
/// gets the whole answer.
/// Reads one whole answer from `stream` (head and `Content-Length` body) and returns its head,
/// lowercased; `None` if the connection ends or fails first.
fn read_one_answer(stream: &mut std::net::TcpStream) -> Option<String> {
    use std::io::Read;
    let mut answer = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = answer.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&answer[..end]).to_lowercase();
            let length: usize = head
                .split("content-length: ")
                .nth(1)
                .and_then(|v| v.split("\r\n").next()?.trim().parse().ok())
                .unwrap_or(0);
            if answer.len() >= end + 4 + length {
                return Some(head);
            }
        }
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return None,
            Ok(n) => answer.extend_from_slice(&chunk[..n]),
        }
    }
}

/// A keep-alive request (no `Connection: close`) with a `Content-Length` body.
fn keep_alive_request(method: &str, path: &str, body: &[u8]) -> Vec<u8> {
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n",
        body.len()
    );
    [head.as_bytes(), body].concat()
}

/// Writes `request` whole, then reads one answer: the head (lowercased) and whether the server
/// then closed the connection. Panics if the write fails (a reset instead of an answer).
fn write_whole_then_read(
    stream: &mut std::net::TcpStream,
    request: &[u8],
    label: &str,
) -> (String, bool) {
    use std::io::Write;
    stream
        .write_all(request)
        .unwrap_or_else(|e| panic!("{label}: writing the request: {e}"));
    let head = read_one_answer(stream)
        .unwrap_or_else(|| panic!("{label}: the connection ended before a whole answer"));
    let closed = head.contains("connection: close")
        && matches!(std::io::Read::read(stream, &mut [0u8; 64]), Ok(0) | Err(_));
    (head, closed)
}

/// A request whose body the server answers without reading (no route, a wrong method, a
/// missing token) gets `Connection: close`, and the whole body can still be written before the
/// answer is read: a keep-alive client must not reuse a connection whose request stream is
/// out of step, nor see a reset instead of its answer. A body that was read keeps the
/// connection open for the next request.
#[test]
fn an_answer_to_a_body_left_unread_closes_its_connection() {
    let s = Server::start();
    let auth = Server::start_args(&["--auth", "--admin-token", "adm"]);
    let big = padded_event("acme/unread", 900_000);
    for (server, method, path) in [
        (&s, "POST", "/api/nope"),
        (&s, "PUT", "/api/events"),
        (&s, "POST", "/api/health"),
        (&auth, "POST", "/api/events"),
        (&auth, "PUT", "/api/admin/config"),
    ] {
        let label = format!("{method} {path}");
        let request = keep_alive_request(method, path, &big);
        let mut stream = std::net::TcpStream::connect(server.addr()).expect("connect");
        stream
            .set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .expect("timeout");
        let (head, closed) = write_whole_then_read(&mut stream, &request, &label);
        assert!(head.starts_with("http/1.1 4"), "{label}: {head}");
        assert!(
            closed,
            "{label}: answered with the body unread, yet kept open: {head}"
        );
    }
    // Read bodies (a 400 after reading it, then a success) keep the connection.
    let mut stream = std::net::TcpStream::connect(s.addr()).expect("connect");
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .expect("timeout");
    let bad = keep_alive_request("POST", "/api/events", b"{\"stream\":\"BAD\"}");
    let (head, closed) = write_whole_then_read(&mut stream, &bad, "a 400");
    assert!(head.starts_with("http/1.1 400") && !closed, "{head}");
    let good = keep_alive_request("POST", "/api/events", &padded_event("acme/read", 1000));
    let (head, closed) = write_whole_then_read(&mut stream, &good, "then a publish");
    assert!(head.starts_with("http/1.1 200") && !closed, "{head}");
}

/// A client that sends the headers, reads the early 413 and only then sends the body it had
/// announced must be able to send it: the server drains it instead of answering with a reset.
#[test]
fn a_body_sent_after_its_early_413_is_drained() {
    use std::io::{Read, Write};
    let s = Server::start();
    let mut stream = std::net::TcpStream::connect(s.addr()).expect("connect");
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .expect("timeout");
    let length = 3 * 1_048_576;
    let head = format!("POST /api/events HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n\r\n");
    stream.write_all(head.as_bytes()).expect("headers");
    let mut answer = [0u8; 4096];
    let n = stream.read(&mut answer).expect("the early answer");
    let text = String::from_utf8_lossy(&answer[..n]);
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    let chunk = vec![b'x'; 64 * 1024];
    for sent in (0..length).step_by(chunk.len()) {
        stream
            .write_all(&chunk[..chunk.len().min(length - sent)])
            .unwrap_or_else(|e| panic!("writing the body after its 413 at byte {sent}: {e}"));
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    assert!(
        matches!(stream.read(&mut answer), Ok(0)),
        "then the server closes"
    );
}

#[test]
fn a_client_that_reads_nothing_of_an_answer_is_dropped() {
    use std::io::Write;
    use std::thread;
    use std::time::Duration;
    let s = Server::start_args(&["--request-timeout", "2s"]);
    let client = s.client();
    let pad = "p".repeat(400);
    for start in (0..20_000u64).step_by(2_000) {
        let events: Vec<Value> = (start..start + 2_000)
            .map(|i| event(&format!("big/e{i:05}"), json!({"pad": pad})))
            .collect();
        let (status, body) = client
            .post("/api/events/batch", &json!(events))
            .expect("batch");
        assert_eq!(status, 200, "{body}");
    }
    let request = b"GET /api/state/entities?prefix=big/ HTTP/1.1\r\nHost: x\r\n\r\n";
    let mut reader = RawConn::connect(s.addr());
    reader.send(request);
    // ~9 MB of answer: far more than the socket buffers hold while nothing is read.
    thread::sleep(Duration::from_secs(5));
    let (got, end) = read_until_end(reader.stream(), Duration::from_secs(10));
    let ended = match end {
        Ok(()) => "EOF",
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => "reset",
        Err(e) => panic!("after {} bytes the connection stayed open: {e}", got.len()),
    };
    assert!(
        !got.ends_with(b"0\r\n\r\n"),
        "the stalled client got the whole answer ({} bytes, then {ended})",
        got.len()
    );
    // One that reads gets it all, on a connection that stays open.
    let mut ok = RawConn::connect(s.addr());
    let r = ok.roundtrip(request);
    assert_eq!(r.status, 200);
    assert_eq!(r.json().as_array().map(Vec::len), Some(20_000));
    ok.stream()
        .write_all(b"GET /api/health HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("write");
    assert_eq!(ok.read_response().map(|r| r.status), Some(200));
}

// ------------------------------------------------------------------ start-up failures

#[test]
fn missing_data_dir_is_created() {
    let root = DataDir::temp();
    let nested = root.path().join("a/b/flux-data");
    let mut s = Server::start_with(Options {
        args: vec!["--data-dir".into(), nested.display().to_string()],
        data_dir_flag: false,
        dir: Some(root.clone()),
        ..Options::default()
    });
    s.put("acme/nested", json!({"v": 1}));
    assert!(nested.is_dir(), "{} was not created", nested.display());
    assert_eq!(s.terminate().code(), Some(0));
    s.restart();
    assert_eq!(s.props("acme/nested"), json!({"v": 1}));
}

#[test]
fn unusable_data_dir_exits_nonzero() {
    let root = DataDir::temp();
    let file = root.path().join("not-a-dir");
    std::fs::write(&file, b"just a file").expect("write file");
    let result = Server::try_start(Options {
        args: vec!["--data-dir".into(), file.display().to_string()],
        data_dir_flag: false,
        dir: Some(root.clone()),
        ..Options::default()
    });
    match result {
        Ok(s) => panic!("flux started on a data dir that is a file, at {}", s.url()),
        Err(f) => {
            let status = f.status.expect("exit status");
            assert!(!status.success(), "exit status {status:?}");
            assert!(!f.stderr.trim().is_empty(), "no reason given on stderr");
        }
    }
}

/// A bad `--encryption-key` stops the server before its start-up line (which would claim it
/// listens), naming the flag and its environment twin.
#[test]
fn a_bad_encryption_key_exits_nonzero_before_the_start_up_line() {
    for (flag, env) in [(true, false), (false, true)] {
        let mut options = Options::default();
        if flag {
            options.args = vec!["--encryption-key".into(), "short".into()];
        }
        if env {
            options.env = vec![("FLUX_ENCRYPTION_KEY".into(), "short".into())];
        }
        match Server::try_start(options) {
            Ok(s) => panic!("flux started with a 5-byte key, at {}", s.url()),
            Err(f) => {
                let status = f.status.expect("exit status");
                assert!(!status.success(), "exit status {status:?}");
                assert!(
                    f.stderr.contains("--encryption-key")
                        && f.stderr.contains("FLUX_ENCRYPTION_KEY")
                        && f.stderr.contains("32 bytes"),
                    "stderr names the flag and the limit: {}",
                    f.stderr
                );
            }
        }
    }
}

#[test]
fn port_in_use_exits_nonzero() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let result = Server::try_start(Options {
        listen_flag: Some(addr.clone()),
        ..Options::default()
    });
    match result {
        Ok(s) => panic!("flux claims to listen on the taken {addr}: {}", s.url()),
        Err(f) => {
            let status = f.status.expect("exit status");
            assert!(!status.success(), "exit status {status:?}");
            assert!(!f.stderr.trim().is_empty(), "no reason given on stderr");
        }
    }
    drop(taken);
}

/// `GET /metrics` is the Prometheus text format: its content type, every sample line well
/// formed, every counter family named by its samples (`# TYPE x_total counter`), no `# EOF`.
/// A scraper that asks for OpenMetrics in `Accept` gets that instead.
#[test]
fn metrics_is_prometheus_text() {
    let s = Server::start();
    s.put("acme/m", json!({"v": 1}));
    let r = s.get_resp("/metrics");
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(
        r.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    let text = r.text;
    assert!(!text.contains("# EOF"), "{text}");
    let counters: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    assert!(counters.contains(&"flux_events_accepted_total"), "{text}");
    for counter in &counters {
        assert!(
            text.lines()
                .any(|l| l.starts_with(&format!("{counter} "))
                    || l.starts_with(&format!("{counter}{{"))),
            "counter {counter} has no sample of its name:\n{text}"
        );
    }
    let open = s.request(
        "GET",
        "/metrics",
        &[(
            "Accept",
            "application/openmetrics-text;version=1.0.0,text/plain;q=0.5",
        )],
        None,
    );
    assert_eq!(
        open.header("content-type"),
        Some("application/openmetrics-text; version=1.0.0; charset=utf-8")
    );
    assert_eq!(open.text.lines().last(), Some("# EOF"));
    assert!(open.text.contains("# TYPE flux_events_accepted counter"));
    let mut samples = 0;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        // name{labels} value [timestamp]
        let name_end = line
            .find(['{', ' '])
            .unwrap_or_else(|| panic!("bad sample line {line:?}"));
        let name = &line[..name_end];
        assert!(
            !name.is_empty()
                && name
                    .chars()
                    .enumerate()
                    .all(|(i, c)| c.is_ascii_alphabetic()
                        || c == '_'
                        || c == ':'
                        || (i > 0 && c.is_ascii_digit())),
            "bad metric name in {line:?}"
        );
        let after_labels = match line[name_end..].strip_prefix('{') {
            Some(rest) => &rest[rest.rfind('}').unwrap_or_else(|| panic!("{line:?}")) + 1..],
            None => &line[name_end..],
        };
        let value = after_labels
            .split_whitespace()
            .next()
            .unwrap_or_else(|| panic!("{line:?}"));
        assert!(
            value.parse::<f64>().is_ok() || ["NaN", "+Inf", "-Inf"].contains(&value),
            "bad sample value in {line:?}"
        );
        samples += 1;
    }
    assert!(samples > 0, "no samples in /metrics: {text:?}");
}

/// `--pin` narrows every shard thread to one CPU of the process's set, and `--spin-us` is
/// accepted; both show in the start-up line and the server works as usual.
#[test]
fn pin_and_spin_flags_place_shard_threads_and_serve() {
    let s = Server::start_args(&["--pin", "--spin-us", "50", "--shards", "2"]);
    let line = s.stdout_text();
    assert!(
        line.contains("pin=true") && line.contains("spin_us=50"),
        "{line}"
    );
    s.put("pin/one", json!({"v": 1}));
    assert_eq!(s.props("pin/one")["v"], 1);

    let pid = s.pid().expect("pid");
    let mut shards = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).expect("tasks") {
        let path = task.expect("task").path();
        let comm = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
        if !comm.starts_with("flux-shard-") {
            continue;
        }
        let status = std::fs::read_to_string(path.join("status")).expect("status");
        let cpus = status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
            .expect("Cpus_allowed_list")
            .trim()
            .to_string();
        assert!(
            cpus.parse::<usize>().is_ok(),
            "{} may run on {cpus}, expected one CPU",
            comm.trim()
        );
        shards += 1;
    }
    assert_eq!(shards, 2, "shard threads found");
}

/// Voluntary context switches of the server's thread named `name` (from /proc). A thread
/// names itself once it runs, so one just started is waited for (up to 5 s).
fn thread_wakeups(s: &Server, name: &str) -> u64 {
    let pid = s.pid().expect("pid");
    let find = || {
        for task in std::fs::read_dir(format!("/proc/{pid}/task")).expect("tasks") {
            let path = task.expect("task").path();
            let comm = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
            if comm.trim() != name {
                continue;
            }
            let status = std::fs::read_to_string(path.join("status")).ok()?;
            return status
                .lines()
                .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
                .and_then(|count| count.trim().parse().ok());
        }
        None
    };
    wait_for(std::time::Duration::from_secs(5), find)
        .unwrap_or_else(|| panic!("no thread named {name}"))
}

/// On an idle server a single event is made durable and applied by the HTTP worker that read
/// it: the log writer thread never wakes. With one HTTP worker (which must not block in
/// fdatasync) the writer thread commits every event instead. Either way every event is durable
/// and applied when acknowledged.
#[test]
fn single_events_on_an_idle_log_commit_without_waking_the_writer_thread() {
    let quiet = ["--snapshot-interval", "1h", "--directory-interval", "1h"];
    for (workers, writer_wakes) in [("2", false), ("1", true)] {
        let args = [&quiet[..], &["--http-workers", workers]].concat();
        // About the local log's writer thread: never on JetStream.
        let mut s = Server::start_with(Options {
            args: args.iter().map(|a| a.to_string()).collect(),
            ..Options::local_only()
        });
        assert!(
            s.stdout_text().contains("leader_commits="),
            "{}",
            s.stdout_text()
        );
        let before = thread_wakeups(&s, "flux-log-writer");
        for i in 0..20 {
            s.put(&format!("lead/e{i}"), json!({"v": i}));
            assert_eq!(s.props(&format!("lead/e{i}"))["v"], i);
        }
        let woke = thread_wakeups(&s, "flux-log-writer") - before;
        if writer_wakes {
            assert!(
                woke >= 20,
                "{workers} worker(s): the writer woke {woke} times"
            );
        } else {
            assert!(woke < 5, "{workers} workers: the writer woke {woke} times");
        }
        // Durable: a kill -9 and a restart keep every acknowledged event.
        s.kill9();
        s.restart();
        for i in 0..20 {
            assert_eq!(s.props(&format!("lead/e{i}"))["v"], i);
        }
    }
}
