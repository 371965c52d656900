#!/usr/bin/env bash
# Every test of wgbond, in the order a failure is cheapest to see:
#   formatting, lints, unit + property + simulator tests (cargo test --workspace),
#   then the end-to-end suite in network namespaces (needs root; see netns-tests/README.md).
# Usage: sudo netns-tests/test-all.sh
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages the tests use; installed when missing (needs root and apt).
declare -A need=([ip]=iproute2 [iperf3]=iperf3 [nft]=nftables [conntrack]=conntrack
    [ethtool]=ethtool [ping]=iputils-ping [wg]=wireguard-tools [ps]=procps [killall]=psmisc
    [systemd-analyze]=systemd)
missing=()
for tool in "${!need[@]}"; do
    command -v "$tool" >/dev/null || missing+=("${need[$tool]}")
done
if ((${#missing[@]})) && [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
    echo "== installing ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

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
