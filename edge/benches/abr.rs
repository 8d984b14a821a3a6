//! Cost of per-viewer ABR, in memory (no sockets):
//! - `abr/estimate`: one `Controller::on_estimate` + `handle_timeout` +
//!   draining `poll_output`, as a viewer handler does per str0m estimate
//!   event (~10/s per viewer), on a wandering estimate;
//! - `abr/idle_timeout`: `handle_timeout` when nothing is due, as on every
//!   shard wake;
//! - `bwe/sender/{off,on}`: a viewer session's str0m time per media packet at
//!   2.5 Mbit/s over an uncapped in-memory link, without and with
//!   `cascade_rtc::bwe::enable` (TWCC feedback, estimator, pacer), measured
//!   around the sender's calls only (`tests/common/link.rs`).
#![allow(clippy::unwrap_used, missing_docs)]

#[path = "../tests/common/link.rs"]
mod link;

use std::time::{Duration, Instant};

use cascade_edge::abr::{Controller, Rung};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use str0m::bwe::Bitrate;

fn ladder() -> Vec<Rung> {
    [("q", 250_000), ("h", 800_000), ("f", 2_500_000)]
        .into_iter()
        .map(|(n, b)| Rung {
            name: n.into(),
            bps: b,
        })
        .collect()
}

fn controller(c: &mut Criterion) {
    let mut g = c.benchmark_group("abr");
    g.throughput(Throughput::Elements(1));
    let t0 = Instant::now();
    let mut ctl = Controller::new(ladder(), 1_000_000);
    let mut i: u64 = 0;
    g.bench_function("estimate", |b| {
        b.iter(|| {
            i += 1;
            let now = t0 + Duration::from_millis(i * 20);
            let est = 600_000 + (i.wrapping_mul(2_654_435_761) % 800_000);
            ctl.on_estimate(now, est);
            ctl.handle_timeout(now);
            while ctl.poll_output().is_some() {}
        });
    });
    g.bench_function("idle_timeout", |b| {
        b.iter(|| {
            i += 1;
            ctl.handle_timeout(t0 + Duration::from_millis(i * 20));
        });
    });
    g.finish();
}

fn sender(c: &mut Criterion) {
    let mut g = c.benchmark_group("bwe/sender");
    g.sample_size(10);
    for (name, bwe) in [("off", None), ("on", Some(Bitrate::kbps(2_500)))] {
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let mut sim = link::Sim::new(None, 2_500_000, bwe);
                    sim.run_until(Duration::from_secs(2));
                    let (cpu0, n0) = (sim.tx_cpu, sim.counts.media_packets);
                    sim.run_until(Duration::from_secs(7));
                    let n = (sim.counts.media_packets - n0).max(1);
                    // Per media packet: criterion reports it as the time of one iteration.
                    total += (sim.tx_cpu - cpu0) / u32::try_from(n).unwrap();
                }
                total
            });
        });
    }
    g.finish();
}

criterion_group!(benches, controller, sender);
criterion_main!(benches);
