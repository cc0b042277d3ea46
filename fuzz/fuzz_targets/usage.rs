//! A JSON response's usage: for every body that is JSON, what the layer
//! reads (from the `usage` key on, by the strict reader from the start, or
//! by serde) is serde's answer. Bodies are objects built from members an
//! upstream or a model could write (usage objects, a second usage, keys
//! spelled with escapes, strings that spell a usage, usage nested deeper),
//! with whitespace, then cut where the fuzzer says; or the fuzzer's raw
//! bytes. No body panics.
#![no_main]

use agent_budget_tower::openai::{json_used_tokens, serde_used_tokens};
use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Member {
    key: u8,
    value: u8,
    spaced: bool,
}

#[derive(Arbitrary, Debug)]
struct Case<'a> {
    members: Vec<Member>,
    /// Where the body ends, when it is cut short.
    cut: Option<u16>,
    /// The fuzzer's bytes instead of a built body.
    raw: Option<&'a [u8]>,
}

const KEYS: [&str; 8] = [
    r#""usage""#,
    r#""\u0075sage""#,
    r#""us\u0061ge""#,
    r#""choices""#,
    r#""id""#,
    r#""usag""#,
    r#""metadata""#,
    r#""total_tokens""#,
];

const VALUES: [&str; 15] = [
    r#"{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}"#,
    r#"{"input_tokens":5,"output_tokens":7,"input_tokens_details":{"cached_tokens":2}}"#,
    r#"{"prompt_tokens":100,"completion_tokens":20,"prompt_tokens_details":{"cached_tokens":60,"audio_tokens":0}}"#,
    r#"{"total_tokens":7,"total_tokens":8}"#,
    r#"{"total_tokens":1e3}"#,
    r#"{"tot\u0061l_tokens":7}"#,
    "null",
    "7",
    r#""usage""#,
    r#"[{"message":{"content":"a \"quoted\" \\ line\n"}}]"#,
    r#""\",\"usage\":{\"total_tokens\":1}}""#,
    r#""x \"usage""#,
    r#"{"usage":{"total_tokens":9}}"#,
    "[]",
    r#""caf\u00e9""#,
];

fuzz_target!(|case: Case<'_>| {
    let built;
    let body: &[u8] = match case.raw {
        Some(raw) => raw,
        None => {
            let members: Vec<String> = case
                .members
                .iter()
                .map(|m| {
                    let key = KEYS[usize::from(m.key) % KEYS.len()];
                    let value = VALUES[usize::from(m.value) % VALUES.len()];
                    if m.spaced {
                        format!("\n  {key} : {value} ")
                    } else {
                        format!("{key}:{value}")
                    }
                })
                .collect();
            built = format!("{{{}}}\n", members.join(","));
            let end = case
                .cut
                .map_or(built.len(), |cut| usize::from(cut).min(built.len()));
            &built.as_bytes()[..end]
        }
    };
    let read = json_used_tokens(body);
    if serde_json::from_slice::<serde_json::Value>(body).is_ok() {
        assert_eq!(
            read,
            serde_used_tokens(body),
            "{}",
            String::from_utf8_lossy(body)
        );
    }
});
