"""Exact money: every balance, price and quantity is a `decimal.Decimal`.

Rounding rules, stated once:
- Balances (cash, equity, PnL, funding, fees) stay exact: sums and products of exact
  decimals are exact, so the books balance with zero difference, not "about zero".
- Amounts that leave the system or are split between products are rounded to the USDT
  minor unit (1e-8): fees and payouts ROUND_DOWN (never pay out more than is there),
  pro-rata splits by largest remainder so the parts sum exactly to the whole.
- NAV is rounded toward zero to 1e-8 USDT, so paying out units x NAV never takes more
  than the product's equity; product units are rounded down to 1e-8.
- Venue quantities are whole multiples of the instrument's lot step (rounded toward
  zero, so actual leverage never overshoots a target); fill prices are multiples of the
  price tick, rounded against the trader.
"""

from __future__ import annotations

import decimal
from collections.abc import Sequence
from decimal import ROUND_CEILING, ROUND_DOWN, ROUND_FLOOR, ROUND_HALF_EVEN, Decimal

# Enough digits that no product of a price, a quantity and a rate is ever rounded.
CONTEXT = decimal.Context(
    prec=60,
    rounding=ROUND_HALF_EVEN,
    traps=[decimal.InvalidOperation, decimal.DivisionByZero, decimal.Overflow],
)
decimal.setcontext(CONTEXT)
decimal.DefaultContext.prec = CONTEXT.prec

USDT_QUANTUM = Decimal("0.00000001")
NAV_QUANTUM = Decimal("0.00000001")
UNIT_QUANTUM = Decimal("0.00000001")
ZERO = Decimal(0)
ONE = Decimal(1)


class MoneyError(ValueError):
    """A value that cannot be money: not finite, not a number, or wrong sign."""


def to_decimal(value: str | int | Decimal, *, name: str = "value") -> Decimal:
    """Parse an exact decimal from text or int; floats are refused, they are not exact."""
    if isinstance(value, float):
        raise MoneyError(f"{name}: binary floats are not exact money; pass a string")
    try:
        result = value if isinstance(value, Decimal) else Decimal(value)
    except (decimal.InvalidOperation, TypeError, ValueError) as exc:
        raise MoneyError(f"{name}: {value!r} is not a decimal number") from exc
    if not result.is_finite():
        raise MoneyError(f"{name}: {value!r} is not finite")
    return result


def positive(value: str | int | Decimal, *, name: str = "value") -> Decimal:
    result = to_decimal(value, name=name)
    if result <= 0:
        raise MoneyError(f"{name}: must be > 0, got {result}")
    return result


def usdt_down(amount: Decimal) -> Decimal:
    """Round toward zero to the USDT minor unit (fees and payouts)."""
    return amount.quantize(USDT_QUANTUM, rounding=ROUND_DOWN)


def nav_of(equity: Decimal, units: Decimal) -> Decimal:
    return (equity / units).quantize(NAV_QUANTUM, rounding=ROUND_DOWN)


def units_down(units: Decimal) -> Decimal:
    return units.quantize(UNIT_QUANTUM, rounding=ROUND_DOWN)


def to_step(quantity: Decimal, step: Decimal) -> Decimal:
    """Round a signed quantity toward zero to a whole number of steps."""
    steps = (quantity / step).to_integral_value(rounding=ROUND_DOWN)
    return steps * step


def price_against(price: Decimal, tick: Decimal, buying: bool) -> Decimal:
    """Round a fill price to the tick, against the trader: buys up, sells down."""
    rounding = ROUND_CEILING if buying else ROUND_FLOOR
    return (price / tick).to_integral_value(rounding=rounding) * tick


def allocate(
    total: Decimal, weights: Sequence[Decimal], quantum: Decimal = USDT_QUANTUM
) -> list[Decimal]:
    """Split `total` pro rata to non-negative `weights`; the parts sum exactly to `total`.

    Each part is rounded toward zero to `quantum`; the leftover quanta go to the largest
    remainders (ties to the lower index), so the result is deterministic. Any part of
    `total` finer than `quantum` goes to the largest weight.
    """
    if len(weights) == 1:
        if weights[0] < 0:
            raise MoneyError("allocate: weights must be >= 0")
        return [total]
    if not weights:
        raise MoneyError("allocate: no weights")
    if any(w < 0 for w in weights):
        raise MoneyError("allocate: weights must be >= 0")
    weight_sum = sum(weights, ZERO)
    if weight_sum == 0:
        weights = [ONE] * len(weights)
        weight_sum = Decimal(len(weights))
    sign = -1 if total < 0 else 1
    magnitude = abs(total)
    whole = magnitude.quantize(quantum, rounding=ROUND_DOWN)
    dust = magnitude - whole
    exact = [whole * w / weight_sum for w in weights]
    parts = [e.quantize(quantum, rounding=ROUND_DOWN) for e in exact]
    leftover = int((whole - sum(parts, ZERO)) / quantum)
    order = sorted(range(len(weights)), key=lambda i: (-(exact[i] - parts[i]), i))
    for i in order[:leftover]:
        parts[i] += quantum
    largest = max(range(len(weights)), key=lambda i: (weights[i], -i))
    parts[largest] += dust
    return [sign * p for p in parts]
