"""The error tree of ``oa_sync_client``: every error class the client raises::

    OaSyncError                       (oa_sync_core)
    └── ClientError
        ├── AppendError               ``POST /v1/events`` refused an append, or not visible in time
        ├── ClientClosedError         the client is closed (by the application, or it gave up)
        └── SubscriptionRefusedError  the server refused a subscription (``error`` frame)

Protocol mistakes of the server are the core's :class:`~oa_sync_core.errors.ProtocolError`
and wire decoding failures its :class:`~oa_sync_core.errors.WireError`.
"""

from __future__ import annotations

from collections.abc import Sequence

from oa_sync_core.errors import OaSyncError

__all__ = ["AppendError", "ClientClosedError", "ClientError", "SubscriptionRefusedError"]


class ClientError(OaSyncError):
    """Root of the client's errors."""


class AppendError(ClientError):
    """``POST /v1/events`` refused an append, or it was not visible in time (``not_visible``).

    Attributes:
        status: the HTTP status (504 for ``not_visible``).
        code: the error code of the answer.
        positions: set when the events *were* appended: do not append them again.
    """

    def __init__(self, status: int, code: str, message: str, positions: Sequence[int] = ()):
        self.status = status
        self.code = code
        self.positions = tuple(positions)
        super().__init__(f"{status} {code}: {message}")


class ClientClosedError(ClientError):
    """The client is closed (by the application, or it gave up).

    Attributes:
        reason: why, e.g. ``gave up after 8 attempts`` or ``closed by the application``.
        code: the last close code, if any.
    """

    def __init__(self, reason: str, code: int | None = None):
        self.reason = reason
        self.code = code
        super().__init__(reason if code is None else f"{reason} (close {code})")


class SubscriptionRefusedError(ClientError):
    """The server refused a subscription (e.g. ``forbidden``).

    Attributes:
        code: the ``error`` frame's code.
    """

    def __init__(self, subscription_id: str, code: str, message: str):
        self.subscription_id = subscription_id
        self.code = code
        super().__init__(f"subscription {subscription_id!r} refused: {code}: {message}")
