//! B-frames in Chromium: Debian's ffmpeg publishes x264 over RTMP (default
//! B-frames, and `-bf 0`) with the frame number drawn as a barcode, the player
//! page plays it in headless Chromium, and tests/browser/smooth.mjs reads
//! getStats() and the barcode of every presented frame (docs/bframes.md).
//! B-frame streams are re-encoded at ingest by default (`--bframes
//! transcode`, ffmpeg in the namespace); `--bframes drop` passes them
//! through and the edge drops their B slices.
//! Root only (network namespace, as tests/browser.rs).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns

#[allow(dead_code)] // shared with tests/browser.rs, which uses all of it
#[path = "browser/netns.rs"]
mod netns;
mod rtmp_client;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use netns::{Netns, Proc, CASCADE_IP, TOKEN};
use serde_json::{json, Value};

/// One test's budget (≤ 60 s each).
const TEST_BUDGET: Duration = Duration::from_secs(60);
/// The edge's B-frame mapping override (edge/src/fanout.rs, docs/bframes.md).
const METHOD_ENV: &str = "CASCADE_EDGE_BFRAME_TS";

/// cascade (`all`) in the namespace with its HTTP base and RTMP address.
struct Node {
    base: String,
    rtmp: String,
    _proc: Proc,
}

impl Node {
    /// Starts cascade with its defaults (B-frames transcoded: ffmpeg is on
    /// the PATH); `method` (`pts`, `dts`, `drop`) passes B-frames through
    /// (`--bframes drop`) and sets the edge's mapping of them, `transcode`
    /// asks for the transcoder explicitly.
    fn start(ns: &Netns, method: Option<&str>) -> Self {
        let mut c = ns.cmd(env!("CARGO_BIN_EXE_cascade"));
        let any = format!("{CASCADE_IP}:0");
        c.args([
            "all", "--http", &any, "--rtmp", &any, "--udp", &any, "--tcp", &any,
        ])
        .args(["--advertise", CASCADE_IP, "--publish-token", TOKEN])
        .env_remove("RUST_LOG")
        .env_remove(METHOD_ENV)
        .env(
            "CASCADE_LOG",
            std::env::var("CASCADE_TEST_LOG").unwrap_or_else(|_| "warn".into()),
        );
        match method {
            Some("transcode") => {
                c.args(["--bframes", "transcode"]);
            }
            Some(m) => {
                c.args(["--bframes", "drop"]).env(METHOD_ENV, m);
            }
            None => {}
        }
        let mut p = Proc::spawn(c);
        let within = Duration::from_secs(30);
        let rtmp = p
            .wait_line(|l| l.contains("rtmp://"), within)
            .unwrap_or_else(|lines| panic!("cascade printed no RTMP address: {lines:?}"));
        let rtmp = rtmp
            .split("rtmp://")
            .nth(1)
            .and_then(|r| r.split('/').next())
            .expect("rtmp address")
            .to_string();
        let health = p
            .wait_line(|l| l.trim().starts_with("Health:"), within)
            .unwrap_or_else(|lines| panic!("cascade did not start: {lines:?}"));
        let base = health
            .trim()
            .trim_start_matches("Health:")
            .split_whitespace()
            .next()
            .and_then(|u| u.strip_suffix("/healthz"))
            .expect("health url")
            .to_string();
        Self {
            base,
            rtmp,
            _proc: p,
        }
    }

    fn publish_url(&self, stream: &str) -> String {
        format!("rtmp://{}/live/{stream}?token={TOKEN}", self.rtmp)
    }

    fn play_url(&self, stream: &str) -> String {
        format!("{}/play/{stream}", self.base)
    }
}

/// Barcode of the frame number: 10 boxes of 32×32 px along the top edge,
/// box k white when bit k of `n` is set (read back by smooth.mjs).
fn barcode_filter() -> String {
    let mut f = String::from("drawbox=x=0:y=0:w=320:h=32:color=black:t=fill");
    for k in 0..10u32 {
        f.push_str(&format!(
            ",drawbox=x={}:y=0:w=32:h=32:color=white:t=fill:enable='mod(floor(n/{}),2)'",
            32 * k,
            1u32 << k
        ));
    }
    f
}

