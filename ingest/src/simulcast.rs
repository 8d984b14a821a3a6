//! The layers of a simulcast WHIP publisher (Chromium/Firefox
//! `sendEncodings`, OBS 32.1's simulcast option) become the renditions of
//! the stream: every layer (rid) is its own video track. This core decides,
//! once, at go-live, which layers there are, which one is the default
//! `video` track (the largest picture) and what each rendition's catalog
//! entry says (size from its keyframes, bitrate and frame rate measured
//! while waiting).
//!
//! Sans-IO: frames of each rid go in with `now`; [`Layers::ready`] says
//! when every expected layer has shown a keyframe; [`Layers::renditions`]
//! ranks them. Layers that show up after go-live are not published (a
//! catalog change would re-publish the stream under its viewers). Which
//! layer a viewer gets, and falling back when a layer goes silent, is the
//! edge's business (`edge/src/viewer/switch.rs`).

use std::time::{Duration, Instant};

use cascade_origin::catalog::{rendition_track, Rendition, VIDEO};

/// Most layers of one track (RFC 8853 allows more; encoders send ≤ 3–4).
/// Each is a track; with audio this stays under the relay's 16 tracks.
pub(crate) const MAX_LAYERS: usize = 8;
/// Shortest measurement a bitrate or frame rate is reported from: over less
/// the figure is noise (a keyframe alone is a big share of it).
const MIN_MEASURE: Duration = Duration::from_millis(300);

/// One layer (rid) as seen so far.
#[derive(Debug)]
struct Layer {
    rid: String,
    /// Width × height of its latest keyframe.
    size: Option<(u32, u32)>,
    keyframe: bool,
    first: Instant,
    last: Instant,
    frames: u64,
    bytes: u64,
}

impl Layer {
    fn area(&self) -> Option<u64> {
        self.size.map(|(w, h)| u64::from(w) * u64::from(h))
    }

    fn span(&self) -> Duration {
        self.last.saturating_duration_since(self.first)
    }

    fn bitrate_kbps(&self) -> u32 {
        let span = self.span();
        if span < MIN_MEASURE {
            return 0;
        }
        let kbps = u128::from(self.bytes) * 8 * 1000 / span.as_millis().max(1) / 1000;
        u32::try_from(kbps).unwrap_or(u32::MAX)
    }

    fn framerate(&self) -> u32 {
        let span = self.span();
        if span < MIN_MEASURE || self.frames < 2 {
            return 0;
        }
        // Frames after the first over the time they took, rounded.
        let fps = (u128::from(self.frames - 1) * 1000 + span.as_millis() / 2) / span.as_millis();
        u32::try_from(fps).unwrap_or(0)
    }
}

/// One layer's place in the published stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Published {
    /// The layer's rid.
    pub(crate) rid: String,
    /// Its track: [`VIDEO`] for the best, `video-<rid>` for the others.
    pub(crate) track: String,
    /// Its catalog entry.
    pub(crate) rendition: Rendition,
}

/// The layers of one simulcast video m-line, until go-live.
#[derive(Debug, Default)]
pub(crate) struct Layers {
    layers: Vec<Layer>,
}

impl Layers {
    /// A frame of layer `rid`; `size` when it is a keyframe whose header
    /// says. False when the layer is one too many (not stored).
    pub(crate) fn on_frame(
        &mut self,
        now: Instant,
        rid: &str,
        keyframe: bool,
        size: Option<(u32, u32)>,
        bytes: usize,
    ) -> bool {
        let i = match self.layers.iter().position(|l| l.rid == rid) {
            Some(i) => i,
            None if self.layers.len() < MAX_LAYERS => {
                self.layers.push(Layer {
                    rid: rid.to_string(),
                    size: None,
                    keyframe: false,
                    first: now,
                    last: now,
                    frames: 0,
                    bytes: 0,
                });
                self.layers.len() - 1
            }
            None => return false,
        };
        let Some(l) = self.layers.get_mut(i) else {
            return false;
        };
        l.last = now;
        l.frames += 1;
        l.bytes += bytes as u64;
        l.keyframe |= keyframe;
        if size.is_some() {
            l.size = size;
        }
        true
    }

