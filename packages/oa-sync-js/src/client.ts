/**
 * `SyncClient`: follows documents on a Khala server over the WebSocket, in browsers and in
 * Node 20 (pass `WebSocket` from the `ws` package there). A thin driver around the sans-IO
 * `ClientSession` (session.ts), which decides what to send, what to cache, when and whether to
 * reconnect and when to refresh the token; this module owns the socket, the clock and timers.
 *
 * Guarantees (the Python client's): per subscription and document, versions only increase;
 * after a disconnect every subscription resumes from its (epoch, watermark); reconnects back
 * off exponentially with full jitter, reset only by a `synced`; 4400/4403/4413 end the client,
 * 4401 fetches a fresh token first; the token is refreshed in-band before it expires, one
 * refresh in flight whoever asks. `append(…, {visible: true})` resolves once this client's
 * subscriptions have reached the watermark at which the write became visible.
 */

import { create, fromJson, toJson, type JsonObject, type JsonValue } from "@bufbuild/protobuf";
import type { BackoffPolicy } from "./backoff.js";
import {
  AppendEventSchema,
  AppendRequestSchema,
  AppendResponseSchema,
  type ClientMessage,
} from "./gen/openagents/sync/v1/sync_pb.js";
import {
  ClientSession,
  type CachedDocument,
  type ClientEvent,
  type ConnectionState,
  type SessionStats,
} from "./session.js";
import { decodeServer, encodeClient, SUBPROTOCOLS, type WireFormat } from "./wire.js";

/** The part of the WebSocket API the client uses (the browser's and `ws` both fit). */
export interface WebSocketLike {
  readonly protocol: string;
  binaryType: string;
  onopen: ((ev: unknown) => void) | null;
  onmessage: ((ev: { data: unknown }) => void) | null;
  onclose: ((ev: { code: number }) => void) | null;
  onerror: ((ev: unknown) => void) | null;
  send(data: string | Uint8Array): void;
  close(code?: number, reason?: string): void;
}

/** A WebSocket class: the browser's, or `WebSocket` of the `ws` package in Node. */
export type WebSocketConstructor = new (url: string, protocols: string[]) => unknown;

/** Returns a fresh bearer token; called once per refresh. */
export type TokenProvider = () => string | Promise<string>;

export interface SyncClientOptions {
  /** The server, `http://host:port` (`/v1/sync` is appended for the WebSocket). */
  url: string;
  /** A fixed token, or a provider of fresh ones. */
  token: string | TokenProvider;
  /** The subprotocol: `json` (default) or `proto` (binary frames). */
  format?: WireFormat;
  /** The WebSocket implementation (default: `globalThis.WebSocket`). */
  WebSocket?: WebSocketConstructor;
  /** The fetch implementation for `append` (default: `globalThis.fetch`). */
  fetch?: typeof fetch;
  backoff?: Partial<BackoffPolicy>;
  /** Randomness for jitter (seed it in tests). */
  random?: () => number;
  /** Seconds since the epoch (default: `Date.now() / 1000`). */
  now?: () => number;
  /** Called with every decoded server frame's text or bytes (tests, inspectors). */
  onFrame?: (data: string | Uint8Array) => void;
}

export type SubscriptionListener = (event: ClientEvent) => void;

/** The client gave up, or was closed. */
export class ClientClosedError extends Error {
  override name = "ClientClosedError";
  constructor(
    readonly reason: string,
    readonly code: number | null = null,
  ) {
    super(code === null ? reason : `${reason} (close ${code})`);
  }
}

/** `POST /v1/events` refused the append (or it was not visible in time: `not_visible`). */
export class AppendError extends Error {
  override name = "AppendError";
  constructor(
    readonly status: number,
    readonly code: string,
    message: string,
    /** Set when the events were appended (e.g. `not_visible`): do not append them again. */
    readonly positions: readonly number[] = [],
  ) {
    super(`${status} ${code}: ${message}`);
  }
}

/** One event to append (proto3 JSON field names of `AppendEvent`). */
export interface AppendEventInit {
  streamId: string;
  type: string;
  payload: JsonObject;
  /** Default: a random key, so a retry of this call cannot append twice. */
  idempotencyKey?: string;
  expectedSeq?: number;
}

