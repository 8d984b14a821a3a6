//! WHIP ingest (RFC 9725): a publisher's offer becomes a str0m session in a
//! shard of the node's [`cascade_rtc::Server`]; received frames go into the
//! registry as the stream's tracks.
//!
//! Timeline: every track's pts lives on one stream timeline (seconds since
//! the stream's first frame, in the track clock), anchored on each track's
//! first arrival, so audio and video stay in sync through relay and edge.
//!
//! `ingest_us` of a frame is the wall clock of its first RTP packet's arrival
//! at the session's shard; str0m hands the frame over on its last packet (the
//! marker bit), ~0.1 ms later for a 2.5 Mbit/s frame on loopback.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use cascade_media::annexb;
use cascade_media::nal::Nal;
use cascade_origin::catalog::{rendition_track, Catalog, Codec, Kind, Rendition, TrackInfo, VIDEO};
use cascade_origin::frame::Frame;
use cascade_origin::registry::Publisher;
use cascade_origin::relay::wire::MAX_TRACKS;
use cascade_origin::Registry;
use cascade_rtc::auth::{unix_now, Action, Auth, Check, Denied};
use cascade_rtc::http::{denied, ApiError, AuthorizeFuture, CreateFuture, Created, Endpoint};
use cascade_rtc::session::CloseReason;
use cascade_rtc::{Ctx, Flow, Handler};
use str0m::change::SdpOffer;
use str0m::format::Codec as RtcCodec;
use str0m::media::{KeyframeRequestKind, MediaData, MediaKind, Mid, Rid};
use str0m::Event;

use crate::metrics as m;
use crate::simulcast;

/// Wait this long for every offered track's first frame before going live
/// with the tracks seen so far (an encoder whose audio starts late).
const PUBLISH_WAIT: Duration = Duration::from_millis(1500);
/// At most one PLI per this interval: encoders answer each with a costly
/// keyframe; viewers joining in a burst need only one.
const PLI_INTERVAL: Duration = Duration::from_millis(500);

/// What a publisher refused for its token is told.
const PUBLISH_UNAUTHORIZED: &str =
    "missing or wrong publish token: send Authorization: Bearer TOKEN";

/// The WHIP endpoint: token check and session creation.
pub struct Whip {
    registry: Arc<Registry>,
    rtc: cascade_rtc::Server,
    auth: Auth,
}

impl Whip {
    /// A WHIP endpoint publishing into `registry`, requiring `token`.
    pub fn new(registry: Arc<Registry>, rtc: cascade_rtc::Server, token: Arc<str>) -> Self {
        Self::with_auth(registry, rtc, Auth::new(Some(&token), None, None))
    }

    /// A WHIP endpoint publishing into `registry` under `auth`'s rules
    /// (publish token, signed tokens).
    pub fn with_auth(registry: Arc<Registry>, rtc: cascade_rtc::Server, auth: Auth) -> Self {
        Self {
            registry,
            rtc,
            auth,
        }
    }
}

/// The WHIP routes (`/whip/{stream}` and its session resources) and the
/// browser publish page (`/publish/{stream}`).
pub fn router(registry: Arc<Registry>, rtc: cascade_rtc::Server, token: Arc<str>) -> axum::Router {
    router_with_auth(registry, rtc, Auth::new(Some(&token), None, None))
}

/// [`router`] under `auth`'s rules (publish token and signed tokens).
pub fn router_with_auth(
    registry: Arc<Registry>,
    rtc: cascade_rtc::Server,
    auth: Auth,
) -> axum::Router {
    let whip = Arc::new(Whip::with_auth(registry, rtc.clone(), auth));
    cascade_rtc::http::router(whip, rtc).merge(crate::publish::router())
}

/// Audio and video m-lines of an offer: each may become a track, and the
/// relay refuses a stream with more than [`MAX_TRACKS`], so the ingest
/// refuses the offer up front.
fn media_lines(offer: &str) -> usize {
    cascade_media::sdp::scan(offer)
        .iter()
        .filter(|m| m.kind == "audio" || m.kind == "video")
        .count()
}

/// Audio and video m-lines the publisher will send on (not recvonly or
/// inactive; port 0 is not looked at, str0m refuses what it cannot use).
fn sending_kinds(offer: &str) -> (bool, bool) {
    let lines = cascade_media::sdp::scan(offer);
    let sends = |kind: &str| lines.iter().any(|m| m.kind == kind && m.sends());
    (sends("audio"), sends("video"))
}

