#!/usr/bin/env bash
# The project's test command (README, "Set-up"): installs what the tests
# need when it is missing, then runs `cargo test` with any arguments given.
#
#   bash scripts/test.sh                      # everything
#   bash scripts/test.sh --test redis_store   # extra arguments go to cargo test
#
# Idempotent: what is present is left alone, so a second run only tests.
# Installing needs root or passwordless sudo (apt-get) and a reachable
# package registry; when that is impossible it stops with the command that
# fixes it. Environment:
#   TEST_SH_NO_INSTALL=1   only check; a missing tool is an error, never installed
set -euo pipefail
cd "$(dirname "$0")/.."

# What the tests need, one line each: "name|check|how to install", where the
# check is a shell command that succeeds when the tool is there and the
# install methods (apt:PACKAGE, pip:PACKAGE) are tried in order.
REQUIREMENTS=(
    "redis-server|type -P redis-server|apt:redis-server"
    "kill|type -P kill|apt:procps"
    "python3|type -P python3|apt:python3"
    "boto3|python3 -c 'import boto3'|pip:boto3 apt:python3-boto3"
    # The monitoring kit: promtool for the rule tests, prometheus for the
    # real-Prometheus alert test.
    "prometheus|type -P prometheus && type -P promtool|apt:prometheus"
)

log="$(mktemp)"
trap 'rm -f "$log"' EXIT
apt_updated=""

say() { printf 'test.sh: %s\n' "$*"; }

# Runs a command as root: directly, through passwordless sudo, or not at all
# (status 126).
as_root() {
    if [[ $EUID -eq 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        sudo -n "$@"
    else
        return 126
    fi
}

install_apt() {
    local package=$1
    command -v apt-get >/dev/null 2>&1 || return 1
    if [[ -z "$apt_updated" ]]; then
        as_root apt-get update -qq >>"$log" 2>&1 || return $?
        apt_updated=1
    fi
    as_root env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends "$package" >>"$log" 2>&1
}

install_pip() {
    local package=$1 user=()
    python3 -m pip --version >/dev/null 2>&1 || return 1
    # Outside a virtualenv a non-root user installs into ~/.local.
    if [[ $EUID -ne 0 && -z "${VIRTUAL_ENV:-}" ]]; then user=(--user); fi
    PIP_ROOT_USER_ACTION=ignore python3 -m pip install --quiet --disable-pip-version-check \
        "${user[@]}" "$package" >>"$log" 2>&1
}

# The command a person would run to install it by hand.
fix_command() {
    local how=$1
    case "$how" in
        apt:*) echo "sudo apt-get install ${how#apt:}" ;;
        pip:*) echo "python3 -m pip install ${how#pip:}" ;;
    esac
}

present=()

provision() {
    local name=$1 check=$2 methods=$3 how started fixes=() no_root=""
    if bash -c "$check" >/dev/null 2>&1; then
        present+=("$name")
        return 0
    fi
    for how in $methods; do
        fixes+=("$(fix_command "$how")")
    done
    if [[ -n "${TEST_SH_NO_INSTALL:-}" ]]; then
        say "$name is missing (TEST_SH_NO_INSTALL is set); install it with: ${fixes[0]}" >&2
        exit 1
    fi
    started=$SECONDS
    for how in $methods; do
        : >"$log"
        local rc=0
        case "$how" in
            apt:*) install_apt "${how#apt:}" || rc=$? ;;
            pip:*) install_pip "${how#pip:}" || rc=$? ;;
        esac
        if [[ $rc -eq 0 ]] && bash -c "$check" >/dev/null 2>&1; then
            say "installed $name (${how%%:*} ${how#*:}) in $((SECONDS - started))s"
            return 0
        fi
        [[ $rc -eq 126 ]] && no_root=1
    done
    if [[ -n "$no_root" ]]; then
        say "$name is missing and cannot be installed here (not root, and sudo is not available without a password)." >&2
    else
        say "$name is missing and installing it failed; last installer output:" >&2
        tail -n 15 "$log" | sed 's/^/    /' >&2
    fi
    say "install it with: $(printf '%s\n' "${fixes[@]}" | paste -sd'|' | sed 's/|/   or   /g'); then run bash scripts/test.sh again" >&2
    exit 1
}

for requirement in "${REQUIREMENTS[@]}"; do
    IFS='|' read -r name check methods <<<"$requirement"
    provision "$name" "$check" "$methods"
done

if [[ ${#present[@]} -gt 0 ]]; then
    say "present: ${present[*]}"
fi
rm -f "$log"
trap - EXIT
exec cargo test "$@"
