#!/bin/sh
# Manage one daemonised portfwd instance through its pidfile.
#
#   portfwd-control.sh start|stop|status|restart|reload
#
# Configure the variables below (or set them in the environment):
#   BIN      the tool: portfwd (many rules from a config file), or one rule's tool: tcpfwd,
#            udpfwd, kcptcp-client or kcptcp-server
#   CONFIG   portfwd's config file (portfwd run -d -p PIDFILE CONFIG)
#   ARGS     a one-rule tool's arguments, without -d and -p (this script adds them)
#   PIDFILE  where the daemon writes its PID
# reload (portfwd only) checks the file with `portfwd check` first, then sends SIGHUP; the
# one-rule tools stop on SIGHUP (the seed's meaning), so for them reload is refused: restart.
# Exit status follows LSB: status returns 0 when running, 3 when not; reload returns 3 when
# the tool cannot reload and 1 when the file is invalid (the daemon then keeps running as is).

BIN="${BIN:-tcpfwd}"
ARGS="${ARGS:-127.0.0.1:1022 127.0.0.1:22}"
CONFIG="${CONFIG:-/etc/portfwd/portfwd.toml}"
PIDFILE="${PIDFILE:-/run/portfwd-$(basename "$BIN").pid}"
STOP_TIMEOUT="${STOP_TIMEOUT:-15}"   # seconds to wait for a graceful stop

is_portfwd() { [ "$(basename "$BIN")" = portfwd ]; }

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
    if is_portfwd; then
        set -- run -d -p "$PIDFILE" "$CONFIG"
    else
        # shellcheck disable=SC2086  # ARGS is a word list on purpose
        set -- -d -p "$PIDFILE" $ARGS
    fi
    if "$BIN" "$@"; then
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

reload() {
    if ! is_portfwd; then
        echo "$BIN cannot reload (SIGHUP stops it); use restart" >&2
        return 3
    fi
    if ! pid=$(running_pid); then
        echo "$BIN not running"
        return 7
    fi
    # nginx -t before nginx -s reload: a file that does not check is not sent.
    if ! "$BIN" check "$CONFIG" >/dev/null; then
        echo "$CONFIG is invalid: not reloaded, $BIN (pid $pid) keeps its configuration" >&2
        return 1
    fi
    kill -HUP "$pid"
    echo "$BIN (pid $pid) reloading $CONFIG"
}

case "$1" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    restart) stop && start ;;
    reload) reload ;;
    *) echo "usage: $0 start|stop|status|restart|reload" >&2; exit 2 ;;
esac
