// The ten-line example of docs/client.md (type-checked by `npm run build`).
import WebSocket from "ws"; // Node 20; in a browser, leave `WebSocket` out
import { runSummary, SyncClient } from "../src/index.js";

export function follow(runId: string, fetchToken: () => Promise<string>): SyncClient {
  const client = new SyncClient({ url: "http://127.0.0.1:8787", token: fetchToken, WebSocket });
  client.subscribe([`runtime/run_summary:${runId}`]).on((event) => {
    if (event.type === "changed") {
      const run = runSummary(event.doc); // the generated RunSummaryProjection
      console.log(event.doc.version, run.status, run.stepCount, run.lastStepDescription);
    }
  });
  return client.start();
}
