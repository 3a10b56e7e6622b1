#!/usr/bin/env bash
# Makes sure the programs the test suite drives are present: redis-server (real Redis for the
# integration tests) and Chromium (the browser EventSource test). Installs Debian packages when
# missing and we are root; otherwise explains what to install.
set -euo pipefail

missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)

if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi

if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "error: missing ${missing[*]}; install them (Debian: apt-get install ${missing[*]}) and re-run." >&2
  exit 1
fi

echo "installing ${missing[*]} with apt-get" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
