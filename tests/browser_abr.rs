//! The ABR demonstration with real browsers (issue 14, "How it is shown",
//! first bullet): headless Chromium publishes three simulcast layers
//! (fake camera 1280×720 → 640×360 → 320×180) over WHIP; Chromium viewers of
//! the player page (`/play/{stream}`, Auto) each run in their own network
//! namespace, joined to cascade's by a veth pair whose cascade side is
//! shaped with `tc … tbf` (cascade → viewer), so every viewer has its own
//! bottleneck. getStats is sampled in each page every 50 ms (frame height,
//! frames decoded, freezes, audio packets and samples): a freeze is measured
//! to within 50 ms (it was 250 ms, so a gap read as 1.00 s could be up to
//! 1.25 s long).
//!
//! - `abr_viewers_settle_on_the_rendition_that_fits`: 400 kbit/s, 1.5 Mbit/s
//!   and unlimited viewers settle on 180p / 360p / 720p within 5 s of their
//!   first frame, then play 8 s with no freeze over 500 ms.
//! - `abr_viewer_climbs_when_the_limit_rises_and_drops_when_it_falls`:
//!   400 kbit/s → 4 Mbit/s (climb to 720p) → 400 kbit/s (back to ≤ 180p),
//!   no freeze over 1 s from the raise on.
//! - `abr_viewer_below_the_lowest_rendition_keeps_audio`: 100 kbit/s gets
//!   audio only (audio keeps coming, video pauses), video resumes once the
//!   limit is lifted.
//! - `abr_in_firefox_climbs_and_drops`: a Firefox viewer (VP8 layers) climbs
//!   to 720p unlimited, settles on 360p at 1.5 Mbit/s and drops to 180p at
//!   400 kbit/s.
//!
//! Root only (as tests/browser.rs); every measured time is `eprintln!`ed
//! for docs/quality.md.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns

#[allow(dead_code)] // shared with tests/browser.rs, which uses all of it
#[path = "browser/netns.rs"]
mod netns;

use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use netns::{browser_dir, Cascade, Netns, Proc, STATIC_IP, TOKEN};
use serde_json::{json, Value};

/// One case at a time: each runs four Chromiums on a small machine.
static SERIAL: Mutex<()> = Mutex::new(());

/// The top layer's rate the cases wait for: Chromium ramps its layers up
/// over seconds after connecting (its own bandwidth estimate), and a ladder
/// judged before that would not be the one the limits were chosen for.
const MIN_TOP_BPS: u64 = 1_000_000;

/// The publisher's bandwidth floor (`x-google-min-bitrate` and start rate
/// in the answer it applies): Chromium's send-side estimate starts at the
/// ladder's total instead of ramping up to it, so the layers reach their
/// targets within seconds of connecting (with [`fake_camera`]; the built-in
/// camera's low rates are its encoder's, not the estimate's).
const PUBLISH_MIN_KBPS: u64 = 3000;

/// The fake camera's picture: Chromium's built-in one is so simple that its
/// encoder makes ~0.1/0.23/0.45 Mbit/s of its 0.15/0.5/2.5 Mbit/s layer
/// targets (measured), a ladder the limits were not chosen for. A
/// noisy test pattern (ffmpeg, MJPEG, looped by Chromium) makes it send its
/// targets, as a camera does.
fn fake_camera() -> String {
    let path = std::env::temp_dir().join("cascade-abr-camera-12.mjpeg");
    if !path.exists() {
        let tmp = path.with_extension("tmp.mjpeg");
        let ok = Command::new("ffmpeg")
            .args([
                "-hide_banner",
                "-loglevel",
                "error",
                "-y",
                "-f",
                "lavfi",
                "-i",
            ])
            .arg("testsrc2=size=1280x720:rate=30,noise=alls=12:allf=t")
            .args(["-t", "4", "-q:v", "6", "-f", "mjpeg"])
            .arg(&tmp)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "ffmpeg makes the fake camera file");
        std::fs::rename(&tmp, &path).expect("rename camera file");
    }
    path.to_string_lossy().into_owned()
}

/// The stream every case publishes.
const STREAM: &str = "abr";

