"""Leverage targeting per product: a pure policy with a small, snapshotable state.

Decisions use only the price path since the last rebalance (the leverage a product would
have if it had been exactly at target then), never the books. So the backtester and the
stream services, which see the same ticks and regimes, take the same decisions; fee and
funding drift of the real leverage is corrected at the next rebalance.
"""

from __future__ import annotations

import math
from decimal import Decimal
from typing import Protocol

from pydantic import BaseModel, ConfigDict, Field, model_validator

from shared.core.events import LeverageTargetChanged, Reason
from shared.core.market import MAX_FUNDING_RATE, NS_PER_DAY, Side
from shared.core.regime import Regime, RegimeState


class LeverageConfig(BaseModel):
    """Leverage policy; defaults are explained in the README (chosen on 2019-2023 data)."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    l_min: float = Field(1.0, gt=0, description="Lowest target leverage.")
    l_max: float = Field(5.0, gt=0, description="Highest target leverage.")
    base_trend_aligned: float = Field(
        3.0, description="Base leverage in a trend in the product's direction at confidence 1."
    )
    base_trend_against: float = Field(1.0, description="Base leverage in a trend against it.")
    base_range: float = Field(1.0, description="Base leverage in a ranging (choppy) market.")
    base_high_vol: float = Field(1.0, description="Base leverage when volatility is high.")
    warmup_leverage: float = Field(1.0, description="Leverage before the features are warm.")
    sigma_reference: float = Field(
        0.5, gt=0, description="Annualized vol at which vol scaling is neutral (BTC's median)."
    )
    vol_scale_min: float = Field(0.3, gt=0, description="Lowest vol-scaling factor.")
    vol_scale_max: float = Field(1.0, gt=0, description="Highest vol-scaling factor.")
    target_deadband: float = Field(
        0.25, ge=0, description="Keep the target while the policy moves this much or less (x)."
    )
    max_raise_per_bar: float = Field(0.25, gt=0, description="Fastest rise of the target per bar.")
    max_cut_per_bar: float = Field(1.0, gt=0, description="Fastest cut of the target per bar.")
    rebalance_band: float = Field(
        0.2, gt=0, description="Rebalance when |actual - target| > band x target (cost control)."
    )
    emergency_move: float = Field(
        0.1, gt=0, lt=1, description="Adverse move since the last rebalance that forces a cut."
    )
    emergency_cut: float = Field(
        0.5, gt=0, le=1, description="Factor applied to the target on an emergency cut."
    )
    gap_floor: Decimal = Field(
        Decimal("0.01"),
        gt=0,
        lt=1,
        description="Share of equity at the last rebalance that insurance guarantees on a gap.",
    )
    leverage_ceiling: float = Field(
        5.5, gt=1, description="Actual leverage that forces an immediate rebalance to target."
    )

    @model_validator(mode="after")
    def _consistent(self) -> LeverageConfig:
        if self.l_min > self.l_max:
            raise ValueError(f"l_min {self.l_min} > l_max {self.l_max}")
        if self.l_max * self.emergency_move >= 1:
            raise ValueError(
                f"l_max x emergency_move = {self.l_max * self.emergency_move:g} must be < 1, "
                "or a continuous path could take NAV to zero before the emergency cut"
            )
        if self.leverage_ceiling <= self.l_max:
            raise ValueError("leverage_ceiling must be above l_max, or every tick would trigger")
        if self.leverage_ceiling * float(MAX_FUNDING_RATE) >= 1:
            raise ValueError(
                f"leverage_ceiling {self.leverage_ceiling:g} x the largest funding rate "
                f"{MAX_FUNDING_RATE} must be < 1, or one settlement could take NAV to zero"
            )
        if self.vol_scale_min > self.vol_scale_max:
            raise ValueError("vol_scale_min > vol_scale_max")
        # Targets round to 0.05x: a bound between steps would round out of [l_min,
        # l_max], and a speed between them would round past its limit (0.03 moved 0.05 a
        # bar) or to no move at all (below 0.025, the target froze).
        for name in ("l_min", "l_max", "max_raise_per_bar", "max_cut_per_bar"):
            value = getattr(self, name)  # 0.6 * 3 is 1.7999999999999998: not 1.80
            if value != round(value * 20) / 20:
                raise ValueError(f"{name} {value} must be a multiple of 0.05 (the target step)")
        if self.rebalance_band >= 1:  # 4.5 kept a 5x book through a cut to 1x
            raise ValueError(
                f"rebalance_band {self.rebalance_band:g} must be < 1 (a share of the "
                "target), or the books never follow the target across its range"
            )
        if self.target_deadband >= self.l_max - self.l_min and self.l_max > self.l_min:
            raise ValueError(
                f"target_deadband {self.target_deadband:g} must be < l_max - l_min, or the "
                "target never moves from one bound toward the other"
            )
        return self

    @property
    def warmup_target(self) -> Decimal:
        """The warm-up leverage within [l_min, l_max], as every later target is: the
        controllers' first target and the engine's, which size the first orders."""
        return to_target(min(max(self.warmup_leverage, self.l_min), self.l_max))


def to_target(value: float) -> Decimal:
    """Targets are exact decimals in steps of 0.05x: finer moves are noise, not news."""
    return Decimal(round(value * 20) * 5).scaleb(-2)


def model_leverage(
    side: Side, ref_leverage: float, ref_price: float, price: float, drawn: float = 0.0
) -> float:
    """Leverage at `price` of a position that was at `ref_leverage` at `ref_price`, and
    has paid out `drawn` (a share of its equity then: funding) since."""
    x = price / ref_price
    equity = 1.0 - drawn + side * ref_leverage * (x - 1.0)
    if equity <= 0.0:
        return math.inf
    return ref_leverage * x / equity


def funding_drawn(
    side: Side, ref_leverage: float, ref_price: float, mark: float, rate: float
) -> float:
    """What a funding settlement at `mark` takes from that position, as a share of its
    equity at `ref_price` (negative: paid to it): its size x mark x rate, as the books
    charge it. The position stays as it was, so its leverage moves though the price may
    not have: at the largest rate real BTC paid (0.375% per 8h), a 5x long at a flat
    price passed a 5.5x ceiling no rule saw after five settlements (~40 hours)."""
    return side * ref_leverage * (mark / ref_price) * rate


class Controller(Protocol):
    """What the engine asks of a leverage policy for one product.

    `price` is the last traded price, at which a rebalance executes; `risk_price` is the
    price the risk rules watch: the venue's mark when known, so a thin last-trade wick
    that the mark ignores does not force a sale at the wick.
    """

    product: str
    side: Side

    @property
    def target(self) -> Decimal: ...

    def on_bar(
        self, ts_ns: int, price: Decimal, risk_price: float, regime: RegimeState
    ) -> LeverageTargetChanged | None: ...

    def on_tick(
        self, ts_ns: int, price: Decimal, risk_price: float
    ) -> LeverageTargetChanged | None: ...

    def on_funding(self, rate: float, mark: float) -> None: ...

    def snapshot(self) -> dict[str, object]: ...


class SmartLeverageController:
    """Regime- and volatility-driven target, bounded speed, band and emergency rules."""

    __slots__ = (
        "_adverse",
        "_bounds_moved",
        "_drawn",
        "_is_long",
        "_regime",
        "_target_f",
        "_target_steps",
        "_trigger",
        "config",
        "product",
        "ref_leverage",
        "ref_price",
        "side",
        "target_value",
    )

    def __init__(self, product: str, side: Side, config: LeverageConfig) -> None:
        self.product = product
        self.side = side
        self.config = config
        self._set_target(config.warmup_target)
        self.ref_price: float | None = None
        self.ref_leverage = 0.0
        self._drawn = 0.0  # funding paid since the last rebalance (`funding_drawn`)
        self._regime = str(Regime.RANGE)
        self._is_long = side is Side.LONG
        self._trigger = self._adverse = -math.inf if self._is_long else math.inf
        # restored with the last rebalance outside the bounds (a release moved them): +1
        # above l_max, -1 below l_min, and the snapshot's target; the next tick checks
        # that the books are still outside them
        self._bounds_moved: tuple[int, Decimal] | None = None

    @property
    def target(self) -> Decimal:
        return self.target_value

    def _set_target(self, target: Decimal) -> None:
        self.target_value = target
        self._target_f = float(target)
        self._target_steps = self._steps(self._target_f)

    def policy_target(self, regime: RegimeState) -> float:
        """The unsmoothed target for this regime and volatility (hot path: no reasons)."""
        cfg = self.config
        if not regime.features.warm:
            return self._bounded(cfg.warmup_leverage)
        _, base, scale = self._base_and_scale(regime)
        return self._bounded(base * scale)

    @staticmethod
    def _steps(value: float) -> int:
        """`value` on the target's 0.05 grid, in steps."""
        return round(value * 20)

    def _aligned(self, regime: RegimeState) -> bool:
        """A trend in the product's direction: the one regime whose base rises above l_min."""
        state = regime.regime
        return state in (Regime.TREND_UP, Regime.TREND_DOWN) and (
            (state is Regime.TREND_UP) is self._is_long
        )

    def _bounded(self, value: float) -> float:
        cfg = self.config
        if value < cfg.l_min:
            return cfg.l_min
        return cfg.l_max if value > cfg.l_max else value

    def _base_and_scale(self, regime: RegimeState) -> tuple[str, float, float]:
        """The regime's reason and base leverage, and the volatility scale within its
        bounds: one reading for the target and for its reasons."""
        cfg = self.config
        state = regime.regime
        if state is Regime.HIGH_VOL:
            reason, base = Reason.REGIME_HIGH_VOL, cfg.base_high_vol
        elif state is Regime.RANGE:
            reason, base = Reason.REGIME_RANGE, cfg.base_range
        elif self._aligned(regime):
            reason = Reason.REGIME_TREND_ALIGNED
            base = cfg.base_range + (cfg.base_trend_aligned - cfg.base_range) * regime.confidence
        else:
            reason, base = Reason.REGIME_TREND_AGAINST, cfg.base_trend_against
        sigma = regime.features.sigma_ann
        scale = cfg.vol_scale_max if sigma <= 0 else cfg.sigma_reference / sigma
        return reason, base, min(max(scale, cfg.vol_scale_min), cfg.vol_scale_max)

    def policy_reasons(self, regime: RegimeState) -> list[str]:
        """Why `policy_target` said what it said; built only when a target is published.
        A volatility scaling is named only if it moved the target (within its bounds)."""
        cfg = self.config
        if not regime.features.warm:
            return [Reason.WARMUP]
        reason, base, scale = self._base_and_scale(regime)
        reasons = [reason]
        value = base * scale
        # named only where the scaling moved the policy on the target's grid: a base at
        # l_min (range, high vol, against the trend) scaled down is still l_min
        scaled, unscaled = self._steps(self._bounded(value)), self._steps(self._bounded(base))
        if scaled < unscaled:
            reasons.append(Reason.VOL_SCALED_DOWN)
        elif scaled > unscaled:
            reasons.append(Reason.VOL_SCALED_UP)
        if value <= cfg.l_min:  # held at a bound (or cut to it)
            reasons.append(Reason.CLAMPED_MIN)
        elif value >= cfg.l_max:
            reasons.append(Reason.CLAMPED_MAX)
        return reasons

    def on_bar(
        self, ts_ns: int, price: Decimal, risk_price: float, regime: RegimeState
    ) -> LeverageTargetChanged | None:
        self._regime = regime.regime
        if risk_price <= self._trigger if self._is_long else risk_price >= self._trigger:
            return self._emergency(ts_ns, price, risk_price)
        cfg = self.config
        # books a release's new bounds left outside them are rebalanced here too: with
        # one tick a bar ("close" mode) no other tick would (`on_tick`)
        owed = self._bounds_moved is not None and self._owed(risk_price)
        desired = self.policy_target(regime)
        previous = self._target_f
        # The deadband keeps a target the policy moves little from, but not one above
        # l_min when the market turns against the product (high volatility, a range, a
        # trend against it) and the policy says l_min: kept, a target of 1.25 stood for
        # 69 days of such markets. In a trend with it, the deadband damps the policy's
        # swings with the trend's confidence as before (cut at once, they flipped 1x-1.25x).
        if abs(desired - previous) <= cfg.target_deadband and not (
            previous > cfg.l_min  # both on the grid; false on most bars: the hot path's
            and self._steps(desired) <= self._steps(cfg.l_min)
            and not self._aligned(regime)
        ):
            desired = previous
            if self.ref_price is not None and not owed:
                # Hot path: target kept, leverage still inside the band -> nothing to say.
                actual = self._modelled(risk_price)
                if abs(actual - previous) <= cfg.rebalance_band * previous:
                    return None
        limited = False
        if desired > previous + cfg.max_raise_per_bar:
            desired, limited = previous + cfg.max_raise_per_bar, True
        elif desired < previous - cfg.max_cut_per_bar:
            desired, limited = previous - cfg.max_cut_per_bar, True
        steps = self._steps(min(max(desired, cfg.l_min), cfg.l_max))
        target_f = steps / 20
        if self.ref_price is None:
            outside_band = True
        else:
            actual = self._modelled(risk_price)
            outside_band = abs(actual - target_f) > cfg.rebalance_band * target_f
        rebalance = outside_band or owed
        if not rebalance and steps == self._target_steps:
            return None
        reasons = self.policy_reasons(regime)
        if owed and self._clamp_reason() not in reasons:
            reasons.append(self._clamp_reason())
        if limited:
            reasons.append(Reason.RATE_LIMITED)
        if outside_band:
            reasons.append(Reason.OUTSIDE_BAND)
        return self._decide(
            ts_ns, price, risk_price, to_target(target_f), rebalance, False, reasons
        )

    def on_tick(
        self, ts_ns: int, price: Decimal, risk_price: float
    ) -> LeverageTargetChanged | None:
        if self.ref_price is None:
            # The first price seen: build the position at the current target, and anchor
            # the emergency rules there.
            return self._decide(
                ts_ns, price, risk_price, self.target_value, True, False, [Reason.FIRST_PRICE]
            )
        if risk_price <= self._trigger if self._is_long else risk_price >= self._trigger:
            return self._emergency(ts_ns, price, risk_price)  # first, new bounds or not
        if self._bounds_moved is not None and self._owed(risk_price):
            # the books sit outside new bounds (restore): rebalanced into them once
            return self._decide(
                ts_ns, price, risk_price, self.target_value, True, False, [self._clamp_reason()]
            )
        return None

    def _owed(self, risk_price: float) -> bool:
        """Whether the books a release's new bounds left outside them still are (a move
        may have carried them back inside: then nothing is owed any more)."""
        if self._outside_bounds(risk_price):
            return True
        self._bounds_moved = None
        return False

    def _clamp_reason(self) -> str:
        assert self._bounds_moved is not None
        return Reason.CLAMPED_MAX if self._bounds_moved[0] > 0 else Reason.CLAMPED_MIN

    def _emergency(self, ts_ns: int, price: Decimal, risk_price: float) -> LeverageTargetChanged:
        cfg = self.config
        if risk_price <= self._adverse if self._is_long else risk_price >= self._adverse:
            cut = float(self.target_value) * cfg.emergency_cut
            # a target a raise left above the books (inside the band) cut by a mild
            # `emergency_cut` can still be above them: a deleverage never buys more
            books = self._modelled(risk_price)
            if books < cut:
                cut = math.floor(books * 20) / 20
            target = to_target(max(cfg.l_min, cut))
            reason = Reason.EMERGENCY_ADVERSE_MOVE
        else:
            target, reason = self.target_value, Reason.EMERGENCY_LEVERAGE_CEILING
        return self._decide(ts_ns, price, risk_price, target, True, True, [reason])

    def _decide(
        self,
        ts_ns: int,
        price: Decimal,
        risk_price: float,
        target: Decimal,
        rebalance: bool,
        emergency: bool,
        reasons: list[str],
    ) -> LeverageTargetChanged:
        previous = self.target_value
        if rebalance and self._bounds_moved is not None:
            # whatever rebalances brings the books inside the bounds; the target published
            # before them is the snapshot's, not the one restore brought inside them
            previous, self._bounds_moved = self._bounds_moved[1], None
        self._set_target(target)
        if rebalance:
            self._rebalanced_at(risk_price, float(target))
        return LeverageTargetChanged(
            product=self.product,
            side=self.side,
            ts_ns=ts_ns,
            price=price,
            target=target,
            previous_target=previous,
            rebalance=rebalance,
            emergency=emergency,
            reasons=tuple(reasons),
            regime=str(self._regime),
            anchor=risk_price if rebalance else None,
        )

    def _rebalanced_at(self, price: float, lev: float, drawn: float = 0.0) -> None:
        """Remember the rebalance and precompute the one price that triggers an emergency."""
        self.ref_price = price
        self.ref_leverage = lev
        self._drawn = drawn
        self._set_triggers()

    def _set_triggers(self) -> None:
        """The one price that triggers an emergency: the adverse move since the rebalance,
        or the price where the model (funding paid included) passes the ceiling."""
        cfg = self.config
        price, lev, drawn = self.ref_price, self.ref_leverage, self._drawn
        assert price is not None
        ceiling = cfg.leverage_ceiling
        # One adverse price, computed once, decides both whether and why an emergency fires.
        move = Decimal(repr(cfg.emergency_move)) * self.side
        adverse = self._adverse = float(Decimal(repr(price)) * (1 - move))
        if self._is_long:
            # model_leverage > ceiling  <=>  x < C(L+d-1) / (L(C-1)), only when L+d > 1
            at_ceiling = price * ceiling * (lev + drawn - 1.0) / (lev * (ceiling - 1.0))
            self._trigger = max(adverse, at_ceiling)
        else:
            # model_leverage > ceiling  <=>  x > C(1+L-d) / (L(1+C))
            at_ceiling = price * ceiling * (1.0 + lev - drawn) / (lev * (1.0 + ceiling))
            self._trigger = min(adverse, at_ceiling)

    def on_funding(self, rate: float, mark: float) -> None:
        """A settlement moves the books' leverage though the price did not: the band and
        the ceiling rules watch the model with what it drew (`funding_drawn`)."""
        if self.ref_price is None or mark <= 0:
            return
        self._drawn += funding_drawn(self.side, self.ref_leverage, self.ref_price, mark, rate)
        self._set_triggers()

    def snapshot(self) -> dict[str, object]:
        # while a rebalance into new bounds is owed, the target last published (restore
        # brings it inside them again), so the owed decision names it whenever it comes
        owed = self._bounds_moved
        return {
            "v": 1,
            "target": str(self.target_value if owed is None else owed[1]),
            "ref_price": self.ref_price,
            "ref_leverage": self.ref_leverage,
            "drawn": self._drawn,
            "regime": self._regime,
        }

    @classmethod
    def restore(
        cls, product: str, side: Side, config: LeverageConfig, snapshot: dict[str, object]
    ) -> SmartLeverageController:
        """The controller as `snapshot` left it; a target outside this configuration's
        [l_min, l_max] (a release that moved them) is brought inside them (hedging refuses
        any target outside them, and with it every market event that carries one). Books
        last rebalanced outside them and still outside them at the next tick are
        rebalanced then (CLAMPED_MAX or CLAMPED_MIN), unless a bar's decision rebalanced
        them first. That is read from the leverage of the last rebalance, which a
        snapshot keeps until the next: a marker kept in memory alone was lost with the
        first snapshot written before the tick."""
        controller = cls(product, side, config)
        target = stored = Decimal(str(snapshot["target"]))
        if not config.l_min <= float(target) <= config.l_max:
            target = to_target(config.l_max if float(target) > config.l_max else config.l_min)
        controller._set_target(target)
        controller._regime = str(snapshot["regime"])
        ref_price, ref_leverage = snapshot["ref_price"], snapshot["ref_leverage"]
        if ref_price is not None:
            assert isinstance(ref_price, float) and isinstance(ref_leverage, float)
            drawn = snapshot.get("drawn", 0.0)  # none in a snapshot from before funding
            assert isinstance(drawn, int | float)
            controller._rebalanced_at(ref_price, ref_leverage, float(drawn))
            if not config.l_min <= ref_leverage <= config.l_max:
                controller._bounds_moved = (1 if ref_leverage > config.l_max else -1, stored)
        return controller

    def _outside_bounds(self, risk_price: float) -> bool:
        """Whether the books, last rebalanced outside the bounds, are still outside them
        at `risk_price` (the price may have carried them back in since)."""
        return not self.config.l_min <= self._modelled(risk_price) <= self.config.l_max

    def _modelled(self, risk_price: float) -> float:
        """The books' leverage at `risk_price` as modelled since the last rebalance: the
        price's move and what funding drew."""
        assert self.ref_price is not None
        return model_leverage(self.side, self.ref_leverage, self.ref_price, risk_price, self._drawn)


