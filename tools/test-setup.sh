#!/usr/bin/env bash
# Prepare a fresh machine to run the test suite: the real registry and clients
# the end-to-end tests drive (Debian's docker-registry, skopeo and podman), the Go packages
# the OCI conformance suite is built from, Redis and
# PostgreSQL running, and a virtualenv in .venv with regmw[test] installed.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages: the registry, the clients (podman: ~15 s to install, one ~1 s test), Redis, and the Go toolchain and Go
# libraries that ../shared/conformance/run.sh builds the OCI conformance suite from
# (offline, no module proxy; tests/test_conformance.py runs it).
DEBS="docker-registry skopeo podman redis-server redis-tools openssl golang-go golang-github-onsi-ginkgo-dev golang-gomega-dev
golang-github-go-resty-resty-dev golang-github-google-uuid-dev golang-github-opencontainers-go-digest-dev
golang-github-opencontainers-image-spec-dev golang-github-mitchellh-mapstructure-dev"
missing=""
for p in $DEBS; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if [ -n "$missing" ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing >/dev/null
fi

if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
fi
if ! pg_isready -q -h 127.0.0.1 -p 5432; then
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql)" main start
fi

python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e '.[test]'
echo "test environment ready: .venv (redis $(redis-cli -h 127.0.0.1 ping), postgres $(pg_isready -h 127.0.0.1 >/dev/null && echo up))"
