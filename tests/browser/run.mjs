// Drives headless Chromium for cascade's browser tests (tests/browser.rs runs
// this inside a network namespace). Every RTCPeerConnection a page creates is
// recorded by an init script, so any player (ours, OvenPlayer, Eyevinn's) is
// measured the same way through getStats(). Prints one JSON object.
//
// usage: node run.mjs '<json job>'   (see the `job.kind` switch below)
import { chromium } from "playwright-core";
import http from "node:http";
import https from "node:https";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { CAPTURE_FLAGS, FLAGS, RECORD_PCS } from "./page.mjs";
import { fileURLToPath } from "node:url";
import { execFileSync } from "node:child_process";
// A rendition switch waits for the target's next keyframe and, on a loaded
// machine, for Chromium to resume a simulcast layer it paused: loose bound.
// (15 s once ran out under CI load for OvenPlayer's return to Auto on the
// VP8 simulcast stream, after passing in the run before; the switch must
// still happen, only later.)
const SWITCH_WAIT_MS = 30000;

const here = path.dirname(fileURLToPath(import.meta.url));
const job = JSON.parse(process.argv[2] || "{}");
const out = { ok: false, kind: job.kind };

// One getStats() summary over the page's receiving peer connections.
async function sample(page) {
  return page.evaluate(async () => {
    const s = { pcs: window.__pcs ? window.__pcs.length : 0, framesDecoded: 0, audioPackets: 0, videoPackets: 0,
      width: 0, height: 0, path: null, state: null, created: null, framesSent: 0, audioSent: 0 };
    for (const pc of window.__pcs || []) {
      if (pc.connectionState === "closed") continue;
      s.state = pc.connectionState;
      s.created = pc.__created;
      s.ufrag = pc.localDescription ? (pc.localDescription.sdp.match(/a=ice-ufrag:(.*)/) || [])[1] : null;
      const r = await pc.getStats();
      r.forEach((x) => {
        if (x.type === "inbound-rtp" && x.kind === "video") {
          s.framesDecoded += x.framesDecoded || 0; s.videoPackets += x.packetsReceived || 0;
          s.width = x.frameWidth || s.width; s.height = x.frameHeight || s.height;
        }
        if (x.type === "inbound-rtp" && x.kind === "audio") s.audioPackets += x.packetsReceived || 0;
        if (x.type === "outbound-rtp" && x.kind === "video") s.framesSent += x.framesSent || 0;
        if (x.type === "outbound-rtp" && x.kind === "audio") s.audioSent += x.packetsSent || 0;
        if (x.type === "candidate-pair" && x.nominated && x.state === "succeeded") {
          const l = r.get(x.localCandidateId), rm = r.get(x.remoteCandidateId);
          if (l && rm) s.path = { local: l.candidateType, protocol: l.protocol, relay: l.relayProtocol || null,
            remote: rm.address + ":" + rm.port, remoteProtocol: rm.protocol };
        }
      });
    }
    s.now = performance.now();
    return s;
  });
}

// In-page stats for the kinds that look at smoothness ("watch-many",
// "simulcast"): window.__summary() reads the receiving side like sample()
// plus Chromium's freeze counters and every sending layer (outbound-rtp per
// rid); window.__startTrace() samples it every 100 ms into window.__trace, in
// the page, so a slow round trip to node cannot look like a freeze.
const TRACE = `
  (() => {
    window.__summary = async () => {
      const s = { t: performance.now(), f: 0, h: 0, w: 0, a: 0, vp: 0, freezes: 0, freezeSecs: 0,
        state: null, codec: null, layers: [], outBitrate: null };
      for (const pc of window.__pcs || []) {
        if (pc.connectionState === "closed") continue;
        s.state = pc.connectionState;
        const r = await pc.getStats();
        r.forEach((x) => {
          if (x.type === "inbound-rtp" && x.kind === "video") {
            s.f += x.framesDecoded || 0; s.vp += x.packetsReceived || 0;
            s.w = x.frameWidth || s.w; s.h = x.frameHeight || s.h;
            s.freezes += x.freezeCount || 0; s.freezeSecs += x.totalFreezesDuration || 0;
            const c = r.get(x.codecId); if (c) s.codec = c.mimeType + (c.sdpFmtpLine ? " " + c.sdpFmtpLine : "");
          }
          if (x.type === "inbound-rtp" && x.kind === "audio") s.a += x.packetsReceived || 0;
          if (x.type === "outbound-rtp" && x.kind === "video") {
            const c = r.get(x.codecId);
            s.layers.push({ rid: x.rid || null, ssrc: x.ssrc, active: x.active, frameWidth: x.frameWidth || 0,
              frameHeight: x.frameHeight || 0, framesSent: x.framesSent || 0, framesEncoded: x.framesEncoded || 0,
              bytesSent: x.bytesSent || 0, targetBitrate: x.targetBitrate || 0,
              qualityLimitationReason: x.qualityLimitationReason, qualityLimitationDurations: x.qualityLimitationDurations,
              encoderImplementation: x.encoderImplementation || null, scalabilityMode: x.scalabilityMode || null,
              nackCount: x.nackCount || 0, pliCount: x.pliCount || 0, firCount: x.firCount || 0,
              codec: c ? c.mimeType : null });
          }
          if (x.type === "outbound-rtp" && x.kind === "audio") s.a += x.packetsSent || 0;
          if (x.type === "candidate-pair" && x.nominated && x.state === "succeeded" && x.availableOutgoingBitrate)
            s.outBitrate = x.availableOutgoingBitrate;
        });
      }
      s.layers.sort((a, b) => a.frameHeight - b.frameHeight);
      return s;
    };
    window.__trace = [];
    window.__startTrace = () => {
      if (window.__tracing) return;
      window.__tracing = true;
      let busy = false;
      setInterval(async () => {
        if (busy) return;
        busy = true;
        try {
          const s = await window.__summary();
          window.__trace.push({ t: s.t, f: s.f, h: s.h, w: s.w, a: s.a, freezes: s.freezes, freezeSecs: s.freezeSecs });
        } finally { busy = false; }
      }, 100);
    };
  })();
`;