fn sh(args: &[&str]) -> bool {
    Command::new(args[0])
        .args(&args[1..])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A viewer's own namespace, joined to cascade's (`main`) by the veth pair
/// `a{i}` (in main, 10.77.i.1, where the shaping is) ↔ `b0` (here,
/// 10.77.i.2, default route to main). Deleted on drop.
struct ViewerNs {
    name: String,
    main: String,
    dev: String,
    /// The handle of the next root qdisc (see `shape_cmd`).
    next_handle: std::cell::Cell<u32>,
}

impl ViewerNs {
    fn create(main: &Netns, i: u8) -> Self {
        let name = format!("{}-v{i}", main.name);
        let dev = format!("a{i}");
        let v = Self {
            next_handle: std::cell::Cell::new(1),
            name: name.clone(),
            main: main.name.clone(),
            dev: dev.clone(),
        };
        let m = main.name.as_str();
        let n = name.as_str();
        let near = format!("10.77.{i}.1");
        let ok = sh(&["ip", "netns", "add", n])
            && sh(&["ip", "-n", n, "link", "set", "lo", "up"])
            && sh(&[
                "ip", "-n", m, "link", "add", &dev, "type", "veth", "peer", "name", "b0", "netns",
                n,
            ])
            && sh(&[
                "ip",
                "-n",
                m,
                "addr",
                "add",
                &format!("{near}/24"),
                "dev",
                &dev,
            ])
            && sh(&["ip", "-n", m, "link", "set", &dev, "up"])
            && sh(&[
                "ip",
                "-n",
                n,
                "addr",
                "add",
                &format!("10.77.{i}.2/24"),
                "dev",
                "b0",
            ])
            && sh(&["ip", "-n", n, "link", "set", "b0", "up"])
            && sh(&["ip", "-n", n, "route", "add", "default", "via", &near]);
        assert!(
            ok,
            "setting up viewer namespace {n} failed (ip netns / veth)"
        );
        v
    }

    /// The command that limits cascade → this viewer to `rate` (tc syntax,
    /// e.g. "400kbit"), or lifts the limit (`None`: a plain FIFO). Each
    /// command gets a new root handle, so the kernel grafts a fresh qdisc
    /// instead of changing the tbf in place: twice in ~20 runs, a tbf
    /// changed in place from 4 Mbit/s to 400 kbit/s passed nothing at all
    /// from then on (no media, no HTTP answer to the player's reconnects,
    /// for the remaining 20 s). Commands must run in the order made.
    fn shape_cmd(&self, rate: Option<&str>) -> Vec<String> {
        let handle = format!("{:x}:", self.next_handle.get());
        self.next_handle.set(self.next_handle.get() + 1);
        let mut c: Vec<String> = [
            "ip", "netns", "exec", &self.main, "tc", "qdisc", "replace", "dev", &self.dev, "root",
            "handle", &handle,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        match rate {
            // Burst: 20 ms of the rate, at least 2000 bytes (16 kbit, > one MTU).
            Some(r) => {
                let bits = parse_rate(r);
                let burst = (bits / 8 / 50).max(2000).to_string();
                c.extend(["tbf", "rate", r, "burst", &burst, "latency", "300ms"].map(String::from));
            }
            None => c.extend(["pfifo", "limit", "1000"].map(String::from)),
        }
        c
    }

    fn shape(&self, rate: Option<&str>) {
        let c = self.shape_cmd(rate);
        let args: Vec<&str> = c.iter().map(String::as_str).collect();
        assert!(sh(&args), "tc failed: {c:?}");
    }

    /// Starts abr.mjs `view` (Chromium) in this namespace.
    fn view(&self, cascade: &Cascade, steps: Value, timeout_secs: u64) -> Proc {
        self.view_in("abr.mjs", cascade, steps, timeout_secs)
    }

    /// The same `view` job in the browser `script` runs (abr.mjs: Chromium,
    /// firefox.mjs: Firefox).
    fn view_in(&self, script: &str, cascade: &Cascade, steps: Value, timeout_secs: u64) -> Proc {
        let job = json!({ "kind": "view", "base": cascade.base, "stream": STREAM, "steps": steps,
            "timeoutSecs": timeout_secs });
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, "node", script])
            .arg(job.to_string())
            .current_dir(browser_dir());
        Proc::spawn(c)
    }
}

impl Drop for ViewerNs {
    fn drop(&mut self) {
        sh(&["ip", "netns", "del", &self.name]);
    }
}

fn parse_rate(r: &str) -> u64 {
    let (n, mult) = if let Some(n) = r.strip_suffix("mbit") {
        (n, 1_000_000.0)
    } else if let Some(n) = r.strip_suffix("kbit") {
        (n, 1_000.0)
    } else {
        (r.trim_end_matches("bit"), 1.0)
    };
    (n.parse::<f64>().expect("rate") * mult) as u64
}

/// Waits for a runner's JSON line (also kept in the temporary directory as
/// `cascade-abr-<what>.json`, the whole trace, for a closer look).
fn result(p: &mut Proc, within: Duration, what: &str) -> Value {
    let line = p
        .wait_line(|l| l.starts_with('{'), within)
        .unwrap_or_else(|lines| panic!("{what}: runner printed no result: {lines:?}"));
    let _ = std::fs::write(
        std::env::temp_dir().join(format!("cascade-abr-{}.json", what.replace(' ', "-"))),
        &line,
    );
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("{what}: runner output {line}: {e}"))
}

