//! Real clients with their defaults (issue 11): what viewers and publishers
//! that nobody configured for cascade get.
//!
//! - A simulcast WHIP publisher, as a browser app writes one (Chromium,
//!   `sendEncodings` rid q/h/f at 320×180/640×360/1280×720, audio too):
//!   the player page must get the top layer steadily.
//! - OvenPlayer from npm (OME WebSocket signalling, the server makes the
//!   offer) and the player page, each against a matrix of publishes: x264
//!   High over RTMP with and without B-frames, WHIP High / Main /
//!   Constrained Baseline (loadtest's str0m publisher), VP8 and VP9 over
//!   WHIP (Chromium's /publish page). Every case must play. Two tests per
//!   player (ffmpeg and str0m publishers; Chromium's pages), so that one
//!   test's encoders fit two cores.
//!
//! Headless Debian Chromium in a network namespace as tests/browser.rs
//! (tests/browser/netns.rs, run.mjs kinds "watch-many" and "simulcast").
//! Root only; the `eprintln!` lines say what each case got.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns

#[allow(dead_code)] // shared with tests/browser.rs, which uses all of it
#[path = "browser/netns.rs"]
mod netns;

use std::time::Duration;

use netns::{urlencode, Cascade, Netns, Proc, CASCADE_IP, STATIC_IP, TOKEN};
use serde_json::{json, Value};

/// What the runner may take of a test's 60 s (cascade and the publishers
/// start first).
const RUNNER_BUDGET: Duration = Duration::from_secs(50);
/// The window each player is judged over.
const WINDOW_SECS: u64 = 8;
/// Frames a player must decode in the window (30 fps published: 240).
const MIN_FRAMES: f64 = 100.0;
/// Audio packets a player must receive in the window (Opus at 50/s: 400).
const MIN_AUDIO: f64 = 100.0;
/// How long the publishers run: longer than any test.
const PUBLISH_SECS: u32 = 60;

/// cascade (`all`) with its defaults, RTMP on a known port (the namespace is
/// private, so a fixed port cannot clash).
fn start(ns: &Netns) -> (Cascade, String) {
    let rtmp = format!("{CASCADE_IP}:1935");
    (Cascade::start(ns, &["--rtmp", &rtmp]), rtmp)
}

/// Debian's ffmpeg in the namespace: testsrc2 640×360 at 30 fps as x264
/// High (level 3.0 for this size: `profile-level-id` 64001e) + AAC, sent as
/// FLV over RTMP to `stream`, as OBS or a script would; `bframes` false adds
/// `-bf 0` (x264's default is 3 B-frames, which cascade re-encodes).
fn ffmpeg_rtmp(ns: &Netns, rtmp: &str, stream: &str, bframes: bool) -> Proc {
    let mut c = ns.cmd("ffmpeg");
    c.args(["-hide_banner", "-loglevel", "error", "-re"])
        .args(["-f", "lavfi", "-i"])
        .arg(format!(
            "testsrc2=size=640x360:rate=30:duration={PUBLISH_SECS}"
        ))
        .args(["-f", "lavfi", "-i"])
        .arg(format!(
            "sine=frequency=1000:sample_rate=48000:duration={PUBLISH_SECS}"
        ))
        .args(["-map", "0:v", "-map", "1:a", "-c:v", "libx264"])
        .args(["-profile:v", "high", "-preset", "veryfast", "-g", "60"])
        .args(["-pix_fmt", "yuv420p"]);
    if !bframes {
        c.args(["-bf", "0"]);
    }
    c.args(["-c:a", "aac", "-ac", "2", "-f", "flv"])
        .arg(format!("rtmp://{rtmp}/live/{stream}?token={TOKEN}"))
        .stdin(std::process::Stdio::null());
    Proc::spawn(c)
}

/// The publish matrix, first half: (stream name, what it is). ffmpeg and
/// loadtest's WHIP publisher. The matrix is two halves, each a test of its
/// own, so that no test runs more encoders than two cores carry: all seven
/// publishers at once (three x264 encoders, two Chromium VP8/VP9 page
/// encoders, seven players) starved Chromium's encoders in fresh-clone CI
/// runs even with the machine to themselves (the VP9 page scaled itself
/// down to 480×270 and sent 52 frames in 8 s; the RTMP B-frame re-encode
/// once gave 170 frames in all).
const ENCODER_CASES: [(&str, &str); 5] = [
    (
        "rtmp-high-bf",
        "x264 High with B-frames over RTMP (cascade re-encodes)",
    ),
    ("rtmp-high", "x264 High -bf 0 over RTMP"),
    ("whip-high", "WHIP H.264 High 64001f"),
    ("whip-main", "WHIP H.264 Main 4d001f"),
    ("whip-baseline", "WHIP H.264 Constrained Baseline 42e01f"),
];

