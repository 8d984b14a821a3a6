//! The load run behind the `loadtest` binary, as a library so tests drive the same code: viewers
//! on a ramp, progress each second, a CSV/SVG time series and the [`Summary`] (the `--json` line).
//!
//! Each viewer does a full WHEP exchange, ICE and DTLS. Every `--full-every`-th viewer then
//! decrypts, depacketizes and checks every frame (TTFF, latency, order); the others read only
//! the clear RTP headers (loss, jitter). One tokio task and one UDP socket per viewer for now.

use std::io::Write;
use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use serde::Serialize;
use tokio::task::JoinSet;

use crate::media::{self, Profile, TestMedia};
use crate::playing::{PlayWatch, Slot};
use crate::plot;
use crate::stats::percentile;
use crate::whep::{LiveCounters, Viewer, ViewerOptions, ViewerReport};
use crate::whip::{Publisher, PublisherOptions, PublisherReport};

/// Real WebRTC viewers for a cascade edge (or any WHEP server).
#[derive(Debug, Parser)]
#[command(version, about)]
pub struct Args {
    /// WHEP URL, e.g. http://127.0.0.1:8080/whep/live
    #[arg(long)]
    pub url: String,
    /// Number of viewers.
    #[arg(long, default_value_t = 10)]
    pub viewers: u32,
    /// How long to run after the first viewer starts (e.g. 30s, 2m).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Viewer joins per second, as `300` or `300/s` (0 = all at once).
    #[arg(long, default_value = "0", value_parser = parse_ramp)]
    pub ramp: f64,
    /// Every N-th viewer (from the first) fully decrypts and checks frames; the rest read
    /// RTP headers only. 1 = all full.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    pub full_every: u32,
    /// Viewers use ICE-TCP only (as behind a UDP-blocking network).
    #[arg(long)]
    pub tcp: bool,
    /// Viewer token (Authorization: Bearer).
    #[arg(long)]
    pub token: Option<String>,
    /// Local IP for the viewers' UDP sockets.
    #[arg(long, default_value = "127.0.0.1")]
    pub bind: IpAddr,
    /// Print one JSON summary object as the last stdout line.
    #[arg(long)]
    pub json: bool,
    /// Write a per-second CSV time series to this file.
    #[arg(long)]
    pub csv: Option<std::path::PathBuf>,
    /// Also publish the test clip to this WHIP URL first (and DELETE it at the end), so the
    /// stream exists without an external encoder.
    #[arg(long)]
    pub publish: Option<String>,
    /// Publish token for `--publish`.
    #[arg(long)]
    pub publish_token: Option<String>,
    /// H.264 profile of the published clip: baseline, main or high.
    #[arg(long, default_value = "baseline", value_parser = parse_profile)]
    pub profile: Profile,
    /// Video bitrate of the published clip, kbit/s.
    #[arg(long, default_value_t = 2500)]
    pub video_kbps: u32,
    /// GOP length of the published clip, frames (30 fps).
    #[arg(long, default_value_t = 30)]
    pub gop: u32,
    /// Publish the clip without the per-frame SEI tag (`--publish` only). Viewers then
    /// measure no latency and no tag gaps; the server carries what a real encoder sends
    /// (x264 writes its SEI once), one small RTP packet per frame fewer than tagged.
    #[arg(long)]
    pub no_tag: bool,
    /// Watch this Janus streaming mountpoint: `--url` is then Janus's HTTP API
    /// (`http://HOST:8088/janus`), for side-by-side runs against Janus.
    #[arg(long)]
    pub janus_mountpoint: Option<u64>,
    /// Also send the test clip as plain tagged RTP to `VIDEO_ADDR,AUDIO_ADDR` (H.264 PT 96,
    /// Opus PT 111) for the whole run: feeds a Janus streaming mountpoint like `--publish`
    /// feeds cascade, so both report the same latency.
    #[arg(long, value_delimiter = ',')]
    pub rtp_feed: Vec<std::net::SocketAddr>,
    /// Plot the time series (viewers, packets/s, lost) as SVG to this file.
    #[arg(long)]
    pub svg: Option<std::path::PathBuf>,
    /// Per-viewer receive caps, assigned round-robin: `400k,1500k,none` (bit/s with k/M,
    /// or `none`). Each capped viewer queues what it receives behind a tbf-like bottleneck
    /// in the client and drops what overflows it ([`crate::shaper`]); capped viewers
    /// always check frames fully (the server's estimator needs their transport feedback)
    /// and the summary's `caps` lists each one's cap and the picture size it settled on.
    #[arg(long, value_delimiter = ',', value_parser = parse_viewer_cap)]
    pub viewer_caps: Vec<ViewerCap>,
    /// Viewers DELETE their session when the run ends, as a player leaving its page does,
    /// so the server frees it at once instead of at its ICE timeout (the soak run's churn).
    #[arg(long)]
    pub delete: bool,
}