/// The Chromium simulcast publisher in cascade's namespace; on drop it is
/// told to stop (a stop file) and given time to close Chromium.
struct Publisher {
    proc: Proc,
    stop: std::path::PathBuf,
    renditions: Value,
}

impl Publisher {
    /// `codec`: offer only that one (e.g. VP8, for Firefox viewers); `None`:
    /// Chromium's defaults (H.264 layers, as cascade's answer prefers).
    fn start(ns: &Netns, cascade: &Cascade, secs: u64, codec: Option<&str>) -> Self {
        let stop = std::env::temp_dir().join(format!("{}-stop", ns.name));
        let _ = std::fs::remove_file(&stop);
        let job = json!({ "kind": "publish", "base": cascade.base, "stream": STREAM, "token": TOKEN,
            "staticHost": STATIC_IP, "secs": secs, "minTopBps": MIN_TOP_BPS, "minKbps": PUBLISH_MIN_KBPS, "fakeVideo": fake_camera(), "stopFile": stop, "timeoutSecs": secs + 60, "codec": codec });
        let mut c = ns.cmd("node");
        c.current_dir(browser_dir())
            .arg("abr.mjs")
            .arg(job.to_string());
        let mut proc = Proc::spawn(c);
        let line = match proc.wait_line(
            |l| l.starts_with("PUBLISHING ") || l.starts_with('{'),
            Duration::from_secs(60),
        ) {
            Ok(l) => l,
            Err(lines) => panic!("simulcast publisher not live: {lines:?}"),
        };
        let Some(r) = line.strip_prefix("PUBLISHING ") else {
            panic!("simulcast publisher failed: {line}");
        };
        let renditions: Value = serde_json::from_str(r).expect("renditions json");
        eprintln!("abr: publisher live with renditions {renditions}");
        Self {
            proc,
            stop,
            renditions,
        }
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        let _ = std::fs::write(&self.stop, b"");
        if let Ok(l) = self
            .proc
            .wait_line(|l| l.starts_with('{'), Duration::from_secs(15))
        {
            let v: Value = serde_json::from_str(&l).unwrap_or(Value::Null);
            eprintln!(
                "abr: publisher layers at the end {} (error {})",
                v["layersAtEnd"], v["error"]
            );
        }
        let _ = std::fs::remove_file(&self.stop);
    }
}

/// One getStats sample of a viewer page.
#[derive(Clone, Copy, Debug)]
struct Sample {
    /// Epoch ms.
    t: f64,
    frames: f64,
    height: f64,
    audio: f64,
    audio_samples: f64,
    freezes: f64,
    freeze_secs: f64,
}

fn trace(v: &Value) -> Vec<Sample> {
    let n = |x: &Value, k: &str| x[k].as_f64().unwrap_or(0.0);
    v["trace"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|x| Sample {
            t: n(x, "t"),
            frames: n(x, "f"),
            height: n(x, "h"),
            audio: n(x, "a"),
            audio_samples: n(x, "as"),
            freezes: n(x, "freezes"),
            freeze_secs: n(x, "freezeSecs"),
        })
        .collect()
}

fn first_frame(tr: &[Sample]) -> Option<f64> {
    tr.iter().find(|s| s.frames > 0.0).map(|s| s.t)
}

/// The earliest time from which every sample up to `to` has a fitting
/// frame height (decoded frames only): when the viewer settled.
fn settled_at(tr: &[Sample], to: f64, fits: impl Fn(f64) -> bool) -> Option<f64> {
    let w: Vec<&Sample> = tr.iter().filter(|s| s.frames > 0.0 && s.t <= to).collect();
    let mut at = None;
    for s in w.iter().rev() {
        if fits(s.height) {
            at = Some(s.t);
        } else {
            break;
        }
    }
    at
}

/// The longest time without a newly decoded frame within [t0, t1] (on the
/// 50 ms sampling grid), and where it started.
fn max_gap(tr: &[Sample], t0: f64, t1: f64) -> (f64, f64) {
    let w: Vec<&Sample> = tr.iter().filter(|s| s.t >= t0 && s.t <= t1).collect();
    let Some(first) = w.first() else {
        return (f64::INFINITY, t0);
    };
    let (mut last_new, mut gap, mut at) = (first.t, 0.0, first.t);
    for p in w.windows(2) {
        if p[1].frames > p[0].frames {
            if p[1].t - last_new > gap {
                gap = p[1].t - last_new;
                at = last_new;
            }
            last_new = p[1].t;
        }
    }
    if let Some(l) = w.last() {
        if l.t - last_new > gap {
            gap = l.t - last_new;
            at = last_new;
        }
    }
    (gap, at)
}

