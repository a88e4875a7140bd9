/**
 * Reconnect timing: exponential backoff with full jitter, the rule of the Python client
 * (oa_sync_core.protocol.client_session.Backoff). The n-th consecutive failed attempt waits
 * `uniform(0, min(cap, base * 2**n))`; the count returns to zero only on a `synced`.
 */

export interface BackoffPolicy {
  /** The first attempt's ceiling, in milliseconds. */
  baseMs: number;
  /** The largest ceiling, in milliseconds. */
  capMs: number;
  /** Consecutive failed attempts before giving up; `null` retries forever. */
  maxAttempts: number | null;
}

export const DEFAULT_BACKOFF: BackoffPolicy = { baseMs: 500, capMs: 30_000, maxAttempts: null };

export class Backoff {
  readonly policy: BackoffPolicy;
  attempts = 0;
  private readonly random: () => number;

  constructor(policy: Partial<BackoffPolicy> = {}, random: () => number = Math.random) {
    this.policy = { ...DEFAULT_BACKOFF, ...policy };
    if (!(this.policy.baseMs > 0 && this.policy.baseMs <= this.policy.capMs)) {
      throw new RangeError("backoff needs 0 < baseMs <= capMs");
    }
    if (this.policy.maxAttempts !== null && this.policy.maxAttempts < 1) {
      throw new RangeError("maxAttempts must be at least 1");
    }
    this.random = random;
  }

  /** The upper bound of the next delay: `min(cap, base * 2**attempts)`. */
  ceiling(): number {
    return Math.min(this.policy.capMs, this.policy.baseMs * 2 ** Math.min(this.attempts, 64));
  }

  /** Draw the next delay and count the attempt; `null` once attempts are exhausted. */
  nextDelay(): number | null {
    const limit = this.policy.maxAttempts;
    if (limit !== null && this.attempts >= limit) return null;
    const delay = this.random() * this.ceiling();
    this.attempts += 1;
    return delay;
  }

  /** Back to the base delay (after a `synced`). */
  reset(): void {
    this.attempts = 0;
  }
}
