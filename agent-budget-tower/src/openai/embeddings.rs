//! Embeddings (`POST /v1/embeddings`): their bodies' cost.
//!
//! The prompt is the `input`: a string, strings, or token arrays (whose
//! length is their count), as a completions prompt. There is no
//! completion.

use serde::Deserialize;

use super::chat::Prompt;
use super::request::{parse, Cost, ModelField, ModelName, TokenCounter};

/// The narrow view of an embeddings body.
#[derive(Deserialize)]
struct EmbeddingsBody<'a> {
    #[serde(default, borrow)]
    model: Option<ModelField<'a>>,
    #[serde(default, borrow)]
    input: Option<Prompt<'a>>,
}

/// The cost of an embeddings body.
pub(super) fn cost(body: &[u8], counter: &dyn TokenCounter) -> Result<Cost, String> {
    let parsed: EmbeddingsBody<'_> = parse(body)?;
    Ok(Cost {
        prompt_tokens: parsed.input.as_ref().map_or(0, |i| i.tokens(counter).0),
        completion_tokens: 0,
        needs_usage_asked: false,
        model: ModelName::of(body, parsed.model),
    })
}

#[cfg(test)]
mod tests {
    use super::super::request::tests::estimate;
    use super::super::request::Endpoint;

    fn tokens(body: &str) -> (u64, u64) {
        let e = estimate(Endpoint::Embeddings, body).unwrap().estimate;
        (e.prompt_tokens, e.completion_tokens)
    }

    #[test]
    fn the_input_is_the_whole_cost_in_every_shape() {
        assert_eq!(tokens(r#"{"model":"e","input":"a b c"}"#), (3, 0));
        assert_eq!(tokens(r#"{"input":["a b","c d e"]}"#), (5, 0));
        assert_eq!(tokens(r#"{"input":[1,2,3,4]}"#), (4, 0));
        assert_eq!(tokens(r#"{"input":[[1,2],[3]],"dimensions":8}"#), (3, 0));
        assert_eq!(tokens(r#"{"input":""}"#), (1, 0), "never less than one");
    }

    #[test]
    fn bad_inputs_are_errors() {
        for bad in [
            r#"{"input":5}"#,
            r#"{"input":{"a":1}}"#,
            r#"{"input":[1,"a"]}"#,
        ] {
            assert!(estimate(Endpoint::Embeddings, bad).is_err(), "{bad}");
        }
    }
}