// What a page's trace shows between performance.now() times t0 and t1:
// frames decoded and audio packets in the window, the sizes seen, and the
// longest time without a newly decoded frame (on the 100 ms grid).
function window_(trace, t0, t1) {
  const w = trace.filter((x) => x.t >= t0 && x.t <= t1);
  if (w.length < 2) return { samples: w.length, frames: 0, audio: 0, maxGapMs: null, heights: [], sizes: [] };
  const a = w[0], b = w[w.length - 1];
  let lastNew = a.t, maxGap = 0, maxGapAt = 0;
  const gap = (t) => { if (t - lastNew > maxGap) { maxGap = t - lastNew; maxGapAt = lastNew - a.t; } };
  for (let i = 1; i < w.length; i++) {
    if (w[i].f > w[i - 1].f) { gap(w[i].t); lastNew = w[i].t; }
  }
  gap(b.t);
  const sizes = [];
  for (const x of w) {
    const k = x.w + "x" + x.h;
    if (!sizes.length || sizes[sizes.length - 1].size !== k) sizes.push({ size: k, samples: 1 });
    else sizes[sizes.length - 1].samples++;
  }
  return {
    samples: w.length, spanMs: Math.round(b.t - a.t), frames: b.f - a.f, framesTotal: b.f, audio: b.a - a.a,
    maxGapMs: Math.round(maxGap), maxGapStartMs: Math.round(maxGapAt), freezes: b.freezes - a.freezes, freezeSecs: +(b.freezeSecs - a.freezeSecs).toFixed(3),
    heights: [...new Set(w.map((x) => x.h))], lastHeights: w.slice(-10).map((x) => x.h), sizes: sizes.slice(0, 30),
  };
}

// Waits until cascade lists every stream of `names` in /api/streams.
async function waitLive(base, names, ms) {
  const end = Date.now() + ms;
  let live = [];
  while (Date.now() < end) {
    try {
      const list = await (await fetch(`${base}/api/streams`)).json();
      live = list.map((x) => x.stream);
      if (names.every((n) => live.includes(n))) return list;
    } catch (_) { /* not up yet */ }
    await new Promise((r) => setTimeout(r, 200));
  }
  throw new Error(`streams not live after ${ms} ms: want ${names}, live ${live}`);
}

async function waitFor(page, pred, ms, every = 25) {
  const end = Date.now() + ms;
  let s = await sample(page);
  while (!pred(s) && Date.now() < end) {
    await new Promise((r) => setTimeout(r, every));
    s = await sample(page);
  }
  return s;
}

// Watches a page for `secs`: frames and audio must keep rising.
async function watch(page, secs) {
  const first = await waitFor(page, (s) => s.framesDecoded > 0, 20000);
  const ttff = first.framesDecoded > 0 && first.created != null ? Math.round(first.now - first.created) : null;
  await new Promise((r) => setTimeout(r, secs * 1000));
  const last = await sample(page);
  return { first, last, ttffMs: ttff };
}

