#!/usr/bin/env bash
# One mTLS hop — client -> outbound proxy -> inbound proxy -> backend — for Meshward, HAProxy
# and nginx pairs (one worker each), beside a direct connection, in one run: added latency
# at a fixed rate, proxy CPU per 1,000 requests, peak RSS, and maximum rate.
#   bash bench/proxy/run.sh            # rounds of 1,000 req/s for 5 s, then max rate for 5 s
#   RATE=500 SECONDS_EACH=5 ROUNDS=5 bash bench/proxy/run.sh
#   ONLY='default|nginx' bash bench/proxy/run.sh   # only the rows whose name matches
#   PERF_DIR=/tmp/prof [PERF_PHASE=max] ONLY=nginx bash bench/proxy/run.sh   # also `perf record` each proxy
#   MESHWARD_BASE_BIN=../base/target/release/meshward ONLY='default|base|nginx' bash bench/proxy/run.sh
#       # also the default pair run by another build (same control plane), in the same rounds
# Every pair is measured ROUNDS times (default 3), the rounds interleaved (every other one
# in reverse order) so that a change in the machine's load hits all pairs alike; the table
# gives the medians.
# Needs root (installs haproxy and nginx with apt-get when missing). Traffic stays on
# 127.0.0.1. Everything it starts stops when it exits.
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$(cd ../.. && pwd)
RATE=${RATE:-1000}
SECS=${SECONDS_EACH:-5}
W=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$W"; }
trap cleanup EXIT

for t in haproxy nginx openssl curl; do
  command -v "$t" >/dev/null || { echo "installing $t"; apt-get update -qq && apt-get install -y -qq haproxy nginx openssl curl >/dev/null; break; }
done
echo "building (release) ..."
# (MESHWARD_BIN: that binary, as it is.)
[ -n "${MESHWARD_BIN:-}" ] || (cd "$ROOT" && cargo build --release -q -p meshward)
cargo build --release -q
MW="${MESHWARD_BIN:-$ROOT/target/release/meshward}"
LG="$(pwd)/target/release/meshward-loadgen"

# Certificates for the HAProxy and nginx pairs.
cd "$W"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout ca.key -out ca.pem -days 2 -subj /CN=bench-ca 2>/dev/null
for n in server client; do
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout $n.key -out $n.csr -subj /CN=$n 2>/dev/null
  openssl x509 -req -in $n.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out $n.pem -days 2 2>/dev/null
  cat $n.pem $n.key > $n.both
done

# Backend: nginx, one worker, a fixed 2-byte body.
mkdir -p ng-b ng-o ng-i
cat > ng-b/nginx.conf <<C
worker_processes 1; pid $W/ng-b/pid; error_log /dev/null; events { worker_connections 4096; }
http { access_log off; server { listen 127.0.0.1:18900; location / { return 200 "ok"; } } }
C
nginx -c "$W/ng-b/nginx.conf" -g 'daemon off;' & PIDS+=($!)

# HAProxy pair.
cat > hp-o.cfg <<C
global
  nbthread 1
defaults
  mode http
  timeout connect 5s
  timeout client 30s
  timeout server 30s
frontend out
  bind 127.0.0.1:18911
  default_backend in
backend in
  http-reuse always
  server in 127.0.0.1:18912 ssl crt $W/client.both ca-file $W/ca.pem verify required sni str(server)
C
cat > hp-i.cfg <<C
global
  nbthread 1
defaults
  mode http
  timeout connect 5s
  timeout client 30s
  timeout server 30s
frontend in
  bind 127.0.0.1:18912 ssl crt $W/server.both ca-file $W/ca.pem verify required
  default_backend app
backend app
  http-reuse always
  server app 127.0.0.1:18900
C
haproxy -f hp-o.cfg & PIDS+=($!); HP_O=$!
haproxy -f hp-i.cfg & PIDS+=($!); HP_I=$!

