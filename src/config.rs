//! cascade's one typed configuration: flags, `CASCADE_*` environment
//! variables and an optional TOML file, in that order of precedence
//! (INTERFACE.md). Every flag is an `Option` so an unset flag never
//! overwrites a value from the environment or the file.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use cascade_ingest::transcode::{self, Policy};
use clap::{Parser, Subcommand, ValueEnum};
use serde::Deserialize;

/// Which parts of cascade this process runs.
#[derive(Subcommand, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Ingest + origin + edge in one process (the default).
    All,
    /// The origin: accepts ingest connections, fans streams out to edges over QUIC.
    Origin,
    /// WHIP + RTMP ingest, forwarding to an origin.
    Ingest,
    /// WHEP and OvenPlayer viewers served from an origin.
    Edge,
    /// Print a fresh random --cluster-secret (64 hex characters) and exit.
    Secret,
}

impl Role {
    /// Lowercase name, for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::All => "all",
            Self::Origin => "origin",
            Self::Ingest => "ingest",
            Self::Edge => "edge",
            Self::Secret => "secret",
        }
    }
}

/// What the ingest does with RTMP H.264 streams that have B-frames.
#[derive(ValueEnum, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Bframes {
    /// Re-encode the video without B-frames (one ffmpeg per stream).
    Transcode,
    /// Pass it through; viewers get only its I/P frames.
    Drop,
}

/// Command line; every option also reads `CASCADE_<NAME>`.
#[derive(Parser, Debug, Default)]
#[command(
    name = "cascade",
    version,
    about = "Low-latency live broadcast: WHIP/RTMP in, WebRTC out"
)]
pub struct Cli {
    /// Role to run (default: all).
    #[command(subcommand)]
    pub role: Option<Role>,
    /// TOML file with any of the options below (lowest precedence).
    #[arg(long, global = true, env = "CASCADE_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub opts: Options,
}

