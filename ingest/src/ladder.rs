//! The RTMP ABR ladder (`--abr-ladder`, issue 14), sans-IO half: parsing
//! the flag (`720p:2500,360p:800,180p:250` → [`Step`]s), choosing the steps
//! a source of a given size gets ([`Ladder::steps_for`]), the rendition
//! descriptions they publish ([`rendition`]), and the arguments of the one
//! ffmpeg child per stream that decodes the source once and encodes every
//! step ([`args`]). No process, no clock: unit- and property-tested here.
//!
//! Keyframes are aligned across renditions by giving every output
//! `-force_key_frames source` (the same instants as the source, which
//! keeps the source rendition aligned too) and `-sc_threshold 0` (no extra
//! keyframes on scene cuts), so a viewer switching rendition lands on a
//! keyframe at the same time in each.

use cascade_origin::catalog::{self, Catalog, Rendition};

/// Most steps a ladder may have: each is a libx264 encode in the stream's
/// ffmpeg child (measured cost in docs/quality.md, "RTMP ladder").
pub const MAX_STEPS: usize = 4;
/// Smallest step height accepted (pixels).
pub const MIN_HEIGHT: u32 = 90;
/// Largest step height accepted (4320p, "8K").
pub const MAX_HEIGHT: u32 = 4320;
/// Smallest step bitrate (kbit/s).
pub const MIN_KBPS: u32 = 50;
/// Largest step bitrate (kbit/s).
pub const MAX_KBPS: u32 = 50_000;
/// Longest input accepted by [`Ladder::parse`] (bytes).
const MAX_INPUT: usize = 256;
/// Name of the source's rendition when a ladder adds steps to it.
pub const SOURCE: &str = "source";

/// One step of the ladder: a rendition of `height` lines at `kbps`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Step {
    /// Its name as written (`360p`): the rendition name viewers pick.
    pub name: String,
    /// Picture height in pixels (even).
    pub height: u32,
    /// Target bitrate in kbit/s.
    pub kbps: u32,
}

/// A parsed `--abr-ladder`: steps from the highest to the lowest.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ladder {
    steps: Vec<Step>,
}

/// Why an `--abr-ladder` value was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum Error {
    /// Longer than any sensible ladder.
    #[error("longer than {MAX_INPUT} bytes")]
    TooLong,
    /// More than [`MAX_STEPS`] steps.
    #[error("{0} steps; at most {MAX_STEPS}")]
    TooManySteps(usize),
    /// A step is not `<height>p:<kbit/s>`.
    #[error("step {0:?} is not HEIGHTp:KBPS (e.g. 360p:800)")]
    Syntax(String),
    /// A height out of range or odd (4:2:0 needs even sizes).
    #[error("step {0:?}: height must be even and {MIN_HEIGHT}..={MAX_HEIGHT}")]
    Height(String),
    /// A bitrate out of range.
    #[error("step {0:?}: kbit/s must be {MIN_KBPS}..={MAX_KBPS}")]
    Bitrate(String),
    /// Two steps of one height.
    #[error("two steps of height {0}")]
    Duplicate(u32),
}

impl Ladder {
    /// Parses `720p:2500,360p:800` (height `p`, colon, kbit/s; commas
    /// between steps; spaces around them ignored). An empty value is an
    /// empty ladder (off).
    pub fn parse(s: &str) -> Result<Self, Error> {
        if s.len() > MAX_INPUT {
            return Err(Error::TooLong);
        }
        let s = s.trim();
        if s.is_empty() {
            return Ok(Self::default());
        }
        let parts: Vec<&str> = s.split(',').map(str::trim).collect();
        if parts.len() > MAX_STEPS {
            return Err(Error::TooManySteps(parts.len()));
        }
        let mut steps = Vec::with_capacity(parts.len());
        for p in parts {
            let step = parse_step(p)?;
            if steps.iter().any(|s: &Step| s.height == step.height) {
                return Err(Error::Duplicate(step.height));
            }
            steps.push(step);
        }
        steps.sort_by_key(|s| std::cmp::Reverse(s.height));
        Ok(Self { steps })
    }

