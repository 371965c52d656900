#!/usr/bin/env bash
# Every test of wgbond, in the order a failure is cheapest to see:
#   formatting, lints, unit + property + simulator tests (cargo test --workspace),
#   then the end-to-end suite in network namespaces (needs root; see netns-tests/README.md).
# Usage: sudo netns-tests/test-all.sh
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
echo "== cargo test"
cargo test --workspace
echo "== cargo build --release (for the namespace suite)"
cargo build --release --workspace

if [ "$(id -u)" -ne 0 ]; then
    echo "netns suite skipped: it needs root (run: sudo $0)" >&2
    exit 1
fi
echo "== network-namespace suite"
exec netns-tests/run-netns-tests.sh
