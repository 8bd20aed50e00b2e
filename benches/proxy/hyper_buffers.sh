#!/usr/bin/env bash
# What a hyper whose HTTP/1 connections start with smaller buffers would
# buy: builds sso-token-proxy against a scratch copy of the hyper release in
# Cargo.lock, with the initial read and header-write buffer size (hyper's
# `INIT_BUFFER_SIZE`, 8 KiB, for which neither builder has a setting) set to
# HYPER_INIT_BUFFER bytes (default 1024), and runs it beside the normal
# build in the same rounds of benches/proxy/run.sh (default view only,
# nothing written to BENCHMARKS.md).
#
#   bash benches/proxy/hyper_buffers.sh
#   HYPER_INIT_BUFFER=2048 bash benches/proxy/hyper_buffers.sh
#
# An experiment, not a build of the product: the copy lives under
# target/hyper-buffers/, the tree and Cargo.lock are untouched, and the
# release binary is built from the published crates as always.
set -euo pipefail

cd "$(git rev-parse --show-toplevel 2>/dev/null || pwd)"
ROOT="$PWD"
SIZE="${HYPER_INIT_BUFFER:-1024}"
VERSION="$(awk '/^name = "hyper"$/ {getline; gsub(/"/, "", $3); print $3; exit}' Cargo.lock)"
# The normal build (run.sh's, done here first) also puts hyper's source in
# the cargo registry.
cargo build --release --quiet
SRC="$(find "${CARGO_HOME:-$HOME/.cargo}/registry/src" -maxdepth 2 -type d -name "hyper-$VERSION" | head -1)"
[[ -n $SRC ]] || {
    echo "hyper $VERSION not found in the cargo registry" >&2
    exit 2
}

WORK="$ROOT/target/hyper-buffers"
rm -rf "$WORK/hyper"
mkdir -p "$WORK"
cp -r "$SRC" "$WORK/hyper"
# The initial size only; the smallest allowed `max_buf_size` stays 8 KiB.
IO="$WORK/hyper/src/proto/h1/io.rs"
grep -q '^pub(crate) const INIT_BUFFER_SIZE: usize = 8192;$' "$IO" || {
    echo "hyper $VERSION: INIT_BUFFER_SIZE is not where this script expects it" >&2
    exit 2
}
sed -i -e "s/^pub(crate) const INIT_BUFFER_SIZE: usize = 8192;\$/pub(crate) const INIT_BUFFER_SIZE: usize = $SIZE;/" \
    -e 's/^pub(crate) const MINIMUM_MAX_BUFFER_SIZE: usize = INIT_BUFFER_SIZE;$/pub(crate) const MINIMUM_MAX_BUFFER_SIZE: usize = 8192;/' "$IO"

echo "[hyper-buffers] building against hyper $VERSION with $SIZE-byte initial buffers" >&2
cp Cargo.lock "$WORK/Cargo.lock.orig"
CARGO_TARGET_DIR="$WORK/target" cargo build --release --quiet \
    --config "patch.crates-io.hyper.path=\"$WORK/hyper\""
cmp -s Cargo.lock "$WORK/Cargo.lock.orig" || cp "$WORK/Cargo.lock.orig" Cargo.lock
cp "$WORK/target/release/sso-token-proxy" "$WORK/sso-token-proxy-$SIZE"

VIEWS=default BENCH_NO_WRITE=1 \
    STP_VARIANTS="hyper-$SIZE|$WORK/sso-token-proxy-$SIZE||" \
    bash "$ROOT/benches/proxy/run.sh"
