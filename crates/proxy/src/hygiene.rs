//! HTTP/1 request hygiene in front of the parser: a reader that holds back each request
//! head until it has checked it, and refuses (ends the connection) a head that different
//! HTTP implementations could read differently — the raw material of request smuggling:
//!
//! - both `Content-Length` and `Transfer-Encoding`, a `Transfer-Encoding` other than
//!   `chunked`, or conflicting `Content-Length`s;
//! - obs-fold (a header line starting with a space or tab);
//! - a bare LF line ending;
//! - an invalid header name.
//!
//! It follows request bodies (by length or chunk by chunk) to find the next head on a
//! keep-alive connection. HTTP/2 connections (the `PRI` preface) pass through untouched.

use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The longest request head accepted.
pub const MAX_HEAD: usize = 64 * 1024;

#[derive(Debug)]
enum State {
    /// Collecting a head (held back until complete and checked).
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
    head: Vec<u8>,
    /// Checked bytes waiting to be handed to the reader.
    ready: Vec<u8>,
    ready_at: usize,
    started: bool,
    pub refused: Option<Refusal>,
}

impl<S> Hygiene<S> {
    pub fn new(inner: S) -> Self {
        Hygiene {
            inner,
            state: State::Head,
            head: vec![],
            ready: vec![],
            ready_at: 0,
            started: false,
            refused: None,
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

fn is_token(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Checks a complete head (ending in CRLF CRLF) and returns the body framing.
pub fn check_head(head: &[u8]) -> Result<State0, Refusal> {
    for (i, &b) in head.iter().enumerate() {
        if b == b'\n' && (i == 0 || head[i - 1] != b'\r') {
            return Err(Refusal::BareLf);
        }
    }
    let text = &head[..head.len().saturating_sub(4)];
    let mut lines = text
        .split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    let _request_line = lines.next();
    let (mut cl, mut te): (Option<u64>, Option<Vec<u8>>) = (None, None);
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
        let value: Vec<u8> = value
            .iter()
            .copied()
            .skip_while(|b| *b == b' ' || *b == b'\t')
            .collect();
        let value = value.trim_ascii_end().to_vec();
        if name.eq_ignore_ascii_case(b"content-length") {
            let n: u64 = std::str::from_utf8(&value)
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

impl<S> Hygiene<S> {
    /// Feeds bytes read from the peer; moves what may pass to `ready`.
    fn feed(&mut self, mut data: &[u8]) -> Result<(), Refusal> {
        if !self.started {
            self.started = true;
            if data.starts_with(b"PRI ") {
                self.state = State::Passthrough;
            }
        }
        while !data.is_empty() {
            match &mut self.state {
                State::Passthrough => {
                    self.ready.extend_from_slice(data);
                    return Ok(());
                }
                State::Refused => return Err(self.refused.clone().unwrap_or(Refusal::BadChunk)),
                State::Head => {
                    // Skip the CRLFs allowed between requests.
                    if self.head.is_empty() {
                        let skip = data
                            .iter()
                            .take_while(|b| **b == b'\r' || **b == b'\n')
                            .count();
                        self.ready.extend_from_slice(&data[..skip]);
                        data = &data[skip..];
                        if data.is_empty() {
                            return Ok(());
                        }
                    }
                    let before = self.head.len();
                    self.head.extend_from_slice(data);
                    let from = before.saturating_sub(3);
                    match self.head[from..].windows(4).position(|w| w == b"\r\n\r\n") {
                        None => {
                            // A bare LF before the end is refused at once; so is a huge head.
                            if self.head.len() > MAX_HEAD {
                                return Err(Refusal::HeadTooLarge);
                            }
                            if self.head.windows(2).any(|w| w[1] == b'\n' && w[0] != b'\r')
                                || self.head.first() == Some(&b'\n')
                            {
                                return Err(Refusal::BareLf);
                            }
                            return Ok(());
                        }
                        Some(p) => {
                            let end = from + p + 4;
                            if end > MAX_HEAD {
                                return Err(Refusal::HeadTooLarge);
                            }
                            let rest = self.head.split_off(end);
                            let head = std::mem::take(&mut self.head);
                            let framing = check_head(&head)?;
                            self.ready.extend_from_slice(&head);
                            self.state = match framing {
                                State0::Length(0) => State::Head,
                                State0::Length(n) => State::Body(n),
                                State0::Chunked => State::ChunkSize(vec![]),
                            };
                            // Continue with the bytes after the head.
                            return self.feed_owned(rest);
                        }
                    }
                }
                State::Body(n) => {
                    let take = usize::try_from(*n).unwrap_or(usize::MAX).min(data.len());
                    self.ready.extend_from_slice(&data[..take]);
                    *n -= take as u64;
                    if *n == 0 {
                        self.state = State::Head;
                    }
                    data = &data[take..];
                }
                State::ChunkSize(line) => {
                    let b = data[0];
                    self.ready.push(b);
                    data = &data[1..];
                    line.push(b);
                    if line.len() > 1024 {
                        return Err(Refusal::BadChunk);
                    }
                    if b == b'\n' {
                        if line.len() < 2 || line[line.len() - 2] != b'\r' {
                            return Err(Refusal::BareLf);
                        }
                        let l = &line[..line.len() - 2];
                        let hex = l.split(|&c| c == b';').next().unwrap_or(b"");
                        let size = std::str::from_utf8(hex)
                            .ok()
                            .and_then(|h| u64::from_str_radix(h.trim(), 16).ok())
                            .ok_or(Refusal::BadChunk)?;
                        self.state = if size == 0 {
                            State::Trailers(vec![])
                        } else {
                            State::ChunkData(size + 2)
                        };
                    }
                }
                State::ChunkData(n) => {
                    let take = usize::try_from(*n).unwrap_or(usize::MAX).min(data.len());
                    self.ready.extend_from_slice(&data[..take]);
                    *n -= take as u64;
                    if *n == 0 {
                        self.state = State::ChunkSize(vec![]);
                    }
                    data = &data[take..];
                }
                State::Trailers(line) => {
                    let b = data[0];
                    self.ready.push(b);
                    data = &data[1..];
                    line.push(b);
                    if line.len() > MAX_HEAD {
                        return Err(Refusal::HeadTooLarge);
                    }
                    if b == b'\n' {
                        if line.len() < 2 || line[line.len() - 2] != b'\r' {
                            return Err(Refusal::BareLf);
                        }
                        if line.len() == 2 {
                            self.state = State::Head;
                        } else {
                            line.clear();
                        }
                    }
                }
            }
        }
        Ok(())
    }

    fn feed_owned(&mut self, rest: Vec<u8>) -> Result<(), Refusal> {
        if rest.is_empty() {
            Ok(())
        } else {
            self.feed(&rest)
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Hygiene<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        loop {
            let this = &mut *self;
            if this.ready_at < this.ready.len() {
                let n = (this.ready.len() - this.ready_at).min(buf.remaining());
                buf.put_slice(&this.ready[this.ready_at..this.ready_at + n]);
                this.ready_at += n;
                if this.ready_at == this.ready.len() {
                    this.ready.clear();
                    this.ready_at = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if matches!(this.state, State::Refused) {
                return Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("refused request head: {:?}", this.refused),
                )));
            }
            let mut tmp = [0u8; 16 * 1024];
            let mut rb = ReadBuf::new(&mut tmp);
            match Pin::new(&mut this.inner).poll_read(cx, &mut rb) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {
                    let got = rb.filled().to_vec();
                    if got.is_empty() {
                        return Poll::Ready(Ok(())); // EOF
                    }
                    if let Err(r) = this.feed(&got) {
                        eprintln!(
                            "meshward-proxy: refusing an HTTP/1 request head ({r:?}); closing the connection"
                        );
                        this.refused = Some(r);
                        this.state = State::Refused;
                    }
                }
            }
        }
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

    fn run(input: &[u8]) -> (Vec<u8>, Option<Refusal>) {
        let mut h = Hygiene::new(());
        let r = h.feed(input).err();
        (h.ready, r)
    }

    #[test]
    fn clean_requests_pass_byte_for_byte_across_keep_alive() {
        let reqs: &[u8] = b"GET / HTTP/1.1\r\nHost: a\r\n\r\nPOST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhelloPOST /c HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX-T: 1\r\n\r\nGET /last HTTP/1.1\r\nHost: a\r\n\r\n";
        assert_eq!(run(reqs), (reqs.to_vec(), None));
        // Byte by byte, too.
        let mut h = Hygiene::new(());
        for b in reqs {
            h.feed(&[*b]).unwrap();
        }
        assert_eq!(h.ready, reqs.to_vec());
        assert!(matches!(h.state, State::Head));
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
    fn http2_passes_through() {
        let pre = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x12\x04";
        assert_eq!(run(pre), (pre.to_vec(), None));
    }
}
