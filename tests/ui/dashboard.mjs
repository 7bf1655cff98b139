// Drives the Meshward dashboard in headless Chromium: signs in with an operator token,
// waits until the service graph has rendered the expected workloads, and prints what the
// page shows as JSON (nodes, edges with their classes, the denials table, …) for the Rust
// test to check; saves a screenshot. It also checks the graph is readable: `overlaps` lists
// every pair of elements whose label-inclusive bounding boxes intersect (empty is good).
// Then it clicks the first edge with denials, waits for its details and time series, and
// reports them under `details`, with a second screenshot (`…-selected.png`).
//
// usage: node dashboard.mjs URL TOKEN_FILE SCREENSHOT WORKLOAD...
//   MESHWARD_UI_MIN_NODES=N  wait for at least N nodes instead of the listed workloads
//   CHROMIUM=path            the browser (default /usr/bin/chromium)
import { readFileSync } from "node:fs";
import { chromium } from "playwright-core";

const [url, tokenFile, screenshot, ...workloads] = process.argv.slice(2);
if (!url || !tokenFile || !screenshot) {
  console.error("usage: node dashboard.mjs URL TOKEN_FILE SCREENSHOT WORKLOAD...  (or MESHWARD_UI_MIN_NODES=N)");
  process.exit(2);
}
const minNodes = process.env.MESHWARD_UI_MIN_NODES ? Number(process.env.MESHWARD_UI_MIN_NODES) : null;
if (minNodes != null && !(Number.isInteger(minNodes) && minNodes > 0)) {
  console.error(`MESHWARD_UI_MIN_NODES must be a positive integer, not ${JSON.stringify(process.env.MESHWARD_UI_MIN_NODES)}`);
  process.exit(2);
}
const selectedShot = /\.png$/i.test(screenshot) ? screenshot.replace(/\.png$/i, "-selected.png") : `${screenshot}-selected.png`;
const token = readFileSync(tokenFile, "utf8").trim();
const TIMEOUT = 30000;

class Failed extends Error {}
const errors = [];
const report = (msg) => { if (!errors.includes(msg)) errors.push(msg); }; // the page retries every 3 s

// What the page shows, for a timeout's message.
function pageState() {
  const m = window.meshward;
  return {
    url: location.href, title: document.title, ready: m?.ready, updates: m?.updates, layoutDone: m?.layoutDone,
    nodes: m?.cy?.nodes().map((n) => n.id()), edges: m?.cy?.edges().map((e) => `${e.id()} ${e.classes().join(" ")}`),
    selected: m?.cy?.elements(":selected").map((e) => e.id()), seriesFor: m?.seriesFor,
    details: document.querySelector("#details")?.innerText?.slice(0, 300),
  };
}
async function waitFor(page, what, fn, arg) {
  try {
    await page.waitForFunction(fn, arg, { timeout: TIMEOUT, polling: 250 });
  } catch (e) {
    if (e.name !== "TimeoutError") throw e;
    const seen = await page.evaluate(pageState).catch((x) => `(page unreadable: ${x})`);
    throw new Failed(`dashboard test: timed out after ${TIMEOUT / 1000}s waiting for ${what}\npage: ${JSON.stringify(seen)}\nerrors: ${JSON.stringify(errors)}`);
  }
}

