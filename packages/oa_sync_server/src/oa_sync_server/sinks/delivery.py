"""The HTTP delivery loop: follows the read model in watermark order and POSTs each change.

Theory of operation. The Postgres read model (``documents`` + ``changes``, written by the
projector worker) is the projection state. This loop is a *follower* of it with its own
checkpoint (``http_sink_checkpoints``, a change-log watermark): it reads the documents whose
``watermark`` (that of their latest change) is above the checkpoint, in watermark order —
the coalesced change log, which pruning ``changes`` for retention cannot shorten — and POSTs
each with :class:`~oa_sync_server.sinks.http.HttpDeliveryClient`.

* Coalescing: a document changed three times since the checkpoint is delivered once, at its
  latest version; the skipped intermediate versions are never sent. A legacy receiver sees
  versions strictly increasing per document, possibly with holes.
* Per-document order: ``http_sink_parity.shadow_version`` is the last version acknowledged;
  a document whose acknowledged version is the same or newer is skipped, so an older version
  is never sent after a newer one, also across restarts.
* Checkpoint: advanced to a document's watermark only after it got a 2xx, or after a
  non-retryable refusal was written to ``http_sink_dead_letters`` (same transaction as the
  parity row). A crash between the 2xx and that commit re-sends the same ``docKey:version``
  on restart: the idempotency key lets the receiver drop the repeat.
* Retryable failures outlasting the retry budget stop the pass with the checkpoint just before
  that change (the error is kept in the parity row); the next pass starts there again.
* One deliverer per sink: a pass holds a session advisory lock for its duration; a second
  process's pass finds it taken and does nothing.
* A new log epoch (watermarks restarted) restarts the checkpoint from 0.

Drive it with :meth:`HttpDeliveryLoop.deliver_pending` (tests, CLI) or
:meth:`HttpDeliveryLoop.run` (the server's background task, polling every
``poll_interval_s`` when no projector commit hints at new documents: one
:class:`~oa_sync_server.postgres.follower.LogFollower` on ``oa_sync_changes``).

What this is not: the projector (it never writes ``documents`` or ``changes``), nor the HTTP
client (``http.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import sqlalchemy as sa
import structlog
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from oa_sync_server.postgres.follower import LogFollower, libpq_url
from oa_sync_server.postgres.tables import CHANGES_CHANNEL, documents, sync_meta
from oa_sync_server.sinks.http import (
    Delivered,
    DeliveryRequest,
    DeliveryStoppedError,
    DeliveryUnavailableError,
    HttpDeliveryClient,
    Rejected,
)
from oa_sync_server.sinks.tables import (
    http_sink_checkpoints,
    http_sink_dead_letters,
    http_sink_parity,
)

__all__ = ["DEFAULT_SINK", "DeadLetter", "DeliveryPass", "HttpDeliveryLoop", "list_dead_letters"]

DEFAULT_SINK = "http"
_log = structlog.get_logger("oa_sync_server.sinks.delivery")
_NOW = sa.func.clock_timestamp()


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class DeliveryPass:
    """What one :meth:`HttpDeliveryLoop.deliver_pending` did.

    Attributes:
        delivered: documents acknowledged with a 2xx.
        dead_lettered: documents refused and written to the dead letters.
        skipped: documents whose version was already delivered (or dead-lettered).
        checkpoint: the watermark the checkpoint stands at afterwards.
        blocked: the error that stopped the pass early (retries exhausted), if any.
        locked_out: another deliverer holds this sink; nothing was done.
    """

    delivered: int = 0
    dead_lettered: int = 0
    skipped: int = 0
    checkpoint: int = 0
    blocked: str | None = None
    locked_out: bool = False


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class DeadLetter:
    """A document version the receiver refused.

    Attributes:
        doc_key, projection, version: the refused document version.
        status: the HTTP status (0: refused locally, e.g. no mutation configured).
        response_body: the receiver's answer, truncated.
        attempts: attempts made for it (including ``dead-letters retry``).
        created_at: ISO 8601 time of the refusal.
    """

    doc_key: str
    projection: str
    version: int
    status: int
    response_body: str
    attempts: int
    created_at: str


@dataclasses.dataclass(slots=True)
class _Shadow:
    version: int
    hash: str


def _request(doc: sa.RowMapping) -> DeliveryRequest:
    """The delivery of a ``documents`` row at its current version."""
    return DeliveryRequest(
        projection=doc["projection"],
        doc_key=doc["doc_key"],
        version=int(doc["version"]),
        content_hash=doc["content_hash"],
        document=doc["body"],
    )


async def list_dead_letters(engine: AsyncEngine, *, sink: str = DEFAULT_SINK) -> list[DeadLetter]:
    """Every dead letter of a sink, oldest first.

    Args:
        engine: the database.
        sink: the sink name.

    Returns:
        The dead letters.
    """
    t = http_sink_dead_letters
    query = sa.select(t).where(t.c.sink == sink).order_by(t.c.created_at, t.c.doc_key)
    async with engine.connect() as conn:
        rows = (await conn.execute(query)).mappings().all()
    return [
        DeadLetter(
            doc_key=row["doc_key"],
            projection=row["projection"],
            version=row["version"],
            status=row["status"],
            response_body=row["response_body"],
            attempts=row["attempts"],
            created_at=row["created_at"].isoformat(),
        )
        for row in rows
    ]


class HttpDeliveryLoop:
    """Follows the change log and delivers documents over HTTP (see the module docstring).

    Args:
        engine: the database (schema migrated to at least ``0002_http_sink``).
        client: an entered :class:`HttpDeliveryClient`.
        sink: the sink's name in the HTTP sink tables.
        batch_size: documents read per query.
        poll_interval_s: wait between passes in :meth:`run` when caught up.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        client: HttpDeliveryClient,
        *,
        sink: str = DEFAULT_SINK,
        batch_size: int = 200,
        poll_interval_s: float = 0.5,
    ):
        self.engine = engine
        self.client = client
        self.sink = sink
        self.batch_size = batch_size
        self.poll_interval_s = poll_interval_s
        self.last_pass: DeliveryPass | None = None

    # -- exclusivity -------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _exclusive(self) -> AsyncIterator[bool]:
        key = sa.func.hashtextextended("oa_sync.http_sink:" + self.sink, 0)
        async with self.engine.connect() as raw:
            conn = await raw.execution_options(isolation_level="AUTOCOMMIT")
            got = bool((await conn.execute(sa.select(sa.func.pg_try_advisory_lock(key)))).scalar())
            try:
                yield got
            finally:
                if got:
                    await conn.execute(sa.select(sa.func.pg_advisory_unlock(key)))

    # -- checkpoint --------------------------------------------------------------------------

    async def _load_checkpoint(self) -> int:
        t = http_sink_checkpoints
        async with self.engine.begin() as conn:
            epoch = (
                await conn.execute(sa.select(sync_meta.c.value).where(sync_meta.c.key == "epoch"))
            ).scalar()
            row = (
                await conn.execute(
                    sa.select(t.c.last_watermark, t.c.epoch).where(t.c.sink == self.sink)
                )
            ).first()
            if row is not None and row.epoch == epoch:
                return int(row.last_watermark)
            if row is not None:
                _log.warning("http_sink_checkpoint_reset", sink=self.sink, reason="epoch_changed")
            await conn.execute(
                insert(t)
                .values(sink=self.sink, last_watermark=0, epoch=epoch, updated_at=_NOW)
                .on_conflict_do_update(
                    index_elements=[t.c.sink],
                    set_={"last_watermark": 0, "epoch": epoch, "updated_at": _NOW},
                )
            )
            return 0

    async def _advance(self, conn: AsyncConnection, watermark: int) -> None:
        t = http_sink_checkpoints
        await conn.execute(
            sa.update(t)
            .where(t.c.sink == self.sink, t.c.last_watermark < watermark)
            .values(last_watermark=watermark, updated_at=_NOW)
        )

    async def _advance_alone(self, watermark: int) -> None:
        async with self.engine.begin() as conn:
            await self._advance(conn, watermark)

    # -- parity and dead letters -------------------------------------------------------------

    def _parity_upsert(self, values: dict[str, Any], *, keep: Sequence[str] = ()) -> sa.Insert:
        """Insert a parity row, or update every column in ``values`` but the key and ``keep``."""
        t = http_sink_parity
        statement = insert(t).values(sink=self.sink, **values)
        fixed = {"doc_key", *keep}
        return statement.on_conflict_do_update(
            index_elements=[t.c.sink, t.c.doc_key],
            set_={name: statement.excluded[name] for name in values if name not in fixed},
        )

    async def _record_delivered(
        self, doc: sa.RowMapping, outcome: Delivered, watermark: int | None
    ) -> str:
        shadow_hash = outcome.remote_hash or str(doc["content_hash"])
        async with self.engine.begin() as conn:
            await conn.execute(
                self._parity_upsert(
                    {
                        "doc_key": doc["doc_key"],
                        "projection": doc["projection"],
                        "primary_version": doc["version"],
                        "primary_hash": doc["content_hash"],
                        "shadow_version": doc["version"],
                        "shadow_hash": shadow_hash,
                        "shadow_delivered_at": _NOW,
                        "last_error": None,
                    }
                )
            )
            d = http_sink_dead_letters
            await conn.execute(
                sa.delete(d).where(
                    d.c.sink == self.sink,
                    d.c.doc_key == doc["doc_key"],
                    d.c.version <= doc["version"],
                )
            )
            if watermark is not None:
                await self._advance(conn, watermark)
        return shadow_hash

    async def _record_failure(
        self,
        doc: sa.RowMapping,
        error: str,
        *,
        rejected: Rejected | None,
        watermark: int | None,
        prior_attempts: int = 0,
    ) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(
                self._parity_upsert(
                    {
                        "doc_key": doc["doc_key"],
                        "projection": doc["projection"],
                        "primary_version": doc["version"],
                        "primary_hash": doc["content_hash"],
                        "shadow_version": 0,
                        "shadow_hash": "",
                        "last_error": error[:500],
                    },
                    keep=("shadow_version", "shadow_hash"),  # what the receiver acknowledged
                )
            )
            if rejected is not None:
                d = http_sink_dead_letters
                statement = insert(d).values(
                    sink=self.sink,
                    doc_key=doc["doc_key"],
                    projection=doc["projection"],
                    version=doc["version"],
                    status=rejected.status,
                    response_body=rejected.body,
                    attempts=rejected.attempts + prior_attempts,
                    created_at=_NOW,
                )
                await conn.execute(
                    statement.on_conflict_do_update(
                        index_elements=[d.c.sink, d.c.doc_key],
                        set_={
                            name: statement.excluded[name]
                            for name in (
                                "projection",
                                "version",
                                "status",
                                "response_body",
                                "attempts",
                                "created_at",
                            )
                        },
                    )
                )
            if watermark is not None:
                await self._advance(conn, watermark)

    # -- passes ------------------------------------------------------------------------------

    async def _read_batch(self, after: int) -> tuple[Sequence[sa.RowMapping], dict[str, _Shadow]]:
        """The next documents after ``after`` in watermark order; each one's handled version."""
        async with self.engine.connect() as conn:
            rows = (
                (
                    await conn.execute(
                        sa.select(documents)
                        .where(documents.c.watermark > after)
                        .order_by(documents.c.watermark)
                        .limit(self.batch_size)
                    )
                )
                .mappings()
                .all()
            )
            keys = sorted(str(doc["doc_key"]) for doc in rows)
            shadows: dict[str, _Shadow] = {}
            if keys:
                p = http_sink_parity
                for row in await conn.execute(
                    sa.select(p.c.doc_key, p.c.shadow_version, p.c.shadow_hash).where(
                        p.c.sink == self.sink, p.c.doc_key.in_(keys)
                    )
                ):
                    shadows[row.doc_key] = _Shadow(int(row.shadow_version), str(row.shadow_hash))
                d = http_sink_dead_letters
                for letter in await conn.execute(
                    sa.select(d.c.doc_key, d.c.version).where(
                        d.c.sink == self.sink, d.c.doc_key.in_(keys)
                    )
                ):
                    # A refused version counts as handled: never re-sent by the loop, only
                    # by ``dead-letters retry`` (or when a newer version appears).
                    known = shadows.get(letter.doc_key)
                    if known is None or known.version < int(letter.version):
                        shadows[letter.doc_key] = _Shadow(int(letter.version), "")
        return rows, shadows

    async def deliver_pending(self, *, stop: asyncio.Event | None = None) -> DeliveryPass:
        """Deliver every change after the checkpoint, until caught up or blocked.

        Args:
            stop: when set, the pass ends at the next backoff wait or batch boundary.

        Returns:
            A :class:`DeliveryPass` summary (``locked_out`` when another deliverer runs).
        """
        delivered = dead = skipped = 0
        blocked: str | None = None
        async with self._exclusive() as got:
            if not got:
                return DeliveryPass(locked_out=True)
            checkpoint = await self._load_checkpoint()
            while blocked is None and not (stop is not None and stop.is_set()):
                batch, shadows = await self._read_batch(checkpoint)
                if not batch:
                    break
                pending: int | None = None
                for doc in batch:
                    watermark, doc_key = int(doc["watermark"]), str(doc["doc_key"])
                    shadow = shadows.get(doc_key)
                    if shadow is not None and shadow.version >= doc["version"]:
                        skipped += 1
                        pending = watermark
                        continue
                    request = _request(doc)
                    try:
                        outcome = await self.client.deliver(request, stop=stop)
                    except DeliveryUnavailableError as exc:
                        await self._record_failure(
                            doc, exc.last_error, rejected=None, watermark=pending
                        )
                        checkpoint = pending if pending is not None else checkpoint
                        blocked = str(exc)
                        _log.warning(
                            "http_sink_delivery_blocked",
                            doc_key=doc_key,
                            version=request.version,
                            attempts=exc.attempts,
                            error=exc.last_error,
                        )
                        break
                    except DeliveryStoppedError:  # ``stop`` is set: the while loop ends too
                        if pending is not None:
                            await self._advance_alone(pending)
                            checkpoint = pending
                        break
                    if isinstance(outcome, Delivered):
                        shadow_hash = await self._record_delivered(doc, outcome, watermark)
                        shadows[doc_key] = _Shadow(request.version, shadow_hash)
                        delivered += 1
                    else:
                        await self._record_failure(
                            doc,
                            f"HTTP {outcome.status}: dead-lettered",
                            rejected=outcome,
                            watermark=watermark,
                        )
                        shadows[doc_key] = _Shadow(request.version, "")  # handled in this pass
                        dead += 1
                    checkpoint = watermark
                    pending = None
                else:
                    if pending is not None:
                        await self._advance_alone(pending)
                        checkpoint = pending
        result = DeliveryPass(
            delivered=delivered,
            dead_lettered=dead,
            skipped=skipped,
            checkpoint=checkpoint,
            blocked=blocked,
        )
        self.last_pass = result
        return result

    async def run(
        self,
        stop_event: asyncio.Event,
        *,
        after_pass: Callable[[DeliveryPass], Awaitable[None]] | None = None,
    ) -> None:
        """Deliver until ``stop_event`` is set: a pass, then wait ``poll_interval_s``.

        A failing pass (database or receiver down) is logged and retried after the interval;
        it never ends the loop. Cancel-safe.

        Args:
            stop_event: set it to end the loop; a backoff wait in progress ends at once.
            after_pass: awaited after each completed pass (e.g. to refresh parity metrics);
                an exception it raises is logged like a failed pass.
        """
        _log.info("http_sink_loop_started", sink=self.sink)
        follower = LogFollower(
            libpq_url(self.engine),
            CHANGES_CHANNEL,
            poll_interval_s=self.poll_interval_s,
            name=f"http-sink-{self.sink}",
        )
        async with follower:  # a projector commit's hint starts the next pass at once
            while not stop_event.is_set():
                try:
                    done = await self.deliver_pending(stop=stop_event)
                    if after_pass is not None:
                        await after_pass(done)
                except Exception as exc:  # noqa: BLE001 - the loop must outlive a bad pass
                    _log.warning("http_sink_pass_failed", sink=self.sink, error=type(exc).__name__)
                await follower.wait(stop_event)
        _log.info("http_sink_loop_stopped", sink=self.sink)

    async def retry_dead_letters(self, doc_keys: Sequence[str] | None = None) -> list[DeadLetter]:
        """Re-send the *current* version of dead-lettered documents.

        A 2xx removes the dead letter (and records the delivery in the parity table); another
        refusal updates it (status, body, attempts); retries exhausted leave it as it was.

        Args:
            doc_keys: the documents to retry; all of this sink's dead letters by default.

        Returns:
            The dead letters still present among those retried.
        """
        letters = await list_dead_letters(self.engine, sink=self.sink)
        if doc_keys is not None:
            wanted = set(doc_keys)
            letters = [letter for letter in letters if letter.doc_key in wanted]
        remaining: list[DeadLetter] = []
        for letter in letters:
            async with self.engine.connect() as conn:
                doc = (
                    (
                        await conn.execute(
                            sa.select(documents).where(documents.c.doc_key == letter.doc_key)
                        )
                    )
                    .mappings()
                    .first()
                )
            if doc is None:
                remaining.append(letter)
                continue
            try:
                outcome = await self.client.deliver(_request(doc))
            except DeliveryUnavailableError:
                remaining.append(letter)
                continue
            if isinstance(outcome, Delivered):
                await self._record_delivered(doc, outcome, None)
                _log.info("http_sink_dead_letter_redelivered", doc_key=letter.doc_key)
                continue
            await self._record_failure(
                doc,
                f"HTTP {outcome.status}: dead-lettered",
                rejected=outcome,
                watermark=None,
                prior_attempts=letter.attempts,
            )
            remaining.append(letter)
        return remaining
