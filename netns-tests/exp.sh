#!/usr/bin/env bash
# One lab experiment, for A/B comparisons of two builds (docs/benchmarks.md calls these
# "exp.sh" runs): a fresh lab of SCENARIO, one wgbond pair in MODE (no routes), one iperf3
# stream down (hub -> site) then up for SECONDS each, the sender's `ss -ti` sampled twice a
# second, both ends' `wgbond show` at the end. Alternate builds round by round, e.g.
#   for r in 1 2 3; do for b in A B; do WGBOND=$b netns-tests/exp.sh hetero auto 8 | grep '^=='; done; done
#
# usage: sudo netns-tests/exp.sh [SCENARIO [MODE [SECONDS]]]   (default hetero auto 8)
# Environment (all optional):
#   WGBOND=PATH     the binary (default target/release/wgbond)
#   CC=cubic        iperf3 -C on both ends (default: the host's, BBR here)
#   WARM=1          4 s of TCP each way first, so that the rate estimates are warm
#   DIRS="down up"  the directions, in order; "both" is one stream each way at once
#                   (iperf3 --bidir), both goodputs printed
#   UDP=72M         iperf3 -u at that rate, 1300-byte datagrams, instead of TCP
#   INTERVALS=1     print iperf3's per-second figures
#   EVENT='CMD'     run CMD in the background during each direction, with the lab's
#                   functions, e.g. EVENT='lab_emu fast set both loss_pct=5 >/dev/null'
#   EXTRA_BOND='...'  extra lines for both ends' [bond] section
#   KEEPLOG=PREFIX  keep both daemons' logs as PREFIX-site.log and PREFIX-hub.log
#   TRACE=FILE      poll `wgbond show` every 50 ms (TRACE_N polls, TRACE_ROLE, TRACE_IF)
# The lab, its processes and its namespaces go on exit, also on failure (lab_trap).
set -u
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "$HERE/testlib.sh"
SCENARIO=${1:-hetero} MODE=${2:-auto} DURATION=${3:-8}
lab_trap
lab_up "$SCENARIO" --no-lan >/dev/null || exit 1
HUB=$LAB_HUB_IP
for i in "${!LAB_LINK_NAME[@]}"; do t_warm site1 "$(lab_wan_ip 1 "$i")" "$HUB"; done
WGBOND=${WGBOND:-$HERE/../target/release/wgbond}
export WGBOND_RUN_DIR="$LAB_STATE/wgbond"
t_bench_keys "$WGBOND" || exit 1
t_bench_configs "$MODE" 10.98.0.1 10.98.0.2
if [[ -n ${EXTRA_BOND:-} ]]; then
    for f in "$LAB_STATE/bhub.toml" "$LAB_STATE/bsite.toml"; do
        awk -v extra="$EXTRA_BOND" '{ print } /^mode = / { print extra }' "$f" >"$f.new" && mv "$f.new" "$f"
    done
fi
lab_bg hub "$WGBOND" up "$LAB_STATE/bhub.toml" --foreground >"$LAB_STATE/wgbond-hub.log" 2>&1
lab_bg site1 "$WGBOND" up "$LAB_STATE/bsite.toml" --foreground >"$LAB_STATE/wgbond-site.log" 2>&1
for ((tries = 0; tries < 50; tries++)); do
    lab_exec site1 ip -br addr show dev bsite 2>/dev/null | grep -q 10.98.0.2 && break; sleep 0.1
