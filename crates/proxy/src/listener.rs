//! Listeners: the one accept loop every listener of the proxy runs (inbound, outbound,
//! capture, admin), the limits in force on the inbound listeners, and each listener's
//! connection table. The loop never exits: after a resource error (`EMFILE`, `ENFILE`,
//! `ENOMEM`, `ENOBUFS`, or anything unexpected) it backs off (10 ms doubling to 1 s) and
//! goes on, and while it backs off the listener reports itself not accepting, which makes
//! `/ready` fail. The connection table caps what one listener holds (all connections, those
//! still handshaking, and those of one source identity), so one caller cannot take a port
//! away from the others (docs/proxy.md, "Resource limits").

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use meshward_identity::SpiffeId;
use meshward_policy::resource::ConnectionLimits;
use tokio::net::{TcpListener, TcpStream};

/// The limits an inbound listener enforces, resolved: the workload's `connectionLimits`,
/// then the `Mesh`'s, then the proxy's flags, then the built-in defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections one listener holds at most, handshaking or established.
    pub total: usize,
    /// Connections one source identity holds at most on one listener; `None`: derived
    /// from `total` ([`Limits::per_identity`]).
    pub per_identity: Option<usize>,
    /// How long a request head may take: from the handshake to the end of the first head,
    /// from the first byte to the end of a later one.
    pub header_read: Duration,
    /// How long a connection may sit with no request in progress (after a response,
    /// before the next request's first byte; HTTP/2: no open stream).
    pub idle: Duration,
    /// The longest an inbound connection may live (`--max-connection-age`); it ends at
    /// its certificates' expiry in any case ([`crate::expiry`]).
    pub max_age: Option<Duration>,
}

impl Limits {
    /// The largest default `total`.
    pub const MAX_DEFAULT_TOTAL: usize = 8192;
    /// The largest default `per_identity`.
    pub const MAX_DEFAULT_PER_IDENTITY: usize = 1024;
    /// The default `header_read`.
    pub const DEFAULT_HEADER_READ: Duration = Duration::from_secs(10);
    /// The default `idle`.
    pub const DEFAULT_IDLE: Duration = Duration::from_secs(120);
    /// File descriptors kept out of the default `total` for everything else the proxy
    /// opens (its runtime, the control-plane channel, logs, outbound connections).
    pub const RESERVED_FDS: usize = 128;

    /// The built-in defaults, with `total` derived from the process's open-file limit.
    pub fn defaults() -> Self {
        Limits {
            total: Self::default_total(open_file_limit()),
            per_identity: None,
            header_read: Self::DEFAULT_HEADER_READ,
            idle: Self::DEFAULT_IDLE,
            max_age: None,
        }
    }

    /// 8192, or as many connections as the open-file limit leaves room for — each inbound
    /// connection can hold two descriptors (the peer's and the app's) — if that is fewer;
    /// at least 16.
    pub fn default_total(nofile: Option<u64>) -> usize {
        let room = nofile.map_or(usize::MAX, |n| {
            usize::try_from(n)
                .unwrap_or(usize::MAX)
                .saturating_sub(Self::RESERVED_FDS)
                / 2
        });
        room.clamp(16, Self::MAX_DEFAULT_TOTAL)
    }

    /// These limits with the fields `c` sets (from the policy) replaced.
    pub fn with(self, c: &ConnectionLimits) -> Self {
        let n = |v: Option<u64>, d: usize| v.map_or(d, |v| usize::try_from(v).unwrap_or(d));
        Limits {
            total: n(c.total, self.total),
            per_identity: c
                .per_identity
                .and_then(|v| usize::try_from(v).ok())
                .or(self.per_identity),
            header_read: c.header_read_timeout.map_or(self.header_read, |d| d.0),
            idle: c.idle_timeout.map_or(self.idle, |d| d.0),
            max_age: self.max_age,
        }
    }

    /// Connections one source identity may hold: as set, or by default an eighth of
    /// `total` (so at least eight identities must fill the table together), at most 1024,
    /// at least one.
    pub fn per_identity(&self) -> usize {
        self.per_identity
            .unwrap_or((self.total / 8).clamp(1, Self::MAX_DEFAULT_PER_IDENTITY))
    }

    /// How many of `total` may be still handshaking (their identity unknown): a quarter, at
    /// least one — so an unauthenticated flood cannot fill the table.
    pub fn handshaking(&self) -> usize {
        (self.total / 4).max(1)
    }
}

/// The soft `RLIMIT_NOFILE` of this process (Linux: from `/proc/self/limits`).
pub fn open_file_limit() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line.trim_start_matches("Max open files")
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Which cap refused a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The listener holds `total` connections.
    Total(usize),
    /// `handshaking` connections of the listener are still handshaking.
    Handshaking(usize),
    /// The source identity holds `per_identity` connections on the listener.
    PerIdentity(usize),
}

