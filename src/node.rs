//! Role wiring: which listeners and subsystems each role starts, the
//! start-up banner, and the shutdown sequence (SIGINT: now; SIGTERM: drain).

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::Router;
use cascade_origin::relay;
use cascade_origin::Registry;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::api::{self, Api};
use crate::config::{Config, Role};

/// Bucket bounds (seconds) for every `*_seconds` histogram: from the
/// microseconds a packetization takes to the seconds of a slow first frame.
const SECONDS_BUCKETS: &[f64] = &[
    0.000_01, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002, 0.003, 0.005, 0.007_5, 0.01,
    0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0,
];

/// Durations are exported as Prometheus histograms, not client-side
/// summaries: buckets add up across edges and across time, so a dashboard
/// (or `scripts/bench/edge_load.py`) takes quantiles of any window by
/// subtracting two scrapes, where a summary only knows its own rolling one.
fn prometheus_builder() -> PrometheusBuilder {
    PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
        .expect("bucket bounds are not empty")
}

/// Runs the node until shut down.
pub async fn run(mut cfg: Config) -> anyhow::Result<()> {
    let prometheus = prometheus_builder().install_recorder().ok();
    if let Some(handle) = prometheus.clone() {
        // Histogram samples wait in an unbounded buffer until a render or
        // an upkeep folds them into their buckets (or summary): without a
        // scrape that buffer would grow for ever, and a summary read rarely
        // keeps only its newest block of samples (docs/benchmarks.md, "Where
        // the flat 10 ms went").
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                handle.run_upkeep();
            }
        });
    }
    describe_metrics();
    let registry = Registry::new();
    let draining = Arc::new(AtomicBool::new(false));
    // RTMP and RTMPS refuse new publishes once the node drains.
    cfg.rtmp_limits.draining = draining.clone();
    let stop = CancellationToken::new();
    let tls = start_tls(&cfg, &stop)?;
    let (events, events_sender) = match &cfg.events_webhook {
        Some(url) => {
            let (e, task) = crate::events::Events::start(
                url.clone(),
                format!("{} {}", cfg.role.as_str(), cfg.http),
            )?;
            (e, Some(task))
        }
        None => (crate::events::Events::default(), None),
    };
    let role = cfg.role;
    let secret = cfg.cluster_secret.clone().unwrap_or_default();
    // This node in the cluster view (placement, /api/cluster, loop refusal);
    // its URL is set once the HTTP port is bound.
    let cluster = Arc::new(cascade_origin::cluster::Node::new(role.as_str(), ""));

    let relay_server = match cfg.quic {
        Some(addr) => Some(
            relay::Server::bind_node(
                addr,
                secret.clone(),
                registry.clone(),
                cfg.relay_limits,
                cluster.clone(),
            )
            .await
            .with_context(|| format!("binding the relay (QUIC) on {addr}"))?,
        ),
        None => None,
    };
    let relay_options = relay::Options {
        hold: cfg.relay_limits.hold,
        ..Default::default()
    };
    let client = match (role, &cfg.origin, &cfg.origin_standby) {
        (Role::Edge, Some(origin), Some(standby)) => Some(relay::Client::connect_failover(
            origin.clone(),
            standby.clone(),
            secret.clone(),
            relay_options,
            cluster.clone(),
        )),
        (Role::Ingest | Role::Edge, Some(origin), _) => Some(relay::Client::connect_node(
            origin.clone(),
            secret.clone(),
            relay_options,
            cluster.clone(),
        )),
        _ => None,
    };
    // An ingest keeps the standby warm: every stream goes to both origins.
    let standby_uplink = standby_uplink(&cfg, &secret, relay_options, &cluster, &registry);
    if let Some(c) = &client {
        match role {
            Role::Ingest => c.uplink(registry.clone()),
            _ => registry.set_upstream(Arc::new(c.clone())),
        }
    }

    let serves_webrtc = matches!(role, Role::All | Role::Ingest | Role::Edge);
    let rtc = if serves_webrtc {
        Some(
            cascade_rtc::Server::bind(cascade_rtc::Config {
                udp: cfg.udp,
                tcp: Some(cfg.tcp),
                advertise: cfg.advertise.clone(),
                shards: 0,
                max_sessions: cfg.max_sessions,
                ice: cfg.ice.clone(),
                // Unset, empty or `0` keeps GSO on (A/B benchmarks set it).
                gso: std::env::var("CASCADE_NO_GSO").map_or(true, |v| v.is_empty() || v == "0"),
                limits: cfg.rtc_limits.clone(),
            })
            .await
            .with_context(|| {
                format!("binding WebRTC media on udp {} / tcp {}", cfg.udp, cfg.tcp)
            })?,
        )
    } else {
        None
    };

    if let Some(rtc) = &rtc {
        supervise(rtc.clone());
        cluster.set_max_sessions(cfg.max_sessions as u64);
    }
    crate::placement::spawn_sampler(
        cluster.clone(),
        registry.clone(),
        rtc.clone(),
        draining.clone(),
        stop.clone(),
    );

    let mut router = Router::new();
    let token: Arc<str> = cfg.publish_token.clone().into();
    let mut rtmp_addr = None;
    let mut rtmps_addr = None;
    if matches!(role, Role::All | Role::Ingest) {
        if let Some(rtc) = &rtc {
            router = router.merge(cascade_ingest::whip::router_with_auth(
                registry.clone(),
                rtc.clone(),
                cascade_rtc::auth::Auth::new(Some(&token), None, cfg.token_secret.as_deref())
                    .with_webhook(cfg.auth_webhook.clone()),
            ));
        }
        let listener = TcpListener::bind(cfg.rtmp)
            .await
            .with_context(|| format!("binding RTMP on {}", cfg.rtmp))?;
        rtmp_addr = listener.local_addr().ok();
        rtmps_addr = start_rtmps(&cfg, tls.as_ref(), &registry, &token, &stop).await?;
        let (registry, token, stop) = (registry.clone(), token.clone(), stop.clone());
        match (&cfg.bframes, &cfg.bframes_note) {
            (_, Some(note)) => tracing::warn!("{note}"),
            (cascade_ingest::transcode::Policy::Transcode(s), None) => tracing::info!(
                ffmpeg = %s.ffmpeg.display(),
                max = s.max,
                "RTMP H.264 with B-frames is re-encoded without them"
            ),
            (_, None) => tracing::info!("RTMP H.264 with B-frames is passed through"),
        }
        let bframes = cfg.bframes.clone();
        let limits = cfg.rtmp_limits.clone();
        tokio::spawn(async move {
            if let Err(e) = cascade_ingest::rtmp::serve_with_limits(
                listener, registry, token, stop, bframes, limits,
            )
            .await
            {
                tracing::error!(error = %e, "rtmp listener failed");
            }
        });
    }
    if matches!(role, Role::All | Role::Edge) {
        if let Some(rtc) = &rtc {
            router = router.merge(cascade_edge::router(
                registry.clone(),
                rtc.clone(),
                cascade_edge::Config {
                    viewer_token: cfg.viewer_token.clone(),
                    bframe_ts: bframe_ts_from_env(),
                    token_secret: cfg.token_secret.clone(),
                    auth_webhook: cfg.auth_webhook.clone(),
                    abr: cfg.abr,
                    bwe_all: std::env::var(BWE_ALL_ENV).is_ok_and(|v| !v.is_empty() && v != "0"),
                    cluster: Some(cluster.clone()),
                    ..Default::default()
                },
            ));
        }
    }
    let drain_request = CancellationToken::new();
    if let Some(w) = &cfg.auth_webhook {
        tracing::info!(
            host = w.host(),
            "auth webhook decides every publish and view the tokens do not allow"
        );
    }
    let pulls = start_pulls(&cfg, &registry)?;
    let events_watch = crate::events::watch_registry(
        registry.clone(),
        pulls.clone(),
        events.clone(),
        stop.clone(),
    );
    router = router.merge(api::router(Api {
        registry: registry.clone(),
        prometheus,
        draining: draining.clone(),
        api_token: cfg.api_token.as_deref().map(Arc::from),
        drain: drain_request.clone(),
        drain_timeout: cfg.drain_timeout,
        pulls,
        publish_auth: cascade_rtc::auth::Auth::new(Some(&token), None, cfg.token_secret.as_deref()),
        auth_gate: Some(cfg.rtc_limits.auth.clone()),
        cluster: cluster.clone(),
    }));
    if cfg.placement {
        router = crate::placement::layer(
            router,
            crate::placement::Placement {
                node: cluster.clone(),
                rtc: rtc.clone(),
                edge: matches!(role, Role::All | Role::Edge),
                draining: draining.clone(),
                max_sessions: cfg.max_sessions as u64,
                margin_permille: crate::placement::MARGIN_PERMILLE,
            },
        );
    }

    let http = listen_http(cfg.http).with_context(|| format!("binding HTTP on {}", cfg.http))?;
    let http_addr = http.local_addr()?;
    cluster.set_url(&public_url(&cfg, http_addr, rtc.as_ref()));
    banner(
        &cfg,
        http_addr,
        rtmp_addr,
        rtmps_addr,
        rtc.as_ref(),
        relay_server.as_ref(),
    );

    let router = router.layer(axum::middleware::from_fn(client_addr));
    let http_stop = stop.clone();
    let https = match &tls {
        Some(t) => Some(t.https()?),
        None => None,
    };
    let server = tokio::spawn(serve_http(http, https, router, cfg.http_limits, http_stop));

    let reason = tokio::select! {
        s = wait_for_signal() => s,
        _ = drain_request.cancelled() => Signal::Terminate,
    };
    match reason {
        Signal::Terminate => {
            tracing::info!(timeout = ?cfg.drain_timeout, "draining (SIGTERM or POST /api/drain)");
            draining.store(true, Ordering::Relaxed);
            events.emit(crate::events::Event::Drain {
                timeout_s: cfg.drain_timeout.as_secs(),
            });
            if let Some(rtc) = &rtc {
                rtc.set_draining();
            }
            let deadline = Instant::now() + cfg.drain_timeout;
            // WebRTC sessions and this node's own publishes (RTMP included)
            // run on until they end or the deadline passes.
            let busy = || rtc.as_ref().map_or(0, |r| r.sessions()) + local_publishes(&registry);
            while busy() > 0 && Instant::now() < deadline {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                    s = wait_for_signal() => if s == Signal::Interrupt {
                        tracing::info!("SIGINT while draining: stopping now");
                        break;
                    },
                }
            }
            tracing::info!(left = busy(), "drain over");
        }
        Signal::Interrupt => tracing::info!("SIGINT: stopping"),
    }
    stop.cancel();
    if let Some(rtc) = &rtc {
        rtc.shutdown().await;
    }
    if let Some(s) = &relay_server {
        s.shutdown();
        s.wait_closed(Duration::from_millis(300)).await;
    }
    if let Some(c) = &client {
        c.close();
    }
    if let Some(c) = &standby_uplink {
        c.close();
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), server).await;
    // The last events (the drain's publish stops) go out before the exit:
    // the watcher takes its last look, then the sender flushes once every
    // handle is gone, within one POST timeout.
    if let Some(w) = events_watch {
        let _ = w.await;
    }
    drop(events);
    if let Some(s) = events_sender {
        let _ = tokio::time::timeout(crate::events::POST_TIMEOUT, s).await;
    }
    Ok(())
}

