#!/usr/bin/env python3
"""A stand-in IP camera for tests/rtsp.rs: GStreamer's RTSP server (Debian's
gir1.2-gst-rtsp-server-1.0 through python3-gi) serving an ffmpeg-made MP4
(H.264 + a 1 kHz AAC tone) on several mounts:

  /cam     H.264 + AAC
  /g711    H.264 + the tone as G.711 PCMU (8 kHz mono)
  /mjpeg   Motion-JPEG only (a codec cascade does not take)
  /bframes H.264 with B-frames + AAC, from --bframes-media (when given)
  /opus    H.264 + the tone as Opus (RFC 7587)
  /inband  H.264 + AAC with SPS/PPS in-band every second (config-interval=1);
           tests/rtsp.rs strips sprop-parameter-sets from its SDP in a proxy
  /h265    H.265 + AAC, from --h265-media (when given)
  /h265opus H.265 + Opus, from --h265-media (when given)
  /live    with --live: a live camera (videotestsrc, x264 zerolatency, 30 fps,
           no audio) whose every access unit carries loadtest's SEI tag
           (loadtest/src/tag.rs) with the wall clock when the encoded frame
           is handed to the RTP payloader: a WHEP viewer's tag latency is
           then camera send -> viewer arrival on the same clock
  /live-opus the same with a live Opus tone (our depacketizers' path)

With --auth-method basic or digest every mount needs user admin with
--password (GStreamer answers 404, not 401, to an anonymous client when some
mounts are open, so a camera with auth is a server of its own).

Prints "READY <port>" on stdout once it listens. Runs until killed.
"""

import argparse
import struct
import sys
import time

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtsp", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtsp, GstRtspServer  # noqa: E402


TAG_UUID = b"cascade-loadtest"


def escape(rbsp):
    """H.264 emulation prevention (7.4.1): 00 00 0x (x <= 3) -> 00 00 03 0x."""
    out = bytearray()
    zeros = 0
    for b in rbsp:
        if zeros >= 2 and b <= 3:
            out.append(3)
            zeros = 0
        out.append(b)
        zeros = zeros + 1 if b == 0 else 0
    return bytes(out)


def tag_sei(seq, sent_us):
    """loadtest::tag::sei_nal: user_data_unregistered with our UUID, the
    sequence number and the send time (both u64 big-endian)."""
    payload = TAG_UUID + struct.pack(">QQ", seq, sent_us)
    rbsp = bytes([5, len(payload)]) + payload + b"\x80"
    return b"\x06" + escape(rbsp)


