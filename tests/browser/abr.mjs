// Chromium jobs of the ABR demonstration (tests/browser_abr.rs): one process
// per role, so the publisher runs in cascade's namespace and each viewer in
// its own, behind its own tbf-shaped link. Prints progress lines, then one
// JSON object.
//
// usage: node abr.mjs '<json job>'
//   kind "publish": tests/browser/simulcast.html publishes q/h/f over WHIP;
//     prints "PUBLISHING <renditions json>" once /api/streams lists three
//     renditions with bitrates (the top one ≥ job.minTopBps), then holds for job.secs (or until
//     job.stopFile exists).
//   kind "view": the player page /play/{stream} (Auto); getStats every
//     50 ms in the page (epoch ms timestamps, so the test can line them up
//     with its own tc changes); job.steps run in order: wait until the
//     condition holds (or `within` ms pass: the step and the rest fail), stay
//     `hold` ms, then run the command `run` (argv, e.g. tc in cascade's
//     namespace) and note when.
import { chromium } from "playwright-core";
import http from "node:http";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { CAPTURE_FLAGS, FLAGS, RECORD_PCS, TRACE, view } from "./page.mjs";

const here = path.dirname(fileURLToPath(import.meta.url));
const job = JSON.parse(process.argv[2] || "{}");
const out = { ok: false, kind: job.kind };
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));


function serveSimulcastPage(host) {
  const server = http.createServer((req, res) => {
    if (new URL(req.url, "http://x").pathname !== "/simulcast.html") { res.writeHead(404); res.end(); return; }
    res.writeHead(200, { "content-type": "text/html" });
    fs.createReadStream(path.join(here, "simulcast.html")).pipe(res);
  });
  return new Promise((resolve) => server.listen(0, host, () => resolve(server)));
}

async function main() {
  const userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), "cascade-chromium-"));
  const server = job.kind === "publish" ? await serveSimulcastPage(job.staticHost) : null;
  const staticOrigin = server ? `http://${job.staticHost}:${server.address().port}` : null;
  const ctx = await chromium.launchPersistentContext(userDataDir, {
    executablePath: job.chromium || "/usr/bin/chromium",
    headless: true,
    // getUserMedia needs a secure context; the test origins are plain http.
    args: FLAGS.concat(job.kind === "publish" ? CAPTURE_FLAGS : [],
      staticOrigin ? [`--unsafely-treat-insecure-origin-as-secure=${staticOrigin}`] : [],
      job.fakeVideo ? [`--use-file-for-fake-video-capture=${job.fakeVideo}`] : []),
    viewport: { width: 800, height: 500 },
  });
  await ctx.addInitScript(RECORD_PCS);
  await ctx.addInitScript(TRACE);
  const logs = [];
  try {
    const base = job.base;
    const page = await ctx.newPage();
    page.on("console", (m) => logs.push(m.type() + ": " + m.text()));
    if (job.kind === "publish") {
      const url = `${base}/whip/${job.stream}`;
      await page.goto(`${staticOrigin}/simulcast.html?url=${encodeURIComponent(url)}&token=${encodeURIComponent(job.token)}` +
        (job.codec ? `&codec=${encodeURIComponent(job.codec)}` : "") + (job.minKbps ? `&minKbps=${job.minKbps}` : "") + "&keepRes=1", { waitUntil: "domcontentloaded" });
      const t0 = Date.now();
      let st = {};
      while (Date.now() - t0 < 15000) {
        st = await page.evaluate(() => ({ state: window.pub.state, error: window.pub.error, status: window.pub.status }));
        if (["connected", "error", "failed"].includes(st.state)) break;
        await sleep(100);
      }
      if (st.state !== "connected") throw new Error("simulcast publisher did not connect: " + JSON.stringify(st));
      // Chromium may start its top layer seconds late: wait for all three.
      let streams = null, three = false;
      while (Date.now() - t0 < (job.renditionsWaitSecs || 30) * 1000) {
        streams = await (await fetch(`${base}/api/streams`)).json().catch(() => null);
        const s = (streams || []).find((x) => x.stream === job.stream);
        three = !!s && (s.renditions || []).length === 3 && s.renditions.every((r) => r.bitrate_bps > 0 && r.height > 0)
          && Math.max(...s.renditions.map((r) => r.bitrate_bps)) >= (job.minTopBps || 0);
        if (three) break;
        await sleep(250);
      }
      out.liveAfterMs = Date.now() - t0;
      if (!three) throw new Error("no three renditions with bitrates: " + JSON.stringify(streams) +
        " layers " + JSON.stringify((await page.evaluate(() => window.__summary())).layers));
      const s = streams.find((x) => x.stream === job.stream);
      process.stdout.write("PUBLISHING " + JSON.stringify(s.renditions) + "\n");
      out.layersAtStart = (await page.evaluate(() => window.__summary())).layers;
      const deg = await page.evaluate(() => ({ degradation: window.pub.degradation, error: window.pub.keepResError }));
      process.stderr.write("publisher degradation preference: " + JSON.stringify(deg) + "\n");
      // Until job.secs pass or the test creates job.stopFile (a clean exit
      // takes Chromium down with it; a killed node might not).
      const holdEnd = Date.now() + job.secs * 1000;
      while (Date.now() < holdEnd && !(job.stopFile && fs.existsSync(job.stopFile))) await sleep(200);
      out.layersAtEnd = (await page.evaluate(() => window.__summary())).layers;
    } else if (job.kind === "view") {
      await view(page, job, out);
    } else {
      throw new Error("unknown job kind " + job.kind);
    }
    out.ok = true;
  } catch (e) {
    out.error = String(e && e.stack || e);
  } finally {
    out.logs = logs.slice(-20);
    if (server) server.close();
    await ctx.close().catch(() => {});
    fs.rmSync(userDataDir, { recursive: true, force: true });
  }
  // Waits for the pipe to take it all: process.exit right after a large
  // write cuts it off (at 128 KiB here).
  await new Promise((resolve) => process.stdout.write(JSON.stringify(out) + "\n", resolve));
}

const killer = setTimeout(() => {
  process.stdout.write(JSON.stringify({ ok: false, kind: job.kind, error: "runner timeout" }) + "\n");
  process.exit(2);
}, (job.timeoutSecs || 55) * 1000);
main().then(() => { clearTimeout(killer); process.exit(0); });
