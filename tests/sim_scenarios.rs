//! Scenario tests of the bond core in the deterministic simulator (virtual time).
//! Each reads like the situation it checks; figures are printed for the record.

use std::time::Duration;

use wgbond::bond::sim::{LinkSpec, Sim};
use wgbond::bond::{Event, LinkId, LinkState, Mode};

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[test]
fn duplicate_fast_clean_plus_slow_lossy_loses_nothing_at_fast_latency() {
    // 10 ms clean + 30 ms with 10% loss, 4 Mbit/s of 500-byte packets.
    let links = [
        LinkSpec::new(100.0, 10),
        LinkSpec::new(100.0, 30).loss_pct(10.0),
    ];
    let mut sim = Sim::new(Mode::Duplicate, &links, 1);
    sim.run_until(0.5);
    sim.start_source(4.0, 500);
    sim.run_until(10.5);
    let r = sim.report(1.0, 10.0);
    println!("duplicate 10ms+30ms/10%: {r:?}");
    assert_eq!(r.lost, 0);
    assert_eq!(r.duplicated, 0);
    assert!(
        r.latency_p99 <= Duration::from_millis(12),
        "p99 {:?}",
        r.latency_p99
    );
}

#[test]
fn duplicate_two_lossy_links_multiply_their_loss() {
    let links = [
        LinkSpec::new(100.0, 10).loss_pct(10.0),
        LinkSpec::new(100.0, 15).loss_pct(10.0),
    ];
    let mut sim = Sim::new(Mode::Duplicate, &links, 2);
    sim.run_until(0.5);
    sim.start_source(4.0, 500);
    sim.run_until(20.5);
    let r = sim.report(1.0, 20.0);
    println!("duplicate 2x10% loss: loss {:.3}% {r:?}", r.loss() * 100.0);
    assert!(r.loss() <= 0.015, "loss {}", r.loss());
    assert!(r.loss() > 0.0, "independent losses must coincide sometimes");
    assert_eq!(r.duplicated, 0);
}

#[test]
fn duplicate_survives_a_dead_link_without_loss() {
    let links = [
        LinkSpec::new(50.0, 10).outage(3.0, 100.0),
        LinkSpec::new(50.0, 20),
    ];
    let mut sim = Sim::new(Mode::Duplicate, &links, 3);
    sim.run_until(0.5);
    sim.start_source(4.0, 500);
    sim.run_until(8.5);
    let r = sim.report(1.0, 8.0);
    println!("duplicate, link 0 dies at 3 s: {r:?}");
    assert_eq!(r.lost, 0);
}

/// Latest creation time of a packet that was never delivered.
fn last_lost_created(sim: &Sim, from_s: f64, to_s: f64) -> Option<Duration> {
    let mut delivered = vec![false; sim.created() as usize];
    for d in &sim.deliveries {
        delivered[d.id as usize] = true;
    }
    (0..sim.created())
        .filter(|&i| !delivered[i as usize])
        .filter_map(|i| sim.created_at(i))
        .map(|c| c - sim.t0)
        .filter(|c| c.as_secs_f64() >= from_s && c.as_secs_f64() < to_s)
        .max()
}

#[test]
fn failover_backup_takes_over_within_3_rtt_plus_100ms() {
    // Primary 10 ms one-way (RTT 20 ms) dies at t = 5 s.
    let links = [
        LinkSpec::new(50.0, 10).outage(5.0, 100.0),
        LinkSpec::new(20.0, 25),
    ];
    let mut sim = Sim::new(Mode::Failover, &links, 4);
    sim.run_until(0.5);
    sim.start_source(4.0, 500);
    sim.run_until(10.0);
    // Before the outage only the primary carries data.
    let r = sim.report(1.0, 4.9);
    assert_eq!(r.lost, 0);
    let limit = Duration::from_secs(5) + Duration::from_millis(3 * 20 + 100);
    let last_lost =
        last_lost_created(&sim, 4.0, 9.5).expect("packets in flight at the outage are lost");
    println!(
        "failover: last lost packet created at {:.1} ms (limit {:.1} ms)",
        ms(last_lost),
        ms(limit)
    );
    assert!(
        last_lost <= limit,
        "backup took over too late: {last_lost:?}"
    );
    let r = sim.report(5.2, 9.5);
    println!(
        "after takeover: {r:?} last lost {:?}",
        last_lost_created(&sim, 5.2, 9.5)
    );
    assert_eq!(r.lost, 0);
    assert!(sim.site.link_stats()[1].1.tx_packets > 4_000);
}