/// Debian's ffmpeg in the namespace: one x264 + AAC encode (testsrc2, moving
/// picture, barcode) sent over RTMP to every URL at once (tee muxer), so
/// every receiver gets the same bytes. `bframes` false adds `-bf 0`.
fn ffmpeg(ns: &Netns, urls: &[String], bframes: bool, secs: u32) -> Proc {
    let mut c = ns.cmd("ffmpeg");
    let video = format!(
        "testsrc2=size=640x360:rate=30:duration={secs},{}",
        barcode_filter()
    );
    c.args([
        "-hide_banner",
        "-loglevel",
        "error",
        "-re",
        "-f",
        "lavfi",
        "-i",
    ])
    .arg(video)
    .args(["-f", "lavfi", "-i"])
    .arg(format!(
        "sine=frequency=1000:sample_rate=48000:duration={secs}"
    ))
    .args(["-map", "0:v", "-map", "1:a", "-c:v", "libx264"])
    .args(["-preset", "veryfast", "-g", "60", "-pix_fmt", "yuv420p"]);
    if !bframes {
        c.args(["-bf", "0"]);
    }
    // The tee muxer does not ask for global headers itself; FLV needs them
    // (AVC sequence header, AudioSpecificConfig).
    c.args(["-c:a", "aac", "-ac", "2", "-flags:v", "+global_header"])
        .args(["-flags:a", "+global_header", "-f", "tee"])
        .arg(
            urls.iter()
                .map(|u| format!("[f=flv:onfail=ignore]{u}"))
                .collect::<Vec<_>>()
                .join("|"),
        )
        .stdin(std::process::Stdio::null());
    Proc::spawn(c)
}

/// Runs smooth.mjs with `job` in the namespace and returns its JSON.
fn run_smooth(ns: &Netns, mut job: Value, within: Duration) -> Value {
    job["timeoutSecs"] = Value::from(within.as_secs().saturating_sub(5));
    let mut c: Command = ns.cmd("node");
    c.current_dir(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/browser"))
        .arg("smooth.mjs")
        .arg(job.to_string());
    let mut p = Proc::spawn(c);
    let line = p
        .wait_line(|l| l.starts_with('{'), within)
        .unwrap_or_else(|lines| panic!("smooth.mjs printed no result: {lines:?}"));
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("smooth.mjs output {line}: {e}"))
}

fn num(v: &Value, path: &[&str]) -> f64 {
    path.iter()
        .fold(v, |v, k| &v[*k])
        .as_f64()
        .unwrap_or(f64::NAN)
}

/// One line of the comparison table.
fn row(label: &str, r: &Value) -> String {
    let s = |k: &str| num(r, &["stats", k]);
    let d = |k: &str| num(r, &["display", k]);
    format!(
        "{label:<12} decoded {:>4} dropped {:>3} freezes {:>2} ({:>5.2} s) jb {:>6.1} ms proc {:>6.1} ms ifd {:>5.1}±{:>5.1} ms \
         | shown {:>4} back {:>3} skip {:>3} rep {:>3} gap sd {:>5.1} p99 {:>5.1} max {:>5.1} >100ms {:>2} \
         | ingest→display p50 {:>6.1} p99 {:>6.1} ms, receive→display p50 {:>6.1} ms",
        s("framesDecoded"),
        s("framesDropped"),
        s("freezeCount"),
        s("totalFreezesDuration"),
        s("jitterBufferMs"),
        s("processingMs"),
        s("interFrameMeanMs"),
        s("interFrameSdMs"),
        d("presented"),
        d("backwards"),
        d("skipped"),
        d("repeats"),
        d("intervalSdMs"),
        d("intervalP99Ms"),
        d("intervalMaxMs"),
        d("hitchesOver100ms"),
        d("captureToDisplayP50Ms"),
        d("captureToDisplayP99Ms"),
        d("receiveToDisplayP50Ms"),
    )
}

/// Runs this test binary's `helper_rtmp_replay` in the namespace: an
/// SEI-tagged RTMP publisher of `secs` of x264 (`bframes` or `-bf 0`) to
/// `stream` on `node`, returned once the server accepted the publish.
fn tagged_publisher(ns: &Netns, node: &Node, stream: &str, bframes: bool, secs: u32) -> Proc {
    rtmp_publisher(
        ns,
        node,
        stream,
        if bframes { "h264-bf" } else { "h264" },
        secs,
    )
}

