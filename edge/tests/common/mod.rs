//! Edge test harness: a real `cascade_rtc::Server` on 127.0.0.1 (UDP port 0),
//! a registry fed by an in-process publisher writing real H.264 + Opus made by
//! ffmpeg (loadtest's test media, every video frame tagged with a sequence
//! number), and the edge router on 127.0.0.1:0. Viewers are loadtest's str0m
//! WHEP viewers.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)] // test harness: failures panic the test

pub mod ladder;
pub mod ome;
pub mod probe;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cascade_origin::catalog::{Catalog, Codec, TrackInfo};
use cascade_origin::frame::Frame;
use cascade_origin::Registry;
use loadtest::media::{Options, TestMedia};
use loadtest::tag::{self, Tag};
use tokio::task::JoinHandle;

/// Everything a test talks to.
pub struct Edge {
    pub registry: Arc<Registry>,
    pub rtc: cascade_rtc::Server,
    pub http: SocketAddr,
}

impl Edge {
    pub async fn start(cfg: cascade_edge::Config) -> Self {
        Self::start_with(cfg, 1000).await
    }

    pub async fn start_with(cfg: cascade_edge::Config, max_sessions: usize) -> Self {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
            .with_test_writer()
            .try_init();
        let registry = Registry::new();
        let rtc = cascade_rtc::Server::bind(cascade_rtc::Config {
            udp: SocketAddr::from(([127, 0, 0, 1], 0)),
            tcp: None,
            advertise: vec![IpAddr::V4(Ipv4Addr::LOCALHOST)],
            shards: 2,
            max_sessions,
            ..Default::default()
        })
        .await
        .unwrap();
        let app = cascade_edge::router(registry.clone(), rtc.clone(), cfg);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let http = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self {
            registry,
            rtc,
            http,
        }
    }

    pub fn whep_url(&self, stream: &str) -> String {
        format!("http://{}/whep/{stream}", self.http)
    }
}

/// Test media: 640×360 30 fps constrained baseline, a keyframe every
/// `gop_frames`, 20 ms Opus; cached on disk between runs.
pub async fn media(gop_frames: u32) -> Arc<TestMedia> {
    let m = tokio::time::timeout(
        Duration::from_secs(180),
        TestMedia::generate(Options {
            gop_frames,
            seconds: 6,
            video_kbps: 800,
            ..Default::default()
        }),
    )
    .await
    .expect("ffmpeg took too long")
    .expect("ffmpeg failed: install it with apt-get install -y ffmpeg");
    Arc::new(m)
}

pub fn catalog() -> Catalog {
    Catalog {
        tracks: vec![
            TrackInfo {
                name: "video".into(),
                codec: Codec::H264,
                fmtp: "profile-level-id=42e01f;packetization-mode=1".into(),
                channels: None,
                bframes: false,
                rendition: None,
            },
            TrackInfo {
                name: "audio".into(),
                codec: Codec::Opus,
                fmtp: "minptime=10;useinbandfec=1".into(),
                channels: Some(2),
                bframes: false,
                rendition: None,
            },
        ],
    }
}

