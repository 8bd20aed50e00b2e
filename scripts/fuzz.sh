#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for a bounded time and summarises.
#
#   FUZZ_SECONDS=60 bash scripts/fuzz.sh
#
# Environment:
#   FUZZ_SECONDS        libFuzzer -max_total_time per target (default 60)
#   FUZZ_RSS_LIMIT_MB   libFuzzer -rss_limit_mb (default 2048)
#   FUZZ_INPUT_TIMEOUT  libFuzzer -timeout, seconds per input (default 10)
#   FUZZ_TARGETS        space-separated subset of targets (default: all)
#   FUZZ_FEATURES       cargo features of the fuzz crate (none needed today)
#   FUZZ_BUILD_SECONDS  bound on building the targets (default 2400)
#
# The seeds in fuzz/seeds/<target>/ are copied into a scratch corpus,
# fuzz/corpus/<target>/, which libFuzzer grows; the seeds stay as committed.
# Every new crash, leak, timeout or OOM input libFuzzer writes to
# fuzz/artifacts/<target>/ is copied to tests/fixtures/fuzz-regressions/<target>/,
# where `cargo test --test fuzz_regressions` replays it. Exits 1 if any target
# failed. Uses RUSTC_BOOTSTRAP=1 so that the stable toolchain accepts the
# sanitizer flags cargo fuzz passes.
set -uo pipefail

cd "$(dirname "$0")/.." || exit 2
ROOT=$(pwd)

SECONDS_PER_TARGET=${FUZZ_SECONDS:-60}
RSS_LIMIT_MB=${FUZZ_RSS_LIMIT_MB:-2048}
INPUT_TIMEOUT=${FUZZ_INPUT_TIMEOUT:-10}
BUILD_SECONDS=${FUZZ_BUILD_SECONDS:-2400}
ALL_TARGETS="config_parse sso_cache_parse oidc_error_decode oidc_response_decode request_target path_normalize"
TARGETS=${FUZZ_TARGETS:-$ALL_TARGETS}
FEATURE_ARGS=()
if [[ -n "${FUZZ_FEATURES:-}" ]]; then
    FEATURE_ARGS=(--features "$FUZZ_FEATURES")
fi
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz"
    cargo install cargo-fuzz --locked || exit 2
fi

LOG_DIR="$ROOT/fuzz/target/fuzz-logs"
mkdir -p "$LOG_DIR"

echo "== building fuzz targets (bounded to ${BUILD_SECONDS}s)"
if ! timeout --kill-after=30 "$BUILD_SECONDS" cargo fuzz build "${FEATURE_ARGS[@]}" >"$LOG_DIR/build.log" 2>&1; then
    tail -n 40 "$LOG_DIR/build.log"
    echo "fuzz build failed; see $LOG_DIR/build.log" >&2
    exit 2
fi

# Extracts "runs seconds" from a libFuzzer log: the final stats when printed,
# else the `#N DONE` / `Done N runs in S second(s)` lines, else the last
# `#N` status line.
runs_and_seconds() {
    local log=$1 runs secs
    runs=$(grep -a -o 'stat::number_of_executed_units: [0-9]*' "$log" | tail -n 1 | awk '{print $2}')
    [[ -z "$runs" ]] && runs=$(grep -a -E '^#[0-9]+[[:space:]]+DONE' "$log" | tail -n 1 | sed -E 's/^#([0-9]+).*/\1/')
    [[ -z "$runs" ]] && runs=$(grep -a -o -E 'Done [0-9]+ runs' "$log" | tail -n 1 | awk '{print $2}')
    [[ -z "$runs" ]] && runs=$(grep -a -E '^#[0-9]+' "$log" | tail -n 1 | sed -E 's/^#([0-9]+).*/\1/')
    secs=$(grep -a -o -E 'Done [0-9]+ runs in [0-9]+ second' "$log" | tail -n 1 | awk '{print $5}')
    echo "${runs:-0} ${secs:-}"
}

ROWS=()
DETAILS=()
FAILED=0

