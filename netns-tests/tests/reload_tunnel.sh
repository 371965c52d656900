#!/usr/bin/env bash
# Config reload (SIGHUP, what `systemctl reload` sends) while traffic flows: a site with three
# WANs, of which the config first uses two, and a hub, each in its own network namespace.
#
#   site: wan0 192.0.2.2/24, wan1 198.51.100.2/24, wan2 203.0.113.130/25 (veth pairs to the hub)
#   hub:  h0 192.0.2.1/24, h1 198.51.100.1/24, h2 203.0.113.129/25, lo 203.0.113.1/32, :51820
#
# Checks: with a paced TCP transfer running each way (sha256-verified), the site's config is
# edited (link wan0 removed, link wan2 added, mode and a priority changed) and the site daemon
# gets SIGHUP: it keeps its pid, `show --json` lists wan1 + wan2 with the new mode, wan2 carries
# traffic, and both transfers complete intact. Then a config with an error and one that changes
# the MTU are refused: the daemon keeps running with the same links and logs why. `dns` goes
# through resolvconf (a fake one on PATH that records its calls) at up and down. The site gets a
# new allowed_ips prefix (routed), the hub a second peer (shown, routed), then loses it. After
# `down` both ends' `ip` state is exactly as before `up`.
# Prints "PASS name: detail" / "FAIL name: detail" lines; exits non-zero on any failure.
# Needs root, iproute2, python3. WGBOND=path/to/wgbond (default: target/release/wgbond);
# MB=120 per direction, RATE_MBIT=100 pacing of each transfer.
set -u
# shellcheck source=../tunnel_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../tunnel_lib.sh"

MB=${MB:-120}
RATE_MBIT=${RATE_MBIT:-100}
SITE_NS="${TL_PREFIX}site"
HUB_NS="${TL_PREFIX}hub"
in_site() { ip netns exec "$SITE_NS" "$@"; }
in_hub() { ip netns exec "$HUB_NS" "$@"; }

tl_require reload_tunnel

# --- topology -------------------------------------------------------------------------------
tl_netns "$SITE_NS"
tl_netns "$HUB_NS"
tl_veth "$SITE_NS" wan0 192.0.2.2/24 "$HUB_NS" h0 192.0.2.1/24
tl_veth "$SITE_NS" wan1 198.51.100.2/24 "$HUB_NS" h1 198.51.100.1/24
tl_veth "$SITE_NS" wan2 203.0.113.130/25 "$HUB_NS" h2 203.0.113.129/25
in_site ip route add default via 192.0.2.1 dev wan0 metric 100
in_site ip route add default via 198.51.100.1 dev wan1 metric 200
in_site ip route add default via 203.0.113.129 dev wan2 metric 300
in_hub ip addr add 203.0.113.1/32 dev lo

# A fake resolvconf that records how it was called and what it read.
mkdir -p "$TMP/bin"
cat >"$TMP/bin/resolvconf" <<EOF
#!/bin/sh
echo "args: \$*" >>"$TMP/resolvconf.log"
if [ "\$1" = "-a" ]; then sed 's/^/stdin: /' >>"$TMP/resolvconf.log"; fi
EOF
chmod +x "$TMP/bin/resolvconf"

# --- keys and configs -----------------------------------------------------------------------
umask 077
SITE_KEY=$("$WGBOND" genkey)
HUB_KEY=$("$WGBOND" genkey)
SITE_PUB=$(echo "$SITE_KEY" | "$WGBOND" pubkey)
HUB_PUB=$(echo "$HUB_KEY" | "$WGBOND" pubkey)
site_config() { # site_config MODE MTU LINK...
    local mode=$1 mtu=$2 link
    shift 2
    cat <<EOF
[interface]
private_key = "$SITE_KEY"
address = ["10.99.0.2/24"]
mtu = $mtu
dns = ["10.99.0.1"]

[bond]
mode = "$mode"

[[peer]]
name = "hub"
public_key = "$HUB_PUB"
allowed_ips = ["10.99.0.1/32"${SITE_EXTRA_ALLOWED:-}]
endpoint = "203.0.113.1:51820"
EOF
    for link in "$@"; do
        printf '\n[[link]]\nname = "%s"\nbind_interface = "%s"\n' "${link%%:*}" "${link%%:*}"
        [[ $link == *:* ]] && printf 'priority = %s\n' "${link#*:}"
    done
}
SITE_CONF="$TMP/wgbsite.toml"
site_config auto 1400 wan0 wan1 >"$SITE_CONF"
HUB_CONF="$TMP/wgbhub.toml"
OTHER_PUB=$("$WGBOND" genkey | "$WGBOND" pubkey)
hub_config() { # hub_config [with-other-peer]
    cat <<EOF
[interface]
private_key = "$HUB_KEY"
address = ["10.99.0.1/24"]
listen_port = 51820

[[peer]]
name = "site"
public_key = "$SITE_PUB"
allowed_ips = ["10.99.0.2/32"]
EOF
    if [[ -n ${1:-} ]]; then
        printf '\n[[peer]]\nname = "other"\npublic_key = "%s"\nallowed_ips = ["10.97.0.0/24"]\n' "$OTHER_PUB"
    fi
}
hub_config >"$HUB_CONF"

