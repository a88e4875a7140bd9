/**
 * The inspector page served at `GET /` by oa-sync serve (bundled by `nox -s inspector` into
 * oa_sync_server/static/inspector.js). It takes a token from the URL fragment
 * (`/#token=<jwt>&topic=<pattern>`: a fragment never leaves the browser) or a paste box,
 * follows the topic with the TypeScript client, and shows the connection, every document with
 * its main fields (updates flash), the delay from commit to arrival, and — with `sync:admin` —
 * a server panel from `/v1/admin/status` plus a drift check on demand.
 *
 * The WebSocket is tried first; if the server refuses it before any welcome (an Origin not in
 * OA_SYNC_ALLOWED_ORIGINS), the page falls back to the SSE transport (`fetch` stream).
 */

import { followSse, readTokenTimes, SyncClient, type CachedDocument } from "../src/index.js";

type Row = { doc: CachedDocument; arrivedAt: number; delayMs: number | null };

const $ = <T extends HTMLElement>(id: string): T => {
  const el = document.getElementById(id);
  if (el === null) throw new Error(`#${id} missing from the page`);
  return el as T;
};

const rows = new Map<string, Row>();
const delays: number[] = [];
let status = { transport: "websocket", state: "idle", epoch: "", watermark: 0 };

function fragment(): { token: string | null; topic: string } {
  const params = new URLSearchParams(location.hash.replace(/^#/, ""));
  return { token: params.get("token"), topic: params.get("topic") || "*" };
}

function text(value: unknown): string {
  return value === undefined || value === null ? "" : String(value);
}

function age(iso: unknown, now: number): string {
  if (typeof iso !== "string") return "";
  const seconds = Math.max(0, (now - Date.parse(iso)) / 1000);
  if (seconds < 60) return `${seconds.toFixed(0)} s`;
  if (seconds < 3600) return `${(seconds / 60).toFixed(0)} min`;
  return `${(seconds / 3600).toFixed(1)} h`;
}

function mainFields(doc: CachedDocument): string {
  const d = doc.document;
  if (doc.projection === "runtime/run_summary") {
    const step = d["lastStepDescription"] ? ` (${text(d["lastStepDescription"])})` : "";
    const progress = d["progressPercent"] !== undefined ? ` · ${text(d["progressPercent"])}%` : "";
    return `${text(d["status"] ?? "STATUS_UNSPECIFIED")} · step ${text(d["stepCount"] ?? 0)}${step}${progress}`;
  }
  if (doc.projection === "runtime/codex_worker_summary") {
    return `${text(d["status"] ?? "STATUS_UNSPECIFIED")} · in flight ${text(d["inFlightRequests"] ?? 0)}`;
  }
  return Object.keys(d).slice(0, 4).join(", ");
}

function renderStatus(): void {
  $("state").textContent = status.state;
  $("state").dataset["state"] = status.state;
  $("transport").textContent = status.transport;
  $("epoch").textContent = status.epoch || "–";
  $("watermark").textContent = String(status.watermark);
  $("count").textContent = String(rows.size);
  const sorted = [...delays].sort((a, b) => a - b);
  const median = sorted.length ? sorted[Math.floor(sorted.length / 2)] : undefined;
  $("delay").textContent = median === undefined ? "–" : `${median.toFixed(0)} ms (median of ${sorted.length})`;
}

function renderRow(key: string, flash: boolean): void {
  const row = rows.get(key);
  const body = $("docs");
  let tr = body.querySelector<HTMLTableRowElement>(`tr[data-key="${CSS.escape(key)}"]`);
  if (row === undefined) {
    tr?.remove();
    return;
  }
  if (tr === null) {
    tr = document.createElement("tr");
    tr.dataset["key"] = key;
    for (let i = 0; i < 6; i++) tr.appendChild(document.createElement("td"));
    body.prepend(tr);
  }
  const { doc, delayMs } = row;
  tr.dataset["version"] = String(doc.version);
  const cells = tr.children;
  cells[0]!.textContent = key;
  cells[1]!.textContent = String(doc.version);
  cells[2]!.textContent = String(doc.watermark);
  cells[3]!.textContent = age(doc.document["updatedAt"], Date.now());
  cells[3]!.className = "age";
  cells[4]!.textContent = mainFields(doc);
  cells[5]!.textContent = delayMs === null ? "" : `${delayMs.toFixed(0)} ms`;
  if (flash) {
    tr.classList.remove("flash");
    void tr.offsetWidth; // restart the animation
    tr.classList.add("flash");
  }
}

function onDoc(doc: CachedDocument, live: boolean): void {
  const now = Date.now();
  const committed = typeof doc.document["updatedAt"] === "string" ? Date.parse(doc.document["updatedAt"]) : NaN;
  const delayMs = live && Number.isFinite(committed) ? Math.max(0, now - committed) : null;
  if (delayMs !== null) {
    delays.push(delayMs);
    if (delays.length > 200) delays.shift();
  }
  rows.set(doc.docKey, { doc, arrivedAt: now, delayMs });
  status.watermark = Math.max(status.watermark, doc.watermark);
  renderRow(doc.docKey, true);
  renderStatus();
}

function clearRows(): void {
  rows.clear();
  $("docs").replaceChildren();
}

function follow(token: string, topic: string): void {
  $("topic-shown").textContent = topic;
  const client = new SyncClient({ url: location.origin, token, backoff: { baseMs: 250, capMs: 5000 } });
  const sub = client.subscribe([topic]);
  let welcomed = false;
  let synced = false;
  sub.on((event) => {
    if (event.type === "changed") onDoc(event.doc, synced);
    else if (event.type === "reset") {
      synced = false;
      clearRows();
    } else if (event.type === "synced") {
      synced = true;
      status.epoch = event.epoch;
      status.watermark = Math.max(status.watermark, event.watermark);
    } else if (event.type === "error") {
      $("error").textContent = `${event.code}: ${event.message}`;
    }
    renderStatus();
  });
  client.onState((state) => {
    if (state === "syncing" || state === "live") welcomed = true;
    if (state === "backing_off") synced = false;
    status.state = state;
    status.watermark = Math.max(status.watermark, client.session.lastWatermarkSeen);
    renderStatus();
    if (state === "backing_off" && !welcomed && client.stats.connections === 0 && client.session.backoff.attempts >= 2) {
      // Refused before any welcome: most likely this origin is not allowed for WebSockets.
      void client.close().then(() => followOverSse(token, topic));
    }
  });
  client.start();
}

function followOverSse(token: string, topic: string): void {
  status = { ...status, transport: "sse (WebSocket refused)", state: "connecting" };
  renderStatus();
  let synced = false;
  followSse({
    url: location.origin,
    topics: [topic],
    token,
    backoff: { baseMs: 250, capMs: 5000 },
    onEvent: (event) => {
      if (event.type === "changed") onDoc(event.doc, synced);
      else if (event.type === "reset") {
        synced = false;
        clearRows();
      } else {
        synced = true;
        status.state = "live";
        status.epoch = event.epoch;
        status.watermark = Math.max(status.watermark, event.watermark);
      }
      renderStatus();
    },
  });
}

function scopes(token: string): string[] {
  try {
    const part = token.split(".")[1] ?? "";
    const claims = JSON.parse(atob(part.replace(/-/g, "+").replace(/_/g, "/"))) as { oa_scopes?: unknown };
    return Array.isArray(claims.oa_scopes) ? claims.oa_scopes.map(String) : [];
  } catch {
    return [];
  }
}

async function adminPanel(token: string): Promise<void> {
  const panel = $("admin");
  panel.hidden = false;
  const headers = { Authorization: `Bearer ${token}` };
  const refresh = async (): Promise<void> => {
    try {
      const response = await fetch("/v1/admin/status", { headers });
      const body = (await response.json()) as Record<string, any>;
      if (!response.ok) throw new Error(body["error"]?.["message"] ?? response.status);
      const p = body["projector"];
      $("lag").textContent = `${p.lagEvents} events, ${p.lagSeconds} s`;
      $("conns").textContent = `${body["connections"].ws} WebSocket, ${body["connections"].sse} SSE; ${body["subscriptions"]} subscriptions`;
      const sink = body["sink"];
      const parity = sink.parity === null ? "" : sink.parity.inParity ? " · in parity" : " · DIVERGED";
      $("lanes").textContent = `${sink.kind}: ${sink.lanes.join(" + ") || "none"}${parity}`;
    } catch (error) {
      $("lag").textContent = `unavailable (${(error as Error).message})`;
    }
  };
  $<HTMLButtonElement>("drift-check").onclick = async () => {
    $("drift").textContent = "checking…";
    const response = await fetch("/v1/admin/drift", { method: "POST", headers });
    const report = (await response.json()) as { ok?: boolean; documentsChecked?: number; items?: unknown[] };
    $("drift").textContent = response.ok
      ? `${report.ok ? "no drift" : `${report.items?.length} drifted`} (${report.documentsChecked} documents)`
      : `refused (${response.status})`;
  };
  await refresh();
  setInterval(() => void refresh(), 2000);
}

function main(): void {
  const { token, topic } = fragment();
  const form = $<HTMLFormElement>("paste");
  form.onsubmit = (event) => {
    event.preventDefault();
    const data = new FormData(form);
    const params = new URLSearchParams({ token: String(data.get("token") ?? "").trim(), topic: String(data.get("topic") || "*") });
    location.hash = params.toString();
    location.reload();
  };
  if (token === null) {
    form.hidden = false;
    return;
  }
  const times = readTokenTimes(token);
  if (times !== null && times.expiresAt * 1000 < Date.now()) {
    $("error").textContent = "the token in the URL has expired: paste a fresh one";
    form.hidden = false;
    return;
  }
  $("main").hidden = false;
  follow(token, topic);
  if (scopes(token).includes("sync:admin")) void adminPanel(token);
  setInterval(() => {
    const now = Date.now();
    for (const tr of $("docs").querySelectorAll<HTMLTableRowElement>("tr")) {
      const row = rows.get(tr.dataset["key"] ?? "");
      const cell = tr.children[3];
      if (row !== undefined && cell !== undefined) cell.textContent = age(row.doc.document["updatedAt"], now);
    }
  }, 1000);
}

main();
