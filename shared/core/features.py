"""Bar features for the leverage policy: volatility, trend, drawdown (DESIGN.md section 4).

Everything is O(1) per bar with no per-bar list allocations: closes live in preallocated
ring buffers, window sums are running sums, and the rolling peak and trough are
monotonic queues (never longer than `drawdown_window`). Absolute log returns are kept as integers of
`RETURN_QUANTUM` so the running sums are exact: no float drift, and a snapshot restored
from JSON continues bit for bit like an uninterrupted run.

Signals are floats (they are not money). Each update is one closed bar. A bar that
closes k bar lengths after the previous one (an outage: intervals without ticks make no
bar) brings a return over k bars: the volatility takes it as k bars of its per-bar share
(the old estimate decays k times, the squared return counts k-th), so an outage neither
spikes the volatility nor lets it go stale. The trend and drawdown windows count bars.
"""

from __future__ import annotations

import math
from collections import deque
from itertools import pairwise
from typing import Any, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, field_validator

from shared.core.market import NS_PER_SECOND, NS_PER_YEAR

SNAPSHOT_VERSION = 1
# Absolute log returns are summed as integers of this size: 1e-12 is far below any price
# tick, and integer sums never drift.
RETURN_QUANTUM = 1e-12
_RETURNS_PER_QUANTUM = 1e12


class SnapshotIncompatible(ValueError):
    """A snapshot of another configuration (windows of other lengths, other thresholds,
    bars of another length) or format version: its state cannot continue here. Not
    corruption: a snapshot that fits neither its own configuration nor its format is a
    plain ValueError."""


# The longest trend window: each tracker keeps a ring of that many bars (11 years of
# hours; 1e11 bars ran the backtest out of memory).
MOST_HORIZON_BARS = 100_000