for target in $TARGETS; do
    seeds="$ROOT/fuzz/seeds/$target"
    corpus="$ROOT/fuzz/corpus/$target"
    artifacts="$ROOT/fuzz/artifacts/$target"
    regressions="$ROOT/tests/fixtures/fuzz-regressions/$target"
    log="$LOG_DIR/$target.log"
    mkdir -p "$corpus" "$artifacts"
    if [[ -d "$seeds" ]]; then
        cp -f "$seeds"/* "$corpus"/ 2>/dev/null || true
    fi
    before=$(ls -1 "$artifacts" 2>/dev/null | sort)

    # Rebuild now if the sources changed since the build above, so that the
    # timed run below is fuzzing, not compiling.
    if ! timeout --kill-after=30 "$BUILD_SECONDS" cargo fuzz build "${FEATURE_ARGS[@]}" "$target" >>"$LOG_DIR/build.log" 2>&1; then
        ROWS+=("| $target | - | - | - | - | - | build failed |")
        FAILED=1
        continue
    fi

    echo "== fuzzing $target for ${SECONDS_PER_TARGET}s"
    start=$(date +%s)
    # libFuzzer stops itself after -max_total_time; the outer timeout is only
    # a backstop (it signals the whole process group, fuzzer included) and
    # allows for one more rebuild should the sources change just now.
    timeout --kill-after=30 $((SECONDS_PER_TARGET + 120 + BUILD_SECONDS)) \
        cargo fuzz run "${FEATURE_ARGS[@]}" "$target" "$corpus" -- \
        -max_total_time="$SECONDS_PER_TARGET" \
        -rss_limit_mb="$RSS_LIMIT_MB" \
        -timeout="$INPUT_TIMEOUT" \
        -print_final_stats=1 \
        >"$log" 2>&1
    rc=$?
    wall=$(($(date +%s) - start))

    read -r runs secs <<<"$(runs_and_seconds "$log")"
    secs=${secs:-$wall}
    corpus_size=$(find "$corpus" -type f | wc -l)
    after=$(ls -1 "$artifacts" 2>/dev/null | sort)
    new=$(comm -13 <(echo "$before") <(echo "$after") | sed '/^$/d')
    crashes=0
    if [[ -n "$new" ]]; then
        mkdir -p "$regressions"
        while IFS= read -r name; do
            cp -f "$artifacts/$name" "$regressions/$name"
            crashes=$((crashes + 1))
            DETAILS+=("$target: $name -> tests/fixtures/fuzz-regressions/$target/$name")
        done <<<"$new"
    fi
    status=ok
    if [[ $rc -eq 124 || $rc -eq 137 ]]; then
        status="did not stop (killed)"
        FAILED=1
    elif [[ $crashes -gt 0 ]]; then
        status=CRASH
        FAILED=1
        # The panic message and location, for the report.
        while IFS= read -r line; do
            DETAILS+=("    $line")
        done < <(grep -a -E "panicked at|^thread '|ERROR: (libFuzzer|AddressSanitizer|LeakSanitizer)|SUMMARY:" "$log" | head -n 6)
    elif [[ $rc -ne 0 ]]; then
        status="error (exit $rc)"
        FAILED=1
        DETAILS+=("$target: cargo fuzz exited $rc without an artifact; see $log")
        tail -n 20 "$log" | sed 's/^/    /'
    fi
    ROWS+=("| $target | $secs | $runs | $((runs / (secs > 0 ? secs : 1))) | $corpus_size | $crashes | $status |")
done

echo
echo "Fuzzing: cargo fuzz (libFuzzer + AddressSanitizer), ${SECONDS_PER_TARGET}s per target, 1 job, $(nproc) cores," \
    "$(rustc --version | awk '{print $1, $2}'), $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet 2>/dev/null || echo '+dirty'), $(date -u +%Y-%m-%d)"
echo
echo "| target | seconds | runs | runs/s | corpus files | crashes | status |"
echo "| --- | ---: | ---: | ---: | ---: | ---: | --- |"
for row in "${ROWS[@]}"; do
    echo "$row"
done
if [[ ${#DETAILS[@]} -gt 0 ]]; then
    echo
    echo "Findings (logs in fuzz/target/fuzz-logs/):"
    for line in "${DETAILS[@]}"; do
        echo "$line"
    done
fi
exit "$FAILED"