// Every pair of nodes (and edge labels currently drawn) whose label-inclusive boxes intersect,
// in model coordinates; and the elements that are not wholly inside the visible graph.
function readability() {
  const cy = window.meshward.cy, boxes = [];
  cy.nodes().forEach((n) => boxes.push([n.id(), n.boundingBox({ includeLabels: true, includeOverlays: false, includeUnderlays: false })]));
  cy.edges().forEach((e) => {
    if (!e.visible() || !e.style("label")) return;
    const b = e.boundingBox({ includeNodes: false, includeEdges: false, includeLabels: true, includeOverlays: false, includeUnderlays: false });
    if (b.w > 0 && b.h > 0 && isFinite(b.w)) boxes.push([e.id(), b]);
  });
  const overlaps = [];
  for (let i = 0; i < boxes.length; i++) for (let j = i + 1; j < boxes.length; j++) {
    const [a, p] = boxes[i], [b, q] = boxes[j];
    if (p.x1 < q.x2 && q.x1 < p.x2 && p.y1 < q.y2 && q.y1 < p.y2) overlaps.push([a, b]);
  }
  const ext = cy.extent();
  const offscreen = boxes.filter(([, b]) => b.x1 < ext.x1 - 0.5 || b.x2 > ext.x2 + 0.5 || b.y1 < ext.y1 - 0.5 || b.y2 > ext.y2 + 0.5).map(([id]) => id);
  const label_px = +(parseFloat(cy.nodes().first().style("font-size") || 0) * cy.zoom()).toFixed(1);
  return { overlaps, offscreen, zoom: +cy.zoom().toFixed(3), label_px, layout: window.meshward.layout ?? null };
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
try {
  const page = await browser.newPage({ viewport: { width: 1400, height: 900 } });
  page.on("pageerror", (e) => report(String(e)));
  page.on("console", (m) => {
    const where = m.location()?.url || "";
    // The browser's own favicon fetch (the sign-in page has none) is not the page's error.
    if (m.type() === "error" && !/\/favicon\.ico$/.test(where)) report(`console: ${m.text()}${where ? ` (${where})` : ""}`);
  });
  await page.goto(url);
  await page.fill("#token", token);
  await Promise.all([page.waitForNavigation(), page.click("#signin")]);
  if (minNodes != null) {
    await waitFor(page, `at least ${minNodes} nodes in the graph`, (n) => {
      const m = window.meshward;
      return !!(m && m.ready && m.layoutDone > 0 && m.cy.nodes().length >= n);
    }, minNodes);
  } else {
    // The graph: every expected workload, and at least one edge with denials.
    await waitFor(page, `the workloads ${workloads.join(", ")} with a denied and an allowed edge`, (want) => {
      const m = window.meshward;
      if (!m || !m.ready || !(m.layoutDone > 0)) return false;
      const ids = m.cy.nodes().map((n) => n.id());
      return want.every((w) => ids.includes(w)) && m.cy.edges(".denied").length > 0 && m.cy.edges(".ok").length > 0;
    }, workloads);
  }
  await page.evaluate(() => document.fonts.ready);
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
    rollout: { state: window.meshward.rollout, text: document.querySelector("#rollout-body").innerText, edges: [...document.querySelectorAll("#rollout-edges tbody tr")].map((r) => r.innerText) },
    revision: document.querySelector("#rev").innerText,
  }));
  const { overlaps, offscreen, zoom, label_px, layout } = await page.evaluate(readability);
  await page.screenshot({ path: screenshot, fullPage: true });

  // Click (a real mouse click) the first edge with denials; its details and series follow.
  let details = null;
  // The point to click: the edge's midpoint, or a point along it that cytoscape's own hit test
  // gives to this edge (another edge may cross at the midpoint). The page is scrolled to it
  // first, and cytoscape gets a moment to see the scroll before the click.
  const pick = () => {
    const cy = window.meshward.cy;
    const e = cy.edges().filter((x) => (x.data("denied") || 0) > 0)[0];
    if (!e) return null;
    const m = e.midpoint(), s = e.sourceEndpoint(), t = e.targetEndpoint();
    const candidates = [m, ...[0.4, 0.6, 0.3, 0.7, 0.2, 0.8].map((f) => ({ x: s.x + (t.x - s.x) * f, y: s.y + (t.y - s.y) * f }))];
    const hits = (p) => { try { return cy.renderer().findNearestElements(p.x, p.y, true, false)[0] === e; } catch { return true; } };
    const p = candidates.find(hits) || m;
    const z = cy.zoom(), pan = cy.pan(), rendered = { x: p.x * z + pan.x, y: p.y * z + pan.y };
    const r = cy.container().getBoundingClientRect();
    return { id: e.id(), source: e.source().id(), target: e.target().id(), x: r.left + rendered.x, y: r.top + rendered.y, top: r.top };
  };
  let target = await page.evaluate(pick);
  if (target) {
    await page.evaluate((y) => window.scrollBy(0, y - window.innerHeight / 2), target.y);
    await page.waitForTimeout(300);
    target = await page.evaluate(pick);
  }
  if (target) {
    await page.mouse.click(target.x, target.y);
    await waitFor(page, `the details and series of ${target.id} after clicking it at (${target.x.toFixed(0)}, ${target.y.toFixed(0)})`, (t) => {
      const d = document.querySelector("#details"), m = window.meshward;
      return !!(d && d.innerText.includes(`${t.source} → ${t.target}`) && m.seriesFor === t.id && m.series
        && document.querySelector("#series").dataset.for === t.id && document.querySelector("#series svg"));
    }, target);
    details = await page.evaluate((t) => ({
      edge: t.id,
      details: document.querySelector("#details").innerText,
      series_markers: document.querySelectorAll("#series line.marker-line").length,
      series_points: window.meshward.series.buckets.length,
      selected_overlaps: [],
    }), target);
    details.selected_overlaps = (await page.evaluate(readability)).overlaps;
    await page.screenshot({ path: selectedShot, fullPage: true });
  }
  const burning = await page.evaluate(() => window.meshward.cy.nodes(".burning").length);
  console.log(JSON.stringify({ ...shown, burning, overlaps, offscreen, zoom, label_px, layout, details, screenshots: [screenshot, ...(target ? [selectedShot] : [])], errors }));
} catch (e) {
  if (!(e instanceof Failed)) throw e;
  console.error(e.message);
  process.exitCode = 1;
} finally {
  await browser.close();
}
