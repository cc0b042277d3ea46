//! [`OpenAiEstimator`]: reads an OpenAI-style request to estimate it.
//!
//! # How it works
//!
//! The path is [normalized](crate::path::normalize) first (a path that
//! cannot be is `400`), and the request goes on with the normalized path,
//! so the endpoint it was estimated as is the one it reaches. Then:
//!
//! | request | estimate |
//! |---|---|
//! | `POST` to chat completions, completions, responses or embeddings | the body is read whole (up to a limit: `413` beyond it; `415` if it is compressed, a `Content-Encoding` other than `identity`), estimated by [`estimate_body`](super::estimate_body) (`400` if it is not a valid request), and put back, rewritten if the upstream must be asked for a stream's usage |
//! | `GET` or `HEAD` (a read: models, files, a stored response) | the reads' [`FixedCost`]: one call and no tokens by default; a read with a body is `400` (an upstream that routed it like a `POST` would serve tokens nobody estimated) |
//! | anything else (another `POST`, `PUT`, `DELETE`, …) | [`OtherRequests`]: refused with `404` by default, nothing forwarded; or a fixed cost, settled from the `usage` its response may report |
//!
//! The prompt is counted with the estimator's [`TokenCounter`] before
//! admission, or, with [`PromptCount::WhenTight`], bounded at one token per
//! byte of its text and counted only where that bound does not fit the
//! budget (see [`DeferredCount`]).

use std::future::Future;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use http::header::{HeaderValue, CONTENT_LENGTH};
use http::{Method, Request};
use http_body::Body;

use super::request::{
    estimate_bytes, prompt_tokens, ByteCount, Endpoint, EstimateOptions, RequestEstimate,
    TokenCounter,
};
use crate::path::normalize_uri;
use crate::{CountTokens, DeferredCount, Estimate, Estimator, FixedCost, Rejection};

/// What [`OpenAiEstimator`] does with a request it cannot estimate: one
/// that is neither a read (`GET`, `HEAD`) nor a `POST` to an endpoint whose
/// body says what it costs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OtherRequests {
    /// Refused with `404`, nothing forwarded or charged (the default: an
    /// endpoint the estimator does not know may consume tokens it would
    /// not see coming).
    #[default]
    Refuse,
    /// Admitted at this cost (its tokens reserved like any estimate), and
    /// settled from the `usage` the response reports, if it does.
    Fixed(FixedCost),
}

/// When [`OpenAiEstimator`] counts a prompt with its [`TokenCounter`].
///
/// A tokenizer's count costs far more than the rest of the check (about
/// 37,000 instructions for a 35-token prompt with `bpe-openai`'s o200k,
/// where the whole layer costs 30,000 more), and it is an estimate all the
/// same: the settle replaces it with the upstream's usage. Only where the
/// budget is tight does the tighter figure decide anything.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PromptCount {
    /// Before every admission (the default).
    #[default]
    Always,
    /// Only where it matters. The prompt is first reserved at one token
    /// per byte of its text ([`ByteCount`]: an upper bound of the count
    /// of a byte-level BPE tokenizer, GPT's or Llama 3's, about four times
    /// it for English), and the count is deferred
    /// ([`DeferredCount`](crate::DeferredCount)): the layer has it made
    /// when the bound does not fit the budget (the request is then
    /// admitted, or refused, on the count), and when the prompt alone is
    /// charged (a client that hung up, a response without usage). Settles
    /// are the upstream's usage either way.
    ///
    /// The price: a request in flight holds its bound until its response
    /// ends, so near a budget's end a request can be refused (or wait)
    /// for room that the requests in flight would not have held had they
    /// been counted, at most three quarters of their prompts' bytes. The
    /// counter must never count more tokens than a text has bytes.
    WhenTight,
}

/// Estimates OpenAI-style requests from their JSON bodies, counting the
/// prompt with a [`TokenCounter`] (the conservative [`ByteCount`] unless
/// given a tokenizer).
pub struct OpenAiEstimator<C = ByteCount> {
    counter: Arc<C>,
    options: EstimateOptions,
    /// The counting of each metered endpoint's prompt, for
    /// [`PromptCount::WhenTight`]'s deferred counts: built with the
    /// options, shared by every request.
    deferred: [Arc<CountTokens>; 4],
    max_body_bytes: usize,
    reads: FixedCost,
    other: OtherRequests,
    prompt_count: PromptCount,
}

