#!/usr/bin/env bash
# Builds the sso-token-proxy binary with profile-guided optimisation (PGO):
# the release profile's build, laid out and inlined by LLVM after what a
# training run of the proxy actually executed.
#
#   bash scripts/pgo-build.sh                 # -> target/pgo/sso-token-proxy
#   PGO_OUT=/usr/local/bin/sso-token-proxy bash scripts/pgo-build.sh
#   PGO_TRAIN_SECONDS=5 bash scripts/pgo-build.sh   # longer training loads (default 2 s)
#
# From the repository root. What it does:
#
# 1. Finds the llvm-profdata of the toolchain's own LLVM (a raw profile is
#    read only by the LLVM that wrote it): rustup's `llvm-tools` component,
#    added when missing. The training tools (wrk, nginx, curl, h2load) are
#    installed with apt when missing, as benches/proxy/run.sh does.
#    (h2load for h2c: curl 7.88's parallel HTTP/2 transfers fail on one
#    connection with "Error in the HTTP2 framing layer", against nginx as
#    well.)
# 2. An instrumented release build (`-Cprofile-generate`) in target/pgo/gen.
# 3. Training, on loopback only, every load bounded in time: the
#    instrumented proxy with its default configuration, its token from the
#    SSO-OIDC emulator (`sso-token-proxy emulator`), in front of one nginx
#    worker. Requests: HTTP/1.1 GETs at 1 to 512 connections, POSTs with
#    1 KiB and 64 KiB bodies, 64 KiB responses, h2c from h2load, a few `401`s
#    (a refresh and a replay each), the admin endpoints. SIGTERM then stops
#    it gracefully, and it writes its profile on exit.
# 4. `llvm-profdata merge`, then the release build again with
#    `-Cprofile-use` in target/pgo/use, copied to PGO_OUT.
#
# The two builds keep target directories of their own, so neither
# invalidates target/release, and a second run rebuilds only what changed.
# The training exercises the code every deployment runs (the HTTP/1 and h2
# codecs, the pool, the token layer, the forwarder); paths it never runs are
# optimised for size, as LLVM treats code a profile calls cold. Numbers:
# BENCHMARKS.md, "Profile-guided build".
set -euo pipefail

cd "$(git rev-parse --show-toplevel 2>/dev/null || pwd)"
[[ -f Cargo.toml && -d benches/proxy ]] || {
    echo "run from the repository root" >&2
    exit 2
}
ROOT="$PWD"
OUT="${PGO_OUT:-$ROOT/target/pgo/sso-token-proxy}"
TRAIN_SECONDS="${PGO_TRAIN_SECONDS:-2}"
BASE="${PGO_PORT_BASE:-28180}"
PGO_DIR="$ROOT/target/pgo"

log() { printf '[pgo] %s\n' "$*" >&2; }

# --- tools -----------------------------------------------------------------
host="$(rustc -vV | awk '/^host:/ {print $2}')"
profdata="$(rustc --print sysroot)/lib/rustlib/$host/bin/llvm-profdata"
if [[ ! -x $profdata ]]; then
    log "rustup component add llvm-tools"
    rustup component add llvm-tools >/dev/null
fi
[[ -x $profdata ]] || {
    echo "no llvm-profdata at $profdata (rustup component add llvm-tools)" >&2
    exit 1
}
source "$ROOT/benches/proxy/tools.sh"
install_missing wrk=wrk nginx=nginx-light curl=curl h2load=nghttp2-client
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

# --- 2. instrumented build ---------------------------------------------------
raw="$PGO_DIR/raw"
rm -rf "$raw"
mkdir -p "$raw"
log "instrumented release build (target/pgo/gen)"
RUSTFLAGS="${RUSTFLAGS:-} -Cprofile-generate=$raw" \
    cargo build --release --locked --quiet --target-dir "$PGO_DIR/gen"
instrumented="$PGO_DIR/gen/release/sso-token-proxy"

# --- 3. training -------------------------------------------------------------
WORK="$(mktemp -d /tmp/stp-pgo.XXXXXX)"
source "$ROOT/benches/proxy/common.sh"
P_UP=$BASE P_PROXY=$((BASE + 1)) P_ADMIN=$((BASE + 2)) P_EMU=$((BASE + 3))
require_free_ports PGO_PORT_BASE "$P_UP" "$P_PROXY" "$P_ADMIN" "$P_EMU"

