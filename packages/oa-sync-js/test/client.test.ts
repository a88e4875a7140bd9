/**
 * The TypeScript client against a real `oa-sync serve` on real Postgres (see harness.ts):
 * snapshot, live, resume after a cut, reset on a new epoch, token refresh on one connection,
 * refusal of a bad token, both subprotocols, read-your-writes, the SSE fallback, and a chaos
 * proxy cutting the connection while 2,000 events land on 200 documents. Every JSON frame the
 * server sends is also parsed by protobuf-es `fromJson` in strict mode (FrameCheck).
 */

import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { RunSummaryProjection_Status } from "../src/gen/openagents/sync/v1/projections_pb.js";
import {
  ClientClosedError,
  followSse,
  runSummary,
  type CachedDocument,
  type ClientEvent,
  type SseEvent,
} from "../src/index.js";
import {
  ALL_FRAMES,
  appendVisible,
  ChaosProxy,
  changeEpoch,
  client,
  eventually,
  FrameCheck,
  getDocument,
  mintToken,
  runEvents,
  SERVER_URL,
  serverDocs,
  uniq,
} from "./harness.js";

function versions(docs: ReadonlyMap<string, CachedDocument>): Map<string, string> {
  return new Map([...docs].map(([k, d]) => [k, `${d.version}/${d.contentHash}`]));
}

