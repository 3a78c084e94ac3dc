#!/usr/bin/env bash
# Runs every test of pipelined: formatting, lints, unit tests and the
# integration suite (a real server on a real socket), first with its SQLite
# default, then again on a throwaway PostgreSQL cluster started from the
# machine's PostgreSQL binaries (see scripts/postgres.sh). Needs a Rust
# toolchain; every crate comes from crates.io.
#
# Without PostgreSQL binaries the second run is skipped with a loud warning,
# unless REQUIRE_POSTGRES=1 (as in CI), which makes that a failure.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "==> cargo fmt --check"
cargo fmt --all -- --check

echo "==> cargo clippy (warnings are errors)"
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "==> cargo test (SQLite)"
cargo test --workspace --locked

echo "==> integration tests on PostgreSQL"
# shellcheck source=scripts/postgres.sh
source scripts/postgres.sh
if pg_start; then
    cargo test --locked --test api
elif [ "${REQUIRE_POSTGRES:-0}" = 1 ]; then
    echo "!!! REQUIRE_POSTGRES=1: failing because PostgreSQL could not be started." >&2
    exit 1
else
    echo "!!! SKIPPED: the integration tests did not run on PostgreSQL." >&2
fi