export interface AppendResult {
  positions: number[];
  /** With `visible`: the watermark at which the batch's documents became visible. */
  visibleWatermark?: number;
  epoch?: string;
}

const DEFAULT_PING_MS = 15_000;
const DEFAULT_VISIBLE_TIMEOUT_MS = 5_000;

/** One subscription: its cache, its events, and a store interface for UI frameworks. */
export class Subscription {
  /** Set when the server refused the subscription or the client gave up. */
  error: Error | null = null;
  private readonly listeners = new Set<SubscriptionListener>();
  private snapshotCache: ReadonlyMap<string, CachedDocument> | null = null;
  private syncedWaiters: Array<() => void> = [];

  constructor(
    private readonly client: SyncClient,
    readonly id: string,
    readonly topics: readonly string[],
  ) {}

  /** The current documents, by key (live view). */
  get documents(): ReadonlyMap<string, CachedDocument> {
    try {
      return this.client.session.documents(this.id);
    } catch {
      return new Map();
    }
  }

  /** A new map after every change, the same one otherwise (`useSyncExternalStore`-ready). */
  getSnapshot = (): ReadonlyMap<string, CachedDocument> => {
    this.snapshotCache ??= new Map(this.documents);
    return this.snapshotCache;
  };

  /** Listen to this subscription's events; returns the function that stops listening. */
  on(listener: SubscriptionListener): () => void {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  /** `subscribe(onStoreChange)` of the external-store contract. */
  subscribe = (onStoreChange: () => void): (() => void) => this.on(() => onStoreChange());

  /** Resolves when the subscription is caught up on the current connection. */
  synced(timeoutMs = 30_000): Promise<void> {
    if (this.isSynced()) return Promise.resolve();
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`not synced within ${timeoutMs} ms`)), timeoutMs);
      this.syncedWaiters.push(() => {
        clearTimeout(timer);
        resolve();
      });
    });
  }

  isSynced(): boolean {
    try {
      return this.client.session.isSynced(this.id);
    } catch {
      return false;
    }
  }

  /** Unsubscribe (the cache is dropped). */
  close(): void {
    this.client.unsubscribe(this);
  }

  /** @internal */
  emit(event: ClientEvent): void {
    this.snapshotCache = null;
    if (event.type === "synced") {
      const waiters = this.syncedWaiters;
      this.syncedWaiters = [];
      for (const w of waiters) w();
    }
    if (event.type === "error" && event.fatal) {
      this.error = new Error(`subscription ${this.id} refused: ${event.code}: ${event.message}`);
    }
    for (const listener of [...this.listeners]) listener(event);
  }
}

export class SyncClient {
  readonly session: ClientSession;
  readonly httpUrl: string;
  readonly wsUrl: string;
  readonly format: WireFormat;
  /** Set when the client gave up. */
  error: ClientClosedError | null = null;
  private readonly options: SyncClientOptions;
  private readonly WS: WebSocketConstructor;
  private readonly fetchImpl: typeof fetch;
  private readonly now: () => number;
  private readonly subs = new Map<string, Subscription>();
  private readonly stateListeners = new Set<(state: ConnectionState) => void>();
  private readonly progressWaiters = new Set<() => void>();
  private ws: WebSocketLike | null = null;
  private refreshing: Promise<void> | null = null;
  private running: Promise<void> | null = null;
  private closing = false;
  private wake: (() => void) | null = null;
  private lastState: ConnectionState;
  private nonce = 1;

  constructor(options: SyncClientOptions) {
    this.options = options;
    this.format = options.format ?? "json";
    this.session = new ClientSession({
      ...(options.backoff !== undefined ? { backoff: options.backoff } : {}),
      ...(options.random !== undefined ? { random: options.random } : {}),
    });
    this.lastState = this.session.state;
    const WS = options.WebSocket ?? (globalThis as { WebSocket?: WebSocketConstructor }).WebSocket;
    if (WS === undefined) throw new TypeError("no WebSocket implementation: pass options.WebSocket");
    this.WS = WS;
    this.fetchImpl = options.fetch ?? globalThis.fetch.bind(globalThis);
    this.now = options.now ?? (() => Date.now() / 1000);
    this.httpUrl = httpBase(options.url);
    this.wsUrl = this.httpUrl.replace(/^http/, "ws") + "/v1/sync";
  }

