//! Tests of `wgbond::io::netcfg` against the real kernel.
//!
//! Each test runs on its own thread inside a private network namespace (unshare(CLONE_NEWNET)
//! on that thread; the `ip` commands it spawns inherit the namespace), so nothing outside is
//! touched and the namespace disappears with the thread. Without root they skip.
//!
//! Topology built in each namespace (veth pairs wan0/wan0p, wan1/wan1p stand in for two WANs):
//! ```text
//!   wan0  192.0.2.2/24     2001:db8:0:1::2/64   default via 192.0.2.1 / 2001:db8:0:1::1 metric 100
//!   wan1  198.51.100.2/24  2001:db8:0:2::2/64   default via 198.51.100.1 / 2001:db8:0:2::1 metric 200
//!   wgb0  TUN (ip tuntap), configured by netcfg
//! ```

use std::net::IpAddr;
use std::process::Command;
use std::time::Duration;

use ipnet::IpNet;
use wgbond::io::netcfg::{
    apply, apply_with_injected_failure, NetPlan, NetcfgError, Nexthop, RouteTableSetting, WanBind,
    WanLinkPlan, FIRST_TABLE,
};

const TUN: &str = "wgb0";

/// Runs `test` on a fresh thread in a fresh network namespace, or skips without root.
fn in_netns(name: &str, test: impl FnOnce() + Send + 'static) {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipping {name}: needs root to create a network namespace");
        return;
    }
    let thread = std::thread::spawn(move || {
        // SAFETY: unshare affects only the calling thread's network namespace (CLONE_NEWNET
        // is per thread), which is this test's own thread.
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(
            rc,
            0,
            "unshare(CLONE_NEWNET): {}",
            std::io::Error::last_os_error()
        );
        test();
    });
    if let Err(panic) = thread.join() {
        std::panic::resume_unwind(panic);
    }
}

