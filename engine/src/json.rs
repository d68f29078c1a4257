//! Small JSON writing helpers shared by every renderer in the engine.
//! Output is always valid JSON: strings are escaped per RFC 8259; values stored raw are written
//! as they were received (they were validated as JSON when the event was accepted).

use std::time::{Duration, UNIX_EPOCH};

/// Appends `s` as a quoted, escaped JSON string.
pub fn write_str(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    let bytes = s.as_bytes();
    // Most strings (ids, names, event ids) need no escaping: one scan, one copy.
    if !bytes.iter().any(|&b| b < 0x20 || b == b'"' || b == b'\\') {
        out.extend_from_slice(bytes);
        out.push(b'"');
        return;
    }
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let escape: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x00..=0x1f => {
                out.extend_from_slice(&bytes[start..i]);
                const HEX: &[u8; 16] = b"0123456789abcdef";
                out.extend_from_slice(b"\\u00");
                out.push(HEX[(b >> 4) as usize]);
                out.push(HEX[(b & 0xf) as usize]);
                start = i + 1;
                continue;
            }
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        out.extend_from_slice(escape);
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

/// Appends `{"name":value,...}` from `(name, raw JSON value)` pairs; values are written as
/// they are (they were validated as JSON when their event was accepted).
pub fn write_object<'a>(out: &mut Vec<u8>, members: impl Iterator<Item = (&'a str, &'a str)>) {
    out.push(b'{');
    for (i, (name, value)) in members.enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_str(out, name);
        out.push(b':');
        out.extend_from_slice(value.as_bytes());
    }
    out.push(b'}');
}

/// Appends a millisecond Unix time as a quoted ISO-8601 UTC string (`"2026-02-23T10:30:45.123Z"`).
pub fn write_time_ms(out: &mut Vec<u8>, ms: u64) {
    use std::io::Write;
    let time = UNIX_EPOCH + Duration::from_millis(ms);
    // Writing into a Vec cannot fail.
    let _ = write!(out, "\"{}\"", humantime::format_rfc3339_millis(time));
}

/// Appends an unsigned integer in decimal.
pub fn write_u64(out: &mut Vec<u8>, n: u64) {
    use std::io::Write;
    let _ = write!(out, "{n}");
}

/// Appends a finite float in decimal (non-finite values as 0, which JSON cannot express).
pub fn write_f64(out: &mut Vec<u8>, n: f64) {
    use std::io::Write;
    let n = if n.is_finite() { n } else { 0.0 };
    let _ = write!(out, "{n}");
}

/// Appends a signed integer in decimal.
pub fn write_i64(out: &mut Vec<u8>, n: i64) {
    use std::io::Write;
    let _ = write!(out, "{n}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_round_trip_through_serde() {
        for s in [
            "plain",
            "quote\"back\\slash",
            "ctl\u{1}\n\t",
            "ünï/cödé",
            "",
        ] {
            let mut out = Vec::new();
            write_str(&mut out, s);
            let back: String = serde_json::from_slice(&out).expect("valid JSON string");
            assert_eq!(back, s);
        }
    }

    #[test]
    fn time_has_millis_and_z() {
        let mut out = Vec::new();
        write_time_ms(&mut out, 1_771_842_645_123);
        assert_eq!(out, b"\"2026-02-23T10:30:45.123Z\"");
    }
}
