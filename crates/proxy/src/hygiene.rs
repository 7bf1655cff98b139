//! HTTP/1 request hygiene in front of the parser: a reader that checks each request head
//! before the parser can see it whole, and refuses (ends the connection) a head that
//! different HTTP implementations could read differently — the raw material of request
//! smuggling:
//!
//! - both `Content-Length` and `Transfer-Encoding`, a `Transfer-Encoding` other than
//!   `chunked`, or conflicting `Content-Length`s;
//! - obs-fold (a header line starting with a space or tab);
//! - a bare LF line ending;
//! - an invalid header name.
//!
//! It reads straight into the parser's buffer and scans the bytes there (no copy): a head
//! that arrives whole is checked in place; the start of a head split across reads passes
//! on (a bare LF in it is refused at once, so the parser never sees a complete head — which
//! needs CRLF CRLF — before it is checked) and is kept aside until its end arrives. A
//! refused head is cut off the read, with everything after it; the requests before it
//! still pass. It follows request bodies (by length or chunk by chunk) to find the next
//! head on a keep-alive connection. HTTP/2 connections (the `PRI` preface) pass through
//! untouched.
//!
//! Stage: under every HTTP/1 codec, between detection and the request gate ([`crate::gate`]).
#![deny(clippy::disallowed_types)]

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The longest request head accepted.
pub const MAX_HEAD: usize = 64 * 1024;

#[derive(Debug)]
enum State {
    /// Scanning for a head's end.
    Head,
    /// Passing `n` body bytes.
    Body(u64),
    /// Chunked body: reading a chunk-size line.
    ChunkSize(Vec<u8>),
    /// Chunked body: `n` data bytes, then CRLF (2 more).
    ChunkData(u64),
    /// After the last chunk: trailer lines until an empty one.
    Trailers(Vec<u8>),
    /// HTTP/2 or refused: pass through / fail.
    Passthrough,
    Refused,
}

/// Why a request head was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    ContentLengthAndTransferEncoding,
    UnsupportedTransferEncoding,
    ConflictingContentLength,
    ObsFold,
    BareLf,
    InvalidHeaderName,
    HeadTooLarge,
    BadChunk,
}

/// A stream that checks HTTP/1 request heads before the parser sees them.
#[derive(Debug)]
pub struct Hygiene<S> {
    inner: S,
    state: State,
    /// The start of a head that spans reads (already passed on; kept to check the whole
    /// head when its end arrives).
    head: Vec<u8>,
    started: bool,
    /// Bytes read before this reader took over (handed over by the HTTP/1 fast path),
    /// served first.
    prefix: Vec<u8>,
    pub refused: Option<Refusal>,
    /// Set when a refusal cuts a request body short (the general path then answers 400
    /// instead of the app's failure).
    bad_body: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
}

impl<S> Hygiene<S> {
    pub fn new(inner: S) -> Self {
        Hygiene {
            inner,
            state: State::Head,
            head: vec![],
            started: false,
            prefix: vec![],
            refused: None,
            bad_body: None,
        }
    }

    /// Sets `flag` when a refusal falls inside a request body.
    pub fn watch(mut self, flag: std::sync::Arc<std::sync::atomic::AtomicBool>) -> Self {
        self.bad_body = Some(flag);
        self
    }

