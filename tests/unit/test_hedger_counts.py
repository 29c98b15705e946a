"""Hedging's per-input counts: a step that had to be retried is counted once."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from decimal import Decimal
from types import SimpleNamespace
from typing import Any, cast

from smartlev.v1 import hedging_pb2, leverage_pb2

from services.hedging.main import Hedger, HedgingRuntime
from services.hedging.messages import MarketStep
from shared.core.config import StrategyConfig
from shared.core.market import Tick
from shared.stream import Input

SYMBOL = "BTC-USDT"


class CountingRuntime:
    """What the Hedger asks of its runtime, counting what it reports."""

    def __init__(self) -> None:
        self.halted: dict[str, str] = {}
        self.counts = {"skipped": 0, "processed": 0}

    def output(self, spec: object) -> object:
        return spec

    def skipped(self, inp: Input) -> None:
        self.counts["skipped"] += 1

    def processed(self, inp: Input, ts_init_ns: int) -> None:
        self.counts["processed"] += 1


class ConflictingDesks:
    """A desk at seq 5; the first run of its step meets another writer (a conflict)."""

    def __init__(self) -> None:
        self.loads = 0

    async def current(self, symbol: str) -> Any:
        self.loads += 1
        return SimpleNamespace(symbol=symbol, last_seq=5, inflight=None)

    def drop(self, symbol: str) -> None:
        pass


def step(seq: int) -> MarketStep:
    tick = Tick(SYMBOL, seq, Decimal(100 + seq))
    return MarketStep(SYMBOL, seq, 1, tick, (), leverage_pb2.TargetsUpdate())


def test_a_step_retried_after_a_conflict_counts_its_redeliveries_once() -> None:
    runtime, desks = CountingRuntime(), ConflictingDesks()
    hedger = Hedger(
        cast(HedgingRuntime, runtime), cast(Any, desks), StrategyConfig(), backoff_s=0.0
    )
    runs: list[list[int]] = []

    async def run_market(desk: Any, fresh: list[MarketStep], committed: list[MarketStep]) -> bool:
        runs.append([s.seq for s in fresh])
        if len(runs) > 2:  # two conflicts, then done
            committed.extend(fresh)
            return True
        return False

    hedger._run_market = run_market  # type: ignore[method-assign]
    asyncio.run(hedger.on_market(cast(Input, None), [step(s) for s in (4, 5, 6, 7)]))
    assert runs == [[6, 7]] * 3 and desks.loads == 3
    assert runtime.counts == {"skipped": 2, "processed": 2}  # 6 and 2 before the fix


class PartsDesks:
    """A desk at seq 0 whose venue counts calls and which keeps its Inflight until a
    commit, as Redis does; the commit numbered `refused` meets another writer's write."""

    def __init__(self, refused: int = 0) -> None:
        self.last_seq = 0
        self.commits = 0
        self.refused = refused
        self.inflight: object = None
        self.venue = SimpleNamespace(calls_made=0)

    async def current(self, symbol: str) -> Any:
        return SimpleNamespace(
            symbol=symbol, last_seq=self.last_seq, inflight=self.inflight, venue=self.venue
        )

    def drop(self, symbol: str) -> None:
        pass

    async def begin(self, desk: Any, inflight: object) -> bool:
        self.inflight = desk.inflight = inflight
        return True

    async def commit(self, desk: Any, *, seq: int) -> bool:
        self.commits += 1
        if self.commits == self.refused:
            return False
        self.last_seq = desk.last_seq = seq
        self.inflight = desk.inflight = None
        return True


def run_in_parts(
    desks: PartsDesks,
    work: Callable[[Any, MarketStep], hedging_pb2.HedgeUpdate],
    meanwhile: Callable[[Hedger], Awaitable[None]] | None = None,
) -> dict[str, int]:
    """Six steps of one venue call each through a hedger that cuts every two calls;
    the counts it reports. `meanwhile`: run once the batch is under way (in a retry's
    back-off, when a step failed), as the symbol's other input would."""
    runtime = CountingRuntime()
    hedger = Hedger(
        cast(HedgingRuntime, runtime), cast(Any, desks), StrategyConfig(),
        backoff_s=0.0 if meanwhile is None else 0.2, calls_per_inflight=2,
    )  # fmt: skip
    steps = {s: step(s) for s in range(1, 7)}
    for seq, market in steps.items():
        market.message.market.tick.seq = seq  # what a resumed Inflight's payload names
    hedger.market_step = lambda message: steps[message.market.tick.seq]  # type: ignore[method-assign]

    async def send_many(messages: object) -> None:
        pass

    hedger._market_work = work  # type: ignore[method-assign, assignment]
    runtime.send_many = send_many  # type: ignore[attr-defined]

    async def run() -> None:
        market = asyncio.create_task(hedger.on_market(cast(Input, None), list(steps.values())))
        if meanwhile is not None:
            await asyncio.sleep(0.1)
            await meanwhile(hedger)
        await market

    asyncio.run(run())
    assert desks.last_seq == 6
    return runtime.counts


def one_call(desk: Any, market: MarketStep) -> hedging_pb2.HedgeUpdate:
    desk.venue.calls_made += 1
    return hedging_pb2.HedgeUpdate(event_id=market.event_id)


def test_a_batch_cut_in_parts_counts_its_committed_parts_as_processed() -> None:
    """The second part's commit meets a conflict. The first part, committed by this
    call, was counted as redelivered (skipped 2, processed 4)."""
    desks = PartsDesks(refused=2)
    assert run_in_parts(desks, one_call) == {"skipped": 0, "processed": 6}
    assert desks.commits == 4


def test_a_part_resumed_after_an_error_counts_as_processed() -> None:
    """The second part's first call times out after its Inflight was written; the retry
    resumes that Inflight, and its steps, this call's, counted as redelivered."""
    failed: list[int] = []

    def work(desk: Any, market: MarketStep) -> hedging_pb2.HedgeUpdate:
        if market.seq == 3 and not failed:
            failed.append(3)
            raise TimeoutError("venue call timed out")  # transient: the step is retried
        return one_call(desk, market)

    assert run_in_parts(PartsDesks(), work) == {"skipped": 0, "processed": 6}
    assert failed


def test_a_part_the_orders_input_resumed_in_the_back_off_counts_as_processed() -> None:
    """The same, with an order for the symbol arriving in the market retry's back-off:
    its handler resumes the Inflight first, and the market retry counted those steps,
    this instance's, as redelivered."""
    failed: list[int] = []

    def work(desk: Any, market: MarketStep) -> hedging_pb2.HedgeUpdate:
        if market.seq == 3 and not failed:
            failed.append(3)
            raise TimeoutError("venue call timed out")
        return one_call(desk, market)

    async def an_order_arrives(hedger: Hedger) -> None:
        assert failed  # in the back-off, outside the symbol's lock
        async with hedger._locks[SYMBOL]:
            await hedger._ready(SYMBOL)  # what an order's handler does first

    desks = PartsDesks()
    assert run_in_parts(desks, work, an_order_arrives) == {"skipped": 0, "processed": 6}