/// Runs `ip ARGS` and returns its stdout; panics on failure.
fn ip(args: &str) -> String {
    let out = Command::new("ip")
        .args(args.split_whitespace())
        .output()
        .unwrap_or_else(|e| panic!("cannot run `ip {args}`: {e}"));
    assert!(
        out.status.success(),
        "`ip {args}` failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `ip ARGS` that may fail; returns stdout + stderr.
fn ip_any(args: &str) -> String {
    let out = Command::new("ip")
        .args(args.split_whitespace())
        .output()
        .unwrap_or_else(|e| panic!("cannot run `ip {args}`: {e}"));
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `ip link`, `ip addr`, `ip rule`, `ip -6 rule`, `ip route show table all`,
/// `ip -6 route show table all`.
#[derive(Debug, PartialEq, Eq)]
struct Snapshot(Vec<(String, String)>);

const SNAPSHOT_COMMANDS: [&str; 6] = [
    "link",
    "addr",
    "rule",
    "-6 rule",
    "route show table all",
    "-6 route show table all",
];

fn snapshot() -> Snapshot {
    Snapshot(
        SNAPSHOT_COMMANDS
            .iter()
            .map(|c| (c.to_string(), ip(c)))
            .collect(),
    )
}

/// Like [`snapshot`], but with the qdisc names masked: the kernel attaches a default qdisc to
/// a device the first time it goes up and keeps it (noop -> pfifo_fast); no netlink request
/// undoes that, and the daemon deletes the TUN device anyway.
fn snapshot_masking_qdisc() -> Snapshot {
    let mut s = snapshot();
    for (_, text) in &mut s.0 {
        *text = text
            .split(' ')
            .collect::<Vec<_>>()
            .windows(2)
            .fold(String::new(), |mut acc, w| {
                if acc.is_empty() {
                    acc.push_str(w[0]);
                }
                acc.push(' ');
                acc.push_str(if w[0] == "qdisc" { "*" } else { w[1] });
                acc
            });
    }
    s
}

fn assert_same(before: &Snapshot, after: &Snapshot, when: &str) {
    for ((cmd, a), (_, b)) in before.0.iter().zip(&after.0) {
        assert_eq!(a, b, "`ip {cmd}` differs {when}");
    }
}

/// The snapshot with each command's lines sorted.
fn sorted_lines(s: &Snapshot) -> Snapshot {
    Snapshot(
        s.0.iter()
            .map(|(cmd, text)| {
                let mut lines: Vec<&str> = text.lines().collect();
                lines.sort_unstable();
                (cmd.clone(), lines.join("\n"))
            })
            .collect(),
    )
}

/// Two WANs (veth pairs; this kernel has no dummy module) with v4 and v6 default routes.
fn build_wans() {
    // No duplicate address detection: addresses would otherwise change from "tentative" to
    // final while the test compares snapshots.
    for scope in ["all", "default"] {
        std::fs::write(format!("/proc/sys/net/ipv6/conf/{scope}/accept_dad"), "0")
            .unwrap_or_else(|e| panic!("accept_dad: {e}"));
    }
    ip("link set lo up");
    for (i, v4, gw4, metric) in [
        (0, "192.0.2.2/24", "192.0.2.1", 100),
        (1, "198.51.100.2/24", "198.51.100.1", 200),
    ] {
        let dev = format!("wan{i}");
        let sub = i + 1;
        ip(&format!("link add {dev} type veth peer name {dev}p"));
        ip(&format!("link set {dev}p up"));
        ip(&format!("link set {dev} up"));
        ip(&format!("addr add {v4} dev {dev}"));
        ip(&format!(
            "-6 addr add 2001:db8:0:{sub}::2/64 dev {dev} nodad"
        ));
        ip(&format!(
            "route add default via {gw4} dev {dev} metric {metric}"
        ));
        ip(&format!(
            "-6 route add default via 2001:db8:0:{sub}::1 dev {dev} metric {metric}"
        ));
    }
    wait_settled();
}

/// Waits (at most 3 s) until every WAN veth reports state UP and the snapshot stops changing:
/// carrier, link-local addresses and the local routes of new IPv6 addresses appear
/// asynchronously, and a snapshot taken before would differ from one taken later.
fn wait_settled() {
    let mut last = snapshot();
    for _ in 0..60 {
        std::thread::sleep(Duration::from_millis(50));
        let now = snapshot();
        let links_up = now.0[0]
            .1
            .lines()
            .filter(|l| l.contains(": wan"))
            .all(|l| l.contains("state UP"));
        if links_up && now == last {
            return;
        }
        last = now;
    }
    panic!("the WAN interfaces did not settle within 3 s:\n{last:#?}");
}

fn add_tun() {
    ip(&format!("tuntap add dev {TUN} mode tun"));
}

fn del_tun() {
    ip(&format!("link del {TUN}"));
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("tokio runtime: {e}"))
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap_or_else(|e| panic!("bad net {s}: {e}"))
}

fn addr(s: &str) -> IpAddr {
    s.parse().unwrap_or_else(|e| panic!("bad address {s}: {e}"))
}

/// A site with two WANs and a full tunnel (v4 and v6).
fn site_plan() -> NetPlan {
    NetPlan {
        tun_name: TUN.to_owned(),
        addresses: vec![net("10.99.0.2/24"), net("fd99::2/64")],
        mtu: 1400,
        allowed_ips: vec![net("0.0.0.0/0"), net("::/0")],
        table: RouteTableSetting::Auto,
        fwmark: None,
        links: vec![
            WanLinkPlan {
                name: "cable".to_owned(),
                bind: WanBind::Interface("wan0".to_owned()),
                gateway: None,
            },
            WanLinkPlan {
                name: "lte".to_owned(),
                bind: WanBind::Interface("wan1".to_owned()),
                gateway: None,
            },
        ],
    }
}

fn assert_contains(haystack: &str, needle: &str, what: &str) {
    assert!(
        haystack.contains(needle),
        "{what}: expected `{needle}` in:\n{haystack}"
    );
}

#[test]
fn full_tunnel_two_wans_apply_and_teardown_restore_everything() {
    in_netns("full_tunnel_two_wans", || {
        build_wans();
        let before_tun = snapshot();
        add_tun();
        let before = snapshot_masking_qdisc();
        let rt = runtime();
        let plan = site_plan();
        let applied = rt
            .block_on(apply(&plan))
            .unwrap_or_else(|e| panic!("apply: {e}"));

        let links = applied.links();
        assert_eq!(links.len(), 2);
        assert_eq!(
            (links[0].mark, links[0].table),
            (FIRST_TABLE + 1, FIRST_TABLE + 1)
        );
        assert_eq!(
            (links[1].mark, links[1].table),
            (FIRST_TABLE + 2, FIRST_TABLE + 2)
        );
        assert_eq!(links[0].v4, Some(Nexthop::Via(addr("192.0.2.1"))));
        assert_eq!(links[1].v6, Some(Nexthop::Via(addr("2001:db8:0:2::1"))));
        assert_eq!(applied.tunnel_table(), Some(FIRST_TABLE));
        assert_eq!(applied.fwmark(), Some(FIRST_TABLE));

        // The TUN device.
        let link = ip(&format!("link show {TUN}"));
        assert_contains(&link, "mtu 1400", "TUN mtu");
        assert_contains(&link, ",UP", "TUN up");
        let addrs = ip(&format!("addr show {TUN}"));
        assert_contains(&addrs, "inet 10.99.0.2/24", "TUN v4 address");
        assert_contains(&addrs, "inet6 fd99::2/64", "TUN v6 address");

        // Everything goes into the tunnel...
        let get = ip("-4 route get 1.1.1.1");
        assert_contains(
            &get,
            &format!("dev {TUN} table {FIRST_TABLE}"),
            "v4 default",
        );
        let get = ip("-6 route get 2001:4860::8888");
        assert_contains(
            &get,
            &format!("dev {TUN} table {FIRST_TABLE}"),
            "v6 default",
        );
        // ...except more specific main routes (suppress_prefixlength 0)...
        let get = ip("-4 route get 192.0.2.77");
        assert_contains(&get, "dev wan0", "connected WAN subnet");
        // ...the bypass mark (main table)...
        let get = ip(&format!("-4 route get 1.1.1.1 mark {FIRST_TABLE}"));
        assert_contains(&get, "via 192.0.2.1 dev wan0", "bypass mark");
        // ...and each link's mark, via that link's own WAN gateway.
        for (link, gw4, gw6, dev) in [
            (&links[0], "192.0.2.1", "2001:db8:0:1::1", "wan0"),
            (&links[1], "198.51.100.1", "2001:db8:0:2::1", "wan1"),
        ] {
            let get = ip(&format!("-4 route get 1.1.1.1 mark {}", link.mark));
            assert_contains(
                &get,
                &format!("via {gw4} dev {dev} table {}", link.table),
                "link v4",
            );
            let get = ip(&format!("-6 route get 2001:4860::8888 mark {}", link.mark));
            assert_contains(
                &get,
                &format!("via {gw6} dev {dev} table {}", link.table),
                "link v6",
            );
        }
        let rules = ip("rule");
        assert_contains(
            &rules,
            "31100:\tfrom all fwmark 0xca6d lookup 51821",
            "link rule",
        );
        assert_contains(
            &rules,
            "31200:\tfrom all lookup main suppress_prefixlength 0",
            "suppress",
        );
        assert_contains(
            &rules,
            "31201:\tnot from all fwmark 0xca6c lookup 51820",
            "tunnel rule",
        );
        let rules6 = ip("-6 rule");
        assert_contains(
            &rules6,
            "31201:\tnot from all fwmark 0xca6c lookup 51820",
            "v6 rule",
        );

        rt.block_on(applied.teardown())
            .unwrap_or_else(|e| panic!("teardown: {e}"));
        assert_same(&before, &snapshot_masking_qdisc(), "after teardown");
        del_tun();
        assert_same(&before_tun, &snapshot(), "after teardown and TUN removal");
    });
}

#[test]
fn split_tunnel_with_bind_address_link() {
    in_netns("split_tunnel_with_bind_address_link", || {
        build_wans();
        add_tun();
        let before = snapshot_masking_qdisc();
        let rt = runtime();
        let mut plan = site_plan();
        plan.allowed_ips = vec![
            net("10.88.0.0/16"),
            net("fd88::/64"),
            // Inside the TUN address's own prefix: the kernel's prefix route covers it.
            net("10.99.0.1/32"),
        ];
        plan.links[1].bind = WanBind::Address(addr("198.51.100.2"));
        let applied = rt
            .block_on(apply(&plan))
            .unwrap_or_else(|e| panic!("apply: {e}"));
        assert_eq!(applied.tunnel_table(), None);
        assert_eq!(applied.fwmark(), None);

        assert_contains(
            &ip("-4 route get 10.88.3.4"),
            &format!("dev {TUN}"),
            "v4 split",
        );
        assert_contains(
            &ip("-6 route get fd88::9"),
            &format!("dev {TUN}"),
            "v6 split",
        );
        assert_contains(
            &ip("-4 route get 1.1.1.1"),
            "via 192.0.2.1 dev wan0",
            "default untouched",
        );
        let get = ip("-4 route get 1.1.1.1 from 198.51.100.2");
        assert_contains(
            &get,
            "via 198.51.100.1 dev wan1",
            "bind_address source rule",
        );
        let get = ip(&format!(
            "-4 route get 1.1.1.1 mark {}",
            applied.links()[1].mark
        ));
        assert_contains(&get, "via 198.51.100.1 dev wan1", "bind_address mark rule");
        let rules = ip("rule");
        assert!(
            !rules.contains("31200"),
            "no tunnel rules in a split tunnel:\n{rules}"
        );
        assert_contains(&rules, "from 198.51.100.2 lookup 51822", "source rule");
        // IPv4-only link: no IPv6 rule for it.
        assert!(
            !ip("-6 rule").contains("0xca6e"),
            "v6 rule for an IPv4 bind_address link"
        );

        rt.block_on(applied.teardown())
            .unwrap_or_else(|e| panic!("teardown: {e}"));
        assert_same(&before, &snapshot_masking_qdisc(), "after teardown");
    });
}

#[test]
fn missing_wan_interface_fails_before_changing_anything() {
    in_netns("missing_wan_interface", || {
        build_wans();
        add_tun();
        let before = snapshot();
        let rt = runtime();
        let mut plan = site_plan();
        plan.links[1].bind = WanBind::Interface("wwan0".to_owned());
        let err = match rt.block_on(apply(&plan)) {
            Ok(_) => panic!("apply succeeded with a missing WAN interface"),
            Err(e) => e,
        };
        assert_eq!(
            err,
            NetcfgError::Invalid("link `lte`: interface wwan0 does not exist".to_owned())
        );
        // Not even the qdisc: the TUN device was never brought up.
        assert_same(&before, &snapshot(), "after a refused apply");
    });
}

#[test]
fn failure_at_every_step_rolls_back_completely() {
    in_netns("failure_at_every_step", || {
        build_wans();
        add_tun();
        let before = snapshot_masking_qdisc();
        let rt = runtime();
        let plan = site_plan();
        let applied = rt
            .block_on(apply(&plan))
            .unwrap_or_else(|e| panic!("apply: {e}"));
        let steps: Vec<String> = applied.journal().map(str::to_owned).collect();
        rt.block_on(applied.teardown())
            .unwrap_or_else(|e| panic!("teardown: {e}"));
        // MTU, 2 addresses, up, 2 links x (2 fallbacks + 2 gateway routes + 2 rules),
        // 2 tunnel routes, 4 tunnel rules.
        assert_eq!(steps.len(), 4 + 12 + 2 + 4, "steps: {steps:#?}");
        for (k, step) in steps.iter().enumerate() {
            match rt.block_on(apply_with_injected_failure(&plan, k)) {
                Ok(_) => panic!("apply with a failure at step {k} succeeded"),
                Err(NetcfgError::Step {
                    step: failed,
                    cause,
                    rollback,
                }) => {
                    assert_eq!(&failed, step, "failing step {k}");
                    assert_eq!(cause, "injected failure");
                    assert!(rollback.is_empty(), "rollback failures: {rollback:?}");
                }
                Err(other) => panic!("unexpected error at step {k}: {other}"),
            }
            assert_same(
                &before,
                &snapshot_masking_qdisc(),
                &format!("after failing step {k}"),
            );
        }
    });
}

#[test]
fn kernel_refusal_midway_rolls_back() {
    in_netns("kernel_refusal_midway", || {
        build_wans();
        add_tun();
        // IPv6 disabled on the TUN device: the IPv6 address is refused after the MTU and the
        // IPv4 address were already set.
        std::fs::write(format!("/proc/sys/net/ipv6/conf/{TUN}/disable_ipv6"), "1")
            .unwrap_or_else(|e| panic!("disable_ipv6: {e}"));
        let before = snapshot_masking_qdisc();
        let rt = runtime();
        let err = match rt.block_on(apply(&site_plan())) {
            Ok(_) => panic!("apply succeeded on a TUN without IPv6"),
            Err(e) => e,
        };
        match &err {
            NetcfgError::Step { step, rollback, .. } => {
                assert_eq!(step, "add address fd99::2/64 to wgb0");
                assert!(rollback.is_empty(), "rollback failures: {rollback:?}");
            }
            other => panic!("unexpected error: {other}"),
        }
        assert_same(&before, &snapshot_masking_qdisc(), "after a refused step");
    });
}

#[test]
fn foreign_tables_and_leftover_rules_are_respected() {
    in_netns("foreign_tables_and_leftover_rules", || {
        build_wans();
        add_tun();
        // A wg-quick tunnel already uses table 51820 and mark 51820.
        ip("route add default dev wan1 table 51820");
        ip("rule add priority 32765 not fwmark 51820 lookup 51820");
        let before = snapshot_masking_qdisc();
        let rt = runtime();
        let applied = rt
            .block_on(apply(&site_plan()))
            .unwrap_or_else(|e| panic!("apply: {e}"));
        assert_eq!(applied.tunnel_table(), Some(FIRST_TABLE + 1));
        assert_eq!(applied.links()[0].table, FIRST_TABLE + 2);
        assert_eq!(applied.links()[1].mark, FIRST_TABLE + 3);
        rt.block_on(applied.teardown())
            .unwrap_or_else(|e| panic!("teardown: {e}"));
        assert_same(&before, &snapshot_masking_qdisc(), "after teardown");

        // A rule identical to one wgbond adds (a crashed daemon's leftover) is refused.
        ip("rule add priority 31200 lookup main suppress_prefixlength 0");
        let before = snapshot();
        let err = match rt.block_on(apply(&site_plan())) {
            Ok(_) => panic!("apply succeeded despite a duplicate rule"),
            Err(e) => e,
        };
        assert_contains(&err.to_string(), "already exists", "duplicate rule error");
        assert_contains(
            &err.to_string(),
            "suppress_prefixlength 0",
            "duplicate rule error",
        );
        assert_same(&before, &snapshot(), "after a refused apply");
    });
}

#[test]
fn refresh_follows_gateway_changes_and_late_wans() {
    in_netns("refresh_follows_gateway_changes", || {
        build_wans();
        add_tun();
        let before = snapshot_masking_qdisc();
        // wan1 is down when the tunnel comes up (modem not connected yet): the kernel drops
        // its default routes and IPv6 address.
        ip("link set wan1 down");
        let rt = runtime();
        let mut applied = rt
            .block_on(apply(&site_plan()))
            .unwrap_or_else(|e| panic!("apply: {e}"));
        assert!(
            applied
                .warnings()
                .iter()
                .any(|w| w.contains("wan1 is down")),
            "warnings: {:?}",
            applied.warnings()
        );
        let mark1 = applied.links()[1].mark;
        let get = ip_any(&format!("-4 route get 1.1.1.1 mark {mark1}"));
        // The link table's `unreachable` fallback answers, instead of the tunnel table.
        assert_contains(
            &get,
            "No route to host",
            "link on a down WAN must not leak into the tunnel",
        );

        // The modem connects: wan1 up, DHCP/RA install its addresses and default routes.
        ip("link set wan1 up");
        wait_settled();
        ip("-6 addr add 2001:db8:0:2::2/64 dev wan1 nodad");
        ip("route add default via 198.51.100.1 dev wan1 metric 200");
        ip("-6 route add default via 2001:db8:0:2::1 dev wan1 metric 200");
        let routing = rt
            .block_on(applied.refresh_link(1))
            .unwrap_or_else(|e| panic!("refresh: {e}"));
        assert_eq!(routing.v4, Some(Nexthop::Via(addr("198.51.100.1"))));
        assert_eq!(routing.v6, Some(Nexthop::Via(addr("2001:db8:0:2::1"))));
        let get = ip(&format!("-4 route get 1.1.1.1 mark {mark1}"));
        assert_contains(&get, "via 198.51.100.1 dev wan1", "after the WAN came up");
        let get = ip(&format!("-6 route get 2001:4860::8888 mark {mark1}"));
        assert_contains(
            &get,
            "via 2001:db8:0:2::1 dev wan1",
            "v6 after the WAN came up",
        );

        // DHCP renew on wan0 hands out a different gateway.
        ip("route del default via 192.0.2.1 dev wan0");
        ip("route add default via 192.0.2.254 dev wan0 metric 100");
        rt.block_on(applied.refresh_link(0))
            .unwrap_or_else(|e| panic!("refresh: {e}"));
        let mark0 = applied.links()[0].mark;
        let get = ip(&format!("-4 route get 1.1.1.1 mark {mark0}"));
        assert_contains(
            &get,
            "via 192.0.2.254 dev wan0",
            "after the gateway changed",
        );

        // The gateway disappears for a moment (DHCP in progress): the last one is kept.
        ip("route del default via 192.0.2.254 dev wan0");
        let routing = rt
            .block_on(applied.refresh_link(0))
            .unwrap_or_else(|e| panic!("refresh: {e}"));
        assert_eq!(routing.v4, Some(Nexthop::Via(addr("192.0.2.254"))));
        let get = ip(&format!("-4 route get 1.1.1.1 mark {mark0}"));
        assert_contains(
            &get,
            "via 192.0.2.254 dev wan0",
            "after the gateway vanished",
        );
        ip("route add default via 192.0.2.254 dev wan0 metric 100");

        rt.block_on(applied.teardown())
            .unwrap_or_else(|e| panic!("teardown: {e}"));
        // Undo the test's own change to wan0's default route; then everything must match.
        ip("route del default via 192.0.2.254 dev wan0");
        ip("route add default via 192.0.2.1 dev wan0 metric 100");
        // wan1's down/up (done by the test) re-inserted its kernel routes, which reorders
        // same-prefix routes of different devices: compare as sets of lines.
        assert_same(
            &sorted_lines(&before),
            &sorted_lines(&snapshot_masking_qdisc()),
            "after teardown",
        );
    });
}

/// Sends one UDP datagram to `dst` from a socket bound to `dev`, optionally marked.
fn send_bound_udp(dev: &str, mark: Option<u32>, dst: &str) {
    use std::os::fd::AsRawFd;
    let socket = std::net::UdpSocket::bind("0.0.0.0:0").unwrap_or_else(|e| panic!("bind: {e}"));
    let fd = socket.as_raw_fd();
    // SAFETY: fd is a live socket; the option values point to buffers of the given length.
    unsafe {
        let rc = libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_BINDTODEVICE,
            dev.as_ptr().cast(),
            dev.len() as libc::socklen_t,
        );
        assert_eq!(
            rc,
            0,
            "SO_BINDTODEVICE: {}",
            std::io::Error::last_os_error()
        );
        if let Some(mark) = mark {
            let rc = libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_MARK,
                (&mark as *const u32).cast(),
                std::mem::size_of::<u32>() as libc::socklen_t,
            );
            assert_eq!(rc, 0, "SO_MARK: {}", std::io::Error::last_os_error());
        }
    }
    // The neighbour lookup (ARP) starts even though nobody answers inside this namespace.
    socket
        .send_to(b"probe", (dst, 9))
        .unwrap_or_else(|e| panic!("send_to {dst}: {e}"));
}