// Static files for "another origin" pages (players from npm, our WHEP client).
// With `tls` ({cert, key}: PEM file paths) the origin is https://.
function serveStatic(host, tls) {
  const files = {
    "/whep-client.html": ["text/html", path.join(here, "whep-client.html")],
    "/ovenplayer.html": ["text/html", path.join(here, "ovenplayer.html")],
    "/ovenplayer.js": ["text/javascript", path.join(here, "node_modules/ovenplayer/dist/ovenplayer.js")],
    "/eyevinn.html": ["text/html", path.join(here, "eyevinn.html")],
    "/eyevinn.js": ["text/javascript", path.join(here, "build/eyevinn.js")],
    "/simulcast.html": ["text/html", path.join(here, "simulcast.html")],
  };
  const handler = (req, res) => {
    const f = files[new URL(req.url, "http://x").pathname];
    if (!f || !fs.existsSync(f[1])) { res.writeHead(404); res.end(); return; }
    res.writeHead(200, { "content-type": f[0] });
    fs.createReadStream(f[1]).pipe(res);
  };
  const server = tls
    ? https.createServer({ cert: fs.readFileSync(tls.cert), key: fs.readFileSync(tls.key) }, handler)
    : http.createServer(handler);
  return new Promise((resolve) => server.listen(0, host, () => resolve(server)));
}

const VIEW_ONLY = new Set(["play", "blip", "whep-client", "ttff", "player", "failover", "stall", "player-menu"]);