impl Endpoint for Whip {
    fn kind(&self) -> &'static str {
        "whip"
    }

    fn authorize(&self, stream: &str, token: Option<&str>) -> Result<(), ApiError> {
        if let Err(why) = self
            .auth
            .authorize(Action::Publish, stream, token, unix_now())
        {
            tracing::debug!(reason = why.label(), "whip publish refused");
            return Err(ApiError::Unauthorized(PUBLISH_UNAUTHORIZED));
        }
        Ok(())
    }

    fn authorize_from<'a>(
        &'a self,
        stream: &'a str,
        token: Option<&'a str>,
        remote: std::net::SocketAddr,
    ) -> AuthorizeFuture<'a> {
        Box::pin(async move {
            let now = unix_now();
            // The webhook is not asked about names no stream can have.
            if self.auth.check(Action::Publish, stream, token, now) == Check::Ask
                && !cascade_origin::valid_stream_name(stream)
            {
                return Err(ApiError::BadRequest(cascade_origin::BAD_STREAM_NAME.into()));
            }
            self.auth
                .decide(Action::Publish, stream, "whip", remote, token, now)
                .await
                .map_err(|d| {
                    if let Denied::Refused(reason) = d {
                        tracing::debug!(reason, "whip publish refused");
                    }
                    denied(d, PUBLISH_UNAUTHORIZED)
                })
        })
    }

    fn create(&self, stream: String, offer: String) -> CreateFuture {
        let registry = self.registry.clone();
        let rtc = self.rtc.clone();
        Box::pin(async move {
            let media = media_lines(&offer);
            if media > MAX_TRACKS {
                return Err(ApiError::BadRequest(format!(
                    "offer has {media} audio/video m-lines, at most {MAX_TRACKS}: a stream carries at most {MAX_TRACKS} tracks"
                )));
            }
            let (audio, video) = sending_kinds(&offer);
            if !audio && !video {
                return Err(ApiError::BadRequest(
                    "offer has no audio or video m-line to publish (sendonly/sendrecv)".into(),
                ));
            }
            let sdp = SdpOffer::from_sdp_string(&offer)
                .map_err(|e| ApiError::BadRequest(format!("malformed SDP offer: {e}")))?;
            let mut session = with_ingest_codecs(rtc.rtc_builder()).build(Instant::now());
            rtc.add_local_candidates(&mut session);
            let answer = session
                .sdp_api()
                .accept_offer(sdp)
                .map_err(|e| ApiError::BadRequest(format!("offer refused: {e}")))?;
            let answer = answer.to_sdp_string();
            if !answer.lines().any(|l| {
                l.starts_with("m=") && !l.starts_with("m=application") && !l.contains(" 0 ")
            }) {
                return Err(ApiError::NotAcceptable(
                    "no codec in the offer that cascade can ingest (H.264, VP8, VP9, AV1, H.265, Opus)".into(),
                ));
            }
            let span =
                tracing::info_span!("whip", stream = %stream, session = tracing::field::Empty);
            let expected = usize::from(audio) + usize::from(video);
            let rids = simulcast::offered_rids(&offer);
            let handle = rtc.add(session, "whip", &stream, span.clone(), |id, _waker| {
                span.record("session", tracing::field::display(id));
                Box::new(Session::new(
                    registry,
                    stream.clone(),
                    expected,
                    rids,
                    span.clone(),
                ))
            })?;
            metrics::counter!(m::WHIP_SESSIONS).increment(1);
            Ok(Created { answer, handle })
        })
    }
}

/// The codecs a publisher may send us. str0m's default header extensions
/// stay: `rtp-stream-id` (simulcast layers) and transport-wide sequence
/// numbers, whose feedback lets a publisher's bandwidth estimate grow enough
/// to send its top layer.
fn with_ingest_codecs(builder: str0m::RtcConfig) -> str0m::RtcConfig {
    builder
        .clear_codecs()
        .enable_h264(true)
        .enable_vp8(true)
        .enable_vp9(true)
        .enable_av1(true)
        .enable_h265(true)
        .enable_opus(true, false)
}

/// One received m-line.
struct Track {
    kind: MediaKind,
    codec: Codec,
    fmtp: String,
    /// Per layer (`None` without simulcast): str0m depacketizes each rid
    /// on its own, with its own RTP clock offset and parameter sets.
    lanes: HashMap<Option<Rid>, Lane>,
    /// Simulcast: the layers seen before go-live, which become renditions.
    layers: Option<simulcast::Layers>,
}

