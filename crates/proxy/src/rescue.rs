//! Inbound stage 5, the rescue: the one place a refusal becomes the protocol's answer.
//! Any stage that refuses a request — the request gate ([`crate::gate`]) or the forwarding
//! after it — returns a [`Refused`]; the codec asks it for its answer in its own framing:
//! HTTP (400/403/429/503/504/502 with the JSON reason), gRPC (trailers-only, a status
//! code), the fast path's raw HTTP/1.1 bytes. A refused TCP connection closes unanswered.
//! (linkerd's `ServerRescue::rescue`, ztunnel's `InboundError(Error, StatusCode)`.)
#![deny(clippy::disallowed_types)]

use std::convert::Infallible;

use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::header::HeaderValue;
use hyper::{Response, StatusCode};
use tokio::io::{AsyncWrite, AsyncWriteExt};

/// A response body of the general path.
pub type Body = BoxBody<Bytes, BodyError>;

/// Why a response body of the general path stopped before its end.
#[derive(Debug)]
pub enum BodyError {
    /// The app's response failed.
    App(hyper::Error),
    /// A later revision denies the request ([`crate::recheck`]): the stream is reset
    /// (HTTP/2) or the connection closed (HTTP/1).
    Revoked,
}

impl std::fmt::Display for BodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BodyError::App(e) => write!(f, "the app's response failed: {e}"),
            BodyError::Revoked => f.write_str("a later policy revision denies this request"),
        }
    }
}

impl std::error::Error for BodyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            BodyError::App(e) => Some(e),
            BodyError::Revoked => None,
        }
    }
}

/// The header on every answer the proxy makes itself, its value the reason: the caller's
/// sidecar never blames the endpoint for, nor retries, a refusal of the request (400, 403,
/// 429 with this header).
pub const REFUSED_HEADER: &str = "x-meshward-refused";

/// The statuses the proxy answers with itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// The request is malformed or ambiguous (reason `bad_request`).
    BadRequest,
    /// Policy denied it.
    Forbidden,
    /// A rate limit (the containment issue).
    TooManyRequests,
    /// Load shed or the app unreachable before any byte (the containment issue).
    Unavailable,
    /// The app did not answer.
    BadGateway,
    /// A timeout (the resilience issue).
    GatewayTimeout,
}

impl Status {
    pub fn http(self) -> StatusCode {
        match self {
            Status::BadRequest => StatusCode::BAD_REQUEST,
            Status::Forbidden => StatusCode::FORBIDDEN,
            Status::TooManyRequests => StatusCode::TOO_MANY_REQUESTS,
            Status::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Status::BadGateway => StatusCode::BAD_GATEWAY,
            Status::GatewayTimeout => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// The HTTP/1.1 status line's tail.
    fn line(self) -> &'static str {
        match self {
            Status::BadRequest => "400 Bad Request",
            Status::Forbidden => "403 Forbidden",
            Status::TooManyRequests => "429 Too Many Requests",
            Status::Unavailable => "503 Service Unavailable",
            Status::BadGateway => "502 Bad Gateway",
            Status::GatewayTimeout => "504 Gateway Timeout",
        }
    }

    /// The gRPC status code: INVALID_ARGUMENT, PERMISSION_DENIED, RESOURCE_EXHAUSTED,
    /// UNAVAILABLE, DEADLINE_EXCEEDED.
    pub fn grpc(self) -> &'static str {
        match self {
            Status::BadRequest => "3",
            Status::Forbidden => "7",
            Status::TooManyRequests => "8",
            Status::Unavailable | Status::BadGateway => "14",
            Status::GatewayTimeout => "4",
        }
    }
}

/// A request the proxy answers itself: the status, the JSON body that says why, and the
/// gRPC message. Built by the stage that refused (and recorded there, by the gate).
#[derive(Debug, Clone)]
pub struct Refused {
    pub status: Status,
    pub body: serde_json::Value,
    /// `grpc-message`.
    pub message: String,
    /// `Retry-After`, in seconds (a rate limit).
    pub retry_after: Option<u64>,
}

impl Refused {
    pub fn new(status: Status, body: serde_json::Value) -> Self {
        let message = match status {
            Status::Forbidden => format!(
                "denied by policy: {}",
                body["reason"].as_str().unwrap_or("denied")
            ),
            _ => body["error"]
                .as_str()
                .or_else(|| body["reason"].as_str())
                .unwrap_or("refused by the proxy")
                .to_owned(),
        };
        Refused {
            status,
            body,
            message,
            retry_after: None,
        }
    }

    /// With `Retry-After: secs`.
    pub fn retry_after(mut self, secs: Option<u64>) -> Self {
        self.retry_after = secs;
        self
    }

