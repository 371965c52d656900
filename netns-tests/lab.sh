#!/usr/bin/env bash
# wgbond network lab: a multi-WAN site, emulated links, an internet router and a hub, each in
# its own network namespace. Sourceable library (lab_* functions) and a small CLI.
#
#   [lan1] --eth0/lan0-- [site1] --wan0----s1w0a=(linkemu)=s1w0b----s1w0-- [inet] --hub0/eth0-- [hub]
#   192.168.1.2        192.168.1.1   10.110.0.2        [emu namespace]     10.110.0.1   10.200.0.1  10.200.0.2
#                              --wan1----s1w1a=(linkemu)=s1w1b----s1w1--
#                                10.111.0.2                          10.111.0.1
#
# - site S, link I (0-based, scenario order): WAN subnet 10.1SI.0.0/24, site .2, router .1.
#   Each WAN has a table 100+I holding its subnet and a default route via its router, chosen by
#   a rule `from 10.1SI.0.2 lookup 100+I`; the main table's default route uses the first WAN.
# - The emulator namespace holds two veth ends per link and one `linkemu` process per link
#   bridging them (direction "up" = site -> internet, "down" = internet -> site). Offloads are
#   off on every veth end the emulator touches, so it sees real 1500-byte frames.
# - With --nat, the router masquerades each WAN to its own "public" address 10.200.0.1SI.
# - The hub has ONE address, 10.200.0.2, on the router's subnet.
#
# CLI:  lab.sh up SCENARIO [--sites N] [--nat] [--no-lan] [--ipv6]   (prints the prefix; stays up)
#       lab.sh down [PREFIX]        lab.sh emu [--prefix P] [SITE:]LINK COMMAND...
#       lab.sh status               lab.sh gc [--all]
# Library (after `source lab.sh`): lab_up, lab_down, lab_trap, lab_ns, lab_exec, lab_bg, lab_emu,
#       lab_wan_ip, lab_wan_gw, lab_public_ip, lab_link_index, lab_wan_readdress, lab_nat_rebind,
#       lab_cycle, lab_flap; variables LAB_HUB_IP, LAB_LINK_*.

LAB_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
LAB_REPO="$(cd "$LAB_DIR/.." && pwd)"
LAB_RUN_DIR="${LAB_RUN_DIR:-/run/wgb-lab}"
LAB_PREFIX="${LAB_PREFIX:-wgb-$$-}"
LAB_STATE="$LAB_RUN_DIR/${LAB_PREFIX%-}"
LAB_HUB_IP=10.200.0.2
LAB_HUB_GW=10.200.0.1
LAB_PIDS=()
LAB_SITES=0
LAB_NAT=0
LAB_LAN=1
LAB_IPV6=0
LAB_HUB_IP6=fd00:200::2
LAB_HUB_GW6=fd00:200::1
LAB_SCENARIO=""
LAB_LINK_NAME=() LAB_LINK_RATE=() LAB_LINK_UPRATE=() LAB_LINK_DELAY=() LAB_LINK_JITTER=()
LAB_LINK_LOSS=() LAB_LINK_QUEUE=()
LAB_DEFAULT_QUEUE_MS=50
# Set (non-empty) to run emulators at real-time priority: release times stay exact however busy
# the machine is, but every frame then costs its own wake-up (about 3x the CPU per Mbit/s).
LAB_EMU_REALTIME=${LAB_EMU_REALTIME:-}
# Upper bounds keep the address plan (10.1SI.0.0/24) valid.
LAB_MAX_SITES=4
LAB_MAX_LINKS=8

lab_log() { echo "lab: $*" >&2; }

# Namespace name of a role: site1, site2, lan1, emu, inet, hub.
lab_ns() { echo "${LAB_PREFIX}$1"; }

# Run a command inside a role's namespace: lab_exec hub ping -c1 10.110.0.2
lab_exec() {
    local role=$1
    shift
    ip netns exec "$(lab_ns "$role")" "$@"
}

# Start a command in the background inside a role's namespace; its PID (the real process:
# `ip netns exec` execs the command) lands in LAB_LAST_PID and is killed by lab_down.
lab_bg() {
    local role=$1
    shift
    ip netns exec "$(lab_ns "$role")" "$@" &
    LAB_LAST_PID=$!
    LAB_PIDS+=("$LAB_LAST_PID")
    [[ -d $LAB_STATE ]] && echo "$LAB_LAST_PID" >>"$LAB_STATE/pids"
    return 0
}