/// An ingest's second uplink, to `--origin-standby`: the standby then
/// holds every stream and edges that fail over to it find them at once.
fn standby_uplink(
    cfg: &Config,
    secret: &str,
    options: relay::Options,
    cluster: &Arc<cascade_origin::cluster::Node>,
    registry: &Arc<Registry>,
) -> Option<relay::Client> {
    let standby = cfg
        .origin_standby
        .as_ref()
        .filter(|_| cfg.role == Role::Ingest)?;
    let c = relay::Client::connect_standby(
        standby.clone(),
        secret.to_string(),
        options,
        cluster.clone(),
    );
    c.uplink(registry.clone());
    Some(c)
}

/// Hands the client address to the handlers of other crates (per-IP
/// wrong-token limits) as [`cascade_rtc::http::ClientAddr`].
async fn client_addr(
    mut req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    if let Some(axum::extract::ConnectInfo(addr)) = req
        .extensions()
        .get::<axum::extract::ConnectInfo<SocketAddr>>()
        .copied()
    {
        req.extensions_mut()
            .insert(cascade_rtc::http::ClientAddr(addr));
    }
    next.run(req).await
}

/// Pending connections the HTTP listener queues: a join ramp of 300
/// viewers/s overflowed the default 128 and clients waited 1-3 s to retry.
const HTTP_BACKLOG: u32 = 4096;

