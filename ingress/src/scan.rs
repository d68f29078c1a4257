//! The fast path of event parsing: one pass over the body for the shape nearly every event
//! has, without serde's visitor calls.
//!
//! [`batch`] and [`event`] read the same [`LooseEvent`]s as the serde readers in
//! [`crate::event`] ([`crate::event::serde_batch`], [`crate::event::serde_event`]). They decline
//! (return `None`) whatever they do not read themselves, and the caller then reads the whole
//! text with serde, which also words every error. They decline:
//! - anything that is not valid JSON;
//! - a backslash escape or a control character in a member name or in a string an event field
//!   holds (property values and ignored members may hold any valid escape);
//! - a number in an event field (`timestamp`, `stream`, ...) that is not an integer of at most
//!   64 bits, `-0` aside;
//! - an object or array where an event field expects a string or an integer, `properties` or
//!   `payload` that is neither an object nor `null`, a batch element that is not an object;
//! - values nested deeper than [`MAX_SKIP_DEPTH`] levels; `{"events": ...}` with `events` twice
//!   or not an array.
//!
//! Invariant: whenever they return `Some`, the result equals what the serde reader returns for
//! the same text (checked on generated and mutated events in the tests, and by the
//! `event_parser` fuzz target). Property values are the exact text sent, as with `RawValue`.

use std::borrow::Cow;

use crate::event::{EventParts, Loose, LooseEvent, LoosePayload, Properties};

/// Deepest nesting the scanner skips through; deeper values go to serde.
pub const MAX_SKIP_DEPTH: u32 = 64;

/// Reads one event that is the whole of `text` (whitespace around it aside).
pub fn event(text: &str) -> Option<LooseEvent<'_>> {
    let mut scanner = Scanner { text, at: 0 };
    let event = scanner.event()?;
    scanner.ws();
    scanner.at_end().then_some(event)
}

/// Reads a batch body: a JSON array of events, or `{"events": [...]}`.
pub fn batch(body: &str) -> Option<Vec<LooseEvent<'_>>> {
    let mut scanner = Scanner { text: body, at: 0 };
    scanner.ws();
    let events = match scanner.peek()? {
        b'[' => scanner.events()?,
        b'{' => scanner.wrapped()?,
        _ => return None,
    };
    scanner.ws();
    scanner.at_end().then_some(events)
}

/// A position in the text; every method returns `None` to decline.
struct Scanner<'a> {
    text: &'a str,
    at: usize,
}

