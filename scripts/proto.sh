#!/usr/bin/env bash
# Checks on proto/ with buf (installed by scripts/tools.sh):
#
#   scripts/proto.sh lint       buf lint (STANDARD + COMMENTS rules, buf.yaml)
#   scripts/proto.sh breaking   buf breaking against the last released protos,
#                               kept as an image in buf.released.binpb
#   scripts/proto.sh release    records the current protos as released: run it
#                               when a version of the API is published
#   scripts/proto.sh gen        regenerates clients/{go,python,typescript}
#   scripts/proto.sh gen-check  fails if regenerating would change anything
#   scripts/proto.sh check      lint + breaking + gen-check (what the test
#                               command runs)
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/tools.sh
source scripts/tools.sh
tools_install

BASELINE=buf.released.binpb

# Generated directories, relative to the repository root.
GENERATED=(clients/go/pipeline clients/python/src/pipeline clients/typescript/src/gen)

# Generates every client under the directory $1 (the repository root, or a
# scratch copy for gen-check).
generate_into() {
    local root="$1"
    # Go and TypeScript: buf.gen.yaml.
    buf generate -o "$root"
    # TypeScript also gets the google.rpc error details, to decode them
    # (Go and Python take them from genproto and googleapis-common-protos).
    buf generate -o "$root" --path proto/google --template \
        '{"version":"v2","plugins":[{"local":"protoc-gen-es","out":"clients/typescript/src/gen","opt":"target=ts"}]}'
    # Python: grpcio-tools' protoc, with the well-known types it ships.
    local wkt
    wkt="$(python -c 'import grpc_tools, os; print(os.path.join(os.path.dirname(grpc_tools.__file__), "_proto"))')"
    mkdir -p "$root/clients/python/src"
    python -m grpc_tools.protoc -Iproto -I"$wkt" \
        --python_out="$root/clients/python/src" --pyi_out="$root/clients/python/src" \
        --grpc_python_out="$root/clients/python/src" \
        proto/pipeline/v1/pipeline.proto proto/pipeline/v1/worker.proto
    touch "$root/clients/python/src/pipeline/__init__.py" "$root/clients/python/src/pipeline/v1/__init__.py"
}

gen() {
    local dir
    for dir in "${GENERATED[@]}"; do rm -rf "$dir"; done
    generate_into .
    echo "generated ${GENERATED[*]}"
}

gen_check() {
    local scratch dir status=0
    scratch="$(mktemp -d)"
    generate_into "$scratch"
    for dir in "${GENERATED[@]}"; do
        if ! diff -r "$dir" "$scratch/$dir"; then
            status=1
        fi
    done
    rm -rf "$scratch"
    if [ "$status" -ne 0 ]; then
        echo "generated clients are stale: run scripts/proto.sh gen and commit the result" >&2
        return 1
    fi
    echo "generated clients match proto/"
}

case "${1:-check}" in
    lint) buf lint ;;
    breaking) buf breaking --against "$BASELINE" ;;
    gen) gen ;;
    gen-check) gen_check ;;
    release) buf build --exclude-source-info -o "$BASELINE" && echo "recorded proto/ as released in $BASELINE" ;;
    check)
        buf lint
        buf breaking --against "$BASELINE"
        echo "proto: buf lint and buf breaking passed"
        gen_check
        ;;
    *) echo "usage: $0 lint|breaking|gen|gen-check|release|check" >&2; exit 2 ;;
esac