/// One `--viewer-caps` entry: bit/s, or `None` for an uncapped viewer in the mix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ViewerCap(pub Option<u64>);

fn parse_viewer_cap(s: &str) -> Result<ViewerCap, String> {
    crate::shaper::parse_cap(s).map(ViewerCap)
}

/// One viewer of a `--viewer-caps` run: where it settled.
#[derive(Debug, Serialize)]
pub struct CappedViewer {
    /// Its cap, bit/s (`null`: uncapped).
    pub cap_bps: Option<u64>,
    /// Connected at all.
    pub connected: bool,
    /// Picture size of its last keyframe (`WxH`): the rendition it settled on.
    pub video_size: Option<String>,
    /// When it started receiving that size, seconds after its POST.
    pub settled_s: Option<f64>,
    /// Picture size changes it saw (rendition switches).
    pub switches: u64,
    /// Video frames received.
    pub video_frames: u64,
    /// Datagrams its cap dropped.
    pub cap_dropped: u64,
    /// RTP packets lost (sequence gaps).
    pub packets_lost: u64,
}

/// The final summary (the `--json` line): the field names are the JSON keys.
#[derive(Debug, Serialize)]
pub struct Summary {
    /// Viewers asked for (`--viewers`).
    pub viewers_requested: u32,
    /// Viewers whose ICE and DTLS completed.
    pub viewers_connected: u64,
    /// Viewers that failed to start or never connected.
    pub viewers_failed: u64,
    /// Connected viewers that fully decrypted and checked frames.
    pub viewers_full: u64,
    /// RTP packets received by all viewers.
    pub packets_received: u64,
    /// RTP packets missing from the sequence numbers (all viewers).
    pub packets_lost: u64,
    /// `packets_lost` as a percentage of packets expected.
    pub loss_pct: f64,
    /// Video frames received (full viewers).
    pub video_frames: u64,
    /// Audio frames received (full viewers).
    pub audio_frames: u64,
    /// Share of full viewers whose first video frame was a keyframe.
    pub first_frame_keyframe_pct: f64,
    /// Viewers that saw a gap in the publisher's frame tags.
    pub viewers_with_seq_gaps: u64,
    /// Time to first frame (WHEP POST to first complete frame), median.
    pub ttff_ms_p50: Option<f64>,
    /// Time to first frame, 95th percentile.
    pub ttff_ms_p95: Option<f64>,
    /// Publisher send to viewer arrival (SEI wall clock tag), median.
    pub latency_ms_p50: Option<f64>,
    /// Publisher send to viewer arrival, 99th percentile.
    pub latency_ms_p99: Option<f64>,
    /// Like `latency_ms_p50`, live frames only: frames sent after the viewer's POST (a
    /// fast-start backlog excluded).
    pub latency_live_ms_p50: Option<f64>,
    /// Like `latency_ms_p99`, live frames only.
    pub latency_live_ms_p99: Option<f64>,
    /// Largest audio/video drift seen by a full viewer.
    pub av_drift_ms_max: Option<f64>,
    /// Video interarrival jitter (RFC 3550), median over viewers.
    pub jitter_ms_p50: Option<f64>,
    /// Video interarrival jitter, 95th percentile over viewers.
    pub jitter_ms_p95: Option<f64>,
    /// WHEP POST to first RTP packet, median.
    pub first_packet_ms_p50: Option<f64>,
    /// Wall time of the run.
    pub duration_s: f64,
    /// Distinct error messages (at most ten).
    pub errors: Vec<String>,
    /// Video frames our publisher sent (`--publish`).
    pub publisher_video_frames: Option<u64>,
    /// Keyframe requests our publisher received (`--publish`).
    pub publisher_keyframe_requests: Option<u64>,
    /// Viewers that received video in the last whole second (tick) before the run's end.
    pub viewers_playing_at_end: u64,
    /// Stall episodes: a viewer that had played received no video frame for a whole
    /// second ([`crate::playing`]).
    pub stalls: u64,
    /// `--viewer-caps` only: each viewer's cap and the rendition it settled on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub caps: Option<Vec<CappedViewer>>,
}

