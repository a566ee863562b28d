#!/usr/bin/env bash
# Benchmarks (not tests): builds the release binary and prints one table of latencies and
# memory (examples/bench.rs), then request rates from wrk and the upload benchmark.
# Loopback only, bounded in time.
#
#   scripts/bench.sh            # everything
#   BENCH_ONLY=stub|real|sdk|sessions scripts/bench.sh   # only those rows of the table
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

scripts/install-agents.sh >/dev/null
# The official openai SDK for the drop-in rows (scripts/lib/bench_openai.py).
scripts/install-sdk-tests.sh
if ! command -v wrk >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && apt-get install -y -qq --no-install-recommends wrk >/dev/null
  fi
fi
cargo build --release --locked --bin clawdforge --example bench
echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB, $(uname -sr)"
target/release/examples/bench
# BENCH_ONLY picks rows of the table; the request rates and the upload run only without it.
if [ -n "${BENCH_ONLY:-}" ]; then
  exit 0
fi

if command -v wrk >/dev/null 2>&1; then
  data=$(mktemp -d)
  trap 'kill "$pid" 2>/dev/null || true; rm -rf "$data"' EXIT
  port=$((20000 + RANDOM % 20000))
  CLAWDFORGE_DATA_DIR="$data" CLAWDFORGE_LISTEN="127.0.0.1:$port" CLAWDFORGE_WARM_POOL=0 \
    CLAUDE_BIN=tests/stubs/claude ACPX_BIN=tests/stubs/acpx RUST_LOG=warn \
    target/release/clawdforge serve &
  pid=$!
  token=$(CLAWDFORGE_DATA_DIR="$data" target/release/clawdforge tokens mint --name wrk 2>/dev/null)
  for _ in $(seq 50); do curl -fs "http://127.0.0.1:$port/healthz" >/dev/null && break; sleep 0.1; done
  echo
  echo "| route (wrk, 2 threads, 64 connections, 10 s) | requests/s |"
  echo "|---|---|"
  rps() { wrk -t2 -c64 -d10s "$@" | awk '/Requests\/sec/{print $2}'; }
  echo "| GET /healthz | $(rps "http://127.0.0.1:$port/healthz") |"
  echo "| GET /sessions, no token (401) | $(rps "http://127.0.0.1:$port/sessions") |"
  echo "| GET /sessions, app token | $(rps -H "Authorization: Bearer $token" "http://127.0.0.1:$port/sessions") |"
fi

echo
scripts/bench-upload.sh 1G
