//! Request paths in one canonical form, so that the path a budget is
//! checked against is the path the upstream serves.
//!
//! # Why
//!
//! A layer that tells endpoints apart by their path must see the path the
//! upstream will route on. Upstreams decode paths before routing
//! (Werkzeug and Starlette decode `%63` to `c`; some resolve `..`, some
//! treat `\` or `%2F` as a separator, some collapse `//`), so a client
//! that spells `/v1/chat/completions` as `/v1/chat/%63ompletions`, or
//! reaches `/admin` as `/v1/../admin`, would be checked as one endpoint and
//! served as another. [`normalize`] gives every path one spelling, and
//! refuses the spellings that mean different things to different servers;
//! the gateway forwards the normalized path, so what is checked is what is
//! sent.
//!
//! # The rules
//!
//! - The path must start with `/`.
//! - A percent-encoded *unreserved* character (`A`–`Z`, `a`–`z`, `0`–`9`,
//!   `-`, `.`, `_`, `~`) is decoded: RFC 3986 says the two spellings are
//!   the same, so every server reads them alike.
//! - Other percent-encodings stay encoded, with upper-case hex (`%3a`
//!   becomes `%3A`): a fine-tuned model's id (`ft%3Agpt-4o…`) keeps
//!   working.
//! - Refused, because servers disagree on what they mean: an encoded
//!   separator (`%2F`, `%5C`), an encoded `%` (`%25`, which a server that
//!   decodes twice reads as a new escape), an encoded control character
//!   (`%00`–`%1F`, `%7F`), a raw `\`, a malformed escape, and a dot segment
//!   (`.` or `..`, however spelled, also with `;` parameters after it, which
//!   some servers strip before resolving).
//! - Empty segments are dropped (`/v1//chat` is `/v1/chat`); a trailing
//!   `/` is kept.
//!
//! The query is not part of the path and is left alone.

use std::borrow::Cow;
use std::fmt;

use http::uri::PathAndQuery;
use http::Uri;

/// Why a path was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PathError {
    /// The path does not start with `/`.
    NotAbsolute,
    /// A `%` not followed by two hex digits.
    MalformedEscape,
    /// `%2F` or `%5C`: a separator some servers decode and some do not.
    EncodedSeparator,
    /// `%25`: an escape of `%` itself, which a server that decodes twice
    /// would read as a new escape.
    EncodedPercent,
    /// An encoded control character (`%00`–`%1F`, `%7F`).
    ControlCharacter,
    /// A raw `\`, which some servers take for `/`.
    Backslash,
    /// A `.` or `..` segment, which some servers resolve and some do not.
    DotSegment,
    /// The normalized path cannot be put back in a URI (it never happens
    /// to a path that came from one).
    Unrepresentable,
}

impl fmt::Display for PathError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PathError::NotAbsolute => "the request path must start with `/`",
            PathError::MalformedEscape => {
                "the request path has a `%` that is not followed by two hex digits"
            }
            PathError::EncodedSeparator => {
                "the request path has an encoded `/` or `\\` (`%2F`, `%5C`); send the path as it is"
            }
            PathError::EncodedPercent => "the request path has an encoded `%` (`%25`)",
            PathError::ControlCharacter => "the request path has an encoded control character",
            PathError::Backslash => "the request path has a `\\`",
            PathError::DotSegment => {
                "the request path has a `.` or `..` segment; send the path it stands for"
            }
            PathError::Unrepresentable => "the request path is invalid",
        })
    }
}

impl std::error::Error for PathError {}

/// The canonical spelling of `path` (borrowed when it already is), or why
/// it is refused. See the [module docs](self) for the rules.
pub fn normalize(path: &str) -> Result<Cow<'_, str>, PathError> {
    if !path.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    // Most paths need nothing done: no escape, no backslash, no empty or
    // dot segment. Check that first, without allocating.
    if is_plain(path) {
        return Ok(Cow::Borrowed(path));
    }
    let mut out = String::with_capacity(path.len());
    let mut segments = path[1..].split('/').peekable();
    while let Some(raw) = segments.next() {
        let segment = decode_segment(raw)?;
        if is_dot_segment(&segment) {
            return Err(PathError::DotSegment);
        }
        if segment.is_empty() {
            // `//` collapses; the last empty segment is a trailing slash.
            if segments.peek().is_none() && !out.is_empty() {
                out.push('/');
            }
            continue;
        }
        out.push('/');
        out.push_str(&segment);
    }
    if out.is_empty() {
        out.push('/');
    }
    Ok(if out == path {
        Cow::Borrowed(path)
    } else {
        Cow::Owned(out)
    })
}

