//! The proxy's side of the control plane: join with a token, renew the SVID at about half
//! its lifetime (with jitter, retrying with backoff while the control plane is down),
//! follow the config stream, and keep last-known-good state on disk (mode 0600) so a
//! restart without a control plane still enforces the last policy.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

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
    /// The control plane's proxy API, `host:port`.
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
    eprintln!("meshward-proxy: {msg}");
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
        match certified(certs_from_pem(&chain), k.serialize_der()) {
            Ok(s) => {
                log(&format!(
                    "restored the SVID from {} (valid until {})",
                    dir.display(),
                    humantime::format_rfc3339_seconds(s.not_after)
                ));
                shared.svid.store(Some(Arc::new(s)));
            }
            Err(e) => log(&format!("the stored SVID is unusable: {e}")),
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
                log(&format!(
                    "enforcing last-known-good revision {rev} from {}",
                    dir.display()
                ));
            }
            Err(e) => log(&format!("the stored snapshot is invalid, ignoring it: {e}")),
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

/// Asks for a certificate (join token when `token` is set, else renewal over mTLS) and
/// installs and persists it.
async fn sign(
    shared: &Arc<Shared>,
    cfg: &AgentConfig,
    token: Option<&str>,
) -> Result<SystemTime, String> {
    let (key, csr) = new_workload_key(&cfg.identity).map_err(|e| e.to_string())?;
    let tls = tls(cfg, if token.is_some() { None } else { Some(shared) })?;
    let ch = Connector::new(cfg.mark)
        .grpc_channel(&cfg.control, tls)
        .await?;
    let resp = IdentityClient::new(ch)
        .sign(SignRequest {
            join_token: token.unwrap_or_default().to_owned(),
            csr,
            lifetime_secs: 0,
        })
        .await
        .map_err(|s| s.message().to_owned())?
        .into_inner();
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
    let dir = &cfg.state_dir;
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    write_atomic(&dir.join("svid.key"), key_pem(&key).as_bytes(), true)
        .map_err(|e| e.to_string())?;
    write_atomic(
        &dir.join("svid.pem"),
        chain.iter().map(cert_pem).collect::<String>().as_bytes(),
        true,
    )
    .map_err(|e| e.to_string())?;
    write_atomic(
        &dir.join("bundle.pem"),
        bundle.iter().map(cert_pem).collect::<String>().as_bytes(),
        true,
    )
    .map_err(|e| e.to_string())?;
    let mut tb = TrustBundles::new();
    tb.set(cfg.trust_domain.clone(), bundle);
    shared.bundles.store(tb);
    // New handshakes use the new certificate; established connections are untouched.
    shared.svid.store(Some(Arc::new(svid)));
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

/// Keeps the SVID fresh forever: join if needed, then renew at about half its lifetime.
pub async fn identity_loop(shared: Arc<Shared>, cfg: AgentConfig) {
    let mut backoff = Duration::from_millis(500);
    loop {
        let current = shared.svid.load_full();
        let result = match &current {
            None => match &cfg.join_token {
                Some(t) => sign(&shared, &cfg, Some(t)).await,
                None => Err("no SVID and no join token: pass --join-token-file".into()),
            },
            Some(s) if s.not_after > SystemTime::now() => {
                tokio::time::sleep(renew_in(s.not_after)).await;
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
                backoff = Duration::from_millis(500);
            }
            Err(e) => {
                log(&format!(
                    "cannot get a certificate ({e}); retrying in {backoff:?}"
                ));
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    }
}

/// Follows the config stream forever, reconnecting with backoff.
pub async fn config_loop(shared: Arc<Shared>, cfg: AgentConfig) {
    let mut backoff = Duration::from_millis(500);
    loop {
        if shared.current_svid().is_some() {
            match stream_once(&shared, &cfg).await {
                Ok(()) => backoff = Duration::from_millis(500),
                Err(e) => log(&format!(
                    "config stream: {e}; keeping revision {} and retrying in {backoff:?}",
                    shared.policy.load().as_ref().map_or(0, |p| p.revision)
                )),
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

async fn stream_once(shared: &Arc<Shared>, cfg: &AgentConfig) -> Result<(), String> {
    let ch = Connector::new(cfg.mark)
        .grpc_channel(&cfg.control, tls(cfg, Some(shared))?)
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
    let mut snaps = ConfigClient::new(ch)
        .stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map_err(|s| s.message().to_owned())?
        .into_inner();
    while let Some(msg) = snaps.next().await {
        let snap = msg.map_err(|s| s.message().to_owned())?;
        let files: Vec<(String, String)> =
            snap.files.into_iter().map(|f| (f.name, f.text)).collect();
        let ack = match compile(&files) {
            Ok(set) => {
                shared.set_policy(snap.revision, set);
                if !snap.bundle.is_empty() {
                    let mut tb = TrustBundles::new();
                    tb.set(
                        cfg.trust_domain.clone(),
                        snap.bundle
                            .iter()
                            .cloned()
                            .map(CertificateDer::from)
                            .collect(),
                    );
                    shared.bundles.store(tb);
                    let pem: String = snap
                        .bundle
                        .iter()
                        .map(|b| cert_pem(&CertificateDer::from(b.clone())))
                        .collect();
                    let _ = write_atomic(&cfg.state_dir.join("bundle.pem"), pem.as_bytes(), true);
                }
                let _ = std::fs::create_dir_all(&cfg.state_dir);
                if let Ok(json) = serde_json::to_string(&(snap.revision, &files)) {
                    let _ =
                        write_atomic(&cfg.state_dir.join("snapshot.json"), json.as_bytes(), true);
                }
                log(&format!("enforcing revision {}", snap.revision));
                ConfigAck {
                    revision: snap.revision,
                    accepted: true,
                    error: String::new(),
                }
            }
            Err(e) => {
                log(&format!("rejecting revision {}: {e}", snap.revision));
                ConfigAck {
                    revision: snap.revision,
                    accepted: false,
                    error: e,
                }
            }
        };
        if tx.send(ack).await.is_err() {
            break;
        }
    }
    Err("the control plane closed the stream".into())
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
                log(&format!(
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
