"""Synthetic stress paths: reproducible by seed, exact prices on the tick grid, valid."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import threading
import time
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.ingestion import runner
from services.ingestion.runner import (
    PACE_GRANULARITY_S,
    Resume,
    longest_gap_s,
    paced,
    wait_before,
)
from services.ingestion.synthetic import SCENARIOS, SyntheticSpec, move_price, synthetic_stream
from services.ingestion.validation import EMPTY, Accepted, Policy, admit, order_key
from shared.core.market import FundingRate, Tick


@pytest.mark.parametrize("seed", [0, 1])
def test_a_long_gaps_path_stays_within_the_prices_taken(seed: int) -> None:
    """Gaps have no anchor to pull them back: over 50,000 ticks one climbed past the
    highest price taken, and a tenth of a stress run was dead-lettered (from a review).
    It is reflected at 100x its start."""
    spec = SyntheticSpec(seed=seed, ticks=50_000, scenario="gaps")
    state = EMPTY
    highest = Decimal(0)
    for event in synthetic_stream(spec):
        state, verdict = admit(state, event, Policy())
        assert isinstance(verdict, Accepted), verdict
        if isinstance(event, Tick):
            highest = max(highest, event.price)
    assert highest <= spec.start_price * 100


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_same_seed_same_path_and_every_event_is_valid(scenario: str) -> None:
    spec = SyntheticSpec(seed=42, ticks=3000, scenario=scenario)  # type: ignore[arg-type]
    events = list(synthetic_stream(spec))
    assert events == list(synthetic_stream(spec))
    assert events != list(synthetic_stream(SyntheticSpec(seed=43, ticks=3000, scenario=scenario)))  # type: ignore[arg-type]
    ticks = [e for e in events if isinstance(e, Tick)]
    assert len(ticks) == 3000
    for t in ticks:
        assert t.price > 0 and t.price % spec.tick_size == 0
        assert t.mark_price is not None and t.mark_price % spec.tick_size == 0
    state = EMPTY
    for event in events:
        state, verdict = admit(state, event, Policy())
        assert isinstance(verdict, Accepted), verdict
    assert state.seq == len(events)


HEAD_OF_SEED_7 = (
    "from services.ingestion.synthetic import SyntheticSpec, synthetic_stream\n"
    "print(repr(list(synthetic_stream(SyntheticSpec(seed=7, ticks=50, scenario='chop')))))"
)


def test_a_seed_gives_the_same_stream_in_every_process() -> None:
    """Reproducible from its seed alone: nothing may depend on the process (a seed
    mixed with `hash()`, which Python salts per process, passed the in-process check
    while the first price moved between 29985 and 30051 from run to run)."""
    runs = {
        subprocess.run(
            [sys.executable, "-c", HEAD_OF_SEED_7],
            env={**os.environ, "PYTHONHASHSEED": salt},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for salt in ("1", "2", "3")
    }
    assert len(runs) == 1, "the stream depends on the process, not only on the seed"
    head = list(synthetic_stream(SyntheticSpec(seed=7, ticks=50, scenario="chop")))
    assert runs == {repr(head) + "\n"}
    assert [type(e).__name__ for e in head[:4]] == ["FundingRate", "Tick", "Tick", "Tick"]
    assert head[0].ts_ns == head[1].ts_ns  # a settlement precedes the tick of its instant
    first = head[1]
    assert isinstance(first, Tick) and isinstance(first.price, Decimal)


def test_scenarios_do_what_they_say() -> None:
    def prices(scenario: str) -> list[Decimal]:
        spec = SyntheticSpec(seed=3, ticks=5000, scenario=scenario)  # type: ignore[arg-type]
        return [e.price for e in synthetic_stream(spec) if isinstance(e, Tick)]

    crash = prices("crash")
    assert min(crash) < crash[0] / 2  # it crashes
    gaps = [e for e in synthetic_stream(SyntheticSpec(seed=3, ticks=5000, scenario="gaps"))]
    ticks = [e for e in gaps if isinstance(e, Tick)]
    steps = {b.ts_ns - a.ts_ns for a, b in itertools.pairwise(ticks)}
    assert max(steps) > SyntheticSpec().step_ns  # holes in time
    jumps = [abs(b.price / a.price - 1) for a, b in itertools.pairwise(ticks)]
    assert max(jumps) > Decimal("0.30")  # some reopenings trip the jump flag
    funding = [e for e in gaps if isinstance(e, FundingRate)]
    assert all(abs(f.rate) < Decimal("0.001") for f in funding) and funding


def test_spec_validation() -> None:
    with pytest.raises(ValueError):
        SyntheticSpec(scenario="moon")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        SyntheticSpec(start_price=Decimal("100.05"))


def test_a_paced_replay_may_wait_its_longest_gap_without_being_stale() -> None:
    """The health check adds longest_gap_s / speed to the staleness limit: real OHLC ticks
    are 20 minutes of event time apart, 20 minutes of wall time at 1x."""
    s = 10**9
    events = [
        Tick("BTC-USDT", 100 * s, Decimal(1)),
        FundingRate("BTC-USDT", 160 * s, Decimal("0.0001")),
        Tick("BTC-USDT", 130 * s, Decimal(-1)),  # invalid: not part of the schedule
        Tick("BTC-USDT", 1360 * s, Decimal(2)),
    ]
    assert longest_gap_s(events) == 1200.0
    assert longest_gap_s(events[:1]) == 0.0
    assert longest_gap_s([]) == 0.0


def test_paced_schedules_event_time_from_the_first_event() -> None:
    ticks = [Tick("X-Y", 10**9 * s, Decimal(1)) for s in (1, 11, 11, 41, 21)]
    assert [d for d, _ in paced(ticks, 10.0)] == [0.0, 1.0, 1.0, 4.0, 4.0]
    assert [d for d, _ in paced(ticks, None)] == [0.0] * 5


@given(st.lists(st.integers(min_value=0, max_value=50_000), min_size=1, max_size=300))
def test_pacing_never_publishes_early_by_more_than_the_granularity(gaps_us: list[int]) -> None:
    """The replay loop on an ideal clock: it waits what `wait_before` says, publishing
    takes no time. Every event goes out at or before its due time, at most
    PACE_GRANULARITY_S early, and close events share a wake-up."""
    due = list(itertools.accumulate(gap / 1e6 for gap in gaps_us))
    elapsed, wakeups = 0.0, 0
    for due_s in due:
        wait = wait_before(due_s, elapsed)
        assert wait == 0.0 or wait > PACE_GRANULARITY_S
        wakeups += wait > 0
        elapsed += wait
        assert due_s - PACE_GRANULARITY_S - 1e-9 <= elapsed <= due_s + 1e-9
    assert wakeups <= due[-1] / PACE_GRANULARITY_S + 1


def test_pacing_at_1000_events_a_second_wakes_once_per_granularity() -> None:
    burst = round(PACE_GRANULARITY_S * 1000)  # events due within the granularity
    waits = [wait_before(k / 1000, elapsed_s=0.0) for k in range(2 * burst + 2)]
    assert waits[: burst + 1] == [0.0] * (burst + 1)  # at once
    assert waits[burst + 1 :] == [k / 1000 for k in range(burst + 1, 2 * burst + 2)]


def test_resume_drops_only_the_already_published_prefix() -> None:
    ticks = [Tick("X-Y", ts, Decimal(1)) for ts in (1, 2, 3, 1, 4)]
    resume = Resume(ticks, order_key(ticks[1]))
    assert [t.ts_ns for t in resume] == [3, 1, 4]  # the later out-of-order one is kept
    assert resume.skipped == 2


def test_resume_keeps_an_invalid_event_only_if_it_may_be_new() -> None:
    """An invalid event in the published prefix ended the resume: every published event
    after it was submitted again and dead-lettered (NOT_FORWARD), 22 in a real replay."""
    ticks = [Tick("X-Y", ts, Decimal(p)) for ts, p in ((1, 1), (2, 0), (3, 1), (4, 0), (5, 1))]
    resume = Resume(ticks, order_key(ticks[2]))
    assert [(t.ts_ns, t.price) for t in resume] == [(4, 0), (5, 1)]  # the second may be new
    assert resume.skipped == 3
    at_the_end = Resume(ticks[:4], order_key(ticks[2]))
    assert [t.ts_ns for t in at_the_end] == [4]
    everything = Resume(ticks, order_key(ticks[4]))
    assert (list(everything), everything.skipped) == ([], 5)


@pytest.mark.parametrize("scenario", ["gaps", "crash"])
def test_stress_paths_keep_moving_above_a_floor_with_a_mark_beside_the_price(
    scenario: str,
) -> None:
    """Moves floored to the tick, down legs cut by their percentage and a floor of one
    tick took every gaps and crash path to 0.1 for half of its 10,000 ticks, where no
    move could lift it, with marks up to 6x the price."""
    for seed in range(5):
        spec = SyntheticSpec(seed=seed, scenario=scenario)  # type: ignore[arg-type]
        ticks = [e for e in synthetic_stream(spec) if isinstance(e, Tick)]
        floor = spec.start_price / 100
        assert min(t.price for t in ticks) >= floor
        near_floor = sum(1 for t in ticks if t.price < floor * Decimal("1.01"))
        assert near_floor < len(ticks) // 20
        assert all(t.mark_price is not None for t in ticks)
        assert max(abs(t.mark_price / t.price - 1) for t in ticks if t.mark_price) < Decimal(
            "0.001"
        )


@given(st.integers(3_000, 10**9), st.integers(1, 5_000))
def test_a_move_and_its_opposite_come_back_within_a_tick(price: int, bps: int) -> None:
    """Two-sided noise does not drift: up by `bps` then down by `bps` (and the other way
    round) lands within one tick of where it began."""
    assert abs(move_price(move_price(price, bps, 1), -bps, 1) - price) <= 1
    assert abs(move_price(move_price(price, -bps, 1), bps, 1) - price) <= 1


def test_a_replay_slowed_past_any_clock_waits_an_hour_at_a_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """At a speed of 1e-8 a 15-minute gap is a wait of 2,850 years: one `Event.wait` of
    it raised OverflowError (timestamp out of range) out of the replay."""
    waits: list[float] = []

    class Stop(threading.Event):
        def wait(self, timeout: float | None = None) -> bool:
            waits.append(float(timeout or 0))
            return len(waits) >= 3  # stopped on the third hour

    monkeypatch.setattr(runner, "PACE_GRANULARITY_S", 0.0)
    assert runner._stopped_before(9e10, time.monotonic(), Stop())
    assert waits == [runner.LONGEST_WAIT_S] * 3
