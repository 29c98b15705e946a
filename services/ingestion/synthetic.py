"""SYNTHETIC price paths for stress tests only: not market data, never a backtest input.

`synthetic_stream(spec)` is a pure function of its spec (seed included): the same seed
gives the same events, bit for bit, on any machine. The arithmetic is integer-only (the
price is an int count of `tick_size`, moves are integer basis points, `random.Random`
draws integers), so every price is an exact Decimal on the tick grid and > 0.

Scenarios:
- `chop`: small two-sided moves pulled back toward the start price (a ranging market);
- `crash`: a slow bleed with sudden one-tick legs down of 5-25% and partial rebounds;
- `gaps`: ordinary noise, plus holes in time (1-48 h without ticks) that reopen 10-40%
  away, so some reopenings exceed the 30% jump flag;
- `mixed`: segments of trend up, trend down, chop, crash and gaps, chosen by the seed.

A move of `bps` basis points multiplies the price by (1 + bps/10,000) up and divides it by
(1 + |bps|/10,000) down, rounded to the nearest tick, so two-sided noise does not drift;
a move that would take the price under 1% of the start goes up instead, and the mark is
the price within 5 bps. (Moves floored to the tick, down legs cut by their percentage and
a floor of one tick took every `gaps` and `crash` path to 0.1 for half its length, its
mark up to 6x the price.)

Funding settles every 8 hours (00/08/16 UTC) with a small random rate; a settlement comes
before a tick at the same instant, as in the backtester's stream.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Literal

from shared.core.market import NS_PER_HOUR, FundingRate, Tick

Scenario = Literal["gaps", "crash", "chop", "mixed"]
SCENARIOS: tuple[Scenario, ...] = ("gaps", "crash", "chop", "mixed")
_REGIMES = ("up", "down", "chop", "crash", "gaps")
_BPS = 10_000
_FUNDING_EVERY_NS = 8 * NS_PER_HOUR
_RATE_UNIT = Decimal("0.000001")


@dataclass(frozen=True, slots=True, kw_only=True)
class SyntheticSpec:
    symbol: str = "BTC-USDT"
    seed: int = 0
    ticks: int = 10_000
    scenario: Scenario = "mixed"
    start_ns: int = 1_704_067_200 * 1_000_000_000  # 2024-01-01T00:00:00Z
    step_ns: int = NS_PER_HOUR // 4  # four ticks an hour, like an OHLC replay
    start_price: Decimal = Decimal("30000.0")
    tick_size: Decimal = Decimal("0.1")

    def __post_init__(self) -> None:
        if self.scenario not in SCENARIOS:
            raise ValueError(f"scenario must be one of {SCENARIOS}, got {self.scenario!r}")
        if self.ticks < 0 or self.step_ns <= 0 or self.tick_size <= 0:
            raise ValueError("ticks >= 0, step_ns > 0 and tick_size > 0 are required")
        if self.start_price < self.tick_size or self.start_price % self.tick_size:
            raise ValueError(f"start_price {self.start_price} is not on the tick grid")


def _move_bps(regime: str, rng: random.Random, price: int, anchor: int) -> int:
    """One step's move in basis points for the regime."""
    noise = rng.randint(-30, 30)
    if regime == "up":
        return noise + 4
    if regime == "down":
        return noise - 4
    if regime == "chop":
        pull = max(-25, min(25, (anchor - price) * 200 // anchor))
        return noise + pull
    if regime == "crash":
        if rng.randint(1, 100) <= 2:
            return -rng.randint(500, 2500)
        if rng.randint(1, 100) <= 3:
            return rng.randint(100, 800)
        return noise - 3
    return noise  # gaps: the gap itself is drawn by the caller


def _rounded(numerator: int, denominator: int) -> int:
    """numerator / denominator to the nearest integer (halves up), for positive values."""
    return (2 * numerator + denominator) // (2 * denominator)


def move_price(price: int, bps: int, floor: int) -> int:
    """`price` moved by `bps`, symmetric in log terms, reflected off `floor`."""
    if bps < 0 and _rounded(price * _BPS, _BPS - bps) < floor:
        bps = -bps
    if bps >= 0:
        return _rounded(price * (_BPS + bps), _BPS)
    return _rounded(price * _BPS, _BPS - bps)


def synthetic_stream(spec: SyntheticSpec) -> Iterator[Tick | FundingRate]:
    rng = random.Random(spec.seed)
    anchor = price = int(spec.start_price / spec.tick_size)
    floor, ceiling = max(1, price // 100), price * 100
    ts = spec.start_ns
    next_funding = -(-spec.start_ns // _FUNDING_EVERY_NS) * _FUNDING_EVERY_NS
    regime = spec.scenario if spec.scenario != "mixed" else rng.choice(_REGIMES)
    left_in_segment = rng.randint(200, 800)
    for _ in range(spec.ticks):
        if spec.scenario == "mixed" and left_in_segment == 0:
            regime, left_in_segment, anchor = rng.choice(_REGIMES), rng.randint(200, 800), price
        left_in_segment -= 1
        bps = _move_bps(regime, rng, price, anchor)
        if regime == "gaps" and rng.randint(1, 100) <= 3:
            ts += rng.randint(1, 48) * NS_PER_HOUR
            bps = rng.choice((-1, 1)) * rng.randint(1000, 4000)
        price = move_price(price, bps, floor)
        if price > ceiling:  # gaps have no anchor: reflected, never past what is taken
            price = max(floor, 2 * ceiling - price)
        while next_funding <= ts:
            rate = Decimal(rng.randint(-300, 600)) * _RATE_UNIT
            yield FundingRate(spec.symbol, next_funding, rate)
            next_funding += _FUNDING_EVERY_NS
        mark = max(1, move_price(price, rng.randint(-5, 5), 1))
        yield Tick(spec.symbol, ts, price * spec.tick_size, mark * spec.tick_size)
        ts += spec.step_ns
