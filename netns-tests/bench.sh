#!/usr/bin/env bash
# Benchmark on one scenario: single TCP stream (iperf3) down and up over
#   - each link alone, no tunnel (plain TCP: what the link itself gives),
#   - each link alone through plain single-link WireGuard (wireguard-go from Debian),
#   - kernel MPTCP (mptcpize) with one subflow per WAN,
#   - wgbond in each mode (with --wgbond; needs the daemon: `wgbond up CONFIG --foreground`):
#     first the cold start (the first transfers after the daemons start, a row of its own),
#     then again as a daemon that has been up a while runs,
# and prints a markdown table; efficiency = goodput / sum of the single-link WireGuard goodputs.
#
# Usage: sudo netns-tests/bench.sh [SCENARIO...] [--time SECONDS] [--omit SECONDS] [--wgbond]
#                                  [--modes LIST] [--cc ALGORITHM] [--output FILE]
#        (default scenario hetero, 10 s per measurement; several scenarios run one after the
#        other, each in its own lab, their tables together in FILE; --modes: comma-separated
#        wgbond modes, default auto,stripe,duplicate,failover; --cc: TCP congestion control
#        of every sender in the lab, e.g. cubic or bbr, default the host's; --omit: iperf3 -O,
#        every transfer runs that much longer and its first SECONDS are left out of its
#        figure, references alike: the steady state without each transfer's start)
set -u
# shellcheck source=testlib.sh
source "$(dirname "${BASH_SOURCE[0]}")/testlib.sh"

SCENARIOS=() DURATION=10 WITH_WGBOND=0 OUTPUT="" OPTIONS=() MODES=auto,stripe,duplicate,failover
CC="" IPERF_CC=() OMIT=0
while (($#)); do
    case $1 in
    --time) DURATION=${2:-}; OPTIONS+=(--time "$DURATION"); shift ;;
    --wgbond) WITH_WGBOND=1; OPTIONS+=(--wgbond) ;;
    --modes) MODES=${2:-}; OPTIONS+=(--modes "$MODES"); shift ;;
    --cc) CC=${2:-}; OPTIONS+=(--cc "$CC"); IPERF_CC=(-C "$CC"); shift ;;
    --omit) OMIT=${2:-}; OPTIONS+=(--omit "$OMIT"); shift ;;
    --output) OUTPUT=${2:-}; shift ;;
    -*) echo "usage: $0 [SCENARIO...] [--time SECONDS] [--omit SECONDS] [--wgbond] [--modes LIST] [--cc ALGORITHM] [--output FILE]" >&2; exit 2 ;;
    *) SCENARIOS+=("$1") ;;
    esac
    shift
