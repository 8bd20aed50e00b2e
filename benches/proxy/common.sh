# Shared by benches/proxy/run.sh, callgrind.sh and sched_wait.sh and
# scripts/soak.sh (sourced, not run). Callers set WORK (a scratch dir) and
# append the pids they start to PIDS.

PIDS=()

# On exit: SIGTERM everything started, SIGKILL what is still there after
# 5 s, show the tail of the logs when failing, remove the scratch dir.
cleanup() {
    local rc=$?
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null || true
    done
    if [[ $rc != 0 ]]; then
        for f in "$WORK"/*.log; do
            [[ -s $f ]] || continue
            echo "--- $f (last 20 lines)" >&2
            tail -n 20 "$f" >&2
        done
    fi
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Fails when any of the loopback ports is taken; $1 names the variable
# that moves them.
require_free_ports() {
    local knob=$1
    shift
    for port in "$@"; do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            echo "port $port is in use; set $knob" >&2
            exit 2
        fi
    done
}

# Waits (10 s at most) until `url` answers `expected-status` (default 200).
wait_http() { # url [expected-status]
    local url=$1 want=${2:-200}
    for _ in $(seq 100); do
        [[ $(curl -s -o /dev/null -w '%{http_code}' "$url" 2>/dev/null) == "$want" ]] && return 0
        sleep 0.1
    done
    echo "timed out waiting for $url" >&2
    return 1
}

# Writes the config of the upstream every run uses: one nginx worker
# answering 200 "ok" (and the Authorization header it got on /_auth).
write_nginx_upstream() { # conf-file port
    mkdir -p "$WORK/tmp"
    cat >"$1" <<CONF
worker_processes 1;
master_process off;
daemon off;
pid $WORK/upstream.pid;
error_log stderr error;
worker_rlimit_nofile 16384;
events { worker_connections 8192; }
http {
    access_log off;
    client_body_temp_path $WORK/tmp/body; proxy_temp_path $WORK/tmp/proxy; fastcgi_temp_path $WORK/tmp/fcgi;
    uwsgi_temp_path $WORK/tmp/uwsgi; scgi_temp_path $WORK/tmp/scgi;
    keepalive_requests 100000000;
    keepalive_timeout 120s;
    default_type text/plain;
    server {
        listen 127.0.0.1:$2 backlog=4096;
        location = /_auth { return 200 "\$http_authorization"; }
        location / { return 200 "ok"; }
    }
}
CONF
}

# Writes the config of nginx as the header-injecting reverse proxy it is
# compared with: the token and forwarding headers set, upstream keep-alive
# of 1024 connections per worker.
# NGINX_WORKER_CPU_AFFINITY (e.g. auto): nginx's worker_cpu_affinity,
# which is off unless set (as in nginx's own default).
write_nginx_proxy() { # conf-file workers pid-file listen-port upstream-port token
    mkdir -p "$WORK/tmp"
    cat >"$1" <<CONF
worker_processes $2;
${NGINX_WORKER_CPU_AFFINITY:+worker_cpu_affinity $NGINX_WORKER_CPU_AFFINITY;}
daemon off;
pid $3;
error_log stderr error;
worker_rlimit_nofile 16384;
events { worker_connections 8192; }
http {
    access_log off;
    client_body_temp_path $WORK/tmp/body; proxy_temp_path $WORK/tmp/proxy; fastcgi_temp_path $WORK/tmp/fcgi;
    uwsgi_temp_path $WORK/tmp/uwsgi; scgi_temp_path $WORK/tmp/scgi;
    keepalive_requests 100000000;
    keepalive_timeout 120s;
    upstream backend {
        server 127.0.0.1:$5;
        keepalive 1024;
        keepalive_requests 100000000;
        keepalive_timeout 120s;
    }
    server {
        listen 127.0.0.1:$4 backlog=4096;
        location / {
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Authorization "Bearer $6";
            proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto \$scheme;
            proxy_set_header X-Forwarded-Host \$http_host;
            proxy_set_header Via "1.1 nginx";
        }
    }
}
CONF
}

# Starts the SSO-OIDC emulator alone (`BINARY emulator`) on 127.0.0.1:PORT,
# in the background, what it prints in OUT-FILE; its pid in $EMULATOR_PID.
# The proxy measured gets its token from it, as a deployed proxy does from
# the real service in another process: the quick start's `[emulator]`
# inside the proxy's own process would add its code and heap (about 1 MB
# of PSS) to the proxy's memory figures. Where memory is measured, BINARY
# is a copy of its own (PSS splits pages shared with the proxy's file).
start_bench_emulator() { # binary port out-file
    "$1" emulator --listen "127.0.0.1:$2" >"$3" 2>&1 &
    EMULATOR_PID=$!
    PIDS+=("$EMULATOR_PID")
}

# Reads what a standalone emulator printed in OUT-FILE once it has printed
# it (up to 10 s): its URL and the client it registered, into
# EMULATOR_URL, EMULATOR_CLIENT_ID, EMULATOR_CLIENT_SECRET and
# EMULATOR_REFRESH_TOKEN. Fails, showing the output, if they are not there.
read_emulator_client() { # out-file
    for _ in $(seq 100); do
        grep -q '^  refresh token:' "$1" 2>/dev/null && break
        sleep 0.1
    done
    EMULATOR_URL="$(awk '/^SSO-OIDC emulator listening on / {print $NF}' "$1")"
    EMULATOR_CLIENT_ID="$(awk '/^  client id:/ {print $NF}' "$1")"
    EMULATOR_CLIENT_SECRET="$(awk '/^  client secret:/ {print $NF}' "$1")"
    EMULATOR_REFRESH_TOKEN="$(awk '/^  refresh token:/ {print $NF}' "$1")"
    if [[ -z $EMULATOR_URL || -z $EMULATOR_CLIENT_ID || -z $EMULATOR_CLIENT_SECRET || -z $EMULATOR_REFRESH_TOKEN ]]; then
        echo "could not read the SSO-OIDC emulator's URL, client and refresh token; its output:" >&2
        cat "$1" >&2
        return 1
    fi
}

# Writes the config of sso-token-proxy as benchmarked: the upstream above,
# its token from the emulator that wrote EMULATOR-OUT (start_bench_emulator;
# an hour-long token, so no refresh falls inside a run), every other
# setting at its default. Extra `[proxy]` keys (e.g.
# 'runtime = "thread_per_core"'), separated by `;`, may follow.
write_bench_proxy_config() { # conf-file proxy-port upstream-port admin-port emulator-out [proxy-keys]
    local extra=""
    [[ -z ${6:-} ]] || extra="$(tr ';' '\n' <<<"$6")"
    read_emulator_client "$5" || return 1
    cat >"$1" <<CONF
[proxy]
listen = "127.0.0.1:$2"
upstream = "http://127.0.0.1:$3"
$extra
[admin]
listen = "127.0.0.1:$4"
[oidc]
endpoint = "$EMULATOR_URL"
region = "us-east-1"
client_id = "$EMULATOR_CLIENT_ID"
client_secret = "$EMULATOR_CLIENT_SECRET"
[token]
source = "refresh_token"
refresh_token = "$EMULATOR_REFRESH_TOKEN"
refresh_before_expiry = "5m"
CONF
}

# A process and all its descendants (nginx's master and workers), one pid a
# line.
proc_tree() { # pid
    local pid=$1 child
    [[ -d /proc/$pid ]] || return 0
    echo "$pid"
    for child in $(cat /proc/"$pid"/task/*/children 2>/dev/null); do
        proc_tree "$child"
    done
}