/// Runs `helper_rtmp_replay` in the namespace: `codec` is `h264` (SEI-tagged
/// x264 `-bf 0`), `h264-bf` (default B-frames), `av1` or `hevc` (enhanced RTMP).
fn rtmp_publisher(ns: &Netns, node: &Node, stream: &str, codec: &str, secs: u32) -> Proc {
    let exe = std::env::current_exe().expect("test binary path");
    let mut c = ns.cmd(exe.to_str().expect("utf-8 path"));
    c.args([
        "helper_rtmp_replay",
        "--exact",
        "--nocapture",
        "--test-threads=1",
    ])
    .env("CASCADE_BT_RTMP", &node.rtmp)
    .env("CASCADE_BT_KEY", format!("{stream}?token={TOKEN}"))
    .env("CASCADE_BT_CODEC", codec)
    .env("CASCADE_BT_SECS", secs.to_string());
    let mut p = Proc::spawn(c);
    p.wait_line(|l| l.contains("RTMP PUBLISHING"), Duration::from_secs(40))
        .unwrap_or_else(|lines| panic!("rtmp publisher did not start: {lines:?}"));
    p
}

/// Runs `helper_whip_publisher` in the namespace: loadtest's WHIP publisher
/// (SEI-tagged H.264, 1 s GOP, + Opus) to `stream` for `secs`, returned once
/// connected.
fn whip_publisher(ns: &Netns, node: &Node, stream: &str, secs: u64) -> Proc {
    let exe = std::env::current_exe().expect("test binary path");
    let mut c = ns.cmd(exe.to_str().expect("utf-8 path"));
    c.args([
        "helper_whip_publisher",
        "--exact",
        "--nocapture",
        "--test-threads=1",
    ])
    .env("CASCADE_BT_PUBLISH", format!("{}/whip/{stream}", node.base))
    .env("CASCADE_BT_SECS", secs.to_string());
    let mut p = Proc::spawn(c);
    p.wait_line(
        |l| l.contains("PUBLISHER CONNECTED"),
        Duration::from_secs(30),
    )
    .unwrap_or_else(|lines| panic!("whip publisher did not connect: {lines:?}"));
    p
}

/// Not a test on its own: the WHIP publisher [`whip_publisher`] starts.
#[test]
fn helper_whip_publisher() {
    netns::publisher_main();
}

/// Not a test on its own: the tagged RTMP publisher that
/// [`tagged_publisher`] starts inside a namespace.
#[test]
fn helper_rtmp_replay() {
    let Ok(addr) = std::env::var("CASCADE_BT_RTMP") else {
        return;
    };
    let key = std::env::var("CASCADE_BT_KEY").expect("stream key");
    let codec = std::env::var("CASCADE_BT_CODEC").unwrap_or_default();
    let secs: u32 = std::env::var("CASCADE_BT_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let tags = match codec.as_str() {
            "av1" => rtmp_client::encode_enhanced(false, secs).await,
            "hevc" => rtmp_client::encode_enhanced(true, secs).await,
            "h264-bf" => rtmp_client::read_flv(&rtmp_client::encode_flv(secs, &[]).await),
            _ => rtmp_client::read_flv(&rtmp_client::encode_flv(secs, &["-bf", "0"]).await),
        };
        let client = rtmp_client::Client::publish(&addr, "live", &key).await;
        println!("RTMP PUBLISHING");
        rtmp_client::replay(client, tags).await;
    });
}

