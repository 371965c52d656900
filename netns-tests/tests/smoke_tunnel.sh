#!/usr/bin/env bash
# Smoke test of the bonded tunnel end to end, no link emulator: a site with two WANs and a hub
# with one public address, each in its own network namespace, joined by two veth pairs.
#
#   site namespace                                 hub namespace
#   +---------------------------+                  +-------------------------------+
#   | wgbsite 10.99.0.2/24 (TUN)|                  | wgbhub 10.99.0.1/24 (TUN)     |
#   | wan0 192.0.2.2/24     ----+-- veth pair 0 ---+ h0 192.0.2.1/24               |
#   | wan1 198.51.100.2/24  ----+-- veth pair 1 ---+ h1 198.51.100.1/24            |
#   | default via .1 on each WAN|                  | lo 203.0.113.1/32 (public),   |
#   | (metric 100 / 200)        |                  | UDP port 51820                |
#   +---------------------------+                  +-------------------------------+
#
# Checks: `up` returns once ready; ping through the bond; a 50 MB TCP transfer each way with
# sha256-verified content; `show` lists both links with RTT and bytes on both ends; `show
# --watch` gives what the links carry now; the hub's metrics endpoint reports both links' bytes; `down`
# restores `ip link/addr/rule/route` exactly; a failed `up` (missing WAN) changes nothing.
# Prints "PASS name: detail" / "FAIL name: detail" lines; exits non-zero on any failure.
# Needs root, iproute2, python3. WGBOND=path/to/wgbond (default: target/release/wgbond);
# MODE=auto|stripe|duplicate|failover, MB=50, FULL_TUNNEL=0|1.
set -u
# shellcheck source=../tunnel_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../tunnel_lib.sh"

MODE=${MODE:-auto}
MB=${MB:-50}
# FULL_TUNNEL=1: the site routes everything (0.0.0.0/0, ::/0) into the tunnel.
FULL_TUNNEL=${FULL_TUNNEL:-0}
if ((FULL_TUNNEL)); then
    SITE_ALLOWED='"0.0.0.0/0", "::/0"'
else
    SITE_ALLOWED='"10.99.0.1/32"'
fi
SITE_NS="${TL_PREFIX}site"
HUB_NS="${TL_PREFIX}hub"
in_site() { ip netns exec "$SITE_NS" "$@"; }
in_hub() { ip netns exec "$HUB_NS" "$@"; }

tl_require smoke_tunnel

# --- topology -------------------------------------------------------------------------------
tl_netns "$SITE_NS"
tl_netns "$HUB_NS"
tl_veth "$SITE_NS" wan0 192.0.2.2/24 "$HUB_NS" h0 192.0.2.1/24
tl_veth "$SITE_NS" wan1 198.51.100.2/24 "$HUB_NS" h1 198.51.100.1/24
in_site ip route add default via 192.0.2.1 dev wan0 metric 100
in_site ip route add default via 198.51.100.1 dev wan1 metric 200
in_hub ip addr add 203.0.113.1/32 dev lo

# --- keys and configs -----------------------------------------------------------------------
umask 077
SITE_KEY=$("$WGBOND" genkey)
HUB_KEY=$("$WGBOND" genkey)
SITE_PUB=$(echo "$SITE_KEY" | "$WGBOND" pubkey)
HUB_PUB=$(echo "$HUB_KEY" | "$WGBOND" pubkey)
cat >"$TMP/wgbsite.toml" <<EOF
[interface]
private_key = "$SITE_KEY"
address = ["10.99.0.2/24"]
# Every link's socket uses this local port (firewalls and port forwards can name it).
listen_port = 40123

[bond]
mode = "$MODE"

[[peer]]
name = "hub"
public_key = "$HUB_PUB"
allowed_ips = [$SITE_ALLOWED]
endpoint = "203.0.113.1:51820"

[[link]]
name = "wan0"
bind_interface = "wan0"

[[link]]
name = "wan1"
bind_interface = "wan1"
EOF
cat >"$TMP/wgbhub.toml" <<EOF
[interface]
private_key = "$HUB_KEY"
address = ["10.99.0.1/24"]
listen_port = 51820
metrics_listen = "127.0.0.1:9586"

[bond]
mode = "$MODE"

