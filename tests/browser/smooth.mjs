// Smoothness of video in headless Chromium, several players side by side
// (tests/browser_bframes.rs runs it inside a network namespace): each page
// plays one URL; after a warm-up, getStats() inbound-rtp video counters are
// read twice `secs` apart, and every presented frame's number is read back
// from a barcode that ffmpeg drew into the picture (requestVideoFrameCallback
// + canvas), so display order, repeats and skips are seen as a viewer sees them.
//
// usage: node smooth.mjs '{"pages":[{"label":"a","url":"http://…/play/s"}],"warmSecs":3,"secs":12}'
import { chromium } from "playwright-core";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { RECORD_PCS } from "./page.mjs";

const job = JSON.parse(process.argv[2] || "{}");
const out = { ok: false, results: {} };

// With job.sei: every received video frame's SEI tag (loadtest::tag, put
// there by the RTMP publisher with its send wall clock) is read through
// encoded insertable streams, keyed by RTP timestamp; the barcode reader then
// knows, per presented frame, when its publisher sent it.
const SEI_HOOK = `
  (() => {
    const Orig = window.RTCPeerConnection;
    window.__sent = new Map();
    const UUID = Array.from("cascade-loadtest", (c) => c.charCodeAt(0));
    const sentMs = (d) => {
      outer: for (let i = 0; i + 32 <= d.length; i++) {
        for (let k = 0; k < 16; k++) if (d[i + k] !== UUID[k]) continue outer;
        const b = [];
        let zeros = 0;
        for (let j = i + 16; j < d.length && b.length < 16; j++) {
          const x = d[j];
          if (zeros >= 2 && x === 3) { zeros = 0; continue; }
          zeros = x === 0 ? zeros + 1 : 0;
          b.push(x);
        }
        if (b.length < 16) return null;
        let us = 0;
        for (let k = 8; k < 16; k++) us = us * 256 + b[k];
        return us / 1000;
      }
      return null;
    };
    window.RTCPeerConnection = function (cfg, ...rest) {
      const pc = new Orig({ ...(cfg || {}), encodedInsertableStreams: true }, ...rest);
      pc.addEventListener("track", (e) => {
        const video = e.track.kind === "video";
        const { readable, writable } = e.receiver.createEncodedStreams();
        readable.pipeThrough(new TransformStream({ transform(frame, ctl) {
          if (video) {
            const s = sentMs(new Uint8Array(frame.data));
            const md = frame.getMetadata ? frame.getMetadata() : {};
            if (s !== null) window.__sent.set(md.rtpTimestamp ?? frame.timestamp, s);
          }
          ctl.enqueue(frame);
        } })).pipeTo(writable);
      });
      return pc;
    };
    window.RTCPeerConnection.prototype = Orig.prototype;
    Object.setPrototypeOf(window.RTCPeerConnection, Orig);
  })();
`;

// Bits of the barcode ffmpeg draws (tests/browser_bframes.rs): BITS boxes of
// BOX×BOX pixels along the top edge, box k white when bit k of the frame number is set.
const BITS = 10;
const BOX = 32;

async function videoStats(page) {
  return page.evaluate(async () => {
    for (const pc of window.__pcs || []) {
      if (pc.connectionState === "closed") continue;
      let v = null, a = null;
      (await pc.getStats()).forEach((x) => {
        if (x.type === "inbound-rtp" && x.kind === "video") v = x;
        if (x.type === "inbound-rtp" && x.kind === "audio") a = x;
      });
      if (v) {
        return {
          t: performance.now(), framesDecoded: v.framesDecoded || 0, framesDropped: v.framesDropped || 0,
          framesReceived: v.framesReceived || 0, keyFramesDecoded: v.keyFramesDecoded || 0,
          freezeCount: v.freezeCount || 0, totalFreezesDuration: v.totalFreezesDuration || 0,
          pauseCount: v.pauseCount || 0, jitterBufferDelay: v.jitterBufferDelay || 0,
          jitterBufferEmittedCount: v.jitterBufferEmittedCount || 0,
          totalInterFrameDelay: v.totalInterFrameDelay || 0,
          totalSquaredInterFrameDelay: v.totalSquaredInterFrameDelay || 0,
          packetsLost: v.packetsLost || 0, nackCount: v.nackCount || 0, pliCount: v.pliCount || 0,
          totalProcessingDelay: v.totalProcessingDelay || 0, totalDecodeTime: v.totalDecodeTime || 0,
          decoder: v.decoderImplementation || null, width: v.frameWidth || 0,
          audioJitterBufferDelay: a ? a.jitterBufferDelay || 0 : 0,
          audioJitterBufferEmittedCount: a ? a.jitterBufferEmittedCount || 0 : 0,
        };
      }
    }
    return null;
  });
}

