//! Black-box tests of the state API: list, get, delete, batch delete, and the built-in
//! `flux-core/directory` entity (SPEC.md, "State").

mod util;

use std::collections::HashSet;
use std::time::Duration;

use serde_json::{Value, json};
use util::*;

// ------------------------------------------------------------------ list

#[test]
fn list_is_sorted_by_id_with_full_entities() {
    let s = Server::start();
    let ids = [
        "zeta/1",
        "acme/b",
        "acme/a",
        "beta/x/y",
        "acme/site-3/pump-01",
        "Acme/upper",
        "0num/x",
    ];
    for (i, id) in ids.iter().enumerate() {
        s.put(id, json!({"i": i}));
    }
    let list = s.list("");
    let all: Vec<String> = list
        .iter()
        .map(|e| e["id"].as_str().expect("id").to_string())
        .collect();
    let mut sorted = all.clone();
    sorted.sort();
    assert_eq!(all, sorted, "list is not sorted by id");
    let mine: Vec<String> = all
        .into_iter()
        .filter(|id| !id.starts_with("flux-core/"))
        .collect();
    let mut want: Vec<String> = ids.iter().map(|s| s.to_string()).collect();
    want.sort();
    assert_eq!(mine, want);
    for e in &list {
        let id = e["id"].as_str().expect("id");
        if id.starts_with("flux-core/") {
            continue;
        }
        let i = ids.iter().position(|x| *x == id).expect("known id");
        assert_eq!(e["properties"], json!({"i": i}), "{e}");
        let lu = e["lastUpdated"]
            .as_str()
            .unwrap_or_else(|| panic!("no lastUpdated: {e}"));
        assert!(
            parse_iso_millis(lu).is_some(),
            "lastUpdated {lu:?} is not YYYY-MM-DDTHH:MM:SS.mmmZ"
        );
    }
}

#[test]
fn list_prefix_filter() {
    let s = Server::start();
    for id in [
        "acme/site-3/pump-01",
        "acme/site-3/pump-02",
        "acme/site-30/x",
        "acme/site-4/y",
        "other/site-3/z",
    ] {
        s.put(id, json!({"v": 1}));
    }
    assert_eq!(
        s.list_ids("?prefix=acme/site-3/"),
        vec![
            "acme/site-3/pump-01".to_string(),
            "acme/site-3/pump-02".to_string()
        ]
    );
    assert_eq!(
        s.list_ids("?prefix=acme%2Fsite-3%2F"),
        vec![
            "acme/site-3/pump-01".to_string(),
            "acme/site-3/pump-02".to_string()
        ]
    );
    assert_eq!(s.list_ids("?prefix=acme/site-3").len(), 3);
    assert_eq!(s.list_ids("?prefix=acme/").len(), 4);
    assert!(s.list_ids("?prefix=nothing-here/").is_empty());
}

#[test]
fn list_namespace_filter() {
    let s = Server::start();
    for id in [
        "acme/x",
        "acme/site-3/y",
        "acme2/x",
        "acmex/y",
        "other/acme/z",
        "ac/me",
    ] {
        s.put(id, json!({"v": 1}));
    }
    assert_eq!(
        s.list_ids("?namespace=acme"),
        vec!["acme/site-3/y".to_string(), "acme/x".to_string()]
    );
    assert_eq!(s.list_ids("?namespace=acme2"), vec!["acme2/x".to_string()]);
    assert!(s.list_ids("?namespace=nope").is_empty());
    // Both filters give the ids that match both.
    assert_eq!(
        s.list_ids("?namespace=acme&prefix=acme/site"),
        vec!["acme/site-3/y".to_string()]
    );
    assert_eq!(
        s.list_ids("?prefix=ac&namespace=acme"),
        vec!["acme/site-3/y".to_string(), "acme/x".to_string()]
    );
    assert!(s.list_ids("?namespace=acme&prefix=acme2/").is_empty());
    assert!(s.list_ids("?namespace=acme&prefix=other/").is_empty());
}