    /// A reader that first serves `prefix` — bytes already read from `inner` — and then
    /// reads `inner`; all of it is checked.
    pub fn with_prefix(inner: S, prefix: Vec<u8>) -> Self {
        Hygiene {
            prefix,
            ..Hygiene::new(inner)
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

fn is_token(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// A bare LF (not after CR) in `bytes`, `prev` being the byte before them.
pub(crate) fn has_bare_lf(prev: Option<u8>, bytes: &[u8]) -> bool {
    let mut prev = prev;
    for &b in bytes {
        if b == b'\n' && prev != Some(b'\r') {
            return true;
        }
        prev = Some(b);
    }
    false
}

/// Where `\r\n\r\n` ends in `bytes`.
pub(crate) fn head_end(bytes: &[u8]) -> Option<usize> {
    bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| p + 4)
}

/// Checks a complete head (ending in CRLF CRLF) and returns the body framing.
pub fn check_head(head: &[u8]) -> Result<State0, Refusal> {
    if has_bare_lf(None, head) {
        return Err(Refusal::BareLf);
    }
    let text = &head[..head.len().saturating_sub(4)];
    let mut lines = text
        .split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    let _request_line = lines.next();
    let (mut cl, mut te): (Option<u64>, Option<&[u8]>) = (None, None);
    for line in lines {
        if line.first().is_some_and(|&b| b == b' ' || b == b'\t') {
            return Err(Refusal::ObsFold);
        }
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            return Err(Refusal::InvalidHeaderName);
        };
        let (name, value) = (&line[..colon], &line[colon + 1..]);
        if name.is_empty() || !name.iter().all(|&b| is_token(b)) {
            return Err(Refusal::InvalidHeaderName);
        }
        let value = value.trim_ascii();
        if name.eq_ignore_ascii_case(b"content-length") {
            let n: u64 = std::str::from_utf8(value)
                .ok()
                .and_then(|v| v.parse().ok())
                .ok_or(Refusal::ConflictingContentLength)?;
            if cl.is_some_and(|c| c != n) {
                return Err(Refusal::ConflictingContentLength);
            }
            cl = Some(n);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            if te.is_some() {
                return Err(Refusal::UnsupportedTransferEncoding);
            }
            te = Some(value);
        }
    }
    match (cl, te) {
        (Some(_), Some(_)) => Err(Refusal::ContentLengthAndTransferEncoding),
        (_, Some(t)) if t.eq_ignore_ascii_case(b"chunked") => Ok(State0::Chunked),
        (_, Some(_)) => Err(Refusal::UnsupportedTransferEncoding),
        (Some(n), None) => Ok(State0::Length(n)),
        (None, None) => Ok(State0::Length(0)),
    }
}

/// Body framing of a checked head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State0 {
    Length(u64),
    Chunked,
}

impl State {
    fn after_head(framing: State0) -> State {
        match framing {
            State0::Length(0) => State::Head,
            State0::Length(n) => State::Body(n),
            State0::Chunked => State::ChunkSize(vec![]),
        }
    }
}

impl<S> Hygiene<S> {
    /// Scans bytes read from the peer, in order. On a refusal, returns how many of them may
    /// still pass (those before the refused head) and why.
    pub(crate) fn feed(&mut self, data: &[u8]) -> Result<(), (usize, Refusal)> {
        self.scan(data, false).map(|_| ())
    }