/// Environment variable that overrides the edge's B-frame timestamp method
/// ([`cascade_edge::bframes::BframeTs::DEFAULT`]) for the whole process: the
/// side-by-side measurement (tests/browser_bframes.rs) runs one cascade per
/// method. Not part of the operator interface, so not a flag.
const BFRAME_TS_ENV: &str = "CASCADE_EDGE_BFRAME_TS";

/// Benchmark knob: every WHEP viewer gets str0m's bandwidth estimator
/// (`cascade_edge::Config::bwe_all`), for the CPU A/B of estimation in
/// docs/benchmarks.md. Not part of the operator interface, so not a flag.
const BWE_ALL_ENV: &str = "CASCADE_EDGE_BWE_ALL";

/// The edge's B-frame method: [`BFRAME_TS_ENV`] (`pts`, `dts`, `drop-b`)
/// when set, else the default.
fn bframe_ts_from_env() -> cascade_edge::bframes::BframeTs {
    use cascade_edge::bframes::BframeTs;
    let m = std::env::var(BFRAME_TS_ENV).ok();
    match m.as_deref().map(BframeTs::parse) {
        Some(Some(m)) => {
            tracing::warn!(method = ?m, "B-frame timestamp method overridden by {BFRAME_TS_ENV}");
            m
        }
        Some(None) => {
            tracing::warn!(value = ?m, "unknown {BFRAME_TS_ENV} ignored");
            BframeTs::DEFAULT
        }
        None => BframeTs::DEFAULT,
    }
}

