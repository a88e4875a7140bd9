"""The fan-out bus's message codec: a change survives the round trip byte for byte, and a bad
payload is refused with ValueError."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st
from oa_sync_core.codec import canonical_json
from oa_sync_server.bus import BusChange, decode_change, encode_change
from oa_sync_server.postgres.read_model import DocRow

_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


@given(
    body=st.dictionaries(st.text(max_size=8), _json, max_size=5),
    key=st.text(min_size=1, max_size=40),
    version=st.integers(1, 2**62),
    watermark=st.integers(1, 2**62),
    epoch=st.text(min_size=1, max_size=36),
    at=st.floats(0, 2e9, allow_nan=False),
)
def test_round_trip_is_exact(
    body: dict[str, object], key: str, version: int, *, watermark: int, epoch: str, at: float
) -> None:
    """decode(encode(change)) is the change, its body the same canonical bytes a Postgres read
    gives (so a hub builds the same frame from a message as from a row)."""
    canonical = canonical_json(body)  # type: ignore[arg-type]
    row = DocRow(
        doc_key=key,
        projection="runtime/run_summary",
        version=version,
        watermark=watermark,
        content_hash=hashlib.sha256(canonical).hexdigest(),
        body=canonical,
    )
    change = BusChange(epoch=epoch, row=row, committed_at=at)
    assert decode_change(encode_change(change)) == change
    assert change.msg_id == f"{epoch}:{watermark}"


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"not json",
        b"[]",
        b'{"epoch": "e"}',
        b'{"epoch": 1, "at": 0, "doc_key": "k", '
        b'"projection": "p", "version": 1, "watermark": 1, "content_hash": "h", "body": {}}',
        b'{"epoch": "e", "at": 0, "doc_key": "k", "projection": "p", "version": true, '
        b'"watermark": 1, "content_hash": "h", "body": {}}',
    ],
)
def test_bad_payload_is_refused(payload: bytes) -> None:
    """A payload that is not a change (bad JSON, missing or mistyped fields) raises
    ValueError, which the bus logs and drops."""
    with pytest.raises(ValueError, match="not a bus change"):
        decode_change(payload)
