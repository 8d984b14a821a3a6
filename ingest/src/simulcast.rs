//! One video layer out of a simulcast WHIP publisher (Chromium/Firefox
//! `sendEncodings`, OBS 32.1's simulcast option). Until layers become
//! renditions of their own, the stream carries the highest layer that
//! arrives: feeding every layer into one track made viewers decode 1–2
//! frames a second with the picture size jumping between layers.
//!
//! Sans-IO: frames of each rid go in with `now`, the verdict says forward,
//! drop, or drop and ask that layer for a keyframe. Switches happen only on
//! a keyframe of the target layer, so viewers never decode a broken picture.
//! Layers rank by picture size (read from keyframes), and by bitrate while
//! a size is unknown. A layer that sent nothing for [`STALL`] is gone (a
//! publisher's encoder drops its top layers when its bandwidth estimate
//! falls); the next best takes over at its next keyframe.

use std::time::{Duration, Instant};

/// A layer silent this long no longer counts (simulcast layers run at the
/// camera's frame rate, 15–60 fps).
pub(crate) const STALL: Duration = Duration::from_secs(1);
/// Bitrate window of a layer.
const RATE_WINDOW: Duration = Duration::from_secs(1);
/// Most layers of one track (RFC 8853 allows more; encoders send ≤ 3–4).
const MAX_LAYERS: usize = 8;

/// One layer (rid) as seen so far.
#[derive(Debug)]
struct Layer {
    rid: String,
    /// Width × height of its latest keyframe.
    area: Option<u32>,
    size: Option<(u32, u32)>,
    last: Instant,
    window_start: Instant,
    window_bytes: u64,
    /// Bytes per second over the last full window.
    rate: u64,
}

impl Layer {
    fn active(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.last) < STALL
    }
}

/// What to do with one frame.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Into the stream's video track.
    Forward,
    /// Not the chosen layer.
    Drop,
    /// Not (yet) the chosen layer, but it should become it: ask it for a
    /// keyframe (the caller rate-limits requests).
    DropAndRequestKeyframe,
}

/// A change of the forwarded layer, for the log line and the metric.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Switch {
    pub(crate) from: Option<String>,
    pub(crate) to: String,
    pub(crate) size: Option<(u32, u32)>,
    /// The other layers, dropped from now on.
    pub(crate) dropped: Vec<String>,
}

/// The layer choice of one simulcast video track.
#[derive(Debug, Default)]
pub(crate) struct Selector {
    layers: Vec<Layer>,
    current: Option<usize>,
    switch: Option<Switch>,
}

impl Selector {
    /// A frame of layer `rid`; `size` when it is a keyframe whose header
    /// says.
    pub(crate) fn on_frame(
        &mut self,
        now: Instant,
        rid: &str,
        keyframe: bool,
        size: Option<(u32, u32)>,
        bytes: usize,
    ) -> Verdict {
        let Some(i) = self.layer(now, rid) else {
            return Verdict::Drop;
        };
        let l = &mut self.layers[i];
        l.last = now;
        if now.saturating_duration_since(l.window_start) >= RATE_WINDOW {
            l.rate = l.window_bytes;
            l.window_start = now;
            l.window_bytes = 0;
        }
        l.window_bytes += bytes as u64;
        if let Some((w, h)) = size {
            l.area = Some(w.saturating_mul(h));
            l.size = Some((w, h));
        }
        let target = self.best(now);
        match self.current {
            Some(c) if c == i => Verdict::Forward,
            current => {
                // Only ever towards the best active layer: the current one
                // while it is (it is then the target), or a better one, or
                // the best of the rest once the current one went silent.
                if target != Some(i) {
                    return Verdict::Drop;
                }
                if !keyframe {
                    return Verdict::DropAndRequestKeyframe;
                }
                self.current = Some(i);
                self.switch = Some(Switch {
                    from: current.map(|c| self.layers[c].rid.clone()),
                    to: self.layers[i].rid.clone(),
                    size: self.layers[i].size,
                    dropped: self
                        .layers
                        .iter()
                        .filter(|l| l.rid != rid)
                        .map(|l| l.rid.clone())
                        .collect(),
                });
                Verdict::Forward
            }
        }
    }

    /// The switch the last [`Selector::on_frame`] made, once.
    pub(crate) fn take_switch(&mut self) -> Option<Switch> {
        self.switch.take()
    }

    /// The forwarded layer's rid (keyframe requests from viewers go there).
    pub(crate) fn current(&self) -> Option<&str> {
        self.current.map(|c| self.layers[c].rid.as_str())
    }

    fn layer(&mut self, now: Instant, rid: &str) -> Option<usize> {
        if let Some(i) = self.layers.iter().position(|l| l.rid == rid) {
            return Some(i);
        }
        if self.layers.len() >= MAX_LAYERS {
            return None;
        }
        self.layers.push(Layer {
            rid: rid.to_string(),
            area: None,
            size: None,
            last: now,
            window_start: now,
            window_bytes: 0,
            rate: 0,
        });
        Some(self.layers.len() - 1)
    }

    /// The best active layer: largest picture; among layers of unknown size,
    /// and against them, the higher bitrate.
    fn best(&self, now: Instant) -> Option<usize> {
        let mut best: Option<usize> = None;
        for (i, l) in self.layers.iter().enumerate() {
            if !l.active(now) {
                continue;
            }
            best = match best {
                Some(b) if !better(l, &self.layers[b]) => Some(b),
                _ => Some(i),
            };
        }
        best
    }
}

