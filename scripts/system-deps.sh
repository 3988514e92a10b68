#!/usr/bin/env bash
# Distribution packages the local platform needs: PostgreSQL and Redis servers, the image
# tools (mmdebstrap, buildah) and the node's (containerd, runc, CNI).
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
# make image: the base images from Debian packages (mmdebstrap), the Containerfile built with
# buildah; the OCI archive is loaded into containerd (below).
command -v mmdebstrap >/dev/null 2>&1 || need+=(mmdebstrap)
command -v buildah >/dev/null 2>&1 || need+=(buildah)
# make cluster: a real node (containerd 1.6, runc, the bridge CNI plugin, kube-proxy's iptables and
# conntrack), busybox-static for test images, gcc for the pause (sandbox) binary.
command -v containerd >/dev/null 2>&1 || need+=(containerd)
command -v runc >/dev/null 2>&1 || need+=(runc)
[ -x /usr/lib/cni/bridge ] || need+=(containernetworking-plugins)
command -v iptables >/dev/null 2>&1 || need+=(iptables)
command -v conntrack >/dev/null 2>&1 || need+=(conntrack)
{ [ -x /bin/busybox ] && ! ldd /bin/busybox >/dev/null 2>&1; } || need+=(busybox-static)
command -v gcc >/dev/null 2>&1 || need+=(gcc libc6-dev)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "[openledger] missing system packages: ${need[*]} — install them with: sudo apt-get install ${need[*]}" >&2
    exit 1
  fi
  echo "[openledger] installing system packages: ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  # The platform runs its own private servers; the distribution's may not hold the ports.
  for svc in redis-server postgresql containerd; do
    (command -v systemctl >/dev/null && systemctl disable --now "$svc" >/dev/null 2>&1) || true
    service "$svc" stop >/dev/null 2>&1 || true
  done
fi
