"""Freezing a started service's heap (shared/heap.py): what existed is no longer walked by
full collections, what comes later is, and later garbage still goes."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator
from typing import Any

import pytest

from shared import stream
from shared.heap import freeze_heap
from shared.settings import ServiceSettings
from shared.stream import StreamRuntime


class Node:
    """A tracked object that can sit in a reference cycle."""

    def __init__(self) -> None:
        self.other: Any = None


@pytest.fixture
def unfrozen_after() -> Iterator[None]:
    yield
    gc.unfreeze()  # the test process's heap goes back to normal collection


def _tracked(obj: object) -> bool:
    return any(o is obj for o in gc.get_objects())


def test_a_full_collection_walks_only_what_came_after_the_freeze(unfrozen_after: None) -> None:
    before = Node()
    collections = sum(stat["collections"] for stat in gc.get_stats())
    frozen = freeze_heap()
    assert sum(stat["collections"] for stat in gc.get_stats()) == collections  # no pause
    assert frozen == gc.get_freeze_count() > 0
    after = Node()
    assert not _tracked(before) and _tracked(after)
    later_cycle = Node()
    later_cycle.other = later_cycle
    later_gone = weakref.ref(later_cycle)
    del later_cycle
    gc.collect()
    assert later_gone() is None  # cycles made after the freeze are still collected


async def test_a_stage_freezes_its_heap_at_the_first_batch_only_when_run_as_a_service(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    freezes: list[int] = []
    monkeypatch.setattr(stream, "freeze_heap", lambda: freezes.append(1) or 1)
    handled: list[list[int]] = []

    async def handle(batch: list[int]) -> None:
        handled.append(batch)

    in_a_test = StreamRuntime(ServiceSettings(service="regime", namespace="t5."))
    await in_a_test.handle_batch(handle, [1])
    assert freezes == []
    as_service = StreamRuntime(ServiceSettings(service="regime", namespace="t6."))
    monkeypatch.setattr(stream, "enter", lambda *args: None)
    as_service.enter_service()
    for batch in ([1, 2], [3], [4]):
        await as_service.handle_batch(handle, batch)
    assert freezes == [1] and handled == [[1], [1, 2], [3], [4]]
