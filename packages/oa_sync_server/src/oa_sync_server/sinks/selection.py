"""Sink selection: ``OA_SYNC_SINK`` and the HTTP settings turned into a validated plan.

The Postgres read model is always written (it is the projection state WebSocket clients read);
``OA_SYNC_SINK`` decides what runs beside it:

==========  ===================================================================
postgres    nothing else (the default)
noop        nothing else either; named so a deployment can say so explicitly
http        the HTTP delivery loop follows the change log
tee         the same loop, as the shadow lane of a parity run (``oa-sync parity``)
==========  ===================================================================

A misconfigured sink fails start-up with one :class:`~oa_sync_server.errors.ConfigError` line
naming the variable; nothing ever falls back to a no-op silently.

Variables read here besides those of :class:`~oa_sync_server.config.Settings` (all optional):
``OA_SYNC_HTTP_SINK_CONNECT_TIMEOUT_S`` (5), ``OA_SYNC_HTTP_SINK_READ_TIMEOUT_S``
(``OA_SYNC_HTTP_SINK_TIMEOUT_S``), ``OA_SYNC_HTTP_SINK_MUTATIONS``
(``projection=mutation,...``, merged over the defaults), ``OA_SYNC_HTTP_SINK_MAX_ATTEMPTS`` (8),
``OA_SYNC_HTTP_SINK_BACKOFF_BASE_S`` (0.5), ``OA_SYNC_HTTP_SINK_BACKOFF_CAP_S`` (30).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Final

from oa_sync_server.config import ENV_PREFIX, MIN_HS256_SECRET_BYTES, Settings, SinkKind
from oa_sync_server.errors import ConfigError
from oa_sync_server.sinks.http import DEFAULT_MUTATIONS, HttpSinkOptions, RetryPolicy

__all__ = ["SinkPlan", "plan_sinks"]

_NUMBER: Final = re.compile(r"[0-9]{1,9}(\.[0-9]*)?|\.[0-9]+")
_MUTATION_PAIR: Final = re.compile(r"([A-Za-z0-9_./-]+)=([A-Za-z0-9_:./-]+)")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class SinkPlan:
    """What runs beside the Postgres read model.

    Attributes:
        kind: the configured sink.
        http: the HTTP sink's options when ``kind`` is ``http`` or ``tee``, else ``None``.
    """

    kind: SinkKind
    http: HttpSinkOptions | None = None

    @property
    def runs_http_lane(self) -> bool:
        """Whether the HTTP delivery loop runs."""
        return self.http is not None

    @property
    def is_parity_run(self) -> bool:
        """Whether this is a tee (shadow/parity) run."""
        return self.kind is SinkKind.TEE


def _number(
    environ: Mapping[str, str], name: str, default: float, low: float, high: float
) -> float:
    variable = ENV_PREFIX + name
    raw = (environ.get(variable) or "").strip()
    if not raw:
        return default
    if not _NUMBER.fullmatch(raw) or not low <= float(raw) <= high:
        raise ConfigError(variable, f"must be a number between {low:g} and {high:g}")
    return float(raw)


def _mutations(environ: Mapping[str, str]) -> dict[str, str]:
    variable = ENV_PREFIX + "HTTP_SINK_MUTATIONS"
    mutations = dict(DEFAULT_MUTATIONS)
    raw = (environ.get(variable) or "").strip()
    for item in filter(None, (part.strip() for part in raw.split(","))):
        match = _MUTATION_PAIR.fullmatch(item)
        if match is None:
            raise ConfigError(variable, "must be a comma-separated list of projection=mutation")
        mutations[match.group(1)] = match.group(2)
    return mutations


def plan_sinks(settings: Settings, environ: Mapping[str, str]) -> SinkPlan:
    """Validate the sink configuration and say what runs.

    Args:
        settings: the validated settings (``sink`` and ``http_sink``).
        environ: the environment, for the HTTP sink's extra variables listed above.

    Returns:
        The :class:`SinkPlan`.

    Raises:
        ConfigError: ``http``/``tee`` without a URL or with a secret shorter than 32 bytes, or
            a bad extra variable; one line naming it.
    """
    if settings.sink in (SinkKind.POSTGRES, SinkKind.NOOP):
        return SinkPlan(kind=settings.sink)
    http = settings.http_sink
    if http.url is None:
        raise ConfigError(
            ENV_PREFIX + "HTTP_SINK_URL", f"required when OA_SYNC_SINK is {settings.sink.value!r}"
        )
    if http.secret is None or len(http.secret.reveal().encode("utf-8")) < MIN_HS256_SECRET_BYTES:
        raise ConfigError(
            ENV_PREFIX + "HTTP_SINK_SECRET",
            f"a secret of at least {MIN_HS256_SECRET_BYTES} bytes is required when OA_SYNC_SINK"
            f" is {settings.sink.value!r}",
        )
    base = _number(environ, "HTTP_SINK_BACKOFF_BASE_S", 0.5, 0.0, 3600.0)
    cap = _number(environ, "HTTP_SINK_BACKOFF_CAP_S", max(30.0, base), base, 86400.0)
    attempts = _number(environ, "HTTP_SINK_MAX_ATTEMPTS", 8.0, 1.0, 1000.0)
    if not attempts.is_integer():
        raise ConfigError(ENV_PREFIX + "HTTP_SINK_MAX_ATTEMPTS", "must be an integer")
    options = HttpSinkOptions(
        url=http.url,
        secret=http.secret,
        connect_timeout_s=_number(environ, "HTTP_SINK_CONNECT_TIMEOUT_S", 5.0, 0.001, 3600.0),
        read_timeout_s=_number(environ, "HTTP_SINK_READ_TIMEOUT_S", http.timeout_s, 0.001, 3600.0),
        mutations=_mutations(environ),
        retry=RetryPolicy(base_s=base, cap_s=cap, max_attempts=int(attempts)),
    )
    return SinkPlan(kind=settings.sink, http=options)