/// Heights over time, compressed: "h×count" runs.
fn heights(tr: &[Sample], t0: f64) -> String {
    let mut runs: Vec<(f64, f64, usize)> = Vec::new();
    for s in tr {
        match runs.last_mut() {
            Some((h, _, n)) if *h == s.height => *n += 1,
            _ => runs.push((s.height, s.t, 1)),
        }
    }
    runs.iter()
        .map(|(h, t, n)| format!("{h}p@{:.1}s×{n}", (t - t0) / 1000.0))
        .collect::<Vec<_>>()
        .join(" ")
}

fn step(v: &Value, label: &str) -> Value {
    v["steps"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|s| s["label"] == label)
        .cloned()
        .unwrap_or(Value::Null)
}

fn at(v: &Value, key: &str) -> f64 {
    v[key].as_f64().unwrap_or(f64::NAN)
}

/// cascade (its defaults: per-viewer estimation on) and the simulcast
/// publisher in a fresh namespace.
fn setup(tag: &str, publish_secs: u64) -> Option<(Netns, Cascade, Publisher)> {
    setup_codec(tag, publish_secs, None)
}

fn setup_codec(
    tag: &str,
    publish_secs: u64,
    codec: Option<&str>,
) -> Option<(Netns, Cascade, Publisher)> {
    let ns = Netns::create(tag)?;
    let cascade = Cascade::start(&ns, &[]);
    let publisher = Publisher::start(&ns, &cascade, publish_secs, codec);
    Some((ns, cascade, publisher))
}

/// A viewer of the settle case: label, tbf rate (none: unlimited), and
/// which frame heights fit it.
type Case = (&'static str, Option<&'static str>, fn(f64) -> bool);

/// `x` is a number at most `max` (NaN, a measurement that never came, is not).
fn at_most(x: f64, max: f64) -> bool {
    x <= max
}