done
lab_exec site1 ping -n -q -c 1 -w 20 10.98.0.1 >/dev/null || { echo no tunnel; for f in "$LAB_STATE"/wgbond-*.log; do tail -n 5 "$f"; done; exit 1; }
t_iperf_server hub 5201
sample() { # ROLE
    for ((k = 0; k < DURATION * ${SAMPLES_PER_S:-2}; k++)); do
        lab_exec "$1" ss -tin dst "$2" 2>/dev/null | grep -o 'cwnd:[0-9]*\|ssthresh:[0-9]*\|bbr:([^)]*)\|rtt:[0-9./]*\|minrtt:[0-9.]*\|pacing_rate [0-9.]*[MK]bps\|delivery_rate [0-9.]*[MK]bps\|busy:[0-9]*ms\|cwnd_limited:[0-9]*ms([0-9.]*%)\|rwnd_limited:[0-9]*ms([0-9.]*%)\|unacked:[0-9]*\|retrans:[0-9/]*' | tr '\n' ' '
        echo; sleep ${SAMPLE_DT:-0.5}
    done
}
if [[ -n ${TRACE:-} ]]; then
    ( t0=$(date +%s.%N); for ((i = 0; i < ${TRACE_N:-300}; i++)); do
        echo "$(awk -v a="$(date +%s.%N)" -v b="$t0" 'BEGIN{printf "%.2f", a-b}') $(lab_exec ${TRACE_ROLE:-site1} "$WGBOND" show 2>/dev/null | sed -n "/${TRACE_IF:-bsite}/,\$p" | grep -oE "rate [0-9.]+ Mbit/s \(pacing [0-9.]+|[0-9]+ unsendable|[0-9]+ gaps skipped" | sed 's/Mbit.s (pacing//' | tr "\n" " ")"; sleep 0.05; done > "$TRACE" ) &
fi
if [[ -n ${WARM:-} ]]; then
    echo "warm down $(lab_exec site1 timeout 20 iperf3 -f m -c 10.98.0.1 -B 10.98.0.2 -t 4 -R ${CC:+-C $CC} 2>&1 | grep receiver)"
    echo "warm up $(lab_exec site1 timeout 20 iperf3 -f m -c 10.98.0.1 -B 10.98.0.2 -t 4 ${CC:+-C $CC} 2>&1 | grep receiver)"
fi
for dir in ${DIRS:-down up}; do
    [[ -n ${EVENT:-} ]] && { ( eval "$EVENT" ) & evp=$!; }
    case $dir in
    down) args=(-R); role=hub; dst=10.98.0.2 ;;
    both) args=(--bidir); role=site1; dst=10.98.0.1 ;;
    *) args=(); role=site1; dst=10.98.0.1 ;;
    esac
    sample "$role" "$dst" > "$LAB_STATE/ss-$dir.txt" &
    sp=$!
    [[ -n ${UDP:-} ]] && args+=(-u -b "$UDP" -l 1300) && [[ $dir == up ]] && args+=(--get-server-output)
    lab_exec site1 timeout $((DURATION + 15)) iperf3 -f m -c 10.98.0.1 -B 10.98.0.2 -t "$DURATION" ${CC:+-C $CC} "${args[@]}" > $LAB_STATE/iperf.txt 2>&1
    [[ -n ${UDP:-} ]] && grep -E "receiver|out-of-order" $LAB_STATE/iperf.txt | tail -3 && [[ -n ${INTERVALS:-} ]] && grep -E "sec .*%\)" $LAB_STATE/iperf.txt | awk '{print $3, $(NF-1)}' | tr '\n' ';' 
    # With --bidir: "up U + down D = SUM" (iperf3 tags the site's sending stream TX-C).
    rate=$(awk '/receiver/ { for (i = 1; i < NF; i++) if ($(i+1) == "Mbits/sec") v = $i; if (/TX-C/) u = v; else if (/RX-C/) d = v }
        END { if (u != "" && d != "") printf "up %s + down %s = %.1f", u, d, u + d; else print v }' $LAB_STATE/iperf.txt)
    [[ -n ${INTERVALS:-} ]] && grep -E "sec .*Mbits/sec" $LAB_STATE/iperf.txt | awk '{print $3, $7, $8}' | tr '\n' ';'; echo
    [[ -n ${EVENT:-} ]] && wait $evp
    wait $sp
    echo "== $SCENARIO $MODE $dir: $rate Mbit/s"
    if [[ -n ${SAMPLE_DT:-} ]]; then tr -s ' ' '\n' < "$LAB_STATE/ss-$dir.txt" | grep -v '^$' | awk '/^rtt:/{if(l!="")print l; l=$0; next}{l=l" "$0} END{print l}' | grep -v 'bbr\|cwnd:1[0-4] ' | cut -c1-200; else grep -v '^$' "$LAB_STATE/ss-$dir.txt" | awk 'NR%2==0' | cut -c1-400; fi
    [[ -n ${KEEPLOG:-} ]] && cp "$LAB_STATE"/wgbond-site.log "$KEEPLOG-site.log" && cp "$LAB_STATE"/wgbond-hub.log "$KEEPLOG-hub.log"
    for r in site1 hub; do
      echo "-- show $r"; lab_exec $r "$WGBOND" show 2>&1 | head -40
    done
done