impl Track {
    /// Names its published tracks at go-live (once; a track that has one
    /// already is left alone).
    fn assign(&mut self) {
        if self.lanes.values().any(|l| l.out.is_some()) {
            return;
        }
        let name = kind_name(self.kind);
        match self.layers.take().map(|l| l.renditions()) {
            // Two layers or more: each a rendition.
            Some(published) if published.len() > 1 => {
                for p in published {
                    if let Some(lane) = self.lanes.get_mut(&Some(Rid::from(p.rid.as_str()))) {
                        lane.out = Some(p.track);
                        lane.rendition = Some(p.rendition);
                    }
                }
                metrics::counter!(m::WHIP_RENDITIONS).increment(self.lanes.len() as u64);
            }
            // One layer (or none) of a simulcast offer: the `video` track,
            // already marked as the rendition it is. A stream whose video
            // is a rendition expects more (its other layers, late under
            // load), so an edge gives a viewer who joins before them a
            // bandwidth estimator, which a WebRTC session gets only when it
            // is created (`cascade_edge::viewer::bwe_start`).
            published => {
                if let Some(lane) = self.lanes.values_mut().next() {
                    lane.out = Some(name.to_string());
                    lane.measured = published
                        .and_then(|p| p.into_iter().next())
                        .map(|p| p.rendition);
                    lane.rendition = lane.measured.clone();
                }
            }
        }
    }
}

/// One layer of a track: one published track of the stream.
#[derive(Default)]
struct Lane {
    /// RTP time of the first frame and its pts on the stream timeline.
    anchor: Option<(u64, u64)>,
    waiting_keyframe: bool,
    parameter_sets: Vec<Bytes>,
    /// The stream track it is written to; `None` before go-live and for a
    /// simulcast layer that arrived after it (not published).
    out: Option<String>,
    /// Its catalog entry when it is a rendition: one of several, or the
    /// only layer so far of a simulcast offer ([`Track::assign`]).
    rendition: Option<Rendition>,
    /// What was measured of it (size, bitrate, frame rate), kept for a
    /// single layer that becomes a rendition when another one starts.
    measured: Option<Rendition>,
}

/// A WHIP publisher's session.
struct Session {
    registry: Arc<Registry>,
    stream: String,
    span: tracing::Span,
    expected: usize,
    /// The send rids the offer's video m-line lists (empty: no simulcast).
    rids: Vec<String>,
    tracks: HashMap<Mid, Track>,
    publisher: Option<Publisher>,
    /// Wall clock (µs) of the stream's first frame: zero of the timeline.
    zero_us: Option<u64>,
    first_frame: Option<Instant>,
    /// Last keyframe request per layer (`None`: the track's only layer).
    last_pli: HashMap<(Mid, Option<Rid>), Instant>,
    /// Requests that came within [`PLI_INTERVAL`] of the last PLI: sent
    /// when it has passed, not dropped (a viewer switching to this layer
    /// waits for its keyframe; the publisher makes none unasked).
    pli_owed: Vec<(Mid, Option<Rid>)>,
    /// Live bitrate and frame rate of each rendition, for the catalog.
    rates: simulcast::LiveRates,
}

fn map_codec(c: RtcCodec) -> Option<Codec> {
    Some(match c {
        RtcCodec::H264 => Codec::H264,
        RtcCodec::H265 => Codec::H265,
        RtcCodec::Vp8 => Codec::Vp8,
        RtcCodec::Vp9 => Codec::Vp9,
        RtcCodec::Av1 => Codec::Av1,
        RtcCodec::Opus => Codec::Opus,
        _ => return None,
    })
}

fn kind_name(kind: MediaKind) -> &'static str {
    match kind {
        MediaKind::Audio => "audio",
        MediaKind::Video => VIDEO,
    }
}

impl Session {
    fn new(
        registry: Arc<Registry>,
        stream: String,
        expected: usize,
        rids: Vec<String>,
        span: tracing::Span,
    ) -> Self {
        Self {
            registry,
            stream,
            span,
            expected,
            rids,
            tracks: HashMap::new(),
            publisher: None,
            zero_us: None,
            first_frame: None,
            last_pli: HashMap::new(),
            pli_owed: Vec::new(),
            rates: simulcast::LiveRates::default(),
        }
    }

    /// Names the published tracks (at go-live, or for an m-line that
    /// started after it) and returns the catalog.
    fn assign(&mut self) -> Catalog {
        for t in self.tracks.values_mut() {
            t.assign();
        }
        self.catalog()
    }

    /// A layer of `mid` that started after go-live: published as
    /// `video-<rid>`, and the track's other layers become renditions if they
    /// were not yet. Existing tracks keep their producers and viewers
    /// ([`Publisher::set_catalog`]); returns the new catalog.
    fn add_layer(&mut self, mid: Mid, rid: Option<Rid>) -> Catalog {
        if let (Some(t), Some(rid)) = (self.tracks.get_mut(&mid), rid) {
            for (r, lane) in t.lanes.iter_mut() {
                if Some(rid) == *r {
                    lane.out = Some(rendition_track(&rid.to_string()));
                    lane.rendition = lane.measured.take();
                } else if lane.out.is_some() && lane.rendition.is_none() && r.is_some() {
                    let mut m = lane.measured.take().unwrap_or(Rendition {
                        name: String::new(),
                        width: 0,
                        height: 0,
                        bitrate_kbps: 0,
                        framerate: 0,
                    });
                    m.name = r.map(|r| r.to_string()).unwrap_or_default();
                    lane.rendition = Some(m);
                }
            }
            metrics::counter!(m::WHIP_RENDITIONS).increment(1);
        }
        self.catalog()
    }

