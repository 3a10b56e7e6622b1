#!/usr/bin/env bash
# Makes sure the programs the test suite drives are present: redis-server (real Redis for the
# integration tests), Chromium (the browser EventSource test) and nginx (the gateway behind a
# reverse proxy, tests/integration/test_nginx.py). Installs Debian packages when missing and we
# are root; otherwise explains what to install.
set -euo pipefail

# nginx: the binary the tests run is /usr/sbin/nginx (not always on a non-root PATH).
have_nginx() { command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ]; }

missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
have_nginx || missing+=(nginx)

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
# The package list is known only now. On Debian 12 (bookworm) `nginx` is the binary with the
# core modules and `nginx-light` a metapackage adding only the echo module; a release that has
# no `nginx` package of its own (older ones ship the binary as nginx-light/-core) gets the
# lightest of those that has a candidate.
packages=()
for name in "${missing[@]}"; do
  if [ "$name" = nginx ]; then
    for candidate in nginx nginx-light nginx-core; do
      if apt-cache policy "$candidate" 2>/dev/null | grep -q 'Candidate: [0-9]'; then
        name=$candidate
        break
      fi
    done
  fi
  packages+=("$name")
done
# Debian's nginx package enables a service on port 80; policy-rc.d (in container images) or an
# init system decides whether it starts. The tests never use it: they run their own nginx as a
# child process on a free port with a config of their own.
apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