# nginx pair.
cat > ng-o/nginx.conf <<C
worker_processes 1; pid $W/ng-o/pid; error_log /dev/null; events { worker_connections 4096; }
http { access_log off;
  upstream in { server 127.0.0.1:18922; keepalive 64; }
  server { listen 127.0.0.1:18921; location / {
    proxy_pass https://in; proxy_http_version 1.1; proxy_set_header Connection "";
    proxy_ssl_certificate $W/client.pem; proxy_ssl_certificate_key $W/client.key;
    proxy_ssl_trusted_certificate $W/ca.pem; proxy_ssl_verify on; proxy_ssl_name server; proxy_ssl_session_reuse on; } } }
C
cat > ng-i/nginx.conf <<C
worker_processes 1; pid $W/ng-i/pid; error_log /dev/null; events { worker_connections 4096; }
http { access_log off;
  upstream app { server 127.0.0.1:18900; keepalive 64; }
  server { listen 127.0.0.1:18922 ssl; ssl_certificate $W/server.pem; ssl_certificate_key $W/server.key;
    ssl_client_certificate $W/ca.pem; ssl_verify_client on;
    location / { proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection ""; } } }
C
nginx -c "$W/ng-o/nginx.conf" -g 'daemon off;' & PIDS+=($!); NG_O=$!
nginx -c "$W/ng-i/nginx.conf" -g 'daemon off;' & PIDS+=($!); NG_I=$!

# Meshward pair: a control plane, two sidecars.
mkdir -p mw/repo
"$MW" control --data mw/data --trust-domain bench.example --listen 127.0.0.1:18940 --proxy-listen 127.0.0.1:18941 > mw/control.log 2>&1 & PIDS+=($!); CP=$!
for i in $(seq 50); do [ -f mw/data/admin.token ] && break; sleep 0.1; done
"$MW" operator add second --data mw/data --role platform-security >/dev/null
cat > mw/repo/mesh.yaml <<C
apiVersion: meshward.io/v1alpha1
kind: Mesh
metadata: {name: bench}
spec: {trustDomain: bench.example}
---
apiVersion: meshward.io/v1alpha1
kind: Workload
metadata: {name: client, namespace: bench}
spec: {ports: [{port: 9999, protocol: HTTP}]}
---
apiVersion: meshward.io/v1alpha1
kind: Workload
metadata: {name: backend, namespace: bench, labels: {app: backend}}
spec: {ports: [{port: 18900, protocol: HTTP, inbound: "127.0.0.1:18932"}]}
---
apiVersion: meshward.io/v1alpha1
kind: Workload
metadata: {name: backend-quiet, namespace: bench, labels: {app: backend-quiet}}
spec: {ports: [{port: 18900, protocol: HTTP, inbound: "127.0.0.1:18933"}]}
---
apiVersion: meshward.io/v1alpha1
kind: Workload
metadata: {name: backend-base, namespace: bench, labels: {app: backend-base}}
spec: {ports: [{port: 18900, protocol: HTTP, inbound: "127.0.0.1:18934"}]}
---
apiVersion: meshward.io/v1alpha1
kind: Workload
metadata: {name: backend-limited, namespace: bench, labels: {app: backend-limited}}
spec: {ports: [{port: 18900, protocol: HTTP, inbound: "127.0.0.1:18945"}]}
---
apiVersion: meshward.io/v1alpha1
kind: Service
metadata: {name: backend-limited, namespace: bench}
spec: {selector: {app: backend-limited}, ports: [{port: 80, targetPort: 18900}]}
---
apiVersion: meshward.io/v1alpha1
kind: RateLimitPolicy
metadata: {name: backend-limited, namespace: bench}
spec:
  target: {workloads: [backend-limited]}
  limits:
    # Never reached: what checking a rate and a concurrency budget on every request costs.
    - {requestsPerSecond: 1000000, burst: 1000000, maxConcurrent: 100000}
