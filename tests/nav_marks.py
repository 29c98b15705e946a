"""A product's NAV hash as the NAV service writes it, for the tests and benchmarks that
run the gateway without the stages in front of it. Built by the NAV service's own
`state_fields` and key layout, so a change to what it writes reaches them too."""

from __future__ import annotations

import time
from decimal import Decimal

from smartlev.v1 import common_pb2

from services.nav.marking import FillsEvent, Marked, state_fields
from shared.redis_store import field_to_wire, key

TS_EVENT_NS = 1_700_000_000_000_000_000  # 2023-11-14: the tick the mark stands for


def nav_hash(
    namespace: str,
    product: str,
    nav: Decimal,
    *,
    units: Decimal = Decimal(0),
    age_s: float = 0.0,
    price: Decimal = Decimal(50000),
    target: Decimal = Decimal(1),
    leverage: Decimal = Decimal(1),
    regime: common_pb2.Regime.ValueType = common_pb2.RANGE,
    reasons: str = "",
    seq: int = 1,
    advanced: Decimal = Decimal(0),
) -> tuple[str, dict[str, str]]:
    """The key and fields of `product`'s mark at `nav`, priced and written `age_s` ago: the
    gateway trades on a mark younger than its max_nav_age_s, or on any mark while no
    units are out (here or in its ledger)."""
    marked = Marked(
        product=product,
        price=price,
        equity=nav * units,
        units=units,
        nav=nav,
        leverage=leverage,
        target=target,
        qty=Decimal(0),
        advanced=advanced,
    )
    event = FillsEvent(
        kind="tick",
        event_id=f"mark-{seq}",
        symbol=product.partition(":")[0],
        seq=seq,
        ts_event_ns=TS_EVENT_NS,
        ts_init_ns=TS_EVENT_NS,
        price=price,
        regime=regime,
        books=(),
        reasons=((product, reasons),) if reasons else (),
    )
    priced_ns = time.time_ns() - int(age_s * 1e9)
    fields = state_fields(marked, event, seq, priced_ns)
    return key(f"{namespace}nav", product), {
        name: field_to_wire(value, name) for name, value in fields.items()
    }