#[test]
fn bound_link_socket_uses_its_wan_gateway_not_on_link() {
    in_netns("bound_link_socket_uses_its_wan_gateway", || {
        build_wans();
        // A typical multi-WAN box: only the primary WAN has a default route in main.
        ip("route del default via 198.51.100.1 dev wan1");
        add_tun();
        // TEST-NET-3: never leaves this private namespace anyway.
        let far = "203.0.113.9";

        // Without wgbond's link table, a socket bound to wan1 sends on-link: it ARPs for the
        // far address itself (the problem the per-link tables solve).
        send_bound_udp("wan1", None, far);
        let neigh = ip("neigh show dev wan1");
        assert_contains(&neigh, far, "on-link ARP without a link table");
        ip("neigh flush dev wan1");

        let rt = runtime();
        let mut plan = site_plan();
        plan.links[1].gateway = Some(addr("198.51.100.1"));
        let applied = rt
            .block_on(apply(&plan))
            .unwrap_or_else(|e| panic!("apply: {e}"));
        send_bound_udp("wan1", Some(applied.links()[1].mark), far);
        let neigh = ip("neigh show dev wan1");
        assert_contains(&neigh, "198.51.100.1", "ARP for wan1's gateway");
        assert!(!neigh.contains(far), "still on-link:\n{neigh}");
        rt.block_on(applied.teardown())
            .unwrap_or_else(|e| panic!("teardown: {e}"));
    });
}