/// `uri` with its path [normalized](normalize) and its query kept:
/// `Ok(None)` when the path is normalized already (the common case, which
/// allocates nothing).
pub fn normalize_uri(uri: &Uri) -> Result<Option<Uri>, PathError> {
    let path = match normalize(uri.path())? {
        Cow::Borrowed(_) => return Ok(None),
        Cow::Owned(path) => path,
    };
    let path_and_query = match uri.query() {
        Some(query) => format!("{path}?{query}"),
        None => path,
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query =
        Some(PathAndQuery::try_from(path_and_query).map_err(|_| PathError::Unrepresentable)?);
    Uri::from_parts(parts)
        .map(Some)
        .map_err(|_| PathError::Unrepresentable)
}

/// Whether `path` (which starts with `/`) has nothing for [`normalize`] to
/// change or refuse: no escape, no backslash, no empty segment, no dot
/// segment. One pass over the bytes: every request's path is checked
/// (twice in the gateway: before routing, and by the layer).
fn is_plain(path: &str) -> bool {
    let bytes = path.as_bytes();
    if has_nothing_to_look_at(bytes) {
        return true;
    }
    let mut after_slash = false;
    for (i, &b) in bytes.iter().enumerate() {
        match PATH_BYTE[usize::from(b)] {
            PLAIN => after_slash = false,
            ESCAPE => return false,
            SLASH if after_slash => return false,
            SLASH => after_slash = true,
            // A dot: only a segment that starts with one can be a dot
            // segment.
            _ if after_slash => {
                let segment = bytes[i..].split(|&b| b == b'/').next().unwrap_or_default();
                if is_dot_segment(std::str::from_utf8(segment).unwrap_or_default()) {
                    return false;
                }
                after_slash = false;
            }
            _ => {}
        }
    }
    true
}

/// Whether `bytes` has no `%`, `\`, `.` or `//` (then it is plain), eight
/// bytes at a time.
fn has_nothing_to_look_at(bytes: &[u8]) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const LOW7: u64 = 0x7f7f_7f7f_7f7f_7f7f;
    // 0x80 in each byte of `word` equal to `byte`, and nowhere else (no
    // carry crosses a byte: each sum stays below 0x100).
    let equal = |word: u64, byte: u8| {
        let x = word ^ (ONES * u64::from(byte));
        !(((x & LOW7) + LOW7) | x | LOW7)
    };
    let mut chunks = bytes.chunks_exact(8);
    let mut slash_before = false;
    for chunk in &mut chunks {
        let word = u64::from_le_bytes(chunk.try_into().expect("eight bytes"));
        if equal(word, b'%') | equal(word, b'\\') | equal(word, b'.') != 0 {
            return false;
        }
        let slashes = equal(word, b'/');
        // A slash right after a slash, in this word or across from the
        // last one.
        if slashes & (slashes >> 8) != 0 || slash_before && slashes & 0x80 != 0 {
            return false;
        }
        slash_before = slashes >> 63 == 1;
    }
    for &b in chunks.remainder() {
        match b {
            b'%' | b'\\' | b'.' => return false,
            b'/' if slash_before => return false,
            _ => {}
        }
        slash_before = b == b'/';
    }
    true
}

/// What [`is_plain`] makes of each byte: most are [`PLAIN`].
const PATH_BYTE: [u8; 256] = {
    let mut classes = [PLAIN; 256];
    classes[b'%' as usize] = ESCAPE;
    classes[b'\\' as usize] = ESCAPE;
    classes[b'/' as usize] = SLASH;
    classes[b'.' as usize] = DOT;
    classes
};
const PLAIN: u8 = 0;
const ESCAPE: u8 = 1;
const SLASH: u8 = 2;
const DOT: u8 = 3;