async function main() {
  const userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), "cascade-chromium-"));
  // The static origin is up before Chromium starts, so that a page there
  // may capture ("simulcast"). Only then is it a secure context: as one,
  // whep-client.html trickles more candidates, and its PATCHes racing its
  // ICE restart get the (correct) 412 that tests/browser.rs does not expect.
  let server = job.staticHost ? await serveStatic(job.staticHost, job.staticTls) : null;
  const staticOrigin = server ? `${job.staticTls ? "https" : "http"}://${job.staticHost}:${server.address().port}` : null;
  const secure = [job.base, job.kind === "simulcast" ? staticOrigin : null].filter(Boolean).join(",");
  const ctx = await chromium.launchPersistentContext(userDataDir, {
    executablePath: job.chromium || "/usr/bin/chromium",
    headless: true,
    // getUserMedia needs a secure context; the test origins are plain http.
    args: FLAGS.concat(VIEW_ONLY.has(job.kind) ? [] : CAPTURE_FLAGS,
      secure ? [`--unsafely-treat-insecure-origin-as-secure=${secure}`] : [], job.flags || []),
    viewport: { width: 1000, height: 640 },
  });
  await ctx.addInitScript(RECORD_PCS);
  await ctx.addInitScript(TRACE);
  const logs = [];
  ctx.on("page", (p) => p.on("console", (m) => logs.push(m.type() + ": " + m.text())));
  try {
    const base = job.base; // http://198.18.0.1:PORT
    const newPage = async () => { const p = await ctx.newPage(); p.on("console", (m) => logs.push(m.type() + ": " + m.text())); return p; };
    switch (job.kind) {
      case "play": {
        const page = await newPage();
        await page.goto(`${base}/play/${job.stream}${job.query || ""}`, { waitUntil: "domcontentloaded" });
        if (job.expectNoMedia) {
          // Only the page's own diagnosis matters: give it time to get an answer.
          await new Promise((r) => setTimeout(r, 3000));
          out.warning = await page.evaluate(() => (document.getElementById("warn") || {}).textContent || "");
          out.last = await sample(page);
          break;
        }
        Object.assign(out, await watch(page, job.secs || 3));
        if (job.screenshot) await page.screenshot({ path: job.screenshot });
        break;
      }
      case "ws-probe": {
        // Raw OME signalling from a page: what the server says to each URL.
        const page = await newPage();
        await page.goto(`${base}/publish/probe`, { waitUntil: "domcontentloaded" });
        out.probes = [];
        for (const url of job.urls) {
          out.probes.push(await page.evaluate((u) => new Promise((resolve) => {
            const ws = new WebSocket(u);
            const got = { url: u, messages: [], opened: false };
            const done = () => resolve(got);
            ws.onopen = () => { got.opened = true; ws.send(JSON.stringify({ command: "request_offer" })); };
            ws.onmessage = (e) => {
              const m = JSON.parse(e.data);
              got.messages.push(m);
              if (m.command === "offer") {
                got.sdpHasCandidates = /a=candidate:/.test(m.sdp.sdp);
                got.hasIceServersKey = "ice_servers" in m;
                ws.close();
              }
            };
            ws.onclose = (e) => { got.closeCode = e.code; done(); };
            setTimeout(done, 5000);
          }), url));
        }
        break;
      }
      case "publish-hold": {
        // Publishes from the /publish page for job.secs; prints PUBLISHING
        // once live so another browser can start watching.
        const pub = await newPage();
        await pub.goto(`${base}/publish/${job.stream}?token=${encodeURIComponent(job.token)}&autostart=1${job.query || ""}`,
          { waitUntil: "domcontentloaded" });
        out.publisher = await waitFor(pub, (s) => s.framesSent > 10, 20000, 100);
        out.publishState = await pub.evaluate(() => window.cascade && window.cascade.state);
        out.codec = await pub.evaluate(() => window.cascade.stats && window.cascade.stats.codec);
        process.stdout.write("PUBLISHING " + out.publishState + "\n");
        await new Promise((r) => setTimeout(r, job.secs * 1000));
        break;
      }
      case "blip": {
        // The player page through a network blip: media paths dropped with
        // nftables (the HTTP port stays open for the restart's PATCH).
        const page = await newPage();
        await page.goto(`${base}/play/${job.stream}`, { waitUntil: "domcontentloaded" });
        out.before = await watch(page, 1);
        execFileSync("nft", ["-f", "-"], { input: job.rules });
        await new Promise((r) => setTimeout(r, job.blipSecs * 1000));
        out.during = await sample(page);
        execFileSync("nft", ["delete", "table", "inet", "cascade_blip"]);
        const back = await waitFor(page, (x) => x.state === "connected" && x.framesDecoded > out.during.framesDecoded + 30, 15000, 100);
        out.after = back;
        out.recoveredMs = Math.round(back.now - out.during.now);
        break;
      }
      case "publish-and-watch": {
        const pub = await newPage();
        await pub.goto(`${base}/publish/${job.stream}?token=${encodeURIComponent(job.token)}&autostart=1`, { waitUntil: "domcontentloaded" });
        const sent = await waitFor(pub, (s) => s.framesSent > 30, 20000, 100);
        out.publisher = sent;
        out.publishState = await pub.evaluate(() => window.cascade && window.cascade.state);
        const view = await newPage();
        await view.goto(`${base}/play/${job.stream}`, { waitUntil: "domcontentloaded" });
        Object.assign(out, await watch(view, job.secs || 3));
        if (job.screenshot) await pub.screenshot({ path: job.screenshot });
        if (job.screenshotPlayer) await view.screenshot({ path: job.screenshotPlayer });
        if (job.restartPublisher) {
          // ICE restart of the WHIP session (PATCH); the viewer must not notice.
          const before = await sample(view);
          await pub.evaluate(() => window.cascade.restartIce());
          await new Promise((r) => setTimeout(r, 3000));
          out.publisherRestart = {
            restarts: await pub.evaluate(() => window.cascade.restarts),
            state: await pub.evaluate(() => window.cascade.state),
            error: await pub.evaluate(() => window.cascade.error),
            viewerBefore: before.framesDecoded,
            viewerAfter: (await sample(view)).framesDecoded,
          };
        }
        // Closing the publishing tab ends the WHIP session (pagehide → DELETE).
        await pub.close({ runBeforeUnload: true });
        await new Promise((r) => setTimeout(r, 1000));
        const metrics = await (await fetch(`${base}/metrics`)).text();
        const line = metrics.split("\n").find((l) => l.startsWith('cascade_rtc_sessions{kind="whip"} '));
        out.whipSessionsAfterClose = line ? Number(line.split(" ").pop()) : null;
        break;
      }
      case "whep-client": {
        // Our own minimal WHEP client on another origin: CORS, trickle, ICE restart.
        const origin = staticOrigin;
        const page = await newPage();
        await page.goto(`${origin}/whep-client.html?url=${encodeURIComponent(`${base}/whep/${job.stream}`)}`, { waitUntil: "domcontentloaded" });
        const before = await watch(page, 2);
        Object.assign(out, { before, ttffMs: before.ttffMs });
        if (job.restart) {
          out.restart = await page.evaluate(() => window.client.restartIce());
          const mid = await sample(page);
          await new Promise((r) => setTimeout(r, 3000));
          out.afterRestart = { mid, last: await sample(page) };
        }
        out.client = await page.evaluate(() => ({ state: window.client.state, trickled: window.client.trickled, trickleStatus: window.client.trickleStatus, origin: location.origin }));
        out.last = await sample(page);
        break;
      }
      case "ttff": {
        // Joins one after another; time from the peer connection's creation
        // to the first decoded frame.
        out.joins = [];
        for (let i = 0; i < (job.joins || 20); i++) {
          const page = await newPage();
          await page.goto(`${base}/play/${job.stream}`, { waitUntil: "domcontentloaded" });
          const s = await waitFor(page, (x) => x.framesDecoded > 0, 10000, 10);
          out.joins.push(s.framesDecoded > 0 && s.created != null ? Math.round(s.now - s.created) : null);
          await page.close({ runBeforeUnload: true });
        }
        break;
      }
      case "player": {
        // A player from npm served from another origin (ovenplayer.html, eyevinn.html).
        if (job.page === "eyevinn.html") {
          // Eyevinn's player is CommonJS: bundle it for the browser first.
          const esbuild = await import("esbuild");
          await esbuild.build({ entryPoints: [path.join(here, "eyevinn-entry.js")], bundle: true, format: "iife",
            platform: "browser", outfile: path.join(here, "build/eyevinn.js"), logLevel: "error" });
        }
        const origin = staticOrigin;
        out.pageOrigin = origin;
        const page = await newPage();
        await page.goto(`${origin}/${job.page}?${job.pageQuery || ""}`, { waitUntil: "domcontentloaded" });
        Object.assign(out, await watch(page, job.secs || 3));
        out.events = await page.evaluate(() => window.events || []);
        if (job.screenshot) await page.screenshot({ path: job.screenshot });
        if (job.closeThenMetric) {
          // Close the tab, then read the server's gauge (e.g. live ws sessions).
          await page.close({ runBeforeUnload: true });
          await new Promise((r) => setTimeout(r, 1000));
          const text = await (await fetch(`${base}/metrics`)).text();
          const line = text.split("\n").find((l) => l.startsWith(job.closeThenMetric + " "));
          out.metricAfterClose = line ? Number(line.split(" ").pop()) : null;
          out.metricLine = line || null;
        }
        break;
      }
      case "watch-many": {
        // Several players side by side (tests/browser_clients.rs): job.publishers
        // (pages that publish, e.g. /publish/S?codec=vp8) first, then the
        // streams job.streams must be live, then every job.pages player at
        // once; after job.warmSecs each page's in-page trace over the last
        // job.secs says what it played. A url "static:/x.html?…" is a page
        // of the other origin.
        const at = (u) => u.startsWith("static:") ? staticOrigin + u.slice("static:".length) : u;
        out.publishers = {};
        for (const p of job.publishers || []) {
          const pub = await newPage();
          await pub.goto(at(p.url), { waitUntil: "domcontentloaded" });
          out.publishers[p.label] = await waitFor(pub, (s) => s.framesSent > 10, 20000, 100);
        }
        out.live = await waitLive(base, job.streams || [], 20000);
        const pages = await Promise.all((job.pages || []).map(async (p) => {
          const page = await newPage();
          const opened = Date.now();
          await page.goto(at(p.url), { waitUntil: "domcontentloaded" });
          await page.evaluate(() => window.__startTrace());
          return { ...p, page, opened, firstMs: null };
        }));
        const end = Date.now() + (job.firstFrameSecs || 15) * 1000;
        while (Date.now() < end && pages.some((p) => p.firstMs === null)) {
          for (const p of pages) {
            if (p.firstMs === null && (await p.page.evaluate(() => window.__summary())).f > 0) p.firstMs = Date.now() - p.opened;
          }
          await new Promise((r) => setTimeout(r, 100));
        }
        await new Promise((r) => setTimeout(r, ((job.warmSecs ?? 1) + (job.secs || 8)) * 1000));
        out.results = {};
        for (const p of pages) {
          const got = await p.page.evaluate(() => ({ trace: window.__trace, t1: performance.now(), events: window.events || null,
            // What was negotiated: the m-lines, bundle and H.264 formats of each side.
            sdp: (window.__pcs || []).map((pc) => [pc.remoteDescription, pc.localDescription].map((d) => d && (d.type + ": " +
              d.sdp.split(/\r?\n/).filter((l) => /^(m=|a=group|a=fmtp:\d+ .*profile-level-id|a=candidate)/.test(l))
                .map((l) => l.replace(/^a=candidate:\S+ \d+ (\S+) \d+ (\S+ \d+) .*/, "cand $1 $2")).join(" | ")))) }));
          const last = await p.page.evaluate(() => window.__summary());
          out.results[p.label] = { firstFrameMs: p.firstMs, window: window_(got.trace, got.t1 - job.secs * 1000, got.t1),
            codec: last.codec, state: last.state, size: `${last.w}x${last.h}`, framesTotal: last.f, audioTotal: last.a, events: got.events,
            sdp: got.sdp };
        }
        break;
      }
      case "simulcast": {
        // tests/browser/simulcast.html publishes three simulcast layers over
        // WHIP; once the top layer is sent steadily (or job.topWaitSecs passed) the
        // player page plays the stream, traced as in "watch-many". The
        // publisher's layers (outbound-rtp per rid) are sampled every second
        // throughout: which layers Chromium sends, and why not (bandwidth).
        const pub = await newPage();
        const url = `${base}/whip/${job.stream}`;
        await pub.goto(`${staticOrigin}/simulcast.html?url=${encodeURIComponent(url)}&token=${encodeURIComponent(job.token)}` +
          (job.codec ? `&codec=${encodeURIComponent(job.codec)}` : "") + (job.lateTop ? `&lateTop=${job.lateTop}` : ""),
          { waitUntil: "domcontentloaded" });
        const t0 = Date.now();
        const state = async () => pub.evaluate(() => ({ state: window.pub.state, error: window.pub.error, status: window.pub.status }));
        let st = await state();
        while (!["connected", "error", "failed"].includes(st.state) && Date.now() - t0 < 15000) {
          await new Promise((r) => setTimeout(r, 100));
          st = await state();
        }
        out.publish = st;
        if (st.state !== "connected") throw new Error("simulcast publisher did not connect: " + JSON.stringify(st));
        out.publisherTrace = [];
        const layersNow = async () => {
          const s = await pub.evaluate(() => window.__summary());
          return { atMs: Date.now() - t0, outBitrate: s.outBitrate, layers: s.layers };
        };
        let tracing = true;
        const tracer = (async () => {
          while (tracing) {
            try { out.publisherTrace.push(await layersNow()); } catch (_) { return; }
            await new Promise((r) => setTimeout(r, 1000));
          }
        })();
        // Steadily: ≥ 10 frames of the top layer in the last second (its
        // bandwidth estimate may pause it for seconds right after a start).
        const sentF = (x) => (x.layers.find((l) => l.rid === "f") || {}).framesSent || 0;
        const topEnd = Date.now() + (job.topWaitSecs || 10) * 1000;
        const seen = [await layersNow()];
        const steady = () => { const n = seen[seen.length - 1], o = seen.find((x) => x.atMs >= n.atMs - 1000);
          return n.atMs - seen[0].atMs >= 1000 && sentF(n) - sentF(o) >= 10; };
        // job.viewBeforeTop: the viewer opens at once (before a late top
        // layer exists) and must move up to it by itself.
        while (!job.viewBeforeTop && !steady() && Date.now() < topEnd) {
          await new Promise((r) => setTimeout(r, 200));
          seen.push(await layersNow());
        }
        out.topLayerSteadyAfterMs = steady() ? seen[seen.length - 1].atMs : null;
        const view = await newPage();
        await view.goto(`${base}/play/${job.stream}`, { waitUntil: "domcontentloaded" });
        await view.evaluate(() => window.__startTrace());
        const firstEnd = Date.now() + 15000;
        while ((await view.evaluate(() => window.__summary())).f === 0 && Date.now() < firstEnd) {
          await new Promise((r) => setTimeout(r, 100));
        }
        // Auto with per-viewer estimation starts on the lowest rendition and
        // climbs: the window opens once it reached job.autoWant (or
        // job.autoWaitSecs passed, and the window's heights tell).
        const tFirst = Date.now();
        while (job.autoWant && (await view.evaluate(() => window.__summary())).h !== job.autoWant &&
               Date.now() - tFirst < (job.autoWaitSecs ?? 20) * 1000) {
          await new Promise((r) => setTimeout(r, 100));
        }
        out.autoAtMs = Date.now() - tFirst;
        await new Promise((r) => setTimeout(r, ((job.warmSecs ?? 2) + (job.secs || 8)) * 1000));
        const got = await view.evaluate(() => ({ trace: window.__trace, t1: performance.now() }));
        // The window on the publisher trace's clock (atMs).
        out.windowAtMs = [Date.now() - t0 - job.secs * 1000, Date.now() - t0];
        const last = await view.evaluate(() => window.__summary());
        out.viewer = { window: window_(got.trace, got.t1 - job.secs * 1000, got.t1), codec: last.codec, state: last.state,
          size: `${last.w}x${last.h}`, framesTotal: last.f };
        if (job.switchTo) {
          // The player page's quality menu (WHEP layer endpoint): pick each
          // entry, then wait for the decoded frame height to follow.
          out.menu = await view.evaluate(async () => {
            const q = document.getElementById("quality");
            const t0 = performance.now();
            while (q.hidden && performance.now() - t0 < 5000) await new Promise((r) => setTimeout(r, 100));
            return [...q.options].map((o) => o.text);
          });
          out.switches = [];
          for (const [value, want] of job.switchTo) {
            const t = Date.now();
            await view.evaluate(async (v) => { const q = document.getElementById("quality"); q.value = v; await q.onchange(); }, value);
            let h = (await view.evaluate(() => window.__summary())).h;
            while (h !== want && Date.now() - t < SWITCH_WAIT_MS) {
              await new Promise((r) => setTimeout(r, 100));
              h = (await view.evaluate(() => window.__summary())).h;
            }
            const stats = await view.evaluate(() => document.getElementById("stats").textContent);
            out.switches.push({ value, want, height: h, ms: Date.now() - t, stats });
          }
        }
        if (job.ovenSwitchTo) {
          // OvenPlayer's quality menu over OME signalling: its playlist
          // becomes getQualityLevels(); setCurrentQuality(i) sends
          // change_rendition, setAutoQuality(true) hands the choice back.
          await view.close();
          const oven = await newPage();
          const ws = base.replace(/^http/, "ws") + `/ws/live/${job.stream}`;
          await oven.goto(`${staticOrigin}/ovenplayer.html?ws=${encodeURIComponent(ws)}`, { waitUntil: "domcontentloaded" });
          const summary = async () => oven.evaluate(() => window.__summary());
          const t0 = Date.now();
          while ((await summary()).f === 0 && Date.now() - t0 < 15000) await new Promise((r) => setTimeout(r, 100));
          out.ovenLevels = await oven.evaluate(() => (window.player.getQualityLevels() || []).map((l) => ({ label: l.label, height: l.height })));
          out.ovenSwitches = [];
          for (const [index, want] of job.ovenSwitchTo) {
            const t = Date.now();
            await oven.evaluate((i) => (i < 0 ? window.player.setAutoQuality(true) : window.player.setCurrentQuality(i)), index);
            let h = (await summary()).h;
            while (h !== want && Date.now() - t < SWITCH_WAIT_MS) {
              await new Promise((r) => setTimeout(r, 100));
              h = (await summary()).h;
            }
            out.ovenSwitches.push({ index, want, height: h, ms: Date.now() - t,
              auto: await oven.evaluate(() => window.player.isAutoQuality()) });
          }
          out.ovenEvents = await oven.evaluate(() => window.events || []);
        }
        tracing = false;
        await tracer;
        out.publisher = await layersNow();
        const sdp = await pub.evaluate(() => ({ offer: window.pub.offer, answer: window.pub.answer }));
        // The lines that decide simulcast and congestion feedback.
        const pick = (t) => (t || "").split(/\r?\n/).filter((l) => /^a=(simulcast|rid|extmap|rtcp-fb|rtpmap|fmtp)|^m=/.test(l));
        out.answerLines = pick(sdp.answer);
        out.offerSimulcast = pick(sdp.offer).filter((l) => /^a=(simulcast|rid)/.test(l));
        out.streams = await (await fetch(`${base}/api/streams`)).json().catch(() => null);
        break;
      }
      case "failover": {
        // The player page on an edge of a cluster; prints PLAYING <edge>
        // once frames flow and the page knows the other edges, and the
        // test kills that edge: the page must play on from another edge.
        const page = await newPage();
        await page.goto(`${base}/play/${job.stream}`, { waitUntil: "domcontentloaded" });
        out.before = await watch(page, 1);
        const p = () => page.evaluate(() => ({ base: window.cascadePlayer.base, edges: window.cascadePlayer.edges,
          status: window.cascadePlayer.status, failovers: window.cascadePlayer.failovers, pcs: window.__pcs.length }));
        let st = await p();
        const t0 = Date.now();
        while (!st.edges.length && Date.now() - t0 < 15000) {
          await new Promise((r) => setTimeout(r, 100));
          st = await p();
        }
        out.playingOn = st.base;
        out.edgesBefore = st.edges;
        process.stdout.write("PLAYING " + st.base + "\n");
        const killed = Date.now();
        const end = killed + (job.waitSecs || 30) * 1000;
        let s = await sample(page);
        while (Date.now() < end) {
          st = await p();
          if (/reconnecting/.test(st.status) && out.reconnectingMs == null) out.reconnectingMs = Date.now() - killed;
          s = await sample(page);
          // Only open peer connections count: the old one is closed.
          if (st.pcs > 1 && st.base !== out.playingOn && s.framesDecoded > 0 && out.firstFrameMs == null) out.firstFrameMs = Date.now() - killed;
          if (out.firstFrameMs != null && s.framesDecoded > 30) break;
          await new Promise((r) => setTimeout(r, 100));
        }
        out.flowingMs = Date.now() - killed;
        out.after = s;
        // "live" again once frames flow.
        const t1 = Date.now();
        while (!/^live/.test(st.status) && Date.now() - t1 < 3000) {
          await new Promise((r) => setTimeout(r, 100));
          st = await p();
        }
        out.nowOn = st.base;
        out.status = st.status;
        out.failovers = st.failovers;
        break;
      }
      case "stall": {
        // The player page while the test restarts the origin behind its
        // edge (PLAYING printed once frames flow): it must say
        // "reconnecting…", then "live" again with frames from the same
        // peer connection.
        const page = await newPage();
        await page.goto(`${base}/play/${job.stream}`, { waitUntil: "domcontentloaded" });
        out.before = await watch(page, 1);
        const p = () => page.evaluate(() => ({ status: window.cascadePlayer.status, base: window.cascadePlayer.base,
          failovers: window.cascadePlayer.failovers, pcs: window.__pcs.length }));
        process.stdout.write("PLAYING\n");
        const t0 = Date.now();
        const end = t0 + (job.waitSecs || 30) * 1000;
        let st = await p();
        let s = await sample(page);
        let stalledFrames = null;
        while (Date.now() < end) {
          st = await p();
          s = await sample(page);
          if (/reconnecting/.test(st.status) && out.reconnectingMs == null) { out.reconnectingMs = Date.now() - t0; stalledFrames = s.framesDecoded; }
          if (stalledFrames != null && s.framesDecoded > stalledFrames + 30 && /^live/.test(st.status)) { out.liveAgainMs = Date.now() - t0; break; }
          await new Promise((r) => setTimeout(r, 100));
        }
        out.after = s;
        out.status = st.status;
        out.pcs = st.pcs;
        out.failovers = st.failovers;
        break;
      }
      case "player-menu": {
        // A stream published elsewhere (RTMP with --abr-ladder): the player
        // page plays it, then its quality menu picks each job.switchTo entry
        // [value, height] and the decoded frame height must follow.
        const view = await newPage();
        await view.goto(`${base}/play/${job.stream}`, { waitUntil: "domcontentloaded" });
        const t0 = Date.now();
        while ((await view.evaluate(() => window.__summary())).f === 0 && Date.now() - t0 < 15000) {
          await new Promise((r) => setTimeout(r, 100));
        }
        const tFirst = Date.now();
        await new Promise((r) => setTimeout(r, (job.warmSecs ?? 2) * 1000));
        // With per-viewer estimation Auto starts on the lowest rendition and
        // climbs: job.autoWant is the height it must reach within
        // job.autoWaitSecs of the first frame.
        let first = await view.evaluate(() => window.__summary());
        while (job.autoWant && first.h !== job.autoWant && Date.now() - tFirst < (job.autoWaitSecs ?? 20) * 1000) {
          await new Promise((r) => setTimeout(r, 100));
          first = await view.evaluate(() => window.__summary());
        }
        out.viewer = { size: `${first.w}x${first.h}`, framesTotal: first.f, codec: first.codec, atMs: Date.now() - tFirst };
        out.menu = await view.evaluate(async () => {
          const q = document.getElementById("quality");
          const t0 = performance.now();
          while (q.hidden && performance.now() - t0 < 5000) await new Promise((r) => setTimeout(r, 100));
          return [...q.options].map((o) => o.text);
        });
        out.switches = [];
        for (const [value, want] of job.switchTo || []) {
          const t = Date.now();
          await view.evaluate(async (v) => { const q = document.getElementById("quality"); q.value = v; await q.onchange(); }, value);
          let s = await view.evaluate(() => window.__summary());
          while (s.h !== want && Date.now() - t < SWITCH_WAIT_MS) {
            await new Promise((r) => setTimeout(r, 100));
            s = await view.evaluate(() => window.__summary());
          }
          const f0 = s.f;
          await new Promise((r) => setTimeout(r, 1000));
          const f1 = (await view.evaluate(() => window.__summary())).f;
          out.switches.push({ value, want, height: s.h, ms: Date.now() - t - 1000, framesNextSecond: f1 - f0 });
        }
        break;
      }
      default:
        throw new Error("unknown job kind " + job.kind);
    }
    out.ok = true;
  } catch (e) {
    out.error = String(e && e.stack || e);
  } finally {
    out.logs = logs.slice(-40);
    if (server) server.close();
    await ctx.close().catch(() => {});
    fs.rmSync(userDataDir, { recursive: true, force: true });
  }
  // Written before exiting: a pipe takes 64 KiB at once, and process.exit
  // would cut a longer result (a long publisher trace) mid-line.
  await new Promise((r) => process.stdout.write(JSON.stringify(out) + "\n", r));
}

const killer = setTimeout(() => {
  process.stdout.write(JSON.stringify({ ok: false, kind: job.kind, error: "runner timeout" }) + "\n");
  process.exit(2);
}, (job.timeoutSecs || 55) * 1000);
main().then(() => { clearTimeout(killer); process.exit(0); });
