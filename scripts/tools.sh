# Pinned tools for the protos and the clients, installed into .tools/ from
# their registries (npm, the Go module proxy, PyPI). Source this file, then
# call `tools_install`; it skips the work when tools/ has not changed since
# the last install, and puts the tools on PATH.
#
#   buf, protoc-gen-es      tools/package.json (+ package-lock.json)
#   protoc-gen-go(-grpc),   tools/go.mod (`tool` directives)
#   grpcurl
#   grpc_tools.protoc       tools/requirements.txt

TOOLS_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS_DIR="$TOOLS_ROOT/.tools"

tools_install() {
    local stamp
    stamp="$(cat "$TOOLS_ROOT"/tools/{package.json,package-lock.json,go.mod,go.sum,requirements.txt} | sha256sum | cut -c1-16)"
    export PATH="$TOOLS_DIR/bin:$TOOLS_DIR/node/node_modules/.bin:$TOOLS_DIR/venv/bin:$PATH"
    if [ -f "$TOOLS_DIR/stamp" ] && [ "$(cat "$TOOLS_DIR/stamp")" = "$stamp" ]; then
        return 0
    fi
    echo "==> installing pinned tools into .tools/"
    mkdir -p "$TOOLS_DIR/node"
    cp "$TOOLS_ROOT/tools/package.json" "$TOOLS_ROOT/tools/package-lock.json" "$TOOLS_DIR/node/"
    (cd "$TOOLS_DIR/node" && npm ci --no-audit --no-fund --loglevel=error) || return 1
    (cd "$TOOLS_ROOT/tools" && GOBIN="$TOOLS_DIR/bin" go install tool) || return 1
    if [ ! -x "$TOOLS_DIR/venv/bin/python" ]; then
        python3 -m venv "$TOOLS_DIR/venv" || return 1
    fi
    "$TOOLS_DIR/venv/bin/pip" install --quiet --disable-pip-version-check \
        -r "$TOOLS_ROOT/tools/requirements.txt" || return 1
    echo "$stamp" > "$TOOLS_DIR/stamp"
}
