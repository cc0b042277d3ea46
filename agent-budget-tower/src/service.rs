//! [`BudgetLayer`] and [`BudgetService`]: the request's path through the
//! budget.
//!
//! # How it works
//!
//! For each request, the service's future:
//!
//! 1. asks the [`Identify`] who the agent is (`401` if no one);
//! 2. asks the [`Estimator`] what to reserve (`400` for a bad body);
//! 3. takes the estimate's tokens and calls in one [`Admission::admit`]
//!    (`acquire_owned` on the core's manager), or neither. Refused, and
//!    with a maximum wait configured, it waits for budget
//!    ([`Admission::admit_wait`] under a timeout) before it gives up;
//!    given up, it answers `429` with `Retry-After` and the
//!    `x-ratelimit-*` headers (`503` with `Retry-After` if the budget
//!    could not be checked), and nothing is forwarded;
//! 4. reads where the budget now stands ([`Admission::budget_chain`]:
//!    `chain_info` on the core's manager) for the admitted response's
//!    headers, and calls the inner service;
//! 5. wraps the response's body in a [`BudgetBody`] that settles the
//!    reservation with the [`Meter`]'s reading when the body ends, or when
//!    it is dropped.
//!
//! If the inner service fails (no response at all), the reservation is
//! cancelled: nothing was consumed. If the future is dropped while the
//! inner service works, the prompt's tokens stay charged.
//!
//! The manager is one `Arc` shared by the layer and every service it
//! makes, and each service keeps the rest of its state in one more `Arc`:
//! axum and hyper clone the service per connection, and every clone
//! enforces the same budgets (unlike `tower::limit::RateLimit`, whose
//! state is per clone).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use agent_budget::{AgentId, BudgetKind, BudgetManager, RefusalReason as BudgetRefusal, Refused};
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::Body;
use tower::{Layer, Service};

use crate::body::{BudgetBody, Settle, BLOCKING_COUNT_BYTES};
use crate::headers::{write_retry_after, RateLimitSnapshot};
use crate::telemetry::{CheckTimer, Observe, RefusalReason, Telemetry};
use crate::{
    Admission, AgentIdHeader, Denial, Estimate, Estimator, Identify, Meter, OpenAiEstimator,
    OpenAiUsage, PromptReceived, Rejection, UsageLog,
};

/// Which rate-limit headers responses carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeaderStyle {
    /// OpenAI's `x-ratelimit-*` headers (on by default).
    pub openai: bool,
    /// The IETF draft's `RateLimit-Policy` and `RateLimit` fields (off by
    /// default).
    pub ietf: bool,
}

impl Default for HeaderStyle {
    fn default() -> Self {
        HeaderStyle {
            openai: true,
            ietf: false,
        }
    }
}

impl HeaderStyle {
    fn write(&self, snapshot: &RateLimitSnapshot, headers: &mut http::HeaderMap) {
        if self.openai {
            snapshot.write_openai(headers);
        }
        if self.ietf {
            snapshot.write_ietf(headers);
        }
    }
}

/// A tower [`Layer`] that enforces token and call budgets per agent on the
/// requests through it.
///
/// `M` is what admits requests: the budget manager ([`BudgetManager`]
/// unless you pick another [`BudgetLimiter`](agent_budget::BudgetLimiter)),
/// or any other [`Admission`] (a fleet-wide budget, say), `I` tells the agent, `E` estimates the request, `U`
/// reads the response's real usage; each has a default and a builder
/// method that replaces it.
///
/// ```
/// use std::sync::Arc;
/// use agent_budget::{BudgetLimit, BudgetManager};
/// use agent_budget_tower::BudgetLayer;
///
/// let budgets = Arc::new(BudgetManager::new());
/// let agent = uuid::Uuid::new_v4();
/// budgets.set_budget(BudgetLimit { agent_id: agent, token_budget: 100_000, calls_budget: 1_000, window_secs: 60 });
/// // Agent from `x-agent-id`, estimate from the OpenAI-style JSON body,
/// // usage from the response's `usage`:
/// let layer = BudgetLayer::new(budgets.clone());
/// # let _ = layer;
/// ```
pub struct BudgetLayer<M = BudgetManager, I = AgentIdHeader, E = OpenAiEstimator, U = OpenAiUsage> {
    parts: Parts<M, I, E, U>,
}