  // -- lifecycle ---------------------------------------------------------------------------------

  /** Start connecting in the background (idempotent). */
  start(): this {
    this.running ??= this.run();
    return this;
  }

  /** Close the connection; nothing reconnects. */
  async close(): Promise<void> {
    this.closing = true;
    this.session.close();
    this.wake?.();
    this.ws?.close(1000, "closed by the application");
    this.notifyState();
    await this.running;
  }

  get state(): ConnectionState {
    return this.session.state;
  }

  get stats(): SessionStats {
    return this.session.stats;
  }

  /** Call `listener(state)` on every state change; returns the function that stops it. */
  onState(listener: (state: ConnectionState) => void): () => void {
    this.stateListeners.add(listener);
    return () => this.stateListeners.delete(listener);
  }

  /** Resolves when the state is one of `states`. */
  waitForState(states: ConnectionState[], timeoutMs = 30_000): Promise<void> {
    return this.waitUntil(() => states.includes(this.state), timeoutMs, `state ${states.join("|")}`);
  }

  // -- subscriptions -----------------------------------------------------------------------------

  /** Subscribe to topics (exact keys or prefixes ending in `*`). */
  subscribe(topics: readonly string[], subscriptionId?: string): Subscription {
    if (this.closing || this.state === "closed") {
      throw this.error ?? new ClientClosedError("the client is closed");
    }
    const [id, frames] = this.session.subscribe(topics, subscriptionId);
    const sub = new Subscription(this, id, topics);
    this.subs.set(id, sub);
    this.send(frames);
    this.notifyState();
    return sub;
  }

  /** @internal */
  unsubscribe(sub: Subscription): void {
    if (!this.subs.delete(sub.id)) return;
    this.send(this.session.unsubscribe(sub.id));
    this.notifyState();
  }

  // -- tokens ------------------------------------------------------------------------------------

  /** Fetch a new token and, when connected, send it in-band; concurrent callers share one. */
  refreshToken(): Promise<void> {
    this.refreshing ??= this.doRefresh().finally(() => {
      this.refreshing = null;
    });
    return this.refreshing;
  }

  private async doRefresh(): Promise<void> {
    const provider = this.options.token;
    const token = typeof provider === "string" ? provider : await provider();
    this.send(this.session.setToken(token, this.now()));
  }

  private async bearer(): Promise<string> {
    if (this.session.tokenExpired(this.now())) await this.refreshToken();
    const token = this.session.currentToken;
    if (token === null) throw new ClientClosedError("no token");
    return token;
  }

  // -- append ------------------------------------------------------------------------------------

