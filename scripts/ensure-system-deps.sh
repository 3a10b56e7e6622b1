#!/usr/bin/env bash
# Makes sure the programs the test suite drives are present: redis-server (real Redis for the
# integration tests), Chromium (the browser EventSource test), nginx (the gateway behind a
# reverse proxy, tests/integration/test_nginx.py) promtool (the alert rules and dashboard
# queries in deploy/, tests/integration/test_deploy_monitoring.py; Debian ships it in the
# `prometheus` package). Installs Debian packages when missing and we are root; otherwise
# explains what to install.
set -euo pipefail

# nginx: the binary the tests run is /usr/sbin/nginx (not always on a non-root PATH).
have_nginx() { command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ]; }

missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
have_nginx || missing+=(nginx)
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
# haproxy: the documented HAProxy snippet runs in front of a gateway
# (tests/integration/test_deploy_haproxy.py); /usr/sbin is not always on a non-root PATH.
command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || missing+=(haproxy)

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
# Debian's nginx, prometheus and haproxy packages enable a service (port 80, port 9090) that the
# tests never use: they run their own nginx and haproxy on free ports, and promtool is a
# command, not a server.
# Where no policy-rc.d says otherwise, one that refuses every start stands for the install, so
# no server is left running (a container without init starts none anyway; a systemd host would).
policy=/usr/sbin/policy-rc.d
if [ ! -e "$policy" ]; then
  trap 'rm -f "$policy"' EXIT
  printf '#!/bin/sh\n# ensure-system-deps.sh: no service starts during its install\nexit 101\n' >"$policy"
  chmod 755 "$policy"
fi
apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
# On a systemd host the prometheus unit is still enabled for the next boot: promtool is all
# the tests need, so the server we brought in is disabled (one installed before is untouched:
# then promtool was there and prometheus is not in the list).
for unit in prometheus haproxy; do
  if [[ " ${packages[*]} " == *" $unit "* ]] && [ -d /run/systemd/system ]; then
    systemctl disable --now "$unit.service" >/dev/null 2>&1 || true
  fi
done
