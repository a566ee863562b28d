#!/usr/bin/env bash
# The test command (README, .ci/run): installs what the tests need, then runs every test.
# Both tiers run: stub CLIs (tests/stubs) and the real pinned CLIs against a fake upstream.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# The real agent CLIs, pinned, into ./.agents (idempotent).
scripts/install-agents.sh

# Tools the tests use from Debian: curl and ip(8) for the network-namespace test, python3
# for the stub CLIs. Installed only when missing (CI starts from a bare machine).
missing=()
command -v curl >/dev/null 2>&1 || missing+=(curl)
command -v ip >/dev/null 2>&1 || missing+=(iproute2)
[ -x /usr/bin/python3 ] || missing+=(python3)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}"
  else
    echo "test.sh: please install: ${missing[*]}" >&2
    exit 1
  fi
fi

cargo test --locked --all-targets "$@"
# The API suite again with the warm pool on: answers must not depend on which path served.
CLAWDFORGE_TEST_WARM_POOL=2 cargo test --locked --test api "$@"