fn better(a: &Layer, b: &Layer) -> bool {
    match (a.area, b.area) {
        (Some(x), Some(y)) => x > y,
        // Bitrate decides while a size is unknown; a margin keeps two
        // similar layers from trading places on every window.
        _ => a.rate > b.rate.saturating_mul(3) / 2,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FRAME: Duration = Duration::from_millis(33);

    /// Frames of `rids` (in send order, like an encoder's layers of one
    /// picture) for `n` pictures from `t`; keyframes every `gop` pictures.
    fn feed(
        s: &mut Selector,
        t: &mut Instant,
        n: u32,
        gop: u32,
        rids: &[(&str, u32, u32)],
    ) -> Vec<(String, Verdict)> {
        let mut out = Vec::new();
        for k in 0..n {
            for &(rid, w, h) in rids {
                let key = k % gop == 0;
                let size = key.then_some((w, h));
                let bytes = (w * h / 20) as usize;
                out.push((rid.to_string(), s.on_frame(*t, rid, key, size, bytes)));
            }
            *t += FRAME;
        }
        out
    }

    fn forwarded(v: &[(String, Verdict)]) -> Vec<&str> {
        v.iter()
            .filter(|(_, d)| *d == Verdict::Forward)
            .map(|(r, _)| r.as_str())
            .collect()
    }

    const LAYERS: [(&str, u32, u32); 3] = [("q", 320, 180), ("h", 640, 360), ("f", 1280, 720)];

    #[test]
    fn forwards_only_the_top_layer() {
        let mut s = Selector::default();
        let mut t = Instant::now();
        let v = feed(&mut s, &mut t, 90, 30, &LAYERS);
        let f = forwarded(&v);
        // The first picture goes live on the first layer that arrives and
        // moves up as the bigger ones do (each a keyframe: decodable); from
        // then on each picture once, from the top layer.
        assert_eq!(f[..3], ["q", "h", "f"]);
        assert_eq!(f.len(), 92, "{f:?}");
        assert!(f[3..].iter().all(|r| *r == "f"), "{f:?}");
        assert_eq!(s.current(), Some("f"));
        let sw = s.take_switch().unwrap();
        assert_eq!(sw.to, "f");
        assert_eq!(sw.size, Some((1280, 720)));
        assert_eq!(sw.dropped, ["q", "h"]);
        assert!(s.take_switch().is_none(), "reported once");
    }

    #[test]
    fn starts_low_and_moves_up_on_the_top_layers_keyframe() {
        // The top layer starts mid-group (an encoder raising its layers as
        // its bandwidth estimate grows): the low layer plays until the top
        // layer's next keyframe, which is asked for.
        let mut s = Selector::default();
        let mut t = Instant::now();
        let v = feed(&mut s, &mut t, 10, 30, &LAYERS[..1]);
        assert_eq!(forwarded(&v).len(), 10);
        assert_eq!(s.current(), Some("q"));
        // The top layer's first frames are no keyframes; area unknown, but
        // its bitrate is far higher once a window completed.
        let mut asked = 0;
        for k in 0..40 {
            let key = k == 35;
            for &(rid, w, h) in &[LAYERS[0], LAYERS[2]] {
                let size = (key || (rid == "q" && k % 30 == 0)).then_some((w, h));
                let v = s.on_frame(
                    t,
                    rid,
                    key || (rid == "q" && k % 30 == 0),
                    size,
                    (w * h / 20) as usize,
                );
                if rid == "f" && v == Verdict::DropAndRequestKeyframe {
                    asked += 1;
                }
                if rid == "q" && k > 35 {
                    assert_eq!(v, Verdict::Drop, "low layer dropped after the switch");
                }
            }
            t += FRAME;
        }
        assert!(asked > 0, "a keyframe was asked of the top layer");
        assert_eq!(s.current(), Some("f"));
        assert_eq!(s.take_switch().unwrap().from.as_deref(), Some("q"));
    }

    #[test]
    fn falls_back_when_the_top_layer_stops() {
        let mut s = Selector::default();
        let mut t = Instant::now();
        feed(&mut s, &mut t, 30, 30, &LAYERS);
        assert_eq!(s.current(), Some("f"));
        s.take_switch();
        // The encoder drops its top layer: within STALL nothing changes
        // (the lower layers are dropped), then the next best takes over at
        // its keyframe.
        let v = feed(&mut s, &mut t, 60, 30, &LAYERS[..2]);
        let f = forwarded(&v);
        assert!(f.iter().all(|r| *r == "h"), "{f:?}");
        assert!(
            f.len() >= 25,
            "the fallback plays within ~1 s plus a GOP: {}",
            f.len()
        );
        assert_eq!(s.current(), Some("h"));
        assert_eq!(s.take_switch().unwrap().from.as_deref(), Some("f"));
        // And back up when it returns.
        let v = feed(&mut s, &mut t, 31, 30, &LAYERS);
        assert_eq!(forwarded(&v).last(), Some(&"f"));
    }

    #[test]
    fn a_single_layer_or_unknown_sizes_still_play() {
        let mut s = Selector::default();
        let mut t = Instant::now();
        // First picture is no keyframe: asked for one, then plays.
        assert_eq!(
            s.on_frame(t, "0", false, None, 100),
            Verdict::DropAndRequestKeyframe
        );
        t += FRAME;
        assert_eq!(s.on_frame(t, "0", true, None, 5000), Verdict::Forward);
        t += FRAME;
        assert_eq!(s.on_frame(t, "0", false, None, 100), Verdict::Forward);
        // Too many rids: the extra ones are dropped, never stored.
        for i in 0..20 {
            let _ = s.on_frame(t, &format!("x{i}"), true, None, 1);
        }
        assert!(s.layers.len() <= MAX_LAYERS);
    }
}
