//! B-frame cameras handled like RTMP publishers: under
//! `--bframes transcode` ([`Policy::Transcode`]) a pull whose H.264 has
//! B-frames sends its video through the RTMP path's ffmpeg
//! [`Reencoder`] and publishes what comes back (no B-frames, so browsers
//! get every frame); when ffmpeg cannot start, exits or stalls, the source
//! video is passed through again from its next keyframe (the edge drops
//! its B-frames, docs/bframes.md). One per connection, owned by the
//! connection task; [`Bframes::route`] is its sans-IO half, the receiver
//! of ffmpeg's output is polled by the task.

use std::time::Instant;

use cascade_media::annexb;
use cascade_origin::catalog::Codec;
use cascade_origin::frame::Frame;
use tokio::sync::mpsc;

use super::media::Out;
use crate::metrics as m;
use crate::transcode::{self, Event, Policy, Reencoder, INPUT_QUEUE};

/// The state of one connection's re-encode.
pub(super) struct Bframes {
    policy: Policy,
    codec: Codec,
    /// A transcode was tried on this connection (at most one).
    tried: bool,
    running: Option<Reencoder>,
    /// The source frames since the last keyframe, so a re-encode started
    /// when the first B-frame shows begins at that keyframe, not a GOP
    /// later. Bounded below ffmpeg's input queue.
    gop: Vec<Frame>,
    /// The GOP outgrew the buffer: a re-encode starts at the next keyframe.
    gop_full: bool,
    /// After a fallback: source video from the next keyframe only.
    wait_key: bool,
}

impl Bframes {
    pub(super) fn new(policy: Policy, codec: Codec) -> Self {
        Self {
            policy,
            codec,
            tried: false,
            running: None,
            gop: Vec::new(),
            gop_full: false,
            wait_key: false,
        }
    }

    /// The fmtp to publish for the video while the re-encode's frames are
    /// the ones published.
    pub(super) fn fmtp(&self) -> Option<&str> {
        self.running
            .as_ref()
            .filter(|t| t.started())
            .and_then(|t| t.fmtp())
    }

    /// True while a re-encode runs.
    pub(super) fn running(&self) -> bool {
        self.running.is_some()
    }

    /// When a running re-encode counts as stalled.
    pub(super) fn stall_deadline(&self) -> Option<Instant> {
        self.running.as_ref().and_then(|t| t.stall_deadline())
    }

    /// The media core's frames: video goes into a running re-encode (and
    /// out of `outs`); the first B-frame starts one (returning ffmpeg's
    /// output receiver for the caller to poll).
    pub(super) fn route(
        &mut self,
        bframes: bool,
        outs: &mut Vec<Out>,
    ) -> Option<mpsc::Receiver<Event>> {
        let mut rx = None;
        if bframes && !self.tried && self.codec == Codec::H264 {
            if let Policy::Transcode(settings) = self.policy.clone() {
                self.tried = true;
                rx = self.start(&settings);
            }
        }
        let mut kept = Vec::with_capacity(outs.len());
        for o in outs.drain(..) {
            if o.track != "video" {
                kept.push(o);
                continue;
            }
            if o.frame.keyframe {
                self.gop.clear();
                self.gop_full = false;
                self.wait_key = false;
            }
            if !self.tried {
                if self.gop.len() < INPUT_QUEUE - 1 {
                    self.gop.push(o.frame.clone());
                } else {
                    self.gop_full = true;
                }
            }
            match &mut self.running {
                Some(t) => t.push(&o.frame),
                None if self.wait_key => {}
                None => kept.push(o),
            }
        }
        *outs = kept;
        rx
    }

    fn start(&mut self, settings: &transcode::Settings) -> Option<mpsc::Receiver<Event>> {
        let avcc = self.gop.first().and_then(|k| avcc_of(&k.payload));
        let Some(avcc) = avcc else {
            // Not at a keyframe with parameter sets yet: pass through.
            return None;
        };
        match Reencoder::spawn(settings, &avcc) {
            Ok((mut t, rx)) => {
                // A partial GOP would not decode: then ffmpeg waits for
                // the next keyframe (Reencoder::push skips to it).
                if !self.gop_full {
                    for f in &self.gop {
                        t.push(f);
                    }
                }
                self.gop = Vec::new();
                self.running = Some(t);
                Some(rx)
            }
            Err(e) => {
                metrics::counter!(m::TRANSCODE_FALLBACKS, "reason" => e.reason()).increment(1);
                tracing::warn!(error = %e, "B-frame transcode not started: passing the camera's video through (B-frames dropped at the edge)");
                None
            }
        }
    }

