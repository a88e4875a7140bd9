"""Wire codec: encode/decode of ``ServerMessage.update`` in JSON and binary proto, messages/s.

Contenders, all on the same realistic ``runtime/run_summary`` document (folded from events):

- ``oa_sync_core.protocol.wire`` ``encode_server`` / ``decode_server`` in both formats (the
  codec the server and the Python client use), and ``EncodedUpdate.frame`` — the per-subscriber hot
  path that splices a document encoded once per change into each subscriber's frame;
- betterproto 2.0.0b7 (the generated bindings; it cannot encode a ``Struct`` built from a dict,
  so its encode includes building ``Value`` objects by hand);
- the official ``google.protobuf`` runtime (upb), bindings generated at run time with
  ``grpc_tools.protoc`` from ``proto/``;
- orjson on the plain dict: the ceiling for JSON.

Run alone: ``python bench/wire_codec.py [--quick]``. Not a test: no assertions beyond a
round-trip sanity check of each contender.
"""

from __future__ import annotations

import importlib
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import RESULTS, Result, git_revision, load_average, machine, quick

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
TIMESTAMP = "2026-11-25T12:00:00Z"


def sample_document() -> tuple[str, int, str, dict[str, Any]]:
    """A run summary folded from a realistic run: (doc_key, version, content_hash, body)."""
    from oa_sync_core.testing import fold_events, new_event, record_events  # noqa: PLC0415

    events = [
        new_event(
            "run.created", "r1", agentId="agent-7", threadId="thread-42", occurred_at=TIMESTAMP
        ),
        new_event("run.started", "r1", workerId="w-3", occurred_at=TIMESTAMP),
        *(
            new_event(
                "run.step",
                "r1",
                stepIndex=i,
                description=f"step {i}: planning the change",
                progressPercent=i * 10,
                occurred_at=TIMESTAMP,
            )
            for i in range(5)
        ),
        new_event("run.tool_call", "r1", toolName="shell", callId="c1", occurred_at=TIMESTAMP),
    ]
    (update,) = fold_events(record_events(events)).values()
    return update.doc_key, update.version, update.content_hash, dict(update.body)