/// The publish matrix, second half: Chromium's /publish page.
const PAGE_CASES: [(&str, &str); 2] = [
    ("whip-vp8", "WHIP VP8 from Chromium's /publish page"),
    ("whip-vp9", "WHIP VP9 from Chromium's /publish page"),
];

/// Which player a matrix test opens for each stream.
#[derive(Clone, Copy)]
enum Viewer {
    /// tests/browser/ovenplayer.html (OvenPlayer from npm) on another
    /// origin, source `ws://HOST/ws/live/STREAM`.
    OvenPlayer,
    /// cascade's player page `/play/STREAM` (WHEP).
    PlayerPage,
}

impl Viewer {
    fn name(self) -> &'static str {
        match self {
            Self::OvenPlayer => "ovenplayer",
            Self::PlayerPage => "player page",
        }
    }

    fn url(self, cascade: &Cascade, stream: &str) -> String {
        match self {
            Self::OvenPlayer => {
                let ws = format!(
                    "{}/ws/live/{stream}",
                    cascade.base.replacen("http://", "ws://", 1)
                );
                format!("static:/ovenplayer.html?ws={}", urlencode(&ws))
            }
            Self::PlayerPage => format!("{}/play/{stream}", cascade.base),
        }
    }
}

fn num(v: &Value, path: &[&str]) -> f64 {
    path.iter()
        .fold(v, |v, k| &v[*k])
        .as_f64()
        .unwrap_or(f64::NAN)
}

/// Starts the publishes of `cases` (of [`ENCODER_CASES`] and
/// [`PAGE_CASES`]) in one namespace (separate stream names), opens `viewer`
/// for each in one Chromium at once, and checks every case played >
/// [`MIN_FRAMES`] frames with audio in [`WINDOW_SECS`]. All cases are
/// printed before the first failure is reported.
fn matrix(tag: &str, viewer: Viewer, cases: &[(&str, &str)]) {
    let Some(ns) = Netns::create(tag) else {
        return;
    };
    let has = |stream: &str| cases.iter().any(|(s, _)| *s == stream);
    let (cascade, rtmp) = start(&ns);
    let _ff: Vec<Proc> = [("rtmp-high-bf", true), ("rtmp-high", false)]
        .into_iter()
        .filter(|(s, _)| has(s))
        .map(|(s, bframes)| ffmpeg_rtmp(&ns, &rtmp, s, bframes))
        .collect();
    let secs = u64::from(PUBLISH_SECS);
    let _whip: Vec<Proc> = [
        ("whip-high", "high"),
        ("whip-main", "main"),
        ("whip-baseline", "baseline"),
    ]
    .into_iter()
    .filter(|(s, _)| has(s))
    .map(|(s, profile)| ns.publisher_with_profile(&cascade, s, secs, profile))
    .collect();
    let publishers: Vec<Value> = [("whip-vp8", "vp8"), ("whip-vp9", "vp9")]
        .into_iter()
        .filter(|(s, _)| has(s))
        .map(|(s, codec)| {
            json!({ "label": s,
                "url": format!("{}/publish/{s}?token={TOKEN}&autostart=1&codec={codec}", cascade.base) })
        })
        .collect();
    let pages: Vec<Value> = cases
        .iter()
        .map(|(s, _)| json!({ "label": s, "url": viewer.url(&cascade, s) }))
        .collect();
    let v = ns.run_browser(
        json!({
            "kind": "watch-many", "base": cascade.base, "staticHost": STATIC_IP,
            "publishers": publishers,
            "streams": cases.iter().map(|(s, _)| s).collect::<Vec<_>>(),
            "pages": pages, "secs": WINDOW_SECS, "warmSecs": 1, "firstFrameSecs": 12,
        }),
        RUNNER_BUDGET,
    );
    assert!(v["ok"] == true, "runner failed: {v:#}");
    let mut failed = Vec::new();
    for &(stream, what) in cases {
        let r = &v["results"][stream];
        let w = &r["window"];
        let (frames, audio) = (num(w, &["frames"]), num(w, &["audio"]));
        eprintln!(
            "{} {stream} ({what}): {frames} frames decoded and {audio} audio packets in {WINDOW_SECS} s, \
             size {}, first frame {} ms after opening, longest gap {} ms, codec {}, events {}",
            viewer.name(),
            r["size"],
            r["firstFrameMs"],
            w["maxGapMs"],
            r["codec"],
            r["events"],
        );
        if !(frames > MIN_FRAMES && audio > MIN_AUDIO) {
            failed.push(format!("{stream}: {r}"));
        }
    }
    assert!(
        failed.is_empty(),
        "{}: {} of {} cases do not play (> {MIN_FRAMES} frames and > {MIN_AUDIO} audio packets in {WINDOW_SECS} s):\n{}\nlive streams: {}\nlogs: {:#}",
        viewer.name(),
        failed.len(),
        cases.len(),
        failed.join("\n"),
        v["live"],
        v["logs"],
    );
}