/// Loads `--tls-cert`/`--tls-key` (a bad pair stops the start) and starts
/// watching them for renewals.
fn start_tls(cfg: &Config, stop: &CancellationToken) -> anyhow::Result<Option<crate::tls::Tls>> {
    let Some(files) = &cfg.tls else {
        return Ok(None);
    };
    let tls = crate::tls::Tls::load(&files.cert, &files.key)?;
    tls.spawn_reload(stop.clone());
    tracing::info!(cert = %files.cert.display(), "TLS on: HTTPS only on --http, re-read when the files change");
    Ok(Some(tls))
}

/// RTSP pulls on the roles that ingest: the file's `[[pull]]` tables now,
/// more through `/api/pulls`. On demand needs this node's registry to see
/// the viewers, so only `all` honours it; an `ingest` node runs such pulls
/// always-on (the origin cannot ask it to start one).
fn start_pulls(
    cfg: &Config,
    registry: &Arc<Registry>,
) -> anyhow::Result<Option<Arc<cascade_ingest::rtsp::Pulls>>> {
    use cascade_ingest::rtsp::{Pulls, DEFAULT_MAX_PULLS};
    if !matches!(cfg.role, Role::All | Role::Ingest) {
        return Ok(None);
    }
    let pulls = Pulls::new(registry.clone(), DEFAULT_MAX_PULLS, cfg.role == Role::All);
    // B-frame cameras get RTMP's --bframes policy (re-encode or pass through).
    pulls.set_bframes(cfg.bframes.clone());
    for p in &cfg.pulls {
        pulls
            .add(p.clone())
            .with_context(|| format!("[[pull]] stream {}", p.stream))?;
    }
    Ok(Some(pulls))
}

/// Binds `--rtmps` and serves RTMPS on it: the RTMP ingest behind a TLS
/// handshake with the `--tls-cert` certificate.
async fn start_rtmps(
    cfg: &Config,
    tls: Option<&crate::tls::Tls>,
    registry: &Arc<Registry>,
    token: &Arc<str>,
    stop: &CancellationToken,
) -> anyhow::Result<Option<SocketAddr>> {
    let (Some(addr), Some(tls)) = (cfg.rtmps, tls) else {
        return Ok(None);
    };
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding RTMPS on {addr}"))?;
    let local = listener.local_addr().ok();
    let acceptor = tls.rtmps()?;
    let (registry, token, stop) = (registry.clone(), token.clone(), stop.clone());
    let bframes = cfg.bframes.clone();
    let limits = cfg.rtmp_limits.clone();
    tokio::spawn(async move {
        if let Err(e) = cascade_ingest::rtmp::serve_tls(
            listener, acceptor, registry, token, stop, bframes, limits,
        )
        .await
        {
            tracing::error!(error = %e, "rtmps listener failed");
        }
    });
    Ok(local)
}

