"""The venue service over gRPC: wire <-> core conversions and `RemoteVenue`, the core
`Venue` protocol as a synchronous client (the Engine calls its venue synchronously).

Idempotency without the engine's help. The Engine passes no ids, so the caller names the
event first, `venue.begin("BTC-USDT:42")`, and the client numbers every call the engine
makes within it: `BTC-USDT:42:0`, `BTC-USDT:42:1`, ... The engine is deterministic, so the
same event re-run from the same state after a crash makes the same calls with the same
ids, and the venue answers them from its record instead of applying them again.

The client mirrors the account from every reply in a local `PerpVenue`, so `position`,
`wallet`, `pnl` and `at_risk` (the very same float pre-check as the simulator) need no
call. The mirror is part of the caller's persisted state (`state()` / `restore()`): a
re-run must start from the account as it was before the event, not as the venue has it
after a half-applied one.
"""

from __future__ import annotations

import json
from decimal import Decimal

import grpc
from smartlev.v1 import venue_pb2, venue_pb2_grpc

from shared.codec import decimal_from_wire, decimal_to_wire
from shared.core.events import AccountLiquidated, OrderFilled
from shared.core.money import ZERO
from shared.core.venue import InstrumentSpec, Liquidity, PerpVenue, VenueConfig

LIQUIDITY_TO_WIRE = {
    Liquidity.TAKER: venue_pb2.LIQUIDITY_TAKER,
    Liquidity.MAKER: venue_pb2.LIQUIDITY_MAKER,
}
LIQUIDITY_FROM_WIRE = {wire: core for core, wire in LIQUIDITY_TO_WIRE.items()}

