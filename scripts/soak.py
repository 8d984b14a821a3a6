#!/usr/bin/env python3
"""The one-hour soak run (issue 15; documented in docs/operations.md, not run in CI).

A split cluster on loopback (origin, ingest, two edges), an ffmpeg RTMP publisher, and
VIEWERS WHEP viewers in GROUPS loadtest processes split over the two edges. While it runs:

- churn: every --churn one group (a tenth of the viewers with the default 10 groups) leaves
  (its loadtest run ends and DELETEs its sessions) and rejoins at once (a new run);
- takeover: every --takeover a second ffmpeg publishes the same stream name, then the old
  one is stopped;
- edge restart: every --edge-restart one edge (alternating) gets SIGTERM with a short
  --drain-timeout, its groups are stopped, the edge starts again on the same ports and its
  groups rejoin it;
- every --sample: RSS, open fds, threads and CPU of every cascade process, the gauges of each
  node's /metrics (sessions, viewers, feeds, routed addresses, relay links, relay frame
  rates) and /api/streams, and the loadtest counters (connected, playing, stalls) go to one
  CSV row.

Events are offset from one another (churn on the minute, edge restarts churn/3 after it,
takeovers 2*churn/3 after it, samples half a sample period in) so a sample never lands on the
instant of an event. At the end the groups finish on their own (DELETE), one more sample
shows what is left with no viewers, and a JSON summary is written: per process and lifetime
the value after warm-up vs the end and the max, every group run's outcome (all viewers
playing again?), every edge restart's recovery time and every takeover.

Python 3 standard library only. Build first (release):
  cargo build --release -p cascade -p loadtest --bin cascade --bin loadtest
then e.g. (a 5-minute dry run with compressed intervals):
  scripts/soak.py --duration 300 --churn 15 --takeover 60 --edge-restart 120 --sample 10 \
      --warmup 60 --out /tmp/soak-dry
the hour:
  nohup scripts/soak.py --out docs/bench/soak-$(date -u +%F) --plot > /tmp/soak.log 2>&1 &
and the tables for docs/operations.md (a row every 10 minutes):
  scripts/soak.py --report docs/bench/soak-DATE 10
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

SECRET = "soak-cluster-secret-0123456789abcdef-0123"
TOKEN = "soak-publish-token"
STREAM = "soak"
NODE_FIELDS = [
    "pid", "rss_kb", "fds", "threads", "cpu_pct", "sessions", "viewers", "feeds",
    "routed", "links_in", "links_out", "handshakes", "rtmp_conns", "streams",
    "relay_sent_fps", "relay_recv_fps", "lag_skips", "kf_requests",
]
LT_FIELDS = [
    "lt_connected", "lt_playing", "lt_stalls", "lt_failed", "lt_rss_kb",
    "lt_edge1_connected", "lt_edge2_connected",
]
NODES = ["origin", "ingest", "edge1", "edge2"]


def now():
    return time.monotonic()


def log(t0, msg):
    print(f"[{now() - t0:7.1f}s] {msg}", flush=True)


def http_get(url, timeout=2.0):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        return e.code, ""
    except Exception:  # connection refused, timeout: the node is not up
        return None, ""


def prom_sums(text):
    """Prometheus text → {metric name: sum over labels, "name{labels}": value}."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        try:
            key, val = line.rsplit(" ", 1)
            v = float(val)
        except ValueError:
            continue
        name = key.split("{", 1)[0]
        out[name] = out.get(name, 0.0) + v
        out[key] = v
    return out


def proc_stats(pid):
    """RSS kB, threads, fds, cpu seconds of a live pid (None when it is gone)."""
    try:
        rss = threads = 0
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
                elif line.startswith("Threads:"):
                    threads = int(line.split()[1])
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        tck = os.sysconf("SC_CLK_TCK")
        cpu = (int(fields[11]) + int(fields[12])) / tck
        return rss, threads, fds, cpu
    except (OSError, ValueError, IndexError):
        return None


