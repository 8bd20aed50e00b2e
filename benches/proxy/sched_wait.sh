#!/usr/bin/env bash
# Where the time of a loaded proxy goes in the kernel's scheduler: for each
# run of `wrk -t1 -cN -d10s --latency` through one proxy, its req/s and
# p99, how the client connections are spread over the proxy's processes,
# and for every busy thread of the proxy, of wrk and of the upstream, the
# CPU time it got and the time it was runnable but waiting for a core
# (/proc/PID/task/TID/schedstat), read 0.5 s into the run and 8 s later.
# It tells a run whose p99 is its p50 plus a scheduler tick apart from one
# that is not, and shows which threads were waiting (BENCHMARKS.md, "The
# c=64 tail and the number of runtimes").
#
#   bash benches/proxy/sched_wait.sh [BINARY]          # default target/release/sso-token-proxy
#   SW_TARGET=nginx bash benches/proxy/sched_wait.sh    # nginx (worker_processes auto) instead
#   SW_ENV=TOKIO_WORKER_THREADS=1 bash benches/proxy/sched_wait.sh    # the proxy's environment
#   SW_PROXY_KEYS='upstream_connect_wait = "0s"' bash benches/proxy/sched_wait.sh
#   SW_CONNS=512 SW_RUNS=4 bash benches/proxy/sched_wait.sh
#   SW_PERF=1 SW_CONNS=512 bash benches/proxy/sched_wait.sh   # and where the CPU time goes
#
# From the repository root. Set up as benches/proxy/run.sh's default view:
# a one-worker nginx upstream answering 200 "ok", the proxy with its
# default configuration and its token from an emulator run apart, nothing
# pinned, everything measured at nice BENCH_NICE (-10 as root). Each run
# warms up with 2 s at c=64 first and opens its connections anew. Loopback
# only, SW_RUNS runs (default 4) of 12 s each; stops by itself.
#
# With SW_PERF=1 the proxy's processes are also sampled by `perf record -F
# SW_PERF_HZ` (default 1999, cpu-clock) over the same 8 s, and the run prints
# the SW_PERF_TOP (default 20) symbols that took the most time, in ns of CPU
# per request served (user-space `[.]` and kernel `[k]`); the profiles stay in
# target/sched-wait/ for `perf report -i`. Time per request is what this
# shows that callgrind's instruction counts do not: cache misses, and
# work whose amount depends on timing (queue lengths under load).
# SW_PERF_CALL_GRAPH=dwarf records call chains the release builds can be
# unwound by (they keep no frame pointers), for `perf report -G` on the
# callers of one symbol; larger profiles.
set -euo pipefail

cd "$(git rev-parse --show-toplevel 2>/dev/null || pwd)"
BIN="${1:-target/release/sso-token-proxy}"
TARGET="${SW_TARGET:-stp}"
RUNS="${SW_RUNS:-4}"
CONNS="${SW_CONNS:-64}"
BASE="${SW_PORT_BASE:-27180}"
P_UP=$((BASE + 1)) P_PROXY=$((BASE + 2)) P_ADMIN=$((BASE + 3)) P_EMU=$((BASE + 4))
[[ $TARGET == stp || $TARGET == nginx ]] || {
    echo "SW_TARGET: stp or nginx, not $TARGET" >&2
    exit 2
}
[[ -r /proc/self/schedstat ]] || {
    echo "this kernel has no /proc/PID/schedstat (CONFIG_SCHED_INFO)" >&2
    exit 2
}

source benches/proxy/tools.sh
install_missing wrk=wrk nginx=nginx-light curl=curl ss=iproute2
PERF="${SW_PERF:-0}"
PERF_HZ="${SW_PERF_HZ:-1999}"
if [[ $PERF == 1 ]]; then
    install_missing perf=linux-perf
    mkdir -p target/sched-wait
fi
WORK="$(mktemp -d /tmp/stp-sched-wait.XXXXXX)"
source benches/proxy/common.sh
require_free_ports SW_PORT_BASE "$P_UP" "$P_PROXY" "$P_ADMIN" "$P_EMU"
BENCH_NICE="${BENCH_NICE:-$([[ $(id -u) == 0 ]] && echo -10 || echo 0)}"
prio=(nice -n "$BENCH_NICE")

# Each process runs a binary file of its own, so that /proc names them.
cp "$(command -v nginx)" "$WORK/nginx-upstream"
write_nginx_upstream "$WORK/upstream.conf" "$P_UP"
"${prio[@]}" "$WORK/nginx-upstream" -p "$WORK" -e stderr -c "$WORK/upstream.conf" >"$WORK/upstream.log" 2>&1 &
UPSTREAM=$!
PIDS+=("$UPSTREAM")
wait_http "http://127.0.0.1:$P_UP/"

if [[ $TARGET == nginx ]]; then
    cp "$(command -v nginx)" "$WORK/nginx-proxy"
    write_nginx_proxy "$WORK/proxy.conf" auto "$WORK/proxy.pid" "$P_PROXY" "$P_UP" "tok-123"
    "${prio[@]}" "$WORK/nginx-proxy" -p "$WORK" -c "$WORK/proxy.conf" >"$WORK/proxy.log" 2>&1 &
    PROXY=$!
    PIDS+=("$PROXY")
    wait_http "http://127.0.0.1:$P_PROXY/"
