//! `auto` mode in the simulator: the scenarios of the "auto mode" issue as fast,
//! deterministic tests. Efficiency counts delivered packets as the links carry them (inner
//! packet + trailer + WireGuard/UDP/IP overhead) over the sum of the link rates.

use std::time::Duration;

use wgbond::bond::sim::{LinkSpec, Sim};
use wgbond::bond::{Event, LinkState, Mode};

fn cable_lte_sat() -> Vec<LinkSpec> {
    vec![
        LinkSpec::new(50.0, 8),
        LinkSpec::new(20.0, 30).jitter_ms(5).loss_pct(1.0),
        LinkSpec::new(10.0, 300),
    ]
}

fn hetero() -> Vec<LinkSpec> {
    vec![LinkSpec::new(60.0, 10), LinkSpec::new(20.0, 35)]
}

/// Bulk efficiency over 2..10 s of a saturating source.
fn bulk_efficiency(mode: Mode, links: &[LinkSpec], sum_mbit: f64, seed: u64) -> f64 {
    let mut sim = Sim::new(mode, links, seed);
    sim.run_until(0.5);
    let b = sim.start_source(sum_mbit * 1.15, 1400);
    sim.run_until(10.5);
    sim.report_source(b, 2.0, 10.0).link_rate_bps as f64 / (sum_mbit * 1e6)
}

#[test]
fn cable_lte_sat_sums_the_links_and_keeps_pings_fast() {
    let mut sim = Sim::new(Mode::Auto, &cable_lte_sat(), 1);
    sim.run_until(0.5);
    let bulk = sim.start_source(95.0, 1400);
    let ping = sim.start_ping(50);
    sim.run_until(10.5);
    let b = sim.report_source(bulk, 2.0, 10.0);
    let p = sim.report_source(ping, 2.0, 10.0);
    let eff = b.link_rate_bps as f64 / 80e6;
    println!(
        "auto cable-lte-sat: efficiency {eff:.3} (best single link 50/80 = 0.625); ping p50 {:?} p99 {:?}, lost {}",
        p.latency_p50, p.latency_p99, p.lost
    );
    assert!(eff >= 0.85, "efficiency {eff}");
    assert!(
        b.link_rate_bps > 50_000_000,
        "must beat the cable link alone"
    );
    // One-way latency: p99 within 30 ms means an RTT well under the 60 ms ping target.
    assert!(
        p.latency_p99 <= Duration::from_millis(30),
        "ping p99 {:?}",
        p.latency_p99
    );
    assert_eq!(p.lost, 0);
}

#[test]
fn stripe_queues_pings_behind_bulk_where_auto_does_not() {
    // The reason auto exists: the same load in stripe delays pings behind bulk traffic.
    let mut sim = Sim::new(Mode::Stripe, &cable_lte_sat(), 1);
    sim.run_until(0.5);
    sim.start_source(95.0, 1400);
    let ping = sim.start_ping(50);
    sim.run_until(6.0);
    let p = sim.report_source(ping, 2.0, 6.0);
    println!("stripe cable-lte-sat: ping p99 {:?}", p.latency_p99);
    assert!(p.latency_p99 > Duration::from_millis(40));
}

#[test]
fn hetero_aggregates_almost_fully() {
    let eff = bulk_efficiency(Mode::Auto, &hetero(), 80.0, 2);
    println!("auto hetero: efficiency {eff:.3}");
    assert!(eff >= 0.97, "efficiency {eff}");
}

#[test]
fn five_percent_loss_on_one_link_costs_little() {
    let clean = bulk_efficiency(Mode::Auto, &hetero(), 80.0, 3);
    for lossy in 0..2 {
        let mut links = hetero();
        links[lossy] = links[lossy].clone().loss_pct(5.0);
        let eff = bulk_efficiency(Mode::Auto, &links, 80.0, 3);
        println!(
            "auto hetero, 5% loss on link {lossy}: {:.3} of loss-free",
            eff / clean
        );
        assert!(eff / clean >= 0.85, "link {lossy}: {}", eff / clean);
    }
}

