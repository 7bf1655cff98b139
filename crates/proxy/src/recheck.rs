//! Live re-checks: what was allowed and is still open — a TCP connection, an HTTP request
//! in progress (on HTTP/2, its stream), an upgraded tunnel — is decided again whenever a
//! new revision is installed (a policy change, an override, a quarantine: they all arrive
//! as revisions) and whenever an override of the revision in force starts or ends. When
//! the verdict turns to deny, the connection or stream is closed and recorded
//! ([`crate::gate::revoked`]).
//!
//! One future per open thing ([`revoke`]), woken by the revision channel
//! ([`crate::state::Shared::revisions`]) or by a timer at the next override boundary: a
//! revision reaches every open connection as soon as it is swapped in, with no scan over
//! connections and no cost on the request path beyond creating the future. The HTTP/1.1
//! fast path does not watch its requests (they are short): the next request on the
//! connection is decided under the new revision.
#![deny(clippy::disallowed_types)]

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use meshward_policy::decision::{Decision, PolicyRevision, Reason, Request, Verdict};
use meshward_policy::model::PolicySet;

use crate::interpret::Facts;
use crate::state::Shared;

/// A verdict turned to deny: the request as decided again, and the new decision.
#[derive(Debug)]
pub(crate) struct Revoked {
    pub req: Request,
    pub d: Decision,
}

/// What kind of thing is watched: decided as the gate decided it (an upgrade or `CONNECT`
/// only by a rule that names it).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Kind {
    pub upgrade: bool,
    pub connect: bool,
}

/// Resolves when a revision after `decided` (or an override starting or ending) denies
/// `req`; pending for as long as it stays allowed.
pub(crate) type Revoke = Pin<Box<dyn Future<Output = Revoked> + Send + Sync>>;

/// Watches `req`, allowed under revision `decided`.
pub(crate) fn revoke(shared: Arc<Shared>, mut req: Request, decided: u64, kind: Kind) -> Revoke {
    Box::pin(until(shared, decided, move |policy, now| {
        req.at = now;
        let d = decide(policy, &req, kind);
        (d.verdict != Verdict::Allow).then(|| Revoked {
            req: req.clone(),
            d,
        })
    }))
}

/// Resolves with what `check` finds once it finds something: `check` runs (with the
/// policy in force and the time) whenever a revision after `decided` is installed and at
/// every override boundary of the revision in force.
pub(crate) async fn until<T, F>(shared: Arc<Shared>, decided: u64, mut check: F) -> T
where
    F: FnMut(Option<&crate::state::Policy>, SystemTime) -> Option<T>,
{
    {
        let mut revisions = shared.revisions.subscribe();
        // A revision swapped in between the decision and the subscription is not missed.
        let mut changed = current(&shared) != decided;
        loop {
            let next = {
                let policy = shared.policy.load();
                let now = SystemTime::now();
                if changed && let Some(found) = check(policy.as_deref(), now) {
                    return found;
                }
                policy
                    .as_deref()
                    .and_then(|p| next_override_change(&p.set, now))
                    .map(|t| t.duration_since(now).unwrap_or_default())
            };
            match next {
                Some(wait) => {
                    // A little past the boundary, so the override has started or ended.
                    let wait = wait + Duration::from_millis(5);
                    tokio::select! {
                        r = revisions.changed() => if r.is_err() { forever().await },
                        () = tokio::time::sleep(wait) => {}
                    }
                }
                None => {
                    if revisions.changed().await.is_err() {
                        forever().await;
                    }
                }
            }
            changed = true;
        }
    }
}

/// The proxy is shutting down (no more revisions): stay allowed.
async fn forever() -> ! {
    std::future::pending::<()>().await;
    unreachable!("a pending future never completes")
}

fn current(shared: &Shared) -> u64 {
    shared.policy.load().as_ref().map_or(0, |p| p.revision)
}

/// The decision the gate would make now (rate limits aside: they meter new requests only).
fn decide(policy: Option<&crate::state::Policy>, req: &Request, kind: Kind) -> Decision {
    let Some(p) = policy else {
        return Decision::bare(Verdict::Deny, Reason::NoPolicy, PolicyRevision(0));
    };
    let d = p.engine.decide(req);
    if !(kind.upgrade || kind.connect) {
        return d;
    }
    let facts = Facts {
        upgrade: kind.upgrade,
        connect: kind.connect,
        ..Facts::default()
    };
    crate::interpret::upgrade_allowed(&p.set, &facts, d)
}

