// The browser test: serves index.html and dist/ from a tiny static server on
// 127.0.0.1:PAGE_PORT, opens the page in Debian's Chromium (headless, via
// playwright-core, a fresh profile) against the pipelined server at
// SERVER_URL, and checks what the page rendered:
//
//   1. from http://127.0.0.1:PAGE_PORT (the origin the server allows):
//      create, run, watch to the end, get, list, and a NOT_FOUND, all over
//      gRPC-Web;
//   2. from http://localhost:PAGE_PORT (another origin, not allowed): the
//      browser refuses the call after the CORS preflight.
//
// Env: SERVER_URL (http://127.0.0.1:PORT), PAGE_PORT, CHROMIUM (default
// /usr/bin/chromium). Exits non-zero on any failure, printing the page's
// console. Screenshots go to out/.
import { mkdtemp, readFile, rm, mkdir } from "node:fs/promises";
import http from "node:http";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

const here = path.dirname(fileURLToPath(import.meta.url));
const serverUrl = process.env.SERVER_URL;
const pagePort = Number(process.env.PAGE_PORT);
const executablePath = process.env.CHROMIUM || "/usr/bin/chromium";
if (!serverUrl || !pagePort) {
  console.error("SERVER_URL and PAGE_PORT are required");
  process.exit(2);
}

// Give up on the whole run after two minutes rather than hang.
const guard = setTimeout(() => {
  console.error("browser test: timed out after 120 s");
  process.exit(1);
}, 120_000);

const types = { ".html": "text/html", ".js": "text/javascript", ".map": "application/json" };

function serveStatic() {
  const files = new Map([
    ["/", "index.html"],
    ["/index.html", "index.html"],
    ["/dist/app.js", "dist/app.js"],
    ["/dist/app.js.map", "dist/app.js.map"],
  ]);
  const server = http.createServer(async (req, res) => {
    const pathname = new URL(req.url, "http://x").pathname;
    if (pathname === "/favicon.ico") {
      res.writeHead(204).end();
      return;
    }
    const file = files.get(pathname);
    if (!file) {
      res.writeHead(404).end();
      return;
    }
    const body = await readFile(path.join(here, file));
    res.writeHead(200, { "content-type": types[path.extname(file)] ?? "application/octet-stream" });
    res.end(body);
  });
  return new Promise((resolve, reject) => {
    server.once("error", reject);
    server.listen(pagePort, "127.0.0.1", () => resolve(server));
  });
}

function check(condition, what, detail) {
  if (!condition) {
    throw new Error(`expected ${what}${detail === undefined ? "" : `; got ${JSON.stringify(detail)}`}`);
  }
  console.log(`    ok: ${what}`);
}

/** Opens the page from `origin`, waits for it to finish, returns its JSON. */
async function openPage(context, origin, query, consoleLines, shot) {
  const page = await context.newPage();
  page.on("console", (m) => consoleLines.push(`[console.${m.type()}] ${m.text()}`));
  page.on("pageerror", (e) => consoleLines.push(`[pageerror] ${e.message}`));
  page.on("requestfailed", (r) =>
    consoleLines.push(`[requestfailed] ${r.method()} ${r.url()}: ${r.failure()?.errorText}`),
  );
  const url = `${origin}/?server=${encodeURIComponent(serverUrl)}${query}`;
  console.log(`==> ${url}`);
  await page.goto(url);
  await page.waitForSelector('body[data-state="done"], body[data-state="error"]', { timeout: 60_000 });
  await mkdir(path.join(here, "out"), { recursive: true });
  await page.screenshot({ path: path.join(here, "out", shot), fullPage: true });
  const state = await page.getAttribute("body", "data-state");
  const result = JSON.parse(await page.textContent("#result"));
  const summary = await page.textContent("#summary");
  console.log(`    page: ${summary}`);
  await page.close();
  return { state, result };
}

async function allowedOrigin(context, consoleLines) {
  const origin = `http://127.0.0.1:${pagePort}`;
  const { state, result } = await openPage(context, origin, "", consoleLines, "allowed.png");
  check(state === "done", "the page finished without error", result);
  check(result.version === 1, "CreatePipeline stored version 1", result.version);
  check(result.status === "SUCCEEDED", "the execution SUCCEEDED", result.status);
  check(
    JSON.stringify(result.steps) ===
      JSON.stringify([
        { name: "hello", status: "SUCCEEDED" },
        { name: "nap", status: "SUCCEEDED" },
        { name: "done", status: "SUCCEEDED" },
      ]),
    "steps hello, nap, done all SUCCEEDED",
    result.steps,
  );
  check(
    JSON.stringify(result.executionData) === JSON.stringify({ from: "chromium", greeting: "hello" }),
    "execution data: the input merged with hello's output",
    result.executionData,
  );
  check(result.labels?.client === "browser", "labels as given", result.labels);
  const seqs = result.events.map((e) => e.sequence);
  check(
    seqs.length > 0 && seqs.every((s, i) => s === i + 1),
    "WatchExecution streamed gapless events 1..n",
    seqs,
  );
  check(result.events[0].type === "EXECUTION_STARTED", "first event EXECUTION_STARTED", result.events[0]);
  check(
    result.events.at(-1).type === "EXECUTION_SUCCEEDED",
    "last event EXECUTION_SUCCEEDED, then the stream ended",
    result.events.at(-1),
  );
  check(result.listed === true, "ListPipelines lists the new pipeline");
  check(
    result.notFound?.code === "NotFound" && /not found/.test(result.notFound.rawMessage),
    "an unknown execution is NotFound, with the server's message",
    result.notFound,
  );
}

async function refusedOrigin(context, consoleLines) {
  const origin = `http://localhost:${pagePort}`;
  const { state, result } = await openPage(context, origin, "&expect=refused", consoleLines, "refused.png");
  check(state === "done" && result.refused === true, "the call from another origin was refused", result);
  check(
    consoleLines.some((l) => l.includes("blocked by CORS policy")),
    "Chromium blocked it by CORS policy",
  );
}

let failed = 0;
let passed = 0;
const staticServer = await serveStatic();
const profile = await mkdtemp(path.join(os.tmpdir(), "pipelined-chromium-"));
let context;
try {
  context = await chromium.launchPersistentContext(profile, {
    executablePath,
    headless: true,
    args: [
      "--headless",
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
  });
  console.log(`Chromium ${context.browser()?.version() ?? "(persistent context)"} from ${executablePath}`);
  for (const [name, scenario] of [
    ["allowed origin", allowedOrigin],
    ["refused origin", refusedOrigin],
  ]) {
    const consoleLines = [];
    try {
      await scenario(context, consoleLines);
      passed++;
    } catch (err) {
      failed++;
      console.error(`!!! FAILED (${name}): ${err.message}`);
      console.error("--- page console:");
      for (const line of consoleLines) console.error(line);
    }
  }
} catch (err) {
  failed++;
  console.error(`!!! FAILED: ${err.stack ?? err}`);
} finally {
  await context?.close().catch(() => {});
  staticServer.close();
  await rm(profile, { recursive: true, force: true });
  clearTimeout(guard);
}
console.log(`browser: ${passed} passed, ${failed} failed`);
process.exit(failed === 0 ? 0 : 1);