[[peer]]
name = "site"
public_key = "$SITE_PUB"
allowed_ips = ["10.99.0.2/32"]
EOF
# Same interface name, but its second WAN does not exist.
mkdir -p "$TMP/broken"
sed -e 's/bind_interface = "wan1"/bind_interface = "nosuch9"/' "$TMP/wgbsite.toml" >"$TMP/broken/wgbsite.toml"

tl_settle "$SITE_NS" "$HUB_NS"
SITE_BEFORE=$(tl_snapshot "$SITE_NS")
HUB_BEFORE=$(tl_snapshot "$HUB_NS")

# --- a failed up changes nothing --------------------------------------------------------------
if tl_up "$SITE_NS" "$TMP/broken/wgbsite.toml" wgbsite; then
    fail failed_up "up with a missing WAN succeeded: $TL_OUT"
else
    if [[ $(tl_snapshot "$SITE_NS") == "$SITE_BEFORE" ]]; then
        pass failed_up "refused ($TL_OUT); ip state unchanged"
    else
        fail failed_up "ip state changed after a failed up: $(diff <(echo "$SITE_BEFORE") <(tl_snapshot "$SITE_NS") | head -20)"
    fi
fi

# --- up ----------------------------------------------------------------------------------------
if tl_up "$HUB_NS" "$TMP/wgbhub.toml" wgbhub; then
    pass hub_up "up returned 0"
else
    fail hub_up "$TL_OUT"
    exit 1
fi
if tl_up "$SITE_NS" "$TMP/wgbsite.toml" wgbsite; then
    pass site_up "up returned 0"
else
    fail site_up "$TL_OUT; log: $(tail -5 "$WGBOND_RUN_DIR/wgbsite.log" 2>/dev/null)"
    exit 1
fi

# Both link sockets on the configured local port, one per WAN device.
ports=$(in_site ss -Huan 'sport = :40123' | wc -l)
if ((ports == 2)); then
    pass site_listen_port "both link sockets bound to local port 40123"
else
    fail site_listen_port "$ports sockets on port 40123 (expected 2): $(in_site ss -Huan | head -5)"
fi

# --- ping --------------------------------------------------------------------------------------
if tl_ping_until "$SITE_NS" 10.99.0.1; then
    out=$(in_site ping -n -q -c 20 -i 0.05 -W 2 10.99.0.1 2>&1)
    loss=$(sed -n 's/.* \([0-9.]*\)% packet loss.*/\1/p' <<<"$out")
    rtt=$(sed -n 's|.*= [0-9.]*/\([0-9.]*\)/.*|\1|p' <<<"$out")
    if [[ $loss == 0 ]]; then
        pass ping "20/20 replies, avg rtt ${rtt} ms"
    else
        fail ping "$loss% loss"
    fi
else
    fail ping "no reply within 20 tries"
fi
if ((FULL_TUNNEL)); then
    # The hub's public address itself is now reached through the tunnel, while the links'
    # own datagrams to it still leave through the WANs.
    before=$(in_hub cat /sys/class/net/wgbhub/statistics/rx_packets)
    if in_site ping -n -q -c 5 -i 0.1 -W 2 203.0.113.1 >/dev/null 2>&1; then
        after=$(in_hub cat /sys/class/net/wgbhub/statistics/rx_packets)
        if ((after - before >= 5)); then
            pass full_tunnel "ping 203.0.113.1 went through the tunnel ($((after - before)) packets on the hub's TUN)"
        else
            fail full_tunnel "ping 203.0.113.1 answered, but only $((after - before)) packets crossed the hub's TUN"
        fi
    else
        fail full_tunnel "no reply from 203.0.113.1 through the tunnel"
    fi
fi

# --- 50 MB each way, content verified ---------------------------------------------------------
head -c "${MB}M" /dev/urandom >"$TMP/payload"
WANT=$(sha256sum "$TMP/payload" | cut -d' ' -f1)
SINK='
import hashlib, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 5001)); s.listen(1); s.settimeout(60)
c, _ = s.accept(); c.settimeout(60)
h = hashlib.sha256(); n = 0
while True:
    b = c.recv(1 << 16)
    if not b:
        break
    h.update(b); n += len(b)
