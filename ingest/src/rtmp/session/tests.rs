//! The session on virtual time against rml_rtmp's client, in memory.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use rml_rtmp::sessions::{
    ClientSession, ClientSessionConfig, ClientSessionEvent, ClientSessionResult, PublishRequestType,
};
use rml_rtmp::time::RtmpTimestamp;

use super::publish::PENDING_FRAMES;
use super::*;
use crate::rtmp::HEADER_WAIT_MS;
use crate::rtmp::{DEFAULT_PUBLISH_TIMEOUT as PUBLISH_TIMEOUT, IDLE_TIMEOUT};
use crate::transcode::pipe::Tag;

const TOKEN: &str = "s3cret";
/// The wall clock at the start of every test (tests never read a clock).
const WALL0_US: u64 = 1_700_000_000_000_000;
/// The source's H.264 fmtp (from [`avc_seq`]).
const SOURCE_FMTP: &str = "profile-level-id=64001f;packetization-mode=1";
const FAKE_FMTP: &str = "profile-level-id=42e01f;packetization-mode=1";

/// A server [`Session`] and an rml_rtmp client wired back to back on
/// virtual time.
struct Pair {
    t0: Instant,
    ms: u64,
    server: Session,
    client_hs: Option<Handshake>,
    client: ClientSession,
    /// What the client was told, in order.
    events: Vec<ClientSessionEvent>,
    /// The server's outputs other than bytes, in order.
    out: Vec<Output>,
}

impl Pair {
    /// Handshake done, nothing else.
    fn new(bframes: Policy) -> Self {
        let t0 = Instant::now();
        let now = Now {
            at: t0,
            wall_us: WALL0_US,
        };
        let mut client_hs = Handshake::new(PeerType::Client);
        let p0p1 = client_hs.generate_outbound_p0_and_p1().unwrap();
        let mut p = Self {
            t0,
            ms: 0,
            server: Session::new(now, Arc::from(TOKEN), bframes, PUBLISH_TIMEOUT),
            client_hs: Some(client_hs),
            client: ClientSession::new(ClientSessionConfig::new()).unwrap().0,
            events: Vec::new(),
            out: Vec::new(),
        };
        p.send(p0p1);
        assert!(p.client_hs.is_none(), "handshake incomplete");
        p
    }

    /// Connected to `live` and publishing `cam`.
    fn publishing(bframes: Policy) -> Self {
        let mut p = Self::new(bframes);
        p.connect("live");
        p.publish(&format!("cam?token={TOKEN}"));
        assert!(
            matches!(
                p.events.last(),
                Some(ClientSessionEvent::PublishRequestAccepted)
            ),
            "{:?}",
            p.events
        );
        p
    }

    fn now(&self) -> Now {
        Now {
            at: self.t0 + Duration::from_millis(self.ms),
            wall_us: WALL0_US + self.ms * 1_000,
        }
    }

    /// Client bytes to the server, then everything that follows from them.
    fn send(&mut self, bytes: Vec<u8>) {
        let mut inbox = VecDeque::from([bytes]);
        while let Some(bytes) = inbox.pop_front() {
            self.server.handle_input(self.now(), &bytes);
            inbox.extend(self.pump());
        }
    }

    /// Takes the server's outputs: bytes go to the client, whose
    /// answers are returned.
    fn pump(&mut self) -> Vec<Vec<u8>> {
        let mut answers = Vec::new();
        while let Some(o) = self.server.poll_output() {
            let Output::Transmit { bytes, .. } = o else {
                self.out.push(o);
                continue;
            };
            let mut data = bytes;
            if let Some(hs) = &mut self.client_hs {
                match hs.process_bytes(&data).unwrap() {
                    HandshakeProcessResult::InProgress { response_bytes } => {
                        answers.push(response_bytes);
                        continue;
                    }
                    HandshakeProcessResult::Completed {
                        response_bytes,
                        remaining_bytes,
                    } => {
                        answers.push(response_bytes);
                        self.client_hs = None;
                        data = remaining_bytes;
                    }
                }
            }
            for r in self.client.handle_input(&data).unwrap() {
                match r {
                    ClientSessionResult::OutboundResponse(p) => answers.push(p.bytes),
                    ClientSessionResult::RaisedEvent(e) => self.events.push(e),
                    ClientSessionResult::UnhandleableMessageReceived(_) => {}
                }
            }
        }
        answers
    }

    fn client_sends(&mut self, r: ClientSessionResult) {
        let ClientSessionResult::OutboundResponse(p) = r else {
            panic!("client sent nothing");
        };
        self.send(p.bytes);
    }

