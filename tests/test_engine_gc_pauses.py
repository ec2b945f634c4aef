"""``GCPauses`` times every cyclic-GC collection by generation; ``serve_gc`` freezes what is
alive and raises the thresholds (checked in a child process: it changes process-wide state)."""

from __future__ import annotations

import gc
import json
import subprocess
import sys

from lora_cluster.engine.gc_pauses import SERVE_THRESHOLDS, GCPauses


def test_every_collection_is_counted_and_timed_by_generation() -> None:
    pauses = GCPauses().install()
    try:
        gc.collect(0)
        gc.collect(1)
        gc.collect()
        stats = pauses.stats()
    finally:
        pauses.remove()
    assert [n >= 1 for n in stats["collections"]] == [True, True, True]
    assert all(ms >= 0.0 for ms in stats["ms"]) and stats["max_ms"] >= max(
        ms / n for ms, n in zip(stats["ms"], stats["collections"]))
    assert stats["thresholds"] == list(gc.get_threshold())
    gc.collect()  # removed: no longer counted
    assert pauses.stats()["collections"] == stats["collections"]


def test_serve_gc_freezes_the_live_state_and_raises_the_thresholds() -> None:
    code = ("import gc, json; from lora_cluster.engine.gc_pauses import serve_gc; "
            "keep = [dict(i=i) for i in range(1000)]; serve_gc(); "
            "print(json.dumps([gc.get_threshold(), gc.get_freeze_count()]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    thresholds, frozen = json.loads(out)
    assert tuple(thresholds) == SERVE_THRESHOLDS
    assert frozen >= 1000
