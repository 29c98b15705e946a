"""The gateway's in-memory caches stay bounded and keep what came last."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from services.gateway.bounded import put_bounded


@given(st.lists(st.integers(0, 20), max_size=60), st.integers(1, 8))
def test_a_bounded_cache_keeps_the_newest_keys_and_never_grows_past_its_limit(
    keys: list[int], limit: int
) -> None:
    entries: dict[int, int] = {}
    for i, k in enumerate(keys):
        put_bounded(entries, k, i, limit)
        assert len(entries) <= limit
        assert entries[k] == i
    # what stays: the most recently first-inserted keys (a re-put keeps a key's place)
    order: list[int] = []
    for k in keys:
        if k not in order:
            order.append(k)
            if len(order) > limit:
                order.pop(0)
    assert list(entries) == order


def test_setting_a_key_already_held_drops_nothing() -> None:
    entries = {"a": 1, "b": 2}
    put_bounded(entries, "a", 3, limit=2)
    assert list(entries.items()) == [("a", 3), ("b", 2)]
