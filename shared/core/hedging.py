"""Netting: one venue order per underlying for all products' requested changes.

A long product buying while a short product sells trades only the difference. Fees and
slippage are paid on the net trade and attributed pro rata to the products' requested
changes; each product's position changes by exactly what it asked for, valued at the
reference price, so per-product PnL sums exactly to the venue account's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal

from pydantic import BaseModel, ConfigDict, Field

from shared.core.events import HedgeAllocation, HedgeExecuted
from shared.core.money import ZERO, allocate, to_step
from shared.core.venue import Liquidity, Venue


class HedgingConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    max_slice_notional: Decimal = Field(
        Decimal("2000000"), gt=0, description="Largest notional sent as one venue order."
    )
    liquidity: Liquidity = Field(
        Liquidity.TAKER, description="TAKER: market orders. MAKER: passive, filled at reference."
    )


@dataclass(frozen=True, slots=True)
class PositionChange:
    """A product's requested change of its virtual position, in whole lots."""

    product: str
    qty: Decimal


def plan_slices(net: Decimal, price: Decimal, lot: Decimal, max_notional: Decimal) -> list[Decimal]:
    """Equal slices of whole lots, each at most `max_notional`, summing exactly to `net`."""
    lots = int(abs(net) / lot)
    lots_per_slice = max(1, int(max_notional / (lot * price)))
    count = max(1, -(-lots // lots_per_slice))
    sign = 1 if net > 0 else -1
    base, extra = divmod(lots, count)
    return [sign * (base + (1 if i < extra else 0)) * lot for i in range(count)]


def netted_cost(
    venue: Venue, ts_ns: int, net: Decimal, reference: Decimal, config: HedgingConfig
) -> Decimal:
    """The fees and slippage `execute_netted` would pay for a net trade of `net` (whole
    lots) at `ts_ns`, slice by slice, each walking the book on from the one before."""
    cost = ZERO
    taken = venue.walked(ts_ns, net > 0)
    for qty in plan_slices(net, reference, venue.spec.lot_step, config.max_slice_notional):
        if qty:
            price, fee = venue.quote(qty, reference, config.liquidity, taken)
            cost += qty * (price - reference) + fee
            taken += abs(qty) * reference
    return cost


def execute_netted(
    venue: Venue,
    ts_ns: int,
    changes: Sequence[PositionChange],
    reference: Decimal,
    config: HedgingConfig,
    mark: Decimal | None = None,
    slices: Sequence[Decimal] | None = None,
) -> HedgeExecuted:
    """One netted order for `changes`, in `slices` (default: `plan_slices` of the net),
    its fills' costs allocated to the products by size."""
    lot = venue.spec.lot_step
    for change in changes:
        if change.qty != to_step(change.qty, lot):
            raise ValueError(f"{change.product}: {change.qty} is not a whole number of lots")
    net = sum((c.qty for c in changes), ZERO)
    if slices is None:
        slices = plan_slices(net, reference, lot, config.max_slice_notional) if net else ()
    elif sum(slices, ZERO) != net:
        raise ValueError(f"slices {list(slices)} do not add up to the net change {net}")
    fills = tuple(venue.execute(ts_ns, qty, reference, config.liquidity, mark) for qty in slices)
    cost = sum((f.qty * f.price for f in fills), ZERO)
    fees = sum((f.fee for f in fills), ZERO)
    weights = [abs(c.qty) for c in changes]
    slippage_parts = allocate(cost - net * reference, weights)
    fee_parts = allocate(fees, weights)
    allocations = tuple(
        HedgeAllocation(c.product, c.qty, c.qty * reference, slip, fee)
        for c, slip, fee in zip(changes, slippage_parts, fee_parts, strict=True)
    )
    return HedgeExecuted(venue.spec.symbol, ts_ns, reference, net, fills, allocations)
