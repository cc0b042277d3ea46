//! A JSON response's top-level `usage`, read from its key: the key found
//! with memchr, the strict reader from there to the body's end.
//!
//! # Why
//!
//! Chat, completions and embeddings bodies end with `usage`, or with
//! `usage` and a few short members after it (OpenAI writes `service_tier`
//! and `system_fingerprint`; the Responses API, `user` and `metadata`).
//! The [strict reader](super::scan) reads a body from its start and
//! validates every byte of the generated text on the way, about 12
//! instructions a byte: 3,500 for the gateway bench's 290-byte response,
//! to find the 60 bytes that matter. memchr's `memmem` finds the key for a
//! fraction of an instruction a byte.
//!
//! # Why a model's output cannot be taken for the usage
//!
//! A model's output is inside strings, where every `"` is written `\"`,
//! so `"usage"` (quote, `usage`, quote) can only be in a body as a string
//! of its own, or with its first quote escaped (a text ending in
//! `"usage`), which is refused: the byte before the key must not be a
//! `\`. The colon after the string makes it a key. The strict reader then
//! reads the usage, every member after it and the object's closing brace,
//! and finds the body's end right after: one brace more closed than
//! opened, so the member is the outermost object's.
//!
//! # Where it gives up
//!
//! Anything else is left to the strict reader from the start, with the
//! same answer serde gives: no `"usage"` or two (serde refuses a duplicate
//! field), a `\u` escape anywhere (a key could spell `usage` with one), a
//! body that does not start with `{`, and whatever the strict reader turns
//! down after the key. So for any JSON body, its answer, when it has one,
//! is serde's.
//!
//! # What it trusts
//!
//! That the body is JSON: what comes before the key is not validated. A
//! body that is not JSON but ends like one with a `usage` is read by its
//! end, where serde would find no usage and the estimate would stay
//! charged. Only the upstream writes a body's structure (a model writes
//! inside strings), and an upstream can report any usage in a valid body,
//! so this trusts the upstream with nothing more than it already has.

use std::sync::OnceLock;

use memchr::memmem::Finder;

use super::scan::Cursor;

/// The key, quotes and all.
const KEY: &[u8] = b"\"usage\"";

