#!/usr/bin/env bash
# Is the lab itself what the end-to-end tests assume? Per-WAN policy routing (traffic from a WAN's
# address uses that WAN's emulated link, the default route the first WAN), NAT per WAN to its own
# public address, a second independent site, a hub with one address, and gc of a crashed lab.
set -u
# shellcheck source=../testlib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../testlib.sh"
lab_trap
lab_up cable-lte-sat --sites 2 --nat || {
    t_fail lab_up "could not build the lab"
    exit 1
}
HUB=$LAB_HUB_IP

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
# check_path NAME SITE EXPECTED_LINK [ping -I SRC]: 5 pings must cross exactly that link.
check_path() {
    local name=$1 s=$2 want=$3 counts i bad=""
    shift 3
    reset_all
    lab_exec "site$s" ping -n -q -c 5 -i 0.1 -W 2 "$@" "$HUB" >/dev/null 2>&1
    read -r -a counts < <(up_counts "$s")
    for i in "${!counts[@]}"; do
        if ((i == want && counts[i] < 5)) || ((i != want && counts[i] > 2)); then
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
# Site 2's traffic must not touch site 1's emulators.
reset_all
lab_exec site2 ping -n -q -c 5 -i 0.1 -I "$(lab_wan_ip 2 0)" "$HUB" >/dev/null 2>&1
read -r n0 _ < <(up_counts 1)
t_range sites_are_independent "$n0" 0 2 " frames on site1's first link"

# NAT: the hub sees each WAN as its own public address.
t_iperf_server hub 5201
lab_exec hub timeout 20 iperf3 -s -1 -p 5210 >"$LAB_STATE/nat-check.log" 2>&1 &
LAB_PIDS+=($!)
sleep 0.5
t_iperf site1 "$(lab_wan_ip 1 1)" "$HUB" 1 -p 5210 >/dev/null
wait "${LAB_PIDS[-1]}" 2>/dev/null
if grep -q "Accepted connection from $(lab_public_ip 1 1)," "$LAB_STATE/nat-check.log"; then
    t_pass nat_per_wan "hub saw $(lab_public_ip 1 1) for site1's ${LAB_LINK_NAME[1]}"
else
    t_fail nat_per_wan "hub did not see $(lab_public_ip 1 1): $(grep -m1 Accepted "$LAB_STATE/nat-check.log")"
fi

# The hub has ONE (global) address.
t_range hub_has_one_address "$(lab_exec hub ip -4 -o addr show scope global | wc -l)" 1 1

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
