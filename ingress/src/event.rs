//! Parsing and validating events, and turning valid ones into log records.
//!
//! Each field is captured as raw JSON first and then checked on its own, so every error names
//! the field at fault. Property values stay the exact JSON text received (numbers beyond 64
//! bits, nested objects, `null`), borrowed from the request body until encoded into the record.

use std::borrow::Cow;
use std::fmt;

use flux_engine::{EventFields, RecordBatch};
use serde::Deserialize;
use serde::de::{MapAccess, Visitor};
use serde_json::value::RawValue;

/// Limits of the contract (SPEC "Events").
pub const MAX_STREAM_CHARS: usize = 128;
pub const MAX_SOURCE_BYTES: usize = 256;
pub const MAX_ENTITY_ID_BYTES: usize = 512;
pub const MAX_EVENT_ID_BYTES: usize = 256;
/// Deepest nesting of arrays/objects a property value may have: deeper values are refused, as
/// common JSON clients (serde_json, Python) cannot read them back.
pub const MAX_VALUE_DEPTH: usize = 100;

/// Nesting depth of the JSON text `raw` (0 for scalars), counting only outside strings.
fn nesting_depth(raw: &str) -> usize {
    let (mut depth, mut deepest, mut in_string, mut escaped) = (0usize, 0usize, false, false);
    for &b in raw.as_bytes() {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

#[derive(Deserialize)]
struct RawEvent<'a> {
    #[serde(borrow)]
    stream: Option<&'a RawValue>,
    #[serde(borrow)]
    source: Option<&'a RawValue>,
    #[serde(borrow)]
    timestamp: Option<&'a RawValue>,
    #[serde(borrow)]
    payload: Option<&'a RawValue>,
    #[serde(borrow, rename = "eventId")]
    event_id: Option<&'a RawValue>,
    #[serde(borrow)]
    key: Option<&'a RawValue>,
    #[serde(borrow)]
    schema: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct RawPayload<'a> {
    #[serde(borrow)]
    entity_id: Option<&'a RawValue>,
    #[serde(borrow)]
    properties: Option<&'a RawValue>,
}

/// An object's members in the order sent: `(unescaped name, raw JSON value)`.
pub struct Properties<'a>(pub Vec<(Cow<'a, str>, &'a RawValue)>);

impl<'de: 'a, 'a> Deserialize<'de> for Properties<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct MembersVisitor<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for MembersVisitor<'a> {
            type Value = Properties<'a>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Self::Value, M::Error> {
                let mut members = Vec::with_capacity(map.size_hint().unwrap_or(8));
                while let Some(name) = map.next_key::<Cow<'de, str>>()? {
                    let value: &'de RawValue = map.next_value()?;
                    members.push((name, value));
                }
                Ok(Properties(members))
            }
        }
        deserializer.deserialize_map(MembersVisitor(std::marker::PhantomData))
    }
}

/// A validated event, borrowing from the request body.
pub struct ValidEvent<'a> {
    pub event_id: Cow<'a, str>,
    pub stream: Cow<'a, str>,
    pub source: Cow<'a, str>,
    pub timestamp: i64,
    pub entity_id: Cow<'a, str>,
    pub key: Option<Cow<'a, str>>,
    pub schema: Option<Cow<'a, str>>,
    pub properties: Properties<'a>,
}

impl ValidEvent<'_> {
    /// Encodes the event as one record of `batch`, owned by `shard`.
    pub fn push_to(&self, batch: &mut RecordBatch, shard: u16) {
        let fields = EventFields {
            event_id: &self.event_id,
            stream: &self.stream,
            source: &self.source,
            timestamp: self.timestamp,
            entity_id: &self.entity_id,
            key: self.key.as_deref(),
            schema: self.schema.as_deref(),
        };
        let properties = self
            .properties
            .0
            .iter()
            .map(|(name, value)| (&**name, value.get()));
        batch.push_event(shard, &fields, properties);
    }
}

fn string<'a>(raw: &'a RawValue, field: &str) -> Result<Cow<'a, str>, String> {
    serde_json::from_str::<Cow<'a, str>>(raw.get()).map_err(|_| format!("{field} must be a string"))
}

fn optional_string<'a>(
    raw: Option<&'a RawValue>,
    field: &str,
) -> Result<Option<Cow<'a, str>>, String> {
    raw.map(|raw| string(raw, field)).transpose()
}

