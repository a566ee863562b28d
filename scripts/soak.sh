#!/usr/bin/env bash
# Soak (not a test): the release binary with the stub CLIs on loopback, under mixed traffic
# from 2 × CLAWDFORGE_MAX_CONCURRENT clients for SOAK_SECS: runs with stub sleeps (some
# streamed, some with an attachment), uploads and deletes, GETs, 401s, and sessions with
# turns once the server has them. Every SOAK_SAMPLE_SECS it prints the server's RSS, open
# file descriptors, live descendant processes (and zombies among them), queue depth (from
# /metrics when the server has it) and requests so far. It fails if RSS or fds grew by more
# than the allowance between the second sample and the end, if any answer was a 5xx, if
# SIGTERM does not end the server with status 0, or if a process or run dir is left.
#
#   scripts/soak.sh                          # ten minutes
#   SOAK_SECS=180 scripts/soak.sh            # three
#
# Closed sessions are deleted 60 s after closing and the sweeper runs every 15 s
# (CLAWDFORGE_SESSION_HARD_TTL_SECS, CLAWDFORGE_SWEEP_INTERVAL_SECS), uploads live 60 s:
# what the server holds reaches a steady state instead of growing with the soak's length.
#
# Settings: SOAK_SECS (600), SOAK_SAMPLE_SECS (60), CLAWDFORGE_MAX_CONCURRENT (4),
# SOAK_PAUSE (0.05 s between one client's requests), SOAK_MAX_RSS_GROWTH_MB (16),
# SOAK_MAX_FD_GROWTH (16), SOAK_SLOWLORIS (500 sockets that send a request head one header
# line every SOAK_SLOWLORIS_EVERY (2) seconds and never finish it, reopened when the server
# closes them after CLAWDFORGE_HEADER_TIMEOUT_SECS; 0 = off), SOAK_ONLY (run|stream|upload|get|unauthorized|session|admin:
# one kind of traffic, to find which one grows something). Needs cargo, curl, python3.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

secs="${SOAK_SECS:-600}"
sample_secs="${SOAK_SAMPLE_SECS:-60}"
max_concurrent="${CLAWDFORGE_MAX_CONCURRENT:-4}"
pause="${SOAK_PAUSE:-0.05}"
max_rss_growth_kb=$(( ${SOAK_MAX_RSS_GROWTH_MB:-16} * 1024 ))
max_fd_growth="${SOAK_MAX_FD_GROWTH:-16}"
clients=$((2 * max_concurrent))
slowloris="${SOAK_SLOWLORIS:-500}"
slowloris_every="${SOAK_SLOWLORIS_EVERY:-2}"
prog=soak
# shellcheck source=SCRIPTDIR/lib/stub-server.sh
. scripts/lib/stub-server.sh
require_tools cargo curl python3
make_work_dir
client_pids=()
slowloris_pid=""
on_exit() {
  for pid in "${client_pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  [ -z "$slowloris_pid" ] || kill "$slowloris_pid" 2>/dev/null || true
}

echo "soak: building the release binary" >&2
build_clawdforge release
stub_server_env
export CLAWDFORGE_MAX_CONCURRENT="$max_concurrent"
export RUST_LOG=warn,clawdforge=info
export CLAWDFORGE_SESSION_HARD_TTL_SECS="${CLAWDFORGE_SESSION_HARD_TTL_SECS:-60}"
export CLAWDFORGE_SWEEP_INTERVAL_SECS="${CLAWDFORGE_SWEEP_INTERVAL_SECS:-15}"

token="$("$bin" tokens mint --name soak 2>/dev/null)"
# Bearers go to curl in 0600 files, never on a command line.
printf 'Authorization: Bearer %s\n' "$token" >"$work/auth"
printf 'Authorization: Bearer %s\n' "$ADMIN_BOOTSTRAP_TOKEN" >"$work/admin"
printf 'Authorization: Bearer cf_%s\n' "$(printf 'x%.0s' $(seq 43))" >"$work/wrong"
head -c 20000 /dev/urandom >"$work/upload.bin"
start_stub_server

# Optional routes, used once the server has them.
code() { curl -s -o /dev/null -w '%{http_code}' "$@"; }
sessions=0
if [ "$(code -X POST -H "@$work/auth" -H 'Content-Type: application/json' -d '{}' \
  "$base/sessions")" = 201 ]; then
  sessions=1
fi
metrics=0
if [ "$(code -H "@$work/admin" "$base/metrics")" = 200 ]; then
  metrics=1
fi

field() { grep -o "\"$1\":\"[^\"]*\"" | head -n 1 | cut -d'"' -f4; }

