//! Demultiplexing cost on the receive path of the one UDP port: `Routes::route` for
//! - `addr/N`: an RTP/RTCP datagram from a known 5-tuple (the steady state: viewer feedback,
//!   publisher media), with N sessions routed;
//! - `stun/N`: a STUN binding request, routed by the USERNAME's local ufrag (consent checks
//!   every few seconds per session, and the first packet of every session).
//!
//! Both are hash-map lookups behind read locks, so the cost must not grow with N (str0m's
//! examples probe every session with `Rtc::accepts`, O(N) per datagram).
#![allow(clippy::unwrap_used, missing_docs)]

use std::net::SocketAddr;

use cascade_rtc::mux::{Route, Routes};
use cascade_rtc::SessionId;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use str0m::net::Protocol;

/// A STUN binding request whose USERNAME is `local:remote` (RFC 8445 §7.2.2).
fn binding_request(local_ufrag: &str) -> Vec<u8> {
    let user = format!("{local_ufrag}:remote");
    let pad = (4 - user.len() % 4) % 4;
    let attr_len = 4 + user.len() + pad;
    let mut m = vec![0x00, 0x01];
    m.extend_from_slice(&u16::try_from(attr_len).unwrap().to_be_bytes());
    m.extend_from_slice(&[0x21, 0x12, 0xA4, 0x42]);
    m.extend_from_slice(&[7; 12]);
    m.extend_from_slice(&[0x00, 0x06]);
    m.extend_from_slice(&u16::try_from(user.len()).unwrap().to_be_bytes());
    m.extend_from_slice(user.as_bytes());
    m.extend(std::iter::repeat_n(0, pad));
    m
}

fn source(i: usize) -> SocketAddr {
    let port = 10_000 + u16::try_from(i % 50_000).unwrap();
    let host = u8::try_from(i / 50_000 + 1).unwrap();
    SocketAddr::from(([127, 0, 1, host], port))
}

/// N sessions, each with its ufrag routed and its address learnt (as a shard learns it
/// after a verified binding request).
fn routes(n: usize) -> Routes {
    let routes = Routes::default();
    for i in 0..n {
        let ufrag = format!("u{i:07}");
        let route = Route {
            shard: i % 2,
            id: SessionId(i as u128),
        };
        routes.add_ufrag(ufrag.clone(), route);
        routes.learn(Protocol::Udp, source(i), route);
    }
    routes
}

fn demux(c: &mut Criterion) {
    let mut g = c.benchmark_group("demux");
    g.throughput(Throughput::Elements(1));
    // An SRTP packet's clear header is all the router looks at (not STUN: first byte 0x80).
    let rtp = [0x80u8; 200];
    for n in [10, 1_000, 10_000] {
        let r = routes(n);
        let probe = source(n / 2);
        g.bench_with_input(BenchmarkId::new("addr", n), &n, |b, _| {
            b.iter(|| r.route(Protocol::Udp, probe, std::hint::black_box(&rtp)))
        });
        let stun = binding_request(&format!("u{:07}", n / 2));
        g.bench_with_input(BenchmarkId::new("stun", n), &n, |b, _| {
            b.iter(|| r.route(Protocol::Udp, probe, std::hint::black_box(&stun)))
        });
    }
    g.finish();
}

criterion_group!(benches, demux);
criterion_main!(benches);
