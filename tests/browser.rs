//! Browser tests: Debian's headless Chromium (driven by tests/browser/run.mjs
//! through playwright-core) against the real `cascade` binary. Chromium
//! gathers no loopback candidates, so each test makes its own network
//! namespace with a veth pair on 198.18.0.0/15 addresses (both ends inside)
//! and runs cascade, the publisher and Chromium in it. Root only.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns

#[path = "browser/netns.rs"]
mod netns;

use std::time::Duration;

use netns::{urlencode, Cascade, Netns, STATIC_IP};
use serde_json::Value;

/// One test's budget (the brief: ≤ 60 s each).
const TEST_BUDGET: Duration = Duration::from_secs(60);

fn setup(name: &str) -> Option<(Netns, Cascade)> {
    let ns = Netns::create(name)?;
    let cascade = Cascade::start(&ns, &[]);
    Some((ns, cascade))
}

fn frames_flow(v: &Value) {
    let first = &v["first"];
    let last = &v["last"];
    assert!(v["ok"] == true, "runner failed: {v:#}");
    let f0 = first["framesDecoded"].as_u64().unwrap_or(0);
    let f1 = last["framesDecoded"].as_u64().unwrap_or(0);
    let a0 = first["audioPackets"].as_u64().unwrap_or(0);
    let a1 = last["audioPackets"].as_u64().unwrap_or(0);
    assert!(f0 > 0, "first frame decoded: {v:#}");
    assert!(
        f1 > f0 + 30,
        "frames keep being decoded ({f0} → {f1}): {v:#}"
    );
    assert!(
        a1 > a0 + 50,
        "audio packets keep arriving ({a0} → {a1}): {v:#}"
    );
    assert!(last["width"].as_u64().unwrap_or(0) > 0, "a picture: {v:#}");
}

#[test]
fn player_page_plays() {
    let Some((ns, cascade)) = setup("play") else {
        return;
    };
    let _publisher = ns.publisher(&cascade, "live", 40);
    let v = ns.run_browser(
        serde_json::json!({
            "kind": "play", "base": cascade.base, "stream": "live", "secs": 3,
            "screenshot": netns::screenshot("player.png"),
        }),
        TEST_BUDGET,
    );
    frames_flow(&v);
    eprintln!(
        "player page: first frame {} ms after the peer connection",
        v["ttffMs"]
    );
}

#[test]
fn player_page_says_when_the_server_offers_only_loopback() {
    let Some(ns) = Netns::create("loop") else {
        return;
    };
    // The operator's mistake: media advertised on 127.0.0.1 while the page
    // is reached on the machine's address.
    // (Media bound on every address so the publisher still reaches it.)
    let cascade = Cascade::start(
        &ns,
        &[
            "--advertise",
            "127.0.0.1",
            "--udp",
            "0.0.0.0:0",
            "--tcp",
            "0.0.0.0:0",
        ],
    );
    let _publisher = ns.publisher(&cascade, "live", 30);
    let v = ns.run_browser(
        serde_json::json!({ "kind": "play", "base": cascade.base, "stream": "live", "expectNoMedia": true }),
        TEST_BUDGET,
    );
    assert!(v["ok"] == true, "runner failed: {v:#}");
    let warning = v["warning"].as_str().unwrap_or("");
    assert!(
        warning.contains("127.0.0.1") && warning.contains("--advertise"),
        "warning shown: {v:#}"
    );
}

#[test]
fn player_page_plays_in_firefox() {
    let Some((ns, cascade)) = setup("firefox") else {
        return;
    };
    assert!(
        std::path::Path::new("/usr/bin/firefox-esr").exists(),
        "Debian firefox-esr missing (scripts/test.sh installs it)"
    );
    // Firefox has H.264 only with the OpenH264 plugin it downloads at run
    // time (not here): Chromium publishes VP8 through /publish instead.
    let job = serde_json::json!({
        "kind": "publish-hold", "base": cascade.base, "stream": "live", "token": netns::TOKEN,
        "query": "&codec=vp8", "secs": 20, "timeoutSecs": 50,
    });
    let mut c = ns.cmd("node");
    c.current_dir(netns::browser_dir())
        .arg("run.mjs")
        .arg(job.to_string());
    let mut publisher = netns::Proc::spawn(c);
    let line = publisher
        .wait_line(
            |l| l.starts_with("PUBLISHING") || l.starts_with('{'),
            TEST_BUDGET,
        )
        .unwrap_or_else(|lines| panic!("chromium publisher: {lines:?}"));
    assert_eq!(line, "PUBLISHING live", "{line}");
    let v = ns.run_script(
        "firefox.mjs",
        serde_json::json!({ "base": cascade.base, "stream": "live", "secs": 3 }),
        TEST_BUDGET,
    );
    frames_flow(&v);
    eprintln!(
        "firefox: first frame {} ms after the peer connection ({})",
        v["ttffMs"], v["userAgent"]
    );
}

