#!/usr/bin/env bash
# nchan peer of the wsbridge benchmark: one nginx + nchan instance, Redis-backed, 1 worker.
# Everything the instance writes (config, pid file, error log, temp paths) lives in DIR;
# nothing under /etc/nginx or /var is used. nginx and libnginx-mod-nchan are installed with
# apt-get when missing (needs root; `apt-get update` runs once, before the install).
#
#   run.sh install
#       Only install nginx + libnginx-mod-nchan (if missing).
#   run.sh start DIR PORT [REDIS_URL]
#       Writes DIR/nginx.conf, starts nginx in daemon mode (run.sh returns), waits until it
#       answers /healthz and a publish reaches Redis, then prints on stdout:
#           listening port=PORT master=MASTER_PID worker=WORKER_PID
#       REDIS_URL defaults to redis://127.0.0.1:6379.
#   run.sh fg DIR PORT [REDIS_URL]
#       Same config, but exec's nginx in the foreground (`daemon off`): the caller's child
#       *is* the master; stop it with SIGTERM (or SIGQUIT for a graceful stop). Prints nothing.
#   run.sh pids DIR
#       Prints `master=PID worker=PID` (worker = the master's only child, `pgrep -P MASTER`).
#   run.sh stop DIR
#       SIGTERM to the master from DIR/nginx.pid, waits up to 10 s for it to exit
#       (SIGKILL to master and workers after that).
#
# Measure CPU/RSS from /proc/MASTER/stat and /proc/WORKER/stat (the worker does all the work).
#
# Protocol:  subscriber  ws://127.0.0.1:PORT/sub/<channel>   (each message: one frame, the
#                                                              published body as is)
#            publisher   POST http://127.0.0.1:PORT/pub/<channel>  body = message  (-> 201/202)
#            health      GET  http://127.0.0.1:PORT/healthz  -> 200
# New subscribers get only messages published after they subscribed
# (nchan_subscriber_first_message newest).
#
# Env: NCHAN_MODULE (path of ngx_nchan_module.so), NCHAN_WORKER_CONNECTIONS (default: the
# open-files hard limit minus 64), NCHAN_START_TIMEOUT (seconds, default 20).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
template="$here/nginx.conf.template"

die() { echo "run.sh: $*" >&2; exit 1; }

find_module() {
    if [[ -n "${NCHAN_MODULE:-}" ]]; then echo "$NCHAN_MODULE"; return; fi
    local m
    for m in /usr/lib/nginx/modules/ngx_nchan_module.so \
             /usr/share/nginx/modules/ngx_nchan_module.so \
             /usr/lib64/nginx/modules/ngx_nchan_module.so; do
        if [[ -f "$m" ]]; then echo "$m"; return; fi
    done
    m="$(dpkg -L libnginx-mod-nchan 2>/dev/null | grep 'ngx_nchan_module\.so$' | head -n1 || true)"
    [[ -n "$m" ]] && echo "$m"
}

install_deps() {
    if command -v nginx >/dev/null 2>&1 && [[ -n "$(find_module)" ]]; then return; fi
    [[ $EUID -eq 0 ]] || die "nginx/nchan missing and not root: apt-get install nginx libnginx-mod-nchan"
    echo "run.sh: installing nginx libnginx-mod-nchan" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    # The packages' postinst may try to start the system nginx on :80; that's harmless here
    # (no init system in containers) and this script never uses it.
    apt-get install -y -qq --no-install-recommends nginx libnginx-mod-nchan >&2
    command -v nginx >/dev/null 2>&1 || die "nginx still missing after apt-get install"
    [[ -n "$(find_module)" ]] || die "ngx_nchan_module.so not found after apt-get install"
}

