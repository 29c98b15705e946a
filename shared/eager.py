"""Run a coroutine's first step at once, and make a task of it only if it suspends.

Racing an awaitable against others (`asyncio.wait`, mode's `Service.wait_first`) wraps
each in a task: a few microseconds each plus a turn of the event loop, even when the
awaitable would have finished without ever suspending. `run_until_suspended` runs it
up to its first suspension: if it finished, its result is there and no task or race is
needed; if not, the rest of it is a coroutine to race exactly as the whole one would
have been (it resumes where the first step left off, as `await` would).

The first step runs in the caller's task and context, not in a copy of it as a new
task's first step would: use it for coroutines that do not set context variables.
"""

from __future__ import annotations

from collections.abc import Coroutine, Generator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Finished(Generic[T]):
    """The coroutine finished in its first step, with `value`."""

    value: T


def run_until_suspended(coro: Coroutine[Any, Any, T]) -> Finished[T] | Coroutine[Any, Any, T]:
    """`Finished(result)` if `coro` finished without suspending, else a coroutine that
    finishes it (an exception in the first step propagates here)."""
    try:
        suspended_on = coro.send(None)
    except StopIteration as stop:
        return Finished(stop.value)
    return _rest(_Resumed(coro, suspended_on))


async def _rest(resumed: _Resumed[T]) -> T:
    return await resumed


class _Resumed(Generic[T]):
    """The awaitable rest of a coroutine suspended on `suspended_on` (what its first
    step yielded: a future, or None for a bare yield). Forwards what the task sends or
    throws into it (a cancellation included) until the coroutine returns."""

    __slots__ = ("coro", "suspended_on")

    def __init__(self, coro: Coroutine[Any, Any, T], suspended_on: Any) -> None:
        self.coro = coro
        self.suspended_on = suspended_on

    def __await__(self) -> Generator[Any, Any, T]:
        coro, pending = self.coro, self.suspended_on
        while True:
            try:
                sent = yield pending
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:  # a cancellation, or what the task throws in
                try:
                    pending = coro.throw(exc)
                except StopIteration as stop:
                    return stop.value
                continue
            try:
                pending = coro.send(sent)
            except StopIteration as stop:
                return stop.value