class FeatureConfig(BaseModel):
    """How features are measured; defaults suit hourly bars of a crypto perpetual."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    bar_seconds: int = Field(
        3600, gt=0, description="Bar length; annualises vol (crypto trades 365 days a year)."
    )
    vol_halflife_bars: float = Field(
        24.0,
        gt=0,
        le=1_000_000,  # past ~1e16 the decay is exactly 1.0 and the EWMA divides 0 by 0
        description="EWMA half-life of squared log returns: one day reacts to a crash "
        "within hours but does not jump on a single bar.",
    )
    trend_horizons: tuple[int, ...] = Field(
        (24, 72, 168),
        description="Bars per trend window (day, 3 days, week), strictly increasing: "
        "a trend must show on several scales, not one.",
    )
    drawdown_window: int = Field(
        720, gt=0, description="Bars that define the recent peak and trough (30 days)."
    )
    trend_t_scale: float = Field(
        2.0,
        ge=0.001,  # below ~5.6e-309 its inverse is infinite, and a t of 0 scored NaN
        description="Momentum t-stat mapped through tanh(t / scale): a two-sigma move "
        "scores 0.76, noise (|t| ~ 1) about 0.46.",
    )

    @field_validator("trend_horizons")
    @classmethod
    def _increasing_horizons(cls, horizons: tuple[int, ...]) -> tuple[int, ...]:
        if not horizons:
            raise ValueError("trend_horizons: at least one horizon")
        if horizons[0] < 2 or any(b <= a for a, b in pairwise(horizons)):
            raise ValueError("trend_horizons: strictly increasing, each >= 2 bars")
        if horizons[-1] > MOST_HORIZON_BARS:
            raise ValueError(f"trend_horizons: each at most {MOST_HORIZON_BARS:,} bars")
        return horizons


class Features(NamedTuple):
    """What the market looked like at the close of one bar."""

    ts_ns: int
    close: float
    bars_seen: int
    sigma_ann: float
    efficiency: tuple[float, ...]
    momentum_t: tuple[float, ...]
    trend_score: float
    drawdown: float
    rally: float
    warm: bool


class FeatureTracker:
    """Turns closed bars into `Features`, one bar at a time, in O(1) per bar."""

    __slots__ = (
        "_abs_ring",
        "_abs_sums",
        "_bar_ns",
        "_bars_seen",
        "_config",
        "_decay",
        "_drawdown_window",
        "_efficiency_scratch",
        "_ewma_sq",
        "_ewma_weight",
        "_horizons",
        "_inv_horizon_count",
        "_inv_sqrt_horizons",
        "_inv_t_scale",
        "_last_log_close",
        "_last_ts_ns",
        "_log_ring",
        "_momentum_scratch",
        "_peak_closes",
        "_peak_indices",
        "_ring_size",
        "_sqrt_bars_per_year",
        "_trough_closes",
        "_trough_indices",
    )

    def __init__(self, config: FeatureConfig) -> None:
        self._config = config
        self._horizons = config.trend_horizons
        longest = config.trend_horizons[-1]
        # A horizon of h bars needs h returns, i.e. h + 1 closes.
        self._ring_size = longest + 1
        self._decay = 0.5 ** (1.0 / config.vol_halflife_bars)
        self._bar_ns = config.bar_seconds * NS_PER_SECOND
        self._sqrt_bars_per_year = math.sqrt(NS_PER_YEAR / self._bar_ns)
        self._inv_t_scale = 1.0 / config.trend_t_scale
        self._inv_sqrt_horizons = [1.0 / math.sqrt(h) for h in config.trend_horizons]
        self._inv_horizon_count = 1.0 / len(config.trend_horizons)
        self._log_ring = [0.0] * self._ring_size
        self._abs_ring = [0] * self._ring_size
        self._abs_sums = [0] * len(self._horizons)
        # Reused every bar; only the output tuples are new objects.
        self._efficiency_scratch = [0.0] * len(self._horizons)
        self._momentum_scratch = [0.0] * len(self._horizons)
        self._ewma_sq = 0.0
        self._ewma_weight = 0.0
        self._bars_seen = 0
        self._last_ts_ns: int | None = None
        self._last_log_close = 0.0
        self._drawdown_window = config.drawdown_window
        self._peak_closes: deque[float] = deque()
        self._peak_indices: deque[int] = deque()
        self._trough_closes: deque[float] = deque()
        self._trough_indices: deque[int] = deque()

    def update(self, ts_ns: int, close: float) -> Features:
        """Add one closed bar (close time `ts_ns`) and return the features at its close."""
        if not 0.0 < close < math.inf:
            raise ValueError(f"close must be positive and finite, got {close!r}")
        last_ts_ns = self._last_ts_ns
        if last_ts_ns is not None and ts_ns <= last_ts_ns:
            raise ValueError(f"ts_ns must increase: {ts_ns} after {last_ts_ns}")
        log_close = math.log(close)
        index = self._bars_seen
        ring_size = self._ring_size
        slot = index % ring_size
        log_ring = self._log_ring
        abs_ring = self._abs_ring
        log_ring[slot] = log_close

        if index:
            log_return = log_close - self._last_log_close
            abs_quanta = round(abs(log_return) * _RETURNS_PER_QUANTUM)
            decay = self._decay
            squared = log_return**2
            assert last_ts_ns is not None
            bars = round((ts_ns - last_ts_ns) / self._bar_ns)
            if bars > 1:  # an outage: k bars in one return (module doc)
                decay **= bars
                squared /= bars
            # Bias-corrected EWMA: weights sum to 1 - decay^n, so the first bars are not
            # pulled toward a made-up starting variance.
            ewma_sq = self._ewma_sq = decay * self._ewma_sq + (1.0 - decay) * squared
            ewma_weight = self._ewma_weight = decay * self._ewma_weight + (1.0 - decay)
            sigma_bar = math.sqrt(ewma_sq / ewma_weight)
        else:
            abs_quanta = 0
            sigma_bar = 0.0
        abs_ring[slot] = abs_quanta
        inv_sigma = 1.0 / sigma_bar if sigma_bar > 0.0 else 0.0

        abs_sums = self._abs_sums
        efficiency = self._efficiency_scratch
        momentum = self._momentum_scratch
        inv_sqrt_horizons = self._inv_sqrt_horizons
        inv_t_scale = self._inv_t_scale
        tanh = math.tanh
        score_sum = 0.0
        for k, horizon in enumerate(self._horizons):
            # `index` returns have been seen; the window holds the last min(index, h).
            if index > horizon:
                base = (index - horizon) % ring_size
                # The return ending at bar index - horizon leaves the window.
                abs_sum = abs_sums[k] = abs_sums[k] + abs_quanta - abs_ring[base]
                t_stat = (log_close - log_ring[base]) * inv_sigma * inv_sqrt_horizons[k]
            else:
                base = 0  # warm-up: the window starts at the first close
                abs_sum = abs_sums[k] = abs_sums[k] + abs_quanta
                t_stat = (log_close - log_ring[0]) * inv_sigma / math.sqrt(index or 1)
            move = log_close - log_ring[base]
            if abs_sum:
                ratio = abs(move) / (abs_sum * RETURN_QUANTUM)
                efficiency[k] = ratio if ratio < 1.0 else 1.0
            else:
                efficiency[k] = 0.0
            momentum[k] = t_stat
            score_sum += tanh(t_stat * inv_t_scale)

        # Monotonic queues: each holds the closes not beaten by a later one, so its head
        # is the window's extreme; every close enters and leaves once (O(1) amortised).
        oldest_kept = index - self._drawdown_window + 1
        peak_closes, peak_indices = self._peak_closes, self._peak_indices
        while peak_closes and peak_closes[-1] <= close:
            peak_closes.pop()
            peak_indices.pop()
        peak_closes.append(close)
        peak_indices.append(index)
        if peak_indices[0] < oldest_kept:
            peak_closes.popleft()
            peak_indices.popleft()
        trough_closes, trough_indices = self._trough_closes, self._trough_indices
        while trough_closes and trough_closes[-1] >= close:
            trough_closes.pop()
            trough_indices.pop()
        trough_closes.append(close)
        trough_indices.append(index)
        if trough_indices[0] < oldest_kept:
            trough_closes.popleft()
            trough_indices.popleft()
        self._bars_seen = index + 1
        self._last_ts_ns = ts_ns
        self._last_log_close = log_close
        return Features(
            ts_ns,
            close,
            index + 1,
            sigma_bar * self._sqrt_bars_per_year,
            tuple(efficiency),
            tuple(momentum),
            score_sum * self._inv_horizon_count,
            1.0 - close / peak_closes[0],
            close / trough_closes[0] - 1.0,
            index >= self._ring_size - 1,
        )

    def buffer_lengths(self) -> tuple[int, ...]:
        """Sizes of every internal buffer: fixed by the config, never growing with bars."""
        return (
            len(self._log_ring),
            len(self._abs_ring),
            len(self._abs_sums),
            len(self._peak_closes),
            len(self._trough_closes),
        )

    def snapshot(self) -> dict[str, object]:
        """JSON-serialisable state; floats round-trip exactly through `repr`."""
        return {
            "version": SNAPSHOT_VERSION,
            "config": self._config.model_dump(mode="json"),
            "bars_seen": self._bars_seen,
            "last_ts_ns": self._last_ts_ns,
            "last_log_close": self._last_log_close,
            "ewma_sq": self._ewma_sq,
            "ewma_weight": self._ewma_weight,
            "log_ring": list(self._log_ring),
            "abs_ring": list(self._abs_ring),
            "abs_sums": list(self._abs_sums),
            "peak_closes": list(self._peak_closes),
            "peak_indices": list(self._peak_indices),
            "trough_closes": list(self._trough_closes),
            "trough_indices": list(self._trough_indices),
        }

    @classmethod
    def restore(cls, config: FeatureConfig, snapshot: dict[str, object]) -> FeatureTracker:
        """Rebuild a tracker that continues exactly where `snapshot` was taken."""
        state: dict[str, Any] = dict(snapshot)
        if state.get("version") != SNAPSHOT_VERSION:
            version = state.get("version")
            raise SnapshotIncompatible(f"snapshot version {version!r} is not supported")
        if state.get("config") != config.model_dump(mode="json"):
            raise SnapshotIncompatible("snapshot was taken with a different FeatureConfig")
        tracker = cls(config)
        if len(state["log_ring"]) != tracker._ring_size:
            raise ValueError("snapshot: ring size does not fit the config")
        tracker._bars_seen = int(state["bars_seen"])
        last_ts = state["last_ts_ns"]
        tracker._last_ts_ns = None if last_ts is None else int(last_ts)
        tracker._last_log_close = float(state["last_log_close"])
        tracker._ewma_sq = float(state["ewma_sq"])
        tracker._ewma_weight = float(state["ewma_weight"])
        tracker._log_ring[:] = [float(v) for v in state["log_ring"]]
        tracker._abs_ring[:] = [int(v) for v in state["abs_ring"]]
        tracker._abs_sums[:] = [int(v) for v in state["abs_sums"]]
        for closes_key, indices_key in (
            ("peak_closes", "peak_indices"),
            ("trough_closes", "trough_indices"),
        ):
            if not len(state[closes_key]) == len(state[indices_key]) <= config.drawdown_window:
                raise ValueError(f"snapshot: {closes_key} does not fit the config")
        tracker._peak_closes.extend(float(v) for v in state["peak_closes"])
        tracker._peak_indices.extend(int(v) for v in state["peak_indices"])
        tracker._trough_closes.extend(float(v) for v in state["trough_closes"])
        tracker._trough_indices.extend(int(v) for v in state["trough_indices"])
        return tracker
