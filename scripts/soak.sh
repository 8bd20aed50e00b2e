#!/usr/bin/env bash
# Bounded soak of the proxy under constant token rotation and injected
# CreateToken faults.
#
#   bash scripts/soak.sh                       # 300 s
#   SOAK_SECONDS=60 bash scripts/soak.sh       # shorter
#   SOAK_SCRAPE_EVERY=15 bash scripts/soak.sh  # also scrape /metrics every 15 s
#
# From the repository root. Starts, on 127.0.0.1 only:
#   * the SSO-OIDC emulator alone (`sso-token-proxy emulator --listen ...`),
#     its access tokens living SOAK_TOKEN_LIFETIME (4) seconds;
#   * the proxy against it (refresh_token source, rotation on, a state file,
#     refresh_before_expiry 2s), forwarding to the emulator's protected echo
#     resource, which answers 200 only for a live token it issued
#     (SOAK_UPSTREAM=nginx: a one-worker nginx `return 200` instead);
#   * wrk -c32 through the proxy for SOAK_SECONDS, after a warm-up;
#   * every SOAK_FAULT_EVERY (20) seconds, a burst of
#     ["SlowDown","SlowDown","InternalServer"] on CreateToken.
# Reports wrk's totals and non-2xx count, the emulator's CreateToken calls
# and errors by kind, and the proxy's RSS one fault cycle into the soak
# (the baseline) and at the end.
# Exits non-zero on any non-2xx or socket error, or RSS growth >= 10 %.
# Everything it started is stopped on exit.
set -euo pipefail

SOAK_SECONDS="${SOAK_SECONDS:-300}"
SOAK_CONNS="${SOAK_CONNS:-32}"
SOAK_TOKEN_LIFETIME="${SOAK_TOKEN_LIFETIME:-4}"
SOAK_FAULT_EVERY="${SOAK_FAULT_EVERY:-20}"
SOAK_SCRAPE_EVERY="${SOAK_SCRAPE_EVERY:-0}"
SOAK_UPSTREAM="${SOAK_UPSTREAM:-echo}"
SOAK_WARMUP="${SOAK_WARMUP:-10}"
MAX_RSS_GROWTH_PCT="${MAX_RSS_GROWTH_PCT:-10}"
BASE="${SOAK_PORT_BASE:-27080}"
P_EMU=$((BASE + 1))
P_PROXY=$((BASE + 2))
P_ADMIN=$((BASE + 3))
P_UP=$((BASE + 4))

cd "$(git rev-parse --show-toplevel 2>/dev/null || pwd)"
ROOT="$PWD"
[[ -f Cargo.toml ]] || {
    echo "run from the repository root" >&2
    exit 2
}
BIN="$PWD/target/release/sso-token-proxy"
log() { printf '[soak %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }

tools=(wrk=wrk curl=curl python3=python3)
[[ $SOAK_UPSTREAM != nginx ]] || tools+=(nginx=nginx-light)
source "$ROOT/benches/proxy/tools.sh"
install_missing "${tools[@]}"

log "cargo build --release"
cargo build --release --quiet

WORK="$(mktemp -d /tmp/stp-soak.XXXXXX)"
source "$ROOT/benches/proxy/common.sh"

require_free_ports SOAK_PORT_BASE "$P_EMU" "$P_PROXY" "$P_ADMIN" "$P_UP"

rss_kb() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }

# --- emulator --------------------------------------------------------------
"$BIN" emulator --listen "127.0.0.1:$P_EMU" >"$WORK/emulator.out" 2>"$WORK/emulator.log" &
PIDS+=($!)
read_emulator_client "$WORK/emulator.out" || exit 1
curl -sf -X POST "http://127.0.0.1:$P_EMU/_emulator/config" \
    -d "{\"access_token_lifetime_secs\": $SOAK_TOKEN_LIFETIME}" >/dev/null

# --- upstream --------------------------------------------------------------
if [[ $SOAK_UPSTREAM == nginx ]]; then
    write_nginx_upstream "$WORK/upstream.conf" "$P_UP"
    nginx -p "$WORK" -e stderr -c "$WORK/upstream.conf" >"$WORK/upstream.log" 2>&1 &
    PIDS+=($!)
    UPSTREAM="http://127.0.0.1:$P_UP"
    wait_http "$UPSTREAM/"
