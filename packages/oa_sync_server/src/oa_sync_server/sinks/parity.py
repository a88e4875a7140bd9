"""Parity of a shadow/parity (tee) run: does the HTTP lane hold what the Postgres lane holds?

The primary lane is the Postgres read model (``documents``). The shadow lane is what the HTTP
receiver acknowledged, recorded per document by the delivery loop in ``http_sink_parity``
(version delivered, and the content hash the receiver echoed or, when it echoes none, the hash
sent). :func:`compute_parity` compares the two, per projection:

* ``primary_documents`` / ``shadow_documents``: documents in each lane;
* ``behind``: documents whose acknowledged version is older than the primary's (never delivered
  counts as version 0), with ``versions_behind`` (sum), ``max_versions_behind`` and ``lag_s``
  (age of the oldest primary update not yet acknowledged);
* ``hash_mismatches``: same version on both lanes but different content hashes (or a shadow
  version newer than the primary's, which only a rebuild can cause);
* ``dead_letters``: updates the receiver refused.

The run is *in parity* when none of ``behind``, ``hash_mismatches`` or ``dead_letters`` is
non-zero. :class:`ParityMetrics` exports the same figures as Prometheus gauges;
:class:`DeliveryMetrics` counts what the delivery loop did (both ``http`` and ``tee``).

What this is not: a comparison of document bodies across lanes (the receiver's store is not
readable from here; the echoed hash stands for it), nor the delivery loop (``delivery.py``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Final

import sqlalchemy as sa
from prometheus_client import CollectorRegistry, Counter, Gauge
from sqlalchemy.ext.asyncio import AsyncEngine

from oa_sync_server.postgres.tables import documents
from oa_sync_server.sinks.delivery import DEFAULT_SINK, DeliveryPass
from oa_sync_server.sinks.tables import http_sink_dead_letters, http_sink_parity

__all__ = [
    "DeliveryMetrics",
    "Divergence",
    "ParityMetrics",
    "ParityReport",
    "ProjectionParity",
    "compute_parity",
]

BEHIND: Final = "behind"
HASH_MISMATCH: Final = "hash_mismatch"
DEFAULT_DIVERGENCE_LIMIT: Final = 100


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ProjectionParity:
    """The parity figures of one projection (see the module docstring)."""

    projection: str
    primary_documents: int = 0
    shadow_documents: int = 0
    behind: int = 0
    versions_behind: int = 0
    max_versions_behind: int = 0
    lag_s: float = 0.0
    hash_mismatches: int = 0
    dead_letters: int = 0

    @property
    def in_parity(self) -> bool:
        """Nothing behind, no hash mismatch, no dead letter."""
        return not (self.behind or self.hash_mismatches or self.dead_letters)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Divergence:
    """One document on which the lanes disagree.

    Attributes:
        doc_key, projection: the document.
        kind: ``behind`` or ``hash_mismatch``.
        primary_version, primary_hash: what the Postgres read model holds.
        shadow_version, shadow_hash: what the receiver acknowledged (0 and ``""`` when never).
        dead_lettered: whether a refused update of this document sits in the dead letters.
        last_error: the last delivery error recorded for it, if any.
    """

    doc_key: str
    projection: str
    kind: str
    primary_version: int
    primary_hash: str
    shadow_version: int
    shadow_hash: str
    dead_lettered: bool = False
    last_error: str | None = None


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ParityReport:
    """The parity of the two lanes.

    Attributes:
        sink: the HTTP lane compared.
        projections: figures per projection, sorted by name.
        divergences: the divergent documents, sorted by key, at most the requested limit.
        truncated: more divergent documents exist than listed.
    """

    sink: str
    projections: tuple[ProjectionParity, ...]
    divergences: tuple[Divergence, ...]
    truncated: bool = False

    @property
    def in_parity(self) -> bool:
        """Every projection is in parity."""
        return all(p.in_parity for p in self.projections)

    def to_json(self) -> dict[str, Any]:
        """A plain JSON object of the report (``oa-sync parity --json``)."""
        return {
            "sink": self.sink,
            "inParity": self.in_parity,
            "projections": [
                {
                    "projection": p.projection,
                    "inParity": p.in_parity,
                    "primaryDocuments": p.primary_documents,
                    "shadowDocuments": p.shadow_documents,
                    "behind": p.behind,
                    "versionsBehind": p.versions_behind,
                    "maxVersionsBehind": p.max_versions_behind,
                    "lagSeconds": round(p.lag_s, 3),
                    "hashMismatches": p.hash_mismatches,
                    "deadLetters": p.dead_letters,
                }
                for p in self.projections
            ],
            "divergences": [
                {
                    "docKey": d.doc_key,
                    "projection": d.projection,
                    "kind": d.kind,
                    "primaryVersion": d.primary_version,
                    "primaryHash": d.primary_hash,
                    "shadowVersion": d.shadow_version,
                    "shadowHash": d.shadow_hash,
                    "deadLettered": d.dead_lettered,
                    "lastError": d.last_error,
                }
                for d in self.divergences
            ],
            "truncated": self.truncated,
        }


async def compute_parity(
    engine: AsyncEngine, *, sink: str = DEFAULT_SINK, limit: int = DEFAULT_DIVERGENCE_LIMIT
) -> ParityReport:
    """Compare the Postgres lane with what the HTTP lane acknowledged.

    Args:
        engine: the database (migrated to at least ``0002_http_sink``).
        sink: the HTTP lane's name.
        limit: the most divergent documents listed (the counts are always complete).

    Returns:
        The :class:`ParityReport`, read in one repeatable-read snapshot.
    """
    d, p, dl = documents, http_sink_parity, http_sink_dead_letters
    joined = d.outerjoin(p, sa.and_(p.c.doc_key == d.c.doc_key, p.c.sink == sink))
    shadow_version = sa.func.coalesce(p.c.shadow_version, 0)
    behind = shadow_version < d.c.version
    mismatch = sa.or_(
        shadow_version > d.c.version,
        sa.and_(shadow_version == d.c.version, p.c.shadow_hash != d.c.content_hash),
    )
    gap = d.c.version - shadow_version
    age = sa.func.extract("epoch", sa.func.clock_timestamp() - d.c.updated_at)
    per_projection = (
        sa.select(
            d.c.projection,
            sa.func.count().label("primary"),
            sa.func.count().filter(behind).label("behind"),
            sa.func.coalesce(sa.func.sum(gap).filter(behind), 0).label("versions_behind"),
            sa.func.coalesce(sa.func.max(gap).filter(behind), 0).label("max_behind"),
            sa.func.coalesce(sa.func.max(age).filter(behind), 0).label("lag_s"),
            sa.func.count().filter(mismatch).label("mismatches"),
        )
        .select_from(joined)
        .group_by(d.c.projection)
    )
    shadow_counts = (
        sa.select(p.c.projection, sa.func.count())
        .where(p.c.sink == sink, p.c.shadow_version > 0)
        .group_by(p.c.projection)
    )
    dead_counts = (
        sa.select(dl.c.projection, sa.func.count())
        .where(dl.c.sink == sink)
        .group_by(dl.c.projection)
    )
    dead_lettered = (
        sa.exists().where(dl.c.sink == sink, dl.c.doc_key == d.c.doc_key).label("dead_lettered")
    )
    divergent = (
        sa.select(
            d.c.doc_key,
            d.c.projection,
            d.c.version,
            d.c.content_hash,
            shadow_version.label("shadow_version"),
            sa.func.coalesce(p.c.shadow_hash, "").label("shadow_hash"),
            p.c.last_error,
            mismatch.label("mismatch"),
            dead_lettered,
        )
        .select_from(joined)
        .where(sa.or_(behind, mismatch))
        .order_by(d.c.doc_key)
        .limit(limit + 1)
    )
    async with engine.connect() as raw:
        conn = await raw.execution_options(isolation_level="REPEATABLE READ")
        async with conn.begin():
            figures = (await conn.execute(per_projection)).mappings().all()
            shadows = {str(r[0]): int(r[1]) for r in await conn.execute(shadow_counts)}
            deads = {str(r[0]): int(r[1]) for r in await conn.execute(dead_counts)}
            rows = (await conn.execute(divergent)).mappings().all()
    by_name: dict[str, ProjectionParity] = {}
    for row in figures:
        name = str(row["projection"])
        by_name[name] = ProjectionParity(
            projection=name,
            primary_documents=int(row["primary"]),
            shadow_documents=shadows.get(name, 0),
            behind=int(row["behind"]),
            versions_behind=int(row["versions_behind"]),
            max_versions_behind=int(row["max_behind"]),
            lag_s=float(row["lag_s"]),
            hash_mismatches=int(row["mismatches"]),
            dead_letters=deads.get(name, 0),
        )
    for name in set(shadows) | set(deads):
        if name not in by_name:
            by_name[name] = ProjectionParity(
                projection=name,
                shadow_documents=shadows.get(name, 0),
                dead_letters=deads.get(name, 0),
            )
    divergences = tuple(
        Divergence(
            doc_key=str(row["doc_key"]),
            projection=str(row["projection"]),
            kind=HASH_MISMATCH if row["mismatch"] else BEHIND,
            primary_version=int(row["version"]),
            primary_hash=str(row["content_hash"]),
            shadow_version=int(row["shadow_version"]),
            shadow_hash=str(row["shadow_hash"]),
            dead_lettered=bool(row["dead_lettered"]),
            last_error=row["last_error"],
        )
        for row in rows[:limit]
    )
    return ParityReport(
        sink=sink,
        projections=tuple(by_name[name] for name in sorted(by_name)),
        divergences=divergences,
        truncated=len(rows) > limit,
    )


class ParityMetrics:
    """The figures of a :class:`ParityReport` as Prometheus gauges on a given registry.

    Gauges (namespace ``oa_sync``, label ``projection``): ``parity_documents`` (also ``lane``:
    ``primary`` or ``shadow``), ``parity_documents_behind``, ``parity_versions_behind``,
    ``parity_lag_seconds``, ``parity_hash_mismatches``, ``parity_dead_letters``; and
    ``parity_in_parity`` (1 or 0, no label).

    Args:
        registry: the app's registry (``Metrics.registry``); create one instance per registry.
        namespace: the metric name prefix.
    """

    def __init__(self, registry: CollectorRegistry, *, namespace: str = "oa_sync") -> None:
        def gauge(name: str, doc: str, labels: Sequence[str] = ("projection",)) -> Gauge:
            return Gauge(name, doc, list(labels), namespace=namespace, registry=registry)

        self.documents = gauge(
            "parity_documents", "Documents in each lane.", ("projection", "lane")
        )
        self.behind = gauge("parity_documents_behind", "Documents behind on the HTTP lane.")
        self.versions_behind = gauge(
            "parity_versions_behind", "Versions the HTTP lane is behind, summed."
        )
        self.lag_seconds = gauge(
            "parity_lag_seconds", "Age of the oldest update the HTTP lane has not acknowledged."
        )
        self.hash_mismatches = gauge(
            "parity_hash_mismatches", "Documents whose hashes differ between the lanes."
        )
        self.dead_letters = gauge("parity_dead_letters", "Updates refused by the HTTP lane.")
        self.in_parity = Gauge(
            "parity_in_parity",
            "1 when both lanes agree, else 0.",
            namespace=namespace,
            registry=registry,
        )

    def update(self, report: ParityReport) -> None:
        """Set every gauge from ``report``."""
        for p in report.projections:
            name = p.projection
            self.documents.labels(projection=name, lane="primary").set(p.primary_documents)
            self.documents.labels(projection=name, lane="shadow").set(p.shadow_documents)
            self.behind.labels(projection=name).set(p.behind)
            self.versions_behind.labels(projection=name).set(p.versions_behind)
            self.lag_seconds.labels(projection=name).set(p.lag_s)
            self.hash_mismatches.labels(projection=name).set(p.hash_mismatches)
            self.dead_letters.labels(projection=name).set(p.dead_letters)
        self.in_parity.set(1 if report.in_parity else 0)


class DeliveryMetrics:
    """What the HTTP delivery loop did, as Prometheus metrics on a given registry.

    ``http_sink_deliveries_total{outcome}`` counts documents ``delivered`` (2xx) and
    ``dead_lettered``; ``http_sink_blocked_passes_total`` counts passes stopped by exhausted
    retries; ``http_sink_checkpoint_watermark`` is the change-log watermark delivered up to.

    Args:
        registry: the app's registry (``Metrics.registry``); create one instance per registry.
        namespace: the metric name prefix.
    """

    def __init__(self, registry: CollectorRegistry, *, namespace: str = "oa_sync") -> None:
        self.deliveries = Counter(
            "http_sink_deliveries",
            "Documents the HTTP sink delivered or dead-lettered.",
            ["outcome"],
            namespace=namespace,
            registry=registry,
        )
        self.blocked_passes = Counter(
            "http_sink_blocked_passes",
            "Delivery passes stopped by exhausted retries.",
            namespace=namespace,
            registry=registry,
        )
        self.checkpoint = Gauge(
            "http_sink_checkpoint_watermark",
            "Change-log watermark the HTTP sink delivered up to.",
            namespace=namespace,
            registry=registry,
        )

    def record(self, done: DeliveryPass) -> None:
        """Account for one completed pass (a locked-out pass changes nothing)."""
        if done.locked_out:
            return
        self.deliveries.labels(outcome="delivered").inc(done.delivered)
        self.deliveries.labels(outcome="dead_lettered").inc(done.dead_lettered)
        if done.blocked is not None:
            self.blocked_passes.inc()
        self.checkpoint.set(done.checkpoint)