/// The options of INTERFACE.md, each optional at this stage.
#[derive(clap::Args, Deserialize, Debug, Default, Clone, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Options {
    /// HTTP: WHIP, WHEP, player page, API, metrics [default: 0.0.0.0:8080]
    #[arg(long, global = true, env = "CASCADE_HTTP")]
    pub http: Option<SocketAddr>,
    /// RTMP ingest [default: 0.0.0.0:1935]
    #[arg(long, global = true, env = "CASCADE_RTMP")]
    pub rtmp: Option<SocketAddr>,
    /// The one UDP port for all WebRTC media [default: 0.0.0.0:8189]
    #[arg(long, global = true, env = "CASCADE_UDP")]
    pub udp: Option<SocketAddr>,
    /// ICE-TCP (passive) [default: same address as --udp]
    #[arg(long, global = true, env = "CASCADE_TCP")]
    pub tcp: Option<SocketAddr>,
    /// IP addresses put into ICE candidates, comma separated [default: every up interface]
    #[arg(long, global = true, env = "CASCADE_ADVERTISE", value_delimiter = ',')]
    pub advertise: Option<Vec<IpAddr>>,
    /// Bearer token required to publish [default: random, printed at start]
    #[arg(
        long,
        global = true,
        env = "CASCADE_PUBLISH_TOKEN",
        hide_env_values = true
    )]
    pub publish_token: Option<String>,
    /// Token viewers must present [default: none, open viewing]
    #[arg(
        long,
        global = true,
        env = "CASCADE_VIEWER_TOKEN",
        hide_env_values = true
    )]
    pub viewer_token: Option<String>,
    /// Origin relay (QUIC) listen address [default: 0.0.0.0:4433 for origin]
    #[arg(long, global = true, env = "CASCADE_QUIC")]
    pub quic: Option<SocketAddr>,
    /// Secret shared by every node of a split cluster
    #[arg(
        long,
        global = true,
        env = "CASCADE_CLUSTER_SECRET",
        hide_env_values = true
    )]
    pub cluster_secret: Option<String>,
    /// On SIGTERM let current sessions run this long, then exit 0 [default: 30s]
    #[arg(long, global = true, env = "CASCADE_DRAIN_TIMEOUT", value_parser = humantime::parse_duration)]
    #[serde(default, with = "humantime_serde_opt")]
    pub drain_timeout: Option<Duration>,
    /// tracing filter, RUST_LOG syntax [default: info]
    #[arg(long, global = true, env = "CASCADE_LOG")]
    pub log: Option<String>,
    /// The origin to connect to (ingest and edge): HOST:PORT
    #[arg(long, global = true, env = "CASCADE_ORIGIN")]
    pub origin: Option<String>,
    /// WebRTC sessions (publishers + viewers) past which viewers get 503 [default: 10000]
    #[arg(long, global = true, env = "CASCADE_MAX_SESSIONS")]
    pub max_sessions: Option<usize>,
    /// STUN/TURN servers offered to WebRTC clients, comma separated
    /// (stun:HOST:PORT, turn:HOST:PORT?transport=udp) [default: none]
    #[arg(
        long,
        global = true,
        env = "CASCADE_ICE_SERVERS",
        value_delimiter = ','
    )]
    pub ice_servers: Option<Vec<String>>,
    /// coturn static-auth-secret: TURN servers get time-limited credentials [default: none]
    #[arg(
        long,
        global = true,
        env = "CASCADE_TURN_SECRET",
        hide_env_values = true
    )]
    pub turn_secret: Option<String>,
    /// Lifetime of minted TURN credentials [default: 24h]
    #[arg(long, global = true, env = "CASCADE_TURN_TTL", value_parser = humantime::parse_duration)]
    #[serde(default, with = "humantime_serde_opt")]
    pub turn_ttl: Option<Duration>,
    /// RTMP H.264 with B-frames: `transcode` (re-encode without them, smooth
    /// in browsers) or `drop` (pass through, browsers show only I/P frames)
    /// [default: transcode if ffmpeg is found, else drop]
    #[arg(long, global = true, env = "CASCADE_BFRAMES", value_enum)]
    pub bframes: Option<Bframes>,
    /// The ffmpeg binary used by `--bframes transcode` [default: ffmpeg on PATH]
    #[arg(long, global = true, env = "CASCADE_FFMPEG")]
    pub ffmpeg: Option<PathBuf>,
    /// B-frame transcodes at once; streams past it are passed through [default: 4]
    #[arg(long, global = true, env = "CASCADE_MAX_TRANSCODES")]
    pub max_transcodes: Option<usize>,
    /// TLS certificate chain (PEM); with --tls-key, --http serves HTTPS only
    /// (and wss://). Re-read when it changes [default: none]
    #[arg(long, global = true, env = "CASCADE_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM) [default: none]
    #[arg(long, global = true, env = "CASCADE_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// RTMPS ingest (TLS with the --tls-cert certificate), e.g. 0.0.0.0:1936 [default: none]
    #[arg(long, global = true, env = "CASCADE_RTMPS")]
    pub rtmps: Option<SocketAddr>,
    /// RTSP pulls: `[[pull]]` tables in the TOML file only (`stream`,
    /// `url`, `on_demand`, `transport`, `grace`); more through `/api/pulls`
    #[arg(skip)]
    pub pull: Option<Vec<PullEntry>>,
    /// RTMP: a connection must publish (valid token) this soon after connecting [default: 10s]
    #[arg(long, global = true, env = "CASCADE_RTMP_PUBLISH_TIMEOUT", value_parser = humantime::parse_duration)]
    #[serde(default, with = "humantime_serde_opt")]
    pub rtmp_publish_timeout: Option<Duration>,
    /// RTMP connections per client IP, 0 = no cap [default: 16]
    #[arg(long, global = true, env = "CASCADE_RTMP_MAX_PER_IP")]
    pub rtmp_max_per_ip: Option<usize>,
    /// ICE-TCP connections per client IP, 0 = no cap [default: 16]
    #[arg(long, global = true, env = "CASCADE_ICE_TCP_MAX_PER_IP")]
    pub ice_tcp_max_per_ip: Option<usize>,
    /// ICE-TCP: close a connection silent this long [default: 30s]
    #[arg(long, global = true, env = "CASCADE_ICE_TCP_IDLE_TIMEOUT", value_parser = humantime::parse_duration)]
    #[serde(default, with = "humantime_serde_opt")]
    pub ice_tcp_idle_timeout: Option<Duration>,
    /// Remote ICE candidates per WebRTC session (PATCH and WebSocket) [default: 32]
    #[arg(long, global = true, env = "CASCADE_MAX_REMOTE_CANDIDATES")]
    pub max_remote_candidates: Option<usize>,
    /// Bearer token `/api/*` and `/metrics` require [default: none, open]
    #[arg(long, global = true, env = "CASCADE_API_TOKEN", hide_env_values = true)]
    pub api_token: Option<String>,
    /// Wrong or missing tokens one client IP may send per minute before it gets 429 [default: 10]
    #[arg(long, global = true, env = "CASCADE_AUTH_MAX_FAILURES")]
    pub auth_max_failures: Option<u32>,
    /// HMAC key of signed tokens (JWT HS256: sub, act, exp) [default: none]
    #[arg(
        long,
        global = true,
        env = "CASCADE_TOKEN_SECRET",
        hide_env_values = true
    )]
    pub token_secret: Option<String>,
    /// HTTP(S) connections open at once; more are closed at accept, 0 = no cap [default: 4096]
    #[arg(long, global = true, env = "CASCADE_HTTP_MAX_CONNECTIONS")]
    pub http_max_connections: Option<usize>,
    /// HTTP(S) connections per client IP, 0 = no cap [default: 64]
    #[arg(long, global = true, env = "CASCADE_HTTP_MAX_PER_IP")]
    pub http_max_per_ip: Option<usize>,
    /// HTTP: a request head must arrive in full this soon (slowloris) [default: 10s]
    #[arg(long, global = true, env = "CASCADE_HTTP_HEADER_TIMEOUT", value_parser = humantime::parse_duration)]
    #[serde(default, with = "humantime_serde_opt")]
    pub http_header_timeout: Option<Duration>,
    /// HTTP: a request body may stall this long between reads [default: 10s]
    #[arg(long, global = true, env = "CASCADE_HTTP_BODY_TIMEOUT", value_parser = humantime::parse_duration)]
    #[serde(default, with = "humantime_serde_opt")]
    pub http_body_timeout: Option<Duration>,
    /// HTTP: close a keep-alive connection idle this long [default: 60s]
    #[arg(long, global = true, env = "CASCADE_HTTP_IDLE_TIMEOUT", value_parser = humantime::parse_duration)]
    #[serde(default, with = "humantime_serde_opt")]
    pub http_idle_timeout: Option<Duration>,
    /// WHIP publishers at once, a pool viewers cannot fill, 0 = no cap [default: 1000]
    #[arg(long, global = true, env = "CASCADE_MAX_PUBLISHERS")]
    pub max_publishers: Option<usize>,
    /// WHIP/WHEP/WebSocket sessions per client IP (429 past it), 0 = no cap [default: 64]
    #[arg(long, global = true, env = "CASCADE_MAX_SESSIONS_PER_IP")]
    pub max_sessions_per_ip: Option<usize>,
    /// Relay server: authenticated node links at once [default: 1024]
    #[arg(long, global = true, env = "CASCADE_RELAY_MAX_LINKS")]
    pub relay_max_links: Option<usize>,
    /// Relay server: connection attempts still in the handshake at once [default: 256]
    #[arg(long, global = true, env = "CASCADE_RELAY_MAX_HANDSHAKES")]
    pub relay_max_handshakes: Option<usize>,
    /// Relay server: handshakes at once from one IP (IPv6: one /64) [default: 32]
    #[arg(long, global = true, env = "CASCADE_RELAY_HANDSHAKES_PER_IP")]
    pub relay_handshakes_per_ip: Option<usize>,
    /// Relay server: past this many handshakes, unvalidated sources get a QUIC Retry first [default: 32]
    #[arg(long, global = true, env = "CASCADE_RELAY_RETRY_ABOVE")]
    pub relay_retry_above: Option<usize>,
    /// How long streams of a lost relay link stay live (viewers wait, then resume) [default: 15s]
    #[arg(long, global = true, env = "CASCADE_RELAY_HOLD", value_parser = humantime::parse_duration)]
    #[serde(default, with = "humantime_serde_opt")]
    pub relay_hold: Option<Duration>,
    /// Per-viewer bandwidth estimation and automatic rendition choice for streams with renditions; `--abr=false`: Auto plays the best rendition that flows [default: on]
    #[arg(long, global = true, env = "CASCADE_ABR", num_args = 0..=1, default_missing_value = "true")]
    pub abr: Option<bool>,
    /// URL POSTed JSON batches of events: publish start/stop, viewers, pulls, drain [default: none]
    #[arg(long, global = true, env = "CASCADE_EVENTS_WEBHOOK")]
    pub events_webhook: Option<String>,
    /// URL POSTed {action, stream, protocol, remote_addr, token} before a publish or view the tokens do not allow; 2xx allows [default: none]
    #[arg(
        long,
        global = true,
        env = "CASCADE_AUTH_WEBHOOK",
        hide_env_values = true
    )]
    #[serde(alias = "auth_webhook")]
    pub auth_webhook: Option<String>,
    /// This node's HTTP base URL for other nodes' placement redirects [default: http(s)://FIRST_ADVERTISE_ADDRESS:HTTP_PORT]
    #[arg(long, global = true, env = "CASCADE_PUBLIC_URL")]
    pub public_url: Option<String>,
    /// POST /whep/{stream} may answer 307 to the least loaded healthy edge (`--placement` or `--placement true`) [default: false]
    #[arg(long, global = true, env = "CASCADE_PLACEMENT", num_args = 0..=1, default_missing_value = "true")]
    pub placement: Option<bool>,
    /// Extra renditions re-encoded from RTMP H.264 streams, HEIGHTp:KBPS
    /// steps, e.g. `720p:2500,360p:800` (at most 4; steps at or above the
    /// source height are skipped) [default: none]
    #[arg(long, global = true, env = "CASCADE_ABR_LADDER")]
    pub abr_ladder: Option<String>,
    /// A second origin (ingest and edge): HOST:PORT. Ingests uplink every stream to both origins; edges fetch through it while --origin does not answer [default: none]
    #[arg(long, global = true, env = "CASCADE_ORIGIN_STANDBY")]
    pub origin_standby: Option<String>,
    /// Test hook for the supervision test: shards panic when adding a
    /// session after this many. No env, no file key, not in --help.
    #[arg(long, global = true, hide = true)]
    #[serde(skip)]
    pub debug_panic_shard_after: Option<usize>,
}

/// One `[[pull]]` table: an RTSP camera published as `stream`.
#[derive(Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PullEntry {
    /// The stream name it publishes.
    pub stream: String,
    /// `rtsp://[user:pass@]host[:port]/path` (or `rtsps://`).
    pub url: String,
    /// Connect on the first viewer, disconnect `grace` after the last.
    #[serde(default, alias = "on-demand")]
    pub on_demand: bool,
    /// `tcp` (interleaved, the default) or `udp`.
    #[serde(default)]
    pub transport: Option<cascade_ingest::rtsp::Transport>,
    /// On demand: stay connected this long after the last viewer [default: 10s].
    #[serde(default, with = "humantime_serde_opt")]
    pub grace: Option<Duration>,
}

