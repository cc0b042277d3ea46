//! The response body that settles its reservation when it ends.
//!
//! # How it works
//!
//! An admitted response's body is wrapped in a [`BudgetBody`] that owns the
//! request's [`OwnedReservation`] and its meter session. Each data frame
//! goes through the session on its way out; the reservation is settled
//! exactly once, at whichever comes first:
//!
//! - **the end**: the inner body returns its last frame (or says it is at
//!   its end right after one, which hyper trusts and then stops polling)
//!   or `None`: settled with [`MeterSession::finish`];
//! - **a failure**: the inner body returns an error: settled with
//!   [`MeterSession::abandon`];
//! - **a drop**: the client went away and hyper dropped the body
//!   mid-stream. Nothing polls a dropped body, so the settle lives in a
//!   `Drop` of the part that holds the reservation: settled with
//!   [`MeterSession::abandon`], which charges at least the prompt and what
//!   streamed, so that hanging up is no way to dodge the charge.
//!
//! Before the response exists, the same holder guards the reservation
//! inside the service's future: if the future is dropped (the client left
//! while the upstream was thinking), the prompt's tokens are charged and
//! the rest refunded. Refusals carry their JSON body in the same type.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use crate::telemetry::Telemetry;
use crate::{Estimate, MeterSession, Outcome, Reservation, TokenSplit, UsageLog, UsedTokens};

/// A deferred prompt count over more input than this is made on tokio's
/// blocking threads, not on the worker that settles: a tokenizer takes
/// about 80 ns a byte, so 64 KiB is 5 ms.
pub(crate) const BLOCKING_COUNT_BYTES: usize = 64 << 10;

/// Holds a reservation until it is settled, and settles it on drop.
pub(crate) struct Settle<R: Reservation, S: MeterSession> {
    reservation: Option<R>,
    session: Option<S>,
    estimate: Estimate,
    telemetry: Arc<Telemetry>,
    /// The upstream received the request: a cancel charges the prompt.
    prompt_received: bool,
    log: Option<Arc<dyn UsageLog>>,
    /// When the reservation was taken, for `log`: meaningless without one.
    admitted_at: std::time::SystemTime,
}

/// What a settle books, before any deferred count is made.
enum Charge {
    /// What the response used: its split into prompt and completion when
    /// the meter reported one.
    Used(u64, Option<UsedTokens>),
    /// The estimate, with the prompt as counted.
    Estimate,
    /// The prompt as counted.
    Prompt,
    Cancel,
}

impl<R: Reservation, S: MeterSession> Settle<R, S> {
    pub(crate) fn new(
        reservation: R,
        estimate: Estimate,
        telemetry: Arc<Telemetry>,
        log: Option<Arc<dyn UsageLog>>,
        admitted_at: std::time::SystemTime,
    ) -> Self {
        Settle {
            reservation: Some(reservation),
            session: None,
            estimate,
            telemetry,
            prompt_received: false,
            log,
            admitted_at,
        }
    }

    /// The upstream received the request (see
    /// [`PromptReceived`](crate::PromptReceived)).
    pub(crate) fn prompt_received(&mut self) {
        self.prompt_received = true;
    }

    /// The estimate the reservation was taken for.
    pub(crate) fn estimate(&self) -> &Estimate {
        &self.estimate
    }

    /// The reservation, until it is settled or cancelled.
    pub(crate) fn reservation(&self) -> Option<&R> {
        self.reservation.as_ref()
    }

    pub(crate) fn attach(&mut self, session: S) {
        self.session = Some(session);
    }

    /// Gives everything back: the request never reached anyone.
    pub(crate) fn cancel(&mut self) {
        self.book(Outcome::Cancel, false);
    }

    fn finish(&mut self) {
        let outcome = self
            .session
            .as_mut()
            .map_or(Outcome::Reserved, MeterSession::finish);
        self.book(outcome, false);
    }

