#!/usr/bin/env python3
"""Edge load benchmark: release `cascade all` pinned to one core, `loadtest` (publisher at
2.5 Mbit/s + viewers on a ramp) pinned to the other; samples the server's CPU (utime+stime
from /proc/PID/stat) and VmRSS each second, reads its /metrics at the end and writes one JSON
line per run (and CSV/SVG series) to OUT_DIR. Every run is bounded in viewers and time.

usage: edge_load.py OUT_DIR VIEWERS [VIEWERS...] [--duration 25] [--ramp 300] [--no-gso]
                    [--server-cpu 0] [--client-cpu 1] [--kbps 2500] [--full-every N] [--perf SECONDS]
                    [--janus] [--addr 198.18.0.1] [--veth] [--no-tag]

--janus runs Janus (Debian package, streaming plugin, scripts/bench/janus/*.jcfg) instead of
cascade, fed by loadtest's tagged RTP feed, watched by the same viewers. libnice never gathers
loopback addresses, so side-by-side runs go inside a network namespace with a veth address:
  ip netns add jb; ip netns exec jb ip link set lo up
  ip netns exec jb ip link add v0 type veth peer name v1
  ip netns exec jb ip addr add 198.18.0.1/24 dev v0; ip netns exec jb ip link set v0 up
  ip netns exec jb ip link set v1 up
  ip netns exec jb python3 scripts/bench/edge_load.py OUT 500 --addr 198.18.0.1 [--janus]

--veth (as root, from the root namespace) puts the server and the load generator in two
namespaces joined by a veth pair (198.18.0.1 | 198.18.0.2) whose receive sides run in threaded
NAPI, each pinned to its own side's core: the kernel's delivery to the viewers then runs on the
client core, as it would on the viewers' hosts, instead of inside the server's sendmsg as on
loopback. The server NAPI thread (delivery of the viewers' RTCP to the server) counts as server
CPU.
"""
import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CASCADE = os.environ.get("CASCADE_BIN", os.path.join(ROOT, "target/release/cascade"))
LOADTEST = os.environ.get("LOADTEST_BIN", os.path.join(ROOT, "target/release/loadtest"))
HTTP, UDP_PORT = "127.0.0.1:18080", 18189
SERVER_IP, CLIENT_IP = "198.18.0.1", "198.18.0.2"
TOKEN = "bench-token"
TICK = os.sysconf("SC_CLK_TCK")
# The box is shared (other builds and tests): a bounded run gets priority so CPU starvation
# does not show up as server latency.
NICE = ["nice", "-n", "-10"]


def cpu_seconds(pid):
    """utime + stime of a process, seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def kthread(matches):
    """The pid of the first process whose name (`/proc/PID/comm`) satisfies `matches`."""
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/comm") as f:
                    if matches(f.read().strip()):
                        return int(pid)
            except OSError:
                pass
    return None


def ksoftirqd(cpu):
    """The pid of ksoftirqd/CPU: loopback delivery it takes over is server work too."""
    return kthread(lambda name: name == f"ksoftirqd/{cpu}")


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


QUANTILES = (0.5, 0.9, 0.95, 0.99, 0.999)


def metrics(args):
    """Sums per metric name, and the cumulative buckets of the first-frame and egress-delay
    histograms as {name: [(le, count), ...]}."""
    out = subprocess.run(netns(args, "srv") + ["curl", "-s", f"http://{http(args)}/metrics"], capture_output=True,
                         text=True, timeout=10).stdout
    vals, buckets = {}, {}
    for line in out.splitlines():
        b = re.match(r'cascade_edge_(first_frame|egress_delay)_seconds_bucket\{le="([^"]+)"\} (\S+)',
                     line)
        if b:
            buckets.setdefault(b.group(1), []).append((float(b.group(2)), float(b.group(3))))
        if line.startswith("#") or not line.strip():
            continue
        name, _, value = line.rpartition(" ")
        base = re.sub(r"\{.*\}", "", name)
        try:
            vals[base] = vals.get(base, 0.0) + float(value)
        except ValueError:
            pass
    return vals, buckets


def bucket_quantiles(end, start=None):
    """Quantiles of the samples between two scrapes (or since the start), interpolated
    linearly inside a bucket as Prometheus' histogram_quantile does."""
    res = {}
    for name, cum in (end or {}).items():
        before = dict((start or {}).get(name, []))
        cum = sorted((le, n - before.get(le, 0.0)) for le, n in cum)
        total = cum[-1][1] if cum else 0
        res[f"{name}_count"] = total
        if not total:
            continue
        for q in QUANTILES:
            rank, prev_le, prev_n = q * total, 0.0, 0.0
            for le, n in cum:
                if n >= rank:
                    if le == float("inf"):
                        res[f"{name}_{q}"] = prev_le  # beyond the last bound: its lower edge
                    else:
                        res[f"{name}_{q}"] = prev_le + (le - prev_le) * (rank - prev_n) / max(n - prev_n, 1e-9)
                    break
                prev_le, prev_n = le, n
    return res


