//! Per-packet cost of the bond core, each side on its own:
//! - send: `handle_outbound` (classify, schedule over two links) + `poll_transmit` (pace,
//!   encode the trailer);
//! - receive: `handle_inbound` (decode, measure, dedup, reorder) + `poll_deliver`.
//!
//! Both bonds are first warmed up in the simulator on two fast links, so that the links are
//! up and their estimated rates are far above what the benchmark offers (no pacing stalls).
//! Run with `cargo bench --bench datapath`; the figure is the time per packet.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use wgbond::bond::sim::{LinkSpec, Sim};
use wgbond::bond::{wire, LinkId, Mode};

const LEN: usize = 1400;

fn warm_sim(mode: Mode) -> Sim {
    let links = [LinkSpec::new(20_000.0, 1), LinkSpec::new(20_000.0, 2)];
    let mut sim = Sim::new(mode, &links, 42);
    sim.run_until(0.2);
    sim.start_source(8_000.0, LEN);
    sim.run_until(1.5);
    sim.stop_source();
    sim.run_until(1.6);
    sim
}

fn packet() -> Vec<u8> {
    let mut p = vec![0u8; LEN];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(LEN as u16).to_be_bytes());
    p[8] = 64;
    p[9] = 6; // TCP with payload: bulk, not latency-critical
    p[32] = 0x50;
    p[33] = 0x10;
    p
}

fn send_side(c: &mut Criterion) {
    let mut g = c.benchmark_group("send");
    g.throughput(Throughput::Elements(1));
    for mode in [Mode::Stripe, Mode::Auto] {
        let mut sim = warm_sim(mode);
        let rates: u64 = sim
            .site
            .link_stats()
            .iter()
            .map(|(_, s)| s.pacing_rate_bps)
            .sum();
        eprintln!(
            "send bench ({mode:?}): links paced at {:.0} Mbit/s in total",
            rates as f64 / 1e6
        );
        let pkt = packet();
        let mut now = sim.now;
        let mut buf = Vec::with_capacity(2048);
        // Offer packets at 80% of the paced rate so that queues stay short.
        let gap =
            Duration::from_nanos((LEN as u64 + 80) * 8 * 1_000_000_000 / (rates * 8 / 10).max(1));
        g.bench_function(format!("{mode:?} schedule+encode"), |b| {
            b.iter(|| {
                now += gap;
                sim.site.handle_outbound(black_box(&pkt), now);
                while let Some(t) = sim.site.poll_transmit(now, &mut buf) {
                    black_box((t.link, buf.len()));
                }
            })
        });
        let st = sim.site.stats();
        eprintln!("  sent {} dropped {}", st.sent_packets, st.send_drops);
    }
    g.finish();
}

fn receive_side(c: &mut Criterion) {
    let mut g = c.benchmark_group("receive");
    g.throughput(Throughput::Elements(1));
    let mut sim = warm_sim(Mode::Stripe);
    let mut now = sim.now;
    // Continue the site's numbering so the hub sees no jump.
    let st = sim.site.stats();
    let mut seq = st.sent_packets - st.send_drops;
    let mut dgram = Vec::new();
    let mut out = Vec::with_capacity(2048);
    let pkt = packet();
    let trailer = |seq: u64, link: u8| wire::Trailer {
        seq,
        link_seq: seq as u32,
        send_time_us: (seq as u32).wrapping_mul(10),
        link_id: link,
        flags: 0,
        compact: false,
    };
    wire::encode_data(&pkt, &trailer(seq, 0), &mut dgram);
    // In order on alternating links, every 16th pair swapped (the reorder path).
    g.bench_function("decode+reorder", |b| {
        b.iter(|| {
            now += Duration::from_micros(1);
            let s = if seq % 16 == 0 {
                seq + 1
            } else if seq % 16 == 1 {
                seq - 1
            } else {
                seq
            };
            let link = (seq & 1) as u8;
            // Patch the trailer in place (seq, link seq, link id) instead of re-encoding.
            dgram[LEN..LEN + 8].copy_from_slice(&s.to_be_bytes());
            dgram[LEN + 8..LEN + 12].copy_from_slice(&(s as u32).to_be_bytes());
            dgram[LEN + 16] = link;
            let _ = sim.hub.handle_inbound(LinkId(link), black_box(&dgram), now);
            while sim.hub.poll_deliver(&mut out) {
                black_box(out.len());
            }
            seq += 1;
        })
    });
    let st = sim.hub.stats();
    eprintln!(
        "  delivered {} skips {} duplicates {}",
        st.delivered_packets, st.reorder_skips, st.rx_duplicates
    );
    g.finish();
}

fn decode_only(c: &mut Criterion) {
    let mut dgram = Vec::new();
    wire::encode_data(
        &packet(),
        &wire::Trailer {
            seq: 7,
            link_seq: 7,
            send_time_us: 7,
            link_id: 0,
            flags: 0,
            compact: false,
        },
        &mut dgram,
    );
    c.bench_function("wire::decode data", |b| {
        b.iter(|| black_box(wire::decode(black_box(&dgram)).is_ok()))
    });
}

criterion_group!(benches, send_side, receive_side, decode_only);
criterion_main!(benches);