mod humantime_serde_opt {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Duration>, D::Error> {
        let s: Option<String> = Option::deserialize(d)?;
        s.map(|s| humantime::parse_duration(&s).map_err(serde::de::Error::custom))
            .transpose()
    }
}

impl Options {
    /// Fills every unset option from `lower` (flags/env over file).
    fn or(self, lower: Self) -> Self {
        Self {
            http: self.http.or(lower.http),
            rtmp: self.rtmp.or(lower.rtmp),
            udp: self.udp.or(lower.udp),
            tcp: self.tcp.or(lower.tcp),
            advertise: self.advertise.or(lower.advertise),
            publish_token: self.publish_token.or(lower.publish_token),
            viewer_token: self.viewer_token.or(lower.viewer_token),
            quic: self.quic.or(lower.quic),
            cluster_secret: self.cluster_secret.or(lower.cluster_secret),
            drain_timeout: self.drain_timeout.or(lower.drain_timeout),
            log: self.log.or(lower.log),
            origin: self.origin.or(lower.origin),
            max_sessions: self.max_sessions.or(lower.max_sessions),
            ice_servers: self.ice_servers.or(lower.ice_servers),
            turn_secret: self.turn_secret.or(lower.turn_secret),
            turn_ttl: self.turn_ttl.or(lower.turn_ttl),
            bframes: self.bframes.or(lower.bframes),
            ffmpeg: self.ffmpeg.or(lower.ffmpeg),
            max_transcodes: self.max_transcodes.or(lower.max_transcodes),
            pull: self.pull.or(lower.pull),
            tls_cert: self.tls_cert.or(lower.tls_cert),
            tls_key: self.tls_key.or(lower.tls_key),
            rtmps: self.rtmps.or(lower.rtmps),
            rtmp_publish_timeout: self.rtmp_publish_timeout.or(lower.rtmp_publish_timeout),
            rtmp_max_per_ip: self.rtmp_max_per_ip.or(lower.rtmp_max_per_ip),
            ice_tcp_max_per_ip: self.ice_tcp_max_per_ip.or(lower.ice_tcp_max_per_ip),
            ice_tcp_idle_timeout: self.ice_tcp_idle_timeout.or(lower.ice_tcp_idle_timeout),
            max_remote_candidates: self.max_remote_candidates.or(lower.max_remote_candidates),
            http_max_connections: self.http_max_connections.or(lower.http_max_connections),
            http_max_per_ip: self.http_max_per_ip.or(lower.http_max_per_ip),
            http_header_timeout: self.http_header_timeout.or(lower.http_header_timeout),
            http_body_timeout: self.http_body_timeout.or(lower.http_body_timeout),
            http_idle_timeout: self.http_idle_timeout.or(lower.http_idle_timeout),
            max_publishers: self.max_publishers.or(lower.max_publishers),
            max_sessions_per_ip: self.max_sessions_per_ip.or(lower.max_sessions_per_ip),
            debug_panic_shard_after: self.debug_panic_shard_after,
            relay_max_links: self.relay_max_links.or(lower.relay_max_links),
            relay_max_handshakes: self.relay_max_handshakes.or(lower.relay_max_handshakes),
            relay_handshakes_per_ip: self
                .relay_handshakes_per_ip
                .or(lower.relay_handshakes_per_ip),
            relay_retry_above: self.relay_retry_above.or(lower.relay_retry_above),
            events_webhook: self.events_webhook.or(lower.events_webhook),
            abr: self.abr.or(lower.abr),
            relay_hold: self.relay_hold.or(lower.relay_hold),
            api_token: self.api_token.or(lower.api_token),
            auth_max_failures: self.auth_max_failures.or(lower.auth_max_failures),
            token_secret: self.token_secret.or(lower.token_secret),
            auth_webhook: self.auth_webhook.or(lower.auth_webhook),
            public_url: self.public_url.or(lower.public_url),
            placement: self.placement.or(lower.placement),
            abr_ladder: self.abr_ladder.or(lower.abr_ladder),
            origin_standby: self.origin_standby.or(lower.origin_standby),
        }
    }
}

/// The resolved configuration every role reads.
#[derive(Debug, Clone)]
pub struct Config {
    pub role: Role,
    pub http: SocketAddr,
    pub rtmp: SocketAddr,
    pub udp: SocketAddr,
    pub tcp: SocketAddr,
    pub advertise: Vec<IpAddr>,
    pub publish_token: String,
    /// True when the token was generated (so it is printed).
    pub publish_token_generated: bool,
    pub viewer_token: Option<String>,
    /// Relay listen address; `None` when this role does not serve the relay.
    pub quic: Option<SocketAddr>,
    pub cluster_secret: Option<String>,
    pub drain_timeout: Duration,
    pub log: String,
    pub origin: Option<String>,
    pub max_sessions: usize,
    /// STUN/TURN servers offered to clients, with TURN credentials.
    pub ice: cascade_rtc::ice::IceServers,
    /// RTMP H.264 with B-frames: transcode (with these settings) or drop.
    pub bframes: Policy,
    /// Set when `bframes` fell back to drop because no ffmpeg was found
    /// (logged once at start).
    pub bframes_note: Option<String>,
    /// The certificate `--http` (HTTPS) and `--rtmps` serve.
    pub tls: Option<TlsFiles>,
    /// RTMPS listen address (needs `tls`).
    pub rtmps: Option<SocketAddr>,
    /// WebRTC limits under abuse (ICE-TCP, candidates).
    pub rtc_limits: cascade_rtc::Limits,
    /// RTMP connection limits.
    pub rtmp_limits: cascade_ingest::rtmp::Limits,
    /// Bearer token of `/api/*` and `/metrics`; `None`: open.
    pub api_token: Option<String>,
    /// HMAC key of signed tokens (JWT HS256); `None`: static tokens only.
    pub token_secret: Option<String>,
    /// `--http` connection caps and timeouts.
    pub http_limits: crate::http_limits::Limits,
    /// `--relay-max-*`: the relay server's caps on handshakes and links.
    pub relay_limits: cascade_origin::relay::Limits,
    /// `--events-webhook`: where event batches go; `None`: nowhere.
    pub events_webhook: Option<String>,
    /// `--abr`: automatic per-viewer rendition choice from a bandwidth
    /// estimate.
    pub abr: bool,
    /// `--auth-webhook`: the client every protocol asks (also in
    /// `rtmp_limits`); `None`: tokens alone decide.
    pub auth_webhook: Option<cascade_rtc::webhook::Webhook>,
    /// RTSP pulls from the file's `[[pull]]` tables, validated.
    pub pulls: Vec<cascade_ingest::rtsp::PullConfig>,
    /// `--public-url`: checked here, defaulted in `node.rs` once the HTTP
    /// port is bound.
    pub public_url: Option<String>,
    /// `--placement`: redirect WHEP POSTs to the best edge.
    pub placement: bool,
    /// `--origin-standby`: the second origin of ingests and edges.
    pub origin_standby: Option<String>,
}

/// `--tls-cert` and `--tls-key`: PEM files, read at start and again when
/// they change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Shortest cluster secret accepted: it is the only thing between the
/// relay port and anyone who can reach it, and a node it dials sees a proof
/// a guess can be tested against offline (docs/security/relay.md).
const MIN_SECRET: usize = 32;

/// A fresh cluster secret: 256 bits from the operating system's CSPRNG as
/// 64 hex digits.
pub fn new_secret() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `cascade secret`: the secret to print, when that is the command.
pub fn secret_command() -> Option<String> {
    let cli = Cli::try_parse().ok()?;
    (cli.role == Some(Role::Secret)).then(new_secret)
}

impl Config {
    /// Parses the command line, the environment and the file.
    pub fn load() -> anyhow::Result<Self> {
        Self::from_cli(Cli::parse())
    }