def server_socket_drops(pid, port):
    """The `drops` column of /proc/net/udp (the server's namespace) for its media socket."""
    hexport = f"{port:04X}"
    total = 0
    for path in (f"/proc/{pid}/net/udp", f"/proc/{pid}/net/udp6"):
        try:
            with open(path) as f:
                for line in list(f)[1:]:
                    cols = line.split()
                    if cols[1].endswith(":" + hexport):
                        total += int(cols[-1])
        except OSError:
            pass
    return total


def rcvbuf_errors(args):
    """UDP receive buffer overflows in the load generator's namespace."""
    out = subprocess.run(netns(args, "cli") + ["cat", "/proc/net/snmp"], capture_output=True,
                         text=True, check=True).stdout
    udp = [l.split() for l in out.splitlines() if l.startswith("Udp:")]
    return int(dict(zip(udp[0], udp[1]))["RcvbufErrors"])


def http(args):
    """The server's HTTP address: loopback, or the server's veth address with --veth."""
    return f"{SERVER_IP}:18080" if args.veth else HTTP


def netns(args, side):
    """Command prefix that runs in the server's or the client's namespace (--veth)."""
    return ["ip", "netns", "exec", f"bench-{side}"] if args.veth else []


def napi_thread(dev):
    """The pid of the threaded-NAPI kthread of a device (`napi/DEV-ID`)."""
    return kthread(lambda name: name.startswith(f"napi/{dev}-"))


def veth_setup(args):
    """Creates the two namespaces and the veth pair; returns the two NAPI thread pids."""
    sh = lambda *c: subprocess.run(list(c), check=True)
    for side in ("srv", "cli"):
        subprocess.run(["ip", "netns", "del", f"bench-{side}"], stderr=subprocess.DEVNULL)
        sh("ip", "netns", "add", f"bench-{side}")
        sh("ip", "-n", f"bench-{side}", "link", "set", "lo", "up")
    sh("ip", "-n", "bench-srv", "link", "add", "bv0", "type", "veth", "peer", "name", "bv1",
       "netns", "bench-cli")
    pids = []
    for side, dev, ip, cpu in (("srv", "bv0", SERVER_IP, args.server_cpu),
                               ("cli", "bv1", CLIENT_IP, args.client_cpu)):
        ns = f"bench-{side}"
        sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
        sh("ip", "-n", ns, "link", "set", dev, "up")
        # GRO on gives a veth its own NAPI receive queue; veth hands a TSO-capable sender's
        # UDP to it only with UDP GRO forwarding (or fraglist GRO) on the receiving end.
        sh("ip", "netns", "exec", ns, "ethtool", "-K", dev, "gro", "on", "rx-udp-gro-forwarding", "on")
        sh("ip", "netns", "exec", ns, "sh", "-c", f"echo 1 > /sys/class/net/{dev}/threaded")
        time.sleep(0.2)
        pid = napi_thread(dev)
        assert pid, f"no NAPI thread for {dev}"
        sh("taskset", "-pc", str(cpu), str(pid))  # threaded NAPI runs in this kthread
        pids.append(pid)
    return pids


def janus_conf(out_dir, ip="127.0.0.1"):
    """Materialize scripts/bench/janus/*.jcfg with their folder (and HTTP address) filled in."""
    src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "janus")
    dst = os.path.join(out_dir, "janusconf")
    os.makedirs(dst, exist_ok=True)
    for name in os.listdir(src):
        with open(os.path.join(src, name)) as f:
            text = f.read().replace("CONFDIR", dst).replace('ip = "127.0.0.1"', f'ip = "{ip}"')
        with open(os.path.join(dst, name), "w") as f:
            f.write(text)
    return dst


