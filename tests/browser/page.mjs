// What the browser runners share: Chromium's flags (FLAGS, and CAPTURE_FLAGS
// for jobs that publish), the scripts a page gets before it loads
// (RECORD_PCS for every runner; TRACE, getStats sampled in the page) and the
// ABR demonstration's viewer job, run by Chromium (abr.mjs, playwright) and
// Firefox (firefox.mjs, puppeteer over WebDriver BiDi) alike.
import { execFileSync } from "node:child_process";

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// Every RTCPeerConnection the page makes, in window.__pcs, with the time
// it was made (pc.__created). Shared by every browser runner here.
// Headless Debian Chromium for every runner (run.mjs, abr.mjs).
export const FLAGS = [
  "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
  "--disable-background-networking", "--disable-component-update", "--disable-sync",
  "--autoplay-policy=no-user-gesture-required",
];
// The fake camera and microphone, for jobs that publish from a page only.
// Given to a viewer, Chromium starts its fake capture device all the same (a
// VideoCaptureService process drawing frames nobody asked for: 10-16% of a
// core per viewer, with five Chromiums on two cores in the ABR settle case).
export const CAPTURE_FLAGS = ["--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream"];

export const RECORD_PCS = `
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

// Receiving and sending stats of a page, summed over its peer connections;
// window.__startTrace samples them every 50 ms into window.__trace in the
// page itself, so a slow round trip to node cannot look like a freeze, and
// a freeze is timed to within 50 ms.
export const TRACE = `
  (() => {
    window.__summary = async () => {
      const s = { t: Date.now(), f: 0, h: 0, w: 0, a: 0, as: 0, vb: 0, freezes: 0, freezeSecs: 0, state: null, layers: [] };
      for (const pc of window.__pcs || []) {
        if (pc.connectionState === "closed") continue;
        s.state = pc.connectionState;
        const r = await pc.getStats();
        r.forEach((x) => {
          if (x.type === "inbound-rtp" && x.kind === "video") {
            s.f += x.framesDecoded || 0; s.vb += x.bytesReceived || 0;
            s.w = x.frameWidth || s.w; s.h = x.frameHeight || s.h;
            s.freezes += x.freezeCount || 0; s.freezeSecs += x.totalFreezesDuration || 0;
            // For reading a switch in the per-viewer JSON (cumulative).
            s.kf = (s.kf || 0) + (x.keyFramesDecoded || 0); s.fr = (s.fr || 0) + (x.framesReceived || 0);
            s.pr = (s.pr || 0) + (x.packetsReceived || 0); s.pl = (s.pl || 0) + (x.packetsLost || 0);
            s.nack = (s.nack || 0) + (x.nackCount || 0); s.pli = (s.pli || 0) + (x.pliCount || 0);
            s.jbd = (s.jbd || 0) + (x.jitterBufferDelay || 0); s.jbe = (s.jbe || 0) + (x.jitterBufferEmittedCount || 0);
          }
          if (x.type === "inbound-rtp" && x.kind === "audio") { s.a += x.packetsReceived || 0; s.as += x.totalSamplesReceived || 0; }
          if (x.type === "outbound-rtp" && x.kind === "video") s.layers.push({ rid: x.rid || null, h: x.frameHeight || 0, framesSent: x.framesSent || 0,
            targetBitrate: x.targetBitrate || 0, limitedBy: x.qualityLimitationReason || null });
        });
      }
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
          delete s.layers;
          window.__trace.push(s);
          if (window.__trace.length > 6000) window.__trace.shift();
        } finally { busy = false; }
      }, 50);
    };
  })();
`;

// Whether the newest trace sample satisfies a step's condition; `since` is
// the sample the step started at.
function holds(c, s, since) {
  if (!c) return true;
  if (c.maxH != null && !(s.h > 0 && s.h <= c.maxH)) return false;
  if (c.minH != null && !(s.h >= c.minH)) return false;
  if (c.newFrames != null && !(s.f - since.f >= c.newFrames)) return false;
  if (c.audio != null && !(s.a >= c.audio)) return false;
  return true;
}

// kind "view": the player page /play/{stream} (Auto) with getStats traced
// every 50 ms; job.steps run in order: wait until the condition holds (or
// `within` ms pass: the step and the rest fail), stay `hold` ms, then run
// the command `run` (argv, e.g. tc in cascade's namespace) and note when.
// `page` is a playwright or puppeteer page (the same evaluate/goto calls).
export async function view(page, job, out) {
  const base = job.base;
  out.openedAt = Date.now();
  await page.goto(`${base}/play/${job.stream}`, { waitUntil: "domcontentloaded" });
  await page.evaluate(() => window.__startTrace());
  out.loadedAt = Date.now();
  out.steps = [];
  const last = async () => page.evaluate(() => window.__trace[window.__trace.length - 1] || { t: Date.now(), f: 0, h: 0, a: 0 });
  for (const step of job.steps || []) {
    const since = await last();
    const end = Date.now() + (step.within ?? 30000);
    let s = since;
    while (!holds(step.until, s, since) && Date.now() < end) { await sleep(100); s = await last(); }
    const rec = { label: step.label, reached: holds(step.until, s, since), reachedAt: Date.now() };
    out.steps.push(rec);
    if (!rec.reached) break;
    process.stdout.write(`STEP ${step.label} ${rec.reachedAt}\n`);
    await sleep(step.hold || 0);
    if (step.run) {
      execFileSync(step.run[0], step.run.slice(1));
      rec.ranAt = Date.now();
    }
  }
  out.trace = await page.evaluate(() => window.__trace);
  out.stats = await page.evaluate(() => (document.getElementById("stats") || {}).textContent || null);
}