/// Serves `router` on `--http` (HTTPS with `https`) under the connection
/// caps and timeouts of `--http-max-*`/`--http-*-timeout`, with the client
/// address as `ConnectInfo<SocketAddr>`, until `stop`.
async fn serve_http(
    http: TcpListener,
    https: Option<tokio_rustls::TlsAcceptor>,
    router: Router,
    limits: crate::http_limits::Limits,
    stop: CancellationToken,
) -> std::io::Result<()> {
    use crate::http_limits::{body_timeout_layer, Capped, Timed};
    use axum::serve::ListenerExt;
    let stopped = async move { stop.cancelled().await };
    let log = cascade_rtc::limit::SharedLogOnce::default();
    let router = router.layer(body_timeout_layer(&limits));
    let capped = Capped::new(http, &limits, log.clone());
    // `tap_io` only to get axum's `ConnectInfo<SocketAddr>` for any listener.
    match https {
        None => {
            let listener = Timed::new(capped, &limits, log).tap_io(|_| {});
            axum::serve(
                listener,
                router.into_make_service_with_connect_info::<SocketAddr>(),
            )
            .with_graceful_shutdown(stopped)
            .await
        }
        Some(acceptor) => {
            // Caps under TLS (handshakes count), deadlines over it (they
            // read the request bytes).
            let tls = crate::tls::TlsListener::new(capped, acceptor)?;
            let listener = Timed::new(tls, &limits, log).tap_io(|_| {});
            axum::serve(
                listener,
                router.into_make_service_with_connect_info::<SocketAddr>(),
            )
            .with_graceful_shutdown(stopped)
            .await
        }
    }
}