write_config() { # DIR PORT REDIS DAEMON
    local dir="$1" port="$2" redis="$3" daemon="$4"
    [[ "$port" =~ ^[0-9]+$ ]] || die "bad port: $port"
    [[ -f "$template" ]] || die "missing $template"
    local module; module="$(find_module)"
    [[ -n "$module" ]] || die "ngx_nchan_module.so not found"
    # nchan's redis URL parser accepts redis://[:pass@]host:port[/db]; strip a trailing slash.
    redis="${redis%/}"
    mkdir -p "$dir/tmp"
    # Raise the soft open-files limit to the hard one; nginx's worker gets the same.
    ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
    local nofile; nofile="$(ulimit -n)"
    [[ "$nofile" == unlimited ]] && nofile=1048576
    local conns="${NCHAN_WORKER_CONNECTIONS:-$((nofile - 64))}"
    local user_line="# (not root: nginx keeps the current user)"
    [[ $EUID -eq 0 ]] && user_line="user root;"
    sed -e "s|@DIR@|$dir|g" -e "s|@PORT@|$port|g" -e "s|@REDIS@|$redis|g" \
        -e "s|@MODULE@|$module|g" -e "s|@USER_LINE@|$user_line|g" -e "s|@DAEMON@|$daemon|g" \
        -e "s|@NOFILE@|$nofile|g" -e "s|@WORKER_CONNECTIONS@|$conns|g" \
        "$template" > "$dir/nginx.conf"
    nginx -t -q -p "$dir" -c "$dir/nginx.conf" -e "$dir/error.log" \
        || die "nginx -t failed for $dir/nginx.conf (see above / $dir/error.log)"
}

master_pid() { # DIR -> pid or empty
    local f="$1/nginx.pid"
    [[ -s "$f" ]] || return 0
    local pid; pid="$(tr -d '[:space:]' < "$f")"
    if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; then echo "$pid"; fi
}

worker_pid() { # MASTER -> first child pid or empty
    pgrep -P "$1" 2>/dev/null | head -n1 || true
}

cmd="${1:-}"
case "$cmd" in
install)
    install_deps
    ;;
start|fg)
    [[ $# -ge 3 ]] || die "usage: run.sh $cmd DIR PORT [REDIS_URL]"
    dir="$2"; port="$3"; redis="${4:-redis://127.0.0.1:6379}"
    install_deps
    mkdir -p "$dir"; dir="$(cd "$dir" && pwd)"
    [[ -z "$(master_pid "$dir")" ]] || die "an nginx from $dir is already running"
    if [[ "$cmd" == fg ]]; then
        write_config "$dir" "$port" "$redis" off
        exec nginx -p "$dir" -c "$dir/nginx.conf" -e "$dir/error.log"
    fi
    write_config "$dir" "$port" "$redis" on
    nginx -p "$dir" -c "$dir/nginx.conf" -e "$dir/error.log"
    deadline=$((SECONDS + ${NCHAN_START_TIMEOUT:-20}))
    master=""; worker=""
    while :; do
        master="$(master_pid "$dir")"
        [[ -n "$master" ]] && worker="$(worker_pid "$master")"
        if [[ -n "$master" && -n "$worker" ]] \
            && curl -fsS -o /dev/null "http://127.0.0.1:$port/healthz" 2>/dev/null; then
            # nchan connects to Redis asynchronously: publish a probe until Redis takes it
            # (503/500 while it is not connected yet). The probe channel is never subscribed.
            code="$(curl -sS -o /dev/null -w '%{http_code}' -X POST --data-binary probe \
                "http://127.0.0.1:$port/pub/__runsh_probe" 2>/dev/null || true)"
            [[ "$code" == 201 || "$code" == 202 ]] && break
        fi
        if (( SECONDS >= deadline )); then
            tail -n 20 "$dir/error.log" >&2 2>/dev/null || true
            "${BASH_SOURCE[0]}" stop "$dir" >&2 || true
            die "nginx on port $port not ready after ${NCHAN_START_TIMEOUT:-20}s (stopped it)"
        fi
        sleep 0.1
    done
    echo "listening port=$port master=$master worker=$worker"
    ;;
pids)
    [[ $# -ge 2 ]] || die "usage: run.sh pids DIR"
    master="$(master_pid "$2")"
    [[ -n "$master" ]] || die "no nginx running from $2"
    echo "master=$master worker=$(worker_pid "$master")"
    ;;
stop)
    [[ $# -ge 2 ]] || die "usage: run.sh stop DIR"
    dir="$2"
    master="$(master_pid "$dir")"
    if [[ -z "$master" ]]; then echo "run.sh: no nginx running from $dir" >&2; exit 0; fi
    workers="$(pgrep -P "$master" 2>/dev/null || true)"
    kill -TERM "$master" 2>/dev/null || true
    for _ in $(seq 100); do
        kill -0 "$master" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$master" 2>/dev/null; then
        echo "run.sh: nginx $master did not stop, SIGKILL" >&2
        kill -KILL "$master" $workers 2>/dev/null || true
    fi
    echo "stopped master=$master"
    ;;
*)
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' >&2
    exit 2
    ;;
esac