# User and system CPU ticks (all threads) summed over a process tree.
tree_cpu_ticks() { # pid
    local u=0 s=0 pid fields
    for pid in $(proc_tree "$1"); do
        # Fields after the command name, which may hold spaces.
        fields="$(sed 's/.*) //' "/proc/$pid/stat" 2>/dev/null)" || continue
        read -r _ _ _ _ _ _ _ _ _ _ _ ut st _ <<<"$fields"
        u=$((u + ut)) s=$((s + st))
    done
    echo "$u $s"
}

# Resident and proportional set size in kB, summed over a process tree:
# RSS counts pages shared between processes (nginx's master and workers)
# once per process, PSS splits them. smaps_rollup needs ptrace access:
# sso-token-proxy is not dumpable (SECURITY.md row 16), so only root (as
# the benchmarks run, to install their tools) can read its figures.
tree_mem_kb() { # pid
    local r=0 p=0 pid rss pss
    for pid in $(proc_tree "$1"); do
        read -r rss pss < <(awk '/^Rss:/ {r = $2} /^Pss:/ {p = $2} END {print r + 0, p + 0}' \
            "/proc/$pid/smaps_rollup" 2>/dev/null || echo "0 0")
        r=$((r + rss)) p=$((p + pss))
    done
    echo "$r $p"
}
