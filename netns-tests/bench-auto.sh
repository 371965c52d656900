#!/usr/bin/env bash
# Auto-mode acceptance benchmark on the `hetero` scenario (fast 60 Mbit/s 10 ms + slow 20 Mbit/s
# 35 ms): one lab, the wgbond daemons restarted per mode, and for each criterion the reference
# measured in the same run. Prints a markdown report.
#   3. 5% random loss (both directions) on one link: single-stream TCP download goodput in
#      `auto` with the loss / without it.
#   4. The fast link dies for 4 s mid-transfer (`outage on`): longest stall of a single-stream
#      download (0.2 s intervals), 50 pps pings lost (`auto` and `duplicate`), and how long after
#      `outage off` the fast link carries data again (its emulator's forwarded bytes).
#   5. The fast link's rate drops 60 -> 15 Mbit/s mid-transfer: goodput from 2 s after the drop
#      against plain TCP on the two links at their new rates, and against the new rate sum.
#   6. UDP at 90% of the link-rate sum through `auto`: loss and out-of-order counts (iperf3).
#
# Usage: sudo netns-tests/bench-auto.sh [--time SECONDS] [--cc ALGORITHM] [--output FILE] [--logs DIR]
#        (--cc: TCP congestion control of the iperf3 senders, e.g. cubic; default the host's)
#        (--logs: keep iperf3 JSON, pings, emulator polls, daemon logs and `wgbond show` snapshots)
#        (--time: each steady measurement, default 10 s; the whole run takes about 8x that + 1 min)
#        Needs target/release/wgbond (or WGBOND=path), linkemu (see lab.sh), iperf3, jq.
set -u
# shellcheck source=testlib.sh
source "$(dirname "${BASH_SOURCE[0]}")/testlib.sh"

DURATION=10 OUTPUT="" LOGS="" CC="" IPERF_CC=()
while (($#)); do
    case $1 in
    --time) DURATION=${2:-}; shift ;;
    --output) OUTPUT=${2:-}; shift ;;
    --logs) LOGS=${2:-}; shift ;;
    --cc) CC=${2:-}; IPERF_CC=(-C "$CC"); shift ;;
    *) echo "usage: $0 [--time SECONDS] [--cc ALGORITHM] [--output FILE] [--logs DIR]" >&2; exit 2 ;;
    esac
    shift
done
if ! [[ $DURATION =~ ^[0-9]+$ ]] || ((DURATION < 3 || DURATION > 60)); then
    echo "--time: 3..60 seconds" >&2
    exit 2
fi
if [[ -z $CC ]]; then
    CC="$(sysctl -n net.ipv4.tcp_congestion_control 2>/dev/null || echo '?'), the host's default"
elif ! [[ $CC =~ ^[a-z0-9_]+$ ]] || ! grep -qw -- "$CC" /proc/sys/net/ipv4/tcp_available_congestion_control; then
    echo "--cc: '$CC' is not available (see /proc/sys/net/ipv4/tcp_available_congestion_control)" >&2
    exit 2
fi
for tool in iperf3 jq ping; do
    command -v "$tool" >/dev/null || { echo "bench-auto: missing '$tool' (apt-get install iperf3 jq iputils-ping)" >&2; exit 1; }
done
WGBOND=${WGBOND:-$LAB_REPO/target/release/wgbond}
[[ -x $WGBOND ]] || { echo "bench-auto: $WGBOND not built (cargo build --release)" >&2; exit 1; }

SCENARIO=hetero
# Outage (criterion 4): starts OUT_AT s into the transfer, lasts OUT_FOR s; the transfer goes on
# OUT_TAIL s after it. Rate drop (criterion 5): at DROP_AT s, to DROP_MBIT; measured from 2 s later.
OUT_AT=3 OUT_FOR=4 OUT_TAIL=5
DROP_AT=4 DROP_MBIT=15 DROP_SETTLE=2
LOSS_PCT=5
# A 0.2 s interval below this counts as stalled; the fast link "carries data" again once its
# emulator forwards at least DATA_MBIT downstream over a poll interval (probes and pings are far less).
STALL_MBIT=1 DATA_MBIT=2

