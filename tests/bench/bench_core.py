"""Core throughput on real BTC data, beside a bare loop over the same input (the floor).

Run by `make bench`; never a timed assertion inside the test suite. The 1,000,000-tick
case interpolates each real hourly bar linearly along open -> low/high -> high/low ->
close (26-27 ticks per bar), so the path is the real one at a finer grain.
"""

from __future__ import annotations

import argparse
import gc
import time
from collections.abc import Callable, Iterable, Sequence
from decimal import Decimal

from rich.console import Console
from rich.table import Table

from shared.adapters.market_data import load_bars
from shared.adapters.tick_replay import data_dir
from shared.core.bars import ticks_from_bars
from shared.core.config import StrategyConfig
from shared.core.engine import SignalPipeline, Strategy
from shared.core.market import NS_PER_HOUR, Bar, Tick
from shared.core.products import smart_strategy

SYMBOL = "BTC-USDT"


def interpolated_ticks(bars: Sequence[Bar], total: int) -> list[Tick]:
    """About `total` ticks from the real bars, linearly along each bar's OHLC path."""
    per_bar = max(4, total // len(bars))
    extra = total - per_bar * len(bars)
    ticks: list[Tick] = []
    tick_size = Decimal("0.1")
    for index, bar in enumerate(bars):
        count = per_bar + (1 if index < extra else 0)
        first, second = (bar.low, bar.high) if bar.close >= bar.open else (bar.high, bar.low)
        corners = [float(bar.open), float(first), float(second), float(bar.close)]
        step_ns = NS_PER_HOUR // count
        for i in range(count):
            position = 3 * i / (count - 1)
            leg = min(int(position), 2)
            frac = position - leg
            price = corners[leg] + (corners[leg + 1] - corners[leg]) * frac
            exact = Decimal(round(price * 10)) * tick_size
            ticks.append(Tick(SYMBOL, bar.open_ts_ns + i * step_ns, exact))
    return ticks


def run_core(ticks: Iterable[Tick], config: StrategyConfig) -> Strategy:
    signals = SignalPipeline(SYMBOL, config.features, config.regime)
    strategy = smart_strategy(SYMBOL, config)
    for controller in strategy.controllers:
        strategy.engine.deposit(controller.product, Decimal(1_000_000), 0)
    for tick in ticks:
        strategy.on_tick(tick, signals.on_tick(tick.ts_ns, tick.price))
    return strategy


def bare_loop(ticks: Iterable[Tick]) -> int:
    """The floor: read every tick's fields and nothing else."""
    count = 0
    for tick in ticks:
        if tick.price and tick.ts_ns:
            count += 1
    return count


def best_of(repeats: int, work: Callable[[], object]) -> float:
    best = float("inf")
    for _ in range(repeats):
        gc.collect()
        began = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - began)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ticks", type=int, default=1_000_000)
    args = parser.parse_args()
    console = Console(width=130)
    config = StrategyConfig()
    bars, _ = load_bars(data_dir() / "BTCUSDT_perp_1h_2019_2023.csv", SYMBOL)
    cases = [
        (
            "real bars, 1 tick/bar (close)",
            list(ticks_from_bars(bars, NS_PER_HOUR, mode="close")),
            0.5,
        ),
        ("real bars, 4 ticks/bar (ohlc)", list(ticks_from_bars(bars, NS_PER_HOUR)), None),
    ]
    inside = interpolated_ticks(bars, args.ticks)  # at least 4 a bar: maybe more than asked
    # the 5 s goal is the issue's, for 1,000,000 ticks: another count is only a figure
    goal = 5.0 if len(inside) == 1_000_000 else None
    cases.append((f"{len(inside):,} ticks inside real bars", inside, goal))
    table = Table(title=f"core throughput, one core, best of {args.repeats}")
    for column in (
        "input",
        "items",
        "floor s",
        "core s",
        "core items/s",
        "us/item",
        "goal s",
        "met",
    ):
        table.add_column(column, justify="left" if column == "input" else "right")
    for name, ticks, goal in cases:
        console.print(f"[dim]running {name} ...[/dim]")
        floor = best_of(args.repeats, lambda t=ticks: bare_loop(t))
        core = best_of(args.repeats, lambda t=ticks: run_core(t, config))
        met = "-" if goal is None else ("yes" if core < goal else "NO")
        table.add_row(
            name,
            f"{len(ticks):,}",
            f"{floor:.3f}",
            f"{core:.3f}",
            f"{len(ticks) / core:,.0f}",
            f"{core / len(ticks) * 1e6:.2f}",
            "-" if goal is None else f"{goal}",
            met,
        )
    console.print(table)


if __name__ == "__main__":
    main()