#[test]
fn a_dying_link_loses_no_ping_and_comes_back() {
    for mode in [Mode::Auto, Mode::Duplicate] {
        let mut links = hetero();
        links[0] = links[0].clone().outage(5.0, 8.0);
        let mut sim = Sim::new(mode, &links, 4);
        sim.run_until(0.5);
        // A download runs in both modes: in `duplicate` the slow link's copy of it fills that
        // link, and the pings must still get through when it is the only one left.
        let bulk = Some(sim.start_source(60.0, 1400));
        let ping = sim.start_ping(50);
        sim.run_until(12.0);
        let p = sim.report_source(ping, 1.0, 11.5);
        // Longest stall of the bulk stream while the link dies and returns.
        let mut stall = Duration::ZERO;
        if let Some(b) = bulk {
            let _ = b;
            let times: Vec<_> = sim
                .deliveries
                .iter()
                .filter(|d| d.len == 1400)
                .map(|d| d.delivered)
                .collect();
            for w in times.windows(2) {
                stall = stall.max(w[1] - w[0]);
            }
        }
        let back = sim
            .events
            .iter()
            .filter(|(t, _, e)| {
                *t - sim.t0 > Duration::from_secs(8)
                    && matches!(e, Event::LinkState { link, state: LinkState::Up } if link.0 == 0)
            })
            .map(|(t, ..)| *t - sim.t0)
            .next()
            .expect("the link comes back");
        println!(
            "{mode:?}: pings lost {} of {}, bulk stall {stall:?}, link back at {back:?}",
            p.lost, p.created
        );
        match mode {
            Mode::Duplicate => assert_eq!(p.lost, 0),
            _ => assert!(p.lost <= 3),
        }
        assert!(stall <= Duration::from_secs(1));
        assert!(back <= Duration::from_secs(10), "back at {back:?}");
        if mode == Mode::Auto {
            // And it carries traffic again.
            let tx_before = sim.site.link_stats()[0].1.tx_packets;
            sim.run_until(13.0);
            assert!(sim.site.link_stats()[0].1.tx_packets > tx_before + 1000);
        }
    }
}

#[test]
fn a_link_slowing_down_is_followed_within_two_seconds() {
    let mut links = hetero();
    links[0] = links[0].clone().rate_change(5.0, 15.0);
    let mut sim = Sim::new(Mode::Auto, &links, 5);
    sim.run_until(0.5);
    let b = sim.start_source(90.0, 1400);
    sim.run_until(8.0);
    let r = sim.report_source(b, 6.0, 8.0);
    let ratio = r.link_rate_bps as f64 / 35e6;
    println!(
        "60 -> 15 Mbit/s at 5 s: {:.3} of the new sum from 6 s on",
        ratio
    );
    assert!(ratio >= 0.85, "{ratio}");
}

#[test]
fn a_link_speeding_up_is_used_within_two_seconds() {
    // The fast link runs at 15 Mbit/s for 5 s under a saturating load (so its estimate is
    // 15 and every sample is full), then goes back to 60.
    let mut links = hetero();
    links[0] = LinkSpec::new(15.0, 10).rate_change(5.0, 60.0);
    let mut sim = Sim::new(Mode::Auto, &links, 6);
    sim.run_until(0.5);
    let b = sim.start_source(95.0, 1400);
    sim.run_until(8.0);
    let r = sim.report_source(b, 7.0, 8.0);
    let ratio = r.link_rate_bps as f64 / 80e6;
    println!("15 -> 60 Mbit/s at 5 s: {ratio:.3} of the new sum from 7 s on");
    assert!(ratio >= 0.85, "{ratio}");
}

#[test]
fn udp_at_90_percent_of_the_sum_arrives_complete_and_in_order() {
    let mut sim = Sim::new(Mode::Auto, &hetero(), 6);
    sim.run_until(0.5);
    // 90% of 80 Mbit/s on the links, as inner packets.
    let b = sim.start_source(72.0 * 1400.0 / 1480.0, 1400);
    sim.run_until(10.5);
    let r = sim.report_source(b, 2.0, 10.0);
    println!(
        "UDP at 90%: loss {:.4}%, out of order {}",
        r.loss() * 100.0,
        r.out_of_order
    );
    assert!(r.loss() <= 0.01);
    assert_eq!(r.out_of_order, 0);
}

#[test]
fn a_quiet_bond_ramps_up_fast_when_a_download_starts() {
    // Light traffic for 5 s (the estimates only see what it needs), then a saturating load.
    let mut sim = Sim::new(Mode::Auto, &hetero(), 7);
    sim.run_until(0.5);
    let b = sim.start_source(1.0, 1400);
    sim.run_until(5.0);
    sim.set_source_rate(b, 92.0);
    sim.run_until(7.0);
    let first = sim.report_source(b, 5.0, 6.0).link_rate_bps as f64 / 80e6;
    let second = sim.report_source(b, 6.0, 7.0).link_rate_bps as f64 / 80e6;
    println!(
        "ramp after 5 s of light traffic: {first:.3} in the first second, {second:.3} in the next"
    );
    assert!(first >= 0.7, "first second {first}");
    assert!(second >= 0.9, "second second {second}");
}

