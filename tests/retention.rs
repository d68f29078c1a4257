//! Retention: whole log segments are dropped once a snapshot covers them and they are older
//! than `--retention`; state survives, history older than retention goes, and a restart after
//! compaction still recovers everything (snapshot + remaining tail).

mod util;

use std::fs;
use std::time::Duration;

use serde_json::json;
use util::{Options, Server, wait_for};

/// The torn tails kept beside the log's segments (`<segment>.torn-<offset>`).
fn torn_tails(server: &Server) -> Vec<String> {
    fs::read_dir(server.data_dir().join("log"))
        .expect("log dir")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|name| name.contains(".torn-"))
        .collect()
}

fn segment_count(server: &Server) -> usize {
    fs::read_dir(server.data_dir().join("log"))
        .expect("log dir")
        .filter(|e| {
            e.as_ref()
                .is_ok_and(|e| e.path().extension().is_some_and(|x| x == "seg"))
        })
        .count()
}

/// A server that rolls its log every 4 KiB, snapshots every 200 ms and keeps 1 s of history:
/// segments go soon after they are written.
fn compacting_server(options: Options) -> Server {
    compacting_server_with(options, &[])
}

/// [`compacting_server`] with more flags.
fn compacting_server_with(options: Options, more: &[&str]) -> Server {
    let args = [
        "--retention",
        "1s",
        "--segment-bytes",
        "4096",
        "--snapshot-interval",
        "200ms",
    ];
    Server::start_with(Options {
        args: args.iter().chain(more).map(|s| s.to_string()).collect(),
        ..options
    })
}

#[test]
fn old_segments_are_dropped_once_snapshotted_and_state_survives() {
    let mut server = compacting_server(Options::default());
    for i in 0..120 {
        server.put(
            &format!("ret/dev-{}", i % 10),
            json!({"i": i, "pad": "x".repeat(100)}),
        );
    }
    let grown = segment_count(&server);
    assert!(grown > 3, "expected several segments, found {grown}");
    // Snapshots every 200 ms; after the 1 s retention passes, old segments go.
    let shrunk = wait_for(Duration::from_secs(15), || {
        let n = segment_count(&server);
        (n < grown).then_some(n)
    });
    assert!(
        shrunk.is_some(),
        "segments were never compacted ({grown} remain)"
    );

    // Current state is intact; history of the oldest events is gone with their segments.
    assert_eq!(server.props("ret/dev-9")["i"], 119);
    let history = server.history("ret/dev-0", "&since=0");
    assert!(
        history.len() < 12,
        "old history should be gone: {} events",
        history.len()
    );
    // What remains is the newest part of the entity's history, newest first, with no holes.
    let kept: Vec<i64> = history
        .iter()
        .map(|e| e["payload"]["properties"]["i"].as_i64().expect("i"))
        .collect();
    let newest: Vec<i64> = (0..12).rev().map(|k| k * 10).take(kept.len()).collect();
    assert_eq!(kept, newest);

    server.kill9();
    server.restart();
    assert_eq!(server.props("ret/dev-9")["i"], 119);
    assert_eq!(server.list_ids("?prefix=ret/").len(), 10);
    server.put("ret/dev-0", json!({"after": true}));
    assert_eq!(server.props("ret/dev-0")["after"], true);
}

/// A torn tail cut on start is kept beside its segment for inspection, and goes with the
/// segment when retention drops it: crashes do not leave files behind forever.
#[test]
fn a_torn_tail_kept_at_start_goes_with_its_segment() {
    let mut server = compacting_server(Options::local_only());
    server.put("torn/a", json!({"v": 1}));
    server.kill9();
    // What a write cut short by the crash leaves: bytes that are no frame.
    let newest = fs::read_dir(server.data_dir().join("log"))
        .expect("log dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .max()
        .expect("a segment");
    let mut bytes = fs::read(&newest).expect("segment");
    bytes.extend_from_slice(b"\x07\x00\x00\x00torn write");
    fs::write(&newest, bytes).expect("append");
    server.restart();
    assert_eq!(server.props("torn/a")["v"], 1);
    assert_eq!(torn_tails(&server).len(), 1, "the cut bytes are kept");
    // Enough writes to roll past that segment; once snapshotted and older than 1 s it goes.
    for i in 0..120 {
        server.put(
            &format!("torn/dev-{}", i % 10),
            json!({"i": i, "pad": "x".repeat(100)}),
        );
    }
    let gone = wait_for(Duration::from_secs(15), || {
        torn_tails(&server).is_empty().then_some(())
    });
    assert!(gone.is_some(), "left behind: {:?}", torn_tails(&server));
    assert_eq!(server.props("torn/dev-9")["i"], 119);
}

/// The `flux_deleted_entity_ids` gauge from `/metrics`.
fn deleted_ids_held(server: &Server) -> u64 {
    let (status, text) = server.get_text("/metrics");
    assert_eq!(status, 200, "{text}");
    text.lines()
        .find_map(|l| l.strip_prefix("flux_deleted_entity_ids "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no flux_deleted_entity_ids in:\n{text}"))
}

/// Deleted entities are held (id and history) only while the log holds their records: once
/// retention drops those segments they are forgotten, even when nothing is written after (a
/// churn of short-lived ids must not keep its memory for good).
#[test]
fn deleted_ids_are_forgotten_once_retention_drops_their_records() {
    // No directory refresh writes after the churn: nothing but the timers runs.
    let server = compacting_server_with(Options::local_only(), &["--directory-interval", "1h"]);
    for batch in 0..4 {
        let events: Vec<_> = (0..500)
            .map(|i| util::event(&format!("churn/{batch}-{i}"), json!({"v": i})))
            .collect();
        let (status, body) = server.post("/api/events/batch", &json!(events));
        assert_eq!((status, &body["failed"]), (200, &json!(0)), "{body}");
    }
    let (status, body) = server.post("/api/state/entities/delete", &json!({"prefix": "churn/"}));
    assert_eq!((status, &body["deleted"]), (200, &json!(2000)), "{body}");
    // Their delete records are younger than the 1 s retention: held (all of them unless this
    // machine paused for a second right here).
    let held = deleted_ids_held(&server);
    assert!((1..=2000).contains(&held), "{held} deleted ids held");
    // Roll past the segment holding the deletes, so retention can drop it too.
    for i in 0..40 {
        server.put("kept/a", json!({"i": i, "pad": "x".repeat(100)}));
    }
    let forgotten = wait_for(Duration::from_secs(15), || {
        (deleted_ids_held(&server) == 0).then_some(())
    });
    assert!(
        forgotten.is_some(),
        "{} deleted ids still held after retention",
        deleted_ids_held(&server)
    );
    assert_eq!(server.list_ids("?prefix=churn/").len(), 0);
    assert_eq!(server.props("kept/a")["i"], 39);
}