    fn connect(&mut self, app: &str) {
        let r = self.client.request_connection(app.into()).unwrap();
        self.client_sends(r);
    }

    fn publish(&mut self, key: &str) {
        let r = self
            .client
            .request_publishing(key.into(), PublishRequestType::Live)
            .unwrap();
        self.client_sends(r);
    }

    fn video(&mut self, ts: u32, tag: Bytes) {
        let r = self
            .client
            .publish_video_data(tag, RtmpTimestamp::new(ts), false)
            .unwrap();
        self.client_sends(r);
    }

    fn audio(&mut self, ts: u32, tag: Bytes) {
        let r = self
            .client
            .publish_audio_data(tag, RtmpTimestamp::new(ts), false)
            .unwrap();
        self.client_sends(r);
    }

    /// Moves virtual time to `ms`, firing every deadline on the way at
    /// its exact time.
    fn run_until(&mut self, ms: u64) {
        let end = self.t0 + Duration::from_millis(ms);
        for _ in 0..100 {
            match self.server.poll_timeout() {
                Some(at) if at <= end => {
                    let due = u64::try_from((at - self.t0).as_millis()).unwrap();
                    self.ms = self.ms.max(due);
                    self.server.handle_timeout(self.now());
                    let answers = self.pump();
                    assert!(answers.is_empty());
                }
                _ => {
                    self.ms = ms;
                    return;
                }
            }
        }
        panic!("a deadline does not move on");
    }

    fn transcoder(&mut self, ev: Event) {
        self.server.handle_transcoder(self.now(), ev);
        assert!(self.pump().is_empty());
    }

    fn answer_transcode(&mut self, r: Result<Box<dyn Transcode>, transcode::Error>) {
        self.server.handle_transcode(r);
        assert!(self.pump().is_empty());
    }

    /// The outputs so far, in short.
    fn take(&mut self) -> Vec<String> {
        std::mem::take(&mut self.out).iter().map(show).collect()
    }
}

fn show(o: &Output) -> String {
    let catalog = |c: &Catalog| {
        c.tracks
            .iter()
            .map(|t| format!("{}:{}", t.name, t.fmtp))
            .collect::<Vec<_>>()
            .join(" ")
    };
    match o {
        Output::Transmit { .. } => "bytes".into(),
        Output::Publish {
            catalog: c,
            transcoded,
            ..
        } => format!(
            "publish{} {}",
            if *transcoded { "(t)" } else { "" },
            catalog(c)
        ),
        Output::Catalog(c) => format!("catalog {}", catalog(c)),
        Output::Frame(Track::Video, f) if f.keyframe => "V".into(),
        Output::Frame(Track::Video, _) => "v".into(),
        Output::Frame(Track::Audio, _) => "a".into(),
        Output::StartTranscode { .. } => "start transcode".into(),
        Output::Authorize { stream, token } => {
            format!("authorize {stream} token={}", token.is_some())
        }
        Output::Close(Ok(reason)) => format!("close: {reason}"),
        Output::Close(Err(e)) => format!("error: {e}"),
    }
}

fn avc_seq() -> Bytes {
    Bytes::from_static(&[
        0x17, 0, 0, 0, 0, 1, 0x64, 0, 0x1f, 0xff, 0xe1, 0, 4, 0x67, 0x64, 0, 0x1f, 1, 0, 2, 0x68,
        0xee,
    ])
}

/// One H.264 access unit of one NAL unit; `cts` ≠ 0 means B-frames.
fn avc(key: bool, cts: i32) -> Bytes {
    let mut v = vec![if key { 0x17 } else { 0x27 }, 1];
    v.extend_from_slice(&cts.to_be_bytes()[1..]);
    v.extend_from_slice(&[0, 0, 0, 2, if key { 0x65 } else { 0x41 }, 0x80]);
    Bytes::from(v)
}

/// Enhanced RTMP Opus sequence start (OpusHead, stereo).
fn opus_head() -> Bytes {
    let mut tag = b"\x90Opus".to_vec();
    tag.extend_from_slice(b"OpusHead");
    tag.extend_from_slice(&[1, 2, 0x38, 1, 0x80, 0xbb, 0, 0, 0, 0, 0]);
    Bytes::from(tag)
}

/// An Opus packet carrying `n`.
fn opus(n: u16) -> Bytes {
    let mut tag = b"\x91Opus\xfc".to_vec();
    tag.extend_from_slice(&n.to_be_bytes());
    Bytes::from(tag)
}