#[test]
fn a_long_link_carrying_only_ping_copies_does_not_stretch_the_reorder_timeout() {
    // Cable dies: bulk moves to the lossy LTE link, and the copies of latency-critical
    // packets go to LTE and the 300 ms satellite link. Every LTE loss is a gap in the bulk
    // stream: the receiver must wait for it about one LTE round trip (the NACK's answer), not
    // the satellite's delay (which made TCP crawl at a few Mbit/s in the lab).
    let mut links = cable_lte_sat();
    links[0] = links[0].clone().outage(3.0, 9.0);
    let mut sim = Sim::new(Mode::Auto, &links, 7);
    sim.run_until(0.5);
    let bulk = sim.start_source(15.0, 1400);
    let _ping = sim.start_ping(50);
    sim.run_until(8.0);
    let timeout = sim.hub.stats().reorder_timeout;
    sim.run_until(8.5);
    let b = sim.report_source(bulk, 5.0, 8.0);
    let resent: u64 = sim
        .site
        .link_stats()
        .iter()
        .map(|(_, s)| s.retransmits)
        .sum();
    println!(
        "cable dead: reorder timeout {timeout:?}, bulk longest reorder wait {:?}, lost {} of {}, {resent} sent again after NACKs",
        b.max_reorder_wait, b.lost, b.created
    );
    assert!(timeout <= Duration::from_millis(100), "{timeout:?}");
    assert!(b.max_reorder_wait <= Duration::from_millis(100));
    // LTE's 1% loss is repaired by the bond: nothing lost, and in order but for the rare
    // repair whose NACK was lost too (then it comes after its gap was given up).
    assert!(resent > 0);
    assert_eq!(b.lost, 0);
    assert!(
        b.out_of_order <= b.created / 1000,
        "{} out of order",
        b.out_of_order
    );
}

#[test]
fn a_video_call_loses_almost_nothing_when_the_cable_dies() {
    // 4 Mbit/s of 500-byte UDP (not "critical": it goes as bulk) while the cable dies for good.
    // What the dead link had taken is sent again on the others once it is declared down.
    let mut links = cable_lte_sat();
    links[0] = links[0].clone().outage(5.0, 1000.0);
    let mut sim = Sim::new(Mode::Auto, &links, 12);
    sim.run_until(0.5);
    let video = sim.start_source(4.0, 500);
    sim.run_until(10.5);
    let r = sim.report_source(video, 1.0, 10.0);
    println!(
        "video call, cable dies at 5 s: {} of {} lost",
        r.lost, r.created
    );
    // 130 of 9000 were lost before packets of a dead link were sent again.
    assert!(r.lost <= r.created / 500, "{} lost", r.lost);
}

#[test]
fn a_slow_link_taken_into_use_is_waited_for_from_its_first_packet() {
    // A download starts, fits on the fast link for a while, then needs the slow one too.
    // Whenever the slow link starts carrying ordered data, its first packets arrive 25 ms
    // after later ones on the fast link. The receiver's reorder timeout, set from the links
    // that carried ordered data recently, must count the slow link by then (the sender
    // announces it on the fast link), or the receiver gives those packets up as lost and TCP
    // halves its window for nothing.
    let mut sim = Sim::new(Mode::Auto, &hetero(), 3);
    sim.run_until(0.5);
    let b = sim.start_source(40.0, 1400);
    sim.run_until(3.0);
    let slow_before = sim.up_stats(1).offered;
    sim.set_source_rate(b, 65.0);
    sim.run_until(6.0);
    let skipped = sim.hub.stats().reorder_skips;
    // From 1 s: the first half second of a saturating start loses packets to the bond's
    // queue limit while the estimates ramp up (a_quiet_bond_ramps_up_fast covers that).
    let r = sim.report_source(b, 1.0, 5.5);
    let slow = sim.up_stats(1).offered - slow_before;
    println!(
        "download onto the slow link: {slow} packets on it after the load grew, {skipped} gaps skipped, {} out of order, {} lost of {}",
        r.out_of_order, r.lost, r.created
    );
    assert!(slow > 1000, "the slow link must be used: {slow}");
    assert_eq!(skipped, 0);
    assert_eq!(r.out_of_order, 0);
    assert_eq!(r.lost, 0);
}