impl<M, I: Clone, E: Clone, U: Clone> Clone for BudgetLayer<M, I, E, U> {
    fn clone(&self) -> Self {
        BudgetLayer {
            parts: self.parts.clone(),
        }
    }
}

impl<M, I, E, U> std::fmt::Debug for BudgetLayer<M, I, E, U> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BudgetLayer")
            .field("max_wait", &self.parts.max_wait)
            .field("headers", &self.parts.headers)
            .finish_non_exhaustive()
    }
}

/// What the layer is made of; each service shares one copy in an `Arc`.
struct Parts<M, I, E, U> {
    manager: Arc<M>,
    identify: I,
    estimator: E,
    meter: U,
    max_wait: Option<Duration>,
    headers: HeaderStyle,
    telemetry: Arc<Telemetry>,
    log: Option<Arc<dyn UsageLog>>,
}

impl<M, I: Clone, E: Clone, U: Clone> Clone for Parts<M, I, E, U> {
    fn clone(&self) -> Self {
        Parts {
            manager: self.manager.clone(),
            identify: self.identify.clone(),
            estimator: self.estimator.clone(),
            meter: self.meter.clone(),
            max_wait: self.max_wait,
            headers: self.headers,
            telemetry: self.telemetry.clone(),
            log: self.log.clone(),
        }
    }
}

impl<M, I, E, U> Parts<M, I, E, U> {
    /// The same parts with the pluggable ones replaced by `replace`.
    fn map<I2, E2, U2>(
        self,
        replace: impl FnOnce(I, E, U) -> (I2, E2, U2),
    ) -> Parts<M, I2, E2, U2> {
        let (identify, estimator, meter) = replace(self.identify, self.estimator, self.meter);
        Parts {
            manager: self.manager,
            identify,
            estimator,
            meter,
            max_wait: self.max_wait,
            headers: self.headers,
            telemetry: self.telemetry,
            log: self.log,
        }
    }
}

impl<M: Admission> BudgetLayer<M> {
    /// A layer over `manager` with the default parts: the agent from the
    /// `x-agent-id` header, the estimate from an OpenAI-style body (prompt
    /// counted conservatively, one token per byte), the usage from the
    /// response's `usage`; no waiting; OpenAI's headers.
    pub fn new(manager: Arc<M>) -> Self {
        BudgetLayer {
            parts: Parts {
                manager,
                identify: AgentIdHeader::default(),
                estimator: OpenAiEstimator::default(),
                meter: OpenAiUsage::default(),
                max_wait: None,
                headers: HeaderStyle::default(),
                telemetry: Telemetry::new(&HashMap::new()),
                log: None,
            },
        }
    }
}

impl<M, I, E, U> BudgetLayer<M, I, E, U> {
    /// Tells the agent with `identify` instead.
    pub fn identify<I2: Identify>(self, identify: I2) -> BudgetLayer<M, I2, E, U> {
        BudgetLayer {
            parts: self.parts.map(|_, e, u| (identify, e, u)),
        }
    }

    /// Estimates requests with `estimator` instead.
    pub fn estimator<E2>(self, estimator: E2) -> BudgetLayer<M, I, E2, U> {
        BudgetLayer {
            parts: self.parts.map(|i, _, u| (i, estimator, u)),
        }
    }

    /// Reads the real usage with `meter` instead.
    pub fn meter<U2: Meter>(self, meter: U2) -> BudgetLayer<M, I, E, U2> {
        BudgetLayer {
            parts: self.parts.map(|i, e, _| (i, e, meter)),
        }
    }

    /// Lets a request that does not fit wait up to `max_wait` for budget
    /// (a refund, or the window's end) before it is refused.
    pub fn max_wait(mut self, max_wait: Duration) -> Self {
        self.parts.max_wait = Some(max_wait).filter(|d| !d.is_zero());
        self
    }