#[test]
fn watcher_reports_wan_changes_but_not_wgbonds_own() {
    in_netns("watcher_reports_wan_changes", || {
        build_wans();
        add_tun();
        let before = snapshot_masking_qdisc();
        let rt = runtime();
        let settle = std::time::Duration::from_millis(50);
        let mut applied = rt
            .block_on(apply(&site_plan()))
            .unwrap_or_else(|e| panic!("apply: {e}"));
        rt.block_on(async {
            let mut watcher = applied
                .wan_watcher()
                .unwrap_or_else(|e| panic!("watcher: {e}"));
            // Refreshing unchanged links changes nothing and must not wake the watcher.
            for result in applied.refresh_links().await {
                result.unwrap_or_else(|e| panic!("refresh: {e}"));
            }
            let quiet =
                tokio::time::timeout(Duration::from_millis(500), watcher.changed(settle)).await;
            assert!(quiet.is_err(), "watcher woke up without a WAN change");

            // A DHCP renew on wan0 with a new gateway.
            ip("route replace default via 192.0.2.254 dev wan0 metric 100");
            let woke = tokio::time::timeout(Duration::from_secs(2), watcher.changed(settle)).await;
            assert_eq!(woke, Ok(true), "watcher missed a gateway change");
            let results = applied.refresh_links().await;
            let routing = results[0]
                .clone()
                .unwrap_or_else(|e| panic!("refresh: {e}"));
            assert_eq!(routing.v4, Some(Nexthop::Via(addr("192.0.2.254"))));
        });
        rt.block_on(applied.teardown())
            .unwrap_or_else(|e| panic!("teardown: {e}"));
        ip("route replace default via 192.0.2.1 dev wan0 metric 100");
        assert_same(&before, &snapshot_masking_qdisc(), "after teardown");
    });
}

