#!/usr/bin/env bash
# Checks on proto/ with buf (installed by scripts/tools.sh):
#
#   scripts/proto.sh lint       buf lint (STANDARD + COMMENTS rules, buf.yaml)
#   scripts/proto.sh breaking   buf breaking against the last released protos,
#                               kept as an image in buf.released.binpb
#   scripts/proto.sh release    records the current protos as released: run it
#                               when a version of the API is published
#   scripts/proto.sh check      lint + breaking (what the test command runs)
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/tools.sh
source scripts/tools.sh
tools_install

BASELINE=buf.released.binpb

case "${1:-check}" in
    lint) buf lint ;;
    breaking) buf breaking --against "$BASELINE" ;;
    release) buf build --exclude-source-info -o "$BASELINE" && echo "recorded proto/ as released in $BASELINE" ;;
    check)
        buf lint
        buf breaking --against "$BASELINE"
        echo "proto: buf lint and buf breaking passed"
        ;;
    *) echo "usage: $0 lint|breaking|release|check" >&2; exit 2 ;;
esac
