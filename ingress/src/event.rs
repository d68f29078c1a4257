//! Parsing and validating events, and turning valid ones into log records.
//!
//! Each field is captured as raw JSON first and then checked on its own, so every error names
//! the field at fault. Property values stay the exact JSON text received (numbers beyond 64
//! bits, nested objects, `null`), borrowed from the request body until encoded into the record.

use std::borrow::Cow;
use std::fmt;

use flux_engine::record::EventId;
use flux_engine::{EventFields, RecordBatch};
use serde::Deserialize;
use serde::de::{IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;

use crate::scan;

/// Limits of the contract (SPEC "Events").
pub const MAX_STREAM_CHARS: usize = 128;
pub const MAX_SOURCE_BYTES: usize = 256;
pub use flux_engine::entity::{MAX_ENTITY_ID_BYTES, check_entity_id};
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

/// An object's members in the order sent: `(unescaped name, raw JSON value)`.
#[derive(Debug, PartialEq)]
pub struct Properties<'a>(pub Vec<(Cow<'a, str>, &'a str)>);

/// An event's id: as the client sent it, or generated here (a UUIDv7, kept as its bytes until
/// a reply renders it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ValidId<'a> {
    Sent(Cow<'a, str>),
    Generated([u8; 16]),
}

impl ValidId<'_> {
    /// The id as a record stores it.
    pub fn as_event_id(&self) -> EventId<'_> {
        match self {
            ValidId::Sent(text) => EventId::Text(text),
            ValidId::Generated(bytes) => EventId::Uuid(*bytes),
        }
    }
}

/// A validated event, borrowing from the request body.
pub struct ValidEvent<'a> {
    pub event_id: ValidId<'a>,
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
            event_id: self.event_id.as_event_id(),
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
            .map(|(name, value)| (&**name, *value));
        batch.push_event(shard, &fields, properties);
    }
}

/// Checks the `stream` rule: 1–128 chars of `a-z 0-9 . - _`, no leading, trailing or doubled dot.
pub fn check_stream(stream: &str) -> Result<(), String> {
    if stream.is_empty() || stream.len() > MAX_STREAM_CHARS {
        return Err(format!("stream must be 1-{MAX_STREAM_CHARS} characters"));
    }
    // One pass over the bytes for the usual name; the rules below word what is wrong.
    let bytes = stream.as_bytes();
    let allowed = |b: &u8| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.');
    if bytes.iter().all(allowed)
        && bytes[0] != b'.'
        && bytes[bytes.len() - 1] != b'.'
        && !bytes.windows(2).any(|pair| pair == b"..")
    {
        return Ok(());
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

/// A value read without failing on its type: parsing records what was there and validation
/// afterwards names the field at fault.
#[derive(Debug, PartialEq)]
pub enum Loose<'a> {
    Str(Cow<'a, str>),
    Int(i64),
    Null,
    Other,
}

impl<'de: 'a, 'a> Deserialize<'de> for Loose<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct LooseVisitor<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for LooseVisitor<'a> {
            type Value = Loose<'a>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Loose::Str(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Loose::Str(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
                Ok(Loose::Str(Cow::Owned(v)))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
                Ok(Loose::Int(v))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
                Ok(i64::try_from(v).map_or(Loose::Other, Loose::Int))
            }
            fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
                Ok(Loose::Other)
            }
            fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
                Ok(Loose::Other)
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(Loose::Null)
            }
            fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Self::Value, M::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Loose::Other)
            }
            fn visit_seq<S: SeqAccess<'de>>(self, mut seq: S) -> Result<Self::Value, S::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Loose::Other)
            }
        }
        deserializer.deserialize_any(LooseVisitor(std::marker::PhantomData))
    }
}

/// An object member's name: borrowed from the body unless it held escapes. serde's own
/// `Deserialize` for `Cow<str>` always copies, which cost one allocation per key.
struct Name<'a>(Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for Name<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct NameVisitor<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for NameVisitor<'a> {
            type Value = Name<'a>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a member name")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Name(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Name(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
                Ok(Name(Cow::Owned(v)))
            }
        }
        deserializer.deserialize_str(NameVisitor(std::marker::PhantomData))
    }
}

/// The `Visitor` methods of a loose reader for the JSON values it does not look into (arrays,
/// strings, numbers, booleans): each yields `$other`; an array is read through and dropped.
macro_rules! other_values_are {
    ($de:lifetime, $other:expr) => {
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("any JSON value")
        }
        fn visit_seq<S: SeqAccess<$de>>(self, mut seq: S) -> Result<Self::Value, S::Error> {
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            Ok($other)
        }
        fn visit_borrowed_str<E>(self, _: &$de str) -> Result<Self::Value, E> {
            Ok($other)
        }
        fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
            Ok($other)
        }
        fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
            Ok($other)
        }
        fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
            Ok($other)
        }
        fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
            Ok($other)
        }
        fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
            Ok($other)
        }
    };
}