/// The sorted snapshot without the TUN device's own header lines and `linkdown` flags, which
/// change asynchronously after it goes up.
fn routing_snapshot() -> Snapshot {
    let mut s = sorted_lines(&snapshot_masking_qdisc());
    for (_, text) in &mut s.0 {
        *text = text
            .lines()
            .filter(|l| !l.contains(&format!(" {TUN}: ")))
            .map(|l| l.replace(" linkdown", ""))
            .collect::<Vec<_>>()
            .join("\n");
    }
    s
}

#[test]
fn reload_adds_and_removes_links_and_allowed_ips_with_rollback() {
    in_netns("reload_links", || {
        build_wans();
        add_tun();
        let before = snapshot_masking_qdisc();
        let rt = runtime();
        let mut plan = site_plan();
        let lte = plan.links.remove(1);
        let mut applied = rt
            .block_on(apply(&plan))
            .unwrap_or_else(|e| panic!("apply: {e}"));
        let one_link = routing_snapshot();

        // Adding a link: its own table and mark, its packets leave through its WAN.
        let (routing, _) = rt
            .block_on(applied.add_link(&lte))
            .unwrap_or_else(|e| panic!("add_link: {e}"));
        assert_eq!(applied.links().len(), 2);
        assert_eq!(applied.links()[1], routing);
        assert_ne!(routing.mark, applied.links()[0].mark);
        assert_ne!(Some(routing.table), applied.tunnel_table());
        assert_contains(
            &ip(&format!("-4 route get 1.1.1.1 mark {}", routing.mark)),
            "via 198.51.100.1 dev wan1",
            "added link's mark rule",
        );
        let two_links = routing_snapshot();

        // The same name twice is refused before anything changes.
        assert!(matches!(
            rt.block_on(applied.add_link(&lte)),
            Err(NetcfgError::Invalid(_))
        ));
        // A kernel refusal at any step of a third link leaves the two-link state.
        let sat = WanLinkPlan {
            name: "sat".to_owned(),
            bind: WanBind::Address(addr("198.51.100.2")),
            gateway: None,
        };
        let mut failures = 0;
        for fail_at in 0..16 {
            match rt.block_on(applied.add_link_with_injected_failure(&sat, fail_at)) {
                Err(NetcfgError::Step { rollback, .. }) => {
                    assert!(rollback.is_empty(), "rollback failed: {rollback:?}");
                    failures += 1;
                    assert_same(
                        &two_links,
                        &routing_snapshot(),
                        &format!("after a failed add_link at step {fail_at}"),
                    );
                }
                Ok(_) => {
                    assert!(failures >= 3, "only {failures} steps before success");
                    break;
                }
                Err(e) => panic!("add_link(sat) at {fail_at}: {e}"),
            }
        }
        assert_eq!(applied.links().len(), 3, "sat added after the failures");
        assert_contains(&ip("rule"), "from 198.51.100.2 lookup", "sat's source rule");

        // Removing links brings back exactly the earlier state.
        rt.block_on(applied.remove_link("sat"))
            .unwrap_or_else(|e| panic!("remove_link(sat): {e}"));
        assert_same(&two_links, &routing_snapshot(), "after removing sat");
        rt.block_on(applied.remove_link("lte"))
            .unwrap_or_else(|e| panic!("remove_link(lte): {e}"));
        assert_eq!(applied.links().len(), 1);
        assert_eq!(applied.links()[0].name, "cable");
        assert_same(&one_link, &routing_snapshot(), "after removing lte");
        assert!(rt.block_on(applied.remove_link("lte")).is_err());

        // Allowed IPs: a new prefix is routed, a dropped one unrouted; the default route
        // cannot come or go without a restart.
        let mut allowed = vec![net("0.0.0.0/0"), net("::/0"), net("10.77.0.0/16")];
        rt.block_on(applied.set_allowed_ips(&allowed))
            .unwrap_or_else(|e| panic!("set_allowed_ips: {e}"));
        assert_contains(
            &ip("-4 route show 10.77.0.0/16"),
            &format!("dev {TUN}"),
            "new allowed IP",
        );
        allowed.pop();
        rt.block_on(applied.set_allowed_ips(&allowed))
            .unwrap_or_else(|e| panic!("set_allowed_ips: {e}"));
        assert_eq!(ip("-4 route show 10.77.0.0/16").trim(), "");
        assert!(matches!(
            rt.block_on(applied.set_allowed_ips(&[net("::/0")])),
            Err(NetcfgError::Invalid(_))
        ));
        assert_same(
            &one_link,
            &routing_snapshot(),
            "after the allowed IPs went back",
        );

        // A link added at run time is removed by teardown too.
        rt.block_on(applied.add_link(&lte))
            .unwrap_or_else(|e| panic!("add_link again: {e}"));
        rt.block_on(applied.teardown())
            .unwrap_or_else(|e| panic!("teardown: {e}"));
        assert_same(&before, &snapshot_masking_qdisc(), "after teardown");
        del_tun();
    });
}
