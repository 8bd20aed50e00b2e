#!/usr/bin/env bash
# Resident set of the release sso-token-proxy serving 100,000 distinct
# callers of a per-caller exchange route with max_callers = 10000: a memory
# figure, not a timing, so it may be taken on a busy machine.
#
#   bash benches/exchange/callers.sh                          # release build
#   bash benches/exchange/callers.sh path/to/sso-token-proxy
#
# From the repository root. It runs the integration test
# `tests/exchange_binary.rs` (debug test harness: in-process emulator and
# recording upstream on 127.0.0.1:0) against the given binary, which the
# test starts and stops itself; the test's own deadlines bound the run.
# Prints the test's RSS line: after readiness, after 10,000 callers (the
# cache full), after 20,000 and after 100,000.
set -euo pipefail

cd "$(git rev-parse --show-toplevel 2>/dev/null || pwd)"
BIN="${1:-}"
if [ -z "$BIN" ]; then
    cargo build --release --bin sso-token-proxy
    BIN="target/release/sso-token-proxy"
fi
BIN="$(realpath "$BIN")"
echo "binary: $BIN ($(git rev-parse --short HEAD 2>/dev/null || echo unknown))"
EXCHANGE_PROXY_BIN="$BIN" cargo test --test exchange_binary -- --nocapture 2>&1 |
    grep -E '^binary |^test result|panicked'
