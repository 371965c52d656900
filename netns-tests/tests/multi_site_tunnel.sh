#!/usr/bin/env bash
# Two sites with different keys on one hub port, and cryptokey routing both ways.
#
#   site A (2 WANs)                     hub                              site B (1 WAN)
#   wgbsitea 10.99.0.2                  wgbhub 10.99.0.1                 wgbsiteb 10.99.0.3
#   wan0 192.0.2.2    ---- veth ----    h0 192.0.2.1
#   wan1 198.51.100.2 ---- veth ----    h1 198.51.100.1
#                                       h2 100.64.0.1   ---- veth ----   wan0 100.64.0.2
#                                       lo 203.0.113.1 (UDP 51820, the only port)
#
# Checks: the hub reaches both sites; site A reaches site B through the hub (the hub picks the
# peer by destination); iperf3 to both sites at once; site B sending with site A's inner address
# is dropped and counted on the hub (and site A's counter stays 0); SIGTERM restores site B.
set -u
# shellcheck source=../tunnel_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../tunnel_lib.sh"

A="${TL_PREFIX}sitea"
B="${TL_PREFIX}siteb"
H="${TL_PREFIX}hub"
tl_require multi_site_tunnel

tl_netns "$A"
tl_netns "$B"
tl_netns "$H"
tl_veth "$A" wan0 192.0.2.2/24 "$H" h0 192.0.2.1/24
tl_veth "$A" wan1 198.51.100.2/24 "$H" h1 198.51.100.1/24
tl_veth "$B" wan0 100.64.0.2/24 "$H" h2 100.64.0.1/24
ip -n "$A" route add default via 192.0.2.1 dev wan0 metric 100
ip -n "$A" route add default via 198.51.100.1 dev wan1 metric 200
ip -n "$B" route add default via 100.64.0.1 dev wan0
ip -n "$H" addr add 203.0.113.1/32 dev lo
# The hub forwards between its peers (site A to site B).
ip netns exec "$H" sysctl -q -w net.ipv4.ip_forward=1
tl_settle "$A" "$B" "$H"
B_BEFORE=$(tl_snapshot "$B")

umask 077
KA=$("$WGBOND" genkey)
KB=$("$WGBOND" genkey)
KH=$("$WGBOND" genkey)
PA=$(echo "$KA" | "$WGBOND" pubkey)
PB=$(echo "$KB" | "$WGBOND" pubkey)
PH=$(echo "$KH" | "$WGBOND" pubkey)

site_config() { # site_config KEY ADDRESS LINK...
    local key=$1 addr=$2 link
    shift 2
    cat <<EOF
[interface]
private_key = "$key"
address = ["$addr/24"]

[[peer]]
public_key = "$PH"
allowed_ips = ["10.99.0.0/24"]
endpoint = "203.0.113.1:51820"
EOF
    for link in "$@"; do
        printf '\n[[link]]\nname = "%s"\nbind_interface = "%s"\n' "$link" "$link"
    done
}
site_config "$KA" 10.99.0.2 wan0 wan1 >"$TMP/wgbsitea.toml"
site_config "$KB" 10.99.0.3 wan0 >"$TMP/wgbsiteb.toml"
cat >"$TMP/wgbhub.toml" <<EOF
[interface]
private_key = "$KH"
address = ["10.99.0.1/24"]
listen_port = 51820

[[peer]]
name = "a"
public_key = "$PA"
allowed_ips = ["10.99.0.2/32"]

[[peer]]
name = "b"
public_key = "$PB"
allowed_ips = ["10.99.0.3/32"]
EOF

for spec in "$H wgbhub" "$A wgbsitea" "$B wgbsiteb"; do
    read -r ns name <<<"$spec"
    if tl_up "$ns" "$TMP/$name.toml" "$name"; then
        pass "up_$name" "ready"
    else
        fail "up_$name" "$TL_OUT"
        exit 1
    fi
done

