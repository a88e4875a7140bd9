"""A change as the fan-out bus carries it, and its payload codec (no NATS needed here)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Protocol, TypeVar

import orjson
from oa_sync_core.codec import canonical_json

from oa_sync_server.postgres.read_model import DocRow

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

__all__ = ["BusChange", "ChangeBus", "decode_change", "encode_change"]

_T = TypeVar("_T")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class BusChange:
    """One change as carried by the bus.

    Attributes:
        epoch: the log epoch it was committed in.
        row: the document at its new version, exactly as a Postgres read returns it.
        committed_at: when the projector committed it (seconds since the epoch).
    """

    epoch: str
    row: DocRow
    committed_at: float

    @property
    def watermark(self) -> int:
        """The change's watermark (its message id within the epoch)."""
        return self.row.watermark

    @property
    def msg_id(self) -> str:
        """The JetStream message id: ``<epoch>:<watermark>``."""
        return f"{self.epoch}:{self.row.watermark}"


class ChangeBus(Protocol):
    """What the projector publishes committed changes to and a hub takes them from.

    Two exist: :class:`oa_sync_server.bus.nats.NatsBus` (every instance's hub gets every
    change the lease holder commits) and :class:`oa_sync_server.bus.local.LocalBus` (the hub of
    the projector's own process gets that projector's changes, with no network between).
    """

    @property
    def complete(self) -> bool:
        """Whether the bus carries every change the lease holder commits, wherever it runs
        (a hub then reads Postgres only to audit and after a gap); ``False``: only this
        process's projector's, and the hub reads what other notifications name."""
        ...

    @property
    def connected(self) -> bool:
        """True while changes can arrive (a hub relies on the bus only then)."""
        ...

    def subscribe(self, handler: Callable[[BusChange], None]) -> None:
        """Hand every change that arrives to ``handler`` (synchronously, in order)."""

    async def publish(self, changes: Iterable[BusChange]) -> int:
        """Publish committed changes in watermark order; returns how many were sent."""
        ...

    async def republish(self, engine: AsyncEngine) -> int:
        """Publish what the bus may have missed (a fresh lease holder calls this)."""
        ...


def encode_change(change: BusChange) -> bytes:
    """The message payload of ``change`` (JSON; the body embedded as stored)."""
    row = change.row
    return orjson.dumps(
        {
            "epoch": change.epoch,
            "at": change.committed_at,
            "doc_key": row.doc_key,
            "projection": row.projection,
            "version": row.version,
            "watermark": row.watermark,
            "content_hash": row.content_hash,
            "body": orjson.Fragment(row.body),
        }
    )


def decode_change(data: bytes) -> BusChange:
    """The change a payload of :func:`encode_change` carries.

    Raises:
        ValueError: not such a payload.
    """
    try:
        obj = orjson.loads(data)
        row = DocRow(
            doc_key=_typed(obj["doc_key"], str),
            projection=_typed(obj["projection"], str),
            version=_typed(obj["version"], int),
            watermark=_typed(obj["watermark"], int),
            content_hash=_typed(obj["content_hash"], str),
            body=canonical_json(obj["body"]),
        )
        return BusChange(epoch=_typed(obj["epoch"], str), row=row, committed_at=float(obj["at"]))
    except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"not a bus change: {type(exc).__name__}") from exc


def _typed(value: object, kind: type[_T]) -> _T:
    if not isinstance(value, kind) or isinstance(value, bool):
        raise TypeError(kind.__name__)
    return value