    fn catalog(&self) -> Catalog {
        let mut tracks: Vec<TrackInfo> = self
            .tracks
            .values()
            .flat_map(|t| {
                t.lanes.values().filter_map(move |l| {
                    Some(TrackInfo {
                        name: l.out.clone()?,
                        codec: t.codec,
                        fmtp: t.fmtp.clone(),
                        channels: (t.codec == Codec::Opus).then_some(2),
                        bframes: false,
                        rendition: l.rendition.clone(),
                    })
                })
            })
            .collect();
        // `video` first, then its renditions, then audio: what the old
        // catalog order (video, audio) was for single-layer streams.
        tracks.sort_by(|a, b| {
            (a.kind() != Kind::Video, &a.name).cmp(&(b.kind() != Kind::Video, &b.name))
        });
        Catalog { tracks }
    }

    /// Puts the renditions' live rates in the catalog when they moved
    /// ([`simulcast::LiveRates`]); the lanes keep them for later catalogs.
    fn live_rates(&mut self, now: Instant) {
        let Some(next) = self.rates.update(now, &self.catalog()) else {
            return;
        };
        for t in self.tracks.values_mut() {
            for lane in t.lanes.values_mut() {
                let live = next
                    .tracks
                    .iter()
                    .find(|i| Some(&i.name) == lane.out.as_ref())
                    .and_then(|i| i.rendition.clone());
                if let (Some(r), Some(live)) = (&mut lane.rendition, live) {
                    *r = live;
                }
            }
        }
        let rates: Vec<String> = next
            .tracks
            .iter()
            .filter_map(|t| {
                let r = t.rendition.as_ref()?;
                Some(format!(
                    "{}={}kbps@{}fps",
                    r.name, r.bitrate_kbps, r.framerate
                ))
            })
            .collect();
        tracing::debug!(parent: &self.span, ?rates, "renditions' live rates");
        metrics::counter!(m::WHIP_RATE_UPDATES).increment(1);
        if let Some(p) = &mut self.publisher {
            p.set_catalog(next);
        }
    }

    fn pli(&mut self, ctx: &mut Ctx<'_>, mid: Mid, rid: Option<Rid>) {
        if self
            .last_pli
            .get(&(mid, rid))
            .is_some_and(|t| ctx.now.duration_since(*t) < PLI_INTERVAL)
        {
            if !self.pli_owed.contains(&(mid, rid)) {
                self.pli_owed.push((mid, rid));
            }
            return;
        }
        self.pli_owed.retain(|k| *k != (mid, rid));
        if let Some(rx) = ctx.rtc.direct_api().stream_rx_by_mid(mid, rid) {
            rx.request_keyframe(KeyframeRequestKind::Pli);
            self.last_pli.insert((mid, rid), ctx.now);
            metrics::counter!(m::WHIP_PLI).increment(1);
        }
    }

    /// Every video layer with the track it is published as (if it is).
    fn video_lanes(&self) -> Vec<(Mid, Option<Rid>, Option<String>)> {
        self.tracks
            .iter()
            .filter(|(_, t)| t.kind == MediaKind::Video)
            .flat_map(|(mid, t)| {
                t.lanes
                    .iter()
                    .map(move |(rid, l)| (*mid, *rid, l.out.clone()))
            })
            .collect()
    }

    /// True once the stream may go live: every offered m-line and, for a
    /// simulcast one, every offered layer has a keyframe; or the wait is over.
    fn ready(&self, now: Instant) -> bool {
        let waited = self
            .first_frame
            .is_some_and(|t| now.duration_since(t) >= PUBLISH_WAIT);
        if waited {
            return true;
        }
        let layers_ready = self
            .tracks
            .values()
            .all(|t| t.layers.as_ref().is_none_or(|l| l.ready(self.rids.len())));
        self.tracks.len() >= self.expected && layers_ready
    }

