//! The proxy's side of the control plane: join with a token, renew the SVID at about half
//! its lifetime (with jitter, retrying with backoff while the control plane is down),
//! follow the config stream, and keep last-known-good state on disk (mode 0600) so a
//! restart without a control plane still enforces the last policy.
//!
//! What goes wrong is survived and said (docs/operations.md): a renewed certificate is used
//! even when the state directory cannot take it, and a revision that could not be saved is
//! acknowledged as enforced but not persisted ([`Health`]); every call to the control plane
//! has a deadline and the channel an HTTP/2 keepalive ([`crate::transport`]), so a hung
//! control plane is noticed within [`HUNG_BOUND`]; with several `--control` addresses a
//! failed call goes on to the next; and the config stream's backoff starts again from
//! [`Backoff::FIRST`] after every stream that delivered a snapshot.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;

use meshward_api::v1::config_client::ConfigClient;
use meshward_api::v1::identity_client::IdentityClient;
use meshward_api::v1::telemetry_client::TelemetryClient;
use meshward_api::v1::{ConfigAck, DecisionBatch, SignRequest};
use meshward_identity::ca::{
    cert_pem, certs_from_pem, key_from_pem, key_pem, new_workload_key, write_atomic,
};
use meshward_identity::svid::TrustBundles;
use meshward_identity::verifier::{Accept, SharedBundles, SvidServerVerifier};
use meshward_identity::{SpiffeId, TrustDomain};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio_stream::StreamExt as _;

use crate::state::{Shared, Svid};
use crate::transport::Connector;

/// How to reach the control plane and where to keep state.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The control plane's proxy API, `host:port`; several, comma-separated (replicas):
    /// a call that fails or times out goes on to the next.
    pub control: String,
    pub trust_domain: TrustDomain,
    /// Roots to check the control plane with (its bundle).
    pub control_roots: Vec<CertificateDer<'static>>,
    /// The identity this proxy runs as.
    pub identity: SpiffeId,
    /// A join token, needed only when the state directory holds no valid SVID.
    pub join_token: Option<String>,
    pub state_dir: PathBuf,
    /// Transparent mode: the socket mark on the proxy's own connections.
    pub mark: Option<u32>,
}

fn log(msg: &str) {
    tracing::info!("{msg}");
}

fn warn(msg: &str) {
    tracing::warn!("{msg}");
}

/// A hung control plane (it accepts connections and answers nothing: stopped, or
/// deadlocked) is noticed within this long: an open channel by its HTTP/2 keepalive
/// (a ping every [`crate::transport::KEEPALIVE_INTERVAL`], unanswered for
/// [`crate::transport::KEEPALIVE_TIMEOUT`]), a new one by the connect and handshake
/// deadline, a call by its deadline ([`crate::transport::CALL_TIMEOUT`]).
pub const HUNG_BOUND: Duration = Duration::from_secs(15);

/// What the agent could not do, for `/ready`, `/metrics` and the acknowledgements.
#[derive(Debug, Default)]
pub struct Health {
    /// Why the last write to the state directory failed; cleared by the next one that
    /// works.
    pub persist_error: ArcSwapOption<String>,
    /// The newest revision saved as last-known-good (0: none); a restart without a control
    /// plane enforces it.
    pub persisted_revision: AtomicU64,
    /// The last control-plane call that failed, and why; cleared by the next that works.
    pub control_error: ArcSwapOption<String>,
    /// Which `--control` address to try first (the last that answered).
    preferred: AtomicUsize,
    /// Shutting down: callers are told to pass this endpoint over while it still serves.
    draining: std::sync::atomic::AtomicBool,
    /// Why the app is not accepting connections (the sidecar's own probe).
    app_down: ArcSwapOption<String>,
    /// Readiness or the certificate changed: the config stream tells the control plane.
    readiness_changed: tokio::sync::Notify,
    /// The rollout whose candidate this proxy could not compile, and why.
    pub candidate_error: ArcSwapOption<(u64, String)>,
}

