"""Hypothesis settings profiles: ``ci`` (the default) and ``deep`` (``nox -s deep``).

* ``ci`` — every property test runs its own example budget (:func:`examples` returns it as
  written); the end-to-end campaigns against a live server are derandomized, so a CI failure
  reproduces.
* ``deep`` — ten times every budget, random seeds everywhere (the campaigns too: the fixed
  seeds of ``ci`` only ever try the same inputs), and no deadline. Run it before a release or
  after touching a codec, a fold or a state machine.

The profile comes from ``HYPOTHESIS_PROFILE`` (``nox -s deep`` sets ``deep``); this module is a
pytest plugin (``tests/conftest.py``) that registers and loads it before any test is collected.
Tests write ``max_examples=examples(50)`` and ``derandomize=DERANDOMIZE`` instead of constants.
"""

from __future__ import annotations

import os
from typing import Final

from hypothesis import settings

__all__ = ["DEEP", "DERANDOMIZE", "PROFILE", "SCALE", "examples"]

PROFILE: Final = os.environ.get("HYPOTHESIS_PROFILE", "ci")
if PROFILE not in ("ci", "deep"):
    raise ValueError(f"HYPOTHESIS_PROFILE must be 'ci' or 'deep', not {PROFILE!r}")
DEEP: Final = PROFILE == "deep"
SCALE: Final = 10 if DEEP else 1
DERANDOMIZE: Final = not DEEP
"""For the end-to-end campaigns: fixed seeds in ``ci``, random ones in ``deep``."""

settings.register_profile("ci", print_blob=True)
settings.register_profile("deep", max_examples=100 * SCALE, deadline=None, print_blob=True)
settings.load_profile(PROFILE)


def examples(budget: int) -> int:
    """A test's example budget under the current profile (``deep``: ten times it)."""
    return budget * SCALE
