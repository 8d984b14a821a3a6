//! A stream with three renditions for the rendition tests: 1280×720,
//! 640×360 and 320×180 H.264 made by ffmpeg with aligned keyframes (1 s
//! GOP) and Opus, published in real time; every video frame is tagged with
//! its rendition (`i × TAG_BASE + frame number`).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cascade_origin::catalog::{Catalog, Codec, Rendition, TrackInfo};
use cascade_origin::frame::Frame;
use cascade_origin::Registry;
use loadtest::media::{Options, TestMedia};
use loadtest::tag::{self, Tag};

/// The ladder: name, track, size; tags of rendition `i` start at `i × TAG_BASE`.
pub const LADDER: [(&str, &str, u32, u32); 3] = [
    ("f", "video", 1280, 720),
    ("h", "video-h", 640, 360),
    ("q", "video-q", 320, 180),
];
pub const TAG_BASE: u64 = 1_000_000;

pub async fn ladder_media() -> Vec<Arc<TestMedia>> {
    let mut out = Vec::new();
    for (_, _, width, height) in LADDER {
        let m = tokio::time::timeout(
            Duration::from_secs(300),
            TestMedia::generate(Options {
                width,
                height,
                gop_frames: 30,
                seconds: 4,
                video_kbps: width * 2,
                ..Default::default()
            }),
        )
        .await
        .expect("ffmpeg took too long")
        .expect("ffmpeg failed: install it with apt-get install -y ffmpeg");
        out.push(Arc::new(m));
    }
    out
}

pub fn catalog() -> Catalog {
    let mut tracks: Vec<TrackInfo> = LADDER
        .iter()
        .map(|(name, track, width, height)| TrackInfo {
            name: track.to_string(),
            codec: Codec::H264,
            fmtp: "profile-level-id=42e01f;packetization-mode=1".into(),
            channels: None,
            bframes: false,
            rendition: Some(Rendition {
                name: name.to_string(),
                width: *width,
                height: *height,
                bitrate_kbps: *width * 2,
                framerate: 30,
            }),
        })
        .collect();
    tracks.push(super::catalog().tracks[1].clone());
    Catalog { tracks }
}

/// Publishes the three renditions and audio in real time, frame `i` of
/// every rendition with the same pts (one encoder's simulcast).
pub fn publish(
    registry: &Arc<Registry>,
    name: &str,
    media: Vec<Arc<TestMedia>>,
) -> tokio::task::JoinHandle<()> {
    publish_with(registry, name, media, None)
}

/// The catalog of a simulcast publisher that went live with its lowest
/// layer only: the `video` track, marked as the rendition it is (`q`), as
/// the WHIP ingest does since session 15 (`whip::Track::assign`).
pub fn plain_catalog() -> Catalog {
    let mut tracks = vec![catalog_as_late().tracks[0].clone()];
    tracks.push(super::catalog().tracks[1].clone());
    Catalog { tracks }
}

/// The same publisher once its other layers came (the WHIP ingest's
/// `add_layer`): the plain track becomes rendition `q`, the others are
/// `video-f` and `video-h`.
pub fn catalog_as_late() -> Catalog {
    let mut c = catalog();
    for t in &mut c.tracks {
        match t.rendition.as_ref().map(|r| r.name.as_str()) {
            Some("f") => t.name = "video-f".into(),
            Some("q") => t.name = "video".into(),
            _ => {}
        }
    }
    c.tracks.sort_by_key(|t| t.name != "video");
    c
}

/// The track each rendition of [`LADDER`] is written to.
fn track_of(r: usize, late: bool) -> &'static str {
    match (late, r) {
        (false, _) => LADDER[r].1,
        (true, 0) => "video-f",
        (true, 1) => "video-h",
        (true, _) => "video",
    }
}

/// [`publish`], or with `late: Some(after)` a publisher that goes live
/// with only the lowest rendition as a plain `video` track and gains the
/// other two (as renditions) `after` later.
pub fn publish_with(
    registry: &Arc<Registry>,
    name: &str,
    media: Vec<Arc<TestMedia>>,
    late: Option<Duration>,
) -> tokio::task::JoinHandle<()> {
    let first_catalog = if late.is_some() {
        plain_catalog()
    } else {
        catalog()
    };
    let mut publisher = registry.publish(name, first_catalog, "test").unwrap();
    tokio::spawn(async move {
        let mut grown = late.is_none();
        let start = tokio::time::Instant::now();
        let first = &media[0];
        let (mut vi, mut ai, mut vloops, mut aloops) = (0usize, 0usize, 0u64, 0u64);
        let mut n = 0u64;
        loop {
            let vpts = vloops * first.duration_90k + first.video[vi].pts_90k;
            let apts = aloops * first.duration_48k + first.audio[ai].pts_48k;
            let vdue = start + Duration::from_micros(vpts * 1_000_000 / 90_000);
            let adue = start + Duration::from_micros(apts * 1_000_000 / 48_000);
            tokio::time::sleep_until(vdue.min(adue)).await;
            if let (false, Some(after)) = (grown, late) {
                if start.elapsed() >= after {
                    publisher.set_catalog(catalog_as_late());
                    grown = true;
                }
            }
            if vdue <= adue {
                for (r, m) in media.iter().enumerate() {
                    if !grown && r != 2 {
                        continue;
                    }
                    let track = track_of(r, late.is_some());
                    let f = &m.video[vi % m.video.len()];
                    let au = tag::insert(
                        &f.annexb,
                        Tag {
                            seq: r as u64 * TAG_BASE + n,
                            sent_us: loadtest::wallclock_us(),
                        },
                    );
                    let frame = Frame {
                        payload: Bytes::from(au),
                        pts: vpts,
                        dts: vpts,
                        keyframe: f.keyframe,
                        ingest_us: cascade_origin::wallclock_us(),
                    };
                    if publisher.track(track).unwrap().write(frame).is_err() {
                        return;
                    }
                    // Drain requests: the clip's GOP (1 s) answers them.
                    let _ = publisher.track_mut(track).unwrap().take_keyframe_request();
                }
                n += 1;
                vi += 1;
                if vi == first.video.len() {
                    vi = 0;
                    vloops += 1;
                }
            } else {
                let f = &first.audio[ai];
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
                if ai == first.audio.len() {
                    ai = 0;
                    aloops += 1;
                }
            }
        }
    })
}