/// An in-process publisher looping the clip in real time; dropping it ends
/// the stream (unless a newer publisher took it over).
pub struct Publisher {
    task: JoinHandle<()>,
    pub keyframe_requests: Arc<AtomicU64>,
    pub video_frames: Arc<AtomicU64>,
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Publisher {
    /// Publishes `name`, tagging video frames with sequence numbers from
    /// `seq_start`; timestamps start at 0 like a fresh encoder.
    pub fn start(
        registry: &Arc<Registry>,
        name: &str,
        media: Arc<TestMedia>,
        seq_start: u64,
    ) -> Self {
        Self::start_at(registry, name, media, seq_start, 0, false)
    }

    /// Like [`Publisher::start`] but from clip frame `first` (mid-GOP: no
    /// keyframe until the clip's next one); with `honour`, a keyframe request
    /// jumps to the clip's next keyframe, as an encoder would make one.
    pub fn start_at(
        registry: &Arc<Registry>,
        name: &str,
        media: Arc<TestMedia>,
        seq_start: u64,
        first: usize,
        honour: bool,
    ) -> Self {
        let mut publisher = registry.publish(name, catalog(), "test").unwrap();
        let keyframe_requests = Arc::new(AtomicU64::new(0));
        let video_frames = Arc::new(AtomicU64::new(0));
        let (kf, vf) = (keyframe_requests.clone(), video_frames.clone());
        let task = tokio::spawn(async move {
            let start = tokio::time::Instant::now();
            let (mut vi, mut ai, mut vloops, mut aloops) = (first, 0usize, 0u64, 0u64);
            // Clip pts of the first frame sent: the stream timeline starts at 0.
            let skew = media.video[first].pts_90k;
            let mut seq = seq_start;
            let mut jump = 0u64;
            loop {
                let vpts =
                    (vloops * media.duration_90k + media.video[vi].pts_90k).saturating_sub(skew);
                let apts = aloops * media.duration_48k + media.audio[ai].pts_48k;
                let vpts = vpts.saturating_sub(jump);
                let vdue = start + Duration::from_micros(vpts * 1_000_000 / 90_000);
                let adue = start + Duration::from_micros(apts * 1_000_000 / 48_000);
                let due = vdue.min(adue);
                tokio::select! {
                    _ = tokio::time::sleep_until(due) => {}
                    _ = async {
                        match publisher.track_mut("video") {
                            Some(p) => p.keyframe_requested().await,
                            None => std::future::pending().await,
                        }
                    } => {
                        kf.fetch_add(1, Ordering::Relaxed);
                        if honour {
                            // The next keyframe of the clip, sent at once: the
                            // clip's timeline jumps, the stream's does not.
                            let next = (1..media.video.len())
                                .map(|d| (vi + d) % media.video.len())
                                .find(|&i| media.video[i].keyframe)
                                .unwrap_or(vi);
                            let now_pts = vpts_of(&media, vi, vloops, skew);
                            let mut loops = vloops + u64::from(next < vi);
                            while vpts_of(&media, next, loops, skew) < now_pts {
                                loops += 1;
                            }
                            // Pretend the frames in between never existed.
                            jump += vpts_of(&media, next, loops, skew) - now_pts;
                            vi = next;
                            vloops = loops;
                        }
                        continue;
                    }
                }
                if vdue <= adue {
                    let f = &media.video[vi];
                    let au = tag::insert(
                        &f.annexb,
                        Tag {
                            seq,
                            sent_us: loadtest::wallclock_us(),
                        },
                    );
                    seq += 1;
                    let frame = Frame {
                        payload: Bytes::from(au),
                        pts: vpts,
                        dts: vpts,
                        keyframe: f.keyframe,
                        ingest_us: cascade_origin::wallclock_us(),
                    };
                    if publisher.track("video").unwrap().write(frame).is_err() {
                        return;
                    }
                    vf.fetch_add(1, Ordering::Relaxed);
                    vi += 1;
                    if vi == media.video.len() {
                        vi = 0;
                        vloops += 1;
                    }
                } else {
                    let f = &media.audio[ai];
                    let frame = Frame {
                        payload: f.packet.clone(),
                        pts: apts,
                        dts: apts,
                        keyframe: true,
                        ingest_us: cascade_origin::wallclock_us(),
                    };
                    if publisher.track("audio").unwrap().write(frame).is_err() {
                        return;
                    }
                    ai += 1;
                    if ai == media.audio.len() {
                        ai = 0;
                        aloops += 1;
                    }
                }
            }
        });
        Self {
            task,
            keyframe_requests,
            video_frames,
        }
    }
}

fn vpts_of(media: &TestMedia, index: usize, loops: u64, skew: u64) -> u64 {
    (loops * media.duration_90k + media.video[index].pts_90k).saturating_sub(skew)
}

/// Polls `f` until it holds or `limit` passes.
pub async fn eventually(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let until = Instant::now() + limit;
    while Instant::now() < until {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    f()
}

/// VP8, VP9 or AV1 test video (320×240, 30 fps, a keyframe every 30
/// frames, 3 s) made by ffmpeg (libvpx, libaom) as IVF, split into
/// (frame, keyframe) pairs.
pub async fn vpx_frames(codec: Codec) -> Vec<(Bytes, bool)> {
    let (name, encoder, tuning): (&str, &str, &[&str]) = match codec {
        Codec::Vp8 => (
            "vp8",
            "libvpx",
            &[
                "-deadline",
                "realtime",
                "-cpu-used",
                "8",
                "-auto-alt-ref",
                "0",
            ],
        ),
        Codec::Vp9 => (
            "vp9",
            "libvpx-vp9",
            &[
                "-deadline",
                "realtime",
                "-cpu-used",
                "8",
                "-auto-alt-ref",
                "0",
            ],
        ),
        _ => (
            "av1",
            "libaom-av1",
            &["-usage", "realtime", "-cpu-used", "8"],
        ),
    };
    let path = std::env::temp_dir().join(format!("cascade-edge-test-{name}.ivf"));
    if !path.exists() {
        let tmp = path.with_extension(format!("{}.tmp", std::process::id()));
        let status = tokio::time::timeout(
            Duration::from_secs(120),
            tokio::process::Command::new("ffmpeg")
                .args([
                    "-hide_banner",
                    "-loglevel",
                    "error",
                    "-y",
                    "-f",
                    "lavfi",
                    "-i",
                ])
                .arg("testsrc=size=320x240:rate=30")
                .args([
                    "-t",
                    "3",
                    "-c:v",
                    encoder,
                    "-g",
                    "30",
                    "-keyint_min",
                    "30",
                    "-b:v",
                    "400k",
                ])
                .args(tuning)
                .args(["-lag-in-frames", "0"])
                .args(["-f", "ivf"])
                .arg(&tmp)
                .status(),
        )
        .await
        .expect("ffmpeg took too long")
        .expect("ffmpeg missing: apt-get install -y ffmpeg");
        assert!(status.success(), "ffmpeg failed to encode {name}");
        std::fs::rename(&tmp, &path).unwrap();
    }
    let data = std::fs::read(&path).unwrap();
    let header = u16::from_le_bytes([data[6], data[7]]) as usize;
    let mut frames = Vec::new();
    let mut i = header;
    while i + 12 <= data.len() {
        let len = u32::from_le_bytes(data[i..i + 4].try_into().unwrap()) as usize;
        let frame = &data[i + 12..i + 12 + len];
        let keyframe = match codec {
            // RFC 6386 §9.1: bit 0 of the frame tag is the inverse key frame flag.
            Codec::Vp8 => frame[0] & 1 == 0,
            // VP9 uncompressed header (profile 0): frame_type bit after
            // frame_marker, profile and show_existing_frame.
            Codec::Vp9 => frame[0] & 0x0c == 0,
            // AV1: libaom repeats the sequence header on every keyframe.
            _ => av1_has_sequence_header(frame),
        };
        frames.push((Bytes::copy_from_slice(frame), keyframe));
        i += 12 + len;
    }
    frames
}

fn av1_has_sequence_header(mut tu: &[u8]) -> bool {
    while let Some(&h) = tu.first() {
        if (h >> 3) & 0x0f == 1 {
            return true;
        }
        let mut i = 1 + usize::from(h & 0x04 != 0);
        if h & 0x02 == 0 {
            return false;
        }
        let (mut size, mut shift) = (0usize, 0);
        loop {
            let Some(&b) = tu.get(i) else { return false };
            size |= usize::from(b & 0x7f) << shift;
            shift += 7;
            i += 1;
            if b & 0x80 == 0 {
                break;
            }
        }
        tu = tu.get(i + size..).unwrap_or_default();
    }
    false
}

/// Publishes a video-only stream looping `frames` at 30 fps.
pub fn publish_video(
    registry: &Arc<Registry>,
    name: &str,
    codec: Codec,
    frames: Vec<(Bytes, bool)>,
) -> JoinHandle<()> {
    let catalog = Catalog {
        tracks: vec![TrackInfo {
            name: "video".into(),
            codec,
            fmtp: String::new(),
            channels: None,
            bframes: false,
            rendition: None,
        }],
    };
    let publisher = registry.publish(name, catalog, "test").unwrap();
    tokio::spawn(async move {
        let start = tokio::time::Instant::now();
        for n in 0u64.. {
            let (payload, keyframe) = frames[(n as usize) % frames.len()].clone();
            tokio::time::sleep_until(start + Duration::from_micros(n * 33_333)).await;
            let frame = Frame {
                payload,
                pts: n * 3000,
                dts: n * 3000,
                keyframe,
                ingest_us: cascade_origin::wallclock_us(),
            };
            if publisher.track("video").unwrap().write(frame).is_err() {
                return;
            }
        }
    })
}