done
((${#SCENARIOS[@]})) || SCENARIOS=(hetero)
if ((${#SCENARIOS[@]} > 1)); then
    {
        status=0
        for scenario in "${SCENARIOS[@]}"; do
            "$0" "$scenario" "${OPTIONS[@]}" || status=1
            echo
        done
        exit "$status"
    } | tee ${OUTPUT:+"$OUTPUT"}
    exit "${PIPESTATUS[0]}"
fi
SCENARIO=${SCENARIOS[0]}
[[ $DURATION =~ ^[0-9]+$ ]] && ((DURATION >= 2 && DURATION <= 120)) || { echo "--time: 2..120 seconds" >&2; exit 2; }
[[ $OMIT =~ ^[0-9]+$ ]] && ((OMIT <= 30)) || { echo "--omit: 0..30 seconds" >&2; exit 2; }
[[ $MODES =~ ^(auto|stripe|duplicate|failover)(,(auto|stripe|duplicate|failover))*$ ]] ||
    { echo "--modes: comma-separated list of auto, stripe, duplicate, failover" >&2; exit 2; }
# iperf3 -C sets it on both ends' sockets (as root, also one the namespace's sysctl would not
# allow); without --cc every sender uses the host's default.
cc_available() { grep -qw -- "$CC" /proc/sys/net/ipv4/tcp_available_congestion_control 2>/dev/null; }
if [[ -z $CC ]]; then
    CC="$(sysctl -n net.ipv4.tcp_congestion_control 2>/dev/null || echo '?'), the host's default"
elif ! [[ $CC =~ ^[a-z0-9_]+$ ]] || ! { cc_available || { modprobe -q "tcp_$CC" 2>/dev/null && cc_available; }; }; then
    echo "--cc: '$CC' is not available (see /proc/sys/net/ipv4/tcp_available_congestion_control)" >&2
    exit 2
fi
for tool in iperf3 wg wireguard-go mptcpize; do
    command -v "$tool" >/dev/null || { echo "bench: missing '$tool' (apt-get install iperf3 wireguard-tools wireguard-go mptcpd)" >&2; exit 1; }
done

WG_PORT=51820
WG_HUB=10.99.0.1
WG_SITE=10.99.0.2
ROWS=()

lab_trap
lab_up "$SCENARIO" --no-lan >/dev/null || exit 1
HUB=$LAB_HUB_IP
for i in "${!LAB_LINK_NAME[@]}"; do
    t_warm site1 "$(lab_wan_ip 1 "$i")" "$HUB"
done

# CPU seconds (user + system) used so far by the given PIDs.
cpu_of() {
    local pid ticks=0 stat fields
    for pid in "$@"; do
        stat=$(cat "/proc/$pid/stat" 2>/dev/null) || continue
        read -r -a fields <<<"${stat##*) }"
        ticks=$((ticks + fields[11] + fields[12]))
    done
    t_calc "$ticks / $(getconf CLK_TCK)"
}

# Ping RTT percentiles (ms) from a file of ping output: "p50 p95".
rtt_percentiles() {
    sed -n 's/.*time=\([0-9.]*\) ms.*/\1/p' "$1" | sort -n |
        awk '{ v[NR] = $1 }
             END { if (!NR) { print "- -"; exit }
                   a = int(NR * 0.5 + 0.5); b = int(NR * 0.95 + 0.5); if (a < 1) a = 1; if (b < 1) b = 1
                   printf "%.1f %.1f", v[a], v[b] }'
}

# bench_iperf SRC DST [iperf3 args...] -> receiver Mbit/s; on failure iperf3's last words on stderr.
bench_iperf() {
    local src=$1 dst=$2 out="$LAB_STATE/iperf-last.txt" rate
    shift 2
    lab_exec site1 timeout $((DURATION + OMIT + 15)) iperf3 -f m -c "$dst" -p "$IPERF_PORT" -B "$src" -t "$DURATION" -O "$OMIT" ${IPERF_CC[@]+"${IPERF_CC[@]}"} "$@" >"$out" 2>&1
    rate=$(awk '/receiver/ { for (i = 1; i < NF; i++) if ($(i+1) == "Mbits/sec") v = $i } END { print v }' "$out")
    [[ -n $rate ]] || { echo "bench: iperf3 $* to $dst failed:"; tail -n 3 "$out"; } >&2
    echo "$rate"
}

# measure DST SRC [extra iperf3 args...]: down (-R, with pings alongside), up, then down with 4
# streams; sets DOWN, UP, DOWN4, P50, P95 (RTT under the download), GB (all three together).
measure() {
    local dst=$1 src=$2 pings="$LAB_STATE/bench-ping.txt" ping_pid
    shift 2
    t_fresh_iperf_server hub || { echo "bench: iperf3 server did not start" >&2; exit 1; }
    lab_exec site1 ping -n -I "$src" -i 0.1 -w "$((DURATION + OMIT))" "$dst" >"$pings" 2>&1 &
    ping_pid=$!
    LAB_PIDS+=("$ping_pid")
    DOWN=$(bench_iperf "$src" "$dst" -R "$@")
    wait "$ping_pid" 2>/dev/null
    read -r P50 P95 < <(rtt_percentiles "$pings")
    UP=$(bench_iperf "$src" "$dst" "$@")
    DOWN4=$(bench_iperf "$src" "$dst" -R -P 4 "$@")
    GB=$(t_calc "(${DOWN:-0} + ${UP:-0} + ${DOWN4:-0}) * $((DURATION + OMIT)) / 8 / 1000")
}

row() { ROWS+=("$1|${2:-?}|${3:-?}|${4:-}|${5:-}|${DOWN4:-}"); }

# 1. Each link alone, no tunnel.
for i in "${!LAB_LINK_NAME[@]}"; do
    measure "$HUB" "$(lab_wan_ip 1 "$i")"
    row "${LAB_LINK_NAME[$i]} alone, plain TCP" "$DOWN" "$UP" "" "$P50 / $P95"
done

# 2. Each link alone through wireguard-go: a fresh tunnel per link, its site socket steered onto
#    link I by an fwmark rule to the WAN's table, set before the first packet (changing the mark
#    of a running wireguard-go did not always move its traffic: a sticky source address).
wg_start() {
    local role=$1 ifname=$2 key=$3
    lab_bg "$role" env WG_PROCESS_FOREGROUND=1 WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD=1 \
        wireguard-go "$ifname" >/dev/null 2>&1
    WG_PIDS+=("$LAB_LAST_PID")
    local tries
    for ((tries = 0; tries < 50; tries++)); do
        [[ -S /var/run/wireguard/$ifname.sock ]] && break
        sleep 0.1
    done
    lab_exec "$role" wg set "$ifname" private-key "$key" || return 1
}
umask 077
wg genkey >"$LAB_STATE/hub.key" && wg genkey >"$LAB_STATE/site.key"
for i in "${!LAB_LINK_NAME[@]}"; do
    WG_PIDS=()
    # wireguard-go's control sockets live in /var/run/wireguard/, shared by all namespaces: the
    # interface names must differ between hub and site, links, and other runs.
    WG_IF_HUB="wbh$$$i" WG_IF_SITE="wbs$$$i" mark=$((0x1000 + i))
    if ! { wg_start hub "$WG_IF_HUB" "$LAB_STATE/hub.key" && wg_start site1 "$WG_IF_SITE" "$LAB_STATE/site.key"; }; then
        echo "bench: wireguard-go did not start" >&2
        exit 1
    fi
    lab_exec site1 ip rule add fwmark "$mark" lookup $((100 + i)) priority $((900 + i))
    lab_exec site1 wg set "$WG_IF_SITE" fwmark "$mark"
    lab_exec hub wg set "$WG_IF_HUB" listen-port "$WG_PORT" peer "$(wg pubkey <"$LAB_STATE/site.key")" allowed-ips "$WG_SITE/32"
    lab_exec site1 wg set "$WG_IF_SITE" peer "$(wg pubkey <"$LAB_STATE/hub.key")" allowed-ips "$WG_HUB/32" \
        endpoint "$HUB:$WG_PORT" persistent-keepalive 25
    for role_addr in "hub $WG_HUB $WG_IF_HUB" "site1 $WG_SITE $WG_IF_SITE"; do
        read -r role addr ifname <<<"$role_addr"
        lab_exec "$role" ip addr add "$addr/24" dev "$ifname"
        lab_exec "$role" ip link set "$ifname" mtu 1420 up
    done
    emu_before=$(lab_emu_get "${LAB_LINK_NAME[$i]}" down.passed_bytes)
    if ! lab_exec site1 ping -n -q -c 1 -w 10 "$WG_HUB" >/dev/null 2>&1; then
        DOWN4="" row "${LAB_LINK_NAME[$i]} alone, wireguard-go" "no handshake" "no handshake"
        lab_kill_pids "${WG_PIDS[@]}"
        continue
    fi
    before=$(cpu_of "${WG_PIDS[@]}")
    measure "$WG_HUB" "$WG_SITE"
    after=$(cpu_of "${WG_PIDS[@]}")
    WG_DOWN[i]=${DOWN:-0} WG_UP[i]=${UP:-0}
    # The link's own emulator must have carried the downloads (at least half of what was measured).
    emu_mb=$((($(lab_emu_get "${LAB_LINK_NAME[$i]}" down.passed_bytes) - emu_before) / 1000000))
    if awk -v e="$emu_mb" -v gb="$GB" -v u="${UP:-0}" -v d="$((DURATION + OMIT))" 'BEGIN { exit !(e < (gb * 1000 - u * d / 8) / 2) }'; then
        echo "bench: wireguard-go over ${LAB_LINK_NAME[$i]}: only $emu_mb MB crossed that link's emulator: traffic took another link" >&2
    fi
    row "${LAB_LINK_NAME[$i]} alone, wireguard-go" "$DOWN" "$UP" "$(t_calc "($after - $before) / ($GB + 0.000001)")" "$P50 / $P95"
    lab_kill_pids "${WG_PIDS[@]}"
    lab_exec site1 ip rule del fwmark "$mark" lookup $((100 + i)) priority $((900 + i))
done
WG_SUM_DOWN=$(t_calc "0 $(printf ' + %s' "${WG_DOWN[@]:-0}")")
WG_SUM_UP=$(t_calc "0 $(printf ' + %s' "${WG_UP[@]:-0}")")

# 3. Kernel MPTCP: first subflow over the main route (first WAN), one more per other WAN.
for role in site1 hub; do
    lab_exec "$role" sysctl -qw net.mptcp.enabled=1
    lab_exec "$role" ip mptcp limits set subflow 8 add_addr_accepted 8
done
for i in "${!LAB_LINK_NAME[@]}"; do
    ((i == 0)) && continue
    lab_exec site1 ip mptcp endpoint add "$(lab_wan_ip 1 "$i")" dev "wan$i" subflow
done
lab_bg hub mptcpize run iperf3 -s -p 5301 >/dev/null 2>&1
sleep 0.5
mptcp_iperf() {
    lab_exec site1 timeout $((DURATION + OMIT + 15)) mptcpize run iperf3 -f m -c "$HUB" -p 5301 -t "$DURATION" -O "$OMIT" ${IPERF_CC[@]+"${IPERF_CC[@]}"} "$@" 2>&1 |
        awk '/receiver/ { for (i = 1; i < NF; i++) if ($(i+1) == "Mbits/sec") v = $i } END { print v }'
}
lab_exec site1 ping -n -i 0.1 -w "$((DURATION + OMIT))" "$HUB" >"$LAB_STATE/bench-ping.txt" 2>&1 &
ping_pid=$!
LAB_PIDS+=("$ping_pid")
DOWN=$(mptcp_iperf -R)
wait "$ping_pid" 2>/dev/null
read -r P50 P95 < <(rtt_percentiles "$LAB_STATE/bench-ping.txt")
UP=$(mptcp_iperf)
DOWN4=$(mptcp_iperf -R -P 4)
row "kernel MPTCP, one subflow per WAN" "$DOWN" "$UP" "" "$P50 / $P95"

# 4. wgbond (only with --wgbond: needs a working daemon).
if ((WITH_WGBOND)); then
    WGBOND=${WGBOND:-$LAB_REPO/target/release/wgbond}
    if [[ ! -x $WGBOND ]]; then
        DOWN4="" row "wgbond" "not built ($WGBOND)" ""
    else
        # Control sockets in the lab's state directory: no clash with a real /run/wgbond.
        export WGBOND_RUN_DIR="$LAB_STATE/wgbond"
        t_bench_keys "$WGBOND" || exit 1
        for mode in ${MODES//,/ }; do
            t_bench_configs "$mode" 10.98.0.1 10.98.0.2
            lab_bg hub "$WGBOND" up "$LAB_STATE/bhub.toml" --foreground >"$LAB_STATE/wgbond-hub.log" 2>&1
            hub_pid=$LAB_LAST_PID
            lab_bg site1 "$WGBOND" up "$LAB_STATE/bsite.toml" --foreground >"$LAB_STATE/wgbond-site.log" 2>&1
            site_pid=$LAB_LAST_PID
            # `up --foreground` is not ready at once: wait for the interface, then for a reply.
            for ((tries = 0; tries < 50; tries++)); do
                lab_exec site1 ip -br addr show dev bsite 2>/dev/null | grep -q 10.98.0.2 && break
                sleep 0.1
            done
            if lab_exec site1 ping -n -q -c 1 -w 20 10.98.0.1 >/dev/null 2>&1; then
                # The first transfers after the daemons start also find the links' rates (each
                # link's estimate starts at 8 Mbit/s and is kept from then on, idle or not):
                # shown in a row of their own; the bond is then measured as a daemon that has
                # been up a while runs, like the references, which have no such start.
                measure 10.98.0.1 10.98.0.2
                row "wgbond $mode, cold (the first transfers after start)" "$DOWN" "$UP" "" "$P50 / $P95"
                before=$(cpu_of "$hub_pid" "$site_pid")
                measure 10.98.0.1 10.98.0.2
                after=$(cpu_of "$hub_pid" "$site_pid")
                row "wgbond $mode" "$DOWN" "$UP" "$(t_calc "($after - $before) / ($GB + 0.000001)")" "$P50 / $P95"
            else
                DOWN4="" row "wgbond $mode" "no tunnel" "no tunnel"
                echo "bench: wgbond $mode: no ping through the tunnel; logs:" >&2
                tail -n 5 "$LAB_STATE/wgbond-hub.log" "$LAB_STATE/wgbond-site.log" >&2
            fi
            lab_kill_pids "$hub_pid" "$site_pid"
        done
    fi
fi

eff() { [[ $1 =~ ^[0-9.]+$ ]] && awk -v v="$1" -v s="$2" 'BEGIN { if (s > 0) printf "%.2f", v / s }'; }
{
    echo "Scenario \`$SCENARIO\` ($(sed -e 's/#.*//' -e '/^ *$/d' "$LAB_SCENARIO" | awk '{printf "%s%s %s Mbit/s %s ms", sep, $1, $2, $3; sep="; "}')), one TCP stream (${CC}), ${DURATION} s each$( ((OMIT)) && echo " after the first $OMIT s (iperf3 -O $OMIT)");"
    echo "$(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores, $(uname -r), commit $(git -C "$LAB_REPO" rev-parse --short HEAD 2>/dev/null || echo '?')."
    echo "Efficiency = goodput / sum of the single-link wireguard-go goodputs ($WG_SUM_DOWN down, $WG_SUM_UP up)."
    echo
    echo "| path | down Mbit/s | up Mbit/s | efficiency down | efficiency up | 4 streams down | ping p50 / p95 ms during download | CPU s/GB (both ends) |"
    echo "|---|---|---|---|---|---|---|---|"
    for r in "${ROWS[@]}"; do
        IFS='|' read -r name down up cpu rtt down4 <<<"$r"
        echo "| $name | $down | $up | $(eff "$down" "$WG_SUM_DOWN") | $(eff "$up" "$WG_SUM_UP") | $down4 | $rtt | $cpu |"
    done
} | tee ${OUTPUT:+"$OUTPUT"}
