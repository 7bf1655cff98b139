#!/usr/bin/env bash
# Runs the policy-engine comparison: Meshward's compiled engine vs its reference evaluator,
# cedar-policy and regorus on equivalent policy sets, all in one process and one run.
# First build takes a few minutes on 2 cores (cedar-policy and regorus in release mode).
#   bash bench/policy-engine/run.sh            # the p50/p99 tables of docs/benchmarks.md
#   bash bench/policy-engine/run.sh criterion  # criterion medians at 10 and 10,000 rules
set -euo pipefail
cd "$(dirname "$0")"
if [ "${1:-}" = criterion ]; then
  exec cargo bench --bench decision
fi
echo "## Rules keyed by source (identities, namespaces, attributes, patterns)"
cargo bench --bench latency
echo
echo "## Rules keyed by path (any caller, one path prefix each)"
MESHWARD_BENCH_FAMILY=paths cargo bench --bench latency
