#!/usr/bin/env bash
# The run command (README): installs the pinned agent CLIs, builds the release binary and
# serves with data in ./data. Settings come from the environment (see .env.example); a
# ./.env file, if present, is read first.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

scripts/install-agents.sh
cargo build --release --locked

if [ -f .env ]; then
  set -a
  # shellcheck disable=SC1091
  . ./.env
  set +a
fi
export PATH="$PWD/.agents/node_modules/.bin:$PATH"
export CLAWDFORGE_DATA_DIR="${CLAWDFORGE_DATA_DIR:-./data}"
exec target/release/clawdforge "${@:-serve}"
