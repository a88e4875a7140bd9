"""Fan-out buses: how committed changes reach every server instance besides Postgres.

``OA_SYNC_FANOUT=postgres`` (the default) needs none: each instance's hub follows the
``documents`` table itself. ``OA_SYNC_FANOUT=nats`` uses :class:`oa_sync_server.bus.nats.NatsBus`
(import it from there: it needs the ``nats`` extra); :mod:`oa_sync_server.bus.changes` is the
message format, importable without it.
"""

from oa_sync_server.bus.changes import BusChange, decode_change, encode_change

__all__ = ["BusChange", "decode_change", "encode_change"]
