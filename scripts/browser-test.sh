#!/usr/bin/env bash
# The browser test: a real Chromium calls a real pipelined with gRPC-Web.
#
# tests/browser/ holds a page (index.html + app.ts, bundled by esbuild with
# the generated TypeScript code from clients/typescript/src/gen/) that uses
# @connectrpc/connect-web's createGrpcWebTransport, and run-test.mjs, which
# serves the page from 127.0.0.1:PAGE_PORT and drives Debian's Chromium
# headless through playwright-core. The server runs on another loopback port
# with --cors-allow-origin http://127.0.0.1:PAGE_PORT, so every call crosses
# origins: the page must get through CORS, and the same page loaded from
# http://localhost:PAGE_PORT must be refused.
#
#   scripts/browser-test.sh
#
# Installs Debian's chromium when /usr/bin/chromium is missing (apt-get, with
# sudo unless root). npm packages are pinned by tests/browser/package-lock.json;
# playwright never downloads a browser of its own.
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=scripts/live-server.sh
source scripts/live-server.sh

CHROMIUM=/usr/bin/chromium
if [ ! -x "$CHROMIUM" ]; then
    echo "==> installing Debian's chromium"
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium >/dev/null
fi

echo "==> npm ci, typecheck and bundle (tests/browser)"
export PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1
(
    cd tests/browser
    # npm ci starts from scratch; skip it while node_modules matches the lock.
    stamp="$(sha256sum package-lock.json | cut -c1-16)"
    if [ "$(cat node_modules/.stamp 2>/dev/null)" != "$stamp" ]; then
        npm ci --no-audit --no-fund --loglevel=error
        echo "$stamp" > node_modules/.stamp
    fi
    npm run --silent typecheck
    npm run --silent build
)

echo "==> cargo build"
cargo build --locked --quiet

WORK="$(mktemp -d)"
cleanup() {
    live_server_stop
    rm -rf "$WORK"
}
trap cleanup EXIT

# The page's port must be known before the server starts, for its CORS rule.
PAGE_PORT="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
live_server_start "$WORK/server" --cors-allow-origin "http://127.0.0.1:$PAGE_PORT"
echo "==> pipelined on $LIVE_SERVER_ADDR, page on 127.0.0.1:$PAGE_PORT"

rc=0
(
    cd tests/browser
    SERVER_URL="http://$LIVE_SERVER_ADDR" PAGE_PORT="$PAGE_PORT" CHROMIUM="$CHROMIUM" node run-test.mjs
) || rc=$?
if [ "$rc" -ne 0 ]; then
    echo "--- server log (last 30 lines):" >&2
    tail -n 30 "$WORK/server/server.log" >&2
fi
exit "$rc"
