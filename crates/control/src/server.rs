//! `meshward control`: opens the data directory (store, CA, operators), serves the API over
//! TLS, and runs the controllers (override expiry).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use meshward_identity::TrustDomain;
use meshward_identity::ca::{cert_pem, new_workload_key, write_atomic};
use meshward_identity::svid::TrustBundles;
use meshward_identity::verifier::{Accept, SharedBundles, SvidClientVerifier};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::auth::{Operator, Operators, PLATFORM_SECURITY, random_secret, sha256_hex};
use crate::service::{Config, ControlPlane};
use crate::store::SqliteStore;
use meshward_identity::control_identity;

/// Settings of `meshward control`.
#[derive(Debug, Clone)]
pub struct Options {
    pub data_dir: PathBuf,
    pub trust_domain: TrustDomain,
    pub listen: SocketAddr,
    /// Where proxies connect (gRPC over mTLS).
    pub proxy_listen: SocketAddr,
    /// How often the controllers run.
    pub controller_interval: Duration,
    /// Plain HTTP (keep it on loopback): Prometheus `/metrics` and the dashboard `/ui`.
    /// (The TLS API serves `/metrics` too, but its certificate names a SPIFFE ID, not a
    /// host, so browsers and scrapers would not accept it.)
    pub http_listen: Option<SocketAddr>,
    /// Bytes kept free in the data directory for renewals once the disk fills
    /// ([`crate::disk`]; 0: none).
    pub disk_reserve: u64,
}

/// What a started control plane tells its operator.
#[derive(Debug)]
pub struct Started {
    pub addr: SocketAddr,
    pub proxy_addr: SocketAddr,
    /// The plain-HTTP listener: `/metrics` and the dashboard at `/ui`.
    pub http_addr: Option<SocketAddr>,
    pub bundle_file: PathBuf,
    /// Present on first start only: the admin token file just written.
    pub admin_token_file: Option<PathBuf>,
}

fn operators(dir: &Path) -> Result<(Operators, Option<PathBuf>), String> {
    let path = dir.join("operators.json");
    if path.exists() {
        return Ok((Operators::load(&path)?, None));
    }
    let token = random_secret("mwo_");
    if token.is_empty() {
        return Err("the system random generator failed".into());
    }
    let ops = Operators {
        operators: vec![Operator {
            name: "admin".into(),
            roles: vec![PLATFORM_SECURITY.into()],
            namespaces: vec![],
            token_sha256: vec![sha256_hex(&token)],
        }],
    };
    let json = serde_json::to_string_pretty(&ops).map_err(|e| e.to_string())?;
    write_atomic(&path, json.as_bytes(), true).map_err(|e| e.to_string())?;
    let token_file = dir.join("admin.token");
    write_atomic(&token_file, token.as_bytes(), true).map_err(|e| e.to_string())?;
    Ok((ops, Some(token_file)))
}

/// The control plane's TLS server configuration: its own SVID for
/// `spiffe://TD/meshward/control`, and client certificates optional but, when presented,
/// valid SVIDs of the mesh.
pub fn control_tls(
    ca: &meshward_identity::ca::Ca,
    td: &TrustDomain,
    now: SystemTime,
) -> Result<rustls::ServerConfig, String> {
    control_tls_parts(ca, td, now).map(|(c, _, _)| c)
}

/// How long after expiry a proxy may still renew its SVID with it (the proxy API only: a
/// proxy whose certificate ran out while the control plane was down recovers on its own).
/// Such a peer can do nothing else; the data path never accepts an expired certificate.
pub const EXPIRED_RENEWAL_GRACE: Duration = Duration::from_secs(24 * 3600);

/// The proxy API's TLS configuration: like [`control_tls`], but an SVID that expired less
/// than [`EXPIRED_RENEWAL_GRACE`] ago completes the handshake (for renewal only).
pub fn proxy_api_tls(
    bundles: &SharedBundles,
    cert: &Arc<ControlCert>,
) -> Result<rustls::ServerConfig, String> {
    Ok(rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .map_err(|e| e.to_string())?
    .with_client_cert_verifier(SvidClientVerifier::optional_with_grace(
        bundles.clone(),
        Accept::AnyTrusted,
        EXPIRED_RENEWAL_GRACE,
    ))
    .with_cert_resolver(cert.clone()))
}

/// The control plane's own certificate, renewed in place while connections run.
#[derive(Debug)]
pub struct ControlCert {
    current: std::sync::RwLock<(Arc<rustls::sign::CertifiedKey>, SystemTime)>,
}

/// The control plane's own SVID lifetime; renewed at half of it.
pub const CONTROL_CERT_LIFETIME: Duration = Duration::from_secs(24 * 3600);

