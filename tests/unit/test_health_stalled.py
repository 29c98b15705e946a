"""A stage is unhealthy when input waits and nothing is handled; idle is healthy."""

from __future__ import annotations

import asyncio
import contextlib
import time

from shared.consumer_stage import ConsumerRuntime
from shared.health import stalled_check
from shared.settings import ServiceSettings


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


async def test_a_batch_in_hand_with_nothing_handled_is_stuck_whatever_arrives() -> None:
    """Input already on the topic when the stage got stuck (a restart onto a backlog, a
    handler that hangs) never moves the mark: the stage read as healthy until new input
    came, in a quiet market never."""
    progress: list[float | None] = [time.monotonic()]
    held: list[float | None] = [None]

    async def backlog() -> tuple[object, int]:
        return "partitions", 500  # the backlog, all there before the first look

    check = stalled_check(lambda: progress[0], backlog, 0.05, lambda: held[0])
    assert await check() is True
    held[0] = time.monotonic()  # a batch of it handed to the stage
    assert await check() is True  # within max_age_s
    time.sleep(0.1)
    result = await check()
    assert isinstance(result, str) and "a batch in hand, none of it handled for" in result
    progress[0] = time.monotonic()  # some of it handled: moving again
    assert await check() is True
    time.sleep(0.1)
    assert isinstance(await check(), str)  # and stuck again
    held[0] = None  # the batch done, the stage idle
    assert await check() is True


async def test_a_stage_stuck_in_a_batch_fails_its_health_check() -> None:
    """Through a stage runtime: a handler that never returns."""
    runtime = ConsumerRuntime(ServiceSettings(service="nav", namespace="t9."))
    runtime.stale_after_s = 0.05
    runtime.last_progress = time.monotonic()
    consumer = runtime.health()
    consumer.unregister("kafka")  # no broker here: the consumer's check alone

    async def no_input() -> tuple[object, int]:
        return frozenset(), 0

    runtime._input_mark = no_input  # type: ignore[method-assign]
    stuck = asyncio.Event()

    async def hang(batch: list[int]) -> None:
        stuck.set()
        await asyncio.Event().wait()

    task = asyncio.create_task(runtime.handle_batch(hang, [1, 2]))
    await stuck.wait()
    time.sleep(0.1)
    ok, outcomes = await consumer.run()
    assert not ok and "a batch in hand" in outcomes[0].detail, outcomes
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    ok, outcomes = await consumer.run()  # the batch let go: idle, healthy
    assert ok and [o.name for o in outcomes] == ["consumer"], outcomes
