#!/usr/bin/env bash
# sso-token-proxy against nginx and HAProxy as token-adding reverse proxies.
#
#   bash benches/proxy/run.sh                  # full run, writes BENCHMARKS.md
#   DURATION=20 bash benches/proxy/run.sh      # longer runs (default 10 s)
#   ROUNDS=5 bash benches/proxy/run.sh         # medians over 5 rounds (default 3)
#   VIEWS=default bash benches/proxy/run.sh    # only the all-cores view (default: "default pinned")
#   SMOKE=1 bash benches/proxy/run.sh          # CI: the default view, 1 round of 1 s runs at
#                                              # c=1 and c=64, fails on any error, no file write
#   STP_VARIANTS='ws||runtime = "work_stealing"|' bash benches/proxy/run.sh
#                                              # more sso-token-proxy targets in the default view,
#                                              # one per line: label|binary|[proxy] keys (;)|env.
#                                              # Unset: the work-stealing runtime beside the default
#                                              # (thread per core); STP_VARIANTS= for none
#   PGO=0 bash benches/proxy/run.sh            # without the profile-guided build (the container
#                                              # image's binary, scripts/pgo-build.sh), which a
#                                              # full run adds as the variant `pgo`; SMOKE=1 PGO=1
#                                              # adds it to the smoke
#
# From the repository root. Loopback only (127.0.0.1), every load bounded by
# wrk's -d, every process this script starts is stopped on exit.
#
# Two views, each measured in alternating rounds:
#
# * default: what users run first. Every proxy with its default shape on
#   all cores, nothing pinned: nginx `worker_processes auto` (master and
#   workers), HAProxy `nbthread` = cores, sso-token-proxy with its default
#   configuration (`runtime = "thread_per_core"`: one runtime per core,
#   each of which binds itself to a CPU of its own, `cpu_affinity = "auto"`)
#   and no environment tuning; nginx's `worker_cpu_affinity` stays off, its
#   default (NGINX_WORKER_CPU_AFFINITY=auto sets it). Upstream keep-alive
#   pools are at least as large as the largest client connection count (nginx
#   `keepalive 1024` per worker, HAProxy `http-reuse always`, sso-token-proxy
#   its pool, 1024 connections by default).
# * pinned: each proxy pinned to core 1 with one worker (nginx
#   `worker_processes 1`, HAProxy `nbthread 1`, `TOKIO_WORKER_THREADS=1`);
#   wrk and the upstream pinned to core 0.
#
# In both, wrk (-t1) loads the proxy, and the same upstream (nginx, one
# worker, `return 200 "ok"`) answers. All proxies do the same work per
# request: set `Authorization: Bearer <token>`, add X-Forwarded-For/-Proto/
# -Host and Via, keep connections alive both ways. CPU per request is user
# + system time summed over every process (and thread) of the proxy, from
# /proc/<pid>/stat; memory is summed over its processes from
# /proc/<pid>/smaps_rollup.
set -euo pipefail

SMOKE="${SMOKE:-0}"
if [[ "$SMOKE" == 1 ]]; then
    DURATION="${DURATION:-1}"
    CONNS=(1 64)
    WARMUP=1
    ROUNDS="${ROUNDS:-1}"
    VIEWS="${VIEWS:-default}"
else
    DURATION="${DURATION:-10}"
    CONNS=(1 64 512)
    WARMUP=2
    ROUNDS="${ROUNDS:-3}"
    VIEWS="${VIEWS:-default pinned}"
fi
IDLE_CONNS="${IDLE_CONNS:-1000}"
BENCH_SCRAPE_EVERY="${BENCH_SCRAPE_EVERY:-5}"
BASE="${BENCH_PORT_BASE:-28080}"
CORE_LOAD="${CORE_LOAD:-0}"
CORE_PROXY="${CORE_PROXY:-1}"
UPSTREAM_WORKERS="${UPSTREAM_WORKERS:-1}"
WS_VARIANT='work_stealing||runtime = "work_stealing"|'
if [[ "$SMOKE" == 1 ]]; then
    STP_VARIANTS="${STP_VARIANTS:-}"
    PGO="${PGO:-0}"
else
    STP_VARIANTS="${STP_VARIANTS-$WS_VARIANT}"
    PGO="${PGO:-1}"
fi
STP_VARIANTS_GIVEN="$STP_VARIANTS"

cd "$(git rev-parse --show-toplevel 2>/dev/null || pwd)"
[[ -f Cargo.toml && -d benches/proxy ]] || {
    echo "run from the repository root" >&2
    exit 2
}
ROOT="$PWD"
BIN="$ROOT/target/release/sso-token-proxy"
HOLD="$ROOT/benches/proxy/hold_conns.py"
CORES="$(nproc)"

log() { printf '[bench] %s\n' "$*" >&2; }

# --- tools -----------------------------------------------------------------
source "$ROOT/benches/proxy/tools.sh"
install_missing wrk=wrk nginx=nginx-light haproxy=haproxy taskset=util-linux curl=curl python3=python3

