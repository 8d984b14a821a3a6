#!/usr/bin/env python3
"""Plots edge_load.py results (results.jsonl) as SVG line charts, one series per server
configuration (cascade with GSO, cascade without, Janus): server CPU and latency against viewers.

usage: plot.py RESULTS_JSONL OUT_DIR
"""
import json
import os
import sys

W, H, ML, MR, MT, MB = 560, 300, 60, 150, 30, 45
COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]


def series(rows, key):
    out = {}
    for r in rows:
        name = r.get("server", "cascade")
        if name == "cascade":
            name += " (GSO)" if r.get("gso", True) else " (no GSO)"
        val = key(r)
        if val is not None:
            out.setdefault(name, []).append((r["viewers"], val))
    return {k: sorted(v) for k, v in out.items()}


def chart(title, ylabel, data, path):
    xs = [x for pts in data.values() for x, _ in pts] or [1]
    ys = [y for pts in data.values() for _, y in pts] or [1]
    xmax, ymax = max(xs) * 1.05, max(ys) * 1.1 or 1
    sx = lambda x: ML + x / xmax * (W - ML - MR)
    sy = lambda y: H - MB - y / ymax * (H - MT - MB)
    o = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
         'font-family="sans-serif" font-size="11">',
         '<rect width="100%" height="100%" fill="white"/>',
         f'<text x="{ML}" y="18" font-size="13">{title}</text>',
         f'<line x1="{ML}" y1="{H-MB}" x2="{W-MR}" y2="{H-MB}" stroke="black"/>',
         f'<line x1="{ML}" y1="{MT}" x2="{ML}" y2="{H-MB}" stroke="black"/>',
         f'<text x="{(ML+W-MR)/2}" y="{H-8}" text-anchor="middle">viewers</text>',
         f'<text x="14" y="{(MT+H-MB)/2}" transform="rotate(-90 14 {(MT+H-MB)/2})" '
         f'text-anchor="middle">{ylabel}</text>']
    for i in range(5):
        y = ymax * i / 4
        o.append(f'<text x="{ML-4}" y="{sy(y)+4}" text-anchor="end">{y:.0f}</text>')
        o.append(f'<line x1="{ML}" y1="{sy(y)}" x2="{W-MR}" y2="{sy(y)}" stroke="#ddd"/>')
        x = xmax * i / 4
        o.append(f'<text x="{sx(x)}" y="{H-MB+14}" text-anchor="middle">{x:.0f}</text>')
    for n, (name, pts) in enumerate(sorted(data.items())):
        c = COLORS[n % len(COLORS)]
        o.append('<polyline fill="none" stroke="%s" stroke-width="2" points="%s"/>' % (
            c, " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)))
        for x, y in pts:
            o.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{c}"/>')
        o.append(f'<text x="{W-MR+8}" y="{MT+14+16*n}" fill="{c}">{name}</text>')
    o.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(o) + "\n")


def main():
    rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
    out = sys.argv[2]
    os.makedirs(out, exist_ok=True)
    chart("Server CPU (one pinned core), 2.5 Mbit/s stream", "CPU %",
          series(rows, lambda r: r["server_cpu_pct"]), os.path.join(out, "cpu.svg"))
    # Live frames only (the fast-start backlog left out), and only runs that served without
    # loss: a collapsed server's seconds of delay would flatten every other line.
    chart("Publish → viewer live latency p99, runs with loss < 0.5%", "ms",
          series([r for r in rows if (r["loadtest"].get("loss_pct") or 0) < 0.5],
                 lambda r: r["loadtest"].get("latency_live_ms_p99", r["loadtest"]["latency_ms_p99"])),
          os.path.join(out, "latency.svg"))
    chart("Server CPU per viewer (µs per viewer-second)", "µs",
          series(rows, lambda r: r["cpu_us_per_viewer_s"]),
          os.path.join(out, "cpu_per_viewer.svg"))


if __name__ == "__main__":
    main()
