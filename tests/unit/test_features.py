"""FeatureTracker: closed forms on synthetic paths, properties on random ones, snapshots."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.core.features import FeatureConfig, Features, FeatureTracker
from shared.core.market import NS_PER_HOUR

SMALL = FeatureConfig(trend_horizons=(4, 8, 16), drawdown_window=32, vol_halflife_bars=6.0)
HOURS_PER_YEAR = 365 * 24


def run(config: FeatureConfig, closes: list[float]) -> list[Features]:
    tracker = FeatureTracker(config)
    return [tracker.update((i + 1) * NS_PER_HOUR, c) for i, c in enumerate(closes)]


def geometric(start: float, log_returns: list[float]) -> list[float]:
    closes = [start]
    for r in log_returns:
        closes.append(closes[-1] * math.exp(r))
    return closes


def test_ewma_vol_of_constant_returns_is_the_return_annualised() -> None:
    """Bias-corrected EWMA of a constant r^2 is r^2 exactly, from the first return on."""
    out = run(FeatureConfig(), geometric(100.0, [0.01] * 50))
    for f in out[1:]:
        assert f.sigma_ann == pytest.approx(0.01 * math.sqrt(HOURS_PER_YEAR), rel=1e-9)


def test_ewma_vol_after_a_regime_change_matches_the_closed_form() -> None:
    """n returns of r1 then k of r2: var = (d^k (1 - d^n) r1^2 + (1 - d^k) r2^2) / (1 - d^(n+k))."""
    halflife, n, k, r1, r2 = 10.0, 30, 7, 0.002, 0.03
    config = FeatureConfig(vol_halflife_bars=halflife)
    last = run(config, geometric(50.0, [r1] * n + [-r2] * k))[-1]
    d = 0.5 ** (1 / halflife)
    variance = (d**k * (1 - d**n) * r1**2 + (1 - d**k) * r2**2) / (1 - d ** (n + k))
    assert last.sigma_ann == pytest.approx(math.sqrt(variance * HOURS_PER_YEAR), rel=1e-6)


def test_an_outage_of_typical_moves_does_not_move_the_volatility() -> None:
    """Hourly returns of 1%, then no bar for three hours and a move of the size three
    such hours make (1% x sqrt 3): the volatility stays at 1% an hour."""
    tracker = FeatureTracker(FeatureConfig())
    closes = geometric(100.0, [0.01, -0.01] * 20)
    for i, close in enumerate(closes):
        tracker.update((i + 1) * NS_PER_HOUR, close)
    after_gap = tracker.update((len(closes) + 3) * NS_PER_HOUR, closes[-1] * math.exp(0.01732))
    assert after_gap.sigma_ann == pytest.approx(0.01 * math.sqrt(HOURS_PER_YEAR), rel=1e-3)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.floats(-0.05, 0.05), min_size=1, max_size=40),
    st.integers(2, 200),
    st.floats(-0.3, 0.3),
)
def test_a_gap_of_k_bars_weighs_as_k_bars_of_its_per_bar_share(
    history: list[float], k: int, move: float
) -> None:
    """One return over k bar lengths moves the EWMA exactly as k bars whose squared
    returns are move^2 / k each (the old estimate decays k times, not once)."""
    closes = geometric(1000.0, history)
    gapped, stepped = FeatureTracker(SMALL), FeatureTracker(SMALL)
    for i, close in enumerate(closes):
        gapped.update((i + 1) * NS_PER_HOUR, close)
        stepped.update((i + 1) * NS_PER_HOUR, close)
    end = len(closes)
    last = gapped.update((end + k) * NS_PER_HOUR, closes[-1] * math.exp(move))
    share = abs(move) / math.sqrt(k)
    close = closes[-1]
    for j in range(1, k + 1):
        close *= math.exp(share if j % 2 else -share)
        expected = stepped.update((end + j) * NS_PER_HOUR, close)
    assert last.sigma_ann == pytest.approx(expected.sigma_ann, rel=1e-9, abs=1e-12)


def test_efficiency_is_one_on_a_monotonic_path() -> None:
    out = run(SMALL, geometric(10.0, [0.003 * (1 + i % 5) for i in range(40)]))
    assert all(e == pytest.approx(1.0, abs=1e-9) for e in out[-1].efficiency)


def test_efficiency_is_zero_on_a_perfect_zigzag() -> None:
    out = run(SMALL, geometric(10.0, [0.02, -0.02] * 20))
    assert all(e < 1e-9 for e in out[-1].efficiency)
    assert abs(out[-1].trend_score) < 1e-6


@pytest.mark.parametrize("direction", [1.0, -1.0])
def test_trend_score_follows_the_direction(direction: float) -> None:
    noisy_trend = [direction * 0.004 + (0.006 if i % 2 else -0.006) for i in range(60)]
    last = run(SMALL, geometric(100.0, noisy_trend))[-1]
    assert math.copysign(1.0, last.trend_score) == direction
    assert abs(last.trend_score) > 0.5
    assert all(math.copysign(1.0, t) == direction for t in last.momentum_t)


def test_drawdown_after_a_known_drop_equals_the_drop() -> None:
    closes = [100.0, 110.0, 120.0, 90.0, 84.0]
    last = run(SMALL, closes)[-1]
    assert last.drawdown == pytest.approx(1 - 84.0 / 120.0)
    assert last.rally == 0.0


def test_rally_after_a_known_rise_from_the_trough() -> None:
    last = run(SMALL, [100.0, 80.0, 60.0, 75.0, 90.0])[-1]
    assert last.rally == pytest.approx(90.0 / 60.0 - 1)
    assert last.drawdown == pytest.approx(1 - 90.0 / 100.0)


def test_the_peak_is_forgotten_after_the_drawdown_window() -> None:
    config = FeatureConfig(trend_horizons=(2, 3), drawdown_window=5)
    out = run(config, [200.0] + [100.0] * 6)
    assert out[4].drawdown == pytest.approx(0.5)  # the 200 is 4 bars back: in the window
    assert out[5].drawdown == 0.0  # 5 bars back: gone


def test_warm_once_the_longest_horizon_has_its_returns() -> None:
    out = run(SMALL, geometric(10.0, [0.001] * 20))
    assert [f.warm for f in out].index(True) == 16  # 17th close = 16 returns
    assert [f.bars_seen for f in out[:3]] == [1, 2, 3]


def test_buffers_do_not_grow_with_the_number_of_bars() -> None:
    """O(1) memory and work per bar: every internal buffer is bounded by the config."""
    tracker = FeatureTracker(SMALL)
    sizes = set()
    for i, close in enumerate(geometric(10.0, [0.01 * math.sin(i / 7.0) for i in range(3000)])):
        tracker.update((i + 1) * NS_PER_HOUR, close)
        sizes.add(tracker.buffer_lengths())
    longest = max(SMALL.trend_horizons) + 1
    assert all(max(s) <= max(longest, SMALL.drawdown_window) for s in sizes)


@pytest.mark.parametrize("bad", [0.0, -1.0, math.nan, math.inf, -math.inf])
def test_rejects_a_close_that_is_not_positive_and_finite(bad: float) -> None:
    tracker = FeatureTracker(SMALL)
    with pytest.raises(ValueError, match="close"):
        tracker.update(NS_PER_HOUR, bad)


@pytest.mark.parametrize("second_ts", [NS_PER_HOUR, NS_PER_HOUR - 1])
def test_rejects_a_time_that_does_not_increase(second_ts: int) -> None:
    tracker = FeatureTracker(SMALL)
    tracker.update(NS_PER_HOUR, 1.0)
    with pytest.raises(ValueError, match="increase"):
        tracker.update(second_ts, 1.0)


def test_config_rejects_unsorted_horizons_and_unknown_fields() -> None:
    with pytest.raises(ValueError):
        FeatureConfig(trend_horizons=(24, 24))
    with pytest.raises(ValueError):
        FeatureConfig(trend_horizons=())
    with pytest.raises(ValueError):
        FeatureConfig(vol_span=3)  # type: ignore[call-arg]


@pytest.mark.parametrize("scale", [0.001, 2.0, 1e300])
def test_every_trend_t_scale_accepted_scores_a_flat_window_zero(scale: float) -> None:
    """A scale whose inverse overflowed scored a t of 0 as 0 x inf = NaN, and the leverage
    stage dead-lettered the regime update with its tick (from a review)."""
    config = FeatureConfig(trend_horizons=(4, 8), trend_t_scale=scale)
    for f in run(config, [100.0] * 12):
        assert f.trend_score == 0.0


@pytest.mark.parametrize("scale", [0.0009, 1e-320, 0.0])
def test_config_refuses_a_trend_t_scale_too_small_to_invert(scale: float) -> None:
    with pytest.raises(ValueError, match="trend_t_scale"):
        FeatureConfig(trend_t_scale=scale)


def test_restore_refuses_a_snapshot_of_another_config() -> None:
    tracker = FeatureTracker(SMALL)
    tracker.update(NS_PER_HOUR, 1.0)
    with pytest.raises(ValueError, match="FeatureConfig"):
        FeatureTracker.restore(FeatureConfig(), tracker.snapshot())


# Random paths: calm drift, -50% crashes, long chop, one-sided runs and gap jumps.
log_return = st.one_of(
    st.floats(-0.01, 0.01),
    st.sampled_from([math.log(0.5), math.log(1.5), 0.0]),
    st.floats(-0.3, 0.3),
)
segment = st.one_of(
    st.lists(log_return, min_size=1, max_size=30),
    st.tuples(st.floats(0.001, 0.05), st.integers(2, 60)).map(lambda p: [p[0], -p[0]] * p[1]),
    st.tuples(st.floats(-0.03, 0.03), st.integers(5, 80)).map(lambda p: [p[0]] * p[1]),
)
paths = st.lists(segment, min_size=1, max_size=8).map(
    lambda segments: geometric(1000.0, [r for s in segments for r in s])
)


@settings(max_examples=150, deadline=None)
@given(paths)
def test_outputs_stay_finite_and_in_range(closes: list[float]) -> None:
    for f in run(SMALL, closes):
        numbers = [f.sigma_ann, f.trend_score, f.drawdown, f.rally, *f.momentum_t]
        assert all(math.isfinite(x) for x in numbers), f
        assert all(0.0 <= e <= 1.0 for e in f.efficiency)
        assert -1.0 <= f.trend_score <= 1.0
        assert 0.0 <= f.drawdown < 1.0
        assert f.rally >= 0.0
        assert f.sigma_ann >= 0.0


@settings(max_examples=100, deadline=None)
@given(paths, st.floats(0.0, 1.0))
def test_snapshot_and_restore_continue_exactly(closes: list[float], where: float) -> None:
    cut = int(where * len(closes))
    whole = run(SMALL, closes)
    tracker = FeatureTracker(SMALL)
    for i, close in enumerate(closes[:cut]):
        tracker.update((i + 1) * NS_PER_HOUR, close)
    snapshot = json.loads(json.dumps(tracker.snapshot()))
    restored = FeatureTracker.restore(SMALL, snapshot)
    resumed = [restored.update((i + 1) * NS_PER_HOUR, c) for i, c in enumerate(closes) if i >= cut]
    assert resumed == whole[cut:]


@settings(max_examples=30, deadline=None)
@given(paths)
def test_two_runs_are_identical(closes: list[float]) -> None:
    assert run(SMALL, closes) == run(SMALL, closes)