#[test]
fn list_paging_walks_all_ids_in_order() {
    let s = Server::start();
    let mut want = Vec::new();
    for i in 0..25 {
        want.push(format!("page/e-{i:03}"));
    }
    want.extend([
        "page/a/deep".to_string(),
        "pagez/x".to_string(),
        "zzz/last".to_string(),
    ]);
    let events: Vec<Value> = want.iter().map(|id| event(id, json!({"v": 1}))).collect();
    let (status, body) = s.post("/api/events/batch", &Value::Array(events));
    assert_eq!(status, 200, "{body}");
    want.sort();

    let full = s.list_ids("");
    assert_eq!(full, want);

    for limit in [1usize, 7, 28, 100] {
        let mut seen: Vec<String> = Vec::new();
        let mut after: Option<String> = None;
        for _round in 0..200 {
            let q = match &after {
                None => format!("?limit={limit}"),
                Some(a) => format!("?limit={limit}&after={}", enc(a)),
            };
            let page = s.list(&q);
            assert!(
                page.len() <= limit,
                "page of {} with limit {limit}",
                page.len()
            );
            let ids: Vec<String> = page
                .iter()
                .map(|e| e["id"].as_str().expect("id").to_string())
                .collect();
            if let Some(a) = &after {
                assert!(ids.iter().all(|id| id > a), "page after {a} has {ids:?}");
            }
            seen.extend(ids.iter().cloned());
            if ids.len() < limit {
                break;
            }
            after = ids.last().cloned();
        }
        let mine: Vec<String> = seen
            .iter()
            .filter(|id| !id.starts_with("flux-core/"))
            .cloned()
            .collect();
        assert_eq!(mine, want, "paging with limit {limit}");
        let unique: HashSet<&String> = seen.iter().collect();
        assert_eq!(
            unique.len(),
            seen.len(),
            "duplicates while paging: {seen:?}"
        );
    }

    // `after` an id that does not exist starts at the next id.
    assert_eq!(
        s.list_ids("?after=page%2Fe-0105&limit=2"),
        vec!["page/e-011", "page/e-012"]
    );
    // `after` the last id is an empty page.
    assert!(s.list("?after=zzzz").is_empty());
}

/// Listings between creates stay exact while each shard's table grows many times over (the
/// order a listing pages through must not outlive a growth), and after the shards sort at idle.
#[test]
fn list_stays_complete_while_entities_are_created() {
    let s = Server::start();
    let mut want = Vec::new();
    for round in 0..12usize {
        let batch: Vec<Value> = (0..(1usize << round).min(1000))
            .map(|i| {
                let id = format!("grow/r{round:02}-{i:04}");
                want.push(id.clone());
                event(&id, json!({"v": i}))
            })
            .collect();
        let (status, body) = s.post("/api/events/batch", &Value::Array(batch));
        assert_eq!(status, 200, "{body}");
        want.sort();
        assert_eq!(s.list_ids("?prefix=grow/"), want, "after round {round}");
    }
    // Quiet long enough for the idle sort, then list again.
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert_eq!(s.list_ids("?prefix=grow/"), want);
}

#[test]
fn list_paging_with_prefix() {
    let s = Server::start();
    let mut want = Vec::new();
    for i in 0..12 {
        want.push(format!("fleet/dev-{i:02}"));
    }
    let mut events: Vec<Value> = want.iter().map(|id| event(id, json!({"v": 1}))).collect();
    events.push(event("fleeting/x", json!({"v": 1})));
    events.push(event("aaa/x", json!({"v": 1})));
    let (status, body) = s.post("/api/events/batch", &Value::Array(events));
    assert_eq!(status, 200, "{body}");

    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    for _ in 0..50 {
        let q = match &after {
            None => "?prefix=fleet/&limit=5".to_string(),
            Some(a) => format!("?prefix=fleet/&limit=5&after={}", enc(a)),
        };
        let ids = s.list_ids(&q);
        seen.extend(ids.iter().cloned());
        if ids.len() < 5 {
            break;
        }
        after = ids.last().cloned();
    }
    assert_eq!(seen, want);
}

#[test]
fn list_bad_limit_is_not_500() {
    let s = Server::start();
    s.put("acme/x", json!({"v": 1}));
    for q in [
        "?limit=abc",
        "?limit=-1",
        "?limit=99999999999999999999999",
        "?after=%FF%FE",
        "?prefix=%FF",
    ] {
        let (status, text) = s.get_text(&format!("/api/state/entities{q}"));
        assert!(status == 200 || status == 400, "{q}: {status} {text}");
        if status == 400 {
            error_message(&parse_json(status, &text));
        }
    }
}

