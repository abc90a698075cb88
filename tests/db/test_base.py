"""Column conventions: the time-ordered ids bulk writes use."""

from __future__ import annotations

import time
import uuid

from backend.db.base import time_ordered_ids, time_ordered_uuids


def test_time_ordered_ids_are_version_7_unique_and_grow_with_time():
    first = time_ordered_uuids(1000)
    assert all(i.version == 7 and i.variant == uuid.RFC_4122 for i in first)
    assert len(set(first)) == 1000
    # The first 48 bits are the creation time in milliseconds.
    now_ms = time.time_ns() // 1_000_000
    assert all(0 <= now_ms - (i.int >> 80) < 5_000 for i in first)
    time.sleep(0.002)
    later = time_ordered_uuids(1000)
    assert min(later) > max(first)  # a later batch sorts after an earlier one: appended to the index's end


def test_time_ordered_ids_as_text_parse_as_the_same_kind():
    texts = time_ordered_ids(500)
    parsed = [uuid.UUID(t) for t in texts]
    assert all(i.version == 7 and i.variant == uuid.RFC_4122 for i in parsed)
    assert len(set(parsed)) == 500
    assert time_ordered_ids(0) == []
