#!/usr/bin/env bash
# Installs Debian packages for the scripts that fetch their own tools (test.sh,
# lint-packaging.sh). Needs root, as in CI; refreshes the package lists first
# unless they are less than an hour old, so several calls cost one update.
#
#   scripts/apt-install.sh PACKAGE...
set -euo pipefail

if [ "$(id -u)" != 0 ]; then
  echo "apt-install: cannot install $* without root; install it and rerun" >&2
  exit 1
fi
if ! find /var/lib/apt/lists -maxdepth 1 -name '*_Packages*' -mmin -60 2>/dev/null | grep -q .; then
  apt-get update -qq >/dev/null
fi
echo "apt-install: installing $*"
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