impl Health {
    /// Records the result of a write to the state directory (`what`: svid, bundle,
    /// snapshot): a failure is logged (once per cause), counted and kept for `/ready`.
    fn persisted(&self, shared: &Shared, what: &'static str, r: Result<(), String>) -> bool {
        match r {
            Ok(()) => {
                if what != "bundle" && self.persist_error.swap(None).is_some() {
                    log("the state directory takes writes again");
                }
                true
            }
            Err(e) => {
                shared.log.metrics.persist_failed(what);
                let msg = format!("cannot save the {what}: {e}");
                let again = self.persist_error.load().as_deref() == Some(&msg);
                if !again {
                    warn(&format!(
                        "{msg}; it is in use, but a restart would not find it (see docs/operations.md)"
                    ));
                }
                self.persist_error.store(Some(Arc::new(msg)));
                false
            }
        }
    }

    /// Why this workload is not ready for callers (`None`: ready): draining, or its app
    /// not accepting connections.
    pub fn not_ready(&self) -> Option<String> {
        if self.draining.load(Ordering::Relaxed) {
            return Some("draining: the sidecar is shutting down".into());
        }
        self.app_down.load().as_deref().cloned()
    }

    /// From now on callers are told this endpoint is going away.
    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
        self.readiness_changed.notify_one();
    }

    /// What the app probe found (`None`: the app accepts connections); a change is logged
    /// and told to the control plane.
    pub fn set_app_down(&self, why: Option<String>) {
        let was = self.app_down.load().as_deref().cloned();
        if was == why {
            return;
        }
        match &why {
            Some(w) => warn(&format!("not ready: {w}")),
            None => log("ready: the app accepts connections again"),
        }
        self.app_down.store(why.map(Arc::new));
        self.readiness_changed.notify_one();
    }

    /// Records a failed control-plane call, counted by kind (`timeout`, `unavailable`,
    /// `refused`).
    fn control_failed(&self, shared: &Shared, e: &str) {
        let kind = if e.contains("did not answer") || e.contains("timed out") {
            "timeout"
        } else if e.contains("refused by the control plane") {
            "refused"
        } else {
            "unavailable"
        };
        shared.log.metrics.control_error(kind);
        self.control_error.store(Some(Arc::new(e.to_owned())));
    }
}

/// Writes `files` into `dir` (each atomically, mode 0600).
fn save(dir: &Path, files: &[(&str, &[u8])]) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create `{}`: {e}", dir.display()))?;
    for (name, bytes) in files {
        write_atomic(&dir.join(name), bytes, true).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Reconnect delays: from [`Backoff::FIRST`], doubling up to a cap, each with ±25 %
/// jitter (so sidecars do not all come back at the same instant).
#[derive(Debug)]
pub struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    /// The first delay, and the one after every success.
    pub const FIRST: Duration = Duration::from_millis(250);

    pub fn new(max: Duration) -> Self {
        Backoff {
            next: Self::FIRST,
            max,
        }
    }

    pub fn reset(&mut self) {
        self.next = Self::FIRST;
    }

    /// The delay to wait now (the one after it doubles).
    pub fn delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .subsec_nanos();
        // 0.75 .. 1.25
        d.mul_f64(0.75 + f64::from(nanos % 1000) / 2000.0)
    }
}

fn certified(chain: Vec<CertificateDer<'static>>, key_der: Vec<u8>) -> Result<Svid, String> {
    let not_after = chain
        .first()
        .and_then(meshward_identity::svid::not_after)
        .ok_or("the certificate has no validity")?;
    let signing = rustls::crypto::ring::sign::any_supported_type(&PrivateKeyDer::Pkcs8(
        PrivatePkcs8KeyDer::from(key_der),
    ))
    .map_err(|e| e.to_string())?;
    Ok(Svid {
        key: Arc::new(rustls::sign::CertifiedKey::new(chain, signing)),
        not_after,
    })
}

