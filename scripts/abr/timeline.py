#!/usr/bin/env python3
"""Per-viewer timeline of a browser ABR run's edge log (scripts/abr/settle.sh).

    scripts/abr/timeline.py LOG [v0 v1 ...]

Viewers are named v0, v1, ... in the order their WHEP sessions started (not
the test's case order: the Chromiums start concurrently). Times are seconds
from the viewer's first video frame. Lines:

    E  str0m's current estimate, Mbit/s (printed on a change of 3% or more)
       and its round trip (ms)
    S  str0m's smoothed estimate event, Mbit/s (a change of 5% or more)
    B  what the controller told str0m: minimum/desired bit/s
    D  an automatic decision: target, cause, estimate, the ladder's costs
    L  a receiver report with loss: fraction, video sent bit/s, NACKs
    R  an estimator restart
    G  a lag skip (the send queue fell behind)
"""
import datetime
import re
import sys

ANSI = re.compile(r"\x1b\[[0-9;]*m")
FIELD = re.compile(r'(\w+)=("[^"]*"|\[[^\]]*\]|Some\([^)]*\)|\S+)')


def stamp(s):
    return datetime.datetime.strptime(s[:26], "%Y-%m-%dT%H:%M:%S.%f").timestamp()


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    order, started, first, events = [], {}, {}, {}
    for raw in open(sys.argv[1], errors="replace"):
        line = ANSI.sub("", raw.rstrip())
        m = re.match(r"(\S+Z)\s+(\w+)\s+(.*)", line)
        if not m:
            continue
        t, rest = stamp(m.group(1)), m.group(3)
        hexid = re.search(r"session=([0-9a-f]{32})", rest)
        if "viewer started" in rest and hexid:
            sid = int(hexid.group(1), 16)
            order.append(sid)
            started[sid] = t
            events[sid] = []
            continue
        if "first video frame written" in rest and hexid:
            first[int(hexid.group(1), 16)] = t
            continue
        s = re.search(r"SessionId\((\d+)\)", rest)
        if not s or int(s.group(1)) not in events:
            continue
        ev = events[int(s.group(1))]
        f = dict(FIELD.findall(rest))
        if "smoothed estimate" in rest:
            ev.append((t, "S", int(f["estimate_bps"])))
        elif "bandwidth estimate" in rest:
            ev.append((t, "E", (int(f["estimate_bps"]), f.get("rtt", "?"))))
        elif "abr decision" in rest:
            ev.append((t, "D", f"{f.get('to')} {f.get('cause')} est={f.get('estimate_bps')} ladder={f.get('ladder')}"))
        elif "bwe bitrate" in rest:
            ev.append((t, "B", f"{f.get('minimum')}/{f.get('desired')}"))
        elif "receiver report" in rest and float(f.get("loss", 0)) > 0:
            ev.append((t, "L", f"loss={float(f['loss']):.2f} sent={f.get('sent_bps')} nacks={f.get('nacks')}"))
        elif "bwe restarted" in rest:
            ev.append((t, "R", f.get("bps")))
        elif "lagging" in rest:
            ev.append((t, "G", "lag skip"))
    names = [f"v{i}" for i in range(len(order))]
    want = sys.argv[2:] or names
    for name, sid in zip(names, order):
        if name not in want:
            continue
        t0 = first.get(sid, started[sid])
        print(f"=== {name} (first frame {t0 - started[sid]:.2f} s after its session started)")
        last = {"E": None, "S": None}
        for t, kind, v in events[sid]:
            if kind in ("E", "S"):
                bps = v[0] if kind == "E" else v
                step = 0.03 if kind == "E" else 0.05
                if last[kind] is not None and abs(bps - last[kind]) < step * last[kind]:
                    continue
                last[kind] = bps
                v = f"{bps / 1e6:.2f}" + (f" rtt={v[1]}" if kind == "E" else "")
            print(f"{t - t0:7.2f} {kind} {v}")


if __name__ == "__main__":
    main()
