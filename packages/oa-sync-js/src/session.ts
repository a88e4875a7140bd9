/**
 * The client side of sync protocol v1 as a sans-IO state machine: a line-by-line port of the
 * Python `oa_sync_core.protocol.client_session.ClientSession`, so both clients decide alike.
 *
 * States:  idle → connecting → (welcome) syncing → (every subscription synced) live;
 * any open state → (close) backing_off → connecting …; a fatal close code, exhausted attempts
 * or `close()` → closed.
 *
 * Per subscription and document, updates at or below the cached version are dropped (delivery
 * is at-least-once), so the application never sees a repeat or an older version after a newer
 * one. A subscription's resume watermark moves at `synced` and with each live update after it,
 * never during a catch-up. `reset` clears only that subscription's cache.
 *
 * Nothing here awaits, reads a clock or touches the network: times come in as arguments
 * (`now`, seconds since the epoch: the clock of JWT `exp`).
 */

import type { JsonObject } from "@bufbuild/protobuf";
import { create } from "@bufbuild/protobuf";
import { Backoff, type BackoffPolicy } from "./backoff.js";
import {
  AuthenticateSchema,
  PingSchema,
  ResumeFromSchema,
  SubscribeSchema,
  UnsubscribeSchema,
  type ClientMessage,
  type ServerMessage,
  type Update,
} from "./gen/openagents/sync/v1/sync_pb.js";
import { readTokenTimes, refreshAt, type TokenTimes } from "./token.js";
import { clientMessage } from "./wire.js";

export type ConnectionState = "idle" | "connecting" | "syncing" | "live" | "backing_off" | "closed";

/** Close codes after which reconnecting would only repeat the refusal. */
export const FATAL_CLOSE_CODES: ReadonlySet<number> = new Set([1002, 1003, 1008, 4400, 4403, 4413]);
export const CLOSE_UNAUTHENTICATED = 4401;
const REFUSALS = new Set([
  "forbidden",
  "invalid_subscription",
  "duplicate_subscription",
  "too_many_subscriptions",
  "too_many_topics",
]);

/** A document as the client holds it. */
export interface CachedDocument {
  docKey: string;
  projection: string;
  version: number;
  watermark: number;
  contentHash: string;
  document: JsonObject;
}

export type ClientEvent =
  | { type: "changed"; subscriptionId: string; doc: CachedDocument }
  | { type: "reset"; subscriptionId: string; reason: string; epoch: string }
  | { type: "synced"; subscriptionId: string; watermark: number; epoch: string }
  | { type: "error"; subscriptionId: string; code: string; message: string; fatal: boolean };

export type Decision =
  | { type: "reconnect"; delayMs: number; refreshToken: boolean; code: number | null }
  | { type: "give_up"; reason: string; code: number | null };

/** Counters a driver can expose and tests can assert on. */
export interface SessionStats {
  connections: number;
  snapshots: number;
  resumes: number;
  resets: number;
  updates: number;
  repeatsDropped: number;
  tokenRefreshes: number;
}

/** Raised for a call the state does not allow (`code` says which). */
export class ProtocolError extends Error {
  override name = "ProtocolError";
  constructor(
    readonly code: string,
    message: string,
  ) {
    super(`${code}: ${message}`);
  }
}

interface Sub {
  id: string;
  topics: readonly string[];
  epoch: string;
  watermark: number | null;
  synced: boolean;
  failed: boolean;
  cache: Map<string, CachedDocument>;
}

export interface SessionOptions {
  backoff?: Partial<BackoffPolicy>;
  random?: () => number;
  /** Refresh a token this fraction of its lifetime before `exp`. */
  refreshFraction?: number;
}

export class ClientSession {
  readonly backoff: Backoff;
  readonly stats: SessionStats = {
    connections: 0,
    snapshots: 0,
    resumes: 0,
    resets: 0,
    updates: 0,
    repeatsDropped: 0,
    tokenRefreshes: 0,
  };
  state: ConnectionState = "idle";
  serverEpoch = "";
  heartbeatIntervalMs: number | null = null;
  /** The highest watermark any frame of the current connection carried. */
  lastWatermarkSeen = 0;
  readonly refreshFraction: number;
  private token: string | null = null;
  private tokenTimes: TokenTimes | null = null;
  private readonly subs = new Map<string, Sub>();
  private nextId = 1;
  private welcomed = false;

  constructor(options: SessionOptions = {}) {
    this.backoff = new Backoff(options.backoff, options.random);
    this.refreshFraction = options.refreshFraction ?? 0.2;
  }

  // -- subscriptions ---------------------------------------------------------------------------

  /** Add a subscription; returns its id and the frames to send now. */
  subscribe(topics: readonly string[], subscriptionId?: string): [string, ClientMessage[]] {
    if (topics.length === 0) throw new RangeError("subscribe needs at least one topic");
    const id = subscriptionId ?? `s${this.nextId++}`;
    if (this.subs.has(id)) throw new RangeError(`subscription id ${id} is in use`);
    const sub: Sub = {
      id,
      topics: [...topics],
      epoch: "",
      watermark: null,
      synced: false,
      failed: false,
      cache: new Map(),
    };
    this.subs.set(id, sub);
    if (!this.welcomed) return [id, []];
    if (this.state === "live") this.state = "syncing";
    return [id, [this.subscribeFrame(sub)]];
  }

