"""Python's cyclic garbage collector around a cold start (`rollout run`, `rollout demo`).

Importing Dagster, pandas and SQLAlchemy and building the definitions allocates about a million
objects that live as long as the process. While they are created, the collector walks the
growing heap again and again: a quarter of the cold start of a window run (`rollout_assets.
runner.run_range`: 1.2 s of loading took 0.9 s with the collector paused), and each full
collection during the run walks them once more (0.33 s of collections in a 100k-event window
run, 0.02 s with them frozen). Neither block changes what is collected, only when: cycles made
while loading are collected after it, and what is frozen for a run is unfrozen when it ends.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def paused_gc() -> Iterator[None]:
    """Pause the collector for a block that loads code (imports, the instance, definitions).

    If the collector was already off (an outer block, or the caller's own choice), it stays
    as it was."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


@contextmanager
def frozen_heap() -> Iterator[None]:
    """Collections inside the block skip every object alive when it starts (`gc.freeze`); they
    are handed back to the collector when it ends (`gc.unfreeze`), so nothing alive at the
    start is kept for good even if it becomes garbage during the block."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