def run(args, viewers, out_dir):
    env = dict(os.environ)
    env.pop("RUST_LOG", None)
    if args.no_gso:
        env["CASCADE_NO_GSO"] = "1"
    tag = f"{'janus-' if args.janus else ''}{viewers}{'-nogso' if args.no_gso else ''}{'-notag' if args.no_tag else ''}"
    napi = veth_setup(args) if args.veth else []
    addr, bind = (SERVER_IP, CLIENT_IP) if args.veth else (args.addr, args.addr)
    host = SERVER_IP if args.veth else "127.0.0.1"
    pin = NICE + netns(args, "srv") + ["taskset", "-c", str(args.server_cpu)]
    log = open(os.path.join(out_dir, f"server-{tag}.log"), "w")
    if args.janus:
        conf = janus_conf(out_dir, host)
        server = subprocess.Popen(pin + ["janus", "-F", conf, "-C", f"{conf}/janus.jcfg"],
                                  stdout=log, stderr=log, env=env)
        source = ["--url", f"http://{host}:18088/janus", "--janus-mountpoint", "1",
                  "--rtp-feed", f"{host}:5004,{host}:5002"]
    else:
        server = subprocess.Popen(
            pin + [CASCADE, "all", "--http", http(args), "--rtmp", "127.0.0.1:0", "--udp", f"{addr}:{UDP_PORT}",
                   "--tcp", f"{addr}:{UDP_PORT}", "--advertise", addr, "--publish-token", TOKEN,
                   "--log", "warn", "--max-sessions", "20000",
                   # Every viewer comes from one address: lift the per-IP caps.
                   "--max-sessions-per-ip", "0", "--http-max-per-ip", "0"],
            stdout=subprocess.DEVNULL, stderr=log, env=env)
        source = ["--url", f"http://{http(args)}/whep/bench", "--publish", f"http://{http(args)}/whip/bench",
                  "--publish-token", TOKEN] + (["--no-tag"] if args.no_tag else [])
    time.sleep(1.5)
    csv, svg = (os.path.join(out_dir, f"series-{tag}.{e}") for e in ("csv", "svg"))
    client = subprocess.Popen(
        NICE + netns(args, "cli") + ["taskset", "-c", str(args.client_cpu), LOADTEST] + source +
        ["--bind", bind,
         "--video-kbps", str(args.kbps), "--viewers", str(viewers), "--ramp", str(args.ramp),
         "--duration", f"{args.duration}s", "--json", "--csv", csv, "--svg", svg] +
        (["--full-every", str(args.full_every)] if args.full_every else []),
        stdout=subprocess.PIPE, stderr=open(os.path.join(out_dir, f"client-{tag}.log"), "w"),
        text=True)
    rcv0 = rcvbuf_errors(args)
    samples = []  # (t, cpu_s, rss_kib, sessions)
    t0 = time.time()
    perf = None
    softirqd = ksoftirqd(args.server_cpu)
    m = buckets = steady_start = None
    drops = 0
    ramp_s = viewers / args.ramp if args.ramp else 0
    while client.poll() is None and time.time() - t0 < args.duration + 60:
        t = time.time() - t0
        try:
            samples.append((t, cpu_seconds(server.pid), rss_kib(server.pid),
                            cpu_seconds(client.pid), cpu_seconds(softirqd) if softirqd else 0,
                            *(cpu_seconds(p) for p in napi)))
        except OSError:
            break
        if steady_start is None and not args.janus and t > ramp_s + 3 + 1.5:
            # The steady window's histograms are the end scrape minus this one.
            steady_start = metrics(args)[1]
        if m is None and not args.janus and t > args.duration - 0.5:
            # Before the viewers leave: sends to closed ports after the run are not drops.
            m, buckets = metrics(args)
            drops = server_socket_drops(server.pid, UDP_PORT)
        if args.perf and perf is None and t > ramp_s + 4:
            perf = subprocess.Popen(
                ["perf", "record", "-F", "499", "-g", "-e", "cpu-clock", "-p", str(server.pid),
                 "-o", os.path.join(out_dir, f"perf-{tag}.data"), "--", "sleep", str(args.perf)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)
    if m is None:
        m, buckets = ({}, {}) if args.janus else metrics(args)
    out, _ = client.communicate(timeout=90)
    rcv = rcvbuf_errors(args) - rcv0
    if perf:
        perf.wait(timeout=120)
    server.send_signal(signal.SIGKILL)
    server.wait()
    summary = json.loads(out.strip().splitlines()[-1])
    # Steady window: from 3 s after the ramp ends to 2 s before the run ends.
    lo, hi = ramp_s + 3 + 1.5, args.duration - 2 + 1.5
    win = [s for s in samples if lo <= s[0] <= hi]
    base_rss = samples[1][2] if len(samples) > 1 else 0
    cpu_pct = client_pct = ramp_pct = softirq_pct = None
    napi_pct = [None, None]
    pct = lambda i: 100 * (win[-1][i] - win[0][i]) / (win[-1][0] - win[0][0])
    if len(win) >= 2:
        cpu_pct, client_pct, softirq_pct = pct(1), pct(3), pct(4)
        napi_pct = [pct(5), pct(6)] if napi else napi_pct
    # With --veth the server's share of the kernel (its NAPI receive thread) is server CPU.
    total_pct = cpu_pct + (napi_pct[0] or 0) if cpu_pct else None
    ramp = [s for s in samples if 1.5 <= s[0] <= ramp_s + 1.5]
    if len(ramp) >= 2:
        ramp_pct = 100 * (ramp[-1][1] - ramp[0][1]) / (ramp[-1][0] - ramp[0][0])
    peak_rss = max(s[2] for s in samples) if samples else 0
    steady_rss = win[-1][2] if win else peak_rss
    conn = summary.get("viewers_connected") or 0
    res = {
        "viewers": viewers,
        "server": "janus" if args.janus else "cascade",
        "gso": not args.no_gso,
        "tagged": not args.no_tag,
        "kbps": args.kbps,
        "server_cpu_pct": cpu_pct,
        "server_cpu_pct_ramp": ramp_pct,
        "client_cpu_pct": client_pct,
        "ksoftirqd_cpu_pct": softirq_pct,
        "veth": args.veth,
        "server_napi_cpu_pct": napi_pct[0],
        "client_napi_cpu_pct": napi_pct[1],
        "server_total_cpu_pct": total_pct,
        # Whole run (ramp included) and the steady window alone.
        "server_quantiles_s": bucket_quantiles(buckets),
        "server_quantiles_steady_s": bucket_quantiles(buckets, steady_start),
        "viewers_per_core": (conn * 100 / total_pct) if total_pct else None,
        "cpu_us_per_viewer_s": (total_pct * 1e4 / conn) if total_pct and conn else None,
        "rss_kib_base": base_rss,
        "rss_kib_peak": peak_rss,
        "rss_kib_steady": steady_rss,
        "rss_kib_per_viewer": ((steady_rss - base_rss) / conn) if conn else None,
        "server_send_drops": m.get("cascade_rtc_datagrams_dropped_total", 0),
        "server_socket_drops": drops,
        "host_rcvbuf_errors": rcv,
        "datagrams_out": m.get("cascade_rtc_datagrams_out_total"),
        "send_calls": m.get("cascade_rtc_send_calls_total"),
        "lag_skips": m.get("cascade_edge_lag_skips_total", 0),
        "loadtest": summary,
    }
    with open(os.path.join(out_dir, f"server-{tag}.csv"), "w") as f:
        f.write("t_s,server_cpu_s,server_rss_kib,client_cpu_s\n")
        for s in samples:
            f.write(f"{s[0]:.1f},{s[1]:.2f},{s[2]},{s[3]:.2f}\n")
    return res


def main():
    p = argparse.ArgumentParser()
    p.add_argument("out_dir")
    p.add_argument("viewers", type=int, nargs="+")
    p.add_argument("--duration", type=int, default=25)
    p.add_argument("--ramp", type=float, default=300)
    p.add_argument("--kbps", type=int, default=2500)
    p.add_argument("--full-every", type=int, default=0,
                   help="every Nth viewer decrypts and checks everything (and so sends RTCP "
                        "feedback: TWCC with CASCADE_EDGE_BWE_ALL=1); default loadtest's")
    p.add_argument("--no-gso", action="store_true")
    p.add_argument("--server-cpu", type=int, default=0)
    p.add_argument("--client-cpu", type=int, default=1)
    p.add_argument("--perf", type=int, default=0, help="perf record the server this many s")
    p.add_argument("--janus", action="store_true", help="measure Janus instead of cascade")
    p.add_argument("--addr", default="127.0.0.1", help="address viewers bind and cascade advertises")
    p.add_argument("--no-tag", action="store_true",
                   help="publish without the per-frame SEI tag (no client latency figures)")
    p.add_argument("--veth", action="store_true",
                   help="server and viewers in two namespaces over veth with threaded NAPI")
    args = p.parse_args()
    assert all(0 < v <= 5000 for v in args.viewers) and args.duration <= 120
    os.makedirs(args.out_dir, exist_ok=True)
    for v in args.viewers:
        res = run(args, v, args.out_dir)
        line = json.dumps(res)
        print(line, flush=True)
        with open(os.path.join(args.out_dir, "results.jsonl"), "a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    sys.exit(main())