    /// One event from ffmpeg: a re-encoded frame to publish (in `outs`),
    /// or the end of the re-encode (source video again from its next
    /// keyframe). True when the published video changed (a catalog update).
    pub(super) fn output(&mut self, ev: Event, outs: &mut Vec<Out>) -> bool {
        let Some(t) = &mut self.running else {
            return false;
        };
        let was_started = t.started();
        match t.output(ev) {
            Ok(Some(frame)) => {
                outs.push(Out {
                    track: "video",
                    frame,
                });
                !was_started
            }
            Ok(None) => false,
            Err(e) => self.fall_back(&e),
        }
    }

    /// Ends the re-encode (ffmpeg exited, stalled or wrote garbage).
    /// True when the published video changed.
    pub(super) fn fall_back(&mut self, e: &transcode::Error) -> bool {
        let Some(t) = self.running.take() else {
            return false;
        };
        metrics::counter!(m::TRANSCODE_FALLBACKS, "reason" => e.reason()).increment(1);
        tracing::error!(error = %e, "B-frame transcode failed: passing the camera's video through from its next keyframe (B-frames dropped at the edge)");
        self.wait_key = true;
        t.started()
    }
}

/// An `AVCDecoderConfigurationRecord` (ISO 14496-15 §5.3.3.1) from the
/// SPS and PPS in front of an Annex-B keyframe: what the re-encode's FLV
/// header carries.
pub(super) fn avcc_of(keyframe: &[u8]) -> Option<Vec<u8>> {
    let units = annexb::nal_units(keyframe);
    let sps = units.iter().find(|n| n[0] & 0x1f == 7)?;
    let pps = units.iter().find(|n| n[0] & 0x1f == 8)?;
    let profile = sps.get(1..4)?;
    let sps_len = u16::try_from(sps.len()).ok()?;
    let pps_len = u16::try_from(pps.len()).ok()?;
    let mut r = Vec::with_capacity(11 + sps.len() + pps.len());
    r.push(1);
    r.extend_from_slice(profile);
    r.push(0xff); // 4-byte NAL lengths
    r.push(0xe1); // one SPS
    r.extend_from_slice(&sps_len.to_be_bytes());
    r.extend_from_slice(sps);
    r.push(1); // one PPS
    r.extend_from_slice(&pps_len.to_be_bytes());
    r.extend_from_slice(pps);
    Some(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn avcc_from_a_keyframe_parses_back() {
        let au = [
            0, 0, 0, 1, 0x67, 0x64, 0x00, 0x1f, 0xac, 0, 0, 0, 1, 0x68, 0xee, 0x3c, 0x80, 0, 0, 0,
            1, 0x65, 0x88,
        ];
        let avcc = avcc_of(&au).unwrap();
        let c = crate::h264::parse_avcc(&avcc).unwrap();
        assert_eq!(c.length_size, 4);
        assert_eq!(c.parameter_sets.len(), 2);
        assert_eq!(&c.parameter_sets[0][..], &[0x67, 0x64, 0x00, 0x1f, 0xac]);
        assert!(avcc_of(&[0, 0, 1, 0x65, 0x88]).is_none());
    }

    fn frame(key: bool) -> Out {
        Out {
            track: "video",
            frame: Frame {
                payload: bytes::Bytes::from_static(&[0, 0, 0, 1, 0x41]),
                pts: 0,
                dts: 0,
                keyframe: key,
                ingest_us: 0,
            },
        }
    }

    #[test]
    fn drop_policy_passes_everything_through() {
        let mut b = Bframes::new(Policy::Drop, Codec::H264);
        let mut outs = vec![frame(true), frame(false)];
        assert!(b.route(true, &mut outs).is_none());
        assert_eq!(outs.len(), 2);
        assert!(b.fmtp().is_none());
    }

    #[test]
    fn after_a_fallback_video_waits_for_a_keyframe() {
        let mut b = Bframes::new(Policy::Drop, Codec::H264);
        b.wait_key = true;
        let mut outs = vec![frame(false)];
        b.route(true, &mut outs);
        assert!(outs.is_empty());
        let mut outs = vec![frame(true), frame(false)];
        b.route(true, &mut outs);
        assert_eq!(outs.len(), 2);
    }
}