lab_linkemu_bin() {
    local candidate
    for candidate in "${LINKEMU:-}" "$LAB_REPO/target/release/linkemu" "$LAB_REPO/target/debug/linkemu"; do
        if [[ -n $candidate && -x $candidate ]]; then
            echo "$candidate"
            return 0
        fi
    done
    lab_log "linkemu not built: run 'cargo build --release -p linkemu' (or set LINKEMU=path)"
    return 1
}

# Index (0-based) of a link by name.
lab_link_index() {
    local i
    for i in "${!LAB_LINK_NAME[@]}"; do
        if [[ ${LAB_LINK_NAME[$i]} == "$1" ]]; then
            echo "$i"
            return 0
        fi
    done
    lab_log "no link named '$1' (links: ${LAB_LINK_NAME[*]})"
    return 1
}

# Addresses of site S's link I: the site's WAN address, the router's side (the gateway), and
# the address the hub sees (the NAT address with --nat).
# (After lab_wan_readdress / lab_nat_rebind they give the current address.) With --ipv6 each
# WAN also has fd00:1SI::2/64 (gateway ::1) and the hub fd00:200::2.
lab_wan_ip6() { echo "fd00:1$1$2::2"; }
lab_wan_gw6() { echo "fd00:1$1$2::1"; }
lab_wan_ip() { cat "$LAB_STATE/wan-ip-$1-$2" 2>/dev/null || echo "10.1$1$2.0.2"; }
lab_wan_gw() { echo "10.1$1$2.0.1"; }
lab_public_ip() {
    if ((LAB_NAT)); then
        cat "$LAB_STATE/public-ip-$1-$2" 2>/dev/null || echo "10.200.0.1$1$2"
    else
        lab_wan_ip "$1" "$2"
    fi
}

# lab_wan_readdress S I: site S's WAN I gets a new address (.2 <-> .3), like a DHCP renew that
# hands out another lease; its routes and source rule follow. Prints the new address.
lab_wan_readdress() {
    local s=$1 i=$2 old new table=$((100 + $2)) ns
    ns=$(lab_ns "site$s")
    old=$(lab_wan_ip "$s" "$i")
    if [[ $old == *.2 ]]; then new=${old%.2}.3; else new=${old%.3}.2; fi
    ip -n "$ns" rule del from "$old" lookup "$table" 2>/dev/null
    ip -n "$ns" addr del "$old/24" dev "wan$i" || return 1
    ip -n "$ns" addr add "$new/24" dev "wan$i" || return 1
    ip -n "$ns" route replace "10.1$s$i.0.0/24" dev "wan$i" src "$new" table "$table" || return 1
    ip -n "$ns" route replace default via "$(lab_wan_gw "$s" "$i")" dev "wan$i" table "$table" || return 1
    ip -n "$ns" rule add from "$new" lookup "$table" priority "$((1000 + i))" || return 1
    if ((i == 0)); then
        ip -n "$ns" route replace default via "$(lab_wan_gw "$s" "$i")" dev "wan$i" || return 1
    fi
    echo "$new" >"$LAB_STATE/wan-ip-$s-$i"
    echo "$new"
}

# lab_nat_rebind S I (needs --nat): the router maps site S's WAN I to another public address
# (10.200.0.1SI <-> 10.200.0.2SI) and forgets existing mappings, like a 4G reconnect behind
# carrier NAT: the next packet of an ongoing flow reaches the hub from the new address.
lab_nat_rebind() {
    local s=$1 i=$2 old new ns
    if ((!LAB_NAT)); then
        lab_log "lab_nat_rebind needs a lab built with --nat"
        return 1
    fi
    ns=$(lab_ns inet)
    old=$(lab_public_ip "$s" "$i")
    if [[ $old == "10.200.0.1$s$i" ]]; then new="10.200.0.2$s$i"; else new="10.200.0.1$s$i"; fi
    ip -n "$ns" addr add "$new/32" dev hub0 2>/dev/null
    ip netns exec "$ns" nft flush chain ip wgblab "w$s$i" || return 1
    ip netns exec "$ns" nft add rule ip wgblab "w$s$i" snat to "$new" || return 1
    # Existing conntrack entries would keep the old mapping for ongoing flows.
    ip netns exec "$ns" conntrack -D -s "10.1$s$i.0.0/24" >/dev/null 2>&1
    echo "$new" >"$LAB_STATE/public-ip-$s-$i"
    echo "$new"
}

