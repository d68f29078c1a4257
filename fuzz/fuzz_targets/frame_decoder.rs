//! Fuzzes the log's frame decoder with arbitrary bytes (what a damaged disk can hold): it must
//! return a frame, "incomplete" or an error, never panic, and every record of an accepted frame
//! must decode.
#![no_main]

use flux_engine::record::{FrameRead, decode_frame};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(FrameRead::Frame(frame, used)) = decode_frame(data) {
        assert!(used <= data.len());
        // As shards decode records: the properties taken from the decoding walk.
        let mut properties = Vec::new();
        for i in 0..frame.len() {
            let record = frame
                .record_into(i, &mut properties)
                .expect("records of an accepted frame decode");
            assert_eq!(record.properties().count(), properties.len());
        }
    }
});