impl<'a> Scanner<'a> {
    fn bytes(&self) -> &'a [u8] {
        self.text.as_bytes()
    }

    fn peek(&self) -> Option<u8> {
        self.bytes().get(self.at).copied()
    }

    fn at_end(&self) -> bool {
        self.at == self.text.len()
    }

    /// Skips JSON whitespace.
    fn ws(&mut self) {
        while let Some(b' ' | b'\n' | b'\t' | b'\r') = self.peek() {
            self.at += 1;
        }
    }

    /// Skips whitespace, then the next byte, which must be `byte`.
    fn eat(&mut self, byte: u8) -> Option<()> {
        self.ws();
        (self.peek()? == byte).then(|| self.at += 1)
    }

    fn literal(&mut self, word: &[u8]) -> Option<()> {
        self.bytes()[self.at..]
            .starts_with(word)
            .then(|| self.at += word.len())
    }

    /// At `"`: a string that needs no unescaping; its contents.
    fn plain_str(&mut self) -> Option<&'a str> {
        let start = self.at + 1;
        let end = find_special(self.bytes(), start)?;
        if self.bytes()[end] != b'"' {
            return None;
        }
        self.at = end + 1;
        Some(&self.text[start..end])
    }

    /// At `"`: skips a string, escapes as JSON allows them.
    fn skip_str(&mut self) -> Option<()> {
        self.at += 1;
        loop {
            self.at = find_special(self.bytes(), self.at)?;
            match self.bytes()[self.at] {
                b'"' => {
                    self.at += 1;
                    return Some(());
                }
                b'\\' => {
                    self.at += 1;
                    match self.peek()? {
                        b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => self.at += 1,
                        b'u' => {
                            let hex = self.bytes().get(self.at + 1..self.at + 5)?;
                            if !hex.iter().all(u8::is_ascii_hexdigit) {
                                return None;
                            }
                            self.at += 5;
                        }
                        _ => return None,
                    }
                }
                _ => return None,
            }
        }
    }

    /// Skips ASCII digits; how many there were.
    fn digits(&mut self) -> usize {
        let start = self.at;
        while let Some(b'0'..=b'9') = self.peek() {
            self.at += 1;
        }
        self.at - start
    }

    /// Skips a number as JSON writes it: `-? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?`.
    fn skip_number(&mut self) -> Option<()> {
        if self.peek() == Some(b'-') {
            self.at += 1;
        }
        match self.peek()? {
            b'0' => {
                self.at += 1;
                if let Some(b'0'..=b'9') = self.peek() {
                    return None;
                }
            }
            b'1'..=b'9' => {
                self.digits();
            }
            _ => return None,
        }
        if self.peek() == Some(b'.') {
            self.at += 1;
            if self.digits() == 0 {
                return None;
            }
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.at += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.at += 1;
            }
            if self.digits() == 0 {
                return None;
            }
        }
        Some(())
    }

    /// Skips one value of any kind, nested at most [`MAX_SKIP_DEPTH`] levels.
    fn skip_value(&mut self) -> Option<()> {
        // Bit `i` of `objects` is set when open level `i` (from the innermost) is an object.
        let (mut objects, mut depth) = (0u64, 0u32);
        loop {
            self.ws();
            match self.peek()? {
                b'"' => self.skip_str()?,
                b'-' | b'0'..=b'9' => self.skip_number()?,
                b'n' => self.literal(b"null")?,
                b't' => self.literal(b"true")?,
                b'f' => self.literal(b"false")?,
                open @ (b'[' | b'{') => {
                    if depth == MAX_SKIP_DEPTH {
                        return None;
                    }
                    self.at += 1;
                    let object = open == b'{';
                    self.ws();
                    if self.peek()? != if object { b'}' } else { b']' } {
                        objects = objects << 1 | u64::from(object);
                        depth += 1;
                        if object {
                            self.member_name()?;
                        }
                        continue;
                    }
                    self.at += 1;
                }
                _ => return None,
            }
            // A value ended: close the levels it ends, or go on after a comma.
            loop {
                if depth == 0 {
                    return Some(());
                }
                let object = objects & 1 == 1;
                self.ws();
                match self.peek()? {
                    b',' => {
                        self.at += 1;
                        if object {
                            self.member_name()?;
                        }
                        break;
                    }
                    b'}' if object => {}
                    b']' if !object => {}
                    _ => return None,
                }
                self.at += 1;
                objects >>= 1;
                depth -= 1;
            }
        }
    }

    /// Skips a member name of a skipped object, escapes allowed, and its colon.
    fn member_name(&mut self) -> Option<()> {
        self.ws();
        if self.peek()? != b'"' {
            return None;
        }
        self.skip_str()?;
        self.eat(b':')
    }

    /// At `{`: reads an object, calling `member` with each name (after its colon) to read the
    /// value.
    fn members(&mut self, mut member: impl FnMut(&mut Self, &'a str) -> Option<()>) -> Option<()> {
        self.at += 1;
        self.ws();
        if self.peek()? == b'}' {
            self.at += 1;
            return Some(());
        }
        loop {
            self.ws();
            if self.peek()? != b'"' {
                return None;
            }
            let name = self.plain_str()?;
            self.eat(b':')?;
            member(self, name)?;
            self.ws();
            match self.peek()? {
                b',' => self.at += 1,
                b'}' => {
                    self.at += 1;
                    return Some(());
                }
                _ => return None,
            }
        }
    }

    /// An event field's value: a plain string, an integer, `null`, `true` or `false`.
    fn loose(&mut self) -> Option<Loose<'a>> {
        self.ws();
        Some(match self.peek()? {
            b'"' => Loose::Str(Cow::Borrowed(self.plain_str()?)),
            b'n' => {
                self.literal(b"null")?;
                Loose::Null
            }
            b't' => {
                self.literal(b"true")?;
                Loose::Other
            }
            b'f' => {
                self.literal(b"false")?;
                Loose::Other
            }
            b'-' | b'0'..=b'9' => self.integer()?,
            _ => return None,
        })
    }

    /// An integer as serde_json hands it to [`Loose`]: up to `i64::MAX` as itself, up to
    /// `u64::MAX` as a number out of range, `-0` as a float.
    fn integer(&mut self) -> Option<Loose<'a>> {
        let negative = self.peek() == Some(b'-');
        let start = self.at + usize::from(negative);
        self.skip_number()?;
        let digits = &self.text[start..self.at];
        if !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let magnitude: u64 = digits.parse().ok()?;
        Some(match (negative, magnitude) {
            (false, m) => i64::try_from(m).map_or(Loose::Other, Loose::Int),
            (true, 0) => Loose::Other,
            (true, m) if m <= 1 << 63 => Loose::Int((m as i64).wrapping_neg()),
            (true, _) => return None,
        })
    }

    /// One event object.
    fn event(&mut self) -> Option<LooseEvent<'a>> {
        self.ws();
        if self.peek()? != b'{' {
            return None;
        }
        let mut parts = EventParts::default();
        self.members(|s, name| {
            if name == "payload" {
                parts.payload = Some(s.payload()?);
            } else if let Some(slot) = parts.field(name) {
                *slot = Some(s.loose()?);
            } else {
                s.skip_value()?;
            }
            Some(())
        })?;
        Some(LooseEvent::Object(Box::new(parts)))
    }

    /// An event's `payload`: an object or `null`.
    fn payload(&mut self) -> Option<LoosePayload<'a>> {
        self.ws();
        match self.peek()? {
            b'n' => {
                self.literal(b"null")?;
                return Some(LoosePayload::Null);
            }
            b'{' => {}
            _ => return None,
        }
        let (mut entity_id, mut properties, mut members) = (None, None, None);
        self.members(|s, name| {
            match name {
                "entity_id" => entity_id = Some(s.loose()?),
                "properties" => {
                    members = s.properties()?;
                    properties = members.is_none().then_some(Loose::Null);
                }
                _ => s.skip_value()?,
            }
            Some(())
        })?;
        Some(LoosePayload::Object {
            entity_id,
            properties,
            members,
        })
    }

    /// `payload.properties`: `Some(members)` for an object, `None` for `null`.
    fn properties(&mut self) -> Option<Option<Properties<'a>>> {
        self.ws();
        match self.peek()? {
            b'n' => {
                self.literal(b"null")?;
                Some(None)
            }
            b'{' => {
                let mut members = Vec::with_capacity(8);
                self.members(|s, name| {
                    s.ws();
                    let start = s.at;
                    s.skip_value()?;
                    members.push((Cow::Borrowed(name), &s.text[start..s.at]));
                    Some(())
                })?;
                Some(Some(Properties(members)))
            }
            _ => None,
        }
    }

    /// At `[`: an array of event objects.
    fn events(&mut self) -> Option<Vec<LooseEvent<'a>>> {
        self.at += 1;
        let mut events = Vec::new();
        self.ws();
        if self.peek()? == b']' {
            self.at += 1;
            return Some(events);
        }
        loop {
            events.push(self.event()?);
            self.ws();
            match self.peek()? {
                b',' => self.at += 1,
                b']' => {
                    self.at += 1;
                    return Some(events);
                }
                _ => return None,
            }
        }
    }

    /// At `{`: `{"events": [...]}`, other members ignored.
    fn wrapped(&mut self) -> Option<Vec<LooseEvent<'a>>> {
        let mut events = None;
        self.members(|s, name| {
            if name != "events" {
                return s.skip_value();
            }
            s.ws();
            if events.is_some() || s.peek()? != b'[' {
                return None;
            }
            events = Some(s.events()?);
            Some(())
        })?;
        events
    }
}