class Node:
    """One cascade process on fixed loopback ports, restartable on the same ports."""

    def __init__(self, name, role, bin_path, ports, extra, workdir):
        self.name, self.role, self.bin, self.ports = name, role, bin_path, ports
        self.extra, self.workdir = extra, workdir
        self.proc = None
        self.lifetime = 0
        self.started_at = None

    @property
    def http(self):
        return f"http://127.0.0.1:{self.ports['http']}"

    def start(self, t0):
        self.lifetime += 1
        args = [self.bin, self.role,
                "--http", f"127.0.0.1:{self.ports['http']}",
                "--rtmp", f"127.0.0.1:{self.ports['rtmp']}",
                "--udp", f"127.0.0.1:{self.ports['udp']}",
                "--tcp", f"127.0.0.1:{self.ports['tcp']}",
                "--advertise", "127.0.0.1",
                "--publish-token", TOKEN,
                "--cluster-secret", SECRET,
                # Every viewer comes from 127.0.0.1: the per-IP caps would refuse them.
                "--max-sessions-per-ip", "0", "--http-max-per-ip", "0"] + self.extra
        logf = open(os.path.join(self.workdir, f"{self.name}-{self.lifetime}.log"), "w")
        env = dict(os.environ, CASCADE_LOG=os.environ.get("SOAK_CASCADE_LOG", "warn"))
        env.pop("RUST_LOG", None)
        self.proc = subprocess.Popen(args, stdout=logf, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env)
        logf.close()
        deadline = now() + 30
        while now() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited at start: see its log in {self.workdir}")
            if http_get(self.http + "/healthz")[0] == 200:
                self.started_at = now()
                log(t0, f"{self.name} up (pid {self.proc.pid}, lifetime {self.lifetime})")
                return
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} did not answer /healthz in 30 s")

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def terminate(self, within):
        """SIGTERM, wait for the exit; SIGKILL after `within`. Returns (exit code, seconds)."""
        if not self.alive():
            return None, 0.0
        t = now()
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=within)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        return code, now() - t


