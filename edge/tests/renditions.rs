//! A stream with three renditions (1280×720, 640×360, 320×180 H.264 made by
//! ffmpeg, keyframes aligned, + Opus) and a real str0m WHEP viewer that
//! switches through the layer endpoint advertised in the 201's `Link`:
//! the picture size (the keyframes' SPS) follows the requests, each switch
//! lands on a keyframe of the new rendition, and the viewer's one video
//! stream stays continuous (RTP sequence numbers without a gap, timestamps
//! never backwards).
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::ladder::{ladder_media, publish, LADDER, TAG_BASE};
use common::Edge;
use loadtest::tag;
use str0m::change::SdpAnswer;
use str0m::media::{Direction, MediaKind};
use str0m::net::{Protocol, Receive};
use str0m::{Candidate, Event, Input, Output, RtcConfig};
use tokio::net::UdpSocket;

/// One received video frame.
#[derive(Debug, Clone)]
struct Got {
    arrival: Instant,
    /// First and last RTP sequence number of the frame.
    seqs: (u64, u64),
    rtp_ts: u64,
    contiguous: bool,
    /// The SPS NAL of a keyframe.
    sps: Option<Vec<u8>>,
    tag: Option<u64>,
}

fn sps_of(au: &[u8]) -> Option<Vec<u8>> {
    loadtest::annexb::nal_units(au)
        .into_iter()
        .find(|n| loadtest::annexb::nal_type(n) == 7)
        .map(<[u8]>::to_vec)
}

/// A str0m WHEP viewer (frame mode) recording every video frame; returns
/// the layer URL from the 201's `Link` and the session URL.
async fn viewer(
    edge: &Edge,
    stream: &str,
    frames: Arc<Mutex<Vec<Got>>>,
    stop: Arc<tokio::sync::Notify>,
    audio: Arc<AtomicU64>,
) -> (String, String) {
    viewer_of(edge, stream, frames, stop, audio, true).await
}

/// [`viewer`]; `layers`: the stream has renditions now, so the 201 must
/// advertise the layer endpoint (else it must not, and the layer URL
/// returned is the session's `/layer` all the same).
async fn viewer_of(
    edge: &Edge,
    stream: &str,
    frames: Arc<Mutex<Vec<Got>>>,
    stop: Arc<tokio::sync::Notify>,
    audio: Arc<AtomicU64>,
    layers: bool,
) -> (String, String) {
    let mut rtc = RtcConfig::new()
        .clear_codecs()
        .enable_h264(true)
        .enable_opus(true, false)
        .build(Instant::now());
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let local: SocketAddr = sock.local_addr().unwrap();
    rtc.add_local_candidate(Candidate::host(local, "udp").unwrap());
    let mut api = rtc.sdp_api();
    let vmid = api.add_media(MediaKind::Video, Direction::RecvOnly, None, None, None);
    api.add_media(MediaKind::Audio, Direction::RecvOnly, None, None, None);
    let (offer, pending) = api.apply().unwrap();
    let res = reqwest::Client::new()
        .post(edge.whep_url(stream))
        .header("content-type", "application/sdp")
        .body(offer.to_sdp_string())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    let base = format!("http://{}", edge.http);
    let location = format!("{base}{}", res.headers()["location"].to_str().unwrap());
    let link = res
        .headers()
        .get_all("link")
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .find(|l| l.contains("rel=\"urn:ietf:params:whep:ext:core:layer\""));
    let layer = format!("{}/layer", &location[base.len()..]);
    if !layers {
        assert!(link.is_none(), "no renditions yet: no layer link");
    } else {
        let link = link.expect("201 advertises the layer endpoint");
        let advertised = link.split('>').next().unwrap().trim_start_matches('<');
        assert_eq!(advertised, layer);
        let sse = format!("<{}/sse>", &location[base.len()..]);
        assert!(
            res.headers().get_all("link").iter().any(|v| {
                let v = v.to_str().unwrap();
                v.contains(&sse)
                    && v.contains("rel=\"urn:ietf:params:whep:ext:core:server-sent-events\"")
            }),
            "201 advertises the event stream"
        );
    }
    let answer = SdpAnswer::from_sdp_string(&res.text().await.unwrap()).unwrap();
    rtc.sdp_api().accept_answer(pending, answer).unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 2048];
        loop {
            let timeout = loop {
                match rtc.poll_output().unwrap() {
                    Output::Timeout(t) => break t,
                    Output::Transmit(t) => {
                        let _ = sock.send_to(&t.contents, t.destination).await;
                    }
                    Output::Event(Event::MediaData(d)) if d.mid != vmid => {
                        audio.fetch_add(1, Ordering::Relaxed);
                    }
                    Output::Event(Event::MediaData(d)) => {
                        let got = Got {
                            arrival: Instant::now(),
                            seqs: (**d.seq_range.start(), **d.seq_range.end()),
                            rtp_ts: d.time.numer(),
                            contiguous: d.contiguous,
                            sps: sps_of(&d.data),
                            tag: tag::find(&d.data).map(|t| t.seq),
                        };
                        frames.lock().unwrap().push(got);
                    }
                    Output::Event(_) => {}
                }
            };
            let wait = timeout.saturating_duration_since(Instant::now());
            tokio::select! {
                _ = stop.notified() => return,
                r = tokio::time::timeout(wait, sock.recv_from(&mut buf)) => match r {
                    Ok(Ok((n, source))) => {
                        if let Ok(r) = Receive::new(Protocol::Udp, source, local, &buf[..n]) {
                            rtc.handle_input(Input::Receive(Instant::now(), r)).unwrap();
                        }
                    }
                    _ => rtc.handle_input(Input::Timeout(Instant::now())).unwrap(),
                }
            }
        }
    });
    (format!("{base}{layer}"), location)
}