print(n, h.hexdigest())
'
SOURCE='
import socket, sys, time
c = socket.create_connection((sys.argv[1], 5001), timeout=60)
t = time.time()
with open(sys.argv[2], "rb") as f:
    while True:
        b = f.read(1 << 16)
        if not b:
            break
        c.sendall(b)
c.shutdown(socket.SHUT_WR)
c.recv(1)
print("%.2f" % (time.time() - t))
'
transfer() { # transfer NAME SRC_NS DST_NS DST_ADDR [FUNCTION run meanwhile]
    local name=$1 src=$2 dst=$3 addr=$4 during=${5:-} secs got tries during_pid=
    ip netns exec "$dst" timeout 120 python3 -c "$SINK" "$addr" >"$TMP/$name.sink" 2>&1 &
    local sink_pid=$!
    BG_PIDS+=("$sink_pid")
    for ((tries = 0; tries < 50; tries++)); do
        ip netns exec "$dst" ss -ltn 2>/dev/null | grep -q "$addr:5001 " && break
        sleep 0.1
    done
    if [[ -n $during ]]; then
        "$during" >"$TMP/$name.during" 2>&1 &
        during_pid=$!
        BG_PIDS+=("$during_pid")
    fi
    secs=$(ip netns exec "$src" timeout 120 python3 -c "$SOURCE" "$addr" "$TMP/payload" 2>&1)
    wait "$sink_pid" 2>/dev/null
    [[ -n $during_pid ]] && wait "$during_pid"
    [[ -n $during_pid ]] && sed 's/^/    during: /' "$TMP/$name.during"
    got=$(cat "$TMP/$name.sink")
    if [[ $got == "$((MB * 1024 * 1024)) $WANT" ]]; then
        pass "$name" "${MB} MB in ${secs} s ($(awk -v m="$MB" -v s="$secs" 'BEGIN { printf "%.0f", m * 8.388608 / s }') Mbit/s), sha256 matches"
    else
        fail "$name" "sink got '$got', want '$((MB * 1024 * 1024)) $WANT' (source: $secs)"
    fi
}
# While the upload runs, wan1's address changes (a DHCP renew): the hub must follow it.
roam_wan1() {
    sleep 1
    in_site ip addr del 198.51.100.2/24 dev wan1
    in_site ip addr add 198.51.100.3/24 dev wan1
    in_site ip route replace default via 198.51.100.1 dev wan1 metric 200
    echo "wan1 is now 198.51.100.3"
}
# While the download runs, an attacker on the site's WAN replays captured datagrams and sends
# 10,000 random or truncated ones to the hub port.
ATTACK='
import random, socket, struct, sys, time
sniff = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.ntohs(0x0003))  # ETH_P_ALL: outgoing too
sniff.bind(("wan0", 0))
sniff.settimeout(5)
captured = []
deadline = time.time() + 5
while len(captured) < 300 and time.time() < deadline:
    try:
        frame = sniff.recv(65535)
    except socket.timeout:
        break
    ip = frame[14:]
    if frame[12:14] != b"\x08\x00" or len(ip) < 28 or ip[9] != 17:
        continue
    ihl = (ip[0] & 15) * 4
    dport = struct.unpack("!H", ip[ihl + 2:ihl + 4])[0]
    if dport == 51820:
        captured.append(ip[ihl + 8:])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, 25, b"wan0")  # SO_BINDTODEVICE
hub = ("203.0.113.1", 51820)
for d in captured:
    s.sendto(d, hub)
rng = random.Random(7)
for i in range(10000):
    kind = i % 5
    if kind == 0:
        d = bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 200)))
    elif kind == 1 and captured:
        c = rng.choice(captured)
        d = c[:rng.randrange(0, len(c))]
    else:
        t = rng.choice([1, 2, 3, 4])
        size = {1: 148, 2: 92, 3: 64, 4: rng.randrange(32, 300)}[t]
        d = bytes([t, 0, 0, 0]) + bytes(rng.getrandbits(8) for _ in range(size - 4))
    s.sendto(d, hub)
    if i % 500 == 0:
        time.sleep(0.01)