#[test]
fn a_link_slowing_under_load_delivers_its_queued_packets_in_order() {
    // The slow link drops from 20 to 8 Mbit/s under load: until the sender notices, its
    // packets queue ever longer, later than the reorder timeout (set from base delays)
    // allows. The receiver must wait for them while that link keeps delivering packets
    // numbered below the gap (22 came late, out of order, before it did), but not far beyond
    // what they needed: a timeout stretched to its 400 ms cap makes every later loss stall
    // the stream that long.
    let links = vec![
        LinkSpec::new(60.0, 10),
        LinkSpec::new(20.0, 35).queue_ms(100).rate_change(3.0, 8.0),
    ];
    let mut sim = Sim::new(Mode::Auto, &links, 5);
    sim.run_until(0.5);
    let b = sim.start_source(70.0, 1400);
    let mut peak = Duration::ZERO;
    for k in 1..=80 {
        sim.run_until(2.5 + f64::from(k) * 0.05);
        peak = peak.max(sim.hub.stats().reorder_timeout);
    }
    let late = sim.hub.stats().reorder_late;
    let r = sim.report_source(b, 2.5, 6.5);
    println!(
        "slow link 20 -> 8 Mbit/s: {late} late packets, longest wait {:?}, reorder timeout peaked at {peak:?}",
        r.max_reorder_wait
    );
    assert!(late <= 2, "{late} late packets");
    assert!(
        r.max_reorder_wait > Duration::from_millis(60),
        "the scenario must queue the slow link's packets: longest wait {:?}",
        r.max_reorder_wait
    );
    assert!(peak <= 2 * r.max_reorder_wait, "timeout {peak:?}");
}

#[test]
fn repairs_on_a_lossy_link_come_before_the_reorder_timeout() {
    // 5 % loss on the fast link, a load that needs both links. Each loss is repaired (NACK);
    // a repair that meets a second loss comes by the other link, half a round trip on each,
    // and the reorder timeout must wait for it: every gap given up is a loss TCP sees
    // (CUBIC halves its window), and a packet that comes after its gap is out of order.
    let links = vec![
        LinkSpec::new(60.0, 10).loss_pct(5.0),
        LinkSpec::new(20.0, 35),
    ];
    let mut sim = Sim::new(Mode::Auto, &links, 3);
    sim.run_until(0.5);
    let b = sim.start_source(40.0, 1400);
    sim.run_until(10.5);
    let s = sim.hub.stats();
    let r = sim.report_source(b, 1.0, 10.0);
    let resent: u64 = sim
        .site
        .link_stats()
        .iter()
        .map(|(_, s)| s.retransmits)
        .sum();
    println!(
        "5 % loss on fast, 40 Mbit/s: {resent} sent again after NACKs, {} gaps skipped, {} late, {} lost of {}",
        s.reorder_skips, s.reorder_late, r.lost, r.created
    );
    assert!(resent > 500, "the scenario must lose packets: {resent}");
    assert!(s.reorder_skips <= 8, "{} gaps skipped", s.reorder_skips);
    assert_eq!(r.lost, 0);
}

/// One TCP download (the simulator's CUBIC model) from 1 s to 9 s; returns its rate as the
/// links carry it over those 8 s (ramp-up included), in Mbit/s, and the hub's skipped gaps.
fn tcp_download(links: &[LinkSpec], seed: u64) -> (f64, u64, u64) {
    let mut sim = Sim::new(Mode::Auto, links, seed);
    sim.run_until(1.0);
    let f = sim.start_tcp(1400);
    sim.run_until(9.0);
    let rate = sim.tcp_link_rate_bps(f, 1.0, 9.0) as f64 / 1e6;
    let st = sim.hub.stats();
    (rate, st.reorder_skips, st.reorder_late)
}

/// [`tcp_download`] with seeds 1 to 8: the mean rate, the gaps skipped, those given up for good
/// (skipped, and no packet came late for them), and the rates one by one.
fn tcp_downloads(links: &[LinkSpec]) -> (f64, u64, u64, String) {
    let runs: Vec<(f64, u64, u64)> = (1..=8).map(|seed| tcp_download(links, seed)).collect();
    let mean = runs.iter().map(|r| r.0).sum::<f64>() / runs.len() as f64;
    let skips = runs.iter().map(|r| r.1).sum();
    let gone = runs.iter().map(|r| r.1.saturating_sub(r.2)).sum();
    let rates: Vec<String> = runs.iter().map(|r| format!("{:.1}", r.0)).collect();
    (mean, skips, gone, rates.join(", "))
}