/// `payload` as read: an object's two fields, or something else.
#[derive(Debug, PartialEq)]
pub enum LoosePayload<'a> {
    Object {
        entity_id: Option<Loose<'a>>,
        properties: Option<Loose<'a>>,
        members: Option<Properties<'a>>,
    },
    Null,
    Other,
}

impl<'de: 'a, 'a> Deserialize<'de> for LoosePayload<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct PayloadVisitor<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for PayloadVisitor<'a> {
            type Value = LoosePayload<'a>;
            other_values_are!('de, LoosePayload::Other);
            fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Self::Value, M::Error> {
                let (mut entity_id, mut properties, mut members) = (None, None, None);
                while let Some(Name(key)) = map.next_key()? {
                    match &*key {
                        "entity_id" => entity_id = Some(map.next_value()?),
                        "properties" => match map.next_value::<LooseProperties<'a>>()? {
                            LooseProperties::Object(m) => {
                                members = Some(m);
                                properties = None;
                            }
                            LooseProperties::Not(value) => {
                                members = None;
                                properties = Some(value);
                            }
                        },
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(LoosePayload::Object {
                    entity_id,
                    properties,
                    members,
                })
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(LoosePayload::Null)
            }
        }
        deserializer.deserialize_any(PayloadVisitor(std::marker::PhantomData))
    }
}

/// `payload.properties` as read: the members of an object, or whatever else was there.
enum LooseProperties<'a> {
    Object(Properties<'a>),
    Not(Loose<'a>),
}

impl<'de: 'a, 'a> Deserialize<'de> for LooseProperties<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        // An object is the common case; anything else is read loosely for the error message.
        struct PropertiesVisitor<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for PropertiesVisitor<'a> {
            type Value = LooseProperties<'a>;
            other_values_are!('de, LooseProperties::Not(Loose::Other));
            fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Self::Value, M::Error> {
                let mut members = Vec::with_capacity(map.size_hint().unwrap_or(8));
                while let Some(Name(name)) = map.next_key()? {
                    let value: &'de RawValue = map.next_value()?;
                    members.push((name, value.get()));
                }
                Ok(LooseProperties::Object(Properties(members)))
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(LooseProperties::Not(Loose::Null))
            }
        }
        deserializer.deserialize_any(PropertiesVisitor(std::marker::PhantomData))
    }
}

/// One event as read in a single pass over the JSON, before validation.
#[derive(Debug, PartialEq)]
pub enum LooseEvent<'a> {
    Object(Box<EventParts<'a>>),
    /// Not a JSON object.
    Other,
}

/// The fields of an event object, each as read.
#[derive(Debug, Default, PartialEq)]
pub struct EventParts<'a> {
    pub(crate) stream: Option<Loose<'a>>,
    pub(crate) source: Option<Loose<'a>>,
    pub(crate) timestamp: Option<Loose<'a>>,
    pub(crate) payload: Option<LoosePayload<'a>>,
    pub(crate) event_id: Option<Loose<'a>>,
    pub(crate) key: Option<Loose<'a>>,
    pub(crate) schema: Option<Loose<'a>>,
}

impl<'a> EventParts<'a> {
    /// Where the event field `name` goes when it holds a string or an integer (`payload` and
    /// unknown members have none).
    pub(crate) fn field(&mut self, name: &str) -> Option<&mut Option<Loose<'a>>> {
        Some(match name {
            "stream" => &mut self.stream,
            "source" => &mut self.source,
            "timestamp" => &mut self.timestamp,
            "eventId" => &mut self.event_id,
            "key" => &mut self.key,
            "schema" => &mut self.schema,
            _ => return None,
        })
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for LooseEvent<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct EventVisitor<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for EventVisitor<'a> {
            type Value = LooseEvent<'a>;
            other_values_are!('de, LooseEvent::Other);
            fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Self::Value, M::Error> {
                let mut parts = EventParts::default();
                while let Some(Name(key)) = map.next_key()? {
                    if key == "payload" {
                        parts.payload = Some(map.next_value()?);
                    } else if let Some(slot) = parts.field(&key) {
                        *slot = Some(map.next_value()?);
                    } else {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
                Ok(LooseEvent::Object(Box::new(parts)))
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(LooseEvent::Other)
            }
        }
        deserializer.deserialize_any(EventVisitor(std::marker::PhantomData))
    }
}

/// A required string field: present, a string.
fn required_str<'a>(value: Option<Loose<'a>>, field: &str) -> Result<Cow<'a, str>, String> {
    match value {
        None | Some(Loose::Null) => Err(format!("{field} is required")),
        Some(Loose::Str(s)) => Ok(s),
        Some(_) => Err(format!("{field} must be a string")),
    }
}

