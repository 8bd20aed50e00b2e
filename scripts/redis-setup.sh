#!/usr/bin/env bash
# Installs redis-server (Debian package) when it is missing. The Redis
# store tests start their own private redis-server on a free loopback port
# (tests/support/redis.rs); this script only makes the binary available.
set -euo pipefail
if command -v redis-server >/dev/null 2>&1; then
    redis-server --version
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq redis-server >/dev/null
redis-server --version