---
apiVersion: meshward.io/v1alpha1
kind: Service
metadata: {name: backend-base, namespace: bench}
spec: {selector: {app: backend-base}, ports: [{port: 80, targetPort: 18900}]}
---
apiVersion: meshward.io/v1alpha1
kind: Service
metadata: {name: backend, namespace: bench}
spec: {selector: {app: backend}, ports: [{port: 80, targetPort: 18900}]}
---
apiVersion: meshward.io/v1alpha1
kind: Service
metadata: {name: backend-quiet, namespace: bench}
spec: {selector: {app: backend-quiet}, ports: [{port: 80, targetPort: 18900}]}
---
# Two replicas behind a TrafficPolicy: balancing (P2C on peak-EWMA latency), outlier
# ejection, a timeout and retries within a budget, on pooled HTTP/1.1 (issue 14).
apiVersion: meshward.io/v1alpha1
kind: Workload
metadata: {name: backend-r0, namespace: bench, labels: {app: backend-resilient}}
spec: {serviceAccount: backend-resilient, ports: [{port: 18900, protocol: HTTP, inbound: "127.0.0.1:18947"}]}
---
apiVersion: meshward.io/v1alpha1
kind: Workload
metadata: {name: backend-r1, namespace: bench, labels: {app: backend-resilient}}
spec: {serviceAccount: backend-resilient, ports: [{port: 18900, protocol: HTTP, inbound: "127.0.0.1:18948"}]}
---
apiVersion: meshward.io/v1alpha1
kind: Service
metadata: {name: backend-resilient, namespace: bench}
spec: {selector: {app: backend-resilient}, ports: [{port: 80, targetPort: 18900, protocol: HTTP}]}
---
apiVersion: meshward.io/v1alpha1
kind: TrafficPolicy
metadata: {name: backend-resilient, namespace: bench}
spec:
  target: {services: [backend-resilient]}
  timeout: 5s
  # (Only fields a MESHWARD_BASE_BIN from before issue 14 parses too: it shares this
  # control plane. The retry budget's minimum is the default 10/s.)
  retries: {attempts: 2, retryOn: [connect-failure, reset, gateway-error], budgetPercent: 20}
  outlierDetection: {consecutiveErrors: 5, interval: 10s, maxEjectionPercent: 50}
  circuitBreaker: {maxRequests: 1024}
---
apiVersion: meshward.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: backend, namespace: bench}
spec:
  tier: service
  action: ALLOW
  target: {workloads: [backend, backend-quiet, backend-base, backend-limited, backend-r0, backend-r1]}
  rules:
    - from: [{identities: ["spiffe://bench.example/ns/bench/sa/client"]}]
      to: [{methods: [GET], paths: ["/*"]}]