    fn abandon(&mut self) {
        match self.session.as_mut() {
            Some(session) => {
                let outcome = session.abandon();
                self.book(outcome, true);
            }
            // No response yet: the upstream has read the prompt.
            None => self.charge(Charge::Prompt, true),
        }
    }

    fn book(&mut self, outcome: Outcome, abandoned: bool) {
        let charge = match outcome {
            Outcome::Used(tokens) => {
                let reported = self
                    .session
                    .as_ref()
                    .and_then(S::used_tokens)
                    .filter(|used| used.total == tokens);
                Charge::Used(tokens, reported)
            }
            // The estimate, with the prompt as counted: a bound reserved
            // in its place is no charge.
            Outcome::Reserved => Charge::Estimate,
            Outcome::Cancel if self.prompt_received => Charge::Prompt,
            Outcome::Cancel => Charge::Cancel,
        };
        self.charge(charge, abandoned);
    }

    fn charge(&mut self, charge: Charge, abandoned: bool) {
        let Some(reservation) = self.reservation.take() else {
            return;
        };
        let counts = matches!(charge, Charge::Estimate | Charge::Prompt);
        let large = self
            .estimate
            .deferred_count
            .as_ref()
            .is_some_and(|d| d.input_len() > BLOCKING_COUNT_BYTES);
        let estimate = std::mem::take(&mut self.estimate);
        let (telemetry, log, at) = (self.telemetry.clone(), self.log.clone(), self.admitted_at);
        let book = move || {
            let (agent, reserved) = (reservation.agent_id(), reservation.tokens());
            let used = match charge {
                Charge::Used(tokens, reported) => {
                    Some(reported.unwrap_or_else(|| split(&estimate, tokens)))
                }
                Charge::Estimate => {
                    let prompt = estimate.counted_prompt_tokens();
                    Some(UsedTokens {
                        total: prompt.saturating_add(estimate.completion_tokens),
                        split: Some(TokenSplit {
                            input: prompt,
                            cached_input: 0,
                            output: estimate.completion_tokens,
                        }),
                    })
                }
                Charge::Prompt => {
                    let prompt = estimate.counted_prompt_tokens();
                    Some(UsedTokens {
                        total: prompt,
                        split: Some(TokenSplit {
                            input: prompt,
                            cached_input: 0,
                            output: 0,
                        }),
                    })
                }
                Charge::Cancel => None,
            };
            let settlement = reservation.settle_logged(used, log.as_deref(), at);
            telemetry.settled(&agent, reserved, settlement, abandoned);
        };
        // A large count is made off the worker (the settle may run in a
        // `Drop` on it), when there is a runtime to make it on.
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) if counts && large => {
                runtime.spawn_blocking(book);
            }
            _ => book(),
        }
    }

    fn trailers(&mut self, trailers: &http::HeaderMap) {
        if let Some(session) = self.session.as_mut() {
            session.trailers(trailers);
        }
    }

    fn data(&mut self, chunk: Bytes) -> Option<Bytes> {
        match self.session.as_mut() {
            Some(session) => session.data(chunk),
            None => Some(chunk),
        }
    }

    fn flush(&mut self) -> Option<Bytes> {
        self.session.as_mut().and_then(MeterSession::flush)
    }

    fn preserves_body(&self) -> bool {
        self.session.as_ref().is_none_or(S::preserves_body)
    }
}

/// `tokens` the meter reported without saying how they split: the prompt
/// as counted first (the upstream read it), the rest completion.
fn split(estimate: &Estimate, tokens: u64) -> UsedTokens {
    let input = estimate.counted_prompt_tokens().min(tokens);
    UsedTokens {
        total: tokens,
        split: Some(TokenSplit {
            input,
            cached_input: 0,
            output: tokens - input,
        }),
    }
}

impl<R: Reservation, S: MeterSession> Drop for Settle<R, S> {
    fn drop(&mut self) {
        if self.reservation.is_some() {
            self.abandon();
        }
    }
}

