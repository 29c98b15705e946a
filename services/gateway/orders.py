"""The gateway's pure part: request validation, ids, quotes and position arithmetic.

No I/O: the servicer (main.py) reads the NAV and the ledger, calls these, and writes the
result in one atomic step (ledger.py). Quotes use the core's `issue_terms` /
`redeem_terms`, the same formulas hedging applies to the books, so the units and payout
the gateway promises are exactly what the books record.

Cost basis: a position's `cost` starts at the amount paid (fee included); a partial
close takes `cost x units_closed / units_held` (to 1e-8, half-even), a full close takes
what is left, so the costs of all closes sum exactly to the amount paid.
Realized PnL of a close = payout - cost taken.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Decimal
from typing import NamedTuple

import grpc
from smartlev.v1 import gateway_pb2

from shared.codec import POSITION_ID, decimal_to_wire
from shared.core.accounting import issue_terms, redeem_terms
from shared.core.money import USDT_QUANTUM, ZERO, MoneyError, usdt_down
from shared.core.text import clipped
from shared.serving import Rejected

CLIENT_ORDER_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
# Plain decimal text only: no sign, exponent, NaN, infinity or whitespace; bounded length.
PLAIN_DECIMAL = re.compile(r"[0-9]{1,30}(\.[0-9]{1,30})?")


def invalid(message: str) -> Rejected:
    return Rejected(grpc.StatusCode.INVALID_ARGUMENT, message)


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    min_order: Decimal
    max_order: Decimal
    amount_decimals: int
    units_decimals: int


def client_order_id(text: str) -> str:
    if not CLIENT_ORDER_ID.fullmatch(text):
        raise invalid(
            f"client_order_id: {clipped(text)!r} must be 1..64 characters of [A-Za-z0-9_-]"
        )
    return text


def position_id(text: str) -> str:
    if not POSITION_ID.fullmatch(text):
        raise invalid(
            f"position_id: {clipped(text)!r} is not a position id (32 lowercase hex digits)"
        )
    return text


def decimal_arg(text: str, name: str, decimals: int) -> Decimal:
    """A positive plain decimal with at most `decimals` places, or INVALID_ARGUMENT."""
    if not text:
        raise invalid(f"{name} is required")
    quoted = clipped(text, 40)
    if text.strip().lower().lstrip("+-") in {"nan", "snan", "inf", "infinity"}:
        raise invalid(f"{name}: {quoted!r} is not a finite number")
    if text.startswith("-"):
        raise invalid(f"{name}: must be > 0, got {quoted}")
    if not PLAIN_DECIMAL.fullmatch(text):
        raise invalid(f"{name}: {quoted!r} is not a plain decimal number (e.g. 100.5)")
    value = Decimal(text)
    if value <= 0:
        raise invalid(f"{name}: must be > 0, got {text}")
    fraction = text.partition(".")[2]
    if len(fraction) > decimals:
        if len(fraction.rstrip("0")) > decimals:
            raise invalid(f"{name}: {text} has more than {decimals} decimal places")
        # trailing zeros past them: the same number, written as the product's precision
        # (carried as given, 30 places went into the position, the ledger and the books)
        value = value.quantize(Decimal(1).scaleb(-decimals))
    return value


def order_amount(text: str, limits: Limits) -> Decimal:
    amount = decimal_arg(text, "amount_usdt", limits.amount_decimals)
    if amount < limits.min_order:
        raise invalid(f"amount_usdt: {text} is below the minimum order of {limits.min_order}")
    if amount > limits.max_order:
        raise invalid(f"amount_usdt: {text} is above the maximum order of {limits.max_order}")
    return amount


def close_units(text: str, close_all: bool, limits: Limits) -> Decimal | None:
    """The units to redeem, or None for all of them."""
    if close_all and text:
        raise invalid("give either units or all, not both")
    if close_all:
        return None
    if not text:
        raise invalid("units is required (or set all to close the whole position)")
    return decimal_arg(text, "units", limits.units_decimals)


PAGE_SIZE = 100  # positions per ListPositions page when the request names none
MAX_PAGE_SIZE = 1000


def page_size(requested: int) -> int:
    """A request's page size: 0 is the default, above the maximum is the maximum."""
    if requested < 0:
        raise invalid(f"page_size: must be 0 (the default) or more, got {requested}")
    return min(requested or PAGE_SIZE, MAX_PAGE_SIZE)


