use std::time::Duration;
use wgbond::bond::sim::{LinkSpec, Sim};
use wgbond::bond::Mode;
#[test]
#[ignore]
fn sweep() {
    for seed in 0..12u64 {
        let links = [LinkSpec::new(50.0, 10), LinkSpec::new(50.0, 10)];
        let mut sim = Sim::new(Mode::Stripe, &links, seed);
        sim.run_until(0.5);
        sim.start_source(110.0, 1400);
        sim.run_until(10.5);
        let r = sim.report(2.0, 10.0);
        let links2 = [LinkSpec::new(60.0, 10), LinkSpec::new(20.0, 35)];
        let mut sim2 = Sim::new(Mode::Stripe, &links2, seed);
        sim2.run_until(0.5);
        sim2.start_source(90.0, 1400);
        sim2.run_until(10.5);
        let r2 = sim2.report(2.0, 10.0);
        println!("seed {seed}: equal {:.3} ooo {} | hetero {:.3} wait {:?} ooo {}", r.link_rate_bps as f64/100e6, r.out_of_order, r2.link_rate_bps as f64/80e6, r2.max_reorder_wait, r2.out_of_order);
        let _ = Duration::ZERO;
    }
}