fn transcode_policy() -> Policy {
    Policy::Transcode(Arc::new(Settings::new(
        PathBuf::from("/nonexistent/ffmpeg"),
        1,
    )))
}

/// What a [`Fake`] transcoder was given; the test keeps a handle.
#[derive(Default)]
struct Script {
    pushed: Vec<Frame>,
    stall: Option<Instant>,
}

/// A transcoder that turns every tag into a keyframe.
struct Fake {
    script: Arc<Mutex<Script>>,
    started: bool,
}

fn fake() -> (Box<dyn Transcode>, Arc<Mutex<Script>>) {
    let script = Arc::new(Mutex::new(Script::default()));
    let fake = Fake {
        script: script.clone(),
        started: false,
    };
    (Box::new(fake), script)
}

impl Transcode for Fake {
    fn push(&mut self, frame: &Frame) {
        self.script.lock().unwrap().pushed.push(frame.clone());
    }

    fn stall_deadline(&self) -> Option<Instant> {
        self.script.lock().unwrap().stall
    }

    fn started(&self) -> bool {
        self.started
    }

    fn fmtp(&self) -> Option<&str> {
        self.started.then_some(FAKE_FMTP)
    }

    fn output(&mut self, event: Event) -> Result<Option<Frame>, transcode::Error> {
        let tag = match event {
            Event::Tag(tag) => tag,
            Event::Ended(e) => return Err(e),
        };
        self.started = true;
        Ok(Some(Frame {
            payload: tag.body,
            pts: u64::from(tag.ts) * 90,
            dts: u64::from(tag.ts) * 90,
            keyframe: true,
            ingest_us: 0,
        }))
    }
}

fn tag(ts: u32) -> Event {
    Event::Tag(Tag {
        kind: 9,
        ts,
        body: Bytes::from_static(b"transcoded"),
    })
}

#[test]
fn goes_live_with_both_headers_and_the_first_video_frame() {
    let mut p = Pair::publishing(Policy::Drop);
    p.audio(0, opus_head());
    p.video(0, avc_seq());
    assert!(p.take().is_empty(), "live before the first video frame");
    p.video(0, avc(true, 0));
    assert_eq!(
        p.take(),
        [
            format!("publish video:{SOURCE_FMTP} audio:minptime=10;useinbandfec=1;stereo=1;sprop-stereo=1"),
            "V".into()
        ]
    );
    p.audio(20, opus(0));
    p.video(33, avc(false, 0));
    assert_eq!(p.take(), ["a", "v"]);
}

#[test]
fn audio_before_video_is_held_and_the_oldest_dropped() {
    let mut p = Pair::publishing(Policy::Drop);
    p.audio(0, opus_head());
    for n in 0..300 {
        p.audio(u32::from(n) * 20, opus(n));
    }
    // No time passed: still waiting for the video header.
    assert!(p.take().is_empty());
    p.video(6_000, avc_seq());
    p.video(6_000, avc(true, 0));
    let out = std::mem::take(&mut p.out);
    assert!(matches!(out[0], Output::Publish { .. }));
    let frames: Vec<_> = out[1..]
        .iter()
        .map(|o| match o {
            Output::Frame(t, f) => (*t, f.payload.clone()),
            o => panic!("{o:?}"),
        })
        .collect();
    assert_eq!(frames.len(), PENDING_FRAMES);
    // 301 frames held in 256: the first 45 audio frames went.
    assert_eq!(
        frames[0],
        (Track::Audio, Bytes::from_static(&[0xfc, 0, 45]))
    );
    assert_eq!(frames[254].1[..], [0xfc, 1, 43]); // 299
    assert_eq!(frames[255].0, Track::Video);
}

#[test]
fn one_track_goes_live_after_the_header_wait() {
    let mut p = Pair::publishing(Policy::Drop);
    p.audio(0, opus_head());
    p.audio(0, opus(0));
    assert_eq!(
        p.server.poll_timeout(),
        Some(p.t0 + Duration::from_millis(HEADER_WAIT_MS))
    );
    p.run_until(999);
    assert!(p.take().is_empty());
    p.run_until(1_000);
    assert_eq!(
        p.take(),
        [
            "publish audio:minptime=10;useinbandfec=1;stereo=1;sprop-stereo=1",
            "a"
        ]
    );

    // A video header with no frame: published at the frame wait.
    let mut p = Pair::publishing(Policy::Drop);
    p.video(0, avc_seq());
    p.run_until(2_999);
    assert!(p.take().is_empty());
    p.run_until(3_000);
    assert_eq!(p.take(), [format!("publish video:{SOURCE_FMTP}")]);
}

