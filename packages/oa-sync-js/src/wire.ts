/**
 * Frames on the WebSocket: `oa-sync.v1.json` (text, proto3 JSON) or `oa-sync.v1.proto`
 * (binary). Decoding is protobuf-es's, strict: an unknown field is an error, never ignored.
 */

import { create, fromBinary, fromJsonString, toBinary, toJsonString } from "@bufbuild/protobuf";
import {
  ClientMessageSchema,
  ServerMessageSchema,
  type ClientMessage,
  type ServerMessage,
} from "./gen/openagents/sync/v1/sync_pb.js";

export type WireFormat = "json" | "proto";

export const SUBPROTOCOLS: Record<WireFormat, string> = {
  json: "oa-sync.v1.json",
  proto: "oa-sync.v1.proto",
};

/** A frame the server sent that does not parse as a `ServerMessage`. */
export class WireError extends Error {
  override name = "WireError";
}

/** The bytes (binary) or text (JSON) of a client message. */
export function encodeClient(message: ClientMessage, format: WireFormat): string | Uint8Array {
  return format === "json"
    ? toJsonString(ClientMessageSchema, message)
    : toBinary(ClientMessageSchema, message);
}

/** Parse one server frame strictly; a frame of the wrong kind for the format is an error. */
export function decodeServer(data: string | Uint8Array, format: WireFormat): ServerMessage {
  try {
    if (format === "json") {
      if (typeof data !== "string") throw new WireError("binary frame on the JSON subprotocol");
      return fromJsonString(ServerMessageSchema, data, { ignoreUnknownFields: false });
    }
    if (typeof data === "string") throw new WireError("text frame on the proto subprotocol");
    return fromBinary(ServerMessageSchema, data);
  } catch (error) {
    if (error instanceof WireError) throw error;
    throw new WireError(`malformed server frame: ${(error as Error).message}`);
  }
}

/** Build a `ClientMessage` of one kind. */
export function clientMessage(kind: ClientMessage["kind"]): ClientMessage {
  return create(ClientMessageSchema, { kind });
}
