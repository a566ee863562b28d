#!/usr/bin/env bash
# Upload benchmark (not a test): builds the release binary, starts it on loopback with a
# throwaway data dir, mints a token with the CLI, uploads one large file with
# `curl -F file=@...`, and prints size, time, throughput and the server's memory: RSS
# before, the peak while receiving (VmRSS sampled every 20 ms, and VmHWM), and the
# growth. Uploads are streamed to disk, so the growth should stay far below the size
# (target: under 32 MB).
#
#   scripts/bench-upload.sh [SIZE]
#
# SIZE is anything `truncate -s` takes (default 1G). The source file is sparse, so it
# costs no disk; the server's copy does (SIZE, in a temp dir, removed at exit). Needs
# cargo, curl and python3 (to read JSON).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

size_arg="${1:-1G}"
for tool in cargo curl python3; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "bench-upload: $tool is required but not installed" >&2
    exit 2
  fi
done

work="$(mktemp -d)"
chmod 700 "$work"
server_pid=""
sampler_pid=""
cleanup() {
  local rc=$?
  trap - EXIT
  if [ -n "$sampler_pid" ]; then
    kill "$sampler_pid" 2>/dev/null || true
  fi
  if [ -n "$server_pid" ]; then
    kill -TERM "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
  fi
  if [ "$rc" -ne 0 ] && [ -f "$work/server.log" ]; then
    echo "bench-upload: server log (last lines):" >&2
    tail -n 20 "$work/server.log" >&2
  fi
  rm -rf "$work"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

echo "bench-upload: building the release binary" >&2
cargo build --release --locked --bin clawdforge >&2
target_dir="$(cargo metadata --format-version 1 --no-deps |
  python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')"
bin="$target_dir/release/clawdforge"

src="$work/upload.bin"
truncate -s "$size_arg" "$src"
size_bytes="$(stat -c %s "$src")"

export CLAWDFORGE_DATA_DIR="$work/data"
export CLAWDFORGE_LISTEN=127.0.0.1:0
export CLAWDFORGE_LOG_FORMAT=json
export CLAWDFORGE_MAX_UPLOAD_BYTES=$((size_bytes + 1024 * 1024))
ADMIN_BOOTSTRAP_TOKEN="$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')"
export ADMIN_BOOTSTRAP_TOKEN

token="$("$bin" tokens mint --name bench 2>/dev/null)"
# The bearer goes to curl in a 0600 file, never on a command line.
printf 'Authorization: Bearer %s\n' "$token" >"$work/auth"

"$bin" serve 2>"$work/server.log" &
server_pid=$!
addr=""
for _ in $(seq 1 200); do
  addr="$(grep -o '"addr":"[^"]*"' "$work/server.log" | head -n 1 | cut -d'"' -f4 || true)"
  [ -n "$addr" ] && break
  kill -0 "$server_pid" 2>/dev/null || { echo "bench-upload: the server exited" >&2; exit 1; }
  sleep 0.05
done
[ -n "$addr" ] || { echo "bench-upload: the server did not start listening" >&2; exit 1; }
curl -sSf "http://$addr/healthz" >/dev/null

kib() { awk -v k="$1" '$1 == k":" { print $2 }' "/proc/$server_pid/status"; }
rss_before_kib="$(kib VmRSS)"

(
  while kill -0 "$server_pid" 2>/dev/null; do
    kib VmRSS
    sleep 0.02
  done
) >"$work/rss.samples" 2>/dev/null &
sampler_pid=$!

curl -sS -o "$work/answer.json" -w '%{http_code} %{time_total}\n' \
  -H "@$work/auth" -F "file=@$src;filename=bench.bin" \
  "http://$addr/files" >"$work/curl.out"
kill "$sampler_pid" 2>/dev/null || true
wait "$sampler_pid" 2>/dev/null || true
sampler_pid=""
hwm_kib="$(kib VmHWM)"
read -r http_code seconds <"$work/curl.out"

if [ "$http_code" != 201 ]; then
  echo "bench-upload: upload answered HTTP $http_code: $(cat "$work/answer.json")" >&2
  exit 1
fi
stored_size="$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["size"])' \
  "$work/answer.json")"
if [ "$stored_size" != "$size_bytes" ]; then
  echo "bench-upload: the server stored $stored_size bytes of $size_bytes" >&2
  exit 1
fi

peak_sampled_kib="$(sort -n "$work/rss.samples" | tail -n 1)"
peak_kib=$(( peak_sampled_kib > hwm_kib ? peak_sampled_kib : hwm_kib ))
awk -v bytes="$size_bytes" -v secs="$seconds" -v before="$rss_before_kib" \
  -v sampled="$peak_sampled_kib" -v hwm="$hwm_kib" -v peak="$peak_kib" 'BEGIN {
  mib = bytes / 1048576
  printf "%-12s %10s %10s %14s %18s %14s %12s\n", "size", "seconds", "MiB/s",
    "rss_before", "peak_rss_sampled", "peak_rss_hwm", "growth"
  printf "%-12s %10.2f %10.1f %11.1f MB %15.1f MB %11.1f MB %9.1f MB\n",
    sprintf("%.0f MiB", mib), secs, mib / secs, before / 1024, sampled / 1024, hwm / 1024,
    (peak - before) / 1024
}'
growth_kib=$((peak_kib - rss_before_kib))
if [ "$growth_kib" -ge $((32 * 1024)) ]; then
  echo "bench-upload: RSS grew by $((growth_kib / 1024)) MB; the target is under 32 MB" >&2
  exit 1
fi