impl Refused {
    /// The metric label of the cap.
    pub fn as_str(self) -> &'static str {
        match self {
            Refused::Total(_) => "total",
            Refused::Handshaking(_) => "handshaking",
            Refused::PerIdentity(_) => "per_identity",
        }
    }

    /// What the decision log says.
    pub fn detail(self, listener: &str) -> String {
        match self {
            Refused::Total(n) => {
                format!("connection limit: {listener} holds its total of {n} connections")
            }
            Refused::Handshaking(n) => {
                format!("connection limit: {n} connections are still handshaking on {listener}")
            }
            Refused::PerIdentity(n) => {
                format!("connection limit: this identity holds {n} connections on {listener}")
            }
        }
    }
}

/// One listener: its name, starting with its direction (`inbound 127.0.0.1:15006`,
/// `outbound capture 127.0.0.1:15001`), whether it is accepting, and its connection table
/// (used by inbound listeners).
#[derive(Debug)]
pub struct Listener {
    pub name: String,
    /// Why the listener is not accepting (backing off after an accept error), if it isn't.
    backoff: Mutex<Option<String>>,
    open: AtomicUsize,
    handshaking: AtomicUsize,
    // INVARIANT: held only to change one entry, never across an await; touched once per
    // connection (at the handshake and at the close), never per request.
    by_identity: Mutex<HashMap<SpiffeId, usize>>,
}

impl Listener {
    fn new(name: String) -> Self {
        Listener {
            name,
            backoff: Mutex::new(None),
            open: AtomicUsize::new(0),
            handshaking: AtomicUsize::new(0),
            by_identity: Mutex::new(HashMap::new()),
        }
    }

    /// A listener outside [`Listeners`] (the admin endpoint's own).
    pub fn unlisted(name: String) -> Self {
        Self::new(name)
    }

    /// Why it is not accepting, if it isn't.
    pub fn not_accepting(&self) -> Option<String> {
        self.backoff.lock().ok().and_then(|g| g.clone())
    }

    fn set_backoff(&self, why: Option<String>) {
        if let Ok(mut g) = self.backoff.lock() {
            *g = why;
        }
    }

    fn accepting(&self) -> bool {
        self.backoff.lock().map_or(true, |g| g.is_none())
    }

    /// Whether it is an inbound listener (whose table caps connections).
    pub fn is_inbound(&self) -> bool {
        self.name.starts_with("inbound")
    }

    /// `(open, handshaking)` connections now.
    pub fn counts(&self) -> (usize, usize) {
        (
            self.open.load(Ordering::Relaxed),
            self.handshaking.load(Ordering::Relaxed),
        )
    }

    /// Takes a slot for a new connection (handshaking), unless the listener holds `total`
    /// connections or `handshaking()` of them are handshaking.
    pub fn admit(self: &Arc<Self>, l: &Limits) -> Result<Slot, Refused> {
        let open = self.open.fetch_add(1, Ordering::Relaxed);
        let hs = self.handshaking.fetch_add(1, Ordering::Relaxed);
        let slot = Slot {
            listener: self.clone(),
            handshaking: true,
            identity: None,
        };
        if open >= l.total {
            return Err(Refused::Total(l.total));
        }
        if hs >= l.handshaking() {
            return Err(Refused::Handshaking(l.handshaking()));
        }
        Ok(slot)
    }
}

/// A connection's place in its listener's table, given back when dropped.
#[derive(Debug)]
pub struct Slot {
    listener: Arc<Listener>,
    handshaking: bool,
    identity: Option<SpiffeId>,
}

impl Slot {
    /// The listener the slot is in.
    pub fn listener(&self) -> &Listener {
        &self.listener
    }

    /// The handshake is done and the peer is `id`: counts it against `id`'s cap.
    pub fn authenticated(&mut self, id: &SpiffeId, l: &Limits) -> Result<(), Refused> {
        self.done_handshaking();
        let Ok(mut map) = self.listener.by_identity.lock() else {
            return Ok(());
        };
        let n = map.entry(id.clone()).or_insert(0);
        if *n >= l.per_identity() {
            return Err(Refused::PerIdentity(l.per_identity()));
        }
        *n += 1;
        self.identity = Some(id.clone());
        Ok(())
    }

