//! What a request costs in money: a price table keyed by model name, and
//! exact integer arithmetic from tokens to micro-dollars (pure).
//!
//! # How it works
//!
//! Providers price per million tokens, in dollars with a few decimals
//! (`$2.50` input, `$10.00` output, `$1.25` cached input for GPT-4o). A
//! dollar per million tokens is a micro-dollar per token, so a cost in
//! micro-dollars is tokens times the price, and a price is kept as an
//! integer number of pico-dollars per token (the price per million tokens
//! times 10^6): exact for any price with up to six decimals, which covers
//! every published price (`$0.0375` is 37,500). A cost is rounded *up* to
//! the micro-dollar, so a budget in dollars is never under-charged, and is
//! computed in 128 bits, saturating at `u64::MAX` micro-dollars.
//!
//! A [`PriceTable`] is a list of [`ModelPrice`]s whose names are globs
//! (`*` any run of characters, `?` one): the first entry whose name matches
//! the request's `model` prices it, so list specific names before broad
//! ones and a `"*"` default last.

/// Pico-dollars per token in one dollar per million tokens.
const PICO_PER_USD_PER_MTOK: f64 = 1e6;
/// Pico-dollars in a micro-dollar.
const PICO_PER_MICRO: u128 = 1_000_000;

/// A price per token, in pico-dollars (10^-12 $), which is the price per
/// million tokens in micro-dollars.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct PicoPerToken(pub u64);

impl PicoPerToken {
    /// A price given in dollars per million tokens, rounded to the nearest
    /// pico-dollar per token; `None` for a negative, non-finite or absurd
    /// (above $10^6 per token) price.
    pub fn from_usd_per_mtok(usd: f64) -> Option<Self> {
        let pico = (usd * PICO_PER_USD_PER_MTOK).round();
        (usd.is_finite() && usd >= 0.0 && pico <= 1e18).then_some(PicoPerToken(pico as u64))
    }

    /// The price in dollars per million tokens (for display).
    pub fn usd_per_mtok(self) -> f64 {
        self.0 as f64 / PICO_PER_USD_PER_MTOK
    }
}

/// The prices of the models whose name matches `name`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelPrice {
    /// A glob on the request's `model`: `*` matches any run of characters,
    /// `?` any one.
    pub name: String,
    /// Prompt tokens.
    pub input: PicoPerToken,
    /// Completion tokens (reasoning included).
    pub output: PicoPerToken,
    /// Prompt tokens read from the provider's cache, when the usage says
    /// how many there were; the input price when not given.
    pub cached_input: Option<PicoPerToken>,
}

/// Tokens of a response or an estimate, by how they are priced.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TokenCounts {
    /// Prompt tokens, cached ones included.
    pub input: u64,
    /// Of which read from the provider's cache (at most `input`).
    pub cached_input: u64,
    /// Completion tokens.
    pub output: u64,
}

impl ModelPrice {
    /// What `tokens` cost, in micro-dollars, rounded up.
    pub fn cost_micros(&self, tokens: TokenCounts) -> u64 {
        let cached = tokens.cached_input.min(tokens.input);
        let cached_price = self.cached_input.unwrap_or(self.input);
        let pico = u128::from(tokens.input - cached) * u128::from(self.input.0)
            + u128::from(cached) * u128::from(cached_price.0)
            + u128::from(tokens.output) * u128::from(self.output.0);
        u64::try_from(pico.div_ceil(PICO_PER_MICRO)).unwrap_or(u64::MAX)
    }
}

/// Prices by model, the first match winning.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PriceTable {
    models: Vec<ModelPrice>,
}

impl PriceTable {
    /// A table of `models`, searched in order.
    pub fn new(models: Vec<ModelPrice>) -> Self {
        PriceTable { models }
    }

    /// The first entry whose name matches `model`, if any.
    pub fn price_of(&self, model: &str) -> Option<&ModelPrice> {
        self.models.iter().find(|m| glob_matches(&m.name, model))
    }