// Session 18: 1 of 18 (debug 0 of 4, release 1 of 7, release without the
// viewers' idle fake capture device 0 of 7), `top` 0.7% idle: str0m's
// delay-based estimate cut the unlimited viewer without loss (1.29 -> 0.30
// Mbit/s, sawtooth cuts of 30%), once the publisher turned its 720p layer
// off; the rules unchanged since session 16 (docs/quality.md, session 18).
// Session 17: 5 of 16 with session 16's rules, back to back at load
// average 3-9.6 (mostly str0m's estimate pinned under the 720p threshold
// for 10 s: in ALR its loss-based bound is what its probes measured, and
// padding does not end ALR; also a start-up collapse to 0.06 Mbit/s,
// start-up padding after an over-measuring probe on the 1.5 Mbit/s link,
// 750-830 ms freezes of the 400 kbit/s viewer); an earlier estimator
// restart during start-up made it 2 of 10 (reverted).
// Session 16: 7 of 12 with start-up padding and a layer's ramp left out of
// its live rate, 12 of 16 with padded re-probes added (5 of 13 in session 15;
// 1 of 3 the same day without them).
// Session 14 requires 360p of the 1.5 Mbit/s viewer (180p counted before):
// 1 of 4 runs after the ICE+DTLS fix, the 1.5 Mbit/s viewer left on 180p
// in the others (str0m's estimate for it grew from 0.39 to 0.77 Mbit/s over
// 8 s). Before that:
// met in 13 of 19 runs with session 13's rules (a bigger picture priced
// at least the rendition below x its pixel ratio^0.75; a 1.5 s send-queue
// lag allowed on the lowest rendition at start-up): the unlimited viewer
// on 720p 2.1-4.4 s after its first frame, at load averages up to 9.4
// that the test itself raises. Misses: a 1.0 s gap when the estimate
// swung at load 7.3, a 501 ms start-up gap, the publisher's 720p layer
// stopped by its own estimate. Without them, the same day: 0 of 3 (an
// up-switch onto a 720p layer still ramping up, start-up freezes of the
// 400 kbit/s viewer, start-up probes that found nothing). Session 12:
// 12 of 20; session 11: 1 of 8. Kept ignored (wall-clock goals on a
// shared machine) while issue 14 is open. docs/quality.md "Measured with
// Chromium".
// Run it with `--run-ignored ignored-only`, or N times with traces:
// `scripts/abr/settle.sh TAG N` (read a run with scripts/abr/timeline.py).
#[test]
#[ignore = "issue 14 open: met in 12 of 16 runs in session 16, 5 of 16 in session 17 and 1 of 18 in session 18 with the same rules (5 of 13 in session 15); the misses: str0m's estimate pinned under the 720p threshold for 10 s (the unlimited viewer left on 360p), start-up padding following a probe that over-measured the 1.5 Mbit/s link, the 400 kbit/s viewer's start-up gaps (596-809 ms) (docs/quality.md, sessions 16-17); the test itself takes the 2-core machine to load average 5-9; wall-clock goals on a shared machine, run by hand (docs/quality.md, Measured with Chromium)"]
fn abr_viewers_settle_on_the_rendition_that_fits() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some((ns, cascade, publisher)) = setup("abrsettle", 120) else {
        return;
    };
    // (label, limit, fits)
    let cases: [Case; 3] = [
        ("400k", Some("400kbit"), |h| h > 0.0 && h <= 180.0),
        // 360p: the best picture 1.5 Mbit/s carries (180p "fits" too, but
        // a viewer left on it has not got what its link carries; this
        // case accepted it until session 14).
        ("1.5M", Some("1500kbit"), |h| h > 180.0 && h <= 360.0),
        // The top rendition, at whatever size the publisher's encoder
        // makes it now (Chromium scales a layer down when its own estimate
        // or CPU falls short: 960×540 was seen on a loaded machine).
        ("unlimited", None, |h| h > 360.0),
    ];
    let viewers: Vec<ViewerNs> = (1..=3).map(|i| ViewerNs::create(&ns, i)).collect();
    for (v, (_, rate, _)) in viewers.iter().zip(&cases) {
        v.shape(*rate);
    }
    // Each plays 14 s after its first frame: ≤ 5 s to settle + 8 s judged.
    let steps =
        json!([{ "label": "watch", "until": { "newFrames": 1 }, "within": 25000, "hold": 14000 }]);
    let mut procs: Vec<Proc> = viewers
        .iter()
        .map(|v| v.view(&cascade, steps.clone(), 70))
        .collect();
    let results: Vec<Value> = procs
        .iter_mut()
        .zip(&cases)
        .map(|(p, (label, _, _))| result(p, Duration::from_secs(80), label))
        .collect();
    let rend = publisher.renditions.to_string();
    drop(publisher);
    let mut failures = Vec::new();
    for (v, (label, _, fits)) in results.iter().zip(&cases) {
        let tr = trace(v);
        let opened = at(v, "openedAt");
        let end = tr.last().map_or(f64::NAN, |s| s.t);
        let first = first_frame(&tr);
        let settled = settled_at(&tr, end, fits);
        // "never" prints as NaN: a viewer that decoded frames but never
        // settled shows its first frame and NaN for the settling.
        let join_ms = first.map_or(f64::NAN, |f| f - opened);
        let settle_ms = match (first, settled) {
            (Some(f), Some(s)) => (s - f).max(0.0),
            _ => f64::NAN,
        };
        let s0 = settled.unwrap_or(end);
        let judged_end = (s0 + 8000.0).min(end);
        let (gap, gap_at) = max_gap(&tr, s0, judged_end);
        let last = tr.last().copied();
        let audio_rate = match (tr.iter().find(|s| s.t >= s0), last) {
            (Some(a), Some(b)) if b.t > a.t => (b.audio - a.audio) * 1000.0 / (b.t - a.t),
            _ => f64::NAN,
        };
        let freezes = match (
            tr.iter().find(|s| s.t >= s0),
            tr.iter().rev().find(|s| s.t <= judged_end),
        ) {
            (Some(a), Some(b)) => (b.freezes - a.freezes, b.freeze_secs - a.freeze_secs),
            _ => (f64::NAN, f64::NAN),
        };
        eprintln!(
            "abr settle {label}: first frame {join_ms:.0} ms after opening, settled {settle_ms:.0} ms after the first frame \
             (from opening {:.0} ms), judged {:.1} s after settling: longest gap {gap:.0} ms ({:.1} s in), chromium freezes {} ({:.3} s), \
             audio {audio_rate:.0} pkt/s, audio samples {}; heights {}; error {}",
            settled.map_or(f64::NAN, |s| s - opened),
            (judged_end - s0) / 1000.0,
            (gap_at - s0) / 1000.0,
            freezes.0,
            freezes.1,
            last.map_or(0.0, |s| s.audio_samples),
            heights(&tr, opened),
            v["error"],
        );
        if v["ok"] != true {
            failures.push(format!(
                "{label}: runner failed: {} {}",
                v["error"], v["logs"]
            ));
            continue;
        }
        if !at_most(settle_ms, 5000.0) {
            failures.push(format!(
                "{label}: settled {settle_ms:.0} ms after the first frame (> 5 s, or never)"
            ));
        }
        if !at_most(7500.0, judged_end - s0) {
            failures.push(format!(
                "{label}: only {:.0} ms judged after settling",
                judged_end - s0
            ));
        }
        if !at_most(gap, 500.0) {
            failures.push(format!(
                "{label}: a freeze of {gap:.0} ms after settling (> 500 ms)"
            ));
        }
    }
    eprintln!(
        "abr settle: renditions {}; player stats {}",
        rend,
        player_stats(&results)
    );
    assert!(failures.is_empty(), "{failures:#?}");
}

/// What the viewers' player pages said last (its stats line names the
/// rendition and the estimate).
fn player_stats(results: &[Value]) -> String {
    results
        .iter()
        .map(|v| v["stats"].to_string())
        .collect::<Vec<_>>()
        .join(" | ")
}