class FixedLeverageController:
    """A benchmark leveraged token: constant leverage, rebalanced once per UTC day."""

    __slots__ = ("_day", "product", "side", "target_value")

    def __init__(self, product: str, side: Side, leverage: Decimal) -> None:
        self.product = product
        self.side = side
        self.target_value = leverage
        self._day: int | None = None

    @property
    def target(self) -> Decimal:
        return self.target_value

    def on_funding(self, rate: float, mark: float) -> None:
        """Nothing to model: a benchmark rebalances on its daily schedule only."""

    def on_bar(
        self, ts_ns: int, price: Decimal, risk_price: float, regime: RegimeState | None
    ) -> LeverageTargetChanged | None:
        if self._day == ts_ns // NS_PER_DAY:
            return None
        self._day = ts_ns // NS_PER_DAY
        return LeverageTargetChanged(
            product=self.product,
            side=self.side,
            ts_ns=ts_ns,
            price=price,
            target=self.target_value,
            previous_target=self.target_value,
            rebalance=True,
            emergency=False,
            reasons=(Reason.FIXED_SCHEDULE,),
            regime="",
        )

    def on_tick(
        self, ts_ns: int, price: Decimal, risk_price: float
    ) -> LeverageTargetChanged | None:
        if self._day is None:
            return self.on_bar(ts_ns, price, risk_price, None)
        return None

    def snapshot(self) -> dict[str, object]:
        return {"v": 1, "day": self._day}

    @classmethod
    def restore(
        cls, product: str, side: Side, leverage: Decimal, snapshot: dict[str, object]
    ) -> FixedLeverageController:
        controller = cls(product, side, leverage)
        day = snapshot["day"]
        controller._day = day if isinstance(day, int) else None
        return controller