#[test]
fn browser_publishes_and_another_tab_watches() {
    let Some((ns, cascade)) = setup("pub") else {
        return;
    };
    let v = ns.run_browser(
        serde_json::json!({
            "kind": "publish-and-watch", "base": cascade.base, "stream": "fromchrome",
            "token": netns::TOKEN, "secs": 3, "restartPublisher": true,
            "screenshot": netns::screenshot("publish.png"),
        }),
        TEST_BUDGET,
    );
    assert_eq!(v["publishState"], "live", "publish page went live: {v:#}");
    frames_flow(&v);
    let r = &v["publisherRestart"];
    assert_eq!(r["restarts"], 1, "publish page restarted ICE: {v:#}");
    assert_eq!(r["state"], "live", "{v:#}");
    let (b, a) = (
        r["viewerBefore"].as_u64().unwrap_or(0),
        r["viewerAfter"].as_u64().unwrap_or(0),
    );
    assert!(
        a > b + 30,
        "viewer frames go on across the publisher's ICE restart ({b} → {a}): {v:#}"
    );
    // The closed tab sent DELETE on pagehide: no consent timeout needed.
    assert_eq!(
        v["whipSessionsAfterClose"], 0.0,
        "whip session freed at once: {v:#}"
    );
}

#[test]
fn whep_client_on_another_origin_with_trickle_and_ice_restart() {
    let Some((ns, cascade)) = setup("cors") else {
        return;
    };
    let _publisher = ns.publisher(&cascade, "live", 40);
    let v = ns.run_browser(
        serde_json::json!({
            "kind": "whep-client", "base": cascade.base, "stream": "live",
            "staticHost": STATIC_IP, "restart": true,
        }),
        TEST_BUDGET,
    );
    assert!(v["ok"] == true, "runner failed: {v:#}");
    let origin = v["client"]["origin"].as_str().unwrap_or("");
    assert!(
        origin.contains(STATIC_IP) && !cascade.base.contains(origin),
        "another origin: {v:#}"
    );
    assert!(
        v["before"]["first"]["framesDecoded"].as_u64().unwrap_or(0) > 0,
        "plays: {v:#}"
    );
    // Trickle PATCHes were answered 204 (they went through the CORS preflight).
    let trickle = v["client"]["trickleStatus"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        !trickle.is_empty() && trickle.iter().all(|s| s == 204),
        "trickle 204: {v:#}"
    );
    let r = &v["restart"];
    assert_eq!(r["status"], 200, "ice restart answered: {v:#}");
    assert_eq!(r["contentType"], "application/trickle-ice-sdpfrag");
    assert_ne!(r["etag"], r["etagBefore"], "new etag");
    let before = v["afterRestart"]["mid"]["framesDecoded"]
        .as_u64()
        .unwrap_or(0);
    let after = v["afterRestart"]["last"]["framesDecoded"]
        .as_u64()
        .unwrap_or(0);
    assert!(
        after > before + 30,
        "frames keep flowing after the restart ({before} → {after}): {v:#}"
    );
    assert_eq!(v["afterRestart"]["last"]["state"], "connected", "{v:#}");
}