/// Checks the `stream` rule: 1–128 chars of `a-z 0-9 . - _`, no leading, trailing or doubled dot.
pub fn check_stream(stream: &str) -> Result<(), String> {
    if stream.is_empty() || stream.len() > MAX_STREAM_CHARS {
        return Err(format!("stream must be 1-{MAX_STREAM_CHARS} characters"));
    }
    if let Some(c) = stream
        .chars()
        .find(|c| !matches!(c, 'a'..='z' | '0'..='9' | '.' | '-' | '_'))
    {
        return Err(format!(
            "stream contains invalid character {c:?}; allowed: a-z 0-9 . - _"
        ));
    }
    if stream.starts_with('.') || stream.ends_with('.') || stream.contains("..") {
        return Err("stream must not start or end with a dot or contain two dots in a row".into());
    }
    Ok(())
}

/// Checks an entity id: non-empty, at most 512 bytes, no control characters.
pub fn check_entity_id(id: &str, field: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err(format!("{field} must not be empty"));
    }
    if id.len() > MAX_ENTITY_ID_BYTES {
        return Err(format!(
            "{field} must be at most {MAX_ENTITY_ID_BYTES} bytes"
        ));
    }
    if id.chars().any(char::is_control) {
        return Err(format!("{field} must not contain control characters"));
    }
    Ok(())
}

/// Validates one event given as raw JSON; `new_event_id` supplies an id when none was sent.
pub fn validate<'a>(
    raw: &'a str,
    new_event_id: impl FnOnce() -> String,
) -> Result<ValidEvent<'a>, String> {
    let event: RawEvent<'a> = match serde_json::from_str(raw) {
        Ok(event) => event,
        Err(e) if e.is_data() => {
            return Err(if raw.trim_start().starts_with('{') {
                format!("invalid event: {e}")
            } else {
                "event must be a JSON object".into()
            });
        }
        Err(e) => return Err(format!("invalid JSON: {e}")),
    };
    let stream = string(event.stream.ok_or("stream is required")?, "stream")?;
    check_stream(&stream)?;
    let source = string(event.source.ok_or("source is required")?, "source")?;
    if source.is_empty() || source.len() > MAX_SOURCE_BYTES {
        return Err(format!(
            "source must be a non-empty string of at most {MAX_SOURCE_BYTES} bytes"
        ));
    }
    let timestamp_raw = event.timestamp.ok_or("timestamp is required")?.get();
    let timestamp: i64 = timestamp_raw
        .parse()
        .map_err(|_| "timestamp must be an integer (Unix epoch milliseconds)".to_string())?;
    if timestamp <= 0 {
        return Err("timestamp must be greater than 0 (Unix epoch milliseconds)".into());
    }
    let payload_raw = event.payload.ok_or("payload is required")?;
    if !payload_raw.get().starts_with('{') {
        return Err("payload must be an object".into());
    }
    let payload: RawPayload<'a> =
        serde_json::from_str(payload_raw.get()).map_err(|e| format!("invalid payload: {e}"))?;
    let entity_id = string(
        payload.entity_id.ok_or("payload.entity_id is required")?,
        "payload.entity_id",
    )?;
    check_entity_id(&entity_id, "payload.entity_id")?;
    let properties_raw = payload.properties.ok_or("payload.properties is required")?;
    if !properties_raw.get().starts_with('{') {
        return Err("payload.properties must be an object".into());
    }
    let properties: Properties<'a> = serde_json::from_str(properties_raw.get())
        .map_err(|e| format!("invalid payload.properties: {e}"))?;
    for (name, value) in &properties.0 {
        if matches!(value.get().as_bytes().first(), Some(b'[' | b'{'))
            && nesting_depth(value.get()) > MAX_VALUE_DEPTH
        {
            return Err(format!(
                "payload.properties.{name} nests deeper than {MAX_VALUE_DEPTH} levels"
            ));
        }
    }
    let event_id = match optional_string(event.event_id, "eventId")? {
        Some(id) if id.is_empty() || id.len() > MAX_EVENT_ID_BYTES => {
            return Err(format!("eventId must be 1-{MAX_EVENT_ID_BYTES} bytes"));
        }
        Some(id) => id,
        None => Cow::Owned(new_event_id()),
    };
    Ok(ValidEvent {
        event_id,
        stream,
        source,
        timestamp,
        entity_id,
        key: optional_string(event.key, "key")?,
        schema: optional_string(event.schema, "schema")?,
        properties,
    })
}

