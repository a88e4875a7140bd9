/**
 * What the TypeScript tests share: the server under test (started by the pytest driver
 * tests/web/test_js_client.py, which passes its address in OA_SYNC_JS_*), HS256 tokens, HTTP
 * helpers, the strict protobuf-es check of every frame and body, and a chaos TCP proxy.
 */

import { fromJson, fromJsonString, type JsonValue } from "@bufbuild/protobuf";
import { execFileSync } from "node:child_process";
import { createHmac, randomUUID } from "node:crypto";
import net from "node:net";
import WebSocket from "ws";
import {
  ChangesPageSchema,
  DocumentSchema,
  ServerMessageSchema,
} from "../src/gen/openagents/sync/v1/sync_pb.js";
import type { SyncClientOptions, WebSocketConstructor } from "../src/index.js";
import { SyncClient } from "../src/index.js";

function env(name: string): string {
  const value = process.env[name];
  if (!value) {
    throw new Error(
      `${name} is not set: run these tests through pytest tests/web/test_js_client.py ` +
        "(it starts oa-sync serve on a fresh database and passes its address)",
    );
  }
  return value;
}

export const SERVER_URL = env("OA_SYNC_JS_URL");
const SECRET = env("OA_SYNC_JS_SECRET");
const PYTHON = env("OA_SYNC_JS_PYTHON");
const DATABASE_URL = env("OA_SYNC_JS_DATABASE_URL");

export const NodeWebSocket: WebSocketConstructor = WebSocket;

function b64url(data: string | Buffer): string {
  return Buffer.from(data).toString("base64url");
}

/** An HS256 token the server accepts (or not, with `badSignature`). */
export function mintToken(
  options: { topics?: string[]; scopes?: string[]; ttlS?: number; badSignature?: boolean } = {},
): string {
  const now = Math.floor(Date.now() / 1000);
  const claims = {
    sub: "js-test",
    iss: "oa-sync",
    aud: "oa-sync",
    iat: now,
    exp: now + (options.ttlS ?? 600),
    oa_topics: options.topics ?? ["*"],
    oa_scopes: options.scopes ?? ["sync:read", "sync:append"],
  };
  const head = b64url(JSON.stringify({ alg: "HS256", typ: "JWT" })) + "." + b64url(JSON.stringify(claims));
  const key = options.badSignature ? SECRET + "x" : SECRET;
  return head + "." + createHmac("sha256", key).update(head).digest("base64url");
}

/** A unique id prefix per test, so tests sharing a server do not see each other's documents. */
export function uniq(): string {
  return randomUUID().slice(0, 8);
}

export function runEvents(runId: string, steps: number): object[] {
  const events: object[] = [{ streamId: `run:${runId}`, type: "run.created", payload: { runId } }];
  for (let i = 1; i <= steps; i++) {
    events.push({ streamId: `run:${runId}`, type: "run.step", payload: { runId, stepIndex: i } });
  }
  return events;
}

/** `POST /v1/events?wait=visible` (the server's own read-your-writes); returns positions. */
export async function appendVisible(events: object[]): Promise<void> {
  const response = await fetch(`${SERVER_URL}/v1/events?wait=visible&timeoutMs=20000`, {
    method: "POST",
    headers: { Authorization: `Bearer ${mintToken()}`, "Content-Type": "application/json" },
    body: JSON.stringify({ events }),
  });
  if (response.status !== 200) throw new Error(`append: ${response.status} ${await response.text()}`);
}

/** Every document under `topic` on the server: key → (version, contentHash), strictly parsed. */
export async function serverDocs(topic: string): Promise<Map<string, string>> {
  const found = new Map<string, string>();
  let after = "0";
  for (;;) {
    const response = await fetch(
      `${SERVER_URL}/v1/changes?topic=${encodeURIComponent(topic)}&after=${after}&limit=1000`,
      { headers: { Authorization: `Bearer ${mintToken()}` } },
    );
    const page = fromJson(ChangesPageSchema, (await response.json()) as JsonValue, {
      ignoreUnknownFields: false,
    });
    for (const change of page.changes) found.set(change.docKey, `${change.version}/${change.contentHash}`);
    if (!page.hasMore) return found;
    after = String(page.nextAfter);
  }
}

