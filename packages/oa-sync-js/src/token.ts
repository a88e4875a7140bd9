/**
 * Token timing read from a JWT's claims (without verifying it: that is the server's job).
 * A refresh is due a fraction of the token's lifetime before `exp` (default a fifth), the rule
 * of the Python client.
 */

export interface TokenTimes {
  /** `iat`, seconds since the epoch, if present. */
  issuedAt: number | null;
  /** `exp`, seconds since the epoch. */
  expiresAt: number;
}

function base64UrlDecode(text: string): string {
  const padded = text.replace(/-/g, "+").replace(/_/g, "/") + "=".repeat((4 - (text.length % 4)) % 4);
  const binary = atob(padded);
  const bytes = Uint8Array.from(binary, (c) => c.charCodeAt(0));
  return new TextDecoder().decode(bytes);
}

/** `iat` / `exp` of a JWT; `null` for an opaque token or one without a numeric `exp`. */
export function readTokenTimes(token: string): TokenTimes | null {
  const parts = token.split(".");
  if (parts.length !== 3 || parts[1] === undefined) return null;
  let payload: unknown;
  try {
    payload = JSON.parse(base64UrlDecode(parts[1]));
  } catch {
    return null;
  }
  if (typeof payload !== "object" || payload === null) return null;
  const { exp, iat } = payload as { exp?: unknown; iat?: unknown };
  if (typeof exp !== "number") return null;
  return { issuedAt: typeof iat === "number" ? iat : null, expiresAt: exp };
}

/** When to fetch the next token, in seconds since the epoch. */
export function refreshAt(times: TokenTimes, fraction = 0.2, defaultLeewayS = 10): number {
  const leeway =
    times.issuedAt !== null && times.expiresAt > times.issuedAt
      ? fraction * (times.expiresAt - times.issuedAt)
      : defaultLeewayS;
  return times.expiresAt - leeway;
}