#[test]
fn a_window_limited_download_keeps_the_longer_link_busy() {
    // A BBR sender's window is about twice the bandwidth times the lowest RTT, here the fast
    // link's (20 ms): 272 segments for 80 Mbit/s (1400-byte segments carried in 1472 bytes).
    // Through hetero every packet waits for the slow link's 35 ms, so that window barely
    // covers the round trip, and whatever the slow link idles through is lost for good. The
    // fast link's delay jitters 2 ms, as it does in the lab's userspace emulator. Counting
    // all of the slow link's extra delay for bulk: 66.6 Mbit/s (0.833); four fifths: 68.8.
    // The sim's window is a hard cap (BBR's grows with ACK aggregation), so the margin is
    // thin and the slow link far from full; both asserts fail with the old rule.
    let window = 2.0 * 80e6 / 8.0 / 1472.0 * 0.020;
    let (mut rates, mut slow_use) = (Vec::new(), Vec::new());
    for seed in 1..=4 {
        let links = [
            LinkSpec::new(60.0, 10).jitter_ms(2),
            LinkSpec::new(20.0, 35),
        ];
        let mut sim = Sim::new(Mode::Auto, &links, seed);
        sim.run_until(1.0);
        let f = sim.start_tcp(1400);
        sim.cap_tcp_window(f, window);
        sim.run_until(3.0);
        let before = sim.up_stats(1).offered;
        sim.run_until(9.0);
        rates.push(sim.tcp_link_rate_bps(f, 3.0, 9.0) as f64 / 1e6);
        // Datagrams the slow link took, against what it carries at 20 Mbit/s.
        slow_use.push((sim.up_stats(1).offered - before) as f64 / (20e6 / 8.0 / 1472.0 * 6.0));
    }
    let mean = rates.iter().sum::<f64>() / rates.len() as f64;
    let slow = slow_use.iter().cloned().fold(f64::INFINITY, f64::min);
    let rates: Vec<String> = rates.iter().map(|r| format!("{r:.1}")).collect();
    println!(
        "window-limited download ({window:.0} segments) through hetero: {mean:.1} Mbit/s mean of 4 seeds ({}) = {:.3} of the sum; slow link busy {slow:.3} (least of 4)",
        rates.join(", "),
        mean / 80.0
    );
    // Counting all of the slow link's extra delay: 0.833 of the sum, the slow link 0.372 busy
    // (the window, not the links, is the limit: the slow link takes what the fast one cannot).
    assert!(mean / 80.0 >= 0.85, "{mean:.1} Mbit/s");
    assert!(slow >= 0.45, "slow link busy {slow:.3}");
}

#[test]
fn a_tcp_download_through_hetero_gets_most_of_the_sum() {
    // Criterion 1 with a TCP sender instead of a constant-rate source: slow start, HyStart
    // and CUBIC meet the bond's start-up, its queue and the slow link's extra 25 ms.
    let (rate, skips, late) = tcp_download(&hetero(), 1);
    let eff = rate / 80.0;
    println!("one CUBIC download through hetero, 8 s from a cold start: {rate:.1} Mbit/s = {eff:.3} of the link sum, {skips} gaps skipped, {late} of them came late");
    assert!(eff >= 0.88, "efficiency {eff}");
    // No gap is given up for good: TCP sees no loss. The slow link's first start-up (twice
    // its rate until the peer's delay reports show a queue, some 55 ms on a 35 ms link) may
    // deliver a few of its packets after their gap was given up: reordering, of a handful
    // of the download's 50,000 packets.
    assert_eq!(skips, late, "gaps given up for good");
    assert!(late <= 8, "{late} packets late");
}

#[test]
fn five_percent_loss_on_the_fast_link_costs_a_tcp_download_little() {
    // Criterion 3 with a TCP sender: every gap the receiver gives up is a loss CUBIC sees
    // (its window shrinks to 0.7 and grows back over seconds), so repairs must come before
    // the reorder timeout even when the NACK or the repair itself is lost on the 5 % link.
    // (A gap given up whose packet still comes is delivered late, out of order; the gaps
    // given up for good are what the skipped minus the late ones count.)
    let (clean, ..) = tcp_download(&hetero(), 1);
    let lossy = vec![
        LinkSpec::new(60.0, 10).loss_pct(5.0),
        LinkSpec::new(20.0, 35),
    ];
    let (mean, skips, gone, rates) = tcp_downloads(&lossy);
    println!(
        "CUBIC download, 5 % loss on fast: {mean:.1} Mbit/s mean of 8 seeds ({rates}) = {:.3} of loss-free {clean:.1}; {skips} gaps skipped, {gone} of them for good",
        mean / clean
    );
    assert!(mean / clean >= 0.72, "{} of loss-free", mean / clean);
    assert!(gone <= 12, "{gone} gaps given up for good");
}

