"""Sub-commands of ``oa-sync``; each module is one command (see :mod:`oa_sync_server.cli`)."""
