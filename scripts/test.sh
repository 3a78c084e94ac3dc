#!/usr/bin/env bash
# Runs every test of pipelined: formatting, lints, the protos (buf lint,
# breaking-change check, generated clients up to date), unit tests and the
# integration suite (a real server on a real socket) with the SQLite default,
# the fuzz targets in fuzz/ for 20 s each (nightly Rust, see scripts/fuzz.sh),
# the Python, TypeScript and Go clients' examples against the real binary,
# and the integration suite again on a throwaway PostgreSQL cluster started
# from the machine's PostgreSQL binaries (see scripts/postgres.sh). Needs
# Rust, Go, Python 3 and Node.js; everything else comes from crates.io, the
# Go module proxy, PyPI and npm (see scripts/tools.sh).
#
# Without PostgreSQL binaries the second run is skipped with a loud warning,
# unless REQUIRE_POSTGRES=1 (as in CI), which makes that a failure.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "==> cargo fmt --check"
cargo fmt --all -- --check
cargo fmt --manifest-path fuzz/Cargo.toml -- --check

echo "==> cargo clippy (warnings are errors)"
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "==> protos: buf lint, buf breaking, generated clients up to date"
scripts/proto.sh check

echo "==> cargo test (SQLite)"
cargo test --workspace --locked

echo "==> fuzzing: every target in fuzz/ for 20 s"
scripts/fuzz.sh 20

echo "==> clients: Python, TypeScript and Go examples against the real server"
cargo build --locked
scripts/clients-test.sh

echo "==> grpcurl walkthrough against the real server"
scripts/grpcurl-test.sh

echo "==> gRPC-Web from a page in headless Chromium"
scripts/browser-test.sh

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