impl<C> Clone for OpenAiEstimator<C> {
    fn clone(&self) -> Self {
        OpenAiEstimator {
            counter: self.counter.clone(),
            options: self.options,
            deferred: self.deferred.clone(),
            max_body_bytes: self.max_body_bytes,
            reads: self.reads,
            other: self.other,
            prompt_count: self.prompt_count,
        }
    }
}

impl<C> std::fmt::Debug for OpenAiEstimator<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenAiEstimator")
            .field("options", &self.options)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("reads", &self.reads)
            .field("other", &self.other)
            .field("prompt_count", &self.prompt_count)
            .finish_non_exhaustive()
    }
}

impl Default for OpenAiEstimator<ByteCount> {
    fn default() -> Self {
        Self::new(ByteCount)
    }
}

impl<C: TokenCounter> OpenAiEstimator<C> {
    /// Counts prompts with `counter`; bodies up to 16 MiB; reads cost one
    /// call; other requests are refused.
    pub fn new(counter: C) -> Self {
        let counter = Arc::new(counter);
        let options = EstimateOptions::default();
        OpenAiEstimator {
            deferred: deferred_counts(&counter, options),
            counter,
            options,
            max_body_bytes: 16 << 20,
            reads: FixedCost::default(),
            other: OtherRequests::default(),
            prompt_count: PromptCount::default(),
        }
    }

    /// Sets the defaults for requests without a maximum.
    pub fn options(mut self, options: EstimateOptions) -> Self {
        self.options = options;
        self.deferred = deferred_counts(&self.counter, options);
        self
    }

    /// Sets the largest body read (`413` beyond it).
    pub fn max_body_bytes(mut self, bytes: usize) -> Self {
        self.max_body_bytes = bytes;
        self
    }

    /// Sets the cost of reads (`GET`, `HEAD`): one call and no tokens
    /// unless set here.
    pub fn reads(mut self, cost: FixedCost) -> Self {
        self.reads = cost;
        self
    }

    /// Sets what happens to requests that are neither reads nor `POST`s to
    /// an endpoint estimated from its body.
    pub fn other_requests(mut self, other: OtherRequests) -> Self {
        self.other = other;
        self
    }

    /// Sets when prompts are counted with the counter: before every
    /// admission ([`PromptCount::Always`], the default), or only where the
    /// budget is tight ([`PromptCount::WhenTight`]).
    pub fn prompt_count(mut self, when: PromptCount) -> Self {
        self.prompt_count = when;
        self
    }

    /// The estimate of a body (read whole) to `endpoint`, with its prompt
    /// counted or bounded as configured.
    fn estimate_body(&self, endpoint: Endpoint, body: &Bytes) -> Result<RequestEstimate, String> {
        match self.prompt_count {
            PromptCount::Always => estimate_bytes(endpoint, body, &*self.counter, &self.options),
            PromptCount::WhenTight => {
                let mut bounded = estimate_bytes(endpoint, body, &ByteCount, &self.options)?;
                let count = match endpoint {
                    Endpoint::Chat => &self.deferred[0],
                    Endpoint::Completions => &self.deferred[1],
                    Endpoint::Responses => &self.deferred[2],
                    _ => &self.deferred[3],
                };
                bounded.estimate.deferred_count =
                    Some(DeferredCount::new(count.clone(), body.clone()));
                Ok(bounded)
            }
        }
    }

    /// What `request`'s method and (normalized) path cost, when the body
    /// need not be read: `None` for a `POST` to a metered endpoint.
    fn cost_without_body<B: Body>(
        &self,
        request: &Request<B>,
        endpoint: Endpoint,
    ) -> Option<Result<Estimate, Rejection>> {
        let method = request.method();
        if method == Method::GET || method == Method::HEAD {
            return Some(if request.body().size_hint().upper() == Some(0) {
                Ok(self.reads.estimate())
            } else {
                Err(Rejection::bad_request(format!(
                    "a {method} request must not have a body"
                )))
            });
        }
        if method == Method::POST && endpoint != Endpoint::Other {
            return None;
        }
        Some(match self.other {
            OtherRequests::Fixed(cost) => Ok(cost.estimate()),
            OtherRequests::Refuse => Err(Rejection::not_found(format!(
                "{method} {} is not forwarded: the budget is enforced on chat completions, \
                 completions, responses and embeddings (POST), and on reads (GET)",
                request.uri().path()
            ))),
        })
    }
}

