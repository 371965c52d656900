#!/usr/bin/env bash
# The wgbond demo: a site with three very different WAN links (cable, LTE, satellite), bonded
# into one encrypted tunnel to a hub, all on this machine in network namespaces with emulated
# links (netns-tests/lab.sh, scenario cable-lte-sat). It shows
#   1. what each link gives alone through the tunnel,
#   2. what the bond gives in `auto` (the default) and in `duplicate`,
#   3. a link dying in the middle of a download, and the download going on,
#   4. `wgbond show` (per-link RTT, jitter, loss, rate, bytes),
#   5. the bonding core alone in its simulator (a second, in virtual time),
# then a summary table, and removes everything it built (also on failure or Ctrl-C).
#
# Usage: sudo netns-tests/demo.sh          (about 2 minutes once built; Debian/Ubuntu, root)
# Installs iproute2 iperf3 nftables conntrack ethtool iputils-ping with apt-get if missing, and
# builds the release binaries with cargo (WGBOND=path and LINKEMU=path skip the build).
set -u -o pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
SECS=8          # per throughput measurement (BBR needs a few seconds to find the sum)
HUB_IN=10.99.0.1 SITE_IN=10.99.0.2 PORT=51820

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
note() { printf '   %s\n' "$*"; }
die() {
    printf '\ndemo: %s\n' "$*" >&2
    exit 1
}

# --- what it needs ---------------------------------------------------------------------------
[[ $(id -u) == 0 ]] || die "needs root (network namespaces, TUN devices): sudo $0"
missing=()
for pair in ip:iproute2 iperf3:iperf3 nft:nftables conntrack:conntrack ethtool:ethtool ping:iputils-ping; do
    command -v "${pair%%:*}" >/dev/null || missing+=("${pair#*:}")
