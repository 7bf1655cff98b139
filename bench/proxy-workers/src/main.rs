//! The proxy's inbound request path, in-process, on `--workers 1` and `--workers N`.
//!
//! One process, three parts on their own threads:
//! - the **proxy**: `meshward_proxy::inbound::serve` (accept, mTLS handshake, detection, the
//!   HTTP/1.1 fast path with the request gate and policy, the app connection) on the
//!   runtime `meshward_proxy::run::runtime(N)` builds — the one `meshward proxy --workers N`
//!   runs on;
//! - a trivial **app** (keep-alive HTTP/1.1, `200 ok`) on one current-thread runtime;
//! - the **load generator**: `CONNS` keep-alive mTLS connections dialled with the proxy's
//!   own outbound code as the frontend, each sending the next request as soon as the
//!   answer arrived (closed loop), on `LOAD_THREADS` current-thread runtimes.
//!
//! For each worker count it reports the maximum rate over `SECS` seconds, the CPU time of
//! the proxy's threads only (from /proc/self/task, by thread name) and requests per
//! proxy CPU-second (work per request: flat if the workers do not contend). The max rate
//! is only proxy-bound where the machine has a free core per worker beside the load
//! generator and the app; the CPU figures do not depend on that.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a benchmark: a failed setup is a failed run"
)]

#[allow(dead_code)]
#[path = "../../../crates/proxy/tests/support/mod.rs"]
mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use meshward_identity::SpiffeId;
use meshward_identity::ca::{Ca, CaLifetimes};
use meshward_policy::decision::WorkloadRef;
use meshward_policy::resource::Protocol;
use meshward_proxy::decision_log::DecisionLog;
use meshward_proxy::inbound::InboundPort;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const ORDERS: &str = "spiffe://shop.example/ns/orders/sa/orders-api";
const FRONTEND: &str = "spiffe://shop.example/ns/web/sa/frontend";
/// `run::runtime` names its worker threads so (`comm` keeps 15 bytes of it).
const WORKER: &str = "meshward-proxy-worker";

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// CPU time (user + system) of this process's threads named [`WORKER`], in seconds.
fn proxy_cpu() -> f64 {
    let tick = 100.0; // USER_HZ on Linux
    let mut total = 0u64;
    for t in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if !WORKER.starts_with(comm.trim()) || comm.trim().is_empty() {
            continue;
        }
        let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
        // Fields after the `(comm)`: state is field 3, utime 14, stime 15.
        let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
        let f: Vec<&str> = rest.split_whitespace().collect();
        total += f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        total += f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    }
    total as f64 / tick
}

/// A keep-alive HTTP/1.1 app answering `200 ok` to every request without a body.
fn app() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    l.set_nonblocking(true).unwrap();
    std::thread::Builder::new()
        .name("app".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let l = tokio::net::TcpListener::from_std(l).unwrap();
                while let Ok((mut s, _)) = l.accept().await {
                    let _ = s.set_nodelay(true);
                    tokio::spawn(async move {
                        let mut buf = vec![0u8; 16 * 1024];
                        let mut have = 0;
                        loop {
                            match s.read(&mut buf[have..]).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => have += n,
                            }
                            let mut answers = 0;
                            let mut start = 0;
                            while let Some(p) =
                                buf[start..have].windows(4).position(|w| w == b"\r\n\r\n")
                            {
                                start += p + 4;
                                answers += 1;
                            }
                            buf.copy_within(start..have, 0);
                            have -= start;
                            let one = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
                            let out: Vec<u8> = one.repeat(answers);
                            if s.write_all(&out).await.is_err() {
                                return;
                            }
                        }
                    });
                }
            });
        })
        .unwrap();
    addr
}