#[test]
fn the_first_packets_of_a_bond_lost_on_a_link_are_repaired_and_waited_for() {
    // The first data packets a link carries have no earlier packet to show their gap: a
    // receiver that started its reorder buffer at the first packet to arrive, and NACKed
    // only gaps after it, lost them for good. A TCP connection losing its first segment
    // leaves slow start with a window of 7 (in the model, one download in 16 crawled at
    // 15 Mbit/s for the whole 8 s with 5 % loss on the fast link).
    let links = [
        LinkSpec::new(60.0, 10).outage(0.999, 1.0015),
        LinkSpec::new(20.0, 35),
    ];
    let mut sim = Sim::new(Mode::Auto, &links, 1);
    sim.run_until(1.0);
    let b = sim.start_source(20.0, 1400);
    sim.run_until(3.0);
    let lost_on_fast = sim.up_stats(0).outage_drops;
    let resent = sim.site.link_stats()[0].1.retransmits;
    let r = sim.report_source(b, 1.0, 2.5);
    println!("first packets lost on fast: {lost_on_fast}, {resent} sent again; {r:?}");
    // The outage hit data packets (not only probes): the fast link's first ones were NACKed.
    assert!(
        resent >= 2,
        "the outage must hit the first data packets ({resent} resent)"
    );
    assert_eq!(r.lost, 0);
    assert_eq!(r.out_of_order, 0);
}

#[test]
fn a_queue_standing_on_the_faster_link_counts_in_its_arrival_time() {
    // The fast link is the smaller one (15 Mbit/s, 10 ms; slow 20 Mbit/s, 35 ms) and a
    // 28 Mbit/s stream needs both. Packets on the fast link wait there until they arrive with
    // the slow link's, 35 ms after they were made, plus the few milliseconds of queue the
    // pacer lets stand at the fast link's bottleneck. Unless the scheduler counts that queue,
    // it sends too much on the slow link, its packets wait for the fast link's at the
    // receiver, and the whole stream is late by it (40.4 ms; a BBR sender's rate falls by a
    // fifth in the lab).
    let links = vec![LinkSpec::new(15.0, 10), LinkSpec::new(20.0, 35)];
    let mut sim = Sim::new(Mode::Auto, &links, 1);
    sim.run_until(0.5);
    let b = sim.start_source(28.0, 1400);
    sim.run_until(8.0);
    let r = sim.report_source(b, 4.0, 7.5);
    println!(
        "28 Mbit/s over 15 + 20 Mbit/s: latency p50 {:?}, p99 {:?}, {} lost",
        r.latency_p50, r.latency_p99, r.lost
    );
    assert!(
        r.latency_p50 <= Duration::from_micros(37_500),
        "{:?}",
        r.latency_p50
    );
    assert_eq!(r.lost, 0);
    assert_eq!(r.out_of_order, 0);
}

#[test]
fn light_traffic_after_a_congested_spell_goes_back_to_the_fast_link() {
    // The fast link slows to 15 Mbit/s under a 70 Mbit/s load, its 200 ms buffer fills, then
    // the load ends. The queue the peer measured there is stale once no data crosses the
    // link: counted, it would keep light traffic on the 35 ms link for good.
    let links = vec![
        LinkSpec::new(60.0, 10).queue_ms(200).rate_change(2.5, 15.0),
        LinkSpec::new(20.0, 35),
    ];
    let mut sim = Sim::new(Mode::Auto, &links, 1);
    sim.run_until(0.5);
    let b = sim.start_source(95.0, 1400);
    sim.run_until(3.0);
    sim.set_source_rate(b, 1.0);
    sim.run_until(8.0);
    let r = sim.report_source(b, 6.0, 7.5);
    println!(
        "1 Mbit/s after a congested spell: latency p50 {:?}, p99 {:?}",
        r.latency_p50, r.latency_p99
    );
    assert!(
        r.latency_p50 <= Duration::from_millis(15),
        "{:?}",
        r.latency_p50
    );
}

#[test]
fn loss_on_one_of_two_alike_links_is_repaired_before_tcp_sees_it() {
    // Two links alike in delay (10 and 12 ms): the reorder timeout from their spread is a few
    // milliseconds, and a lost packet's repair takes a round trip after its loss shows. Two
    // things let it come in time: the gap the NACK asks about is held until a repair can come
    // (counted from the NACK, not from the first packet after the gap, which on the other link
    // may arrive before the lost one was even sent), and a link whose queue runs dry tells the
    // peer its last packet, so a loss just before a pause shows at once, not a round trip later.
    // Before them: 9 and 29 gaps given up in the 8 seeds, downloads at 45 and 20 Mbit/s
    // (without the holds alone: 2 gaps given up at 5 %, two downloads at 22-24 Mbit/s).
    let alike = |loss: f64| {
        vec![
            LinkSpec::new(30.0, 10).loss_pct(loss),
            LinkSpec::new(30.0, 12),
        ]
    };
    let (clean, ..) = tcp_download(&alike(0.0), 1);
    for loss in [5.0, 15.0] {
        let (mean, skips, _, rates) = tcp_downloads(&alike(loss));
        println!(
            "CUBIC download, {loss} % loss on one of two alike links: {mean:.1} Mbit/s mean of 8 seeds ({rates}) = {:.3} of loss-free {clean:.1}; {skips} gaps skipped",
            mean / clean
        );
        if loss == 5.0 {
            assert!(mean / clean >= 0.85, "{} of loss-free", mean / clean);
            assert!(skips <= 2, "{skips} gaps skipped");
        } else {
            assert!(mean / clean >= 0.55, "{} of loss-free", mean / clean);
            assert!(skips <= 8, "{skips} gaps skipped");
        }
    }
}