    /// Chooses the rate-limit headers.
    pub fn headers(mut self, headers: HeaderStyle) -> Self {
        self.parts.headers = headers;
        self
    }

    /// Gives these agents an `agent` label of their own on the metrics;
    /// every other agent is counted without one. Registers the metrics
    /// again, with the recorder installed now.
    pub fn agent_labels(mut self, labels: HashMap<AgentId, String>) -> Self {
        let observer = self.parts.telemetry.observer();
        self.parts.telemetry = Telemetry::new(&labels).with_observer(observer);
        self
    }

    /// Tells `observer` of every request the layer admits or refuses, by
    /// agent (a request whose agent is unknown is not told).
    pub fn observe(mut self, observer: Arc<dyn Observe>) -> Self {
        self.parts.telemetry = self.parts.telemetry.with_observer(Some(observer));
        self
    }

    /// Tells `log` of every admission and settle (a journal of usage, say).
    pub fn usage_log(mut self, log: Arc<dyn UsageLog>) -> Self {
        self.parts.log = Some(log);
        self
    }

    /// The manager the layer enforces.
    pub fn manager(&self) -> &Arc<M> {
        &self.parts.manager
    }
}

impl<S, M, I: Clone, E: Clone, U: Clone> Layer<S> for BudgetLayer<M, I, E, U> {
    type Service = BudgetService<S, M, I, E, U>;

    fn layer(&self, inner: S) -> Self::Service {
        BudgetService {
            inner,
            shared: Arc::new(self.parts.clone()),
        }
    }
}

/// The service [`BudgetLayer`] wraps around an inner service.
pub struct BudgetService<
    S,
    M = BudgetManager,
    I = AgentIdHeader,
    E = OpenAiEstimator,
    U = OpenAiUsage,
> {
    inner: S,
    shared: Arc<Parts<M, I, E, U>>,
}

impl<S: Clone, M, I, E, U> Clone for BudgetService<S, M, I, E, U> {
    fn clone(&self) -> Self {
        BudgetService {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<S, M, I, E, U> std::fmt::Debug for BudgetService<S, M, I, E, U> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BudgetService").finish_non_exhaustive()
    }
}

/// The response type of [`BudgetService`]: the body settles a reservation
/// of `M`'s.
pub type BudgetResponse<B, U, M = BudgetManager> =
    Response<BudgetBody<B, <U as Meter>::Session, <M as Admission>::Reservation>>;

impl<S, M, I, E, U, ReqB, ResB> Service<Request<ReqB>> for BudgetService<S, M, I, E, U>
where
    S: Service<Request<ReqB>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Send,
    ResB: Body<Data = Bytes> + Send + 'static,
    ReqB: Send + 'static,
    M: Admission,
    I: Identify,
    E: Estimator<ReqB>,
    U: Meter,
{
    type Response = BudgetResponse<ResB, U, M>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqB>) -> Self::Future {
        // The clone that was driven to readiness serves this request; the
        // fresh clone stays for the next `poll_ready`.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let shared = self.shared.clone();
        Box::pin(shared.serve(inner, request))
    }
}