// Session 11: the viewer climbs to 720p on the raised link and holds it
// (14-23 s after the raise); on the lowered one it shows 180p after
// 1.16-1.39 s (8 of 8 within 2 s) and then plays 10 s more, with the
// longest gap 0.80-1.10 s (7 of 8 within 1 s): the onset report is read
// within ~0.5 s and the send queue emptied at the switch, but the 180p
// keyframe still waits behind the tbf's 300 ms queue. Session 13: 180p
// after 1.04-1.37 s, longest gaps 0.60-1.10 s (7 of 10 within 1 s).
// Ignored because its goals are wall-clock thresholds on a shared machine.
// docs/quality.md "Measured with Chromium", sessions 9-13.
#[test]
#[ignore = "issue 14 open: the drop's longest gap is 0.4-1.15 s; with the final rules at most 1 s in 16 of 19 runs (sessions 13-14: 0.60-1.10 s), at the limit of the chain (a lossy report 0.45 s after the fall, then the tbf's 300 ms queue); wall-clock goals (2 s switch, 1 s freeze) on a shared machine, run by hand (docs/quality.md, Measured with Chromium, sessions 12-13)"]
fn abr_viewer_climbs_when_the_limit_rises_and_drops_when_it_falls() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some((ns, cascade, publisher)) = setup("abrclimb", 200) else {
        return;
    };
    let viewer = ViewerNs::create(&ns, 1);
    viewer.shape(Some("400kbit"));
    let steps = json!([
        // Settled at ≤ 180p, played there 8 s: raise the limit. 4 Mbit/s is
        // ~1.5× the 720p layer (2.5 Mbit/s cap, ~2.6 measured with its
        // overhead): room for the controller's 1.2× headroom and a
        // keyframe. (It was 3 Mbit/s when the layer measured ~2.0 before
        // the publisher kept its resolution, tests/browser/simulcast.html
        // keepRes; 3 Mbit/s is under 1.2 × 2.6 and never holds 720p.)
        { "label": "settled", "until": { "maxH": 180 }, "within": 25000, "hold": 8000,
          "run": viewer.shape_cmd(Some("4mbit")) },
        // At 720p, played there 6 s: lower it again.
        { "label": "climbed", "until": { "minH": 720 }, "within": 60000, "hold": 6000,
          "run": viewer.shape_cmd(Some("400kbit")) },
        // Then 10 s more on the narrow link: 180p must keep playing (the
        // longest gap covers them). With 5 s here, a viewer that lost its
        // video ~5.5 s after the drop (str0m's estimator restarted at the
        // collapse, then starving its own pacer) passed 13 of 14 runs.
        { "label": "dropped", "until": { "maxH": 180 }, "within": 20000, "hold": 10000 },
    ]);
    let mut p = viewer.view(&cascade, steps, 140);
    let v = result(&mut p, Duration::from_secs(150), "climb viewer");
    drop(publisher);
    let tr = trace(&v);
    let opened = at(&v, "openedAt");
    let (settled, climbed, dropped) = (
        step(&v, "settled"),
        step(&v, "climbed"),
        step(&v, "dropped"),
    );
    let raised_at = at(&settled, "ranAt");
    let lowered_at = at(&climbed, "ranAt");
    let climb_ms = at(&climbed, "reachedAt") - raised_at;
    let to_360_ms = tr
        .iter()
        .find(|s| s.t >= raised_at && s.height >= 360.0)
        .map_or(f64::NAN, |s| s.t - raised_at);
    let drop_ms = at(&dropped, "reachedAt") - lowered_at;
    // What the viewer showed when the limit fell: the drop is only measured
    // if it was still on 720p (a 4 Mbit/s link carries it), not already
    // knocked down by itself.
    let height_lowered = tr
        .iter()
        .rev()
        .find(|s| s.t <= lowered_at)
        .map_or(f64::NAN, |s| s.height);
    let end = tr.last().map_or(f64::NAN, |s| s.t);
    let (gap, gap_at) = max_gap(&tr, raised_at, end);
    let (gap_up, _) = max_gap(&tr, raised_at, lowered_at);
    let (gap_down, _) = max_gap(&tr, lowered_at, end);
    let (gap_before, _) = max_gap(&tr, at(&settled, "reachedAt"), raised_at);
    eprintln!(
        "abr climb: settled at ≤ 180p {:.0} ms after opening; limit 400 kbit/s → 4 Mbit/s: ≥ 360p after {to_360_ms:.0} ms, \
         720p after {climb_ms:.0} ms; 4 Mbit/s → 400 kbit/s: ≤ 180p after {drop_ms:.0} ms; longest gap before the raise \
         {gap_before:.0} ms, climbing {gap_up:.0} ms, dropping {gap_down:.0} ms (overall {gap:.0} ms at {:.1} s); \
         on {height_lowered:.0}p when the limit fell; \
         steps {}; heights {}; stats {}; error {}",
        at(&settled, "reachedAt") - opened,
        (gap_at - opened) / 1000.0,
        v["steps"],
        heights(&tr, opened),
        v["stats"],
        v["error"],
    );
    assert!(
        v["ok"] == true,
        "runner failed: {} {}",
        v["error"],
        v["logs"]
    );
    assert!(
        settled["reached"] == true,
        "never settled at ≤ 180p behind 400 kbit/s"
    );
    assert!(
        climbed["reached"] == true,
        "did not climb to 720p within 60 s of 4 Mbit/s"
    );
    assert!(
        height_lowered >= 720.0,
        "left 720p by itself on the 4 Mbit/s link: on {height_lowered:.0}p when the limit fell"
    );
    assert!(
        dropped["reached"] == true,
        "did not drop to ≤ 180p within 20 s of 400 kbit/s"
    );
    assert!(
        drop_ms <= 2000.0,
        "the drop to ≤ 180p took {drop_ms:.0} ms (> 2 s)"
    );
    assert!(
        gap <= 1000.0,
        "a freeze of {gap:.0} ms (> 1 s) while climbing or dropping"
    );
}

