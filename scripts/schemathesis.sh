#!/usr/bin/env bash
# Schema-driven tests (not part of `cargo test`): builds the binary, serves it on loopback
# with the stub CLIs and a throwaway data dir, mints an app token, and runs schemathesis
# against the server's own `GET /openapi.json` with a bounded number of examples per
# operation. Checks: no 5xx (`not_a_server_error`) and answers that match the schema
# (`response_schema_conformance`). Exits non-zero on a failure, or (3) when the server
# has no /openapi.json to test against.
#
#   scripts/schemathesis.sh
#   SCHEMATHESIS_EXAMPLES=100 scripts/schemathesis.sh
#
# Settings: SCHEMATHESIS_EXAMPLES (25 per operation), SCHEMATHESIS_TIMEOUT (900 s: the
# whole run is stopped, and fails, past it), SCHEMATHESIS_MAX_TIME (unset; schemathesis
# then repeats fuzzing until that budget is spent), SCHEMATHESIS_SEED (random),
# CLAWDFORGE_PROFILE (release, or debug),
# SCHEMATHESIS_SCHEMA (a schema file to use instead of the server's, for trying the
# script out). Installs schemathesis from PyPI into a venv under ~/.cache if missing.
# Needs cargo, curl, python3 (with venv).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

version=4.32.5
venv="${SCHEMATHESIS_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/clawdforge/schemathesis}"
examples="${SCHEMATHESIS_EXAMPLES:-25}"
limit="${SCHEMATHESIS_TIMEOUT:-900}"
profile="${CLAWDFORGE_PROFILE:-release}"
prog=schemathesis
# shellcheck source=SCRIPTDIR/lib/stub-server.sh
. scripts/lib/stub-server.sh
require_tools cargo curl python3
if ! "$venv/bin/schemathesis" --version 2>/dev/null | grep -q "version $version\$"; then
  echo "schemathesis: installing schemathesis $version into $venv" >&2
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet "schemathesis==$version"
fi
make_work_dir
build_clawdforge "$profile"
stub_server_env
# schemathesis reads both bearers from its config file's ${...}, never from argv.
CF_APP_TOKEN="$("$bin" tokens mint --name schemathesis 2>/dev/null)"
export CF_APP_TOKEN
start_stub_server

schema="$work/openapi.json"
if [ -n "${SCHEMATHESIS_SCHEMA:-}" ]; then
  schema="$(realpath "$SCHEMATHESIS_SCHEMA")"
else
  status="$(curl -s -o "$schema" -w '%{http_code}' "$base/openapi.json")"
  if [ "$status" != 200 ]; then
    echo "schemathesis: GET /openapi.json answered $status; this build has no schema to test" >&2
    exit 3
  fi
fi

# A session for the /sessions/{id} operations to act on (random ids would only reach 404).
printf 'Authorization: Bearer %s\n' "$CF_APP_TOKEN" >"$work/auth"
CF_SESSION_ID="$(curl -s -H "@$work/auth" -H 'Content-Type: application/json' -d '{}' \
  "$base/sessions" |
  python3 -c 'import json, sys; print(json.load(sys.stdin)["session_id"])')"
export CF_SESSION_ID

cat >"$work/schemathesis.toml" <<'EOF'
headers = { Authorization = "Bearer ${CF_APP_TOKEN}" }

[[operations]]
include-path-regex = "^/(admin/|metrics$)"
headers = { Authorization = "Bearer ${ADMIN_BOOTSTRAP_TOKEN}" }

[[operations]]
include-path-regex = "^/sessions/"
parameters = { id = "${CF_SESSION_ID}" }
EOF

extra=()
if [ -n "${SCHEMATHESIS_SEED:-}" ]; then
  extra+=(--seed "$SCHEMATHESIS_SEED")
fi
if [ -n "${SCHEMATHESIS_MAX_TIME:-}" ]; then
  extra+=(--max-time "$SCHEMATHESIS_MAX_TIME")
fi
st() {
  timeout "$limit" "$venv/bin/schemathesis" --config-file "$work/schemathesis.toml" \
    run "$schema" \
    --url "$base" \
    --checks not_a_server_error,response_schema_conformance \
    --max-examples "$examples" \
    --workers 2 \
    --request-timeout 60 \
    "${extra[@]}" "$@"
}
echo "schemathesis: $examples examples per operation against $base" >&2
# Run from the work dir: schemathesis leaves its .hypothesis/ and .schemathesis/ caches there.
cd "$work"
# Revoking or rotating a token found in GET /admin/tokens could take the one the run
# itself uses: those two operations go last, on their own.
rc=0
st --exclude-operation-id revoke_token --exclude-operation-id rotate_token || rc=$?
st --include-operation-id revoke_token --include-operation-id rotate_token || rc=$?
exit "$rc"
