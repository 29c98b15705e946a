"""A stage is unhealthy when input waits and nothing is handled; idle is healthy."""

from __future__ import annotations

import time

from shared.health import stalled_check


async def test_idle_is_healthy_and_waiting_input_without_progress_is_not() -> None:
    progress: list[float | None] = [time.monotonic()]
    mark = [100]

    async def backlog() -> tuple[object, int]:
        return "partitions", mark[0]

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

    async def backlog() -> tuple[object, int]:
        return "partitions", mark[0]

    check = stalled_check(lambda: progress[0], backlog, max_age_s=60)
    assert await check() is True
    mark[0] = 5
    assert await check() is True  # waiting, but the last progress is recent


async def test_input_assigned_after_the_first_look_is_not_taken_for_waiting_input() -> None:
    """The first probe comes before the consumer joins its group: no partitions, mark 0.
    Assigned, their whole history (120,000) read as input waiting, and a stage caught up
    and idle for max_age_s as stuck. A new assignment starts a new baseline."""
    progress: list[float | None] = [None]  # caught up: nothing to handle since it started
    assigned: list[tuple[object, int]] = [(frozenset(), 0)]

    async def backlog() -> tuple[object, int]:
        return assigned[0]

    check = stalled_check(lambda: progress[0], backlog, max_age_s=0.05)
    assert await check() is True  # joining
    assigned[0] = (frozenset({("market.ticks", 0)}), 120_000)
    assert await check() is True  # assigned: the baseline
    time.sleep(0.1)
    assert await check() is True  # idle past max_age_s, nothing new
    assigned[0] = (frozenset({("market.ticks", 0)}), 120_002)  # two arrive, none handled
    result = await check()
    assert isinstance(result, str) and "2 new input message(s) waiting" in result
    # with nothing handled yet, the time is counted from the baseline (the machine's
    # uptime before: a caught-up stage read as stuck at its first new message)
    patient = stalled_check(lambda: None, backlog, max_age_s=60)
    assert await patient() is True
    assigned[0] = (frozenset({("market.ticks", 0)}), 120_005)
    assert await patient() is True