tl_settle "$SITE_NS" "$HUB_NS"
SITE_BEFORE=$(tl_snapshot "$SITE_NS")
HUB_BEFORE=$(tl_snapshot "$HUB_NS")

# --- up ----------------------------------------------------------------------------------------
if tl_up "$HUB_NS" "$HUB_CONF" wgbhub; then
    pass hub_up "up returned 0"
else
    fail hub_up "$TL_OUT"
    exit 1
fi
OLD_PATH=$PATH
export PATH="$TMP/bin:$PATH"
tl_up "$SITE_NS" "$SITE_CONF" wgbsite
up_rc=$?
export PATH=$OLD_PATH
if ((up_rc == 0)); then
    pass site_up "up returned 0"
else
    fail site_up "$TL_OUT; log: $(tail -5 "$WGBOND_RUN_DIR/wgbsite.log" 2>/dev/null)"
    exit 1
fi
if grep -q '^args: -a tun.wgbsite -m 0 -x$' "$TMP/resolvconf.log" 2>/dev/null &&
    grep -q '^stdin: nameserver 10.99.0.1$' "$TMP/resolvconf.log"; then
    pass dns_up "resolvconf -a tun.wgbsite -m 0 -x got 'nameserver 10.99.0.1'"
else
    fail dns_up "resolvconf calls: $(cat "$TMP/resolvconf.log" 2>/dev/null)"
fi
if ! tl_ping_until "$SITE_NS" 10.99.0.1; then
    fail ping "no reply through the tunnel"
    exit 1
fi
PID=$(tl_daemon_pid wgbsite)
if [[ -z $PID ]]; then
    fail pid "show did not report the site daemon's pid"
    exit 1
fi

# links NAME NS: "mode link1,link2 ..." from show --json, links sorted by name.
links() {
    ip netns exec "$2" "$WGBOND" show "$1" --json 2>/dev/null | python3 -c '
import json, sys
s = json.load(sys.stdin)[0]
links = sorted((l["name"], l["state"], l["tx_bytes"], l["rx_bytes"]) for p in s["peers"] for l in p["links"])
print(s["mode"], ",".join(n for n, *_ in links), " ".join("%s:%s:tx=%d:rx=%d" % l for l in links))
' 2>/dev/null
}
first=$(links wgbsite "$SITE_NS")
if [[ $first == "auto wan0,wan1 "* ]]; then
    pass links_before "$first"
else
    fail links_before "$first"
fi

# --- paced transfers both ways, reload in the middle -----------------------------------------
head -c "${MB}M" /dev/urandom >"$TMP/payload"
WANT="$((MB * 1024 * 1024)) $(sha256sum "$TMP/payload" | cut -d' ' -f1)"
SINK='
import hashlib, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(1); s.settimeout(60)
c, _ = s.accept(); c.settimeout(30)
h = hashlib.sha256(); n = 0
while True:
    b = c.recv(1 << 16)
    if not b:
        break
    h.update(b); n += len(b)
print(n, h.hexdigest())
'
# Paced to RATE_MBIT so the transfer spans the reload.
SOURCE='
import socket, sys, time
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
rate = float(sys.argv[4]) * 1e6 / 8
t0 = time.time(); sent = 0
with open(sys.argv[3], "rb") as f:
    while True:
        b = f.read(1 << 16)
        if not b:
            break
        c.sendall(b)
        sent += len(b)
        ahead = sent / rate - (time.time() - t0)
        if ahead > 0:
            time.sleep(ahead)