# Retrying is safe: every mutating call carries its idempotency id.
_RETRY_CONFIG = json.dumps(
    {
        "methodConfig": [
            {
                "name": [{"service": "smartlev.v1.Venue"}],
                "retryPolicy": {
                    "maxAttempts": 5,
                    "initialBackoff": "0.1s",
                    "maxBackoff": "2s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    }
)

_ACCOUNT_DECIMALS = (
    "wallet",
    "position",
    "transfers_in",
    "fees_paid",
    "funding_paid",
    "insurance_fund",
)
_WALK_DECIMALS = ("walk_bought", "walk_sold")


# --------------------------------------------------------------------------- conversions


def account_to_wire(venue: PerpVenue) -> venue_pb2.VenueAccount:
    return venue_pb2.VenueAccount(
        symbol=venue.spec.symbol,
        liquidations=venue.liquidations,
        walk_ts_ns=venue.walk_ts,
        **{
            name: decimal_to_wire(getattr(venue, name), name=name)
            for name in (*_ACCOUNT_DECIMALS, *_WALK_DECIMALS)
        },
    )


def account_from_wire(
    message: venue_pb2.VenueAccount, spec: InstrumentSpec, config: VenueConfig
) -> PerpVenue:
    """A local PerpVenue holding the account state of a reply (for the client's mirror)."""
    if message.symbol != spec.symbol:
        raise ValueError(f"venue answered for {message.symbol!r}, expected {spec.symbol!r}")
    snapshot: dict[str, object] = {
        name: decimal_from_wire(getattr(message, name), name=name) for name in _ACCOUNT_DECIMALS
    }
    snapshot["liquidations"] = int(message.liquidations)
    # a venue from before the walk sends none: 0 and ""
    snapshot["walk_ts"] = message.walk_ts_ns
    for name in _WALK_DECIMALS:
        snapshot[name] = decimal_from_wire(getattr(message, name) or "0", name=name)
    return PerpVenue.restore(spec, config, snapshot)


def fill_to_wire(fill: OrderFilled) -> venue_pb2.OrderFilled:
    return venue_pb2.OrderFilled(
        symbol=fill.symbol,
        ts_event_ns=fill.ts_ns,
        qty=decimal_to_wire(fill.qty, name="qty"),
        price=decimal_to_wire(fill.price, name="price"),
        fee=decimal_to_wire(fill.fee, name="fee"),
        liquidity=LIQUIDITY_TO_WIRE[Liquidity(fill.liquidity)],
    )


def fill_from_wire(message: venue_pb2.OrderFilled) -> OrderFilled:
    return OrderFilled(
        symbol=message.symbol,
        ts_ns=message.ts_event_ns,
        qty=decimal_from_wire(message.qty, name="qty"),
        price=decimal_from_wire(message.price, name="price"),
        fee=decimal_from_wire(message.fee, name="fee"),
        liquidity=LIQUIDITY_FROM_WIRE[message.liquidity].value,
    )


def liquidation_to_wire(event: AccountLiquidated) -> venue_pb2.AccountLiquidated:
    return venue_pb2.AccountLiquidated(
        symbol=event.symbol,
        ts_event_ns=event.ts_ns,
        mark_price=decimal_to_wire(event.mark_price, name="mark_price"),
        equity=decimal_to_wire(event.equity, name="equity"),
        maintenance_margin=decimal_to_wire(event.maintenance_margin, name="maintenance_margin"),
        closed_qty=decimal_to_wire(event.closed_qty, name="closed_qty"),
        penalty=decimal_to_wire(event.penalty, name="penalty"),
        deficit_covered=decimal_to_wire(event.deficit_covered, name="deficit_covered"),
    )


def liquidation_from_wire(message: venue_pb2.AccountLiquidated) -> AccountLiquidated:
    return AccountLiquidated(
        symbol=message.symbol,
        ts_ns=message.ts_event_ns,
        mark_price=decimal_from_wire(message.mark_price, name="mark_price"),
        equity=decimal_from_wire(message.equity, name="equity"),
        maintenance_margin=decimal_from_wire(message.maintenance_margin, name="maintenance_margin"),
        closed_qty=decimal_from_wire(message.closed_qty, name="closed_qty"),
        penalty=decimal_from_wire(message.penalty, name="penalty"),
        deficit_covered=decimal_from_wire(message.deficit_covered, name="deficit_covered"),
    )


# --------------------------------------------------------------------------- the client


def venue_channel(target: str) -> grpc.Channel:
    """A synchronous channel to the venue that retries UNAVAILABLE (ids make it safe)."""
    return grpc.insecure_channel(
        target, options=[("grpc.enable_retries", 1), ("grpc.service_config", _RETRY_CONFIG)]
    )


class RemoteVenue:
    """One symbol's venue account behind the venue service; see the module doc."""

    def __init__(
        self,
        channel: grpc.Channel,
        spec: InstrumentSpec,
        config: VenueConfig,
        *,
        timeout_s: float = 10.0,
    ) -> None:
        self.spec = spec
        self.config = config
        self.timeout_s = timeout_s
        self._stub = venue_pb2_grpc.VenueStub(channel)
        self._mirror = PerpVenue(spec, config)
        self._event: str | None = None
        self._calls = 0
        self.calls_made = 0  # by this client, over all events

    # ---- call naming

    def begin(self, event_key: str) -> None:
        """Name the next engine call's event; its venue calls get ids `<event_key>:<n>`."""
        if not event_key:
            raise ValueError("event key must be non-empty")
        self._event = event_key
        self._calls = 0

    def _next_id(self) -> str:
        if self._event is None:
            raise RuntimeError("RemoteVenue: call begin(event_key) before changing the account")
        call_id = f"{self._event}:{self._calls}"
        self._calls += 1
        self.calls_made += 1
        return call_id

    # ---- mirror

    def sync(self) -> None:
        """Mirror the account as the venue has it now (a fresh start with no saved state)."""
        reply = self._stub.GetAccount(
            venue_pb2.GetAccountRequest(symbol=self.spec.symbol),
            timeout=self.timeout_s,
            wait_for_ready=True,
        )
        self._mirror = account_from_wire(reply, self.spec, self.config)

    def state(self) -> dict[str, object]:
        return self._mirror.snapshot()

    def restore(self, snapshot: dict[str, object]) -> None:
        self._mirror = PerpVenue.restore(self.spec, self.config, snapshot)

    def _mirror_reply(self, account: venue_pb2.VenueAccount) -> None:
        self._mirror = account_from_wire(account, self.spec, self.config)

    # ---- the Venue protocol

    @property
    def position(self) -> Decimal:
        return self._mirror.position

    @property
    def wallet(self) -> Decimal:
        return self._mirror.wallet

    def pnl(self, mark: Decimal) -> Decimal:
        return self._mirror.pnl(mark)

    def at_risk(self, mark_f: float) -> bool:
        return self._mirror.at_risk(mark_f)

    def quote(
        self,
        qty: Decimal,
        reference: Decimal,
        liquidity: Liquidity = Liquidity.TAKER,
        taken: Decimal = ZERO,
    ) -> tuple[Decimal, Decimal]:
        """The venue service fills by the same rules and configuration as the mirror."""
        return self._mirror.quote(qty, reference, liquidity, taken)

    def walked(self, ts_ns: int, buying: bool) -> Decimal:
        return self._mirror.walked(ts_ns, buying)

    def transfer(self, amount: Decimal) -> None:
        request = venue_pb2.TransferRequest(
            symbol=self.spec.symbol,
            transfer_id=self._next_id(),
            amount=decimal_to_wire(amount, name="amount"),
        )
        reply = self._stub.Transfer(request, timeout=self.timeout_s, wait_for_ready=True)
        self._mirror_reply(reply.account)

    def execute(
        self,
        ts_ns: int,
        qty: Decimal,
        reference: Decimal,
        liquidity: Liquidity = Liquidity.TAKER,
        mark: Decimal | None = None,
    ) -> OrderFilled:
        judged = "" if mark is None else decimal_to_wire(mark, name="mark")
        request = venue_pb2.SubmitOrderRequest(
            symbol=self.spec.symbol,
            client_order_id=self._next_id(),
            qty=decimal_to_wire(qty, name="qty"),
            reference_price=decimal_to_wire(reference, name="reference_price"),
            liquidity=LIQUIDITY_TO_WIRE[liquidity],
            ts_event_ns=ts_ns,
            mark_price=judged,
        )
        reply = self._stub.SubmitOrder(request, timeout=self.timeout_s, wait_for_ready=True)
        self._mirror_reply(reply.account)
        return fill_from_wire(reply.fill)

    def settle_funding(self, rate: Decimal, mark: Decimal) -> Decimal:
        request = venue_pb2.SettleFundingRequest(
            symbol=self.spec.symbol,
            settlement_id=self._next_id(),
            rate=decimal_to_wire(rate, name="rate"),
            mark_price=decimal_to_wire(mark, name="mark_price"),
        )
        reply = self._stub.SettleFunding(request, timeout=self.timeout_s, wait_for_ready=True)
        self._mirror_reply(reply.account)
        return decimal_from_wire(reply.amount, name="amount")

    def check_liquidation(self, ts_ns: int, mark: Decimal) -> AccountLiquidated | None:
        request = venue_pb2.CheckLiquidationRequest(
            symbol=self.spec.symbol,
            check_id=self._next_id(),
            mark_price=decimal_to_wire(mark, name="mark_price"),
            ts_event_ns=ts_ns,
        )
        reply = self._stub.CheckLiquidation(request, timeout=self.timeout_s, wait_for_ready=True)
        self._mirror_reply(reply.account)
        return liquidation_from_wire(reply.liquidated) if reply.HasField("liquidated") else None
