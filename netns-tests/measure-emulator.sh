#!/usr/bin/env bash
# Measures the link emulator itself: UDP with 1500-byte IP packets (1514-byte frames) through one
# unshaped link (5 ms delay) in BOTH directions at once, at rising rates, reporting delivered rate,
# loss and the emulator's CPU use (from its own getrusage) per 100 Mbit/s carried.
# Usage: sudo netns-tests/measure-emulator.sh [RATE_MBIT_PER_DIRECTION...]   (default 100 200 400 800)
set -u
# shellcheck source=testlib.sh
source "$(dirname "${BASH_SOURCE[0]}")/testlib.sh"
SECS=${SECS:-8}
rates=("$@")
((${#rates[@]})) || rates=(100 200 400 800)

lab_trap
lab_up equal --no-lan >/dev/null || exit 1
SRC=$(lab_wan_ip 1 0)
LINK=${LAB_LINK_NAME[0]}
lab_emu "$LINK" set both rate_mbit=0 delay_ms=5 >/dev/null
t_warm site1 "$SRC" "$LAB_HUB_IP"
t_iperf_server hub 5201 && t_iperf_server hub 5202 || exit 1

cpu_s() { lab_emu "$LINK" stats | tr ' ' '\n' | awk -F= '/^cpu_(user|sys)_s=/ { s += $2 } END { print s }'; }
mbit() { awk '/receiver/ { for (i = 1; i < NF; i++) if ($(i+1) == "Mbits/sec") v = $i; for (i = 1; i <= NF; i++) if ($i ~ /^\(.*%\)$/) l = $i } END { print v, l }'; }

echo "| offered per direction | delivered up | delivered down | loss up | loss down | emulator CPU (% of one core) | CPU % per 100 Mbit/s carried |"
echo "|---|---|---|---|---|---|---|"
for rate in "${rates[@]}"; do
    lab_emu "$LINK" stats reset >/dev/null
    before=$(cpu_s)
    t0=$(date +%s.%N)
    lab_exec site1 timeout $((SECS + 15)) iperf3 -f m -u -c "$LAB_HUB_IP" -B "$SRC" -p 5201 -b "${rate}M" -l 1472 -t "$SECS" >/tmp/lab-measure-up.$$ 2>&1 &
    up_pid=$!
    LAB_PIDS+=("$up_pid")
    lab_exec site1 timeout $((SECS + 15)) iperf3 -f m -u -c "$LAB_HUB_IP" -B "$SRC" -p 5202 -R -b "${rate}M" -l 1472 -t "$SECS" >/tmp/lab-measure-down.$$ 2>&1
    wait "$up_pid"
    t1=$(date +%s.%N)
    after=$(cpu_s)
    read -r up_rate up_loss < <(mbit </tmp/lab-measure-up.$$)
    read -r down_rate down_loss < <(mbit </tmp/lab-measure-down.$$)
    rm -f /tmp/lab-measure-up.$$ /tmp/lab-measure-down.$$
    cpu_pct=$(t_calc "100 * ($after - $before) / ($t1 - $t0)")
    per100=$(t_calc "$cpu_pct / ((${up_rate:-0} + ${down_rate:-0}) / 100 + 0.000001)")
    echo "| $rate Mbit/s | ${up_rate:-?} | ${down_rate:-?} | ${up_loss:-?} | ${down_loss:-?} | $cpu_pct | $per100 |"
done
echo
echo "emulator: $(lab_emu "$LINK" stats | tr ' ' '\n' | grep -E 'drop|send_errors' | grep -v '=0$' | tr '\n' ' ')"
