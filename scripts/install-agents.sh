#!/usr/bin/env bash
# Installs the agent CLIs clawdforge drives, pinned, into a project-local prefix
# (default: ./.agents next to this script's repo). Idempotent: a prefix that already
# holds exactly these versions is left alone. Never installs globally.
#
#   scripts/install-agents.sh [PREFIX]
#
# Afterwards PREFIX/node_modules/.bin holds `claude`, `acpx` and `claude-agent-acp`.
set -euo pipefail

CLAUDE_CODE_VERSION="2.1.197"
ACPX_VERSION="0.19.1"
ACP_ADAPTER_VERSION="0.76.0"

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
prefix="${1:-${CLAWDFORGE_AGENTS_PREFIX:-$repo_root/.agents}}"
stamp="$prefix/.installed"
want="claude-code@$CLAUDE_CODE_VERSION acpx@$ACPX_VERSION claude-agent-acp@$ACP_ADAPTER_VERSION"

if ! command -v npm >/dev/null 2>&1; then
  echo "install-agents: npm is required (Node.js 20 or newer)" >&2
  exit 1
fi

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] \
  && [ -x "$prefix/node_modules/.bin/claude" ] && [ -x "$prefix/node_modules/.bin/acpx" ] \
  && [ -x "$prefix/node_modules/.bin/claude-agent-acp" ]; then
  echo "install-agents: $want already in $prefix"
  exit 0
fi

mkdir -p "$prefix"
if [ ! -f "$prefix/package.json" ]; then
  printf '{\n  "name": "clawdforge-agents",\n  "private": true\n}\n' >"$prefix/package.json"
fi

npm install --prefix "$prefix" --no-audit --no-fund --save-exact --loglevel=error \
  "@anthropic-ai/claude-code@$CLAUDE_CODE_VERSION" \
  "acpx@$ACPX_VERSION" \
  "@agentclientprotocol/claude-agent-acp@$ACP_ADAPTER_VERSION"

"$prefix/node_modules/.bin/claude" --version >/dev/null
"$prefix/node_modules/.bin/acpx" --version >/dev/null
printf '%s' "$want" >"$stamp"
echo "install-agents: installed $want into $prefix"
