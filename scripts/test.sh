#!/usr/bin/env bash
# The test command (README, .ci/run): installs what the tests need, lints the packaging,
# then runs every test. Both tiers run: stub CLIs (tests/stubs) and the real pinned CLIs
# against a fake upstream. Idempotent: with everything installed it installs nothing.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# The real agent CLIs, pinned, into ./.agents (idempotent).
scripts/install-agents.sh

# Tools the tests use from Debian: curl and ip(8) for the network-namespace test, python3
# for the stub CLIs, promtool for the metrics formats. Installed only when missing (CI starts from a bare machine).
missing=()
command -v curl >/dev/null 2>&1 || missing+=(curl)
# promtool (Debian's prometheus package) checks /metrics in both of its formats.
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
command -v ip >/dev/null 2>&1 || missing+=(iproute2)
[ -x /usr/bin/python3 ] || missing+=(python3)
if [ ${#missing[@]} -gt 0 ]; then
  scripts/apt-install.sh "${missing[@]}"
fi

# `requests` for the README's Python snippet (tests/api/readme.rs), in the python3 first
# on PATH, which is the one the test runs: Debian's package for the system python, pip
# for any other (pyenv, a venv).
if ! python3 -c 'import requests' >/dev/null 2>&1; then
  if [ "$(command -v python3)" = /usr/bin/python3 ]; then
    scripts/apt-install.sh python3-requests
  else
    python3 -m pip install --quiet --disable-pip-version-check requests
  fi
fi

# The console's browser test (tests/api/console_browser.rs): Debian's chromium, and
# Playwright for Python, pinned, in a venv of the tests' own (never `playwright install`:
# it would download a browser build; the test launches /usr/bin/chromium).
[ -x /usr/bin/chromium ] || scripts/apt-install.sh chromium
if ! .venv-tests/bin/python -c 'import playwright' >/dev/null 2>&1 \
  || ! .venv-tests/bin/pip freeze 2>/dev/null | grep -qxF "$(grep '^playwright==' tests/browser/requirements.txt)"; then
  # Debian's own python3 makes venvs only with python3-venv (ensurepip) installed.
  python3 -c 'import ensurepip' >/dev/null 2>&1 || scripts/apt-install.sh python3-venv
  python3 -m venv .venv-tests
  .venv-tests/bin/pip install --quiet --disable-pip-version-check -r tests/browser/requirements.txt
fi
# The official openai and anthropic SDKs (tests/api/sdk.rs), the OpenAPI client generator
# and the OpenMetrics parser (tests/api/openapi_client.rs, hardening.rs), pinned, in .venv-tests.
scripts/install-sdk-tests.sh

# Dockerfile, compose.yml, shell scripts, .env.example: a finding fails the run.
scripts/lint-packaging.sh

cargo test --locked --all-targets "$@"
# The API suite again with the warm pool on: answers must not depend on which path served.
CLAWDFORGE_TEST_WARM_POOL=2 cargo test --locked --test api "$@"
