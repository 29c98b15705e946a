"""Test helpers for whole-pipeline tests: the backtester's per-tick reference on a real
slice, and HedgeUpdates made in-process by the core (to drive the NAV service alone).

Processes are started by shared/pipeline_runner.py (also used by the demo and the bench);
this module adds what only tests need.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from smartlev.v1 import common_pb2, hedging_pb2, nav_pb2

from services.hedging.messages import book_states
from shared import codec
from shared.adapters.market_data import load_bars, load_funding, load_marks
from shared.adapters.tick_replay import data_dir, file_stem
from shared.backtest import run_backtest
from shared.core.config import StrategyConfig
from shared.core.engine import Strategy
from shared.core.market import Bar, FundingRate, Tick
from shared.core.products import SIDES, product_id, smart_engine
from shared.pipeline_runner import Pipeline, StageSpec, missing_modules, replay_args

SYMBOL = "BTC-USDT"
CAPITAL = Decimal(1_000_000)
PRODUCTS = [product_id(SYMBOL, side) for side in SIDES]


def ns(day: str) -> int:
    """'2021-05-12' -> UTC ns at midnight."""
    return int(datetime.fromisoformat(day).replace(tzinfo=UTC).timestamp()) * 1_000_000_000


@dataclass(frozen=True, slots=True)
class Slice:
    """A window of the real data set, as the backtester and ingestion both read it."""

    start: str
    end: str
    symbol: str = SYMBOL

    def files(self) -> dict[str, str]:
        root, stem = data_dir(), file_stem(self.symbol)
        return {
            "data": str(root / f"{stem}_perp_1h_2019_2023.csv"),
            "funding": str(root / f"{stem}_funding_8h_2019_2023.csv"),
            "marks": str(root / f"{stem}_mark_1h_2019_2023.csv"),
        }

    def replay_args(self) -> list[str]:
        return replay_args(self.symbol, self.start, self.end)

    def load(self) -> tuple[list[Bar], list[FundingRate], dict[int, Decimal]]:
        files = self.files()
        start, end = ns(self.start), ns(self.end)
        bars, _ = load_bars(Path(files["data"]), self.symbol, start_ns=start, end_ns=end)
        rates, _ = load_funding(Path(files["funding"]), self.symbol)
        marks = load_marks(Path(files["marks"]), start_ns=start, end_ns=end)
        return bars, [r for r in rates if start <= r.ts_ns < end], marks


@dataclass
class TickRecord:
    """The books of every smart product right after one tick (the backtester's view)."""

    tick: Tick
    regime: str | None  # the symbol's current regime (None before the first bar closes)
    navs: dict[str, Decimal]
    states: list[hedging_pb2.ProductBookState]


@dataclass
class Reference:
    """The backtester's per-tick record of a slice (benchmarks off)."""

    ticks: list[TickRecord] = field(default_factory=list)
    strategies: Sequence[Strategy] = ()

    def navs(self, product: str) -> list[Decimal]:
        return [t.navs[product] for t in self.ticks]


def backtest_reference(window: Slice, config: StrategyConfig | None = None) -> Reference:
    """run_backtest on the slice with a per-tick record: what the pipeline must equal."""
    config = config or StrategyConfig()
    bars, funding, marks = window.load()
    reference = Reference()

    def on_tick(tick: Tick, regime: str | None, strategies: Sequence[Strategy]) -> None:
        engine = strategies[0].engine
        reference.strategies = strategies
        current = regime or (reference.ticks[-1].regime if reference.ticks else None)
        reference.ticks.append(
            TickRecord(
                tick,
                current,
                {p: engine.nav(p) for p in PRODUCTS},
                book_states(engine),
            )
        )

    run_backtest(
        window.symbol,
        bars,
        funding,
        config,
        capital=CAPITAL,
        marks=marks,
        tick_mode="ohlc",
        benchmarks=False,
        on_tick=on_tick,
    )
    return reference


def seeded_books(config: StrategyConfig, ts_ns: int) -> Iterator[hedging_pb2.HedgeUpdate]:
    """The deposits exactly as the backtester seeds them, one order HedgeUpdate each."""
    engine = smart_engine(SYMBOL, config)
    for product in PRODUCTS:
        engine.deposit(product, CAPITAL, ts_ns)
        yield hedging_pb2.HedgeUpdate(
            event_id=f"deposit:{product}:seed", products=book_states(engine)
        )


def tick_update(record: TickRecord, seq: int) -> hedging_pb2.HedgeUpdate:
    """A tick's HedgeUpdate as hedging would send it (books after the tick)."""
    market = codec.market_event_from_tick(
        record.tick, seq=seq, source="test", ts_init_ns=time.time_ns()
    )
    regime = common_pb2.Regime.Value(record.regime) if record.regime else 0
    return hedging_pb2.HedgeUpdate(
        event_id=f"{SYMBOL}:{seq}", market=market, products=record.states, regime=regime
    )


def compare_navs(
    reference: Reference, updates: Sequence[nav_pb2.NavUpdated], first_seq: int = 0
) -> dict[str, int]:
    """Assert that each product's tick NavUpdateds equal the backtester's per-tick NAVs,
    exactly; returns how many were compared per product."""
    compared = {}
    for product in PRODUCTS:
        got = [
            Decimal(u.nav)
            for u in updates
            if u.product == product and u.event_id == f"{product}:{u.seq}" and u.seq > first_seq
        ]
        want = reference.navs(product)
        assert len(got) == len(want), f"{product}: {len(got)} NAV updates, {len(want)} ticks"
        mismatch = next((i for i, (g, w) in enumerate(zip(got, want, strict=True)) if g != w), None)
        assert mismatch is None, (
            f"{product}: tick {mismatch} ({reference.ticks[mismatch].tick}) "
            f"pipeline NAV {got[mismatch]} != backtest {want[mismatch]}"
        )
        compared[product] = len(got)
    return compared


def tick_navs(
    updates: Sequence[nav_pb2.NavUpdated],
) -> tuple[dict[tuple[str, int], nav_pb2.NavUpdated], int]:
    """Each product's first NavUpdated per tick, in the order they came (orders' and
    deposits' updates left out), and how many were sent again after a restart; a re-sent
    one must carry the same NAV, equity and units (AssertionError otherwise)."""
    first: dict[tuple[str, int], nav_pb2.NavUpdated] = {}
    resent = 0
    for update in updates:
        if update.event_id != f"{update.product}:{update.seq}":
            continue
        seen = first.setdefault((update.product, update.seq), update)
        if seen is update:
            continue
        if (seen.nav, seen.equity, seen.units) != (update.nav, update.equity, update.units):
            raise AssertionError(
                f"{update.event_id} re-sent with a different NAV: {seen.nav} then {update.nav}"
            )
        resent += 1
    return first, resent


def collect(
    pipeline: Pipeline,
    until: Any,
    timeout_s: float,
    stall_s: float = 20.0,
    settle_s: float = 0.0,
) -> list[nav_pb2.NavUpdated]:
    """Read nav.updates until `until(updates)` is true, then `settle_s` more (whatever a
    bug would send extra arrives by then); fail naming a dead service, or with every
    service's log when nothing arrives for `stall_s`."""
    reader = pipeline.nav_consumer()
    updates: list[nav_pb2.NavUpdated] = []
    deadline = time.monotonic() + timeout_s
    last = time.monotonic()
    try:
        while not until(updates):
            pipeline.check_alive()
            fresh = [u for _, u in reader.poll()]
            now = time.monotonic()
            if fresh:
                updates.extend(fresh)
                last = now
            elif now - last > stall_s or now > deadline:
                pytest.fail(f"nav.updates stalled at {len(updates)} updates\n{pipeline.logs()}")
        settled = time.monotonic() + settle_s
        while time.monotonic() < settled:
            updates.extend(u for _, u in reader.poll())
    finally:
        reader.close()
    return updates


def require_services(specs: Sequence[StageSpec], ingestion: bool = False) -> None:
    """Fail naming exactly which service packages are missing (a skip would let `make
    test` pass with the pipeline tests unrun)."""
    missing = missing_modules(specs)
    if ingestion and missing_modules([StageSpec("ingestion", "services.ingestion")]):
        missing.append("services.ingestion")
    if missing:
        pytest.fail(f"services missing from the tree: {', '.join(missing)} (no main.py)")