    /// True when no step is configured (the ladder is off).
    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }

    /// All steps, highest first.
    pub fn steps(&self) -> &[Step] {
        &self.steps
    }

    /// The steps a source of `source_height` lines gets: those strictly
    /// below it (a step at or above the source would only cost CPU for no
    /// better picture). Empty when the source height is unknown (0).
    pub fn steps_for(&self, source_height: u32) -> Vec<Step> {
        self.steps
            .iter()
            .filter(|s| s.height < source_height)
            .cloned()
            .collect()
    }
}

fn parse_step(p: &str) -> Result<Step, Error> {
    let syntax = || Error::Syntax(p.chars().take(32).collect());
    let (h, k) = p.split_once(':').ok_or_else(syntax)?;
    let h = h.trim();
    let digits = h
        .strip_suffix('p')
        .or_else(|| h.strip_suffix('P'))
        .ok_or_else(syntax)?;
    let number = |d: &str| -> Option<u32> {
        if d.is_empty() || d.len() > 9 || !d.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        d.parse().ok()
    };
    let height = number(digits).ok_or_else(syntax)?;
    let kbps = number(k.trim()).ok_or_else(syntax)?;
    if !(MIN_HEIGHT..=MAX_HEIGHT).contains(&height) || height % 2 != 0 {
        return Err(Error::Height(p.into()));
    }
    if !(MIN_KBPS..=MAX_KBPS).contains(&kbps) {
        return Err(Error::Bitrate(p.into()));
    }
    Ok(Step {
        name: format!("{height}p"),
        height,
        kbps,
    })
}

/// The width of a step of `height` lines for a `src_w`×`src_h` source:
/// the source's aspect, rounded to an even number (what ffmpeg's
/// `scale=-2:H` picks too).
pub fn scaled_width(src_w: u32, src_h: u32, height: u32) -> u32 {
    if src_h == 0 {
        return 0;
    }
    // Half the width rounded to nearest, doubled: even, like `-2`.
    let num = u64::from(src_w) * u64::from(height);
    let den = u64::from(src_h);
    let half = (num + den) / (2 * den);
    u32::try_from(half * 2).unwrap_or(u32::MAX)
}

/// The catalog rendition of `step` for a `src_w`×`src_h` source at
/// `framerate` fps.
pub fn rendition(step: &Step, src_w: u32, src_h: u32, framerate: u32) -> Rendition {
    Rendition {
        name: step.name.clone(),
        width: scaled_width(src_w, src_h, step.height),
        height: step.height,
        bitrate_kbps: step.kbps,
        framerate,
    }
}

/// `catalog` with the ladder in it: the source's video track becomes the
/// [`SOURCE`] rendition and each step whose output is known (its fmtp,
/// `fmtps[i]`, from its first frame) is added as `video-<name>`. While no
/// step has produced a frame the source is already marked as the
/// [`SOURCE`] rendition, alone: a stream whose video is a rendition expects
/// more, and an edge gives a viewer who joins in that gap (ffmpeg's first
/// frames take ~0.15–1 s) a bandwidth estimator, which a WebRTC session
/// gets only when it is created (`cascade_edge::viewer::bwe_start`).
pub fn amend(
    catalog: &mut Catalog,
    steps: &[Step],
    fmtps: &[Option<String>],
    (src_w, src_h): (u32, u32),
) {
    let Some(video) = catalog.tracks.iter().position(|t| t.name == catalog::VIDEO) else {
        return;
    };
    let ready: Vec<(&Step, &String)> = steps
        .iter()
        .zip(fmtps)
        .filter_map(|(s, f)| Some((s, f.as_ref()?)))
        .collect();
    let src = catalog.tracks.get(video).cloned();
    let Some(src) = src else { return };
    let mut added = Vec::with_capacity(ready.len());
    for (step, fmtp) in ready {
        let mut t = src.clone();
        t.name = catalog::rendition_track(&step.name);
        t.fmtp = fmtp.clone();
        t.bframes = false;
        t.rendition = Some(rendition(step, src_w, src_h, 0));
        added.push(t);
    }
    if let Some(v) = catalog.tracks.get_mut(video) {
        v.rendition = Some(Rendition {
            name: SOURCE.into(),
            width: src_w,
            height: src_h,
            bitrate_kbps: 0,
            framerate: 0,
        });
    }
    catalog.tracks.extend(added);
}

