#!/usr/bin/env bash
# Installs what the server and tests need from Debian's packages, only when
# it is missing: the PostgreSQL server binaries (for the built-in database
# and throwaway test clusters), and on request HAProxy (WITH_HAPROXY=1),
# PgBouncer (WITH_PGBOUNCER=1), promtool from the prometheus package
# (WITH_PROMTOOL=1) and Chromium for the /health page's browser tests
# (WITH_CHROMIUM=1). Safe to run again; quick when everything is present.
set -euo pipefail

have_pg() {
  command -v initdb >/dev/null 2>&1 && return 0
  compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null
}

# have BINARY: on PATH, or in /usr/sbin (not on every user's PATH).
have() {
  command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ]
}

missing=()
have_pg || missing+=(postgresql)
if [ "${WITH_HAPROXY:-0}" = 1 ] && ! have haproxy; then
  missing+=(haproxy)
fi
if [ "${WITH_PGBOUNCER:-0}" = 1 ] && ! have pgbouncer; then
  missing+=(pgbouncer)
fi
if [ "${WITH_PROMTOOL:-0}" = 1 ] && ! have promtool; then
  missing+=(prometheus)
fi
if [ "${WITH_CHROMIUM:-0}" = 1 ] && ! have chromium && ! have chromium-browser; then
  missing+=(chromium)
fi
[ ${#missing[@]} -eq 0 ] && exit 0

echo "installing: ${missing[*]}" >&2
sudo=""
if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null 2>&1; then sudo="sudo"; else
    echo "error: need root (or sudo) to install ${missing[*]}; install them and retry" >&2
    exit 1
  fi
fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
# The packaged services are not wanted: the tests start their own.
for svc in pgbouncer prometheus; do
  if [[ " ${missing[*]} " == *" $svc "* ]] && command -v systemctl >/dev/null 2>&1; then
    $sudo systemctl disable --now "$svc" >/dev/null 2>&1 || true
  fi
done