def rate(fn: Callable[[], object], n: int, repeats: int = 3) -> float:
    """Best-of-``repeats`` calls/s of ``fn`` over ``n`` calls each."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, time.perf_counter() - start)
    return n / best


def official_bindings(workdir: Path) -> Any:
    """Generate and import ``sync_pb2`` with the official protobuf runtime (None if no protoc)."""
    try:
        from grpc_tools import protoc  # noqa: PLC0415
    except ImportError:
        return None
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={workdir}",
        str(PROTO_ROOT / "openagents/sync/v1/sync.proto"),
    ]
    if protoc.main(args) != 0:
        return None
    sys.path.insert(0, str(workdir))
    return importlib.import_module("openagents.sync.v1.sync_pb2")


def betterproto_value(value: Any) -> Any:
    """A betterproto ``google.protobuf.Value`` for a JSON value."""
    from betterproto.lib.google import protobuf as gp  # noqa: PLC0415

    if isinstance(value, bool):
        return gp.Value(bool_value=value)
    if isinstance(value, int | float):
        return gp.Value(number_value=float(value))
    if isinstance(value, str):
        return gp.Value(string_value=value)
    if value is None:
        return gp.Value(null_value=gp.NullValue.NULL_VALUE)
    if isinstance(value, dict):
        return gp.Value(
            struct_value=gp.Struct(fields={k: betterproto_value(v) for k, v in value.items()})
        )
    return gp.Value(list_value=gp.ListValue(values=[betterproto_value(v) for v in value]))


def main() -> int:
    """Measure every contender, write bench/results/wire_codec.json and the plot."""
    n = 1_000 if quick() else 20_000
    slow_n = 100 if quick() else 500  # betterproto and json_format are too slow for n calls
    doc_key, version, content_hash, body = sample_document()
    projection = doc_key.partition(":")[0]
    update_dict = {
        "update": {
            "subscriptionId": "s1",
            "docKey": doc_key,
            "projection": projection,
            "version": str(version),
            "watermark": "123456",
            "contentHash": content_hash,
            "document": body,
        }
    }
    figures: dict[str, float] = {}
    baseline: dict[str, float] = {}
    notes: list[str] = []
    sizes: dict[str, int] = {}

    # -- ceiling: orjson on the plain dict ------------------------------------------------
    raw = orjson.dumps(update_dict)
    baseline["orjson_encode_msgs_per_s"] = rate(lambda: orjson.dumps(update_dict), n)
    baseline["orjson_decode_msgs_per_s"] = rate(lambda: orjson.loads(raw), n)
    sizes["json"] = len(raw)

    # -- oa_sync_core.protocol.wire ----------------------------------------------------------------
    from oa_sync_core.protocol import wire  # noqa: PLC0415

    frame = wire.UpdateFrame(
        subscription_id="s1",
        doc_key=doc_key,
        projection=projection,
        version=version,
        watermark=123456,
        content_hash=content_hash,
        document=body,
    )
    body_bytes = orjson.dumps(body, option=orjson.OPT_SORT_KEYS)
    for fmt, label in ((wire.WireFormat.JSON, "json"), (wire.WireFormat.PROTO, "proto")):
        data = wire.encode_server(frame, fmt)
        assert wire.decode_server(data, fmt, max_bytes=1 << 20) == frame
        sizes[f"wire_{label}"] = len(data)
        figures[f"wire_{label}_encode_msgs_per_s"] = rate(
            lambda fmt=fmt: wire.encode_server(frame, fmt), n
        )
        figures[f"wire_{label}_decode_msgs_per_s"] = rate(
            lambda fmt=fmt, data=data: wire.decode_server(data, fmt, max_bytes=1 << 20), n
        )
        encoded = wire.EncodedUpdate(
            doc_key=doc_key,
            projection=projection,
            version=version,
            watermark=123456,
            content_hash=content_hash,
            body=body_bytes,
        )
        assert encoded.frame("s1", fmt) == data
        figures[f"wire_{label}_shared_frame_msgs_per_s"] = rate(
            lambda fmt=fmt, encoded=encoded: encoded.frame("s1", fmt), n
        )

    # -- betterproto (generated bindings) -------------------------------------------------
    from oa_sync_core.contracts import v1  # noqa: PLC0415

    def bp_encode() -> bytes:
        return bytes(
            v1.ServerMessage(
                update=v1.Update(
                    subscription_id="s1",
                    doc_key=doc_key,
                    projection=projection,
                    version=version,
                    watermark=123456,
                    content_hash=content_hash,
                    document=betterproto_value(body).struct_value,
                )
            )
        )

    bp_bytes = bp_encode()
    assert v1.ServerMessage().parse(bp_bytes).update.doc_key == doc_key
    baseline["betterproto_proto_encode_msgs_per_s"] = rate(bp_encode, slow_n)
    baseline["betterproto_proto_decode_msgs_per_s"] = rate(
        lambda: v1.ServerMessage().parse(bp_bytes), slow_n
    )
    sizes["betterproto_proto"] = len(bp_bytes)
    notes.append(
        "betterproto 2.0.0b7 cannot serialise a Struct made with Struct.from_dict and its "
        "to_json does not use the proto3 JSON mapping for Struct: only its binary codec is "
        "measured, with the dict -> Value conversion counted in encode"
    )

    # -- official google.protobuf runtime -------------------------------------------------
    with tempfile.TemporaryDirectory() as tmp:
        pb = official_bindings(Path(tmp))
        if pb is None:
            notes.append("grpc_tools not installed: google.protobuf baseline missing")
        else:
            from google.protobuf import json_format  # noqa: PLC0415
            from google.protobuf.internal import api_implementation  # noqa: PLC0415

            def pb_encode() -> bytes:
                msg = pb.ServerMessage()
                up = msg.update
                up.subscription_id = "s1"
                up.doc_key = doc_key
                up.projection = projection
                up.version = version
                up.watermark = 123456
                up.content_hash = content_hash
                up.document.update(body)
                return bytes(msg.SerializeToString())

            pb_bytes = pb_encode()
            sizes["protobuf_proto"] = len(pb_bytes)
            parsed = pb.ServerMessage.FromString(pb_bytes)
            assert parsed.update.doc_key == doc_key
            baseline["protobuf_proto_encode_msgs_per_s"] = rate(pb_encode, n)
            baseline["protobuf_proto_decode_msgs_per_s"] = rate(
                lambda: pb.ServerMessage.FromString(pb_bytes), n
            )
            baseline["protobuf_proto_decode_to_dict_msgs_per_s"] = rate(
                lambda: json_format.MessageToDict(pb.ServerMessage.FromString(pb_bytes)), slow_n
            )
            baseline["protobuf_json_format_encode_msgs_per_s"] = rate(
                lambda: json_format.MessageToJson(parsed), slow_n
            )
            notes.append(
                f"google.protobuf implementation: {api_implementation.Type()}; its decode "
                "figure is a lazy parse (fields not read), decode_to_dict also builds the dict"
            )
    result = Result(
        name="wire_codec",
        parameters={
            "messages_per_measurement": n,
            "messages_per_slow_measurement": slow_n,
            "repeats": 3,
            "statistic": "best of repeats",
            "frame_bytes": sizes,
            "git": git_revision(),
            "load_average_1m_before": load_average(),
        },
        figures=figures,
        baseline=baseline,
        notes=notes,
    )
    if figures:
        for label in ("json", "proto"):
            fig = figures.get(f"wire_{label}_encode_msgs_per_s")
            if fig is not None:
                result.baseline[f"ratio_wire_{label}_encode_vs_orjson"] = (
                    fig / baseline["orjson_encode_msgs_per_s"]
                )
        proto_enc = figures.get("wire_proto_encode_msgs_per_s")
        if proto_enc is not None:
            result.target(
                "wire proto encode / betterproto (design: keep betterproto off the hot path)",
                proto_enc / baseline["betterproto_proto_encode_msgs_per_s"],
                at_least=10.0,
                unit="x",
            )
    result.notes.append(
        "issue 8 sets no numeric target for the wire codec; the one target row is derived from "
        "DESIGN.md's 'betterproto off the hot path'"
    )
    plot = grouped_plot(figures, baseline)
    result.write(machine(), plot)
    return 0


def grouped_plot(figures: dict[str, float], baseline: dict[str, float]) -> Path:
    """Encode and decode messages/s per contender, side by side."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    rows = [
        ("wire json", "wire_json", figures),
        ("wire proto", "wire_proto", figures),
        ("betterproto", "betterproto_proto", baseline),
        ("upb proto", "protobuf_proto", baseline),
        ("orjson dict", "orjson", baseline),
    ]
    labels = [label for label, key, src in rows if f"{key}_encode_msgs_per_s" in src]
    enc = [
        src[f"{key}_encode_msgs_per_s"] for _, key, src in rows if f"{key}_encode_msgs_per_s" in src
    ]
    dec = [
        src[f"{key}_decode_msgs_per_s"] for _, key, src in rows if f"{key}_encode_msgs_per_s" in src
    ]
    fig, ax = plt.subplots(figsize=(7, 3.8), dpi=100)
    xs = range(len(labels))
    ax.bar([x - 0.2 for x in xs], enc, width=0.4, label="encode", color="#4c72b0")
    ax.bar([x + 0.2 for x in xs], dec, width=0.4, label="decode", color="#dd8452")
    ax.set_xticks(list(xs), labels)
    ax.set_yscale("log")
    ax.set_ylabel("messages/s (log)")
    ax.set_title("ServerMessage.update codec")
    ax.legend()
    fig.tight_layout()
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "wire_codec.png"
    fig.savefig(path)
    plt.close(fig)
    return path


if __name__ == "__main__":
    raise SystemExit(main())