else
    UPSTREAM="http://127.0.0.1:$P_EMU"
fi

# --- proxy -----------------------------------------------------------------
cat >"$WORK/proxy.toml" <<EOF
[proxy]
listen = "127.0.0.1:$P_PROXY"
upstream = "$UPSTREAM"
[admin]
listen = "127.0.0.1:$P_ADMIN"
[oidc]
endpoint = "http://127.0.0.1:$P_EMU"
region = "us-east-1"
client_id = "$EMULATOR_CLIENT_ID"
client_secret = "$EMULATOR_CLIENT_SECRET"
[token]
source = "refresh_token"
refresh_token = "$EMULATOR_REFRESH_TOKEN"
state_file = "$WORK/state.json"
refresh_before_expiry = "2s"
expiry_margin = "500ms"
[retry]
max_attempts = 5
base_delay = "50ms"
max_delay = "500ms"
throttle_base_delay = "100ms"
throttle_max_delay = "1s"
EOF
RUST_LOG="${RUST_LOG:-warn}" "$BIN" --config "$WORK/proxy.toml" >"$WORK/proxy.log" 2>&1 &
PID_PROXY=$!
PIDS+=("$PID_PROXY")
wait_http "http://127.0.0.1:$P_ADMIN/readyz"
wait_http "http://127.0.0.1:$P_PROXY/soak"
RSS_LAUNCH=$(rss_kb "$PID_PROXY")

log "warm-up ${SOAK_WARMUP}s (wrk -c$SOAK_CONNS)"
wrk -t1 -c"$SOAK_CONNS" -d"${SOAK_WARMUP}s" "http://127.0.0.1:$P_PROXY/soak" >"$WORK/warmup.txt" 2>&1
RSS_START=$(rss_kb "$PID_PROXY")
COUNTERS_START="$(curl -sf "http://127.0.0.1:$P_EMU/_emulator/counters")"

# Fault bursts, RSS samples and (optionally) scrapes, until wrk is done.
(
    trap 'exit 0' TERM
    t=0
    while :; do
        sleep 1
        t=$((t + 1))
        if ((t % SOAK_FAULT_EVERY == 0)); then
            curl -sf -X POST "http://127.0.0.1:$P_EMU/_emulator/faults" \
                -d '{"operation":"CreateToken","faults":["SlowDown","SlowDown","InternalServer"]}' \
                >/dev/null && echo "$t" >>"$WORK/bursts" || echo "$t failed" >>"$WORK/bursts"
            echo "$t $(rss_kb "$PID_PROXY")" >>"$WORK/rss"
        fi
        if ((SOAK_SCRAPE_EVERY > 0 && t % SOAK_SCRAPE_EVERY == 0)); then
            curl -sf -o /dev/null "http://127.0.0.1:$P_ADMIN/metrics" || true
        fi
    done
) &
BG=$!
PIDS+=("$BG")

log "soak ${SOAK_SECONDS}s: wrk -t1 -c$SOAK_CONNS, tokens live ${SOAK_TOKEN_LIFETIME}s, fault burst every ${SOAK_FAULT_EVERY}s"
wrk -t1 -c"$SOAK_CONNS" -d"${SOAK_SECONDS}s" --latency "http://127.0.0.1:$P_PROXY/soak" >"$WORK/wrk.txt" 2>&1
kill -TERM "$BG" 2>/dev/null || true
wait "$BG" 2>/dev/null || true
RSS_END=$(rss_kb "$PID_PROXY")
COUNTERS_END="$(curl -sf "http://127.0.0.1:$P_EMU/_emulator/counters")"
METRICS="$(curl -sf "http://127.0.0.1:$P_ADMIN/metrics" || true)"