class Publisher:
    """ffmpeg: testsrc2 640x360 30 fps x264 at --video-kbps + AAC tone, RTMP to the ingest."""

    def __init__(self, rtmp_port, kbps, workdir):
        self.url = f"rtmp://127.0.0.1:{rtmp_port}/live/{STREAM}?token={TOKEN}"
        self.kbps, self.workdir, self.n = kbps, workdir, 0

    def start(self):
        self.n += 1
        k = self.kbps
        args = ["ffmpeg", "-hide_banner", "-loglevel", "error", "-re",
                "-f", "lavfi", "-i", "testsrc2=size=640x360:rate=30",
                "-f", "lavfi", "-i", "sine=frequency=1000:sample_rate=44100",
                "-c:v", "libx264", "-preset", "veryfast", "-tune", "zerolatency",
                "-b:v", f"{k}k", "-maxrate", f"{k}k", "-bufsize", f"{2 * k}k",
                "-g", "60", "-bf", "0", "-pix_fmt", "yuv420p",
                "-c:a", "aac", "-b:a", "64k", "-ac", "2", "-f", "flv", self.url]
        logf = open(os.path.join(self.workdir, f"ffmpeg-{self.n}.log"), "w")
        p = subprocess.Popen(args, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        logf.close()
        return p


class Group:
    """One loadtest process of `viewers` WHEP viewers on one edge; one run per presence."""

    def __init__(self, idx, edge, viewers, bin_path, workdir, full_every):
        self.idx, self.edge, self.viewers = idx, edge, viewers
        self.bin, self.workdir, self.full_every = bin_path, workdir, full_every
        self.proc = None
        self.run = 0
        self.csv = None
        self.out = None
        self.started_at = None
        self.finished = []  # one dict per ended run
        self.stderr = open(os.path.join(workdir, f"group-{idx}.log"), "a")

    def start(self, duration, t0):
        self.run += 1
        self.csv = os.path.join(self.workdir, "csv", f"g{self.idx}-r{self.run}.csv")
        self.out = os.path.join(self.workdir, "csv", f"g{self.idx}-r{self.run}.json")
        url = f"{self.edge.http}/whep/{STREAM}"
        args = [self.bin, "--url", url, "--viewers", str(self.viewers), "--ramp", "10",
                "--full-every", str(self.full_every), "--duration", f"{max(1, int(duration))}s",
                "--delete", "--json", "--csv", self.csv]
        out = open(self.out, "w")
        self.proc = subprocess.Popen(args, stdout=out, stderr=self.stderr, stdin=subprocess.DEVNULL)
        out.close()
        self.started_at = now() - t0

    def last_row(self):
        """The latest per-second row of the current run's CSV (dict), or None."""
        try:
            with open(self.csv, "rb") as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                f.seek(max(0, size - 512))
                lines = f.read().decode().strip().splitlines()
            head = ["t_s", "connected", "failed", "packets_received", "packets_lost",
                    "video_frames", "audio_frames", "playing", "stalls"]
            vals = lines[-1].split(",")
            if len(vals) != len(head) or vals[0] == "t_s":
                return None
            return dict(zip(head, (float(v) for v in vals)))
        except (OSError, TypeError, ValueError, IndexError):
            return None

    def first_all_playing(self):
        """Seconds from this run's start to its first second with every viewer playing."""
        try:
            with open(self.csv) as f:
                for line in f.read().splitlines()[1:]:
                    r = line.split(",")
                    if len(r) == 9 and int(r[7]) >= self.viewers:
                        return float(r[0])
        except (OSError, ValueError):
            pass
        return None

    def poll_end(self, t0, reason="duration"):
        """If the run ended, record its outcome and return it."""
        if self.proc is None or self.proc.poll() is None:
            return None
        code = self.proc.returncode
        summary = None
        try:
            with open(self.out) as f:
                lines = [l for l in f.read().splitlines() if l.strip()]
            summary = json.loads(lines[-1]) if lines else None
        except (OSError, ValueError):
            pass
        row = self.last_row() or {}
        rec = {
            "group": self.idx, "edge": self.edge.name, "run": self.run,
            "start_s": round(self.started_at, 1), "end_s": round(now() - t0, 1),
            "exit": code, "reason": reason,
            "connected": summary and summary.get("viewers_connected"),
            "failed": summary and summary.get("viewers_failed"),
            "playing_at_end": summary and summary.get("viewers_playing_at_end"),
            "stalls": summary.get("stalls") if summary else row.get("stalls"),
            "errors": summary and summary.get("errors"),
            "ttff_ms_p50": summary and summary.get("ttff_ms_p50"),
            "ttff_ms_p95": summary and summary.get("ttff_ms_p95"),
            "max_playing": None,
            "all_playing_after_s": self.first_all_playing(),
        }
        try:
            with open(self.csv) as f:
                rows = [l.split(",") for l in f.read().splitlines()[1:]]
            rec["max_playing"] = max((int(r[7]) for r in rows if len(r) == 9), default=0)
        except (OSError, ValueError):
            pass
        self.finished.append(rec)
        self.proc = None
        return rec

    def kill(self, t0, reason):
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        return self.poll_end(t0, reason)


def next_slot(g, groups, churn, t, end):
    """Group g leaves at churn*(g+1) + k*churn*groups; the first such time after t+churn/2
    (a run shorter than half a churn period would only add noise), capped at end."""
    period = churn * groups
    s = churn * (g + 1)
    while s < t + churn / 2:
        s += period
    return min(s, end)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin-dir", default=os.path.join(
        os.environ.get("CARGO_TARGET_DIR", "target"), "release"))
    ap.add_argument("--duration", type=float, default=3600, help="seconds of load")
    ap.add_argument("--viewers", type=int, default=200)
    ap.add_argument("--groups", type=int, default=10, help="loadtest processes (one churns at a time)")
    ap.add_argument("--churn", type=float, default=60, help="seconds between group rejoins")
    ap.add_argument("--takeover", type=float, default=300, help="seconds between publisher takeovers")
    ap.add_argument("--edge-restart", type=float, default=900, help="seconds between edge restarts")
    ap.add_argument("--drain-timeout", default="3s", help="edges' --drain-timeout")
    ap.add_argument("--sample", type=float, default=30, help="seconds between samples")
    ap.add_argument("--warmup", type=float, default=300, help="seconds before the baseline sample")
    ap.add_argument("--video-kbps", type=int, default=500)
    ap.add_argument("--full-every", type=int, default=10, help="loadtest --full-every")
    ap.add_argument("--base-port", type=int, default=19400)
    ap.add_argument("--out", required=True, help="prefix: OUT.csv, OUT.json (and OUT-*.svg with --plot)")
    ap.add_argument("--workdir", default="/tmp/soak-work", help="logs and per-run CSVs")
    ap.add_argument("--plot", action="store_true", help="also write SVG charts")
    a = ap.parse_args()
    # SIGTERM of the driver still stops every child and writes what was sampled.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))

    cascade = os.path.join(a.bin_dir, "cascade")
    loadtest = os.path.join(a.bin_dir, "loadtest")
    for b in (cascade, loadtest):
        if not os.access(b, os.X_OK):
            sys.exit(f"{b} missing: cargo build --release -p cascade -p loadtest --bin cascade --bin loadtest")
    os.makedirs(os.path.join(a.workdir, "csv"), exist_ok=True)
    t0 = now()
    wall0 = time.time()
    bp = a.base_port
    ports = lambda i: {"http": bp + 10 * i, "rtmp": bp + 10 * i + 1, "udp": bp + 10 * i + 2,
                       "tcp": bp + 10 * i + 3, "quic": bp + 10 * i + 4}
    quic = f"127.0.0.1:{ports(0)['quic']}"
    nodes = {
        "origin": Node("origin", "origin", cascade, ports(0), ["--quic", quic], a.workdir),
        "ingest": Node("ingest", "ingest", cascade, ports(1), ["--origin", quic], a.workdir),
        "edge1": Node("edge1", "edge", cascade, ports(2),
                      ["--origin", quic, "--drain-timeout", a.drain_timeout], a.workdir),
        "edge2": Node("edge2", "edge", cascade, ports(3),
                      ["--origin", quic, "--drain-timeout", a.drain_timeout], a.workdir),
    }
    children = []  # everything to clean up on exit

    def cleanup():
        for g in groups:
            if g.proc and g.proc.poll() is None:
                g.proc.kill()
        for p in pubs + children:
            if p.poll() is None:
                p.kill()
        for n in nodes.values():
            if n.alive():
                n.proc.kill()

    groups, pubs = [], []
    summary = None
    events = []  # (t, kind, detail)
    restarts, takeovers = [], []
    rows = []
    try:
        for n in nodes.values():
            n.start(t0)
        pub = Publisher(nodes["ingest"].ports["rtmp"], a.video_kbps, a.workdir)
        pubs.append(pub.start())
        # Live on the origin through the relay before any viewer asks an edge.
        deadline = now() + 30
        while now() < deadline:
            st, body = http_get(nodes["origin"].http + "/api/streams")
            if st == 200 and f'"{STREAM}"' in body:
                break
            time.sleep(0.5)
        else:
            raise RuntimeError("stream never went live on the origin")
        log(t0, "stream live on the origin")
        time.sleep(2)
        per = a.viewers // a.groups
        edges = [nodes["edge1"], nodes["edge2"]]
        groups = [Group(g, edges[g % 2], per, loadtest, a.workdir, a.full_every)
                  for g in range(a.groups)]
        load0 = now() - t0
        end = load0 + a.duration
        for g in groups:
            g.start(next_slot(g.idx, a.groups, a.churn, 0, a.duration), t0)
        log(t0, f"{a.groups} groups of {per} viewers started; load runs {a.duration:.0f} s")

        prev_cpu = {}
        prev_relay = {}
        prev_t = {}
        next_sample = load0 + a.sample / 2
        next_takeover = load0 + a.takeover + 2 * a.churn / 3
        next_restart = load0 + a.edge_restart + a.churn / 3
        restart_idx = 0
        pending_recovery = None  # (edge, t_down, t_up, groups)

        def sample(tag):
            t = now() - t0
            row = {"t_s": round(t - load0, 1), "event": tag,
                   "loadavg": open("/proc/loadavg").read().split()[0]}
            for name, n in nodes.items():
                st = proc_stats(n.proc.pid) if n.alive() else None
                m = {}
                if st:
                    code, body = http_get(n.http + "/metrics")
                    met = prom_sums(body) if code == 200 else {}
                    code, body = http_get(n.http + "/api/streams")
                    try:
                        streams = len(json.loads(body)) if code == 200 else None
                    except ValueError:
                        streams = None
                    rss, threads, fds, cpu = st
                    key = (name, n.proc.pid)
                    dt = t - prev_t.get(key, t)
                    cpu_pct = (cpu - prev_cpu[key]) / dt * 100 if key in prev_cpu and dt > 0 else None
                    sent = met.get("cascade_origin_relay_frames_sent_total", 0.0)
                    recv = met.get("cascade_origin_relay_frames_received_total", 0.0)
                    ps, pr = prev_relay.get(key, (None, None))
                    m = {
                        "pid": n.proc.pid, "rss_kb": rss, "fds": fds, "threads": threads,
                        "cpu_pct": None if cpu_pct is None else round(cpu_pct, 1),
                        "sessions": met.get("cascade_rtc_sessions"),
                        "viewers": met.get("cascade_edge_viewers"),
                        "feeds": met.get("cascade_edge_feeds"),
                        "routed": met.get("cascade_rtc_routed_addresses"),
                        "links_in": met.get('cascade_origin_relay_links{direction="in"}', 0.0),
                        "links_out": met.get('cascade_origin_relay_links{direction="out"}', 0.0),
                        "handshakes": met.get("cascade_origin_relay_handshakes"),
                        "rtmp_conns": met.get("cascade_ingest_rtmp_connections"),
                        "streams": streams,
                        "relay_sent_fps": None if ps is None or dt <= 0 else round((sent - ps) / dt, 1),
                        "relay_recv_fps": None if pr is None or dt <= 0 else round((recv - pr) / dt, 1),
                        "lag_skips": met.get("cascade_edge_lag_skips_total"),
                        "kf_requests": met.get("cascade_edge_keyframe_requests_total"),
                    }
                    prev_cpu[key], prev_t[key] = cpu, t
                    prev_relay[key] = (sent, recv)
                for f in NODE_FIELDS:
                    v = m.get(f)
                    row[f"{name}_{f}"] = int(v) if isinstance(v, float) and v.is_integer() else v
            conn = {"edge1": 0, "edge2": 0}
            playing = stalls = failed = lt_rss = 0
            for g in groups:
                stalls += sum(r["stalls"] or 0 for r in g.finished)
                failed += sum(r["failed"] or 0 for r in g.finished)
                if g.proc is None:
                    continue
                st = proc_stats(g.proc.pid)
                lt_rss += st[0] if st else 0
                r = g.last_row()
                if r:
                    conn[g.edge.name] += int(r["connected"])
                    playing += int(r["playing"])
                    stalls += int(r["stalls"])
                    failed += int(r["failed"])
            row.update({"lt_connected": conn["edge1"] + conn["edge2"], "lt_playing": playing,
                        "lt_stalls": stalls, "lt_failed": failed, "lt_rss_kb": lt_rss,
                        "lt_edge1_connected": conn["edge1"], "lt_edge2_connected": conn["edge2"]})
            rows.append(row)
            o, e1, e2 = (row[f"{n}_rss_kb"] for n in ("origin", "edge1", "edge2"))
            log(t0, f"sample {tag}: playing {playing}/{row['lt_connected']} "
                f"sessions e1={row['edge1_sessions']} e2={row['edge2_sessions']} "
                f"stalls {stalls} failed {failed} rss origin={o} edge1={e1} edge2={e2} "
                f"ingest={row['ingest_rss_kb']} load {row['loadavg']}")

        while True:
            t = now() - t0
            # Groups whose run ended rejoin at once (or stop when the load is over).
            for g in groups:
                rec = g.poll_end(t0)
                if rec:
                    ok = rec["playing_at_end"] == g.viewers and rec["failed"] == 0
                    log(t0, f"group {g.idx} ({g.edge.name}) left: connected {rec['connected']} "
                        f"playing {rec['playing_at_end']} failed {rec['failed']} stalls {rec['stalls']}"
                        + ("" if ok else f" NOT ALL PLAYING {rec['errors']}"))
                    if t < end - 1 and g.edge.alive():
                        g.start(next_slot(g.idx, a.groups, a.churn, t - load0, a.duration) - (t - load0), t0)
            if t >= end and all(g.proc is None for g in groups):
                break
            if t >= next_sample and t < end:
                sample("")
                next_sample += a.sample
            if t >= next_takeover and t < end - a.churn / 2:
                old = pubs[-1]
                t_start = now()
                pubs.append(pub.start())
                # The new publish takes over once its first keyframe is in; give it time
                # before the old encoder stops.
                time.sleep(3)
                old_alive = old.poll() is None
                if old_alive:
                    old.terminate()
                    try:
                        old.wait(timeout=5)
                    except subprocess.TimeoutExpired:
                        old.kill()
                        old.wait()
                takeovers.append({"t_s": round(t - load0, 1), "old_still_running": old_alive,
                                  "new_alive": pubs[-1].poll() is None,
                                  "switch_s": round(now() - t_start, 1)})
                log(t0, f"takeover #{len(takeovers)}: publisher {pub.n} took over "
                    f"(old one {'stopped by us' if old_alive else 'had already exited'})")
                events.append((t - load0, "takeover"))
                next_takeover += a.takeover
            if pubs and pubs[-1].poll() is not None and t < end:
                log(t0, f"publisher exited ({pubs[-1].returncode}): restarting it")
                events.append((t - load0, "publisher-restart"))
                pubs.append(pub.start())
            if t >= next_restart and t < end - a.churn:
                edge = edges[restart_idx % 2]
                restart_idx += 1
                code, took = edge.terminate(30)
                t_down = now() - t0
                mine = [g for g in groups if g.edge is edge]
                for g in mine:
                    rec = g.kill(t0, "edge-restart")
                log(t0, f"{edge.name} drained and exited {code} in {took:.1f}s; "
                    f"its {len(mine)} groups stopped")
                edge.start(t0)
                # Viewers rejoin once the edge has its relay link (a WHEP before it
                # would find no upstream).
                deadline = now() + 15
                while now() < deadline:
                    st, body = http_get(nodes["origin"].http + "/metrics")
                    if prom_sums(body).get('cascade_origin_relay_links{direction="in"}', 0) >= 3:
                        break
                    time.sleep(0.2)
                t_up = now() - t0
                for g in mine:
                    g.start(next_slot(g.idx, a.groups, a.churn, t_up - load0, a.duration) - (t_up - load0), t0)
                pending_recovery = (edge, t_down, t_up, mine)
                restarts.append({"t_s": round(t - load0, 1), "edge": edge.name,
                                 "exit": code, "drain_s": round(took, 1),
                                 "down_s": round(t_up - t_down, 1), "rejoined_s": None})
                events.append((t - load0, f"restart-{edge.name}"))
                next_restart += a.edge_restart
            if pending_recovery:
                edge, t_down, t_up, mine = pending_recovery
                firsts = [g.first_all_playing() for g in mine]
                if all(f is not None for f in firsts):
                    # From the CSVs, so a takeover blocking this loop does not count.
                    done = max(g.started_at + f for g, f in zip(mine, firsts))
                    restarts[-1]["rejoined_s"] = round(done - t_up, 1)
                    log(t0, f"{edge.name}'s viewers all playing again {restarts[-1]['rejoined_s']}s "
                        "after it came back")
                    pending_recovery = None
                elif now() - t0 - t_up > 60:
                    log(t0, f"{edge.name}'s viewers NOT all playing 60 s after the restart")
                    pending_recovery = None
            time.sleep(0.25)

        # No viewers left: what do the nodes still hold?
        time.sleep(5)
        sample("end+5s no viewers")
        for p in pubs:
            if p.poll() is None:
                p.terminate()
                p.wait(timeout=10)
        time.sleep(10)
        sample("end+15s no publisher")
        summary = summarize(a, rows, groups, restarts, takeovers, nodes, wall0)
    finally:
        exits = {}
        for name, n in nodes.items():
            exits[name] = n.terminate(10)[0] if n.alive() else None
        cleanup()
        if summary is None:
            # Interrupted or failed: keep the samples taken so far.
            summary = {"verdict": {"aborted": True}}
        summary["final_exit_codes"] = exits
        write_outputs(a, rows, summary)
    print(json.dumps(summary["verdict"], indent=1))