/// A join rate: a number of joins per second, optionally written with its unit (`300/s`).
fn parse_ramp(s: &str) -> Result<f64, String> {
    let n = s.trim().strip_suffix("/s").unwrap_or(s.trim());
    match n.parse::<f64>() {
        Ok(r) if r.is_finite() && r >= 0.0 => Ok(r),
        _ => Err(format!(
            "invalid join rate {s:?}: joins per second, e.g. 300 or 300/s"
        )),
    }
}

fn parse_profile(s: &str) -> Result<Profile, String> {
    match s {
        "baseline" | "constrained-baseline" => Ok(Profile::ConstrainedBaseline),
        "main" => Ok(Profile::Main),
        "high" => Ok(Profile::High),
        _ => Err(format!("unknown profile {s:?} (baseline, main, high)")),
    }
}

/// How long the RTP feed runs before the viewers start, so the mountpoint has media.
const FEED_LEAD: Duration = Duration::from_secs(2);

/// Generate the clip and start sending it as plain RTP for the run (plus the lead-in).
async fn start_feed(
    args: &Args,
    video: std::net::SocketAddr,
    audio: std::net::SocketAddr,
) -> anyhow::Result<tokio::task::JoinHandle<crate::Result<u64>>> {
    let clip = TestMedia::generate(clip_options(args))
        .await
        .context("generate test media")?;
    let o = crate::rtpfeed::FeedOptions {
        video,
        audio,
        video_pt: 96,
        audio_pt: 111,
        duration: args.duration + FEED_LEAD + Duration::from_secs(5),
    };
    let task = tokio::spawn(crate::rtpfeed::run(Arc::new(clip), o));
    tokio::time::sleep(FEED_LEAD).await;
    eprintln!("feeding RTP to {video} and {audio}");
    Ok(task)
}

fn clip_options(args: &Args) -> media::Options {
    media::Options {
        profile: args.profile,
        gop_frames: args.gop,
        video_kbps: args.video_kbps,
        seconds: 10,
        ..media::Options::default()
    }
}

/// Generate the clip and publish it; returns once media flows.
async fn start_publisher(args: &Args, url: &str) -> anyhow::Result<Publisher> {
    let clip = TestMedia::generate(clip_options(args))
        .await
        .context("generate test media")?;
    let mut p = PublisherOptions::new(url);
    p.token.clone_from(&args.publish_token);
    p.bind = args.bind;
    p.tag = !args.no_tag;
    let mut publisher = Publisher::start(p, Arc::new(clip))
        .await
        .context("publish")?;
    publisher
        .wait_connected()
        .await
        .context("publisher connect")?;
    eprintln!("publishing to {url}");
    Ok(publisher)
}

/// Distinct error messages kept for the summary (they repeat across viewers).
const MAX_ERRORS: usize = 10;

