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
//! the time until that window ends. Everything here is pure: a
//! [`RateLimitSnapshot`] in, header values out.

use std::fmt::Write as _;
use std::time::Duration;

use agent_budget::FullBudgetInfo;
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

/// Where an agent's budget stands, as the headers report it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimitSnapshot {
    /// Tokens admitted per window.
    pub token_limit: u64,
    /// Tokens left in the current window.
    pub tokens_remaining: u64,
    /// Calls admitted per window.
    pub calls_limit: u64,
    /// Calls left in the current window.
    pub calls_remaining: u64,
    /// Time until the current window ends.
    pub reset: Duration,
    /// Length of a window.
    pub window: Duration,
}

impl RateLimitSnapshot {
    /// The snapshot of a manager's `full_info`. Its window end is known to
    /// the second only (the core reports whole seconds, rounded down).
    pub fn from_info(info: &FullBudgetInfo) -> Self {
        RateLimitSnapshot {
            token_limit: info.token_limit,
            tokens_remaining: info.tokens_remaining,
            calls_limit: info.calls_limit,
            calls_remaining: info.calls_remaining,
            reset: Duration::from_secs(info.window_remaining_secs),
            window: Duration::from_secs(info.window_secs),
        }
    }

    /// Writes OpenAI's six `x-ratelimit-*` headers.
    pub fn write_openai(&self, headers: &mut HeaderMap) {
        headers.reserve(6);
        let reset = go_duration(self.reset);
        headers.insert(X_RATELIMIT_LIMIT_REQUESTS, self.calls_limit.into());
        headers.insert(X_RATELIMIT_LIMIT_TOKENS, self.token_limit.into());
        headers.insert(X_RATELIMIT_REMAINING_REQUESTS, self.calls_remaining.into());
        headers.insert(X_RATELIMIT_REMAINING_TOKENS, self.tokens_remaining.into());
        if let Ok(value) = HeaderValue::from_str(&reset) {
            headers.insert(X_RATELIMIT_RESET_REQUESTS, value.clone());
            headers.insert(X_RATELIMIT_RESET_TOKENS, value);
        }
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
        let w = ceil_secs(self.window);
        format!(
            "\"tokens\";q={};w={w}, \"requests\";q={};w={w}",
            self.token_limit, self.calls_limit
        )
    }

    /// The `RateLimit` value: `"tokens";r=…;t=…, "requests";r=…;t=…`.
    pub fn ietf_state(&self) -> String {
        let t = ceil_secs(self.reset);
        format!(
            "\"tokens\";r={};t={t}, \"requests\";r={};t={t}",
            self.tokens_remaining, self.calls_remaining
        )
    }
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
    let millis = d.as_millis() + u128::from(!d.subsec_nanos().is_multiple_of(1_000_000));
    if millis == 0 {
        return "0s".to_owned();
    }
    if millis < 1_000 {
        return format!("{millis}ms");
    }
    let (secs, frac) = (millis / 1_000, millis % 1_000);
    let (hours, minutes, seconds) = (secs / 3_600, secs / 60 % 60, secs % 60);
    let mut out = String::new();
    // Go writes the hours if any, then the minutes if any hours or
    // minutes, then always the seconds: `2h0m5s`, `6m0s`, `5s`.
    if hours > 0 {
        let _ = write!(out, "{hours}h");
    }
    if secs >= 60 {
        let _ = write!(out, "{minutes}m");
    }
    let _ = write!(out, "{seconds}");
    if frac > 0 {
        let digits = format!("{frac:03}");
        let _ = write!(out, ".{}", digits.trim_end_matches('0'));
    }
    out.push('s');
    out
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

    #[test]
    fn go_durations_of_huge_values_do_not_panic() {
        assert!(go_duration(Duration::MAX).ends_with('s'));
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
            reset: ms(41_200),
            window: ms(60_000),
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
}