    /// Resolves a parsed command line (tests call this directly).
    pub fn from_cli(cli: Cli) -> anyhow::Result<Self> {
        let file = match &cli.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading config file {}", path.display()))?;
                toml::from_str::<Options>(&text)
                    .with_context(|| format!("parsing config file {}", path.display()))?
            }
            None => Options::default(),
        };
        Self::resolve(cli.role.unwrap_or(Role::All), cli.opts.or(file))
    }

    fn resolve(role: Role, o: Options) -> anyhow::Result<Self> {
        let rtc_limits = rtc_limits(&o);
        let relay_limits = relay_limits(&o)?;
        let events_webhook = match o.events_webhook.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(u) => Some(webhook_url(u, "--events-webhook")?),
        };
        let public_url = match o.public_url.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(u) => Some(
                webhook_url(u, "--public-url")?
                    .trim_end_matches('/')
                    .to_string(),
            ),
        };
        let auth_gate = rtc_limits.auth.clone();
        // Checked at start: a typo must not leave a node that refuses all.
        let auth_webhook = o
            .auth_webhook
            .as_deref()
            .filter(|u| !u.trim().is_empty())
            .map(cascade_rtc::webhook::Webhook::new)
            .transpose()?;
        let http_limits = http_limits(&o);
        let udp = o
            .udp
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 8189)));
        let ladder = abr_ladder(&o)?;
        let (bframes, bframes_note) = if matches!(role, Role::All | Role::Ingest) {
            bframes_policy(&o)?
        } else {
            (Policy::Drop, None) // no RTMP ingest in this role
        };
        let (publish_token, generated) = match o.publish_token {
            Some(t) if t.trim().is_empty() => bail!("--publish-token must not be empty"),
            Some(t) => (t, false),
            None => (random_token(), true),
        };
        if role == Role::Secret {
            bail!("`cascade secret` prints a secret and exits; it runs no node");
        }
        if let Some(s) = &o.cluster_secret {
            let len = s.chars().count();
            if len < MIN_SECRET {
                bail!(
                    "--cluster-secret must be at least {MIN_SECRET} characters (this one has {len}): `cascade secret` prints a fresh one"
                );
            }
        }
        if role != Role::All && o.cluster_secret.is_none() {
            bail!(
                "`cascade {}` needs --cluster-secret (or CASCADE_CLUSTER_SECRET): the same secret on every node of the cluster",
                role.as_str()
            );
        }
        if matches!(role, Role::Ingest | Role::Edge) && o.origin.is_none() {
            bail!(
                "`cascade {}` needs --origin HOST:PORT (the origin's --quic address)",
                role.as_str()
            );
        }
        let pulls = pulls(role, o.pull.as_deref().unwrap_or_default())?;
        let quic = match role {
            Role::Origin => Some(
                o.quic
                    .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 4433))),
            ),
            // Elsewhere the relay listens only when asked to (an edge serving
            // further edges, or `all` serving edges): nothing listens that
            // the operator did not ask for.
            _ => o.quic,
        };
        if quic.is_some() && o.cluster_secret.is_none() {
            bail!("--quic needs --cluster-secret: relay peers authenticate with it");
        }
        let mut urls = Vec::new();
        for u in o
            .ice_servers
            .iter()
            .flatten()
            .filter(|u| !u.trim().is_empty())
        {
            urls.push(
                cascade_rtc::ice::Url::parse(u)
                    .map_err(|e| anyhow::anyhow!("--ice-servers: {e}"))?,
            );
        }
        let ice = cascade_rtc::ice::IceServers {
            urls,
            turn_secret: o.turn_secret.filter(|t| !t.is_empty()),
            turn_ttl: o.turn_ttl.unwrap_or(cascade_rtc::ice::DEFAULT_TURN_TTL),
        };
        let tls = match (o.tls_cert, o.tls_key) {
            (Some(cert), Some(key)) => Some(TlsFiles { cert, key }),
            (None, None) => None,
            (Some(_), None) => {
                bail!("--tls-cert needs --tls-key (the certificate's private key, PEM)")
            }
            (None, Some(_)) => bail!("--tls-key needs --tls-cert (the certificate chain, PEM)"),
        };
        if o.rtmps.is_some() {
            if tls.is_none() {
                bail!("--rtmps needs --tls-cert and --tls-key: RTMPS serves that certificate");
            }
            if !matches!(role, Role::All | Role::Ingest) {
                bail!("--rtmps: `cascade {}` has no RTMP ingest", role.as_str());
            }
        }
        Ok(Self {
            role,
            http: o
                .http
                .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 8080))),
            rtmp: o
                .rtmp
                .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 1935))),
            udp,
            tcp: o.tcp.unwrap_or(udp),
            advertise: o.advertise.unwrap_or_default(),
            publish_token,
            publish_token_generated: generated,
            viewer_token: o.viewer_token.filter(|t| !t.is_empty()),
            quic,
            cluster_secret: o.cluster_secret,
            drain_timeout: o.drain_timeout.unwrap_or(Duration::from_secs(30)),
            log: o.log.unwrap_or_else(|| "info".into()),
            origin: o.origin,
            max_sessions: o.max_sessions.unwrap_or(10_000),
            ice,
            bframes,
            bframes_note,
            tls,
            rtmps: o.rtmps,
            rtc_limits,
            rtmp_limits: cascade_ingest::rtmp::Limits {
                per_ip: o
                    .rtmp_max_per_ip
                    .unwrap_or(cascade_ingest::rtmp::DEFAULT_PER_IP),
                publish_timeout: o
                    .rtmp_publish_timeout
                    .unwrap_or(cascade_ingest::rtmp::DEFAULT_PUBLISH_TIMEOUT),
                // One count per address across RTMP, WHIP, WHEP, WebSocket.
                auth: auth_gate,
                token_secret: o.token_secret.clone().filter(|t| !t.is_empty()),
                auth_webhook: auth_webhook.clone(),
                ladder,
                ..Default::default()
            },
            api_token: o.api_token.filter(|t| !t.is_empty()),
            token_secret: o.token_secret.filter(|t| !t.is_empty()),
            http_limits,
            relay_limits,
            events_webhook,
            abr: o.abr.unwrap_or(true),
            auth_webhook,
            pulls,
            public_url,
            placement: o.placement.unwrap_or(false),
            origin_standby: o.origin_standby.filter(|s| !s.is_empty()),
        })
    }
}

/// A webhook URL: absolute http(s) with a host, else a clear error naming
/// the flag.
fn webhook_url(u: &str, flag: &str) -> anyhow::Result<String> {
    let parsed = reqwest::Url::parse(u)
        .map_err(|e| anyhow::anyhow!("{flag}: {e} (want http://HOST[:PORT]/PATH or https://…)"))?;
    if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
        bail!(
            "{flag}: want an http:// or https:// URL with a host, got scheme {}",
            parsed.scheme()
        );
    }
    Ok(u.to_string())
}

/// `--relay-max-links`, `--relay-max-handshakes`, `--relay-handshakes-per-ip`,
/// `--relay-retry-above`. Zero would lock every node out, so it is refused.
fn relay_limits(o: &Options) -> anyhow::Result<cascade_origin::relay::Limits> {
    let d = cascade_origin::relay::Limits::default();
    let pick = |v: Option<usize>, default: usize, flag: &str| match v {
        Some(0) => Err(anyhow::anyhow!(
            "--{flag} must be at least 1 (0 would refuse every node)"
        )),
        Some(n) => Ok(n),
        None => Ok(default),
    };
    Ok(cascade_origin::relay::Limits {
        links: pick(o.relay_max_links, d.links, "relay-max-links")?,
        handshakes: pick(o.relay_max_handshakes, d.handshakes, "relay-max-handshakes")?,
        handshakes_per_source: pick(
            o.relay_handshakes_per_ip,
            d.handshakes_per_source,
            "relay-handshakes-per-ip",
        )?,
        retry_above: pick(o.relay_retry_above, d.retry_above, "relay-retry-above")?,
        hold: o.relay_hold.unwrap_or(d.hold),
    })
}

