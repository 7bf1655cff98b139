// Drives the Meshward dashboard in headless Chromium: signs in with an operator token,
// waits until the service graph has rendered the expected workloads, and prints what the
// page shows as JSON (nodes, edges with their classes, the denials table) for the Rust
// test to check; saves a screenshot.
//
// usage: node dashboard.mjs URL TOKEN_FILE SCREENSHOT WORKLOAD...
import { readFileSync } from "node:fs";
import { chromium } from "playwright-core";

const [url, tokenFile, screenshot, ...workloads] = process.argv.slice(2);
const token = readFileSync(tokenFile, "utf8").trim();
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
try {
  const page = await browser.newPage({ viewport: { width: 1400, height: 900 } });
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));
  await page.goto(url);
  await page.fill("#token", token);
  await Promise.all([page.waitForNavigation(), page.click("#signin")]);
  // The graph: every expected workload, and at least one edge with denials.
  await page.waitForFunction((want) => {
    const m = window.meshward;
    if (!m || !m.ready) return false;
    const ids = m.cy.nodes().map((n) => n.id());
    return want.every((w) => ids.includes(w)) && m.cy.edges(".denied").length > 0 && m.cy.edges(".ok").length > 0;
  }, workloads, { timeout: 30000, polling: 250 });
  await page.waitForTimeout(500); // let the layout settle for the screenshot
  const shown = await page.evaluate(() => ({
    nodes: window.meshward.cy.nodes().map((n) => n.id()).sort(),
    edges: window.meshward.cy.edges().map((e) => ({
      source: e.source().id(), target: e.target().id(), classes: e.classes(), label: e.data("label"),
    })),
    denials: [...document.querySelectorAll("#denials tbody tr")].map((r) => r.innerText),
    history: [...document.querySelectorAll("#history tbody tr")].map((r) => r.innerText),
    certificates: [...document.querySelectorAll("#certs tbody tr")].map((r) => r.innerText),
    anomalies: [...document.querySelectorAll("#anomalies tbody tr")].map((r) => r.innerText),
    faults: [...document.querySelectorAll("#faults tbody tr")].map((r) => r.innerText),
    revision: document.querySelector("#rev").innerText,
  }));
  await page.screenshot({ path: screenshot, fullPage: true });
  console.log(JSON.stringify({ ...shown, errors }));
} finally {
  await browser.close();
}
