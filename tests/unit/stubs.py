"""Factory helpers for unit tests of the pure core (in the spirit of NautilusTrader's
TestStubs): small, explicit builders so a test states only what it cares about."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

from shared.core.accounting import AccountingConfig, Books, ProductBook
from shared.core.market import Side
from shared.core.venue import InstrumentSpec, PerpVenue, VenueConfig

BTC = "BTC-USDT"
LONG = "BTC-USDT:LONG"
SHORT = "BTC-USDT:SHORT"


def d(value: str | int) -> Decimal:
    return Decimal(value)


def btc_spec(tick: str = "0.1", lot: str = "0.001") -> InstrumentSpec:
    """Binance BTCUSDT perp: price tick 0.1 USDT, lot 0.001 BTC."""
    return InstrumentSpec(BTC, Decimal(tick), Decimal(lot))


def venue_config(**overrides: Any) -> VenueConfig:
    return VenueConfig(**overrides)


def venue(
    spec: InstrumentSpec | None = None,
    config: VenueConfig | None = None,
    collateral: str | Decimal | None = None,
) -> PerpVenue:
    v = PerpVenue(spec or btc_spec(), config or venue_config())
    if collateral is not None:
        v.transfer(Decimal(collateral))
    return v


def venue_with(
    wallet: str | Decimal,
    position: str | Decimal,
    config: VenueConfig | None = None,
    spec: InstrumentSpec | None = None,
) -> PerpVenue:
    """A venue in a given state, built the way a restart builds it (through restore)."""
    snapshot = venue(spec, config).snapshot()
    snapshot["wallet"] = str(wallet)
    snapshot["position"] = str(position)
    return PerpVenue.restore(spec or btc_spec(), config or venue_config(), snapshot)


def product(name: str = LONG, side: Side = Side.LONG, **fields: Any) -> ProductBook:
    values = {k: Decimal(v) if isinstance(v, str | int) else v for k, v in fields.items()}
    return ProductBook(name, BTC, side, **values)


def books(*products: ProductBook, config: AccountingConfig | None = None) -> Books:
    if not products:
        products = (product(LONG, Side.LONG), product(SHORT, Side.SHORT))
    return Books(config or AccountingConfig(), products)


def json_round_trip(snapshot: dict[str, object]) -> dict[str, object]:
    result = json.loads(json.dumps(snapshot))
    assert isinstance(result, dict)
    return result
