"""A server process's heap after start-up: frozen, and young collections spaced out."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from backend.lib.runtime import YOUNG_COLLECTION_THRESHOLD, settle_heap


@pytest.fixture
def restored_gc() -> Iterator[None]:
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


@pytest.mark.usefixtures("restored_gc")
def test_start_up_objects_leave_collection_and_young_collections_are_spaced_out() -> None:
    gc.unfreeze()
    made_at_start_up = [[] for _ in range(1000)]  # lists are tracked by the collector

    settle_heap()

    assert gc.get_freeze_count() >= len(made_at_start_up)
    assert gc.get_threshold()[0] == YOUNG_COLLECTION_THRESHOLD > 700
    assert gc.get_threshold()[1:] == (10, 10)
