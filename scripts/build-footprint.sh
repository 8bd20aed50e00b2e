#!/usr/bin/env bash
# What depending on the crate costs, per Cargo feature set: crates in the
# dependency tree and a clean build's wall time, each from an empty target
# dir. Run on a quiet machine; the times mean nothing under other load.
#
#   scripts/build-footprint.sh            # debug builds (a dependent's `cargo build`)
#   PROFILE=release scripts/build-footprint.sh
#   scripts/build-footprint.sh layer      # one set only, by name
#
# CARGO_BUILD_JOBS is honoured (the default is all cores).
set -euo pipefail
cd "$(dirname "$0")/.."

profile=${PROFILE:-dev}
sets=(
    "layer|--no-default-features --features layer"
    "layer,redis|--no-default-features --features layer,redis"
    "emulator|--no-default-features --features emulator"
    "aws-iam|--no-default-features --features aws-iam"
    "proxy|--no-default-features --features proxy"
    "default (proxy, aws-iam)|"
)

# Fetch once, so the timings are compiling only.
cargo fetch --quiet

target=$(mktemp -d)
trap 'rm -rf "$target"' EXIT

rows=()
for entry in "${sets[@]}"; do
    name=${entry%%|*}
    flags=${entry#*|}
    [[ -n ${1:-} && $name != "$1" ]] && continue
    # shellcheck disable=SC2086 # $flags is a list of words
    crates=$(cargo tree -e normal,build $flags --prefix none -f '{p}' |
        sed -e 's/ (\*)$//' -e 's/ (proc-macro)$//' | sort -u | wc -l)
    rm -rf "$target"/*
    start=$(date +%s%N)
    # shellcheck disable=SC2086
    log=$(CARGO_TARGET_DIR=$target cargo build --color never --profile "$profile" --lib $flags 2>&1) ||
        { echo "$log"; exit 1; }
    end=$(date +%s%N)
    compiled=$(grep -c '^ *Compiling ' <<<"$log" || true)
    tenths=$(((end - start) / 100000000))
    rows+=("| $name | $crates | $compiled | $((tenths / 10)).$((tenths % 10)) s |")
done

echo "profile: $profile, jobs: ${CARGO_BUILD_JOBS:-$(nproc)}, $(rustc --version)"
echo
echo "| features | crates in tree (normal + build) | crates compiled | clean build |"
echo "|---|---|---|---|"
printf '%s\n' "${rows[@]}"
