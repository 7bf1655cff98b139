#!/usr/bin/env bash
# From the first anomalous request to the quarantine enforced at every affected sidecar
# (docs/containment.md, docs/benchmarks.md): real processes on 127.0.0.1, RUNS runs
# (default 20), p50/p90/p99/max. See run.py for what is measured.
#   bash bench/containment/run.sh
#   RUNS=50 MESHWARD_BIN=target/release/meshward bash bench/containment/run.sh
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$(cd ../.. && pwd)
if [ -z "${MESHWARD_BIN:-}" ]; then
  echo "building (release) ..."
  (cd "$ROOT" && cargo build --release -q -p meshward)
  export MESHWARD_BIN="$ROOT/target/release/meshward"
fi
exec python3 run.py
