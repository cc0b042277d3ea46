//! A strict, allocation-free JSON reader for the shapes every request and
//! response has, in front of serde.
//!
//! # Why
//!
//! serde_json reads a chat request or a completion's body into the
//! estimator's narrow views for about 5,500 instructions each (callgrind,
//! the bench's 230-byte request and 290-byte response): every key is
//! validated as UTF-8 on its own, an untagged enum buffers its value, a
//! `Vec` is grown per array. What the layer needs is a few numbers and the
//! lengths of a few strings. This reader walks the bytes once (strings
//! eight bytes at a time), validating the JSON as it goes, and hands the
//! caller keys and values to look at or skip.
//!
//! # The contract
//!
//! It accepts a strict subset of what serde_json accepts, and its callers
//! use it only for the shapes they understand: everything else (an escape
//! in a string whose text matters, a number that is not a plain integer, a
//! duplicate field, a value of an unexpected type, nesting deeper than 64)
//! makes the caller return `None`, and serde reads the body as before, with
//! its own answer and error messages. So for any body, the fast path's
//! answer, when it has one, is serde's; the tests check it on bodies built
//! to tell them apart.

/// Nesting deeper than this is left to serde (whose own limit is 128).
const MAX_DEPTH: u32 = 64;

/// A position in a JSON text. Every method returns `None` for anything it
/// does not accept, leaving the cursor wherever it stopped.
pub(super) struct Cursor<'a> {
    text: &'a str,
    bytes: &'a [u8],
    pos: usize,
    depth: u32,
}

/// A string's contents, between its quotes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct JsonStr<'a> {
    /// The raw text, escapes as written.
    pub(super) raw: &'a str,
    /// Whether it has a `\` escape (its text then differs from `raw`).
    pub(super) escaped: bool,
}

impl<'a> JsonStr<'a> {
    /// The text, when it has no escape (it is then `raw`).
    pub(super) fn text(&self) -> Option<&'a str> {
        (!self.escaped).then_some(self.raw)
    }
}

impl<'a> Cursor<'a> {
    /// A cursor at the start of `bytes`, which must be UTF-8 (as serde_json
    /// requires of the strings it reads; outside strings only ASCII is
    /// valid JSON).
    pub(super) fn new(bytes: &'a [u8]) -> Option<Self> {
        let text = std::str::from_utf8(bytes).ok()?;
        Some(Cursor {
            text,
            bytes,
            pos: 0,
            depth: 0,
        })
    }

    #[inline]
    fn skip_whitespace(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.bytes.get(self.pos) {
            self.pos += 1;
        }
    }

    /// The next byte after whitespace, not consumed.
    #[inline]
    pub(super) fn peek(&mut self) -> Option<u8> {
        // Compact JSON has no whitespace: one comparison, most of the time.
        match self.bytes.get(self.pos) {
            Some(&b) if b > b' ' => Some(b),
            _ => {
                self.skip_whitespace();
                self.bytes.get(self.pos).copied()
            }
        }
    }

    #[inline]
    fn eat(&mut self, byte: u8) -> Option<()> {
        (self.peek()? == byte).then(|| self.pos += 1)
    }

    /// Where the cursor is, after any whitespace: where the next value
    /// starts.
    pub(super) fn position(&mut self) -> usize {
        self.skip_whitespace();
        self.pos
    }

    /// The end of the text: nothing but whitespace is left.
    pub(super) fn end(&mut self) -> Option<()> {
        self.skip_whitespace();
        (self.pos == self.bytes.len()).then_some(())
    }

    /// `null`, consumed if it is next.
    pub(super) fn null(&mut self) -> Option<bool> {
        if self.peek()? == b'n' {
            self.literal(b"null")?;
            return Some(true);
        }
        Some(false)
    }

    fn literal(&mut self, word: &[u8]) -> Option<()> {
        let end = self.pos + word.len();
        (self.bytes.get(self.pos..end)? == word).then(|| self.pos = end)
    }

    /// `null` (`None`), or what `read` reads.
    pub(super) fn optional<T>(
        &mut self,
        read: impl FnOnce(&mut Self) -> Option<T>,
    ) -> Option<Option<T>> {
        if self.null()? {
            return Some(None);
        }
        read(self).map(Some)
    }

    /// `true` or `false`.
    pub(super) fn boolean(&mut self) -> Option<bool> {
        match self.peek()? {
            b't' => self.literal(b"true").map(|()| true),
            b'f' => self.literal(b"false").map(|()| false),
            _ => None,
        }
    }