    fn on_media(&mut self, ctx: &mut Ctx<'_>, data: MediaData) -> Flow {
        // The frame entered cascade when its first packet arrived, not when its
        // last one completed it: `ingest_us`, where the latency metrics start.
        let arrived_us = arrival_us(
            cascade_origin::wallclock_us(),
            Instant::now(),
            data.network_time,
        );
        let spec = data.params.spec();
        let Some(codec) = map_codec(spec.codec) else {
            return Flow::Continue;
        };
        let Some(kind) = ctx.rtc.media(data.mid).map(|m| m.kind()) else {
            return Flow::Continue;
        };
        let video = kind == MediaKind::Video;
        if let Some(p) = &self.publisher {
            if !p.is_current() {
                let _g = self.span.enter();
                tracing::info!("taken over by a newer publisher");
                return Flow::Close;
            }
        }
        let zero = *self.zero_us.get_or_insert(arrived_us);
        self.first_frame.get_or_insert(ctx.now);
        let live = self.publisher.is_some();
        let is_new = !self.tracks.contains_key(&data.mid);
        let track = self.tracks.entry(data.mid).or_insert_with(|| Track {
            kind,
            codec,
            fmtp: fmtp_of(&data),
            lanes: HashMap::new(),
            layers: None,
        });
        if is_new {
            let _g = self.span.enter();
            tracing::info!(track = kind_name(kind), codec = %codec, "track started");
        }
        let mut keyframe = !video || data.is_keyframe();
        let rid = data.rid.filter(|_| video);
        if let Some(r) = rid.filter(|r| !track.lanes.contains_key(&Some(*r))) {
            // A layer starting after go-live (Chromium turns its top layer on
            // once its bandwidth estimate allows) is added at its keyframe
            // as one more rendition, if the offer named it.
            let offered = self.rids.iter().any(|o| o.as_str() == &*r);
            if track.lanes.len() >= simulcast::MAX_LAYERS || (live && !is_new && !offered) {
                metrics::counter!(m::WHIP_SIMULCAST_DROPPED).increment(1);
                return Flow::Continue;
            }
        }
        if let (Some(r), false) = (rid, live) {
            let size = keyframe
                .then(|| crate::dimensions::of_keyframe(codec, &data.data))
                .flatten();
            track.layers.get_or_insert_with(Default::default).on_frame(
                ctx.now,
                &r,
                keyframe,
                size,
                data.data.len(),
            );
        }
        let lane = track.lanes.entry(rid).or_insert_with(|| Lane {
            waiting_keyframe: video,
            ..Lane::default()
        });
        let rtp = data.time.numer();
        let clock = u64::from(codec.clock_rate());
        // Each layer has its own RTP clock offset: anchored on its own first
        // frame's arrival, on the one stream timeline.
        let (rtp0, pts0) = *lane
            .anchor
            .get_or_insert_with(|| (rtp, arrived_us.saturating_sub(zero) * clock / 1_000_000));
        let pts = pts0 + rtp.saturating_sub(rtp0);
        let mut payload = Bytes::copy_from_slice(&data.data);
        if video {
            if !data.contiguous && !keyframe {
                // Loss broke the group: decoding on would show corruption.
                lane.waiting_keyframe = true;
            }
            if lane.waiting_keyframe && !keyframe {
                self.pli(ctx, data.mid, rid);
                return Flow::Continue;
            }
            lane.waiting_keyframe = false;
            if codec == Codec::H264 {
                payload = with_parameter_sets(payload, &mut lane.parameter_sets, &mut keyframe);
            }
        }
        let late = live && lane.out.is_none() && !is_new && rid.is_some();
        if late {
            lane.measured = Some(Rendition {
                name: rid.map(|r| r.to_string()).unwrap_or_default(),
                width: 0,
                height: 0,
                bitrate_kbps: 0,
                framerate: 0,
            });
            if let Some((w, h)) = crate::dimensions::of_keyframe(codec, &payload) {
                if let Some(m) = &mut lane.measured {
                    (m.width, m.height) = (w, h);
                }
            }
        }
        let frame = Frame {
            payload,
            pts,
            dts: pts,
            keyframe,
            ingest_us: arrived_us,
        };
        metrics::counter!(m::WHIP_FRAMES, "track" => kind_name(kind)).increment(1);

        if self.publisher.is_none() {
            if !self.ready(ctx.now) {
                return Flow::Continue;
            }
            let catalog = self.assign();
            match self.registry.publish(&self.stream, catalog.clone(), "whip") {
                Ok(p) => {
                    let _g = self.span.enter();
                    let renditions: Vec<String> = catalog
                        .renditions()
                        .filter_map(|t| {
                            let r = t.rendition.as_ref()?;
                            Some(format!(
                                "{}={}x{}@{}kbps",
                                r.name, r.width, r.height, r.bitrate_kbps
                            ))
                        })
                        .collect();
                    tracing::info!(tracks = catalog.tracks.len(), renditions = ?renditions, "live");
                    self.publisher = Some(p);
                }
                Err(e) => {
                    let _g = self.span.enter();
                    tracing::warn!(error = %e, "publish refused");
                    return Flow::Close;
                }
            }
            // Layers' first keyframes went by while waiting: ask each for
            // one so their groups start now (rate-limited per layer).
            for (mid, rid, _) in self.video_lanes() {
                self.pli(ctx, mid, rid);
            }
        } else if is_new {
            let catalog = self.assign();
            if let Some(p) = &mut self.publisher {
                p.set_catalog(catalog);
            }
        } else if late {
            let catalog = self.add_layer(data.mid, rid);
            let _g = self.span.enter();
            tracing::info!(layer = %rid.map(|r| r.to_string()).unwrap_or_default(), "late simulcast layer added as a rendition");
            if let Some(p) = &mut self.publisher {
                p.set_catalog(catalog);
            }
        }
        let (out, is_rendition) = self
            .tracks
            .get(&data.mid)
            .and_then(|t| t.lanes.get(&rid))
            .map_or((None, false), |l| (l.out.clone(), l.rendition.is_some()));
        let Some(p) = &mut self.publisher else {
            return Flow::Continue;
        };
        let bytes = frame.payload.len();
        if let Some(producer) = out.as_deref().and_then(|o| p.track_mut(o)) {
            if producer.write(frame).is_err() {
                return Flow::Close;
            }
        }
        if let (Some(track), true) = (&out, is_rendition) {
            self.rates.on_frame(ctx.now, track, bytes);
            if self.rates.due(ctx.now) {
                self.live_rates(ctx.now);
            }
        }
        let Some(p) = &mut self.publisher else {
            return Flow::Continue;
        };
        // Upstream keyframe requests, per published layer: the PLI goes to
        // that layer's rid.
        let mut wanted = Vec::new();
        for (mid, t) in self
            .tracks
            .iter()
            .filter(|(_, t)| t.kind == MediaKind::Video)
        {
            for (rid, lane) in &t.lanes {
                let asked = lane
                    .out
                    .as_deref()
                    .and_then(|o| p.track_mut(o))
                    .is_some_and(|v| v.take_keyframe_request());
                if asked {
                    wanted.push((*mid, *rid));
                }
            }
        }
        // Owed requests go out once their layer's interval has passed
        // (media arrives many times a second, so this runs often enough).
        wanted.extend(self.pli_owed.iter().copied().filter(|k| {
            self.last_pli
                .get(k)
                .is_none_or(|t| ctx.now.duration_since(*t) >= PLI_INTERVAL)
        }));
        for (mid, rid) in wanted {
            self.pli(ctx, mid, rid);
        }
        Flow::Continue
    }
}