def insert_tag(au, seq):
    """The tag in front of the access unit's first slice (an SEI precedes
    the VCL NAL units of its access unit)."""
    sei = b"\x00\x00\x00\x01" + tag_sei(seq, time.time_ns() // 1000)
    i = 0
    while True:
        j = au.find(b"\x00\x00\x01", i)
        if j < 0 or j + 3 >= len(au):
            return au + sei
        if au[j + 3] & 0x1F in (1, 5):
            start = j - 1 if j > 0 and au[j - 1] == 0 else j
            return au[:start] + sei + au[start:]
        i = j + 3


class LiveCamera:
    """One live encoder; the /live media's appsrc gets its tagged access
    units (every client set of the shared media sees the same frames)."""

    def __init__(self):
        self.appsrcs = {}
        self.seq = 0
        self.pipeline = Gst.parse_launch(
            "videotestsrc is-live=true pattern=ball ! "
            "video/x-raw,format=I420,width=640,height=360,framerate=30/1 ! "
            "x264enc tune=zerolatency speed-preset=ultrafast key-int-max=30 bframes=0 "
            "sliced-threads=false threads=1 ! "
            "h264parse config-interval=-1 ! "
            "video/x-h264,stream-format=byte-stream,alignment=au ! "
            "appsink name=sink emit-signals=true sync=false"
        )
        self.pipeline.get_by_name("sink").connect("new-sample", self.on_sample)
        self.pipeline.set_state(Gst.State.PLAYING)
        # Opus for /live-opus through an appsrc too: an audiotestsrc in the
        # media would make it seekable, and PLAY's seek fails on the appsrc.
        self.opus_srcs = {}
        self.audio = Gst.parse_launch(
            "audiotestsrc is-live=true freq=1000 ! audio/x-raw,rate=48000,channels=1 ! "
            "opusenc frame-size=20 ! appsink name=sink emit-signals=true sync=false"
        )
        self.audio.get_by_name("sink").connect("new-sample", self.on_opus)
        self.audio.set_state(Gst.State.PLAYING)

    def on_opus(self, sink):
        sample = sink.emit("pull-sample")
        if sample is not None:
            for src in list(self.opus_srcs.values()):
                if src.get_property("caps") is None:
                    src.set_property("caps", sample.get_caps())
                src.emit("push-buffer", sample.get_buffer().copy())
        return Gst.FlowReturn.OK

    def on_sample(self, sink):
        sample = sink.emit("pull-sample")
        if sample is None or not self.appsrcs:
            return Gst.FlowReturn.OK
        buf = sample.get_buffer()
        ok, info = buf.map(Gst.MapFlags.READ)
        if not ok:
            return Gst.FlowReturn.OK
        au = bytes(info.data)
        buf.unmap(info)
        self.seq += 1
        out = Gst.Buffer.new_wrapped(insert_tag(au, self.seq))
        if buf.has_flags(Gst.BufferFlags.DELTA_UNIT):
            out.set_flags(Gst.BufferFlags.DELTA_UNIT)
        for src in list(self.appsrcs.values()):
            src.emit("push-buffer", out.copy())
        return Gst.FlowReturn.OK

    def configure(self, factory, media):
        # One media per mount (shared): the latest one's appsrc.
        element = media.get_element()
        self.appsrcs[id(factory)] = element.get_by_name("src")
        opus = element.get_by_name("opussrc")
        if opus is not None:
            self.opus_srcs[id(factory)] = opus


def factory(launch, roles):
    f = GstRtspServer.RTSPMediaFactory()
    f.set_launch("( " + launch + " )")
    f.set_shared(True)
    # A camera is a live source: restart the file for each new client set.
    f.set_eos_shutdown(False)
    for role in roles if roles != ["anonymous"] else []:
        f.add_role_from_structure(
            Gst.Structure.from_string(
                role + ", media.factory.access=(boolean)true, media.factory.construct=(boolean)true"
            )[0]
        )
    return f


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--media", required=True, help="MP4 with H.264 + AAC")
    ap.add_argument("--bframes-media", help="MP4 with H.264 (B-frames) + AAC")
    ap.add_argument("--h265-media", help="MP4 with H.265 + AAC")
    ap.add_argument("--live", action="store_true", help="serve /live (latency)")
    ap.add_argument("--password", default="s3cret")
    ap.add_argument("--auth-method", choices=["none", "basic", "digest"], default="none")
    args = ap.parse_args()

    Gst.init(None)
    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(str(args.port))

    roles = ["anonymous"]
    if args.auth_method != "none":
        auth = GstRtspServer.RTSPAuth()
        user = GstRtspServer.RTSPToken()
        user.set_string("media.factory.role", "user")
        if args.auth_method == "basic":
            auth.add_basic(GstRtspServer.RTSPAuth.make_basic("admin", args.password), user)
            auth.set_supported_methods(GstRtsp.RTSPAuthMethod.BASIC)
        else:
            auth.add_digest("admin", args.password, user)
            auth.set_supported_methods(GstRtsp.RTSPAuthMethod.DIGEST)
        server.set_auth(auth)
        roles = ["user"]

    src = 'filesrc location="%s" ! qtdemux name=d ' % args.media
    video = "d.video_0 ! queue ! h264parse ! rtph264pay name=pay0 pt=96 config-interval=-1 "
    aac = "d.audio_0 ! queue ! aacparse ! rtpmp4gpay name=pay1 pt=97 "
    pcmu = (
        "d.audio_0 ! queue ! aacparse ! avdec_aac ! audioconvert ! audioresample ! "
        "audio/x-raw,rate=8000,channels=1 ! mulawenc ! rtppcmupay name=pay1 pt=0 "
    )
    opus = (
        "d.audio_0 ! queue ! aacparse ! avdec_aac ! audioconvert ! audioresample ! "
        "opusenc frame-size=20 ! rtpopuspay name=pay1 pt=111 "
    )
    inband = "d.video_0 ! queue ! h264parse ! rtph264pay name=pay0 pt=96 config-interval=1 "
    mjpeg = (
        "videotestsrc is-live=true ! video/x-raw,format=I420,width=320,height=240,framerate=10/1 ! "
        "jpegenc ! rtpjpegpay name=pay0 pt=26"
    )
    mounts = server.get_mount_points()
    mounts.add_factory("/cam", factory(src + video + aac, roles))
    mounts.add_factory("/g711", factory(src + video + pcmu, roles))
    mounts.add_factory("/mjpeg", factory(mjpeg, roles))
    mounts.add_factory("/opus", factory(src + video + opus, roles))
    mounts.add_factory("/inband", factory(src + inband + aac, roles))
    if args.h265_media:
        hsrc = 'filesrc location="%s" ! qtdemux name=d ' % args.h265_media
        h265 = "d.video_0 ! queue ! h265parse ! rtph265pay name=pay0 pt=96 config-interval=-1 "
        mounts.add_factory("/h265", factory(hsrc + h265 + aac, roles))
        mounts.add_factory("/h265opus", factory(hsrc + h265 + opus, roles))
    if args.live:
        camera = LiveCamera()
        appsrc = (
            "appsrc name=src is-live=true do-timestamp=true format=time "
            "caps=video/x-h264,stream-format=byte-stream,alignment=au ! "
            "h264parse ! rtph264pay name=pay0 pt=96 config-interval=-1 "
        )
        live_opus = (
            "appsrc name=opussrc is-live=true do-timestamp=true format=time ! "
            "opusparse ! rtpopuspay name=pay1 pt=111"
        )
        for mount, launch in [("/live", appsrc), ("/live-opus", appsrc + live_opus)]:
            f = factory(launch, roles)
            f.connect("media-configure", camera.configure)
            mounts.add_factory(mount, f)
    if args.bframes_media:
        bsrc = 'filesrc location="%s" ! qtdemux name=d ' % args.bframes_media
        mounts.add_factory("/bframes", factory(bsrc + video + aac, roles))

    if server.attach(None) == 0:
        print("cannot listen", file=sys.stderr)
        sys.exit(1)
    print("READY %d" % server.get_bound_port(), flush=True)
    GLib.MainLoop().run()


if __name__ == "__main__":
    main()