/// The ffmpeg arguments of a ladder child: FLV in on stdin (the same
/// framing as the B-frame re-encode, `transcode::pipe`), one FLV output per
/// step to `outputs[i]` (a `unix:` socket path each, in step order),
/// libx264 at `profile` without B-frames, the step's size and bitrate,
/// keyframes where the source has them. `outputs` shorter than `steps`
/// leaves the extra steps out.
pub fn args(profile: &str, steps: &[Step], outputs: &[String]) -> Vec<String> {
    let mut a: Vec<String> = [
        "-hide_banner",
        "-nostdin",
        "-loglevel",
        "warning",
        // As the B-frame re-encode: start on the sequence header, no probing.
        "-probesize",
        "32",
        "-analyzeduration",
        "0",
        "-threads",
        "1",
        "-f",
        "flv",
        "-i",
        "pipe:0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let n = steps.len().min(outputs.len());
    if n == 0 {
        return a;
    }
    // One decode, split into one scaler per step.
    let mut graph = format!("[0:v]split={n}");
    for i in 0..n {
        graph.push_str(&format!("[s{i}]"));
    }
    for (i, step) in steps.iter().take(n).enumerate() {
        graph.push_str(&format!(";[s{i}]scale=-2:{}[v{i}]", step.height));
    }
    a.push("-filter_complex".into());
    a.push(graph);
    for (i, (step, out)) in steps.iter().zip(outputs).enumerate() {
        let k = step.kbps;
        let per_output: Vec<String> = vec![
            "-map".into(),
            format!("[v{i}]"),
            "-c:v".into(),
            "libx264".into(),
            "-profile:v".into(),
            profile.into(),
            "-preset".into(),
            "veryfast".into(),
            "-tune".into(),
            "zerolatency".into(),
            "-bf".into(),
            "0".into(),
            "-pix_fmt".into(),
            "yuv420p".into(),
            "-b:v".into(),
            format!("{k}k"),
            "-maxrate".into(),
            format!("{k}k"),
            // One second of buffer: rate held over short windows, as a
            // viewer on a link of that rate needs.
            "-bufsize".into(),
            format!("{k}k"),
            // Aligned keyframes: the source's, on every output.
            "-force_key_frames".into(),
            "source".into(),
            "-sc_threshold".into(),
            "0".into(),
            "-threads".into(),
            "1".into(),
            "-copyts".into(),
            "-fps_mode".into(),
            "passthrough".into(),
            "-enc_time_base".into(),
            "-1".into(),
            "-flush_packets".into(),
            "1".into(),
            "-f".into(),
            "flv".into(),
            format!("unix:{out}"),
        ];
        a.extend(per_output);
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn step(h: u32, k: u32) -> Step {
        Step {
            name: format!("{h}p"),
            height: h,
            kbps: k,
        }
    }

    #[test]
    fn parses_the_example_and_sorts_highest_first() {
        let l = Ladder::parse("360p:800, 720p:2500 ,180p:250").unwrap();
        assert_eq!(
            l.steps(),
            &[step(720, 2500), step(360, 800), step(180, 250)]
        );
        assert!(Ladder::parse("").unwrap().is_empty());
        assert!(Ladder::parse("  ").unwrap().is_empty());
        assert_eq!(
            Ladder::parse("480P:1200").unwrap().steps(),
            &[step(480, 1200)]
        );
    }

    #[test]
    fn refuses_bad_input_with_a_reason() {
        let e = |s: &str| Ladder::parse(s).unwrap_err();
        assert!(matches!(e("720:2500"), Error::Syntax(_)));
        assert!(matches!(e("720p"), Error::Syntax(_)));
        assert!(matches!(e("720p:"), Error::Syntax(_)));
        assert!(matches!(e("p:100"), Error::Syntax(_)));
        assert!(matches!(e("720p:-5"), Error::Syntax(_)));
        assert!(matches!(e("720p:2500,"), Error::Syntax(_)));
        assert!(matches!(e("+720p:2500"), Error::Syntax(_)));
        assert!(matches!(e("721p:2500"), Error::Height(_)));
        assert!(matches!(e("8p:2500"), Error::Height(_)));
        assert!(matches!(e("9000p:2500"), Error::Height(_)));
        assert!(matches!(e("720p:10"), Error::Bitrate(_)));
        assert!(matches!(e("720p:99999999"), Error::Bitrate(_)));
        assert_eq!(e("360p:800,360p:500"), Error::Duplicate(360));
        assert_eq!(
            e("720p:1,1p:1,2p:1,3p:1,4p:1"),
            Error::TooManySteps(5),
            "counted before each step is checked"
        );
        assert_eq!(e(&"1".repeat(300)), Error::TooLong);
        assert!(e("720p:x").to_string().contains("HEIGHTp:KBPS"));
    }

    #[test]
    fn steps_at_or_above_the_source_are_skipped() {
        let l = Ladder::parse("720p:2500,360p:800,180p:250").unwrap();
        assert_eq!(l.steps_for(720), vec![step(360, 800), step(180, 250)]);
        assert_eq!(l.steps_for(1080).len(), 3);
        assert_eq!(l.steps_for(180), vec![]);
        assert_eq!(l.steps_for(0), vec![], "unknown size: no ladder");
    }

    #[test]
    fn widths_keep_the_aspect_and_are_even() {
        assert_eq!(scaled_width(1280, 720, 360), 640);
        assert_eq!(scaled_width(1280, 720, 180), 320);
        assert_eq!(scaled_width(1920, 1080, 720), 1280);
        // 4:3 at 250 lines: 333.3 → 334 (even).
        assert_eq!(scaled_width(640, 480, 250), 334);
        assert_eq!(scaled_width(640, 0, 250), 0);
        let r = rendition(&step(360, 800), 1280, 720, 30);
        assert_eq!(
            (
                r.name.as_str(),
                r.width,
                r.height,
                r.bitrate_kbps,
                r.framerate
            ),
            ("360p", 640, 360, 800, 30)
        );
    }

    #[test]
    fn the_catalog_gains_the_steps_that_produced_frames() {
        use cascade_origin::catalog::{Codec, TrackInfo};
        let track = |name: &str, codec| TrackInfo {
            name: name.into(),
            codec,
            fmtp: "profile-level-id=64001f".into(),
            channels: None,
            bframes: false,
            rendition: None,
        };
        let base = Catalog {
            tracks: vec![track("video", Codec::H264), track("audio", Codec::Opus)],
        };
        let steps = [step(360, 800), step(180, 250)];
        let mut c = base.clone();
        amend(&mut c, &steps, &[None, None], (1280, 720));
        let names: Vec<&str> = c.tracks.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(
            names,
            ["video", "audio"],
            "nothing out yet: the source alone"
        );
        let src = c.tracks[0].rendition.as_ref().map(|r| r.name.as_str());
        assert_eq!(src, Some("source"), "marked: renditions are coming");
        assert_eq!(c.renditions().count(), 1);
        let mut c = base.clone();
        amend(
            &mut c,
            &steps,
            &[None, Some("profile-level-id=4d000c".into())],
            (1280, 720),
        );
        let names: Vec<&str> = c.tracks.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["video", "audio", "video-180p"]);
        let src = c.tracks[0].rendition.as_ref().unwrap();
        assert_eq!(
            (src.name.as_str(), src.width, src.height),
            ("source", 1280, 720)
        );
        let low = &c.tracks[2];
        assert_eq!(low.fmtp, "profile-level-id=4d000c");
        let r = low.rendition.as_ref().unwrap();
        assert_eq!(
            (r.name.as_str(), r.width, r.height, r.bitrate_kbps),
            ("180p", 320, 180, 250)
        );
    }

    /// The value following the `n`th occurrence of `flag`.
    fn nth_value<'a>(a: &'a [String], flag: &str, n: usize) -> &'a str {
        let i = a
            .iter()
            .enumerate()
            .filter(|(_, x)| *x == flag)
            .nth(n)
            .map(|(i, _)| i)
            .unwrap();
        &a[i + 1]
    }

    #[test]
    fn ffmpeg_decodes_once_and_encodes_each_step_with_aligned_keyframes() {
        let steps = [step(360, 800), step(180, 250)];
        let outs = ["/run/a.sock".to_string(), "/run/b.sock".to_string()];
        let a = args("main", &steps, &outs);
        assert_eq!(a.iter().filter(|x| *x == "-i").count(), 1, "one decode");
        assert_eq!(
            nth_value(&a, "-filter_complex", 0),
            "[0:v]split=2[s0][s1];[s0]scale=-2:360[v0];[s1]scale=-2:180[v1]"
        );
        assert_eq!(a.iter().filter(|x| *x == "libx264").count(), 2);
        for (i, (k, out)) in [("800k", "unix:/run/a.sock"), ("250k", "unix:/run/b.sock")]
            .into_iter()
            .enumerate()
        {
            assert_eq!(nth_value(&a, "-map", i), format!("[v{i}]"));
            assert_eq!(nth_value(&a, "-b:v", i), k);
            assert_eq!(nth_value(&a, "-maxrate", i), k);
            assert_eq!(nth_value(&a, "-bufsize", i), k);
            assert_eq!(nth_value(&a, "-force_key_frames", i), "source");
            assert_eq!(nth_value(&a, "-sc_threshold", i), "0");
            assert_eq!(nth_value(&a, "-bf", i), "0");
            assert_eq!(nth_value(&a, "-profile:v", i), "main");
            assert_eq!(nth_value(&a, "-tune", i), "zerolatency");
            // Each output's options come before its URL, after the last one's.
            let url = a.iter().position(|x| x == out).unwrap();
            let map = a
                .iter()
                .enumerate()
                .filter(|(_, x)| *x == "-map")
                .nth(i)
                .unwrap()
                .0;
            assert!(map < url);
        }
        assert_eq!(a.last().unwrap(), "unix:/run/b.sock");
        // Nothing to encode: no filter, no output.
        assert!(!args("main", &steps, &[]).contains(&"-filter_complex".to_string()));
    }

    proptest! {
        #[test]
        fn parse_never_panics_and_accepts_what_it_prints(s in ".{0,300}") {
            if let Ok(l) = Ladder::parse(&s) {
                prop_assert!(l.steps().len() <= MAX_STEPS);
                let printed: Vec<String> =
                    l.steps().iter().map(|s| format!("{}:{}", s.name, s.kbps)).collect();
                prop_assert_eq!(Ladder::parse(&printed.join(",")).unwrap(), l);
            }
        }

        #[test]
        fn valid_ladders_round_trip(
            hs in proptest::collection::btree_set(45u32..=2160, 1..=MAX_STEPS),
            k in MIN_KBPS..=MAX_KBPS,
        ) {
            let text: Vec<String> = hs.iter().map(|h| format!("{}p:{k}", h * 2)).collect();
            let l = Ladder::parse(&text.join(",")).unwrap();
            prop_assert_eq!(l.steps().len(), hs.len());
            prop_assert!(l.steps().windows(2).all(|w| w[0].height > w[1].height));
            for s in l.steps() {
                let w = scaled_width(1920, 1080, s.height);
                prop_assert_eq!(w % 2, 0);
                prop_assert!(l.steps_for(s.height).iter().all(|t| t.height < s.height));
            }
        }
    }
}