/// Runs the load: publishes first when asked, starts the viewers on their ramp, prints progress
/// to stderr each second and returns the summary.
pub async fn run(args: &Args) -> anyhow::Result<Summary> {
    let publisher = match &args.publish {
        Some(url) => Some(start_publisher(args, url).await?),
        None => None,
    };
    let feed = match args.rtp_feed.as_slice() {
        [video, audio] => Some(start_feed(args, *video, *audio).await?),
        [] => None,
        _ => anyhow::bail!("--rtp-feed takes VIDEO_ADDR,AUDIO_ADDR"),
    };
    let live = Arc::new(LiveCounters::default());
    let start = Instant::now();
    let end = start + args.duration;
    let mut csv = match &args.csv {
        Some(p) => {
            let mut f = std::fs::File::create(p).with_context(|| format!("create {p:?}"))?;
            writeln!(
                f,
                "t_s,connected,failed,packets_received,packets_lost,video_frames,audio_frames,playing,stalls"
            )?;
            Some(f)
        }
        None => None,
    };
    // Viewers start on their ramp slot and stop at `end`; each returns its report.
    let mut tasks: JoinSet<crate::Result<ViewerReport>> = JoinSet::new();
    let slots: Vec<Arc<Slot>> = (0..args.viewers)
        .map(|_| Arc::new(Slot::default()))
        .collect();
    for (i, slot) in (0..args.viewers).zip(slots.iter().cloned()) {
        let at = if args.ramp > 0.0 {
            start + Duration::from_secs_f64(f64::from(i) / args.ramp)
        } else {
            start
        };
        let mut opts = ViewerOptions::new(args.url.clone());
        opts.token.clone_from(&args.token);
        opts.bind = args.bind;
        opts.live = Some(Arc::clone(&live));
        opts.headers_only = i % args.full_every != 0;
        if !args.viewer_caps.is_empty() {
            let slot = i as usize % args.viewer_caps.len();
            let cap = args.viewer_caps.get(slot).and_then(|c| c.0);
            opts.cap_bps = cap;
            opts.headers_only &= cap.is_none();
        }
        opts.janus_mountpoint = args.janus_mountpoint;
        if args.tcp {
            opts.transport = crate::whep::Transport::Tcp;
        }
        let live = Arc::clone(&live);
        // Our own publisher may take a moment to make the stream live: retry 404 until then.
        let wait_live = args.publish.is_some().then(|| start + WAIT_LIVE);
        let delete = args.delete;
        tasks.spawn(async move {
            tokio::time::sleep_until(at.into()).await;
            if Instant::now() >= end {
                return Err(crate::Error::Timeout("run ended before this viewer's slot"));
            }
            let viewer = match start_viewer(opts, wait_live).await {
                Ok(v) => v,
                Err(e) => {
                    live.failed.fetch_add(1, Ordering::Relaxed);
                    return Err(e);
                }
            };
            // The session ends by itself only on error or disconnect; otherwise stop at `end`.
            slot.live.store(true, Ordering::Relaxed);
            watch_until(&viewer, &slot, end).await;
            slot.live.store(false, Ordering::Relaxed);
            if delete {
                viewer.delete().await.map(|(_, report)| report)
            } else {
                viewer.stop().await
            }
        });
    }
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    let mut prev_packets = 0;
    let mut series: [Vec<(f64, f64)>; 3] = Default::default();
    let mut watch = PlayWatch::new(slots.len());
    let mut playing_at_end = 0;
    while Instant::now() < end {
        tick.tick().await;
        let t = start.elapsed().as_secs_f64();
        let s = snapshot(&live);
        let samples: Vec<(bool, u64)> = slots.iter().map(|s| s.sample()).collect();
        let playing = watch.tick(&samples);
        // Viewers stop at `end`: a tick racing their stop would count them as not playing.
        if Instant::now() + Duration::from_secs(1) <= end {
            playing_at_end = playing;
        }
        let stalls = watch.stalls();
        eprintln!(
            "t={t:>5.1}s connected={} failed={} packets={} (+{}/s) lost={} video_frames={} audio_frames={} playing={playing} stalls={stalls}",
            s[0], s[1], s[2], s[2] - prev_packets, s[3], s[4], s[5]
        );
        series[0].push((t, s[0] as f64));
        series[1].push((t, (s[2] - prev_packets) as f64));
        series[2].push((t, s[3] as f64));
        prev_packets = s[2];
        if let Some(f) = csv.as_mut() {
            writeln!(
                f,
                "{t:.1},{},{},{},{},{},{},{playing},{stalls}",
                s[0], s[1], s[2], s[3], s[4], s[5]
            )?;
        }
    }
    if let Some(p) = &args.svg {
        let [viewers, rate, lost] = series;
        let svg = plot::svg(
            &format!("loadtest {} viewers: {}", args.viewers, args.url),
            &[
                plot::Series {
                    name: "viewers connected",
                    points: viewers,
                },
                plot::Series {
                    name: "packets received / s",
                    points: rate,
                },
                plot::Series {
                    name: "packets lost (total)",
                    points: lost,
                },
            ],
        );
        std::fs::write(p, svg).with_context(|| format!("write {p:?}"))?;
    }
    let mut reports = Vec::new();
    let mut errors: Vec<String> = Vec::new();
    let mut failed = 0u64;
    // Every viewer stops within a few seconds of `end`; bound the collection anyway.
    let collect = async {
        while let Some(r) = tasks.join_next().await {
            match r {
                Ok(Ok(rep)) => reports.push(rep),
                Ok(Err(e)) => {
                    failed += 1;
                    let msg = e.to_string();
                    if errors.len() < MAX_ERRORS && !errors.contains(&msg) {
                        errors.push(msg);
                    }
                }
                Err(e) => {
                    failed += 1;
                    if errors.len() < MAX_ERRORS {
                        errors.push(format!("task: {e}"));
                    }
                }
            }
        }
    };
    if tokio::time::timeout(Duration::from_secs(30), collect)
        .await
        .is_err()
    {
        errors.push("some viewers did not stop in 30 s".into());
    }
    let elapsed = start.elapsed();
    if let Some(f) = feed {
        f.abort();
    }
    let published = match publisher {
        Some(p) => match p.delete().await {
            Ok((_, r)) => Some(r),
            Err(e) => {
                errors.push(format!("publisher: {e}"));
                None
            }
        },
        None => None,
    };
    let mut summary = summarize(args, &reports, failed, errors, elapsed, published);
    summary.viewers_playing_at_end = playing_at_end;
    summary.stalls = watch.stalls();
    Ok(summary)
}