print("replayed %d captured datagrams, sent 10000 random ones" % len(captured))
'
attack_hub() {
    sleep 0.5
    in_site timeout 60 python3 -c "$ATTACK"
}
hub_json() { in_hub "$WGBOND" show wgbhub --json; }
ENDPOINT_OF='
import json, sys
s = json.load(sys.stdin)[0]
print(" ".join("%s=%s" % (l["name"], l.get("endpoint")) for p in s["peers"] for l in p["links"]))
'

transfer upload "$SITE_NS" "$HUB_NS" 10.99.0.1 roam_wan1
# Packets sent while wan1 had no address leave with another source address, and the hub
# follows them too; the next ones (probes, at least every 100 ms) bring it back. The promise
# is "within a few seconds": poll for up to 5 s.
for _ in $(seq 50); do
    endpoints=$(hub_json | python3 -c "$ENDPOINT_OF")
    [[ $endpoints == *"wan1=198.51.100.3:"* ]] && break
    sleep 0.1
done
if [[ $endpoints == *"wan1=198.51.100.3:"* ]]; then
    pass roaming "hub re-learned wan1 without restart: $endpoints"
else
    fail roaming "hub endpoints after wan1's address change: $endpoints"
fi
# Put wan1 back as it was, for the exact comparison after down.
in_site ip addr del 198.51.100.3/24 dev wan1
in_site ip addr add 198.51.100.2/24 dev wan1
in_site ip route replace default via 198.51.100.1 dev wan1 metric 200