/// An optional string field: absent or null, or a string.
fn optional_str<'a>(value: Option<Loose<'a>>, field: &str) -> Result<Option<Cow<'a, str>>, String> {
    match value {
        None | Some(Loose::Null) => Ok(None),
        Some(Loose::Str(s)) => Ok(Some(s)),
        Some(_) => Err(format!("{field} must be a string")),
    }
}

/// Validates one event read by the parser; `new_event_id` supplies an id when none was sent.
pub fn finish<'a>(
    event: LooseEvent<'a>,
    new_event_id: impl FnOnce() -> [u8; 16],
) -> Result<ValidEvent<'a>, String> {
    let LooseEvent::Object(parts) = event else {
        return Err("event must be a JSON object".into());
    };
    let parts = *parts;
    let stream = required_str(parts.stream, "stream")?;
    check_stream(&stream)?;
    let source = required_str(parts.source, "source")?;
    if source.is_empty() || source.len() > MAX_SOURCE_BYTES {
        return Err(format!(
            "source must be a non-empty string of at most {MAX_SOURCE_BYTES} bytes"
        ));
    }
    let timestamp = match parts.timestamp {
        None | Some(Loose::Null) => return Err("timestamp is required".into()),
        Some(Loose::Int(n)) => n,
        Some(_) => {
            return Err(format!(
                "timestamp must be an integer from 1 to {} (Unix epoch milliseconds)",
                i64::MAX
            ));
        }
    };
    if timestamp <= 0 {
        return Err("timestamp must be greater than 0 (Unix epoch milliseconds)".into());
    }
    let (entity_id, properties, members) = match parts.payload {
        None | Some(LoosePayload::Null) => return Err("payload is required".into()),
        Some(LoosePayload::Other) => return Err("payload must be an object".into()),
        Some(LoosePayload::Object {
            entity_id,
            properties,
            members,
        }) => (entity_id, properties, members),
    };
    let entity_id = required_str(entity_id, "payload.entity_id")?;
    check_entity_id(&entity_id, "payload.entity_id")?;
    let properties = match (members, properties) {
        (Some(members), _) => members,
        (None, None | Some(Loose::Null)) => return Err("payload.properties is required".into()),
        (None, Some(_)) => return Err("payload.properties must be an object".into()),
    };
    for (name, value) in &properties.0 {
        // Nesting deeper than the limit takes more than twice as many brackets: shorter values
        // (nearly all) need no walk.
        if value.len() > 2 * MAX_VALUE_DEPTH
            && matches!(value.as_bytes().first(), Some(b'[' | b'{'))
            && nesting_depth(value) > MAX_VALUE_DEPTH
        {
            return Err(format!(
                "payload.properties.{name} nests deeper than {MAX_VALUE_DEPTH} levels"
            ));
        }
    }
    let event_id = match optional_str(parts.event_id, "eventId")? {
        Some(id) if id.is_empty() || id.len() > MAX_EVENT_ID_BYTES => {
            return Err(format!("eventId must be 1-{MAX_EVENT_ID_BYTES} bytes"));
        }
        Some(id) => ValidId::Sent(id),
        None => ValidId::Generated(new_event_id()),
    };
    Ok(ValidEvent {
        event_id,
        stream,
        source,
        timestamp,
        entity_id,
        key: optional_str(parts.key, "key")?,
        schema: optional_str(parts.schema, "schema")?,
        properties,
    })
}

/// Validates one event given as JSON text, in one pass over it.
pub fn validate<'a>(
    raw: &'a str,
    new_event_id: impl FnOnce() -> [u8; 16],
) -> Result<ValidEvent<'a>, String> {
    let event = match scan::event(raw) {
        Some(event) => event,
        None => serde_event(raw)?,
    };
    finish(event, new_event_id)
}

/// Reads one event with serde: the reference reader, used when [`scan::event`] declines.
pub fn serde_event(raw: &str) -> Result<LooseEvent<'_>, String> {
    serde_json::from_str(raw).map_err(|e| format!("invalid JSON: {e}"))
}