// Met in 14 of the last 15 runs (issue 14 stays open; kept ignored until it
// holds): audio always keeps flowing behind 100 kbit/s with video paused,
// and since session 9 (a stale loss reading no longer blocks the way up)
// video comes back 8.0-12.8 s after the lift (9.3-10.9 s in session 13);
// in one run (session 9) 30 frames took 40.09 s, 90 ms over the test's
// 40 s. docs/quality.md.
#[test]
#[ignore = "issue 14 open: met in 15 of the last 16 runs, 30 frames after 40.09 s in the other (docs/quality.md, sessions 9-14)"]
fn abr_viewer_below_the_lowest_rendition_keeps_audio() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some((ns, cascade, publisher)) = setup("abraudio", 120) else {
        return;
    };
    let viewer = ViewerNs::create(&ns, 1);
    viewer.shape(Some("100kbit"));
    let steps = json!([
        // Audio arriving; 15 s at 100 kbit/s, then the limit is lifted.
        { "label": "audio", "until": { "audio": 50 }, "within": 30000, "hold": 15000,
          "run": viewer.shape_cmd(None) },
        { "label": "video", "until": { "newFrames": 30 }, "within": 40000, "hold": 3000 },
    ]);
    let mut p = viewer.view(&cascade, steps, 100);
    let v = result(&mut p, Duration::from_secs(110), "audio viewer");
    drop(publisher);
    let tr = trace(&v);
    let opened = at(&v, "openedAt");
    let (audio, video) = (step(&v, "audio"), step(&v, "video"));
    let lifted_at = at(&audio, "ranAt");
    // Judged from 5 s after audio first arrived (the controller's way
    // down from its start on the best rendition) to the lift.
    let from = at(&audio, "reachedAt") + 5000.0;
    let limited: Vec<&Sample> = tr
        .iter()
        .filter(|s| s.t >= from && s.t <= lifted_at)
        .collect();
    // Audio in every 1 s of that span (Opus: 50 packets/s): from each
    // sample to the first one at least 1 s later.
    let min_audio_per_s = limited
        .iter()
        .enumerate()
        .filter_map(|(i, a)| {
            let b = limited[i..].iter().find(|b| b.t - a.t >= 1000.0)?;
            Some((b.audio - a.audio) * 1000.0 / (b.t - a.t))
        })
        .fold(f64::INFINITY, f64::min);
    let samples_gained = match (limited.first(), limited.last()) {
        (Some(a), Some(b)) => b.audio_samples - a.audio_samples,
        _ => f64::NAN,
    };
    let frames_limited = match (limited.first(), limited.last()) {
        (Some(a), Some(b)) => b.frames - a.frames,
        _ => f64::NAN,
    };
    let resumed_ms = tr
        .iter()
        .zip(tr.iter().skip(1))
        .find(|(a, b)| a.t >= lifted_at && b.frames > a.frames)
        .map_or(f64::NAN, |(_, b)| b.t - lifted_at);
    eprintln!(
        "abr audio-only: at 100 kbit/s (from {:.1} s to {:.1} s after opening): audio ≥ {min_audio_per_s:.0} pkt/s in every second, \
         {samples_gained} samples, {frames_limited} video frames decoded; limit lifted: video frames again after {resumed_ms:.0} ms, \
         30 frames after {:.0} ms; heights {}; stats {}; error {}",
        (from - opened) / 1000.0,
        (lifted_at - opened) / 1000.0,
        at(&video, "reachedAt") - lifted_at,
        heights(&tr, opened),
        v["stats"],
        v["error"],
    );
    assert!(
        v["ok"] == true,
        "runner failed: {} {}",
        v["error"],
        v["logs"]
    );
    assert!(audio["reached"] == true, "no audio behind 100 kbit/s");
    assert!(
        limited.len() >= 20,
        "too few samples while limited: {}",
        limited.len()
    );
    assert!(
        min_audio_per_s >= 20.0,
        "audio stalled behind 100 kbit/s: {min_audio_per_s:.0} packets/s at worst"
    );
    assert!(
        samples_gained > 0.0,
        "no audio samples decoded behind 100 kbit/s"
    );
    assert!(
        frames_limited <= 30.0,
        "video kept coming ({frames_limited} frames) behind 100 kbit/s: not audio only"
    );
    assert!(
        video["reached"] == true,
        "video did not resume within 40 s of lifting the limit"
    );
}

