#!/usr/bin/env bash
# WANs that are down at start, come back, and black-hole traffic.
#
#   site (mode = duplicate)                    hub
#   wan0 192.0.2.2    ---- veth ----  h0 192.0.2.1
#   wan1 198.51.100.2 ---- veth ----  h1 198.51.100.1     lo 203.0.113.1, UDP 51820
#
# 1. `up` succeeds with wan1 down (no carrier, no route) and the tunnel works over wan0.
# 2. wan1 comes up: its link is up within 3 s (routing refreshed from netlink notifications,
#    handshake started at once).
# 3. wan1 silently drops everything (nftables on the hub): in duplicate mode a ping running
#    meanwhile loses nothing, and the link is reported down.
set -u
# shellcheck source=../tunnel_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../tunnel_lib.sh"

S="${TL_PREFIX}site"
H="${TL_PREFIX}hub"
tl_require wan_failure_tunnel
tl_netns "$S"
tl_netns "$H"
tl_veth "$S" wan0 192.0.2.2/24 "$H" h0 192.0.2.1/24
tl_veth "$S" wan1 198.51.100.2/24 "$H" h1 198.51.100.1/24
ip -n "$S" route add default via 192.0.2.1 dev wan0 metric 100
ip -n "$H" addr add 203.0.113.1/32 dev lo
ip -n "$S" link set wan1 down

umask 077
KS=$("$WGBOND" genkey)
KH=$("$WGBOND" genkey)
PS=$(echo "$KS" | "$WGBOND" pubkey)
PH=$(echo "$KH" | "$WGBOND" pubkey)
cat >"$TMP/wgbsite.toml" <<EOF
[interface]
private_key = "$KS"
address = ["10.99.0.2/24"]

[bond]
mode = "duplicate"

[[peer]]
public_key = "$PH"
allowed_ips = ["10.99.0.1/32"]
endpoint = "203.0.113.1:51820"

[[link]]
name = "wan0"
bind_interface = "wan0"

[[link]]
name = "wan1"
bind_interface = "wan1"
gateway = "198.51.100.1"
EOF
cat >"$TMP/wgbhub.toml" <<EOF
[interface]
private_key = "$KH"
address = ["10.99.0.1/24"]
listen_port = 51820

[bond]
mode = "duplicate"

[[peer]]
public_key = "$PS"
allowed_ips = ["10.99.0.2/32"]
EOF

tl_up "$H" "$TMP/wgbhub.toml" wgbhub || {
    fail up_hub "$TL_OUT"
    exit 1
}
if tl_up "$S" "$TMP/wgbsite.toml" wgbsite && tl_ping_until "$S" 10.99.0.1; then
    pass up_with_wan_down "site up with wan1 down; ping over wan0"
else
    fail up_with_wan_down "${TL_OUT:-no ping}"
    exit 1
fi

link_state() { # link_state NAME -> state of link NAME on the site
    tl_show wgbsite "
print([l['state'] for p in s['peers'] for l in p['links'] if l['name'] == '$1'][0])"
}

ip -n "$S" link set wan1 up
start=$(date +%s.%N)
state=""
for ((try = 0; try < 50; try++)); do
    state=$(link_state wan1)
    [[ $state == up ]] && break
    sleep 0.1
done
took=$(awk -v s="$start" -v e="$(date +%s.%N)" 'BEGIN { printf "%.1f", e - s }')
if [[ $state == up ]] && awk -v t="$took" 'BEGIN { exit !(t <= 3.0) }'; then
    pass wan_back "wan1 link up ${took} s after the WAN came up"
else
    fail wan_back "wan1 link is '$state' ${took} s after the WAN came up"
fi

# Black-hole wan1 both ways at the hub while a ping runs.
ip netns exec "$S" ping -n -q -c 150 -i 0.02 -W 1 10.99.0.1 >"$TMP/ping" 2>&1 &
ping_pid=$!
BG_PIDS+=("$ping_pid")
sleep 1
ip netns exec "$H" nft -f - <<'EOF'
table inet wgbtest {
    chain in { type filter hook input priority 0; iifname "h1" udp dport 51820 drop; }
    chain out { type filter hook output priority 0; oifname "h1" udp sport 51820 drop; }
}
EOF
wait "$ping_pid"
loss=$(sed -n 's/.* \([0-9.]*\)% packet loss.*/\1/p' "$TMP/ping")
if [[ $loss == 0 ]]; then
    pass blackhole_no_loss "150 pings at 20 ms, wan1 black-holed after 1 s: 0% loss"
else
    fail blackhole_no_loss "${loss:-?}% loss"
fi
state=$(link_state wan1)
if [[ $state == down || $state == degraded ]]; then
    pass blackhole_detected "wan1 reported $state"
else
    fail blackhole_detected "wan1 reported '$state' after 2 s of black hole"
fi
exit "$FAILED"
