//! The bonding core on simulated links: what each mode does with cable + LTE + satellite,
//! and what happens when a link dies mid-transfer. Virtual time: runs in seconds.
//!
//! `cargo run --release --example bond_demo`

use std::time::Duration;

use wgbond::bond::sim::{LinkSpec, Sim};
use wgbond::bond::Mode;

fn links(kill_cable_at: Option<f64>) -> Vec<LinkSpec> {
    let mut cable = LinkSpec::new(50.0, 8);
    if let Some(t) = kill_cable_at {
        cable = cable.outage(t, 1000.0);
    }
    vec![
        cable,
        LinkSpec::new(20.0, 30).jitter_ms(5).loss_pct(1.0),
        LinkSpec::new(10.0, 300),
    ]
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

fn main() {
    println!("wgbond core demo: cable 50 Mbit/8 ms + LTE 20 Mbit/30 ms (5 ms jitter, 1% loss) + satellite 10 Mbit/300 ms");
    println!("(simulated links, virtual time; the sum of the link rates is 80 Mbit/s)\n");
    println!("| mode | offered | delivered on the links | loss | latency p50 | latency p99 | max reorder wait |");
    println!("|---|---|---|---|---|---|---|");
    for (mode, offered) in [
        (Mode::Failover, 90.0),
        (Mode::Stripe, 90.0),
        (Mode::Auto, 90.0),
        (Mode::Duplicate, 8.0),
    ] {
        let mut sim = Sim::new(mode, &links(None), 11);
        sim.run_until(0.5);
        sim.start_source(offered, 1200);
        sim.run_until(10.5);
        let r = sim.report(2.0, 10.0);
        println!(
            "| {mode:?} | {offered} Mbit/s | {:.1} Mbit/s | {:.2}% | {} ms | {} ms | {} ms |",
            r.link_rate_bps as f64 / 1e6,
            r.loss() * 100.0,
            ms(r.latency_p50),
            ms(r.latency_p99),
            ms(r.max_reorder_wait)
        );
    }
    println!("\nThe cable link dies at t = 5 s during a 4 Mbit/s stream of 500-byte packets (a video call):\n");
    println!("| mode | packets lost | longest gap in delivery |");
    println!("|---|---|---|");
    for mode in [Mode::Duplicate, Mode::Auto, Mode::Failover] {
        let mut sim = Sim::new(mode, &links(Some(5.0)), 12);
        sim.run_until(0.5);
        sim.start_source(4.0, 500);
        sim.run_until(10.5);
        let r = sim.report(1.0, 10.0);
        let mut gap = Duration::ZERO;
        for w in sim.deliveries.windows(2) {
            gap = gap.max(w[1].delivered - w[0].delivered);
        }
        println!(
            "| {mode:?} | {} of {} | {} ms |",
            r.lost,
            r.created,
            ms(gap)
        );
    }
}
