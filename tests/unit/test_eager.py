"""Running a coroutine's first step at once (shared/eager.py): the result must be what
`await coro` gives, however the coroutine suspends, fails or is cancelled."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.eager import Finished, run_until_suspended


async def test_a_coroutine_that_never_suspends_finishes_in_the_first_step() -> None:
    async def add(a: int, b: int) -> int:
        return a + b

    tasks_before = len(asyncio.all_tasks())
    assert run_until_suspended(add(2, 3)) == Finished(5)
    assert len(asyncio.all_tasks()) == tasks_before


async def test_the_rest_resumes_where_the_first_step_suspended() -> None:
    gate: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    trail: list[str] = []

    async def work() -> int:
        trail.append("before")
        got = await gate
        trail.append("after")
        return got * 10

    rest = run_until_suspended(work())
    assert not isinstance(rest, Finished)
    assert trail == ["before"]  # the first step ran here, once
    task = asyncio.ensure_future(rest)
    await asyncio.sleep(0)
    assert not task.done()  # still waiting on the gate
    gate.set_result(4)
    assert await task == 40
    assert trail == ["before", "after"]


async def test_an_error_in_the_first_step_is_raised_at_once() -> None:
    async def broken() -> None:
        raise ValueError("bad message")

    with pytest.raises(ValueError, match="bad message"):
        run_until_suspended(broken())


async def test_an_error_after_suspending_is_raised_by_the_rest() -> None:
    async def fails_later() -> None:
        await asyncio.sleep(0)
        raise KeyError("gone")

    rest = run_until_suspended(fails_later())
    assert not isinstance(rest, Finished)
    with pytest.raises(KeyError):
        await rest


async def test_cancelling_the_rest_cancels_the_coroutine_inside() -> None:
    """What a race does to the loser (asyncio.wait, mode's wait_first): the coroutine
    sees the cancellation where it waits and can clean up."""
    never: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    cleaned: list[bool] = []

    async def blocked() -> None:
        try:
            await never
        finally:
            cleaned.append(True)

    rest = run_until_suspended(blocked())
    assert not isinstance(rest, Finished)
    task = asyncio.ensure_future(rest)
    winner = asyncio.ensure_future(asyncio.sleep(0))
    done, _ = await asyncio.wait({task, winner}, return_when=asyncio.FIRST_COMPLETED)
    assert done == {winner}
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cleaned == [True] and never.cancelled()


async def test_a_coroutine_that_catches_the_cancellation_returns_its_value() -> None:
    async def stubborn() -> str:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            return "stopped cleanly"
        return "slept"

    rest = run_until_suspended(stubborn())
    assert not isinstance(rest, Finished)
    task = asyncio.ensure_future(rest)
    await asyncio.sleep(0)
    task.cancel()
    assert await task == "stopped cleanly"


# Steps a coroutine takes: 0 = a bare turn of the loop, 1 = wait for a future another
# task resolves, 2 = a nested coroutine that suspends, 3 = nothing.
steps = st.lists(st.integers(min_value=0, max_value=3), max_size=8)


async def _walk(plan: list[int], resolve: list[asyncio.Future[int]]) -> list[Any]:
    seen: list[Any] = []
    for step in plan:
        if step == 0:
            seen.append(await asyncio.sleep(0, result="turn"))
        elif step == 1:
            future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
            resolve.append(future)
            seen.append(await future)
        elif step == 2:
            seen.append(await _walk([0], resolve))
        else:
            seen.append("none")
    return seen


async def _run(plan: list[int], eager: bool) -> list[Any]:
    resolve: list[asyncio.Future[int]] = []
    if eager:
        started = run_until_suspended(_walk(plan, resolve))
        if isinstance(started, Finished):
            return started.value
        task = asyncio.ensure_future(started)
    else:
        task = asyncio.ensure_future(_walk(plan, resolve))
    answered = 0
    while not task.done():
        await asyncio.sleep(0)
        while answered < len(resolve):
            resolve[answered].set_result(answered)
            answered += 1
    return task.result()


@given(plan=steps)
def test_eager_start_gives_what_awaiting_the_coroutine_gives(plan: list[int]) -> None:
    async def both() -> tuple[list[Any], list[Any]]:
        return await _run(plan, eager=True), await _run(plan, eager=False)

    eager, plain = asyncio.run(both())
    assert eager == plain