  /**
   * Append events atomically (`POST /v1/events`). With `visible`, resolves only once this
   * client's subscriptions have reached the write, so the next read of the cache shows it.
   */
  async append(
    events: readonly AppendEventInit[],
    options: { visible?: boolean; timeoutMs?: number } = {},
  ): Promise<AppendResult> {
    const request = create(AppendRequestSchema, {
      events: events.map((e) =>
        create(AppendEventSchema, {
          streamId: e.streamId,
          type: e.type,
          payload: e.payload,
          idempotencyKey: e.idempotencyKey ?? randomKey(),
          ...(e.expectedSeq !== undefined ? { expectedSeq: BigInt(e.expectedSeq) } : {}),
        }),
      ),
    });
    const timeoutMs = options.timeoutMs ?? DEFAULT_VISIBLE_TIMEOUT_MS;
    const query = options.visible ? `?wait=visible&timeoutMs=${Math.ceil(timeoutMs)}` : "";
    const started = Date.now();
    const response = await this.fetchImpl(`${this.httpUrl}/v1/events${query}`, {
      method: "POST",
      headers: {
        Authorization: `Bearer ${await this.bearer()}`,
        "Content-Type": "application/json",
      },
      body: JSON.stringify(toJson(AppendRequestSchema, request)),
    });
    let body: JsonValue;
    try {
      body = (await response.json()) as JsonValue;
    } catch {
      throw new AppendError(response.status, "http_error", "the answer is not JSON");
    }
    if (!response.ok) throw appendError(response.status, body);
    const parsed = fromJson(AppendResponseSchema, body, { ignoreUnknownFields: false });
    const result: AppendResult = { positions: parsed.positions.map(Number) };
    if (!options.visible) return result;
    result.visibleWatermark = Number(parsed.visibleWatermark);
    result.epoch = parsed.epoch;
    const left = Math.max(timeoutMs - (Date.now() - started), 1);
    if (result.visibleWatermark > 0 && this.subs.size > 0) {
      const watermark = result.visibleWatermark;
      try {
        await this.waitUntil(() => this.session.reached(watermark, parsed.epoch), left, "visible");
      } catch {
        throw new AppendError(
          504,
          "not_visible",
          `appended, but this client did not reach watermark ${watermark} within ${timeoutMs} ms`,
          result.positions,
        );
      }
    }
    return result;
  }

  // -- the connection loop -----------------------------------------------------------------------

  private async run(): Promise<void> {
    let refreshFirst = false;
    while (!this.closing) {
      let code: number | null = null;
      try {
        if (refreshFirst || this.session.tokenExpired(this.now())) await this.refreshToken();
        refreshFirst = false;
        this.session.connecting();
        this.notifyState();
        code = await this.connection();
      } catch (error) {
        if (error instanceof RangeError && typeof this.options.token === "string") {
          this.giveUp(new ClientClosedError("the fixed token has expired"));
          return;
        }
      } finally {
        this.ws = null;
      }
      if (this.closing) break;
      if (this.state === "idle" || this.state === "backing_off") this.session.connecting();
      const decision = this.session.closed(code);
      this.notifyState();
      if (decision.type === "give_up") {
        this.giveUp(new ClientClosedError(decision.reason, decision.code));
        return;
      }
      if (decision.refreshToken && typeof this.options.token === "string") {
        this.session.close();
        this.giveUp(new ClientClosedError("the server refused the fixed token", 4401));
        return;
      }
      refreshFirst = decision.refreshToken;
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, decision.delayMs);
        this.wake = () => {
          clearTimeout(timer);
          resolve();
        };
      });
      this.wake = null;
    }
    this.notifyState();
  }

  private connection(): Promise<number | null> {
    return new Promise((resolve) => {
      const ws = new this.WS(this.wsUrl, [SUBPROTOCOLS[this.format]]) as WebSocketLike;
      ws.binaryType = "arraybuffer";
      this.ws = ws;
      const timers: Array<ReturnType<typeof setTimeout>> = [];
      let silence: ReturnType<typeof setTimeout> | undefined;
      let done = false;
      const finish = (code: number | null): void => {
        if (done) return;
        done = true;
        for (const t of timers) clearTimeout(t);
        clearTimeout(silence);
        ws.onopen = ws.onmessage = ws.onerror = ws.onclose = null;
        resolve(code);
      };
      const interval = (): number => this.session.heartbeatIntervalMs ?? DEFAULT_PING_MS;
      const watchSilence = (): void => {
        clearTimeout(silence);
        silence = setTimeout(() => {
          ws.close(1000, "silent");
          finish(null);
        }, interval() * 3);
      };
      const scheduleRefresh = (): void => {
        const at = this.session.tokenRefreshAt();
        if (at === null) return;
        const delay = Math.max((at - this.now()) * 1000, 50);
        timers.push(
          setTimeout(() => {
            this.refreshToken().then(scheduleRefresh, () => {
              timers.push(setTimeout(scheduleRefresh, 1000));
            });
          }, Math.min(delay, 2 ** 31 - 1)),
        );
      };
      const schedulePing = (): void => {
        timers.push(
          setTimeout(() => {
            this.send(this.session.ping(`n${this.nonce++}`));
            schedulePing();
          }, interval()),
        );
      };
      ws.onopen = () => {
        if (ws.protocol !== SUBPROTOCOLS[this.format]) {
          ws.close(1000, "subprotocol not negotiated");
          finish(1002);
          return;
        }
        try {
          this.send(this.session.opened(this.now()));
        } catch {
          ws.close(1000, "no token");
          finish(null);
          return;
        }
        scheduleRefresh();
        schedulePing();
        watchSilence();
      };
      ws.onmessage = (ev) => {
        watchSilence();
        const data = typeof ev.data === "string" ? ev.data : new Uint8Array(ev.data as ArrayBuffer);
        try {
          this.options.onFrame?.(data);
          const [events, replies] = this.session.receive(decodeServer(data, this.format));
          for (const event of events) this.subs.get(event.subscriptionId)?.emit(event);
          this.send(replies);
        } catch {
          ws.close(1000, "malformed server frame");
          finish(null);
          return;
        }
        this.notifyState();
        this.progress();
      };
      ws.onerror = () => {
        /* the close event follows */
      };
      ws.onclose = (ev) => finish(ev.code === 1005 || ev.code === 1006 ? null : ev.code);
    });
  }

  private send(frames: readonly ClientMessage[]): void {
    const ws = this.ws;
    if (ws === null || frames.length === 0) return;
    for (const frame of frames) {
      try {
        ws.send(encodeClient(frame, this.format));
      } catch {
        return; // the socket is closing; its close event drives the reconnect
      }
    }
  }

  private giveUp(error: ClientClosedError): void {
    this.error = error;
    for (const sub of this.subs.values()) sub.error = error;
    this.notifyState();
  }

  private notifyState(): void {
    const state = this.session.state;
    if (state !== this.lastState) {
      this.lastState = state;
      for (const listener of [...this.stateListeners]) listener(state);
    }
    this.progress();
  }

  private progress(): void {
    for (const waiter of [...this.progressWaiters]) waiter();
  }

  /** Resolves when `condition()` holds, re-checked after every frame and state change. */
  private waitUntil(condition: () => boolean, timeoutMs: number, what: string): Promise<void> {
    if (condition()) return Promise.resolve();
    return new Promise((resolve, reject) => {
      const check = (): void => {
        if (condition()) {
          this.progressWaiters.delete(check);
          clearTimeout(timer);
          resolve();
        }
      };
      const timer = setTimeout(() => {
        this.progressWaiters.delete(check);
        reject(new Error(`${what} not reached within ${timeoutMs} ms`));
      }, timeoutMs);
      this.progressWaiters.add(check);
    });
  }
}