c.shutdown(socket.SHUT_WR)
c.recv(1)
print("%.2f" % (time.time() - t0))
'
start_transfer() { # start_transfer NAME SRC_NS DST_NS DST_ADDR PORT
    local name=$1 src=$2 dst=$3 addr=$4 port=$5 tries
    ip netns exec "$dst" timeout 120 python3 -c "$SINK" "$addr" "$port" >"$TMP/$name.sink" 2>&1 &
    BG_PIDS+=($!)
    eval "SINK_PID_$name=$!"
    for ((tries = 0; tries < 50; tries++)); do
        ip netns exec "$dst" ss -ltn 2>/dev/null | grep -q "$addr:$port " && break
        sleep 0.1
    done
    ip netns exec "$src" timeout 120 python3 -c "$SOURCE" "$addr" "$port" "$TMP/payload" "$RATE_MBIT" \
        >"$TMP/$name.source" 2>&1 &
    BG_PIDS+=($!)
    eval "SOURCE_PID_$name=$!"
}
check_transfer() { # check_transfer NAME
    local name=$1 sink_pid source_pid got
    eval "sink_pid=\$SINK_PID_$name source_pid=\$SOURCE_PID_$name"
    wait "$source_pid" 2>/dev/null
    wait "$sink_pid" 2>/dev/null
    got=$(cat "$TMP/$name.sink")
    if [[ $got == "$WANT" ]]; then
        pass "$name" "$MB MB in $(cat "$TMP/$name.source") s across the reload, sha256 matches"
    else
        fail "$name" "sink got '$got', want '$WANT' (source: $(cat "$TMP/$name.source"))"
    fi
}
start_transfer upload "$SITE_NS" "$HUB_NS" 10.99.0.1 5001
start_transfer download "$HUB_NS" "$SITE_NS" 10.99.0.2 5002
sleep 3

SITE_EXTRA_ALLOWED=', "10.98.0.0/24"' site_config stripe 1400 wan1:5 wan2 >"$SITE_CONF"
kill -HUP "$PID"
# The hub gets a second peer at the same time.
HUB_PID=$(tl_daemon_pid wgbhub)
hub_config other >"$HUB_CONF"
kill -HUP "$HUB_PID"
now=""
for ((try = 0; try < 100; try++)); do
    now=$(links wgbsite "$SITE_NS")
    [[ $now == "stripe wan1,wan2 "*wan2:up:* ]] && break
    sleep 0.1
done
if [[ $now == "stripe wan1,wan2 "*wan2:up:* ]]; then
    pass reload_links "after SIGHUP: $now (after $((try * 100)) ms)"
else
    fail reload_links "after SIGHUP: $now; log: $(tail -5 "$WGBOND_RUN_DIR/wgbsite.log")"
