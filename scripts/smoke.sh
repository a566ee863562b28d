#!/usr/bin/env bash
# Operator smoke test against a running clawdforge: proves the server, the
# admin API, one-shot runs (claude -p) and multi-turn sessions (acpx) work end
# to end, with the real login. It spends a few cents of model usage.
#
#   ADMIN_BOOTSTRAP_TOKEN=... scripts/smoke.sh [URL]
#
# URL (or CLAWDFORGE_URL) defaults to http://127.0.0.1:8800. SMOKE_SKIP_SESSIONS=1
# leaves out the session steps (and the acpx check), for a server whose sessions
# are not set up. Note that from the
# Docker host itself requests arrive from the bridge gateway, not loopback, so
# ALLOW_CIDRS must admit it (see .env.example).
#
# It mints a throwaway app token ("smoke-<timestamp>") and revokes it on every
# exit path, which also closes any session it opened. Needs curl and python3
# (python3 only to read JSON: jq is less often installed). Secrets never go on
# a command line (where `ps` would show them): curl reads them from a 0600 file.
# Exits non-zero on the first failing step.
set -euo pipefail

url="${1:-${CLAWDFORGE_URL:-http://127.0.0.1:8800}}"
url="${url%/}"
skip_sessions="${SMOKE_SKIP_SESSIONS:-0}"
# Generous: a cold agent start plus a model round trip; the server's own
# timeout (timeout_secs below) should fire first and answer 504.
max_time=180

for tool in curl python3; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "smoke: $tool is required but not installed" >&2
    exit 2
  fi
done
if [ -z "${ADMIN_BOOTSTRAP_TOKEN:-}" ]; then
  echo "smoke: set ADMIN_BOOTSTRAP_TOKEN to the server's admin token" >&2
  exit 2
fi

work="$(mktemp -d)"
chmod 700 "$work"
token_id=""
app_token=""
step_no=0

cleanup() {
  local rc=$?
  trap - EXIT
  if [ -n "$token_id" ]; then
    # Revoking also closes the token's sessions, so this is the whole cleanup.
    if request DELETE "/admin/tokens/$token_id" admin; then
      echo "cleanup: revoked token $token_id"
    else
      echo "cleanup: could not revoke token $token_id (HTTP $status); revoke it by hand" >&2
    fi
  fi
  rm -rf "$work"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# request METHOD PATH none|admin|app [JSON_BODY]
# Sets $status (HTTP code, 000 when unreachable); the body is in $work/body.
# Returns 0 for a 2xx answer.
request() {
  local method="$1" path="$2" who="$3" data="${4-}"
  case "$who" in
    admin) printf 'Authorization: Bearer %s\n' "$ADMIN_BOOTSTRAP_TOKEN" >"$work/auth" ;;
    app) printf 'Authorization: Bearer %s\n' "$app_token" >"$work/auth" ;;
    *) : >"$work/auth" ;;
  esac
  local args=(-sS -o "$work/body" -w '%{http_code}' --max-time "$max_time"
    -X "$method" -H "@$work/auth")
  if [ -n "$data" ]; then
    args+=(-H 'Content-Type: application/json' --data-binary "$data")
  fi
  : >"$work/body"
  status="$(curl "${args[@]}" "$url$path" 2>"$work/curl-err")" || true
  rm -f "$work/auth"
  [[ "$status" == 2?? ]]
}

# field NAME...: print body fields (dotted paths), one per line; '' if absent.
field() {
  python3 - "$work/body" "$@" <<'PY'
import json, sys
try:
    doc = json.load(open(sys.argv[1], encoding="utf-8"))
except ValueError:
    doc = {}
for path in sys.argv[2:]:
    v = doc
    for key in path.split("."):
        v = v.get(key) if isinstance(v, dict) else None
    if v is None:
        v = ""
    elif not isinstance(v, str):
        v = json.dumps(v)
    print(" ".join(v.split())[:200])
PY
}

ok() { echo "OK    $step_no. $*"; }
# fail WHAT [WHY]: without WHY, explain from the last HTTP exchange.
fail() {
  echo "FAIL  $step_no. $1" >&2
  if [ $# -gt 1 ]; then
    echo "      $2" >&2
  elif [ "${status:-000}" = 000 ]; then
    echo "      could not reach $url: $(cat "$work/curl-err" 2>/dev/null)" >&2
  else
    echo "      HTTP $status: $(field code error | paste -sd' ' -)" >&2
  fi
  exit 1
}
step() { step_no=$((step_no + 1)); }

echo "smoke: testing $url"

step
request GET /healthz none || fail "GET /healthz"
{ read -r version; read -r claude_present; read -r claude_version
  read -r acpx_present; read -r acpx_version; } < <(field version claude_present \
  claude_version acpx_present acpx_version)
[ "$claude_present" = true ] || fail "GET /healthz" "the server cannot find the claude CLI"
if [ "$skip_sessions" != 1 ] && [ "$acpx_present" != true ]; then
  fail "GET /healthz" "the server cannot find the acpx CLI"
fi
ok "healthz: clawdforge $version, claude $claude_version, acpx $acpx_version"

step
name="smoke-$(date -u +%Y%m%dT%H%M%SZ)"
request POST /admin/tokens admin "{\"name\":\"$name\"}" || fail "POST /admin/tokens"
{ read -r token_id; read -r app_token; } < <(field id token)
if [ -z "$token_id" ] || [ -z "$app_token" ]; then
  fail "POST /admin/tokens" "no id or token in the answer"
fi
ok "minted token $name ($token_id)"

step
request POST /run app '{"prompt":"Reply with the single word: pong","timeout_secs":120}' \
  || fail "POST /run"
{ read -r result; read -r duration; read -r cost; } < <(field result duration_ms cost_usd)
ok "run: result=$result (${duration} ms, \$${cost:-0})"

if [ "$skip_sessions" = 1 ]; then
  echo "SKIP  sessions (SMOKE_SKIP_SESSIONS=1)"
else
  step
  request POST /sessions app '{}' || fail "POST /sessions"
  session_id="$(field session_id)"
  [ -n "$session_id" ] || fail "POST /sessions" "no session_id in the answer"
  ok "opened session $session_id"

  step
  request POST "/sessions/$session_id/turn" app '{"prompt":"Say hi","timeout_secs":120}' \
    || fail "POST /sessions/$session_id/turn"
  { read -r text; read -r turn_index; } < <(field text turn_index)
  ok "turn $turn_index: $text"

  step
  request DELETE "/sessions/$session_id" app || fail "DELETE /sessions/$session_id"
  ok "closed session $session_id"
fi

step
request DELETE "/admin/tokens/$token_id" admin || fail "DELETE /admin/tokens/$token_id"
ok "revoked token $token_id"
token_id=""

echo "smoke: all $step_no steps passed"
