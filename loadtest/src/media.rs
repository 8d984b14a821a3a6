//! Test media made by Debian's ffmpeg at test time: H.264 (no B-frames) + Opus, as frames.
//!
//! Files are cached in the temp dir keyed by their parameters, so repeated tests encode once.
//! Writes go to a unique temp name then `rename`, so concurrent test processes never read a
//! half-written file.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use bytes::Bytes;

use crate::{annexb, ogg, Error, Result};

/// H.264 profile of the generated video.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Profile {
    /// Constrained baseline (what browsers always support), `42e01f`.
    #[default]
    ConstrainedBaseline,
    /// Main, `4d001f`.
    Main,
    /// High, `64001f`.
    High,
}

impl Profile {
    fn ffmpeg_name(self) -> &'static str {
        match self {
            Self::ConstrainedBaseline => "baseline",
            Self::Main => "main",
            Self::High => "high",
        }
    }

    /// The SDP `profile-level-id` for this profile at level 3.1 (the level we encode at).
    pub fn profile_level_id(self) -> u32 {
        match self {
            Self::ConstrainedBaseline => 0x42e01f,
            Self::Main => 0x4d001f,
            Self::High => 0x64001f,
        }
    }
}

/// What to generate.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Options {
    /// H.264 profile.
    pub profile: Profile,
    /// Picture width.
    pub width: u32,
    /// Picture height.
    pub height: u32,
    /// Frames per second.
    pub fps: u32,
    /// Keyframe interval in frames (GOP length).
    pub gop_frames: u32,
    /// Length of the clip (the publisher loops it).
    pub seconds: u32,
    /// Video bitrate in kbit/s.
    pub video_kbps: u32,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            profile: Profile::ConstrainedBaseline,
            width: 640,
            height: 360,
            fps: 30,
            gop_frames: 30,
            seconds: 4,
            video_kbps: 1000,
        }
    }
}

/// One H.264 access unit.
#[derive(Debug, Clone)]
pub struct VideoFrame {
    /// Annex-B bytes (SPS/PPS in front of every IDR, as x264 writes with a repeated header).
    pub annexb: Bytes,
    /// Contains an IDR slice.
    pub keyframe: bool,
    /// Presentation time, 90 kHz, from 0.
    pub pts_90k: u64,
}

/// One Opus packet.
#[derive(Debug, Clone)]
pub struct AudioFrame {
    /// The Opus packet.
    pub packet: Bytes,
    /// Presentation time, 48 kHz, from 0.
    pub pts_48k: u64,
}

/// A generated clip, ready to send in a loop.
#[derive(Debug, Clone)]
pub struct TestMedia {
    /// What it was made from.
    pub options: Options,
    /// Video access units in decode (= presentation) order.
    pub video: Vec<VideoFrame>,
    /// Opus packets in order.
    pub audio: Vec<AudioFrame>,
    /// Length of the clip on the video clock (the loop period).
    pub duration_90k: u64,
    /// Length of the clip on the audio clock.
    pub duration_48k: u64,
}

/// Upper bound for one ffmpeg run: encoding a few seconds of 360p takes well under this.
const FFMPEG_TIMEOUT: Duration = Duration::from_secs(120);