# One client: random requests until the deadline, one status line each in its log.
client() {
  local end="$1" log="$2" r ft sid
  local json=(-H "@$work/auth" -H 'Content-Type: application/json')
  while [ "$(date +%s)" -lt "$end" ]; do
    r=$((RANDOM % 100))
    case "${SOAK_ONLY:-}" in
      run) r=0 ;; stream) r=35 ;; upload) r=40 ;; get) r=55 ;; unauthorized) r=70 ;;
      session) r=80 ;; admin) r=80; sessions=0 ;;
    esac
    if [ "$r" -lt 35 ]; then
      echo "run $(code "${json[@]}" -d "{\"prompt\":\"@stub:sleep=0.$((RANDOM % 5))\"}" \
        "$base/run")"
    elif [ "$r" -lt 40 ]; then
      # Streamed: the status is sent first; an error would arrive as an event.
      if curl -sN "${json[@]}" -d '{"prompt":"@stub:sleep=0.2","stream":true}' \
        "$base/run" | grep -q '^event: result'; then
        echo "stream 200"
      else
        echo "stream 599"
      fi
    elif [ "$r" -lt 55 ]; then
      ft="$(curl -s -H "@$work/auth" -F "file=@$work/upload.bin;filename=soak.bin" \
        -F ttl_secs=60 "$base/files" | field file_token)"
      if [ -z "$ft" ]; then
        echo "upload 599"
        continue
      fi
      echo "upload 201"
      echo "run+file $(code "${json[@]}" -d "{\"prompt\":\"read it\",\"files\":[\"$ft\"]}" \
        "$base/run")"
      echo "file-get $(code -H "@$work/auth" "$base/files/$ft")"
      # Most are deleted; the rest expire (ttl 60 s) for the sweeper.
      if [ $((RANDOM % 5)) -ne 0 ]; then
        echo "file-delete $(code -X DELETE -H "@$work/auth" "$base/files/$ft")"
      fi
    elif [ "$r" -lt 70 ]; then
      echo "healthz $(code "$base/healthz")"
      echo "sessions-list $(code -H "@$work/auth" "$base/sessions")"
    elif [ "$r" -lt 80 ]; then
      echo "unauthorized $(code -H "@$work/wrong" "$base/sessions")"
      echo "no-token $(code -X POST -H 'Content-Type: application/json' -d '{"prompt":"x"}' \
        "$base/run")"
    elif [ "$sessions" = 1 ]; then
      sid="$(curl -s "${json[@]}" -d '{}' "$base/sessions" | field session_id)"
      if [ -z "$sid" ]; then
        echo "session 599"
        continue
      fi
      echo "session 201"
      echo "turn $(code "${json[@]}" -d '{"prompt":"@stub:sleep=0.2"}' \
        "$base/sessions/$sid/turn")"
      echo "turn $(code "${json[@]}" -d '{"prompt":"again"}' "$base/sessions/$sid/turn")"
      echo "session-close $(code -X DELETE -H "@$work/auth" "$base/sessions/$sid")"
    else
      echo "admin-audit $(code -H "@$work/admin" "$base/admin/audit?limit=5")"
    fi
    sleep "$pause"
  done >>"$log"
}

# The server's live descendants (zombies counted apart), from /proc.
descendants() {
  python3 - "$server_pid" <<'EOF'
import os, sys
root = int(sys.argv[1])
parent, state = {}, {}
for p in os.listdir("/proc"):
    if not p.isdigit():
        continue
    try:
        stat = open(f"/proc/{p}/stat").read()
    except OSError:
        continue
    fields = stat.rsplit(")", 1)[1].split()
    parent[int(p)], state[int(p)] = int(fields[1]), fields[0]
live = zombies = 0
for pid in parent:
    q = parent[pid]
    while q > 1 and q != root:
        q = parent.get(q, 0)
    if q == root:
        if state[pid] == "Z":
            zombies += 1
        else:
            live += 1
print(live, zombies)
EOF
}

rss_kb() { awk '/^VmRSS:/ {print $2}' "/proc/$server_pid/status"; }
fds() { find "/proc/$server_pid/fd" -mindepth 1 -maxdepth 1 | wc -l; }
queue_depth() {
  if [ "$metrics" = 1 ]; then
    curl -s -H "@$work/admin" "$base/metrics" | awk '!/^#/ && /queue/ {print $2; exit}'
  fi
}
db_mb() {
  du -cm "$CLAWDFORGE_DATA_DIR"/clawdforge.db* | awk 'END {print $1}'
}
requests() { cat "$work"/client-*.log 2>/dev/null | wc -l; }

printf '| minute | rss MB | fds | children (zombies) | queue | requests | db MB |\n'
printf '|---|---|---|---|---|---|---|\n'
loaded=()
sample() {
  local rss fd kids queue
  rss="$(rss_kb)"
  fd="$(fds)"
  kids="$(descendants)"
  queue="$(queue_depth || true)"
  printf '| %s | %s | %s | %s (%s) | %s | %s | %s |\n' "$1" "$((rss / 1024))" "$fd" \
    "${kids% *}" "${kids#* }" "${queue:--}" "$(requests)" "$(db_mb)"
  last="$rss $fd"
  peak_rss=$(( rss > ${peak_rss:-0} ? rss : ${peak_rss:-0} ))
}
sample "start, idle"