/// Publish → Chromium display: SEI-tagged RTMP publishers (x264 with and
/// without B-frames, B-frames re-encoded by the default policy) and loadtest's WHIP
/// publisher (tagged the same way), the player page
/// in Chromium, the tag of every presented frame read back by RTP timestamp.
/// Prints p50/p99 (docs/latency.md); asserts only that tagged frames show.
#[test]
fn rtmp_publish_to_chromium_display_latency() {
    let Some(ns) = Netns::create("bflat") else {
        return;
    };
    let node = Node::start(&ns, None);
    let _a = tagged_publisher(&ns, &node, "lat-nobf", false, 30);
    let _b = tagged_publisher(&ns, &node, "lat-bf", true, 30);
    let _w = whip_publisher(&ns, &node, "lat-whip", 30);
    let v = run_smooth(
        &ns,
        json!({ "sei": true, "keepShown": 4, "warmSecs": 3, "secs": 10, "pages": [
            { "label": "nobf", "url": node.play_url("lat-nobf") },
            { "label": "bf", "url": node.play_url("lat-bf") },
            { "label": "whip", "url": node.play_url("lat-whip") },
        ] }),
        TEST_BUDGET,
    );
    assert!(v["ok"] == true, "runner failed: {v:#}");
    // The B-frame stream is re-encoded at ingest (default policy), the
    // tags carried over: all frames arrive (passed through: I/P only).
    for (label, min) in [("nobf", 150.0), ("bf", 150.0), ("whip", 150.0)] {
        let r = &v["results"][label];
        let d = |k: &str| num(r, &["display", k]);
        eprintln!(
            "publish → chromium display ({label}): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms over {} frames; \
             chromium receive → display p50 {:.1} ms, jitter buffer {:.1} ms, first packet → decoded {:.1} ms, audio jitter buffer {:.1} ms",
            d("publishToDisplayP50Ms"),
            d("publishToDisplayP99Ms"),
            d("publishToDisplayMaxMs"),
            d("publishToDisplaySamples"),
            d("receiveToDisplayP50Ms"),
            num(r, &["stats", "jitterBufferMs"]),
            num(r, &["stats", "processingMs"]),
            num(r, &["stats", "audioJitterBufferMs"]),
        );
        assert!(
            d("publishToDisplaySamples") >= min,
            "tagged frames are shown: {r:#}"
        );
    }
}

/// Plays a default x264 stream (B-frames on) from a cascade started with
/// `method` (see [`Node::start`]) for 10 s in Chromium; prints and returns
/// smooth.mjs's result for it.
fn play_default_x264(tag: &str, method: Option<&str>) -> Option<Value> {
    let ns = Netns::create(tag)?;
    let node = Node::start(&ns, method);
    let _ff = ffmpeg(&ns, &[node.publish_url("bf")], true, 40);
    let v = run_smooth(
        &ns,
        json!({ "pages": [{ "label": "bf", "url": node.play_url("bf") }], "warmSecs": 3, "secs": 10, "flags": std::env::var("CASCADE_CHROMIUM_FLAGS").map(|f| f.split(' ').map(str::to_string).collect::<Vec<_>>()).unwrap_or_default() }),
        TEST_BUDGET,
    );
    assert!(v["ok"] == true, "runner failed: {v:#}");
    let r = v["results"]["bf"].clone();
    eprintln!("{}", row(method.unwrap_or("default"), &r));
    Some(r)
}

/// A default x264 stream (B-frames on) plays smoothly in Chromium with the
/// default policy: the ingest re-encodes it without B-frames (ffmpeg), so
/// every frame of the 30 fps plays. Measured (docs/bframes.md): ~300
/// decoded and ~260 shown in 10 s, 0 backwards, 0 freezes, 33 ± 6 ms
/// between frames; passed through it was ~115 decoded at 87 ± 37 ms.
#[test]
fn default_x264_over_rtmp_plays_in_chromium() {
    let Some(r) = play_default_x264("bfplay", None) else {
        return;
    };
    assert!(
        num(&r, &["stats", "framesDecoded"]) >= 240.0,
        "every frame of the 30 fps is decoded (passed through: ~115 in 10 s): {r:#}"
    );
    assert!(
        num(&r, &["stats", "freezeCount"]) <= 1.0,
        "no freezes: {r:#}"
    );
    assert!(
        num(&r, &["stats", "interFrameMeanMs"]) <= 40.0,
        "frames 1/30 s apart (passed through: 87 ms): {r:#}"
    );
    let shown = num(&r, &["display", "presented"]);
    if !shown.is_nan() {
        assert!(shown >= 200.0, "frames are shown: {r:#}");
        assert_eq!(
            num(&r, &["display", "backwards"]),
            0.0,
            "shown in presentation order: {r:#}"
        );
    }
}

