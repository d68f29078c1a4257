//! Small JSON writing helpers shared by every renderer in the engine.
//! Output is always valid JSON: strings are escaped per RFC 8259; values stored raw are written
//! as they were received (they were validated as JSON when the event was accepted).

/// Whether any byte is a control character, `"` or `\\`. Eight bytes per step: a byte below
/// 0x20, or equal to one of the two, clears to zero under the usual word tricks (exact for a
/// yes/no answer; bytes of 0x80 and above never match).
fn needs_escape(bytes: &[u8]) -> bool {
    const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
    const HIGHS: u64 = u64::from_ne_bytes([0x80; 8]);
    let below = |word: u64, n: u8| word.wrapping_sub(ONES * u64::from(n)) & !word & HIGHS;
    let mut words = bytes.chunks_exact(8);
    for chunk in &mut words {
        let word = u64::from_ne_bytes(chunk.try_into().expect("8 bytes"));
        let quote = word ^ (ONES * u64::from(b'"'));
        let backslash = word ^ (ONES * u64::from(b'\\'));
        if below(word, 0x20) | below(quote, 1) | below(backslash, 1) != 0 {
            return true;
        }
    }
    words
        .remainder()
        .iter()
        .any(|&b| b < 0x20 || b == b'"' || b == b'\\')
}

/// Appends `s` as a quoted, escaped JSON string.
pub fn write_str(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    let bytes = s.as_bytes();
    // Most strings (ids, names, event ids) need no escaping: one scan, one copy.
    if !needs_escape(bytes) {
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
    // Four-digit years only: later times (never an accept time) show as the last millisecond.
    let ms = ms.min(MAX_TIME_MS);
    let secs = ms / 1000;
    let (year, month, day) = civil_date(secs / 86_400);
    let of_day = secs % 86_400;
    let digits = |n: u64, width: usize, at: &mut [u8]| {
        let mut n = n;
        for i in (0..width).rev() {
            at[i] = b'0' + (n % 10) as u8;
            n /= 10;
        }
    };
    let mut text = *b"\"0000-00-00T00:00:00.000Z\"";
    digits(year, 4, &mut text[1..]);
    digits(month, 2, &mut text[6..]);
    digits(day, 2, &mut text[9..]);
    digits(of_day / 3600, 2, &mut text[12..]);
    digits(of_day / 60 % 60, 2, &mut text[15..]);
    digits(of_day % 60, 2, &mut text[18..]);
    digits(ms % 1000, 3, &mut text[21..]);
    out.extend_from_slice(&text);
}

/// 9999-12-31T23:59:59.999Z
const MAX_TIME_MS: u64 = 253_402_300_799_999;

/// The proleptic Gregorian (year, month, day) of `days` after 1970-01-01. Counts in 400-year
/// eras of 146,097 days whose years start on March 1st, so the leap day ends a year.
fn civil_date(days: u64) -> (u64, u64, u64) {
    let shifted = days + 719_468; // days from 0000-03-01 to 1970-01-01
    let era = shifted / 146_097;
    let day_of_era = shifted % 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_from_march + 2) / 5 + 1;
    let month = if month_from_march < 10 {
        month_from_march + 3
    } else {
        month_from_march - 9
    };
    let year = era * 400 + year_of_era + u64::from(month <= 2);
    (year, month, day)
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
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn escape_check_agrees_with_a_byte_by_byte_scan() {
        // Every byte value at every offset of strings long enough for whole words and a tail.
        for len in [1usize, 7, 8, 9, 16, 23] {
            for at in 0..len {
                for b in 0..=255u8 {
                    let mut bytes = vec![b'a'; len];
                    bytes[at] = b;
                    let naive = bytes.iter().any(|&c| c < 0x20 || c == b'"' || c == b'\\');
                    assert_eq!(
                        needs_escape(&bytes),
                        naive,
                        "byte {b:#04x} at {at} of {len}"
                    );
                }
            }
        }
        // Neighbouring bytes must not hide or fake a match (borrows across bytes): every run
        // of four bytes from the values around the edges, inside one word.
        let edges = [
            0x00, 0x01, 0x1f, 0x20, 0x21, 0x22, 0x23, 0x5b, 0x5c, 0x5d, 0x80, 0xff,
        ];
        for &a in &edges {
            for &b in &edges {
                for &c in &edges {
                    for &d in &edges {
                        let mut bytes = vec![b'a'; 8];
                        bytes[2..6].copy_from_slice(&[a, b, c, d]);
                        let naive = bytes.iter().any(|&x| x < 0x20 || x == b'"' || x == b'\\');
                        assert_eq!(needs_escape(&bytes), naive, "{bytes:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn times_match_rfc3339_with_millis() {
        let humantime = |ms: u64| {
            let time = UNIX_EPOCH + Duration::from_millis(ms);
            format!("\"{}\"", humantime::format_rfc3339_millis(time))
        };
        // Epoch, leap days, century rules, year ends, and a spread of instants up to 9999.
        let mut cases = vec![
            0,
            951_782_400_000,     // 2000-02-29
            4_107_456_000_000,   // 2100-02-28
            4_107_542_399_999,   // 2100-02-28T23:59:59.999 (2100 is no leap year)
            1_709_164_800_123,   // 2024-02-29
            1_735_689_599_999,   // 2024-12-31T23:59:59.999
            253_402_300_799_999, // 9999-12-31T23:59:59.999
        ];
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            cases.push(x % 253_402_300_800_000);
        }
        for ms in cases {
            let mut out = Vec::new();
            write_time_ms(&mut out, ms);
            assert_eq!(String::from_utf8(out).unwrap(), humantime(ms), "at {ms} ms");
        }
        let mut out = Vec::new();
        write_time_ms(&mut out, u64::MAX);
        assert_eq!(out, b"\"9999-12-31T23:59:59.999Z\"");
    }

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