/// The next time after `now` an override of `set` starts or ends.
pub(crate) fn next_override_change(set: &PolicySet, now: SystemTime) -> Option<SystemTime> {
    set.overrides
        .iter()
        .flat_map(|o| [o.starts_at, o.expires_at])
        .flatten()
        .filter(|&t| t > now)
        .min()
}

/// A response body of the general path that ends when its request is revoked: the
/// revocation is recorded, a gRPC call ends with `PERMISSION_DENIED` in its trailers, any
/// other stream is reset (HTTP/2; HTTP/1: the connection closes).
pub(crate) struct Revocable<B> {
    inner: B,
    revoke: Option<Revoke>,
    shared: Arc<Shared>,
    port: crate::inbound::InboundPort,
    grpc: bool,
    /// Revoked: nothing more of the app's response is sent.
    cut: bool,
}

impl<B> Revocable<B> {
    pub(crate) fn new(
        inner: B,
        revoke: Revoke,
        shared: Arc<Shared>,
        port: crate::inbound::InboundPort,
        grpc: bool,
    ) -> Self {
        Revocable {
            inner,
            revoke: Some(revoke),
            shared,
            port,
            grpc,
            cut: false,
        }
    }
}

impl<B> hyper::body::Body for Revocable<B>
where
    B: hyper::body::Body<Data = hyper::body::Bytes, Error = crate::rescue::BodyError> + Unpin,
{
    type Data = hyper::body::Bytes;
    type Error = crate::rescue::BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        use std::task::Poll;
        if self.cut {
            return Poll::Ready(None);
        }
        if let Some(Poll::Ready(r)) = self.revoke.as_mut().map(|f| f.as_mut().poll(cx)) {
            self.revoke = None;
            self.cut = true;
            crate::gate::revoked(&self.shared, self.port, &r, "stream");
            if self.grpc {
                let mut t = hyper::HeaderMap::new();
                t.insert("grpc-status", hyper::header::HeaderValue::from_static("7"));
                let msg = format!(
                    "revoked: revision {} denies this call ({})",
                    r.d.revision.0,
                    r.d.reason.as_str()
                );
                if let Ok(v) = hyper::header::HeaderValue::from_str(&msg) {
                    t.insert("grpc-message", v);
                }
                return Poll::Ready(Some(Ok(hyper::body::Frame::trailers(t))));
            }
            return Poll::Ready(Some(Err(crate::rescue::BodyError::Revoked)));
        }
        let p = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(p, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) {
            // Done: nothing left to watch.
            self.revoke = None;
        }
        p
    }

    fn is_end_stream(&self) -> bool {
        self.cut || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_next_boundary_is_the_nearest_start_or_end_still_ahead() {
        let yaml = r#"
apiVersion: meshward.io/v1alpha1
kind: Mesh
metadata: {name: m}
spec: {trustDomain: shop.example}
---
apiVersion: meshward.io/v1alpha1
kind: Override
metadata: {name: a, namespace: ns}
spec:
  action: deny
  subject: {namespaces: [x]}
  reason: r
  startsAt: 2026-11-28T08:00:00Z
  expiresAt: 2026-11-28T20:00:00Z
---
apiVersion: meshward.io/v1alpha1
kind: Override
metadata: {name: b, namespace: ns}
spec:
  action: deny
  subject: {namespaces: [y]}
  reason: r
  expiresAt: 2026-11-28T10:00:00Z
"#;
        let loaded = meshward_policy::load_sources(vec![("t.yaml".into(), yaml.into())]);
        let Some(set) = loaded.set else {
            panic!("{:#?}", loaded.diagnostics);
        };
        let at = |s: &str| humantime::parse_rfc3339(s).unwrap_or_else(|e| panic!("{s}: {e}"));
        let next = |now| next_override_change(&set, at(now));
        assert_eq!(
            next("2026-11-28T07:00:00Z"),
            Some(at("2026-11-28T08:00:00Z"))
        );
        assert_eq!(
            next("2026-11-28T08:00:00Z"),
            Some(at("2026-11-28T10:00:00Z"))
        );
        assert_eq!(
            next("2026-11-28T12:00:00Z"),
            Some(at("2026-11-28T20:00:00Z"))
        );
        assert_eq!(next("2026-11-28T20:00:00Z"), None);
    }
}