/** `GET /v1/docs/{key}`, parsed with protobuf-es `fromJson` in strict mode. */
export async function getDocument(key: string) {
  const response = await fetch(`${SERVER_URL}/v1/docs/${key}`, {
    headers: { Authorization: `Bearer ${mintToken()}` },
  });
  if (response.status !== 200) throw new Error(`GET ${key}: ${response.status}`);
  return fromJson(DocumentSchema, (await response.json()) as JsonValue, { ignoreUnknownFields: false });
}

/** Records every frame a client receives and checks each with protobuf-es strict parsing. */
export class FrameCheck {
  count = 0;
  readonly failures: string[] = [];
  readonly hook = (data: string | Uint8Array): void => {
    this.count += 1;
    if (typeof data !== "string") return; // binary frames are parsed by fromBinary already
    try {
      fromJsonString(ServerMessageSchema, data, { ignoreUnknownFields: false });
    } catch (error) {
      this.failures.push(`${(error as Error).message}: ${data.slice(0, 200)}`);
    }
  };
}

/** Every JSON frame every test client receives, checked strictly (see the last test). */
export const ALL_FRAMES = new FrameCheck();

export function client(options: Partial<SyncClientOptions> & { url?: string } = {}): SyncClient {
  const own = options.onFrame;
  return new SyncClient({
    url: SERVER_URL,
    token: () => mintToken(),
    WebSocket: NodeWebSocket,
    backoff: { baseMs: 50, capMs: 250 },
    ...options,
    onFrame: (data) => {
      ALL_FRAMES.hook(data);
      own?.(data);
    },
  });
}

/** Poll `condition` (an HTTP read of the server, say) until it holds, bounded by `timeoutMs`. */
export async function eventually(
  condition: () => boolean | Promise<boolean>,
  timeoutMs: number,
  what: string,
): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await condition())) {
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 25)); // polling a condition, bounded above
  }
}

/** Change the server's epoch in Postgres (what a rebuild or a restore does). */
export function changeEpoch(epoch: string): void {
  const script =
    "import sys, psycopg\n" +
    "url = sys.argv[1].replace('postgresql+psycopg://', 'postgresql://', 1)\n" +
    "with psycopg.connect(url, autocommit=True) as c:\n" +
    "    c.execute(\"UPDATE oa_sync.sync_meta SET value = %s WHERE key = 'epoch'\", [sys.argv[2]])\n";
  execFileSync(PYTHON, ["-c", script, DATABASE_URL, epoch]);
}

/** A TCP proxy in front of the server that can cut every connection and refuse new ones. */
export class ChaosProxy {
  private readonly server: net.Server;
  private readonly sockets = new Set<net.Socket>();
  connections = 0;
  cuts = 0;
  down = false;
  port = 0;

  constructor(private readonly upstream: URL = new URL(SERVER_URL)) {
    this.server = net.createServer((downstream) => {
      if (this.down) {
        downstream.destroy();
        return;
      }
      this.connections += 1;
      const up = net.connect(Number(this.upstream.port), this.upstream.hostname);
      for (const s of [downstream, up]) {
        this.sockets.add(s);
        s.on("close", () => this.sockets.delete(s));
        s.on("error", () => s.destroy());
      }
      downstream.pipe(up).pipe(downstream);
      downstream.on("close", () => up.destroy());
      up.on("close", () => downstream.destroy());
    });
  }

  async start(): Promise<string> {
    await new Promise<void>((resolve) => this.server.listen(0, "127.0.0.1", resolve));
    this.port = (this.server.address() as net.AddressInfo).port;
    return `http://127.0.0.1:${this.port}`;
  }

  /** Destroy every open connection (both directions, no close frame). */
  cutAll(): void {
    this.cuts += 1;
    for (const s of this.sockets) s.destroy();
  }

  async stop(): Promise<void> {
    this.cutAll();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
  }
}
