#!/usr/bin/env bash
# sso-token-proxy against nginx and HAProxy as token-adding reverse proxies.
#
#   bash benches/proxy/run.sh                  # full run, writes BENCHMARKS.md
#   DURATION=20 bash benches/proxy/run.sh      # longer runs
#   ROUNDS=5 bash benches/proxy/run.sh         # medians over 5 rounds (default 3)
#   SMOKE=1 bash benches/proxy/run.sh          # CI: 1 round of 1 s runs, c=1 and c=64, no file write
#
# From the repository root. Loopback only (127.0.0.1), every load bounded by
# wrk's -d, every process this script starts is stopped on exit.
#
# Set-up (2-core machine): the three proxies are pinned to core 1 with one
# worker each (nginx worker_processes 1, HAProxy nbthread 1, tokio
# TOKIO_WORKER_THREADS=1); wrk (-t1) and the shared upstream (nginx
# `return 200 "ok"`, one worker) are pinned to core 0. All three proxies do
# the same work per request: set `Authorization: Bearer <token>`, add
# X-Forwarded-For/-Proto/-Host and Via, keep-alive to the upstream.
set -euo pipefail

SMOKE="${SMOKE:-0}"
if [[ "$SMOKE" == 1 ]]; then
    DURATION="${DURATION:-1}"
    CONNS=(1 64)
    WARMUP=1
    ROUNDS="${ROUNDS:-1}"
else
    DURATION="${DURATION:-10}"
    CONNS=(1 64 512)
    WARMUP=2
    ROUNDS="${ROUNDS:-3}"
fi
IDLE_CONNS="${IDLE_CONNS:-1000}"
BENCH_SCRAPE_EVERY="${BENCH_SCRAPE_EVERY:-5}"
BASE="${BENCH_PORT_BASE:-28080}"
P_UP=$((BASE + 1))
P_NGINX=$((BASE + 2))
P_HAPROXY=$((BASE + 3))
P_STP=$((BASE + 4))
P_ADMIN=$((BASE + 5))
P_EMU=$((BASE + 6))
CORE_LOAD="${CORE_LOAD:-0}"
CORE_PROXY="${CORE_PROXY:-1}"

cd "$(git rev-parse --show-toplevel 2>/dev/null || pwd)"
[[ -f Cargo.toml && -d benches/proxy ]] || {
    echo "run from the repository root" >&2
    exit 2
}
ROOT="$PWD"
BIN="$ROOT/target/release/sso-token-proxy"
HOLD="$ROOT/benches/proxy/hold_conns.py"

log() { printf '[bench] %s\n' "$*" >&2; }

