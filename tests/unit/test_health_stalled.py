"""A stage is unhealthy when input waits and nothing is handled; idle is healthy."""

from __future__ import annotations

import time

from shared.health import stalled_check


async def test_idle_is_healthy_and_waiting_input_without_progress_is_not() -> None:
    progress: list[float | None] = [time.monotonic()]
    mark = [100]

    async def backlog() -> int:
        return mark[0]

    check = stalled_check(lambda: progress[0], backlog, max_age_s=0.05)
    assert await check() is True  # first look: the backlog as of the last progress
    time.sleep(0.1)
    assert await check() is True  # quiet market, nothing new: idle, healthy
    mark[0] = 103  # three messages arrive, none is handled
    result = await check()
    assert isinstance(result, str) and "3 new input message(s) waiting" in result
    progress[0] = time.monotonic()  # the stage handles them
    mark[0] = 103
    assert await check() is True


async def test_fresh_input_is_healthy_until_the_deadline() -> None:
    progress: list[float | None] = [time.monotonic()]
    mark = [0]

    async def backlog() -> int:
        return mark[0]

    check = stalled_check(lambda: progress[0], backlog, max_age_s=60)
    assert await check() is True
    mark[0] = 5
    assert await check() is True  # waiting, but the last progress is recent