#[test]
fn player_page_recovers_after_a_network_blip() {
    let Some((ns, cascade)) = setup("blip") else {
        return;
    };
    let _publisher = ns.publisher(&cascade, "live", 50);
    // Every media packet of the viewer (UDP and ICE-TCP) is dropped for 7 s (under the server's 10 s consent timeout);
    // the publisher's and HTTP pass.
    let (udp, tcp) = cascade.media_ports;
    assert!(udp > 0 && tcp > 0, "media ports from the banner");
    let pubip = netns::PUBLISHER_IP;
    let rules = format!(
        "table inet cascade_blip {{\n chain out {{\n  type filter hook output priority 0;\n  ip saddr != {pubip} ip daddr != {pubip} meta l4proto udp drop\n  tcp dport {tcp} drop\n  tcp sport {tcp} drop\n }}\n}}\n"
    );
    let v = ns.run_browser(
        serde_json::json!({
            "kind": "blip", "base": cascade.base, "stream": "live", "rules": rules, "blipSecs": 7,
        }),
        TEST_BUDGET,
    );
    assert!(v["ok"] == true, "runner failed: {v:#}");
    let during = v["during"]["framesDecoded"].as_u64().unwrap_or(0);
    let after = v["after"]["framesDecoded"].as_u64().unwrap_or(0);
    assert!(
        after > during + 30,
        "frames again after the blip ({during} → {after}): {v:#}"
    );
    assert_eq!(v["after"]["state"], "connected", "{v:#}");
    assert_eq!(
        v["after"]["pcs"], 1,
        "same peer connection, repaired in place: {v:#}"
    );
    // Chromium keeps the pair "connected" through a blip this short and
    // resumes on it; longer outages go through the page's ICE restart (or,
    // once the server's consent timeout freed the session, a new one).
    let restarted = v["after"]["ufrag"] != v["before"]["first"]["ufrag"];
    eprintln!(
        "blip of 7 s: frames before {} during {during} after {after}; media again {} ms after the network came back (ice restart: {restarted})",
        v["before"]["last"]["framesDecoded"], v["recoveredMs"]
    );
}

#[test]
fn ice_tcp_when_udp_is_dropped() {
    let Some((ns, cascade)) = setup("tcp") else {
        return;
    };
    // Every UDP packet but the publisher's is dropped: the viewer can only
    // use cascade's passive TCP candidate.
    let _publisher = ns.publisher(&cascade, "live", 40);
    ns.drop_udp();
    let v = ns.run_browser(
        serde_json::json!({ "kind": "play", "base": cascade.base, "stream": "live", "secs": 3 }),
        TEST_BUDGET,
    );
    frames_flow(&v);
    assert_eq!(
        v["last"]["path"]["protocol"], "tcp",
        "viewer path is TCP: {v:#}"
    );
}