#[test]
fn a_connection_that_does_not_publish_is_closed_at_the_publish_deadline() {
    // Connected, never publishing.
    let mut p = Pair::new(Policy::Drop);
    p.connect("live");
    assert!(matches!(
        p.events.last(),
        Some(ClientSessionEvent::ConnectionRequestAccepted)
    ));
    assert_eq!(p.server.poll_timeout(), Some(p.t0 + PUBLISH_TIMEOUT));
    // A byte now and then restarts the idle clock, never the publish one.
    for ms in [3_000, 6_000, 9_000] {
        p.run_until(ms);
        let (ping, _) = p.client.send_ping_request().unwrap();
        p.send(ping.bytes);
    }
    p.run_until(9_999);
    assert!(p.take().is_empty());
    p.run_until(10_000);
    assert_eq!(p.take(), ["error: no publish within the publish timeout"]);
    assert_eq!(p.server.poll_timeout(), None);

    // The deadline runs from the accept, through the handshake: a slow
    // handshake does not buy time.
    let t0 = Instant::now();
    let at = |ms| Now {
        at: t0 + Duration::from_millis(ms),
        wall_us: WALL0_US + ms * 1_000,
    };
    let mut s = Session::new(
        at(0),
        Arc::from(TOKEN),
        Policy::Drop,
        Duration::from_secs(2),
    );
    s.handle_input(at(1), &[3; 100]);
    assert_eq!(s.poll_timeout(), Some(t0 + Duration::from_secs(2)));
    s.handle_timeout(at(2_000));
    let out: Vec<String> = std::iter::from_fn(|| s.poll_output())
        .map(|o| show(&o))
        .collect();
    assert_eq!(
        out,
        ["bytes", "error: no publish within the publish timeout"]
    );
    assert_eq!(Error::PublishTimeout.reason(), "publish_timeout");

    // Publishing without ever sending a sequence header: the publish
    // deadline is gone, only the idle one is left.
    let mut p = Pair::publishing(Policy::Drop);
    assert_eq!(p.server.poll_timeout(), Some(p.t0 + IDLE_TIMEOUT));
    p.run_until(15_000);
    assert_eq!(p.take(), ["error: idle timeout"]);
}

#[test]
fn media_may_be_large_only_after_an_accepted_publish() {
    // A media message header announcing 1 MiB on chunk stream 4.
    let big = |p: &mut Pair| {
        let mut v = vec![4u8, 0, 0, 0];
        v.extend_from_slice(&(1u32 << 20).to_be_bytes()[1..]);
        v.extend_from_slice(&[9, 1, 0, 0, 0]);
        p.server.handle_input(p.now(), &v);
        p.pump();
    };
    let mut p = Pair::new(Policy::Drop);
    p.connect("live");
    big(&mut p);
    assert_eq!(
        p.take(),
        ["error: chunk stream: message of type 9 too large: 1048576 bytes"]
    );
    let mut p = Pair::publishing(Policy::Drop);
    p.take();
    big(&mut p);
    assert!(p.take().is_empty(), "accepted, waiting for its bytes");
}

#[test]
fn handshake_deadline_and_early_closes() {
    let t0 = Instant::now();
    let now = |ms| Now {
        at: t0 + Duration::from_millis(ms),
        wall_us: WALL0_US + ms * 1_000,
    };
    let ends = |s: &mut Session| -> Vec<String> {
        std::iter::from_fn(|| s.poll_output())
            .map(|o| show(&o))
            .collect()
    };
    // A port probe: closed before a byte.
    let mut s = Session::new(now(0), Arc::from(TOKEN), Policy::Drop, PUBLISH_TIMEOUT);
    s.handle_eof(now(10));
    assert_eq!(ends(&mut s), ["error: closed before the handshake"]);
    // A client that stops half way: the server had answered c0 with
    // s0 and s1, due by the handshake deadline.
    let mut s = Session::new(now(0), Arc::from(TOKEN), Policy::Drop, PUBLISH_TIMEOUT);
    s.handle_input(now(1), &[3]);
    assert!(matches!(
        s.poll_output(),
        Some(Output::Transmit { handshake_deadline: Some(d), .. }) if d == t0 + HANDSHAKE_TIMEOUT
    ));
    s.handle_eof(now(2));
    assert_eq!(ends(&mut s), ["error: handshake: closed during handshake"]);
    // One that stalls.
    let mut s = Session::new(now(0), Arc::from(TOKEN), Policy::Drop, PUBLISH_TIMEOUT);
    s.handle_input(now(1), &[3; 100]);
    assert_eq!(ends(&mut s), ["bytes"]);
    assert_eq!(s.poll_timeout(), Some(now(0).at + HANDSHAKE_TIMEOUT));
    s.handle_timeout(now(4_999));
    assert!(ends(&mut s).is_empty());
    s.handle_timeout(now(5_000));
    assert_eq!(ends(&mut s), ["error: handshake timed out"]);
    // Not RTMP at all.
    let mut s = Session::new(now(0), Arc::from(TOKEN), Policy::Drop, PUBLISH_TIMEOUT);
    s.handle_input(now(1), b"GET / HTTP/1.1\r\n\r\n");
    assert!(matches!(
        s.poll_output(),
        Some(Output::Close(Err(Error::Handshake(_))))
    ));
    assert_eq!(s.poll_timeout(), None);
}

