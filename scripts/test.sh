#!/usr/bin/env bash
# The project's test command: installs what the tests need, then runs formatting, lints
# and every test. CI runs exactly this (see .ci/run). Safe to run repeatedly.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n== %s\n' "$*"; }

# System packages. The SARIF test validates lint output with python3 + jsonschema.
if ! python3 -c 'import jsonschema' >/dev/null 2>&1; then
  log "installing python3 jsonschema"
  pip install --quiet jsonschema 2>/dev/null \
    || { [ "$(id -u)" = 0 ] && apt-get update -qq && apt-get install -y -qq python3-jsonschema; }
fi
# The identity tests parse every certificate the CA issues with Python `cryptography`, a
# strict DER parser (the one py-spiffe uses).
if ! python3 -c 'import cryptography' >/dev/null 2>&1; then
  log "installing python3 cryptography"
  pip install --quiet cryptography 2>/dev/null \
    || { [ "$(id -u)" = 0 ] && apt-get update -qq && apt-get install -y -qq python3-cryptography; }
fi

# Real clients the end-to-end tests drive, and for the transparent-mode suite
# (tests/transparent.rs: network namespaces, root) iproute2 and iptables.
missing=""
for tool in curl openssl python3 kill script prlimit ip iptables iptables-restore; do
  command -v "$tool" >/dev/null 2>&1 || missing="$missing $tool"
done
if [ -n "$missing" ]; then
  log "installing${missing}"
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && apt-get install -y -qq curl openssl python3 procps bsdutils util-linux iproute2 iptables
  else
    echo "missing:${missing} (install them, or run as root)" >&2
    exit 1
  fi
fi

# promtool (Debian package prometheus) checks the metrics expositions.
if ! command -v promtool >/dev/null 2>&1; then
  log "installing promtool (prometheus)"
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus
  else
    echo "missing: promtool (apt-get install prometheus, or run as root)" >&2
    exit 1
  fi
fi

# The dashboard test drives Debian's chromium with playwright-core (tests/ui, from npm).
# Only what is missing: a machine may have Node.js from elsewhere (with its own npm).
ui_pkgs=""
command -v chromium >/dev/null 2>&1 || ui_pkgs="chromium"
command -v node >/dev/null 2>&1 || ui_pkgs="$ui_pkgs nodejs"
command -v npm >/dev/null 2>&1 || command -v node >/dev/null 2>&1 || ui_pkgs="$ui_pkgs npm"
if [ -n "$ui_pkgs" ]; then
  log "installing$ui_pkgs"
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $ui_pkgs
  else
    echo "missing:$ui_pkgs (apt-get install them, or run as root)" >&2
    exit 1
  fi
fi
if [ ! -d tests/ui/node_modules/playwright-core ]; then
  log "installing playwright-core (tests/ui)"
  (cd tests/ui && npm ci --no-audit --no-fund --silent)
fi

# The data plane stands on the wire protocol only (ARCHITECTURE §10, docs/proxy.md "Crate
# graph"): the proxy's normal dependencies must never pull in the control plane, its store
# (rusqlite, bundled SQLite) or its HTTP stack (axum, via tonic's `router` feature).
log "crate graph of meshward-proxy"
proxy_deps=$(cargo tree -p meshward-proxy -e normal --prefix none --locked)
forbidden=$(printf '%s\n' "$proxy_deps" | grep -E '^(meshward-control|rusqlite|libsqlite3-sys|axum|axum-core) ' | sort -u || true)
if [ -n "$forbidden" ]; then
  echo "meshward-proxy must not depend on these (cargo tree -p meshward-proxy -e normal -i NAME shows the path):" >&2
  printf '%s\n' "$forbidden" | sed 's/ (\*)$//; s/^/  /' | sort -u >&2
  exit 1
fi
echo "ok: $(printf '%s\n' "$proxy_deps" | sed 's/ (\*)$//' | sort -u | wc -l) crates, none of meshward-control, rusqlite, axum"

log "cargo fmt --check"
cargo fmt --all -- --check

log "cargo clippy -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

log "cargo test"
out=$(mktemp)
trap 'rm -f "$out"' EXIT
set +e
cargo test --workspace --locked 2>&1 | tee "$out"
status=${PIPESTATUS[0]}
set -e
# One closing line for the whole run (cargo prints one per test binary).
passed=$(grep -Eo 'test result: [a-zA-Z]+\. [0-9]+ passed' "$out" | awk '{s+=$4} END {print s+0}')
failed=$(grep -Eo '[0-9]+ failed;' "$out" | awk '{s+=$1} END {print s+0}')
echo
echo "tests: ${passed} passed, ${failed} failed"
exit "$status"
