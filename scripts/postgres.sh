#!/usr/bin/env bash
# Starts a throwaway PostgreSQL cluster for the tests, from the PostgreSQL
# server binaries installed on this machine (Debian's /usr/lib/postgresql/N/bin,
# or initdb and pg_ctl on PATH): `initdb` into a temporary directory, then
# `pg_ctl start` on a free loopback port. As root (CI runs as root, and
# initdb refuses root) the cluster runs as the `postgres` system user.
#
# Source it: it exports PIPELINED_TEST_POSTGRES_URL and registers a trap
# that stops the cluster and removes its directory when the shell exits.
# Without PostgreSQL binaries it says so loudly and returns 1.

pg_find_bin() {
    local dir
    for dir in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
        if [ -x "$dir/initdb" ] && [ -x "$dir/pg_ctl" ]; then
            echo "$dir"
            return 0
        fi
    done
    if command -v initdb >/dev/null 2>&1 && command -v pg_ctl >/dev/null 2>&1; then
        dirname "$(command -v initdb)"
        return 0
    fi
    return 1
}

pg_free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

pg_start() {
    local bin
    if ! bin=$(pg_find_bin); then
        echo "!!! No PostgreSQL server binaries (initdb, pg_ctl) found under /usr/lib/postgresql/*/bin or on PATH." >&2
        echo "!!! The PostgreSQL half of the test suite cannot run." >&2
        return 1
    fi
    PG_DIR=$(mktemp -d /tmp/pipelined-pg.XXXXXX)
    chmod 755 "$PG_DIR"
    local run=()
    if [ "$(id -u)" = 0 ]; then
        chown postgres: "$PG_DIR"
        run=(runuser -u postgres --)
    fi
    local port
    port=$(pg_free_port)
    "${run[@]}" "$bin/initdb" -D "$PG_DIR/data" -U postgres -A trust --no-sync -E UTF8 >"$PG_DIR/initdb.log" 2>&1 || {
        cat "$PG_DIR/initdb.log" >&2
        return 1
    }
    PG_CTL=("${run[@]}" "$bin/pg_ctl")
    # Tests need no durability; PG_DURABLE=1 (benchmarks) keeps PostgreSQL's
    # defaults: every commit flushed to disk.
    local speed="-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
    [ "${PG_DURABLE:-0}" = 1 ] && speed=""
    "${PG_CTL[@]}" -D "$PG_DIR/data" -l "$PG_DIR/server.log" -w -t 60 \
        -o "-p $port -k $PG_DIR -c listen_addresses=127.0.0.1 $speed -c max_connections=400" \
        start >/dev/null || {
        cat "$PG_DIR/server.log" >&2
        return 1
    }
    trap pg_stop EXIT
    export PIPELINED_TEST_POSTGRES_URL="postgres://postgres@127.0.0.1:$port/postgres"
    echo "==> PostgreSQL $("$bin/postgres" --version | awk '{print $3}') on port $port (in $PG_DIR)"
}

pg_stop() {
    if [ -n "${PG_DIR:-}" ] && [ -d "$PG_DIR/data" ]; then
        "${PG_CTL[@]}" -D "$PG_DIR/data" -m immediate -w stop >/dev/null 2>&1 || true
        rm -rf "$PG_DIR"
    fi
}