/// How long viewers retry `404` after the run starts when we publish ourselves.
const WAIT_LIVE: Duration = Duration::from_secs(5);
/// Pause between those retries.
const RETRY_PAUSE: Duration = Duration::from_millis(100);

async fn start_viewer(opts: ViewerOptions, wait_live: Option<Instant>) -> crate::Result<Viewer> {
    loop {
        match Viewer::start(opts.clone()).await {
            Err(crate::Error::Status { status: 404, .. })
                if wait_live.is_some_and(|t| Instant::now() < t) =>
            {
                tokio::time::sleep(RETRY_PAUSE).await;
            }
            r => return r,
        }
    }
}

/// Until `end` or the session ends by itself, copying its video frame count into `slot`
/// for the once-a-second [`PlayWatch`].
async fn watch_until(v: &Viewer, slot: &Slot, end: Instant) {
    while !v.is_finished() && Instant::now() < end {
        slot.frames.store(v.video_frames(), Ordering::Relaxed);
        let pause = end
            .saturating_duration_since(Instant::now())
            .min(Duration::from_millis(200));
        tokio::time::sleep(pause).await;
    }
}

fn snapshot(l: &LiveCounters) -> [u64; 6] {
    [
        l.connected.load(Ordering::Relaxed),
        l.failed.load(Ordering::Relaxed),
        l.packets_received.load(Ordering::Relaxed),
        l.packets_lost.load(Ordering::Relaxed),
        l.video_frames.load(Ordering::Relaxed),
        l.audio_frames.load(Ordering::Relaxed),
    ]
}

