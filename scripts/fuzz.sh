#!/usr/bin/env bash
# Builds every fuzz target in fuzz/ (cargo-fuzz and libFuzzer, nightly Rust)
# and runs each for a while from its committed seed corpus; fails if any
# input makes one panic, hang (5 s for one input) or take over 1 GiB.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]   run each target SECONDS (default 20)
#   scripts/fuzz.sh --grow [SECONDS] [TARGET...]
#                                           the same, then merge the inputs
#                                           that reached new code into
#                                           fuzz/corpus/<target>/ (review,
#                                           then commit them)
#   scripts/fuzz.sh --replay FILE TARGET    run TARGET on one input
#
# Targets (fuzz/fuzz_targets/): pipeline_yaml (definitions as YAML/JSON text),
# pipeline_proto (definitions as protobuf bytes), condition (`when` CEL).
# Each run starts from a temporary copy of fuzz/corpus/<target>/, so what it
# finds stays out of the repository unless --grow is given. A crash leaves
# its input in fuzz/artifacts/<target>/; replay it with
#   scripts/fuzz.sh --replay fuzz/artifacts/<target>/<file> <target>
#
# Installs what it needs: the nightly toolchain (minimal profile) when
# missing, and cargo-fuzz, pinned, from crates.io into .tools/cargo-fuzz/.
set -euo pipefail
cd "$(dirname "$0")/.."

CARGO_FUZZ_VERSION=0.13.2
ALL_TARGETS=(pipeline_yaml pipeline_proto condition)
# Largest input libFuzzer makes for each target, in bytes: room for a
# definition near the step limit, a condition over its 4096-byte limit
# with data after it.
declare -A MAX_LEN=([pipeline_yaml]=32768 [pipeline_proto]=32768 [condition]=8192)
# Where the targets are built: outside the repository, so that the build
# (every dependency of pipelined again, with coverage instrumentation) is
# kept between runs and fresh clones on the same machine.
CACHE_DIR="${XDG_CACHE_HOME:-$HOME/.cache}/pipelined"
TARGET_DIR="${PIPELINED_FUZZ_TARGET_DIR:-$CACHE_DIR/fuzz-target}"
# Optimized build with debug assertions and overflow checks, without a
# sanitizer (no code of ours is unsafe, and AddressSanitizer makes the build
# much slower), 16 codegen units, and (RUSTFLAGS below) opt-level 1 and no
# debug info: a build several times shorter, for somewhat slower runs.
BUILD_FLAGS=(-O -a -s none --codegen-units 16 --target-dir "$TARGET_DIR")
export RUSTFLAGS="${PIPELINED_FUZZ_RUSTFLAGS:--Copt-level=1 -Cdebuginfo=0}"

seconds=20
grow=0
replay=""
targets=()
while [ $# -gt 0 ]; do
    case "$1" in
        --grow) grow=1 ;;
        --replay)
            replay="$(realpath "$2")"
            shift
            ;;
        -h | --help)
            sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'
            exit 0
            ;;
        *[!0-9]*) targets+=("$1") ;;
        *) seconds="$1" ;;
    esac
    shift
done
[ ${#targets[@]} -gt 0 ] || targets=("${ALL_TARGETS[@]}")
for target in "${targets[@]}"; do
    if [ -z "${MAX_LEN[$target]:-}" ]; then
        echo "unknown fuzz target '$target' (targets: ${ALL_TARGETS[*]})" >&2
        exit 2
    fi
done

if ! rustup run nightly rustc --version >/dev/null 2>&1; then
    echo "==> installing the nightly Rust toolchain (cargo-fuzz needs it)"
    rustup toolchain install nightly --profile minimal
fi

tools="$PWD/.tools/cargo-fuzz"
if [ "$(cat "$tools/stamp" 2>/dev/null)" != "$CARGO_FUZZ_VERSION" ]; then
    echo "==> installing cargo-fuzz $CARGO_FUZZ_VERSION into .tools/cargo-fuzz/"
    # Its build is kept in the cache too: in a fresh clone this takes seconds.
    cargo install cargo-fuzz --version "$CARGO_FUZZ_VERSION" --locked --root "$tools" \
        --target-dir "$CACHE_DIR/cargo-fuzz-build"
    echo "$CARGO_FUZZ_VERSION" >"$tools/stamp"
fi
export PATH="$tools/bin:$PATH"

echo "==> building the fuzz targets"
started=$SECONDS
lock_before="$(sha256sum fuzz/Cargo.lock)"
(cd fuzz && cargo +nightly fuzz build "${BUILD_FLAGS[@]}")
echo "    built in $((SECONDS - started)) s"
if [ "$(sha256sum fuzz/Cargo.lock)" != "$lock_before" ]; then
    echo "!!! fuzz/Cargo.lock changed (a dependency was added to pipelined?): commit it." >&2
fi

if [ -n "$replay" ]; then
    [ ${#targets[@]} -eq 1 ] || { echo "--replay FILE needs one target" >&2; exit 2; }
    cd fuzz
    exec cargo +nightly fuzz run "${BUILD_FLAGS[@]}" "${targets[0]}" "$replay"
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
failed=()
for target in "${targets[@]}"; do
    echo "==> fuzzing $target for $seconds s"
    corpus="$work/$target"
    mkdir -p "$corpus"
    cp fuzz/corpus/"$target"/* "$corpus"/
    if ! (cd fuzz && cargo +nightly fuzz run "${BUILD_FLAGS[@]}" "$target" "$corpus" -- \
        -max_total_time="$seconds" -timeout=5 -rss_limit_mb=1024 \
        -max_len="${MAX_LEN[$target]}" -print_final_stats=1 2>"$work/$target.log"); then
        tail -n 60 "$work/$target.log" >&2
        failed+=("$target")
        continue
    fi
    grep -E '^(stat::number_of_executed_units|stat::new_units_added|Done)' "$work/$target.log" |
        sed 's/^/    /' || true
    if [ "$grow" = 1 ]; then
        before=$(find fuzz/corpus/"$target" -type f | wc -l)
        (cd fuzz && cargo +nightly fuzz run "${BUILD_FLAGS[@]}" "$target" \
            corpus/"$target" "$corpus" -- -merge=1 -timeout=5 -rss_limit_mb=1024 \
            -max_len="${MAX_LEN[$target]}" 2>>"$work/$target.log")
        after=$(find fuzz/corpus/"$target" -type f | wc -l)
        echo "    fuzz/corpus/$target: $before -> $after inputs"
    fi
done

if [ ${#failed[@]} -gt 0 ]; then
    echo "!!! fuzzing found a crash, hang or memory blow-up in: ${failed[*]}" >&2
    echo "    the inputs are in fuzz/artifacts/<target>/ (see the output above)" >&2
    exit 1
fi
echo "==> fuzzing: no crash in ${targets[*]}"