/// `--bframes drop` (or no ffmpeg, or the transcoder failed): the B-frame
/// stream is passed through and the edge drops its B slices, so the I/P
/// frames keep playing (~8–15 of 30 fps); with B-frames kept Chromium
/// decoded ~1 fps.
#[test]
fn dropped_bframes_still_play_in_chromium() {
    let Some(r) = play_default_x264("bfdrop", Some("drop")) else {
        return;
    };
    assert!(
        num(&r, &["stats", "framesDecoded"]) >= 50.0,
        "the I/P frames keep being decoded (B-frames kept gave ~10 in 10 s): {r:#}"
    );
    assert!(
        num(&r, &["stats", "freezeCount"]) <= 3.0,
        "no freeze storm: {r:#}"
    );
    let shown = num(&r, &["display", "presented"]);
    if !shown.is_nan() {
        assert!(shown >= 50.0, "frames are shown: {r:#}");
        assert!(
            num(&r, &["display", "backwards"]) <= 2.0,
            "shown in presentation order: {r:#}"
        );
    }
}

/// The measurement behind docs/bframes.md: one x264 encode with default
/// B-frames sent to one cascade per mapping method, one `-bf 0` encode as
/// the reference, every player in one Chromium at once. Prints the table.
/// `CASCADE_BFRAME_METHODS=pts,dts` picks the methods.
#[test]
#[ignore = "measurement (≈45 s, prints a table): cargo test --test browser_bframes -- --ignored"]
fn bframe_methods_side_by_side() {
    let Some(ns) = Netns::create("bfcmp") else {
        return;
    };
    let methods: Vec<String> = std::env::var("CASCADE_BFRAME_METHODS")
        .unwrap_or_else(|_| "pts,dts,drop,transcode".into())
        .split(',')
        .map(str::to_string)
        .collect();
    let nodes: Vec<Node> = methods.iter().map(|m| Node::start(&ns, Some(m))).collect();
    let reference = Node::start(&ns, None);
    let urls: Vec<String> = nodes.iter().map(|n| n.publish_url("bf")).collect();
    let _bf = ffmpeg(&ns, &urls, true, 50);
    let _nobf = ffmpeg(&ns, &[reference.publish_url("nobf")], false, 50);
    let mut pages: Vec<Value> = methods
        .iter()
        .zip(&nodes)
        .map(|(m, n)| json!({ "label": m, "url": n.play_url("bf") }))
        .collect();
    pages.push(json!({ "label": "no-bframes", "url": reference.play_url("nobf") }));
    let secs = std::env::var("CASCADE_BFRAME_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(15);
    let v = run_smooth(
        &ns,
        json!({ "pages": pages, "warmSecs": 3, "secs": secs }),
        Duration::from_secs(secs + 45),
    );
    assert!(v["ok"] == true, "runner failed: {v:#}");
    eprintln!("{v}");
    for p in &pages {
        let label = p["label"].as_str().unwrap();
        eprintln!("{}", row(label, &v["results"][label]));
    }
}

/// What Chromium does with enhanced-RTMP AV1 and HEVC (docs/codecs.md):
/// Debian's Chromium offers AV1 and plays it; it offers no H.265, so the
/// player page gets 406 naming the stream's codec.
#[test]
fn av1_and_hevc_over_enhanced_rtmp_in_chromium() {
    let Some(ns) = Netns::create("codecs") else {
        return;
    };
    let node = Node::start(&ns, None);
    let _a = rtmp_publisher(&ns, &node, "av1", "av1", 40);
    let _h = rtmp_publisher(&ns, &node, "hevc", "hevc", 40);
    let v = run_smooth(
        &ns,
        json!({ "warmSecs": 1, "secs": 5, "firstFrameSecs": 10, "pages": [
            { "label": "av1", "url": node.play_url("av1") },
            { "label": "hevc", "url": node.play_url("hevc") },
        ] }),
        TEST_BUDGET,
    );
    assert!(v["ok"] == true, "runner failed: {v:#}");
    let av1 = &v["results"]["av1"];
    eprintln!(
        "AV1 in Chromium: {} frames decoded in 5 s by {}, {} freezes; HEVC page: {:?}",
        av1["stats"]["framesDecoded"],
        av1["stats"]["decoder"],
        av1["stats"]["freezeCount"],
        v["results"]["hevc"]["status"]
    );
    assert!(
        num(av1, &["stats", "framesDecoded"]) >= 60.0,
        "AV1 plays: {av1:#}"
    );
    let hevc = v["results"]["hevc"]["status"].as_str().unwrap_or("");
    assert!(
        hevc.contains("406") && hevc.contains("H265"),
        "HEVC refused with the codec named: {hevc:?}"
    );
}
