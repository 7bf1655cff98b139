//! Decision latency, p50 and p99, of Meshward's compiled engine beside its reference
//! evaluator, cedar-policy and regorus, on equivalent policy sets of 10 to 100,000 rules,
//! all in one run; plus the time to compile a set. Prints a Markdown table.
//!
//! Each sample times a batch of calls long enough (≥ 2 µs) for the clock to resolve it
//! and records the per-call time; p50 and p99 are over the samples. Run it with
//! `bash bench/policy-engine/run.sh` (or `cargo bench --bench latency`). Set
//! `MESHWARD_BENCH_SIZES=10,1000` to choose sizes, `MESHWARD_BENCH_PEERS_MAX` (default
//! 10000) for the largest size cedar and regorus are run at, and `MESHWARD_BENCH_FAMILY=paths`
//! for rules that admit any caller on their own path prefix (indexed by path, not source).

use std::hint::black_box;
use std::time::{Duration, Instant};

use meshward_policy::engine::Engine;
use meshward_policy::{Verdict, reference};
use meshward_policy_bench as g;

#[derive(Debug, Clone, Copy)]
struct Stats {
    p50: Duration,
    p99: Duration,
    samples: usize,
}

/// Measures `f` (one decision per call).
fn measure(mut f: impl FnMut(), budget: Duration) -> Stats {
    // Warm up and estimate the cost of a call.
    let t = Instant::now();
    let mut warm = 0u32;
    while t.elapsed() < Duration::from_millis(50) || warm < 3 {
        f();
        warm += 1;
    }
    let per = t.elapsed() / warm;
    let batch = (Duration::from_micros(2).as_nanos() / per.as_nanos().max(1)).max(1) as u32;
    let max_samples = ((budget.as_nanos() / (per.as_nanos().max(1) * u128::from(batch))) as usize).clamp(20, 20_000);
    let mut v = Vec::with_capacity(max_samples);
    let start = Instant::now();
    while v.len() < max_samples && (start.elapsed() < budget || v.len() < 20) {
        let t = Instant::now();
        for _ in 0..batch {
            f();
        }
        v.push(t.elapsed() / batch);
    }
    v.sort_unstable();
    let at = |q: f64| v[((v.len() as f64 - 1.0) * q).round() as usize];
    Stats { p50: at(0.50), p99: at(0.99), samples: v.len() }
}

fn fmt(d: Duration) -> String {
    let ns = d.as_nanos() as f64;
    if ns < 1_000.0 {
        format!("{ns:.0} ns")
    } else if ns < 1_000_000.0 {
        format!("{:.1} µs", ns / 1e3)
    } else {
        format!("{:.2} ms", ns / 1e6)
    }
}

fn main() {
    // `cargo bench` passes `--bench`; ignore arguments.
    let sizes: Vec<usize> = std::env::var("MESHWARD_BENCH_SIZES")
        .ok()
        .map(|s| s.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![10, 1_000, 10_000, 100_000]);
    let peers_max: usize = std::env::var("MESHWARD_BENCH_PEERS_MAX").ok().and_then(|s| s.parse().ok()).unwrap_or(10_000);
    let budget = Duration::from_millis(1500);
    let family = match std::env::var("MESHWARD_BENCH_FAMILY").as_deref() {
        Ok("paths") => g::Family::Paths,
        _ => g::Family::Sources,
    };
    eprintln!("rule family: {family:?}");
    let mut rows = vec![];
    for &n in &sizes {
        eprintln!("[{n} rules] building the policy sets ...");
        let set = g::meshward_set(n, family);
        // Compile time: best of 5 (and the first one, cold).
        let mut compiles = vec![];
        let mut engine = None;
        for _ in 0..5 {
            let t = Instant::now();
            let e = Engine::compile(&set);
            compiles.push(t.elapsed());
            engine = Some(e);
        }
        let engine = engine.unwrap_or_else(|| Engine::compile(&set));
        compiles.sort_unstable();
        let hit = g::request(n - 1);
        let miss = g::miss(n);
        assert_eq!(engine.decide(&hit).verdict, Verdict::Allow, "engine must allow the last rule's request");
        assert_eq!(engine.decide(&miss).verdict, Verdict::Deny);
        assert!(reference::evaluate(&set, &hit).same_outcome(&engine.decide(&hit)));

        eprintln!("[{n} rules] meshward compiled engine ...");
        let ours = measure(|| { black_box(engine.decide(black_box(&hit))); }, budget);
        eprintln!("[{n} rules] meshward reference evaluator ...");
        let refe = measure(|| { black_box(reference::evaluate(&set, black_box(&hit))); }, budget);

        let (cedar, rego) = if n <= peers_max {
            eprintln!("[{n} rules] cedar-policy ...");
            let ps: cedar_policy::PolicySet = g::cedar_src(n, family).parse().unwrap_or_else(|e| panic!("cedar: {e}"));
            let auth = cedar_policy::Authorizer::new();
            let entities = cedar_policy::Entities::empty();
            let creq = g::cedar_request(n - 1, &format!("/api/v{}/items", n - 1));
            let cmiss = g::cedar_request(n - 1, "/nowhere");
            assert_eq!(auth.is_authorized(&creq, &ps, &entities).decision(), cedar_policy::Decision::Allow);
            assert_eq!(auth.is_authorized(&cmiss, &ps, &entities).decision(), cedar_policy::Decision::Deny);
            let cedar = measure(|| { black_box(auth.is_authorized(black_box(&creq), &ps, &entities)); }, budget);

            eprintln!("[{n} rules] regorus ...");
            let mut engine = g::rego_engine(n, family);
            let input = g::rego_input(n - 1, &format!("/api/v{}/items", n - 1));
            engine.set_input(g::rego_input(n - 1, "/nowhere"));
            assert_eq!(engine.eval_rule("data.meshward.allow".into()).unwrap_or_else(|e| panic!("{e}")), regorus::Value::from(false));
            engine.set_input(input.clone());
            assert_eq!(engine.eval_rule("data.meshward.allow".into()).unwrap_or_else(|e| panic!("{e}")), regorus::Value::from(true));
            let rego = measure(
                || {
                    engine.set_input(input.clone());
                    black_box(engine.eval_rule("data.meshward.allow".into()).ok());
                },
                budget,
            );
            (Some(cedar), Some(rego))
        } else {
            (None, None)
        };
        rows.push((n, compiles[0], ours, refe, cedar, rego));
    }

    println!("| rules | compile (best of 5) | meshward p50 / p99 | reference p50 / p99 | cedar-policy p50 / p99 | regorus p50 / p99 | cedar ÷ meshward (p50) | regorus ÷ meshward (p50) |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (n, compile, ours, refe, cedar, rego) in rows {
        let pair = |s: Option<Stats>| s.map_or("—".to_string(), |s| format!("{} / {}", fmt(s.p50), fmt(s.p99)));
        let ratio = |s: Option<Stats>| s.map_or("—".to_string(), |s| format!("{:.0}×", s.p50.as_nanos() as f64 / ours.p50.as_nanos().max(1) as f64));
        println!(
            "| {n} | {} | {} / {} | {} | {} | {} | {} | {} |",
            fmt(compile),
            fmt(ours.p50),
            fmt(ours.p99),
            pair(Some(refe)),
            pair(cedar),
            pair(rego),
            ratio(cedar),
            ratio(rego)
        );
        let _ = ours.samples;
    }
}
