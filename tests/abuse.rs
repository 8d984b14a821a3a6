//! Abuse of the real binary on loopback, each while a WHEP viewer watches a
//! live stream: 500 RTMP connections that never publish (then a real ffmpeg
//! publish still goes live), 1,000 ICE-TCP connections held open, 50,000
//! forged STUN binding requests with a valid ufrag from random source ports,
//! and a shard panic (the node exits 70 for its supervisor). Each prints the
//! node's RSS and CPU for the security notes (docs/security/limits.md).
//!
//! Attack sources are spread over 127.0.x.y addresses (all of 127/8 is
//! loopback on Linux) so the per-IP caps and the node caps both show.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{ffmpeg_publish, media, publish, view, wait_live, Node, TOKEN};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream, UdpSocket};

/// The pid of the node started with `--log info,{marker}=off`.
fn pid_of(marker: &str) -> u32 {
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) {
            if String::from_utf8_lossy(&cmd).contains(marker) {
                return pid;
            }
        }
    }
    panic!("no process with {marker}");
}

/// Resident memory in MiB.
fn rss_mib(pid: u32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: f64 = s
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap();
    kb / 1024.0
}

/// CPU seconds used so far (user + system; 100 ticks a second).
fn cpu_secs(pid: u32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &s[s.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    (f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap()) / 100.0
}

/// Samples RSS until told to stop; returns the peak.
fn rss_peak(
    pid: u32,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<f64>,
) {
    let (tx, mut rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(async move {
        let mut peak: f64 = 0.0;
        loop {
            peak = peak.max(rss_mib(pid));
            tokio::select! {
                _ = &mut rx => return peak,
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        }
    });
    (tx, task)
}

async fn metrics(base: &str) -> String {
    reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// Sum of the series of `name` whose labels contain `label` (`k="v"`).
fn metric_with(text: &str, name: &str, label: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A node with a live WHIP stream `cam`, its pid and base URL.
async fn live_node(marker: &str, extra: &[&str]) -> (Node, u32, loadtest::whip::Publisher) {
    let log = format!("info,{marker}=off");
    let mut args = vec!["--log", log.as_str()];
    args.extend_from_slice(extra);
    let node = Node::start("all", &args);
    let pid = pid_of(marker);
    let p = publish(&node.http, "cam", media(30).await, 0).await;
    wait_live(&node.http, "cam").await;
    (node, pid, p)
}

/// What the viewer must show under attack: everything a healthy viewer
/// shows, and no frame later than 1 s (a stall longer than that would
/// either skip frames or deliver them that late).
fn assert_unaffected(r: &loadtest::whep::ViewerReport, secs: u64) {
    common::assert_good_viewer(r);
    assert!(
        r.video_frames as f64 >= 30.0 * secs as f64 * 0.9,
        "video kept flowing: {r:?}"
    );
    if let Some(max) = r.latency_ms_max {
        assert!(max < 1000.0, "no stall over 1 s: latency max {max} ms");
    }
}

async fn connect_from(ip: [u8; 4], to: SocketAddr) -> std::io::Result<TcpStream> {
    let s = TcpSocket::new_v4()?;
    s.bind(SocketAddr::from((ip, 0)))?;
    s.connect(to).await
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Rtmp {
    /// Closed before the handshake was answered (a connection cap).
    Refused,
    /// Handshake done, kept talking, closed by the server after this long.
    Closed(f64),
    /// Still open when the test stopped waiting.
    Open,
}

/// An RTMP client that completes the handshake and then sends an
/// Acknowledgement every 3 s (resetting the 15 s idle clock) but never
/// publishes.
async fn idle_rtmp(ip: [u8; 4], to: SocketAddr) -> Rtmp {
    let Ok(mut c) = connect_from(ip, to).await else {
        return Rtmp::Refused;
    };
    let t0 = Instant::now();
    let mut c0c1 = vec![3u8];
    c0c1.extend_from_slice(&[0u8; 1536]);
    if c.write_all(&c0c1).await.is_err() {
        return Rtmp::Refused;
    }
    let mut s = vec![0u8; 1 + 2 * 1536];
    let mut got = 0;
    while got < 1 + 1536 {
        match tokio::time::timeout(Duration::from_secs(3), c.read(&mut s[got..])).await {
            Ok(Ok(n)) if n > 0 => got += n,
            _ => return Rtmp::Refused,
        }
    }
    let c2 = s[1..1 + 1536].to_vec();
    if c.write_all(&c2).await.is_err() {
        return Rtmp::Closed(t0.elapsed().as_secs_f64());
    }
    let mut buf = [0u8; 4096];
    let mut seq = 0u32;
    loop {
        if t0.elapsed() > Duration::from_secs(25) {
            return Rtmp::Open;
        }
        tokio::select! {
            r = c.read(&mut buf) => match r {
                Ok(0) | Err(_) => return Rtmp::Closed(t0.elapsed().as_secs_f64()),
                Ok(_) => {}
            },
            _ = tokio::time::sleep(Duration::from_secs(3)) => {
                seq += 1;
                let mut ack = vec![0x02, 0, 0, 0, 0, 0, 4, 0x03, 0, 0, 0, 0];
                ack.extend_from_slice(&seq.to_be_bytes());
                if c.write_all(&ack).await.is_err() {
                    return Rtmp::Closed(t0.elapsed().as_secs_f64());
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rtmp_connections_that_never_publish() {
    let (node, pid, _publisher) = live_node("abuse_rtmp_marker", &[]).await;
    let rtmp: SocketAddr = node.rtmp.clone().unwrap().parse().unwrap();
    let secs = 22;
    let viewer = tokio::spawn(view_owned(node.http.clone(), secs));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (rss0, cpu0, started) = (rss_mib(pid), cpu_secs(pid), Instant::now());
    let (stop, peak) = rss_peak(pid);

    // 20 from one address: 16 admitted (per-IP cap), 4 refused.
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..20 {
        tasks.spawn(idle_rtmp([127, 0, 2, 1], rtmp));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // 500 more from 32 addresses, 250 a second: the node cap (256) admits
    // 240 of them.
    for i in 0..500u32 {
        let ip = [127, 0, 3, (i % 32) as u8 + 1];
        tasks.spawn(idle_rtmp(ip, rtmp));
        tokio::time::sleep(Duration::from_millis(4)).await;
    }
    let mut outcomes = Vec::new();
    while let Some(r) = tasks.join_next().await {
        outcomes.push(r.unwrap());
    }
    let flood_secs = started.elapsed().as_secs_f64();
    let cpu = cpu_secs(pid) - cpu0;
    let _ = stop.send(());
    let peak = peak.await.unwrap();
    let refused = outcomes.iter().filter(|o| **o == Rtmp::Refused).count();
    let closed: Vec<f64> = outcomes
        .iter()
        .filter_map(|o| match o {
            Rtmp::Closed(s) => Some(*s),
            _ => None,
        })
        .collect();
    let open = outcomes.iter().filter(|o| **o == Rtmp::Open).count();
    let (min, max) = closed
        .iter()
        .fold((f64::MAX, 0f64), |(a, b), s| (a.min(*s), b.max(*s)));
    eprintln!(
        "rtmp: 520 connections in {flood_secs:.1} s: {} admitted (closed after {min:.1}-{max:.1} s), {refused} refused, {open} open; rss {rss0:.0} -> peak {peak:.0} MiB; cpu {cpu:.2} s ({:.0}%)",
        closed.len(),
        100.0 * cpu / flood_secs
    );
    assert_eq!(open, 0, "no connection outlives the publish timeout");
    assert!(
        closed.len() >= 200 && closed.len() <= 256,
        "admitted up to the node cap: {}",
        closed.len()
    );
    assert!(min >= 9.0 && max <= 12.0, "closed at ~10 s: {min}-{max}");
    let m = metrics(&node.http).await;
    let name = "cascade_ingest_rtmp_refused_total";
    assert!(metric_with(&m, name, "reason=\"per_ip\"") >= 4.0, "{m}");
    assert!(metric_with(&m, name, "reason=\"limit\"") >= 200.0);
    assert!(metric_with(&m, name, "reason=\"publish_timeout\"") >= closed.len() as f64);

    // The slots are free again: a real encoder goes live.
    let rtmp = node.rtmp.clone().unwrap();
    let url = format!("rtmp://{rtmp}/live/rtmpcam?token={TOKEN}");
    let mut ff = ffmpeg_publish(&url, &["-bf", "0"], 8);
    wait_live(&node.http, "rtmpcam").await;
    let _ = ff.kill().await;
    let r = viewer.await.unwrap();
    assert_unaffected(&r, secs);
}

async fn view_owned(base: String, secs: u64) -> loadtest::whep::ViewerReport {
    view(&base, "cam", secs).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ice_tcp_connections_held_open() {
    let (node, pid, _publisher) = live_node("abuse_icetcp_marker", &[]).await;
    // The ICE-TCP port is in the viewers' candidates.
    let offer = loadtest::whep::offer_sdp(&[loadtest::whep::VideoCodec::H264], true).unwrap();
    let answer = post_whep(&node.http, &offer).await;
    let tcp: SocketAddr = candidate(&answer, "tcp");
    let secs = 16;
    let viewer = tokio::spawn(view_owned(node.http.clone(), secs));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (rss0, cpu0, started) = (rss_mib(pid), cpu_secs(pid), Instant::now());
    let (stop, peak) = rss_peak(pid);
    let mut tasks = tokio::task::JoinSet::new();
    // 20 from one address (16 admitted), then 1,000 from 63 addresses at
    // 500 a second, all silent.
    let spawn = |tasks: &mut tokio::task::JoinSet<Option<f64>>, ip: [u8; 4]| {
        tasks.spawn(async move {
            let mut c = connect_from(ip, tcp).await.ok()?;
            let t0 = Instant::now();
            let mut buf = [0u8; 64];
            match tokio::time::timeout(Duration::from_secs(20), c.read(&mut buf)).await {
                Ok(_) => Some(t0.elapsed().as_secs_f64()),
                Err(_) => None,
            }
        });
    };
    for _ in 0..20 {
        spawn(&mut tasks, [127, 0, 4, 1]);
    }
    for i in 0..1000u32 {
        spawn(&mut tasks, [127, 0, 5, (i % 63) as u8 + 1]);
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let mut closed = Vec::new();
    while let Some(r) = tasks.join_next().await {
        closed.push(r.unwrap());
    }
    let flood_secs = started.elapsed().as_secs_f64();
    let cpu = cpu_secs(pid) - cpu0;
    let _ = stop.send(());
    let peak = peak.await.unwrap();
    let refused = closed.iter().flatten().filter(|s| **s < 1.0).count();
    let timed_out: Vec<f64> = closed
        .iter()
        .flatten()
        .copied()
        .filter(|s| *s >= 1.0)
        .collect();
    let open = closed.iter().filter(|c| c.is_none()).count();
    let max = timed_out.iter().copied().fold(0f64, f64::max);
    eprintln!(
        "ice-tcp: 1020 connections in {flood_secs:.1} s: {} held then closed unbound (by {max:.1} s), {refused} refused, {open} open; rss {rss0:.0} -> peak {peak:.0} MiB; cpu {cpu:.2} s ({:.0}%)",
        timed_out.len(),
        100.0 * cpu / flood_secs
    );
    assert_eq!(open, 0, "every silent connection is closed");
    assert_eq!(refused, 4, "per-IP cap of 16");
    assert_eq!(timed_out.len(), 1016);
    assert!(max < 12.0, "closed at the 10 s bind deadline: {max}");
    assert!(peak - rss0 < 64.0, "memory bounded: {rss0} -> {peak} MiB");
    let m = metrics(&node.http).await;
    assert!(metric_with(&m, "cascade_rtc_tcp_refused_total", "per_ip") >= 4.0);
    assert!(metric_with(&m, "cascade_rtc_tcp_closed_total", "unbound") >= 1000.0);
    let r = viewer.await.unwrap();
    assert_unaffected(&r, secs);
}

async fn post_whep(base: &str, offer: &str) -> String {
    let r = reqwest::Client::new()
        .post(format!("{base}/whep/cam"))
        .header("content-type", "application/sdp")
        .body(offer.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    r.text().await.unwrap()
}

/// The address of the first `proto` candidate of an SDP.
fn candidate(sdp: &str, proto: &str) -> SocketAddr {
    sdp.lines()
        .filter_map(|l| l.trim().strip_prefix("a=candidate:"))
        .find_map(|c| {
            let f: Vec<&str> = c.split_whitespace().collect();
            (f.get(2)?.eq_ignore_ascii_case(proto))
                .then(|| format!("{}:{}", f[4], f[5]).parse().ok())?
        })
        .unwrap_or_else(|| panic!("{proto} candidate in {sdp}"))
}

fn attr<'a>(sdp: &'a str, name: &str) -> &'a str {
    sdp.lines()
        .find_map(|l| l.trim().strip_prefix(name))
        .unwrap()
}

/// A binding request with USERNAME `username` and a MESSAGE-INTEGRITY that
/// matches no password (20 random-looking bytes).
fn forged_binding(username: &str, n: u32) -> Vec<u8> {
    let mut attrs = Vec::new();
    attrs.extend_from_slice(&0x0006u16.to_be_bytes());
    attrs.extend_from_slice(&(username.len() as u16).to_be_bytes());
    attrs.extend_from_slice(username.as_bytes());
    while attrs.len() % 4 != 0 {
        attrs.push(0);
    }
    attrs.extend_from_slice(&0x0008u16.to_be_bytes());
    attrs.extend_from_slice(&20u16.to_be_bytes());
    for i in 0..5u32 {
        attrs.extend_from_slice(&(n.wrapping_mul(2_654_435_761) ^ i).to_be_bytes());
    }
    let mut m = vec![0x00, 0x01];
    m.extend_from_slice(&(attrs.len() as u16).to_be_bytes());
    m.extend_from_slice(&[0x21, 0x12, 0xA4, 0x42]);
    m.extend_from_slice(&n.to_be_bytes());
    m.extend_from_slice(&[7; 8]);
    m.extend_from_slice(&attrs);
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_stun_with_a_valid_ufrag() {
    let (node, pid, _publisher) = live_node("abuse_stun_marker", &[]).await;
    // A session to aim at: its ufrag is in the answer.
    let offer = loadtest::whep::offer_sdp(&[loadtest::whep::VideoCodec::H264], true).unwrap();
    let answer = post_whep(&node.http, &offer).await;
    let udp = candidate(&answer, "udp");
    let username = format!(
        "{}:{}",
        attr(&answer, "a=ice-ufrag:"),
        attr(&offer, "a=ice-ufrag:")
    );
    let secs = 14;
    let viewer = tokio::spawn(view_owned(node.http.clone(), secs));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = metrics(&node.http).await;
    let (rss0, cpu0, started) = (rss_mib(pid), cpu_secs(pid), Instant::now());
    let (stop, peak) = rss_peak(pid);
    // 500 source ports × 100 requests at 5,000 a second.
    let mut sent = 0u32;
    let mut routes_max: f64 = 0.0;
    for _ in 0..500 {
        let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        for _ in 0..100 {
            let _ = s.send_to(&forged_binding(&username, sent), udp).await;
            sent += 1;
        }
        let due = started + Duration::from_millis(u64::from(sent) / 5);
        tokio::time::sleep_until(due.into()).await;
        if sent.is_multiple_of(10_000) {
            let m = metrics(&node.http).await;
            routes_max = routes_max.max(metric_with(&m, "cascade_rtc_routed_addresses", ""));
        }
    }
    let flood_secs = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let cpu = cpu_secs(pid) - cpu0;
    let _ = stop.send(());
    let peak = peak.await.unwrap();
    let after = metrics(&node.http).await;
    let routes = metric_with(&after, "cascade_rtc_routed_addresses", "");
    routes_max = routes_max.max(routes);
    let drop = |m: &str| metric_with(m, "cascade_rtc_datagrams_dropped_total", "stun_integrity");
    let refused = drop(&after) - drop(&before);
    eprintln!(
        "stun: {sent} forged requests in {flood_secs:.1} s: {refused} dropped by the integrity check; routed addresses max {routes_max}; rss {rss0:.0} -> peak {peak:.0} MiB; cpu {cpu:.2} s ({:.0}%)",
        100.0 * cpu / (flood_secs + 1.5)
    );
    // The publisher's and the viewer's paths (the target never connected).
    assert!(routes_max <= 4.0, "routing table bounded: {routes_max}");
    assert!(refused >= 40_000.0, "forgeries counted: {refused}");
    assert!(peak - rss0 < 32.0, "memory bounded: {rss0} -> {peak} MiB");
    let r = viewer.await.unwrap();
    assert_unaffected(&r, secs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_panic_makes_the_node_exit_70() {
    let mut node = Node::start("all", &["--debug-panic-shard-after", "0"]);
    // The first session added to a shard panics it: a WHIP publish.
    let mut o = loadtest::whip::PublisherOptions::new(format!("{}/whip/cam", node.http));
    o.token = Some(TOKEN.into());
    o.connect_timeout = Duration::from_secs(3);
    let _ = loadtest::whip::Publisher::start(o, media(30).await).await;
    let code = tokio::task::spawn_blocking(move || node.wait_exit(Duration::from_secs(10)))
        .await
        .unwrap();
    assert_eq!(code, Some(70), "exits non-zero for its supervisor");
}

/// What became of one slowloris connection.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Slow {
    /// Closed by the server this long after the partial head was sent.
    Closed(f64),
    /// Still open when the test stopped waiting.
    Open,
}

/// A slowloris client: half a request head, then nothing.
async fn slowloris(ip: [u8; 4], to: SocketAddr) -> Slow {
    let Ok(mut c) = connect_from(ip, to).await else {
        return Slow::Closed(0.0);
    };
    let t0 = Instant::now();
    if c.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .await
        .is_err()
    {
        return Slow::Closed(0.0);
    }
    let mut buf = [0u8; 256];
    loop {
        match tokio::time::timeout(Duration::from_secs(20), c.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => continue,
            Ok(_) => return Slow::Closed(t0.elapsed().as_secs_f64()),
            Err(_) => return Slow::Open,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_slowloris() {
    let (node, pid, _publisher) = live_node("abuse_slowloris_marker", &[]).await;
    let http: SocketAddr = node.http.trim_start_matches("http://").parse().unwrap();
    let secs = 18;
    let viewer = tokio::spawn(view_owned(node.http.clone(), secs));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (rss0, cpu0, started) = (rss_mib(pid), cpu_secs(pid), Instant::now());
    let (stop, peak) = rss_peak(pid);
    let mut tasks = tokio::task::JoinSet::new();
    // 70 from one address (64 admitted, the default per-IP cap), then 2,000
    // from 40 addresses at about 500 a second.
    for _ in 0..70 {
        tasks.spawn(slowloris([127, 0, 6, 1], http));
    }
    for i in 0..2000u32 {
        tasks.spawn(slowloris([127, 0, 7, (i % 40) as u8 + 1], http));
        if i % 2 == 0 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    let flood_secs = started.elapsed().as_secs_f64();
    let rss_flood = rss_mib(pid);
    // A normal request in the middle of the flood.
    let t = Instant::now();
    let r = reqwest::get(format!("{}/healthz", node.http))
        .await
        .unwrap();
    assert!(
        r.status().is_success(),
        "healthz under the flood: {}",
        r.status()
    );
    let healthz_ms = t.elapsed().as_secs_f64() * 1000.0;
    let mut results = Vec::new();
    while let Some(r) = tasks.join_next().await {
        results.push(r.unwrap());
    }
    let cpu = cpu_secs(pid) - cpu0;
    let total_secs = started.elapsed().as_secs_f64();
    let _ = stop.send(());
    let peak = peak.await.unwrap();
    let rss_after = rss_mib(pid);
    let open = results.iter().filter(|r| **r == Slow::Open).count();
    let closed: Vec<f64> = results
        .iter()
        .filter_map(|r| match r {
            Slow::Closed(s) => Some(*s),
            Slow::Open => None,
        })
        .collect();
    let refused = closed.iter().filter(|s| **s < 1.0).count();
    let timed: Vec<f64> = closed.iter().copied().filter(|s| *s >= 1.0).collect();
    let (min, max) = timed
        .iter()
        .fold((f64::MAX, 0f64), |(a, b), s| (a.min(*s), b.max(*s)));
    eprintln!(
        "http slowloris: 2070 connections in {flood_secs:.1} s: {} closed at the header timeout ({min:.1}-{max:.1} s), {refused} refused, {open} open; healthz during the flood {healthz_ms:.0} ms; rss {rss0:.0} -> {rss_flood:.0} during, peak {peak:.0}, after {rss_after:.0} MiB; cpu {cpu:.2} s over {total_secs:.1} s ({:.0}%)",
        timed.len(),
        100.0 * cpu / total_secs
    );
    assert_eq!(open, 0, "every slowloris connection is closed");
    assert_eq!(refused, 6, "per-IP cap of 64");
    assert_eq!(timed.len(), 2064);
    assert!(
        min >= 9.0 && max < 12.5,
        "closed at the 10 s header timeout: {min}-{max}"
    );
    assert!(peak - rss0 < 64.0, "memory bounded: {rss0} -> {peak} MiB");
    let m = metrics(&node.http).await;
    assert_eq!(
        metric_with(&m, "cascade_http_refused_total", "reason=\"per_ip\""),
        6.0
    );
    assert!(metric_with(&m, "cascade_http_refused_total", "header_timeout") >= 2064.0);
    let r = viewer.await.unwrap();
    assert_unaffected(&r, secs);
}

/// A WHEP POST of `offer` for `cam` from `from`: status and Retry-After.
async fn whep_from(base: &str, from: [u8; 4], offer: &str) -> (u16, Option<String>) {
    whep_with(&client_from(from), base, offer).await
}

/// A client whose connections come from `from` (kept alive: the flood
/// stays under the HTTP per-IP connection cap and tests the session cap).
fn client_from(from: [u8; 4]) -> reqwest::Client {
    reqwest::Client::builder()
        .local_address(std::net::IpAddr::from(from))
        .build()
        .unwrap()
}

async fn whep_with(client: &reqwest::Client, base: &str, offer: &str) -> (u16, Option<String>) {
    let r = client
        .post(format!("{base}/whep/cam"))
        .header("content-type", "application/sdp")
        .body(offer.to_string())
        .send()
        .await
        .unwrap();
    let retry = r
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_string());
    (r.status().as_u16(), retry)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whep_flood_cannot_starve_other_addresses_or_publishers() {
    let (node, pid, _publisher) =
        live_node("abuse_whepflood_marker", &["--max-sessions", "100"]).await;
    let offer = loadtest::whep::offer_sdp(&[loadtest::whep::VideoCodec::H264], true).unwrap();
    let rss0 = rss_mib(pid);
    let started = Instant::now();
    // 200 offers from one address, back to back on 8 connections: 64
    // sessions (the per-IP default), then 429.
    let client = client_from([127, 0, 0, 3]);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let (base, offer, client) = (node.http.clone(), offer.clone(), client.clone());
        tasks.spawn(async move {
            let mut v = Vec::new();
            for _ in 0..25 {
                v.push(whep_with(&client, &base, &offer).await);
            }
            v
        });
    }
    let mut statuses = Vec::new();
    while let Some(r) = tasks.join_next().await {
        statuses.extend(r.unwrap());
    }
    let flood_secs = started.elapsed().as_secs_f64();
    let created = statuses.iter().filter(|(s, _)| *s == 201).count();
    let limited: Vec<_> = statuses.iter().filter(|(s, _)| *s == 429).collect();
    assert_eq!(created, 64, "{statuses:?}");
    assert_eq!(limited.len(), 136, "{statuses:?}");
    assert!(
        limited.iter().all(|(_, r)| r.is_some()),
        "429 has Retry-After"
    );
    // Another address still gets a session.
    let (s, _) = whep_from(&node.http, [127, 0, 0, 2], &offer).await;
    assert_eq!(s, 201, "another address is not affected");
    // Fill the viewers' pool (100) from more addresses: 503 past it.
    let mut full = 0;
    for i in 0..40u8 {
        let (s, retry) = whep_from(&node.http, [127, 0, 1, i + 1], &offer).await;
        if s == 503 {
            assert!(retry.is_some(), "503 has Retry-After");
            full += 1;
        } else {
            assert_eq!(s, 201);
        }
    }
    assert_eq!(
        full, 6,
        "the publisher + 65 + 34 viewers reach the 100 sessions"
    );
    // A publisher still publishes: its pool is its own.
    let p2 = publish(&node.http, "cam2", media(30).await, 0).await;
    wait_live(&node.http, "cam2").await;
    let m = metrics(&node.http).await;
    assert_eq!(
        metric_with(
            &m,
            "cascade_rtc_sessions_refused_total",
            "reason=\"per_ip\""
        ),
        136.0
    );
    assert_eq!(
        metric_with(
            &m,
            "cascade_rtc_sessions_refused_total",
            "reason=\"viewers_full\""
        ),
        6.0
    );
    eprintln!(
        "whep flood: 200 offers from one address in {flood_secs:.2} s: {created} sessions, {} refused 429; another address 201; 100 sessions reached -> {full} viewers 503; a WHIP publisher went live; rss {rss0:.0} -> {:.0} MiB",
        limited.len(),
        rss_mib(pid)
    );
    drop(p2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_request_body_is_cut() {
    let (node, _pid, _publisher) =
        live_node("abuse_bodystall_marker", &["--http-body-timeout", "1s"]).await;
    let http: SocketAddr = node.http.trim_start_matches("http://").parse().unwrap();
    let mut c = TcpStream::connect(http).await.unwrap();
    c.write_all(
        b"POST /whep/cam HTTP/1.1\r\nHost: x\r\nContent-Type: application/sdp\r\nContent-Length: 1000\r\n\r\nv=0\r\n",
    )
    .await
    .unwrap();
    let t0 = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
            Ok(_) => break,
            Err(_) => panic!("still open after 5 s: {}", String::from_utf8_lossy(&got)),
        }
    }
    let waited = t0.elapsed().as_secs_f64();
    let text = String::from_utf8_lossy(&got);
    eprintln!(
        "stalled body: answered and closed after {waited:.2} s: {:?}",
        text.lines().next()
    );
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
    assert!((0.9..3.0).contains(&waited), "{waited}");
}
