#!/usr/bin/env bash
# Is the lab itself what the end-to-end tests assume? Per-WAN policy routing (traffic from a WAN's
# address uses that WAN's emulated link, the default route the first WAN), in IPv4 and IPv6, NAT
# per WAN to its own public address and its rebinding, WAN readdressing, a flapping link, a
# second independent site, a hub with one address, and gc of a crashed lab.
set -u
# shellcheck source=../testlib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../testlib.sh"
lab_trap
lab_up cable-lte-sat --sites 2 --nat --ipv6 || {
    t_fail lab_up "could not build the lab"
    exit 1
}
HUB=$LAB_HUB_IP
DST=$HUB # where check_path pings

# Frames the emulators of site S passed upwards, per link, as "n0 n1 n2".
up_counts() {
    local s=$1 i out=()
    for i in "${!LAB_LINK_NAME[@]}"; do
        out+=("$(lab_emu "$s:${LAB_LINK_NAME[$i]}" stats | tr ' ' '\n' | sed -n 's/^up.passed_packets=//p')")
    done
    echo "${out[*]}"
}
reset_all() {
    local s i
    for ((s = 1; s <= LAB_SITES; s++)); do
        for i in "${!LAB_LINK_NAME[@]}"; do
            lab_emu "$s:${LAB_LINK_NAME[$i]}" stats reset >/dev/null
        done
    done
}
# check_path NAME SITE EXPECTED_LINK [ping -I SRC]: 5 pings must cross exactly that link (other
# links may carry up to 3 stray frames: ARP probes, IPv6 neighbour discovery).
check_path() {
    local name=$1 s=$2 want=$3 counts i bad=""
    shift 3
    reset_all
    lab_exec "site$s" ping -n -q -c 5 -i 0.1 -W 2 "$@" "$DST" >/dev/null 2>&1
    read -r -a counts < <(up_counts "$s")
    for i in "${!counts[@]}"; do
        if ((i == want && counts[i] < 5)) || ((i != want && counts[i] > 3)); then
            bad=1
        fi
    done
    if [[ -z $bad ]]; then
        t_pass "$name" "up frames per link: ${counts[*]}"
    else
        t_fail "$name" "expected >= 5 frames on link $want only, got: ${counts[*]}"
    fi
}

for ((s = 1; s <= LAB_SITES; s++)); do
    for i in "${!LAB_LINK_NAME[@]}"; do
        t_warm "site$s" "$(lab_wan_ip "$s" "$i")" "$HUB"
    done
done
for ((s = 1; s <= LAB_SITES; s++)); do
    for i in "${!LAB_LINK_NAME[@]}"; do
        check_path "site${s}_source_${LAB_LINK_NAME[$i]}_uses_its_link" "$s" "$i" -I "$(lab_wan_ip "$s" "$i")"
    done
    check_path "site${s}_default_route_uses_first_wan" "$s" 0
done
# The same over IPv6 (--ipv6): per-WAN source rules and the main default route.
DST=$LAB_HUB_IP6
for i in "${!LAB_LINK_NAME[@]}"; do
    t_warm site1 "$(lab_wan_ip6 1 "$i")" "$DST"
    check_path "site1_ipv6_source_${LAB_LINK_NAME[$i]}_uses_its_link" 1 "$i" -I "$(lab_wan_ip6 1 "$i")"
done
check_path site1_ipv6_default_route_uses_first_wan 1 0
DST=$HUB

# Site 2's traffic must not touch site 1's emulators.
reset_all
lab_exec site2 ping -n -q -c 5 -i 0.1 -I "$(lab_wan_ip 2 0)" "$HUB" >/dev/null 2>&1
read -r n0 _ < <(up_counts 1)
t_range sites_are_independent "$n0" 0 2 " frames on site1's first link"

# NAT: the hub sees each WAN as its own public address.
t_iperf_server hub 5201
lab_exec hub timeout 20 iperf3 -s -1 -p 5210 >"$LAB_STATE/nat-check.log" 2>&1 &
LAB_PIDS+=($!)
for _ in $(seq 50); do
    lab_exec hub ss -ltn | grep -q ':5210 ' && break
    sleep 0.1
done
t_iperf site1 "$(lab_wan_ip 1 1)" "$HUB" 1 -p 5210 >/dev/null
wait "${LAB_PIDS[-1]}" 2>/dev/null
if grep -q "Accepted connection from $(lab_public_ip 1 1)," "$LAB_STATE/nat-check.log"; then
    t_pass nat_per_wan "hub saw $(lab_public_ip 1 1) for site1's ${LAB_LINK_NAME[1]}"