    /// The answer on the general path (hyper): gRPC requests get a trailers-only
    /// response with the status code, everything else the JSON body.
    pub fn answer(&self, grpc: bool) -> Response<Body> {
        let mut r = self.answer_unmarked(grpc);
        r.headers_mut()
            .insert(REFUSED_HEADER, HeaderValue::from_static(self.reason()));
        r
    }

    /// The reason the header carries (a fixed set of names, never caller input).
    fn reason(&self) -> &'static str {
        match self.status {
            Status::BadRequest => "bad_request",
            Status::Forbidden => "denied",
            Status::TooManyRequests => "rate_limited",
            Status::Unavailable => "unavailable",
            Status::BadGateway => "bad_gateway",
            Status::GatewayTimeout => "timeout",
        }
    }

    fn answer_unmarked(&self, grpc: bool) -> Response<Body> {
        if grpc {
            let mut r = Response::new(empty());
            let h = r.headers_mut();
            h.insert("content-type", HeaderValue::from_static("application/grpc"));
            h.insert("grpc-status", HeaderValue::from_static(self.status.grpc()));
            if let Ok(v) = HeaderValue::from_str(&self.message) {
                h.insert("grpc-message", v);
            }
            if let Some(s) = self.retry_after {
                h.insert("retry-after", HeaderValue::from(s));
            }
            return r;
        }
        let mut r = Response::new(
            Full::new(Bytes::from(self.body.to_string()))
                .map_err(|never: Infallible| match never {})
                .boxed(),
        );
        *r.status_mut() = self.status.http();
        r.headers_mut()
            .insert("content-type", HeaderValue::from_static("application/json"));
        if let Some(s) = self.retry_after {
            r.headers_mut().insert("retry-after", HeaderValue::from(s));
        }
        r
    }

    /// The answer on the HTTP/1.1 fast path, written to `stream`; false when the peer is
    /// gone. (Refusals are the uncommon case: the allocation here is off the common path.)
    pub async fn write_h1<S: AsyncWrite + Unpin>(&self, stream: &mut S, close: bool) -> bool {
        let body = self.body.to_string();
        let retry = self
            .retry_after
            .map(|s| format!("retry-after: {s}\r\n"))
            .unwrap_or_default();
        let head = format!(
            "HTTP/1.1 {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{REFUSED_HEADER}: {}\r\n{retry}{}\r\n",
            self.status.line(),
            body.len(),
            self.reason(),
            if close { "connection: close\r\n" } else { "" }
        );
        let mut msg = head.into_bytes();
        msg.extend_from_slice(body.as_bytes());
        stream.write_all(&msg).await.is_ok() && stream.flush().await.is_ok()
    }
}

/// Whether a request is gRPC (its answer is a gRPC status).
pub fn is_grpc(headers: &hyper::HeaderMap) -> bool {
    headers
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/grpc"))
}

fn empty() -> Body {
    Full::new(Bytes::new())
        .map_err(|never: Infallible| match never {})
        .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_status_has_its_http_and_grpc_answer() {
        let deny = Refused::new(
            Status::Forbidden,
            serde_json::json!({"verdict": "deny", "reason": "no_matching_rule"}),
        );
        let r = deny.answer(true);
        assert_eq!(r.status(), StatusCode::OK, "trailers-only");
        assert_eq!(r.headers()["grpc-status"], "7");
        assert_eq!(
            r.headers()["grpc-message"],
            "denied by policy: no_matching_rule"
        );
        assert_eq!(deny.answer(false).status(), StatusCode::FORBIDDEN);
        for (s, code, grpc) in [
            (Status::BadRequest, 400, "3"),
            (Status::TooManyRequests, 429, "8"),
            (Status::Unavailable, 503, "14"),
            (Status::BadGateway, 502, "14"),
            (Status::GatewayTimeout, 504, "4"),
        ] {
            let r = Refused::new(s, serde_json::json!({"error": "x"}));
            assert_eq!(r.answer(false).status().as_u16(), code);
            assert_eq!(r.answer(true).headers()["grpc-status"], grpc);
            assert_eq!(r.answer(true).headers()["grpc-message"], "x");
        }
        // A rate limit: 429 / RESOURCE_EXHAUSTED, both with `Retry-After`.
        let limited = Refused::new(
            Status::TooManyRequests,
            serde_json::json!({"verdict": "deny", "reason": "rate_limited"}),
        )
        .retry_after(Some(2));
        assert_eq!(limited.answer(false).headers()["retry-after"], "2");
        let g = limited.answer(true);
        assert_eq!(g.headers()["grpc-status"], "8");
        assert_eq!(g.headers()["retry-after"], "2");
    }
}