C
C="--server 127.0.0.1:18940 --ca-file mw/data/bundle.pem"
"$MW" apply -f mw/repo --reason bench $C --token-file mw/data/admin.token >/dev/null
"$MW" approve 1 $C --token-file mw/data/second.token >/dev/null
"$MW" workload token --identity spiffe://bench.example/ns/bench/sa/backend $C --token-file mw/data/admin.token > mw/b.tok
"$MW" workload token --identity spiffe://bench.example/ns/bench/sa/client $C --token-file mw/data/admin.token > mw/c.tok
"$MW" proxy --workload bench/backend --control 127.0.0.1:18941 --ca-file mw/data/bundle.pem --join-token-file mw/b.tok --state-dir mw/b --admin 127.0.0.1:18950 > mw/b.log 2>&1 & PIDS+=($!); MW_I=$!
"$MW" proxy --workload bench/client --control 127.0.0.1:18941 --ca-file mw/data/bundle.pem --join-token-file mw/c.tok --state-dir mw/c --admin 127.0.0.1:18951 --upstream 127.0.0.1:18931=bench/backend:80 > mw/c.log 2>&1 & PIDS+=($!); MW_O=$!
# The same backend proxy, reached by client proxies that pool HTTP between the proxies
# instead of tunnelling: HTTP/1.1 connections, or multiplexed HTTP/2 (the choice of
# docs/proxy.md).
"$MW" workload token --identity spiffe://bench.example/ns/bench/sa/client $C --token-file mw/data/admin.token > mw/c3.tok
"$MW" workload token --identity spiffe://bench.example/ns/bench/sa/client $C --token-file mw/data/admin.token > mw/c4.tok
"$MW" proxy --upstream-protocol http1 --workload bench/client --control 127.0.0.1:18941 --ca-file mw/data/bundle.pem --join-token-file mw/c3.tok --state-dir mw/c3 --admin 127.0.0.1:18954 --upstream 127.0.0.1:18936=bench/backend:80 > mw/c3.log 2>&1 & PIDS+=($!); MW3_O=$!
"$MW" proxy --upstream-protocol http2 --workload bench/client --control 127.0.0.1:18941 --ca-file mw/data/bundle.pem --join-token-file mw/c4.tok --state-dir mw/c4 --admin 127.0.0.1:18955 --upstream 127.0.0.1:18937=bench/backend:80 > mw/c4.log 2>&1 & PIDS+=($!); MW4_O=$!
# The same pair with telemetry off (no per-request metrics, no decision shipping), to
# measure what telemetry at its default settings costs.
"$MW" workload token --identity spiffe://bench.example/ns/bench/sa/backend-quiet $C --token-file mw/data/admin.token > mw/b2.tok
"$MW" workload token --identity spiffe://bench.example/ns/bench/sa/client $C --token-file mw/data/admin.token > mw/c2.tok
"$MW" proxy --telemetry off --workload bench/backend-quiet --control 127.0.0.1:18941 --ca-file mw/data/bundle.pem --join-token-file mw/b2.tok --state-dir mw/b2 --admin 127.0.0.1:18952 > mw/b2.log 2>&1 & PIDS+=($!); MW2_I=$!
"$MW" proxy --telemetry off --workload bench/client --control 127.0.0.1:18941 --ca-file mw/data/bundle.pem --join-token-file mw/c2.tok --state-dir mw/c2 --admin 127.0.0.1:18953 --upstream 127.0.0.1:18935=bench/backend-quiet:80 > mw/c2.log 2>&1 & PIDS+=($!); MW2_O=$!
# The default pair in front of a backend with a RateLimitPolicy (a limit never reached):
# what the rate-limit check costs.
"$MW" workload token --identity spiffe://bench.example/ns/bench/sa/backend-limited $C --token-file mw/data/admin.token > mw/b6.tok
"$MW" workload token --identity spiffe://bench.example/ns/bench/sa/client $C --token-file mw/data/admin.token > mw/c6.tok
"$MW" proxy --workload bench/backend-limited --control 127.0.0.1:18941 --ca-file mw/data/bundle.pem --join-token-file mw/b6.tok --state-dir mw/b6 --admin 127.0.0.1:18958 > mw/b6.log 2>&1 & PIDS+=($!); MW6_I=$!
"$MW" proxy --workload bench/client --control 127.0.0.1:18941 --ca-file mw/data/bundle.pem --join-token-file mw/c6.tok --state-dir mw/c6 --admin 127.0.0.1:18959 --upstream 127.0.0.1:18946=bench/backend-limited:80 > mw/c6.log 2>&1 & PIDS+=($!); MW6_O=$!
# A client proxy in front of two backend replicas with a TrafficPolicy: its requests go
# pooled HTTP/1.1 whatever --upstream-protocol says (docs/resilience.md); the row's
# inbound CPU is both replicas' sidecars together.
"$MW" workload token --identity spiffe://bench.example/ns/bench/sa/backend-resilient $C --token-file mw/data/admin.token > mw/b7.tok
"$MW" workload token --identity spiffe://bench.example/ns/bench/sa/backend-resilient $C --token-file mw/data/admin.token > mw/b8.tok
"$MW" workload token --identity spiffe://bench.example/ns/bench/sa/client $C --token-file mw/data/admin.token > mw/c7.tok
"$MW" proxy --workload bench/backend-r0 --identity spiffe://bench.example/ns/bench/sa/backend-resilient --control 127.0.0.1:18941 --ca-file mw/data/bundle.pem --join-token-file mw/b7.tok --state-dir mw/b7 --admin 127.0.0.1:18960 > mw/b7.log 2>&1 & PIDS+=($!); MW7_I=$!
"$MW" proxy --workload bench/backend-r1 --identity spiffe://bench.example/ns/bench/sa/backend-resilient --control 127.0.0.1:18941 --ca-file mw/data/bundle.pem --join-token-file mw/b8.tok --state-dir mw/b8 --admin 127.0.0.1:18961 > mw/b8.log 2>&1 & PIDS+=($!); MW8_I=$!
"$MW" proxy --workload bench/client --control 127.0.0.1:18941 --ca-file mw/data/bundle.pem --join-token-file mw/c7.tok --state-dir mw/c7 --admin 127.0.0.1:18962 --upstream 127.0.0.1:18949=bench/backend-resilient:80 > mw/c7.log 2>&1 & PIDS+=($!); MW7_O=$!
# With MESHWARD_BASE_BIN, the default pair again, run by that build.
PORTS="18900 18911 18921 18931 18935 18936 18937 18946 18949"
if [ -n "${MESHWARD_BASE_BIN:-}" ]; then
  B="$MESHWARD_BASE_BIN"
  "$MW" workload token --identity spiffe://bench.example/ns/bench/sa/backend-base $C --token-file mw/data/admin.token > mw/b5.tok
  "$MW" workload token --identity spiffe://bench.example/ns/bench/sa/client $C --token-file mw/data/admin.token > mw/c5.tok
  "$B" proxy --workload bench/backend-base --control 127.0.0.1:18941 --ca-file mw/data/bundle.pem --join-token-file mw/b5.tok --state-dir mw/b5 --admin 127.0.0.1:18956 > mw/b5.log 2>&1 & PIDS+=($!); MW5_I=$!
  "$B" proxy --workload bench/client --control 127.0.0.1:18941 --ca-file mw/data/bundle.pem --join-token-file mw/c5.tok --state-dir mw/c5 --admin 127.0.0.1:18957 --upstream 127.0.0.1:18938=bench/backend-base:80 > mw/c5.log 2>&1 & PIDS+=($!); MW5_O=$!
  PORTS="$PORTS 18938"
