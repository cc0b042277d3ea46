//! Rate-limit response headers: what clients already parse, formatted here.
//!
//! # How it works
//!
//! Every response the layer answers, admitted or refused, tells the client
//! where its budget stands, in the formats clients already understand:
//!
//! - OpenAI's `x-ratelimit-{limit,remaining,reset}-{requests,tokens}`.
//!   Limits and remainders are plain integers; resets are durations written
//!   the way Go prints them (OpenAI's servers are in Go): `20ms`, `1s`,
//!   `6m0s`, `2h30m0s`, `1.5s`. A call here is a "request".
//! - `Retry-After` on refusals: whole seconds, rounded up, and never `0`.
//!   A wait of 300 ms is `1`, not `0`: a client told `0` retries at once
//!   and is refused again (tower_governor truncates to `0`).
//! - On request, the IETF fields of draft-ietf-httpapi-ratelimit-headers-11:
//!   `RateLimit-Policy: "tokens";q=10000;w=60, "requests";q=100;w=60` and
//!   `RateLimit: "tokens";r=8766;t=42, "requests";r=99;t=42`: a list of
//!   policies named by strings, with the quota `q` and window `w`, and the
//!   remaining `r` and the seconds until reset `t` (rounded up, like
//!   `Retry-After`).
//!
//! A budget's tokens and calls share one fixed window, so both resets are
//! the time until that window ends. Under nested budgets each resource
//! reports the level that binds it (the one with the least left, or the
//! one that refused), with that level's window. Everything here is pure: a
//! [`RateLimitSnapshot`] in, header values out.

use std::time::Duration;

use agent_budget::{BudgetKind, FullBudgetInfo, Refused};
use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue, RETRY_AFTER};

/// `x-ratelimit-limit-requests`: calls admitted per window.
pub const X_RATELIMIT_LIMIT_REQUESTS: HeaderName =
    HeaderName::from_static("x-ratelimit-limit-requests");
/// `x-ratelimit-limit-tokens`: tokens admitted per window.
pub const X_RATELIMIT_LIMIT_TOKENS: HeaderName =
    HeaderName::from_static("x-ratelimit-limit-tokens");
/// `x-ratelimit-remaining-requests`: calls left in the window.
pub const X_RATELIMIT_REMAINING_REQUESTS: HeaderName =
    HeaderName::from_static("x-ratelimit-remaining-requests");
/// `x-ratelimit-remaining-tokens`: tokens left in the window.
pub const X_RATELIMIT_REMAINING_TOKENS: HeaderName =
    HeaderName::from_static("x-ratelimit-remaining-tokens");
/// `x-ratelimit-reset-requests`: time until the calls are back.
pub const X_RATELIMIT_RESET_REQUESTS: HeaderName =
    HeaderName::from_static("x-ratelimit-reset-requests");
/// `x-ratelimit-reset-tokens`: time until the tokens are back.
pub const X_RATELIMIT_RESET_TOKENS: HeaderName =
    HeaderName::from_static("x-ratelimit-reset-tokens");
/// `RateLimit-Policy` (IETF draft-11): the quotas and their windows.
pub const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
/// `RateLimit` (IETF draft-11): what is left and when it resets.
pub const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");

/// Where an agent's budget stands, as the headers report it: for tokens
/// and for calls (requests), the limit, what is left, and when it resets.
///
/// An agent with a budget of its own only reports that budget. Under
/// parents (a key under its team under its organisation), each resource
/// reports the level of the chain with the least of it left, which is
/// what binds the agent: its remainder is what the agent can still use,
/// its reset when that level's window ends. A refusal reports, for the
/// resource refused, the level that refused it, with the refusal's own
/// `retry_after` as its reset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimitSnapshot {
    /// Tokens admitted per window.
    pub token_limit: u64,
    /// Tokens left in the current window.
    pub tokens_remaining: u64,
    /// Time until the tokens' window ends.
    pub tokens_reset: Duration,
    /// Length of the tokens' window.
    pub tokens_window: Duration,
    /// Calls admitted per window.
    pub calls_limit: u64,
    /// Calls left in the current window.
    pub calls_remaining: u64,
    /// Time until the calls' window ends.
    pub calls_reset: Duration,
    /// Length of the calls' window.
    pub calls_window: Duration,
}