#[test]
fn stripe_two_equal_links_deliver_the_sum_in_order() {
    let links = [LinkSpec::new(50.0, 10), LinkSpec::new(50.0, 10)];
    let mut sim = Sim::new(Mode::Stripe, &links, 5);
    sim.run_until(0.5);
    sim.start_source(110.0, 1400); // saturating
    sim.run_until(10.5);
    let r = sim.report(2.0, 10.0);
    let ratio = r.link_rate_bps as f64 / 100e6;
    println!(
        "stripe 50+50/10ms: {:.1} Mbit/s on the links = {:.3} of 100 (inner goodput {:.1} Mbit/s), \
         out of order {}, skips {}",
        r.link_rate_bps as f64 / 1e6,
        ratio,
        r.goodput_bps as f64 / 1e6,
        r.out_of_order,
        sim.hub.stats().reorder_skips
    );
    assert!(ratio >= 0.95, "ratio {ratio}");
    assert_eq!(r.out_of_order, 0);
    assert_eq!(r.duplicated, 0);
}

#[test]
fn stripe_hetero_links_deliver_90pct_with_bounded_reorder_wait() {
    // 60 Mbit/10 ms + 20 Mbit/35 ms.
    let links = [LinkSpec::new(60.0, 10), LinkSpec::new(20.0, 35)];
    let mut sim = Sim::new(Mode::Stripe, &links, 6);
    sim.run_until(0.5);
    sim.start_source(90.0, 1400);
    sim.run_until(10.5);
    let r = sim.report(2.0, 10.0);
    let ratio = r.link_rate_bps as f64 / 80e6;
    let ls = sim.site.link_stats();
    println!(
        "stripe 60/10+20/35: {:.1} Mbit/s on the links = {:.3} of 80 (inner goodput {:.1}); \
         max reorder wait {:.1} ms; est rates {:.1}/{:.1} Mbit/s; out of order {}",
        r.link_rate_bps as f64 / 1e6,
        ratio,
        r.goodput_bps as f64 / 1e6,
        ms(r.max_reorder_wait),
        ls[0].1.est_rate_bps as f64 / 1e6,
        ls[1].1.est_rate_bps as f64 / 1e6,
        r.out_of_order,
    );
    assert!(ratio >= 0.90, "ratio {ratio}");
    assert!(
        r.max_reorder_wait <= Duration::from_millis(25 + 5),
        "wait {:?}",
        r.max_reorder_wait
    );
    assert_eq!(r.duplicated, 0);
}

#[test]
fn estimator_measures_rtt_and_loss_on_a_lossy_link() {
    // 20 ms RTT, 5% loss each way, 5 Mbit/s of traffic on a 50 Mbit/s link.
    let links = [LinkSpec::new(50.0, 10).loss_pct(5.0)];
    let mut sim = Sim::new(Mode::Stripe, &links, 7);
    sim.start_source(5.0, 1000);
    sim.run_until(2.0);
    let (_, s) = &sim.site.link_stats()[0];
    let srtt = s.srtt.expect("an RTT after 2 s");
    println!(
        "estimator: srtt {:.2} ms, loss {:.2}%",
        ms(srtt),
        s.loss * 100.0
    );
    assert!((ms(srtt) - 20.0).abs() <= 2.0, "srtt {srtt:?}");
    assert!((s.loss - 0.05).abs() <= 0.02, "loss {}", s.loss);
}

#[test]
fn estimator_marks_a_dead_link_down_within_3_rtt_plus_100ms() {
    let links = [
        LinkSpec::new(50.0, 10).outage(3.0, 100.0),
        LinkSpec::new(50.0, 10),
    ];
    let mut sim = Sim::new(Mode::Stripe, &links, 8);
    sim.start_source(2.0, 500);
    sim.run_until(4.0);
    let down_at = sim
        .events
        .iter()
        .find(|(_, side, e)| {
            *side == wgbond::bond::sim::Side::Site
                && *e
                    == Event::LinkState {
                        link: LinkId(0),
                        state: LinkState::Down,
                    }
        })
        .map(|(t, ..)| *t - sim.t0)
        .expect("link 0 marked down");
    println!(
        "dead link marked down {:.1} ms after the outage",
        ms(down_at) - 3000.0
    );
    assert!(down_at >= Duration::from_secs(3));
    assert!(
        down_at <= Duration::from_millis(3000 + 3 * 20 + 100),
        "{down_at:?}"
    );
    // And no false alarm on the healthy link.
    assert!(!sim.events.iter().any(|(_, _, e)| *e
        == Event::LinkState {
            link: LinkId(1),
            state: LinkState::Down
        }));
}
