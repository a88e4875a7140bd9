"""The collector policy of long-running processes (``runtime.settle_collector``).

Run in a child interpreter: settling freezes the calling process's heap for good.
"""

from __future__ import annotations

import json
import subprocess
import sys

from oa_sync_server.runtime import GC_THRESHOLDS

_CHILD = """
import gc, json
from oa_sync_server.runtime import settle_collector
before = gc.get_threshold()
settle_collector()
first = gc.get_freeze_count()
made = [{"n": i} for i in range(5000)]  # objects built after settling stay collectable
settle_collector()  # once per process: nothing more is frozen
print(json.dumps({"before": before, "after": gc.get_threshold(), "first": first,
                  "second": gc.get_freeze_count()}))
"""


def test_settling_freezes_start_up_once_and_raises_the_full_collection_threshold() -> None:
    out = subprocess.run(  # noqa: S603 - our own interpreter and script
        [sys.executable, "-c", _CHILD], capture_output=True, text=True, check=True, timeout=60
    )
    found = json.loads(out.stdout)
    assert tuple(found["before"]) != GC_THRESHOLDS  # Python's default differs
    assert tuple(found["after"]) == GC_THRESHOLDS
    assert found["first"] > 1000  # the imported modules and what they built
    assert found["second"] == found["first"]