/// A simulator of `links` with an upload at the bond's capacity from 0.5 s on; its source.
fn upload_at_capacity(links: &[LinkSpec], seed: u64) -> (Sim, usize) {
    let mut sim = Sim::new(Mode::Auto, links, seed);
    sim.run_until(0.5);
    let bulk = sim.start_source(95.0, 1400);
    (sim, bulk)
}

/// 2,000 small (100-byte) UDP packets a second: QUIC's ACKs, say.
fn start_small_packets(sim: &mut Sim) -> usize {
    sim.start_source(2000.0 * 100.0 * 8.0 / 1e6, 100)
}

/// Runs until `secs`, stops every source, and lets what is in flight arrive.
fn run_then_stop(sim: &mut Sim, secs: f64) {
    sim.run_until(secs);
    sim.stop_source();
    sim.run_until(secs + 0.5);
}

#[test]
fn acks_of_a_transfer_the_other_way_leave_bulk_its_room() {
    // Both directions loaded: the site uploads at the bond's capacity and acknowledges a
    // download at 2,200 pure ACKs a second (about what a 70 Mbit/s download sends). The ACKs
    // go first on the link where they arrive first, but a copy on the other link would take
    // its room from the upload: copied every time, the upload ran at 75.0 Mbit/s (0.937 of
    // the sum) with 24,202 copies (counted on both links); now 77.2 (0.965) with 146.
    let (mut sim, bulk) = upload_at_capacity(&hetero(), 3);
    let acks = sim.start_pure_acks(2200);
    run_then_stop(&mut sim, 6.0);
    let b = sim.report_source(bulk, 2.0, 6.0);
    let a = sim.report_source(acks, 2.0, 6.0);
    let copies: u64 = sim
        .site
        .link_stats()
        .iter()
        .map(|(_, s)| s.tx_duplicates)
        .sum();
    let share = b.link_rate_bps as f64 / 80e6;
    println!(
        "upload at capacity + 2200 ACKs/s: bulk {:.1} Mbit/s on the links ({share:.3} of the sum), \
         ACKs lost {} of {}, p99 {:?}, {copies} copies",
        b.link_rate_bps as f64 / 1e6,
        a.lost,
        a.created,
        a.latency_p99
    );
    assert!(share >= 0.95, "{share}");
    assert!(copies <= 1000, "{copies}");
    assert_eq!(a.lost, 0);
    // Latency-critical, the ACKs overtake the upload's queue.
    assert!(
        a.latency_p99 <= Duration::from_millis(25),
        "{:?}",
        a.latency_p99
    );
}

#[test]
fn copies_of_a_busy_small_packet_stream_stay_within_their_share() {
    // The same with 2,000 small UDP packets a second (QUIC's ACKs, say: latency-critical by
    // size, not told apart from voice) and a 50 pps ping stream beside the upload. Copies onto
    // the full second link get 2 % of its rate: copied every time, the upload ran at 0.927 of
    // the sum with 11,277 copies; now 0.956 with 2,048 (the pings always have theirs).
    let (mut sim, bulk) = upload_at_capacity(&hetero(), 3);
    let small = start_small_packets(&mut sim);
    let ping = sim.start_ping(50);
    run_then_stop(&mut sim, 6.0);
    let b = sim.report_source(bulk, 2.0, 6.0);
    let s = sim.report_source(small, 2.0, 6.0);
    let p = sim.report_source(ping, 2.0, 6.0);
    let copies = sim.site.link_stats()[1].1.tx_duplicates;
    let share = b.link_rate_bps as f64 / 80e6;
    println!(
        "upload at capacity + 2000 small UDP/s + 50 pings/s: bulk {share:.3} of the sum, \
         small lost {} of {}, pings lost {} of {}, {copies} copies",
        s.lost, s.created, p.lost, p.created
    );
    assert!(share >= 0.945, "{share}");
    assert!(copies <= 3000, "{copies}");
    assert_eq!((s.lost, p.lost), (0, 0));
}