impl RateLimitSnapshot {
    /// The snapshot of one budget's `full_info`. Its window end is known
    /// to the second only (the core reports whole seconds, rounded down).
    pub fn from_info(info: &FullBudgetInfo) -> Self {
        Self::of_levels(info, info)
    }

    /// The snapshot of an agent's chain (its own `full_info`, then its
    /// ancestors', as `chain_info` lists them): for each resource, the
    /// level with the least left (the nearest, on a tie). `None` for an
    /// empty chain (no budget).
    pub fn from_chain(chain: &[FullBudgetInfo]) -> Option<Self> {
        let (tokens, calls) = binding_levels(chain)?;
        Some(Self::of_levels(tokens, calls))
    }

    /// The snapshot for a refusal: [`from_chain`](Self::from_chain), except
    /// that the resource refused reports the level that refused it, and
    /// each resource reported from that level resets at the refusal's
    /// `retry_after` (known to the millisecond), when it has one. `None`
    /// for an empty chain.
    pub fn from_refusal(chain: &[FullBudgetInfo], refused: &Refused) -> Option<Self> {
        let (mut tokens, mut calls) = binding_levels(chain)?;
        let refusing = chain.iter().find(|l| l.agent_id == refused.refused_by);
        if let Some(level) = refusing {
            match refused.kind {
                BudgetKind::Token => tokens = level,
                BudgetKind::Call => calls = level,
            }
        }
        let mut snapshot = Self::of_levels(tokens, calls);
        if let Some(wait) = refused.retry_after {
            if tokens.agent_id == refused.refused_by {
                snapshot.tokens_reset = wait;
            }
            if calls.agent_id == refused.refused_by {
                snapshot.calls_reset = wait;
            }
        }
        Some(snapshot)
    }

    /// Tokens as `tokens` reports them, calls as `calls` does.
    fn of_levels(tokens: &FullBudgetInfo, calls: &FullBudgetInfo) -> Self {
        RateLimitSnapshot {
            token_limit: tokens.token_limit,
            tokens_remaining: tokens.tokens_remaining,
            tokens_reset: Duration::from_secs(tokens.window_remaining_secs),
            tokens_window: Duration::from_secs(tokens.window_secs),
            calls_limit: calls.calls_limit,
            calls_remaining: calls.calls_remaining,
            calls_reset: Duration::from_secs(calls.window_remaining_secs),
            calls_window: Duration::from_secs(calls.window_secs),
        }
    }

    /// Writes OpenAI's six `x-ratelimit-*` headers.
    ///
    /// The six values are formatted into one buffer on the stack and
    /// share one allocation, each header a slice of it (every admitted
    /// response carries them: a value each was six allocations more).
    pub fn write_openai(&self, headers: &mut HeaderMap) {
        let mut text = ValueText::default();
        let mut digits = itoa::Buffer::new();
        let mut number = |text: &mut ValueText, n: u64| text.push(digits.format(n).as_bytes());
        let calls_limit = number(&mut text, self.calls_limit);
        let token_limit = number(&mut text, self.token_limit);
        let calls_remaining = number(&mut text, self.calls_remaining);
        let tokens_remaining = number(&mut text, self.tokens_remaining);
        let tokens_reset = text.push_go_duration(self.tokens_reset);
        // One budget (the common case): one reset, formatted once.
        let calls_reset = if self.calls_reset == self.tokens_reset {
            tokens_reset.clone()
        } else {
            text.push_go_duration(self.calls_reset)
        };
        let value = text.into_values();
        headers.reserve(6);
        headers.insert(X_RATELIMIT_LIMIT_REQUESTS, value(calls_limit));
        headers.insert(X_RATELIMIT_LIMIT_TOKENS, value(token_limit));
        headers.insert(X_RATELIMIT_REMAINING_REQUESTS, value(calls_remaining));
        headers.insert(X_RATELIMIT_REMAINING_TOKENS, value(tokens_remaining));
        headers.insert(X_RATELIMIT_RESET_REQUESTS, value(calls_reset));
        headers.insert(X_RATELIMIT_RESET_TOKENS, value(tokens_reset));
    }