impl ControlCert {
    fn issue(
        ca: &meshward_identity::ca::Ca,
        td: &TrustDomain,
        now: SystemTime,
    ) -> Result<(Arc<rustls::sign::CertifiedKey>, SystemTime), String> {
        let me = control_identity(td).ok_or("invalid trust domain")?;
        let (key, csr) = new_workload_key(&me).map_err(|e| e.to_string())?;
        let issued = ca
            .issue(&me, &csr, CONTROL_CERT_LIFETIME, now)
            .map_err(|e| e.to_string())?;
        let signing = rustls::crypto::ring::sign::any_supported_type(&PrivateKeyDer::Pkcs8(
            PrivatePkcs8KeyDer::from(key.serialize_der()),
        ))
        .map_err(|e| e.to_string())?;
        Ok((
            Arc::new(rustls::sign::CertifiedKey::new(issued.chain, signing)),
            issued.not_after,
        ))
    }

    /// Re-issues the certificate when half its life has passed; returns whether it did.
    pub fn renew_if_due(
        &self,
        ca: &meshward_identity::ca::Ca,
        td: &TrustDomain,
        now: SystemTime,
    ) -> Result<bool, String> {
        let not_after = self.current.read().map(|g| g.1).unwrap_or(now);
        if now + CONTROL_CERT_LIFETIME / 2 < not_after {
            return Ok(false);
        }
        let next = Self::issue(ca, td, now)?;
        if let Ok(mut g) = self.current.write() {
            *g = next;
        }
        Ok(true)
    }
}

impl rustls::server::ResolvesServerCert for ControlCert {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        self.current.read().ok().map(|g| g.0.clone())
    }
}

/// [`control_tls`], with the bundles its verifier uses and its renewable certificate.
pub fn control_tls_parts(
    ca: &meshward_identity::ca::Ca,
    td: &TrustDomain,
    now: SystemTime,
) -> Result<(rustls::ServerConfig, SharedBundles, Arc<ControlCert>), String> {
    let cert = Arc::new(ControlCert {
        current: std::sync::RwLock::new(ControlCert::issue(ca, td, now)?),
    });
    let mut tb = TrustBundles::new();
    tb.set(td.clone(), ca.bundle());
    let bundles = SharedBundles::new(tb);
    let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .map_err(|e| e.to_string())?
    .with_client_cert_verifier(SvidClientVerifier::optional(
        bundles.clone(),
        Accept::AnyTrusted,
    ))
    .with_cert_resolver(cert.clone());
    Ok((cfg, bundles, cert))
}