#[test]
fn refusals_send_a_status_then_close() {
    let refused = |p: &mut Pair| match p.out.pop() {
        Some(Output::Close(Err(Error::Refused(r)))) => r,
        o => panic!("{o:?}"),
    };
    let mut p = Pair::new(Policy::Drop);
    p.connect("other");
    assert_eq!(refused(&mut p), "app");
    assert!(
        format!("{:?}", p.events).contains("unknown application"),
        "{:?}",
        p.events
    );

    for (key, reason, code) in [
        ("cam?token=nope", "token", "NetStream.Publish.Unauthorized"),
        ("cam", "token", "NetStream.Publish.Unauthorized"),
        (
            &format!("a b?token={TOKEN}") as &str,
            "name",
            "NetStream.Publish.BadName",
        ),
    ] {
        let mut p = Pair::new(Policy::Drop);
        p.connect("live");
        p.publish(key);
        assert_eq!(refused(&mut p), reason, "{key}");
        assert!(format!("{:?}", p.events).contains(code), "{:?}", p.events);
    }

    let mut p = Pair::new(Policy::Drop);
    p.connect("live");
    let r = p.client.request_playback("cam".into()).unwrap();
    p.client_sends(r);
    assert_eq!(refused(&mut p), "play");

    // The token may come with the application instead.
    let mut p = Pair::new(Policy::Drop);
    p.connect(&format!("live?token={TOKEN}"));
    p.publish("cam");
    assert!(matches!(
        p.events.last(),
        Some(ClientSessionEvent::PublishRequestAccepted)
    ));
    assert!(p.take().is_empty());
}

#[test]
fn a_draining_node_refuses_new_publishes_not_running_ones() {
    let flag = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Accepted before the drain: it keeps publishing.
    let mut running = Pair::new(Policy::Drop);
    running.server.set_draining(flag.clone());
    running.connect("live");
    running.publish(&format!("cam?token={TOKEN}"));
    assert!(matches!(
        running.events.last(),
        Some(ClientSessionEvent::PublishRequestAccepted)
    ));
    flag.store(true, std::sync::atomic::Ordering::Relaxed);
    running.audio(0, opus_head());
    running.video(0, avc_seq());
    running.video(0, avc(true, 0));
    assert_eq!(running.take().len(), 2, "media still flows");
    // A new publish during the drain gets a clear status and is closed,
    // with the right token too.
    let mut p = Pair::new(Policy::Drop);
    p.server.set_draining(flag);
    p.connect("live");
    p.publish(&format!("cam2?token={TOKEN}"));
    match p.out.pop() {
        Some(Output::Close(Err(Error::Refused(r)))) => assert_eq!(r, "draining"),
        o => panic!("{o:?}"),
    }
    let events = format!("{:?}", p.events);
    assert!(events.contains("NetStream.Publish.Rejected"), "{events}");
    assert!(events.contains("draining"), "{events}");
}

#[test]
fn close_reasons() {
    let live = || {
        let mut p = Pair::publishing(Policy::Drop);
        p.audio(0, opus_head());
        p.video(0, avc_seq());
        p.video(0, avc(true, 0));
        assert_eq!(p.take().len(), 2);
        p
    };
    let mut p = live();
    p.server.handle_superseded();
    p.pump();
    assert_eq!(p.take(), ["close: taken over by a new publisher"]);
    // Nothing after the close: no frames, no deadline.
    p.video(33, avc(true, 0));
    p.server.handle_eof(p.now());
    p.pump();
    assert!(p.take().is_empty());
    assert_eq!(p.server.poll_timeout(), None);

    let mut p = live();
    p.server.handle_shutdown();
    p.pump();
    assert_eq!(p.take(), ["close: shutdown"]);

    let mut p = live();
    p.server.handle_eof(p.now());
    p.pump();
    assert_eq!(p.take(), ["close: closed by peer"]);

    let mut p = live();
    for r in p.client.stop_publishing().unwrap() {
        p.client_sends(r);
    }
    assert_eq!(p.take(), ["close: unpublished"]);
}

