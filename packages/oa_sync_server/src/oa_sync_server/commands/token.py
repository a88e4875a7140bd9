"""``oa-sync token``: mint an HS256 development token with ``OA_SYNC_JWT_HS256_SECRET``.

For development and tests only: production tokens come from the service that owns users.
Prints the token (and nothing else) to standard output, so ``TOKEN=$(oa-sync token ...)``
works. The issuer and audience are the server's (``OA_SYNC_JWT_ISSUER`` /
``OA_SYNC_JWT_AUDIENCE``), so the token verifies against a server with the same settings.
"""

from __future__ import annotations

import argparse
import os

from oa_sync_core.topics import Grant

from oa_sync_server.auth import mint_token
from oa_sync_server.config import ENV_PREFIX, Settings
from oa_sync_server.errors import ConfigError

NAME = "token"
HELP = "mint a development HS256 token with OA_SYNC_JWT_HS256_SECRET"

SCOPES = ("sync:read", "sync:append", "sync:admin")
MAX_TTL_S = 366 * 24 * 3600


def register(parser: argparse.ArgumentParser) -> None:
    """``--sub``, ``--topic`` (repeatable), ``--scope`` (repeatable) and ``--ttl``."""
    parser.add_argument("--sub", default="dev", help="the token's subject (default: dev)")
    parser.add_argument(
        "--topic",
        action="append",
        dest="topics",
        metavar="TOPIC",
        help="a topic the token may read: exact key or prefix ending in '*' (default: '*')",
    )
    parser.add_argument(
        "--scope",
        action="append",
        dest="scopes",
        choices=SCOPES,
        help="a scope to grant (repeatable; default: sync:read)",
    )
    parser.add_argument("--ttl", type=int, default=3600, help="lifetime in seconds (default: 3600)")


def run(args: argparse.Namespace) -> int:
    """Print one token."""
    settings = Settings.from_env(os.environ)
    secret = settings.jwt.hs256_secret
    if secret is None:
        raise ConfigError(ENV_PREFIX + "JWT_HS256_SECRET", "required to mint a token")
    if not 1 <= args.ttl <= MAX_TTL_S:
        raise ConfigError("--ttl", f"must be between 1 and {MAX_TTL_S} seconds")
    topics = args.topics or ["*"]
    try:
        Grant.parse(topics)
    except ValueError as exc:
        raise ConfigError("--topic", str(exc)) from None
    if not args.sub or len(args.sub) > 256:
        raise ConfigError("--sub", "must be 1 to 256 characters")
    token = mint_token(
        secret,
        subject=args.sub,
        topics=topics,
        scopes=args.scopes or ["sync:read"],
        ttl_s=args.ttl,
        issuer=settings.jwt.issuer,
        audience=settings.jwt.audience,
    )
    print(token)
    return 0
