/**
 * Replays operations on the TypeScript `ClientSession`, one JSON line in, one JSON line out,
 * for tests/web/test_session_parity.py: hypothesis drives the Python session and this one with
 * the same operations and requires the same answers (the port must decide as the original).
 */

import { toJson } from "@bufbuild/protobuf";
import { createInterface } from "node:readline";
import { ClientMessageSchema, type ClientMessage } from "../src/gen/openagents/sync/v1/sync_pb.js";
import { ClientSession, ProtocolError, type ClientEvent } from "../src/session.js";
import { decodeServer } from "../src/wire.js";

type Op = {
  op: string;
  sid?: string;
  topics?: string[];
  token?: string;
  now?: number;
  frame?: string;
  code?: number | null;
  maxAttempts?: number | null;
};

let session = new ClientSession();

function event(e: ClientEvent): object {
  switch (e.type) {
    case "changed":
      return { type: e.type, sid: e.subscriptionId, doc: [e.doc.docKey, e.doc.version, e.doc.watermark, e.doc.contentHash] };
    case "reset":
      return { type: e.type, sid: e.subscriptionId, reason: e.reason, epoch: e.epoch };
    case "synced":
      return { type: e.type, sid: e.subscriptionId, watermark: e.watermark, epoch: e.epoch };
    case "error":
      return { type: e.type, sid: e.subscriptionId, code: e.code, message: e.message, fatal: e.fatal };
  }
}

function frames(list: ClientMessage[]): unknown[] {
  return list.map((m) => toJson(ClientMessageSchema, m));
}

function snapshot(): object {
  const subs: Record<string, object> = {};
  for (const sid of session.subscriptionIds()) {
    const docs: Record<string, unknown[]> = {};
    for (const [key, d] of session.documents(sid)) docs[key] = [d.version, d.watermark, d.contentHash];
    const position = session.position(sid);
    subs[sid] = {
      docs,
      position: position === null ? null : [position.epoch, position.watermark],
      synced: session.isSynced(sid),
    };
  }
  return {
    state: session.state,
    stats: session.stats,
    attempts: session.backoff.attempts,
    lastWatermarkSeen: session.lastWatermarkSeen,
    subs,
  };
}

function apply(op: Op): object {
  switch (op.op) {
    case "new":
      session = new ClientSession({ backoff: { maxAttempts: op.maxAttempts ?? null } });
      return {};
    case "token":
      return { frames: frames(session.setToken(op.token ?? "", op.now ?? 0)) };
    case "subscribe": {
      const [, out] = session.subscribe(op.topics ?? [], op.sid);
      return { frames: frames(out) };
    }
    case "unsubscribe":
      return { frames: frames(session.unsubscribe(op.sid ?? "")) };
    case "connecting":
      session.connecting();
      return {};
    case "opened":
      return { frames: frames(session.opened(op.now ?? 0)) };
    case "receive": {
      const [events, out] = session.receive(decodeServer(op.frame ?? "", "json"));
      return { events: events.map(event), frames: frames(out) };
    }
    case "closed": {
      const d = session.closed(op.code ?? null);
      return {
        decision: d.type === "reconnect" ? { type: d.type, refresh: d.refreshToken, code: d.code } : { type: d.type, code: d.code },
      };
    }
    case "close":
      session.close();
      return {};
    default:
      throw new Error(`unknown op ${op.op}`);
  }
}

for await (const line of createInterface({ input: process.stdin })) {
  if (!line.trim()) continue;
  let result: object;
  try {
    result = { ok: apply(JSON.parse(line) as Op) };
  } catch (error) {
    result = {
      error: error instanceof ProtocolError ? `protocol:${error.code}` : error instanceof RangeError ? "value" : String(error),
    };
  }
  process.stdout.write(JSON.stringify({ ...result, snapshot: snapshot() }) + "\n");
}