/// The policy of the proxy: with `rules` = 0 one rule (GET anything); else that many
/// rules, each for one tenant (`when` the `x-tenant` header has its value), of which the
/// load generator's requests match the last — a decision that evaluates every rule.
fn policy(app: SocketAddr, inbound: SocketAddr, rules: u64) -> meshward_policy::model::PolicySet {
    if rules == 0 {
        return support::orders_policy(app.port(), inbound, "[{methods: [GET], paths: [\"/*\"]}]");
    }
    let port = app.port();
    let mut yaml = format!(
        "apiVersion: meshward.io/v1alpha1\nkind: Workload\nmetadata: {{name: orders-api, namespace: orders, labels: {{app: orders-api}}}}\nspec: {{ports: [{{port: {port}, protocol: HTTP, inbound: \"{inbound}\"}}]}}\n---\napiVersion: meshward.io/v1alpha1\nkind: Service\nmetadata: {{name: orders, namespace: orders}}\nspec: {{selector: {{app: orders-api}}, ports: [{{port: 80, targetPort: {port}}}]}}\n---\napiVersion: meshward.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: tenants, namespace: orders}}\nspec:\n  tier: service\n  action: ALLOW\n  target: {{workloads: [orders-api]}}\n  rules:\n"
    );
    for i in 0..rules {
        yaml.push_str(&format!(
            "    - name: tenant-{i}\n      from: [{{identities: [\"{FRONTEND}\"]}}]\n      to: [{{methods: [GET], paths: [\"/*\"]}}]\n      when: [{{header: x-tenant, values: [\"t-{i}\"]}}]\n"
        ));
    }
    support::policy_set(&yaml)
}

/// The inbound proxy on `workers` workers; returns its address and a stop flag holder.
fn proxy(
    ca: &Ca,
    app: SocketAddr,
    workers: usize,
    rules: u64,
) -> (SocketAddr, std::sync::mpsc::Sender<()>) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let inbound = l.local_addr().unwrap();
    l.set_nonblocking(true).unwrap();
    let set = policy(app, inbound, rules);
    let shared = support::sidecar(
        ca,
        ca,
        "orders/orders-api",
        ORDERS,
        set,
        DecisionLog::disabled(),
    );
    let (stop, stopped) = std::sync::mpsc::channel::<()>();
    // The thread that drives a current-thread runtime is its worker: name it so.
    std::thread::Builder::new()
        .name(WORKER.into())
        .spawn(move || {
            // The runtime `meshward proxy --workers N` runs on.
            let rt = meshward_proxy::run::runtime(workers).unwrap();
            rt.block_on(async move {
                let l = tokio::net::TcpListener::from_std(l).unwrap();
                let port = InboundPort::explicit(app.port(), Protocol::Http);
                let task = tokio::spawn(meshward_proxy::inbound::serve(shared, port, l));
                tokio::task::spawn_blocking(move || stopped.recv())
                    .await
                    .ok();
                task.abort();
            });
        })
        .unwrap();
    (inbound, stop)
}