// ------------------------------------------------------------------ get one

#[test]
fn get_with_raw_and_encoded_slashes() {
    let s = Server::start();
    s.put("acme/site-3/pump-01", json!({"rpm": 1200}));
    for path in [
        "/api/state/entities/acme/site-3/pump-01",
        "/api/state/entities/acme%2Fsite-3%2Fpump-01",
        "/api/state/entities/acme%2fsite-3%2fpump-01",
        "/api/state/entities/acme/site-3%2Fpump-01",
    ] {
        let (status, body) = s.get(path);
        assert_eq!(status, 200, "{path}: {body}");
        assert_eq!(body["id"], "acme/site-3/pump-01", "{path}");
        assert_eq!(body["properties"], json!({"rpm": 1200}), "{path}");
    }
}

#[test]
fn get_with_encoded_special_characters() {
    let s = Server::start();
    let id = "acme/room 1:temp+humidity?x#y";
    s.put(id, json!({"ok": true}));
    let (status, body) = s.get(&format!("/api/state/entities/{}", enc(id)));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["id"], id);
    assert_eq!(
        s.list_ids(&format!("?prefix={}", enc("acme/room 1"))),
        vec![id.to_string()]
    );
    let uid = "acme/温度-sensor/ü";
    s.put(uid, json!({"ok": 1}));
    let (status, body) = s.get(&format!("/api/state/entities/{}", enc(uid)));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["id"], uid);
}

#[test]
fn get_unknown_is_404_entity_not_found() {
    let s = Server::start();
    s.put("acme/known", json!({"v": 1}));
    for path in [
        "/api/state/entities/acme/unknown",
        "/api/state/entities/acme%2Funknown",
        "/api/state/entities/acme/known/child",
        "/api/state/entities/acme",
    ] {
        let (status, body) = s.get(path);
        assert_eq!(status, 404, "{path}: {body}");
        assert_eq!(body, json!({"error": "Entity not found"}), "{path}");
    }
}

#[test]
fn last_updated_is_server_accept_time() {
    let s = Server::start();
    let before = now_ms();
    // Producer time far in the past: lastUpdated must not be it.
    s.put("acme/clock", json!({"v": 1}));
    let after = now_ms();
    let (_, body) = s.entity("acme/clock");
    let lu = body["lastUpdated"].as_str().expect("lastUpdated string");
    let t = parse_iso_millis(lu)
        .unwrap_or_else(|| panic!("lastUpdated {lu:?} is not YYYY-MM-DDTHH:MM:SS.mmmZ"));
    assert!(
        t >= before - 60_000 && t <= after + 60_000,
        "lastUpdated {lu} is not the accept time (now is {})",
        format_iso_millis(after)
    );
    let list = s.list("?prefix=acme/clock");
    assert_eq!(list[0]["lastUpdated"], body["lastUpdated"]);
    // A later event moves it forward (or keeps it, within the same millisecond).
    s.put("acme/clock", json!({"v": 2}));
    let (_, body2) = s.entity("acme/clock");
    let t2 = parse_iso_millis(body2["lastUpdated"].as_str().expect("lastUpdated")).expect("iso");
    assert!(t2 >= t, "lastUpdated went back: {t} -> {t2}");
}

// ------------------------------------------------------------------ delete one

#[test]
fn delete_single_entity() {
    let s = Server::start();
    s.put("acme/doomed", json!({"v": 1}));
    s.put("acme/survivor", json!({"v": 1}));
    let (status, body) = s.delete("/api/state/entities/acme/doomed");
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["entity_id"], "acme/doomed", "{body}");
    let id = body["eventId"]
        .as_str()
        .unwrap_or_else(|| panic!("no eventId: {body}"));
    assert!(!id.is_empty());
    let (status, body) = s.entity("acme/doomed");
    assert_eq!(status, 404);
    assert_eq!(body, json!({"error": "Entity not found"}));
    assert_eq!(s.list_ids(""), vec!["acme/survivor".to_string()]);
    // Deleting again: it no longer exists.
    let (status, body) = s.delete("/api/state/entities/acme/doomed");
    assert_error(status, &body, 404, "");
}