else
    if [[ ! -x $BIN ]]; then
        [[ $BIN == target/release/sso-token-proxy ]] || {
            echo "no binary at $BIN" >&2
            exit 2
        }
        cargo build --release --quiet
    fi
    start_bench_emulator "$BIN" "$P_EMU" "$WORK/emulator.log"
    write_bench_proxy_config "$WORK/proxy.toml" "$P_PROXY" "$P_UP" "$P_ADMIN" "$WORK/emulator.log" "${SW_PROXY_KEYS:-}"
    # shellcheck disable=SC2086 # SW_ENV is a list of NAME=VALUE words
    env ${SW_ENV:-} "${prio[@]}" "$BIN" --config "$WORK/proxy.toml" >"$WORK/proxy.log" 2>&1 &
    PROXY=$!
    PIDS+=("$PROXY")
    wait_http "http://127.0.0.1:$P_ADMIN/readyz"
fi

echo "target $TARGET${SW_ENV:+ ($SW_ENV)}${SW_PROXY_KEYS:+ [$SW_PROXY_KEYS]}, c=$CONNS, $RUNS run(s), nice $BENCH_NICE"

# Every thread of the proxy's, the upstream's and this run's wrk's
# processes: path, name, then schedstat's run time, wait time (ns) and
# times run, and the times it left a core asleep (voluntary switches: it
# blocked, here in epoll_wait) and preempted (nonvoluntary).
threads() {
    local pid
    for pid in $(proc_tree "$PROXY") $(proc_tree "$UPSTREAM") $(proc_tree "$LOAD"); do
        ls -d /proc/"$pid"/task/* 2>/dev/null || true
    done
}
snapshot() {
    local t
    for t in $(threads); do
        printf '%s %s %s %s\n' "$t" "$(tr ' ' _ <"$t/comm" 2>/dev/null)" "$(cat "$t/schedstat" 2>/dev/null)" \
            "$(awk '/^(non)?voluntary_ctxt_switches/ {printf "%s ", $2}' "$t/status" 2>/dev/null)"
    done | sort
}

for r in $(seq "$RUNS"); do
    wrk -t1 -c64 -d2s "http://127.0.0.1:$P_PROXY/" >/dev/null 2>&1
    "${prio[@]}" wrk -t1 -c"$CONNS" -d10s --latency "http://127.0.0.1:$P_PROXY/" >"$WORK/wrk.txt" 2>&1 &
    LOAD=$!
    sleep 0.5
    snapshot >"$WORK/before"
    # Established client connections by owning process (one number for a
    # proxy of one process, one per worker for nginx).
    spread=$(ss -Htnp state established "( sport = :$P_PROXY )" | grep -o 'pid=[0-9]*' | sort | uniq -c |
        awk '{printf "%s%s", sep, $1; sep = "/"}')
    if [[ $PERF == 1 ]]; then
        profile="target/sched-wait/perf-$TARGET-c$CONNS-run$r.data"
        perf record -q -F "$PERF_HZ" --call-graph "${SW_PERF_CALL_GRAPH:-fp}" -o "$profile" -p "$(proc_tree "$PROXY" | paste -sd,)" -- sleep 8 \
            >/dev/null 2>&1
    else
        sleep 8
    fi
    snapshot >"$WORK/after"
    wait "$LOAD"
    rps=$(awk '/^Requests\/sec/ {print $2}' "$WORK/wrk.txt")
    p50=$(awk '$1 == "50%" {print $2}' "$WORK/wrk.txt")
    p99=$(awk '$1 == "99%" {print $2}' "$WORK/wrk.txt")
    echo "run $r: $rps req/s, p50 $p50, p99 $p99, client connections by process $spread"
    join "$WORK/before" "$WORK/after" | awk '{
        run = ($9 - $3) / 1e6; wait = ($10 - $4) / 1e6; n = $11 - $5
        if (run >= 1)
            printf "  %-16s CPU %5.0f ms  runnable, waiting %5.0f ms  runs %6d  (%3.0f us waited a run; switched out: %d asleep, %d preempted)\n",
                $2, run, wait, n, (n > 0 ? wait * 1000 / n : 0), $12 - $6, $13 - $7
    }'
    if [[ $PERF == 1 ]]; then
        # Samples over the 8 s, and about as many requests as wrk's rate
        # gives for them.
        samples=$(perf script -i "$profile" -F period 2>/dev/null | grep -c .)
        echo "  CPU of the proxy by symbol ($samples samples at $PERF_HZ Hz; profile $profile):"
        # awk reads the whole report (no early exit for pipefail to see).
        perf report -i "$profile" --no-children --sort=sym --stdio 2>/dev/null |
            awk -v top="${SW_PERF_TOP:-20}" -v s="$samples" -v hz="$PERF_HZ" -v rps="$rps" '
                /^ +[0-9.]+%/ && ++k <= top {
                    share = $1; sub(/%/, "", share); $1 = ""
                    printf "  %7.0f ns/request %s\n", share / 100 * s / hz / (rps * 8) * 1e9, $0
                }'
    fi
done
