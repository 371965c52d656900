#!/usr/bin/env bash
# The wgbond demo: the bonding core on emulated links (cable + LTE + satellite), each mode,
# and a link dying mid-stream. Builds what it needs; runs in well under a minute.
# Usage: netns-tests/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo >/dev/null || { echo "demo: needs a Rust toolchain (cargo)" >&2; exit 1; }
cargo build --release --example bond_demo -q
exec target/release/examples/bond_demo