#[test]
fn delete_unknown_is_404() {
    let s = Server::start();
    let (status, body) = s.delete("/api/state/entities/acme/never-was");
    assert_error(status, &body, 404, "");
    let (status, body) = s.delete("/api/state/entities/acme%2Fnever-was");
    assert_error(status, &body, 404, "");
}

#[test]
fn delete_with_encoded_slashes() {
    let s = Server::start();
    s.put("acme/site-3/pump-01", json!({"v": 1}));
    let (status, body) = s.delete("/api/state/entities/acme%2Fsite-3%2Fpump-01");
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["entity_id"], "acme/site-3/pump-01");
    assert_eq!(s.entity("acme/site-3/pump-01").0, 404);
}

#[test]
fn deleted_entity_can_be_recreated() {
    let s = Server::start();
    s.put("acme/phoenix", json!({"old": 1}));
    assert_eq!(s.delete("/api/state/entities/acme/phoenix").0, 200);
    s.put("acme/phoenix", json!({"new": 2}));
    assert_eq!(s.props("acme/phoenix"), json!({"new": 2}));
}

#[test]
fn single_delete_appears_in_history() {
    let s = Server::start();
    s.put("acme/hist-del", json!({"v": 1}));
    let (status, body) = s.delete("/api/state/entities/acme/hist-del");
    assert_eq!(status, 200, "{body}");
    let hist = s.history("acme/hist-del", "");
    assert_eq!(hist.len(), 2, "{hist:?}");
    assert_eq!(
        hist[0]["eventId"], body["eventId"],
        "newest history entry is the delete"
    );
}

// ------------------------------------------------------------------ batch delete

fn batch_delete(s: &Server, body: &Value) -> (u16, Value) {
    s.post("/api/state/entities/delete", body)
}

fn seed(s: &Server, ids: &[&str]) {
    let events: Vec<Value> = ids.iter().map(|id| event(id, json!({"v": 1}))).collect();
    let (status, body) = s.post("/api/events/batch", &Value::Array(events));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["failed"], 0, "{body}");
}

#[test]
fn batch_delete_by_namespace() {
    let s = Server::start();
    seed(
        &s,
        &["acme/a", "acme/b", "acme/site/c", "acme2/d", "other/e"],
    );
    let (status, body) = batch_delete(&s, &json!({"namespace": "acme"}));
    assert_eq!(status, 200, "{body}");
    // Exactly SPEC's reply, key for key.
    assert_eq!(body, json!({"deleted": 3, "failed": 0, "errors": []}));
    assert_eq!(
        s.list_ids(""),
        vec!["acme2/d".to_string(), "other/e".to_string()]
    );
    // Nothing left: deleting again deletes nothing.
    let (status, body) = batch_delete(&s, &json!({"namespace": "acme"}));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["deleted"], 0, "{body}");
}

#[test]
fn batch_delete_by_prefix() {
    let s = Server::start();
    seed(
        &s,
        &[
            "acme/tmp-1",
            "acme/tmp-2",
            "acme/tmp-3/x",
            "acme/keep",
            "acme/tm",
            "other/tmp-1",
        ],
    );
    let (status, body) = batch_delete(&s, &json!({"prefix": "acme/tmp-"}));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["deleted"], 3, "{body}");
    assert_eq!(body["failed"], 0, "{body}");
    assert_eq!(
        s.list_ids(""),
        vec![
            "acme/keep".to_string(),
            "acme/tm".to_string(),
            "other/tmp-1".to_string()
        ]
    );
}