  /** Drop a subscription and its cache; returns the `unsubscribe` to send, if open. */
  unsubscribe(subscriptionId: string): ClientMessage[] {
    if (!this.subs.delete(subscriptionId) || !this.welcomed) return [];
    this.settleState();
    return [
      clientMessage({
        case: "unsubscribe",
        value: create(UnsubscribeSchema, { subscriptionId }),
      }),
    ];
  }

  subscriptionIds(): string[] {
    return [...this.subs.keys()];
  }

  /** The cached documents of a subscription, by key (do not modify). */
  documents(subscriptionId: string): ReadonlyMap<string, CachedDocument> {
    return this.sub(subscriptionId).cache;
  }

  /** The (epoch, watermark) a subscription would resume from, if any. */
  position(subscriptionId: string): { epoch: string; watermark: number } | null {
    const sub = this.sub(subscriptionId);
    return sub.watermark === null ? null : { epoch: sub.epoch, watermark: sub.watermark };
  }

  isSynced(subscriptionId: string): boolean {
    return this.sub(subscriptionId).synced;
  }

  /**
   * Whether every subscription has seen the change log up to `watermark` of `epoch`: all are
   * synced on this connection and each reached it (or the connection's in-order stream did).
   */
  reached(watermark: number, epoch: string): boolean {
    if (this.state !== "live") return false;
    for (const sub of this.subs.values()) {
      if (sub.failed) continue;
      if (sub.epoch !== epoch) return false;
      if ((sub.watermark ?? 0) < watermark && this.lastWatermarkSeen < watermark) return false;
    }
    return true;
  }

  // -- tokens ----------------------------------------------------------------------------------

  /** Use a new token; returns an in-band `authenticate` when the connection is open. */
  setToken(token: string, now: number): ClientMessage[] {
    if (!token) throw new RangeError("empty token");
    const times = readTokenTimes(token);
    if (times !== null && times.expiresAt <= now) {
      throw new RangeError("the token provider returned an expired token");
    }
    if (this.token !== null) this.stats.tokenRefreshes += 1;
    this.token = token;
    this.tokenTimes = times;
    return this.welcomed ? [this.authenticateFrame(token)] : [];
  }

  get currentToken(): string | null {
    return this.token;
  }

  /** When the current token should be replaced (seconds), `null` for an opaque token. */
  tokenRefreshAt(): number | null {
    return this.tokenTimes === null ? null : refreshAt(this.tokenTimes, this.refreshFraction);
  }

  tokenExpired(now: number): boolean {
    if (this.token === null) return true;
    return this.tokenTimes !== null && this.tokenTimes.expiresAt <= now;
  }

  // -- connection lifecycle --------------------------------------------------------------------

  connecting(): void {
    if (this.state === "closed") throw new ProtocolError("closed", "the client is closed");
    if (this.state !== "idle" && this.state !== "backing_off") {
      throw new ProtocolError("busy", `cannot connect while ${this.state}`);
    }
    this.state = "connecting";
  }

  /** The socket is open: the `authenticate` to send first. */
  opened(now: number): ClientMessage[] {
    if (this.state !== "connecting") {
      throw new ProtocolError("not_connecting", `opened while ${this.state}`);
    }
    if (this.token === null || this.tokenExpired(now)) {
      throw new ProtocolError("no_token", "no unexpired token to authenticate with");
    }
    this.stats.connections += 1;
    return [this.authenticateFrame(this.token)];
  }

  /** Apply a frame from the server: events for the application, frames to send back. */
  receive(frame: ServerMessage): [ClientEvent[], ClientMessage[]] {
    if (this.state !== "connecting" && this.state !== "syncing" && this.state !== "live") {
      throw new ProtocolError("not_connected", `frame received while ${this.state}`);
    }
    const kind = frame.kind;
    if (kind.case === "welcome") return [[], this.onWelcome(kind.value)];
    if (!this.welcomed) throw new ProtocolError("not_welcomed", `${kind.case} before welcome`);
    switch (kind.case) {
      case "update":
        return [this.onUpdate(kind.value), []];
      case "synced": {
        const v = kind.value;
        return [this.onSynced(v.subscriptionId, Number(v.watermark), v.epoch), []];
      }
      case "reset": {
        const v = kind.value;
        return [this.onReset(v.subscriptionId, v.reason, v.epoch), []];
      }
      case "error": {
        const v = kind.value;
        return [this.onError(v.subscriptionId, v.code, v.message), []];
      }
      case "heartbeat":
        this.lastWatermarkSeen = Math.max(this.lastWatermarkSeen, Number(kind.value.watermark));
        return [[], []];
      case "pong":
        return [[], []];
      default:
        throw new ProtocolError("empty_frame", "a server message with no kind");
    }
  }

