#!/usr/bin/env bash
# Runs every netns-tests/tests/*.sh (or those matching $1), each as its own process building and
# removing its own lab. Last line: "N passed, M failed"; exit status non-zero on any failure.
# Needs root, iproute2, ethtool, iperf3, nftables; builds linkemu unless LINKEMU is set.
set -u
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=lab.sh
source "$HERE/lab.sh"
# Per test file, seconds; the whole suite has to fit CI's budget.
TEST_TIMEOUT=${TEST_TIMEOUT:-600}
filter=${1:-}

if [[ $(id -u) != 0 ]]; then
    echo "run-netns-tests: needs root (network namespaces)" >&2
    echo "0 passed, 1 failed"
    exit 1
fi
for tool in ip ethtool iperf3 ping ss nft conntrack timeout awk; do
    if ! command -v "$tool" >/dev/null; then
        echo "run-netns-tests: missing '$tool' (apt-get install iproute2 ethtool iperf3 iputils-ping nftables conntrack)" >&2
        echo "0 passed, 1 failed"
        exit 1
    fi
done
if [[ -z ${LINKEMU:-} ]]; then
    if ! (cd "$HERE/.." && cargo build --release -q -p linkemu); then
        echo "0 passed, 1 failed"
        exit 1
    fi
    export LINKEMU="$HERE/../target/release/linkemu"
fi
# The tunnel tests run target/release/wgbond: never test a stale one.
if [[ -z ${WGBOND:-} ]]; then
    if ! (cd "$HERE/.." && cargo build --release -q --bin wgbond); then
        echo "0 passed, 1 failed"
        exit 1
    fi
fi
# Labs of crashed earlier runs would only confuse the results.
lab_gc

passed=0 failed=0 index=0
for test in "$HERE"/tests/*.sh; do
    [[ -n $filter && $test != *"$filter"* ]] && continue
    index=$((index + 1))
    name=$(basename "$test" .sh)
    prefix="wgb-$$${index}-"
    echo "=== $name"
    log=$(mktemp)
    start=$SECONDS
    LAB_PREFIX=$prefix timeout --kill-after=20 "$TEST_TIMEOUT" bash "$test" 2>&1 | tee "$log"
    status=${PIPESTATUS[0]}
    p=$(grep -c '^PASS ' "$log")
    f=$(grep -c '^FAIL ' "$log")
    rm -f "$log"
    if ((status != 0 && f == 0)); then
        echo "FAIL $name: exited with status $status$( ((status == 124)) && echo " (timed out after ${TEST_TIMEOUT}s)")"
        f=1
    fi
    # A test must leave nothing behind; clean up after it if it did not, and count that.
    if ip netns list | grep -q "^$prefix"; then
        echo "FAIL $name: left namespaces behind: $(ip netns list | grep "^$prefix" | awk '{print $1}' | tr '\n' ' ')"
        lab_down_prefix "$prefix"
        f=$((f + 1))
    fi
    passed=$((passed + p)) failed=$((failed + f))
    echo "=== $name: $p passed, $f failed ($((SECONDS - start)) s)"
done
if ((index == 0)); then
    echo "run-netns-tests: no test matches '$filter'" >&2
    failed=1
fi
echo "$passed passed, $failed failed"
((failed == 0))