    /// True once `expected` layers (the offer's send rids) each sent a
    /// keyframe.
    pub(crate) fn ready(&self, expected: usize) -> bool {
        self.layers.len() >= expected.max(1) && self.layers.iter().all(|l| l.keyframe)
    }

    /// The published layers, best first: the largest picture (by bitrate
    /// against or between layers of unknown size) is the default [`VIDEO`]
    /// track. Empty before the first frame.
    pub(crate) fn renditions(&self) -> Vec<Published> {
        let mut order: Vec<&Layer> = self.layers.iter().collect();
        order.sort_by(|a, b| rank(b).cmp(&rank(a)).then_with(|| a.rid.cmp(&b.rid)));
        order
            .into_iter()
            .enumerate()
            .map(|(i, l)| {
                let (width, height) = l.size.unwrap_or((0, 0));
                Published {
                    rid: l.rid.clone(),
                    track: if i == 0 {
                        VIDEO.to_string()
                    } else {
                        rendition_track(&l.rid)
                    },
                    rendition: Rendition {
                        name: l.rid.clone(),
                        width,
                        height,
                        bitrate_kbps: l.bitrate_kbps(),
                        framerate: l.framerate(),
                    },
                }
            })
            .collect()
    }
}

/// Sort key: picture area, then bitrate (a layer of known size ranks above
/// one of unknown size only by area when both are known).
fn rank(l: &Layer) -> (u64, u64) {
    (l.area().unwrap_or(0), u64::from(l.bitrate_kbps()))
}

/// The send rids of an offer's simulcast video m-lines, in offer order:
/// `a=rid:<id> send` (RFC 8851). At most [`MAX_LAYERS`].
pub(crate) fn offered_rids(offer: &str) -> Vec<String> {
    let mut video = false;
    let mut out = Vec::new();
    for line in offer.lines() {
        let line = line.trim_end();
        if let Some(m) = line.strip_prefix("m=") {
            video = m.starts_with("video");
            continue;
        }
        let Some(rest) = line.strip_prefix("a=rid:").filter(|_| video) else {
            continue;
        };
        let mut words = rest.split_whitespace();
        if let (Some(id), Some("send")) = (words.next(), words.next()) {
            if out.len() < MAX_LAYERS && !out.iter().any(|r| r == id) {
                out.push(id.to_string());
            }
        }
    }
    out
}

/// How long a live layer's bitrate and frame rate are measured over.
pub(crate) const RATE_WINDOW: Duration = Duration::from_secs(2);
/// Catalog updates with live rates are at least this far apart: each one
/// reaches every edge and viewer of the stream.
pub(crate) const RATE_UPDATE_INTERVAL: Duration = Duration::from_secs(5);
/// A layer's first windows are not reported: an encoder is still ramping
/// it up (Chromium starts its layers low and raises them as its own
/// estimate grows: a 360p layer measured under 345 kbit/s 2–4 s after
/// go-live settled at 510, a 720p one at 1.26 Mbit/s settled at 2.2).
/// Until it is measured the edge prices a layer from its picture size
/// (0.1 bit per pixel per frame: 0.69 Mbit/s for 360p at 30 fps), closer
/// to where it ends than a ramp's first seconds; priced at the ramp, viewers
/// behind 0.4 and 1.5 Mbit/s links went up to the layer that would not fit
/// them seconds later (tests/browser_abr.rs, session 16).
pub(crate) const RAMP_WINDOWS: u32 = 3;
/// A rendition's catalog bitrate is updated when its live rate differs
/// from it by more than this share (encoders wobble ±10–20% per window).
const RATE_CHANGE: f64 = 0.25;

/// One rendition's measurement.
#[derive(Debug)]
struct Meter {
    track: String,
    /// The current window: its start, frames and bytes.
    since: Instant,
    frames: u64,
    bytes: u64,
    /// The last complete window's (kbit/s, fps).
    last: Option<(u32, u32)>,
    /// Complete windows so far (saturating): reported from
    /// [`RAMP_WINDOWS`] on.
    windows: u32,
}

