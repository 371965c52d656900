#!/usr/bin/env bash
# Helpers for the tunnel tests (netns-tests/tests/*_tunnel.sh, multi_site.sh): PASS/FAIL lines,
# namespaces, veth pairs, wgbond daemons, `ip` state snapshots. Everything a test creates is
# registered here and removed on EXIT, INT or TERM, daemons first (by `down`, then by their
# real pid).
# shellcheck disable=SC2034  # variables are used by the sourcing test

TL_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WGBOND=${WGBOND:-$TL_ROOT/target/release/wgbond}
TMP=$(mktemp -d /tmp/wgbond-test.XXXXXX)
export WGBOND_RUN_DIR="$TMP/run"
# Namespace name prefix: the runner's (it checks nothing is left behind) or our own.
TL_PREFIX=${LAB_PREFIX:-wgbt$$-}
FAILED=0
BG_PIDS=()
TL_NAMESPACES=()
TL_DAEMONS=()

pass() { echo "PASS $1: $2"; }
fail() {
    echo "FAIL $1: $2"
    FAILED=1
}

# The pid a daemon reports (it detaches, so `$!` would not be its pid).
tl_daemon_pid() {
    "$WGBOND" show "$1" --json 2>/dev/null |
        python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["pid"])' 2>/dev/null
}

tl_cleanup() {
    trap - EXIT INT TERM
    local name pid ns
    for name in "${TL_DAEMONS[@]}"; do
        pid=$(tl_daemon_pid "$name")
        timeout 15 "$WGBOND" down "$name" >/dev/null 2>&1
        if [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null; then
            kill "$pid" 2>/dev/null
            sleep 1
            kill -9 "$pid" 2>/dev/null
        fi
    done
    for pid in "${BG_PIDS[@]}"; do
        kill "$pid" 2>/dev/null
    done
    wait 2>/dev/null
    for ns in "${TL_NAMESPACES[@]}"; do
        ip netns del "$ns" 2>/dev/null
    done
    rm -rf "$TMP"
}
trap tl_cleanup EXIT
trap 'exit 130' INT TERM

# Checks root, the binary and python3; exits with a FAIL line otherwise.
tl_require() {
    if [[ $(id -u) != 0 ]]; then
        echo "FAIL $1: needs root"
        exit 1
    fi
    if [[ ! -x $WGBOND ]]; then
        echo "FAIL $1: no wgbond binary at $WGBOND (cargo build --release)"
        exit 1
    fi
    if ! command -v python3 >/dev/null; then
        echo "FAIL $1: needs python3"
        exit 1
    fi
}

# tl_netns NAME: a namespace with lo up, removed on exit.
tl_netns() {
    ip netns add "$1"
    TL_NAMESPACES+=("$1")
    ip -n "$1" link set lo up
}

# tl_veth NS1 IF1 ADDR1 NS2 IF2 ADDR2: a veth pair between two namespaces, addressed and up.
tl_veth() {
    ip link add "$2" netns "$1" type veth peer name "$5" netns "$4"
    ip -n "$1" addr add "$3" dev "$2"
    ip -n "$4" addr add "$6" dev "$5"
    ip -n "$1" link set "$2" up
    ip -n "$4" link set "$5" up
}

# tl_up NS CONFIG NAME: `wgbond up` in NS; registers NAME for cleanup (so never call it in a
# subshell). Its output is left in $TL_OUT.
TL_OUT=""
tl_up() {
    TL_DAEMONS+=("$3")
    TL_OUT=$(ip netns exec "$1" timeout 40 "$WGBOND" up "$2" 2>&1)
}

# tl_snapshot NS: everything `down` must restore.
tl_snapshot() {
    ip netns exec "$1" sh -c 'ip -d link show; ip addr; ip rule; ip -6 rule;
        ip route show table all; ip -6 route show table all' 2>&1 |
        grep -v -e 'valid_lft' -e '^ *RX:' -e '^ *TX:'
}

# tl_settle NS...: waits (at most 5 s) for carrier and IPv6 duplicate address detection, so
# snapshots are stable.
tl_settle() {
    local try ns unsettled
    for ((try = 0; try < 50; try++)); do
        unsettled=0
        for ns in "$@"; do
            if tl_snapshot "$ns" | grep -q -e tentative -e NO-CARRIER; then
                unsettled=1
            fi
        done
        ((unsettled)) || return 0
        sleep 0.1
    done
}

# tl_ping_until NS DST: true once DST answers (at most 20 tries of 1 s).
tl_ping_until() {
    local try
    for ((try = 0; try < 20; try++)); do
        ip netns exec "$1" ping -n -q -c 1 -W 1 "$2" >/dev/null 2>&1 && return 0
    done
    return 1
}

# tl_show NAME PYTHON: runs PYTHON with `s` bound to NAME's status (show --json).
tl_show() {
    "$WGBOND" show "$1" --json 2>&1 | python3 -c "
import json, sys
s = json.load(sys.stdin)[0]
$2" 2>&1
}
