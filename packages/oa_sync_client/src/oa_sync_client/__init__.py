"""Khala's Python client: follow documents live, resuming after any disconnect.

:class:`SyncClient` (in :mod:`oa_sync_client.client`) drives the core's sans-IO
:class:`~oa_sync_core.protocol.client_session.ClientSession` over an aiohttp WebSocket;
``oa-sync-tail`` (:mod:`oa_sync_client.tail`) prints what it receives. Depends on
``oa-sync-core`` and ``aiohttp`` only: no database driver, no server code.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from oa_sync_client.client import (
    AppendError,
    AppendResult,
    BackoffPolicy,
    CachedDocument,
    ClientClosedError,
    ConnectionState,
    DocumentChanged,
    Subscription,
    SubscriptionClosed,
    SubscriptionEvent,
    SubscriptionRefusedError,
    SubscriptionReset,
    SubscriptionSynced,
    SyncClient,
    TokenProvider,
    WireFormat,
)

try:
    __version__ = version("oa-sync-client")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = [
    "AppendError",
    "AppendResult",
    "BackoffPolicy",
    "CachedDocument",
    "ClientClosedError",
    "ConnectionState",
    "DocumentChanged",
    "Subscription",
    "SubscriptionClosed",
    "SubscriptionEvent",
    "SubscriptionRefusedError",
    "SubscriptionReset",
    "SubscriptionSynced",
    "SyncClient",
    "TokenProvider",
    "WireFormat",
    "__version__",
]