/// `[[pull]]`: only roles that ingest pull; names valid and unique, URLs
/// rtsp:// or rtsps://, at most [`cascade_ingest::rtsp::DEFAULT_MAX_PULLS`].
/// Errors name the stream, never the URL (it may hold a password).
fn pulls(
    role: Role,
    entries: &[PullEntry],
) -> anyhow::Result<Vec<cascade_ingest::rtsp::PullConfig>> {
    use cascade_ingest::rtsp::{split_url, PullConfig, DEFAULT_MAX_PULLS};
    if entries.is_empty() {
        return Ok(Vec::new());
    }
    if !matches!(role, Role::All | Role::Ingest) {
        bail!(
            "[[pull]]: `cascade {}` does not ingest; RTSP pulls run on `all` or `ingest` nodes",
            role.as_str()
        );
    }
    if entries.len() > DEFAULT_MAX_PULLS {
        bail!(
            "[[pull]]: at most {DEFAULT_MAX_PULLS} pulls (the file has {})",
            entries.len()
        );
    }
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::with_capacity(entries.len());
    for e in entries {
        if !cascade_origin::valid_stream_name(&e.stream) {
            bail!(
                "[[pull]] stream {:?}: {}",
                e.stream,
                cascade_origin::BAD_STREAM_NAME
            );
        }
        if !seen.insert(e.stream.as_str()) {
            bail!("[[pull]] stream {}: listed twice", e.stream);
        }
        if let Err(why) = split_url(&e.url) {
            bail!("[[pull]] stream {}: bad url: {why}", e.stream);
        }
        let mut c = PullConfig::new(&e.stream, &e.url, e.on_demand);
        c.transport = e.transport.unwrap_or_default();
        if let Some(g) = e.grace {
            c.grace = g;
        }
        out.push(c);
    }
    Ok(out)
}

/// `--http-max-*` and `--http-*-timeout`.
fn http_limits(o: &Options) -> crate::http_limits::Limits {
    let d = crate::http_limits::Limits::default();
    crate::http_limits::Limits {
        max_connections: o.http_max_connections.unwrap_or(d.max_connections),
        per_ip: o.http_max_per_ip.unwrap_or(d.per_ip),
        header_timeout: o.http_header_timeout.unwrap_or(d.header_timeout),
        body_timeout: o.http_body_timeout.unwrap_or(d.body_timeout),
        idle_timeout: o.http_idle_timeout.unwrap_or(d.idle_timeout),
    }
}

/// `--ice-tcp-*`, `--max-remote-candidates` (and the hidden panic hook).
fn rtc_limits(o: &Options) -> cascade_rtc::Limits {
    let d = cascade_rtc::Limits::default();
    cascade_rtc::Limits {
        tcp_per_ip: o.ice_tcp_max_per_ip.unwrap_or(d.tcp_per_ip),
        tcp_idle: o.ice_tcp_idle_timeout.unwrap_or(d.tcp_idle),
        max_remote_candidates: o.max_remote_candidates.unwrap_or(d.max_remote_candidates),
        max_publishers: o.max_publishers.unwrap_or(d.max_publishers),
        sessions_per_ip: o.max_sessions_per_ip.unwrap_or(d.sessions_per_ip),
        panic_shard_after: o.debug_panic_shard_after,
        auth: cascade_rtc::limit::AuthGate::new(
            o.auth_max_failures
                .unwrap_or(cascade_rtc::limit::DEFAULT_AUTH_MAX_FAILURES),
        ),
    }
}

/// `--abr-ladder`, parsed (empty: off).
fn abr_ladder(o: &Options) -> anyhow::Result<cascade_ingest::ladder::Ladder> {
    cascade_ingest::ladder::Ladder::parse(o.abr_ladder.as_deref().unwrap_or(""))
        .map_err(|e| anyhow::anyhow!("--abr-ladder: {e}"))
}

/// `--bframes`, `--ffmpeg`, `--max-transcodes`: transcoding is the default
/// when an ffmpeg binary is there; asking for it without one is an error.
fn bframes_policy(o: &Options) -> anyhow::Result<(Policy, Option<String>)> {
    let max = o.max_transcodes.unwrap_or(transcode::DEFAULT_MAX);
    let found = transcode::find_ffmpeg(o.ffmpeg.as_deref(), std::env::var_os("PATH").as_deref());
    let where_ = || match &o.ffmpeg {
        Some(p) => format!("no executable ffmpeg at {}", p.display()),
        None => "no ffmpeg on PATH".to_string(),
    };
    Ok(match (o.bframes, found) {
        (Some(Bframes::Drop), _) => (Policy::Drop, None),
        (_, Some(path)) => (
            Policy::Transcode(Arc::new(transcode::Settings::new(path, max))),
            None,
        ),
        (Some(Bframes::Transcode), None) => bail!(
            "--bframes transcode: {} (install ffmpeg or set --ffmpeg PATH)",
            where_()
        ),
        (None, None) => (
            Policy::Drop,
            Some(format!(
                "{}: RTMP streams with B-frames are passed through and browsers show only their I/P frames (install ffmpeg, or set --bframes drop to silence this)",
                where_()
            )),
        ),
    })
}