    /// Writes the IETF `RateLimit-Policy` and `RateLimit` fields.
    pub fn write_ietf(&self, headers: &mut HeaderMap) {
        if let Ok(value) = HeaderValue::from_str(&self.ietf_policy()) {
            headers.insert(RATELIMIT_POLICY, value);
        }
        if let Ok(value) = HeaderValue::from_str(&self.ietf_state()) {
            headers.insert(RATELIMIT, value);
        }
    }

    /// The `RateLimit-Policy` value: `"tokens";q=…;w=…, "requests";q=…;w=…`.
    pub fn ietf_policy(&self) -> String {
        format!(
            "\"tokens\";q={};w={}, \"requests\";q={};w={}",
            self.token_limit,
            ceil_secs(self.tokens_window),
            self.calls_limit,
            ceil_secs(self.calls_window)
        )
    }

    /// The `RateLimit` value: `"tokens";r=…;t=…, "requests";r=…;t=…`.
    pub fn ietf_state(&self) -> String {
        format!(
            "\"tokens\";r={};t={}, \"requests\";r={};t={}",
            self.tokens_remaining,
            ceil_secs(self.tokens_reset),
            self.calls_remaining,
            ceil_secs(self.calls_reset)
        )
    }
}

/// The levels of `chain` with the fewest tokens and the fewest calls
/// left, the nearest on a tie; `None` for an empty chain.
fn binding_levels(chain: &[FullBudgetInfo]) -> Option<(&FullBudgetInfo, &FullBudgetInfo)> {
    let (own, ancestors) = chain.split_first()?;
    let (mut tokens, mut calls) = (own, own);
    for level in ancestors {
        if level.tokens_remaining < tokens.tokens_remaining {
            tokens = level;
        }
        if level.calls_remaining < calls.calls_remaining {
            calls = level;
        }
    }
    Some((tokens, calls))
}

/// Writes `Retry-After` for a wait of `wait`: whole seconds rounded up,
/// never below one.
pub fn write_retry_after(headers: &mut HeaderMap, wait: Duration) {
    headers.insert(RETRY_AFTER, retry_after_secs(wait).into());
}

/// Whole seconds to tell a refused client to wait: `wait` rounded up, and
/// at least 1, so that no client is told to retry at once.
pub fn retry_after_secs(wait: Duration) -> u64 {
    ceil_secs(wait).max(1)
}

/// `d` in whole seconds, rounded up.
fn ceil_secs(d: Duration) -> u64 {
    d.as_secs().saturating_add(u64::from(d.subsec_nanos() > 0))
}

/// Formats `d` the way Go's `time.Duration` prints, to the millisecond
/// (rounded up, so a reset is never announced early): `0s`, `20ms`, `1s`,
/// `1.5s`, `6m0s`, `2h30m0s`. This is the format of OpenAI's
/// `x-ratelimit-reset-*` values.
pub fn go_duration(d: Duration) -> String {
    let mut text = ValueText::default();
    let range = text.push_go_duration(d);
    std::str::from_utf8(&text.bytes[range])
        .expect("digits, '.' and unit letters")
        .to_owned()
}

/// Several header values' text in one buffer on the stack, shared by
/// every value made of it (one allocation for them all, where a value
/// each would be one allocation each): OpenAI's six values (four numbers
/// of at most 20 digits and two Go durations of at most 22 bytes), or
/// any others as short. It holds 128 bytes; a push past them panics.
pub struct ValueText {
    bytes: [u8; 128],
    len: usize,
}

impl Default for ValueText {
    fn default() -> Self {
        ValueText {
            bytes: [0; 128],
            len: 0,
        }
    }
}