/// Live rates of the published renditions of one stream. The go-live
/// measurement is a few hundred milliseconds of layers that are still
/// ramping up (Chromium starts its layers low and raises them as its
/// estimate grows), often nothing at all; the edge's automatic choice
/// prices each rendition by its catalog bitrate, and a guess from the
/// picture size is far off a real encoder's (2.8 Mbit/s guessed for a
/// 720p layer sent at 1.1–2.7). So the ingest keeps measuring, and the
/// catalog follows when a rate moved by more than [`RATE_CHANGE`], at most
/// every [`RATE_UPDATE_INTERVAL`].
#[derive(Debug, Default)]
pub(crate) struct LiveRates {
    tracks: Vec<Meter>,
    last_update: Option<Instant>,
    last_check: Option<Instant>,
}

impl LiveRates {
    /// True at most once per [`RATE_WINDOW`]: when [`LiveRates::update`]
    /// is worth building a catalog for.
    pub(crate) fn due(&mut self, now: Instant) -> bool {
        let first = *self.last_check.get_or_insert(now);
        if now.saturating_duration_since(first) < RATE_WINDOW {
            return false;
        }
        self.last_check = Some(now);
        true
    }

    /// A frame of `track` (a rendition), `bytes` long, arrived at `now`.
    pub(crate) fn on_frame(&mut self, now: Instant, track: &str, bytes: usize) {
        let i = match self.tracks.iter().position(|t| t.track == track) {
            Some(i) => i,
            None => {
                if self.tracks.len() >= MAX_LAYERS * 2 {
                    return;
                }
                self.tracks.push(Meter {
                    track: track.to_string(),
                    since: now,
                    frames: 0,
                    bytes: 0,
                    last: None,
                    windows: 0,
                });
                self.tracks.len() - 1
            }
        };
        let t = &mut self.tracks[i];
        let span = now.saturating_duration_since(t.since);
        if span >= RATE_WINDOW {
            let ms = span.as_millis().max(1);
            let kbps = u128::from(t.bytes) * 8 / ms;
            let fps = (u128::from(t.frames) * 1000 + ms / 2) / ms;
            t.last = Some((
                u32::try_from(kbps).unwrap_or(u32::MAX),
                u32::try_from(fps).unwrap_or(0),
            ));
            (t.since, t.frames, t.bytes) = (now, 0, 0);
            t.windows = t.windows.saturating_add(1);
        }
        t.frames += 1;
        t.bytes += bytes as u64;
    }