/// 128 random bits as 32 hex digits.
fn random_token() -> String {
    format!("{:032x}", rand::random::<u128>())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("cascade").chain(args.iter().copied())).unwrap()
    }

    #[test]
    fn defaults_match_interface() {
        let c = Config::from_cli(parse(&[])).unwrap();
        assert_eq!(c.role, Role::All);
        assert_eq!(c.http, "0.0.0.0:8080".parse().unwrap());
        assert_eq!(c.rtmp, "0.0.0.0:1935".parse().unwrap());
        assert_eq!(c.udp, "0.0.0.0:8189".parse().unwrap());
        assert_eq!(c.tcp, c.udp);
        assert_eq!(c.drain_timeout, Duration::from_secs(30));
        assert!(c.publish_token_generated);
        assert_eq!(c.publish_token.len(), 32);
        assert!(c.viewer_token.is_none());
        assert!(
            c.quic.is_none(),
            "all listens on no relay port unless asked"
        );
    }

    #[test]
    fn abuse_limits_have_safe_defaults_flags_and_keys() {
        let c = Config::from_cli(parse(&[])).unwrap();
        assert_eq!(c.rtmp_limits.publish_timeout, Duration::from_secs(10));
        assert_eq!(c.rtmp_limits.per_ip, 16);
        assert_eq!(c.rtmp_limits.max_connections, 256);
        assert_eq!(c.rtc_limits.tcp_per_ip, 16);
        assert_eq!(c.rtc_limits.tcp_idle, Duration::from_secs(30));
        assert_eq!(c.rtc_limits.max_remote_candidates, 32);
        assert_eq!(c.rtc_limits.panic_shard_after, None);
        let c = Config::from_cli(parse(&[
            "--rtmp-publish-timeout",
            "3s",
            "--rtmp-max-per-ip",
            "2",
            "--ice-tcp-max-per-ip",
            "4",
            "--ice-tcp-idle-timeout",
            "5s",
            "--max-remote-candidates",
            "8",
        ]))
        .unwrap();
        assert_eq!(c.rtmp_limits.publish_timeout, Duration::from_secs(3));
        assert_eq!(c.rtmp_limits.per_ip, 2);
        assert_eq!(c.rtc_limits.tcp_per_ip, 4);
        assert_eq!(c.rtc_limits.tcp_idle, Duration::from_secs(5));
        assert_eq!(c.rtc_limits.max_remote_candidates, 8);
        let file: Options = toml::from_str(
            "rtmp-publish-timeout = \"4s\"\nrtmp-max-per-ip = 5\nice-tcp-max-per-ip = 6\nice-tcp-idle-timeout = \"7s\"\nmax-remote-candidates = 9\n",
        )
        .unwrap();
        assert_eq!(file.rtmp_publish_timeout, Some(Duration::from_secs(4)));
        assert_eq!(file.max_remote_candidates, Some(9));
        // The panic hook is a hidden flag only: no file key.
        assert!(toml::from_str::<Options>("debug-panic-shard-after = 1").is_err());
    }

    #[test]
    fn relay_limits_have_defaults_flags_keys_and_refuse_zero() {
        let c = Config::from_cli(parse(&[])).unwrap();
        assert_eq!(c.relay_limits, cascade_origin::relay::Limits::default());
        assert_eq!(c.relay_limits.links, 1024);
        assert_eq!(c.relay_limits.handshakes, 256);
        assert_eq!(c.relay_limits.handshakes_per_source, 32);
        assert_eq!(c.relay_limits.retry_above, 32);
        let c = Config::from_cli(parse(&[
            "--relay-max-links",
            "10",
            "--relay-max-handshakes",
            "20",
            "--relay-handshakes-per-ip",
            "3",
            "--relay-retry-above",
            "4",
        ]))
        .unwrap();
        let want = cascade_origin::relay::Limits {
            links: 10,
            handshakes: 20,
            handshakes_per_source: 3,
            retry_above: 4,
            hold: cascade_origin::relay::LINK_GRACE,
        };
        assert_eq!(c.relay_limits, want);
        let file: Options = toml::from_str("relay-max-links = 7\nrelay-retry-above = 2\n").unwrap();
        assert_eq!(file.relay_max_links, Some(7));
        assert_eq!(file.relay_retry_above, Some(2));
        let c = Config::from_cli(parse(&["--relay-hold", "40s"])).unwrap();
        assert_eq!(c.relay_limits.hold, Duration::from_secs(40));
        assert_eq!(
            Config::from_cli(parse(&[])).unwrap().relay_limits.hold,
            Duration::from_secs(15)
        );
        let e = Config::from_cli(parse(&["--relay-max-links", "0"])).unwrap_err();
        assert!(e.to_string().contains("--relay-max-links"), "{e}");
    }

    #[test]
    fn abr_flag_and_file() {
        // On unless turned off: renditions are chosen per viewer (INTERFACE.md).
        assert!(Config::from_cli(parse(&[])).unwrap().abr);
        assert!(Config::from_cli(parse(&["--abr"])).unwrap().abr);
        assert!(Config::from_cli(parse(&["--abr", "true"])).unwrap().abr);
        assert!(!Config::from_cli(parse(&["--abr=false"])).unwrap().abr);
        assert!(!Config::from_cli(parse(&["--abr", "false"])).unwrap().abr);
        let file: Options = toml::from_str("abr = false").unwrap();
        assert_eq!(file.abr, Some(false));
    }

    #[test]
    fn abr_ladder_flag_and_file() {
        let c = Config::from_cli(parse(&[])).unwrap();
        assert!(c.rtmp_limits.ladder.is_empty());
        let c = Config::from_cli(parse(&["--abr-ladder", "360p:800,180p:250"])).unwrap();
        assert_eq!(c.rtmp_limits.ladder.steps().len(), 2);
        assert_eq!(c.rtmp_limits.ladder.steps()[0].name, "360p");
        let e = Config::from_cli(parse(&["--abr-ladder", "360:800"])).unwrap_err();
        assert!(e.to_string().contains("--abr-ladder"), "{e}");
        let file: Options = toml::from_str("abr-ladder = \"720p:2500\"").unwrap();
        assert_eq!(file.abr_ladder.as_deref(), Some("720p:2500"));
    }

    #[test]
    fn placement_and_public_url() {
        let c = Config::from_cli(parse(&[])).unwrap();
        assert!(!c.placement);
        assert_eq!(c.public_url, None);
        let c =
            Config::from_cli(parse(&["--placement", "--public-url", "http://e1:8080/"])).unwrap();
        assert!(c.placement);
        assert_eq!(c.public_url.as_deref(), Some("http://e1:8080"));
        let c = Config::from_cli(parse(&["--placement", "false"])).unwrap();
        assert!(!c.placement);
        assert!(Config::from_cli(parse(&["--public-url", "e1:8080"])).is_err());
        let file: Options =
            toml::from_str("placement = true\npublic-url = \"https://e1\"").unwrap();
        assert_eq!(file.placement, Some(true));
        assert_eq!(file.public_url.as_deref(), Some("https://e1"));
    }

    #[test]
    fn events_webhook_is_an_http_url() {
        assert_eq!(Config::from_cli(parse(&[])).unwrap().events_webhook, None);
        let c = Config::from_cli(parse(&["--events-webhook", "http://127.0.0.1:9/ev"])).unwrap();
        assert_eq!(c.events_webhook.as_deref(), Some("http://127.0.0.1:9/ev"));
        for bad in ["127.0.0.1:9", "ftp://h/x", "nonsense"] {
            let e = Config::from_cli(parse(&["--events-webhook", bad])).unwrap_err();
            assert!(e.to_string().contains("--events-webhook"), "{bad}: {e}");
        }
        let file: Options = toml::from_str("events-webhook = \"https://x/y\"").unwrap();
        assert_eq!(file.events_webhook.as_deref(), Some("https://x/y"));
    }

    #[test]
    fn auth_flags_and_keys() {
        let c = Config::from_cli(parse(&[])).unwrap();
        assert_eq!(c.api_token, None);
        assert_eq!(c.token_secret, None);
        assert_eq!(c.rtmp_limits.token_secret, None);
        let c = Config::from_cli(parse(&[
            "--api-token",
            "a",
            "--token-secret",
            "k",
            "--auth-max-failures",
            "1",
        ]))
        .unwrap();
        assert_eq!(c.api_token.as_deref(), Some("a"));
        assert_eq!(c.token_secret.as_deref(), Some("k"));
        assert_eq!(c.rtmp_limits.token_secret.as_deref(), Some("k"));
        // One wrong token bans, and RTMP shares the WebRTC side's count.
        let (ip, t0) = (IpAddr::from([10, 0, 0, 1]), std::time::Instant::now());
        assert!(c.rtmp_limits.auth.admit("rtmp", ip, t0).is_ok());
        c.rtc_limits.auth.failed("whip", true, ip, t0);
        assert!(c.rtmp_limits.auth.admit("rtmp", ip, t0).is_err());
        // Empty values mean unset.
        let c = Config::from_cli(parse(&["--api-token", "", "--token-secret", ""])).unwrap();
        assert_eq!((c.api_token, c.token_secret), (None, None));
        let file: Options =
            toml::from_str("api-token = \"a\"\nauth-max-failures = 3\ntoken-secret = \"k\"\n")
                .unwrap();
        assert_eq!(file.auth_max_failures, Some(3));
        assert_eq!(file.api_token.as_deref(), Some("a"));
        assert_eq!(file.token_secret.as_deref(), Some("k"));
    }

    #[test]
    fn auth_webhook_flag_env_and_key() {
        let c = Config::from_cli(parse(&[])).unwrap();
        assert!(c.auth_webhook.is_none() && c.rtmp_limits.auth_webhook.is_none());
        let c =
            Config::from_cli(parse(&["--auth-webhook", "https://auth.example.com/hook"])).unwrap();
        assert_eq!(
            c.auth_webhook.as_ref().map(|w| w.host()),
            Some("auth.example.com")
        );
        assert!(c.rtmp_limits.auth_webhook.is_some(), "RTMP asks it too");
        for bad in [
            "ftp://auth.example.com/x",
            "auth.example.com/hook",
            "http://",
        ] {
            let e = Config::from_cli(parse(&["--auth-webhook", bad])).unwrap_err();
            assert!(e.to_string().contains("--auth-webhook"), "{bad}: {e}");
        }
        // Empty means unset.
        assert!(Config::from_cli(parse(&["--auth-webhook", ""]))
            .unwrap()
            .auth_webhook
            .is_none());
        for key in ["auth-webhook", "auth_webhook"] {
            let file: Options =
                toml::from_str(&format!("{key} = \"http://127.0.0.1:9/a\"\n")).unwrap();
            assert_eq!(file.auth_webhook.as_deref(), Some("http://127.0.0.1:9/a"));
        }
    }

    #[test]
    fn http_and_session_limits() {
        let c = Config::from_cli(parse(&[])).unwrap();
        assert_eq!(c.http_limits, crate::http_limits::Limits::default());
        assert_eq!(c.http_limits.max_connections, 4096);
        assert_eq!(c.http_limits.per_ip, 64);
        assert_eq!(c.http_limits.header_timeout, Duration::from_secs(10));
        assert_eq!(c.http_limits.body_timeout, Duration::from_secs(10));
        assert_eq!(c.http_limits.idle_timeout, Duration::from_secs(60));
        assert_eq!(c.rtc_limits.max_publishers, 1000);
        assert_eq!(c.rtc_limits.sessions_per_ip, 64);
        let c = Config::from_cli(parse(&[
            "--http-max-connections",
            "10",
            "--http-max-per-ip",
            "2",
            "--http-header-timeout",
            "3s",
            "--http-body-timeout",
            "4s",
            "--http-idle-timeout",
            "5s",
            "--max-publishers",
            "6",
            "--max-sessions-per-ip",
            "7",
        ]))
        .unwrap();
        assert_eq!(
            c.http_limits,
            crate::http_limits::Limits {
                max_connections: 10,
                per_ip: 2,
                header_timeout: Duration::from_secs(3),
                body_timeout: Duration::from_secs(4),
                idle_timeout: Duration::from_secs(5),
            }
        );
        assert_eq!(c.rtc_limits.max_publishers, 6);
        assert_eq!(c.rtc_limits.sessions_per_ip, 7);
        let file: Options = toml::from_str(
            "http-max-connections = 1\nhttp-max-per-ip = 2\nhttp-header-timeout = \"3s\"\nhttp-body-timeout = \"4s\"\nhttp-idle-timeout = \"5s\"\nmax-publishers = 6\nmax-sessions-per-ip = 7\n",
        )
        .unwrap();
        assert_eq!(file.http_header_timeout, Some(Duration::from_secs(3)));
        assert_eq!(file.max_sessions_per_ip, Some(7));
        assert_eq!(file.http_max_connections, Some(1));
    }

    #[test]
    fn origin_defaults_and_secret_required() {
        assert!(Config::from_cli(parse(&["origin"])).is_err());
        let c = Config::from_cli(parse(&[
            "origin",
            "--cluster-secret",
            "0123456789abcdef0123456789abcdef",
        ]))
        .unwrap();
        assert_eq!(c.quic, Some("0.0.0.0:4433".parse().unwrap()));
        assert!(Config::from_cli(parse(&["origin", "--cluster-secret", "short"])).is_err());
    }

    #[test]
    fn short_secret_is_refused_with_a_clear_error() {
        // 31 characters: one short of the minimum.
        let e = Config::from_cli(parse(&["origin", "--cluster-secret", &"x".repeat(31)]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("at least 32 characters"), "{e}");
        assert!(e.contains("has 31"), "{e}");
        assert!(e.contains("cascade secret"), "{e}");
        assert!(!e.contains(&"x".repeat(31)), "the secret is not echoed");
        // The same for `all` with a relay port.
        let short = ["--quic", "127.0.0.1:0", "--cluster-secret", "short"];
        assert!(Config::from_cli(parse(&short)).is_err());
        assert!(Config::from_cli(parse(&[
            "edge",
            "--cluster-secret",
            &"x".repeat(32),
            "--origin",
            "o:1"
        ]))
        .is_ok());
    }

    #[test]
    fn fresh_secrets_are_64_hex_digits_and_long_enough() {
        let (a, b) = (new_secret(), new_secret());
        assert_eq!(a.len(), 64);
        assert!(a
            .bytes()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        assert_ne!(a, b);
        assert!(Config::from_cli(parse(&["origin", "--cluster-secret", &a])).is_ok());
        assert_eq!(parse(&["secret"]).role, Some(Role::Secret));
        assert!(
            Config::from_cli(parse(&["secret"])).is_err(),
            "runs no node"
        );
    }

    #[test]
    fn edge_needs_origin() {
        let e = Config::from_cli(parse(&[
            "edge",
            "--cluster-secret",
            "0123456789abcdef0123456789abcdef",
        ]))
        .unwrap_err();
        assert!(e.to_string().contains("--origin"));
        let c = Config::from_cli(parse(&[
            "edge",
            "--cluster-secret",
            "0123456789abcdef0123456789abcdef",
            "--origin",
            "o:4433",
        ]))
        .unwrap();
        assert_eq!(c.origin.as_deref(), Some("o:4433"));
        assert_eq!(c.origin_standby, None);
    }

    #[test]
    fn origin_standby_flag_env_and_file() {
        let args = [
            "edge",
            "--cluster-secret",
            "0123456789abcdef0123456789abcdef",
            "--origin",
            "a:4433",
            "--origin-standby",
            "b:4433",
        ];
        let c = Config::from_cli(parse(&args)).unwrap();
        assert_eq!(c.origin_standby.as_deref(), Some("b:4433"));
        let file: Options = toml::from_str("origin-standby = \"b:4433\"").unwrap();
        assert_eq!(file.origin_standby.as_deref(), Some("b:4433"));
        // An empty value (e.g. an unset compose variable) means none.
        let c = Config::from_cli(parse(&[
            "edge",
            "--cluster-secret",
            "0123456789abcdef0123456789abcdef",
            "--origin",
            "a:4433",
            "--origin-standby",
            "",
        ]))
        .unwrap();
        assert_eq!(c.origin_standby, None);
    }

    #[test]
    fn flag_beats_file_and_file_fills_gaps() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "http = \"127.0.0.1:9000\"\nrtmp = \"127.0.0.1:9001\"\ndrain-timeout = \"5s\"\nadvertise = [\"10.0.0.1\"]\n",
        )
        .unwrap();
        let c = Config::from_cli(parse(&[
            "--config",
            path.to_str().unwrap(),
            "--http",
            "127.0.0.1:7000",
        ]))
        .unwrap();
        assert_eq!(c.http, "127.0.0.1:7000".parse().unwrap(), "flag over file");
        assert_eq!(
            c.rtmp,
            "127.0.0.1:9001".parse().unwrap(),
            "file fills unset"
        );
        assert_eq!(c.drain_timeout, Duration::from_secs(5));
        assert_eq!(c.advertise, vec!["10.0.0.1".parse::<IpAddr>().unwrap()]);
    }

    #[test]
    fn unknown_file_keys_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "htp = \"127.0.0.1:9000\"\n").unwrap();
        assert!(Config::from_cli(parse(&["--config", path.to_str().unwrap()])).is_err());
    }

    #[test]
    fn advertise_comma_list_and_subcommand_after_flags() {
        let c = Config::from_cli(parse(&["--advertise", "1.2.3.4,5.6.7.8", "all"])).unwrap();
        assert_eq!(c.advertise.len(), 2);
    }

    #[test]
    fn ice_servers_and_turn() {
        let c = Config::from_cli(parse(&[
            "--ice-servers",
            "stun:198.18.0.1:3478,turn:198.18.0.1:3478?transport=udp",
            "--turn-secret",
            "s3cret",
            "--turn-ttl",
            "1h",
        ]))
        .unwrap();
        assert_eq!(c.ice.urls.len(), 2);
        assert_eq!(c.ice.turn_ttl, Duration::from_secs(3600));
        assert!(Config::from_cli(parse(&["--ice-servers", "http://x"])).is_err());
        assert!(Config::from_cli(parse(&[])).unwrap().ice.is_empty());
    }

    #[test]
    fn bframes_policy_follows_ffmpeg() {
        // An explicit binary (any executable stands in for ffmpeg here).
        let c = Config::from_cli(parse(&["--ffmpeg", "/bin/sh", "--max-transcodes", "2"])).unwrap();
        match &c.bframes {
            Policy::Transcode(s) => {
                assert_eq!(
                    (s.ffmpeg.as_path(), s.max),
                    (std::path::Path::new("/bin/sh"), 2)
                );
            }
            Policy::Drop => panic!("transcode is the default when ffmpeg exists"),
        }
        assert!(c.bframes_note.is_none());
        // None there: drop, with a note to log.
        let c = Config::from_cli(parse(&["--ffmpeg", "/nonexistent/ffmpeg"])).unwrap();
        assert_eq!(c.bframes, Policy::Drop);
        assert!(c.bframes_note.unwrap().contains("/nonexistent/ffmpeg"));
        // Asked for without one: refused at start.
        let e = Config::from_cli(parse(&[
            "--bframes",
            "transcode",
            "--ffmpeg",
            "/nonexistent/ffmpeg",
        ]))
        .unwrap_err();
        assert!(e.to_string().contains("--bframes transcode"), "{e}");
        let c = Config::from_cli(parse(&["--bframes", "drop", "--ffmpeg", "/bin/sh"])).unwrap();
        assert_eq!((c.bframes, c.bframes_note), (Policy::Drop, None));
        assert!(Cli::try_parse_from(["cascade", "--bframes", "keep"]).is_err());
    }

    #[test]
    fn bframes_from_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "bframes = \"drop\"\nffmpeg = \"/bin/sh\"\nmax-transcodes = 8\n",
        )
        .unwrap();
        let c = Config::from_cli(parse(&["--config", path.to_str().unwrap()])).unwrap();
        assert_eq!(c.bframes, Policy::Drop);
        let c = Config::from_cli(parse(&[
            "--config",
            path.to_str().unwrap(),
            "--bframes",
            "transcode",
        ]))
        .unwrap();
        assert!(matches!(&c.bframes, Policy::Transcode(s) if s.max == 8));
    }

    #[test]
    fn tls_files_come_in_pairs_and_rtmps_needs_them() {
        let c = Config::from_cli(parse(&[])).unwrap();
        assert_eq!((c.tls, c.rtmps), (None, None));
        let e = Config::from_cli(parse(&["--tls-cert", "c.pem"])).unwrap_err();
        assert!(e.to_string().contains("--tls-key"), "{e}");
        let e = Config::from_cli(parse(&["--tls-key", "k.pem"])).unwrap_err();
        assert!(e.to_string().contains("--tls-cert"), "{e}");
        let e = Config::from_cli(parse(&["--rtmps", "127.0.0.1:1936"])).unwrap_err();
        assert!(e.to_string().contains("--rtmps needs --tls-cert"), "{e}");
        let c = Config::from_cli(parse(&[
            "--tls-cert",
            "c.pem",
            "--tls-key",
            "k.pem",
            "--rtmps",
            "127.0.0.1:1936",
        ]))
        .unwrap();
        assert_eq!(
            c.tls,
            Some(TlsFiles {
                cert: "c.pem".into(),
                key: "k.pem".into()
            })
        );
        assert_eq!(c.rtmps, Some("127.0.0.1:1936".parse().unwrap()));
        let e = Config::from_cli(parse(&[
            "edge",
            "--cluster-secret",
            "0123456789abcdef0123456789abcdef",
            "--origin",
            "o:4433",
            "--tls-cert",
            "c.pem",
            "--tls-key",
            "k.pem",
            "--rtmps",
            "127.0.0.1:1936",
        ]))
        .unwrap_err();
        assert!(e.to_string().contains("no RTMP ingest"), "{e}");
        // The file's keys.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "tls-cert = \"/etc/c.pem\"\ntls-key = \"/etc/k.pem\"\nrtmps = \"0.0.0.0:1936\"\n",
        )
        .unwrap();
        let c = Config::from_cli(parse(&["--config", path.to_str().unwrap()])).unwrap();
        assert_eq!(c.tls.unwrap().cert, PathBuf::from("/etc/c.pem"));
        assert_eq!(c.rtmps, Some("0.0.0.0:1936".parse().unwrap()));
    }

    #[test]
    fn pulls_from_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        let write = |text: &str| std::fs::write(&path, text).unwrap();
        let load = |extra: &[&str]| {
            let mut args = vec!["--config", path.to_str().unwrap()];
            args.extend_from_slice(extra);
            Config::from_cli(parse(&args))
        };
        write(
            "[[pull]]\nstream = \"cam1\"\nurl = \"rtsp://u:secret@10.0.0.5/h264\"\non_demand = true\ngrace = \"30s\"\n\n[[pull]]\nstream = \"cam2\"\nurl = \"rtsp://10.0.0.6/x\"\ntransport = \"udp\"\n",
        );
        let c = load(&[]).unwrap();
        assert_eq!(c.pulls.len(), 2);
        assert!(c.pulls[0].on_demand);
        assert_eq!(c.pulls[0].grace, Duration::from_secs(30));
        assert_eq!(c.pulls[1].transport, cascade_ingest::rtsp::Transport::Udp);
        assert!(!c.pulls[1].on_demand);
        // Edges and origins do not pull.
        let e = load(&["origin", "--cluster-secret", &"x".repeat(32)]).unwrap_err();
        assert!(e.to_string().contains("RTSP pulls run on"), "{e}");
        // Duplicates, bad names, bad URLs: refused, the password never shown.
        write("[[pull]]\nstream = \"a\"\nurl = \"rtsp://h/x\"\n[[pull]]\nstream = \"a\"\nurl = \"rtsp://h/y\"\n");
        assert!(load(&[]).unwrap_err().to_string().contains("listed twice"));
        write("[[pull]]\nstream = \"a b\"\nurl = \"rtsp://h/x\"\n");
        assert!(load(&[]).is_err());
        write("[[pull]]\nstream = \"a\"\nurl = \"http://u:secret@h/x\"\n");
        let e = format!("{:#}", load(&[]).unwrap_err());
        assert!(e.contains("rtsp://") && !e.contains("secret"), "{e}");
        write("[[pull]]\nstream = \"a\"\nurl = \"rtsp://h/x\"\nbogus = 1\n");
        assert!(load(&[]).is_err(), "unknown keys refused");
        let many: String = (0..257)
            .map(|i| format!("[[pull]]\nstream = \"c{i}\"\nurl = \"rtsp://h/{i}\"\n"))
            .collect();
        write(&many);
        assert!(load(&[]).unwrap_err().to_string().contains("at most 256"));
    }

    #[test]
    fn env_beats_file() {
        // clap resolves flag > env itself; here: env (via a parse with the
        // variable set) must beat the file.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "log = \"debug\"\n").unwrap();
        // Only this test sets CASCADE_LOG; no other test reads `log`.
        std::env::set_var("CASCADE_LOG", "warn");
        let c = Config::from_cli(parse(&["--config", path.to_str().unwrap()]));
        std::env::remove_var("CASCADE_LOG");
        assert_eq!(c.unwrap().log, "warn");
    }
}
