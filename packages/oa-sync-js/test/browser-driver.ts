/**
 * A headless Chromium (Debian's /usr/bin/chromium, driven by playwright-core: no browser
 * download) that obeys JSON commands on stdin, one per line, and answers one JSON line each.
 * tests/web/test_browser.py drives it so that Python can restart the server mid-test.
 *
 *   {"cmd": "open", "url": "..."}                          → {"ok": true}
 *   {"cmd": "waitFor", "js": "<expression>", "timeoutMs": N} → {"ok": true, "value": …}
 *   {"cmd": "eval", "js": "<expression or async IIFE>"}   → {"ok": true, "value": …}
 *   {"cmd": "screenshot", "path": "..."}                   → {"ok": true}
 *   {"cmd": "close"}                                       → {"ok": true}, then exits
 * Failures answer {"ok": false, "error": "..."}; console errors of the page are collected
 * and returned with every answer as "console".
 */

import { createInterface } from "node:readline";
import { chromium, type Page } from "playwright-core";

const CHROMIUM = process.env["OA_SYNC_CHROMIUM"] ?? "/usr/bin/chromium";

const browser = await chromium.launch({
  executablePath: CHROMIUM,
  headless: true,
  args: [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
  ],
});
// bypassCSP: the page forbids eval (its CSP); the driver evaluates its checks as strings.
const context = await browser.newContext({ viewport: { width: 1280, height: 800 }, bypassCSP: true });
let page: Page = await context.newPage();
const consoleErrors: string[] = [];
const watch = (p: Page): void => {
  p.on("console", (m) => m.type() === "error" && consoleErrors.push(m.text()));
  p.on("pageerror", (e) => consoleErrors.push(String(e)));
};
watch(page);

function answer(body: object): void {
  process.stdout.write(JSON.stringify({ ...body, console: consoleErrors.splice(0) }) + "\n");
}

const lines = createInterface({ input: process.stdin });
for await (const line of lines) {
  if (!line.trim()) continue;
  const command = JSON.parse(line) as { cmd: string; url?: string; js?: string; timeoutMs?: number; path?: string };
  try {
    switch (command.cmd) {
      case "open":
        await page.close();
        page = await context.newPage();
        watch(page);
        await page.goto(command.url ?? "about:blank");
        answer({ ok: true });
        break;
      case "waitFor": {
        const handle = await page.waitForFunction(command.js ?? "true", undefined, {
          timeout: command.timeoutMs ?? 10_000,
          polling: "raf",
        });
        answer({ ok: true, value: await handle.jsonValue() });
        break;
      }
      case "eval":
        answer({ ok: true, value: await page.evaluate(command.js ?? "undefined") });
        break;
      case "screenshot":
        await page.screenshot({ path: command.path ?? "screenshot.png", fullPage: true });
        answer({ ok: true });
        break;
      case "close":
        answer({ ok: true });
        await browser.close();
        process.exit(0);
        break;
      default:
        answer({ ok: false, error: `unknown command ${command.cmd}` });
    }
  } catch (error) {
    answer({ ok: false, error: String(error) });
  }
}
await browser.close();