#[test]
fn bad_media_is_dropped_and_a_bad_chunk_stream_closes() {
    let mut p = Pair::publishing(Policy::Drop);
    // Before any header, a truncated tag, a NAL unit longer than its tag.
    p.video(0, avc(true, 0));
    p.video(0, Bytes::from_static(&[0x17]));
    p.audio(0, Bytes::from_static(&[0xaf, 1, 0x21]));
    p.audio(0, opus_head());
    p.video(0, avc_seq());
    p.video(0, Bytes::from_static(&[0x17, 1, 0, 0, 0, 0, 0, 0, 9, 0x65]));
    assert!(p.take().is_empty());
    assert_eq!(p.server.publish.as_ref().map(|p| p.bad_tags), Some(4));
    p.video(0, avc(true, 0));
    assert_eq!(p.take().len(), 2, "the stream goes on");

    // A compressed chunk header on a chunk stream never opened.
    p.send(vec![0x40 | 60, 0, 0, 0, 0, 0, 1, 9]);
    assert_eq!(
        p.take(),
        ["error: chunk stream: chunk stream 60 used before a full header"]
    );
    assert_eq!(p.server.poll_timeout(), None);
}

#[test]
fn a_transcode_goes_live_with_its_first_frame() {
    let mut p = Pair::publishing(transcode_policy());
    p.audio(0, opus_head());
    p.video(0, avc_seq());
    p.video(0, avc(true, 66));
    // Handling paused until the transcoder answers.
    assert_eq!(p.take(), ["start transcode"]);
    let (t, script) = fake();
    p.answer_transcode(Ok(t));
    assert!(p.server.transcoding());
    p.audio(10, opus(0));
    p.video(33, avc(false, 33));
    // Warming up: no header wait either, only the idle deadline.
    assert!(p.take().is_empty());
    assert_eq!(p.server.poll_timeout(), Some(p.t0 + IDLE_TIMEOUT));
    assert_eq!(script.lock().unwrap().pushed.len(), 2);
    p.transcoder(tag(0));
    assert_eq!(
        p.take(),
        [
            format!("publish(t) video:{FAKE_FMTP} audio:minptime=10;useinbandfec=1;stereo=1;sprop-stereo=1"),
            "a".into(),
            "V".into()
        ]
    );
    // The source's video goes to the transcoder only.
    p.video(66, avc(false, 33));
    p.transcoder(tag(33));
    assert_eq!(p.take(), ["V"]);
    assert_eq!(script.lock().unwrap().pushed.len(), 3);

    // ffmpeg exits: the source's catalog, its video from a keyframe.
    p.transcoder(Event::Ended(transcode::Error::Exited("signal 9".into())));
    assert!(!p.server.transcoding());
    assert_eq!(
        p.take(),
        [format!(
            "catalog video:{SOURCE_FMTP} audio:minptime=10;useinbandfec=1;stereo=1;sprop-stereo=1"
        )]
    );
    p.video(100, avc(false, 33));
    p.audio(100, opus(1));
    p.video(133, avc(true, 33));
    assert_eq!(p.take(), ["a", "V"]);
}

#[test]
fn a_stalled_transcode_falls_back_and_goes_live() {
    let mut p = Pair::publishing(transcode_policy());
    p.video(0, avc_seq());
    p.audio(0, opus_head());
    p.audio(0, opus(0));
    p.video(0, avc(true, 66));
    assert_eq!(p.take(), ["start transcode"]);
    let (t, script) = fake();
    p.answer_transcode(Ok(t));
    let stall = p.t0 + Duration::from_millis(5_000);
    script.lock().unwrap().stall = Some(stall);
    assert_eq!(p.server.poll_timeout(), Some(stall));
    p.run_until(4_999);
    assert!(p.take().is_empty());
    p.run_until(5_000);
    assert!(!p.server.transcoding());
    // The held audio goes out; the video resumes at a keyframe.
    assert_eq!(
        p.take(),
        [
            format!("publish video:{SOURCE_FMTP} audio:minptime=10;useinbandfec=1;stereo=1;sprop-stereo=1"),
            "a".into()
        ]
    );
    p.video(5_000, avc(false, 33));
    assert!(p.take().is_empty());
    p.video(5_033, avc(true, 33));
    assert_eq!(p.take(), ["V"]);
}