/// Index of the first `"`, `\` or control character (below 0x20) in `bytes` from `at` on:
/// sixteen bytes at a time with SSE2 (part of every x86_64), then eight at a time, then by byte.
#[inline]
fn find_special(bytes: &[u8], mut at: usize) -> Option<usize> {
    #[cfg(target_arch = "x86_64")]
    while let Some(chunk) = bytes.get(at..at + 16) {
        use std::arch::x86_64::{
            _mm_cmpeq_epi8, _mm_loadu_si128, _mm_min_epu8, _mm_movemask_epi8, _mm_or_si128,
            _mm_set1_epi8,
        };
        // SAFETY: SSE2 is in the x86_64 baseline; the unaligned load reads exactly the 16
        // bytes of `chunk`.
        let found = unsafe {
            let v = _mm_loadu_si128(chunk.as_ptr().cast());
            let quote = _mm_cmpeq_epi8(v, _mm_set1_epi8(b'"' as i8));
            let backslash = _mm_cmpeq_epi8(v, _mm_set1_epi8(b'\\' as i8));
            // Unsigned `v <= 0x1f`: the minimum of the two is `v` itself.
            let control = _mm_cmpeq_epi8(_mm_min_epu8(v, _mm_set1_epi8(0x1f)), v);
            _mm_movemask_epi8(_mm_or_si128(_mm_or_si128(quote, backslash), control)) as u32
        };
        if found != 0 {
            return Some(at + found.trailing_zeros() as usize);
        }
        at += 16;
    }
    const ONES: u64 = u64::from_ne_bytes([1; 8]);
    const HIGH: u64 = ONES << 7;
    let zero_byte = |word: u64| word.wrapping_sub(ONES) & !word & HIGH;
    while let Some(chunk) = bytes.get(at..at + 8) {
        let word = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
        // A bit set in the lowest byte that matches is exact; borrows only mark bytes above it.
        let found = zero_byte(word ^ (ONES * u64::from(b'"')))
            | zero_byte(word ^ (ONES * u64::from(b'\\')))
            | (word.wrapping_sub(ONES * 0x20) & !word & HIGH);
        if found != 0 {
            return Some(at + found.trailing_zeros() as usize / 8);
        }
        at += 8;
    }
    while let Some(&b) = bytes.get(at) {
        if b == b'"' || b == b'\\' || b < 0x20 {
            return Some(at);
        }
        at += 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{serde_batch, serde_event};

    /// A small deterministic generator (xorshift64*).
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
        fn pick<'s>(&mut self, items: &[&'s str]) -> &'s str {
            items[self.below(items.len())]
        }
        fn chance(&mut self, percent: usize) -> bool {
            self.below(100) < percent
        }
    }

    const NUMBERS: &[&str] = &[
        "0",
        "7",
        "-3",
        "1700000000000",
        "-0",
        "1.5",
        "1e5",
        "2E-3",
        "-0.25e+2",
        "9223372036854775807",
        "9223372036854775808",
        "18446744073709551615",
        "18446744073709551616",
        "-9223372036854775808",
        "-9223372036854775809",
        "1e400",
    ];
    const STRINGS: &[&str] = &[
        r#""s""#,
        r#""plain text""#,
        r#""a/b/c""#,
        r#""é 漢 😀""#,
        r#""a\"b""#,
        r#""\u00e9""#,
        r#""\ud800""#,
        r#""\\""#,
        r#""\/""#,
        r#""""#,
        r#""0123456789abcdef0123456789""#,
    ];
    const LITERALS: &[&str] = &["true", "false", "null"];
    /// Not JSON.
    const BAD: &[&str] = &[
        "01",
        "1.",
        ".5",
        "1e",
        "-",
        "+1",
        "nul",
        "tru",
        r#""\x""#,
        "\"a\u{1}b\"",
        r#""unterminated"#,
        r#""\u12""#,
        "'s'",
    ];
    const NAMES: &[&str] = &[
        "stream",
        "source",
        "timestamp",
        "payload",
        "eventId",
        "key",
        "schema",
        "other",
        "str\\u0065am",
        "entity_id",
        "properties",
        "events",
        "",
    ];

    /// Whitespace, mostly none.
    fn ws(rng: &mut Rng) -> &'static str {
        ["", "", "", " ", "\n  ", "\t", "\r\n"][rng.below(7)]
    }

    fn value(rng: &mut Rng, depth: usize) -> String {
        if rng.chance(2) {
            return rng.pick(BAD).to_owned();
        }
        match rng.below(if depth > 3 { 3 } else { 5 }) {
            0 => rng.pick(NUMBERS).to_owned(),
            1 => rng.pick(STRINGS).to_owned(),
            2 => rng.pick(LITERALS).to_owned(),
            3 => {
                let items: Vec<String> = (0..rng.below(4)).map(|_| value(rng, depth + 1)).collect();
                format!("[{}{}]", items.join(&format!(",{}", ws(rng))), ws(rng))
            }
            _ => {
                let members: Vec<String> = (0..rng.below(4))
                    .map(|_| {
                        let (name, w, v) = (rng.pick(NAMES), ws(rng), value(rng, depth + 1));
                        format!("\"{name}\"{w}:{v}")
                    })
                    .collect();
                format!("{{{}}}", members.join(","))
            }
        }
    }

    fn object(rng: &mut Rng, members: Vec<(String, String)>) -> String {
        let members: Vec<String> = members
            .into_iter()
            .map(|(name, v)| format!("{}\"{name}\"{}:{}{v}{}", ws(rng), ws(rng), ws(rng), ws(rng)))
            .collect();
        format!("{{{}}}", members.join(","))
    }

    /// An event, mostly of the usual shape, sometimes with odd fields or values.
    fn event(rng: &mut Rng) -> String {
        let odd = |rng: &mut Rng, usual: String| {
            if rng.chance(4) { value(rng, 0) } else { usual }
        };
        let properties: Vec<(String, String)> = (0..rng.below(7))
            .map(|i| {
                let name = if rng.chance(5) {
                    rng.pick(NAMES).to_owned()
                } else {
                    format!("p{i}")
                };
                (name, value(rng, 1))
            })
            .collect();
        let properties = object(rng, properties);
        let entity_id = format!("\"dev/{}\"", rng.below(100));
        let mut payload = vec![
            ("entity_id".to_owned(), odd(rng, entity_id)),
            ("properties".to_owned(), odd(rng, properties)),
        ];
        if rng.chance(10) {
            payload.push((rng.pick(NAMES).to_owned(), value(rng, 1)));
        }
        let payload = object(rng, payload);
        let mut fields = vec![
            ("stream".to_owned(), odd(rng, "\"sensors.temp\"".to_owned())),
            ("source".to_owned(), odd(rng, "\"gw-1\"".to_owned())),
            ("timestamp".to_owned(), odd(rng, "1700000000000".to_owned())),
            ("payload".to_owned(), odd(rng, payload)),
        ];
        for optional in ["eventId", "key", "schema"] {
            if rng.chance(20) {
                fields.push((optional.to_owned(), odd(rng, "\"x-1\"".to_owned())));
            }
        }
        if rng.chance(15) {
            fields.push((rng.pick(NAMES).to_owned(), value(rng, 0)));
        }
        for i in (1..fields.len()).rev() {
            fields.swap(i, rng.below(i + 1));
        }
        object(rng, fields)
    }

    fn mutate(rng: &mut Rng, text: &str) -> String {
        let mut bytes = text.as_bytes().to_vec();
        for _ in 0..=rng.below(3) {
            let at = rng.below(bytes.len() + 1);
            let byte = b"{}[],:\"\\ 0-1e.nu\x01"[rng.below(17)];
            match rng.below(3) {
                0 if at < bytes.len() => {
                    bytes.remove(at);
                }
                1 if at < bytes.len() => bytes[at] = byte,
                _ => bytes.insert(at, byte),
            }
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// Checks one text both ways; whether the scanner read it.
    fn agrees(text: &str) -> bool {
        if let Some(fast) = super::event(text) {
            assert_eq!(Ok(&fast), serde_event(text).as_ref(), "event {text:?}");
        }
        match super::batch(text) {
            Some(fast) => {
                assert_eq!(Ok(&fast), serde_batch(text).as_ref(), "batch {text:?}");
                true
            }
            None => false,
        }
    }

    #[test]
    fn reads_what_serde_reads_or_declines() {
        let mut rng = Rng(0x5EED_F1D5);
        let (mut whole, mut whole_read, mut mutated_read) = (0, 0, 0);
        for _ in 0..20_000 {
            let events: Vec<String> = (0..rng.below(4)).map(|_| event(&mut rng)).collect();
            let body = match rng.below(4) {
                0 => format!("{{\"events\":{}[{}]}}", ws(&mut rng), events.join(",")),
                1 if !events.is_empty() => events[0].clone(),
                _ => format!(
                    "{}[{}]{}",
                    ws(&mut rng),
                    events.join(&format!(",{}", ws(&mut rng))),
                    ws(&mut rng)
                ),
            };
            whole += 1;
            whole_read += usize::from(agrees(&body));
            mutated_read += usize::from(agrees(&mutate(&mut rng, &body)));
        }
        // The test means something only if the scanner reads most bodies itself.
        assert!(whole_read * 2 > whole, "read {whole_read} of {whole}");
        assert!(mutated_read > 100, "read {mutated_read} mutated bodies");
    }

    #[test]
    fn reads_the_usual_event() {
        let body = r#"{"stream":"sensors.temp","source":"gw-1","timestamp":1700000000000,"payload":{"entity_id":"dev/1","properties":{"t":21.5,"ok":true,"tags":["a","b"],"at":{"x":1},"note":"a\"b","n":null}}}"#;
        assert!(agrees(&format!("[{body}, {body}]")));
        assert!(super::event(body).is_some());
        let LooseEvent::Object(parts) = super::event(body).unwrap() else {
            panic!("object")
        };
        assert_eq!(parts.timestamp, Some(Loose::Int(1_700_000_000_000)));
    }

    #[test]
    fn declines_what_it_does_not_read() {
        let usual = r#"{"stream":"s","source":"x","timestamp":1,"payload":{"entity_id":"a","properties":{}}}"#;
        for (from, to) in [
            (r#""a""#, r#""a\/b""#),
            (r#""timestamp":1"#, r#""timestamp":1.0"#),
            (r#""timestamp":1"#, r#""timestamp":18446744073709551616"#),
            (r#""stream""#, r#""str\u0065am""#),
            (r#"{}"#, r#"{"deep":"#.to_owned().leak()),
        ] {
            let text = usual.replace(from, to);
            assert!(super::event(&text).is_none(), "{text}");
        }
        let deep = format!("{}{}", "[".repeat(65), "]".repeat(65));
        assert!(super::event(&usual.replace("{}", &format!(r#"{{"d":{deep}}}"#))).is_none());
        let shallow = format!("{}{}", "[".repeat(64), "]".repeat(64));
        assert!(super::event(&usual.replace("{}", &format!(r#"{{"d":{shallow}}}"#))).is_some());
        assert!(super::batch(r#"[1]"#).is_none());
        assert!(super::batch(r#"{"events":[],"events":[]}"#).is_none());
        assert_eq!(
            super::batch(r#"{"x":[{"y":"\u00e9"}],"events":[]}"#),
            Some(vec![])
        );
    }

    #[test]
    fn finds_special_bytes_at_any_offset() {
        for len in 0..40 {
            for at in 0..len {
                for special in [b'"', b'\\', 0x1f, 0] {
                    let mut bytes = vec![b'a'; len];
                    bytes[at] = special;
                    assert_eq!(find_special(&bytes, 0), Some(at), "{len} {at} {special}");
                }
            }
            let mut high = vec![0xC3; len];
            high.iter_mut().skip(1).step_by(2).for_each(|b| *b = 0xA9);
            assert_eq!(find_special(&high, 0), None);
            assert_eq!(find_special(&vec![b' '; len], 0), None);
        }
        assert_eq!(find_special(b"\x1fa\"\x00\\bcdefgh", 0), Some(0));
        assert_eq!(find_special(b"abcdefg\x20\"\x1f", 0), Some(8));
        assert_eq!(find_special(b"\"bcdefghijk\"", 1), Some(11));
    }
}
