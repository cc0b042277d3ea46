//! A body that fails with `TimedOut` when it takes too long: the client's
//! request body (one deadline for all of it, so a client trickling a byte
//! at a time cannot hold a connection) and the upstream's response body (a
//! deadline re-armed by every frame, so a long stream that keeps sending
//! is never cut, and one that stalls is).

use std::future::Future as _;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};

/// When a [`DeadlineBody`]'s time runs out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Deadline {
    /// `timeout` after the last frame (or the start): an idle timeout.
    Rearmed,
    /// `timeout` after the start, whatever arrives meanwhile.
    Fixed,
}

/// `inner`, failing with an `io::ErrorKind::TimedOut` error once its
/// [`Deadline`] passes while it has nothing to give.
pub(crate) struct DeadlineBody<B> {
    inner: B,
    mode: Deadline,
    timeout: Duration,
    sleep: Pin<Box<tokio::time::Sleep>>,
    /// The error's words before "{timeout} s".
    expired: &'static str,
    /// Set once the body has been read to its end, for whoever must know
    /// whether it was.
    finished: Option<Arc<AtomicBool>>,
}

impl<B> DeadlineBody<B> {
    /// `inner` with a deadline `timeout` from now, re-armed or fixed; the
    /// error, once it passes, says `expired` and the timeout in seconds
    /// ("the upstream sent nothing for" 300 s).
    pub(crate) fn new(inner: B, mode: Deadline, timeout: Duration, expired: &'static str) -> Self {
        DeadlineBody {
            inner,
            mode,
            timeout,
            sleep: Box::pin(tokio::time::sleep(timeout)),
            expired,
            finished: None,
        }
    }

    /// The same body, setting `finished` once it has been read to its end.
    pub(crate) fn tell_finished(self, finished: Arc<AtomicBool>) -> Self {
        DeadlineBody {
            finished: Some(finished),
            ..self
        }
    }

    fn finish(&self) {
        if let Some(finished) = &self.finished {
            finished.store(true, Ordering::SeqCst);
        }
    }
}

impl<B> HttpBody for DeadlineBody<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                if this.mode == Deadline::Rearmed {
                    let next = tokio::time::Instant::now() + this.timeout;
                    this.sleep.as_mut().reset(next);
                }
                if frame.is_none() || this.inner.is_end_stream() {
                    this.finish();
                }
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending => match this.sleep.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("{} {} s", this.expired, this.timeout.as_secs_f64()),
                ))))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use tokio::sync::mpsc;

    /// A body whose frames come from a channel; it ends when the sender
    /// is dropped.
    struct Channel(mpsc::Receiver<Bytes>);

    impl HttpBody for Channel {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            self.0.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b))))
        }
    }

    const FRAMES: usize = 8;
    const GAP: Duration = Duration::from_millis(60);

    /// A body sending `FRAMES` frames `GAP` apart (longer in all than
    /// either deadline below), behind a deadline in `mode`; what reading it
    /// to its end gives, and whether it said it was finished.
    async fn trickle(mode: Deadline, timeout: Duration) -> (Result<usize, String>, bool) {
        let (send, receive) = mpsc::channel(FRAMES);
        tokio::spawn(async move {
            for _ in 0..FRAMES {
                tokio::time::sleep(GAP).await;
                if send.send(Bytes::from_static(b"x")).await.is_err() {
                    return;
                }
            }
        });
        let finished = Arc::new(AtomicBool::new(false));
        let body = DeadlineBody::new(Channel(receive), mode, timeout, "nothing came for")
            .tell_finished(finished.clone());
        let read = body.collect().await.map(|all| all.to_bytes().len());
        let read = read.map_err(|e| {
            let io = e.downcast_ref::<std::io::Error>().expect("an io::Error");
            assert_eq!(io.kind(), std::io::ErrorKind::TimedOut);
            e.to_string()
        });
        (read, finished.load(Ordering::SeqCst))
    }

    #[tokio::test]
    async fn a_rearmed_deadline_lets_a_steady_body_run_past_it() {
        let timeout = GAP * 6;
        assert!(GAP * FRAMES as u32 > timeout);
        assert_eq!(
            trickle(Deadline::Rearmed, timeout).await,
            (Ok(FRAMES), true)
        );
    }

    #[tokio::test]
    async fn a_fixed_deadline_cuts_a_steady_body_off() {
        let timeout = GAP * 3;
        let (read, finished) = trickle(Deadline::Fixed, timeout).await;
        assert_eq!(
            read,
            Err(format!("nothing came for {} s", timeout.as_secs_f64()))
        );
        assert!(!finished);
    }

    #[tokio::test]
    async fn a_rearmed_deadline_cuts_a_stalled_body_off() {
        let (_send, receive) = mpsc::channel::<Bytes>(1);
        let timeout = Duration::from_millis(50);
        let body = DeadlineBody::new(Channel(receive), Deadline::Rearmed, timeout, "idle for");
        let e = body.collect().await.expect_err("cut off");
        assert_eq!(e.to_string(), "idle for 0.05 s");
    }
}
