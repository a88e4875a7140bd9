"""``oa-sync tail TOPIC...``: the client's ``oa-sync-tail``, able to mint its own token.

The command itself (arguments, output, exit codes) is :mod:`oa_sync_client.tail`. This module
adds one token source for development and demos: without ``--token`` or ``OA_SYNC_TOKEN``, when
the server's HS256 secret is set here (``OA_SYNC_JWT_HS256_SECRET``), a short-lived read token
for exactly the given topics is minted and refreshed as needed.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Sequence

from oa_sync_client import tail

from oa_sync_server.auth import mint_token
from oa_sync_server.config import Secret

NAME = "tail"
HELP = tail.HELP
register = tail.register
_TOKEN_TTL_S = 900.0


def run(args: argparse.Namespace) -> int:
    """Follow until Ctrl-C (exit 0), a refusal (exit 2) or ``--max-updates``."""
    return tail.run(args, _minting_provider)


def _minting_provider(topics: Sequence[str]) -> Callable[[], str] | None:
    secret = os.environ.get("OA_SYNC_JWT_HS256_SECRET")
    if not secret:
        return None
    # Empty means "the default", as Settings.from_env reads these variables.
    issuer = os.environ.get("OA_SYNC_JWT_ISSUER", "").strip() or "oa-sync"
    audience = os.environ.get("OA_SYNC_JWT_AUDIENCE", "").strip() or "oa-sync"

    def mint() -> str:
        return mint_token(
            Secret(secret),
            subject="oa-sync-tail",
            topics=topics,
            scopes=("sync:read",),
            ttl_s=_TOKEN_TTL_S,
            issuer=issuer,
            audience=audience,
        )

    return mint