# Everything measured, wrk and the upstream included, runs at the same
# raised priority (as root), so that other work on a shared machine disturbs
# it less; BENCH_NICE=0 to not.
prio=()
BENCH_NICE="${BENCH_NICE:-$([[ $(id -u) == 0 ]] && echo -10 || echo 0)}"
[[ $BENCH_NICE == 0 ]] || prio=(nice -n "$BENCH_NICE")

# 1000 idle connections plus load need descriptors.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

# --- build -----------------------------------------------------------------
log "cargo build --release"
cargo build --release --quiet
if [[ $PGO == 1 ]]; then
    # The container image's build (deploy/Dockerfile, ARG PGO=1), measured
    # beside the plain release build.
    log "bash scripts/pgo-build.sh"
    bash scripts/pgo-build.sh
    STP_VARIANTS+=$'\n''pgo|'"$ROOT/target/pgo/sso-token-proxy"'||'
fi
# The builds above keep both cores busy for minutes: let the one-minute
# load average fall under 1 before measuring (at most 3 minutes), so that
# it tells other work on the machine apart from this script's own build.
if [[ "$SMOKE" != 1 ]]; then
    for _ in $(seq 36); do
        awk '{ exit !($1 < 1) }' /proc/loadavg && break
        sleep 5
    done
fi

WORK="$(mktemp -d /tmp/stp-bench.XXXXXX)"
source "$ROOT/benches/proxy/common.sh"
mkdir -p "$WORK/tmp"

# A static token as long as the emulator's, for nginx and HAProxy.
STATIC_TOKEN="$(python3 -c 'import secrets; print(secrets.token_urlsafe(96))')"
NGINX_VERSION="$(nginx -v 2>&1 | sed 's|.*nginx/||')"
HAPROXY_VERSION="$(haproxy -v | awk 'NR==1 {print $3}')"