impl<M, I, E, U> Parts<M, I, E, U>
where
    M: Admission,
    I: Identify,
    U: Meter,
{
    async fn serve<S, ReqB, ResB>(
        self: Arc<Self>,
        mut inner: S,
        request: Request<ReqB>,
    ) -> Result<BudgetResponse<ResB, U, M>, S::Error>
    where
        S: Service<Request<ReqB>, Response = Response<ResB>>,
        ResB: Body<Data = Bytes>,
        E: Estimator<ReqB>,
    {
        let (parts, body) = request.into_parts();
        let agent = match self.identify.identify(&parts) {
            Ok(agent) => agent,
            Err(rejection) => {
                self.telemetry.refused(None, RefusalReason::Unidentified);
                return Ok(reject::<_, _, M>(rejection));
            }
        };
        let request = Request::from_parts(parts, body);
        let floor = self.estimator.floor(&request);
        // One await: the estimate's future lives in this future's state
        // only while it runs, and shares its room with the admission's and
        // the upstream's (an await on a future pinned here would keep its
        // room for the whole request, and every request's future is moved
        // into its box whole).
        let (request, mut estimate, checked) = match self.estimated(&agent, request, floor).await {
            Ok(estimated) => estimated,
            Err(rejection) => return Ok(reject::<_, _, M>(rejection)),
        };
        let admitted = self.admit(&agent, &mut estimate, floor, checked).await;
        let (reservation, snapshot) = match admitted {
            Ok(admitted) => admitted,
            Err(rejection) => return Ok(reject::<_, _, M>(rejection)),
        };
        // The wall clock is read for the log alone, which is all that
        // reads `admitted_at`.
        let admitted_at = match &self.log {
            Some(log) => {
                let at = std::time::SystemTime::now();
                crate::Reservation::log_admitted(&reservation, log.as_ref(), at);
                at
            }
            None => std::time::SystemTime::UNIX_EPOCH,
        };
        // Boxed: the response carries it to the end of its body, and the
        // response is moved through every layer on its way out.
        let mut settle = Box::new(Settle::new(
            reservation,
            estimate,
            self.telemetry.clone(),
            self.log.clone(),
            admitted_at,
        ));
        let response = match inner.call(request).await {
            Ok(response) => response,
            Err(e) => {
                settle.cancel();
                return Err(e);
            }
        };
        let (mut parts, body) = response.into_parts();
        if parts.extensions.remove::<PromptReceived>().is_some() {
            settle.prompt_received();
        }
        if let Some(snapshot) = snapshot {
            self.headers.write(&snapshot, &mut parts.headers);
        }
        // The reservation is there until the body settles it.
        if let Some(reservation) = settle.reservation() {
            self.manager
                .write_admitted_headers(reservation, settle.estimate(), &mut parts.headers);
        }
        let session = self.meter.start(settle.estimate(), &mut parts);
        settle.attach(session);
        Ok(Response::from_parts(
            parts,
            BudgetBody::metered(body, settle),
        ))
    }

    /// The request's estimate, and whether the check of `floor` was made
    /// before it; or the answer that refuses the request.
    ///
    /// The estimate is tried once first. A body still on its way is
    /// waited for only after the least the request can cost (`floor`) is
    /// checked, so that a spent budget is refused without waiting for it.
    /// A body that has arrived whole (hyper reads a small one with its
    /// head) is estimated at once and goes to its admission: the check is
    /// made only if that fails, and its refusal, where it refuses, is the
    /// answer, as it would have been before the body.
    async fn estimated<ReqB>(
        &self,
        agent: &AgentId,
        request: Request<ReqB>,
        floor: Option<(u64, u64)>,
    ) -> Result<(Request<ReqB>, Estimate, bool), Rejection>
    where
        E: Estimator<ReqB>,
    {
        let mut estimating = std::pin::pin!(self.estimator.estimate(request));
        let (estimated, checked) =
            match std::future::poll_fn(|cx| match estimating.as_mut().poll(cx) {
                Poll::Ready(estimated) => Poll::Ready(Some(estimated)),
                Poll::Pending => Poll::Ready(None),
            })
            .await
            {
                Some(estimated) => (estimated, false),
                None => {
                    if let Some(rejection) = self.refused_at_floor(agent, floor) {
                        return Err(rejection);
                    }
                    (estimating.await, true)
                }
            };
        match estimated {
            Ok((request, estimate)) => Ok((request, estimate, checked)),
            Err(rejection) => {
                let refusal = (!checked).then(|| self.refused_at_floor(agent, floor));
                if let Some(refusal) = refusal.flatten() {
                    return Err(refusal);
                }
                self.telemetry
                    .refused(Some(agent), RefusalReason::BadRequest);
                Err(rejection)
            }
        }
    }

    /// Takes the estimate, waiting for it if configured; returns the
    /// reservation and where the budget stands after it, or the refusal.
    ///
    /// An estimate whose prompt is a bound with its count deferred is
    /// tried as it is first; refused for its tokens, the prompt is counted
    /// and the count tried (and waited for, and refused, if need be). The
    /// estimate is left as it was admitted. On a refusal, the check of
    /// `floor` (the least any such request costs) is made, once: where it
    /// was not made before the body (`checked`, see `serve`), its refusal
    /// is the answer; and where it refuses, no count is made, as none
    /// could change the answer.
    async fn admit(
        &self,
        agent: &AgentId,
        estimate: &mut Estimate,
        floor: Option<(u64, u64)>,
        checked: bool,
    ) -> Result<(M::Reservation, Option<RateLimitSnapshot>), Rejection> {
        let started = CheckTimer::start();
        let mut admitted = self.manager.admit_reporting(agent, estimate).await;
        if let Err(denial) = &admitted {
            let for_tokens = match denial {
                Denial::Refused(refused) | Denial::Worded { refused, .. } => {
                    refused.kind == BudgetKind::Token
                        && matches!(refused.reason, BudgetRefusal::Exceeded { .. })
                }
                _ => false,
            };
            let at_floor = if for_tokens || !checked {
                self.floor_denial(agent, floor)
            } else {
                None
            };
            let may_fit = at_floor.is_none();
            if !checked {
                if let Some(refusal) = at_floor.and_then(|d| self.floor_refusal(d)) {
                    return Err(refusal);
                }
            }
            if for_tokens && may_fit && count_prompt(estimate).await {
                admitted = self.manager.admit_reporting(agent, estimate).await;
            }
        }
        let (reservation, snapshot) = match (admitted, self.max_wait) {
            (Ok(admitted), _) => admitted,
            (Err(denial), Some(max_wait)) if denial.retry_after().is_some() => {
                self.telemetry.checked(agent, started.elapsed());
                // Boxed: the waiting future is large, and the common path
                // should not carry its room in every request's future.
                (Box::pin(self.wait(agent, estimate, max_wait)).await?, None)
            }
            (Err(denial), _) => {
                self.telemetry.checked(agent, started.elapsed());
                return Err(self.rejection(denial, estimate));
            }
        };
        let snapshot = snapshot
            .or_else(|| RateLimitSnapshot::from_chain(&self.manager.rate_limits(agent, estimate)));
        self.telemetry
            .admitted(agent, estimate.tokens(), started.elapsed());
        Ok((reservation, snapshot))
    }

    /// The refusal of the check made before a request's body: `Some` where
    /// `floor`, the least a request of its kind costs, is refused and
    /// waiting up to `max_wait` cannot let it in.
    fn refused_at_floor(&self, agent: &AgentId, floor: Option<(u64, u64)>) -> Option<Rejection> {
        self.floor_denial(agent, floor)
            .and_then(|denial| self.floor_refusal(denial))
    }

    /// The check made before a request's body: the denial where `floor`,
    /// the least a request of its kind costs, would be refused now.
    fn floor_denial(&self, agent: &AgentId, floor: Option<(u64, u64)>) -> Option<Denial> {
        let (tokens, calls) = floor?;
        self.manager.precheck(agent, tokens, calls).err()
    }

    /// `denial`, the check's, as the answer: `None` where waiting up to
    /// `max_wait` may let the request in.
    fn floor_refusal(&self, denial: Denial) -> Option<Rejection> {
        let may_wait = self
            .max_wait
            .zip(denial.retry_after())
            .is_some_and(|(max, after)| after <= max);
        // Nothing is known of the request but its kind: its headers
        // describe the budget alone.
        (!may_wait).then(|| self.rejection(denial, &Estimate::default()))
    }

    /// Waits up to `max_wait` for `estimate` to fit.
    async fn wait(
        &self,
        agent: &AgentId,
        estimate: &Estimate,
        max_wait: Duration,
    ) -> Result<M::Reservation, Rejection> {
        let waiting = Instant::now();
        let waited = tokio::time::timeout(max_wait, self.manager.admit_wait(agent, estimate)).await;
        self.telemetry.waited(agent, waiting.elapsed());
        match waited {
            Ok(Ok(reservation)) => Ok(reservation),
            Ok(Err(denial)) => Err(self.rejection(denial, estimate)),
            // Out of time: one last try, for a fresh refusal (and a fresh
            // `Retry-After`) or a late admission.
            Err(_) => self
                .manager
                .admit(agent, estimate)
                .await
                .map_err(|denial| self.rejection(denial, estimate)),
        }
    }

    /// The answer to a denial: the budget's refusal, `400` for a request
    /// that cannot be admitted as it is, or `503` when the budget could
    /// not be checked.
    fn rejection(&self, denial: Denial, estimate: &Estimate) -> Rejection {
        match denial {
            Denial::Refused(refused) => self.refusal(refused, estimate, None),
            Denial::Worded {
                refused,
                message,
                error_type,
            } => self.refusal(refused, estimate, Some((message, error_type))),
            Denial::Invalid {
                agent_id,
                message,
                code,
            } => {
                self.telemetry
                    .refused(Some(&agent_id), RefusalReason::BadRequest);
                Rejection::new(
                    StatusCode::BAD_REQUEST,
                    message,
                    "invalid_request_error",
                    code,
                )
            }
            Denial::Unavailable {
                agent_id,
                retry_after,
                message,
            } => {
                self.telemetry
                    .refused(Some(&agent_id), RefusalReason::Unavailable);
                let mut rejection = Rejection::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    message,
                    "server_error",
                    "budget_unavailable",
                );
                write_retry_after(&mut rejection.headers, retry_after);
                rejection
            }
        }
    }

    /// The `429` for a refusal: `Retry-After` when waiting can help, the
    /// rate-limit headers (of the level that refused, for the resource it
    /// refused), and OpenAI's error body; `403` if the agent has no budget.
    fn refusal(
        &self,
        refused: Refused,
        estimate: &Estimate,
        worded: Option<(String, &'static str)>,
    ) -> Rejection {
        let snapshot = match refused.reason {
            BudgetRefusal::NoBudget => None,
            _ => RateLimitSnapshot::from_refusal(
                &self.manager.rate_limits(&refused.agent_id, estimate),
                &refused,
            ),
        };
        let Some(snapshot) = snapshot else {
            self.telemetry
                .refused(Some(&refused.agent_id), RefusalReason::NoBudget);
            return Rejection::new(
                StatusCode::FORBIDDEN,
                refused.to_string(),
                "invalid_request_error",
                "no_budget",
            );
        };
        let reason = RefusalReason::of_kind(refused.kind);
        self.telemetry.refused(Some(&refused.agent_id), reason);
        let error_type = match reason {
            RefusalReason::Calls => "requests",
            _ => "tokens",
        };
        let (message, error_type) = worded.unwrap_or_else(|| (refused.to_string(), error_type));
        let mut rejection = Rejection::new(
            StatusCode::TOO_MANY_REQUESTS,
            message,
            error_type,
            "rate_limit_exceeded",
        );
        if let Some(wait) = refused.retry_after {
            write_retry_after(&mut rejection.headers, wait);
        }
        self.headers.write(&snapshot, &mut rejection.headers);
        self.manager
            .write_headers(&refused.agent_id, estimate, &mut rejection.headers);
        rejection
    }
}

/// [`Estimate::count_prompt`], on tokio's blocking threads when the input
/// is large (so one client's long prompt does not stall the others on its
/// worker).
async fn count_prompt(estimate: &mut Estimate) -> bool {
    let large = estimate
        .deferred_count
        .as_ref()
        .filter(|d| d.input_len() > BLOCKING_COUNT_BYTES)
        .cloned();
    let Some(deferred) = large else {
        return estimate.count_prompt();
    };
    let Ok(tokens) = tokio::task::spawn_blocking(move || deferred.tokens()).await else {
        return estimate.count_prompt();
    };
    let before = estimate.prompt_tokens;
    estimate.prompt_tokens = tokens;
    estimate.deferred_count = None;
    tokens != before
}

fn reject<B, S: crate::MeterSession, M: Admission>(
    rejection: Rejection,
) -> Response<BudgetBody<B, S, M::Reservation>>
where
    B: Body<Data = Bytes>,
{
    let response: Response<Bytes> = rejection.into_response();
    let (parts, data) = response.into_parts();
    Response::from_parts(parts, BudgetBody::rejected(data))
}
