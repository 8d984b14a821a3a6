// Plays cascade's player page in Debian's Firefox ESR (headless, driven over
// WebDriver BiDi by npm puppeteer-core, no geckodriver needed) and prints one
// JSON object: the first and last getStats() samples of the page's peer
// connections, like run.mjs does for Chromium.
//
// usage: node firefox.mjs '{"base": "http://IP:PORT", "stream": "live", "secs": 3}'
//
// With "kind": "view", the ABR demonstration's viewer instead (page.mjs,
// as abr.mjs runs it in Chromium): the player page traced, job.steps.
import puppeteer from "puppeteer-core";
import { RECORD_PCS, TRACE, view } from "./page.mjs";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";

const job = JSON.parse(process.argv[2] || "{}");
const out = { ok: false, browser: "firefox" };

async function sample(page) {
  return page.evaluate(async () => {
    const s = { pcs: (window.__pcs || []).length, framesDecoded: 0, audioPackets: 0, width: 0, state: null, created: null };
    for (const pc of window.__pcs || []) {
      s.state = pc.connectionState; s.created = pc.__created;
      const r = await pc.getStats();
      r.forEach((x) => {
        if (x.type === "inbound-rtp" && x.kind === "video") { s.framesDecoded += x.framesDecoded || 0; s.width = x.frameWidth || s.width; }
        if (x.type === "inbound-rtp" && x.kind === "audio") s.audioPackets += x.packetsReceived || 0;
      });
    }
    s.now = performance.now();
    return s;
  });
}

async function main() {
  const profile = fs.mkdtempSync(path.join(os.tmpdir(), "cascade-firefox-"));
  let browser = null;
  try {
    browser = await puppeteer.launch({
      browser: "firefox",
      executablePath: job.firefox || "/usr/bin/firefox-esr",
      headless: true,
      userDataDir: profile,
      extraPrefsFirefox: {
        "media.autoplay.default": 0,
        "media.navigator.streams.fake": true,
        "media.navigator.permission.disabled": true,
        // No phoning home from the closed test network.
        "app.update.enabled": false,
        "browser.shell.checkDefaultBrowser": false,
        "network.captive-portal-service.enabled": false,
      },
    });
    const page = await browser.newPage();
    await page.evaluateOnNewDocument(RECORD_PCS);
    out.userAgent = await browser.version();
    if (job.kind === "view") {
      await page.evaluateOnNewDocument(TRACE);
      await view(page, job, out);
    } else {
      await page.goto(`${job.base}/play/${job.stream}`, { waitUntil: "domcontentloaded" });
      let first = await sample(page);
      const end = Date.now() + 20000;
      while (first.framesDecoded === 0 && Date.now() < end) {
        await new Promise((r) => setTimeout(r, 50));
        first = await sample(page);
      }
      out.first = first;
      out.ttffMs = first.framesDecoded > 0 && first.created != null ? Math.round(first.now - first.created) : null;
      await new Promise((r) => setTimeout(r, (job.secs || 3) * 1000));
      out.last = await sample(page);
      out.pageStatus = await page.evaluate(() => (document.getElementById("status") || {}).textContent || null);
    }
    out.ok = true;
  } catch (e) {
    out.error = String((e && e.stack) || e);
  } finally {
    if (browser) await browser.close().catch(() => {});
    fs.rmSync(profile, { recursive: true, force: true });
  }
  // Waits for the pipe to take it all: process.exit right after a large
  // write (a view's trace) cuts it off.
  await new Promise((resolve) => process.stdout.write(JSON.stringify(out) + "\n", resolve));
}

const killer = setTimeout(() => {
  process.stdout.write(JSON.stringify({ ok: false, error: "runner timeout" }) + "\n");
  process.exit(2);
}, (job.timeoutSecs || 55) * 1000);
main().then(() => { clearTimeout(killer); process.exit(0); });