    /// Scans `data`; with `stop_at_head`, stops where a message body ends (the next head
    /// would start) and returns that offset.
    fn scan(&mut self, data: &[u8], stop_at_head: bool) -> Result<Option<usize>, (usize, Refusal)> {
        if !self.started {
            // HTTP/2 by its preface, decided on the first four bytes however the reads
            // split them: until then a prefix of `PRI ` (no line end in it) is the start
            // of a head as far as HTTP/1 is concerned, kept in `head`.
            let mut first = [0u8; 4];
            let mut n = 0;
            for (slot, &b) in first.iter_mut().zip(self.head.iter().chain(data)) {
                *slot = b;
                n += 1;
            }
            if n == 4 || !b"PRI ".starts_with(&first[..n]) {
                self.started = true;
                if first == *b"PRI " {
                    self.state = State::Passthrough;
                    self.head.clear();
                }
            }
        }
        let mut i = 0;
        while i < data.len() {
            if stop_at_head && matches!(self.state, State::Head) {
                return Ok(Some(i));
            }
            match &mut self.state {
                State::Passthrough => return Ok(None),
                State::Refused => {
                    return Err((i, self.refused.clone().unwrap_or(Refusal::BadChunk)));
                }
                State::Head if self.head.is_empty() => {
                    // Skip the CRLFs allowed between requests.
                    while i < data.len() && (data[i] == b'\r' || data[i] == b'\n') {
                        i += 1;
                    }
                    if i == data.len() {
                        return Ok(None);
                    }
                    let piece = &data[i..];
                    match head_end(piece) {
                        // The whole head in this read: checked in place.
                        Some(end) => {
                            if end > MAX_HEAD {
                                return Err((i, Refusal::HeadTooLarge));
                            }
                            let framing = check_head(&piece[..end]).map_err(|r| (i, r))?;
                            self.state = State::after_head(framing);
                            i += end;
                        }
                        // The start of a head: it passes (a bare LF in it is refused now,
                        // so the parser cannot see a complete head) and is kept aside.
                        None => {
                            if piece.len() > MAX_HEAD {
                                return Err((i, Refusal::HeadTooLarge));
                            }
                            if has_bare_lf(None, piece) {
                                return Err((i, Refusal::BareLf));
                            }
                            self.head.extend_from_slice(piece);
                            return Ok(None);
                        }
                    }
                }
                State::Head => {
                    // The rest of a head begun in an earlier read (so `i` is 0 here).
                    let carried = self.head.len();
                    let prev = self.head.last().copied();
                    let from = carried.saturating_sub(3);
                    self.head.extend_from_slice(data);
                    match head_end(&self.head[from..]) {
                        Some(e) => {
                            let end = from + e;
                            if end > MAX_HEAD {
                                return Err((0, Refusal::HeadTooLarge));
                            }
                            let head = std::mem::take(&mut self.head);
                            let framing = check_head(&head[..end]).map_err(|r| (0, r))?;
                            self.state = State::after_head(framing);
                            i = end - carried;
                        }
                        None => {
                            if self.head.len() > MAX_HEAD {
                                return Err((0, Refusal::HeadTooLarge));
                            }
                            if has_bare_lf(prev, data) {
                                return Err((0, Refusal::BareLf));
                            }
                            return Ok(None);
                        }
                    }
                }
                State::Body(n) | State::ChunkData(n) => {
                    let take = usize::try_from(*n)
                        .unwrap_or(usize::MAX)
                        .min(data.len() - i);
                    *n -= take as u64;
                    i += take;
                    if *n == 0 {
                        self.state = match self.state {
                            State::Body(_) => State::Head,
                            _ => State::ChunkSize(vec![]),
                        };
                    }
                }
                State::ChunkSize(line) => {
                    let b = data[i];
                    line.push(b);
                    if line.len() > 1024 {
                        return Err((i, Refusal::BadChunk));
                    }
                    if b == b'\n' {
                        if line.len() < 2 || line[line.len() - 2] != b'\r' {
                            return Err((i, Refusal::BareLf));
                        }
                        let l = &line[..line.len() - 2];
                        let hex = l.split(|&c| c == b';').next().unwrap_or(b"");
                        let size = std::str::from_utf8(hex)
                            .ok()
                            .and_then(|h| u64::from_str_radix(h.trim(), 16).ok())
                            .ok_or((i, Refusal::BadChunk))?;
                        self.state = if size == 0 {
                            State::Trailers(vec![])
                        } else {
                            // The data and its CRLF; a size that leaves no room for them
                            // is refused (it overflowed here before).
                            State::ChunkData(size.checked_add(2).ok_or((i, Refusal::BadChunk))?)
                        };
                    }
                    i += 1;
                }
                State::Trailers(line) => {
                    let b = data[i];
                    line.push(b);
                    if line.len() > MAX_HEAD {
                        return Err((i, Refusal::HeadTooLarge));
                    }
                    if b == b'\n' {
                        if line.len() < 2 || line[line.len() - 2] != b'\r' {
                            return Err((i, Refusal::BareLf));
                        }
                        if line.len() == 2 {
                            self.state = State::Head;
                        } else {
                            line.clear();
                        }
                    }
                    i += 1;
                }
            }
        }
        if stop_at_head && matches!(self.state, State::Head) {
            return Ok(Some(i));
        }
        Ok(None)
    }
}

/// Finds where a chunked message body ends (after its last chunk and trailers), across
/// reads: the HTTP/1 fast path relays chunked responses with it.
#[derive(Debug)]
pub struct ChunkedEnd(Hygiene<()>);

impl Default for ChunkedEnd {
    fn default() -> Self {
        let mut h = Hygiene::new(());
        h.started = true;
        h.state = State::ChunkSize(vec![]);
        ChunkedEnd(h)
    }
}

impl ChunkedEnd {
    /// Scans the next bytes of the body: `Some(n)` when the body ends after `n` of them.
    pub fn scan(&mut self, data: &[u8]) -> Result<Option<usize>, Refusal> {
        self.0.scan(data, true).map_err(|(_, r)| r)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Hygiene<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if matches!(this.state, State::Refused) {
            return Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("refused request head: {:?}", this.refused),
            )));
        }
        let before = buf.filled().len();
        if this.prefix.is_empty() {
            ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        } else {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.drain(..n);
        }
        if buf.filled().len() == before {
            return Poll::Ready(Ok(())); // EOF
        }
        if let Err((pass, r)) = this.feed(&buf.filled()[before..]) {
            tracing::warn!("refusing an HTTP/1 request head ({r:?}); closing the connection");
            // The refused head and all after it never reach the parser; the bytes before
            // it do, and the next read reports the refusal.
            buf.set_filled(before + pass);
            let in_body = !matches!(this.state, State::Head | State::Passthrough);
            if let (true, Some(f)) = (in_body, &this.bad_body) {
                f.store(true, std::sync::atomic::Ordering::Relaxed);
            }
            this.refused = Some(r);
            this.state = State::Refused;
            if pass == 0 {
                return Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("refused request head: {:?}", this.refused),
                )));
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Hygiene<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
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
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What passes to the parser when `input` arrives in the given pieces, and the refusal.
    fn run_pieces(pieces: &[&[u8]]) -> (Vec<u8>, Option<Refusal>) {
        let mut h = Hygiene::new(());
        let mut passed = vec![];
        for p in pieces {
            match h.feed(p) {
                Ok(()) => passed.extend_from_slice(p),
                Err((n, r)) => {
                    passed.extend_from_slice(&p[..n]);
                    return (passed, Some(r));
                }
            }
        }
        (passed, None)
    }

    fn run(input: &[u8]) -> (Vec<u8>, Option<Refusal>) {
        run_pieces(&[input])
    }

    #[test]
    fn clean_requests_pass_byte_for_byte_across_keep_alive() {
        let reqs: &[u8] = b"GET / HTTP/1.1\r\nHost: a\r\n\r\nPOST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhelloPOST /c HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX-T: 1\r\n\r\nGET /last HTTP/1.1\r\nHost: a\r\n\r\n";
        assert_eq!(run(reqs), (reqs.to_vec(), None));
        // Byte by byte, and in every split into two pieces, too.
        let bytes: Vec<&[u8]> = reqs.chunks(1).collect();
        assert_eq!(run_pieces(&bytes), (reqs.to_vec(), None));
        for cut in 1..reqs.len() {
            let (a, b) = reqs.split_at(cut);
            assert_eq!(run_pieces(&[a, b]), (reqs.to_vec(), None), "cut at {cut}");
        }
    }

    #[test]
    fn a_refused_head_split_across_reads_never_reaches_the_parser_whole() {
        let good: &[u8] = b"GET /ok HTTP/1.1\r\nHost: a\r\n\r\n";
        let bad: &[&[u8]] = &[
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\nabc",
            b"GET / HTTP/1.1\nHost: a\r\n\r\n",
            b"GET / HTTP/1.1\r\n\n",
            b"GET / HTTP/1.1\r\nX-A: 1\r\n  continued\r\n\r\n",
        ];
        for bad in bad {
            let input = [good, bad].concat();
            for cut in 1..input.len() {
                let (a, b) = input.split_at(cut);
                let (passed, refusal) = run_pieces(&[a, b]);
                assert!(
                    refusal.is_some(),
                    "cut at {cut}: {}",
                    String::from_utf8_lossy(&input)
                );
                // The good request passes whole when it was in the first piece; of the bad
                // one, never an end of head (CRLF CRLF, or any LF LF form).
                let rest = &passed[good.len().min(passed.len())..];
                if cut >= good.len() {
                    assert!(passed.starts_with(good), "cut at {cut}");
                }
                assert!(
                    !rest.windows(2).any(|w| w == b"\n\n")
                        && !rest.windows(3).any(|w| w == b"\n\r\n")
                        && !rest.windows(4).any(|w| w == b"\r\n\r\n"),
                    "cut at {cut}: {}",
                    String::from_utf8_lossy(&passed)
                );
            }
        }
    }

    #[test]
    fn smuggling_material_is_refused() {
        let cases: &[(&[u8], Refusal)] = &[
            (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", Refusal::ContentLengthAndTransferEncoding),
            (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", Refusal::UnsupportedTransferEncoding),
            (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n", Refusal::ConflictingContentLength),
            (b"GET / HTTP/1.1\r\nHost: a\r\nX-A: 1\r\n  continued\r\n\r\n", Refusal::ObsFold),
            (b"GET / HTTP/1.1\nHost: a\r\n\r\n", Refusal::BareLf),
            (b"GET / HTTP/1.1\r\nBad Name: x\r\n\r\n", Refusal::InvalidHeaderName),
            (b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET / HTTP/1.1\r\nHost\r\n\r\n", Refusal::InvalidHeaderName),
        ];
        for (input, want) in cases {
            let (passed, got) = run(input);
            assert_eq!(
                got.as_ref(),
                Some(want),
                "{}",
                String::from_utf8_lossy(input)
            );
            // Nothing of the refused head reached the parser.
            assert!(
                !passed.windows(4).any(|w| w == b"POST") || want == &Refusal::InvalidHeaderName,
                "{}",
                String::from_utf8_lossy(&passed)
            );
        }
        let big = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(MAX_HEAD));
        assert_eq!(run(big.as_bytes()).1, Some(Refusal::HeadTooLarge));
    }

    #[test]
    fn a_chunk_size_at_the_limit_is_refused_not_wrapped() {
        let head: &[u8] = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n";
        let input = [head, b"ffffffffffffffff\r\nx"].concat();
        assert_eq!(run(&input).1, Some(Refusal::BadChunk));
        let input = [head, b"fffffffffffffffd\r\nx"].concat();
        assert_eq!(run(&input), (input.clone(), None));
    }

    #[test]
    fn http2_passes_through() {
        let pre = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x12\x04";
        assert_eq!(run(pre), (pre.to_vec(), None));
    }

    /// Found by the `http1_hygiene` fuzz target: a preface whose first read was shorter
    /// than `PRI ` was taken for HTTP/1 and the frames after it refused (bare LF).
    #[test]
    fn http2_passes_through_however_the_preface_is_split() {
        let pre: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x12\x04\x0a\x0a";
        for cut in 1..pre.len() {
            let (a, b) = pre.split_at(cut);
            assert_eq!(run_pieces(&[a, b]), (pre.to_vec(), None), "cut at {cut}");
        }
        let bytes: Vec<&[u8]> = pre.chunks(1).collect();
        assert_eq!(run_pieces(&bytes), (pre.to_vec(), None));
        // An HTTP/1 request that starts like the preface is still checked as HTTP/1.
        let h1: &[u8] = b"PR / HTTP/1.1\nHost: a\r\n\r\n";
        for cut in 1..h1.len() {
            let (a, b) = h1.split_at(cut);
            assert_eq!(run_pieces(&[a, b]).1, Some(Refusal::BareLf), "cut at {cut}");
        }
    }
}
