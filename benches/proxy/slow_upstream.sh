#!/usr/bin/env bash
# What `upstream_connect_wait` costs an upstream that is slow to answer:
# sso-token-proxy in front of an upstream that answers every request
# 50 ms after it arrives (benches/proxy/slow_upstream.py), loaded by
# `wrk -t1 -c256` for 6 s, with the wait off ("0s") and at its default,
# alternating, ROUNDS times each. Every run starts a fresh proxy (and
# emulator), so the pool grows from nothing past `upstream_connect_wait_above`
# (64) during the run: the ramp the wait delays.
#
#   bash benches/proxy/slow_upstream.sh            # the release build
#   bash benches/proxy/slow_upstream.sh BINARY
#   ROUNDS=5 CONNS=512 DELAY=0.1 bash benches/proxy/slow_upstream.sh
#
# From the repository root. Loopback only; every process it starts is
# stopped on exit. Prints one line per run: the upstream connections the
# proxy opened, req/s, non-2xx answers, and wrk's p50, p99 and max latency.
set -euo pipefail

cd "$(git rev-parse --show-toplevel 2>/dev/null || pwd)"
ROOT="$PWD"
BIN="${1:-$ROOT/target/release/sso-token-proxy}"
ROUNDS="${ROUNDS:-3}"
CONNS="${CONNS:-256}"
DELAY="${DELAY:-0.05}"
BASE="${BENCH_PORT_BASE:-29900}"

source "$ROOT/benches/proxy/tools.sh"
install_missing wrk=wrk curl=curl python3=python3
if [[ $# == 0 ]]; then
    cargo build --release --quiet
fi
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

WORK="$(mktemp -d /tmp/stp-slow.XXXXXX)"
source "$ROOT/benches/proxy/common.sh"

run=0
for round in $(seq "$ROUNDS"); do
    for wait in 0s default; do
        run=$((run + 1))
        # Ports of their own per run: nothing waits for the last run's to be freed.
        p_up=$((BASE + 4 * run)) p_proxy=$((BASE + 4 * run + 1))
        p_admin=$((BASE + 4 * run + 2)) p_emu=$((BASE + 4 * run + 3))
        require_free_ports BENCH_PORT_BASE "$p_up" "$p_proxy" "$p_admin" "$p_emu"
        python3 "$ROOT/benches/proxy/slow_upstream.py" "$p_up" "$DELAY" "$WORK/accepted-$run" 60 &
        up_pid=$!
        PIDS+=("$up_pid")
        wait_http "http://127.0.0.1:$p_up/"
        start_bench_emulator "$BIN" "$p_emu" "$WORK/emulator-$run.log"
        keys=""
        [[ $wait == default ]] || keys="upstream_connect_wait = \"$wait\""
        write_bench_proxy_config "$WORK/proxy-$run.toml" "$p_proxy" "$p_up" "$p_admin" "$WORK/emulator-$run.log" "$keys"
        "$BIN" --config "$WORK/proxy-$run.toml" >"$WORK/proxy-$run.log" 2>&1 &
        proxy_pid=$!
        PIDS+=("$proxy_pid")
        wait_http "http://127.0.0.1:$p_admin/readyz"
        wrk -t1 -c"$CONNS" -d6s --latency "http://127.0.0.1:$p_proxy/" >"$WORK/wrk-$run.txt" 2>&1
        sleep 0.6 # the upstream writes its count twice a second
        # The readiness probe above opened one upstream connection itself.
        opened=$(($(cat "$WORK/accepted-$run") - 1))
        awk -v round="$round" -v wait="$wait" -v opened="$opened" '
            / 50%/ { p50 = $2 } / 99%/ { p99 = $2 } /^    Latency/ { max = $4 }
            /Requests\/sec/ { rps = $2 } /Non-2xx/ { bad = $NF }
            END { printf "round %s  upstream_connect_wait %-7s  upstream connections %4d  req/s %8.0f  non-2xx %d  p50 %s  p99 %s  max %s\n",
                  round, wait, opened, rps, bad + 0, p50, p99, max }' "$WORK/wrk-$run.txt"
        kill "$proxy_pid" "$up_pid" "$EMULATOR_PID" 2>/dev/null || true
        wait "$proxy_pid" "$up_pid" "$EMULATOR_PID" 2>/dev/null || true
    done
done
