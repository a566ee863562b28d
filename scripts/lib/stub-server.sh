# shellcheck shell=bash
# The variables this sets (work, bin, server_pid, base) are for the caller, which also
# sets `prog`.
# shellcheck disable=SC2034,SC2154
# Sourced, not run: what scripts that drive the binary with the stub CLIs on loopback
# share (soak.sh, schemathesis.sh). The caller sets `prog` (its name, for messages) and
# `set -euo pipefail`, and calls, in order:
#   require_tools TOOL...    exit 2 naming the first missing one
#   make_work_dir            `work`: a private temp dir; the EXIT trap removes it after
#                            running the caller's `on_exit` (if defined) and stopping the
#                            server (SIGTERM)
#   build_clawdforge PROFILE `bin`: the release or debug binary, built if stale
#   stub_server_env          exports the data dir, stubs, a throwaway admin bearer...
#   start_stub_server        `server_pid` and `base` (http://127.0.0.1:PORT)

require_tools() {
  local tool
  for tool in "$@"; do
    if ! command -v "$tool" >/dev/null 2>&1; then
      echo "$prog: $tool is required but not installed" >&2
      exit 2
    fi
  done
}

server_pid=""
make_work_dir() {
  work="$(mktemp -d)"
  chmod 700 "$work"
  trap stub_server_cleanup EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
}

stub_server_cleanup() {
  local rc=$?
  trap - EXIT
  if declare -F on_exit >/dev/null; then
    on_exit || true
  fi
  if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
    kill -TERM "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
  fi
  if [ "$rc" -ne 0 ] && [ -f "$work/server.log" ]; then
    echo "$prog: server log (last lines):" >&2
    tail -n 20 "$work/server.log" >&2
  fi
  rm -rf "$work"
  exit "$rc"
}

build_clawdforge() {
  local profile="$1" target_dir
  case "$profile" in
    release) cargo build --release --locked --bin clawdforge >&2 ;;
    debug) cargo build --locked --bin clawdforge >&2 ;;
    *) echo "$prog: the profile must be release or debug, not $profile" >&2; exit 2 ;;
  esac
  target_dir="$(cargo metadata --format-version 1 --no-deps |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')"
  bin="$target_dir/$profile/clawdforge"
}

stub_server_env() {
  mkdir -p "$work/home"
  export CLAWDFORGE_DATA_DIR="$work/data"
  export CLAWDFORGE_LISTEN=127.0.0.1:0
  export CLAWDFORGE_LOG_FORMAT=json
  export CLAWDFORGE_WARM_POOL=0
  export CLAUDE_BIN="$PWD/tests/stubs/claude"
  export ACPX_BIN="$PWD/tests/stubs/acpx"
  export HOME="$work/home"
  ADMIN_BOOTSTRAP_TOKEN="$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')"
  export ADMIN_BOOTSTRAP_TOKEN
}

start_stub_server() {
  local addr="" _
  "$bin" serve 2>"$work/server.log" &
  server_pid=$!
  for _ in $(seq 1 200); do
    addr="$(grep -o '"addr":"[^"]*"' "$work/server.log" | head -n 1 | cut -d'"' -f4 || true)"
    [ -n "$addr" ] && break
    kill -0 "$server_pid" 2>/dev/null || { echo "$prog: the server exited" >&2; exit 1; }
    sleep 0.05
  done
  [ -n "$addr" ] || { echo "$prog: the server did not start listening" >&2; exit 1; }
  base="http://$addr"
}