    /// Whether the table prices nothing.
    pub fn is_empty(&self) -> bool {
        self.models.is_empty()
    }
}

/// Whether `text` matches `pattern`, where `*` matches any run of
/// characters (none included) and `?` exactly one; everything else
/// matches itself. The classic two-pointer walk with one backtrack point,
/// over the bytes a character at a time (nothing allocated: it runs on
/// every request with a per-model limit): at most the product of the
/// lengths in steps, never exponential, so a hostile model name cannot
/// make it slow.
pub fn glob_matches(pattern: &str, text: &str) -> bool {
    let (pattern, text) = (pattern.as_bytes(), text.as_bytes());
    // The literal run before the first wildcard, compared at once (the
    // common globs are `gpt-4o*` and exact names: a character at a time,
    // they cost 380 instructions a request, callgrind). Both sides then
    // stand after the same characters, at a character boundary.
    let literal = pattern
        .iter()
        .position(|&c| c == b'*' || c == b'?')
        .unwrap_or(pattern.len());
    if !text.starts_with(&pattern[..literal]) {
        return false;
    }
    match &pattern[literal..] {
        [] => return text.len() == literal,
        [b'*'] => return true,
        _ => {}
    }
    walk(&pattern[literal..], &text[literal..])
}

/// [`glob_matches`] after the literal run: the two-pointer walk.
fn walk(pattern: &[u8], text: &[u8]) -> bool {
    // The length of the UTF-8 character that starts with `lead`.
    let width = |lead: u8| match lead {
        0..0xE0 if lead < 0x80 => 1,
        0..0xE0 => 2,
        0xE0..0xF0 => 3,
        _ => 4,
    };
    let (mut p, mut t) = (0, 0);
    // Where the last `*` was, and where the text stood when it was met.
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        let w = width(text[t]).min(text.len() - t);
        match pattern.get(p) {
            Some(b'*') => {
                star = Some((p, t));
                p += 1;
            }
            Some(b'?') => {
                p += 1;
                t += w;
            }
            Some(_) if pattern[p..].starts_with(&text[t..t + w]) => {
                p += w;
                t += w;
            }
            _ => match star {
                // Let the last `*` take one more character, and retry.
                Some((star_p, star_t)) => {
                    let taken = star_t + width(text[star_t]).min(text.len() - star_t);
                    p = star_p + 1;
                    t = taken;
                    star = Some((star_p, taken));
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn price(name: &str, input: f64, output: f64, cached: Option<f64>) -> ModelPrice {
        ModelPrice {
            name: name.to_owned(),
            input: PicoPerToken::from_usd_per_mtok(input).unwrap(),
            output: PicoPerToken::from_usd_per_mtok(output).unwrap(),
            cached_input: cached.map(|c| PicoPerToken::from_usd_per_mtok(c).unwrap()),
        }
    }

    #[test]
    fn published_prices_are_exact() {
        for (usd, pico) in [
            (2.5, 2_500_000),
            (10.0, 10_000_000),
            (0.15, 150_000),
            (0.0375, 37_500),
            (0.075, 75_000),
            (0.0, 0),
        ] {
            assert_eq!(
                PicoPerToken::from_usd_per_mtok(usd),
                Some(PicoPerToken(pico)),
                "{usd}"
            );
        }
        for bad in [-0.01, f64::NAN, f64::INFINITY, 1e13] {
            assert_eq!(PicoPerToken::from_usd_per_mtok(bad), None, "{bad}");
        }
    }

    #[test]
    fn costs_are_exact_and_rounded_up_to_the_micro_dollar() {
        let gpt4o = price("gpt-4o*", 2.5, 10.0, Some(1.25));
        // 1,000 prompt tokens at $2.50/M = 2,500 µ$; 500 out at $10/M = 5,000 µ$.
        let tokens = TokenCounts {
            input: 1_000,
            cached_input: 0,
            output: 500,
        };
        assert_eq!(gpt4o.cost_micros(tokens), 7_500);
        // 400 of the prompt cached at half price: 600 × 2.5 + 400 × 1.25.
        let tokens = TokenCounts {
            input: 1_000,
            cached_input: 400,
            output: 0,
        };
        assert_eq!(gpt4o.cost_micros(tokens), 1_500 + 500);
        // One token at $0.15/M is 0.15 µ$: charged 1.
        let mini = price("gpt-4o-mini", 0.15, 0.6, None);
        assert_eq!(
            mini.cost_micros(TokenCounts {
                input: 1,
                cached_input: 0,
                output: 0
            }),
            1
        );
        // Without a cached price, cached tokens cost the input price; more
        // cached than input is read as all cached.
        let tokens = TokenCounts {
            input: 10,
            cached_input: 50,
            output: 0,
        };
        assert_eq!(mini.cost_micros(tokens), 2);
        let huge = TokenCounts {
            input: u64::MAX,
            cached_input: 0,
            output: u64::MAX,
        };
        assert_eq!(gpt4o.cost_micros(huge), u64::MAX);
        assert_eq!(gpt4o.cost_micros(TokenCounts::default()), 0);
    }

    #[test]
    fn the_first_matching_name_prices_a_model() {
        let table = PriceTable::new(vec![
            price("gpt-4o-mini*", 0.15, 0.6, None),
            price("gpt-4o*", 2.5, 10.0, None),
            price("*", 1.0, 1.0, None),
        ]);
        assert_eq!(
            table.price_of("gpt-4o-mini-2024-07-18").unwrap().name,
            "gpt-4o-mini*"
        );
        assert_eq!(table.price_of("gpt-4o").unwrap().name, "gpt-4o*");
        assert_eq!(table.price_of("o3").unwrap().name, "*");
        let no_default = PriceTable::new(vec![price("gpt-4o", 2.5, 10.0, None)]);
        assert_eq!(no_default.price_of("gpt-4o-2024"), None);
        assert!(PriceTable::default().is_empty());
    }

    #[test]
    fn the_literal_prefix_shortcut_answers_as_the_walk_does() {
        // Every pattern of up to four of `a`, `é`, `*`, `?` against every
        // text of up to four of `a`, `b`, `é`: the shortcut against the
        // walk alone, from the start.
        fn all(symbols: &[&str], up_to: usize) -> Vec<String> {
            let mut out = vec![String::new()];
            let mut last = vec![String::new()];
            for _ in 0..up_to {
                last = last
                    .iter()
                    .flat_map(|s| symbols.iter().map(move |c| format!("{s}{c}")))
                    .collect();
                out.extend(last.iter().cloned());
            }
            out
        }
        let texts = all(&["a", "b", "é"], 4);
        for pattern in all(&["a", "é", "*", "?"], 4) {
            for text in &texts {
                assert_eq!(
                    glob_matches(&pattern, text),
                    walk(pattern.as_bytes(), text.as_bytes()),
                    "{pattern} ~ {text}"
                );
            }
        }
    }

    #[test]
    fn globs_match_as_documented() {
        for (pattern, text, want) in [
            ("gpt-4o*", "gpt-4o", true),
            ("gpt-4o*", "gpt-4o-mini", true),
            ("gpt-4o*", "gpt-4", false),
            ("*", "", true),
            ("", "", true),
            ("", "a", false),
            ("a?c", "abc", true),
            ("a?c", "ac", false),
            ("*-mini", "gpt-4o-mini", true),
            ("*-mini", "gpt-4o-mini-x", false),
            ("g*o*i", "gpt-4o-mini", true),
            ("claude-*-sonnet-*", "claude-3-5-sonnet-20241022", true),
            ("é*", "éa", true),
            ("?a", "éa", true),
            ("é?", "éé", true),
            ("*é", "aéé", true),
            ("a?", "aéx", false),
            ("**a", "bba", true),
        ] {
            assert_eq!(glob_matches(pattern, text), want, "{pattern} ~ {text}");
        }
        // A pattern built to backtrack: still quick, and right.
        let text = "a".repeat(10_000);
        assert!(!glob_matches(&format!("{}b", "*a".repeat(50)), &text));
    }
}