fi
sleep 2
verdict=$(links wgbsite "$SITE_NS" | python3 -c '
import re, sys
line = sys.stdin.read()
m = re.search(r"wan2:\w+:tx=(\d+):rx=(\d+)", line)
print(("ok " if m and int(m.group(1)) > 200000 and int(m.group(2)) > 200000 else "bad ") + line.strip())
')
if [[ $verdict == ok* ]]; then
    pass new_link_traffic "the added link carries traffic both ways: ${verdict#ok }"
else
    fail new_link_traffic "${verdict#bad }"
fi
if kill -0 "$PID" 2>/dev/null && [[ $(tl_daemon_pid wgbsite) == "$PID" ]]; then
    pass same_daemon "pid $PID still serving after the reload"
else
    fail same_daemon "the daemon (pid $PID) is gone or replaced"
fi
check_transfer upload
check_transfer download
hub_links=$(links wgbhub "$HUB_NS")
if [[ $hub_links == *wan2:up:* ]]; then
    pass hub_learned "hub: $hub_links"
else
    fail hub_learned "hub: $hub_links"
fi
# shellcheck disable=SC2016  # the backticks are literal
if grep -q 'reloaded: link `wan0` removed' "$WGBOND_RUN_DIR/wgbsite.log"; then
    pass reload_log "$(grep -o 'reloaded: .*' "$WGBOND_RUN_DIR/wgbsite.log" | tail -1)"
else
    fail reload_log "no 'reloaded:' line: $(tail -5 "$WGBOND_RUN_DIR/wgbsite.log")"
fi

route=$(in_site ip route show 10.98.0.0/24)
if [[ $route == *"dev wgbsite"* ]]; then
    pass site_allowed_ips "new allowed_ips routed: $route"
else
    fail site_allowed_ips "ip route show 10.98.0.0/24: '$route'"
fi
hub_peers() {
    in_hub "$WGBOND" show wgbhub --json 2>/dev/null | python3 -c '
import json, sys
print(" ".join(sorted(p.get("name") or "?" for p in json.load(sys.stdin)[0]["peers"])))' 2>/dev/null
}
peers=$(hub_peers) route=$(in_hub ip route show 10.97.0.0/24)
if [[ $peers == "other site" && $route == *"dev wgbhub"* ]]; then
    pass hub_peer_added "hub peers: $peers; route: $route"
else
    fail hub_peer_added "hub peers: '$peers'; route: '$route'; log: $(tail -3 "$WGBOND_RUN_DIR/wgbhub.log")"
fi
hub_config >"$HUB_CONF"
kill -HUP "$HUB_PID"
for ((try = 0; try < 50; try++)); do
    [[ $(hub_peers) == "site" ]] && break
    sleep 0.1
done
peers=$(hub_peers) route=$(in_hub ip route show 10.97.0.0/24)
if [[ $peers == "site" && -z $route ]] && tl_ping_until "$SITE_NS" 10.99.0.1; then
    pass hub_peer_removed "hub peers: $peers; its route is gone; the site still reaches the hub"
else
    fail hub_peer_removed "hub peers: '$peers'; route: '$route'"
fi

# --- refused reloads -------------------------------------------------------------------------
GOOD=$(cat "$SITE_CONF")
refused() { # refused NAME EXPECTED_LOG_TEXT
    local name=$1 text=$2 try lines_before now
    lines_before=$(wc -l <"$WGBOND_RUN_DIR/wgbsite.log")
    kill -HUP "$PID"
    for ((try = 0; try < 50; try++)); do
        tail -n +"$((lines_before + 1))" "$WGBOND_RUN_DIR/wgbsite.log" | grep -q 'reload refused' && break
        sleep 0.1
    done
    now=$(links wgbsite "$SITE_NS")
    if kill -0 "$PID" 2>/dev/null && [[ $now == "stripe wan1,wan2 "* ]] &&
        tail -n +"$((lines_before + 1))" "$WGBOND_RUN_DIR/wgbsite.log" | grep -qF "$text"; then
        pass "$name" "still running with $now; log: $(tail -n +"$((lines_before + 1))" "$WGBOND_RUN_DIR/wgbsite.log" | grep -F "$text" | head -1 | cut -c1-160)"
    else
        fail "$name" "links: $now; log: $(tail -n +"$((lines_before + 1))" "$WGBOND_RUN_DIR/wgbsite.log" | tail -5)"
    fi
}
{
    echo "$GOOD"
    printf '\n[[link]]\nname = "wan0"\nbind_interface = "wan0"\nspeed = 7\n'
} >"$SITE_CONF"
refused invalid_config "$SITE_CONF:"
SITE_EXTRA_ALLOWED=', "10.98.0.0/24"' site_config stripe 1300 wan0 wan1:5 wan2 >"$SITE_CONF"
refused restart_needed "mtu changed"
echo "$GOOD" >"$SITE_CONF"
if in_site ping -n -q -c 5 -i 0.1 -W 2 10.99.0.1 >/dev/null 2>&1; then
    pass ping_after "the tunnel still answers"
else
    fail ping_after "no ping reply after the refused reloads"
fi

# --- down restores everything ------------------------------------------------------------------
if out=$(in_site timeout 40 "$WGBOND" down wgbsite 2>&1); then
    after=$(tl_snapshot "$SITE_NS")
    if [[ $after == "$SITE_BEFORE" ]]; then
        pass site_down "ip state restored exactly (links added by the reload included)"
    else
        fail site_down "ip state differs: $(diff <(echo "$SITE_BEFORE") <(echo "$after") | head -20)"
    fi
else
    fail site_down "$out"
fi
if grep -q '^args: -d tun.wgbsite -f$' "$TMP/resolvconf.log"; then
    pass dns_down "resolvconf -d tun.wgbsite -f"
else
    fail dns_down "resolvconf calls: $(cat "$TMP/resolvconf.log")"
fi
if out=$(in_hub timeout 40 "$WGBOND" down wgbhub 2>&1); then
    after=$(tl_snapshot "$HUB_NS")
    if [[ $after == "$HUB_BEFORE" ]]; then
        pass hub_down "ip state restored exactly"
    else
        fail hub_down "ip state differs: $(diff <(echo "$HUB_BEFORE") <(echo "$after") | head -20)"
    fi
else
    fail hub_down "$out"
fi

exit "$FAILED"