/// Restores SVID, bundle and last-known-good policy from the state directory.
pub fn restore(shared: &Shared, dir: &Path, td: &TrustDomain) {
    if let (Ok(chain), Ok(key)) = (
        std::fs::read_to_string(dir.join("svid.pem")),
        std::fs::read_to_string(dir.join("svid.key")),
    ) && let Ok(k) = key_from_pem(&key)
    {
        match certified(certs_from_pem(&chain), k.serialize_der()).and_then(|s| {
            s.key
                .keys_match()
                .map(|()| s)
                .map_err(|e| format!("its key does not match the certificate ({e})"))
        }) {
            Ok(s) => {
                log(&format!(
                    "restored the SVID from {} (valid until {})",
                    dir.display(),
                    humantime::format_rfc3339_seconds(s.not_after)
                ));
                shared.svid.store(Some(Arc::new(s)));
            }
            Err(e) => warn(&format!("the stored SVID is unusable: {e}")),
        }
    }
    if let Ok(b) = std::fs::read_to_string(dir.join("bundle.pem")) {
        let mut tb = TrustBundles::new();
        tb.set(td.clone(), certs_from_pem(&b));
        shared.bundles.store(tb);
    }
    if let Ok(text) = std::fs::read_to_string(dir.join("snapshot.json"))
        && let Ok((rev, files)) = serde_json::from_str::<(u64, Vec<(String, String)>)>(&text)
    {
        match compile(&files) {
            Ok(set) => {
                shared.set_policy(rev, set);
                shared
                    .health
                    .persisted_revision
                    .store(rev, Ordering::Relaxed);
                log(&format!(
                    "enforcing last-known-good revision {rev} from {} (the newest this proxy saved)",
                    dir.display()
                ));
            }
            Err(e) => warn(&format!("the stored snapshot is invalid, ignoring it: {e}")),
        }
    }
}

fn compile(files: &[(String, String)]) -> Result<meshward_policy::model::PolicySet, String> {
    let loaded = meshward_policy::load_sources(
        files
            .iter()
            .map(|(n, t)| (Arc::<str>::from(n.as_str()), Arc::<str>::from(t.as_str())))
            .collect(),
    );
    loaded.into_valid().map_err(|l| {
        let errs: Vec<String> = l
            .diagnostics
            .iter()
            .filter(|d| d.is_error())
            .take(3)
            .map(|d| format!("{}:{}: {}", d.file, d.line, d.message))
            .collect();
        errs.join("; ")
    })
}

fn tls(cfg: &AgentConfig, shared: Option<&Arc<Shared>>) -> Result<rustls::ClientConfig, String> {
    let mut b = TrustBundles::new();
    b.set(cfg.trust_domain.clone(), cfg.control_roots.clone());
    let control =
        meshward_identity::control_identity(&cfg.trust_domain).ok_or("invalid trust domain")?;
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .map_err(|e| e.to_string())?
    .dangerous()
    .with_custom_certificate_verifier(SvidServerVerifier::new(
        SharedBundles::new(b),
        Accept::Only(vec![control]),
    ));
    Ok(match shared {
        Some(s) => builder.with_client_cert_resolver(Arc::new(RenewalCert(s.clone()))),
        None => builder.with_no_client_auth(),
    })
}

/// Towards the control plane only: presents the stored SVID even after it expired, so a
/// proxy whose certificate ran out while the control plane was down can renew (within the
/// control plane's grace; the data path never presents an expired certificate).
#[derive(Debug)]
struct RenewalCert(Arc<Shared>);

