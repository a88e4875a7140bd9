export { Backoff, DEFAULT_BACKOFF, type BackoffPolicy } from "./backoff.js";
export {
  AppendError,
  ClientClosedError,
  Subscription,
  SyncClient,
  type AppendEventInit,
  type AppendResult,
  type SubscriptionListener,
  type SyncClientOptions,
  type TokenProvider,
  type WebSocketConstructor,
  type WebSocketLike,
} from "./client.js";
export { RUN_SUMMARY, WORKER_SUMMARY, runSummary, workerSummary } from "./documents.js";
export {
  ClientSession,
  FATAL_CLOSE_CODES,
  ProtocolError,
  type CachedDocument,
  type ClientEvent,
  type ConnectionState,
  type Decision,
  type SessionStats,
} from "./session.js";
export { followSse, type SseEvent, type SseOptions } from "./sse.js";
export { readTokenTimes, refreshAt, type TokenTimes } from "./token.js";
export { decodeServer, encodeClient, SUBPROTOCOLS, WireError, type WireFormat } from "./wire.js";
export * as proto from "./gen/openagents/sync/v1/sync_pb.js";
export * as projections from "./gen/openagents/sync/v1/projections_pb.js";