#[test]
fn a_transcode_that_does_not_start_passes_the_source_through() {
    let mut p = Pair::publishing(transcode_policy());
    p.audio(0, opus_head());
    p.video(0, avc_seq());
    p.video(0, avc(true, 66));
    assert_eq!(p.take(), ["start transcode"]);
    p.answer_transcode(Err(transcode::Error::Limit(1)));
    assert!(!p.server.transcoding());
    assert_eq!(
        p.take(),
        [
            format!("publish video:{SOURCE_FMTP} audio:minptime=10;useinbandfec=1;stereo=1;sprop-stereo=1"),
            "V".into()
        ]
    );
    // Tried once per publish.
    p.video(33, avc(true, 66));
    assert_eq!(p.take(), ["V"]);

    // With the drop policy B-frames never start one.
    let mut p = Pair::publishing(Policy::Drop);
    p.audio(0, opus_head());
    p.video(0, avc_seq());
    p.video(0, avc(true, 66));
    assert_eq!(p.take().len(), 2);
}

#[test]
fn late_b_frames_switch_a_live_stream_to_the_transcode() {
    let mut p = Pair::publishing(transcode_policy());
    p.audio(0, opus_head());
    p.video(0, avc_seq());
    p.video(0, avc(true, 0));
    assert_eq!(p.take().len(), 2);
    p.video(33, avc(false, 33));
    assert_eq!(p.take(), ["start transcode"]);
    let (t, script) = fake();
    p.answer_transcode(Ok(t));
    // While it warms up the source keeps playing (its catalog now says
    // B-frames).
    assert_eq!(
        p.take(),
        [
            format!("catalog video:{SOURCE_FMTP} audio:minptime=10;useinbandfec=1;stereo=1;sprop-stereo=1"),
            "v".into()
        ]
    );
    p.video(66, avc(true, 33));
    assert_eq!(p.take(), ["V"]);
    p.transcoder(tag(66));
    assert_eq!(
        p.take(),
        [
            format!("catalog video:{FAKE_FMTP} audio:minptime=10;useinbandfec=1;stereo=1;sprop-stereo=1"),
            "V".into()
        ]
    );
    p.video(100, avc(false, 33));
    assert!(p.take().is_empty());
    assert_eq!(script.lock().unwrap().pushed.len(), 3);
}

/// Wrong tokens count against the client's address: past the maximum its
/// publishes are refused with the rate-limit reason, a right token too,
/// while another address still publishes.
#[test]
fn wrong_tokens_ban_the_address() {
    let gate = cascade_rtc::limit::AuthGate::new(2);
    let ip = std::net::IpAddr::from([10, 0, 0, 1]);
    let refused = |p: &mut Pair| match p.out.iter().find_map(|o| match o {
        Output::Close(Err(Error::Refused(r))) => Some(*r),
        _ => None,
    }) {
        Some(r) => r,
        None => panic!("not refused: {:?}", p.out),
    };
    let attempt = |key: &str, ip| {
        let mut p = Pair::new(Policy::Drop);
        p.server.set_auth(gate.clone(), ip);
        p.connect("live");
        p.publish(key);
        p
    };
    for _ in 0..2 {
        assert_eq!(refused(&mut attempt("cam?token=nope", ip)), "token");
    }
    let mut p = attempt(&format!("cam?token={TOKEN}"), ip);
    assert_eq!(refused(&mut p), "rate_limited");
    assert!(
        format!("{:?}", p.events).contains("NetStream.Publish.Unauthorized"),
        "{:?}",
        p.events
    );
    let p = attempt(
        &format!("cam?token={TOKEN}"),
        std::net::IpAddr::from([10, 0, 0, 2]),
    );
    assert!(matches!(
        p.events.last(),
        Some(ClientSessionEvent::PublishRequestAccepted)
    ));
}

/// With signed tokens: a publish JWT publishes its own stream only.
#[test]
fn signed_tokens_publish_their_stream_only() {
    use cascade_rtc::auth::Auth;
    let attempt = |key: &str, jwt: &str| {
        let mut p = Pair::new(Policy::Drop);
        p.server.set_tokens(Auth::new(Some(TOKEN), None, Some("k")));
        p.connect("live");
        p.publish(&key.replace("JWT", jwt));
        p
    };
    let jwt = signed("cam", "publish");
    let p = attempt("cam?token=JWT", &jwt);
    assert!(matches!(
        p.events.last(),
        Some(ClientSessionEvent::PublishRequestAccepted)
    ));
    let p = attempt("other?token=JWT", &jwt);
    assert!(
        format!("{:?}", p.events).contains("NetStream.Publish.Unauthorized"),
        "{:?}",
        p.events
    );
    let p = attempt("cam?token=JWT", &signed("cam", "view"));
    assert!(
        format!("{:?}", p.events).contains("NetStream.Publish.Unauthorized"),
        "{:?}",
        p.events
    );
}