    /// The renditions of `catalog` with their live rates, when one moved
    /// enough and an update is due; `None` otherwise. Names and order are
    /// kept: only `bitrate_kbps` and `framerate` change.
    pub(crate) fn update(
        &mut self,
        now: Instant,
        catalog: &cascade_origin::catalog::Catalog,
    ) -> Option<cascade_origin::catalog::Catalog> {
        if self
            .last_update
            .is_some_and(|t| now.saturating_duration_since(t) < RATE_UPDATE_INTERVAL)
        {
            return None;
        }
        let live = |name: &str| {
            self.tracks
                .iter()
                .find(|t| t.track == name)
                .filter(|t| t.windows >= RAMP_WINDOWS)
                .and_then(|t| t.last)
                .filter(|(kbps, _)| *kbps > 0)
        };
        let moved = catalog
            .tracks
            .iter()
            .any(|t| match (&t.rendition, live(&t.name)) {
                (Some(r), Some((kbps, _))) => {
                    let old = f64::from(r.bitrate_kbps);
                    old == 0.0 || (f64::from(kbps) - old).abs() > old * RATE_CHANGE
                }
                _ => false,
            });
        if !moved {
            return None;
        }
        self.last_update = Some(now);
        let mut next = catalog.clone();
        for t in &mut next.tracks {
            if let (Some(r), Some((kbps, fps))) = (&mut t.rendition, live(&t.name)) {
                r.bitrate_kbps = kbps;
                if fps > 0 {
                    r.framerate = fps;
                }
            }
        }
        Some(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const FRAME: Duration = Duration::from_millis(33);

    /// `n` pictures of `rids` from `t`, keyframes every `gop`; bytes by area.
    fn feed(l: &mut Layers, t: &mut Instant, n: u32, gop: u32, rids: &[(&str, u32, u32)]) {
        for k in 0..n {
            for &(rid, w, h) in rids {
                let key = k % gop == 0;
                l.on_frame(*t, rid, key, key.then_some((w, h)), (w * h / 20) as usize);
            }
            *t += FRAME;
        }
    }

    const LAYERS: [(&str, u32, u32); 3] = [("q", 320, 180), ("h", 640, 360), ("f", 1280, 720)];

    #[test]
    fn every_layer_is_a_rendition_the_largest_the_default() {
        let mut l = Layers::default();
        let mut t = Instant::now();
        assert!(!l.ready(3));
        feed(&mut l, &mut t, 31, 30, &LAYERS);
        assert!(l.ready(3));
        let r = l.renditions();
        let tracks: Vec<&str> = r.iter().map(|p| p.track.as_str()).collect();
        assert_eq!(tracks, ["video", "video-h", "video-q"]);
        let f = &r[0].rendition;
        assert_eq!((f.name.as_str(), f.width, f.height), ("f", 1280, 720));
        assert_eq!(f.framerate, 30);
        // 46,080 bytes a frame × 30 fps ≈ 11 Mbit/s.
        assert!((10_000..12_500).contains(&f.bitrate_kbps), "{f:?}");
        assert!(r[1].rendition.bitrate_kbps < f.bitrate_kbps);
    }

    #[test]
    fn waits_for_a_keyframe_of_every_offered_layer() {
        let mut l = Layers::default();
        let mut t = Instant::now();
        feed(&mut l, &mut t, 5, 30, &LAYERS[..2]);
        assert!(!l.ready(3), "the third layer has not arrived");
        // It arrives mid-group: no keyframe yet.
        l.on_frame(t, "f", false, None, 4000);
        assert!(!l.ready(3));
        l.on_frame(t, "f", true, Some((1280, 720)), 40_000);
        assert!(l.ready(3));
        assert_eq!(l.renditions()[0].rid, "f");
    }

    #[test]
    fn unknown_sizes_rank_by_bitrate() {
        // VP9/AV1/H.265 keyframes are not parsed: the bitrate decides.
        let mut l = Layers::default();
        let mut t = Instant::now();
        for _ in 0..20 {
            for (rid, bytes) in [("0", 9000), ("1", 3000), ("2", 1000)] {
                l.on_frame(t, rid, true, None, bytes);
            }
            t += FRAME;
        }
        let r = l.renditions();
        assert_eq!(r[0].rid, "0");
        assert_eq!(r[0].track, "video");
        assert_eq!(r[2].track, "video-2");
        assert_eq!((r[0].rendition.width, r[0].rendition.height), (0, 0));
    }

    #[test]
    fn too_many_layers_are_not_stored() {
        let mut l = Layers::default();
        let t = Instant::now();
        for i in 0..20 {
            let stored = l.on_frame(t, &format!("x{i}"), true, None, 1);
            assert_eq!(stored, i < MAX_LAYERS);
        }
        assert_eq!(l.layers.len(), MAX_LAYERS);
        // A short measurement reports no bitrate or frame rate.
        assert_eq!(l.renditions()[0].rendition.bitrate_kbps, 0);
        assert_eq!(l.renditions()[0].rendition.framerate, 0);
    }

    #[test]
    fn rids_of_recorded_offers() {
        let chromium = include_str!("testdata/chromium156-simulcast-offer.sdp");
        assert_eq!(offered_rids(chromium), ["q", "h", "f"]);
        let plain = "v=0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\na=sendonly\r\n";
        assert!(offered_rids(plain).is_empty());
        // recv rids (an answer's) and rids of audio lines do not count.
        let odd = "m=audio 9 X 111\r\na=rid:a send\r\nm=video 9 X 96\r\na=rid:b recv\r\na=rid:c send pt=96\r\n";
        assert_eq!(offered_rids(odd), ["c"]);
    }

    proptest! {
        #[test]
        fn offered_rids_never_panics_and_is_bounded(s in "(m=video|a=rid:[a-z0-9]{0,3} (send|recv)|.{0,20})(\r\n(m=video|a=rid:[a-z0-9]{0,3} (send|recv)|.{0,20})){0,40}") {
            let rids = offered_rids(&s);
            prop_assert!(rids.len() <= MAX_LAYERS);
        }
    }

    fn catalog_of(renditions: &[(&str, u32)]) -> cascade_origin::catalog::Catalog {
        use cascade_origin::catalog::{Catalog, Codec, TrackInfo};
        Catalog {
            tracks: renditions
                .iter()
                .map(|(track, kbps)| TrackInfo {
                    name: (*track).to_string(),
                    codec: Codec::H264,
                    fmtp: String::new(),
                    channels: None,
                    bframes: false,
                    rendition: Some(Rendition {
                        name: track.trim_start_matches("video-").to_string(),
                        width: 0,
                        height: 0,
                        bitrate_kbps: *kbps,
                        framerate: 0,
                    }),
                })
                .collect(),
        }
    }

    /// Feeds `secs` of 30 fps frames of `bytes` to each track.
    fn feed_rates(r: &mut LiveRates, t: &mut Instant, secs: u64, tracks: &[(&str, usize)]) {
        for _ in 0..secs * 30 {
            for (track, bytes) in tracks {
                r.on_frame(*t, track, *bytes);
            }
            *t += Duration::from_micros(33_333);
        }
    }

    #[test]
    fn live_rates_reach_the_catalog_when_they_move_and_not_too_often() {
        let mut r = LiveRates::default();
        let mut t = Instant::now();
        let cat = catalog_of(&[("video", 0), ("video-h", 0)]);
        // Nothing measured over a whole window yet: nothing to say.
        feed_rates(&mut r, &mut t, 1, &[("video", 5000), ("video-h", 1000)]);
        assert!(r.update(t, &cat).is_none());
        // Nor in a layer's first windows, while encoders ramp up.
        feed_rates(&mut r, &mut t, 3, &[("video", 5000), ("video-h", 1000)]);
        assert!(r.update(t, &cat).is_none());
        feed_rates(&mut r, &mut t, 3, &[("video", 5000), ("video-h", 1000)]);
        let next = r.update(t, &cat).expect("first live rates");
        let kbps: Vec<(u32, u32)> = next
            .tracks
            .iter()
            .map(|t| {
                t.rendition
                    .as_ref()
                    .map_or((0, 0), |r| (r.bitrate_kbps, r.framerate))
            })
            .collect();
        // 5000 B × 30/s = 1200 kbit/s; 1000 B = 240 kbit/s.
        assert!((1150..=1250).contains(&kbps[0].0), "{kbps:?}");
        assert!((230..=250).contains(&kbps[1].0), "{kbps:?}");
        assert_eq!((kbps[0].1, kbps[1].1), (30, 30));
        // Steady rates: no update, however long.
        feed_rates(&mut r, &mut t, 12, &[("video", 5000), ("video-h", 1000)]);
        assert!(r.update(t, &next).is_none());
        // The top layer doubles: an update, but not within the interval
        // of the last one.
        let cat2 = next;
        let at = t;
        feed_rates(&mut r, &mut t, 3, &[("video", 10_000), ("video-h", 1000)]);
        let up = r.update(t, &cat2).expect("moved by > 25%");
        assert!(up.tracks[0].rendition.as_ref().unwrap().bitrate_kbps > 1500);
        feed_rates(&mut r, &mut t, 3, &[("video", 20_000), ("video-h", 1000)]);
        assert!(
            r.update(t, &up).is_none(),
            "{:?} after the last update",
            t - at
        );
        feed_rates(&mut r, &mut t, 3, &[("video", 20_000), ("video-h", 1000)]);
        assert!(r.update(t, &up).is_some());
    }

    #[test]
    fn live_rates_keep_a_bounded_table() {
        let mut r = LiveRates::default();
        let t = Instant::now();
        for i in 0..100 {
            r.on_frame(t, &format!("video-{i}"), 100);
        }
        assert_eq!(r.tracks.len(), MAX_LAYERS * 2);
    }
}