  /** The connection ended (`code` from the close frame; `null`: none). */
  closed(code: number | null): Decision {
    this.welcomed = false;
    for (const sub of this.subs.values()) sub.synced = false;
    if (this.state === "closed") return { type: "give_up", reason: "closed by the application", code };
    if (code !== null && FATAL_CLOSE_CODES.has(code)) {
      this.state = "closed";
      return { type: "give_up", reason: `the server refused the client (close ${code})`, code };
    }
    const delayMs = this.backoff.nextDelay();
    if (delayMs === null) {
      this.state = "closed";
      return { type: "give_up", reason: `gave up after ${this.backoff.attempts} attempts`, code };
    }
    this.state = "backing_off";
    return { type: "reconnect", delayMs, refreshToken: code === CLOSE_UNAUTHENTICATED, code };
  }

  close(): void {
    this.welcomed = false;
    this.state = "closed";
  }

  ping(nonce: string): ClientMessage[] {
    return this.welcomed
      ? [clientMessage({ case: "ping", value: create(PingSchema, { nonce }) })]
      : [];
  }

  // -- frame handlers --------------------------------------------------------------------------

  private authenticateFrame(token: string): ClientMessage {
    return clientMessage({ case: "authenticate", value: create(AuthenticateSchema, { token }) });
  }

  private onWelcome(frame: {
    epoch: string;
    watermark: bigint;
    heartbeatIntervalMs: number;
  }): ClientMessage[] {
    if (this.welcomed) throw new ProtocolError("duplicate_welcome", "welcome received twice");
    this.welcomed = true;
    this.serverEpoch = frame.epoch;
    this.lastWatermarkSeen = Number(frame.watermark);
    this.heartbeatIntervalMs = frame.heartbeatIntervalMs || null;
    const frames: ClientMessage[] = [];
    for (const sub of this.subs.values()) {
      sub.synced = false;
      sub.failed = false;
      frames.push(this.subscribeFrame(sub));
    }
    this.state = "syncing";
    this.settleState();
    return frames;
  }

  private subscribeFrame(sub: Sub): ClientMessage {
    const value = create(SubscribeSchema, { subscriptionId: sub.id, topics: [...sub.topics] });
    if (sub.watermark === null) {
      this.stats.snapshots += 1;
    } else {
      this.stats.resumes += 1;
      value.resume = create(ResumeFromSchema, {
        epoch: sub.epoch,
        watermark: BigInt(sub.watermark),
      });
    }
    return clientMessage({ case: "subscribe", value });
  }

  private onUpdate(frame: Update): ClientEvent[] {
    const sub = this.subs.get(frame.subscriptionId);
    if (sub === undefined) return [];
    const watermark = Number(frame.watermark);
    const version = Number(frame.version);
    if (sub.synced && watermark > (sub.watermark ?? 0)) sub.watermark = watermark;
    this.lastWatermarkSeen = Math.max(this.lastWatermarkSeen, watermark);
    const held = sub.cache.get(frame.docKey);
    if (held !== undefined && version <= held.version) {
      this.stats.repeatsDropped += 1;
      return [];
    }
    const doc: CachedDocument = {
      docKey: frame.docKey,
      projection: frame.projection,
      version,
      watermark,
      contentHash: frame.contentHash,
      document: frame.document ?? {},
    };
    sub.cache.set(frame.docKey, doc);
    this.stats.updates += 1;
    return [{ type: "changed", subscriptionId: sub.id, doc }];
  }

  private onSynced(id: string, watermark: number, epoch: string): ClientEvent[] {
    const sub = this.subs.get(id);
    if (sub === undefined) return [];
    sub.watermark =
      epoch !== sub.epoch || sub.watermark === null ? watermark : Math.max(watermark, sub.watermark);
    sub.epoch = epoch;
    sub.synced = true;
    this.backoff.reset();
    this.settleState();
    return [{ type: "synced", subscriptionId: id, watermark: sub.watermark, epoch }];
  }

  private onReset(id: string, reason: string, epoch: string): ClientEvent[] {
    const sub = this.subs.get(id);
    if (sub === undefined) return [];
    sub.cache.clear();
    sub.epoch = epoch;
    sub.watermark = null;
    sub.synced = false;
    this.stats.resets += 1;
    if (this.state === "live") this.state = "syncing";
    return [{ type: "reset", subscriptionId: id, reason, epoch }];
  }

  private onError(id: string, code: string, message: string): ClientEvent[] {
    const sub = this.subs.get(id);
    const fatal = sub !== undefined && !sub.synced && REFUSALS.has(code);
    if (sub !== undefined && fatal) {
      sub.failed = true;
      this.settleState();
    }
    return [{ type: "error", subscriptionId: id, code, message, fatal }];
  }

  private settleState(): void {
    if (this.state === "syncing" || this.state === "live") {
      const pending = [...this.subs.values()].some((s) => !s.synced && !s.failed);
      this.state = pending ? "syncing" : "live";
    }
  }

  private sub(id: string): Sub {
    const sub = this.subs.get(id);
    if (sub === undefined) throw new RangeError(`no subscription ${id}`);
    return sub;
  }
}
