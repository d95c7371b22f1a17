"""`rollout_assets.startup`: the collector is paused while code loads and frozen objects are
handed back, whatever happens inside the block."""

from __future__ import annotations

import gc

import pytest

from rollout_assets.startup import frozen_heap, paused_gc


def test_paused_gc_pauses_and_resumes_even_on_error():
    assert gc.isenabled()
    with paused_gc():
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(RuntimeError), paused_gc():
        raise RuntimeError("import failed")
    assert gc.isenabled()


def test_paused_gc_leaves_a_collector_the_caller_turned_off_alone():
    gc.disable()
    try:
        with paused_gc():
            with paused_gc():  # nested: the inner block does not resume it
                pass
            assert not gc.isenabled()
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_frozen_heap_freezes_for_the_block_only():
    assert gc.get_freeze_count() == 0
    alive = [object() for _ in range(10)]
    with frozen_heap():
        assert gc.get_freeze_count() >= len(alive)
    assert gc.get_freeze_count() == 0
    with pytest.raises(ValueError), frozen_heap():
        raise ValueError("run failed")
    assert gc.get_freeze_count() == 0


def test_garbage_made_of_frozen_objects_is_collected_after_the_block():
    class Node:
        pass

    a, b = Node(), Node()
    a.other, b.other = b, a  # a cycle: only the cyclic collector frees it
    with frozen_heap():
        import weakref

        ref = weakref.ref(a)
        del a, b
        gc.collect()
        assert ref() is not None  # frozen: skipped by collections inside the block
    gc.collect()
    assert ref() is None