/// Closed-loop load over `conns` connections for `secs`: requests answered.
fn load(
    ca: &Ca,
    inbound: SocketAddr,
    conns: usize,
    threads: usize,
    secs: u64,
    rules: u64,
) -> (u64, f64, f64) {
    // The tenant of the last rule (none without rules).
    let req: &'static [u8] = if rules == 0 {
        b"GET /x HTTP/1.1\r\nhost: orders\r\n\r\n"
    } else {
        format!(
            "GET /x HTTP/1.1\r\nhost: orders\r\nx-tenant: t-{}\r\n\r\n",
            rules - 1
        )
        .into_bytes()
        .leak()
    };
    let frontend = support::sidecar(
        ca,
        ca,
        "web/frontend",
        FRONTEND,
        support::policy_set(""),
        DecisionLog::disabled(),
    );
    let count = Arc::new(AtomicU64::new(0));
    let go = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicBool::new(false));
    let mut handles = vec![];
    for t in 0..threads {
        let (frontend, count, go, done) =
            (frontend.clone(), count.clone(), go.clone(), done.clone());
        let mine = conns / threads + usize::from(t < conns % threads);
        handles.push(
            std::thread::Builder::new()
                .name("load".into())
                .spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .unwrap();
                    rt.block_on(async move {
                        let mut tasks = vec![];
                        for _ in 0..mine {
                            let (frontend, count, go, done) =
                                (frontend.clone(), count.clone(), go.clone(), done.clone());
                            tasks.push(tokio::spawn(async move {
                                let to = WorkloadRef::parse("orders/orders").unwrap();
                                let allowed = vec![SpiffeId::parse(ORDERS).unwrap()];
                                let mut c = meshward_proxy::outbound::dial(
                                    &frontend, &to, inbound, allowed, None,
                                )
                                .await
                                .unwrap();
                                while !go.load(Ordering::Relaxed) {
                                    tokio::time::sleep(Duration::from_millis(1)).await;
                                }
                                let want = b"\r\n\r\nok";
                                let mut buf = vec![0u8; 4096];
                                while !done.load(Ordering::Relaxed) {
                                    c.write_all(req).await.unwrap();
                                    let mut have = 0;
                                    while !buf[..have].ends_with(want) {
                                        let n = c.read(&mut buf[have..]).await.unwrap();
                                        assert!(n > 0, "the proxy closed the connection");
                                        have += n;
                                    }
                                    assert!(
                                        buf.starts_with(b"HTTP/1.1 200"),
                                        "{}",
                                        String::from_utf8_lossy(&buf[..have])
                                    );
                                    count.fetch_add(1, Ordering::Relaxed);
                                }
                            }));
                        }
                        for t in tasks {
                            t.await.unwrap();
                        }
                    });
                })
                .unwrap(),
        );
    }
    std::thread::sleep(Duration::from_millis(500)); // every connection handshaken
    let (c0, t0) = (proxy_cpu(), Instant::now());
    let n0 = count.load(Ordering::Relaxed);
    go.store(true, Ordering::Relaxed);
    std::thread::sleep(Duration::from_secs(secs));
    let n = count.load(Ordering::Relaxed) - n0;
    let (cpu, wall) = (proxy_cpu() - c0, t0.elapsed().as_secs_f64());
    done.store(true, Ordering::Relaxed);
    for h in handles {
        h.join().unwrap();
    }
    (n, cpu, wall)
}

fn main() {
    meshward_identity::install_crypto_provider();
    let secs = env("SECS", 5);
    let conns = env("CONNS", 16) as usize;
    let threads = env("LOAD_THREADS", 1) as usize;
    let rounds = env("ROUNDS", 3);
    let max_workers = env("WORKERS", 2) as usize;
    let rules = env("RULES", 0);
    let ca = Ca::generate(support::td(), CaLifetimes::default(), SystemTime::now()).unwrap();
    let app = app();
    println!(
        "inbound request path in-process: {conns} keep-alive mTLS connections, closed loop, {threads} load thread(s), {secs}s x {rounds} rounds (interleaved), policy rules: {}, cores: {}",
        rules.max(1),
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    let mut results: Vec<Vec<(f64, f64, f64)>> = vec![vec![]; max_workers + 1];
    for r in 0..rounds {
        let order: Vec<usize> = if r % 2 == 0 {
            (1..=max_workers).collect()
        } else {
            (1..=max_workers).rev().collect()
        };
        for w in order {
            let (inbound, stop) = proxy(&ca, app, w, rules);
            let (n, cpu, wall) = load(&ca, inbound, conns, threads, secs, rules);
            drop(stop);
            let rps = n as f64 / wall;
            let per_cpu = if cpu > 0.0 { n as f64 / cpu } else { 0.0 };
            println!(
                "round {} workers {w}: {rps:.0} req/s, proxy CPU {:.2} cores, {per_cpu:.0} req per proxy CPU-second",
                r + 1,
                cpu / wall
            );
            results[w].push((rps, cpu / wall, per_cpu));
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[(v.len() - 1) / 2]
    };
    println!(
        "\n| workers | max req/s (median) | proxy CPU, cores | req per proxy CPU-second | max rate vs 1 | req/CPU-s vs 1 |"
    );
    println!("|---:|---:|---:|---:|---:|---:|");
    let mut base = (0.0, 0.0);
    for (w, res) in results.iter().enumerate().skip(1) {
        let rps = median(&mut res.iter().map(|r| r.0).collect());
        let cores = median(&mut res.iter().map(|r| r.1).collect());
        let per = median(&mut res.iter().map(|r| r.2).collect());
        if w == 1 {
            base = (rps, per);
        }
        println!(
            "| {w} | {rps:.0} | {cores:.2} | {per:.0} | {:.2}x | {:.2}x |",
            rps / base.0,
            per / base.1
        );
    }
}
