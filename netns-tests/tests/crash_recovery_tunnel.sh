#!/usr/bin/env bash
# After a crash (kill -9), the next `up` works without manual cleanup: a full-tunnel site is
# killed, its rules and routes (proto 87) stay behind, and `up` sweeps them, warns, and comes
# up; `down` then restores `ip link/addr/rule/route` exactly as before the first `up`.
# A daemon starting beside a running one leaves the running one's objects alone.
set -u
# shellcheck source=../tunnel_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../tunnel_lib.sh"

SITE_NS="${TL_PREFIX}crash"
in_site() { ip netns exec "$SITE_NS" "$@"; }
tl_require crash_recovery

tl_netns "$SITE_NS"
tl_netns "${TL_PREFIX}crashgw"
# One WAN; nothing needs to answer: rules and routes are set before any handshake.
tl_veth "$SITE_NS" wan0 192.0.2.2/24 "${TL_PREFIX}crashgw" gw0 192.0.2.1/24
in_site ip route add default via 192.0.2.1 dev wan0

umask 077
HUB_PUB=$("$WGBOND" genkey | "$WGBOND" pubkey)
config() { # NAME ALLOWED_IPS
    cat <<EOF
[interface]
private_key = "$("$WGBOND" genkey)"
address = ["10.99.$2.2/24"]

[[peer]]
public_key = "$HUB_PUB"
allowed_ips = [$3]
endpoint = "203.0.113.1:51820"

[[link]]
name = "wan0"
bind_interface = "wan0"
EOF
}
config wgbcrash 0 '"0.0.0.0/0", "::/0"' >"$TMP/wgbcrash.toml"
config wgbother 1 '"10.250.0.0/16"' >"$TMP/wgbother.toml"

tl_settle "$SITE_NS"
BEFORE=$(tl_snapshot "$SITE_NS")
ours() { in_site sh -c 'ip rule; ip -6 rule; ip route show table all; ip -6 route show table all' | grep -c 'proto 87'; }

if ! tl_up "$SITE_NS" "$TMP/wgbcrash.toml" wgbcrash; then
    fail crash_first_up "$TL_OUT"
    exit 1
fi
pid=$(tl_daemon_pid wgbcrash)
if [[ -z $pid ]]; then
    fail crash_first_up "no pid from show"
    exit 1
fi
live=$(ours)
kill -9 "$pid"
for ((i = 0; i < 50; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
left=$(ours)
if ((left > 0)); then
    pass crash_leftovers "kill -9 left $left proto-87 rules/routes"
else
    fail crash_leftovers "nothing left after kill -9: the test proves nothing"
fi

# Alone in the namespace: `up` sweeps what the dead daemon left, says so, and comes up.
if tl_up "$SITE_NS" "$TMP/wgbcrash.toml" wgbcrash; then
    if grep -q "did not shut down cleanly" "$WGBOND_RUN_DIR/wgbcrash.log" 2>/dev/null; then
        pass crash_up_again "up after kill -9 succeeded and logged the sweep"
    else
        fail crash_up_again "up succeeded but no sweep was logged: $(tail -n 3 "$WGBOND_RUN_DIR/wgbcrash.log" 2>&1)"
    fi
else
    fail crash_up_again "$TL_OUT"
fi
if (($(ours) == live)); then
    pass crash_no_doubles "$live proto-87 objects, as after the first up (not the leftovers too)"
else
    fail crash_no_doubles "$(ours) proto-87 objects after the second up (first up made $live)"
fi

# A second tunnel starting beside a running one must not take the running one's objects for
# leftovers.
mine=$(in_site sh -c 'ip rule; ip -6 rule; ip route show table all' | grep 'proto 87' | sort)
if tl_up "$SITE_NS" "$TMP/wgbother.toml" wgbother; then
    now=$(in_site sh -c 'ip rule; ip -6 rule; ip route show table all' | grep 'proto 87' | sort)
    missing=$(comm -23 <(echo "$mine") <(echo "$now"))
    if [[ -z $missing ]]; then
        pass crash_live_kept "the running tunnel's rules and routes survived the second up"
    else
        fail crash_live_kept "removed from the running tunnel: $missing"
    fi
else
    fail crash_live_kept "second tunnel did not come up: $TL_OUT"
fi
out=$(in_site timeout 40 "$WGBOND" down wgbother 2>&1) || fail crash_other_down "$out"

if out=$(in_site timeout 40 "$WGBOND" down wgbcrash 2>&1); then
    after=$(tl_snapshot "$SITE_NS")
    if [[ $after == "$BEFORE" ]]; then
        pass crash_down "ip state restored exactly (leftovers gone)"
    else
        fail crash_down "ip state differs: $(diff <(echo "$BEFORE") <(echo "$after") | head -20)"
    fi
else
    fail crash_down "$out"
fi
exit "$FAILED"