def summarize(a, rows, groups, restarts, takeovers, nodes, wall0):
    load_rows = [r for r in rows if not r["event"]]
    per_process = []
    metrics = ["rss_kb", "fds", "threads", "sessions", "feeds", "routed", "links_in", "streams",
               "relay_sent_fps", "relay_recv_fps"]
    for name in NODES:
        # One lifetime per pid: the edges restart.
        pids = []
        for r in load_rows:
            p = r.get(f"{name}_pid")
            if p and p not in pids:
                pids.append(p)
        for life, pid in enumerate(pids, 1):
            rs = [r for r in load_rows if r.get(f"{name}_pid") == pid]
            first_t = rs[0]["t_s"]
            warm = [r for r in rs if r["t_s"] >= first_t + a.warmup] or rs[-1:]
            for m in metrics:
                vals = [(r["t_s"], r.get(f"{name}_{m}")) for r in warm]
                vals = [(t, v) for t, v in vals if v is not None]
                if not vals:
                    continue
                base, last = vals[0][1], vals[-1][1]
                peak = max(v for _, v in vals)
                pct = None if not base else round((last - base) * 100 / base, 1)
                per_process.append({"process": name, "lifetime": life, "pid": pid, "metric": m,
                                    "from_s": vals[0][0], "base": base, "end_s": vals[-1][0],
                                    "end": last, "max": peak, "change_pct": pct})
    runs = [rec for g in groups for rec in g.finished]
    churn_runs = [r for r in runs if r["reason"] == "duration"]
    not_playing = [r for r in churn_runs
                   if r["playing_at_end"] != a.viewers // a.groups or r["failed"]]
    never_played = [r for r in runs if (r["max_playing"] or 0) < a.viewers // a.groups]
    # Sessions vs the viewers loadtest holds, each sample (not at an event instant).
    mismatches = []
    for r in load_rows:
        for e in ("edge1", "edge2"):
            s, c = r.get(f"{e}_sessions"), r.get(f"lt_{e}_connected")
            if s is not None and s != c:
                mismatches.append({"t_s": r["t_s"], "edge": e, "sessions": s, "loadtest": c})
    flat = [p for p in per_process
            if p["metric"] in ("rss_kb", "fds", "threads", "sessions", "routed", "links_in")
            and p["change_pct"] is not None and abs(p["change_pct"]) > 10]
    end_rows = [r for r in rows if r["event"]]
    verdict = {
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(wall0)),
        "load_s": a.duration, "viewers": a.viewers, "groups": a.groups,
        "group_runs": len(runs), "churn_rejoins": len(churn_runs),
        "runs_not_all_playing_at_end": len(not_playing),
        "runs_never_all_playing": len(never_played),
        "stalls_total": sum(r["stalls"] or 0 for r in runs),
        "rejoin_all_playing_s_p50": quantile([r["all_playing_after_s"] for r in churn_runs], 50),
        "rejoin_all_playing_s_max": quantile([r["all_playing_after_s"] for r in churn_runs], 100),
        "viewers_failed_total": sum(r["failed"] or 0 for r in runs if r["failed"] is not None),
        "edge_restarts": restarts, "takeovers": len(takeovers),
        "session_mismatch_samples": len(mismatches),
        "over_10pct_after_warmup": flat,
        "after_end": end_rows,
    }
    return {"verdict": verdict, "per_process": per_process, "runs": runs,
            "takeovers": takeovers, "session_mismatches": mismatches}


def quantile(xs, p):
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def write_outputs(a, rows, summary):
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    cols = ["t_s", "event", "loadavg"] + [f"{n}_{f}" for n in NODES for f in NODE_FIELDS] + LT_FIELDS
    with open(a.out + ".csv", "w") as f:
        f.write(",".join(cols) + "\n")
        for r in rows:
            f.write(",".join("" if r.get(c) is None else str(r.get(c)) for c in cols) + "\n")
    with open(a.out + ".json", "w") as f:
        json.dump(summary, f, indent=1)
    if a.plot:
        plot(a, [r for r in rows if not r["event"]])


def plot(a, rows):
    """Small SVG line charts against minutes: RSS, fds, sessions/links."""
    charts = [
        ("RSS (MiB)", "rss", [(n, lambda r, n=n: (r.get(f"{n}_rss_kb") or 0) / 1024) for n in NODES]),
        ("open fds", "fds", [(n, lambda r, n=n: r.get(f"{n}_fds")) for n in NODES]),
        ("sessions / viewers playing", "sessions",
         [("edge1 sessions", lambda r: r.get("edge1_sessions")),
          ("edge2 sessions", lambda r: r.get("edge2_sessions")),
          ("viewers playing", lambda r: r.get("lt_playing")),
          ("origin relay links in x10", lambda r: (r.get("origin_links_in") or 0) * 10)]),
    ]
    W, H, ML, MR, MT, MB = 620, 300, 60, 190, 30, 45
    colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]
    for title, tag, series in charts:
        data = []
        for name, f in series:
            pts = [(r["t_s"] / 60, f(r)) for r in rows]
            data.append((name, [(x, y) for x, y in pts if y is not None]))
        xmax = max((x for _, p in data for x, _ in p), default=1) or 1
        ymax = (max((y for _, p in data for _, y in p), default=1) or 1) * 1.1
        sx = lambda x: ML + x / xmax * (W - ML - MR)
        sy = lambda y: H - MB - y / ymax * (H - MT - MB)
        o = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
             'font-family="sans-serif" font-size="11">',
             '<rect width="100%" height="100%" fill="white"/>',
             f'<text x="{ML}" y="18" font-size="13">soak: {title}</text>',
             f'<line x1="{ML}" y1="{H-MB}" x2="{W-MR}" y2="{H-MB}" stroke="black"/>',
             f'<line x1="{ML}" y1="{MT}" x2="{ML}" y2="{H-MB}" stroke="black"/>',
             f'<text x="{(ML+W-MR)/2}" y="{H-8}" text-anchor="middle">minutes</text>']
        for i in range(5):
            y, x = ymax * i / 4, xmax * i / 4
            o.append(f'<text x="{ML-4}" y="{sy(y)+4}" text-anchor="end">{y:.0f}</text>')
            o.append(f'<line x1="{ML}" y1="{sy(y)}" x2="{W-MR}" y2="{sy(y)}" stroke="#ddd"/>')
            o.append(f'<text x="{sx(x)}" y="{H-MB+14}" text-anchor="middle">{x:.0f}</text>')
        for n, (name, pts) in enumerate(data):
            c = colors[n % len(colors)]
            o.append('<polyline fill="none" stroke="%s" stroke-width="1.5" points="%s"/>' % (
                c, " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)))
            o.append(f'<text x="{W-MR+8}" y="{MT+14+16*n}" fill="{c}">{name}</text>')
        o.append("</svg>")
        with open(f"{a.out}-{tag}.svg", "w") as f:
            f.write("\n".join(o) + "\n")


def report(prefix, every):
    """Markdown tables from a finished run's OUT.csv and OUT.json (for docs/operations.md)."""
    import csv
    with open(prefix + ".csv") as f:
        rows = list(csv.DictReader(f))
    with open(prefix + ".json") as f:
        summary = json.load(f)
    num = lambda v: None if v in ("", None) else float(v)
    load = [r for r in rows if not r["event"]]
    picks, mark = [], 0.0
    for r in load:
        if num(r["t_s"]) >= mark:
            picks.append(r)
            mark += every
    if load and picks[-1] is not load[-1]:
        picks.append(load[-1])
    picks += [r for r in rows if r["event"]]
    mib = lambda v: "" if num(v) is None else f"{num(v) / 1024:.1f}"
    val = lambda v: "" if num(v) is None else f"{num(v):g}"
    print("| t (min) | RSS MiB origin / ingest / edge1 / edge2 | fds o / i / e1 / e2 "
          "| threads o / i / e1 / e2 | sessions e1 / e2 | origin links in "
          "| origin relay frames/s out | viewers playing | stalls (cum.) | load avg |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in picks:
        t = r["event"] or f"{num(r['t_s']) / 60:.1f}"
        print(f"| {t} | " + " / ".join(mib(r[f"{n}_rss_kb"]) for n in NODES)
              + " | " + " / ".join(val(r[f"{n}_fds"]) for n in NODES)
              + " | " + " / ".join(val(r[f"{n}_threads"]) for n in NODES)
              + f" | {val(r['edge1_sessions'])} / {val(r['edge2_sessions'])}"
              + f" | {val(r['origin_links_in'])} | {val(r['origin_relay_sent_fps'])}"
              + f" | {val(r['lt_playing'])} | {val(r['lt_stalls'])} | {r['loadavg']} |")
    print()
    print("| process (lifetime) | metric | after warm-up (t s) | end (t s) | max | change |")
    print("|---|---|---|---|---|---|")
    for p in summary.get("per_process", []):
        if p["metric"] not in ("rss_kb", "fds", "threads", "sessions", "routed", "links_in"):
            continue
        ch = "" if p["change_pct"] is None else f"{p['change_pct']:+.1f} %"
        print(f"| {p['process']} ({p['lifetime']}) | {p['metric']} | {p['base']:g} ({p['from_s']:g}) "
              f"| {p['end']:g} ({p['end_s']:g}) | {p['max']:g} | {ch} |")
    v = dict(summary.get("verdict", {}))
    v.pop("over_10pct_after_warmup", None)
    v.pop("after_end", None)
    print()
    print(json.dumps(v, indent=1))


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "--report":
        # scripts/soak.py --report OUT [MINUTES]: tables for the docs from a finished run.
        report(sys.argv[2], 60 * float(sys.argv[3]) if len(sys.argv) > 3 else 600)
    else:
        main()