# sso-token-proxy variants of the default view: label|binary|proxy keys|env.
VARIANT_IDS=()
declare -A V_LABEL V_BIN V_KEYS V_ENV
i=0
while IFS= read -r line; do
    [[ -n ${line//[[:space:]]/} ]] || continue
    i=$((i + 1))
    IFS='|' read -r label bin keys envs <<<"$line"
    id="v$i"
    VARIANT_IDS+=("$id")
    V_LABEL[$id]="$label" V_BIN[$id]="${bin:-$BIN}" V_KEYS[$id]="$keys" V_ENV[$id]="$envs"
done <<<"$STP_VARIANTS"

# Every process measured runs a binary file of its own. PSS splits a file's
# pages among all the processes that map it, so an sso-token-proxy variant
# run from the same file, or the upstream nginx from nginx's, would take
# half of those pages off the figure of the proxy measured beside it (about
# 4 MB of sso-token-proxy's 8 MB of mapped code and data).
declare -A RUN_BIN
RUN_BIN[stp]="$WORK/sso-token-proxy"
cp "$BIN" "${RUN_BIN[stp]}"
for id in "${VARIANT_IDS[@]}"; do
    RUN_BIN[$id]="$WORK/sso-token-proxy-$id"
    cp "${V_BIN[$id]}" "${RUN_BIN[$id]}"
done
UPSTREAM_NGINX="$WORK/nginx-upstream"
cp "$(command -v nginx)" "$UPSTREAM_NGINX"
# The SSO-OIDC emulators, one beside each sso-token-proxy measured (see
# start_bench_emulator in common.sh), from a file of their own as well.
EMU_BIN="$WORK/sso-token-proxy-emulator"
cp "$BIN" "$EMU_BIN"

# --- per view: configs, processes ------------------------------------------
declare -A NAME PORT PID
NAME[direct]="direct (no proxy)"
NAME[nginx]="nginx $NGINX_VERSION"
NAME[haproxy]="HAProxy $HAPROXY_VERSION"
NAME[stp]="sso-token-proxy"
for id in "${VARIANT_IDS[@]}"; do NAME[$id]="sso-token-proxy (${V_LABEL[$id]})"; done
VIEW_PIDS=()

# Starts a process of the current view; its pid in $STARTED.
start() { # log-name command...
    local name=$1
    shift
    "$@" >"$WORK/$name.log" 2>&1 &
    STARTED=$!
    PIDS+=("$STARTED")
    VIEW_PIDS+=("$STARTED")
}

stop_view() {
    local pid
    for pid in "${VIEW_PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${VIEW_PIDS[@]}"; do
        for _ in $(seq 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    VIEW_PIDS=()
}

start_view() { # view
    local view=$1 base workers nbthread pin_load pin_proxy stp_env
    if [[ $view == default ]]; then
        base=$BASE
        workers=auto nbthread=$CORES
        pin_load=("${prio[@]}") pin_proxy=("${prio[@]}")
        stp_env=()
        TARGETS=(direct nginx haproxy stp "${VARIANT_IDS[@]}")
    else
        base=$((BASE + 20))
        workers=1 nbthread=1
        if ((CORES < 2)); then
            log "fewer than 2 cores: the pinned view is not pinned"
            pin_load=("${prio[@]}") pin_proxy=("${prio[@]}")
        else
            pin_load=("${prio[@]}" taskset -c "$CORE_LOAD") pin_proxy=("${prio[@]}" taskset -c "$CORE_PROXY")
        fi
        stp_env=(TOKIO_WORKER_THREADS=1)
        TARGETS=(direct nginx haproxy stp)
    fi
    PIN_LOAD=("${pin_load[@]}")
    PORT[direct]=$((base + 1)) PORT[nginx]=$((base + 2)) PORT[haproxy]=$((base + 3)) PORT[stp]=$((base + 4))
    local p_admin=$((base + 5)) p_emu=$((base + 6)) ports=()
    local n=0 id
    # Variant n (from 0): proxy, admin and emulator ports from base + 7 + 3n.
    for id in "${VARIANT_IDS[@]}"; do
        PORT[$id]=$((base + 7 + 3 * n))
        ports+=($((base + 8 + 3 * n)) $((base + 9 + 3 * n)))
        n=$((n + 1))
    done
    for t in "${TARGETS[@]}"; do ports+=("${PORT[$t]}"); done
    require_free_ports BENCH_PORT_BASE "${ports[@]}" "$p_admin" "$p_emu"

    write_nginx_upstream "$WORK/upstream-$view.conf" "${PORT[direct]}"
    sed -i "s/^worker_processes 1;/worker_processes $UPSTREAM_WORKERS;/; s|upstream.pid|upstream-$view.pid|" \
        "$WORK/upstream-$view.conf"
    [[ $UPSTREAM_WORKERS == 1 ]] || sed -i 's/^master_process off;//' "$WORK/upstream-$view.conf"

    write_nginx_proxy "$WORK/nginx-$view.conf" "$workers" "$WORK/nginx-$view.pid" \
        "${PORT[nginx]}" "${PORT[direct]}" "$STATIC_TOKEN"

    cat >"$WORK/haproxy-$view.cfg" <<EOF
global
    nbthread $nbthread
    maxconn 8000
defaults
    mode http
    maxconn 8000
    timeout connect 5s
    timeout client 120s
    timeout server 120s
    timeout http-keep-alive 120s
    option http-keep-alive
    http-reuse always
frontend fe
    bind 127.0.0.1:${PORT[haproxy]}
    option forwardfor
    http-request set-header Authorization "Bearer $STATIC_TOKEN"
    http-request set-header X-Forwarded-Proto http
    http-request set-header X-Forwarded-Host %[req.hdr(host)]
    http-request add-header Via "1.1 haproxy"
    default_backend be
backend be
    server up 127.0.0.1:${PORT[direct]}
EOF

    log "$view view: starting upstream, nginx, haproxy, sso-token-proxy"
    start "upstream-$view" "${pin_load[@]}" "$UPSTREAM_NGINX" -p "$WORK" -e stderr -c "$WORK/upstream-$view.conf"
    PID[direct]=$STARTED
    start "nginx-$view" "${pin_proxy[@]}" nginx -p "$WORK" -e stderr -c "$WORK/nginx-$view.conf"
    PID[nginx]=$STARTED
    start "haproxy-$view" "${pin_proxy[@]}" haproxy -db -f "$WORK/haproxy-$view.cfg"
    PID[haproxy]=$STARTED
    start "emulator-$view" "$EMU_BIN" emulator --listen "127.0.0.1:$p_emu"
    write_bench_proxy_config "$WORK/stp-$view.toml" "${PORT[stp]}" "${PORT[direct]}" "$p_admin" "$WORK/emulator-$view.log"
    start "stp-$view" env "${stp_env[@]}" "${pin_proxy[@]}" "${RUN_BIN[stp]}" --config "$WORK/stp-$view.toml"
    PID[stp]=$STARTED
    ADMIN=("$p_admin")
    for id in "${VARIANT_IDS[@]}"; do
        local a=$((PORT[$id] + 1))
        start "emulator-$id-$view" "$EMU_BIN" emulator --listen "127.0.0.1:$((a + 1))"
        write_bench_proxy_config "$WORK/$id.toml" "${PORT[$id]}" "${PORT[direct]}" "$a" \
            "$WORK/emulator-$id-$view.log" "${V_KEYS[$id]}"
        # shellcheck disable=SC2086 # the variant's env is a list of NAME=value words
        start "$id-$view" env ${V_ENV[$id]} "${pin_proxy[@]}" "${RUN_BIN[$id]}" --config "$WORK/$id.toml"
        PID[$id]=$STARTED
        ADMIN+=("$a")
    done

    wait_http "http://127.0.0.1:${PORT[direct]}/"
    local a
    for a in "${ADMIN[@]}"; do wait_http "http://127.0.0.1:$a/readyz"; done
    # Each proxy must answer 200 and hand the upstream a bearer token.
    for t in "${TARGETS[@]}"; do
        [[ $t != direct ]] || continue
        wait_http "http://127.0.0.1:${PORT[$t]}/"
        auth="$(curl -s "http://127.0.0.1:${PORT[$t]}/_auth")"
        if [[ "$auth" != "Bearer "?* ]]; then
            echo "${NAME[$t]} did not send a bearer token upstream" >&2
            exit 1
        fi
    done

    # sso-token-proxy's /metrics is scraped every BENCH_SCRAPE_EVERY seconds,
    # as Prometheus would.
    if ((BENCH_SCRAPE_EVERY > 0)); then
        (
            trap 'exit 0' TERM
            while sleep "$BENCH_SCRAPE_EVERY"; do
                for a in "${ADMIN[@]}"; do curl -s -o /dev/null "http://127.0.0.1:$a/metrics" || true; done
            done
        ) &
        PIDS+=($!)
        VIEW_PIDS+=($!)
    fi
}

# --- measuring -------------------------------------------------------------
HZ="$(getconf CLK_TCK)"
# wrk latency ("68.00us", "1.23ms", "1.01s") in microseconds.
to_us() {
    awk -v v="$1" 'BEGIN {
        n = v + 0
        if (v ~ /us$/) m = 1; else if (v ~ /ms$/) m = 1000; else if (v ~ /m$/) m = 60000000; else m = 1000000
        printf "%.0f", n * m
    }'
}
per_req() { awk -v d="$1" -v hz="$HZ" -v n="$2" 'BEGIN { if (n > 0) printf "%.1f", d / hz * 1e6 / n; else print 0 }'; }
median() { printf '%s\n' "$@" | sort -g | awk '{v[NR] = $1} END { if (NR == 0) print ""; else if (NR % 2) print v[(NR + 1) / 2]; else printf "%.1f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
spread() { printf '%s\n' "$@" | sort -g | awk 'NR == 1 {lo = $1} {hi = $1} END { if (NR > 1) printf "%s–%s", lo, hi; else print "–" }'; }

run_wrk() { # target conns duration outfile
    "${PIN_LOAD[@]}" wrk -t1 -c"$2" -d"${3}s" --latency "http://127.0.0.1:${PORT[$1]}/" >"$4" 2>&1
}

failed=0
fail() {
    echo "FAILED: $*" >&2
    failed=1
}

declare -A R_RPS R_P50 R_P99 R_CPU R_USR R_SYS R_UTIL R_RSS R_PSS R_WRK R_UP
declare -A RPS RPS_SPREAD P50 P99 CPU USR SYS UTIL WRK UP RSS_IDLE PSS_IDLE RSS_1K PSS_1K RSS_LOAD PSS_LOAD

# One wrk run against target t at c connections; results appended to the
# per-round lists of view/t/c.
measure() { # view target conns round
    local view=$1 t=$2 c=$3 round=$4
    local out="$WORK/wrk-$view-$t-$c-$round.txt" k="$view/$t/$c" u0 s0 u1 s1 wrk_pid mem uu0 us0 uu1 us1
    read -r u0 s0 < <(tree_cpu_ticks "${PID[$t]}")
    read -r uu0 us0 < <(tree_cpu_ticks "${PID[direct]}")
    # wrk's own CPU time (bash's `time`), to see whether it was the ceiling.
    (
        TIMEFORMAT='%U %S'
        { time run_wrk "$t" "$c" "$DURATION" "$out"; } 2>"$out.time" || true
    ) &
    wrk_pid=$!
    if [[ $c == 512 && $t != direct ]]; then
        sleep "$(awk -v d="$DURATION" 'BEGIN { print d * 0.9 }')"
        mem="$(tree_mem_kb "${PID[$t]}")"
        R_RSS[$k]+=" ${mem% *}" R_PSS[$k]+=" ${mem#* }"
    fi
    wait "$wrk_pid" || true
    read -r u1 s1 < <(tree_cpu_ticks "${PID[$t]}")
    read -r uu1 us1 < <(tree_cpu_ticks "${PID[direct]}")
    R_WRK[$k]+=" $(awk -v s="$DURATION" '{ printf "%.0f", ($1 + $2) * 100 / s }' "$out.time")"
    R_UP[$k]+=" $(awk -v d=$((uu1 + us1 - uu0 - us0)) -v hz="$HZ" -v s="$DURATION" 'BEGIN { printf "%.0f", d / hz * 100 / s }')"
    local rps p50 p99 non2xx errs total
    rps=$(awk '/^Requests\/sec:/ {printf "%.0f", $2}' "$out")
    p50=$(to_us "$(awk '$1 == "50%" {print $2}' "$out")")
    p99=$(to_us "$(awk '$1 == "99%" {print $2}' "$out")")
    non2xx=$(awk '/Non-2xx or 3xx responses:/ {print $NF}' "$out")
    errs=$(awk '/Socket errors:/ {sub(/.*errors: /, ""); print}' "$out")
    total=$(awk '/requests in/ {print $1}' "$out")
    local cpu usr sys util
    cpu=$(per_req $((u1 + s1 - u0 - s0)) "${total:-0}")
    usr=$(per_req $((u1 - u0)) "${total:-0}")
    sys=$(per_req $((s1 - s0)) "${total:-0}")
    util=$(awk -v d=$((u1 + s1 - u0 - s0)) -v hz="$HZ" -v s="$DURATION" 'BEGIN { printf "%.0f", d / hz * 100 / s }')
    R_RPS[$k]+=" ${rps:-0}" R_P50[$k]+=" $p50" R_P99[$k]+=" $p99" R_CPU[$k]+=" $cpu" R_UTIL[$k]+=" $util"
    R_USR[$k]+=" $usr" R_SYS[$k]+=" $sys"
    log "$(printf '%-7s %-8s c=%-4s %8s req/s  p50 %6s us  p99 %7s us  cpu %5s us/req (%s %%)  non-2xx %s%s' \
        "$view" "$t" "$c" "${rps:-0}" "$p50" "$p99" "$cpu" "$util" "${non2xx:-0}" "${errs:+  socket errors: $errs}")"
    if [[ -z $rps || $rps == 0 ]]; then
        fail "${NAME[$t]} ($view view) at c=$c served nothing"
        cat "$out" >&2
    fi
    [[ ${non2xx:-0} == 0 ]] || fail "${NAME[$t]} ($view view) at c=$c: $non2xx non-2xx responses"
    [[ -z $errs ]] || fail "${NAME[$t]} ($view view) at c=$c: socket errors: $errs"
    kill -0 "${PID[$t]}" 2>/dev/null || fail "${NAME[$t]} ($view view) exited during the run at c=$c"
}

measure_view() { # view
    local view=$1 t c round n k
    local proxies=()
    for t in "${TARGETS[@]}"; do [[ $t == direct ]] || proxies+=("$t"); done
    for t in "${proxies[@]}"; do
        read -r RSS_IDLE[$view/$t] PSS_IDLE[$view/$t] < <(tree_mem_kb "${PID[$t]}")
    done
    # Memory with IDLE_CONNS keep-alive connections held open, on the fresh
    # processes (before the load runs, whose upstream pools and allocator
    # high-water marks would otherwise be counted too).
    for t in "${proxies[@]}"; do
        local ready="$WORK/hold-$view-$t.ready" hold_pid
        python3 "$HOLD" "${PORT[$t]}" "$IDLE_CONNS" "$ready" 30 >"$WORK/hold-$view-$t.log" 2>&1 &
        hold_pid=$!
        PIDS+=("$hold_pid")
        for _ in $(seq 300); do
            [[ -f $ready ]] && break
            kill -0 "$hold_pid" 2>/dev/null || break
            sleep 0.1
        done
        if [[ ! -f $ready ]] || [[ $(awk '{print $3}' "$ready") != 0 ]]; then
            fail "${NAME[$t]} ($view view): could not hold $IDLE_CONNS connections"
            cat "$WORK/hold-$view-$t.log" "$ready" >&2 2>/dev/null || true
        fi
        sleep 1
        read -r RSS_1K[$view/$t] PSS_1K[$view/$t] < <(tree_mem_kb "${PID[$t]}")
        kill "$hold_pid" 2>/dev/null || true
        wait "$hold_pid" 2>/dev/null || true
        log "$view: ${NAME[$t]}: memory with $IDLE_CONNS idle keep-alive connections: RSS $(mb "${RSS_1K[$view/$t]}") MB, PSS $(mb "${PSS_1K[$view/$t]}") MB"
    done
    # Per round, every target in turn, starting one further each round (so
    # that load which comes and goes on a shared machine falls on all of
    # them); the report takes each figure's median over the rounds.
    n=${#TARGETS[@]}
    for round in $(seq "$ROUNDS"); do
        for i in $(seq 0 $((n - 1))); do
            t=${TARGETS[$(((i + round - 1) % n))]}
            log "$view round $round/$ROUNDS, ${NAME[$t]}: warm-up ${WARMUP}s"
            run_wrk "$t" 64 "$WARMUP" "$WORK/warm.txt" || true
            for c in "${CONNS[@]}"; do measure "$view" "$t" "$c" "$round"; done
        done
    done
    for t in "${TARGETS[@]}"; do
        for c in "${CONNS[@]}"; do
            k="$view/$t/$c"
            # shellcheck disable=SC2086 # word splitting of the per-round lists is intended
            {
                RPS[$k]=$(median ${R_RPS[$k]}) RPS_SPREAD[$k]=$(spread ${R_RPS[$k]})
                P50[$k]=$(median ${R_P50[$k]}) P99[$k]=$(median ${R_P99[$k]})
                CPU[$k]=$(median ${R_CPU[$k]}) UTIL[$k]=$(median ${R_UTIL[$k]})
                USR[$k]=$(median ${R_USR[$k]}) SYS[$k]=$(median ${R_SYS[$k]})
                WRK[$k]=$(median ${R_WRK[$k]}) UP[$k]=$(median ${R_UP[$k]})
                [[ -z ${R_RSS[$k]:-} ]] || RSS_LOAD[$view/$t]=$(median ${R_RSS[$k]})
                [[ -z ${R_PSS[$k]:-} ]] || PSS_LOAD[$view/$t]=$(median ${R_PSS[$k]})
            }
        done
    done
    VIEW_TARGETS[$view]="${TARGETS[*]}"
}

mb() { awk -v kb="$1" 'BEGIN { printf "%.1f", kb / 1024 }'; }

LOAD_START="$(cut -d' ' -f1-3 /proc/loadavg)"
BUSY_START="$(pgrep -c 'rustc|cargo|cc1' || true)"
declare -A VIEW_TARGETS
for view in $VIEWS; do
    start_view "$view"
    measure_view "$view"
    stop_view
done
LOAD_END="$(cut -d' ' -f1-3 /proc/loadavg)"

# --- report ----------------------------------------------------------------
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }'; }
added() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%+d", a - b }'; }
verdict() { awk -v v="$1" -v op="$2" -v lim="$3" 'BEGIN {
    if (v == "-" || v == "") { print "**not measured**"; exit }
    ok = (op == ">=") ? (v >= lim) : (v <= lim); print ok ? "**met**" : "**not met**" }'; }
has_c() { [[ " ${CONNS[*]} " == *" $1 "* ]]; }

results_table() { # view
    local view=$1 t c k a50 a99
    echo "| target | conns | req/s | req/s range | p50 µs | p99 µs | added p50 µs | added p99 µs | CPU/req µs | user µs | sys µs | CPU % | wrk CPU % | upstream CPU % |"
    echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    for t in ${VIEW_TARGETS[$view]}; do
        for c in "${CONNS[@]}"; do
            k="$view/$t/$c"
            if [[ $t == direct ]]; then a50="–" a99="–"; else
                a50=$(added "${P50[$k]}" "${P50[$view/direct/$c]}")
                a99=$(added "${P99[$k]}" "${P99[$view/direct/$c]}")
            fi
            echo "| ${NAME[$t]} | $c | ${RPS[$k]} | ${RPS_SPREAD[$k]} | ${P50[$k]} | ${P99[$k]} | $a50 | $a99 | ${CPU[$k]} | ${USR[$k]} | ${SYS[$k]} | ${UTIL[$k]} | ${WRK[$k]} | ${UP[$k]} |"
        done
    done
}

memory_table() { # view
    local view=$1 t load
    echo "| proxy | idle: RSS / PSS MB | $IDLE_CONNS idle keep-alive conns: RSS / PSS MB | under c=512: RSS / PSS MB |"
    echo "|---|---:|---:|---:|"
    for t in ${VIEW_TARGETS[$view]}; do
        [[ $t != direct ]] || continue
        load="n/a"
        [[ -z ${RSS_LOAD[$view/$t]:-} ]] || load="$(mb "${RSS_LOAD[$view/$t]}") / $(mb "${PSS_LOAD[$view/$t]}")"
        echo "| ${NAME[$t]} | $(mb "${RSS_IDLE[$view/$t]}") / $(mb "${PSS_IDLE[$view/$t]}") | $(mb "${RSS_1K[$view/$t]}") / $(mb "${PSS_1K[$view/$t]}") | $load |"
    done
}

# Ratios of sso-token-proxy (or a variant) to nginx and HAProxy, per c.
ratio_table() { # view target
    local view=$1 s=$2 c row
    local header="| ratio of ${NAME[$s]} to | figure |" sep="|---|---|"
    for c in "${CONNS[@]}"; do header+=" c=$c |" sep+="---:|"; done
    echo "$header"
    echo "$sep"
    for ref in nginx haproxy; do
        for fig in req/s p99 CPU/req; do
            row="| ${NAME[$ref]} | $fig |"
            for c in "${CONNS[@]}"; do
                case $fig in
                    req/s) row+=" $(ratio "${RPS[$view/$s/$c]}" "${RPS[$view/$ref/$c]}")× |" ;;
                    p99) row+=" $(ratio "${P99[$view/$s/$c]}" "${P99[$view/$ref/$c]}")× |" ;;
                    CPU/req) row+=" $(ratio "${CPU[$view/$s/$c]}" "${CPU[$view/$ref/$c]}")× |" ;;
                esac
            done
            echo "$row"
        done
    done
}

targets_list() { # view target
    local view=$1 s=$2 r
    if has_c 64; then
        r=$(ratio "${RPS[$view/$s/64]}" "${RPS[$view/nginx/64]}")
        echo "- c=64 req/s ≥ 1.0× nginx's: ${r}× — $(verdict "$r" '>=' 1.0) (stretch 1.1×: $(verdict "$r" '>=' 1.1))."
        r=$(ratio "${CPU[$view/$s/64]}" "${CPU[$view/nginx/64]}")
        echo "- c=64 CPU per request ≤ 1.1× nginx's: ${r}× — $(verdict "$r" '<=' 1.1)."
        r=$(ratio "${P99[$view/$s/64]}" "${P99[$view/nginx/64]}")
        echo "- c=64 p99 ≤ nginx's: ${r}× — $(verdict "$r" '<=' 1.0)."
    fi
    if has_c 1; then
        local a_s a_n
        a_s=$(awk -v a="${P50[$view/$s/1]}" -v b="${P50[$view/direct/1]}" 'BEGIN { print a - b }')
        a_n=$(awk -v a="${P50[$view/nginx/1]}" -v b="${P50[$view/direct/1]}" 'BEGIN { print a - b }')
        echo "- c=1 added p50 over direct ≤ nginx's: ${a_s} µs against ${a_n} µs — $(verdict "$a_s" '<=' "$a_n")."
    fi
    if has_c 512; then
        r=$(ratio "${RPS[$view/$s/512]}" "${RPS[$view/nginx/512]}")
        echo "- c=512 req/s ≥ 1.0× nginx's: ${r}× — $(verdict "$r" '>=' 1.0)."
        r=$(ratio "${P99[$view/$s/512]}" "${P99[$view/nginx/512]}")
        echo "- c=512 p99 ≤ nginx's: ${r}× — $(verdict "$r" '<=' 1.0)."
        local m
        m=$(mb "${PSS_LOAD[$view/$s]:-0}")
        echo "- memory under c=512 ≤ 30 MB: ${m} MB (PSS; RSS $(mb "${RSS_LOAD[$view/$s]:-0}") MB) — $(verdict "$m" '<=' 30)."
    fi
    r=$(ratio "${PSS_1K[$view/$s]}" "${PSS_1K[$view/nginx]}")
    echo "- memory with $IDLE_CONNS idle keep-alive connections ≤ 2× nginx's: ${r}× ($(mb "${PSS_1K[$view/$s]}") MB against $(mb "${PSS_1K[$view/nginx]}") MB, PSS) — $(verdict "$r" '<=' 2.0)."
}

CPU_MODEL="$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)"
CMD="bash benches/proxy/run.sh"
[[ "$SMOKE" == 1 ]] && CMD="SMOKE=1 $CMD"
[[ "$DURATION" != 10 && "$SMOKE" != 1 ]] && CMD="DURATION=$DURATION $CMD"
[[ "$ROUNDS" != 3 && "$SMOKE" != 1 ]] && CMD="ROUNDS=$ROUNDS $CMD"
[[ -z $STP_VARIANTS_GIVEN || $STP_VARIANTS_GIVEN == "$WS_VARIANT" ]] || CMD="STP_VARIANTS=… $CMD"
[[ $PGO == 1 && "$SMOKE" == 1 ]] && CMD="PGO=1 $CMD"
[[ $PGO != 1 && "$SMOKE" != 1 ]] && CMD="PGO=0 $CMD"
REPORT="$WORK/report.md"
{
    echo "## Proxy vs nginx and HAProxy"
    echo
    echo "Command: \`$CMD\` (from the repository root; writes this section)."
    echo "Date: $(date -u '+%Y-%m-%d %H:%M UTC'). Machine: $CORES cores, ${CPU_MODEL:-unknown CPU}, $(uname -sr)."
    echo "Tools: $(wrk -v 2>&1 | head -1 | awk '{print $1, $2}'), ${NAME[nginx]}, ${NAME[haproxy]}, sso-token-proxy $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet HEAD -- src 2>/dev/null || echo ' + uncommitted changes')."
    echo "Load average before / after: $LOAD_START / $LOAD_END; compiler processes running at the start: $BUSY_START."
    if awk -v l="${LOAD_START%% *}" 'BEGIN { exit !(l >= 1) }'; then
        echo "**The machine was busy (load average ≥ 1): wall-clock figures are noise; CPU per request is the steadier figure.**"
    fi
    echo
    if [[ " $VIEWS " == *" default "* ]]; then
        echo "### Default configuration, all cores, unpinned"
        echo
        ratio_table default stp
        echo
        targets_list default stp
        echo
        echo "Set-up: no process pinned by this script, all on $CORES cores. nginx \`worker_processes auto\` (a master and"
        echo "$CORES workers${NGINX_WORKER_CPU_AFFINITY:+, \`worker_cpu_affinity $NGINX_WORKER_CPU_AFFINITY\`}), HAProxy \`nbthread $CORES\`, sso-token-proxy with its default configuration (no"
        echo "environment variables; \`runtime = \"thread_per_core\"\`, one runtime per core, each bound by the proxy"
        echo "itself to a CPU of its own when there are as many runtimes as CPUs, \`cpu_affinity = \"auto\"\`; its token from the"
        echo "SSO-OIDC emulator run alone, \`sso-token-proxy emulator\`, in a process of its own, as a deployed"
        echo "proxy gets it from the real service). Upstream"
        echo "keep-alive: nginx \`keepalive 1024\` per worker, HAProxy \`http-reuse always\`, sso-token-proxy its"
        echo "pool (up to 1024 connections). \`wrk -t1 -cN -d${DURATION}s --latency\`; the upstream is nginx with"
        echo "$UPSTREAM_WORKERS worker(s) answering \`200 \"ok\"\`. Everything measured runs at nice $BENCH_NICE."
        echo "Each figure is the median of $ROUNDS round(s) (\"req/s range\": lowest–highest); each round runs every"
        echo "target in turn, after a ${WARMUP}s warm-up at c=64, starting one target further each round."
        echo "\"added\" is the latency over direct at the same concurrency. \"CPU/req\" is user + system CPU"
        echo "time summed over all processes and threads of the proxy (for direct: the upstream's) divided by"
        echo "requests served; \"CPU %\" is that time as a share of one core (up to $((CORES * 100)) %), and"
        echo "\"wrk CPU %\" and \"upstream CPU %\" the same for the load generator and the upstream: all three"
        echo "share the $CORES cores, so a proxy that needs less CPU per request leaves more to the other two."
        echo "Memory is summed over the proxy's processes: RSS counts pages nginx's master and workers share"
        echo "once per process, PSS splits them; the targets use PSS. Each proxy (and the upstream) runs a"
        echo "binary file of its own, so that no other process measured shares its pages. \"idle\" right after start; then with"
        echo "$IDLE_CONNS keep-alive connections that each sent one request held open, before any load; \"under"
        echo "c=512\" at 90 % into the c=512 runs (median). sso-token-proxy's \`/metrics\` is scraped every"
        echo "${BENCH_SCRAPE_EVERY}s (0 = never), as Prometheus would."
        echo
        results_table default
        echo
        memory_table default
        for id in "${VARIANT_IDS[@]}"; do
            echo
            echo "Variant \`${V_LABEL[$id]}\`: binary \`${V_BIN[$id]#"$ROOT/"}\`, \`[proxy]\` keys \`${V_KEYS[$id]:-none}\`, environment \`${V_ENV[$id]:-none}\`."
            echo
            ratio_table default "$id"
            echo
            targets_list default "$id"
        done
        echo
    fi
    if [[ " $VIEWS " == *" pinned "* ]]; then
        echo "### Second view: one worker each, pinned to one core"
        echo
        echo "Each proxy pinned to core $CORE_PROXY with one worker (nginx \`worker_processes 1\`, HAProxy"
        echo "\`nbthread 1\`, sso-token-proxy \`TOKIO_WORKER_THREADS=1\`); wrk and the upstream share core"
        echo "$CORE_LOAD. A proxy at about 100 % of its core was the bottleneck, and its req/s is then one"
        echo "second divided by its CPU per request. Same rounds, medians and memory method as above."
        echo
        ratio_table pinned stp
        echo
        results_table pinned
        echo
        memory_table pinned
    fi
} >"$REPORT"

echo
cat "$REPORT"

if [[ "$SMOKE" != 1 && $failed == 0 && "${BENCH_NO_WRITE:-0}" != 1 ]]; then
    # Replace (or put first) only our own section; re-read the file right now.
    python3 - "$ROOT/BENCHMARKS.md" "$REPORT" <<'PY'
import os, re, sys
path, report = sys.argv[1], open(sys.argv[2]).read().rstrip("\n") + "\n"
heading = "## Proxy vs nginx and HAProxy"
text = open(path).read() if os.path.exists(path) else "# Benchmarks\n"
lines = text.splitlines(keepends=True)
start = next((i for i, l in enumerate(lines) if l.rstrip("\n") == heading), None)
if start is None:
    # After the title and its introduction, before the first section.
    first = next((j for j, l in enumerate(lines) if re.match(r"## ", l)), len(lines))
    head, tail = "".join(lines[:first]), "".join(lines[first:])
    text = head.rstrip("\n") + "\n\n" + report + ("\n" + tail if tail else "")
else:
    end = next((j for j in range(start + 1, len(lines)) if re.match(r"## ", lines[j])), len(lines))
    tail = "".join(lines[end:])
    text = "".join(lines[:start]) + report + ("\n" + tail if tail else "")
tmp = path + ".tmp"
open(tmp, "w").write(text)
os.replace(tmp, path)
PY
    log "wrote the section to BENCHMARKS.md"
fi

if [[ $failed != 0 ]]; then
    echo "FAILED: a target answered non-2xx, had socket errors, served nothing, exited, or could not hold its connections" >&2
    exit 1
fi
