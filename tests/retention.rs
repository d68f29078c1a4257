//! Retention: whole log segments are dropped once a snapshot covers them and they are older
//! than `--retention`; state survives, history older than retention goes, and a restart after
//! compaction still recovers everything (snapshot + remaining tail).

mod util;

use std::fs;
use std::time::Duration;

use serde_json::json;
use util::{Options, Server, wait_for};

fn segment_count(server: &Server) -> usize {
    fs::read_dir(server.data_dir().join("log"))
        .expect("log dir")
        .filter(|e| {
            e.as_ref()
                .is_ok_and(|e| e.path().extension().is_some_and(|x| x == "seg"))
        })
        .count()
}

#[test]
fn old_segments_are_dropped_once_snapshotted_and_state_survives() {
    let args = [
        "--retention",
        "1s",
        "--segment-bytes",
        "4096",
        "--snapshot-interval",
        "200ms",
    ];
    let mut server = Server::start_with(Options {
        args: args.iter().map(|s| s.to_string()).collect(),
        ..Options::default()
    });
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
