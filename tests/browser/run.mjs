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
import { fileURLToPath } from "node:url";
import { execFileSync } from "node:child_process";

const here = path.dirname(fileURLToPath(import.meta.url));
const job = JSON.parse(process.argv[2] || "{}");
const out = { ok: false, kind: job.kind };

// Records every peer connection and the time it was made.
const RECORD_PCS = `
  (() => {
    const Orig = window.RTCPeerConnection;
    window.__pcs = [];
    window.RTCPeerConnection = function (...args) {
      const pc = new Orig(...args);
      pc.__created = performance.now();
      window.__pcs.push(pc);
      return pc;
    };
    window.RTCPeerConnection.prototype = Orig.prototype;
    Object.setPrototypeOf(window.RTCPeerConnection, Orig);
  })();
`;

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

const FLAGS = [
  "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
  "--disable-background-networking", "--disable-component-update", "--disable-sync",
  "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
  "--autoplay-policy=no-user-gesture-required",
];

async function main() {
  const userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), "cascade-chromium-"));
  const ctx = await chromium.launchPersistentContext(userDataDir, {
    executablePath: job.chromium || "/usr/bin/chromium",
    headless: true,
    // getUserMedia needs a secure context; the test origin is plain http.
    args: FLAGS.concat(job.base ? [`--unsafely-treat-insecure-origin-as-secure=${job.base}`] : [], job.flags || []),
    viewport: { width: 1000, height: 640 },
  });
  await ctx.addInitScript(RECORD_PCS);
  const logs = [];
  ctx.on("page", (p) => p.on("console", (m) => logs.push(m.type() + ": " + m.text())));
  let server = null;
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
        server = await serveStatic(job.staticHost);
        const origin = `http://${job.staticHost}:${server.address().port}`;
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
        server = await serveStatic(job.staticHost, job.staticTls);
        const origin = `${job.staticTls ? "https" : "http"}://${job.staticHost}:${server.address().port}`;
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
  process.stdout.write(JSON.stringify(out) + "\n");
}

const killer = setTimeout(() => {
  process.stdout.write(JSON.stringify({ ok: false, kind: job.kind, error: "runner timeout" }) + "\n");
  process.exit(2);
}, (job.timeoutSecs || 55) * 1000);
main().then(() => { clearTimeout(killer); process.exit(0); });
