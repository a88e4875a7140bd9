/** Full-jitter backoff and JWT timing, without a server (the decisions are proven equal to the
 * Python session's by tests/web/test_session_parity.py). */

import assert from "node:assert/strict";
import { it } from "node:test";
import { Backoff, readTokenTimes, refreshAt } from "../src/index.js";

it("draws each delay uniformly below min(cap, base * 2**n) and resets to the base", () => {
  let draw = 0.999;
  const backoff = new Backoff({ baseMs: 100, capMs: 1000, maxAttempts: 6 }, () => draw);
  const ceilings = [100, 200, 400, 800, 1000, 1000];
  for (const ceiling of ceilings) {
    const delay = backoff.nextDelay();
    assert.ok(delay !== null && delay < ceiling && delay >= 0.99 * ceiling);
  }
  assert.equal(backoff.nextDelay(), null, "attempts exhausted");
  backoff.reset();
  draw = 0;
  assert.equal(backoff.nextDelay(), 0);
  assert.throws(() => new Backoff({ baseMs: 0 }), RangeError);
});

it("reads iat/exp from a JWT and schedules the refresh a fifth of its life before exp", () => {
  const payload = Buffer.from(JSON.stringify({ iat: 1000, exp: 2000 })).toString("base64url");
  const times = readTokenTimes(`h.${payload}.s`);
  assert.deepEqual(times, { issuedAt: 1000, expiresAt: 2000 });
  assert.equal(refreshAt(times!), 1800);
  assert.equal(readTokenTimes("opaque-token"), null);
  assert.equal(readTokenTimes("a.%%%.c"), null);
});
