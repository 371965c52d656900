#!/usr/bin/env bash
# The daemon under a (fake) systemd: `wgbond up --foreground` with NOTIFY_SOCKET and
# WATCHDOG_USEC, as Type=notify runs it. READY=1 must come only once the interface exists with
# its address; WATCHDOG=1 keep-alives must keep coming while traffic flows; SIGTERM must send
# STOPPING=1 and remove the interface.
#
#   site ---- veth (wan0) ---- hub (lo 203.0.113.1, UDP 51820)
set -u
# shellcheck source=../tunnel_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../tunnel_lib.sh"

S="${TL_PREFIX}site"
H="${TL_PREFIX}hub"
tl_require notify_tunnel
tl_netns "$S"
tl_netns "$H"
tl_veth "$S" wan0 192.0.2.2/24 "$H" h0 192.0.2.1/24
ip -n "$S" route add default via 192.0.2.1 dev wan0
ip -n "$H" addr add 203.0.113.1/32 dev lo

umask 077
KS=$("$WGBOND" genkey)
KH=$("$WGBOND" genkey)
PS=$(echo "$KS" | "$WGBOND" pubkey)
PH=$(echo "$KH" | "$WGBOND" pubkey)
cat >"$TMP/wgbsite.toml" <<EOF
[interface]
private_key = "$KS"
address = ["10.99.0.2/24"]

[[peer]]
public_key = "$PH"
allowed_ips = ["10.99.0.1/32"]
endpoint = "203.0.113.1:51820"

[[link]]
name = "wan0"
bind_interface = "wan0"
EOF
cat >"$TMP/wgbhub.toml" <<EOF
[interface]
private_key = "$KH"
address = ["10.99.0.1/24"]
listen_port = 51820

[[peer]]
public_key = "$PS"
allowed_ips = ["10.99.0.2/32"]
EOF
tl_up "$H" "$TMP/wgbhub.toml" wgbhub || {
    fail up_hub "$TL_OUT"
    exit 1
}

# The fake service manager: records every notification with the state of the interface at
# the moment it arrived (does wgbsite exist, with its address?).
MANAGER='
import os, socket, subprocess, sys, time
path, ns, log = sys.argv[1], sys.argv[2], sys.argv[3]
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind(path)
s.settimeout(1)
end = time.time() + 40
with open(log, "w") as out:
    while time.time() < end:
        try:
            msg = s.recv(4096).decode()
        except socket.timeout:
            continue
        addr = subprocess.run(["ip", "-n", ns, "-4", "addr", "show", "dev", "wgbsite"],
                              capture_output=True, text=True).stdout
        has = "yes" if "10.99.0.2/24" in addr else "no"
        for line in msg.splitlines():
            out.write("%.3f %s iface=%s\n" % (time.time(), line, has))
        out.flush()
        if "STOPPING=1" in msg:
            break
'
python3 -c "$MANAGER" "$TMP/notify" "$S" "$TMP/notes" &
BG_PIDS+=($!)
for ((try = 0; try < 50; try++)); do
    [[ -S $TMP/notify ]] && break
    sleep 0.1
done
# Foreground, as systemd runs it; the watchdog asks for a keep-alive every 0.5 s.
TL_DAEMONS+=(wgbsite)
ip netns exec "$S" env NOTIFY_SOCKET="$TMP/notify" WATCHDOG_USEC=1000000 \
    "$WGBOND" up "$TMP/wgbsite.toml" --foreground >"$TMP/site.log" 2>&1 &
daemon=$!
BG_PIDS+=("$daemon")
for ((try = 0; try < 100; try++)); do
    grep -q 'READY=1' "$TMP/notes" 2>/dev/null && break
    sleep 0.1
done
if grep -q 'READY=1 iface=yes' "$TMP/notes"; then
    pass ready "READY=1 after the interface and its address existed; $(grep -m1 '^[0-9.]* STATUS=' "$TMP/notes" | cut -d' ' -f2- | sed 's/ iface=.*//')"
else
    fail ready "$(grep -E 'READY|STATUS' "$TMP/notes" | head -3)"
fi

# Traffic for 3 s; count keep-alives meanwhile.
before=$(grep -c 'WATCHDOG=1' "$TMP/notes")
tl_ping_until "$S" 10.99.0.1
ip netns exec "$S" ping -n -q -c 100 -i 0.03 -W 1 10.99.0.1 >/dev/null 2>&1
after=$(grep -c 'WATCHDOG=1' "$TMP/notes")
if ((after - before >= 4)); then
    pass watchdog "$((after - before)) WATCHDOG=1 keep-alives during 3 s of traffic"
else
    fail watchdog "only $((after - before)) WATCHDOG=1 during 3 s of traffic"
fi

kill -TERM "$daemon"
for ((try = 0; try < 100; try++)); do
    kill -0 "$daemon" 2>/dev/null || break
    sleep 0.1
done
if ! kill -0 "$daemon" 2>/dev/null && grep -q 'STOPPING=1' "$TMP/notes" &&
    ! ip -n "$S" link show wgbsite >/dev/null 2>&1; then
    pass stop "SIGTERM: STOPPING=1 sent, interface removed, daemon exited"
else
    fail stop "daemon alive or interface left; notes: $(tail -2 "$TMP/notes")"
fi
exit "$FAILED"
