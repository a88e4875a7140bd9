"""The transports: how documents leave the server.

``ws`` (the WebSocket endpoint ``/v1/sync``), ``sse`` (Server-Sent Events, ``/v1/stream``) and
``http`` (``/v1/events``, ``/v1/docs``, ``/v1/changes`` and the shared middlewares). Each is a
thin driver of the sans-IO protocol in :mod:`oa_sync_core.protocol`; none holds a protocol rule.
"""
