"""Prometheus metrics of one server application, on a registry of its own.

:class:`Metrics` creates every metric on a fresh :class:`prometheus_client.CollectorRegistry`
(never the process-global default registry), so two apps in one process — tests run several —
never collide, and :meth:`Metrics.render` answers ``GET /metrics``.

What this is not: a place that measures anything. Handlers, the fan-out and the projector worker
update these metrics; gauges computed on scrape (projector lag) are set by whoever knows them.
"""

from __future__ import annotations

from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

__all__ = ["LATENCY_BUCKETS", "Metrics"]

LATENCY_BUCKETS: Final = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
"""Seconds; the fan-out budget of DESIGN.md (~25 ms) sits mid-range."""


class Metrics:
    """The metrics of one server app.

    Attributes:
        registry: the app's own registry.
        connections: open client connections, by ``transport`` (``ws`` or ``sse``).
        subscriptions: active WebSocket subscriptions.
        updates_sent: updates written to clients, by ``format`` (``json``, ``proto``, ``sse``).
        append_to_send_seconds: time from a change's commit to its first send to a client,
            observed once per change and process (not once per subscriber).
        projector_lag_events: events appended but not yet projected.
        projector_lag_seconds: age of the oldest event not yet projected.
        read_horizon_age_seconds: age of the oldest open transaction holding an xid anywhere
            on the database server (it holds projection back; 0 when there is none).
        slow_consumer_disconnects: connections closed (4429) because their send queue filled.
        limit_breaches: limit breaches, by ``kind`` (:class:`~oa_sync_server.errors.LimitKind`).
        auth_failures: refused tokens, by ``reason`` (:class:`~oa_sync_server.errors.AuthFailure`).
        listener_reconnects: times the fan-out's LISTEN connection was re-established.
        http_requests: HTTP API requests, by ``route`` and ``status``.
        hub_reads: queries the fan-out hub ran on Postgres, by ``kind`` (``page``: a read of
            changed documents; ``audit``: the bus mode's periodic check of the last watermark).
        hub_changes: changes the hub delivered to its feeds, by ``source`` (``postgres`` or
            ``bus``).
        bus_published: changes this process published to the fan-out bus, by ``kind``
            (``commit`` or ``republish``).
        catch_up_reads: snapshot and resume reads, by ``target`` (``replica`` or ``primary``).
    """

    def __init__(self, *, namespace: str = "oa_sync") -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        reg = self.registry
        self.connections = Gauge(
            "connections",
            "Open client connections.",
            ["transport"],
            namespace=namespace,
            registry=reg,
        )
        self.subscriptions = Gauge(
            "subscriptions", "Active WebSocket subscriptions.", namespace=namespace, registry=reg
        )
        self.updates_sent = Counter(
            "updates_sent",
            "Updates sent to clients.",
            ["format"],
            namespace=namespace,
            registry=reg,
        )
        self.append_to_send_seconds = Histogram(
            "append_to_send_seconds",
            "Seconds from a change's commit to its first send to a client (once per change"
            " and process, whatever the number of subscribers).",
            namespace=namespace,
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.projector_lag_events = Gauge(
            "projector_lag_events",
            "Events appended but not yet projected.",
            namespace=namespace,
            registry=reg,
        )
        self.projector_lag_seconds = Gauge(
            "projector_lag_seconds",
            "Age in seconds of the oldest unprojected event.",
            namespace=namespace,
            registry=reg,
        )
        self.read_horizon_age_seconds = Gauge(
            "read_horizon_age_seconds",
            "Age in seconds of the oldest open transaction holding the read horizon.",
            namespace=namespace,
            registry=reg,
        )
        self.slow_consumer_disconnects = Counter(
            "slow_consumer_disconnects",
            "Connections closed because their send queue filled.",
            namespace=namespace,
            registry=reg,
        )
        self.limit_breaches = Counter(
            "limit_breaches", "Limit breaches.", ["kind"], namespace=namespace, registry=reg
        )
        self.auth_failures = Counter(
            "auth_failures", "Refused tokens.", ["reason"], namespace=namespace, registry=reg
        )
        self.listener_reconnects = Counter(
            "listener_reconnects",
            "Re-established LISTEN connections.",
            namespace=namespace,
            registry=reg,
        )
        self.http_requests = Counter(
            "http_requests",
            "HTTP API requests.",
            ["route", "status"],
            namespace=namespace,
            registry=reg,
        )

        self.hub_reads = Counter(
            "hub_reads",
            "Queries the fan-out hub ran on Postgres.",
            ["kind"],
            namespace=namespace,
            registry=reg,
        )
        self.hub_changes = Counter(
            "hub_changes",
            "Changes the fan-out hub delivered, by source.",
            ["source"],
            namespace=namespace,
            registry=reg,
        )
        self.bus_published = Counter(
            "bus_published",
            "Changes published to the fan-out bus.",
            ["kind"],
            namespace=namespace,
            registry=reg,
        )

        self.catch_up_reads = Counter(
            "catch_up_reads",
            "Snapshot and resume reads, by the database read.",
            ["target"],
            namespace=namespace,
            registry=reg,
        )

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition of this registry.

        Returns:
            The body and its content type.
        """
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
