"""The sync protocol: its vocabulary, its sans-IO sessions and its wire codec.

``codes`` (close codes, error codes, reset reasons, limit kinds), ``resume`` (the one resume
rule every transport applies), ``backoff`` (the one full-jitter reconnect schedule),
``server_session`` and ``client_session`` (the sans-IO state machines), ``wire`` (JSON and
binary proto frames). No sockets here: the server's transports and the client drive these.
"""