drops_before=$(hub_json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["drops"])')
transfer download "$HUB_NS" "$SITE_NS" 10.99.0.2 attack_hub
verdict=$(hub_json | python3 -c '
import json, sys
s = json.load(sys.stdin)[0]
d = s["drops"]
rejected = d["malformed"] + d["unauthenticated"] + d["replayed"] + d["no_session"] + d["unknown_peer"]
eps = " ".join("%s=%s" % (l["name"], l.get("endpoint")) for p in s["peers"] for l in p["links"])
ok = rejected >= 10000 and d["replayed"] > 0 and "wan0=192.0.2.2:" in eps
print(("ok " if ok else "bad ") + "%d rejected (%s); endpoints %s" % (rejected, d, eps))
')
if [[ $verdict == ok* ]]; then
    pass hub_attack "${verdict#ok }"
else
    fail hub_attack "${verdict#bad }; before: $drops_before"
fi

# --- show ----------------------------------------------------------------------------------------
check_show() { # check_show NAME NS
    local name=$1 ns=$2 verdict
    verdict=$(ip netns exec "$ns" "$WGBOND" show "$name" --json 2>&1 | python3 -c '
import json, sys
s = json.load(sys.stdin)[0]
links = [l for p in s["peers"] for l in p["links"]]
bad = [l["name"] for l in links if l.get("rtt_ms") is None or l["tx_bytes"] == 0 or l["rx_bytes"] == 0]
names = sorted(l["name"] for l in links)
detail = ", ".join("%s %s rtt %.2f ms tx %d rx %d" % (l["name"], l["state"], l.get("rtt_ms") or -1, l["tx_bytes"], l["rx_bytes"]) for l in links)
print(("ok " if names == ["wan0", "wan1"] and not bad else "bad ") + detail)
' 2>&1)
    if [[ $verdict == ok* ]]; then
        pass "show_$name" "${verdict#ok }"
    else
        fail "show_$name" "$verdict"
    fi
}
check_show wgbsite "$SITE_NS"
check_show wgbhub "$HUB_NS"
in_site "$WGBOND" show wgbsite | sed 's/^/    /'

# --- Prometheus metrics on the hub ---------------------------------------------------------------
verdict=$(in_hub python3 -c '
import re, urllib.request
text = urllib.request.urlopen("http://127.0.0.1:9586/metrics", timeout=5).read().decode()
tx = {m.group(1): float(m.group(2)) for m in re.finditer(r"wgbond_link_tx_bytes_total\{[^}]*link=\"([^\"]+)\"[^}]*\} (\S+)", text)}
ok = sorted(tx) == ["wan0", "wan1"] and all(v > 1e6 for v in tx.values())
print(("ok " if ok else "bad ") + "link tx bytes %s" % tx)
' 2>&1)
if [[ $verdict == ok* ]]; then
    pass metrics "${verdict#ok }"
else
    fail metrics "${verdict#bad }"
fi

# Scraped twice over real HTTP while traffic flows (1200-byte pings from the hub every 2 ms,
# about 600 kB/s for 3 s): the per-link byte counters grow, and by far more than the probes
# alone would make them (a few kB/s).
SCRAPE='
import json, re, urllib.request
text = urllib.request.urlopen("http://127.0.0.1:9586/metrics", timeout=5).read().decode()
print(json.dumps({m.group(1): float(m.group(2)) for m in re.finditer(
    r"wgbond_link_tx_bytes_total\{[^}]*link=\"([^\"]+)\"[^}]*\} (\S+)", text)}))
'
in_hub timeout 20 ping -q -i 0.002 -s 1200 -c 1500 10.99.0.2 >/dev/null 2>&1 &
flood_pid=$!
sleep 0.3
# `show --watch` alongside, piped (so it appends statuses instead of redrawing).
in_hub timeout 1.8 "$WGBOND" show wgbhub --watch 0.5 >"$TMP/watch.txt" 2>&1 &
watch_pid=$!
first=$(in_hub python3 -c "$SCRAPE" 2>&1)
sleep 1
second=$(in_hub python3 -c "$SCRAPE" 2>&1)
wait "$watch_pid" 2>/dev/null
wait "$flood_pid" 2>/dev/null
verdict=$(python3 -c '
import json, sys
a, b = json.loads(sys.argv[1]), json.loads(sys.argv[2])
grew = {k: b.get(k, 0) - a.get(k, 0) for k in a}
ok = sorted(a) == ["wan0", "wan1"] and all(g > 0 for g in grew.values()) and sum(grew.values()) > 2e5
print(("ok " if ok else "bad ") + "tx bytes grew by %s in 1 s during traffic" % {k: int(v) for k, v in grew.items()})
' "$first" "$second" 2>&1)
if [[ $verdict == ok* ]]; then
    pass metrics_during_traffic "${verdict#ok }"
else
    fail metrics_during_traffic "${verdict#bad } (scrapes: $first / $second)"
fi

# The hub's pings (1228-byte IP packets, 500 a second: 4.9 Mbit/s) go out on its links and
# their replies come back: the last status `show --watch` printed says so per peer, and has
# a `now:` line for each link.
verdict=$(python3 -c '
import re, sys
text = open(sys.argv[1]).read()
def mbit(v, unit):
    return float(v) / (1000.0 if unit == "kbit/s" else 1.0)
last = text.split("every 0.5 s")[-1]
peer = re.search(r"  now: ([0-9.]+) (Mbit/s|kbit/s) sent, ([0-9.]+) (Mbit/s|kbit/s) received over all links", last)
links = re.findall(r"link (\S+) \[\d+\]: \S+\n    now: ", last)
if not peer:
    print("bad no rates in the last status: %r" % last[-600:]); sys.exit()
sent, got = mbit(peer.group(1), peer.group(2)), mbit(peer.group(3), peer.group(4))
ok = 2.5 <= sent <= 8 and 2.5 <= got <= 8 and sorted(links) == ["wan0", "wan1"] and text.count("every 0.5 s") >= 3
print(("ok " if ok else "bad ") + "now %.1f Mbit/s sent, %.1f received over links %s (%d statuses)" % (sent, got, links, text.count("every 0.5 s")))
' "$TMP/watch.txt" 2>&1)
if [[ $verdict == ok* ]]; then
    pass show_watch "${verdict#ok }"
else
    fail show_watch "${verdict#bad }"
fi

# --- down restores everything ------------------------------------------------------------------
if out=$(in_site timeout 40 "$WGBOND" down wgbsite 2>&1); then
    after=$(tl_snapshot "$SITE_NS")
    if [[ $after == "$SITE_BEFORE" ]]; then
        pass site_down "ip state restored exactly"
    else
        fail site_down "ip state differs: $(diff <(echo "$SITE_BEFORE") <(echo "$after") | head -20)"
    fi
else
    fail site_down "$out"
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
if [[ -e $WGBOND_RUN_DIR/wgbsite.sock || -e $WGBOND_RUN_DIR/wgbhub.sock ]]; then
    fail control_socket "a control socket is left after down"
else
    pass control_socket "removed by down"
fi

exit "$FAILED"