#[test]
fn batch_delete_by_ids_with_unknown() {
    let s = Server::start();
    seed(&s, &["acme/a", "acme/b", "acme/c"]);
    let (status, body) = batch_delete(
        &s,
        &json!({"entity_ids": ["acme/a", "acme/ghost-42", "acme/c"]}),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["deleted"], 2, "{body}");
    assert_eq!(body["failed"], 1, "{body}");
    let errors = body["errors"]
        .as_array()
        .unwrap_or_else(|| panic!("errors array: {body}"));
    assert_eq!(errors.len(), 1, "{body}");
    assert!(
        errors[0].to_string().contains("acme/ghost-42"),
        "error does not name the id: {body}"
    );
    assert_eq!(s.list_ids(""), vec!["acme/b".to_string()]);
    assert_eq!(s.entity("acme/a").0, 404);

    // Errors of several kinds come in the order their ids were given, each id once.
    let (status, body) = batch_delete(
        &s,
        &json!({"entity_ids": ["acme/ghost-2", "flux-core/directory", "acme/b", "acme/ghost-1", "acme/ghost-2"]}),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (&body["deleted"], &body["failed"]),
        (&json!(1), &json!(3)),
        "{body}"
    );
    let named: Vec<&str> = body["errors"]
        .as_array()
        .unwrap_or_else(|| panic!("errors array: {body}"))
        .iter()
        .map(|e| e["entity_id"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(
        named,
        ["acme/ghost-2", "flux-core/directory", "acme/ghost-1"],
        "{body}"
    );
}

#[test]
fn batch_delete_needs_exactly_one_filter() {
    let s = Server::start();
    seed(&s, &["acme/a"]);
    for body in [
        json!({}),
        json!({"namespace": "acme", "prefix": "acme/"}),
        json!({"namespace": "acme", "entity_ids": ["acme/a"]}),
        json!({"prefix": "acme/", "entity_ids": ["acme/a"]}),
        json!({"namespace": "acme", "prefix": "acme/", "entity_ids": ["acme/a"]}),
    ] {
        let (status, reply) = batch_delete(&s, &body);
        assert_error(status, &reply, 400, "");
        assert_eq!(s.entity("acme/a").0, 200, "{body} deleted something");
    }
}

#[test]
fn batch_delete_bad_bodies_are_400() {
    let s = Server::start();
    seed(&s, &["acme/a"]);
    for body in [
        "",
        "not json",
        "[]",
        "\"acme\"",
        "null",
        r#"{"entity_ids": "acme/a"}"#,
        r#"{"namespace": 5}"#,
        r#"{"prefix": ["acme/"]}"#,
    ] {
        let r = s.post_raw("/api/state/entities/delete", body.as_bytes());
        assert_eq!(r.status, 400, "{body:?} -> {} {}", r.status, r.text);
        error_message(&r.json());
    }
    assert_eq!(s.entity("acme/a").0, 200);
}

#[test]
fn batch_delete_id_limit() {
    let s = Server::start();
    seed(&s, &["acme/a"]);
    let too_many: Vec<String> = (0..10_001).map(|i| format!("acme/n-{i}")).collect();
    let (status, body) = batch_delete(&s, &json!({"entity_ids": too_many}));
    assert_eq!(status, 400, "{body}");
    let msg = error_message(&body);
    assert!(
        ["10000", "10,000", "max_batch_delete", "limit"]
            .iter()
            .any(|w| msg.contains(w)),
        "error {msg:?} does not name the limit"
    );
    // Exactly at the limit is fine: every id is unknown except one.
    let mut ids: Vec<String> = (0..9_999).map(|i| format!("acme/n-{i}")).collect();
    ids.push("acme/a".into());
    let (status, body) = batch_delete(&s, &json!({"entity_ids": ids}));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["deleted"], 1, "{body}");
    assert_eq!(body["failed"], 9_999, "{body}");
}

#[test]
fn batch_deletes_appear_in_history() {
    let s = Server::start();
    seed(&s, &["acme/h-a", "acme/h-b", "tmp/h-c"]);
    let (status, body) = batch_delete(&s, &json!({"entity_ids": ["acme/h-a"]}));
    assert_eq!(status, 200, "{body}");
    let (status, body) = batch_delete(&s, &json!({"namespace": "acme"}));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["deleted"], 1, "{body}");
    let (status, body) = batch_delete(&s, &json!({"prefix": "tmp/"}));
    assert_eq!(status, 200, "{body}");
    for id in ["acme/h-a", "acme/h-b", "tmp/h-c"] {
        assert_eq!(
            s.history(id, "").len(),
            2,
            "{id}: the delete is not in history"
        );
        assert_eq!(s.entity(id).0, 404);
    }
}

// ------------------------------------------------------------------ directory