/// With an auth webhook: the right token publishes without asking; any
/// other key pauses the session on `Output::Authorize` until the shell
/// answers; a refusal is `NetStream.Publish.Unauthorized` and counts as a
/// wrong token; the publish deadline still ends a wait that never ends.
#[test]
fn the_webhook_decides_other_publishes() {
    use cascade_rtc::auth::{Auth, Denied};
    use cascade_rtc::webhook::Webhook;
    // Never called: the core does no I/O, the test answers for the shell.
    let hook = Webhook::new("http://127.0.0.1:9/auth").unwrap();
    let gate = cascade_rtc::limit::AuthGate::new(1);
    let ip = std::net::IpAddr::from([10, 0, 0, 9]);
    let attempt = |key: &str| {
        let mut p = Pair::new(Policy::Drop);
        p.server
            .set_tokens(Auth::new(Some(TOKEN), None, None).with_webhook(Some(hook.clone())));
        p.server.set_auth(gate.clone(), ip);
        p.connect("live");
        p.publish(key);
        p
    };
    let accepted = |p: &Pair| {
        matches!(
            p.events.last(),
            Some(ClientSessionEvent::PublishRequestAccepted)
        )
    };

    // The operator's token: no call.
    let mut p = attempt(&format!("cam?token={TOKEN}"));
    assert!(accepted(&p));
    assert!(p.take().is_empty());

    // Another token: asked, then allowed.
    let mut p = attempt("cam?token=other");
    assert_eq!(p.take(), ["authorize cam token=true"]);
    assert!(!accepted(&p), "nothing answered while the webhook decides");
    p.server.handle_authorized(p.now(), Ok(()));
    for a in p.pump() {
        p.send(a);
    }
    assert!(accepted(&p), "{:?}", p.events);
    // Media flows as after any accepted publish.
    p.audio(0, opus_head());
    p.video(0, avc_seq());
    p.video(0, avc(true, 0));
    assert_eq!(p.take().len(), 2, "publish and the keyframe");

    // Bad names are refused before the webhook is asked.
    let mut p = attempt("a b");
    assert!(!p.take().iter().any(|o| o.starts_with("authorize")));
    assert!(format!("{:?}", p.events).contains("NetStream.Publish.BadName"));

    // No token, refused: the client is told, the address is charged.
    let mut p = attempt("cam");
    assert_eq!(p.take(), ["authorize cam token=false"]);
    p.server
        .handle_authorized(p.now(), Err(Denied::Refused("webhook_deny")));
    for a in p.pump() {
        p.send(a);
    }
    assert_eq!(p.take(), ["error: refused: token"]);
    assert!(
        format!("{:?}", p.events).contains("NetStream.Publish.Unauthorized"),
        "{:?}",
        p.events
    );
    // The gate (max 1) now bans the address: even the right token.
    let mut p = attempt(&format!("cam?token={TOKEN}"));
    assert_eq!(p.take(), ["error: refused: rate_limited"]);

    // A webhook that never answers: the publish deadline closes.
    let ip2 = std::net::IpAddr::from([10, 0, 0, 10]);
    let mut p = Pair::new(Policy::Drop);
    p.server
        .set_tokens(Auth::new(Some(TOKEN), None, None).with_webhook(Some(hook.clone())));
    p.server.set_auth(gate.clone(), ip2);
    p.connect("live");
    p.publish("cam?token=x");
    assert_eq!(p.take(), ["authorize cam token=true"]);
    p.run_until(PUBLISH_TIMEOUT.as_millis() as u64 + 1);
    assert_eq!(p.take(), ["error: no publish within the publish timeout"]);
    // A late answer after the close changes nothing.
    p.server.handle_authorized(p.now(), Ok(()));
    assert!(p.server.poll_output().is_none());
}

/// A JWT signed with "k" for `sub`/`act`, valid until 2100.
fn signed(sub: &str, act: &str) -> String {
    #[derive(serde::Serialize)]
    struct Claims<'a> {
        sub: &'a str,
        act: &'a str,
        exp: u64,
    }
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &Claims {
            sub,
            act,
            exp: 4_102_444_800,
        },
        &jsonwebtoken::EncodingKey::from_secret(b"k"),
    )
    .unwrap()
}