/// `raw` with its unreserved escapes decoded and the rest upper-cased, or
/// the reason it is refused.
fn decode_segment(raw: &str) -> Result<Cow<'_, str>, PathError> {
    let bytes = raw.as_bytes();
    if bytes.contains(&b'\\') {
        return Err(PathError::Backslash);
    }
    if !bytes.contains(&b'%') {
        return Ok(Cow::Borrowed(raw));
    }
    let mut out = String::with_capacity(raw.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'%' {
            // Runs of plain characters are copied whole; `%` is ASCII, so
            // the run ends on a character boundary.
            let end = bytes[i..]
                .iter()
                .position(|&b| b == b'%')
                .map_or(bytes.len(), |p| i + p);
            out.push_str(&raw[i..end]);
            i = end;
            continue;
        }
        let hex = bytes.get(i + 1..i + 3).ok_or(PathError::MalformedEscape)?;
        let (Some(high), Some(low)) = (hex_value(hex[0]), hex_value(hex[1])) else {
            return Err(PathError::MalformedEscape);
        };
        let byte = high << 4 | low;
        match byte {
            b'/' | b'\\' => return Err(PathError::EncodedSeparator),
            b'%' => return Err(PathError::EncodedPercent),
            0x00..=0x1f | 0x7f => return Err(PathError::ControlCharacter),
            _ if is_unreserved(byte) => out.push(char::from(byte)),
            _ => {
                out.push('%');
                out.push(char::from(HEX_UPPER[usize::from(high)]));
                out.push(char::from(HEX_UPPER[usize::from(low)]));
            }
        }
        i += 3;
    }
    Ok(Cow::Owned(out))
}

/// `.` or `..`, also with `;` parameters after it (`..;x`, `.%3Bx`), which
/// some servers strip before they resolve dot segments.
fn is_dot_segment(segment: &str) -> bool {
    let end = [segment.find(';'), find_ignore_case(segment, "%3b")]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(segment.len());
    matches!(&segment[..end], "." | "..")
}

fn find_ignore_case(haystack: &str, needle: &str) -> Option<usize> {
    haystack
        .as_bytes()
        .windows(needle.len())
        .position(|w| w.eq_ignore_ascii_case(needle.as_bytes()))
}

const HEX_UPPER: &[u8; 16] = b"0123456789ABCDEF";

fn hex_value(digit: u8) -> Option<u8> {
    char::from(digit)
        .to_digit(16)
        .and_then(|v| u8::try_from(v).ok())
}