# The upstream: nginx's bench upstream plus a 64 KiB answer and a 401.
head -c 65536 /dev/zero | tr '\0' 'x' >"$WORK/large"
write_nginx_upstream "$WORK/upstream.conf" "$P_UP"
sed -i "s|location / { return 200 \"ok\"; }|&\n        location = /large { alias $WORK/large; }\n        location = /unauthorized { return 401; }|" "$WORK/upstream.conf"
grep -q 'location = /unauthorized' "$WORK/upstream.conf" || {
    echo "could not extend the upstream's config" >&2
    exit 1
}
nginx -c "$WORK/upstream.conf" -p "$WORK" >"$WORK/upstream.log" 2>&1 &
PIDS+=($!)

# The emulator runs from the instrumented binary too. Its process writes a
# profile of its own, merged below: a handful of token requests, next to
# the proxy's hundreds of thousands of proxied ones.
start_bench_emulator "$instrumented" "$P_EMU" "$WORK/emulator.log"
write_bench_proxy_config "$WORK/proxy.toml" "$P_PROXY" "$P_UP" "$P_ADMIN" "$WORK/emulator.log"
"$instrumented" --config "$WORK/proxy.toml" >"$WORK/proxy.log" 2>&1 &
proxy_pid=$!
PIDS+=("$proxy_pid")
wait_http "http://127.0.0.1:$P_UP/"
wait_http "http://127.0.0.1:$P_ADMIN/readyz"

url="http://127.0.0.1:$P_PROXY"
cat >"$WORK/post-small.lua" <<'LUA'
wrk.method = "POST"
wrk.body = string.rep("p", 1024)
wrk.headers["Content-Type"] = "application/octet-stream"
LUA
cat >"$WORK/post-large.lua" <<'LUA'
wrk.method = "POST"
wrk.body = string.rep("p", 65536)
wrk.headers["Content-Type"] = "application/octet-stream"
LUA
load() { # connections path [wrk args...]
    local c=$1 path=$2
    shift 2
    log "training: wrk -c$c ${*:-GET} $path"
    wrk -t1 -c"$c" -d"${TRAIN_SECONDS}s" "$@" "$url$path" >"$WORK/wrk.txt" 2>&1
    grep -q 'Requests/sec' "$WORK/wrk.txt" || {
        cat "$WORK/wrk.txt" >&2
        exit 1
    }
}
load 1 "/"
load 16 "/api/items?page=2"
load 64 "/"
load 512 "/v1/resource"
load 16 "/upload" -s "$WORK/post-small.lua"
load 4 "/upload" -s "$WORK/post-large.lua"
load 8 "/large"
log "training: h2c (h2load -c4 -m16), 401s, admin endpoints"
h2load -c4 -m16 -D"$TRAIN_SECONDS" "$url/h2/stream" >"$WORK/h2load.txt" 2>&1 || true
grep -Eq 'requests: .* [1-9][0-9]* succeeded' "$WORK/h2load.txt" || {
    cat "$WORK/h2load.txt" >&2
    exit 1
}
for _ in $(seq 5); do
    curl -sS -o /dev/null "$url/unauthorized"
done
for path in /metrics /healthz /readyz; do
    curl -sS -o /dev/null "http://127.0.0.1:$P_ADMIN$path"
done

# A graceful stop: the profile is written when the process exits.
kill -TERM "$proxy_pid" "$EMULATOR_PID"
wait "$proxy_pid" || true
wait "$EMULATOR_PID" || true
compgen -G "$raw/*.profraw" >/dev/null || {
    echo "the instrumented proxy wrote no profile in $raw" >&2
    exit 1
}

# --- 4. merge, optimised build -----------------------------------------------
"$profdata" merge -o "$PGO_DIR/merged.profdata" "$raw"
log "release build with the profile (target/pgo/use)"
RUSTFLAGS="${RUSTFLAGS:-} -Cprofile-use=$PGO_DIR/merged.profdata" \
    cargo build --release --locked --quiet --target-dir "$PGO_DIR/use"
mkdir -p "$(dirname "$OUT")"
install -m 0755 "$PGO_DIR/use/release/sso-token-proxy" "$OUT"
log "built $OUT"
