#!/usr/bin/env bash
# The crate as a library: every documented feature set lints, builds and
# tests on its own; the layer-only build pulls in none of the binary's
# crates; the docs build without warnings; the package builds as published.
# `.ci/run` calls this; it needs the package registry reachable.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n--- %s ---\n' "$*"; }

# The feature sets the README documents, beside the default (`proxy`,
# `aws-iam`), which `.ci/run` tests with the plain `cargo test`.
feature_sets=(layer "layer,axum" "layer,redis" emulator "aws-iam,emulator")

for features in "${feature_sets[@]}"; do
    step "features: $features"
    cargo clippy --no-default-features --features "$features" --all-targets -- -D warnings
    cargo test --no-default-features --features "$features"
done

# The sidecar without AWS IAM support: lint only (its tests are the
# default's, less the IAM ones).
step "features: proxy (no aws-iam)"
cargo clippy --no-default-features --features proxy --all-targets -- -D warnings

step "features: all"
cargo clippy --all-features --all-targets -- -D warnings

step "layer-only dependency tree"
tree=$(cargo tree -e normal --no-default-features --features layer --prefix none -f '{p}')
# The binary's crates, and the TLS provider rustls must not have twice.
forbidden='^(axum|axum-core|clap|redis|toml|metrics-exporter-prometheus|tracing-subscriber|aws-lc-rs|aws-lc-sys) '
if grep -E "$forbidden" <<<"$tree"; then
    echo "the layer feature pulls in the crates above"
    exit 1
fi
# Tokio with what the library needs, none of `full`'s extras.
tokio_features=$(cargo tree -e normal --no-default-features --features layer -i tokio --depth 0 -f '{f}')
echo "tokio features: $tokio_features"
for extra in fs macros process rt-multi-thread signal; do
    if tr ',' '\n' <<<"$tokio_features" | grep -qx "$extra"; then
        echo "the layer feature enables tokio/$extra"
        exit 1
    fi
done
echo "crates in the layer-only tree: $(sed 's/ (\*)$//' <<<"$tree" | sort -u | wc -l)"

step "docs (-D warnings)"
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --all-features
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --no-default-features --features layer

step "package"
cargo package --list --allow-dirty >target/package-files.txt
echo "$(wc -l <target/package-files.txt) files in the package"
cargo publish --dry-run --allow-dirty
