#!/usr/bin/env bash
# Control-plane benchmarks: signing throughput and config fan-out to 1,000 proxies.
#   bash bench/control/run.sh                              # 1,000 proxies
#   MESHWARD_BENCH_PROXIES=200 bash bench/control/run.sh   # fewer
set -euo pipefail
cd "$(dirname "$0")"
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
cargo bench --bench control