#[test]
fn directory_entity_lists_namespaces() {
    let s = Server::start();
    seed(&s, &["dir-alpha/a", "dir-alpha/b", "dir-beta/c"]);
    let found = wait_for(Duration::from_secs(30), || {
        let (status, body) = s.entity("flux-core/directory");
        if status != 200 {
            return None;
        }
        let text = body["properties"].to_string();
        (text.contains("dir-alpha") && text.contains("dir-beta")).then_some(body)
    });
    let body = found.unwrap_or_else(|| {
        panic!(
            "flux-core/directory never listed the namespaces: {:?}",
            s.entity("flux-core/directory")
        )
    });
    assert!(body["lastUpdated"].is_string(), "{body}");
}

/// The directory is built in: it exists from a server's first request on, even on a server
/// that never took a write, and the counts users see (health, the directory's own) leave it
/// out.
#[test]
fn directory_exists_from_the_first_request_and_counts_leave_it_out() {
    let s = Server::start();
    let (status, body) = s.entity("flux-core/directory");
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["properties"]["namespace_count"], 0, "{body}");
    assert_eq!(body["properties"]["entity_count"], 0, "{body}");
    let (status, health) = s.get("/api/health");
    assert_eq!(status, 200, "{health}");
    assert_eq!(
        (&health["entities"], &health["events"]),
        (&json!(0), &json!(0))
    );

    seed(&s, &["count-a/1", "count-a/2", "count-b/3"]);
    let refreshed = wait_for(Duration::from_secs(30), || {
        let (_, body) = s.entity("flux-core/directory");
        (body["properties"]["entity_count"] == 3).then_some(body)
    });
    let body = refreshed.expect("the directory counted the three entities");
    assert_eq!(body["properties"]["namespace_count"], 2, "{body}");
    // The directory itself was written twice by now; neither write nor the entity counts.
    let (_, health) = s.get("/api/health");
    assert_eq!(
        (&health["entities"], &health["events"]),
        (&json!(3), &json!(3))
    );
}

/// A namespace matching more entities than one call may delete (`max_batch_delete`,
/// 10,000): the call deletes 10,000 and says how many remain; the next call takes the rest.
#[test]
fn batch_delete_over_the_limit_reports_what_remains() {
    let s = Server::start();
    for chunk in 0..11 {
        let events: Vec<Value> = (0..1000)
            .map(|i| event(&format!("big/e{:05}", chunk * 1000 + i), json!({"v": 1})))
            .collect();
        let (status, body) = s.post("/api/events/batch", &Value::Array(events));
        assert_eq!((status, &body["failed"]), (200, &json!(0)), "{body}");
    }
    seed(&s, &["bigger/x"]);
    let (status, body) = batch_delete(&s, &json!({"namespace": "big"}));
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (&body["deleted"], &body["remaining"]),
        (&json!(10_000), &json!(1000))
    );
    let (status, body) = batch_delete(&s, &json!({"namespace": "big"}));
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (&body["deleted"], &body["remaining"]),
        (&json!(1000), &Value::Null),
        "`remaining` only when the call stopped at the limit: {body}"
    );
    assert_eq!(
        s.entity("bigger/x").0,
        200,
        "another namespace is untouched"
    );
}

/// A prefix whose first 10,001 ids include a built-in one (`flux-core/directory` under `f`)
/// and more after it: the call skips the built-in, deletes 10,000, and says one remains.
#[test]
fn batch_delete_limit_counts_past_a_skipped_built_in() {
    let s = Server::start();
    for chunk in 0..10 {
        let events: Vec<Value> = (0..1000)
            .map(|i| event(&format!("fa/e{:05}", chunk * 1000 + i), json!({"v": 1})))
            .collect();
        let (status, body) = s.post("/api/events/batch", &Value::Array(events));
        assert_eq!((status, &body["failed"]), (200, &json!(0)), "{body}");
    }
    seed(&s, &["fz/x"]);
    let (status, body) = batch_delete(&s, &json!({"prefix": "f"}));
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (&body["deleted"], &body["remaining"]),
        (&json!(10_000), &json!(1))
    );
    let (status, body) = batch_delete(&s, &json!({"prefix": "f"}));
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (&body["deleted"], &body["remaining"]),
        (&json!(1), &Value::Null),
        "`remaining` only when the call stopped at the limit: {body}"
    );
    assert_eq!(
        s.entity("flux-core/directory").0,
        200,
        "the directory stays"
    );
}