    fn done_handshaking(&mut self) {
        if std::mem::take(&mut self.handshaking) {
            self.listener.handshaking.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.done_handshaking();
        self.listener.open.fetch_sub(1, Ordering::Relaxed);
        if let Some(id) = self.identity.take()
            && let Ok(mut map) = self.listener.by_identity.lock()
            && let Some(n) = map.get_mut(&id)
        {
            *n -= 1;
            if *n == 0 {
                map.remove(&id);
            }
        }
    }
}

/// Every listener of the proxy, for `/ready` and `/metrics`, and the policy revision whose
/// inbound listeners are all bound (`/ready` answers 200 only for the current one).
#[derive(Debug, Default)]
pub struct Listeners {
    list: Mutex<Vec<Arc<Listener>>>,
    /// The revision whose listeners are all bound, plus one (0: none yet).
    bound: AtomicU64,
}

impl Listeners {
    /// Adds a listener named `name` (e.g. `inbound 127.0.0.1:15006`).
    pub fn register(&self, name: String) -> Arc<Listener> {
        let l = Arc::new(Listener::new(name));
        if let Ok(mut v) = self.list.lock() {
            v.push(l.clone());
        }
        l
    }

    /// Removes the listener named `name` (a port a new revision no longer declares).
    pub fn deregister(&self, name: &str) {
        if let Ok(mut v) = self.list.lock() {
            v.retain(|l| l.name != name);
        }
    }

    /// Every listener.
    pub fn all(&self) -> Vec<Arc<Listener>> {
        self.list.lock().map(|v| v.clone()).unwrap_or_default()
    }

    /// The listeners that are not accepting now, with why.
    pub fn not_accepting(&self) -> Vec<(String, String)> {
        self.all()
            .iter()
            .filter_map(|l| l.not_accepting().map(|why| (l.name.clone(), why)))
            .collect()
    }

    /// Records that every inbound listener `revision` declares is bound (listening: a
    /// connection from now on waits in the backlog for its accept loop).
    pub fn set_bound(&self, revision: u64) {
        self.bound
            .store(revision.saturating_add(1), Ordering::Release);
    }

    /// The revision whose inbound listeners are all bound, if any.
    pub fn bound(&self) -> Option<u64> {
        self.bound.load(Ordering::Acquire).checked_sub(1)
    }
}

/// A spare file descriptor, given up to accept one connection when the process has run out
/// (so the admin endpoint can still say `/ready` is failing), then taken back.
#[derive(Debug)]
pub struct Reserve(Mutex<Option<std::fs::File>>);

impl Default for Reserve {
    fn default() -> Self {
        let r = Reserve(Mutex::new(None));
        r.refill();
        r
    }
}

impl Reserve {
    /// Takes the spare descriptor back, if there is one to take.
    pub fn refill(&self) {
        if let Ok(mut g) = self.0.lock()
            && g.is_none()
        {
            *g = std::fs::File::open("/dev/null").ok();
        }
    }

    /// Gives the spare descriptor up; whether there was one.
    fn release(&self) -> bool {
        self.0.lock().ok().and_then(|mut g| g.take()).is_some()
    }
}

/// Errors that concern one connection only (it went away before it was accepted): accept
/// again at once.
fn transient(e: &std::io::Error) -> bool {
    use std::io::ErrorKind as K;
    matches!(
        e.kind(),
        K::ConnectionAborted | K::ConnectionReset | K::Interrupted | K::WouldBlock
    ) || matches!(
        e.raw_os_error(),
        Some(71 /* EPROTO */) | Some(1 /* EPERM */)
    )
}

/// The first backoff after an accept error, and the longest.
pub const BACKOFF: (Duration, Duration) = (Duration::from_millis(10), Duration::from_secs(1));

/// Accepts connections on `listener` for ever, handing each to `on_conn`. It never returns:
/// an error about one connection (`ECONNABORTED`, ...) is skipped; any other (`EMFILE`,
/// `ENFILE`, `ENOMEM`, ...) marks the listener not accepting, is counted in
/// `meshward_accept_errors_total`, and is retried after a backoff of 10 ms doubling to 1 s;
/// the listener is accepting again as soon as an accept succeeds or finds no connection
/// waiting. With a `reserve`, the first resource error gives the spare descriptor up to
/// accept that connection (the admin endpoint's way to answer while the process is out of
/// descriptors).
pub async fn accept_loop(
    shared: &crate::state::Shared,
    me: &Listener,
    listener: TcpListener,
    reserve: Option<&Reserve>,
    mut on_conn: impl FnMut(TcpStream, SocketAddr, Conn),
) {
    let name = meshward_telemetry::ListenerNameLabels {
        listener: me.name.clone(),
    };
    let opened = shared.log.metrics.tcp_opened.get_or_create(&name).clone();
    let closed = shared.log.metrics.tcp_closed.get_or_create(&name).clone();
    let mut backoff = BACKOFF.0;
    loop {
        let r = std::future::poll_fn(|cx| {
            let p = listener.poll_accept(cx);
            if p.is_pending() && !me.accepting() {
                // Nothing waiting, nothing failing: accepting again.
                tracing::info!("{} is accepting again", me.name);
                me.set_backoff(None);
            }
            p
        })
        .await;
        match r {
            Ok((tcp, peer)) => {
                if !me.accepting() {
                    tracing::info!("{} is accepting again", me.name);
                    me.set_backoff(None);
                }
                backoff = BACKOFF.0;
                opened.inc();
                on_conn(tcp, peer, Conn(closed.clone()));
            }
            Err(e) if transient(&e) => {}
            Err(e) => {
                shared.log.metrics.accept_error(error_kind(&e));
                if reserve.is_some_and(Reserve::release) {
                    continue;
                }
                let why = format!("accept failed: {e}; retrying in {backoff:?}");
                if me.accepting() {
                    tracing::warn!("{}: {why}", me.name);
                }
                me.set_backoff(Some(why));
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF.1);
            }
        }
    }
}