fn summarize(
    args: &Args,
    reports: &[ViewerReport],
    failed: u64,
    errors: Vec<String>,
    elapsed: Duration,
    published: Option<PublisherReport>,
) -> Summary {
    let connected: Vec<&ViewerReport> = reports.iter().filter(|r| r.connected).collect();
    let sum = |f: fn(&ViewerReport) -> u64| reports.iter().map(f).sum::<u64>();
    let packets_received = sum(|r| r.packets_received);
    let packets_lost = sum(|r| r.packets_lost);
    let ttff: Vec<f64> = reports.iter().filter_map(|r| r.ttff_ms).collect();
    let jitter: Vec<f64> = reports.iter().filter_map(|r| r.video_jitter_ms).collect();
    let first_packet: Vec<f64> = reports.iter().filter_map(|r| r.first_packet_ms).collect();
    let latency: Vec<f64> = reports
        .iter()
        .flat_map(|r| r.latency_samples_ms.iter().copied())
        .collect();
    let live_latency: Vec<f64> = reports
        .iter()
        .flat_map(|r| r.live_latency_samples_ms.iter().copied())
        .collect();
    let with_video: Vec<&&ViewerReport> = connected
        .iter()
        .filter(|r| r.first_frame_keyframe.is_some())
        .collect();
    let key_first = with_video
        .iter()
        .filter(|r| r.first_frame_keyframe == Some(true))
        .count();
    let total = packets_received + packets_lost;
    Summary {
        viewers_requested: args.viewers,
        viewers_connected: connected.len() as u64,
        viewers_failed: failed + (reports.len() - connected.len()) as u64,
        viewers_full: connected.iter().filter(|r| !r.headers_only).count() as u64,
        packets_received,
        packets_lost,
        loss_pct: if total == 0 {
            0.0
        } else {
            packets_lost as f64 * 100.0 / total as f64
        },
        video_frames: sum(|r| r.video_frames),
        audio_frames: sum(|r| r.audio_frames),
        first_frame_keyframe_pct: if with_video.is_empty() {
            0.0
        } else {
            key_first as f64 * 100.0 / with_video.len() as f64
        },
        viewers_with_seq_gaps: reports.iter().filter(|r| !r.seq_gaps.is_empty()).count() as u64,
        ttff_ms_p50: percentile(&ttff, 50.0),
        ttff_ms_p95: percentile(&ttff, 95.0),
        latency_ms_p50: percentile(&latency, 50.0),
        latency_ms_p99: percentile(&latency, 99.0),
        latency_live_ms_p50: percentile(&live_latency, 50.0),
        latency_live_ms_p99: percentile(&live_latency, 99.0),
        av_drift_ms_max: reports
            .iter()
            .filter_map(|r| r.av_drift_ms.map(f64::abs))
            .max_by(f64::total_cmp),
        jitter_ms_p50: percentile(&jitter, 50.0),
        jitter_ms_p95: percentile(&jitter, 95.0),
        first_packet_ms_p50: percentile(&first_packet, 50.0),
        duration_s: elapsed.as_secs_f64(),
        errors,
        publisher_video_frames: published.as_ref().map(|p| p.video_frames),
        publisher_keyframe_requests: published.as_ref().map(|p| p.keyframe_requests),
        viewers_playing_at_end: 0,
        stalls: 0,
        caps: (!args.viewer_caps.is_empty()).then(|| {
            reports
                .iter()
                .map(|r| CappedViewer {
                    cap_bps: r.cap_bps,
                    connected: r.connected,
                    video_size: r.video_size.clone(),
                    settled_s: r.size_since_ms.map(|ms| ms / 1000.0),
                    switches: r.size_changes,
                    video_frames: r.video_frames,
                    cap_dropped: r.cap_dropped,
                    packets_lost: r.packets_lost,
                })
                .collect()
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ramp_takes_a_rate_with_or_without_its_unit() {
        assert_eq!(parse_ramp("300"), Ok(300.0));
        assert_eq!(parse_ramp("300/s"), Ok(300.0));
        assert_eq!(parse_ramp("2.5/s"), Ok(2.5));
        assert_eq!(parse_ramp("0"), Ok(0.0));
        for bad in ["", "/s", "-1", "fast", "NaN", "inf/s", "300/m"] {
            assert!(parse_ramp(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn viewer_caps_parse_as_a_round_robin_list() {
        let a = Args::try_parse_from([
            "loadtest",
            "--url",
            "http://x/whep/s",
            "--viewer-caps",
            "400k,1500k,none",
        ])
        .unwrap();
        assert_eq!(
            a.viewer_caps,
            [
                ViewerCap(Some(400_000)),
                ViewerCap(Some(1_500_000)),
                ViewerCap(None)
            ]
        );
        let plain = Args::try_parse_from(["loadtest", "--url", "http://x/whep/s"]).unwrap();
        assert!(plain.viewer_caps.is_empty());
        assert!(Args::try_parse_from(["loadtest", "--url", "u", "--viewer-caps", "fast"]).is_err());
    }
}
