#!/usr/bin/env bash
# Memory of sso-token-proxy and nginx with many idle keep-alive client
# connections: a memory figure, not a timing, so it may be taken on a busy
# machine.
#
#   bash benches/proxy/idle_rss.sh                 # 1000 connections
#   IDLE_CONNS=2000 bash benches/proxy/idle_rss.sh
#   STP_KEYS='runtime = "thread_per_core"' bash benches/proxy/idle_rss.sh
#   bash benches/proxy/idle_rss.sh path/to/other/sso-token-proxy
#   LOAD_CONNS=0 bash benches/proxy/idle_rss.sh    # without the memory under load
#
# From the repository root. Loopback only (127.0.0.1); starts a one-worker
# nginx upstream, nginx as a token-adding proxy (`worker_processes auto`, as
# benches/proxy/run.sh configures it) and sso-token-proxy with its default
# configuration (plus `[proxy]` keys from STP_KEYS, `;`-separated), then for
# each proxy: RSS and PSS (kB, summed over its processes) right after
# start, and with IDLE_CONNS connections that each sent one GET held open;
# then under load: `wrk -t1 -c$LOAD_CONNS` (512 by default, 0 for none) for
# 5 s, sampled 4 s in (the memory it takes, not a timing: wrk's figures are
# not kept).
# Every process it starts is stopped on exit; the holding client gives up
# after 60 s.
set -euo pipefail

cd "$(git rev-parse --show-toplevel 2>/dev/null || pwd)"
ROOT="$PWD"
BIN="${1:-$ROOT/target/release/sso-token-proxy}"
IDLE_CONNS="${IDLE_CONNS:-1000}"
LOAD_CONNS="${LOAD_CONNS:-512}"
BASE="${BENCH_PORT_BASE:-27080}"
P_UP=$((BASE + 1)) P_NGINX=$((BASE + 2)) P_STP=$((BASE + 3)) P_ADMIN=$((BASE + 4)) P_EMU=$((BASE + 5))
HOLD="$ROOT/benches/proxy/hold_conns.py"
tools=(nginx=nginx-light curl=curl python3=python3)
((LOAD_CONNS == 0)) || tools+=(wrk=wrk)
source "$ROOT/benches/proxy/tools.sh"
install_missing "${tools[@]}"
[[ $# != 0 ]] || cargo build --release --quiet
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

WORK="$(mktemp -d /tmp/stp-idle-rss.XXXXXX)"
source "$ROOT/benches/proxy/common.sh"
require_free_ports BENCH_PORT_BASE "$P_UP" "$P_NGINX" "$P_STP" "$P_ADMIN" "$P_EMU"

write_nginx_upstream "$WORK/upstream.conf" "$P_UP"
write_nginx_proxy "$WORK/nginx.conf" auto "$WORK/nginx.pid" "$P_NGINX" "$P_UP" "static-token-of-some-length"
# The emulator from a copy of the binary, so that it shares no pages with
# the proxy measured.
cp "$BIN" "$WORK/sso-token-proxy-emulator"
start_bench_emulator "$WORK/sso-token-proxy-emulator" "$P_EMU" "$WORK/emulator.log"
write_bench_proxy_config "$WORK/stp.toml" "$P_STP" "$P_UP" "$P_ADMIN" "$WORK/emulator.log" "${STP_KEYS:-}"

nginx -p "$WORK" -e stderr -c "$WORK/upstream.conf" >"$WORK/upstream.log" 2>&1 &
PIDS+=($!)
nginx -p "$WORK" -e stderr -c "$WORK/nginx.conf" >"$WORK/nginx.log" 2>&1 &
PID_NGINX=$!
PIDS+=("$PID_NGINX")
"$BIN" --config "$WORK/stp.toml" >"$WORK/stp.log" 2>&1 &
PID_STP=$!
PIDS+=("$PID_STP")
wait_http "http://127.0.0.1:$P_UP/"
wait_http "http://127.0.0.1:$P_ADMIN/readyz"
wait_http "http://127.0.0.1:$P_NGINX/"
wait_http "http://127.0.0.1:$P_STP/"
sleep 1

kb() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }
load_head="" load_rule=""
((LOAD_CONNS == 0)) || load_head=" under c=$LOAD_CONNS: RSS / PSS MB |" load_rule="---:|"
echo "| proxy | idle RSS / PSS MB | $IDLE_CONNS idle keep-alive conns: RSS / PSS MB | per connection (PSS) kB |$load_head"
echo "|---|---:|---:|---:|$load_rule"
for target in nginx stp; do
    if [[ $target == nginx ]]; then pid=$PID_NGINX port=$P_NGINX name="nginx $(nginx -v 2>&1 | sed 's|.*nginx/||')"; else
        pid=$PID_STP port=$P_STP name="sso-token-proxy${STP_KEYS:+ ($STP_KEYS)}"
    fi
    read -r rss0 pss0 < <(tree_mem_kb "$pid")
    ready="$WORK/hold-$target.ready"
    python3 "$HOLD" "$port" "$IDLE_CONNS" "$ready" 60 >"$WORK/hold-$target.log" 2>&1 &
    hold=$!
    PIDS+=("$hold")
    for _ in $(seq 600); do
        [[ -f $ready ]] && break
        kill -0 "$hold" 2>/dev/null || break
        sleep 0.1
    done
    if [[ ! -f $ready || $(awk '{print $3}' "$ready") != 0 ]]; then
        echo "$name: could not hold $IDLE_CONNS connections" >&2
        cat "$WORK/hold-$target.log" >&2
        exit 1
    fi
    sleep 1
    read -r rss1 pss1 < <(tree_mem_kb "$pid")
    kill "$hold" 2>/dev/null || true
    wait "$hold" 2>/dev/null || true
    per=$(awk -v a="$pss1" -v b="$pss0" -v n="$IDLE_CONNS" 'BEGIN { printf "%.1f", (a - b) / n }')
    load=""
    if ((LOAD_CONNS > 0)); then
        wrk -t1 -c"$LOAD_CONNS" -d5s "http://127.0.0.1:$port/" >"$WORK/wrk-$target.txt" 2>&1 &
        wrk_pid=$!
        PIDS+=("$wrk_pid")
        sleep 4
        read -r rss2 pss2 < <(tree_mem_kb "$pid")
        wait "$wrk_pid" || true
        if grep -q "Non-2xx\|Socket errors" "$WORK/wrk-$target.txt"; then
            echo "$name: errors under load" >&2
            cat "$WORK/wrk-$target.txt" >&2
            exit 1
        fi
        load=" $(kb "$rss2") / $(kb "$pss2") |"
    fi
    echo "| $name | $(kb "$rss0") / $(kb "$pss0") | $(kb "$rss1") / $(kb "$pss1") | $per |$load"
done