#[test]
fn pings_keep_their_copies_when_a_link_dies_under_two_way_load() {
    // The fast link dies under an upload at capacity beside 2,000 small UDP packets a second
    // (which use up the copy credit) and a 50 pps ping stream: the pings' copies on the slow
    // link do not depend on that credit, and while the dying link is failing every copy goes.
    let mut links = hetero();
    links[0] = links[0].clone().outage(3.0, 6.0);
    let (mut sim, _bulk) = upload_at_capacity(&links, 5);
    let small = start_small_packets(&mut sim);
    let ping = sim.start_ping(50);
    let acks = sim.start_pure_acks(2200);
    run_then_stop(&mut sim, 8.0);
    let p = sim.report_source(ping, 2.0, 8.0);
    let s = sim.report_source(small, 2.0, 8.0);
    let a = sim.report_source(acks, 2.0, 8.0);
    println!(
        "fast dies under two-way load: pings lost {} of {}, small UDP lost {} of {}, ACKs lost {} of {}",
        p.lost, p.created, s.lost, s.created, a.lost, a.created
    );
    assert!(p.lost <= 3, "{}", p.lost);
}

/// A saturating source for 3 s, 2.5 s at 0.5 Mbit/s, then `load_mbit` from 6 s to 8.5 s.
/// Returns the simulator, the source and each link's modem queue drops since the load came back.
fn busy_pause_then_load(links: &[LinkSpec], seed: u64, load_mbit: f64) -> (Sim, usize, Vec<u64>) {
    let mut sim = Sim::new(Mode::Auto, links, seed);
    sim.run_until(0.5);
    let b = sim.start_source(92.0, 1400);
    sim.run_until(3.5);
    sim.set_source_rate(b, 0.5);
    sim.run_until(6.0);
    let before: Vec<u64> = (0..links.len())
        .map(|i| sim.up_stats(i).queue_drops)
        .collect();
    sim.set_source_rate(b, load_mbit);
    sim.run_until(8.5);
    let drops = (0..links.len())
        .map(|i| sim.up_stats(i).queue_drops - before[i])
        .collect();
    (sim, b, drops)
}

#[test]
fn a_bond_that_was_busy_before_a_pause_does_not_overfill_the_modems_when_load_returns() {
    // The estimates were measured with the links full; after a quiet spell they still hold.
    // Doubling past them again (start-up) would overfill each modem's 50 ms buffer for a
    // round trip: drops that the receiver must wait out, a stall the sender sees as a dip.
    let (sim, b, drops) = busy_pause_then_load(&hetero(), 7, 92.0);
    let first = sim.report_source(b, 6.0, 7.0).link_rate_bps as f64 / 80e6;
    let second = sim.report_source(b, 7.0, 8.0).link_rate_bps as f64 / 80e6;
    println!(
        "load back after a pause: modem queue drops fast {} slow {}; {first:.3} of the links in the first second, {second:.3} in the next",
        drops[0], drops[1]
    );
    assert!(drops.iter().sum::<u64>() <= 5, "modem drops {drops:?}");
    assert!(first >= 0.9, "first second {first}");
    assert!(second >= 0.95, "second second {second}");

    // The same through cable-lte-sat: LTE's 5 ms jitter and 1 % loss must not read as a link
    // that got faster (which would double past its capacity after all). The old rule dropped
    // 38, 6 and 12 packets at the modems with these seeds.
    for seed in 1..=3 {
        let (sim, b, drops) = busy_pause_then_load(&cable_lte_sat(), seed, 92.0);
        let first = sim.report_source(b, 6.0, 7.0).link_rate_bps as f64 / 80e6;
        println!(
            "cable-lte-sat, seed {seed}: modem queue drops {drops:?}; {first:.3} of the links in the first second"
        );
        assert!(drops.iter().sum::<u64>() <= 5, "modem drops {drops:?}");
    }
}

#[test]
fn a_link_that_got_faster_during_a_pause_is_found_when_load_returns() {
    // The slow link doubles its rate while the bond is quiet: its estimate (20 Mbit/s, its
    // capacity when last full) is stale, and the probes above it must find 40 quickly.
    let links = [
        LinkSpec::new(60.0, 10),
        LinkSpec::new(20.0, 35).rate_change(4.0, 40.0),
    ];
    let (sim, b, _) = busy_pause_then_load(&links, 7, 115.0);
    let first = sim.report_source(b, 6.0, 7.0).link_rate_bps as f64 / 100e6;
    let second = sim.report_source(b, 7.0, 8.0).link_rate_bps as f64 / 100e6;
    let est = sim.site.link_stats()[1].1.est_rate_bps as f64 / 1e6;
    println!(
        "a link 20 -> 40 Mbit/s while quiet: {first:.3} of the new sum in the first second, {second:.3} in the next; estimate {est:.1} Mbit/s"
    );
    // Probing alone (25 % more per probe) read 0.841 in the first second, its estimate 38.1.
    assert!(first >= 0.92, "first second {first}");
    assert!(second >= 0.95, "second second {second}");
    assert!(est >= 38.5, "estimate {est:.1} Mbit/s");
}