impl ValueText {
    /// Appends `text`; where it lies.
    #[inline]
    pub fn push(&mut self, text: &[u8]) -> std::ops::Range<usize> {
        let start = self.len;
        self.bytes[start..start + text.len()].copy_from_slice(text);
        self.len += text.len();
        start..self.len
    }

    /// Appends `d` as a Go duration (see [`go_duration`]); where it lies.
    /// The longest, `Duration::MAX`'s, is `5124095576030431h0m16s` (22
    /// bytes).
    pub fn push_go_duration(&mut self, d: Duration) -> std::ops::Range<usize> {
        let start = self.len;
        // Whole seconds and milliseconds, rounded up, in u64 (a u128
        // division is a call into the compiler's runtime); the carry out of
        // `Duration::MAX`'s last second, 2^64 seconds, is the one exception.
        let millis = d.subsec_nanos().div_ceil(1_000_000);
        let whole = d.as_secs().checked_add(u64::from(millis / 1_000));
        let frac = (millis % 1_000) as u16;
        let mut digits = itoa::Buffer::new();
        if whole == Some(0) {
            if frac == 0 {
                self.push(b"0s");
            } else {
                self.push(digits.format(frac).as_bytes());
                self.push(b"ms");
            }
            return start..self.len;
        }
        let (hours, minutes, seconds) = match whole {
            Some(secs) => (secs / 3_600, secs / 60 % 60, secs % 60),
            None => {
                let secs = u128::from(u64::MAX) + 1;
                let split = |n: u128| u64::try_from(n).expect("below 2^64");
                (split(secs / 3_600), split(secs / 60 % 60), split(secs % 60))
            }
        };
        // Go writes the hours if any, then the minutes if any hours or
        // minutes, then always the seconds: `2h0m5s`, `6m0s`, `5s`.
        if hours > 0 {
            self.push(digits.format(hours).as_bytes());
            self.push(b"h");
        }
        if hours > 0 || minutes > 0 {
            self.push(digits.format(minutes).as_bytes());
            self.push(b"m");
        }
        self.push(digits.format(seconds).as_bytes());
        if frac > 0 {
            // Three digits, without the trailing zeros: `.5`, `.02`, `.999`.
            let three = [frac / 100, frac / 10 % 10, frac % 10].map(|d| b'0' + d as u8);
            let kept = 3 - three.iter().rev().take_while(|&&d| d == b'0').count();
            self.push(b".");
            self.push(&three[..kept]);
        }
        self.push(b"s");
        start..self.len
    }