    /// A string.
    #[inline(always)]
    pub(super) fn string(&mut self) -> Option<JsonStr<'a>> {
        self.eat(b'"')?;
        let start = self.pos;
        let escaped = self.rest_of_string()?;
        // Both ends are ASCII quotes: character boundaries.
        let raw = &self.text[start..self.pos - 1];
        Some(JsonStr { raw, escaped })
    }

    /// A string's contents after its opening quote, and its closing quote:
    /// whether it had an escape.
    ///
    /// Inlined where it is called, with the plain string (no escape: keys
    /// and most values) handled here: the call, and the saving of the
    /// registers the word test takes, cost more than the test itself on
    /// a string of a few bytes.
    #[inline(always)]
    fn rest_of_string(&mut self) -> Option<bool> {
        let at = special_at(self.bytes, self.pos)?;
        if self.bytes[at] == b'"' {
            self.pos = at + 1;
            return Some(false);
        }
        self.pos = at;
        self.rest_from_special()
    }

    /// The rest of a string from a `\` or a control character at the
    /// cursor: whether it had an escape.
    #[inline(never)]
    fn rest_from_special(&mut self) -> Option<bool> {
        let mut escaped = false;
        loop {
            match self.bytes[self.pos] {
                b'"' => {
                    self.pos += 1;
                    return Some(escaped);
                }
                b'\\' => {
                    escaped = true;
                    self.escape()?;
                }
                // A control character: serde refuses it.
                _ => return None,
            }
            self.pos = special_at(self.bytes, self.pos)?;
        }
    }

    /// An escape, from its `\`: as serde_json checks one in a string it
    /// skips (any `\u` code unit, even a lone surrogate).
    fn escape(&mut self) -> Option<()> {
        match self.bytes.get(self.pos + 1)? {
            b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => self.pos += 2,
            b'u' => {
                let hex = self.bytes.get(self.pos + 2..self.pos + 6)?;
                if !hex.iter().all(u8::is_ascii_hexdigit) {
                    return None;
                }
                self.pos += 6;
            }
            _ => return None,
        }
        Some(())
    }

    /// A non-negative integer written as digits alone (`0`, `16`), at most
    /// `u64::MAX`.
    pub(super) fn integer(&mut self) -> Option<u64> {
        self.skip_whitespace();
        let mut value: u64 = match self.bytes.get(self.pos)? {
            b'0' => 0,
            &digit @ b'1'..=b'9' => u64::from(digit - b'0'),
            _ => return None,
        };
        self.pos += 1;
        if value > 0 {
            while let Some(&digit @ b'0'..=b'9') = self.bytes.get(self.pos) {
                value = value
                    .checked_mul(10)?
                    .checked_add(u64::from(digit - b'0'))?;
                self.pos += 1;
            }
        }
        // A fraction or an exponent makes it no plain integer; a digit
        // after a leading zero, no JSON.
        match self.bytes.get(self.pos) {
            Some(b'.' | b'e' | b'E' | b'0'..=b'9') => None,
            _ => Some(value),
        }
    }

    /// A number, as JSON spells them: `-?(0|[1-9][0-9]*)(.[0-9]+)?([eE][+-]?[0-9]+)?`.
    fn number(&mut self) -> Option<&'a str> {
        self.skip_whitespace();
        let start = self.pos;
        if self.bytes.get(self.pos) == Some(&b'-') {
            self.pos += 1;
        }
        match self.bytes.get(self.pos)? {
            b'0' => self.pos += 1,
            b'1'..=b'9' => self.digits(),
            _ => return None,
        }
        if self.bytes.get(self.pos) == Some(&b'.') {
            self.pos += 1;
            self.some_digits()?;
        }
        if let Some(b'e' | b'E') = self.bytes.get(self.pos) {
            self.pos += 1;
            if let Some(b'+' | b'-') = self.bytes.get(self.pos) {
                self.pos += 1;
            }
            self.some_digits()?;
        }
        Some(&self.text[start..self.pos])
    }

    fn digits(&mut self) {
        while self.bytes.get(self.pos).is_some_and(u8::is_ascii_digit) {
            self.pos += 1;
        }
    }

    fn some_digits(&mut self) -> Option<()> {
        let start = self.pos;
        self.digits();
        (self.pos > start).then_some(())
    }

    /// Any value, skipped: its raw text. One loop, whatever the nesting
    /// (the containers open are bits of a word).
    pub(super) fn skip(&mut self) -> Option<&'a str> {
        self.skip_whitespace();
        let start = self.pos;
        // Bit `i` set: the container at depth `i + 1` is an object.
        let (mut objects, mut depth) = (0u64, self.depth);
        let base = depth;
        'value: loop {
            match self.peek()? {
                b'"' => {
                    self.pos += 1;
                    self.rest_of_string()?;
                }
                open @ (b'{' | b'[') => {
                    self.pos += 1;
                    depth += 1;
                    if depth - base > 64 || depth > MAX_DEPTH {
                        return None;
                    }
                    let is_object = open == b'{';
                    let bit = 1u64 << (depth - base - 1);
                    objects = if is_object {
                        objects | bit
                    } else {
                        objects & !bit
                    };
                    let close = if is_object { b'}' } else { b']' };
                    if self.peek()? == close {
                        self.pos += 1;
                        depth -= 1;
                    } else {
                        if is_object {
                            self.member_key()?;
                        }
                        continue 'value;
                    }
                }
                b't' => self.literal(b"true")?,
                b'f' => self.literal(b"false")?,
                b'n' => self.literal(b"null")?,
                _ => {
                    self.number()?;
                }
            }
            // After a value: the next one in its container, or the
            // container's end.
            loop {
                if depth == base {
                    return Some(&self.text[start..self.pos]);
                }
                let in_object = objects >> (depth - base - 1) & 1 == 1;
                match self.peek()? {
                    b',' => {
                        self.pos += 1;
                        if in_object {
                            self.member_key()?;
                        }
                        continue 'value;
                    }
                    b'}' if in_object => {}
                    b']' if !in_object => {}
                    _ => return None,
                }
                self.pos += 1;
                depth -= 1;
            }
        }
    }

    /// An object member's key and its colon.
    fn member_key(&mut self) -> Option<()> {
        self.eat(b'"')?;
        self.rest_of_string()?;
        self.eat(b':')
    }

    /// An object member's key, when it is `key` exactly (no escape), and
    /// its colon.
    pub(super) fn key_is(&mut self, key: &str) -> Option<()> {
        (self.string()?.text()? == key).then_some(())?;
        self.eat(b':')
    }

    /// The rest of an object, after a member: the members left (skipped)
    /// and its closing brace.
    pub(super) fn rest_of_object(&mut self) -> Option<()> {
        loop {
            match self.peek()? {
                b',' => {
                    self.pos += 1;
                    self.member_key()?;
                    self.skip()?;
                }
                b'}' => {
                    self.pos += 1;
                    return Some(());
                }
                _ => return None,
            }
        }
    }

    /// An object: `member` is called with each key (without escapes: an
    /// escaped key is left to serde), and must consume its value.
    pub(super) fn object(
        &mut self,
        mut member: impl FnMut(&mut Self, &'a str) -> Option<()>,
    ) -> Option<()> {
        self.members(|cursor, key| member(cursor, key.text()?))
    }

    /// An object: `member` is called with each key as written, escapes
    /// and all, and must consume its value.
    pub(super) fn members(
        &mut self,
        mut member: impl FnMut(&mut Self, JsonStr<'a>) -> Option<()>,
    ) -> Option<()> {
        self.eat(b'{')?;
        self.enter()?;
        if self.peek()? != b'}' {
            loop {
                let key = self.string()?;
                self.eat(b':')?;
                member(self, key)?;
                if self.peek()? != b',' {
                    break;
                }
                self.pos += 1;
            }
        }
        self.eat(b'}')?;
        self.depth -= 1;
        Some(())
    }

    /// An array: `element` is called for each element, and must consume
    /// it.
    pub(super) fn array(&mut self, mut element: impl FnMut(&mut Self) -> Option<()>) -> Option<()> {
        self.eat(b'[')?;
        self.enter()?;
        if self.peek()? != b']' {
            loop {
                element(self)?;
                if self.peek()? != b',' {
                    break;
                }
                self.pos += 1;
            }
        }
        self.eat(b']')?;
        self.depth -= 1;
        Some(())
    }

    fn enter(&mut self) -> Option<()> {
        self.depth += 1;
        (self.depth <= MAX_DEPTH).then_some(())
    }
}

/// The known fields an object has had: a second one is serde's error
/// ("duplicate field"), which its reader leaves to serde.
#[derive(Default)]
pub(super) struct Fields(u16);

impl Fields {
    /// `Some` the first time `field` (0 to 15) is seen.
    pub(super) fn first(&mut self, field: u8) -> Option<()> {
        let bit = 1 << field;
        let first = self.0 & bit == 0;
        self.0 |= bit;
        first.then_some(())
    }
}

/// Where the first `"`, `\` or control character at or after `from` is;
/// `None` if there is none (the string is not closed). Eight bytes at a
/// time.
#[inline(always)]
fn special_at(bytes: &[u8], from: usize) -> Option<usize> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    let has_zero = |x: u64| x.wrapping_sub(ONES) & !x & HIGHS;
    let mut chunks = bytes.get(from..)?.chunks_exact(8);
    let mut at = from;
    for chunk in &mut chunks {
        let word = u64::from_le_bytes(chunk.try_into().expect("eight bytes"));
        // A byte below 0x20, a quote, a backslash; the lowest flag is
        // always a true one (a borrow only spreads above one), and
        // non-ASCII bytes (high bit set) are none of them.
        let found = (word.wrapping_sub(ONES * 0x20) & !word & HIGHS)
            | has_zero(word ^ (ONES * u64::from(b'"')))
            | has_zero(word ^ (ONES * u64::from(b'\\')));
        if found != 0 {
            return Some(at + (found.trailing_zeros() / 8) as usize);
        }
        at += 8;
    }
    chunks
        .remainder()
        .iter()
        .position(|&b| b == b'"' || b == b'\\' || b < 0x20)
        .map(|i| at + i)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn skips(text: &str) -> bool {
        Cursor::new(text.as_bytes())
            .and_then(|mut c| {
                c.skip()?;
                c.end()
            })
            .is_some()
    }

    #[test]
    fn it_accepts_what_serde_accepts_of_these() {
        for text in [
            r#"{}"#,
            r#"[]"#,
            r#" { "a" : [ 1 , -2.5e+3 , 0 , 0.0 , 1E9 ] , "b" : { "c" : null } , "d" : true } "#,
            r#""\u00e9\n\"\\\/\b\f\r\t""#,
            r#""\ud800""#,
            r#""héllo wörld, ünïcode 日本 🦀""#,
            "\"a long string, longer than sixteen bytes, with \\\"quotes\\\" inside\"",
            "-0",
            "99999999999999999999999999",
            "1e400",
        ] {
            assert!(skips(text), "{text}");
            let serde: Result<serde::de::IgnoredAny, _> = serde_json::from_str(text);
            assert!(serde.is_ok(), "{text}");
        }
    }

    #[test]
    fn it_refuses_what_serde_refuses() {
        for text in [
            "",
            "{",
            "[1,]",
            "{\"a\":1,}",
            "{\"a\" 1}",
            "{1:2}",
            "01",
            "1.",
            ".5",
            "1e",
            "-",
            "+1",
            "tru",
            "nul",
            "\"abc",
            "\"a\u{1}b\"",
            "\"\\x\"",
            "\"\\u12\"",
            "{} x",
            "[1 2]",
            "NaN",
            "'a'",
        ] {
            assert!(!skips(text), "{text:?}");
            let serde: Result<serde::de::IgnoredAny, _> = serde_json::from_str(text);
            assert!(serde.is_err(), "{text:?}");
        }
        assert!(Cursor::new(b"\"\xff\"").is_none(), "not UTF-8");
    }

    #[test]
    fn nesting_past_the_limit_is_left_to_serde() {
        let deep = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
        assert!(skips(&deep(MAX_DEPTH as usize)));
        assert!(!skips(&deep(MAX_DEPTH as usize + 1)));
    }

    #[test]
    fn strings_end_at_their_first_unescaped_quote_at_any_offset() {
        for prefix in 0..20 {
            let body = "x".repeat(prefix);
            for tail in ["\"", "\\n\"", "é\"", "\\\"\""] {
                let text = format!("\"{body}{tail}");
                let mut cursor = Cursor::new(text.as_bytes()).unwrap();
                let s = cursor.string().unwrap();
                assert_eq!(s.raw, &text[1..text.len() - 1], "{text}");
                assert_eq!(s.escaped, tail.starts_with('\\'), "{text}");
                assert!(cursor.end().is_some());
            }
            let control = format!("\"{body}\u{1f}\"");
            assert!(Cursor::new(control.as_bytes()).unwrap().string().is_none());
        }
    }

    #[test]
    fn integers_are_plain_digits_within_u64() {
        let integer = |text: &str| Cursor::new(text.as_bytes()).unwrap().integer();
        assert_eq!(integer("16"), Some(16));
        assert_eq!(integer(" 0"), Some(0));
        assert_eq!(integer(&u64::MAX.to_string()), Some(u64::MAX));
        for other in ["-1", "1.0", "1e3", "18446744073709551616", "\"1\"", "null"] {
            assert_eq!(integer(other), None, "{other}");
        }
    }
}