/// Wall clock (µs) of `first_packet`, an instant before `now` (wall clock
/// `now_us`): when a frame's first RTP packet reached the session (str0m's
/// `network_time`, the shard's `Input::Receive` time). Stamping on completion
/// instead would leave out the time the publisher's packets took to arrive.
fn arrival_us(now_us: u64, now: Instant, first_packet: Instant) -> u64 {
    let age = now.saturating_duration_since(first_packet);
    now_us.saturating_sub(u64::try_from(age.as_micros()).unwrap_or(u64::MAX))
}

fn fmtp_of(data: &MediaData) -> String {
    let spec = data.params.spec();
    match spec.codec {
        RtcCodec::H264 => {
            let plid = spec.format.profile_level_id.unwrap_or(0x42e01f);
            format!("level-asymmetry-allowed=1;packetization-mode=1;profile-level-id={plid:06x}")
        }
        RtcCodec::Opus => "minptime=10;useinbandfec=1".into(),
        _ => String::new(),
    }
}

/// Makes every H.264 keyframe carry its SPS/PPS (browsers send them in
/// STAP-A with each IDR, but not every encoder does), and remembers the
/// latest ones.
fn with_parameter_sets(payload: Bytes, cache: &mut Vec<Bytes>, keyframe: &mut bool) -> Bytes {
    let nals = annexb::nal_units(&payload);
    let mut has_ps = false;
    let mut fresh: Vec<Bytes> = Vec::new();
    for nal in &nals {
        let t = Nal::H264.type_of(nal);
        if Nal::H264.is_parameter_set(t) {
            has_ps = true;
            fresh.push(Bytes::copy_from_slice(nal));
        }
        if Nal::H264.is_random_access(t) {
            *keyframe = true;
        }
    }
    if has_ps {
        *cache = fresh;
    }
    if !*keyframe || has_ps || cache.is_empty() {
        return payload;
    }
    let mut out =
        BytesMut::with_capacity(payload.len() + cache.iter().map(|p| p.len() + 4).sum::<usize>());
    for ps in cache.iter() {
        out.put_slice(&[0, 0, 0, 1]);
        out.put_slice(ps);
    }
    out.put_slice(&payload);
    out.freeze()
}

impl Handler for Session {
    fn on_event(&mut self, ctx: &mut Ctx<'_>, event: Event) -> Flow {
        match event {
            Event::MediaData(data) => self.on_media(ctx, data),
            Event::Connected => {
                for (mid, rid, _) in self.video_lanes() {
                    self.pli(ctx, mid, rid);
                }
                Flow::Continue
            }
            _ => Flow::Continue,
        }
    }