/// Splits a batch body into its events: a JSON array, or `{"events": [...]}`.
pub fn split_batch(body: &str) -> Result<Vec<&RawValue>, String> {
    #[derive(Deserialize)]
    struct Wrapped<'a> {
        #[serde(borrow)]
        events: Option<Vec<&'a RawValue>>,
    }
    const SHAPE: &str = "batch body must be a JSON array of events or {\"events\": [...]}";
    match body.trim_start().as_bytes().first() {
        Some(b'[') => serde_json::from_str(body).map_err(|e| format!("invalid JSON: {e}")),
        Some(b'{') => match serde_json::from_str::<Wrapped<'_>>(body) {
            Ok(Wrapped {
                events: Some(events),
            }) => Ok(events),
            Ok(Wrapped { events: None }) => Err(SHAPE.into()),
            Err(e) if e.is_data() => Err(format!("{SHAPE}: {e}")),
            Err(e) => Err(format!("invalid JSON: {e}")),
        },
        _ => match serde_json::from_str::<serde::de::IgnoredAny>(body) {
            Ok(_) => Err(SHAPE.into()),
            Err(e) => Err(format!("invalid JSON: {e}")),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(raw: &str) -> String {
        validate(raw, || "id".into())
            .err()
            .expect("should be invalid")
    }

    const OK: &str = r#"{"stream":"s","source":"x","timestamp":1,"payload":{"entity_id":"a/b","properties":{"n":123456789012345678901234567890,"o":{"k": [1, null]}}}}"#;

    #[test]
    fn keeps_values_exactly() {
        let event = validate(OK, || "generated".into()).expect("valid");
        assert_eq!(event.event_id, "generated");
        let values: Vec<_> = event
            .properties
            .0
            .iter()
            .map(|(k, v)| (&**k, v.get()))
            .collect();
        assert_eq!(
            values,
            [
                ("n", "123456789012345678901234567890"),
                ("o", "{\"k\": [1, null]}")
            ]
        );
    }

    #[test]
    fn errors_name_the_field() {
        assert!(err(r#"{"source":"x"}"#).contains("stream"));
        assert!(err(&OK.replace(r#""stream":"s""#, r#""stream":"a..b""#)).contains("stream"));
        assert!(err(&OK.replace(r#""stream":"s""#, r#""stream":"A""#)).contains("stream"));
        assert!(err(&OK.replace(r#""timestamp":1"#, r#""timestamp":1.5"#)).contains("timestamp"));
        assert!(err(&OK.replace(r#""timestamp":1"#, r#""timestamp":0"#)).contains("timestamp"));
        assert!(err(&OK.replace(r#""source":"x""#, r#""source":5"#)).contains("source"));
        assert!(
            err(&OK.replace(r#""entity_id":"a/b""#, r#""entity_id":"a\u0001""#))
                .contains("entity_id")
        );
        let array_properties = OK.replace(
            r#""properties":{"n":123456789012345678901234567890,"o":{"k": [1, null]}}"#,
            r#""properties":[1]"#,
        );
        assert!(err(&array_properties).contains("payload.properties must be an object"));
        assert!(err("[1]").contains("object"));
        assert!(err("{").contains("invalid JSON"));
    }

    #[test]
    fn depth_counts_only_outside_strings() {
        assert_eq!(nesting_depth("1"), 0);
        assert_eq!(nesting_depth(r#"{"a":[1,{"b":"[[[["}]}"#), 3);
        assert_eq!(nesting_depth(r#"["\\\"[["]"#), 1);
        let deep = format!("{}{}", "[".repeat(101), "]".repeat(101));
        let raw = OK.replace("123456789012345678901234567890", &deep);
        assert!(err(&raw).contains("payload.properties.n"));
    }

    #[test]
    fn stream_rule() {
        assert!(check_stream(&"a".repeat(128)).is_ok());
        for bad in ["", ".a", "a.", "a..b", "aB", "a b", &"a".repeat(129)] {
            assert!(check_stream(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn batch_shapes() {
        assert_eq!(split_batch("[1, {}]").expect("array").len(), 2);
        assert_eq!(
            split_batch(r#"{"events": [{}]}"#).expect("wrapped").len(),
            1
        );
        assert!(split_batch(r#"{"other": 1}"#).is_err());
        assert!(split_batch("\"x\"").is_err());
        assert!(split_batch("[").expect_err("bad").contains("invalid JSON"));
    }
}