lab_trap
lab_up "$SCENARIO" --no-lan >/dev/null || exit 1
HUB=$LAB_HUB_IP
FAST=${LAB_LINK_NAME[0]} SLOW=${LAB_LINK_NAME[1]}
FAST_RATE=${LAB_LINK_RATE[0]} SLOW_RATE=${LAB_LINK_RATE[1]}
RATE_SUM=$(awk -v a="$FAST_RATE" -v b="$SLOW_RATE" 'BEGIN { print a + b }')
UDP_MBIT=$(t_calc "$RATE_SUM * 0.9")
UDP_MBIT=${UDP_MBIT%.*}
UDP_LEN=1300
for i in "${!LAB_LINK_NAME[@]}"; do
    t_warm site1 "$(lab_wan_ip 1 "$i")" "$HUB"
done
TUN_HUB=10.98.0.1 TUN_SITE=10.98.0.2
export WGBOND_RUN_DIR="$LAB_STATE/wgbond"
LINES=()    # report rows
NOTES=()    # anything suspicious

note() { NOTES+=("$*"); echo "bench-auto: $*" >&2; }

# A / B with two decimals, "-" without a measurement.
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a != "" && b > 0) printf "%.2f", a / b; else print "-" }'; }

# "DROPS_LINK0 DROPS_LINK1 ..." of the emulators' queue drops in direction DIR (down|up).
emu_drops() {
    local i out=()
    for i in "${!LAB_LINK_NAME[@]}"; do
        out+=("$(lab_emu_get "${LAB_LINK_NAME[$i]}" "$1.drop_queue")")
    done
    echo "${out[*]}"
}