started="$(date +%s)"
end=$((started + secs))
# Slowloris beside the traffic: a bounded number of sockets, on loopback, for the soak's
# length (scripts/lib/slowloris.py).
if [ "$slowloris" -gt 0 ]; then
  python3 scripts/lib/slowloris.py "${base#http://}" "$slowloris" "$slowloris_every" "$end" \
    >"$work/slowloris.log" 2>&1 &
  slowloris_pid=$!
fi
# The clients outlast the sampler a little, so its last sample is under load too.
for i in $(seq 1 "$clients"); do
  client "$((end + 5))" "$work/client-$i.log" &
  client_pids+=("$!")
done
echo "soak: $clients clients and $slowloris slowloris sockets for ${secs}s against $base (max_concurrent $max_concurrent," \
  "sessions $([ "$sessions" = 1 ] && echo on || echo 'not available')," \
  "metrics $([ "$metrics" = 1 ] && echo on || echo 'not available'))" >&2

while [ "$(date +%s)" -lt "$end" ]; do
  sleep "$(( sample_secs < end - $(date +%s) ? sample_secs : end - $(date +%s) ))"
  kill -0 "$server_pid" 2>/dev/null || { echo "soak: the server died" >&2; exit 1; }
  sample "$(awk -v s=$(( $(date +%s) - started )) 'BEGIN {printf "%.1f", s / 60}')"
  loaded+=("$last")
done
for pid in "${client_pids[@]}"; do wait "$pid" || true; done
client_pids=()
if [ -n "$slowloris_pid" ]; then
  kill -TERM "$slowloris_pid" 2>/dev/null || true
  wait "$slowloris_pid" || true
  slowloris_pid=""
  cat "$work/slowloris.log" >&2
fi
# Idle again: what the traffic held should be back.
sample "end, idle"

failed=0
# Under load, from the second sample (after warm-up; the first in a short soak) to the
# last: what grows steadily there is a leak, not the traffic's working set.
base_index=$(( ${#loaded[@]} > 2 ? 1 : 0 ))
read -r rss0 fd0 <<<"${loaded[$base_index]}"
read -r rss1 fd1 <<<"${loaded[${#loaded[@]} - 1]}"
echo "soak: under load, sample $((base_index + 1)) to the last: RSS $((rss0 / 1024)) ->" \
  "$((rss1 / 1024)) MB (peak $((peak_rss / 1024)) MB), fds $fd0 -> $fd1" >&2
if [ $((rss1 - rss0)) -gt "$max_rss_growth_kb" ]; then
  echo "soak: RSS grew by $(((rss1 - rss0) / 1024)) MB (allowed $((max_rss_growth_kb / 1024)))" >&2
  failed=1
fi
if [ $((fd1 - fd0)) -gt "$max_fd_growth" ]; then
  echo "soak: open fds grew by $((fd1 - fd0)) (allowed $max_fd_growth)" >&2
  failed=1
fi

echo "soak: answers by kind and status:" >&2
cat "$work"/client-*.log | sort | uniq -c | sort -rn >&2
if cat "$work"/client-*.log | awk '$2 >= 500 {found = 1} END {exit !found}'; then
  echo "soak: some answers were 5xx (or a stream ended without a result)" >&2
  failed=1
fi

kill -TERM "$server_pid"
status=0
for _ in $(seq 1 150); do
  kill -0 "$server_pid" 2>/dev/null || break
  sleep 0.1
done
if kill -0 "$server_pid" 2>/dev/null; then
  echo "soak: the server did not exit within 15 s of SIGTERM" >&2
  failed=1
else
  wait "$server_pid" || status=$?
  [ "$status" = 0 ] || { echo "soak: the server exited with $status" >&2; failed=1; }
fi
server_pid=""
left="$(find "$CLAWDFORGE_DATA_DIR/runs" -mindepth 1 -maxdepth 1 | wc -l)"
[ "$left" = 0 ] || { echo "soak: $left run dirs left" >&2; failed=1; }
for p in /proc/[0-9]*; do
  cwd="$(readlink "$p/cwd" 2>/dev/null || true)"
  case "$cwd" in
    "$work"*) grep -q '^State:.*Z' "$p/status" 2>/dev/null ||
      { echo "soak: process left: ${p#/proc/} in $cwd" >&2; failed=1; } ;;
  esac
done
if [ "$failed" -ne 0 ]; then
  exit 1
fi
echo "soak: passed" >&2