/// OvenPlayer (npm, its defaults) plays every publish of the matrix: the
/// server's offer must name an H.264 `profile-level-id` Chromium accepts
/// whatever profile was published (Debian's Chromium receives only
/// 42001f/42e01f/4d001f/f4001f and rejects a video m-line of 64001e alone,
/// which leaves OvenPlayer a black picture with sound).
#[test]
fn ovenplayer_plays_every_rtmp_and_whip_publish() {
    matrix("ovmatrix", Viewer::OvenPlayer, &ENCODER_CASES);
}

/// OvenPlayer plays Chromium's VP8 and VP9 publishes.
#[test]
fn ovenplayer_plays_browser_vp8_and_vp9_publishes() {
    matrix("ovpages", Viewer::OvenPlayer, &PAGE_CASES);
}

/// The player page (WHEP, the browser offers) plays the same matrix.
#[test]
fn player_page_plays_every_rtmp_and_whip_publish() {
    matrix("plmatrix", Viewer::PlayerPage, &ENCODER_CASES);
}

/// The player page plays Chromium's VP8 and VP9 publishes.
#[test]
fn player_page_plays_browser_vp8_and_vp9_publishes() {
    matrix("plpages", Viewer::PlayerPage, &PAGE_CASES);
}

/// A browser's simulcast WHIP publish (three layers of one 1280×720
/// camera) plays on the player page at the top layer's size, steadily.
/// Chromium offers VP8 first, but cascade's answer lists H.264 first, so
/// Chromium's defaults send H.264 (OpenH264) layers.
///
/// Freezes are judged on the viewer's own getStats(), sampled every 100 ms
/// inside the page (run.mjs `__startTrace`, so a slow round trip to node
/// does not count): the longest time between two samples where
/// `framesDecoded` rose must stay ≤ 500 ms, every sample of the window must
/// be 720 high, and > 100 frames decoded in the 8 s window. Chromium's own
/// `freezeCount` (frame gaps over max(3× mean, mean + 150 ms)) is printed but
/// not asserted: on a busy 2-core machine it counts hiccups no viewer sees.
///
/// The viewer opens once Chromium sends the top layer steadily (≥ 10 frames
/// in a second): on a loaded machine its bandwidth estimate paused that
/// layer for seconds right after the start (the ingest then rightly
/// carried 360p and switched up later). A pause inside the window still
/// fails; the message says at what rate the publisher sent the top layer.
///
/// Before the fix all three layers reach the one track: the viewer decoded
/// ~8 frames in 8 s, 320×180, 3.1 s without a new frame.
///
/// Since renditions: each layer is a rendition (checked in `/api/streams`),
/// the viewer on Auto climbs to the top one (its bandwidth estimate; the
/// window opens once it is there, at most 20 s after the first frame), and
/// the player page's quality menu switches it to 180p and back to Auto
/// (720p), judged on getStats' frame height; so does OvenPlayer's (OME signalling: playlist,
/// change_rendition, rendition_changed).
#[test]
fn simulcast_whip_publish_plays_the_top_layer() {
    simulcast("simulcast", None);
}

