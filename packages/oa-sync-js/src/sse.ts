/**
 * The SSE fallback for networks that block WebSockets: `GET /v1/stream` read with `fetch`
 * (a browser's `EventSource` cannot send `Authorization`), resumed with `Last-Event-ID` after a
 * cut, backing off with full jitter (reset on `synced`). Updates are the `Document` JSON;
 * repeats and older versions are dropped by (docKey, version), and `reset` clears the cache.
 */

import { fromJson, type JsonValue } from "@bufbuild/protobuf";
import { Backoff, type BackoffPolicy } from "./backoff.js";
import { DocumentSchema } from "./gen/openagents/sync/v1/sync_pb.js";
import type { CachedDocument } from "./session.js";

export type SseEvent =
  | { type: "changed"; doc: CachedDocument }
  | { type: "reset"; reason: string; epoch: string }
  | { type: "synced"; watermark: number; epoch: string };

export interface SseOptions {
  url: string;
  topics: readonly string[];
  token: string | (() => string | Promise<string>);
  onEvent: (event: SseEvent) => void;
  fetch?: typeof fetch;
  backoff?: Partial<BackoffPolicy>;
}

export interface SseFollower {
  readonly documents: ReadonlyMap<string, CachedDocument>;
  /** The watermark to resume after (the last `id:`). */
  readonly lastEventId: string | null;
  close(): void;
}

/** Follow topics over Server-Sent Events until `close()`. */
export function followSse(options: SseOptions): SseFollower {
  const fetchImpl = options.fetch ?? globalThis.fetch.bind(globalThis);
  const backoff = new Backoff(options.backoff);
  const cache = new Map<string, CachedDocument>();
  const abort = new AbortController();
  const state = { lastEventId: null as string | null };
  const query = options.topics.map((t) => `topic=${encodeURIComponent(t)}`).join("&");
  const url = `${options.url.replace(/\/+$/, "")}/v1/stream?${query}`;

  const dispatch = (event: string, data: string): void => {
    const body = JSON.parse(data) as JsonValue;
    if (event === "update") {
      const doc = fromJson(DocumentSchema, body, { ignoreUnknownFields: false });
      const held = cache.get(doc.docKey);
      if (held !== undefined && Number(doc.version) <= held.version) return;
      const cached: CachedDocument = {
        docKey: doc.docKey,
        projection: doc.projection,
        version: Number(doc.version),
        watermark: Number(doc.watermark),
        contentHash: doc.contentHash,
        document: doc.document ?? {},
      };
      cache.set(doc.docKey, cached);
      options.onEvent({ type: "changed", doc: cached });
    } else if (event === "reset") {
      const { reason, epoch } = body as { reason: string; epoch: string };
      cache.clear();
      options.onEvent({ type: "reset", reason, epoch });
    } else if (event === "synced") {
      const { watermark, epoch } = body as { watermark: string; epoch: string };
      backoff.reset();
      options.onEvent({ type: "synced", watermark: Number(watermark), epoch });
    }
  };

  const once = async (): Promise<void> => {
    const token = typeof options.token === "string" ? options.token : await options.token();
    const headers: Record<string, string> = { Authorization: `Bearer ${token}` };
    if (state.lastEventId !== null) headers["Last-Event-ID"] = state.lastEventId;
    const response = await fetchImpl(url, { headers, signal: abort.signal });
    if (!response.ok || response.body === null) throw new Error(`SSE answered ${response.status}`);
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value;
      let end: number;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        let event = "message";
        const data: string[] = [];
        for (const line of block.split("\n")) {
          if (line.startsWith(":")) continue;
          const colon = line.indexOf(":");
          const field = colon < 0 ? line : line.slice(0, colon);
          const text = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
          if (field === "event") event = text;
          else if (field === "data") data.push(text);
          else if (field === "id") state.lastEventId = text;
        }
        if (data.length > 0) dispatch(event, data.join("\n"));
      }
    }
  };

  void (async () => {
    while (!abort.signal.aborted) {
      try {
        await once();
      } catch {
        /* reconnect below */
      }
      if (abort.signal.aborted) return;
      const delay = backoff.nextDelay();
      if (delay === null) return;
      await new Promise((resolve) => setTimeout(resolve, delay));
    }
  })();

  return {
    documents: cache,
    get lastEventId() {
      return state.lastEventId;
    },
    close: () => abort.abort(),
  };
}
