#!/usr/bin/env bash
# Does the link emulator do what its settings say? Measured end to end, site -> router -> hub,
# over the first link of the `equal` scenario (settings changed at run time between checks).
set -u
# shellcheck source=../testlib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../testlib.sh"
# This test checks the emulator's timing, which other load on a shared 2-core machine would
# blur: run its threads at real-time priority here (the other tests save that CPU).
# shellcheck disable=SC2034 # read by lab_up (lab.sh)
LAB_EMU_REALTIME=1
lab_trap
lab_up equal --no-lan || {
    t_fail lab_up "could not build the lab"
    exit 1
}

SRC=$(lab_wan_ip 1 0)
HUB=$LAB_HUB_IP
LINK=${LAB_LINK_NAME[0]}
t_warm site1 "$SRC" "$HUB"

# 1. Delay: RTT = 2 x one-way delay (+-2 ms), also after a change at run time.
for delay in 10 25; do
    lab_emu "$LINK" set both delay_ms=$delay >/dev/null
    read -r loss min avg max _ p90 < <(t_ping site1 "$SRC" "$HUB" 20 0.05)
    t_range "rtt_delay_${delay}ms_avg" "$avg" "$((2 * delay - 2))" "$((2 * delay + 2))" " ms"
    t_range "rtt_delay_${delay}ms_p90" "$p90" "$((2 * delay - 2))" "$((2 * delay + 2))" " ms"
    # No spikes either (a little slack: the machine may be busy with other work).
    t_range "rtt_delay_${delay}ms_max" "$max" "$((2 * delay - 2))" "$((2 * delay + 5))" " ms"
done
lab_emu "$LINK" set both delay_ms=10 >/dev/null

# 2. Rate: one TCP stream reaches 90-98% of the rate, each direction at its own rate.
t_iperf_server hub || t_fail iperf_server "iperf3 server did not start"
lab_emu "$LINK" set down rate_mbit=50 >/dev/null
lab_emu "$LINK" set up rate_mbit=20 >/dev/null
down=$(t_iperf site1 "$SRC" "$HUB" 10 -R)
t_range tcp_down_50mbit "$down" 45 49 " Mbit/s"
up=$(t_iperf site1 "$SRC" "$HUB" 6)
t_range tcp_up_20mbit "$up" 18 19.6 " Mbit/s"
lab_emu "$LINK" set up rate_mbit=50 >/dev/null

# 3. Bounded queue: under a UDP overload the queueing delay sits at about queue_ms, never more,
#    and the excess is tail-dropped.
lab_emu "$LINK" set down rate_mbit=10 queue_ms=50 >/dev/null
lab_emu "$LINK" stats reset >/dev/null
lab_exec site1 timeout 15 iperf3 -c "$HUB" -B "$SRC" -R -u -b 15M -t 4 -l 1400 >/dev/null 2>&1 &
flood=$!
LAB_PIDS+=("$flood")
sleep 1.5
# Most pings meet a full queue and are dropped (60-100 % of them): send many, so that some
# get through to measure it.
read -r loss min avg max _ < <(t_ping site1 "$SRC" "$HUB" 40 0.05)
wait "$flood"
# ping's reply crosses the full 50 ms queue in the down direction: RTT ~ 20 + 50 ms.
t_range queue_delay_under_overload_avg "$avg" 60 73 " ms"
t_range queue_delay_under_overload_max "$max" 60 73 " ms"
qdrops=$(lab_emu_get "$LINK" down.drop_queue)
t_range queue_tail_drops "${qdrops:-0}" 500 1000000
lab_emu "$LINK" set down rate_mbit=50 >/dev/null

# 4. Outage: nothing passes while on; everything is back once off.
lab_emu "$LINK" stats reset >/dev/null
lab_emu "$LINK" outage on >/dev/null
read -r loss _ < <(t_ping site1 "$SRC" "$HUB" 10 0.05)
t_range outage_ping_loss "$loss" 100 100 "%"
# Every ping is dropped and counted; ARP/ND retries during the outage may add a few frames.
t_range outage_drops_counted "$(lab_emu_get "$LINK" up.drop_outage)" 10 40
lab_emu "$LINK" outage off >/dev/null
read -r loss _ < <(t_ping site1 "$SRC" "$HUB" 10 0.05)
t_range outage_recovered_loss "$loss" 0 0 "%"

# 5. Random loss: 10% each way -> ~19% of pings lost; each direction counts ~10%.
lab_emu "$LINK" stats reset >/dev/null
lab_emu "$LINK" set both loss_pct=10 >/dev/null
read -r loss _ < <(t_ping site1 "$SRC" "$HUB" 1000 0.002)
t_range random_loss_ping "$loss" 14 24 "%"
rx=$(lab_emu_get "$LINK" up.rx_packets)
dropped=$(lab_emu_get "$LINK" up.drop_loss)
t_range random_loss_counted_up "$(t_calc "100 * $dropped / $rx")" 7.5 12.5 "%"
lab_emu "$LINK" set both loss_pct=0 >/dev/null

# 6. Gilbert-Elliott: ~9% loss (p=2%, r=20%) in bursts averaging ~5 packets; independent
#    loss at that rate would average ~1.1.
lab_emu "$LINK" set up ge_p_pct=2 ge_r_pct=20 >/dev/null
seqs=$(lab_exec site1 ping -n -I "$SRC" -c 1000 -i 0.002 -W 2 "$HUB" 2>/dev/null |
    sed -n 's/.*icmp_seq=\([0-9]*\) .*/\1/p')
lab_emu "$LINK" set up ge_p_pct=0 >/dev/null
read -r lost bursts < <(awk -v n=1000 '{ got[$1] = 1 }
    END { for (i = 1; i <= n; i++) { if (!got[i]) { lost++; if (prev) bursts++ } prev = got[i] }
          print lost + 0, bursts + 0 }' <<<"$seqs")
t_range burst_loss_rate "$(t_calc "$lost / 10")" 4 16 "%"
t_range burst_loss_mean_burst "$(t_calc "$lost / ($bursts + 0.0001)")" 2.5 20 " packets"

# 7. Jitter without reordering: RTTs spread over 2 x (delay +- jitter), never outside (+ the
#    same 3 ms slack for a busy machine as above).
lab_emu "$LINK" set both delay_ms=20 jitter_ms=5 >/dev/null
read -r loss min avg max mdev _ < <(t_ping site1 "$SRC" "$HUB" 200 0.01)
t_range jitter_rtt_min "$min" 29 41 " ms"
t_range jitter_rtt_max "$max" 41 55 " ms"
t_range jitter_rtt_mdev "$mdev" 1 8 " ms"
lab_emu "$LINK" set both delay_ms=10 jitter_ms=0 >/dev/null

# The emulator accounts for its CPU use.
cpu=$(lab_emu_get "$LINK" cpu_pct)
t_range emulator_reports_cpu "${cpu:-}" 0 100 "%"

exit "$TEST_FAILED"