    /// The header value of each range a push returned, all sharing the
    /// one allocation made here. The pushed text must be a valid header
    /// value (digits, dots, letters).
    pub fn into_values(self) -> impl Fn(std::ops::Range<usize>) -> HeaderValue {
        let shared = Bytes::from_owner(self.bytes);
        move |range| {
            HeaderValue::from_maybe_shared(shared.slice(range))
                .expect("digits, '.' and unit letters make a valid header value")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn go_durations_match_openai_values() {
        let cases = [
            (Duration::ZERO, "0s"),
            (ms(20), "20ms"),
            (ms(999), "999ms"),
            (ms(1_000), "1s"),
            (ms(1_500), "1.5s"),
            (ms(1_020), "1.02s"),
            (ms(59_999), "59.999s"),
            (ms(60_000), "1m0s"),
            (ms(360_000), "6m0s"),
            (ms(3_600_000), "1h0m0s"),
            (ms(2 * 3_600_000 + 5_000), "2h0m5s"),
            (ms(9_000_000), "2h30m0s"),
            (ms(90_061_001), "25h1m1.001s"),
        ];
        for (d, want) in cases {
            assert_eq!(go_duration(d), want, "{d:?}");
        }
    }

    #[test]
    fn go_durations_round_up_to_the_millisecond() {
        assert_eq!(go_duration(Duration::from_nanos(1)), "1ms");
        assert_eq!(go_duration(Duration::from_micros(20_001)), "21ms");
        assert_eq!(go_duration(Duration::from_micros(999_001)), "1s");
    }

    /// Go's format as first written: in milliseconds, in u128.
    fn go_duration_in_u128(d: Duration) -> String {
        let millis = d.as_millis() + u128::from(!d.subsec_nanos().is_multiple_of(1_000_000));
        if millis < 1_000 {
            return if millis == 0 {
                "0s".into()
            } else {
                format!("{millis}ms")
            };
        }
        let (secs, frac) = (millis / 1_000, millis % 1_000);
        let (h, m, s) = (secs / 3_600, secs / 60 % 60, secs % 60);
        let mut out = String::new();
        if h > 0 {
            out += &format!("{h}h");
        }
        if secs >= 60 {
            out += &format!("{m}m");
        }
        out += &s.to_string();
        if frac > 0 {
            out += format!(".{frac:03}").trim_end_matches('0');
        }
        out + "s"
    }

    #[test]
    fn go_durations_agree_with_the_u128_arithmetic() {
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..20_000 {
            let shift = next() % 64;
            let d = Duration::new(next() >> shift, (next() % 1_000_000_000) as u32);
            assert_eq!(go_duration(d), go_duration_in_u128(d), "{d:?}");
        }
        for secs in [0, 1, 59, 60, 3_599, 3_600, u64::MAX - 1, u64::MAX] {
            for nanos in [0, 1, 999_999, 1_000_000, 999_000_001, 999_999_999] {
                let d = Duration::new(secs, nanos);
                assert_eq!(go_duration(d), go_duration_in_u128(d), "{d:?}");
            }
        }
    }

    #[test]
    fn go_durations_of_huge_values_do_not_panic() {
        assert_eq!(go_duration(Duration::MAX), "5124095576030431h0m16s");
        assert_eq!(
            go_duration(Duration::MAX - ms(1)),
            "5124095576030431h0m15.999s"
        );
    }

    #[test]
    fn the_longest_values_fit_in_one_buffer() {
        let widest = RateLimitSnapshot {
            token_limit: u64::MAX,
            tokens_remaining: u64::MAX,
            calls_limit: u64::MAX,
            calls_remaining: u64::MAX,
            tokens_reset: Duration::MAX,
            calls_reset: Duration::MAX - ms(1),
            tokens_window: Duration::MAX,
            calls_window: Duration::MAX,
        };
        let mut headers = HeaderMap::new();
        widest.write_openai(&mut headers);
        assert_eq!(headers.len(), 6);
        assert_eq!(
            headers[X_RATELIMIT_LIMIT_TOKENS],
            u64::MAX.to_string().as_str()
        );
        assert_eq!(
            headers[X_RATELIMIT_REMAINING_REQUESTS],
            u64::MAX.to_string().as_str()
        );
        assert_eq!(
            headers[X_RATELIMIT_RESET_TOKENS],
            go_duration(Duration::MAX).as_str()
        );
        assert_eq!(
            headers[X_RATELIMIT_RESET_REQUESTS],
            go_duration(Duration::MAX - ms(1)).as_str()
        );
    }

    #[test]
    fn retry_after_rounds_up_and_is_never_zero() {
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_nanos(1)), 1);
        assert_eq!(retry_after_secs(ms(300)), 1);
        assert_eq!(retry_after_secs(ms(1_000)), 1);
        assert_eq!(retry_after_secs(ms(1_001)), 2);
        assert_eq!(retry_after_secs(ms(42_000)), 42);
        assert_eq!(retry_after_secs(Duration::MAX), u64::MAX);
    }

    fn snapshot() -> RateLimitSnapshot {
        RateLimitSnapshot {
            token_limit: 10_000,
            tokens_remaining: 8_766,
            calls_limit: 100,
            calls_remaining: 99,
            calls_reset: ms(41_200),
            calls_window: ms(60_000),
            tokens_reset: ms(41_200),
            tokens_window: ms(60_000),
        }
    }

    #[test]
    fn ietf_fields_follow_the_draft_syntax() {
        let s = snapshot();
        assert_eq!(
            s.ietf_policy(),
            r#""tokens";q=10000;w=60, "requests";q=100;w=60"#
        );
        assert_eq!(
            s.ietf_state(),
            r#""tokens";r=8766;t=42, "requests";r=99;t=42"#
        );
    }