fn listen_http(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(HTTP_BACKLOG)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Signal {
    Interrupt,
    Terminate,
}

async fn wait_for_signal() -> Signal {
    let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
    else {
        let _ = tokio::signal::ctrl_c().await;
        return Signal::Interrupt;
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => Signal::Interrupt,
        _ = term.recv() => Signal::Terminate,
    }
}

/// Streams this node's own publishers feed (not relayed copies): a drain
/// waits for them as for WebRTC sessions, so an RTMP publish is not cut.
fn local_publishes(registry: &Registry) -> usize {
    registry.list().iter().filter(|s| !s.relayed).count()
}

/// A shard or receive task that failed took its sessions with it, and a
/// node limping on would refuse or lose viewers: exit non-zero (70,
/// EX_SOFTWARE) with a clear log so the supervisor (systemd, Kubernetes)
/// restarts it.
fn supervise(rtc: cascade_rtc::Server) {
    tokio::spawn(async move {
        let why = rtc.failed().await;
        tracing::error!(what = %why, "webrtc task failed: exiting with status 70 for the supervisor to restart the node");
        eprintln!("cascade: {why}: exiting with status 70");
        std::process::exit(70);
    });
}

fn describe_metrics() {
    cascade_origin::metrics::describe();
    cascade_rtc::metrics::describe();
    cascade_ingest::metrics::describe();
    cascade_edge::metrics::describe();
    crate::tls::describe_metrics();
    crate::http_limits::describe_metrics();
    crate::placement::describe_metrics();
}

/// `--public-url`, else `http(s)://<first advertised address>:<http port>`:
/// where other nodes send viewers placed here.
fn public_url(cfg: &Config, http: SocketAddr, rtc: Option<&cascade_rtc::Server>) -> String {
    if let Some(u) = &cfg.public_url {
        return u.clone();
    }
    let advertise: Vec<IpAddr> = match rtc {
        Some(r) => r.advertise().to_vec(),
        None => cascade_rtc::interface_addresses(),
    };
    let scheme = if cfg.tls.is_some() { "https" } else { "http" };
    let host = match advertise.first() {
        Some(IpAddr::V6(v6)) => format!("[{v6}]"),
        Some(IpAddr::V4(v4)) => v4.to_string(),
        None => public_host(http, &advertise),
    };
    format!("{scheme}://{host}:{}", http.port())
}

/// The address users should type: the first advertised (or interface)
/// address that is not loopback, else loopback.
fn public_host(bind: SocketAddr, advertise: &[IpAddr]) -> String {
    let ip = if !bind.ip().is_unspecified() {
        bind.ip()
    } else {
        advertise
            .iter()
            .copied()
            .find(|ip| !ip.is_loopback() && ip.is_ipv4())
            .or_else(|| advertise.first().copied())
            .unwrap_or(IpAddr::from([127, 0, 0, 1]))
    };
    match ip {
        IpAddr::V6(v6) => format!("[{v6}]"),
        IpAddr::V4(v4) => v4.to_string(),
    }
}

fn banner(
    cfg: &Config,
    http: SocketAddr,
    rtmp: Option<SocketAddr>,
    rtmps: Option<SocketAddr>,
    rtc: Option<&cascade_rtc::Server>,
    relay: Option<&relay::Server>,
) {
    let advertise: Vec<IpAddr> = match rtc {
        Some(r) => r.advertise().to_vec(),
        None => cascade_rtc::interface_addresses(),
    };
    let host = public_host(http, &advertise);
    let port = http.port();
    let (web, ws) = if cfg.tls.is_some() {
        ("https", "wss")
    } else {
        ("http", "ws")
    };
    println!(
        "cascade {} is running ({})",
        env!("CARGO_PKG_VERSION"),
        cfg.role.as_str()
    );
    if let Some(r) = rtc {
        println!(
            "  WebRTC media: udp {} / ice-tcp {} — candidates: {}",
            r.local_udp(),
            r.local_tcp().map_or("off".into(), |a| a.to_string()),
            r.advertise()
                .iter()
                .map(|a| a.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    if let Some(r) = relay {
        if let Ok(a) = r.local_addr() {
            println!("  Relay (QUIC): {a}");
        }
    }
    if matches!(cfg.role, Role::All | Role::Ingest) {
        let shown = if cfg.publish_token_generated {
            cfg.publish_token.as_str()
        } else {
            "(the --publish-token you set)"
        };
        println!("  Publish token: {shown}");
        println!("  Publish with WHIP (OBS: Service \"WHIP\"):");
        println!("      Server:       {web}://{host}:{port}/whip/STREAM");
        println!("      Bearer Token: {shown}");
        if let Some(r) = rtmp {
            println!("  Publish with RTMP (OBS: Service \"Custom\"):");
            println!("      Server:       rtmp://{host}:{}/live", r.port());
            println!("      Stream Key:   STREAM?token={shown}");
        }
        if let Some(r) = rtmps {
            println!("  Publish with RTMPS (OBS: Service \"Custom\"):");
            println!("      Server:       rtmps://{host}:{}/live", r.port());
            println!("      Stream Key:   STREAM?token={shown}");
        }
    }
    if matches!(cfg.role, Role::All | Role::Edge) {
        println!("  Watch:  {web}://{host}:{port}/play/STREAM");
        println!("  WHEP:   {web}://{host}:{port}/whep/STREAM");
        if cfg.tls.is_some() {
            println!("  OvenPlayer: {ws}://{host}:{port}/ws/live/STREAM");
        }
    }
    println!("  Health: {web}://{host}:{port}/healthz   Metrics: {web}://{host}:{port}/metrics   Streams: {web}://{host}:{port}/api/streams");
    println!("  (replace STREAM with any name of 1-64 characters A-Z a-z 0-9 _ -)");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_histograms_with_buckets() {
        let recorder = prometheus_builder().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            metrics::histogram!("cascade_test_delay_seconds").record(0.004);
            metrics::histogram!("cascade_test_size").record(3.0);
        });
        let text = handle.render();
        assert!(
            text.contains(r#"cascade_test_delay_seconds_bucket{le="0.005"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"cascade_test_delay_seconds_bucket{le="0.003"} 0"#),
            "{text}"
        );
        // Other histograms keep the exporter's default (a summary).
        assert!(text.contains(r#"cascade_test_size{quantile="#), "{text}");
    }
}