done
if ((${#missing[@]})); then
    say "Installing ${missing[*]}"
    command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get to install them"
    export DEBIAN_FRONTEND=noninteractive
    { apt-get update -qq && apt-get install -y -qq "${missing[@]}" >/dev/null; } ||
        die "apt-get install ${missing[*]} failed"
fi

if [[ -z ${WGBOND:-} || -z ${LINKEMU:-} ]]; then
    say "Building wgbond and the link emulator (cargo build --release)"
    command -v cargo >/dev/null || die "needs a Rust toolchain (cargo) in root's PATH, or WGBOND= and LINKEMU= set to built binaries"
    (cd "$REPO" && cargo build --release -q -p wgbond -p linkemu --bins --example bond_demo) ||
        die "cargo build failed"
fi
export WGBOND=${WGBOND:-$REPO/target/release/wgbond}
export LINKEMU=${LINKEMU:-$REPO/target/release/linkemu}

# shellcheck source=testlib.sh
source "$HERE/testlib.sh"

# --- cleanup, whatever happens ----------------------------------------------------------------
# A trap runs with the redirections of the command it interrupts (often >/dev/null): keep the
# terminal on fds 8 and 9 for the traps' messages.
exec 8>&1 9>&2
cleanup() {
    local -
    set +e
    trap - EXIT INT TERM
    if [[ -n ${LAB_STATE:-} && -d $LAB_STATE/wgbond ]]; then
        for end in site1:site hub:hub; do
            [[ -S $WGBOND_RUN_DIR/${end#*:}.sock ]] &&
                lab_exec "${end%%:*}" timeout 15 "$WGBOND" down "${end#*:}" >/dev/null 2>&1
        done
    fi
    # Kills what the lab started and anything left in its namespaces, deletes them.
    lab_down
    echo "demo: cleaned up (namespaces, emulators, tunnels)"
} >&8 2>&9
trap cleanup EXIT
trap 'echo >&8; echo "demo: interrupted" >&9; exit 130' INT
trap 'echo "demo: terminated" >&9; exit 143' TERM

# --- the lab ------------------------------------------------------------------------------------
say "Building the lab: a site with cable + LTE + satellite WANs, an internet router, a hub"
lab_up cable-lte-sat --no-lan >/dev/null || die "could not build the lab (see the lab: lines above)"
for i in "${!LAB_LINK_NAME[@]}"; do
    note "$(printf '%-6s wan%d  %3s Mbit/s, %3s ms each way, jitter %s ms, loss %s %%, modem buffer %s ms' \
        "${LAB_LINK_NAME[$i]}" "$i" "${LAB_LINK_RATE[$i]}" "${LAB_LINK_DELAY[$i]}" \
        "${LAB_LINK_JITTER[$i]}" "${LAB_LINK_LOSS[$i]}" "${LAB_LINK_QUEUE[$i]}")"
done
note "hub: one public address $LAB_HUB_IP, UDP port $PORT; tunnel $SITE_IN (site) <-> $HUB_IN (hub)"
note "namespaces: $(lab_ns site1), $(lab_ns hub), ... (the links are emulated by 'linkemu' in $(lab_ns emu))"

# The daemons' control sockets and logs stay inside the lab's state directory.
export WGBOND_RUN_DIR="$LAB_STATE/wgbond"
CONF="$LAB_STATE/conf"
mkdir -p "$CONF" "$WGBOND_RUN_DIR"
umask 077
HUB_KEY=$("$WGBOND" genkey) SITE_KEY=$("$WGBOND" genkey)
HUB_PUB=$("$WGBOND" pubkey <<<"$HUB_KEY") SITE_PUB=$("$WGBOND" pubkey <<<"$SITE_KEY")

# hub_config MODE: like configs/hub.toml, with fresh keys.
hub_config() {
    cat <<EOF
[interface]
name = "hub"
private_key = "$HUB_KEY"
address = ["$HUB_IN/24"]
listen_port = $PORT

[bond]
mode = "$1"

[[peer]]
name = "site"
public_key = "$SITE_PUB"
allowed_ips = ["$SITE_IN/32"]
EOF
}
# site_config MODE LINK_INDEX...: like configs/site.toml (everything through the tunnel), with
# fresh keys and one [[link]] per given WAN.
site_config() {
    local mode=$1 i
    shift
    cat <<EOF
[interface]
name = "site"
private_key = "$SITE_KEY"
address = ["$SITE_IN/24"]
table = "auto"

[bond]
mode = "$mode"

[[peer]]
name = "hub"
public_key = "$HUB_PUB"
allowed_ips = ["0.0.0.0/0"]
endpoint = "$LAB_HUB_IP:$PORT"
persistent_keepalive = 25
EOF
    for i in "$@"; do
        printf '\n[[link]]\nname = "%s"\nbind_interface = "wan%d"\npriority = %d\n' \
            "${LAB_LINK_NAME[$i]}" "$i" "$((i * 10))"
    done
}

daemon_log() { tail -n 5 "$WGBOND_RUN_DIR/$1.log" 2>/dev/null | sed 's/^/     | /'; }

# up ROLE NAME FILE: `wgbond up` (returns once the interface is up); dies with the reason.
up() {
    local out
    out=$(lab_exec "$1" timeout 40 "$WGBOND" up "$3" 2>&1) || {
        echo "$out"
        daemon_log "$2"
        die "wgbond up $3 failed in $1"
    }
}
down() {
    local out
    out=$(lab_exec "$1" timeout 20 "$WGBOND" down "$2" 2>&1) || {
        echo "$out"
        daemon_log "$2"
        die "wgbond down $2 failed in $1"
    }
}

# wait_tunnel: the links' handshakes follow `up`; true once a ping crosses (at most ~20 s).
wait_tunnel() {
    local try
    for ((try = 0; try < 20; try++)); do
        lab_exec site1 ping -n -q -c 1 -W 1 "$HUB_IN" >/dev/null 2>&1 && return 0
    done
    daemon_log site
    die "no ping through the tunnel within 20 s"
}

# measure LABEL: a ${SECS} s single-stream download (hub -> site) through the tunnel, with a
# ping every 100 ms alongside; prints a line and adds a row to the summary.
ROWS=()
measure() {
    local label=$1 rate p50 p95 pings="$LAB_STATE/ping.txt" ping_pid
    t_fresh_iperf_server hub || die "iperf3 server did not start in the hub"
    lab_exec site1 ping -n -i 0.1 -w "$SECS" "$HUB_IN" >"$pings" 2>&1 &
    ping_pid=$!
    LAB_PIDS+=("$ping_pid")
    # The server may still be finishing the previous test (a 600 ms satellite stream cut off by
    # its timeout): try again, a bounded number of times.
    local attempt
    for attempt in 1 2 3; do
        lab_exec site1 timeout $((SECS + 15)) iperf3 -f m -c "$HUB_IN" -p "$IPERF_PORT" -B "$SITE_IN" -t "$SECS" -R \
            >"$LAB_STATE/iperf.txt" 2>&1
        grep -q receiver "$LAB_STATE/iperf.txt" && break
        sleep 3
    done
    rate=$(awk '/receiver/ { for (i = 1; i < NF; i++) if ($(i+1) == "Mbits/sec") v = $i } END { print v }' \
        "$LAB_STATE/iperf.txt")
    [[ -n $rate ]] || sed 's/^/     | /' "$LAB_STATE/iperf.txt" | tail -n 3
    wait "$ping_pid" 2>/dev/null
    read -r p50 p95 < <(sed -n 's/.*time=\([0-9.]*\) ms.*/\1/p' "$pings" | sort -n |
        awk '{ v[NR] = $1 } END { if (!NR) { print "- -"; exit }
             a = int(NR * 0.5 + 0.5); b = int(NR * 0.95 + 0.5); if (a < 1) a = 1
             printf "%.0f %.0f", v[a], v[b] }')
    note "$(printf '%-28s %6s Mbit/s   ping under load: p50 %s ms, p95 %s ms' "$label" "${rate:-?}" "$p50" "$p95")"
    ROWS+=("$label|${rate:-?}|$p50 / $p95")
}

hub_config auto >"$CONF/hub.toml"
up hub hub "$CONF/hub.toml"

# --- 1. each link alone ---------------------------------------------------------------------------
say "1. Each link alone through the tunnel (site config with a single [[link]]; ${SECS} s download, one TCP stream)"
for i in "${!LAB_LINK_NAME[@]}"; do
    site_config auto "$i" >"$CONF/site-${LAB_LINK_NAME[$i]}.toml"
    up site1 site "$CONF/site-${LAB_LINK_NAME[$i]}.toml"
    wait_tunnel
    measure "${LAB_LINK_NAME[$i]} alone"
    down site1 site
done
note "(a 300 ms satellite link needs far more than ${SECS} s for one TCP stream to reach its rate)"

# --- 2. the bond ----------------------------------------------------------------------------------
say "2. All three links bonded"
ALL=("${!LAB_LINK_NAME[@]}")
site_config auto "${ALL[@]}" >"$CONF/site.toml"
up site1 site "$CONF/site.toml"
wait_tunnel
measure "bond, mode auto"
note "auto: bulk data striped over the links that help; small and latency-critical packets duplicated"
down site1 site
down hub hub
hub_config duplicate >"$CONF/hub-duplicate.toml"
site_config duplicate "${ALL[@]}" >"$CONF/site-duplicate.toml"
up hub hub "$CONF/hub-duplicate.toml"
up site1 site "$CONF/site-duplicate.toml"
wait_tunnel
measure "bond, mode duplicate"
note "duplicate: every packet on every link, the first copy wins: loss-proof, not faster"
down site1 site
down hub hub

# --- 3. a link dies mid-transfer ---------------------------------------------------------------
KILL=${LAB_LINK_NAME[0]} KILL_AT=4 BACK_AT=9 RUN=13
say "3. The $KILL link dies ${KILL_AT} s into a ${RUN} s download (mode auto) and returns at ${BACK_AT} s"
up hub hub "$CONF/hub.toml"
up site1 site "$CONF/site.toml"
wait_tunnel
t_fresh_iperf_server hub || die "iperf3 server did not start in the hub"
# A 50 packets/s ping (like a voice call) runs alongside.
lab_exec site1 ping -n -q -i 0.02 -w "$RUN" "$HUB_IN" >"$LAB_STATE/call.txt" 2>&1 &
call_pid=$!
LAB_PIDS+=("$call_pid")
(
    sleep "$KILL_AT"
    lab_emu "$KILL" outage on both >/dev/null && echo "   >>> $KILL link dead (the emulator drops everything, both ways)"
    sleep $((BACK_AT - KILL_AT))
    lab_emu "$KILL" outage off both >/dev/null && echo "   >>> $KILL link back"
) &
LAB_PIDS+=("$!")
# A shell loop, not awk, formats the lines: mawk would hold them back until the end.
lab_exec site1 timeout $((RUN + 15)) iperf3 -f m -c "$HUB_IN" -p "$IPERF_PORT" -B "$SITE_IN" -t "$RUN" -i 1 -R --forceflush 2>&1 |
    tee "$LAB_STATE/kill.txt" |
    while read -r line; do
        if [[ $line =~ ([0-9.]+-[0-9.]+)\ +sec.*\ ([0-9.]+)\ Mbits/sec && $line != *sender* && $line != *receiver* ]]; then
            printf '   second %-11s %6s Mbit/s\n' "${BASH_REMATCH[1]}" "${BASH_REMATCH[2]}"
        elif [[ $line == *error* ]]; then
            echo "     | $line"
        fi
    done
wait "$call_pid" 2>/dev/null
read -r sent recv < <(sed -n 's/^\([0-9]*\) packets transmitted, \([0-9]*\) received.*/\1 \2/p' "$LAB_STATE/call.txt")
during=$(awk -v a="$KILL_AT" -v b="$BACK_AT" '/bits\/sec/ && !/sender|receiver/ {
             for (i = 1; i <= NF; i++) { if ($i ~ /^[0-9.]+-[0-9.]+$/) { split($i, t, "-") } if ($(i+1) == "Mbits/sec") r = $i }
             if (t[1] >= a + 1 && t[2] <= b) { s += r; n++ } }
         END { if (n) printf "%.1f", s / n; else print "?" }' "$LAB_STATE/kill.txt")
total=$(awk '/receiver/ { for (i = 1; i < NF; i++) if ($(i+1) == "Mbits/sec") v = $i } END { print v }' "$LAB_STATE/kill.txt")
note "the download went on without reconnecting: ${during} Mbit/s while $KILL was dead, ${total:-?} Mbit/s on average"
note "the 50 pkt/s ping alongside: $((${sent:-0} - ${recv:-0})) of ${sent:-?} lost"

# --- 4. show -------------------------------------------------------------------------------------
say "4. wgbond show (on the site; 'wgbond show --json' gives the same as JSON)"
lab_exec site1 "$WGBOND" show site | sed 's/^/   /'

# --- 5. the core in the simulator ------------------------------------------------------------------
if [[ -x $REPO/target/release/examples/bond_demo ]]; then
    say "5. The bonding core alone, in its network simulator (the same links, virtual time)"
    timeout 60 "$REPO/target/release/examples/bond_demo" | sed 's/^/   /'
fi

# --- summary -----------------------------------------------------------------------------------
say "Summary (download hub -> site, one TCP stream, ${SECS} s each)"
echo
echo "| path | Mbit/s | ping p50 / p95 under load (ms) |"
echo "|---|---|---|"
for r in "${ROWS[@]}"; do
    IFS='|' read -r a b c <<<"$r"
    echo "| $a | $b | $c |"
done
echo "| auto, $KILL dead for $((BACK_AT - KILL_AT)) s | $during while dead, ${total:-?} overall | $((${sent:-0} - ${recv:-0})) of ${sent:-?} pings lost (50/s) |"
echo
echo "Links: $(for i in "${!LAB_LINK_NAME[@]}"; do printf '%s %s Mbit/s %s ms; ' "${LAB_LINK_NAME[$i]}" "${LAB_LINK_RATE[$i]}" "${LAB_LINK_DELAY[$i]}"; done)"
echo "Configs used: generated like configs/site.toml and configs/hub.toml (fresh keys)."