    #[test]
    fn openai_headers_carry_limits_remainders_and_resets() {
        let mut headers = HeaderMap::new();
        snapshot().write_openai(&mut headers);
        let get = |name: HeaderName| headers[name].to_str().unwrap().to_owned();
        assert_eq!(get(X_RATELIMIT_LIMIT_REQUESTS), "100");
        assert_eq!(get(X_RATELIMIT_LIMIT_TOKENS), "10000");
        assert_eq!(get(X_RATELIMIT_REMAINING_REQUESTS), "99");
        assert_eq!(get(X_RATELIMIT_REMAINING_TOKENS), "8766");
        assert_eq!(get(X_RATELIMIT_RESET_REQUESTS), "41.2s");
        assert_eq!(get(X_RATELIMIT_RESET_TOKENS), "41.2s");
        let mut headers = HeaderMap::new();
        snapshot().write_ietf(&mut headers);
        assert_eq!(headers.len(), 2);
    }

    /// A key (5 calls a minute, plenty of tokens) under a team (1,000
    /// tokens an hour, plenty of calls), on a mock clock; 4 requests of 200
    /// tokens made, 1.5 s into both windows.
    fn nested() -> (agent_budget::BudgetManager, AgentId, AgentId) {
        use agent_budget::{BudgetLimit, BudgetManager};
        let (clock, mock) = quanta::Clock::mock();
        let budgets = BudgetManager::with_clock(clock);
        let (key, team) = (AgentId::from_u128(1), AgentId::from_u128(2));
        budgets.set_budget(BudgetLimit {
            agent_id: key,
            token_budget: 1_000_000,
            calls_budget: 5,
            window_secs: 60,
        });
        budgets.set_budget(BudgetLimit {
            agent_id: team,
            token_budget: 1_000,
            calls_budget: 1_000_000,
            window_secs: 3_600,
        });
        budgets.set_parent(&key, Some(&team)).unwrap();
        for _ in 0..4 {
            budgets.acquire(&key, 200, 1).unwrap().settle(200);
        }
        mock.increment(ms(1_500));
        (budgets, key, team)
    }

    use agent_budget::AgentId;

    #[test]
    fn under_a_parent_each_resource_reports_the_level_that_binds_it() {
        let (budgets, key, _) = nested();
        let s = RateLimitSnapshot::from_chain(&budgets.chain_info(&key)).unwrap();
        // Tokens: the team's 200 left of 1,000 an hour.
        assert_eq!((s.token_limit, s.tokens_remaining), (1_000, 200));
        assert_eq!(
            (s.tokens_window, s.tokens_reset),
            (ms(3_600_000), ms(3_598_000))
        );
        // Calls: the key's 1 left of 5 a minute.
        assert_eq!((s.calls_limit, s.calls_remaining), (5, 1));
        assert_eq!((s.calls_window, s.calls_reset), (ms(60_000), ms(58_000)));
        let mut headers = HeaderMap::new();
        s.write_openai(&mut headers);
        assert_eq!(headers[X_RATELIMIT_RESET_TOKENS], "59m58s");
        assert_eq!(headers[X_RATELIMIT_RESET_REQUESTS], "58s");
        assert_eq!(
            s.ietf_policy(),
            r#""tokens";q=1000;w=3600, "requests";q=5;w=60"#
        );
        assert_eq!(
            s.ietf_state(),
            r#""tokens";r=200;t=3598, "requests";r=1;t=58"#
        );
        assert_eq!(RateLimitSnapshot::from_chain(&[]), None);
    }

    /// A level of a chain with `tokens` and `calls` left of limits that
    /// tell the levels apart.
    fn level(id: u128, tokens: u64, calls: u64, window_secs: u64) -> agent_budget::FullBudgetInfo {
        agent_budget::FullBudgetInfo {
            agent_id: AgentId::from_u128(id),
            token_limit: 1_000 * id as u64,
            tokens_used: 0,
            tokens_remaining: tokens,
            calls_limit: 10 * id as u64,
            calls_used: 0,
            calls_remaining: calls,
            window_secs,
            window_remaining_secs: window_secs / 2,
            is_exhausted: false,
        }
    }

