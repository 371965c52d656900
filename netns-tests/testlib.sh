#!/usr/bin/env bash
# Helpers for netns-tests/tests/*.sh: results, numeric checks, ping and iperf3 measurements.
# Each check prints one line "PASS name: detail" or "FAIL name: detail"; the runner counts them.

# shellcheck source=lab.sh
source "$(dirname "${BASH_SOURCE[0]}")/lab.sh"

# Set by t_fail; a test script ends with `exit "$TEST_FAILED"`.
# shellcheck disable=SC2034
TEST_FAILED=0

t_pass() { echo "PASS $1: $2"; }
t_fail() {
    echo "FAIL $1: $2"
    # shellcheck disable=SC2034
    TEST_FAILED=1
}

# t_range NAME VALUE LOW HIGH [UNIT]: passes when LOW <= VALUE <= HIGH (decimals allowed).
t_range() {
    local name=$1 value=$2 low=$3 high=$4 unit=${5:-}
    if [[ -z $value ]]; then
        t_fail "$name" "no measurement (expected $low..$high$unit)"
    elif awk -v v="$value" -v l="$low" -v h="$high" 'BEGIN { exit !(v >= l && v <= h) }'; then
        t_pass "$name" "$value$unit within $low..$high$unit"
    else
        t_fail "$name" "$value$unit outside $low..$high$unit"
    fi
}

# Floating-point arithmetic for the shell: t_calc '2 * 10 + 1'
t_calc() { awk "BEGIN { printf \"%.3f\", $1 }"; }

# t_ping ROLE SRC DST COUNT INTERVAL -> prints "loss_pct min avg max mdev p90" (RTTs in ms).
t_ping() {
    local role=$1 src=$2 dst=$3 count=$4 interval=$5 out loss rtt p90
    out=$(lab_exec "$role" ping -n -I "$src" -c "$count" -i "$interval" -W 2 "$dst" 2>&1)
    loss=$(sed -n 's/.* \([0-9.]*\)% packet loss.*/\1/p' <<<"$out")
    rtt=$(sed -n 's|.*= \([0-9.]*\)/\([0-9.]*\)/\([0-9.]*\)/\([0-9.]*\) ms.*|\1 \2 \3 \4|p' <<<"$out")
    p90=$(sed -n 's/.*time=\([0-9.]*\) ms.*/\1/p' <<<"$out" | sort -n |
        awk '{ v[NR] = $1 } END { i = int(NR * 0.9 + 0.5); if (i < 1) i = 1; if (NR) print v[i]; else print "-" }')
    echo "${loss:-100} ${rtt:-- - - -} $p90"
}

# One ping so ARP and neighbour entries exist before anything is timed.
t_warm() {
    lab_exec "$1" ping -n -q -I "$2" -c 2 -i 0.2 -W 3 "$3" >/dev/null 2>&1
}

# Starts an iperf3 server in ROLE (killed by lab_down), waits until it listens.
t_iperf_server() {
    local role=$1 port=${2:-5201} tries
    lab_bg "$role" iperf3 -s -p "$port" >/dev/null 2>&1
    for ((tries = 0; tries < 50; tries++)); do
        lab_exec "$role" ss -ltn 2>/dev/null | grep -q ":$port " && return 0
        sleep 0.1
    done
    return 1
}

# t_fresh_iperf_server [ROLE]: a new iperf3 server in ROLE (default hub) on the next port from
# 5201, the previous one stopped: a server whose last test ran through a tunnel that was then
# torn down can stay busy for minutes, or reset the next client. Sets IPERF_PORT; false if the
# server did not start.
IPERF_PORT=5200 IPERF_PID=""
t_fresh_iperf_server() {
    [[ -n $IPERF_PID ]] && lab_kill_pids "$IPERF_PID"
    IPERF_PORT=$((IPERF_PORT + 1))
    t_iperf_server "${1:-hub}" "$IPERF_PORT" || return 1
    IPERF_PID=$LAB_LAST_PID
}

# t_bench_keys WGBOND: fresh hub and site keys in T_HUB_KEY, T_HUB_PUB, T_SITE_KEY, T_SITE_PUB.
t_bench_keys() {
    T_HUB_KEY=$("$1" genkey) && T_SITE_KEY=$("$1" genkey) &&
        T_HUB_PUB=$("$1" pubkey <<<"$T_HUB_KEY") && T_SITE_PUB=$("$1" pubkey <<<"$T_SITE_KEY")
}

# t_bench_configs MODE HUB_TUN SITE_TUN: the benchmarks' wgbond configs, $LAB_STATE/bhub.toml
# and bsite.toml: tunnel addresses HUB_TUN and SITE_TUN (/24), the hub on port 51821 of the
# lab's hub address, no routes (table off), one [[link]] per lab WAN; keys from t_bench_keys.
t_bench_configs() {
    local mode=$1 hub_tun=$2 site_tun=$3 i
    cat >"$LAB_STATE/bhub.toml" <<EOF
[interface]
private_key = "$T_HUB_KEY"
address = ["$hub_tun/24"]
listen_port = 51821
table = "off"
[bond]
mode = "$mode"
[[peer]]
public_key = "$T_SITE_PUB"
allowed_ips = ["$site_tun/32"]
EOF
    {
        cat <<EOF
[interface]
private_key = "$T_SITE_KEY"
address = ["$site_tun/24"]
table = "off"
[bond]
mode = "$mode"
[[peer]]
public_key = "$T_HUB_PUB"
allowed_ips = ["$hub_tun/32"]
endpoint = "$LAB_HUB_IP:51821"
EOF
        for i in "${!LAB_LINK_NAME[@]}"; do
            printf '[[link]]\nname = "%s"\nbind_interface = "wan%d"\n' "${LAB_LINK_NAME[$i]}" "$i"
        done
    } >"$LAB_STATE/bsite.toml"
}

# t_iperf ROLE SRC DST SECONDS [iperf3 options...] -> receiver rate in Mbit/s.
t_iperf() {
    local role=$1 src=$2 dst=$3 secs=$4
    shift 4
    lab_exec "$role" timeout $((secs + 15)) iperf3 -f m -c "$dst" -B "$src" -t "$secs" "$@" 2>&1 |
        awk '/receiver/ { for (i = 1; i < NF; i++) if ($(i+1) == "Mbits/sec") v = $i } END { print v }'
}
