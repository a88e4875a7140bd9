"""Generated proto bindings (betterproto).

``v1`` is written by ``nox -s proto`` from ``proto/``: never edit it by hand.
"""