// Reads the barcode of every presented frame into window.__shown.
function installBarcodeReader({ bits, box }) {
  const v = document.querySelector("video");
  if (!v || !v.requestVideoFrameCallback) return false;
  const c = document.createElement("canvas");
  c.width = bits * box;
  c.height = box;
  const ctx = c.getContext("2d", { willReadFrequently: true });
  window.__shown = [];
  const cb = (now, md) => {
    ctx.drawImage(v, 0, 0, bits * box, box, 0, 0, bits * box, box);
    const px = ctx.getImageData(0, 0, bits * box, box).data;
    let n = 0;
    for (let k = 0; k < bits; k++) {
      const i = ((box >> 1) * bits * box + k * box + (box >> 1)) * 4;
      if (px[i] > 128) n |= 1 << k;
    }
    // captureTime: the sender's capture instant from RTCP SR (cascade stamps
    // frames with their ingest wall clock), on this page's clock.
    window.__shown.push([n, now, md.presentedFrames, md.rtpTimestamp ?? null,
      md.captureTime ?? null, md.receiveTime ?? null, md.expectedDisplayTime ?? null,
      // Publish → expected display on the wall clock, when the frame had a tag.
      window.__sent && window.__sent.has(md.rtpTimestamp)
        ? performance.timeOrigin + md.expectedDisplayTime - window.__sent.get(md.rtpTimestamp) : null]);
    v.requestVideoFrameCallback(cb);
  };
  v.requestVideoFrameCallback(cb);
  return true;
}

function quantile(sorted, q) {
  if (!sorted.length) return null;
  return sorted[Math.min(sorted.length - 1, Math.round((sorted.length - 1) * q))];
}

// Display-order analysis of barcode numbers (modulo 2^BITS).
function analyse(shown) {
  const mod = 1 << BITS;
  let backwards = 0, repeats = 0, skipped = 0, hitches = 0;
  const gaps = [];
  for (let i = 1; i < shown.length; i++) {
    const d = (shown[i][0] - shown[i - 1][0] + mod) % mod;
    if (d === 0) repeats++;
    else if (d > mod / 2) backwards++;
    else skipped += d - 1;
    const dt = shown[i][1] - shown[i - 1][1];
    gaps.push(dt);
    if (dt > 100) hitches++;
  }
  gaps.sort((a, b) => a - b);
  // Ingest (SR capture time) → expected display, and packet receipt → display.
  const lat = shown.filter((f) => f[4] != null && f[6] != null).map((f) => f[6] - f[4]).sort((a, b) => a - b);
  const pub = shown.filter((f) => f[7] != null).map((f) => f[7]).sort((a, b) => a - b);
  const rx = shown.filter((f) => f[5] != null && f[6] != null).map((f) => f[6] - f[5]).sort((a, b) => a - b);
  const mean = gaps.length ? gaps.reduce((a, b) => a + b, 0) / gaps.length : null;
  const sd = gaps.length ? Math.sqrt(gaps.reduce((a, b) => a + (b - mean) ** 2, 0) / gaps.length) : null;
  return { presented: shown.length, backwards, repeats, skipped, hitchesOver100ms: hitches,
    intervalMeanMs: mean, intervalSdMs: sd, intervalP99Ms: quantile(gaps, 0.99), intervalMaxMs: quantile(gaps, 1),
    captureToDisplayP50Ms: quantile(lat, 0.5), captureToDisplayP99Ms: quantile(lat, 0.99),
    receiveToDisplayP50Ms: quantile(rx, 0.5), receiveToDisplayP99Ms: quantile(rx, 0.99),
    publishToDisplaySamples: pub.length, publishToDisplayP50Ms: quantile(pub, 0.5),
    publishToDisplayP99Ms: quantile(pub, 0.99), publishToDisplayMaxMs: quantile(pub, 1) };
}

function delta(a, b) {
  const n = b.framesDecoded - a.framesDecoded;
  const ifd = b.totalInterFrameDelay - a.totalInterFrameDelay;
  const sq = b.totalSquaredInterFrameDelay - a.totalSquaredInterFrameDelay;
  const mean = n > 0 ? ifd / n : null;
  const jb = b.jitterBufferEmittedCount - a.jitterBufferEmittedCount;
  return {
    secs: (b.t - a.t) / 1000, framesDecoded: n, framesDropped: b.framesDropped - a.framesDropped,
    framesReceived: b.framesReceived - a.framesReceived, keyFramesDecoded: b.keyFramesDecoded - a.keyFramesDecoded,
    freezeCount: b.freezeCount - a.freezeCount, totalFreezesDuration: b.totalFreezesDuration - a.totalFreezesDuration,
    pauseCount: b.pauseCount - a.pauseCount,
    jitterBufferMs: jb > 0 ? (1000 * (b.jitterBufferDelay - a.jitterBufferDelay)) / jb : null,
    interFrameMeanMs: mean !== null ? 1000 * mean : null,
    // Variance of the inter-frame delay, as webrtc-stats defines it.
    interFrameSdMs: mean !== null ? 1000 * Math.sqrt(Math.max(0, sq / n - mean * mean)) : null,
    // First packet received → decoded, per frame (jitter buffer + decode).
    processingMs: n > 0 ? (1000 * (b.totalProcessingDelay - a.totalProcessingDelay)) / n : null,
    decodeMs: n > 0 ? (1000 * (b.totalDecodeTime - a.totalDecodeTime)) / n : null,
    // Audio's jitter buffer: lip sync holds video back to match it.
    audioJitterBufferMs: b.audioJitterBufferEmittedCount > a.audioJitterBufferEmittedCount
      ? (1000 * (b.audioJitterBufferDelay - a.audioJitterBufferDelay)) / (b.audioJitterBufferEmittedCount - a.audioJitterBufferEmittedCount) : null,
    packetsLost: b.packetsLost - a.packetsLost, nackCount: b.nackCount - a.nackCount, pliCount: b.pliCount - a.pliCount,
    decoder: b.decoder, width: b.width,
  };
}