# --- tools -----------------------------------------------------------------
need_install=()
command -v wrk >/dev/null || need_install+=(wrk)
command -v nginx >/dev/null || [[ -x /usr/sbin/nginx ]] || need_install+=(nginx-light)
command -v haproxy >/dev/null || [[ -x /usr/sbin/haproxy ]] || need_install+=(haproxy)
command -v taskset >/dev/null || need_install+=(util-linux)
command -v curl >/dev/null || need_install+=(curl)
command -v python3 >/dev/null || need_install+=(python3)
if ((${#need_install[@]})); then
    log "installing ${need_install[*]}"
    SUDO=()
    [[ $(id -u) == 0 ]] || SUDO=(sudo)
    "${SUDO[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${need_install[@]}" >/dev/null
fi
export PATH="$PATH:/usr/sbin:/sbin"

# Everything measured runs at the same raised priority (as root), so that
# other work on a shared machine disturbs it less; BENCH_NICE=0 to not.
prio=()
BENCH_NICE="${BENCH_NICE:-$([[ $(id -u) == 0 ]] && echo -10 || echo 0)}"
[[ $BENCH_NICE == 0 ]] || prio=(nice -n "$BENCH_NICE")
if [[ $(nproc) -lt 2 ]]; then
    log "fewer than 2 cores: no pinning"
    pin_load=("${prio[@]}")
    pin_proxy=("${prio[@]}")
else
    pin_load=("${prio[@]}" taskset -c "$CORE_LOAD")
    pin_proxy=("${prio[@]}" taskset -c "$CORE_PROXY")
fi

# 1000 idle connections plus load need descriptors.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

# --- build -----------------------------------------------------------------
log "cargo build --release"
cargo build --release --quiet

# --- processes -------------------------------------------------------------
WORK="$(mktemp -d /tmp/stp-bench.XXXXXX)"
source "$ROOT/benches/proxy/common.sh"

require_free_ports BENCH_PORT_BASE "$P_UP" "$P_NGINX" "$P_HAPROXY" "$P_STP" "$P_ADMIN" "$P_EMU"


# A static token as long as the emulator's, for nginx and HAProxy.
STATIC_TOKEN="$(python3 -c 'import secrets; print(secrets.token_urlsafe(96))')"
NGINX_TEMP="client_body_temp_path $WORK/tmp/body; proxy_temp_path $WORK/tmp/proxy; fastcgi_temp_path $WORK/tmp/fcgi; uwsgi_temp_path $WORK/tmp/uwsgi; scgi_temp_path $WORK/tmp/scgi;"
mkdir -p "$WORK/tmp"

write_nginx_upstream "$WORK/upstream.conf" "$P_UP"

cat >"$WORK/nginx.conf" <<EOF
worker_processes 1;
master_process off;
daemon off;
pid $WORK/nginx.pid;
error_log stderr error;
worker_rlimit_nofile 16384;
events { worker_connections 8192; }
http {
    access_log off;
    $NGINX_TEMP
    keepalive_requests 100000000;
    keepalive_timeout 120s;
    upstream backend {
        server 127.0.0.1:$P_UP;
        keepalive 64;
        keepalive_requests 100000000;
    }
    server {
        listen 127.0.0.1:$P_NGINX backlog=4096;
        location / {
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Authorization "Bearer $STATIC_TOKEN";
            proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto \$scheme;
            proxy_set_header X-Forwarded-Host \$http_host;
            proxy_set_header Via "1.1 nginx";
        }
    }
}
EOF

cat >"$WORK/haproxy.cfg" <<EOF
global
    nbthread 1
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
    bind 127.0.0.1:$P_HAPROXY
    option forwardfor
    http-request set-header Authorization "Bearer $STATIC_TOKEN"
    http-request set-header X-Forwarded-Proto http
    http-request set-header X-Forwarded-Host %[req.hdr(host)]
    http-request add-header Via "1.1 haproxy"
    default_backend be
backend be
    server up 127.0.0.1:$P_UP
EOF

write_bench_proxy_config "$WORK/stp.toml" "$P_STP" "$P_UP" "$P_ADMIN" "$P_EMU"

log "starting upstream, nginx, haproxy, sso-token-proxy"
"${pin_load[@]}" nginx -p "$WORK" -e stderr -c "$WORK/upstream.conf" >"$WORK/upstream.log" 2>&1 &
PIDS+=($!)
PID_UP=$!
"${pin_proxy[@]}" nginx -p "$WORK" -e stderr -c "$WORK/nginx.conf" >"$WORK/nginx.log" 2>&1 &
PIDS+=($!)
PID_NGINX=$!
"${pin_proxy[@]}" haproxy -db -f "$WORK/haproxy.cfg" >"$WORK/haproxy.log" 2>&1 &
PIDS+=($!)
PID_HAPROXY=$!
TOKIO_WORKER_THREADS=1 RUST_LOG="${RUST_LOG:-info}" "${pin_proxy[@]}" "$BIN" --config "$WORK/stp.toml" >"$WORK/stp.log" 2>&1 &
PIDS+=($!)
PID_STP=$!

wait_http "http://127.0.0.1:$P_UP/"
wait_http "http://127.0.0.1:$P_ADMIN/readyz"

rss_kb() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }
# User and system CPU ticks of a process.
cpu_ticks() { awk '{print $14, $15}' "/proc/$1/stat"; }
mb() { awk -v kb="$1" 'BEGIN { printf "%.1f", kb / 1024 }'; }

declare -A NAME=([direct]="direct (no proxy)" [nginx]="nginx $(nginx -v 2>&1 | sed 's|.*nginx/||')" \
    [haproxy]="HAProxy $(haproxy -v | awk 'NR==1 {print $3}')" [stp]="sso-token-proxy")
declare -A PORT=([direct]=$P_UP [nginx]=$P_NGINX [haproxy]=$P_HAPROXY [stp]=$P_STP)
declare -A PID=([direct]=$PID_UP [nginx]=$PID_NGINX [haproxy]=$PID_HAPROXY [stp]=$PID_STP)
TARGETS=(direct nginx haproxy stp)
PROXIES=(nginx haproxy stp)

# Each proxy must answer 200 and hand the upstream a bearer token.
for t in "${PROXIES[@]}"; do
    wait_http "http://127.0.0.1:${PORT[$t]}/"
    auth="$(curl -s "http://127.0.0.1:${PORT[$t]}/_auth")"
    if [[ "$auth" != "Bearer "?* ]]; then
        echo "${NAME[$t]} did not send a bearer token upstream" >&2
        exit 1
    fi
done

LOAD_START="$(cut -d' ' -f1-3 /proc/loadavg)"
declare -A RSS_IDLE RSS_LOAD RSS_1K RPS P50 P99 CPU USR SYS UTIL NON2XX ERRS
for t in "${PROXIES[@]}"; do RSS_IDLE[$t]=$(rss_kb "${PID[$t]}"); done

# sso-token-proxy's /metrics is scraped every BENCH_SCRAPE_EVERY seconds, as
# Prometheus would: the exporter keeps histogram samples until a scrape (or
# an upkeep) drains them, which would otherwise count in its RSS.
if ((BENCH_SCRAPE_EVERY > 0)); then
    (
        trap 'exit 0' TERM
        while sleep "$BENCH_SCRAPE_EVERY"; do
            curl -s -o /dev/null "http://127.0.0.1:$P_ADMIN/metrics" || true
        done
    ) &
    PIDS+=($!)
fi

# wrk latency ("68.00us", "1.23ms", "1.01s") in microseconds.
to_us() {
    awk -v v="$1" 'BEGIN {
        n = v + 0
        if (v ~ /us$/) m = 1; else if (v ~ /ms$/) m = 1000; else if (v ~ /m$/) m = 60000000; else m = 1000000
        printf "%.0f", n * m
    }'
}

run_wrk() { # target conns duration outfile
    local t=$1 c=$2 d=$3 out=$4
    "${pin_load[@]}" wrk -t1 -c"$c" -d"${d}s" --latency "http://127.0.0.1:${PORT[$t]}/" >"$out" 2>&1
}

failed=0
# Memory with IDLE_CONNS keep-alive connections held open, on the fresh
# processes (before the load runs, whose upstream pools and allocator
# high-water marks would otherwise be counted too).
for t in "${PROXIES[@]}"; do
    ready="$WORK/hold-$t.ready"
    python3 "$HOLD" "${PORT[$t]}" "$IDLE_CONNS" "$ready" 30 >"$WORK/hold-$t.log" 2>&1 &
    hold_pid=$!
    PIDS+=("$hold_pid")
    for _ in $(seq 300); do
        [[ -f $ready ]] && break
        kill -0 "$hold_pid" 2>/dev/null || break
        sleep 0.1
    done
    if [[ ! -f $ready ]] || [[ $(awk '{print $3}' "$ready") != 0 ]]; then
        echo "${NAME[$t]}: could not hold $IDLE_CONNS connections" >&2
        cat "$WORK/hold-$t.log" "$ready" >&2 2>/dev/null || true
        failed=1
    fi
    sleep 1
    RSS_1K[$t]=$(rss_kb "${PID[$t]}")
    kill "$hold_pid" 2>/dev/null || true
    wait "$hold_pid" 2>/dev/null || true
    log "${NAME[$t]}: RSS with $IDLE_CONNS idle keep-alive connections: $(mb "${RSS_1K[$t]}") MB"
done

# Per round, every target in turn (so that load which comes and goes on a
# shared machine falls on all of them); the report takes each figure's
# median over the rounds.
median() { printf '%s\n' "$@" | sort -g | awk '{v[NR] = $1} END { if (NR == 0) print ""; else if (NR % 2) print v[(NR + 1) / 2]; else printf "%.1f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
declare -A R_RPS R_P50 R_P99 R_CPU R_USR R_SYS R_UTIL R_RSS
for round in $(seq "$ROUNDS"); do
    for t in "${TARGETS[@]}"; do
        log "round $round/$ROUNDS, ${NAME[$t]}: warm-up ${WARMUP}s"
        run_wrk "$t" 64 "$WARMUP" "$WORK/warm.txt"
        for c in "${CONNS[@]}"; do
            out="$WORK/wrk-$t-$c-$round.txt"
            k="$t/$c"
            read -r u0 s0 < <(cpu_ticks "${PID[$t]}")
            if [[ $c == 512 && $t != direct ]]; then
                run_wrk "$t" "$c" "$DURATION" "$out" &
                wrk_pid=$!
                PIDS+=("$wrk_pid")
                sleep "$(awk -v d="$DURATION" 'BEGIN { print d * 0.9 }')"
                R_RSS[$k]+=" $(rss_kb "${PID[$t]}")"
                wait "$wrk_pid"
            else
                run_wrk "$t" "$c" "$DURATION" "$out"
            fi
            read -r u1 s1 < <(cpu_ticks "${PID[$t]}")
            t0=$((u0 + s0)) t1=$((u1 + s1))
            rps=$(awk '/^Requests\/sec:/ {printf "%.0f", $2}' "$out")
            p50=$(to_us "$(awk '$1 == "50%" {print $2}' "$out")")
            p99=$(to_us "$(awk '$1 == "99%" {print $2}' "$out")")
            non2xx=$(awk '/Non-2xx or 3xx responses:/ {print $NF}' "$out")
            errs=$(awk '/Socket errors:/ {sub(/.*errors: /, ""); print}' "$out")
            total=$(awk '/requests in/ {print $1}' "$out")
            # CPU time the proxy (or, for direct, the upstream) spent per request.
            cpu=$(awk -v d=$((t1 - t0)) -v hz="$(getconf CLK_TCK)" -v n="${total:-0}" \
                'BEGIN { if (n > 0) printf "%.1f", d / hz * 1e6 / n; else print 0 }')
            usr=$(awk -v d=$((u1 - u0)) -v hz="$(getconf CLK_TCK)" -v n="${total:-0}" \
                'BEGIN { if (n > 0) printf "%.1f", d / hz * 1e6 / n; else print 0 }')
            sys=$(awk -v d=$((s1 - s0)) -v hz="$(getconf CLK_TCK)" -v n="${total:-0}" \
                'BEGIN { if (n > 0) printf "%.1f", d / hz * 1e6 / n; else print 0 }')
            util=$(awk -v d=$((t1 - t0)) -v hz="$(getconf CLK_TCK)" -v s="$DURATION" \
                'BEGIN { printf "%.0f", d / hz * 100 / s }')
            R_RPS[$k]+=" ${rps:-0}" R_P50[$k]+=" $p50" R_P99[$k]+=" $p99" R_CPU[$k]+=" $cpu" R_UTIL[$k]+=" $util"
            R_USR[$k]+=" $usr" R_SYS[$k]+=" $sys"
            NON2XX[$k]=$((${NON2XX[$k]:-0} + ${non2xx:-0}))
            [[ -z $errs ]] || ERRS[$k]="${ERRS[$k]:+${ERRS[$k]}; }$errs"
            log "$(printf '%-8s c=%-4s %8s req/s  p50 %6s us  p99 %7s us  cpu %5s us/req (%s %%)  non-2xx %s%s' \
                "$t" "$c" "$rps" "$p50" "$p99" "$cpu" "$util" "${non2xx:-0}" "${errs:+  socket errors: $errs}")"
            if [[ -z $rps || $rps == 0 || ${non2xx:-0} != 0 ]]; then
                echo "${NAME[$t]} at c=$c: non-2xx responses or no requests" >&2
                cat "$out" >&2
                failed=1
            fi
        done
    done
done
for t in "${TARGETS[@]}"; do
    for c in "${CONNS[@]}"; do
        k="$t/$c"
        # shellcheck disable=SC2086 # word splitting of the per-round lists is intended
        RPS[$k]=$(median ${R_RPS[$k]}) P50[$k]=$(median ${R_P50[$k]}) P99[$k]=$(median ${R_P99[$k]})
        # shellcheck disable=SC2086
        CPU[$k]=$(median ${R_CPU[$k]}) UTIL[$k]=$(median ${R_UTIL[$k]})
        # shellcheck disable=SC2086
        USR[$k]=$(median ${R_USR[$k]}) SYS[$k]=$(median ${R_SYS[$k]})
        # shellcheck disable=SC2086
        [[ -z ${R_RSS[$k]:-} ]] || RSS_LOAD[$t]=$(median ${R_RSS[$k]})
    done
done

# --- report ----------------------------------------------------------------
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }'; }
added() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%+d", a - b }'; }
verdict() { awk -v v="$1" -v op="$2" -v lim="$3" 'BEGIN {
    ok = (op == ">=") ? (v >= lim) : (v <= lim); print ok ? "**met**" : "**not met**" }'; }

CPU_MODEL="$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)"
CMD="bash benches/proxy/run.sh"
[[ "$SMOKE" == 1 ]] && CMD="SMOKE=1 $CMD"
[[ "$DURATION" != 10 && "$SMOKE" != 1 ]] && CMD="DURATION=$DURATION $CMD"
[[ "$ROUNDS" != 3 && "$SMOKE" != 1 ]] && CMD="ROUNDS=$ROUNDS $CMD"
REPORT="$WORK/report.md"
{
    echo "## Proxy vs nginx and HAProxy"
    echo
    echo "Command: \`$CMD\` (from the repository root; writes this section)."
    echo "Date: $(date -u '+%Y-%m-%d %H:%M UTC'). Machine: $(nproc) cores, ${CPU_MODEL:-unknown CPU}, $(uname -sr)."
    echo "Tools: $(wrk -v 2>&1 | head -1 | awk '{print $1, $2}'), ${NAME[nginx]}, ${NAME[haproxy]}, sso-token-proxy $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet HEAD -- src 2>/dev/null || echo ' + uncommitted changes')."
    echo
    echo "Set-up: each proxy pinned to core $CORE_PROXY with one worker (nginx \`worker_processes 1\`,"
    echo "HAProxy \`nbthread 1\`, sso-token-proxy \`TOKIO_WORKER_THREADS=1\`, \`RUST_LOG=${RUST_LOG:-info}\`);"
    echo "\`wrk -t1 -cN -d${DURATION}s --latency\` and the upstream (nginx, one worker, \`return 200 \"ok\"\`)"
    echo "share core $CORE_LOAD; everything measured runs at nice ${BENCH_NICE}. All proxies set"
    echo "\`Authorization: Bearer …\`, add X-Forwarded-For/-Proto/-Host and Via, and keep connections alive"
    echo "both ways (nginx \`keepalive 64\`, HAProxy \`http-reuse always\`, sso-token-proxy its upstream pool)."
    echo "sso-token-proxy's token comes from its built-in emulator (\`[emulator]\`, in the same process and"
    echo "counted in its RSS); nginx and HAProxy send a static token of the same length. \"added\" is the"
    echo "latency over direct at the same concurrency; \"CPU/req\" is the proxy's user+system CPU time divided"
    echo "by requests served, split into user space (\"user\") and kernel (\"sys\"), and \"CPU %\" its share of"
    echo "one core during the run (for direct: the upstream's)."
    echo "A proxy well below 100 % was not the bottleneck: core $CORE_LOAD (wrk + upstream) or other load on"
    echo "the machine was, and CPU/req is then the fairer comparison. Load average before the first run"
    echo "(other work on this shared machine): $LOAD_START. Each figure is the median of $ROUNDS round(s);"
    echo "each round runs every target in turn, after a ${WARMUP}s warm-up at c=64."
    echo
    echo "Memory: VmRSS of the one process of each proxy; \"idle\" right after start, then with $IDLE_CONNS"
    echo "keep-alive connections that each sent one request (sequentially) held open, both before any load;"
    echo "\"under load\" at 90 % into the c=512 runs (median). sso-token-proxy's \`/metrics\` is scraped every"
    echo "${BENCH_SCRAPE_EVERY}s during the whole run (0 = never), as Prometheus would; see \"Soak\" for why."
    echo "At c=1 every request crosses cores four times (wrk and upstream on core $CORE_LOAD, the proxy on"
    echo "core $CORE_PROXY); on this VM those wake-ups dominate latency and CPU/req for every proxy alike."
    echo
    echo "| target | conns | req/s | p50 µs | p99 µs | added p50 µs | added p99 µs | CPU/req µs | user µs | sys µs | CPU % |"
    echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    for t in "${TARGETS[@]}"; do
        for c in "${CONNS[@]}"; do
            k="$t/$c"
            if [[ $t == direct ]]; then a50="–"; a99="–"; else
                a50=$(added "${P50[$k]}" "${P50[direct/$c]}")
                a99=$(added "${P99[$k]}" "${P99[direct/$c]}")
            fi
            echo "| ${NAME[$t]} | $c | ${RPS[$k]} | ${P50[$k]} | ${P99[$k]} | $a50 | $a99 | ${CPU[$k]} | ${USR[$k]} | ${SYS[$k]} | ${UTIL[$k]} |"
        done
    done
    echo
    echo "| proxy | RSS idle MB | RSS with $IDLE_CONNS idle keep-alive conns MB | RSS under c=512 load MB |"
    echo "|---|---:|---:|---:|"
    for t in "${PROXIES[@]}"; do
        load="n/a"
        [[ -z ${RSS_LOAD[$t]:-} ]] || load=$(mb "${RSS_LOAD[$t]}")
        echo "| ${NAME[$t]} | $(mb "${RSS_IDLE[$t]}") | $(mb "${RSS_1K[$t]}") | $load |"
    done
    echo
    r_rps_n=$(ratio "${RPS[stp/64]}" "${RPS[nginx/64]}")
    r_rps_h=$(ratio "${RPS[stp/64]}" "${RPS[haproxy/64]}")
    r_p99_n=$(ratio "${P99[stp/64]}" "${P99[nginx/64]}")
    r_p99_h=$(ratio "${P99[stp/64]}" "${P99[haproxy/64]}")
    r_cpu_n=$(ratio "${CPU[stp/64]}" "${CPU[nginx/64]}")
    r_cpu_h=$(ratio "${CPU[stp/64]}" "${CPU[haproxy/64]}")
    rss_mb=$(mb "${RSS_1K[stp]}")
    echo "At 64 connections sso-token-proxy serves **${r_rps_n}×** nginx's req/s and **${r_rps_h}×** HAProxy's;"
    echo "its p99 is **${r_p99_n}×** nginx's and **${r_p99_h}×** HAProxy's; it spends ${r_cpu_n}× nginx's and"
    echo "${r_cpu_h}× HAProxy's CPU per request: ${USR[stp/64]} µs user + ${SYS[stp/64]} µs sys against nginx's"
    echo "${USR[nginx/64]} µs + ${SYS[nginx/64]} µs."
    echo
    echo "- Target req/s ≥ 1.1× nginx at c=64: ${r_rps_n}× — $(verdict "$r_rps_n" '>=' 1.1)."
    echo "- Target p99 ≤ 1.2× nginx's at c=64: ${r_p99_n}× — $(verdict "$r_p99_n" '<=' 1.2)."
    echo "- Target RSS ≤ 40 MB with $IDLE_CONNS idle keep-alive connections: ${rss_mb} MB — $(verdict "$rss_mb" '<=' 40)."
} >"$REPORT"

echo
cat "$REPORT"

if [[ "$SMOKE" != 1 && $failed == 0 && "${BENCH_NO_WRITE:-0}" != 1 ]]; then
    # Replace (or append) only our own section; re-read the file right now.
    python3 - "$ROOT/BENCHMARKS.md" "$REPORT" <<'PY'
import os, re, sys
path, report = sys.argv[1], open(sys.argv[2]).read().rstrip("\n") + "\n"
heading = "## Proxy vs nginx and HAProxy"
text = open(path).read() if os.path.exists(path) else "# Benchmarks\n"
lines = text.splitlines(keepends=True)
start = next((i for i, l in enumerate(lines) if l.rstrip("\n") == heading), None)
if start is None:
    text = text.rstrip("\n") + "\n\n" + report
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
    echo "FAILED: a target answered non-2xx, served nothing, or could not hold its connections" >&2
    exit 1
fi
