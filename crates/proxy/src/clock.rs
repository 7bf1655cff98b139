//! The timeouts of an inbound connection on the general (hyper) path, the same rules as the
//! fast path's ([`crate::h1`]): the first request head must be complete within the
//! header-read timeout of the handshake; after a response, the connection may sit idle —
//! no request in progress — for the idle timeout, and once the next head's first byte has
//! come, the head must be complete within the header-read timeout of it. HTTP/2 has no head
//! to trickle, so only "no open stream for the idle timeout" applies after its first
//! request (a PING does not keep it open).
//!
//! Three parts share one [`ConnClock`]: [`Clocked`] wraps the stream and notes the first
//! byte of a head, [`Tracked`] wraps each response body and counts the request in progress
//! until the body is done, and [`ConnClock::expired`] is the watchdog the connection's task
//! selects on.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::listener::Limits;

const NONE: u64 = u64::MAX;

/// What one connection is doing, for its timeouts.
#[derive(Debug)]
pub struct ConnClock {
    start: Instant,
    /// Requests whose response is not done yet.
    in_flight: AtomicUsize,
    /// Milliseconds from `start` to when the connection last became idle.
    idle_since: AtomicU64,
    /// Milliseconds from `start` to the first byte read while idle (`NONE`: none yet).
    first_byte: AtomicU64,
    /// Whether a request has been served (the first head is timed from the start).
    served: AtomicBool,
    /// HTTP/2 (by the preface): bytes while idle are frames, not a head.
    h2: AtomicBool,
    /// The first read has been looked at (for the HTTP/2 preface).
    seen: AtomicBool,
    changed: Notify,
}

/// Why a connection was closed for time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expired {
    HeaderRead,
    Idle,
    /// The connection's certificates expire or it reaches its maximum age
    /// ([`crate::expiry`]).
    Certificate,
}

impl Expired {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Expired::HeaderRead => "header_read",
            Expired::Idle => "idle",
            Expired::Certificate => "certificate",
        }
    }
}

impl ConnClock {
    /// A clock for a connection whose handshake just finished (or that the fast path hands
    /// over: `served` when it already answered requests on it).
    pub fn new(served: bool) -> Arc<Self> {
        Arc::new(ConnClock {
            start: Instant::now(),
            in_flight: AtomicUsize::new(0),
            idle_since: AtomicU64::new(0),
            first_byte: AtomicU64::new(NONE),
            served: AtomicBool::new(served),
            h2: AtomicBool::new(false),
            seen: AtomicBool::new(false),
            changed: Notify::new(),
        })
    }

    fn ms(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(NONE - 1)
    }

    fn at(&self, ms: u64) -> Instant {
        self.start + Duration::from_millis(ms)
    }

    /// A request head is complete: it is in progress until the guard (in its response
    /// body) is dropped.
    pub fn request(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.changed.notify_one();
        InFlight(self.clone())
    }

    fn bytes_read(&self, first: &[u8]) {
        if !self.seen.swap(true, Ordering::Relaxed) && first.starts_with(b"PRI * HTTP/2.0") {
            self.h2.store(true, Ordering::Relaxed);
        }
        if self.in_flight.load(Ordering::Relaxed) == 0
            && self.first_byte.load(Ordering::Relaxed) == NONE
        {
            self.first_byte.store(self.ms(), Ordering::Relaxed);
            self.changed.notify_one();
        }
    }

    /// When the connection times out if nothing changes, and why; none while a request is
    /// in progress.
    fn deadline(&self, l: &Limits) -> Option<(Instant, Expired)> {
        if self.in_flight.load(Ordering::Relaxed) > 0 {
            return None;
        }
        let idle_since = self.at(self.idle_since.load(Ordering::Relaxed));
        if !self.served.load(Ordering::Relaxed) {
            return Some((idle_since + l.header_read, Expired::HeaderRead));
        }
        let first = self.first_byte.load(Ordering::Relaxed);
        if first != NONE && !self.h2.load(Ordering::Relaxed) {
            return Some((self.at(first) + l.header_read, Expired::HeaderRead));
        }
        Some((idle_since + l.idle, Expired::Idle))
    }