/// Estimation works with Firefox too (the issue asks for Chromium and
/// Firefox): Debian's Firefox ESR plays the player page on Auto, its
/// transport-wide congestion feedback drives str0m's estimate, and the
/// viewer climbs to 720p on an unlimited link, settles on 360p when its
/// link is cut to 1.5 Mbit/s and drops to 180p at 400 kbit/s. The
/// publisher sends VP8 layers (Firefox here has no H.264: its OpenH264
/// plugin is a download). Not ignored: the bounds (30 s to climb, 25 s to
/// settle, 10 s to drop) are for "it works", far from the goals (5 s to
/// settle, 2 s to drop), whose measured times are printed for
/// docs/quality.md.
#[test]
fn abr_in_firefox_climbs_and_drops() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some((ns, cascade, publisher)) = setup_codec("abrfox", 120, Some("vp8")) else {
        return;
    };
    assert!(
        std::path::Path::new("/usr/bin/firefox-esr").exists(),
        "Debian firefox-esr missing (scripts/test.sh installs it)"
    );
    let viewer = ViewerNs::create(&ns, 1);
    let steps = json!([
        { "label": "climbed", "until": { "minH": 720 }, "within": 30000, "hold": 4000,
          "run": viewer.shape_cmd(Some("1500kbit")) },
        // Loss sends it straight to the lowest rendition; then it climbs
        // back to the one that fits.
        { "label": "360p", "until": { "minH": 360, "maxH": 360 }, "within": 25000, "hold": 3000,
          "run": viewer.shape_cmd(Some("400kbit")) },
        { "label": "dropped", "until": { "maxH": 180 }, "within": 10000, "hold": 4000 },
    ]);
    let mut p = viewer.view_in("firefox.mjs", &cascade, steps, 80);
    let v = result(&mut p, Duration::from_secs(90), "firefox viewer");
    drop(publisher);
    let tr = trace(&v);
    let opened = at(&v, "openedAt");
    let (climbed, mid, dropped) = (step(&v, "climbed"), step(&v, "360p"), step(&v, "dropped"));
    let first = first_frame(&tr).unwrap_or(f64::NAN);
    let (cut1, cut2) = (at(&climbed, "ranAt"), at(&mid, "ranAt"));
    let end = tr.last().map_or(f64::NAN, |s| s.t);
    let (gap_up, _) = max_gap(&tr, first, cut1);
    let (gap_mid, _) = max_gap(&tr, cut1, cut2);
    let (gap_down, _) = max_gap(&tr, cut2, end);
    eprintln!(
        "abr firefox ({}): first frame {:.0} ms after opening, 720p {:.0} ms after it; \
         1.5 Mbit/s: on 360p after {:.0} ms; 400 kbit/s: ≤ 180p after {:.0} ms; longest gap \
         before the first cut {gap_up:.0} ms, at 1.5 Mbit/s {gap_mid:.0} ms, at 400 kbit/s {gap_down:.0} ms; \
         heights {}; stats {}; error {}",
        v["userAgent"],
        first - opened,
        at(&climbed, "reachedAt") - first,
        at(&mid, "reachedAt") - cut1,
        at(&dropped, "reachedAt") - cut2,
        heights(&tr, opened),
        v["stats"],
        v["error"],
    );
    assert!(
        v["ok"] == true,
        "firefox runner failed: {} {}",
        v["error"],
        v["logs"]
    );
    let hs = heights(&tr, opened);
    assert!(
        climbed["reached"] == true,
        "Firefox on Auto did not reach 720p within 30 s on an unlimited link: heights {hs}"
    );
    assert!(
        mid["reached"] == true,
        "Firefox did not settle on 360p within 25 s of 1.5 Mbit/s: heights {hs}"
    );
    assert!(
        dropped["reached"] == true,
        "Firefox did not drop to ≤ 180p within 10 s of 400 kbit/s: heights {hs}"
    );
}
