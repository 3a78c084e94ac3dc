# A real pipelined server for the test stages that drive it from other
# languages (clients, grpcurl, a browser). Source this file, then:
#
#   live_server_start DIR [ARGS...]   starts target/debug/pipelined on a free
#                                     loopback port with its data in DIR and
#                                     exports LIVE_SERVER_ADDR (host:port)
#   live_server_stop                  stops it (SIGTERM, then SIGKILL)
#
# The binary must be built (`cargo build --locked`). Its log is DIR/server.log.

LIVE_SERVER_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

live_server_start() {
    local dir="$1"
    shift
    mkdir -p "$dir"
    local log="$dir/server.log"
    NO_COLOR=1 PIPELINED_LOG=info "$LIVE_SERVER_ROOT/target/debug/pipelined" serve \
        --listen 127.0.0.1:0 --data-dir "$dir" --allow-command sh "$@" >"$log" 2>&1 &
    LIVE_SERVER_PID=$!
    # The server logs `pipelined serving addr=127.0.0.1:PORT` once it listens.
    local tries=0
    LIVE_SERVER_ADDR=""
    while [ -z "$LIVE_SERVER_ADDR" ]; do
        if ! kill -0 "$LIVE_SERVER_PID" 2>/dev/null; then
            echo "pipelined exited before serving; its log:" >&2
            cat "$log" >&2
            return 1
        fi
        tries=$((tries + 1))
        if [ "$tries" -gt 300 ]; then
            echo "pipelined did not start serving within 30 s; its log:" >&2
            cat "$log" >&2
            return 1
        fi
        sleep 0.1
        LIVE_SERVER_ADDR="$(grep -m1 'pipelined serving' "$log" | sed -n 's/.*addr=\([0-9.:]*\).*/\1/p')"
    done
    export LIVE_SERVER_ADDR LIVE_SERVER_PID
}

live_server_stop() {
    [ -n "${LIVE_SERVER_PID:-}" ] || return 0
    kill -TERM "$LIVE_SERVER_PID" 2>/dev/null || true
    for _ in $(seq 50); do
        kill -0 "$LIVE_SERVER_PID" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$LIVE_SERVER_PID" 2>/dev/null || true
    wait "$LIVE_SERVER_PID" 2>/dev/null || true
    LIVE_SERVER_PID=""
}