# "send_drops queue_drops reorder_skips reorder_late udp_send tun_write rcvbuf_errors
# sndbuf_errors tun_qdisc_drops tun_tx_dropped" of ROLE's wgbond (all its peers and links; the
# interface's UDP send and TUN write failures) and of the kernel in ROLE's namespace: UDP
# receive- and send-buffer errors (wgbond's link sockets and iperf3's), the TUN device's qdisc
# drops, and the packets the TUN driver dropped on their way to wgbond (its queue full: the
# sender's application never learns of those). A value that could not be read is "?".
wgb_counters() {
    local ifname=bsite
    [[ $1 == hub ]] && ifname=bhub
    local bond kernel qdisc txdrop
    bond=$(lab_exec "$1" "$WGBOND" show "$ifname" --json 2>/dev/null | jq -r '. as $all | [.[].peers[]?] |
        [([.[].bond.send_drops] | add // 0), ([.[].links[]?.queue_drops] | add // 0),
         ([.[].bond.reorder_skips] | add // 0), ([.[].bond.reorder_late] | add // 0),
         ([$all[].drops.udp_send] | add // 0), ([$all[].drops.tun_write] | add // 0)]
        | map(tostring) | join(" ")' 2>/dev/null)
    kernel=$(lab_exec "$1" awk '/^Udp:/ { n++; if (n == 1) for (i = 1; i <= NF; i++) k[i] = $i;
        else for (i = 1; i <= NF; i++) if (k[i] == "RcvbufErrors" || k[i] == "SndbufErrors") printf "%s ", $i }' /proc/net/snmp 2>/dev/null)
    qdisc=$(lab_exec "$1" tc -s qdisc show dev "$ifname" 2>/dev/null | awk '/dropped/ { for (i = 1; i < NF; i++) if ($i == "(dropped") { gsub(",", "", $(i+1)); d += $(i+1) } } END { if (NR) print d + 0 }')
    txdrop=$(lab_exec "$1" cat "/sys/class/net/$ifname/statistics/tx_dropped" 2>/dev/null)
    echo "${bond:-? ? ? ? ? ?} ${kernel:-? ?} ${qdisc:-?} ${txdrop:-?}"
}

# snapshot NAME: both ends' `wgbond show` into the state directory (kept with --logs).
snapshot() {
    {
        echo "== site"; lab_exec site1 "$WGBOND" show bsite 2>&1
        echo "== hub"; lab_exec hub "$WGBOND" show bhub 2>&1
    } >"$LAB_STATE/show-$1.txt"
}

# delta_list "A1 A2 ..." "B1 B2 ..." [FIELD...]: "B1-A1/B2-A2/..." (the given 1-based fields only).
delta_list() {
    local a=$1 b=$2
    shift 2
    awk -v a="$a" -v b="$b" -v f="$*" 'BEGIN {
        na = split(a, x, " "); split(b, y, " ")
        if (f == "") { for (i = 1; i <= na; i++) sel[++n] = i } else n = split(f, sel, " ")
        for (i = 1; i <= n; i++) printf "%s%s", (i > 1 ? "/" : ""), (x[sel[i]] !~ /^[0-9]+$/ || y[sel[i]] !~ /^[0-9]+$/ ? "?" : y[sel[i]] - x[sel[i]])
    }'
}

# Every link back to the scenario's settings.
emu_reset() {
    local i
    for i in "${!LAB_LINK_NAME[@]}"; do
        lab_emu "${LAB_LINK_NAME[$i]}" set down rate_mbit="${LAB_LINK_RATE[$i]}" loss_pct="${LAB_LINK_LOSS[$i]}" outage=off >/dev/null
        lab_emu "${LAB_LINK_NAME[$i]}" set up rate_mbit="${LAB_LINK_UPRATE[$i]}" loss_pct="${LAB_LINK_LOSS[$i]}" outage=off >/dev/null
    done
}


# run_iperf NAME SRC DST SECONDS [iperf3 args...]: JSON result in $LAB_STATE/NAME.json.
run_iperf() {
    local name=$1 src=$2 dst=$3 secs=$4 out cc=()
    shift 4
    out="$LAB_STATE/$name.json"
    # The congestion control is TCP's (iperf3 -C sets it on both ends' sockets).
    [[ " $* " == *" -u "* ]] || cc=(${IPERF_CC[@]+"${IPERF_CC[@]}"})
    t_fresh_iperf_server hub || { echo "bench-auto: iperf3 server did not start" >&2; exit 1; }
    lab_exec site1 timeout $((secs + 20)) iperf3 --json -c "$dst" -p "$IPERF_PORT" -B "$src" -t "$secs" ${cc[@]+"${cc[@]}"} "$@" >"$out" 2>&1
    if ! jq -e '.end.sum_received // .end.sum' "$out" >/dev/null 2>&1; then
        note "iperf3 $name failed: $(jq -r '.error // empty' "$out" 2>/dev/null || tail -c 200 "$out")"
    fi
}

# Receiver goodput (Mbit/s) of a TCP result.
tcp_rate() { jq -r '(.end.sum_received.bits_per_second // empty) / 1e6 | . * 10 | round / 10' "$LAB_STATE/$1.json" 2>/dev/null; }

# "start end Mbit/s" per interval.
intervals() { jq -r '.intervals[].sum | "\(.start) \(.end) \(.bits_per_second / 1e6)"' "$LAB_STATE/$1.json" 2>/dev/null; }

# Mean rate (Mbit/s) of the intervals starting at or after FROM and ending at or before TO.
window_rate() {
    intervals "$1" | awk -v from="$2" -v to="$3" '
        $1 >= from - 0.01 && $2 <= to + 0.01 { bits += $3 * ($2 - $1); secs += $2 - $1 }
        END { if (secs > 0) printf "%.1f", bits / secs }'
}

# emu_event LINK AT FOR "CMD" "UNDO" MARKS: in the background, AT s from now send CMD to LINK's
# emulator, FOR s later UNDO (FOR "-": never); the times land in MARKS as "on EPOCH"/"off EPOCH".
emu_event() {
    local link=$1 at=$2 dur=$3 cmd=$4 undo=$5 marks=$6
    : >"$marks"
    (
        nap=""
        trap 'kill "$nap" 2>/dev/null; exit 0' TERM
        sleep "$at" & nap=$!
        wait "$nap"
        # shellcheck disable=SC2086 # command word lists
        lab_emu "$link" $cmd >/dev/null && echo "on $(date +%s.%N)" >>"$marks"
        [[ $dur == - ]] && exit 0
        sleep "$dur" & nap=$!
        wait "$nap"
        # shellcheck disable=SC2086
        lab_emu "$link" $undo >/dev/null && echo "off $(date +%s.%N)" >>"$marks"
    ) &
    EVENT_PID=$!
    LAB_PIDS+=("$EVENT_PID")
}

# emu_poll LINK SECONDS FILE: in the background, about every 0.1 s, "EPOCH down.passed_bytes".
emu_poll() {
    local link=$1 secs=$2 file=$3
    (
        end=$(($(date +%s) + secs))
        for ((k = 0; k < secs * 20 && $(date +%s) < end; k++)); do
            echo "$(date +%s.%N) $(lab_emu_get "$link" down.passed_bytes)"
            sleep 0.1
        done
    ) >"$file" 2>/dev/null &
    POLL_PID=$!
    LAB_PIDS+=("$POLL_PID")
}

# Ping output -> "sent lost duplicates max_rtt_ms".
ping_summary() {
    awk '/packets transmitted/ { sent = $1; recv = $4; for (i = 1; i <= NF; i++) if ($i ~ /^\+[0-9]+$/ && $(i+1) == "duplicates,") dup = substr($i, 2) }
         /^rtt|^round-trip/ { split($4, r, "/"); max = r[3] }
         END { printf "%s %s %s %s", sent + 0, sent - recv, dup + 0, (max == "" ? "-" : max) }' "$1"
}

# ---- wgbond daemons ----
# A private copy: every daemon of the run is the same build, even if target/ is rebuilt meanwhile.
cp "$WGBOND" "$LAB_STATE/wgbond-bin" || exit 1
WGBOND_BUILT=$(date -u -r "$WGBOND" '+%Y-%m-%d %H:%M UTC')
WGBOND=$LAB_STATE/wgbond-bin
t_bench_keys "$WGBOND" || exit 1
WGB_PIDS=()
wgb_start() {
    local mode=$1 tries
    t_bench_configs "$mode" "$TUN_HUB" "$TUN_SITE"
    lab_bg hub "$WGBOND" up "$LAB_STATE/bhub.toml" --foreground >"$LAB_STATE/wgbond-hub-$mode.log" 2>&1
    WGB_PIDS=("$LAB_LAST_PID")
    lab_bg site1 "$WGBOND" up "$LAB_STATE/bsite.toml" --foreground >"$LAB_STATE/wgbond-site-$mode.log" 2>&1
    WGB_PIDS+=("$LAB_LAST_PID")
    for ((tries = 0; tries < 50; tries++)); do
        lab_exec site1 ip -br addr show dev bsite 2>/dev/null | grep -q "$TUN_SITE" && break
        sleep 0.1
    done
    if ! lab_exec site1 ping -n -q -c 1 -w 20 "$TUN_HUB" >/dev/null 2>&1; then
        note "wgbond $mode: no ping through the tunnel; site log: $(tail -n 3 "$LAB_STATE/wgbond-site-$mode.log" | tr '\n' ' ')"
        return 1
    fi
    # Every link up (at most 10 s), so no measurement starts while one is still probing.
    for ((tries = 0; tries < 50; tries++)); do
        [[ $(lab_exec site1 "$WGBOND" show bsite --json 2>/dev/null |
            jq -r '[.[].peers[]?.links[]? | select(.state == "up")] | length' 2>/dev/null) == "${#LAB_LINK_NAME[@]}" ]] && break
        sleep 0.2
    done
    ((tries < 50)) || note "wgbond $mode: not every link up after 10 s: $(lab_exec site1 "$WGBOND" show bsite 2>&1 | tr -s ' \n' ' ' | cut -c1-300)"
    return 0
}
wgb_stop() {
    lab_kill_pids "${WGB_PIDS[@]}"
    WGB_PIDS=()
}

# ---- criterion 4: outage of the fast link during a download, and during pings alone ----
# outage_run MODE: sets rows for MODE.
outage_run() {
    local mode=$1
    local total=$((OUT_AT + OUT_FOR + OUT_TAIL)) name="outage-$mode" marks="$LAB_STATE/marks-$mode"
    local pings="$LAB_STATE/ping-dl-$mode.txt" ping_pid t_on t_off t_start
    # a) download, 0.2 s intervals, 50 pps pings alongside, the fast link's emulator polled.
    emu_poll "$FAST" $((total + 1)) "$LAB_STATE/poll-$mode.txt"
    lab_exec site1 ping -n -I "$TUN_SITE" -i 0.02 -c $((total * 50)) -W 1 "$TUN_HUB" >"$pings" 2>&1 &
    ping_pid=$!
    LAB_PIDS+=("$ping_pid")
    local blackholed
    blackholed=$(lab_emu_get "$FAST" down.drop_outage)
    t_start=$(date +%s.%N)
    emu_event "$FAST" "$OUT_AT" "$OUT_FOR" "outage on both" "outage off both" "$marks"
    run_iperf "$name" "$TUN_SITE" "$TUN_HUB" "$total" -R -i 0.2
    blackholed=$(($(lab_emu_get "$FAST" down.drop_outage) - blackholed))
    snapshot "$name"
    wait "$EVENT_PID" "$ping_pid" 2>/dev/null
    lab_kill_pids "$POLL_PID"
    emu_reset
    t_on=$(awk '$1 == "on" { print $2 }' "$marks") t_off=$(awk '$1 == "off" { print $2 }' "$marks")
    [[ -n $t_on && -n $t_off ]] || { note "$mode: outage events missing"; return 1; }
    # The iperf3 clock starts about when the event timer does (t_start); offsets in its time.
    local on_rel off_rel
    on_rel=$(t_calc "$t_on - $t_start") off_rel=$(t_calc "$t_off - $t_start")
    local stall min before during after total_rate
    read -r stall min < <(intervals "$name" | awk -v lim="$STALL_MBIT" -v from="$on_rel" '
        $1 >= from - 0.3 { if ($3 < lim) { run += $2 - $1; if (run > best) best = run } else run = 0
                           if (min == "" || $3 < min) min = $3 }
        END { printf "%.1f %.1f", best, min }')
    before=$(window_rate "$name" 0.4 "$on_rel")
    during=$(window_rate "$name" "$on_rel" "$off_rel")
    after=$(window_rate "$name" "$(t_calc "$off_rel + 2")" "$total")
    total_rate=$(tcp_rate "$name")
    local sent lost dup maxrtt
    read -r sent lost dup maxrtt < <(ping_summary "$pings")
    ((dup > 0)) && note "$mode: ping saw $dup duplicate replies through the tunnel"
    # Recovery: first poll interval after `outage off` in which the fast link forwarded >= DATA_MBIT,
    # and the first in which it reached half its rate.
    local rec_data rec_half
    read -r rec_data rec_half < <(awk -v off="$t_off" -v data="$DATA_MBIT" -v half="$(t_calc "$FAST_RATE / 2")" '
        { if (NR > 1 && pt >= off - 0.05 && $1 > pt) {
              mbit = ($2 - pb) * 8 / ($1 - pt) / 1e6
              if (d == "" && mbit >= data) d = $1 - off
              if (h == "" && mbit >= half) h = $1 - off }
          pt = $1; pb = $2 }
        END { printf "%s %s", (d == "" ? "never" : sprintf("%.1f", d)), (h == "" ? "never" : sprintf("%.1f", h)) }' \
        "$LAB_STATE/poll-$mode.txt")
    [[ $rec_data == never ]] && note "$mode: the fast link carried no data within $OUT_TAIL s after the outage ended"
    # b) pings alone, no download.
    local alone="$LAB_STATE/ping-alone-$mode.txt" total2=$((OUT_AT + OUT_FOR + 2))
    lab_exec site1 ping -n -I "$TUN_SITE" -i 0.02 -c $((total2 * 50)) -W 1 "$TUN_HUB" >"$alone" 2>&1 &
    ping_pid=$!
    LAB_PIDS+=("$ping_pid")
    emu_event "$FAST" "$OUT_AT" "$OUT_FOR" "outage on both" "outage off both" "$marks.alone"
    wait "$ping_pid" "$EVENT_PID" 2>/dev/null
    emu_reset
    local sent2 lost2 dup2 maxrtt2
    read -r sent2 lost2 dup2 maxrtt2 < <(ping_summary "$alone")
    ((dup2 > 0)) && note "$mode: ping (alone) saw $dup2 duplicate replies through the tunnel"
    OUT_ROWS+=("| $mode | $total_rate | $blackholed | $before / $during / $after | $min | $stall | $lost / $sent (max RTT $maxrtt ms) | $lost2 / $sent2 (max RTT $maxrtt2 ms) | $rec_data | $rec_half |")
}

START=$(date +%s)
# ---- references: plain TCP (no tunnel) on each link, the fast one at its dropped rate ----
run_iperf ref-slow "$(lab_wan_ip 1 1)" "$HUB" "$DURATION" -R
lab_emu "$FAST" set both rate_mbit="$DROP_MBIT" >/dev/null
run_iperf ref-fast15 "$(lab_wan_ip 1 0)" "$HUB" "$DURATION" -R
emu_reset
REF_SLOW=$(tcp_rate ref-slow) REF_FAST15=$(tcp_rate ref-fast15)
REF_SUM15=$(awk -v a="${REF_FAST15:-0}" -v b="${REF_SLOW:-0}" 'BEGIN { print a + b }')

# ---- auto ----
OUT_ROWS=()
if wgb_start auto; then
    # 3. loss
    run_iperf loss-none "$TUN_SITE" "$TUN_HUB" "$DURATION" -R
    lab_emu "$FAST" set both loss_pct="$LOSS_PCT" >/dev/null
    run_iperf loss-fast "$TUN_SITE" "$TUN_HUB" "$DURATION" -R
    snapshot loss-fast
    emu_reset
    lab_emu "$SLOW" set both loss_pct="$LOSS_PCT" >/dev/null
    run_iperf loss-slow "$TUN_SITE" "$TUN_HUB" "$DURATION" -R
    emu_reset
    L_NONE=$(tcp_rate loss-none) L_FAST=$(tcp_rate loss-fast) L_SLOW=$(tcp_rate loss-slow)
    LINES+=("| 3 | auto, 1 TCP stream down, no loss | ${L_NONE:-?} Mbit/s | reference | |")
    LINES+=("| 3 | auto, $LOSS_PCT% loss on $FAST (both directions) | ${L_FAST:-?} Mbit/s | $(ratio "$L_FAST" "$L_NONE") of no-loss | >= 0.85 |")
    LINES+=("| 3 | auto, $LOSS_PCT% loss on $SLOW (both directions) | ${L_SLOW:-?} Mbit/s | $(ratio "$L_SLOW" "$L_NONE") of no-loss | >= 0.85 |")

    # 4. outage
    outage_run auto

    # 5. rate drop
    total=$((DROP_AT + DROP_SETTLE + DURATION))
    t_start=$(date +%s.%N)
    emu_event "$FAST" "$DROP_AT" - "set both rate_mbit=$DROP_MBIT" "" "$LAB_STATE/marks-drop"
    run_iperf drop "$TUN_SITE" "$TUN_HUB" "$total" -R -i 0.5
    snapshot drop
    # What the sender (hub) believes of the fast link at the end, still at the dropped rate.
    est=$(lab_exec hub "$WGBOND" show bhub --json 2>/dev/null |
        jq -r '[.[].peers[]?.links[]? | select(.id == 0) | .rate_bps / 1e5 | round / 10] | first // "?"' 2>/dev/null)
    wait "$EVENT_PID" 2>/dev/null
    emu_reset
    t_drop=$(awk '$1 == "on" { print $2 }' "$LAB_STATE/marks-drop")
    if [[ -n $t_drop ]]; then
        drop_rel=$(t_calc "$t_drop - $t_start")
        D_BEFORE=$(window_rate drop 0.5 "$drop_rel")
        D_AFTER=$(window_rate drop "$(t_calc "$drop_rel + $DROP_SETTLE")" "$total")
        NEW_SUM=$(awk -v a="$DROP_MBIT" -v b="$SLOW_RATE" 'BEGIN { print a + b }')
        NEW_PAYLOAD=$(awk -v a="$NEW_SUM" 'BEGIN { print a * 0.9 }')
        LINES+=("| 5 | auto, before the drop ($FAST $FAST_RATE Mbit/s) | ${D_BEFORE:-?} Mbit/s | | |")
        LINES+=("| 5 | auto, from ${DROP_SETTLE} s after $FAST drops to $DROP_MBIT Mbit/s (hub's $FAST estimate at the end: ${est:-?} Mbit/s) | ${D_AFTER:-?} Mbit/s | $(ratio "$D_AFTER" "$REF_SUM15") of plain-TCP sum $REF_SUM15 ($FAST@$DROP_MBIT ${REF_FAST15:-?} + $SLOW ${REF_SLOW:-?}); $(ratio "$D_AFTER" "$NEW_PAYLOAD") of ${NEW_SUM} Mbit/s x 0.9 = $NEW_PAYLOAD | |")
    else
        note "rate drop event missing"
    fi

    # 6. UDP at 90% of the rate sum, down and up, in steady state: first a few seconds of TCP
    #    each way, so the estimates follow the links' restored rates (after test 5 the sender
    #    still believes the fast link runs at the dropped rate, and a link's estimate only
    #    grows with traffic that needs it).
    run_iperf warm-down "$TUN_SITE" "$TUN_HUB" 4 -R
    run_iperf warm-up "$TUN_SITE" "$TUN_HUB" 4
    # 6. UDP at 90% of the rate sum, down and up. Received rate from the receiver's counts
    #    (iperf3's UDP bits_per_second is the offered rate); out of order from the receiver: the
    #    client's own stream with -R, the server's report (--get-server-output) otherwise.
    for dir in down up; do
        args=(-u -b "${UDP_MBIT}M" -l "$UDP_LEN")
        if [[ $dir == down ]]; then args+=(-R); sender=hub receiver=site1; else args+=(--get-server-output); sender=site1 receiver=hub; fi
        emu_before=$(emu_drops "$dir") snd_before=$(wgb_counters "$sender") rcv_before=$(wgb_counters "$receiver")
        run_iperf "udp-$dir" "$TUN_SITE" "$TUN_HUB" "$DURATION" "${args[@]}"
        emu_after=$(emu_drops "$dir") snd_after=$(wgb_counters "$sender") rcv_after=$(wgb_counters "$receiver")
        snapshot "udp-$dir"
        read -r u_rate u_lost u_pkts u_pct < <(jq -r --argjson len "$UDP_LEN" '.end.sum
            | [((.packets - .lost_packets) * $len * 8 / .seconds / 1e6 * 10 | round / 10),
               .lost_packets, .packets, (.lost_percent * 100 | round / 100)] | map(tostring) | join(" ")' \
            "$LAB_STATE/udp-$dir.json" 2>/dev/null)
        if [[ $dir == down ]]; then
            u_ooo=$(jq -r '[.end.streams[]?.udp.out_of_order // 0] | add // "?"' "$LAB_STATE/udp-$dir.json" 2>/dev/null)
        else
            u_ooo=$(jq -r '.server_output_text // ""' "$LAB_STATE/udp-$dir.json" 2>/dev/null |
                awk '/datagrams received out-of-order/ { for (i = 1; i < NF; i++) if ($(i+1) == "datagrams" && $i + 0 > n) n = $i + 0 } END { print n + 0 }')
        fi
        [[ ${u_ooo:-0} =~ ^[0-9]+$ ]] && ((u_ooo > 0)) && note "UDP $dir: iperf3 counted $u_ooo datagrams out of order"
        # Where the lost datagrams went: emulator drops (queue, loss) per link in that direction,
        # the sender's bond send drops + link queue drops, the receiver's skipped reorder gaps.
        where="emulator queue drops $(delta_list "$emu_before" "$emu_after"); sender send/queue/UDP-send drops $(delta_list "$snd_before" "$snd_after" 1 2 5), TUN qdisc / TUN driver drops $(delta_list "$snd_before" "$snd_after" 9 10), kernel UDP send-buffer errors $(delta_list "$snd_before" "$snd_after" 8); receiver reorder skips/late $(delta_list "$rcv_before" "$rcv_after" 3 4), TUN write drops $(delta_list "$rcv_before" "$rcv_after" 6), kernel UDP receive-buffer overflows $(delta_list "$rcv_before" "$rcv_after" 7)"
        LINES+=("| 6 | auto, UDP $dir ${UDP_MBIT} Mbit/s offered (90% of $RATE_SUM), $UDP_LEN B, ${DURATION} s | ${u_rate:-?} Mbit/s received | loss ${u_pct:-?}% (${u_lost:-?}/${u_pkts:-?}), out of order ${u_ooo:-?}; $where | <= 1%, 0 |")
    done
    wgb_stop
fi

# ---- duplicate: the outage only ----
if wgb_start duplicate; then
    outage_run duplicate
    wgb_stop
fi
ELAPSED=$(($(date +%s) - START))
if [[ -n $LOGS ]]; then
    mkdir -p "$LOGS" && cp "$LAB_STATE"/*.json "$LAB_STATE"/*.txt "$LAB_STATE"/*.log "$LAB_STATE"/marks-* "$LAB_STATE"/*.toml "$LOGS"/ 2>/dev/null
fi

{
    echo "### Auto mode acceptance (\`bench-auto.sh\`)"
    echo
    echo "Scenario \`$SCENARIO\` ($(sed -e 's/#.*//' -e '/^ *$/d' "$LAB_SCENARIO" | awk '{printf "%s%s %s Mbit/s %s ms", sep, $1, $2, $3; sep="; "}')), single TCP stream (iperf3, ${CC}) unless noted, ${DURATION} s steady measurements;"
    echo "$(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores, $(uname -r), commit $(git -C "$LAB_REPO" describe --always --dirty 2>/dev/null || echo '?') (binary built $WGBOND_BUILT), run took ${ELAPSED} s."
    echo
    echo "| # | measurement | result | against the reference | target |"
    echo "|---|---|---|---|---|"
    printf '%s\n' "${LINES[@]}"
    echo
    echo "Criterion 4: \`$FAST\` in outage (both directions) for ${OUT_FOR} s, ${OUT_AT} s into a $((OUT_AT + OUT_FOR + OUT_TAIL)) s download (iperf3 -R, 0.2 s intervals),"
    echo "50 pps pings (ping -i 0.02) through the tunnel alongside; then again with pings alone (no download). Stall = longest run of"
    echo "0.2 s intervals under $STALL_MBIT Mbit/s from the outage on. Recovery = time after \`outage off\` until \`$FAST\`'s emulator forwards"
    echo ">= $DATA_MBIT Mbit/s downstream (data), and >= half its rate, in ~0.1 s polls. Targets: auto <= 3 pings lost, duplicate 0, data back <= 2 s."
    echo
    echo "| mode | download Mbit/s (whole) | packets sent into the dead link (hub -> site) | Mbit/s before / during / 2 s after | min 0.2 s interval Mbit/s | longest stall s | pings lost, with download | pings lost, alone | $FAST carries data again after s | $FAST at half rate after s |"
    echo "|---|---|---|---|---|---|---|---|---|---|"
    printf '%s\n' "${OUT_ROWS[@]}"
    if ((${#NOTES[@]})); then
        echo
        echo "Notes:"
        printf -- '- %s\n' "${NOTES[@]}"
    fi
} | tee ${OUTPUT:+"$OUTPUT"}