for target in 10.99.0.2 10.99.0.3; do
    if tl_ping_until "$H" "$target" && ip netns exec "$H" ping -n -q -c 10 -i 0.05 -W 2 "$target" | grep -q ' 0% packet loss'; then
        pass "hub_to_$target" "10/10 replies"
    else
        fail "hub_to_$target" "no clean ping"
    fi
done
if tl_ping_until "$A" 10.99.0.3 && ip netns exec "$A" ping -n -q -c 10 -i 0.05 -W 2 10.99.0.3 | grep -q ' 0% packet loss'; then
    pass site_to_site "site A reaches site B through the hub"
else
    fail site_to_site "site A cannot reach site B"
fi

# Traffic to both sites at once.
for ns in "$A" "$B"; do
    ip netns exec "$ns" timeout 30 iperf3 -s -1 -p 5201 >/dev/null 2>&1 &
    BG_PIDS+=($!)
done
sleep 0.5
ip netns exec "$H" timeout 20 iperf3 -f m -c 10.99.0.2 -t 3 >"$TMP/iperf_a" 2>&1 &
pa=$!
ip netns exec "$H" timeout 20 iperf3 -f m -c 10.99.0.3 -t 3 >"$TMP/iperf_b" 2>&1 &
pb=$!
BG_PIDS+=("$pa" "$pb")
wait "$pa" "$pb"
ra=$(awk '/receiver/ { for (i = 1; i < NF; i++) if ($(i+1) == "Mbits/sec") v = $i } END { print v }' "$TMP/iperf_a")
rb=$(awk '/receiver/ { for (i = 1; i < NF; i++) if ($(i+1) == "Mbits/sec") v = $i } END { print v }' "$TMP/iperf_b")
if [[ -n $ra && -n $rb ]] && awk -v a="$ra" -v b="$rb" 'BEGIN { exit !(a > 1 && b > 1) }'; then
    pass both_sites "concurrent iperf3: site A $ra Mbit/s, site B $rb Mbit/s"
else
    fail both_sites "site A '${ra:-none}', site B '${rb:-none}' Mbit/s"
fi

# Site B pretends to be site A (inner source 10.99.0.2): the hub must drop and count it.
ip -n "$B" addr add 10.99.0.2/32 dev wgbsiteb
if ip netns exec "$B" ping -n -q -c 5 -i 0.1 -W 1 -I 10.99.0.2 10.99.0.1 >/dev/null 2>&1; then
    fail spoof "the hub answered a spoofed source"
fi
ip -n "$B" addr del 10.99.0.2/32 dev wgbsiteb
verdict=$(tl_show wgbhub '
d = {p["name"]: p["rx_source_drops"] for p in s["peers"]}
print(("ok " if d["b"] >= 5 and d["a"] == 0 else "bad ") + "outside-allowed-ips drops: %s" % d)')
if [[ $verdict == ok* ]]; then
    pass spoof "${verdict#ok }"
else
    fail spoof "${verdict#bad }"
fi

verdict=$(tl_show wgbhub '
print(" ".join("%s:%d links" % (p["name"], len(p["links"])) for p in s["peers"]))')
if [[ $verdict == "a:2 links b:1 links" ]]; then
    pass hub_show "$verdict"
else
    fail hub_show "$verdict"
fi
# systemd's stop: SIGTERM to the daemon tears down as cleanly as `down`.
pid=$(tl_daemon_pid wgbsiteb)
if [[ -n $pid ]] && kill -TERM "$pid"; then
    for ((try = 0; try < 100; try++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        fail sigterm "daemon $pid still running 10 s after SIGTERM"
    elif [[ $(tl_snapshot "$B") == "$B_BEFORE" ]]; then
        pass sigterm "site B's daemon exited on SIGTERM; ip state restored exactly"
    else
        fail sigterm "ip state differs: $(diff <(echo "$B_BEFORE") <(tl_snapshot "$B") | head -10)"
    fi
else
    fail sigterm "no pid for site B's daemon"
fi
exit "$FAILED"
