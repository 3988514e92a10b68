#!/usr/bin/env bash
# Distribution packages the local platform needs: PostgreSQL and Redis servers.
# They are run as private processes by openledger.local, never as system services.
set -euo pipefail
need=()
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
command -v psql >/dev/null 2>&1 || need+=(postgresql-client)
command -v go >/dev/null 2>&1 || need+=(golang)
# wrk drives the gateway benchmark (make bench); openssl makes the API server keys.
command -v wrk >/dev/null 2>&1 || need+=(wrk)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
command -v npm >/dev/null 2>&1 || need+=(npm)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "[openledger] missing system packages: ${need[*]} — install them with: sudo apt-get install ${need[*]}" >&2
    exit 1
  fi
  echo "[openledger] installing system packages: ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  # The platform runs its own private servers; the distribution's may not hold the ports.
  for svc in redis-server postgresql; do
    (command -v systemctl >/dev/null && systemctl disable --now "$svc" >/dev/null 2>&1) || true
    service "$svc" stop >/dev/null 2>&1 || true
  done
fi
