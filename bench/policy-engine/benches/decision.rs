//! Criterion comparison at 10 and 10,000 rules: Meshward's compiled engine, its reference
//! evaluator, cedar-policy and regorus deciding the same request (matching the last rule)
//! on equivalent policy sets. `cargo bench --bench decision`.

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use meshward_policy::engine::Engine;
use meshward_policy::reference;
use meshward_policy_bench as g;

fn decision(c: &mut Criterion) {
    let mut group = c.benchmark_group("decision");
    for n in [10usize, 10_000] {
        let set = g::meshward_set(n, g::Family::Sources);
        let engine = Engine::compile(&set);
        let req = g::request(n - 1);
        group.bench_with_input(BenchmarkId::new("meshward", n), &n, |b, _| b.iter(|| engine.decide(black_box(&req))));
        group.bench_with_input(BenchmarkId::new("meshward-reference", n), &n, |b, _| b.iter(|| reference::evaluate(&set, black_box(&req))));
        let ps: cedar_policy::PolicySet = g::cedar_src(n, g::Family::Sources).parse().unwrap_or_else(|e| panic!("{e}"));
        let auth = cedar_policy::Authorizer::new();
        let entities = cedar_policy::Entities::empty();
        let creq = g::cedar_request(n - 1, &format!("/api/v{}/items", n - 1));
        group.bench_with_input(BenchmarkId::new("cedar-policy", n), &n, |b, _| b.iter(|| auth.is_authorized(black_box(&creq), &ps, &entities)));
        let mut re = g::rego_engine(n, g::Family::Sources);
        let input = g::rego_input(n - 1, &format!("/api/v{}/items", n - 1));
        group.bench_with_input(BenchmarkId::new("regorus", n), &n, |b, _| {
            b.iter(|| {
                re.set_input(input.clone());
                re.eval_rule("data.meshward.allow".into()).ok()
            })
        });
    }
    group.finish();
}

fn compile(c: &mut Criterion) {
    let set = g::meshward_set(10_000, g::Family::Sources);
    c.bench_function("compile/10000", |b| b.iter(|| Engine::compile(black_box(&set))));
}

criterion_group!(benches, decision, compile);
criterion_main!(benches);
