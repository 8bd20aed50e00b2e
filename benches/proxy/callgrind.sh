#!/usr/bin/env bash
# User-space instructions per proxied request, counted by callgrind: a
# figure that does not move with other load on the machine, for comparing
# builds of the hot path.
#
#   bash benches/proxy/callgrind.sh [BINARY]      # default target/release/sso-token-proxy
#   CG_ENV= bash benches/proxy/callgrind.sh       # the default runtime instead of one worker
#   CG_PROXY_KEYS='runtime = "thread_per_core"' bash benches/proxy/callgrind.sh
#   CG_TARGET=nginx bash benches/proxy/callgrind.sh  # nginx as the proxy, for scale
#   CG_CACHE=1 bash benches/proxy/callgrind.sh    # also simulated cache misses
#
# From the repository root. Starts a one-worker nginx upstream (`return 200
# "ok"`) and the proxy under `valgrind --tool=callgrind` (environment
# `CG_ENV`, by default TOKIO_WORKER_THREADS=1 so that the count does not
# depend on how valgrind interleaves threads; RUST_LOG=info as deployed;
# extra `[proxy]` keys from CG_PROXY_KEYS, `;`-separated; instrumentation
# off until warmed up by 3 s of the same load, so that the count leaves out
# opening the upstream connections), then counts instructions over `wrk -t1
# -c${CG_CONNS:-16} -d${CG_SECONDS:-10}s` and divides by the requests
# served. Keeps the profile in target/callgrind/ for `callgrind_annotate
# --inclusive=yes`.
# With CG_CACHE=1 callgrind also simulates the caches (CG_CACHE_GEOMETRY,
# valgrind's --I1/--D1/--LL options; by default a 32 KiB 8-way L1i and L1d
# and, as the last level, one core's 512 KiB 8-way L2 of the 2-core AMD
# EPYC hosts) and prints misses per request: how much code and data a
# request touches, which instruction counts do not show. Slower; the
# instruction count is the same.
set -euo pipefail

cd "$(git rev-parse --show-toplevel 2>/dev/null || pwd)"
ROOT="$PWD"
BIN="${1:-$ROOT/target/release/sso-token-proxy}"
SECONDS_RUN="${CG_SECONDS:-10}"
BASE="${BENCH_PORT_BASE:-26080}"
P_UP=$((BASE + 1)) P_PROXY=$((BASE + 2)) P_ADMIN=$((BASE + 3)) P_EMU=$((BASE + 4))
source "$ROOT/benches/proxy/tools.sh"
install_missing valgrind=valgrind callgrind_control=valgrind callgrind_annotate=valgrind wrk=wrk nginx=nginx-light curl=curl
if [[ $# == 0 ]]; then
    cargo build --release --quiet
fi

WORK="$(mktemp -d /tmp/stp-callgrind.XXXXXX)"
source "$ROOT/benches/proxy/common.sh"

mkdir -p "$ROOT/target/callgrind"
write_nginx_upstream "$WORK/upstream.conf" "$P_UP"
start_bench_emulator "$BIN" "$P_EMU" "$WORK/emulator.log"
write_bench_proxy_config "$WORK/proxy.toml" "$P_PROXY" "$P_UP" "$P_ADMIN" "$WORK/emulator.log" "${CG_PROXY_KEYS:-}"

nginx -p "$WORK" -e stderr -c "$WORK/upstream.conf" >"$WORK/upstream.log" 2>&1 &
PIDS+=($!)
OUT="$ROOT/target/callgrind/callgrind.$(date +%Y%m%d-%H%M%S).out"
CG_OPTS=(--tool=callgrind --instr-atstart=no)
if [[ ${CG_CACHE:-0} == 1 ]]; then
    # shellcheck disable=SC2206 # a list of valgrind options
    CG_OPTS+=(--cache-sim=yes ${CG_CACHE_GEOMETRY:---I1=32768,8,64 --D1=32768,8,64 --LL=524288,8,64})
fi
if [[ ${CG_TARGET:-} == nginx ]]; then
    # nginx as run.sh's token-adding proxy, one worker in the foreground
    # process (no master), for scale.
    write_nginx_proxy "$WORK/nginx-proxy.conf" 1 "$WORK/nginx-proxy.pid" "$P_PROXY" "$P_UP" "bench-token"
    sed -i 's/^daemon off;/daemon off;\nmaster_process off;/' "$WORK/nginx-proxy.conf"
    valgrind "${CG_OPTS[@]}" --callgrind-out-file="$OUT" \
        nginx -p "$WORK" -e stderr -c "$WORK/nginx-proxy.conf" >"$WORK/proxy.log" 2>&1 &
    READY="http://127.0.0.1:$P_PROXY/"
else
    # shellcheck disable=SC2086 # CG_ENV is a list of NAME=value words
    env ${CG_ENV-TOKIO_WORKER_THREADS=1} RUST_LOG="${RUST_LOG:-info}" valgrind "${CG_OPTS[@]}" \
        --callgrind-out-file="$OUT" "$BIN" --config "$WORK/proxy.toml" >"$WORK/proxy.log" 2>&1 &
    READY="http://127.0.0.1:$P_ADMIN/readyz"
fi
PID=$!
PIDS+=("$PID")
# Up to a minute: valgrind starts slowly.
for _ in $(seq 600); do
    [[ $(curl -s -o /dev/null -w '%{http_code}' "$READY") == 200 ]] && break
    sleep 0.1
done
wrk -t1 -c"${CG_CONNS:-16}" -d3s "http://127.0.0.1:$P_PROXY/" >/dev/null
callgrind_control -i on "$PID" >/dev/null
wrk -t1 -c"${CG_CONNS:-16}" -d"${SECONDS_RUN}s" "http://127.0.0.1:$P_PROXY/" >"$WORK/wrk.txt"
callgrind_control -i off "$PID" >/dev/null
callgrind_control -d "$PID" >/dev/null
sleep 1
N=$(awk '/requests in/ {print $1}' "$WORK/wrk.txt")
NON2XX=$(awk '/Non-2xx/ {print $NF}' "$WORK/wrk.txt")
# The profile's total of one event.
total() { callgrind_annotate --show="$1" "$OUT.1" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}'; }
TOTAL=$(total Ir)
echo "requests: $N${NON2XX:+ (non-2xx: $NON2XX)}"
echo "instructions: $TOTAL"
echo "instructions per request: $((TOTAL / N))"
if [[ ${CG_CACHE:-0} == 1 ]]; then
    for event in I1mr D1mr D1mw ILmr DLmr DLmw; do
        echo "$event per request: $(awk -v t="$(total "$event")" -v n="$N" 'BEGIN { printf "%.1f", t / n }')"
    done
fi
echo "profile: $OUT.1"