# --- report ----------------------------------------------------------------
TOTAL=$(awk '/requests in/ {print $1}' "$WORK/wrk.txt")
RPS=$(awk '/^Requests\/sec:/ {printf "%.0f", $2}' "$WORK/wrk.txt")
P99=$(awk '$1 == "99%" {print $2}' "$WORK/wrk.txt")
NON2XX=$(awk '/Non-2xx or 3xx responses:/ {print $NF}' "$WORK/wrk.txt")
NON2XX=${NON2XX:-0}
SOCKERR=$(awk '/Socket errors:/ {sub(/.*errors: /, ""); print}' "$WORK/wrk.txt")
# grep -c prints 0 and fails when no line is left; no file: no burst yet.
BURSTS=0
[[ -s $WORK/bursts ]] && BURSTS=$(grep -vc failed "$WORK/bursts" || true)
# The baseline is the first sample, one fault cycle into the soak: by then
# the connections, the pool and (when scraped) the metrics buffers have
# reached their working size, and the warm-up's peak is behind. A soak
# shorter than one fault cycle takes no sample: then the baseline is the
# figure after the warm-up.
RSS_BASE=""
[[ -s $WORK/rss ]] && RSS_BASE=$(awk 'NR == 1 {print $2}' "$WORK/rss")
RSS_BASE=${RSS_BASE:-$RSS_START}
GROWTH=$(awk -v a="$RSS_BASE" -v b="$RSS_END" 'BEGIN { printf "%.1f", (b - a) * 100 / a }')
summary="$(
    python3 - "$COUNTERS_START" "$COUNTERS_END" <<'PY'
import json, sys
a, b = json.loads(sys.argv[1]), json.loads(sys.argv[2])
calls = b["create_token"] - a["create_token"]
errs = {k: v - a.get("errors_by_kind", {}).get(k, 0) for k, v in b.get("errors_by_kind", {}).items()}
errs = {k: v for k, v in errs.items() if v}
print(f"CreateToken calls: {calls} (since launch: {b['create_token']})")
print("CreateToken errors by kind: " + (", ".join(f"{k} {v}" for k, v in sorted(errs.items())) or "none"))
print(f"tokens issued: {b['tokens_issued'] - a['tokens_issued']}")
print(f"echo resource: {b['echo_authorized'] - a['echo_authorized']} authorised, "
      f"{b['echo_unauthorized'] - a['echo_unauthorized']} refused (expired or unknown token)")
PY
)"
fetches="$(printf '%s\n' "$METRICS" | awk '/^sso_token_proxy_token_fetches_total/ {printf "%s%s", sep, $0; sep="; "}')"

echo
echo "Soak: ${SOAK_SECONDS}s, wrk -t1 -c$SOAK_CONNS through the proxy to the $SOAK_UPSTREAM upstream"
echo "  requests: $TOTAL ($RPS req/s, p99 $P99), non-2xx: $NON2XX${SOCKERR:+, socket errors: $SOCKERR}"
printf '%s\n' "$summary" | sed 's/^/  /'
echo "  fault bursts injected: $BURSTS x [SlowDown, SlowDown, InternalServer]"
echo "  proxy token fetches: ${fetches:-n/a}"
mb() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }
if [[ -s $WORK/rss ]]; then
    base="$(mb "$RSS_BASE") MB ${SOAK_FAULT_EVERY}s into the soak (baseline)"
else
    base="no sample within the soak (the warm-up figure is the baseline)"
fi
echo "  proxy RSS: $(mb "$RSS_LAUNCH") MB at launch, $(mb "$RSS_START") MB after the ${SOAK_WARMUP}s warm-up," \
    "$base, $(mb "$RSS_END") MB at the end: ${GROWTH} % growth" \
    "(limit ${MAX_RSS_GROWTH_PCT} %; /metrics scraped $([[ $SOAK_SCRAPE_EVERY -gt 0 ]] && echo "every ${SOAK_SCRAPE_EVERY}s" || echo never))"
if [[ -s $WORK/rss ]]; then
    echo "  RSS samples (s: kB): $(awk '{printf "%s%s: %s", sep, $1, $2; sep=", "}' "$WORK/rss")"
fi

fail=0
if [[ -z $TOTAL || $TOTAL == 0 ]]; then
    echo "FAIL: no requests served" >&2
    fail=1
fi
if [[ $NON2XX != 0 ]]; then
    echo "FAIL: $NON2XX non-2xx responses" >&2
    fail=1
fi
if [[ -n $SOCKERR ]]; then
    echo "FAIL: socket errors: $SOCKERR" >&2
    fail=1
fi
if awk -v g="$GROWTH" -v m="$MAX_RSS_GROWTH_PCT" 'BEGIN { exit !(g >= m) }'; then
    echo "FAIL: RSS grew ${GROWTH} % (>= ${MAX_RSS_GROWTH_PCT} %)" >&2
    fail=1
fi
if [[ $fail == 0 ]]; then
    echo "PASS"
fi
exit "$fail"