impl<B, C> Estimator<B> for OpenAiEstimator<C>
where
    B: Body<Data = Bytes> + From<Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    C: TokenCounter,
{
    fn estimate(
        &self,
        mut request: Request<B>,
    ) -> impl Future<Output = Result<(Request<B>, Estimate), Rejection>> + Send {
        let this = self;
        async move {
            match normalize_uri(request.uri()) {
                Ok(None) => {}
                Ok(Some(uri)) => *request.uri_mut() = uri,
                Err(e) => return Err(Rejection::bad_request(e.to_string())),
            }
            let endpoint = Endpoint::of_path(request.uri().path());
            if let Some(cost) = this.cost_without_body(&request, endpoint) {
                return cost.map(|estimate| (request, estimate));
            }
            let (mut parts, body) = request.into_parts();
            // A compressed body cannot be estimated, and forwarding it
            // unread would take it past the budget: refused, with why
            // (not the JSON error its bytes would give).
            if let Some(encoding) = super::compression(&parts.headers) {
                return Err(Rejection::unsupported_media_type(format!(
                    "the request body has `Content-Encoding: {}`; the budget is estimated \
                     from the body, so send it uncompressed",
                    String::from_utf8_lossy(encoding.as_bytes())
                )));
            }
            let bytes = read_body(body, this.max_body_bytes).await?;
            let estimated = if bytes.len() > BLOCKING_ESTIMATE_BYTES
                && tokio::runtime::Handle::try_current().is_ok()
            {
                // Parsing and counting a large body takes milliseconds to
                // seconds: off the worker, so other clients are not stalled.
                let (estimator, body) = (this.clone(), bytes.clone());
                tokio::task::spawn_blocking(move || estimator.estimate_body(endpoint, &body))
                    .await
                    .map_err(|e| e.to_string())
                    .and_then(|estimated| estimated)
            } else {
                this.estimate_body(endpoint, &bytes)
            }
            .map_err(Rejection::bad_request)?;
            let body = match estimated.rewritten_body {
                Some(rewritten) => {
                    parts
                        .headers
                        .insert(CONTENT_LENGTH, HeaderValue::from(rewritten.len()));
                    rewritten
                }
                None => bytes,
            };
            Ok((
                Request::from_parts(parts, B::from(body)),
                estimated.estimate,
            ))
        }
    }

    /// One token and one call for a `POST` to a metered endpoint (every
    /// estimate of one is at least that); `None` for the rest, which are
    /// admitted without their body being read.
    fn floor(&self, request: &Request<B>) -> Option<(u64, u64)> {
        if request.method() != Method::POST {
            return None;
        }
        let normalized = normalize_uri(request.uri()).ok()?;
        let path = normalized
            .as_ref()
            .map_or_else(|| request.uri().path(), |uri| uri.path());
        (Endpoint::of_path(path) != Endpoint::Other).then_some((1, 1))
    }
}

/// A body larger than this is estimated on tokio's blocking threads.
const BLOCKING_ESTIMATE_BYTES: usize = 64 << 10;

/// How each metered endpoint's prompt is counted later: chat,
/// completions, responses, embeddings. Only bodies [`estimate_body`]
/// accepted (with the byte count: the parse does not depend on the
/// counter) are counted, so the fallback of one is never taken.
fn deferred_counts<C: TokenCounter>(
    counter: &Arc<C>,
    options: EstimateOptions,
) -> [Arc<CountTokens>; 4] {
    [
        Endpoint::Chat,
        Endpoint::Completions,
        Endpoint::Responses,
        Endpoint::Embeddings,
    ]
    .map(|endpoint| {
        let counter = counter.clone();
        Arc::new(move |body: &[u8]| prompt_tokens(endpoint, body, &*counter, &options).unwrap_or(1))
            as Arc<CountTokens>
    })
}