describe("SyncClient against oa-sync serve", () => {
  it("receives a snapshot of existing documents, typed, then goes live", async () => {
    const id = uniq();
    await appendVisible([...runEvents(`${id}-a`, 2), ...runEvents(`${id}-b`, 4)]);
    const frames = new FrameCheck();
    const c = client({ onFrame: frames.hook }).start();
    try {
      const sub = c.subscribe([`runtime/run_summary:${id}-*`]);
      await sub.synced();
      assert.equal(c.state, "live");
      assert.equal(sub.documents.size, 2);
      const b = sub.documents.get(`runtime/run_summary:${id}-b`);
      assert.ok(b);
      assert.equal(b.version, 5);
      assert.equal(runSummary(b).stepCount, 4);
      assert.equal(runSummary(b).runId, `${id}-b`);
      assert.equal(c.stats.snapshots, 1);
      assert.deepEqual(frames.failures, []);
      assert.ok(frames.count >= 4);
    } finally {
      await c.close();
    }
  });

  it("delivers live updates in increasing version order, up to the latest", async () => {
    const id = uniq();
    const frames = new FrameCheck();
    const c = client({ onFrame: frames.hook }).start();
    try {
      const sub = c.subscribe([`runtime/run_summary:${id}`]);
      const seen: number[] = [];
      sub.on((e) => e.type === "changed" && seen.push(e.doc.version));
      await sub.synced();
      await appendVisible(runEvents(id, 3));
      await c.append([{ streamId: `run:${id}`, type: "run.step", payload: { runId: id, stepIndex: 9 } }], {
        visible: true,
      });
      assert.equal(sub.documents.get(`runtime/run_summary:${id}`)?.version, 5);
      assert.deepEqual(seen, [...seen].sort((x, y) => x - y));
      assert.equal(seen.at(-1), 5);
      assert.deepEqual(frames.failures, []);
    } finally {
      await c.close();
    }
  });

  it("read-your-writes: append({visible}) resolves with the write already in the cache", async () => {
    const id = uniq();
    const c = client().start();
    try {
      const sub = c.subscribe([`runtime/run_summary:${id}-*`]);
      await sub.synced();
      for (let i = 1; i <= 5; i++) {
        const result = await c.append(
          [
            i === 1
              ? { streamId: `run:${id}-r`, type: "run.created", payload: { runId: `${id}-r` } }
              : { streamId: `run:${id}-r`, type: "run.step", payload: { runId: `${id}-r`, stepIndex: i } },
          ],
          { visible: true, timeoutMs: 10_000 },
        );
        const doc = sub.documents.get(`runtime/run_summary:${id}-r`);
        assert.ok(doc, "the write is in the cache when append resolves");
        assert.equal(doc.version, i);
        assert.ok(result.visibleWatermark !== undefined && doc.watermark >= result.visibleWatermark);
        assert.equal(result.positions.length, 1);
      }
    } finally {
      await c.close();
    }
  });

  it("speaks the binary proto subprotocol with the same results", async () => {
    const id = uniq();
    await appendVisible(runEvents(id, 2));
    const c = client({ format: "proto" }).start();
    try {
      const sub = c.subscribe([`runtime/run_summary:${id}`]);
      await sub.synced();
      assert.equal(sub.documents.get(`runtime/run_summary:${id}`)?.version, 3);
      await c.append([{ streamId: `run:${id}`, type: "run.completed", payload: { runId: id } }], { visible: true });
      const doc = sub.documents.get(`runtime/run_summary:${id}`);
      assert.equal(doc?.version, 4);
      assert.ok(doc);
      assert.equal(runSummary(doc).status, RunSummaryProjection_Status.COMPLETED);
    } finally {
      await c.close();
    }
  });

  it("resumes after a cut with only what changed, never a snapshot again", async () => {
    const id = uniq();
    await appendVisible(runEvents(`${id}-0`, 1));
    const proxy = new ChaosProxy();
    const url = await proxy.start();
    const frames = new FrameCheck();
    const c = client({ url, onFrame: frames.hook }).start();
    try {
      const sub = c.subscribe([`runtime/run_summary:${id}-*`]);
      await sub.synced();
      proxy.down = true;
      proxy.cutAll();
      await c.waitForState(["backing_off", "connecting"]);
      await appendVisible(runEvents(`${id}-1`, 2));
      proxy.down = false;
      const topic = `runtime/run_summary:${id}-*`;
      const expected = await serverDocs(topic);
      await eventually(
        () => c.state === "live" && versions(sub.documents).size === expected.size,
        20_000,
        "resume",
      );
      assert.deepEqual(versions(sub.documents), expected);
      assert.equal(c.stats.snapshots, 1);
      assert.ok(c.stats.resumes >= 1);
      assert.equal(c.stats.resets, 0);
      assert.deepEqual(frames.failures, []);
    } finally {
      await c.close();
      await proxy.stop();
    }
  });

  it("refreshes its token in-band on one connection", async () => {
    const id = uniq();
    let minted = 0;
    const c = client({
      token: () => {
        minted += 1;
        return mintToken({ ttlS: 3 });
      },
    }).start();
    try {
      const sub = c.subscribe([`runtime/run_summary:${id}`]);
      await sub.synced();
      await eventually(() => c.stats.tokenRefreshes >= 3, 20_000, "three refreshes");
      await appendVisible(runEvents(id, 1));
      await eventually(() => sub.documents.get(`runtime/run_summary:${id}`)?.version === 2, 10_000, "update");
      assert.equal(c.stats.connections, 1);
      assert.ok(minted >= 4);
      assert.equal(c.state, "live");
    } finally {
      await c.close();
    }
  });

  it("shares one token refresh among concurrent callers", async () => {
    let calls = 0;
    let release: (token: string) => void = () => undefined;
    const c = client({
      token: () =>
        new Promise<string>((resolve) => {
          calls += 1;
          release = resolve;
        }),
    });
    const all = Promise.all([c.refreshToken(), c.refreshToken(), c.refreshToken()]);
    release(mintToken());
    await all;
    assert.equal(calls, 1);
    await c.close();
  });

  it("gives up on a bad fixed token with close 4401, without a retry loop", async () => {
    const c = client({ token: mintToken({ badSignature: true }) }).start();
    await c.waitForState(["closed"], 20_000);
    assert.ok(c.error instanceof ClientClosedError);
    assert.equal(c.error.code, 4401);
    assert.equal(c.stats.connections, 1);
    await c.close();
  });

  it("after a 4401 close fetches a fresh token before reconnecting", async () => {
    const id = uniq();
    let minted = 0;
    const c = client({
      token: () => (++minted === 1 ? mintToken({ badSignature: true }) : mintToken()),
    }).start();
    try {
      const sub = c.subscribe([`runtime/run_summary:${id}`]);
      await sub.synced(20_000);
      assert.equal(minted, 2, "one refused token, one fresh one");
      assert.equal(c.stats.connections, 2);
      assert.equal(c.state, "live");
    } finally {
      await c.close();
    }
  });

  it("is reset on a new epoch: clears only that subscription, then converges", async () => {
    const id = uniq();
    await appendVisible(runEvents(`${id}-a`, 1));
    const c = client().start();
    try {
      const sub = c.subscribe([`runtime/run_summary:${id}-*`]);
      const other = c.subscribe([`runtime/codex_worker_summary:${id}-*`]);
      const events: ClientEvent[] = [];
      sub.on((e) => events.push(e));
      let otherResets = 0;
      other.on((e) => e.type === "reset" && (otherResets += 1));
      await sub.synced();
      const epoch = `js-epoch-${id}`;
      changeEpoch(epoch);
      await eventually(() => c.state === "live" && c.session.position(sub.id)?.epoch === epoch, 20_000, "new epoch");
      const reset = events.find((e) => e.type === "reset");
      assert.ok(reset && reset.type === "reset");
      assert.equal(reset.epoch, epoch);
      assert.deepEqual(versions(sub.documents), await serverDocs(`runtime/run_summary:${id}-*`));
      assert.equal(c.stats.resets, 2); // each subscription reset once, by itself
      assert.equal(otherResets, 1);
    } finally {
      await c.close();
    }
  });

  it("follows documents over the SSE fallback with a fetch stream and a bearer header", async () => {
    const id = uniq();
    await appendVisible(runEvents(id, 1));
    const events: SseEvent[] = [];
    let synced = false;
    const follower = followSse({
      url: SERVER_URL,
      topics: [`runtime/run_summary:${id}`],
      token: () => mintToken(),
      onEvent: (e) => {
        events.push(e);
        if (e.type === "synced") synced = true;
      },
    });
    try {
      await eventually(() => synced, 10_000, "SSE synced");
      assert.equal(follower.documents.get(`runtime/run_summary:${id}`)?.version, 2);
      await appendVisible(runEvents(id, 1).slice(1));
      await eventually(() => follower.documents.get(`runtime/run_summary:${id}`)?.version === 3, 10_000, "SSE live");
    } finally {
      follower.close();
    }
  });

  it("GET /v1/docs bodies parse with protobuf-es fromJson in strict mode", async () => {
    const id = uniq();
    await appendVisible([
      ...runEvents(id, 2),
      { streamId: `worker:${id}`, type: "worker.started", payload: { workerId: id, host: "h1" } },
    ]);
    const run = await getDocument(`runtime/run_summary:${id}`);
    assert.equal(run.version, 3n);
    const worker = await getDocument(`runtime/codex_worker_summary:${id}`);
    assert.equal(worker.document?.["host"], "h1");
  });

  it("survives a chaos proxy cutting it 8+ times while 2,000 events land on 200 documents", async () => {
    const id = uniq();
    const proxy = new ChaosProxy();
    const url = await proxy.start();
    const frames = new FrameCheck();
    const c = client({ url, onFrame: frames.hook }).start();
    const topic = `runtime/run_summary:${id}-*`;
    const last = new Map<string, number>();
    let regressions = 0;
    try {
      const sub = c.subscribe([topic]);
      sub.on((e) => {
        if (e.type === "reset") last.clear();
        if (e.type !== "changed") return;
        if ((last.get(e.doc.docKey) ?? 0) >= e.doc.version) regressions += 1;
        last.set(e.doc.docKey, e.doc.version);
      });
      await sub.synced();
      const docs = 200;
      const perDoc = 10;
      const batches = 40;
      const events: object[] = [];
      for (let round = 0; round < perDoc; round++) {
        for (let d = 0; d < docs; d++) {
          const runId = `${id}-${d}`;
          events.push(
            round === 0
              ? { streamId: `run:${runId}`, type: "run.created", payload: { runId } }
              : { streamId: `run:${runId}`, type: "run.step", payload: { runId, stepIndex: round } },
          );
        }
      }
      const size = events.length / batches;
      for (let b = 0; b < batches; b++) {
        const batch = events.slice(b * size, (b + 1) * size);
        const body = JSON.stringify({ events: batch });
        const response = await fetch(`${SERVER_URL}/v1/events`, {
          method: "POST",
          headers: { Authorization: `Bearer ${mintToken()}`, "Content-Type": "application/json" },
          body,
        });
        assert.equal(response.status, 200);
        if (b % 4 === 2) {
          await c.waitForState(["live"], 20_000); // cut a connection that got somewhere
          proxy.cutAll();
        }
      }
      assert.ok(proxy.cuts >= 8);
      const projected = async (): Promise<boolean> => {
        const now = await serverDocs(topic);
        return now.size === docs && [...now.values()].every((v) => v.startsWith(`${perDoc}/`));
      };
      await eventually(projected, 60_000, "every event projected");
      const expected = await serverDocs(topic);
      await eventually(
        () => c.state === "live" && [...expected].every(([k, v]) => versions(sub.documents).get(k) === v),
        60_000,
        "the cache to equal the server",
      );
      assert.deepEqual(versions(sub.documents), expected);
      for (const doc of sub.documents.values()) assert.equal(doc.version, perDoc);
      assert.equal(regressions, 0, "versions per document only increased");
      assert.equal(c.stats.snapshots, 1, "one snapshot: every reconnect resumed");
      assert.equal(c.stats.resumes, c.stats.connections - 1);
      assert.ok(c.stats.connections >= 9);
      assert.equal(c.stats.resets, 0);
      assert.deepEqual(frames.failures, []);
      assert.ok(frames.count > docs);
    } finally {
      await c.close();
      await proxy.stop();
    }
  });

  it("every JSON frame the server sent in these tests parses with protobuf-es in strict mode", () => {
    assert.deepEqual(ALL_FRAMES.failures, []);
    assert.ok(ALL_FRAMES.count >= 400, `only ${ALL_FRAMES.count} frames checked`); // live updates coalesce
  });
});