async function main() {
  const userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), "cascade-chromium-"));
  const origins = [...new Set(job.pages.map((p) => new URL(p.url).origin))];
  const ctx = await chromium.launchPersistentContext(userDataDir, {
    executablePath: job.chromium || "/usr/bin/chromium",
    headless: true,
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync",
      "--autoplay-policy=no-user-gesture-required",
      // Background tabs must not be throttled: every page is measured at once.
      "--disable-background-timer-throttling", "--disable-renderer-backgrounding",
      "--disable-backgrounding-occluded-windows"].concat(job.flags || []),
    viewport: { width: 1000, height: 640 },
  });
  await ctx.addInitScript(RECORD_PCS);
  if (job.sei) await ctx.addInitScript(SEI_HOOK);
  const logs = [];
  try {
    // One page with every player in its own visible iframe: a background
    // tab gets no requestVideoFrameCallback, a visible iframe does.
    const page = await ctx.newPage();
    page.on("console", (m) => logs.push(m.type() + ": " + m.text()));
    const cols = Math.min(3, job.pages.length);
    const cell = { w: 480, h: 290 };
    await page.setViewportSize({ width: cols * cell.w + 20, height: Math.ceil(job.pages.length / cols) * cell.h + 20 });
    const html = job.pages.map((p) => `<iframe src="${p.url}" allow="autoplay" width="${cell.w - 10}" height="${cell.h - 10}"></iframe>`).join("");
    await page.setContent(`<body style="margin:0">${html}</body>`, { waitUntil: "domcontentloaded" });
    const pages = [];
    for (const p of job.pages) {
      let frame = null;
      const until = Date.now() + 10000;
      while (!frame && Date.now() < until) {
        frame = page.frames().find((f) => f.url() === p.url);
        if (!frame) await new Promise((r) => setTimeout(r, 50));
      }
      if (!frame) throw new Error("no iframe for " + p.url);
      pages.push({ ...p, page: frame });
    }
    // First decoded frame everywhere, then the warm-up (start-up bursts).
    const end = Date.now() + (job.firstFrameSecs ?? 20) * 1000;
    for (const p of pages) {
      while (Date.now() < end) {
        const s = await videoStats(p.page);
        if (s && s.framesDecoded > 0) break;
        await new Promise((r) => setTimeout(r, 100));
      }
      p.barcode = await p.page.evaluate(installBarcodeReader, { bits: BITS, box: BOX }).catch(() => false);
    }
    await new Promise((r) => setTimeout(r, (job.warmSecs ?? 3) * 1000));
    for (const p of pages) {
      p.s0 = await videoStats(p.page);
      p.shownFrom = await p.page.evaluate(() => (window.__shown || []).length);
    }
    await new Promise((r) => setTimeout(r, (job.secs ?? 12) * 1000));
    for (const p of pages) {
      const s1 = await videoStats(p.page);
      const shown = await p.page.evaluate((from) => (window.__shown || []).slice(from), p.shownFrom);
      out.results[p.label] = {
        url: p.url,
        stats: p.s0 && s1 ? delta(p.s0, s1) : null,
        display: p.barcode ? analyse(shown) : null,
        firstShown: shown.slice(0, job.keepShown || 0),
        // The player page's status line (e.g. a 406 naming the codec).
        status: await p.page.evaluate(() => { const e = document.getElementById("status"); return e ? e.textContent : null; }),
        tagged: await p.page.evaluate(() => (window.__sent ? { n: window.__sent.size, last: [...window.__sent.entries()].slice(-3) } : null)),
      };
    }
    out.origins = origins;
    out.ok = true;
  } catch (e) {
    out.error = String((e && e.stack) || e);
  } finally {
    out.logs = logs.slice(-20);
    await ctx.close().catch(() => {});
    fs.rmSync(userDataDir, { recursive: true, force: true });
  }
  process.stdout.write(JSON.stringify(out) + "\n");
}

const killer = setTimeout(() => {
  process.stdout.write(JSON.stringify({ ok: false, error: "runner timeout" }) + "\n");
  process.exit(2);
}, (job.timeoutSecs || 55) * 1000);
main().then(() => { clearTimeout(killer); process.exit(0); });
