#!/usr/bin/env bash
# The official `openai` and `anthropic` Python SDKs, `openapi-python-client` and
# `prometheus_client`, pinned in tests/sdk/requirements.txt,
# into a venv of the tests' own (.venv-tests, gitignored). Idempotent: a venv that already
# holds the pinned versions is left alone.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

venv=.venv-tests
req=tests/sdk/requirements.txt
stamp="$venv/.installed-$(sha256sum "$req" | cut -c1-16)"
if [ -f "$stamp" ]; then
  exit 0
fi
if ! python3 -m venv --help >/dev/null 2>&1; then
  scripts/apt-install.sh python3-venv
fi
python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check -r "$req"
rm -f "$venv"/.installed-*
touch "$stamp"