def page_token(include_closed: bool, last: str) -> str:
    """Where the page after the one ending at position `last` starts (opaque to clients)."""
    return f"{'all' if include_closed else 'open'}.{last}"


def page_start(token: str, include_closed: bool) -> str | None:
    """The position id a page starts after (None: the first page), from `page_token`."""
    if not token:
        return None
    kind, _, last = token.partition(".")
    if kind not in {"all", "open"} or not POSITION_ID.fullmatch(last):
        raise invalid(f"page_token: {clipped(token)!r} is not a token from a ListPositions reply")
    if (kind == "all") != include_closed:
        raise invalid(
            f"page_token: it continues a listing with include_closed={kind == 'all'}, "
            f"not {include_closed}"
        )
    return last


def canonical(value: Decimal) -> str:
    """One text per number ("100" == "100.00"), for request hashes."""
    return format(value.normalize(), "f") if value else "0"


def order_id(user: str, client_id: str) -> str:
    """Deterministic, so a retry after a crash names the same order and position."""
    return hashlib.sha256(f"{user}\0{client_id}".encode()).hexdigest()[:32]


def request_hash(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:32]


# --------------------------------------------------------------------------- positions


class PositionState(NamedTuple):
    """A position as stored (exact decimals); `nav`-dependent figures are computed. (The
    order path's values are NamedTuples: a frozen dataclass's __init__ sets each field
    through object.__setattr__, several times slower, on every order.)"""

    position_id: str
    user: str
    product: str
    units: Decimal
    units_opened: Decimal
    entry_nav: Decimal
    amount: Decimal
    cost: Decimal
    realized_pnl: Decimal
    payout: Decimal
    fees: Decimal
    ts_opened_ns: int
    ts_closed_ns: int

    @classmethod
    def from_fields(cls, fields: dict[str, str]) -> PositionState:
        return cls(
            position_id=fields["position_id"],
            user=fields["user"],
            product=fields["product"],
            units=Decimal(fields["units"]),
            units_opened=Decimal(fields["units_opened"]),
            entry_nav=Decimal(fields["entry_nav"]),
            amount=Decimal(fields["amount"]),
            cost=Decimal(fields["cost"]),
            realized_pnl=Decimal(fields["realized_pnl"]),
            payout=Decimal(fields["payout"]),
            fees=Decimal(fields["fees"]),
            ts_opened_ns=int(fields["ts_opened_ns"]),
            ts_closed_ns=int(fields["ts_closed_ns"]),
        )

    def fields(self) -> dict[str, str]:
        """As stored and as the proto carries them: exact decimals as wire text."""
        return {
            "position_id": self.position_id,
            "user": self.user,
            "product": self.product,
            "units": decimal_to_wire(self.units),
            "units_opened": decimal_to_wire(self.units_opened),
            "entry_nav": decimal_to_wire(self.entry_nav),
            "amount": decimal_to_wire(self.amount),
            "cost": decimal_to_wire(self.cost),
            "realized_pnl": decimal_to_wire(self.realized_pnl),
            "payout": decimal_to_wire(self.payout),
            "fees": decimal_to_wire(self.fees),
            "ts_opened_ns": str(self.ts_opened_ns),
            "ts_closed_ns": str(self.ts_closed_ns),
        }

    def to_proto(
        self, nav: Decimal | None, fields: dict[str, str] | None = None
    ) -> gateway_pb2.Position:
        """`fields`: this position's `fields()`, when the caller has them already."""
        text = self.fields() if fields is None else fields
        value = usdt_down(self.units * nav) if nav is not None else None
        return gateway_pb2.Position(
            position_id=self.position_id,
            product=self.product,
            units=text["units"],
            units_opened=text["units_opened"],
            entry_nav=text["entry_nav"],
            amount=text["amount"],
            cost=text["cost"],
            nav="" if nav is None else decimal_to_wire(nav),
            value="" if value is None else decimal_to_wire(value),
            unrealized_pnl="" if value is None else decimal_to_wire(value - self.cost),
            realized_pnl=text["realized_pnl"],
            payout=text["payout"],
            fees=text["fees"],
            open=self.units > 0,
            ts_opened_ns=self.ts_opened_ns,
            ts_closed_ns=self.ts_closed_ns,
        )