    #[test]
    fn on_a_tie_the_nearest_level_binds() {
        // Key, team, org: the team ties the key on tokens and the org on
        // calls; the nearest of each tie is reported.
        let chain = [
            level(1, 50, 9, 60),
            level(2, 50, 3, 3_600),
            level(3, 70, 3, 86_400),
        ];
        let s = RateLimitSnapshot::from_chain(&chain).unwrap();
        assert_eq!((s.token_limit, s.tokens_remaining), (1_000, 50), "the key");
        assert_eq!(s.tokens_window, ms(60_000));
        assert_eq!((s.calls_limit, s.calls_remaining), (20, 3), "the team");
        assert_eq!(s.calls_window, ms(3_600_000));
        // Every level tied: the agent's own.
        let chain = [
            level(1, 5, 5, 60),
            level(2, 5, 5, 3_600),
            level(3, 5, 5, 86_400),
        ];
        let s = RateLimitSnapshot::from_chain(&chain).unwrap();
        assert_eq!((s.token_limit, s.calls_limit), (1_000, 10));
        // A strictly smaller ancestor still wins.
        let chain = [level(1, 5, 5, 60), level(2, 4, 6, 3_600)];
        let s = RateLimitSnapshot::from_chain(&chain).unwrap();
        assert_eq!((s.token_limit, s.calls_limit), (2_000, 10));
    }

    #[test]
    fn a_refusal_reports_the_refusing_level_with_its_exact_reset() {
        let (budgets, key, team) = nested();
        let chain = || budgets.chain_info(&key);
        // 300 tokens: the team, 200 left, refuses.
        let refused = budgets.acquire(&key, 300, 1).unwrap_err();
        assert_eq!(
            (refused.refused_by, refused.kind),
            (team, BudgetKind::Token)
        );
        let s = RateLimitSnapshot::from_refusal(&chain(), &refused).unwrap();
        assert_eq!((s.token_limit, s.tokens_remaining), (1_000, 200));
        assert_eq!(s.tokens_reset, ms(3_598_500), "the refusal's own wait");
        assert_eq!((s.calls_limit, s.calls_reset), (5, ms(58_000)));
        // The key's last call, then its calls refuse.
        budgets.acquire(&key, 1, 1).unwrap().settle(1);
        let refused = budgets.acquire(&key, 1, 1).unwrap_err();
        assert_eq!((refused.refused_by, refused.kind), (key, BudgetKind::Call));
        let s = RateLimitSnapshot::from_refusal(&chain(), &refused).unwrap();
        assert_eq!((s.calls_limit, s.calls_remaining), (5, 0));
        assert_eq!(s.calls_reset, ms(58_500));
        assert_eq!((s.token_limit, s.tokens_reset), (1_000, ms(3_598_000)));
    }

    #[test]
    fn a_refusal_at_the_agent_itself_resets_both_resources_exactly() {
        use agent_budget::{BudgetLimit, BudgetManager};
        let (clock, mock) = quanta::Clock::mock();
        let budgets = BudgetManager::with_clock(clock);
        let agent = AgentId::from_u128(7);
        budgets.set_budget(BudgetLimit {
            agent_id: agent,
            token_budget: 100,
            calls_budget: 10,
            window_secs: 60,
        });
        mock.increment(ms(1_250));
        let refused = budgets.acquire(&agent, 101, 1).unwrap_err();
        assert_eq!(refused.retry_after, None, "larger than the limit");
        let refused = budgets
            .acquire(&agent, 60, 1)
            .map(|r| r.settle(60))
            .and_then(|_| budgets.acquire(&agent, 60, 1))
            .unwrap_err();
        let s = RateLimitSnapshot::from_refusal(&budgets.chain_info(&agent), &refused).unwrap();
        assert_eq!((s.tokens_reset, s.calls_reset), (ms(58_750), ms(58_750)));
        assert_eq!((s.tokens_remaining, s.calls_remaining), (40, 9));
    }
}
