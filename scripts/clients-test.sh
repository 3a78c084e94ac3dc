#!/usr/bin/env bash
# The client packages in clients/ against one real server: installs each
# package with its pinned dependencies, runs its examples/quickstart against
# target/debug/pipelined, and checks what it printed.
#
#   cargo build --locked && scripts/clients-test.sh
#
# Python: a venv in target/clients/venv, `pip install ./clients/python`.
# TypeScript: `npm ci` and `npm run build` (type-check + dist/) in clients/typescript.
# Go: gofmt, `go vet` and `go build` in clients/go (modules from the Go proxy).
# Needs only python3, node/npm and go on PATH.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
# shellcheck source=scripts/tools.sh
source scripts/tools.sh
tools_install
# shellcheck source=scripts/live-server.sh
source scripts/live-server.sh

if [ ! -x target/debug/pipelined ]; then
    echo "target/debug/pipelined is missing: run cargo build --locked first" >&2
    exit 1
fi

WORK="$(mktemp -d)"
cleanup() {
    live_server_stop
    rm -rf "$WORK"
}
trap cleanup EXIT

# Seconds since $1 (a `date +%s.%N`), with one decimal.
elapsed() { awk -v s="$1" -v e="$(date +%s.%N)" 'BEGIN { printf "%.1f", e - s }'; }

# --- install and build each client ----------------------------------------

start="$(date +%s.%N)"
VENV="$ROOT/target/clients/venv"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
# Not editable: the example must import the installed package.
"$VENV/bin/pip" install --quiet --disable-pip-version-check ./clients/python
echo "==> python: installed pipelined-client into target/clients/venv in $(elapsed "$start")s"

start="$(date +%s.%N)"
(
    cd clients/typescript
    npm ci --no-audit --no-fund --loglevel=error >/dev/null
    npm run --silent build
)
echo "==> typescript: npm ci + npm run build (type-check, dist/) in $(elapsed "$start")s"

start="$(date +%s.%N)"
(
    cd clients/go
    export GOTOOLCHAIN=local GOFLAGS="-mod=readonly -buildvcs=false"
    unformatted="$(gofmt -l .)"
    if [ -n "$unformatted" ]; then
        echo "gofmt: these files need formatting:" >&2
        echo "$unformatted" >&2
        exit 1
    fi
    go vet ./...
    go build -o "$WORK/quickstart-go" ./examples/quickstart
)
echo "==> go: gofmt, go vet, go build in $(elapsed "$start")s"

# --- run the examples against one server ----------------------------------

live_server_start "$WORK/server"
echo "==> pipelined serving on $LIVE_SERVER_ADDR"

# The execution_data every quickstart must end with: its input merged with
# the outputs of its set steps.
EXPECTED_DATA='{"customer": "acme", "source": {"table": "orders", "rows": 42},
  "load": {"table": "orders_clean", "rows": 40}, "report": {"ok": true}}'

# check NAME OUTPUT_FILE: every line a user of the example relies on.
check() {
    local name="$1" out="$2" problems=()
    local line
    for line in \
        '^created pipeline quickstart-' \
        '^same request_id -> same execution [0-9a-f-]\{36\}$' \
        '^reconnected after sequence 3$' \
        '^watched sequences 1\.\.10 with no gap or duplicate$' \
        '^status: SUCCEEDED$' \
        '^error: INVALID_ARGUMENT$' \
        "^violation: pipeline\.steps\[1\]\.needs\[0\]: no step is named 'transform'$" \
        '^violation: pipeline\.steps\[2\]\.name: '; do
        grep -q -- "$line" "$out" || problems+=("no line matching: $line")
    done
    # Events 1..10, each once, in order, across the dropped and resumed watch.
    local sequences
    sequences="$(sed -n 's/^event \([0-9]*\) .*/\1/p' "$out" | tr '\n' ' ')"
    [ "$sequences" = "1 2 3 4 5 6 7 8 9 10 " ] || problems+=("event sequences are '$sequences', not 1..10")
    # execution_data compared as JSON (each language formats it its own way).
    if ! sed -n 's/^execution_data: //p' "$out" | "$VENV/bin/python" -c '
import json, sys
expected = json.loads(sys.argv[1])
lines = sys.stdin.read().splitlines()
sys.exit(0 if len(lines) == 1 and json.loads(lines[0]) == expected else 1)' "$EXPECTED_DATA"; then
        problems+=("execution_data is not $EXPECTED_DATA")
    fi
    if [ "${#problems[@]}" -gt 0 ]; then
        echo "FAIL $name:" >&2
        printf '  %s\n' "${problems[@]}" >&2
        return 1
    fi
}

passed=0
failed=0
summaries=()
# run NAME DIR COMMAND...: runs one quickstart in DIR and checks its output.
run() {
    local name="$1" dir="$2"
    shift 2
    local out="$WORK/$name.out" start rc=0
    start="$(date +%s.%N)"
    (cd "$dir" && PIPELINED_ADDR="$LIVE_SERVER_ADDR" timeout 120 "$@") >"$out" 2>&1 || rc=$?
    local took
    took="$(elapsed "$start")"
    if [ "$rc" -ne 0 ]; then
        echo "FAIL $name: the quickstart exited with status $rc" >&2
    fi
    if [ "$rc" -ne 0 ] || ! check "$name" "$out"; then
        echo "---- $name output ----" >&2
        cat "$out" >&2
        echo "---- end of $name output ----" >&2
        failed=$((failed + 1))
        summaries+=("clients: $name FAILED (${took}s)")
        return 0
    fi
    passed=$((passed + 1))
    local violations
    violations="$(grep -c '^violation: ' "$out")"
    summaries+=("clients: $name ok (${took}s): created, idempotent run, watch resumed after sequence 3 with no gap, SUCCEEDED, INVALID_ARGUMENT with $violations field violations")
}

run python "$WORK" "$VENV/bin/python" "$ROOT/clients/python/examples/quickstart.py"
run typescript "$ROOT/clients/typescript" node_modules/.bin/tsx examples/quickstart.ts
run go "$WORK" "$WORK/quickstart-go"

printf '%s\n' "${summaries[@]}"
echo "clients: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
