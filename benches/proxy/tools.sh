# Shared by benches/proxy/run.sh, idle_rss.sh, callgrind.sh and
# sched_wait.sh, scripts/soak.sh and scripts/pgo-build.sh (sourced, not
# run): the Debian packages they need, installed when missing.

# Each argument is COMMAND=PACKAGE. A command counts as present when it is
# on PATH or in /usr/sbin (nginx and haproxy live there, outside a normal
# user's PATH). The missing ones' packages are installed with apt, through
# sudo unless root. Then /usr/sbin and /sbin are put on PATH.
install_missing() {
    local need=() pair cmd
    for pair in "$@"; do
        cmd=${pair%%=*}
        command -v "$cmd" >/dev/null || [[ -x /usr/sbin/$cmd ]] || [[ " ${need[*]} " == *" ${pair#*=} "* ]] ||
            need+=("${pair#*=}")
    done
    if ((${#need[@]})); then
        printf 'installing %s\n' "${need[*]}" >&2
        local sudo=()
        [[ $(id -u) == 0 ]] || sudo=(sudo)
        "${sudo[@]}" apt-get update -qq
        DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
    fi
    export PATH="$PATH:/usr/sbin:/sbin"
}