else
    t_fail nat_per_wan "hub did not see $(lab_public_ip 1 1): $(grep -m1 Accepted "$LAB_STATE/nat-check.log")"
fi

# A NAT mapping change (4G reconnect): an ongoing flow reaches the hub from the new address.
lab_exec site1 ping -n -q -I "$(lab_wan_ip 1 1)" -c 30 -i 0.1 -W 2 "$HUB" >"$LAB_STATE/rebind-ping.txt" 2>&1 &
rebind_ping=$!
LAB_PIDS+=("$rebind_ping")
sleep 1
old_pub=$(lab_public_ip 1 1)
new_pub=$(lab_nat_rebind 1 1)
sleep 1.5
if [[ $new_pub != "$old_pub" ]] && lab_exec hub ip neigh show "$new_pub" | grep -qE 'REACHABLE|STALE|DELAY'; then
    t_pass nat_rebind_moves_flow "hub now talks to $new_pub (was $old_pub)"
else
    t_fail nat_rebind_moves_flow "hub has no neighbour $new_pub (old $old_pub): $(lab_exec hub ip neigh)"
fi
wait "$rebind_ping"
read -r loss < <(sed -n 's/.* \([0-9.]*\)% packet loss.*/\1/p' "$LAB_STATE/rebind-ping.txt")
t_range nat_rebind_flow_survives "${loss:-100}" 0 20 "% ping loss"

# A new WAN address (DHCP renew): the source rule and routes follow it.
old_ip=$(lab_wan_ip 1 2)
new_ip=$(lab_wan_readdress 1 2)
t_warm site1 "$new_ip" "$HUB"
check_path site1_readdressed_wan_uses_its_link 1 2 -I "$new_ip"
if lab_exec site1 ip -4 -o addr show dev wan2 | grep -q " $old_ip/"; then
    t_fail readdress_removes_old "old address $old_ip still on wan2"
else
    t_pass readdress_removes_old "wan2: $old_ip -> $new_ip"
fi

# A flapping link: outages come and go on schedule, and lab_down can stop it mid-way.
lab_emu cable stats reset >/dev/null
lab_flap cable 0.3 0.3 100
flap=$LAB_LAST_PID
read -r loss _ < <(t_ping site1 "$(lab_wan_ip 1 0)" "$HUB" 30 0.05)
t_range flap_loses_about_half "$loss" 25 75 "% ping loss"
lab_kill_pids "$flap"
lab_emu cable outage off >/dev/null
t_range flap_stopped "$(lab_alive "$flap" && echo 1 || echo 0)" 0 0

# The hub has ONE (global) address.
t_range hub_has_one_address "$(lab_exec hub ip -4 -o addr show scope global | wc -l)" 1 1
t_range hub_has_one_ipv6_address "$(lab_exec hub ip -6 -o addr show scope global | wc -l)" 1 1

# gc removes a lab whose owner died without cleaning up (the owner execs sleep, so killing it
# leaves no orphan of ours behind).
stale="wgb-$((900000 + $$ % 99999))-"
LAB_PREFIX=$stale bash -c "source '$LAB_DIR/lab.sh'; lab_up equal --no-lan >/dev/null && exec sleep 120" &
owner=$!
for ((tries = 0; tries < 100; tries++)); do
    [[ -S $LAB_RUN_DIR/${stale%-}/emu-s1-cable2.sock ]] && break
    sleep 0.1
done
emu_pids=$(cat "$LAB_RUN_DIR/${stale%-}"/emu-*.pid 2>/dev/null)
kill -KILL "$owner"
wait "$owner" 2>/dev/null
before=$(ip netns list | grep -c "^$stale")
lab_gc >/dev/null 2>&1
after=$(ip netns list | grep -c "^$stale")
alive=0
for pid in $emu_pids; do lab_alive "$pid" && alive=$((alive + 1)); done
if ((before == 4 && after == 0 && alive == 0)) && [[ -n $emu_pids && ! -e $LAB_RUN_DIR/${stale%-} ]]; then
    t_pass gc_removes_crashed_lab "4 namespaces and $(wc -w <<<"$emu_pids") emulators removed"
else
    t_fail gc_removes_crashed_lab "namespaces before/after: $before/$after, emulators alive: $alive (pids: $emu_pids)"
    lab_down_prefix "$stale"
fi

exit "$TEST_FAILED"