fi

# Wait until every path answers 200.
for port in $PORTS; do
  for i in $(seq 100); do [ "$(curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:$port/x)" = 200 ] && break; sleep 0.1; done
  [ "$(curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:$port/x)" = 200 ] || { echo "port $port does not answer"; exit 1; }
done

# A proxy's processes: the PID and its children (nginx's worker runs under its master).
procs() { for p in $*; do echo "$p"; pgrep -P "$p" || true; done; }
cpu_ms() { local t=0; for p in $(procs "$@"); do t=$((t + $(awk '{print $14+$15}' /proc/$p/stat))); done; echo $((t * 1000 / $(getconf CLK_TCK))); }
# Context switches (voluntary + involuntary) of a proxy's processes and all their threads.
ctx() { local t=0; for p in $(procs "$@"); do for f in /proc/$p/task/*/status; do t=$((t + $(awk '/ctxt_switches/{s+=$2} END{print s}' "$f"))); done; done; echo $t; }
# Peak resident memory (VmHWM, over the whole run, max-rate phases included) of the
# largest process, in MiB with one decimal.
# Resident memory now (VmRSS) of the largest process, MiB with one decimal.
rss_now() { local m=0; for p in $(procs "$@"); do v=$(awk '/VmRSS/{print $2}' /proc/$p/status); [ "$v" -gt "$m" ] && m=$v; done; awk -v k="$m" 'BEGIN { printf "%.1f", k / 1024 }'; }
# Private (anonymous) resident memory of the largest process, MiB: RSS less the pages of
# the executable and libraries, which every process running the same file shares.
anon_now() { local m=0; for p in $(procs "$@"); do v=$(awk '/RssAnon/{print $2}' /proc/$p/status); [ "$v" -gt "$m" ] && m=$v; done; awk -v k="$m" 'BEGIN { printf "%.1f", k / 1024 }'; }
rss_mb() { local m=0; for p in $(procs "$@"); do v=$(awk '/VmHWM/{print $2}' /proc/$p/status); [ "$v" -gt "$m" ] && m=$v; done; awk -v k="$m" 'BEGIN { printf "%.1f", k / 1024 }'; }

# The rows: name, port, outbound proxy, inbound proxy.
ROWS=(
  "meshward pair (L4 mTLS tunnel out, HTTP/1.1 + policy in), telemetry on (default)|18931|$MW_O|$MW_I"
  "meshward pair, telemetry off|18935|$MW2_O|$MW2_I"
  "meshward pair, default, RateLimitPolicy on the path|18946|$MW6_O|$MW6_I"
  "meshward pair, HTTP/1.1 pool between proxies|18936|$MW3_O|$MW_I"
  "meshward pair, HTTP/2 between proxies|18937|$MW4_O|$MW_I"
  "meshward, resilient: pooled HTTP/1.1 to 2 replicas, balancing + ejection + retry budget + timeout|18949|$MW7_O|$MW7_I $MW8_I"
  "HAProxy pair (mTLS)|18911|$HP_O|$HP_I"
  "nginx pair (mTLS)|18921|$NG_O|$NG_I"
)
[ -z "${MESHWARD_BASE_BIN:-}" ] || ROWS+=("meshward pair, default, base build ($MESHWARD_BASE_BIN)|18938|$MW5_O|$MW5_I")
ROUNDS=${ROUNDS:-3}
R="$W/results"; mkdir -p "$R"
# With PERF_DIR, a CPU profile of each proxy over one phase (PERF_PHASE: rate, the default,
# or max) in DIR/ROW-{out,in}.data.
perf=()
profile() {
  perf=()
  [ -n "${PERF_DIR:-}" ] && [ "${PERF_PHASE:-rate}" = "$1" ] || return 0
  mkdir -p "$PERF_DIR"
  perf record -q -e cpu-clock -g -p "$(procs "$3" | paste -sd,)" -o "$PERF_DIR/$2-out.data" -- sleep "$SECS" 2>/dev/null & perf+=($!)
  perf record -q -e cpu-clock -g -p "$(procs "$4" | paste -sd,)" -o "$PERF_DIR/$2-in.data" -- sleep "$SECS" 2>/dev/null & perf+=($!)
}
# One measurement of a row: fixed rate (latency, CPU per request of each proxy), then max.
measure() {
  local i=$1 name port out in; IFS='|' read -r name port out in <<<"${ROWS[$i]}"
  local o0 i0 xo0 xi0; o0=$(cpu_ms "$out"); i0=$(cpu_ms "$in"); xo0=$(ctx "$out"); xi0=$(ctx "$in")
  profile rate "$i" "$out" "$in"
  read -r rps p50 p99 _ < <("$LG" 127.0.0.1:$port /x "$RATE" "$SECS" 16)
  [ ${#perf[@]} -eq 0 ] || wait "${perf[@]}" || true
  local o1 i1 xo1 xi1 rss anon; o1=$(cpu_ms "$out"); i1=$(cpu_ms "$in"); xo1=$(ctx "$out"); xi1=$(ctx "$in"); rss=$(rss_now "$out" "$in"); anon=$(anon_now "$out" "$in")
  local c0; c0=$(cpu_ms "$CP")
  profile max "$i" "$out" "$in"
  read -r max _ _ _ < <("$LG" 127.0.0.1:$port /x 0 "$SECS" 16)
  [ ${#perf[@]} -eq 0 ] || wait "${perf[@]}" || true
  local cp; cp=$(awk -v c=$(( $(cpu_ms "$CP") - c0 )) -v m="$max" -v s="$SECS" 'BEGIN { printf "%.1f", c / (m * s / 1000) }')
  awk -v anon="$anon" -v cp="$cp" -v o=$((o1 - o0)) -v i=$((i1 - i0)) -v xo=$((xo1 - xo0)) -v xi=$((xi1 - xi0)) -v n="$rps" -v s="$SECS" -v p50="$p50" -v p99="$p99" -v max="$max" \
    -v rss="$rss" 'BEGIN { k = n * s / 1000; printf "%s %s %.1f %.1f %.1f %s %.2f %.2f %s %s %s\n", p50, p99, (o + i) / k, o / k, i / k, max, xo / (n * s), xi / (n * s), rss, cp, anon }' >> "$R/$i"
}
# The median (with an even count, the lower of the middle two: a value that was measured).
median() { sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : v[NR / 2] }'; }
col() { awk -v c="$2" '{ print $c }' "$R/$1" | median; }

SELECTED=()
for i in "${!ROWS[@]}"; do [[ "${ROWS[$i]%%|*}" =~ ${ONLY:-.} ]] && SELECTED+=("$i"); done
echo "measuring ${#SELECTED[@]} pairs and a direct connection, $ROUNDS rounds of ${SECS}s at ${RATE} req/s + ${SECS}s at max rate, interleaved ..." >&2
for r in $(seq "$ROUNDS"); do
  read -r _ p50 p99 _ < <("$LG" 127.0.0.1:18900 /x "$RATE" "$SECS" 16)
  read -r max _ _ _ < <("$LG" 127.0.0.1:18900 /x 0 "$SECS" 16)
  echo "$p50 $p99 0 0 0 $max 0 0 0 0 0" >> "$R/direct"
  # Every other round in reverse order, so that no pair always runs right after another.
  if [ $((r % 2)) -eq 1 ]; then order=("${SELECTED[@]}"); else order=(); for ((k = ${#SELECTED[@]} - 1; k >= 0; k--)); do order+=("${SELECTED[$k]}"); done; fi
  for i in "${order[@]}"; do measure "$i"; done
  echo "  round $r of $ROUNDS done" >&2
done

# With RESULTS_DIR, every round's figures too (a file per row, a line per round, the
# columns of `measure`).
[ -z "${RESULTS_DIR:-}" ] || { mkdir -p "$RESULTS_DIR"; cp "$R"/* "$RESULTS_DIR"/; }
echo
echo "Medians of $ROUNDS interleaved rounds."
echo
echo "| pair | p50 / p99 ms @${RATE} rps | added p50 / p99 ms | proxy CPU ms per 1k req (out + in) | max rps | RSS MiB @${RATE} rps (private) / peak, larger proxy | context switches per req (out / in) | control plane CPU ms per 1k req @max |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|"
D50=$(col direct 1); D99=$(col direct 2)
echo "| direct | $D50 / $D99 | — | — | $(col direct 6) | — | — | — |"
declare -A CPU MAX
for i in "${SELECTED[@]}"; do
  IFS='|' read -r name port out in <<<"${ROWS[$i]}"
  p50=$(col "$i" 1); p99=$(col "$i" 2)
  CPU[$i]=$(col "$i" 3); MAX[$i]=$(col "$i" 6)
  a50=$(awk -v a="$p50" -v b="$D50" 'BEGIN{printf "%.3f", a-b}'); a99=$(awk -v a="$p99" -v b="$D99" 'BEGIN{printf "%.3f", a-b}')
  echo "| $name | $p50 / $p99 | $a50 / $a99 | ${CPU[$i]} ($(col "$i" 4) + $(col "$i" 5)) | ${MAX[$i]} | $(col "$i" 9) ($(col "$i" 11)) / $(rss_mb "$out" "$in") | $(col "$i" 7) / $(col "$i" 8) | $(col "$i" 10) |"
done
echo
if [ -n "${CPU[0]:-}" ] && [ -n "${CPU[1]:-}" ]; then
  awk -v oc="${CPU[0]}" -v fc="${CPU[1]}" -v om="${MAX[0]}" -v fm="${MAX[1]}" 'BEGIN {
    printf "telemetry at default settings (metrics + decision shipping) vs off: max throughput %+.1f%%, CPU per request %+.1f%% (targets: no worse than -10%% and +5%%)\n", (om / fm - 1) * 100, (oc / fc - 1) * 100 }'
fi
# Ratios: the default pair vs HAProxy, nginx and the base build (6, 7, 8); the resilient
# pooled pair vs nginx and the plain HTTP/1.1 pool (5 vs 7, 3).
for pair in "0 6" "0 7" "0 8" "5 7" "5 3"; do
  read -r a peer <<<"$pair"
  if [ -n "${CPU[$a]:-}" ] && [ -n "${CPU[$peer]:-}" ]; then
    awk -v a="${CPU[$a]}" -v b="${CPU[$peer]}" -v am="${MAX[$a]}" -v bm="${MAX[$peer]}" -v m="${ROWS[$a]%%|*}" -v n="${ROWS[$peer]%%|*}" 'BEGIN {
      printf "%s vs %s: CPU per request %.2fx, max rate %.2fx\n", m, n, a / b, am / bm }'
  fi
done