impl TestMedia {
    /// Generate (or load from the cache) the clip described by `options`.
    pub async fn generate(options: Options) -> Result<Self> {
        if options.fps == 0 || options.gop_frames == 0 || options.seconds == 0 {
            return Err(Error::Media("fps, gop and seconds must be positive".into()));
        }
        let dir = cache_dir(&options);
        tokio::fs::create_dir_all(&dir).await?;
        let video_path = dir.join("video.h264");
        let audio_path = dir.join("audio.ogg");
        if !video_path.exists() {
            let o = &options;
            let args = vec![
                "-f".into(),
                "lavfi".into(),
                "-i".into(),
                format!("testsrc2=size={}x{}:rate={}", o.width, o.height, o.fps),
                "-t".into(),
                o.seconds.to_string(),
                "-c:v".into(),
                "libx264".into(),
                "-profile:v".into(),
                o.profile.ffmpeg_name().into(),
                "-level".into(),
                "3.1".into(),
                "-pix_fmt".into(),
                "yuv420p".into(),
                "-preset".into(),
                "veryfast".into(),
                "-tune".into(),
                "zerolatency".into(),
                "-bf".into(),
                "0".into(),
                "-g".into(),
                o.gop_frames.to_string(),
                "-keyint_min".into(),
                o.gop_frames.to_string(),
                "-sc_threshold".into(),
                "0".into(),
                "-b:v".into(),
                format!("{}k", o.video_kbps),
                // AUDs make access-unit splitting trivial; repeat-headers puts SPS/PPS before
                // every IDR so any keyframe is a decodable start.
                "-x264-params".into(),
                "aud=1:repeat-headers=1".into(),
                "-f".into(),
                "h264".into(),
            ];
            run_ffmpeg(args, &video_path).await?;
        }
        if !audio_path.exists() {
            let args = vec![
                "-f".into(),
                "lavfi".into(),
                "-i".into(),
                "sine=frequency=1000:sample_rate=48000".into(),
                "-t".into(),
                options.seconds.to_string(),
                "-ac".into(),
                "2".into(),
                "-c:a".into(),
                "libopus".into(),
                "-b:a".into(),
                "64k".into(),
                "-frame_duration".into(),
                "20".into(),
                "-f".into(),
                "ogg".into(),
            ];
            run_ffmpeg(args, &audio_path).await?;
        }
        let video = tokio::fs::read(&video_path).await?;
        let audio = tokio::fs::read(&audio_path).await?;
        Self::from_streams(options, &video, &audio)
    }

    /// Build frames from an Annex-B H.264 stream and an Ogg Opus file.
    pub fn from_streams(options: Options, h264: &[u8], ogg_opus: &[u8]) -> Result<Self> {
        let fps = u64::from(options.fps.max(1));
        let video: Vec<VideoFrame> = annexb::access_units(h264)
            .into_iter()
            .filter_map(|r| h264.get(r))
            .filter(|au| annexb::au_info(au).vcl)
            .enumerate()
            .map(|(i, au)| VideoFrame {
                annexb: Bytes::copy_from_slice(au),
                keyframe: annexb::au_info(au).idr,
                pts_90k: i as u64 * 90_000 / fps,
            })
            .collect();
        if !video.first().is_some_and(|f| f.keyframe) {
            return Err(Error::Media("video does not start with a keyframe".into()));
        }
        let mut audio = Vec::new();
        let mut pts = 0u64;
        for p in ogg::packets(ogg_opus) {
            if ogg::is_opus_header(&p) {
                continue;
            }
            let Some(samples) = ogg::opus_samples(&p) else {
                continue;
            };
            audio.push(AudioFrame {
                packet: Bytes::from(p),
                pts_48k: pts,
            });
            pts += u64::from(samples);
        }
        if audio.is_empty() {
            return Err(Error::Media("no opus packets".into()));
        }
        let duration_90k = video.len() as u64 * 90_000 / fps;
        Ok(Self {
            options,
            video,
            audio,
            duration_90k,
            duration_48k: pts,
        })
    }
}

fn cache_dir(o: &Options) -> PathBuf {
    std::env::temp_dir().join("loadtest-media").join(format!(
        "v1-{}-{}x{}-{}fps-gop{}-{}s-{}k",
        o.profile.ffmpeg_name(),
        o.width,
        o.height,
        o.fps,
        o.gop_frames,
        o.seconds,
        o.video_kbps
    ))
}

/// Run ffmpeg with `args` (inputs and output options), writing to `out` atomically.
async fn run_ffmpeg(args: Vec<String>, out: &Path) -> Result<()> {
    let tmp = out.with_extension(format!(
        "tmp{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    let mut cmd = tokio::process::Command::new("ffmpeg");
    cmd.args(["-hide_banner", "-loglevel", "error", "-nostdin", "-y"])
        .args(&args)
        .arg(&tmp)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = cmd
        .spawn()
        .map_err(|e| Error::Ffmpeg(format!("cannot run ffmpeg (apt-get install ffmpeg): {e}")))?;
    let output = tokio::time::timeout(FFMPEG_TIMEOUT, child.wait_with_output())
        .await
        .map_err(|_| Error::Timeout("ffmpeg"))??;
    if !output.status.success() {
        let _ = tokio::fs::remove_file(&tmp).await;
        return Err(Error::Ffmpeg(
            String::from_utf8_lossy(&output.stderr).trim().to_string(),
        ));
    }
    tokio::fs::rename(&tmp, out).await?;
    Ok(())
}
