#!/usr/bin/env python3
"""A stand-in IP camera for tests/rtsp.rs: GStreamer's RTSP server (Debian's
gir1.2-gst-rtsp-server-1.0 through python3-gi) serving an ffmpeg-made MP4
(H.264 + a 1 kHz AAC tone) on several mounts:

  /cam     H.264 + AAC
  /g711    H.264 + the tone as G.711 PCMU (8 kHz mono)
  /mjpeg   Motion-JPEG only (a codec cascade does not take)
  /bframes H.264 with B-frames + AAC, from --bframes-media (when given)

With --auth-method basic or digest every mount needs user admin with
--password (GStreamer answers 404, not 401, to an anonymous client when some
mounts are open, so a camera with auth is a server of its own).

Prints "READY <port>" on stdout once it listens. Runs until killed.
"""

import argparse
import sys

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtsp", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtsp, GstRtspServer  # noqa: E402


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
    mjpeg = (
        "videotestsrc is-live=true ! video/x-raw,format=I420,width=320,height=240,framerate=10/1 ! "
        "jpegenc ! rtpjpegpay name=pay0 pt=26"
    )
    mounts = server.get_mount_points()
    mounts.add_factory("/cam", factory(src + video + aac, roles))
    mounts.add_factory("/g711", factory(src + video + pcmu, roles))
    mounts.add_factory("/mjpeg", factory(mjpeg, roles))
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