pin_project! {
    /// The body of a response that went through the budget layer: the
    /// inner service's body, settling its reservation when it ends, or a
    /// refusal's JSON.
    pub struct BudgetBody<B, S: MeterSession, R: Reservation = agent_budget::OwnedReservation> {
        #[pin]
        state: State<B, S, R>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<B, S: MeterSession, R: Reservation> {
        Metered {
            #[pin]
            inner: B,
            settle: Box<Settle<R, S>>,
            // A frame to send after the one just sent.
            pending: Option<Frame<Bytes>>,
            ended: bool,
        },
        Rejected {
            data: Option<Bytes>,
        },
    }
}

impl<B: Body<Data = Bytes>, S: MeterSession, R: Reservation> BudgetBody<B, S, R> {
    pub(crate) fn metered(inner: B, mut settle: Box<Settle<R, S>>) -> Self {
        let ended = inner.is_end_stream();
        if ended {
            // hyper will not poll a body that is already at its end.
            settle.finish();
        }
        BudgetBody {
            state: State::Metered {
                inner,
                settle,
                pending: None,
                ended,
            },
        }
    }

    pub(crate) fn rejected(data: Bytes) -> Self {
        BudgetBody {
            state: State::Rejected { data: Some(data) },
        }
    }
}

impl<B, S, R> Body for BudgetBody<B, S, R>
where
    B: Body<Data = Bytes>,
    S: MeterSession,
    R: Reservation,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        match self.project().state.project() {
            StateProj::Rejected { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            StateProj::Metered {
                mut inner,
                settle,
                pending,
                ended,
            } => loop {
                if let Some(frame) = pending.take() {
                    return Poll::Ready(Some(Ok(frame)));
                }
                if *ended {
                    return Poll::Ready(None);
                }
                let frame = match ready!(inner.as_mut().poll_frame(cx)) {
                    Some(Ok(frame)) => frame,
                    Some(Err(e)) => {
                        *ended = true;
                        settle.abandon();
                        return Poll::Ready(Some(Err(e)));
                    }
                    None => {
                        *ended = true;
                        let rest = settle.flush();
                        settle.finish();
                        return Poll::Ready(rest.map(|d| Ok(Frame::data(d))));
                    }
                };
                let at_end = inner.is_end_stream();
                let mut out = match frame.into_data() {
                    Ok(chunk) => settle.data(chunk).map(Frame::data),
                    Err(frame) => {
                        if let Some(trailers) = frame.trailers_ref() {
                            settle.trailers(trailers);
                        }
                        // Trailers come last: bytes held back go first.
                        if let Some(rest) = settle.flush() {
                            *pending = Some(frame);
                            Some(Frame::data(rest))
                        } else {
                            Some(frame)
                        }
                    }
                };
                if at_end {
                    *ended = true;
                    if let Some(rest) = settle.flush() {
                        out = Some(match out.map(Frame::into_data) {
                            None => Frame::data(rest),
                            Some(Ok(data)) => {
                                let mut joined = BytesMut::from(&data[..]);
                                joined.extend_from_slice(&rest);
                                Frame::data(joined.freeze())
                            }
                            Some(Err(other)) => {
                                *pending = Some(other);
                                Frame::data(rest)
                            }
                        });
                    }
                    settle.finish();
                }
                if let Some(frame) = out {
                    return Poll::Ready(Some(Ok(frame)));
                }
                // The session held the whole chunk back: read on.
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.state {
            State::Metered { ended, pending, .. } => *ended && pending.is_none(),
            State::Rejected { data } => data.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.state {
            State::Metered { inner, settle, .. } if settle.preserves_body() => inner.size_hint(),
            State::Metered { .. } => SizeHint::default(),
            State::Rejected { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
        }
    }
}

impl<B, S: MeterSession> std::fmt::Debug for BudgetBody<B, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BudgetBody").finish_non_exhaustive()
    }
}