class Opened(NamedTuple):
    position: PositionState
    fee: Decimal
    units: Decimal
    nav: Decimal
    ts_ns: int


class Closed(NamedTuple):
    position: PositionState
    units: Decimal
    nav: Decimal
    gross: Decimal
    fee: Decimal
    payout: Decimal
    realized_pnl: Decimal
    ts_ns: int


def quote_open(
    *,
    pid: str,
    user: str,
    product: str,
    amount: Decimal,
    nav: Decimal,
    fee_rate: Decimal,
    ts_ns: int,
) -> Opened:
    try:
        fee, _, units = issue_terms(amount, nav, fee_rate)
    except MoneyError as exc:
        raise invalid(f"amount_usdt: {exc}") from None
    position = PositionState(
        position_id=pid,
        user=user,
        product=product,
        units=units,
        units_opened=units,
        entry_nav=nav,
        amount=amount,
        cost=amount,
        realized_pnl=ZERO,
        payout=ZERO,
        fees=fee,
        ts_opened_ns=ts_ns,
        ts_closed_ns=0,
    )
    return Opened(position, fee, units, nav, ts_ns)


def quote_close(
    position: PositionState,
    units: Decimal | None,
    nav: Decimal,
    fee_rate: Decimal,
    ts_ns: int,
    *,
    min_order: Decimal,
) -> Closed:
    """Redeem `units` (None: all) of an open position at `nav`. Closing part of it takes
    at least `min_order`'s worth (as opening does) and leaves at least as much, so a
    position is neither sold off in closes that pay nothing nor left as dust that costs
    more to hedge than it is worth; closing all of it is always allowed, whatever it is
    worth (a position whose NAV fell is never stranded)."""
    if position.units <= 0:
        raise Rejected(
            grpc.StatusCode.FAILED_PRECONDITION, f"position {position.position_id} is closed"
        )
    redeemed = position.units if units is None else units
    if redeemed > position.units:
        raise Rejected(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"units: cannot close {redeemed}, the position holds {position.units}",
        )
    try:
        gross, fee = redeem_terms(redeemed, nav, fee_rate)
    except MoneyError as exc:
        raise invalid(f"units: {exc}") from None
    left = position.units - redeemed
    if left and gross < min_order:
        raise Rejected(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"units: {redeemed} are worth {gross} USDT at NAV {nav}, below the minimum order "
            f"of {min_order}; close more of the position, or all of it",
        )
    if left and (kept := usdt_down(left * nav)) < min_order:
        raise Rejected(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"units: closing {redeemed} leaves {left} worth {kept} USDT at NAV {nav}, below "
            f"the minimum order of {min_order}; close all of it, or less",
        )
    payout = gross - fee
    cost = (
        position.cost
        if left == 0
        else (position.cost * redeemed / position.units).quantize(USDT_QUANTUM, ROUND_HALF_EVEN)
    )
    pnl = payout - cost
    after = position._replace(
        units=left,
        cost=position.cost - cost,
        realized_pnl=position.realized_pnl + pnl,
        payout=position.payout + payout,
        fees=position.fees + fee,
        ts_closed_ns=ts_ns if left == 0 else 0,
    )
    return Closed(after, redeemed, nav, gross, fee, payout, pnl, ts_ns)