/// `read_value` applied to `body`'s top-level `usage` member's value (it
/// must consume the value), when the member can be found from its key (see
/// the [module docs](self)); `None` otherwise.
pub(super) fn read_usage<T>(
    body: &[u8],
    read_value: impl FnOnce(&mut Cursor<'_>) -> Option<T>,
) -> Option<T> {
    let key = only_usage_key(body)?;
    let mut cursor = Cursor::new(&body[key..])?;
    cursor.key_is("usage")?;
    let value = read_value(&mut cursor)?;
    cursor.rest_of_object()?;
    cursor.end()?;
    Some(value)
}

/// Where the body's only `"usage"` starts, when it is an object's body
/// with no `\u` escape, and the key's first quote is not escaped.
fn only_usage_key(body: &[u8]) -> Option<usize> {
    static FINDERS: OnceLock<(Finder<'static>, Finder<'static>)> = OnceLock::new();
    let (usage, escape) = FINDERS.get_or_init(|| (Finder::new(KEY), Finder::new(b"\\u")));
    let first = body
        .iter()
        .find(|&&b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r'));
    if first != Some(&b'{') {
        return None;
    }
    let key = usage.find(body)?;
    let escaped = key > 0 && body[key - 1] == b'\\';
    let again = usage.find(&body[key + KEY.len()..]).is_some();
    (!escaped && !again && escape.find(body).is_none()).then_some(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn found(body: &str) -> Option<String> {
        read_usage(body.as_bytes(), |c| c.skip().map(str::to_owned))
    }

    const USAGE: &str = r#"{"prompt_tokens":20,"completion_tokens":16,"total_tokens":36,"prompt_tokens_details":{"cached_tokens":0}}"#;

    #[test]
    fn the_usage_is_read_from_its_key_in_the_bodies_upstreams_write() {
        let choices = r#""choices":[{"index":0,"message":{"role":"assistant","content":"a \"quoted\" line\n"},"finish_reason":"stop"}]"#;
        for body in [
            // The mock (serde_json's sorted keys), OpenAI's order.
            format!(r#"{{{choices},"created":1,"id":"x","usage":{USAGE}}}"#),
            format!(
                r#"{{"id":"x",{choices},"usage":{USAGE},"service_tier":"default","system_fingerprint":"fp\n1"}}"#
            ),
            // The Responses API's.
            format!(
                r#"{{"id":"r","output":[{{"content":[{{"text":"hi\n"}}]}}],"usage":{USAGE},"user":null,"metadata":{{"k":["v"]}}}}"#
            ),
            // Usage first, whitespace anywhere, usage alone.
            format!(r#"{{"usage":{USAGE},{choices}}}"#),
            format!("\n{{ \"id\" : \"x\" ,\n  \"usage\" :\n {USAGE} \n}}\n"),
            format!(r#"{{"usage":{USAGE}}}"#),
        ] {
            assert_eq!(found(&body).as_deref(), Some(USAGE), "{body}");
        }
        assert_eq!(found(r#"{"usage":null}"#).as_deref(), Some("null"));
    }

    #[test]
    fn only_a_top_level_member_spelled_usage_is_taken() {
        for body in [
            // Nested, in an object or an array.
            format!(r#"{{"choices":[],"meta":{{"usage":{USAGE}}}}}"#),
            format!(r#"{{"meta":{{"usage":{USAGE}}},"id":"x"}}"#),
            format!(r#"{{"choices":[{{"usage":{USAGE}}}]}}"#),
            // Not an object's body, or more than one value.
            format!(r#"[{{"usage":{USAGE}}}]"#),
            format!(r#"{{"usage":{USAGE}}} x"#),
            format!(r#"{{"usage":{USAGE}}}}}"#),
            // A string value "usage" is no key.
            format!(r#"{{"a":"usage","b":{USAGE}}}"#),
            // Not there, or another key.
            r#"{"id":"x","choices":[]}"#.to_owned(),
            format!(r#"{{"usagex":{USAGE}}}"#),
            format!(r#"{{"xusage":{USAGE}}}"#),
            String::new(),
        ] {
            assert_eq!(found(&body), None, "{body}");
        }
    }

    #[test]
    fn a_model_output_that_spells_a_usage_is_never_taken() {
        let spoofs = [
            r#"","usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}"#,
            // Ends its text with the key's first quote escaped before it.
            r#"x "usage"#,
        ];
        for spoof in spoofs {
            // As a model's output, it is a string's text: escaped.
            let text = serde_json::to_string(spoof).unwrap();
            for body in [
                format!(r#"{{"choices":[{{"message":{{"content":{text}}}}}]}}"#),
                format!(r#"{{"note":{text}}}"#),
                format!(r#"{{"note":{text}:{USAGE}}}"#),
            ] {
                assert_eq!(found(&body), None, "{body}");
            }
            // The real usage, after or before the text, is what is read.
            let after = format!(r#"{{"note":{text},"usage":{USAGE}}}"#);
            let before = format!(r#"{{"usage":{USAGE},"note":{text}}}"#);
            for body in [after, before] {
                let read = found(&body);
                assert!(read.is_none() || read.as_deref() == Some(USAGE), "{body}");
            }
        }
    }

    #[test]
    fn a_possible_second_usage_leaves_the_body_to_the_strict_reader() {
        for body in [
            format!(r#"{{"usage":{USAGE},"usage":{USAGE}}}"#),
            format!(r#"{{"usage":null,"usage":{USAGE}}}"#),
            format!(r#"{{"usage":{USAGE},"usage":null}}"#),
            format!(r#"{{"\u0075sage":null,"usage":{USAGE}}}"#),
            format!(r#"{{"usage":{USAGE},"us\u0061ge":1}}"#),
            // Harmless, but not told apart from a second one.
            format!(r#"{{"object":"usage","usage":{USAGE}}}"#),
            format!(r#"{{"usage":{USAGE},"text":"caf\u00e9"}}"#),
        ] {
            assert_eq!(found(&body), None, "{body}");
        }
    }
}