/// Reads `body` whole: `413` beyond `limit` bytes (at once if its length
/// says so), `400` if it fails. A body of one chunk, the usual (hyper hands
/// a small body over in one), is kept as it came, and a body that says it
/// has ended is not polled again.
async fn read_body<B>(body: B, limit: usize) -> Result<Bytes, Rejection>
where
    B: Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let too_large =
        || Rejection::too_large(format!("the request body is larger than {limit} bytes"));
    let hint_lower = body.size_hint().lower();
    if hint_lower > limit as u64 {
        return Err(too_large());
    }
    let mut body = std::pin::pin!(body);
    let (mut first, mut joined): (Option<Bytes>, Option<BytesMut>) = (None, None);
    let mut length = 0usize;
    while !body.is_end_stream() {
        let Some(frame) = std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await else {
            break;
        };
        let frame = frame.map_err(|e| {
            let e = e.into();
            // A server's body deadline, however many wrappers deep.
            let timed_out =
                std::iter::successors(Some(&*e as &(dyn std::error::Error + 'static)), |e| {
                    e.source()
                })
                .any(|e| {
                    e.downcast_ref::<std::io::Error>()
                        .is_some_and(|e| e.kind() == std::io::ErrorKind::TimedOut)
                });
            if timed_out {
                Rejection::new(
                    http::StatusCode::REQUEST_TIMEOUT,
                    format!("the request body was not read: {e}"),
                    "invalid_request_error",
                    "request_timeout",
                )
            } else {
                Rejection::bad_request(format!("cannot read the request body: {e}"))
            }
        })?;
        // Trailers say nothing about the cost.
        let Ok(data) = frame.into_data() else {
            continue;
        };
        length = length.saturating_add(data.len());
        if length > limit {
            return Err(too_large());
        }
        match (&first, &mut joined) {
            (None, _) => first = Some(data),
            (Some(_), Some(joined)) => joined.extend_from_slice(&data),
            (Some(head), None) => {
                // Room for the whole body at once where its length is
                // known: growing by doubling would hold twice as much.
                let expected = (hint_lower as usize).clamp(length, limit);
                let mut both = BytesMut::with_capacity(expected);
                both.extend_from_slice(head);
                both.extend_from_slice(&data);
                joined = Some(both);
            }
        }
    }
    Ok(match joined {
        Some(joined) => joined.freeze(),
        None => first.unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::header::CONTENT_ENCODING;
    use http::StatusCode;
    use http_body_util::{BodyExt, Full};

    fn request(method: &str, uri: &str, body: &'static str) -> Request<Full<Bytes>> {
        Request::builder()
            .method(method)
            .uri(uri)
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .unwrap()
    }

    fn run<C: TokenCounter>(
        estimator: &OpenAiEstimator<C>,
        request: Request<Full<Bytes>>,
    ) -> Result<(Request<Full<Bytes>>, Estimate), Rejection> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        runtime.block_on(estimator.estimate(request))
    }

    #[test]
    fn a_compressed_body_is_refused_with_why_and_an_identity_one_is_read() {
        let e = OpenAiEstimator::default();
        let body = r#"{"messages":[],"max_tokens":7}"#;
        let mut gzipped = request("POST", "/v1/chat/completions", body);
        gzipped
            .headers_mut()
            .insert(CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        let rejection = run(&e, gzipped).unwrap_err();
        assert_eq!(rejection.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
        assert!(
            rejection.message.contains("Content-Encoding: gzip"),
            "{}",
            rejection.message
        );
        let mut identity = request("POST", "/v1/chat/completions", body);
        identity
            .headers_mut()
            .insert(CONTENT_ENCODING, HeaderValue::from_static("Identity"));
        let (_, estimate) = run(&e, identity).unwrap();
        assert_eq!(estimate.completion_tokens, 7);
    }

    #[test]
    fn a_post_is_estimated_at_the_normalized_path_which_is_what_goes_on() {
        let e = OpenAiEstimator::default();
        let (forwarded, estimate) = run(
            &e,
            request(
                "POST",
                "/v1//chat/%63ompletions?x=%2F",
                r#"{"messages":[],"max_tokens":7}"#,
            ),
        )
        .unwrap();
        assert_eq!(forwarded.uri().path(), "/v1/chat/completions");
        assert_eq!(forwarded.uri().query(), Some("x=%2F"));
        assert_eq!(estimate.completion_tokens, 7);
    }

    /// One token per word, and how many times it counted.
    #[derive(Default)]
    struct Words(std::sync::atomic::AtomicU64);

    impl TokenCounter for Words {
        fn count(&self, text: &str) -> u64 {
            self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            text.split_whitespace().count() as u64
        }
    }

    #[test]
    fn counted_when_tight_a_prompt_is_bounded_by_its_bytes_and_counted_on_demand() {
        let e = OpenAiEstimator::new(Words::default()).prompt_count(PromptCount::WhenTight);
        let body = r#"{"messages":[{"role":"user","content":"one two three"}],"max_tokens":5,"stream":true}"#;
        let (forwarded, mut estimate) =
            run(&e, request("POST", "/v1/chat/completions", body)).unwrap();
        // 3 + 13 bytes + 3, and nothing counted yet.
        assert_eq!(estimate.prompt_tokens, 19);
        assert_eq!(e.counter.0.load(std::sync::atomic::Ordering::Relaxed), 0);
        assert!(
            estimate.hide_usage_chunk,
            "the stream is still asked for usage"
        );
        assert_eq!(
            forwarded.headers()[CONTENT_LENGTH],
            (body.len() + r#","stream_options":{"include_usage":true}"#.len()).to_string()
        );
        // Counted when asked for.
        assert_eq!(estimate.counted_prompt_tokens(), 3 + 3 + 3);
        assert_eq!(estimate.clone().counted_tokens(), 9 + 5);
        assert_eq!(e.counter.0.load(std::sync::atomic::Ordering::Relaxed), 2);
        assert!(estimate.count_prompt());
        assert_eq!((estimate.prompt_tokens, estimate.tokens()), (9, 14));
        assert_eq!(estimate.deferred_count, None);
        assert!(!estimate.count_prompt(), "counted already");

        // Always (the default) counts before admission.
        let e = OpenAiEstimator::new(Words::default());
        let (_, estimate) = run(&e, request("POST", "/v1/chat/completions", body)).unwrap();
        assert_eq!((estimate.prompt_tokens, estimate.deferred_count), (9, None));
    }

    #[test]
    fn the_bound_is_never_below_the_count() {
        let e = OpenAiEstimator::new(Words::default()).prompt_count(PromptCount::WhenTight);
        for (path, body) in [
            (
                "/v1/chat/completions",
                r#"{"messages":[{"role":"user","content":"a b c","name":"x y"},{"role":"assistant","content":null,"tool_calls":[{"id":"a b"}]}],"tools":[{"x":"y z"}]}"#,
            ),
            (
                "/v1/chat/completions",
                r#"{"messages":[{"content":[{"type":"text","text":"é ü"},{"type":"image_url"}]}]}"#,
            ),
            (
                "/v1/chat/completions",
                r#"{"messages":[{"content":"\u00e9\n\t x"}]}"#,
            ),
            ("/v1/chat/completions", r#"{"messages":[]}"#),
            ("/v1/completions", r#"{"prompt":["a b","c"],"n":2}"#),
            ("/v1/completions", r#"{"prompt":[1,2,3]}"#),
            (
                "/v1/responses",
                r#"{"instructions":"be brief","input":[{"role":"user","content":"hi there"},{"type":"function_call","arguments":"{}"}]}"#,
            ),
            ("/v1/embeddings", r#"{"input":""}"#),
        ] {
            let (_, estimate) = run(&e, request("POST", path, body)).unwrap();
            let counted = estimate.counted_prompt_tokens();
            assert!(
                estimate.prompt_tokens >= counted && counted >= 1,
                "{body}: bound {} < count {counted}",
                estimate.prompt_tokens
            );
        }
    }

    fn read(
        body: impl Body<Data = Bytes, Error = std::io::Error>,
        limit: usize,
    ) -> Result<Bytes, Rejection> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        runtime.block_on(read_body(body, limit))
    }

    /// A body of `frames`, of unknown length.
    fn streamed(
        frames: Vec<Result<http_body::Frame<Bytes>, std::io::Error>>,
    ) -> impl Body<Data = Bytes, Error = std::io::Error> {
        http_body_util::StreamBody::new(futures_util::stream::iter(frames))
    }

    fn data(text: &'static str) -> Result<http_body::Frame<Bytes>, std::io::Error> {
        Ok(http_body::Frame::data(Bytes::from_static(text.as_bytes())))
    }

    fn whole(text: &'static str) -> impl Body<Data = Bytes, Error = std::io::Error> {
        Full::new(Bytes::from_static(text.as_bytes())).map_err(|e| match e {})
    }

    #[test]
    fn a_body_of_one_chunk_is_kept_as_it_came() {
        let text = r#"{"messages":[]}"#;
        let read = read(whole(text), 100).unwrap();
        assert_eq!(read.as_ptr(), text.as_ptr(), "not copied");
        assert_eq!(read, text);
    }

    #[test]
    fn chunks_are_joined_and_trailers_skipped() {
        let trailers = Ok(http_body::Frame::trailers(http::HeaderMap::new()));
        let body = streamed(vec![data(r#"{"a""#), data(":"), trailers, data("1}")]);
        assert_eq!(read(body, 100).unwrap(), r#"{"a":1}"#);
        assert_eq!(read(streamed(vec![]), 100).unwrap(), "");
    }

    #[test]
    fn bodies_beyond_the_limit_are_413_and_failures_400() {
        let r = read(whole("0123456789"), 9).unwrap_err();
        assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
        let r = read(streamed(vec![data("01234"), data("56789")]), 9).unwrap_err();
        assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
        let fits = read(streamed(vec![data("01234"), data("5678")]), 9).unwrap();
        assert_eq!(fits, "012345678");
        let failed = streamed(vec![data("{"), Err(std::io::Error::other("reset"))]);
        let r = read(failed, 100).unwrap_err();
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        assert!(r.message.contains("reset"), "{}", r.message);
    }

    #[test]
    fn a_path_that_cannot_be_normalized_is_400() {
        let e = OpenAiEstimator::default();
        for path in ["/v1/%2e%2e/admin", "/v1/..%2fadmin", "/v1/a%zz"] {
            let r = run(&e, request("GET", path, "")).unwrap_err();
            assert_eq!(r.status, StatusCode::BAD_REQUEST, "{path}");
        }
    }

    #[test]
    fn reads_cost_a_call_and_must_have_no_body() {
        let e = OpenAiEstimator::default();
        let (_, estimate) = run(&e, request("GET", "/v1/models", "")).unwrap();
        assert_eq!((estimate.tokens(), estimate.calls), (0, 1));
        let (_, estimate) = run(&e, request("HEAD", "/v1/chat/completions", "")).unwrap();
        assert_eq!((estimate.tokens(), estimate.calls), (0, 1));
        let r = run(
            &e,
            request("GET", "/v1/chat/completions", r#"{"messages":[]}"#),
        )
        .unwrap_err();
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
    }

    #[test]
    fn other_writes_are_refused_unless_given_a_fixed_cost() {
        let e = OpenAiEstimator::default();
        for (method, path) in [
            ("POST", "/v1/audio/speech"),
            ("POST", "/v1/responses/resp_1/cancel"),
            ("PUT", "/v1/chat/completions"),
            ("DELETE", "/v1/files/f1"),
            ("POST", "/v1/chat/Completions"),
        ] {
            let r = run(&e, request(method, path, "{}")).unwrap_err();
            assert_eq!(r.status, StatusCode::NOT_FOUND, "{method} {path}");
            assert!(r.message.contains(path), "{}", r.message);
        }
        let fixed = FixedCost {
            tokens: 250,
            calls: 1,
        };
        let e = OpenAiEstimator::default().other_requests(OtherRequests::Fixed(fixed));
        let (_, estimate) = run(&e, request("POST", "/v1/audio/speech", "{}")).unwrap();
        assert_eq!(estimate, fixed.estimate());
    }
}