# Reads a scenario (a name under scenarios/ or a path) into the LAB_LINK_* arrays.
lab_load_scenario() {
    local file=$1 lineno=0 line name rate delay jitter loss queue uprate extra
    [[ -f $file ]] || file="$LAB_DIR/scenarios/$1.conf"
    if [[ ! -f $file ]]; then
        lab_log "no scenario '$1' (have: $(cd "$LAB_DIR/scenarios" && ls -- *.conf | sed 's/\.conf$//' | tr '\n' ' '))"
        return 1
    fi
    LAB_SCENARIO=$file
    LAB_LINK_NAME=() LAB_LINK_RATE=() LAB_LINK_UPRATE=() LAB_LINK_DELAY=() LAB_LINK_JITTER=()
    LAB_LINK_LOSS=() LAB_LINK_QUEUE=()
    local num='^[0-9]+(\.[0-9]+)?$'
    while IFS= read -r line || [[ -n $line ]]; do
        lineno=$((lineno + 1))
        line=${line%%#*}
        [[ -z ${line// /} ]] && continue
        read -r name rate delay jitter loss queue uprate extra <<<"$line"
        if [[ -z $queue || -n $extra ]]; then
            lab_log "$file:$lineno: expected 'name rate_mbit delay_ms jitter_ms loss_pct queue_ms [up_rate_mbit]'"
            return 1
        fi
        [[ $queue == - ]] && queue=$LAB_DEFAULT_QUEUE_MS
        [[ -z $uprate ]] && uprate=$rate
        if ! [[ $name =~ ^[a-z][a-z0-9]{0,9}$ ]]; then
            lab_log "$file:$lineno: link name '$name' must be 1-10 of a-z0-9, starting with a letter"
            return 1
        fi
        local field
        for field in "rate_mbit=$rate" "delay_ms=$delay" "jitter_ms=$jitter" "loss_pct=$loss" "queue_ms=$queue" "up_rate_mbit=$uprate"; do
            if ! [[ ${field#*=} =~ $num ]]; then
                lab_log "$file:$lineno: ${field%%=*} '${field#*=}' is not a non-negative number"
                return 1
            fi
        done
        LAB_LINK_NAME+=("$name") LAB_LINK_RATE+=("$rate") LAB_LINK_UPRATE+=("$uprate")
        LAB_LINK_DELAY+=("$delay") LAB_LINK_JITTER+=("$jitter") LAB_LINK_LOSS+=("$loss")
        LAB_LINK_QUEUE+=("$queue")
    done <"$file"
    if ((${#LAB_LINK_NAME[@]} == 0 || ${#LAB_LINK_NAME[@]} > LAB_MAX_LINKS)); then
        lab_log "$file: needs 1 to $LAB_MAX_LINKS links, has ${#LAB_LINK_NAME[@]}"
        return 1
    fi
}

# veth pair with one end in each namespace (created there directly: no name clash in the root).
lab_veth() {
    local ns1=$1 if1=$2 ns2=$3 if2=$4
    ip link add "$if1" netns "$(lab_ns "$ns1")" type veth peer name "$if2" netns "$(lab_ns "$ns2")" || return 1
    ip -n "$(lab_ns "$ns1")" link set "$if1" up && ip -n "$(lab_ns "$ns2")" link set "$if2" up
}

# Offloads off: the emulator must see (and send) real MTU-sized frames with full checksums.
lab_no_offload() {
    ip netns exec "$(lab_ns "$1")" ethtool -K "$2" rx off tx off tso off gso off gro off >/dev/null 2>&1 ||
        ip netns exec "$(lab_ns "$1")" ethtool -K "$2" tso off gso off gro off >/dev/null
}

lab_sysctl() {
    ip netns exec "$(lab_ns "$1")" sysctl -qw "$2" >/dev/null
}

lab_save_state() {
    declare -p LAB_PREFIX LAB_STATE LAB_SITES LAB_NAT LAB_LAN LAB_IPV6 LAB_SCENARIO LAB_LINK_NAME LAB_LINK_RATE \
        LAB_LINK_UPRATE LAB_LINK_DELAY LAB_LINK_JITTER LAB_LINK_LOSS LAB_LINK_QUEUE |
        sed "s/^declare /declare -g /" >"$LAB_STATE/env"
}

lab_start_emulator() {
    local s=$1 i=$2 bin=$3
    local name=${LAB_LINK_NAME[$i]} tag="s${s}-${LAB_LINK_NAME[$i]}"
    local common="delay_ms=${LAB_LINK_DELAY[$i]} jitter_ms=${LAB_LINK_JITTER[$i]} loss_pct=${LAB_LINK_LOSS[$i]} queue_ms=${LAB_LINK_QUEUE[$i]}"
    local pidfile="$LAB_STATE/emu-$tag.pid"
    ip netns exec "$(lab_ns emu)" "$bin" run --a "s${s}w${i}a" --b "s${s}w${i}b" \
        --control "$LAB_STATE/emu-$tag.sock" --pid-file "$pidfile" --seed "$((s * 100 + i + 1))" \
        ${LAB_EMU_REALTIME:+--realtime} \
        --set "up $common rate_mbit=${LAB_LINK_UPRATE[$i]}" \
        --set "down $common rate_mbit=${LAB_LINK_RATE[$i]}" \
        >"$LAB_STATE/emu-$tag.log" 2>&1 &
    local pid=$!
    LAB_PIDS+=("$pid")
    echo "$pid" >>"$LAB_STATE/pids"
    local tries
    for ((tries = 0; tries < 50; tries++)); do
        [[ -S $LAB_STATE/emu-$tag.sock && -s $pidfile ]] && return 0
        if ! lab_alive "$pid"; then
            lab_log "emulator for $name (site $s) failed: $(tail -n 3 "$LAB_STATE/emu-$tag.log")"
            return 1
        fi
        sleep 0.1
    done
    lab_log "emulator for $name (site $s) not ready after 5 s"
    return 1
}

lab_build() {
    local bin s i
    bin=$(lab_linkemu_bin) || return 1
    local tool
    for tool in ip ethtool sysctl; do
        command -v "$tool" >/dev/null || { lab_log "missing tool '$tool' (apt-get install iproute2 ethtool procps)"; return 1; }
    done
    if ((LAB_NAT)) && ! command -v nft >/dev/null; then
        lab_log "--nat needs nft (apt-get install nftables)"
        return 1
    fi
    if ((LAB_NAT)) && ! command -v conntrack >/dev/null; then
        lab_log "--nat needs conntrack, for lab_nat_rebind (apt-get install conntrack)"
        return 1
    fi
    mkdir -p "$LAB_STATE" || return 1
    : >"$LAB_STATE/pids"
    echo "$$" >"$LAB_STATE/owner"
    lab_save_state

    local roles=(emu inet hub)
    for ((s = 1; s <= LAB_SITES; s++)); do
        roles+=("site$s")
        ((LAB_LAN)) && roles+=("lan$s")
    done
    local role
    for role in "${roles[@]}"; do
        ip netns add "$(lab_ns "$role")" || return 1
        ip -n "$(lab_ns "$role")" link set lo up || return 1
    done

    # Router and hub.
    lab_sysctl inet net.ipv4.ip_forward=1 || return 1
    lab_sysctl inet net.ipv4.conf.all.rp_filter=0
    lab_veth inet hub0 hub eth0 || return 1
    ip -n "$(lab_ns inet)" addr add "$LAB_HUB_GW/24" dev hub0 || return 1
    ip -n "$(lab_ns hub)" addr add "$LAB_HUB_IP/24" dev eth0 || return 1
    ip -n "$(lab_ns hub)" route add default via "$LAB_HUB_GW" || return 1
    if ((LAB_IPV6)); then
        lab_sysctl inet net.ipv6.conf.all.forwarding=1 || return 1
        ip -n "$(lab_ns inet)" addr add "$LAB_HUB_GW6/64" dev hub0 nodad || return 1
        ip -n "$(lab_ns hub)" addr add "$LAB_HUB_IP6/64" dev eth0 nodad || return 1
        ip -n "$(lab_ns hub)" -6 route add default via "$LAB_HUB_GW6" || return 1
    fi
    if ((LAB_NAT)); then
        ip netns exec "$(lab_ns inet)" nft -f - <<'EOF' || return 1
table ip wgblab {
    chain postrouting { type nat hook postrouting priority srcnat; policy accept; }
}
EOF
    fi

    for ((s = 1; s <= LAB_SITES; s++)); do
        local site="site$s"
        lab_sysctl "$site" net.ipv4.ip_forward=1 || return 1
        lab_sysctl "$site" net.ipv4.conf.all.rp_filter=0
        lab_sysctl "$site" net.ipv4.conf.default.rp_filter=0
        for i in "${!LAB_LINK_NAME[@]}"; do
            local wan="wan$i" a="s${s}w${i}a" b="s${s}w${i}b" rtr="s${s}w${i}"
            local ip gw table=$((100 + i))
            ip=$(lab_wan_ip "$s" "$i") gw=$(lab_wan_gw "$s" "$i")
            lab_veth "$site" "$wan" emu "$a" || return 1
            lab_veth emu "$b" inet "$rtr" || return 1
            lab_no_offload "$site" "$wan" && lab_no_offload emu "$a" &&
                lab_no_offload emu "$b" && lab_no_offload inet "$rtr" || return 1
            ip -n "$(lab_ns "$site")" addr add "$ip/24" dev "$wan" || return 1
            ip -n "$(lab_ns inet)" addr add "$gw/24" dev "$rtr" || return 1
            # Per-WAN policy routing, as on a multi-WAN router.
            ip -n "$(lab_ns "$site")" route add "10.1$s$i.0.0/24" dev "$wan" src "$ip" table "$table" || return 1
            ip -n "$(lab_ns "$site")" route add default via "$gw" dev "$wan" table "$table" || return 1
            ip -n "$(lab_ns "$site")" rule add from "$ip" lookup "$table" priority "$((1000 + i))" || return 1
            if ((i == 0)); then
                ip -n "$(lab_ns "$site")" route add default via "$gw" dev "$wan" || return 1
            fi
            if ((LAB_IPV6)); then
                # The same plan in IPv6 (no NAT: v6 WANs are routed), fd00:1SI::/64 per WAN.
                local ip6 gw6
                ip6=$(lab_wan_ip6 "$s" "$i") gw6=$(lab_wan_gw6 "$s" "$i")
                ip -n "$(lab_ns "$site")" addr add "$ip6/64" dev "$wan" nodad || return 1
                ip -n "$(lab_ns inet)" addr add "$gw6/64" dev "$rtr" nodad || return 1
                ip -n "$(lab_ns "$site")" -6 route add "fd00:1$s$i::/64" dev "$wan" table "$table" || return 1
                ip -n "$(lab_ns "$site")" -6 route add default via "$gw6" dev "$wan" table "$table" || return 1
                ip -n "$(lab_ns "$site")" -6 rule add from "$ip6" lookup "$table" priority "$((1000 + i))" || return 1
                if ((i == 0)); then
                    ip -n "$(lab_ns "$site")" -6 route add default via "$gw6" dev "$wan" || return 1
                fi
            fi
            if ((LAB_NAT)); then
                local pub
                pub=$(lab_public_ip "$s" "$i")
                ip -n "$(lab_ns inet)" addr add "$pub/32" dev hub0 || return 1
                # One chain per WAN, so lab_nat_rebind can swap its mapping alone.
                ip netns exec "$(lab_ns inet)" nft add chain ip wgblab "w$s$i" || return 1
                ip netns exec "$(lab_ns inet)" nft add rule ip wgblab "w$s$i" snat to "$pub" || return 1
                ip netns exec "$(lab_ns inet)" nft add rule ip wgblab postrouting \
                    oifname hub0 ip saddr "10.1$s$i.0.0/24" jump "w$s$i" || return 1
            fi
            lab_start_emulator "$s" "$i" "$bin" || return 1
        done
        if ((LAB_LAN)); then
            lab_veth "$site" lan0 "lan$s" eth0 || return 1
            ip -n "$(lab_ns "$site")" addr add "192.168.$s.1/24" dev lan0 || return 1
            ip -n "$(lab_ns "lan$s")" addr add "192.168.$s.2/24" dev eth0 || return 1
            ip -n "$(lab_ns "lan$s")" route add default via "192.168.$s.1" || return 1
        fi
    done
}

# lab_up SCENARIO [--sites N] [--nat] [--no-lan] [--ipv6]: builds the lab; on any failure tears down
# what it built and returns 1.
lab_up() {
    local scenario=""
    LAB_SITES=1 LAB_NAT=0 LAB_LAN=1 LAB_IPV6=0
    while (($#)); do
        case $1 in
        --sites)
            LAB_SITES=${2:-}
            shift
            ;;
        --nat) LAB_NAT=1 ;;
        --no-lan) LAB_LAN=0 ;;
        --ipv6) LAB_IPV6=1 ;;
        -*)
            lab_log "unknown option '$1'"
            return 1
            ;;
        *) scenario=$1 ;;
        esac
        shift
    done
    if [[ -z $scenario ]]; then
        lab_log "usage: lab_up SCENARIO [--sites N] [--nat] [--no-lan] [--ipv6]"
        return 1
    fi
    if ! [[ $LAB_SITES =~ ^[1-9]$ ]] || ((LAB_SITES > LAB_MAX_SITES)); then
        lab_log "--sites must be 1..$LAB_MAX_SITES"
        return 1
    fi
    if [[ $(id -u) != 0 ]]; then
        lab_log "needs root (network namespaces)"
        return 1
    fi
    lab_load_scenario "$scenario" || return 1
    if [[ -e $LAB_STATE ]] || ip netns list | grep -q "^${LAB_PREFIX}"; then
        lab_log "a lab with prefix $LAB_PREFIX already exists; 'lab.sh down ${LAB_PREFIX}' or 'lab.sh gc' first"
        return 1
    fi
    if ! lab_build; then
        lab_log "setting up the lab failed; removing what was built"
        lab_down
        return 1
    fi
}

# Whether a PID is a live process (a zombie waiting to be reaped counts as gone).
lab_alive() {
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    stat=${stat##*) }
    [[ ${stat%% *} != Z ]]
}

# Ends PIDs: TERM, up to 3 s to exit, then KILL.
lab_kill_pids() {
    # Cleanup must run to the end even in a caller that uses set -e / pipefail.
    local -
    set +e +o pipefail
    local pid alive=() tries
    for pid in "$@"; do
        [[ $pid =~ ^[0-9]+$ ]] || continue
        kill -TERM "$pid" 2>/dev/null && alive+=("$pid")
    done
    for ((tries = 0; tries < 30 && ${#alive[@]} > 0; tries++)); do
        local still=()
        for pid in "${alive[@]}"; do
            lab_alive "$pid" && still+=("$pid")
        done
        alive=("${still[@]}")
        ((${#alive[@]})) && sleep 0.1
    done
    for pid in "${alive[@]}"; do
        kill -KILL "$pid" 2>/dev/null
    done
    # Reap our own children quietly; others are not ours to wait for.
    local children
    children=" $(jobs -p | tr '\n' ' ') "
    for pid in "$@"; do
        [[ $children == *" $pid "* ]] && { wait "$pid"; } 2>/dev/null
    done
    return 0
}

# Removes every process, namespace and state file of the lab with prefix $1 (default: ours).
lab_down_prefix() {
    # Cleanup must run to the end even in a caller that uses set -e / pipefail.
    local -
    set +e +o pipefail
    local prefix=$1 state="$LAB_RUN_DIR/${1%-}" ns pids=()
    [[ -f $state/pids ]] && mapfile -t -O "${#pids[@]}" pids <"$state/pids"
    lab_kill_pids "${pids[@]}"
    # Anything else still running inside the lab's namespaces (daemons a test started).
    local leftover=()
    for ns in $(ip netns list | awk '{print $1}' | grep "^${prefix}"); do
        mapfile -t -O "${#leftover[@]}" leftover < <(ip netns pids "$ns" 2>/dev/null)
    done
    lab_kill_pids "${leftover[@]}"
    for ns in $(ip netns list | awk '{print $1}' | grep "^${prefix}"); do
        ip netns del "$ns" 2>/dev/null || lab_log "could not delete namespace $ns"
    done
    rm -rf -- "$state"
}

# Tears down this shell's lab; safe to call twice and from a trap.
lab_down() {
    local status=$?
    local -
    set +e +o pipefail
    lab_kill_pids "${LAB_PIDS[@]}"
    LAB_PIDS=()
    lab_down_prefix "$LAB_PREFIX"
    return $status
}

# Always clean up, whether the script ends, fails or is interrupted.
lab_trap() {
    trap 'lab_down' EXIT
    trap 'lab_down; trap - EXIT; exit 130' INT
    trap 'lab_down; trap - EXIT; exit 143' TERM
}

# lab_emu [SITE:]LINK COMMAND...: talk to a link's emulator, e.g.
#   lab_emu lte set down delay_ms=50 loss_pct=5;  lab_emu 2:cable outage on;  lab_emu sat stats
lab_emu() {
    local target=$1 site=1 link
    shift
    link=$target
    if [[ $target == *:* ]]; then
        site=${target%%:*}
        site=${site#site}
        link=${target#*:}
    fi
    lab_link_index "$link" >/dev/null || return 1
    "$(lab_linkemu_bin)" ctl "$LAB_STATE/emu-s$site-$link.sock" "$@"
}

# lab_cycle [SITE:]LINK NORMAL_S EVENT_S COUNT "EVENT CMD" "NORMAL CMD": in the background,
# COUNT times: run EVENT CMD on the link's emulator, wait EVENT_S, run NORMAL CMD, wait
# NORMAL_S. E.g. satellite handovers every 15 s:
#   lab_cycle sat 15 0.1 20 "set both delay_ms=380" "set both delay_ms=300"
# PID in LAB_LAST_PID; lab_down stops it.
lab_cycle() {
    local link=$1 normal_s=$2 event_s=$3 count=$4 event=$5 normal=$6
    if ! [[ $count =~ ^[0-9]+$ ]] || ((count > 10000)); then
        lab_log "lab_cycle: COUNT must be 0..10000"
        return 1
    fi
    lab_link_index "${link#*:}" >/dev/null || return 1
    (
        # Killed by lab_down: take the running sleep along, so nothing is left behind.
        trap 'kill "$nap" 2>/dev/null; exit 0' TERM
        nap=""
        for ((n = 0; n < count; n++)); do
            # shellcheck disable=SC2086 # the commands are word lists on purpose
            lab_emu "$link" $event >/dev/null || exit 1
            sleep "$event_s" &
            nap=$!
            wait "$nap"
            # shellcheck disable=SC2086
            lab_emu "$link" $normal >/dev/null || exit 1
            sleep "$normal_s" &
            nap=$!
            wait "$nap"
        done
    ) &
    LAB_LAST_PID=$!
    LAB_PIDS+=("$LAB_LAST_PID")
    [[ -d $LAB_STATE ]] && echo "$LAB_LAST_PID" >>"$LAB_STATE/pids"
    return 0
}

# lab_flap [SITE:]LINK UP_S DOWN_S COUNT: a flapping link, COUNT outages of DOWN_S seconds
# UP_S seconds apart (see lab_cycle).
lab_flap() {
    lab_cycle "$1" "$2" "$3" "$4" "outage on" "outage off"
}

# Value of one KEY from a `stats`/`show` reply: lab_emu_get cable up.passed_packets
lab_emu_get() {
    lab_emu "$1" stats | tr ' ' '\n' | sed -n "s/^$2=//p"
}

# Adopts a lab started by `lab.sh up` (by prefix, or the only one running).
lab_attach() {
    local prefix=${1:-} dirs
    if [[ -z $prefix ]]; then
        mapfile -t dirs < <(ls -d "$LAB_RUN_DIR"/wgb-*/ 2>/dev/null)
        if ((${#dirs[@]} != 1)); then
            lab_log "${#dirs[@]} labs running; name one with --prefix (see 'lab.sh status')"
            return 1
        fi
        prefix="$(basename "${dirs[0]}")-"
    fi
    prefix="${prefix%-}-"
    if [[ ! -f $LAB_RUN_DIR/${prefix%-}/env ]]; then
        lab_log "no lab with prefix $prefix"
        return 1
    fi
    # shellcheck disable=SC1090
    source "$LAB_RUN_DIR/${prefix%-}/env"
}

# Removes labs whose owner process is gone (crashed runs); with --all, every wgb-* lab.
lab_gc() {
    # Cleanup must run to the end even in a caller that uses set -e / pipefail.
    local -
    set +e +o pipefail
    local all=0 prefixes=() ns prefix owner
    [[ ${1:-} == --all ]] && all=1
    for ns in $(ip netns list | awk '{print $1}' | grep -E '^wgb-[0-9]+-'); do
        prefixes+=("$(sed -E 's/^(wgb-[0-9]+-).*/\1/' <<<"$ns")")
    done
    for prefix in "$LAB_RUN_DIR"/wgb-*/; do
        [[ -d $prefix ]] && prefixes+=("$(basename "$prefix")-")
    done
    for prefix in $(printf '%s\n' "${prefixes[@]}" | sort -u); do
        owner=$(cat "$LAB_RUN_DIR/${prefix%-}/owner" 2>/dev/null)
        if ((!all)); then
            [[ -f $LAB_RUN_DIR/${prefix%-}/persistent ]] && continue
            [[ -n $owner ]] && lab_alive "$owner" && continue
        fi
        lab_log "removing lab $prefix"
        lab_down_prefix "$prefix"
    done
}

lab_status() {
    local dir
    for dir in "$LAB_RUN_DIR"/wgb-*/; do
        [[ -f $dir/env ]] || continue
        (
            # shellcheck disable=SC1091
            source "$dir/env"
            echo "$LAB_PREFIX scenario=$(basename "$LAB_SCENARIO" .conf) sites=$LAB_SITES nat=$LAB_NAT links=${LAB_LINK_NAME[*]}"
        )
    done
    ip netns list | awk '{print "  netns " $1}' | grep ' wgb-' || true
}

lab_describe() {
    local s i
    echo "lab $LAB_PREFIX up: scenario $(basename "$LAB_SCENARIO" .conf), $LAB_SITES site(s), nat=$LAB_NAT"
    echo "  hub:  ip netns exec $(lab_ns hub) ...   address $LAB_HUB_IP"
    for ((s = 1; s <= LAB_SITES; s++)); do
        echo "  site$s: ip netns exec $(lab_ns "site$s") ..."
        for i in "${!LAB_LINK_NAME[@]}"; do
            printf '    wan%d %-8s %s via %s  down %s up %s Mbit/s, %s ms +-%s, loss %s%%, queue %s ms\n' \
                "$i" "${LAB_LINK_NAME[$i]}" "$(lab_wan_ip "$s" "$i")" "$(lab_wan_gw "$s" "$i")" \
                "${LAB_LINK_RATE[$i]}" "${LAB_LINK_UPRATE[$i]}" "${LAB_LINK_DELAY[$i]}" \
                "${LAB_LINK_JITTER[$i]}" "${LAB_LINK_LOSS[$i]}" "${LAB_LINK_QUEUE[$i]}"
        done
        ((LAB_LAN)) && echo "  lan$s: ip netns exec $(lab_ns "lan$s") ...   address 192.168.$s.2"
    done
    echo "  control: $0 emu --prefix $LAB_PREFIX LINK stats    teardown: $0 down $LAB_PREFIX"
}

lab_main() {
    local cmd=${1:-}
    shift || true
    case $cmd in
    up)
        lab_up "$@" || return 1
        # The lab outlives this process: gc must leave it alone, `down` removes it.
        touch "$LAB_STATE/persistent"
        LAB_PIDS=()
        lab_describe
        ;;
    down)
        if (($#)); then
            lab_down_prefix "${1%-}-"
        else
            local dir
            for dir in "$LAB_RUN_DIR"/wgb-*/; do
                [[ -f $dir/persistent ]] && lab_down_prefix "$(basename "$dir")-"
            done
        fi
        return 0
        ;;
    emu)
        local prefix=""
        if [[ ${1:-} == --prefix ]]; then
            prefix=$2
            shift 2
        fi
        lab_attach "$prefix" || return 1
        lab_emu "$@"
        ;;
    gc) lab_gc "$@" ;;
    status) lab_status ;;
    *)
        echo "usage: $0 up SCENARIO [--sites N] [--nat] [--no-lan] [--ipv6] | down [PREFIX] | emu [--prefix P] [SITE:]LINK CMD... | status | gc [--all]" >&2
        return 2
        ;;
    esac
}

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
    lab_main "$@"
    exit $?
fi