/// An accepted connection, counted closed (`meshward_tcp_connections_closed_total`) when
/// dropped: whoever serves the connection holds it as long as the socket.
#[derive(Debug)]
pub struct Conn(meshward_telemetry::Counter);

impl Drop for Conn {
    fn drop(&mut self) {
        self.0.inc();
    }
}

/// The metric label of an accept error.
fn error_kind(e: &std::io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(24) => "emfile",
        Some(23) => "enfile",
        Some(12) => "enomem",
        Some(105) => "enobufs",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(total: usize, per_identity: usize) -> Limits {
        Limits {
            total,
            per_identity: Some(per_identity),
            ..Limits::defaults()
        }
    }

    #[test]
    fn default_total_follows_the_open_file_limit() {
        assert_eq!(Limits::default_total(None), 8192);
        assert_eq!(Limits::default_total(Some(1_048_576)), 8192);
        assert_eq!(Limits::default_total(Some(1024)), (1024 - 128) / 2);
        assert_eq!(Limits::default_total(Some(64)), 16);
        assert!(open_file_limit().is_some());
    }

    #[test]
    fn the_table_caps_total_handshaking_and_each_identity() {
        let l = Arc::new(Listener::new("inbound test".into()));
        let lim = limits(8, 2);
        let id = |n: usize| SpiffeId::parse(&format!("spiffe://td/ns/a/sa/w{n}")).unwrap();
        // Two may handshake at once (a quarter of 8).
        let mut s1 = l.admit(&lim).unwrap();
        let mut s2 = l.admit(&lim).unwrap();
        assert_eq!(l.admit(&lim).unwrap_err(), Refused::Handshaking(2));
        assert_eq!(l.counts(), (2, 2));
        // Two per identity.
        s1.authenticated(&id(0), &lim).unwrap();
        s2.authenticated(&id(0), &lim).unwrap();
        let mut s3 = l.admit(&lim).unwrap();
        assert_eq!(s3.authenticated(&id(0), &lim), Err(Refused::PerIdentity(2)));
        drop(s3);
        // Eight in all.
        let held: Vec<Slot> = (1..7)
            .map(|n| {
                let mut s = l.admit(&lim).unwrap();
                s.authenticated(&id(n), &lim).unwrap();
                s
            })
            .collect();
        assert_eq!(l.counts(), (8, 0));
        assert_eq!(l.admit(&lim).unwrap_err(), Refused::Total(8));
        // Closing gives the slots back.
        drop(held);
        assert_eq!(l.counts(), (2, 0));
        drop(s1);
        let mut again = l.admit(&lim).unwrap();
        again.authenticated(&id(0), &lim).unwrap();
        drop((s2, again));
        assert_eq!(l.counts(), (0, 0));
        assert!(l.by_identity.lock().unwrap().is_empty());
    }

    #[test]
    fn policy_fields_replace_the_defaults() {
        let c = ConnectionLimits {
            total: Some(20),
            header_read_timeout: Some(meshward_policy::resource::Dur(Duration::from_secs(1))),
            ..Default::default()
        };
        let l = limits(100, 10).with(&c);
        assert_eq!((l.total, l.per_identity()), (20, 10));
        // Unset: an eighth of the total, at most 1024.
        let d = Limits::defaults().with(&c);
        assert_eq!(d.per_identity(), 2);
        let big = Limits {
            total: 8192,
            ..Limits::defaults()
        };
        assert_eq!(big.per_identity(), 1024);
        let small = Limits {
            total: 448,
            ..Limits::defaults()
        };
        assert_eq!(small.per_identity(), 56);
        assert_eq!(l.header_read, Duration::from_secs(1));
        assert_eq!(l.idle, Limits::DEFAULT_IDLE);
        assert_eq!(l.handshaking(), 5);
    }
}