    fn on_close(&mut self, reason: CloseReason) {
        // Dropping the publisher ends the stream unless a newer one took over.
        self.publisher = None;
        metrics::counter!(m::WHIP_ENDED, "reason" => reason.as_str()).increment(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Accepts `offer` as `create` does and returns the answer.
    fn answer(offer: &str) -> String {
        let mut rtc =
            with_ingest_codecs(str0m::Rtc::builder().set_ice_lite(true)).build(Instant::now());
        let offer = SdpOffer::from_sdp_string(offer).unwrap();
        rtc.sdp_api().accept_offer(offer).unwrap().to_sdp_string()
    }

    #[test]
    fn simulcast_offers_are_answered_with_every_layer() {
        // Recorded from Debian's Chromium 156: sendEncodings q/h/f.
        let chromium = include_str!("testdata/chromium156-simulcast-offer.sdp");
        let a = answer(chromium);
        assert!(a.contains("a=simulcast:recv q;h;f"), "{a}");
        for rid in ["q", "h", "f"] {
            assert!(a.contains(&format!("a=rid:{rid} recv")), "{a}");
        }
        assert!(
            a.contains("urn:ietf:params:rtp-hdrext:sdes:rtp-stream-id"),
            "{a}"
        );
        assert_eq!(sending_kinds(chromium), (true, true));
        // OBS 32.1 with its simulcast option: H.264 only, rids 0/1/2. It
        // aborts when the answer keeps fewer layers.
        let a = answer(OBS_SIMULCAST);
        assert!(a.contains("a=simulcast:recv 0;1;2"), "{a}");
        assert!(!a.contains("m=video 0 "), "{a}");
    }

    /// Both recorded offers' layers become three renditions: the go-live
    /// wait expects every offered rid, and each layer gets its own track.
    #[test]
    fn simulcast_offers_make_three_renditions() {
        let chromium = include_str!("testdata/chromium156-simulcast-offer.sdp");
        for (offer, sizes) in [
            (
                chromium,
                [("q", 320, 180), ("h", 640, 360), ("f", 1280, 720)],
            ),
            (
                OBS_SIMULCAST,
                [("2", 480, 270), ("1", 960, 540), ("0", 1920, 1080)],
            ),
        ] {
            let rids = simulcast::offered_rids(offer);
            assert_eq!(rids.len(), 3, "{rids:?}");
            let mut layers = simulcast::Layers::default();
            let t = Instant::now();
            for (i, (rid, w, h)) in sizes.iter().enumerate() {
                assert!(rids.iter().any(|r| r == rid));
                assert!(!layers.ready(rids.len()) || i == 3);
                layers.on_frame(t, rid, true, Some((*w, *h)), 1000);
            }
            assert!(layers.ready(rids.len()));
            let published = layers.renditions();
            let catalog = Catalog {
                tracks: published
                    .iter()
                    .map(|p| TrackInfo {
                        name: p.track.clone(),
                        codec: Codec::H264,
                        fmtp: String::new(),
                        channels: None,
                        bframes: false,
                        rendition: Some(p.rendition.clone()),
                    })
                    .collect(),
            };
            assert_eq!(catalog.renditions().count(), 3);
            let default = catalog.video().unwrap();
            assert_eq!(default.name, VIDEO);
            assert_eq!(default.rendition.as_ref().unwrap().name, sizes[2].0);
            assert!(cascade_origin::relay::wire::check_catalog(&catalog).is_ok());
        }
    }

    /// A simulcast offer whose first layer came alone goes live with it as
    /// `video`, marked as its rendition (viewers then get an estimator,
    /// `cascade_edge::viewer::bwe_start`); a plain offer's track is not.
    #[test]
    fn a_lone_simulcast_layer_is_marked_as_a_rendition() {
        let t0 = Instant::now();
        let mut layers = simulcast::Layers::default();
        layers.on_frame(t0, "q", true, Some((320, 180)), 1000);
        let lane = |rid: Option<&str>| (rid.map(Rid::from), Lane::default());
        let mut lone = Track {
            kind: MediaKind::Video,
            codec: Codec::H264,
            fmtp: String::new(),
            lanes: [lane(Some("q"))].into_iter().collect(),
            layers: Some(layers),
        };
        lone.assign();
        let l = &lone.lanes[&Some(Rid::from("q"))];
        assert_eq!(l.out.as_deref(), Some(VIDEO));
        let r = l.rendition.as_ref().expect("marked");
        assert_eq!((r.name.as_str(), r.width, r.height), ("q", 320, 180));
        let mut plain = Track {
            kind: MediaKind::Video,
            codec: Codec::H264,
            fmtp: String::new(),
            lanes: [lane(None)].into_iter().collect(),
            layers: None,
        };
        plain.assign();
        let l = &plain.lanes[&None];
        assert_eq!(l.out.as_deref(), Some(VIDEO));
        assert!(l.rendition.is_none(), "no simulcast: nothing coming");
    }

    /// An OBS-shaped simulcast offer (obs-webrtc builds it with libdatachannel:
    /// Opus + H.264, three send rids, no candidates).
    const OBS_SIMULCAST: &str = "v=0\r\n\
        o=rtc 3735928559 0 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n\
        a=group:BUNDLE 0 1\r\na=group:LS 0 1\r\na=msid-semantic:WMS *\r\n\
        a=ice-options:ice2,trickle\r\n\
        a=fingerprint:sha-256 9A:9F:9B:30:D7:10:86:43:64:2E:96:8B:23:C2:38:F9:D4:A0:37:12:D7:1A:8E:BD:5A:AC:35:5B:9D:8B:A5:6F\r\n\
        m=audio 9 UDP/TLS/RTP/SAVPF 111\r\nc=IN IP4 0.0.0.0\r\na=mid:0\r\na=sendonly\r\n\
        a=ssrc:1001 cname:obs\r\na=ssrc:1001 msid:obs obs-audio\r\na=msid:obs obs-audio\r\n\
        a=rtcp-mux\r\na=rtpmap:111 opus/48000/2\r\na=fmtp:111 minptime=10;maxaveragebitrate=96000;stereo=1;sprop-stereo=1;useinbandfec=1\r\n\
        a=setup:actpass\r\na=ice-ufrag:obsu\r\na=ice-pwd:obspasswordobspassword12\r\n\
        m=video 9 UDP/TLS/RTP/SAVPF 96\r\nc=IN IP4 0.0.0.0\r\na=mid:1\r\na=sendonly\r\n\
        a=extmap:4 urn:ietf:params:rtp-hdrext:sdes:mid\r\n\
        a=extmap:10 urn:ietf:params:rtp-hdrext:sdes:rtp-stream-id\r\n\
        a=rid:0 send\r\na=rid:1 send\r\na=rid:2 send\r\na=simulcast:send 0;1;2\r\n\
        a=msid:obs obs-video\r\na=rtcp-mux\r\n\
        a=rtpmap:96 H264/90000\r\na=rtcp-fb:96 nack\r\na=rtcp-fb:96 nack pli\r\na=rtcp-fb:96 goog-remb\r\n\
        a=fmtp:96 profile-level-id=42e01f;packetization-mode=1;level-asymmetry-allowed=1\r\n\
        a=setup:actpass\r\na=ice-ufrag:obsu\r\na=ice-pwd:obspasswordobspassword12\r\n";

    #[test]
    fn ingest_stamp_is_the_first_packets_arrival() {
        let now = Instant::now();
        let first = now.checked_sub(Duration::from_micros(1_250)).unwrap();
        assert_eq!(arrival_us(10_000_000, now, first), 9_998_750);
        // A first packet "after" now (clock skew between two Instant reads) is now.
        let later = now + Duration::from_millis(1);
        assert_eq!(arrival_us(10_000_000, now, later), 10_000_000);
        // Never below the epoch.
        assert_eq!(arrival_us(500, now, first), 0);
    }

    #[test]
    fn parameter_sets_prepended() {
        let mut cache = Vec::new();
        let mut key = false;
        let with = Bytes::from_static(&[
            0, 0, 0, 1, 0x67, 1, 0, 0, 0, 1, 0x68, 2, 0, 0, 0, 1, 0x65, 3,
        ]);
        let out = with_parameter_sets(with.clone(), &mut cache, &mut key);
        assert!(key);
        assert_eq!(out, with);
        assert_eq!(cache.len(), 2);
        let mut key = false;
        let idr = Bytes::from_static(&[0, 0, 0, 1, 0x65, 9]);
        let out = with_parameter_sets(idr, &mut cache, &mut key);
        assert!(key);
        assert_eq!(
            &out[..],
            &[0, 0, 0, 1, 0x67, 1, 0, 0, 0, 1, 0x68, 2, 0, 0, 0, 1, 0x65, 9]
        );
        let mut key = false;
        let p = Bytes::from_static(&[0, 0, 0, 1, 0x41, 9]);
        assert_eq!(with_parameter_sets(p.clone(), &mut cache, &mut key), p);
        assert!(!key);
    }

    #[test]
    fn offers_with_more_media_lines_than_tracks_are_counted() {
        let m = "m=video 9 UDP/TLS/RTP/SAVPF 96\r\na=sendonly\r\n";
        let offer = |n: usize| {
            format!(
                "v=0\r\n{}m=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\n",
                m.repeat(n)
            )
        };
        assert_eq!(media_lines(&offer(MAX_TRACKS)), MAX_TRACKS);
        assert_eq!(media_lines(&offer(MAX_TRACKS + 1)), MAX_TRACKS + 1);
    }
}
