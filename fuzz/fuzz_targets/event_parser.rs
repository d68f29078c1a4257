//! Fuzzes the HTTP event parser: any body must yield a valid event or an error, never a panic;
//! whatever the fast scanner reads must equal what the serde reader reads; and a valid event
//! must encode into a record that decodes back to the same fields.
#![no_main]

use flux_engine::RecordBatch;
use flux_engine::record::{FrameRead, decode_frame, encode_frame};
use flux_ingress::event::{finish, parse_batch, serde_batch, serde_event, validate};
use flux_ingress::scan;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Some(fast) = scan::batch(text) {
        assert_eq!(Ok(&fast), serde_batch(text).as_ref());
    }
    if let Some(fast) = scan::event(text) {
        assert_eq!(Ok(&fast), serde_event(text).as_ref());
    }
    let mut batch = RecordBatch::default();
    let mut expected = Vec::new();
    let valid: Vec<_> = match parse_batch(text) {
        Ok(items) => items.into_iter().filter_map(|e| finish(e, || [7; 16]).ok()).collect(),
        Err(_) => validate(text, || [7; 16]).into_iter().collect(),
    };
    for event in valid {
        event.push_to(&mut batch, 0);
        let id = event.event_id.as_event_id().to_string();
        expected.push((event.entity_id.to_string(), event.properties.0.len(), id));
    }
    if batch.is_empty() {
        return;
    }
    let mut out = Vec::new();
    encode_frame(&mut out, 1, 1, &batch);
    let Ok(FrameRead::Frame(frame, _)) = decode_frame(&out) else {
        panic!("an encoded frame must decode");
    };
    for (i, (entity_id, properties, id)) in expected.iter().enumerate() {
        let record = frame.record(i).expect("record decodes");
        assert_eq!(record.fields.entity_id, entity_id);
        assert_eq!(record.properties().count(), *properties);
        assert_eq!(record.fields.event_id.to_string(), *id);
    }
});