function httpBase(url: string): string {
  const match = /^(https?|wss?):\/\/([^/]+)(\/.*)?$/.exec(url);
  if (match === null) throw new TypeError(`not an http(s) or ws(s) URL: ${url}`);
  const scheme = match[1] === "wss" ? "https" : match[1] === "ws" ? "http" : match[1];
  const path = (match[3] ?? "").replace(/\/v1\/sync$/, "").replace(/\/+$/, "");
  return `${scheme}://${match[2]}${path}`;
}

function randomKey(): string {
  // getRandomValues works outside secure contexts too (randomUUID does not); React Native has
  // no `crypto` without a polyfill, and a key needs uniqueness, not secrecy.
  const bytes = new Uint8Array(16);
  if (globalThis.crypto?.getRandomValues !== undefined) globalThis.crypto.getRandomValues(bytes);
  else for (let i = 0; i < bytes.length; i++) bytes[i] = Math.floor(Math.random() * 256);
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

function appendError(status: number, body: JsonValue): AppendError {
  const error =
    typeof body === "object" && body !== null && !Array.isArray(body) ? body["error"] : undefined;
  if (typeof error === "object" && error !== null && !Array.isArray(error)) {
    const positions = Array.isArray(error["positions"]) ? error["positions"].map(Number) : [];
    return new AppendError(status, String(error["code"]), String(error["message"] ?? ""), positions);
  }
  return new AppendError(status, "http_error", `unexpected answer`);
}