impl rustls::client::ResolvesClientCert for RenewalCert {
    fn resolve(
        &self,
        _hints: &[&[u8]],
        _schemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        self.0.svid.load_full().map(|s| s.key.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// The `--control` addresses, the one that answered last first.
fn addresses(shared: &Shared, cfg: &AgentConfig) -> Vec<(usize, String)> {
    let all: Vec<String> = cfg
        .control
        .split(',')
        .map(|a| a.trim().to_owned())
        .filter(|a| !a.is_empty())
        .collect();
    let first = shared.health.preferred.load(Ordering::Relaxed) % all.len().max(1);
    let n = all.len();
    all.into_iter()
        .enumerate()
        .cycle()
        .skip(first)
        .take(n)
        .collect()
}

/// Runs `call` against each control-plane address in turn until one answers; the first
/// error is the one returned when none does (with the others').
async fn on_control<T, F, Fut>(
    shared: &Arc<Shared>,
    cfg: &AgentConfig,
    call: F,
) -> Result<T, String>
where
    F: Fn(String) -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let (mut errors, all) = (vec![], addresses(shared, cfg));
    let last = all.len().saturating_sub(1);
    for (k, (i, addr)) in all.into_iter().enumerate() {
        match call(addr.clone()).await {
            Ok(t) => {
                shared.health.preferred.store(i, Ordering::Relaxed);
                if shared.health.control_error.swap(None).is_some() {
                    log(&format!("the control plane at {addr} answers again"));
                }
                return Ok(t);
            }
            Err(e) => {
                let e = format!("{addr}: {e}");
                shared.health.control_failed(shared, &e);
                if k < last {
                    warn(&format!("{e}; trying the next control-plane address"));
                }
                errors.push(e);
            }
        }
    }
    Err(errors.join("; "))
}

/// A control-plane call's deadline, said as the operator should read it.
async fn within<T>(what: &str, f: impl Future<Output = Result<T, String>>) -> Result<T, String> {
    match tokio::time::timeout(crate::transport::CALL_TIMEOUT, f).await {
        Ok(r) => r,
        Err(_) => Err(format!(
            "the control plane did not answer {what} within {:?} (hung or overloaded?)",
            crate::transport::CALL_TIMEOUT
        )),
    }
}

/// Asks for a certificate (join token when `token` is set, else renewal over mTLS), uses
/// it at once and then saves it: a state directory that cannot take it costs the next
/// restart, never the traffic (the failure is logged, counted and shown by `/ready`).
async fn sign(
    shared: &Arc<Shared>,
    cfg: &AgentConfig,
    token: Option<&str>,
) -> Result<SystemTime, String> {
    let (key, csr) = new_workload_key(&cfg.identity).map_err(|e| e.to_string())?;
    let tls = tls(cfg, if token.is_some() { None } else { Some(shared) })?;
    let resp = on_control(shared, cfg, |addr| {
        let (tls, csr) = (tls.clone(), csr.clone());
        within("a certificate request", async move {
            let ch = Connector::new(cfg.mark).grpc_channel(&addr, tls).await?;
            IdentityClient::new(ch)
                .sign(SignRequest {
                    join_token: token.unwrap_or_default().to_owned(),
                    csr,
                    lifetime_secs: 0,
                })
                .await
                .map(tonic::Response::into_inner)
                .map_err(|s| format!("refused by the control plane: {}", s.message()))
        })
    })
    .await?;
    if resp.spiffe_id != cfg.identity.as_str() {
        return Err(format!(
            "the control plane issued `{}`, expected `{}`",
            resp.spiffe_id, cfg.identity
        ));
    }
    let chain: Vec<CertificateDer<'static>> =
        resp.chain.into_iter().map(CertificateDer::from).collect();
    let bundle: Vec<CertificateDer<'static>> =
        resp.bundle.into_iter().map(CertificateDer::from).collect();
    let svid = certified(chain.clone(), key.serialize_der())?;
    let not_after = svid.not_after;
    let mut tb = TrustBundles::new();
    tb.set(cfg.trust_domain.clone(), bundle.clone());
    shared.bundles.store(tb);
    // New handshakes use the new certificate; established connections are untouched.
    shared.svid.store(Some(Arc::new(svid)));
    // The control plane learns which certificate this sidecar holds (the dashboard).
    shared.health.readiness_changed.notify_one();
    let (key_pem, chain_pem, bundle_pem) = (
        key_pem(&key),
        chain.iter().map(cert_pem).collect::<String>(),
        bundle.iter().map(cert_pem).collect::<String>(),
    );
    // The key and its certificate in one go (restore checks they match).
    let saved = save(
        &cfg.state_dir,
        &[
            ("svid.key", key_pem.as_bytes()),
            ("svid.pem", chain_pem.as_bytes()),
        ],
    );
    shared.health.persisted(shared, "svid", saved);
    let saved = save(&cfg.state_dir, &[("bundle.pem", bundle_pem.as_bytes())]);
    shared.health.persisted(shared, "bundle", saved);
    Ok(not_after)
}

/// Half the remaining lifetime, with up to 10% jitter either way.
fn renew_in(not_after: SystemTime) -> Duration {
    let left = not_after
        .duration_since(SystemTime::now())
        .unwrap_or_default();
    let half = left / 2;
    let jitter = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .subsec_nanos()
        % 200;
    let factor = 900 + u64::from(jitter); // 0.9 .. 1.1
    Duration::from_millis(u64::try_from(half.as_millis()).unwrap_or(u64::MAX) / 1000 * factor)
}

/// Waits until `svid` is due for renewal: at about half its remaining life — counted to
/// its expiry, or to when the mesh's `certificateLifetime` (as the policy in force says)
/// would have it expire if that is sooner. A lifetime shortened below what the
/// certificate was issued with (a drill forcing renewals, a policy tightening) renews it
/// at once, not half an hour later. The policy is looked at every second.
async fn renewal_due(shared: &Shared, svid: &Svid) {
    let not_before = svid
        .key
        .cert
        .first()
        .and_then(meshward_identity::svid::serial_and_validity)
        .map(|(_, nb, _)| nb);
    let mut planned: Option<(Option<Duration>, SystemTime)> = None;
    loop {
        let lifetime = shared
            .policy
            .load()
            .as_ref()
            .map(|p| p.set.mesh.certificate_lifetime);
        let at = match planned {
            Some((l, at)) if l == lifetime => at,
            _ => {
                // Issued for longer than the mesh allows now (beyond the CA's 30 s
                // back-dating and some skew): due as if issued with the lifetime in force.
                let due = match (lifetime, not_before) {
                    (Some(l), Some(nb))
                        if svid
                            .not_after
                            .duration_since(nb)
                            .is_ok_and(|issued| issued > l + Duration::from_secs(120)) =>
                    {
                        svid.not_after.min(nb + l)
                    }
                    _ => svid.not_after,
                };
                let at = SystemTime::now() + renew_in(due);
                planned = Some((lifetime, at));
                at
            }
        };
        let Ok(left) = at.duration_since(SystemTime::now()) else {
            return;
        };
        if left.is_zero() {
            return;
        }
        tokio::time::sleep(left.min(Duration::from_secs(1))).await;
    }
}

/// Keeps the SVID fresh forever: join if needed, then renew at about half its lifetime.
pub async fn identity_loop(shared: Arc<Shared>, cfg: AgentConfig) {
    let mut backoff = Backoff::new(Duration::from_secs(5));
    loop {
        let current = shared.svid.load_full();
        let result = match &current {
            None => match &cfg.join_token {
                Some(t) => sign(&shared, &cfg, Some(t)).await,
                None => Err("no SVID and no join token: pass --join-token-file".into()),
            },
            Some(s) if s.not_after > SystemTime::now() => {
                renewal_due(&shared, s).await;
                sign(&shared, &cfg, None).await
            }
            Some(_) => {
                // Expired (the control plane was unreachable): renew with it while the
                // control plane's grace allows, else join again if a token was given.
                match sign(&shared, &cfg, None).await {
                    Ok(t) => Ok(t),
                    Err(e) => match &cfg.join_token {
                        Some(t) => sign(&shared, &cfg, Some(t))
                            .await
                            .map_err(|e2| format!("renewing the expired SVID: {e}; joining: {e2}")),
                        None => Err(format!(
                            "the SVID has expired and cannot be renewed ({e}); new connections fail closed"
                        )),
                    },
                }
            }
        };
        match result {
            Ok(not_after) => {
                log(&format!(
                    "SVID for {} valid until {}",
                    cfg.identity,
                    humantime::format_rfc3339_seconds(not_after)
                ));
                backoff.reset();
            }
            Err(e) => {
                let wait = backoff.delay();
                warn(&format!(
                    "cannot get a certificate ({e}); retrying in {wait:.1?}"
                ));
                tokio::time::sleep(wait).await;
            }
        }
    }
}

/// Follows the config stream forever, reconnecting with backoff; a stream that delivered
/// a snapshot was healthy, so the next reconnect starts from the first delay again.
pub async fn config_loop(shared: Arc<Shared>, cfg: AgentConfig) {
    let mut backoff = Backoff::new(Duration::from_millis(1500));
    loop {
        if shared.current_svid().is_some() {
            let r = on_control(&shared, &cfg, |addr| {
                let (shared, cfg) = (&shared, &cfg);
                async move { stream_once(shared, cfg, &addr).await }
            })
            .await;
            match r {
                Ok(never) => match never {},
                Err(e) => {
                    if e.contains(STREAMED) {
                        backoff.reset();
                    }
                    let wait = backoff.delay();
                    warn(&format!(
                        "config stream: {e}; keeping revision {} and retrying in {wait:.1?}",
                        shared.policy.load().as_ref().map_or(0, |p| p.revision)
                    ));
                    tokio::time::sleep(wait).await;
                }
            }
        } else {
            tokio::time::sleep(Backoff::FIRST).await;
        }
    }
}

/// The trust bundle a snapshot carries: in force at once, and saved.
fn take_bundle(shared: &Shared, cfg: &AgentConfig, bundle: &[Vec<u8>]) {
    if bundle.is_empty() {
        return;
    }
    let mut tb = TrustBundles::new();
    tb.set(
        cfg.trust_domain.clone(),
        bundle.iter().cloned().map(CertificateDer::from).collect(),
    );
    shared.bundles.store(tb);
    let pem: String = bundle
        .iter()
        .map(|b| cert_pem(&CertificateDer::from(b.clone())))
        .collect();
    let r = save(&cfg.state_dir, &[("bundle.pem", pem.as_bytes())]);
    shared.health.persisted(shared, "bundle", r);
}

/// Marks the end of a stream that delivered at least one snapshot.
const STREAMED: &str = "after delivering revisions";

async fn stream_once(
    shared: &Arc<Shared>,
    cfg: &AgentConfig,
    addr: &str,
) -> Result<std::convert::Infallible, String> {
    let ch = within("the connection", async {
        Connector::new(cfg.mark)
            .grpc_channel(addr, tls(cfg, Some(shared))?)
            .await
    })
    .await?;
    // Decision records go to the control plane over the same connection, for as long as
    // it lasts.
    struct AbortOnDrop(tokio::task::JoinHandle<()>);
    impl Drop for AbortOnDrop {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
    let _shipper = shared
        .log
        .ship
        .clone()
        .map(|q| AbortOnDrop(tokio::spawn(ship_loop(q, ch.clone()))));
    let (tx, rx) = tokio::sync::mpsc::channel::<ConfigAck>(4);
    let mut snaps = within("the config stream", async {
        ConfigClient::new(ch)
            .stream(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .map(tonic::Response::into_inner)
            .map_err(|s| format!("refused by the control plane: {}", s.message()))
    })
    .await?;
    let mut delivered = 0u64;
    let status = |shared: &Shared, revision: u64, persist_error: String| {
        let cert = shared
            .svid
            .load_full()
            .and_then(|s| meshward_identity::svid::serial_and_validity(s.key.cert.first()?));
        let secs = |t: SystemTime| {
            t.duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs())
        };
        ConfigAck {
            revision,
            accepted: true,
            error: String::new(),
            persist_error,
            workload: shared.workload.to_string(),
            not_ready: shared.health.not_ready().unwrap_or_default(),
            cert_serial: cert.as_ref().map(|c| c.0.clone()).unwrap_or_default(),
            cert_not_before: cert.as_ref().map_or(0, |c| secs(c.1)),
            cert_not_after: cert.as_ref().map_or(0, |c| secs(c.2)),
            candidate_rollout: shared
                .policy
                .load()
                .as_ref()
                .and_then(|p| p.candidate.as_ref())
                .map_or(0, |c| c.rollout),
            candidate_error: shared
                .health
                .candidate_error
                .load()
                .as_ref()
                .map(|e| format!("rollout {}: {}", e.0, e.1))
                .unwrap_or_default(),
        }
    };
    loop {
        let msg = tokio::select! {
            m = snaps.next() => m,
            () = shared.health.readiness_changed.notified() => {
                // Readiness alone: said as an acknowledgement of the revision enforced.
                let enforced = shared.policy.load().as_ref().map_or(0, |p| p.revision);
                let pe = shared.health.persist_error.load().as_deref().cloned().unwrap_or_default();
                if tx.send(status(shared, enforced, pe)).await.is_err() {
                    break;
                }
                continue;
            }
        };
        let Some(msg) = msg else { break };
        let snap = match msg {
            Ok(s) => s,
            Err(s) if delivered > 0 => {
                return Err(format!("{} ({STREAMED})", status_text(&s)));
            }
            Err(s) => return Err(status_text(&s)),
        };
        delivered += 1;
        if delivered == 1 && shared.health.control_error.swap(None).is_some() {
            log(&format!("the control plane at {addr} answers again"));
        }
        // Which endpoints their own sidecars say are not ready, for this view and the next.
        let not_ready: std::collections::HashMap<_, _> = snap
            .not_ready
            .iter()
            .filter_map(|n| {
                Some((
                    meshward_policy::WorkloadRef::parse(&n.workload).ok()?,
                    Arc::new(n.reason.clone()),
                ))
            })
            .collect();
        let current = shared.policy.load_full();
        shared
            .endpoints
            .set_not_ready(not_ready, current.as_ref().map(|p| &p.view.discovery));
        // The revision in force, already saved: only readiness (or a reconnect) changed.
        // The candidate in shadow now, or the one this proxy could not take.
        let candidate_now = current.as_ref().and_then(|p| p.candidate.as_ref()).map_or(
            shared
                .health
                .candidate_error
                .load()
                .as_ref()
                .map_or(0, |e| e.0),
            |c| c.rollout,
        );
        if let Some(p) = &current
            && p.revision == snap.revision
            && shared.health.persisted_revision.load(Ordering::Relaxed) == snap.revision
            && candidate_now == snap.candidate_rollout
        {
            take_bundle(shared, cfg, &snap.bundle);
            if delivered == 1 {
                log(&format!(
                    "enforcing revision {} (unchanged, the control plane is back)",
                    snap.revision
                ));
            }
            if tx
                .send(status(shared, snap.revision, String::new()))
                .await
                .is_err()
            {
                break;
            }
            continue;
        }
        let files: Vec<(String, String)> =
            snap.files.into_iter().map(|f| (f.name, f.text)).collect();
        // A rollout's candidate: evaluated beside the revision, never enforced. One that
        // does not compile here is reported (the rollout stops) and the revision is
        // enforced as it is.
        let candidate = match snap.candidate_rollout {
            0 => {
                shared.health.candidate_error.store(None);
                None
            }
            id => {
                let cfiles: Vec<(String, String)> = snap
                    .candidate_files
                    .into_iter()
                    .map(|f| (f.name, f.text))
                    .collect();
                match compile(&cfiles) {
                    Ok(set) => {
                        shared.health.candidate_error.store(None);
                        log(&format!("evaluating rollout {id}'s candidate in shadow"));
                        Some((id, set))
                    }
                    Err(e) => {
                        warn(&format!("cannot evaluate rollout {id}'s candidate: {e}"));
                        shared.health.candidate_error.store(Some(Arc::new((id, e))));
                        None
                    }
                }
            }
        };
        let ack = match compile(&files) {
            Ok(set) => {
                shared.set_policy_with(snap.revision, set, candidate);
                let mut saved = Ok(());
                take_bundle(shared, cfg, &snap.bundle);
                if let Ok(json) = serde_json::to_string(&(snap.revision, &files)) {
                    saved = save(&cfg.state_dir, &[("snapshot.json", json.as_bytes())]);
                }
                // Enforced either way; the acknowledgement says whether it was saved.
                let persist_error = match shared.health.persisted(shared, "snapshot", saved) {
                    true => {
                        shared
                            .health
                            .persisted_revision
                            .store(snap.revision, Ordering::Relaxed);
                        log(&format!("enforcing revision {}", snap.revision));
                        String::new()
                    }
                    false => {
                        let kept = shared.health.persisted_revision.load(Ordering::Relaxed);
                        warn(&format!(
                            "enforcing revision {} (not saved: a restart without the control plane would enforce revision {kept})",
                            snap.revision
                        ));
                        shared
                            .health
                            .persist_error
                            .load()
                            .as_deref()
                            .cloned()
                            .unwrap_or_default()
                    }
                };
                status(shared, snap.revision, persist_error)
            }
            Err(e) => {
                warn(&format!("rejecting revision {}: {e}", snap.revision));
                ConfigAck {
                    accepted: false,
                    error: e,
                    ..status(shared, snap.revision, String::new())
                }
            }
        };
        if tx.send(ack).await.is_err() {
            break;
        }
    }
    Err(match delivered {
        0 => "the control plane closed the stream".into(),
        _ => format!("the control plane closed the stream ({STREAMED})"),
    })
}

/// A stream error as the operator should read it: a keepalive that went unanswered says
/// the control plane is hung.
fn status_text(s: &tonic::Status) -> String {
    let m = s.message();
    // The whole chain: hyper's "keep-alive timed out" sits a few sources down.
    let mut src = String::new();
    let mut next = std::error::Error::source(s);
    while let Some(e) = next {
        if !src.is_empty() {
            src.push_str(": ");
        }
        src.push_str(&e.to_string());
        next = e.source();
    }
    // A keepalive that went unanswered ends the HTTP/2 connection; hyper then fails the
    // open stream as a "broken pipe" (the socket itself is fine: a stopped process's kernel
    // keeps it open). A control plane that exits closes or resets instead.
    let hung = |t: &str| {
        t.contains("keep-alive")
            || t.contains("timed out")
            || t.contains("ping")
            || t.contains("broken pipe")
    };
    let full = if src.is_empty() {
        m.to_owned()
    } else {
        format!("{m}: {src}")
    };
    if hung(m) || hung(&src) {
        format!(
            "the control plane did not answer a keepalive within {:?} (hung?): {full}",
            crate::transport::KEEPALIVE_TIMEOUT
        )
    } else {
        full
    }
}

/// Ships queued decision records every 200 ms, in batches of at most 500 (small batches
/// often keep the proxy's peak memory low under load), and sets from the last 200 ms how
/// sparsely sampled allows are shipped (the budget of `--ship-allows-per-second`); a
/// batch that fails is counted as dropped (the queue stays bounded; traffic never waits).
async fn ship_loop(q: Arc<crate::decision_log::ShipQueue>, ch: tonic::transport::Channel) {
    const BATCH: usize = 500;
    let mut client = TelemetryClient::new(ch);
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        q.retune(Duration::from_millis(200));
        loop {
            let records = q.take(BATCH);
            let dropped = q.take_dropped();
            if records.is_empty() && dropped == 0 {
                break;
            }
            let n = records.len();
            if let Err(e) = client.ship(DecisionBatch { records, dropped }).await {
                q.lost(n as u64);
                warn(&format!(
                    "shipping decisions: {}; {n} records dropped",
                    e.message()
                ));
                return;
            }
            if n < BATCH {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_its_cap_with_jitter_and_starts_over_after_a_reset() {
        let mut b = Backoff::new(Duration::from_millis(1500));
        let delays: Vec<Duration> = (0..6).map(|_| b.delay()).collect();
        let nominal = [250u64, 500, 1000, 1500, 1500, 1500];
        for (d, n) in delays.iter().zip(nominal) {
            let n = Duration::from_millis(n);
            assert!(*d >= n.mul_f64(0.75) && *d <= n.mul_f64(1.25), "{delays:?}");
        }
        b.reset();
        assert!(b.delay() <= Duration::from_millis(313));
    }
}