#[test]
fn time_to_first_frame_over_20_joins() {
    let Some((ns, cascade)) = setup("ttff") else {
        return;
    };
    let _publisher = ns.publisher(&cascade, "live", 55);
    let v = ns.run_browser(
        serde_json::json!({ "kind": "ttff", "base": cascade.base, "stream": "live", "joins": 20 }),
        TEST_BUDGET,
    );
    assert!(v["ok"] == true, "runner failed: {v:#}");
    let mut joins: Vec<u64> = v["joins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j.as_u64().expect("every join decoded a frame"))
        .collect();
    joins.sort_unstable();
    let p = |q: f64| joins[((joins.len() as f64 - 1.0) * q).round() as usize];
    eprintln!(
        "chromium time to first frame over {} joins: p50 {} ms, p95 {} ms, max {} ms",
        joins.len(),
        p(0.5),
        p(0.95),
        p(1.0)
    );
    assert!(p(0.5) < 1500, "p50 {} ms", p(0.5));
}

#[test]
fn ovenplayer_from_npm_plays_over_ome_websocket_signalling() {
    let Some(ns) = Netns::create("oven") else {
        return;
    };
    // With a viewer token: a WebSocket cannot send headers, ?token= it is.
    let cascade = Cascade::start(&ns, &["--viewer-token", "oven-secret"]);
    let _publisher = ns.publisher(&cascade, "live", 40);
    let ws = format!(
        "{}/ws/live/live?token=oven-secret",
        cascade.base.replacen("http://", "ws://", 1)
    );
    let v = ns.run_browser(
        serde_json::json!({
            "kind": "player", "base": cascade.base, "staticHost": STATIC_IP,
            "page": "ovenplayer.html", "pageQuery": format!("ws={}", urlencode(&ws)), "secs": 3,
            "closeThenMetric": "cascade_rtc_sessions{kind=\"ws\"}",
            "screenshot": netns::screenshot("ovenplayer.png"),
        }),
        TEST_BUDGET,
    );
    frames_flow(&v);
    // No TURN configured: no ice_servers key, so OvenPlayer did not force relay.
    assert_ne!(v["last"]["path"]["local"], "relay", "{v:#}");
    // Closing the tab closed the WebSocket, which freed the session at once.
    assert_eq!(v["metricAfterClose"], 0.0, "ws session freed: {v:#}");
}

#[test]
fn ovenplayer_signalling_refusals_and_offer_shape() {
    let Some(ns) = Netns::create("wsprobe") else {
        return;
    };
    let cascade = Cascade::start(&ns, &["--viewer-token", "probe-secret"]);
    let _publisher = ns.publisher(&cascade, "live", 30);
    let ws = cascade.base.replacen("http://", "ws://", 1);
    let v = ns.run_browser(
        serde_json::json!({
            "kind": "ws-probe", "base": cascade.base,
            "urls": [
                format!("{ws}/ws/live/live"),
                format!("{ws}/ws/live/live?token=wrong"),
                format!("{ws}/ws/live/offline?token=probe-secret"),
                format!("{ws}/ws/live/live?token=probe-secret"),
            ],
        }),
        TEST_BUDGET,
    );
    assert!(v["ok"] == true, "runner failed: {v:#}");
    let p = v["probes"].as_array().unwrap();
    assert_eq!(
        p[0]["opened"], false,
        "no token: the upgrade is refused: {v:#}"
    );
    assert_eq!(p[1]["opened"], false, "wrong token: refused: {v:#}");
    assert_eq!(
        p[2]["messages"][0]["code"], 404,
        "not live: OME error shape: {v:#}"
    );
    assert!(
        p[2]["messages"][0]["error"]
            .as_str()
            .unwrap_or("")
            .contains("not live"),
        "{v:#}"
    );
    let offer = &p[3]["messages"][0];
    assert_eq!(offer["command"], "offer", "{v:#}");
    assert_eq!(offer["peer_id"], 0);
    assert!(offer["id"].is_u64());
    assert_eq!(offer["sdp"]["type"], "offer");
    assert!(offer["candidates"].is_array());
    assert_eq!(p[3]["sdpHasCandidates"], true);
    assert_eq!(
        p[3]["hasIceServersKey"], false,
        "no ice_servers key without --ice-servers: {v:#}"
    );
}

#[test]
fn turn_relay_with_coturn_rest_credentials() {
    let Some(ns) = Netns::create("turn") else {
        return;
    };
    // coturn on the other end of the veth, with the REST secret cascade
    // mints credentials from; OvenPlayer goes relay-only when the offer
    // carries ice_servers, so media must cross the TURN relay.
    let mut turn = ns.cmd("turnserver");
    turn.args([
        "-n",
        "--listening-ip",
        STATIC_IP,
        "--relay-ip",
        STATIC_IP,
        "--listening-port",
        "3478",
    ])
    .args([
        "--use-auth-secret",
        "--static-auth-secret",
        "turn-test-secret",
        "--realm",
        "cascade",
    ])
    .args([
        "--no-tls",
        "--no-dtls",
        "--no-cli",
        "--log-file",
        "stdout",
        "--simple-log",
        "--fingerprint",
    ]);
    let mut turn = netns::Proc::spawn(turn);
    let _ = turn.wait_line(
        |l| l.contains("listener opened on"),
        std::time::Duration::from_secs(5),
    );
    let ice = format!("turn:{STATIC_IP}:3478?transport=udp");
    let cascade = Cascade::start(
        &ns,
        &["--ice-servers", &ice, "--turn-secret", "turn-test-secret"],
    );
    let _publisher = ns.publisher(&cascade, "live", 40);
    let ws = format!(
        "{}/ws/live/live",
        cascade.base.replacen("http://", "ws://", 1)
    );
    let v = ns.run_browser(
        serde_json::json!({
            "kind": "player", "base": cascade.base, "staticHost": STATIC_IP,
            "page": "ovenplayer.html", "pageQuery": format!("ws={}", urlencode(&ws)), "secs": 3,
        }),
        TEST_BUDGET,
    );
    frames_flow(&v);
    assert_eq!(
        v["last"]["path"]["local"], "relay",
        "media through TURN: {v:#}"
    );
}

#[test]
fn eyevinn_whep_player_from_npm_plays() {
    let Some((ns, cascade)) = setup("eyevinn") else {
        return;
    };
    let _publisher = ns.publisher(&cascade, "live", 40);
    let whep = format!("{}/whep/live", cascade.base);
    let v = ns.run_browser(
        serde_json::json!({
            "kind": "player", "base": cascade.base, "staticHost": STATIC_IP,
            "page": "eyevinn.html", "pageQuery": format!("url={}", urlencode(&whep)), "secs": 3,
        }),
        TEST_BUDGET,
    );
    frames_flow(&v);
}

/// Not a test on its own: the WHIP publisher that the tests above start
/// inside their namespace by running this test binary again there.
#[test]
fn helper_whip_publisher() {
    netns::publisher_main();
}