/// RFC 3986's unreserved characters.
fn is_unreserved(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(path: &str) -> String {
        normalize(path)
            .unwrap_or_else(|e| panic!("{path}: {e}"))
            .into_owned()
    }

    #[test]
    fn plain_paths_are_borrowed_as_they_are() {
        for path in [
            "/",
            "/v1/chat/completions",
            "/v1/chat/completions/",
            "/v1/models/ft:gpt-4o:org::abc",
            "/v1/...",
            "/v1/.well-known",
        ] {
            assert!(
                matches!(normalize(path), Ok(Cow::Borrowed(p)) if p == path),
                "{path}"
            );
        }
    }

    #[test]
    fn the_one_pass_check_agrees_with_the_rules_on_every_short_path() {
        // The rules as first written: three passes, a split and a search
        // per segment.
        let by_the_rules = |path: &str| {
            !path.bytes().any(|b| b == b'%' || b == b'\\')
                && !path.contains("//")
                && path[1..].split('/').all(|s| !is_dot_segment(s))
        };
        let alphabet = ["/", ".", "a", "%", "\\", ";", "é"];
        let mut paths = vec![String::from("/")];
        let mut checked = 0;
        while let Some(path) = paths.pop() {
            assert_eq!(is_plain(&path), by_the_rules(&path), "{path:?}");
            checked += 1;
            if path.chars().count() < 7 {
                paths.extend(alphabet.iter().map(|c| format!("{path}{c}")));
            }
        }
        assert_eq!(checked, (0..7).map(|n| 7usize.pow(n)).sum::<usize>());
        // Longer ones, for the eight-bytes-at-a-time check: every piece at
        // every offset of a plain path, and random mixes.
        let plain = "/v1/chat/completions/abcdefghijklmnop";
        for offset in 1..plain.len() {
            for piece in ["%", "\\", ".", "/", "//", "/.", "/..", "..", "/./", "é"] {
                let path = format!("{}{piece}{}", &plain[..offset], &plain[offset..]);
                assert_eq!(is_plain(&path), by_the_rules(&path), "{path:?}");
            }
        }
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        for _ in 0..20_000 {
            let mut path = String::from("/");
            for _ in 0..8 + state % 32 {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                // Mostly plain characters, now and then another.
                let c = alphabet[(state % 16) as usize % alphabet.len()];
                path.push_str(if state % 16 < 9 { "a" } else { c });
            }
            assert_eq!(is_plain(&path), by_the_rules(&path), "{path:?}");
        }
    }

    #[test]
    fn unreserved_escapes_are_decoded_and_others_upper_cased() {
        assert_eq!(ok("/v1/chat/%63ompletions"), "/v1/chat/completions");
        assert_eq!(ok("/v1/%43hat/%2d%5F%7e%2E"), "/v1/Chat/-_~.");
        assert_eq!(ok("/v1/models/ft%3agpt"), "/v1/models/ft%3Agpt");
        assert_eq!(ok("/v1/x%20y"), "/v1/x%20y");
        assert_eq!(ok("/v1/%C3%A9"), "/v1/%C3%A9");
    }

    #[test]
    fn empty_segments_collapse_and_a_trailing_slash_stays() {
        assert_eq!(ok("//v1///chat//completions"), "/v1/chat/completions");
        assert_eq!(ok("/v1/responses//"), "/v1/responses/");
        assert_eq!(ok("//"), "/");
        assert_eq!(ok("/v1//"), "/v1/");
    }

    #[test]
    fn ambiguous_spellings_are_refused() {
        for (path, error) in [
            ("v1/chat", PathError::NotAbsolute),
            ("", PathError::NotAbsolute),
            ("/v1/../admin", PathError::DotSegment),
            ("/v1/./chat/completions", PathError::DotSegment),
            ("/v1/..", PathError::DotSegment),
            ("/v1/%2e%2e/admin", PathError::DotSegment),
            ("/v1/%2E./admin", PathError::DotSegment),
            ("/v1/.%2e", PathError::DotSegment),
            ("/v1/..;x/admin", PathError::DotSegment),
            ("/v1/.%3bx/admin", PathError::DotSegment),
            ("/v1/..%2fadmin", PathError::EncodedSeparator),
            ("/v1/a%2Fb", PathError::EncodedSeparator),
            ("/v1/a%5cb", PathError::EncodedSeparator),
            ("/v1/a\\b", PathError::Backslash),
            ("/v1/%252e%252e/admin", PathError::EncodedPercent),
            ("/v1/a%00", PathError::ControlCharacter),
            ("/v1/a%7F", PathError::ControlCharacter),
            ("/v1/a%", PathError::MalformedEscape),
            ("/v1/a%4", PathError::MalformedEscape),
            ("/v1/a%zz", PathError::MalformedEscape),
            ("/v1/a%+1", PathError::MalformedEscape),
        ] {
            assert_eq!(normalize(path), Err(error), "{path}");
        }
    }

    #[test]
    fn normalizing_twice_changes_nothing() {
        for path in [
            "/v1/chat/%63ompletions",
            "//v1//x%3a//",
            "/v1/%7E/%41",
            "/a/b/c",
        ] {
            let once = ok(path);
            assert!(
                matches!(normalize(&once), Ok(Cow::Borrowed(p)) if p == once),
                "{path} -> {once}"
            );
        }
    }

    #[test]
    fn a_uri_keeps_its_query_and_authority() {
        let uri: Uri = "http://up:9/v1//chat/%63ompletions?a=%2F&b=.."
            .parse()
            .unwrap();
        let normalized = normalize_uri(&uri).unwrap().unwrap();
        assert_eq!(
            normalized.to_string(),
            "http://up:9/v1/chat/completions?a=%2F&b=.."
        );
        assert_eq!(normalize_uri(&normalized), Ok(None));
        let uri: Uri = "/v1/%2e%2e/admin?x".parse().unwrap();
        assert_eq!(normalize_uri(&uri), Err(PathError::DotSegment));
    }

    #[test]
    fn multi_byte_characters_survive() {
        // `http` refuses raw non-ASCII in a URI, but the function is pure
        // and must not split a character.
        assert_eq!(ok("/v1/é%41/ü"), "/v1/éA/ü");
    }
}
