/**
 * Typed documents: the generated `RunSummaryProjection` and `CodexWorkerSummaryProjection`
 * from a cached document's proto3 JSON (unknown fields ignored: a newer server may add some).
 */

import { fromJson } from "@bufbuild/protobuf";
import {
  CodexWorkerSummaryProjectionSchema,
  RunSummaryProjectionSchema,
  type CodexWorkerSummaryProjection,
  type RunSummaryProjection,
} from "./gen/openagents/sync/v1/projections_pb.js";
import type { CachedDocument } from "./session.js";

export const RUN_SUMMARY = "runtime/run_summary";
export const WORKER_SUMMARY = "runtime/codex_worker_summary";

/** The run summary in `doc` (which must be of projection `runtime/run_summary`). */
export function runSummary(doc: CachedDocument): RunSummaryProjection {
  if (doc.projection !== RUN_SUMMARY) throw new TypeError(`${doc.docKey} is not a run summary`);
  return fromJson(RunSummaryProjectionSchema, doc.document, { ignoreUnknownFields: true });
}

/** The Codex worker summary in `doc`. */
export function workerSummary(doc: CachedDocument): CodexWorkerSummaryProjection {
  if (doc.projection !== WORKER_SUMMARY) throw new TypeError(`${doc.docKey} is not a worker summary`);
  return fromJson(CodexWorkerSummaryProjectionSchema, doc.document, { ignoreUnknownFields: true });
}
