"""Operator actions on the HTTP sink for ``oa-sync parity`` and ``oa-sync dead-letters``.

Each function opens the configured database (``OA_SYNC_DATABASE_URL``, or the embedded
Postgres under ``OA_SYNC_DATA_DIR`` when unset) with :func:`oa_sync_server.runtime.open_database`
(not migrating), does one thing, and closes it again. The command modules only parse arguments
and print.

What this is not: the running sink (:func:`oa_sync_server.sinks.start_sink`), or migrations
(the schema must already be at head: ``oa-sync migrate``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from oa_sync_server.config import ENV_PREFIX, Settings
from oa_sync_server.errors import ConfigError
from oa_sync_server.runtime import open_database
from oa_sync_server.sinks.delivery import (
    DEFAULT_SINK,
    DeadLetter,
    HttpDeliveryLoop,
    list_dead_letters,
)
from oa_sync_server.sinks.http import HttpDeliveryClient
from oa_sync_server.sinks.parity import DEFAULT_DIVERGENCE_LIMIT, ParityReport, compute_parity
from oa_sync_server.sinks.selection import plan_sinks

__all__ = ["dead_letters", "parity_report", "retry_dead_letters"]


async def parity_report(
    settings: Settings, *, sink: str = DEFAULT_SINK, limit: int = DEFAULT_DIVERGENCE_LIMIT
) -> ParityReport:
    """The parity of the Postgres and HTTP lanes (see :func:`~.parity.compute_parity`)."""
    async with open_database(settings, migrate=False) as engine:
        return await compute_parity(engine, sink=sink, limit=limit)


async def dead_letters(settings: Settings, *, sink: str = DEFAULT_SINK) -> list[DeadLetter]:
    """Every dead letter of ``sink``, oldest first."""
    async with open_database(settings, migrate=False) as engine:
        return await list_dead_letters(engine, sink=sink)


async def retry_dead_letters(
    settings: Settings,
    environ: Mapping[str, str] | None = None,
    *,
    doc_keys: Sequence[str] | None = None,
    sink: str = DEFAULT_SINK,
) -> tuple[list[DeadLetter], list[DeadLetter]]:
    """Re-send the current version of dead-lettered documents to the configured endpoint.

    Args:
        settings: validated settings; ``OA_SYNC_SINK`` must be ``http`` or ``tee``.
        environ: the environment for the HTTP sink's extra variables (``os.environ``).
        doc_keys: only these documents (all dead letters by default).
        sink: the lane's name.

    Returns:
        ``(retried, remaining)``: the dead letters tried, and those still present after.

    Raises:
        ConfigError: no HTTP lane is configured, or it is misconfigured.
    """
    plan = plan_sinks(settings, os.environ if environ is None else environ)
    if plan.http is None:
        raise ConfigError(
            ENV_PREFIX + "SINK",
            f"is {plan.kind.value!r}; retrying dead letters needs 'http' or 'tee'",
        )
    async with (
        open_database(settings, migrate=False) as engine,
        HttpDeliveryClient(plan.http) as client,
    ):
        loop = HttpDeliveryLoop(engine, client, sink=sink)
        before = await list_dead_letters(engine, sink=sink)
        if doc_keys is not None:
            wanted = set(doc_keys)
            before = [letter for letter in before if letter.doc_key in wanted]
        remaining = await loop.retry_dead_letters(doc_keys)
        return before, remaining
