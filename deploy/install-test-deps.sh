#!/usr/bin/env bash
# System packages the integration tests use: a real Prometheus server (and promtool).
# Installed only when missing and only where we may (root, apt present); otherwise the tests that
# need them skip with a message saying so.
set -u
if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then exit 0; fi
if [ "$(id -u)" != "0" ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "note: prometheus not installed and cannot install it here (need root + apt); its tests will skip" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null 2>&1 || true
apt-get install -y -qq --no-install-recommends prometheus >/dev/null 2>&1 \
  || echo "note: apt-get install prometheus failed; its tests will skip" >&2
# The Debian package starts a service on :9090 where an init system runs; tests start their own.
exit 0