/// Reads a batch body — a JSON array of events, or `{"events": [...]}` — in one pass. Each
/// element is read loosely, so a bad event fails alone (see [`finish`]); invalid JSON or another
/// shape fails the whole body. The scanner reads the common shapes; serde reads the rest.
pub fn parse_batch(body: &str) -> Result<Vec<LooseEvent<'_>>, String> {
    match scan::batch(body) {
        Some(events) => Ok(events),
        None => serde_batch(body),
    }
}

/// Reads a batch body with serde: the reference reader, used when [`scan::batch`] declines.
pub fn serde_batch(body: &str) -> Result<Vec<LooseEvent<'_>>, String> {
    #[derive(Deserialize)]
    struct Wrapped<'a> {
        #[serde(borrow)]
        events: Option<Vec<LooseEvent<'a>>>,
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
        validate(raw, || [7; 16]).err().expect("should be invalid")
    }

    const OK: &str = r#"{"stream":"s","source":"x","timestamp":1,"payload":{"entity_id":"a/b","properties":{"n":123456789012345678901234567890,"o":{"k": [1, null]}}}}"#;

    #[test]
    fn keeps_values_exactly() {
        let event = validate(OK, || [9; 16]).expect("valid");
        assert_eq!(event.event_id, ValidId::Generated([9; 16]));
        let values: Vec<_> = event.properties.0.iter().map(|(k, v)| (&**k, *v)).collect();
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
    fn entity_id_control_characters_are_found_by_byte() {
        for c in (0..0x300u32)
            .chain([0x2028, 0xFEFF, 0x1F600])
            .filter_map(char::from_u32)
        {
            let id = format!("a{c}b");
            assert_eq!(
                check_entity_id(&id, "id").is_err(),
                c.is_control(),
                "U+{:04X}",
                u32::from(c)
            );
        }
    }

    #[test]
    fn stream_rule() {
        assert!(check_stream(&"a".repeat(128)).is_ok());
        for good in ["a", "a.b", "sensors.temp-2_x.9", "_", "-"] {
            assert!(check_stream(good).is_ok(), "{good:?}");
        }
        for bad in [
            "",
            ".a",
            "a.",
            "a..b",
            "aB",
            "a b",
            "é",
            "a.",
            ".",
            &"a".repeat(129),
        ] {
            assert!(check_stream(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn batch_shapes_and_per_item_errors() {
        let body = format!("[1, {{}}, {OK}]");
        let items = parse_batch(&body).expect("array");
        let results: Vec<_> = items
            .into_iter()
            .map(|e| finish(e, || [7; 16]).err())
            .collect();
        assert_eq!(results[0].as_deref(), Some("event must be a JSON object"));
        assert_eq!(results[1].as_deref(), Some("stream is required"));
        assert_eq!(results[2], None);
        assert_eq!(
            parse_batch(r#"{"events": [{}], "x": 1}"#)
                .expect("wrapped")
                .len(),
            1
        );
        assert!(parse_batch(r#"{"other": 1}"#).is_err());
        assert!(parse_batch(r#"{"events": 5}"#).is_err());
        assert!(parse_batch("\"x\"").is_err());
        assert!(matches!(parse_batch("["), Err(e) if e.contains("invalid JSON")));
    }

    #[test]
    fn null_fields_read_as_absent_and_wrong_types_are_named() {
        let null_stream = OK.replace(r#""stream":"s""#, r#""stream":null"#);
        assert_eq!(err(&null_stream), "stream is required");
        let null_key = OK.replace(r#""stream":"s""#, r#""stream":"s","key":null"#);
        assert!(
            validate(&null_key, || [7; 16])
                .expect("valid")
                .key
                .is_none()
        );
        let numeric_key = OK.replace(r#""stream":"s""#, r#""stream":"s","key":5"#);
        assert_eq!(err(&numeric_key), "key must be a string");
        let big = OK.replace(r#""timestamp":1"#, r#""timestamp":99999999999999999999"#);
        assert!(err(&big).contains("timestamp must be an integer from 1 to 9223372036854775807"));
        let null_payload = OK.replace(r#""stream":"s""#, r#""payload":null,"stream":"s""#);
        assert!(
            validate(&null_payload, || [7; 16]).is_ok(),
            "a later payload wins"
        );
        assert_eq!(
            err(r#"{"stream":"s","source":"x","timestamp":1,"payload":7}"#),
            "payload must be an object"
        );
        let escaped = OK.replace("a/b", r"a\/b\u00e9");
        assert_eq!(
            validate(&escaped, || [7; 16]).expect("valid").entity_id,
            "a/bé"
        );
    }
}