/// Opens everything and serves until `shutdown`; calls `ready` once listening.
pub async fn run(
    opts: Options,
    ready: impl FnOnce(&Started),
    shutdown: impl Future<Output = ()>,
) -> Result<(), String> {
    meshward_identity::install_crypto_provider();
    std::fs::create_dir_all(&opts.data_dir)
        .map_err(|e| format!("cannot create `{}`: {e}", opts.data_dir.display()))?;
    let now = SystemTime::now();
    let disk = crate::disk::Disk::open(&opts.data_dir, opts.disk_reserve);
    let store: Arc<dyn crate::store::Store> = Arc::new(crate::disk::GuardedStore::new(
        Arc::new(SqliteStore::open(&opts.data_dir.join("meshward.db")).map_err(|e| e.to_string())?),
        disk.clone(),
    ));
    let ca = ControlPlane::open_ca(&opts.data_dir, &opts.trust_domain, now)?;
    let (ops, admin_token_file) = operators(&opts.data_dir)?;
    let bundle_file = opts.data_dir.join("bundle.pem");
    let pem: String = ca.bundle().iter().map(cert_pem).collect();
    write_atomic(&bundle_file, pem.as_bytes(), false).map_err(|e| e.to_string())?;
    let (tls, tls_bundles, own_cert) = control_tls_parts(&ca, &opts.trust_domain, now)?;
    let proxy_tls = proxy_api_tls(&tls_bundles, &own_cert)?;
    let cfg = Config {
        data_dir: opts.data_dir.clone(),
        trust_domain: opts.trust_domain.clone(),
        default_lifetime: Duration::from_secs(3600),
        max_token_ttl: Duration::from_secs(24 * 3600),
    };
    let cp = Arc::new(
        ControlPlane::new(store, ca, ops, cfg)
            .with_disk(disk)
            .with_operators_file(opts.data_dir.join("operators.json"))
            .with_tls_bundles(tls_bundles)
            .with_decision_window(
                crate::decisions::DecisionWindow::open(
                    &opts.data_dir.join("decisions.db"),
                    crate::decisions::DEFAULT_MAX_RECORDS,
                )
                .map_err(|e| format!("cannot open the decision window: {e}"))?,
            ),
    );
    let listener = tokio::net::TcpListener::bind(opts.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", opts.listen))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let proxy_listener = tokio::net::TcpListener::bind(opts.proxy_listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", opts.proxy_listen))?;
    let proxy_addr = proxy_listener.local_addr().map_err(|e| e.to_string())?;
    let mut http_addr = None;
    if let Some(m) = opts.http_listen {
        let l = tokio::net::TcpListener::bind(m)
            .await
            .map_err(|e| format!("cannot listen on {m}: {e}"))?;
        http_addr = Some(l.local_addr().map_err(|e| e.to_string())?);
        let app = crate::ui::router(cp.clone());
        tokio::spawn(async move {
            let _ = axum::serve(l, app).await;
        });
    }
    ready(&Started {
        addr,
        proxy_addr,
        http_addr,
        bundle_file,
        admin_token_file,
    });
    let grpc_cp = cp.clone();
    tokio::spawn(async move {
        if let Err(e) =
            crate::grpc::serve(grpc_cp, proxy_listener, proxy_tls, std::future::pending()).await
        {
            tracing::warn!("proxy API stopped: {e}");
        }
    });
    // Controllers: expire overrides, renew the control plane's own certificate.
    let ctl = cp.clone();
    let td = opts.trust_domain.clone();
    let interval = opts.controller_interval;
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(interval).await;
            let (c, cert, td) = (ctl.clone(), own_cert.clone(), td.clone());
            let r = tokio::task::spawn_blocking(move || {
                let now = SystemTime::now();
                // The control plane's own certificate, at half its life.
                match c.with_ca(|ca| cert.renew_if_due(ca, &td, now)) {
                    Ok(Ok(true)) => {
                        tracing::info!("controller: renewed the control plane's certificate")
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(
                            "controller: cannot renew the control plane's certificate: {e}"
                        )
                    }
                    _ => {}
                }
                c.expire_overrides(now)
            })
            .await;
            if let Ok(Ok(names)) = r
                && !names.is_empty()
            {
                tracing::info!("controller: expired overrides {}", names.join(", "));
            }
        }
    });
    // A full disk: every few seconds, whether space is back (crate::disk).
    let dc = cp.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(crate::disk::CHECK_EVERY).await;
            let c = dc.clone();
            let _ = tokio::task::spawn_blocking(move || c.check_disk()).await;
        }
    });
    // Anomaly detection (service::detector): a tick every second over the records
    // shipped since the last one.
    let det = cp.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let c = det.clone();
            let r = tokio::task::spawn_blocking(move || c.detect(SystemTime::now())).await;
            match r {
                Ok(Ok(steps)) => {
                    for (step, who) in steps {
                        tracing::warn!("detector: {step} {who}");
                    }
                }
                Ok(Err(e)) => tracing::warn!("detector: {e}"),
                Err(_) => {}
            }
        }
    });
    // Progressive rollout (service::rollout): its clock, twice a second.
    let ro = cp.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let c = ro.clone();
            match tokio::task::spawn_blocking(move || c.rollout_tick(SystemTime::now())).await {
                Ok(Ok(Some(step))) => tracing::warn!("{step}"),
                Ok(Err(e)) => tracing::warn!("rollout: {e}"),
                _ => {}
            }
        }
    });
    crate::api::serve(cp, listener, Arc::new(tls), shutdown).await;
    Ok(())
}

/// Adds an operator to `DATA/operators.json` (a running control plane picks it up) and
/// writes its bearer token to `DATA/NAME.token` (mode 0600). Returns the token file.
pub fn add_operator(
    dir: &Path,
    name: &str,
    roles: Vec<String>,
    namespaces: Vec<String>,
) -> Result<PathBuf, String> {
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(format!(
            "`{name}` is not a valid operator name: use lower-case letters, digits and `-`"
        ));
    }
    let path = dir.join("operators.json");
    let mut ops = if path.exists() {
        Operators::load(&path)?
    } else {
        Operators::default()
    };
    if ops.by_name(name).is_some() {
        return Err(format!(
            "operator `{name}` already exists in `{}`",
            path.display()
        ));
    }
    let token = random_secret("mwo_");
    if token.is_empty() {
        return Err("the system random generator failed".into());
    }
    ops.operators.push(Operator {
        name: name.into(),
        roles,
        namespaces,
        token_sha256: vec![sha256_hex(&token)],
    });
    let json = serde_json::to_string_pretty(&ops).map_err(|e| e.to_string())?;
    write_atomic(&path, json.as_bytes(), true).map_err(|e| e.to_string())?;
    let token_file = dir.join(format!("{name}.token"));
    write_atomic(&token_file, token.as_bytes(), true).map_err(|e| e.to_string())?;
    Ok(token_file)
}
