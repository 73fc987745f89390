#!/bin/sh
# Manage one daemonised portfwd instance through its pidfile.
#
#   portfwd-control.sh start|stop|status|restart
#
# Configure the three variables below (or set them in the environment):
#   BIN      the tool: tcpfwd, udpfwd, kcptcp-client or kcptcp-server
#   ARGS     its arguments, without -d and -p (this script adds them)
#   PIDFILE  where the daemon writes its PID
# Exit status follows LSB: status returns 0 when running, 3 when not.

BIN="${BIN:-tcpfwd}"
ARGS="${ARGS:-127.0.0.1:1022 127.0.0.1:22}"
PIDFILE="${PIDFILE:-/run/portfwd-$BIN.pid}"
STOP_TIMEOUT="${STOP_TIMEOUT:-15}"   # seconds to wait for a graceful stop

running_pid() {
    # Print the PID if the pidfile names a live process; remove a stale pidfile.
    [ -f "$PIDFILE" ] || return 1
    pid=$(head -n 1 "$PIDFILE" 2>/dev/null)
    case "$pid" in
        ''|*[!0-9]*) ;;
        *) if kill -0 "$pid" 2>/dev/null; then echo "$pid"; return 0; fi ;;
    esac
    echo "removing stale pidfile $PIDFILE" >&2
    rm -f "$PIDFILE"
    return 1
}

start() {
    if pid=$(running_pid); then
        echo "$BIN already running (pid $pid)"
        return 0
    fi
    # shellcheck disable=SC2086  # ARGS is a word list on purpose
    if "$BIN" -d -p "$PIDFILE" $ARGS; then
        echo "$BIN started (pid $(head -n 1 "$PIDFILE"))"
    else
        echo "$BIN failed to start" >&2
        return 1
    fi
}

stop() {
    if ! pid=$(running_pid); then
        echo "$BIN not running"
        return 0
    fi
    kill -TERM "$pid"
    waited=0
    while kill -0 "$pid" 2>/dev/null; do
        if [ "$waited" -ge "$((STOP_TIMEOUT * 10))" ]; then
            echo "$BIN (pid $pid) did not stop in ${STOP_TIMEOUT}s; sending SIGKILL" >&2
            kill -KILL "$pid" 2>/dev/null
            rm -f "$PIDFILE"
            break
        fi
        sleep 0.1
        waited=$((waited + 1))
    done
    echo "$BIN stopped"
}

status() {
    if pid=$(running_pid); then
        echo "$BIN running (pid $pid)"
        return 0
    fi
    echo "$BIN not running"
    return 3
}

case "$1" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    restart) stop && start ;;
    *) echo "usage: $0 start|stop|status|restart" >&2; exit 2 ;;
esac
