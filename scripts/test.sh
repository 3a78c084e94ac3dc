#!/usr/bin/env bash
# Runs every test of pipelined: formatting, lints, unit tests and the
# integration suite (a real server on a real socket with a real SQLite file).
# Needs only a Rust toolchain; every crate comes from crates.io.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "==> cargo fmt --check"
cargo fmt --all -- --check

echo "==> cargo clippy (warnings are errors)"
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "==> cargo test"
cargo test --workspace --locked