async fn post_layer(url: &str, body: &str) -> (u16, String) {
    let res = reqwest::Client::new()
        .post(url)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    (res.status().as_u16(), res.text().await.unwrap())
}

fn rendition_of(tag: u64) -> usize {
    (tag / TAG_BASE) as usize
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn viewer_switches_renditions_through_the_layer_endpoint() {
    let edge = Edge::start(Default::default()).await;
    let media = ladder_media().await;
    let sps: Vec<Vec<u8>> = media
        .iter()
        .map(|m| sps_of(&m.video[0].annexb).unwrap())
        .collect();
    assert!(sps[0] != sps[1] && sps[1] != sps[2], "three picture sizes");
    let _p = publish(&edge.registry, "ladder", media);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let frames = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(tokio::sync::Notify::new());
    let audio = Arc::new(AtomicU64::new(0));
    let (layer, _session) =
        viewer(&edge, "ladder", frames.clone(), stop.clone(), audio.clone()).await;
    let count = || frames.lock().unwrap().len();
    assert!(
        common::eventually(Duration::from_secs(5), || count() > 30).await,
        "video plays"
    );

    // GET: the ladder and what the viewer gets.
    let state: serde_json::Value = reqwest::get(&layer).await.unwrap().json().await.unwrap();
    assert_eq!(state["current"], "f", "{state}");
    assert_eq!(state["target"], "auto");
    assert_eq!(state["renditions"].as_array().unwrap().len(), 3);
    assert_eq!(state["renditions"][2]["height"], 180);
    // Unknown names and bodies are refused with a reason.
    let (status, text) = post_layer(&layer, r#"{"encodingId":"x"}"#).await;
    assert_eq!(status, 400);
    assert!(text.contains("unknown rendition"), "{text}");
    assert_eq!(post_layer(&layer, "{}").await.0, 400);

    let mut switch_ms = Vec::new();
    for (body, want) in [
        (r#"{"encodingId":"q"}"#, 2usize),
        (r#"{"mediaId":"0","encodingId":"h"}"#, 1),
        (r#"{"encodingId":"auto"}"#, 0),
    ] {
        let asked = Instant::now();
        let (status, text) = post_layer(&layer, body).await;
        assert_eq!(status, 200, "{text}");
        let arrived = common::eventually(Duration::from_secs(5), || {
            frames
                .lock()
                .unwrap()
                .iter()
                .rev()
                .take(5)
                .filter_map(|g| g.tag)
                .any(|t| rendition_of(t) == want)
        })
        .await;
        assert!(arrived, "rendition {want} after {body}");
        let first = frames
            .lock()
            .unwrap()
            .iter()
            .find(|g| g.arrival >= asked && g.tag.is_some_and(|t| rendition_of(t) == want))
            .map(|g| g.arrival)
            .unwrap();
        switch_ms.push(first.duration_since(asked).as_millis());
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let state: serde_json::Value = reqwest::get(&layer).await.unwrap().json().await.unwrap();
        assert_eq!(state["current"], LADDER[want].0, "{state}");
    }
    let got = frames.lock().unwrap().clone();

    // Audio only ("none"): video stops, audio goes on; back to auto, video
    // resumes at a keyframe and its sequence numbers continue.
    assert_eq!(post_layer(&layer, r#"{"encodingId":"none"}"#).await.0, 200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (v0, a0) = (count(), audio.load(Ordering::Relaxed));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (v1, a1) = (count(), audio.load(Ordering::Relaxed));
    assert!(v1 - v0 <= 1, "no video while audio only: {v0} → {v1}");
    assert!(a1 - a0 > 50, "audio goes on: {a0} → {a1}");
    let state: serde_json::Value = reqwest::get(&layer).await.unwrap().json().await.unwrap();
    assert_eq!(
        (state["current"].clone(), state["target"].clone()),
        (serde_json::Value::Null, "none".into())
    );
    assert_eq!(post_layer(&layer, r#"{"encodingId":"auto"}"#).await.0, 200);
    assert!(
        common::eventually(Duration::from_secs(3), || count() > v1 + 5).await,
        "video resumes"
    );
    stop.notify_one();
    {
        let all = frames.lock().unwrap();
        let (before, after) = (&all[v1 - 1], &all[v1]);
        assert!(after.sps.is_some(), "resumes at a keyframe: {after:?}");
        assert_eq!(after.seqs.0, before.seqs.1 + 1, "sequence continues");
        assert!(after.rtp_ts > before.rtp_ts, "timestamps forward");
    }
    println!(
        "renditions: {} frames, switch times (request → first frame of the new rendition, 1 s GOP): {switch_ms:?} ms",
        got.len()
    );

    // The picture sizes the keyframes announced, in order: f, q, h, f.
    let mut sizes: Vec<usize> = Vec::new();
    for g in &got {
        if let Some(s) = &g.sps {
            let i = sps.iter().position(|x| x == s).expect("a known SPS");
            if sizes.last() != Some(&i) {
                sizes.push(i);
            }
        }
    }
    assert_eq!(sizes, [0, 2, 1, 0], "SPS sizes in order");
    // Every change of rendition happens on a keyframe of the new one, and
    // the viewer's stream never jumps: sequence numbers continue without a
    // gap, RTP timestamps only go forward.
    let mut last: Option<&Got> = None;
    for g in &got {
        if let Some(p) = last {
            let (a, b) = (p.tag.map(rendition_of), g.tag.map(rendition_of));
            if a != b {
                assert!(
                    g.sps.is_some(),
                    "switch {a:?} → {b:?} lands on a keyframe: {g:?}"
                );
            }
            assert_eq!(g.seqs.0, p.seqs.1 + 1, "no sequence gap: {p:?} → {g:?}");
            assert!(g.rtp_ts > p.rtp_ts, "timestamps forward: {p:?} → {g:?}");
            let step_ms = (g.rtp_ts - p.rtp_ts) / 90;
            assert!(
                step_ms < 200,
                "no timestamp jump: {step_ms} ms {p:?} → {g:?}"
            );
        }
        assert!(g.contiguous, "{g:?}");
        last = Some(g);
    }
    // /api figures: each rendition's viewers follow.
    let stats = edge.registry.list();
    let r = &stats[0].renditions;
    assert_eq!(r.len(), 3);
    assert_eq!(r[0].viewers, 1, "{r:?}");
    assert!(r[0].bitrate_bps > 0);
}

/// A simulcast publisher whose stream went live with one layer (a plain
/// `video` track) and gained its other layers 1.5 s later (the WHIP
/// ingest's late layers): a viewer that joined in between follows the
/// catalog, moves up to the best rendition at its keyframe, with its one
/// video stream continuous, and its layer endpoint works from then on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_viewer_who_joined_before_the_renditions_moves_up_to_them() {
    joined_before_the_renditions(false).await;
}

/// The same with per-viewer estimation on (the binary's default): the
/// lone layer is marked as a rendition, so the viewer's session gets an
/// estimator, and when the renditions come its controller steers it by
/// switches at keyframes, the stream continuous. (A controller that starts
/// below the track already playing, an RTMP ladder's source, is
/// tests/abr_ladder.rs: swapping the feed there closed the session.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_viewer_who_joined_before_the_renditions_follows_them_with_estimation() {
    joined_before_the_renditions(true).await;
}

async fn joined_before_the_renditions(abr: bool) {
    let edge = Edge::start(cascade_edge::Config {
        abr,
        ..Default::default()
    })
    .await;
    let media = ladder_media().await;
    let _p = common::ladder::publish_with(
        &edge.registry,
        "late",
        media,
        Some(Duration::from_millis(1500)),
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let frames = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(tokio::sync::Notify::new());
    let audio = Arc::new(AtomicU64::new(0));
    let (layer, _session) = viewer_of(
        &edge,
        "late",
        frames.clone(),
        stop.clone(),
        audio.clone(),
        false,
    )
    .await;
    let tags = || -> Vec<usize> {
        frames
            .lock()
            .unwrap()
            .iter()
            .filter_map(|g| g.tag.map(rendition_of))
            .collect()
    };
    assert!(
        common::eventually(Duration::from_secs(5), || tags().contains(&2)).await,
        "the plain track (the lowest layer) plays first"
    );
    assert!(
        common::eventually(Duration::from_secs(10), || tags().last() == Some(&0)).await,
        "moved up to the best rendition once it existed: {:?}",
        tags()
    );
    let got = frames.lock().unwrap().clone();
    let first_top = got
        .iter()
        .position(|g| g.tag.map(rendition_of) == Some(0))
        .unwrap();
    assert!(
        got[first_top].sps.is_some(),
        "the switch lands on a keyframe"
    );
    for w in got.windows(2) {
        assert_eq!(w[1].seqs.0, w[0].seqs.1 + 1, "one continuous video stream");
        assert!(w[1].rtp_ts >= w[0].rtp_ts, "timestamps never go back");
    }
    // Its layer endpoint exists now.
    let state: serde_json::Value = reqwest::get(&layer).await.unwrap().json().await.unwrap();
    assert_eq!(state["current"], "f", "{state}");
    assert_eq!(state["renditions"].as_array().unwrap().len(), 3, "{state}");
    assert!(audio.load(Ordering::Relaxed) > 0, "audio plays");
    stop.notify_waiters();
}

/// A stream with one video track: no `Link` to a layer endpoint, and the
/// endpoint answers 404 (the resource exists, layer selection does not).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_rendition_streams_have_no_layer_endpoint() {
    let edge = Edge::start(Default::default()).await;
    let _p = common::Publisher::start(&edge.registry, "plain", common::media(30).await, 0);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let offer = loadtest::whep::offer_sdp(&[loadtest::whep::VideoCodec::H264], true).unwrap();
    let res = reqwest::Client::new()
        .post(edge.whep_url("plain"))
        .header("content-type", "application/sdp")
        .body(offer)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    assert!(
        !res.headers()
            .get_all("link")
            .iter()
            .any(|l| l.to_str().unwrap().contains("ext:core:layer")),
        "no layer link"
    );
    let session = format!(
        "http://{}{}/layer",
        edge.http,
        res.headers()["location"].to_str().unwrap()
    );
    assert_eq!(
        post_layer(&session, r#"{"encodingId":"auto"}"#).await.0,
        404
    );
    let wrong_type = reqwest::Client::new()
        .post(&session)
        .header("content-type", "text/plain")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong_type.status(), 415);
    let unknown = format!("http://{}/whep/plain/{}/layer", edge.http, "0".repeat(32));
    assert_eq!(
        post_layer(&unknown, r#"{"encodingId":"auto"}"#).await.0,
        404
    );
    // No events either.
    let sse = session.replace("/layer", "/sse");
    assert_eq!(reqwest::get(&sse).await.unwrap().status(), 404);
}

/// The next server-sent event of `res` (name, JSON data), reading chunks
/// into `buf`; `None` when the stream ended.
async fn next_event(
    res: &mut reqwest::Response,
    buf: &mut String,
) -> Option<(String, serde_json::Value)> {
    loop {
        if let Some(end) = buf.find("\n\n") {
            let block: String = buf.drain(..end + 2).collect();
            let mut name = String::new();
            let mut data = String::new();
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("event:") {
                    name = v.trim().to_string();
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push_str(v.trim_start());
                }
            }
            if name.is_empty() {
                continue; // a keep-alive comment
            }
            return Some((name, serde_json::from_str(&data).unwrap()));
        }
        let chunk = res.chunk().await.unwrap()?;
        buf.push_str(std::str::from_utf8(&chunk).unwrap());
    }
}

/// WHEP's server-sent events extension: `POST {session}/sse` subscribes
/// (201 + `Location`), `GET` streams a `layers` event with the layer
/// endpoint's JSON at once and on every change, at most two streams per
/// session, and the stream ends with the session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn layer_changes_arrive_as_server_sent_events() {
    let edge = Edge::start(Default::default()).await;
    let _p = publish(&edge.registry, "ladder", ladder_media().await);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let frames = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(tokio::sync::Notify::new());
    let audio = Arc::new(AtomicU64::new(0));
    let (layer, session) =
        viewer(&edge, "ladder", frames.clone(), stop.clone(), audio.clone()).await;
    assert!(
        common::eventually(Duration::from_secs(5), || frames.lock().unwrap().len() > 30).await,
        "video plays"
    );
    let client = reqwest::Client::new();
    let sse = format!("{session}/sse");
    let res = client
        .post(&sse)
        .header("content-type", "application/json")
        .body(r#"["layers","active"]"#)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    let location = res.headers()["location"].to_str().unwrap().to_string();
    assert!(sse.ends_with(&location), "{location}");
    let bad = client
        .post(&sse)
        .header("content-type", "application/json")
        .body("layers")
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);

    let mut res = client.get(&sse).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert!(res.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let mut buf = String::new();
    let (name, data) = next_event(&mut res, &mut buf).await.unwrap();
    assert_eq!(name, "layers");
    assert_eq!(data["current"], "f", "{data}");
    assert_eq!(data["renditions"].as_array().unwrap().len(), 3);

    // A switch shows up as events: the target first, then the rendition.
    let asked = Instant::now();
    assert_eq!(post_layer(&layer, r#"{"encodingId":"q"}"#).await.0, 200);
    let mut seen = Vec::new();
    let landed = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some((_, d)) = next_event(&mut res, &mut buf).await {
            seen.push(d.clone());
            if d["current"] == "q" {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(landed, Ok(true), "{seen:?}");
    println!(
        "switch to q announced {} ms after the request",
        asked.elapsed().as_millis()
    );
    assert!(seen.iter().any(|d| d["target"] == "q"));

    // Two streams per session at most.
    let second = client.get(&sse).send().await.unwrap();
    assert_eq!(second.status(), 200);
    let third = client.get(&sse).send().await.unwrap();
    assert_eq!(third.status(), 429);
    drop(second);

    // The session ends: so does its event stream.
    assert_eq!(client.delete(&session).send().await.unwrap().status(), 200);
    stop.notify_one();
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        while next_event(&mut res, &mut buf).await.is_some() {}
    })
    .await;
    assert!(ended.is_ok(), "the event stream outlived its session");
}
