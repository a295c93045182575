#!/usr/bin/env bash
# Installs the Debian packages the tests need, only when missing (CI runs as root on a fresh machine).
set -eu
need=()
command -v git >/dev/null 2>&1 || need+=(git)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v curl >/dev/null 2>&1 || need+=(curl)
command -v ss >/dev/null 2>&1 || need+=(iproute2)
# PostgreSQL for the control plane's store tests (initdb + pg_ctl in a temp dir; tests/pg_cluster.py)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing Debian packages: ${need[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq || true
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null || echo "warning: could not install ${need[*]}; tests that need them skip"
  else
    echo "warning: missing ${need[*]} and not root: tests that need them skip"
  fi
fi