/// The same with only VP8 offered (libvpx layers), what a publisher that
/// prefers VP8 sends; its top layer starts 3 s after connecting (as when
/// Chromium's bandwidth estimate starts low), so the stream goes live with
/// two renditions and the ingest adds the top one as it arrives: the
/// viewer, opened before it exists, moves up to it by itself (its ladder
/// follows the catalog) and plays 720p in the window.
#[test]
fn simulcast_vp8_whip_publish_plays_the_top_layer() {
    simulcast("simvp8", Some("vp8"));
}

/// Publishes simulcast from tests/browser/simulcast.html (`codec`: offer
/// only that one) and checks the player page as described at
/// [`simulcast_whip_publish_plays_the_top_layer`].
fn simulcast(tag: &str, codec: Option<&str>) {
    let Some(ns) = Netns::create(tag) else {
        return;
    };
    let (cascade, _) = start(&ns);
    let label = codec.unwrap_or("defaults");
    let v = ns.run_browser(
        json!({
            "kind": "simulcast", "base": cascade.base, "staticHost": STATIC_IP,
            "stream": "sim", "token": TOKEN, "secs": WINDOW_SECS, "topWaitSecs": 10,
            "warmSecs": if codec.is_some() { 5 } else { 2 },
            // Auto (per-viewer estimation) starts low and climbs to the top.
            "autoWant": 720, "autoWaitSecs": 20,
            "codec": codec,
            // Then the player's quality menu: 180p, and back to Auto (720p).
            "switchTo": [["q", 180], ["auto", 720]], "timeoutSecs": 105,
            "lateTop": if codec.is_some() { 3000 } else { 0 },
            "viewBeforeTop": codec.is_some(),
            // And OvenPlayer's menu: the 180p rendition (index 2), then Auto.
            "ovenSwitchTo": [[2, 180], [-1, 720]],
        }),
        RUNNER_BUDGET + Duration::from_secs(50),
    );
    // What Chromium sent per layer (the lead's question: does its bandwidth
    // estimate turn the top layer on without feedback from the server?).
    // Each layer's mean bitrate since the first trace sample that had it.
    let first_bytes = |rid: &Value| -> (f64, f64) {
        v["publisherTrace"]
            .as_array()
            .into_iter()
            .flatten()
            .find_map(|s| {
                s["layers"]
                    .as_array()?
                    .iter()
                    .find(|l| &l["rid"] == rid && num(l, &["bytesSent"]) > 0.0)
                    .map(|l| (num(s, &["atMs"]), num(l, &["bytesSent"])))
            })
            .unwrap_or((f64::NAN, f64::NAN))
    };
    for l in v["publisher"]["layers"].as_array().into_iter().flatten() {
        let (t0, b0) = first_bytes(&l["rid"]);
        let kbps = (num(l, &["bytesSent"]) - b0) * 8.0 / (num(&v["publisher"], &["atMs"]) - t0);
        eprintln!(
            "simulcast ({label}) publisher layer {}: {}×{} {} frames sent, {kbps:.0} kbit/s sent, target {} bit/s, limited by {} {}, {} ({}), active {}, plis {}",
            l["rid"],
            l["frameWidth"],
            l["frameHeight"],
            l["framesSent"],
            l["targetBitrate"],
            l["qualityLimitationReason"],
            l["qualityLimitationDurations"],
            l["codec"],
            l["encoderImplementation"],
            l["active"],
            l["pliCount"],
        );
    }
    let top_trace: Vec<String> = v["publisherTrace"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| {
            let layers: Vec<String> = s["layers"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|l| format!("{}:{}p/{}", l["rid"], l["frameHeight"], l["framesSent"]))
                .collect();
            format!(
                "{}ms [{}] bwe {}",
                s["atMs"],
                layers.join(" "),
                s["outBitrate"]
            )
        })
        .collect();
    eprintln!(
        "simulcast ({label}) viewer on Auto at 720p {} ms after its first frame",
        v["autoAtMs"]
    );
    eprintln!(
        "simulcast ({label}) publisher over time: {}",
        top_trace.join("; ")
    );
    // The answer's lines that decide simulcast and congestion feedback
    // (all of them are in the runner's JSON).
    let answer: Vec<&str> = v["answerLines"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .filter(|l| {
            l.starts_with("m=")
                || l.starts_with("a=simulcast")
                || l.starts_with("a=rid")
                || l.contains("transport-wide-cc")
        })
        .collect();
    eprintln!(
        "simulcast ({label}): top layer sent steadily {} ms after connecting; offer {}; answer {answer:?}",
        v["topLayerSteadyAfterMs"], v["offerSimulcast"]
    );
    // The publisher's own top layer during the viewer's window: the lowest
    // rate of its frames between two samples. Near 0 means Chromium paused
    // it (bandwidth estimate), and the ingest rightly switched layers.
    let at = |i: usize| v["windowAtMs"][i].as_f64().unwrap_or(f64::NAN);
    let (w0, w1) = (at(0), at(1));
    let top: Vec<(f64, f64)> = v["publisherTrace"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| {
            let f = s["layers"].as_array()?.iter().find(|l| l["rid"] == "f")?;
            Some((num(s, &["atMs"]), num(f, &["framesSent"])))
        })
        .collect();
    let top_min_fps = top
        .windows(2)
        .filter(|p| p[1].0 >= w0 && p[0].0 <= w1)
        .map(|p| (p[1].1 - p[0].1) * 1000.0 / (p[1].0 - p[0].0))
        .fold(f64::INFINITY, f64::min);
    eprintln!(
        "simulcast ({label}): the publisher's top layer ran at ≥ {top_min_fps:.1} fps during the viewer's window"
    );
    let w = &v["viewer"]["window"];
    eprintln!(
        "simulcast ({label}) viewer: {} frames in {WINDOW_SECS} s, heights {} (last {}), sizes over time {}, longest gap {} ms \
         ({} ms into the window), chromium freezes {} ({} s), codec {}; streams {}",
        w["frames"],
        w["heights"],
        w["lastHeights"],
        w["sizes"],
        w["maxGapMs"],
        w["maxGapStartMs"],
        w["freezes"],
        w["freezeSecs"],
        v["viewer"]["codec"],
        v["streams"],
    );
    assert!(v["ok"] == true, "runner failed: {v:#}");
    // The failure messages leave out the per-second publisher trace (printed above).
    let brief = json!({ "viewer": v["viewer"], "publisher": v["publisher"], "logs": v["logs"] });
    assert!(
        num(w, &["frames"]) > MIN_FRAMES,
        "> {MIN_FRAMES} frames decoded in {WINDOW_SECS} s: {brief:#}"
    );
    assert_eq!(
        w["heights"],
        json!([720]),
        "the top layer (720 high) in every sample of the window (the publisher sent it at ≥ {top_min_fps:.1} fps then): {brief:#}"
    );
    assert!(
        num(w, &["maxGapMs"]) <= 500.0,
        "no freeze over 500 ms: {brief:#}"
    );
    // Every layer is a rendition (/api/streams), the player's menu lists
    // them by height and switches: the decoded frame size follows.
    let renditions = &v["streams"][0]["renditions"];
    eprintln!(
        "simulcast ({label}) renditions {renditions}; menu {}; switches {}",
        v["menu"], v["switches"]
    );
    assert_eq!(
        renditions.as_array().map(Vec::len),
        Some(3),
        "three renditions: {}",
        v["streams"]
    );
    assert_eq!(v["menu"], json!(["Auto", "720p", "360p", "180p"]));
    for s in v["switches"].as_array().into_iter().flatten() {
        assert_eq!(s["height"], s["want"], "menu pick {s}");
    }
    assert_eq!(v["switches"].as_array().map(Vec::len), Some(2));
    eprintln!(
        "simulcast ({label}) OvenPlayer levels {}; switches {}; events {}",
        v["ovenLevels"], v["ovenSwitches"], v["ovenEvents"]
    );
    let heights: Vec<&Value> = v["ovenLevels"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|l| &l["height"])
        .collect();
    assert_eq!(
        heights,
        [&json!(720), &json!(360), &json!(180)],
        "OvenPlayer's quality levels"
    );
    for s in v["ovenSwitches"].as_array().into_iter().flatten() {
        assert_eq!(s["height"], s["want"], "OvenPlayer pick {s}");
    }
    assert_eq!(v["ovenSwitches"].as_array().map(Vec::len), Some(2));
}

/// Not a test on its own: the WHIP publisher that the tests above start
/// inside their namespace by running this test binary again there.
#[test]
fn helper_whip_publisher() {
    netns::publisher_main();
}
