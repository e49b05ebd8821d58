#!/usr/bin/env bash
# Installs what the server and tests need from Debian's packages, only when
# it is missing: the PostgreSQL server binaries (for the built-in database
# and throwaway test clusters); HAProxy with WITH_HAPROXY=1 and PgBouncer
# with WITH_PGBOUNCER=1 for the tests that use them. Safe to run again.
set -euo pipefail

have_pg() {
  command -v initdb >/dev/null 2>&1 && return 0
  compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null
}

missing=()
have_pg || missing+=(postgresql)
if [ "${WITH_HAPROXY:-0}" = 1 ] && ! command -v haproxy >/dev/null 2>&1; then
  missing+=(haproxy)
fi
if [ "${WITH_PGBOUNCER:-0}" = 1 ] && ! command -v pgbouncer >/dev/null 2>&1 && [ ! -x /usr/sbin/pgbouncer ]; then
  missing+=(pgbouncer)
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