    /// Resolves when the connection has timed out under `l`, with why.
    pub async fn expired(&self, l: &Limits) -> Expired {
        loop {
            let changed = self.changed.notified();
            match self.deadline(l) {
                None => changed.await,
                Some((at, why)) => {
                    tokio::select! {
                        () = changed => {}
                        () = tokio::time::sleep_until(at) => {
                            // Still the same deadline (nothing changed meanwhile)?
                            if self.deadline(l).is_some_and(|(d, _)| d <= Instant::now()) {
                                return why;
                            }
                        }
                    }
                }
            }
        }
    }
}

/// A request in progress; dropping it (when its response body is done) makes the
/// connection idle again if it was the last.
#[derive(Debug)]
pub struct InFlight(Arc<ConnClock>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let c = &self.0;
        c.served.store(true, Ordering::Relaxed);
        if c.in_flight.fetch_sub(1, Ordering::Relaxed) == 1 {
            c.idle_since.store(c.ms(), Ordering::Relaxed);
            c.first_byte.store(NONE, Ordering::Relaxed);
        }
        c.changed.notify_one();
    }
}

/// A response body that keeps its request in progress until it is done or dropped.
#[derive(Debug)]
pub struct Tracked<B, G = InFlight> {
    inner: B,
    guard: Option<G>,
}

impl<B, G> Tracked<B, G> {
    pub fn new(inner: B, guard: G) -> Self {
        Tracked {
            inner,
            guard: Some(guard),
        }
    }
}

impl<B: Body + Unpin, G: Unpin> Body for Tracked<B, G> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let p = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(p, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) {
            self.guard = None;
        }
        p
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A stream that tells its clock when bytes arrive.
#[derive(Debug)]
pub struct Clocked<S> {
    inner: S,
    clock: Arc<ConnClock>,
}

impl<S> Clocked<S> {
    pub fn new(inner: S, clock: Arc<ConnClock>) -> Self {
        Clocked { inner, clock }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Clocked<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let p = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(p, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.clock.bytes_read(&buf.filled()[before..]);
        }
        p
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Clocked<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn limits() -> Limits {
        Limits {
            header_read: 300 * MS,
            idle: 1200 * MS,
            ..Limits::defaults()
        }
    }

    /// `f` took about `want` (timers fire late, never early).
    fn about(took: Duration, want: Duration) {
        assert!(
            took >= want && took < want + 400 * MS,
            "{took:?}, not {want:?}"
        );
    }

    #[tokio::test]
    async fn first_head_is_timed_from_the_start_later_ones_from_their_first_byte() {
        let c = ConnClock::new(false);
        let t0 = Instant::now();
        assert_eq!(c.expired(&limits()).await, Expired::HeaderRead);
        about(t0.elapsed(), 300 * MS);

        let c = ConnClock::new(false);
        drop(c.request()); // served; idle from now
        let t0 = Instant::now();
        let watch = c.clone();
        let task = tokio::spawn(async move { watch.expired(&limits()).await });
        tokio::time::sleep(500 * MS).await;
        c.bytes_read(b"GET / HT");
        assert_eq!(task.await.unwrap(), Expired::HeaderRead);
        about(t0.elapsed(), 800 * MS);

        // Idle, nothing read: the idle timeout.
        let c = ConnClock::new(true);
        let t0 = Instant::now();
        assert_eq!(c.expired(&limits()).await, Expired::Idle);
        about(t0.elapsed(), 1200 * MS);
    }

    #[tokio::test]
    async fn a_request_in_progress_never_times_out_and_h2_frames_are_not_a_head() {
        let c = ConnClock::new(false);
        c.bytes_read(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
        let g = c.request();
        let watch = c.clone();
        let task = tokio::spawn(async move { watch.expired(&limits()).await });
        tokio::time::sleep(2000 * MS).await;
        assert!(!task.is_finished());
        drop(g);
        let t0 = Instant::now();
        tokio::time::sleep(300 * MS).await;
        c.bytes_read(b"\0\0\x08\x06"); // a PING
        assert_eq!(task.await.unwrap(), Expired::Idle);
        about(t0.elapsed(), 1200 * MS);
    }
}
