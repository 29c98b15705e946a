"""Venue wire conversions (exact) and the client's id scheme, without a server."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st
from smartlev.v1 import venue_pb2

from services.venue.ledger import account_fields, fingerprint
from services.venue.main import Rejected, _decimal, _id
from shared.adapters.venue_client import (
    RemoteVenue,
    account_from_wire,
    account_to_wire,
    fill_from_wire,
    fill_to_wire,
    liquidation_from_wire,
    liquidation_to_wire,
)
from shared.codec import decimal_from_wire
from shared.core.config import StrategyConfig
from shared.core.events import AccountLiquidated, OrderFilled
from shared.core.venue import PerpVenue

CONFIG = StrategyConfig()
SPEC = CONFIG.instrument("BTC-USDT")
money = st.decimals(
    min_value=Decimal("-1e12"), max_value=Decimal("1e12"), places=12, allow_nan=False
)


@given(st.lists(money, min_size=6, max_size=6), st.integers(0, 2**40))
def test_account_round_trip_is_exact(values: list[Decimal], liquidations: int) -> None:
    names = ("wallet", "position", "transfers_in", "fees_paid", "funding_paid", "insurance_fund")
    snapshot: dict[str, object] = dict(zip(names, values, strict=True))
    snapshot["liquidations"] = liquidations
    venue = PerpVenue.restore(SPEC, CONFIG.venue, snapshot)
    back = account_from_wire(account_to_wire(venue), SPEC, CONFIG.venue)
    assert back.snapshot() == venue.snapshot()
    assert back.at_risk(1.0) == venue.at_risk(1.0)


@given(st.lists(money, min_size=6, max_size=6))
def test_the_account_hash_holds_plain_decimals_every_reader_takes(values: list[Decimal]) -> None:
    names = ("wallet", "position", "transfers_in", "fees_paid", "funding_paid", "insurance_fund")
    values[2] = Decimal("999.00000000") - Decimal("999.00000000")  # "0E-8" by str()
    snapshot: dict[str, object] = {**dict(zip(names, values, strict=True)), "liquidations": 3}
    venue = PerpVenue.restore(SPEC, CONFIG.venue, snapshot)
    fields = account_fields(venue)
    assert fields["transfers_in"] == "0.00000000"
    for name, value in zip(names, values, strict=True):
        assert decimal_from_wire(str(fields[name]), name=name) == value
    assert fields["liquidations"] == 3


def test_the_walk_crosses_the_wire_and_a_venue_without_it_sends_none() -> None:
    venue = PerpVenue(SPEC, CONFIG.venue)
    venue.transfer(Decimal("100000"))  # margins the 500,000 bought
    venue.execute(9, Decimal("12.5"), Decimal("40000"))
    venue.execute(9, Decimal("-0.5"), Decimal("40000"))
    back = account_from_wire(account_to_wire(venue), SPEC, CONFIG.venue)
    assert back.snapshot() == venue.snapshot()
    assert back.walked(9, True) == Decimal("500000") and back.walked(9, False) == 20000
    older = account_to_wire(venue)
    for name in ("walk_ts_ns", "walk_bought", "walk_sold"):
        older.ClearField(name)
    assert account_from_wire(older, SPEC, CONFIG.venue).walked(9, True) == 0


def test_account_for_another_symbol_is_refused() -> None:
    wire = account_to_wire(PerpVenue(CONFIG.instrument("ETH-USDT"), CONFIG.venue))
    with pytest.raises(ValueError, match="expected 'BTC-USDT'"):
        account_from_wire(wire, SPEC, CONFIG.venue)


@given(money, money, money, st.sampled_from(["TAKER", "MAKER"]), st.integers(0, 2**62))
def test_fill_round_trip_is_exact(
    qty: Decimal, price: Decimal, fee: Decimal, liq: str, ts: int
) -> None:
    fill = OrderFilled("BTC-USDT", ts, qty, price, fee, liq)
    assert fill_from_wire(fill_to_wire(fill)) == fill


@given(st.lists(money, min_size=6, max_size=6))
def test_liquidation_round_trip_is_exact(values: list[Decimal]) -> None:
    event = AccountLiquidated("BTC-USDT", 7, *values)
    assert liquidation_from_wire(liquidation_to_wire(event)) == event


@pytest.mark.parametrize("text", ["NaN", "inf", "1e5", "", " 1", "+1", "0x10"])
def test_non_plain_decimals_are_invalid_argument(text: str) -> None:
    with pytest.raises(Rejected) as err:
        _decimal(text, "qty")
    assert err.value.code is grpc.StatusCode.INVALID_ARGUMENT


def test_amounts_keep_at_most_30_significant_digits() -> None:
    """The account's sums keep 60: an amount of 80 (the wire's 40.40) was applied and
    recorded as another, rounded one."""
    assert _decimal("1" * 22 + "." + "1" * 8, "amount") == Decimal("1" * 22 + "." + "1" * 8)
    with pytest.raises(Rejected, match="more than 30 significant digits"):
        _decimal("1" * 22 + "." + "1" * 9, "amount")


def test_positive_and_id_checks() -> None:
    assert _decimal("0.5", "mark", positive=True) == Decimal("0.5")
    with pytest.raises(Rejected, match="must be > 0"):
        _decimal("0", "mark", positive=True)
    with pytest.raises(Rejected, match="check_id is required"):
        _id("  ", "check_id")


def test_fingerprint_tells_requests_apart() -> None:
    a = venue_pb2.SubmitOrderRequest(symbol="BTC-USDT", client_order_id="x", qty="1")
    b = venue_pb2.SubmitOrderRequest(symbol="BTC-USDT", client_order_id="x", qty="2")
    assert fingerprint("SubmitOrder", a) == fingerprint(
        "SubmitOrder", venue_pb2.SubmitOrderRequest.FromString(a.SerializeToString())
    )
    assert fingerprint("SubmitOrder", a) != fingerprint("SubmitOrder", b)
    assert fingerprint("SubmitOrder", a) != fingerprint("Transfer", a)


class FakeStub:
    """The venue's semantics in-process: a PerpVenue answering repeated ids from a record."""

    def __init__(self) -> None:
        self.venue = PerpVenue(SPEC, CONFIG.venue)
        self.replies: dict[str, Any] = {}
        self.ids: list[str] = []
        self.marks: list[str] = []  # each order's mark_price as sent

    def _once(self, call_id: str, make: Any) -> Any:
        self.ids.append(call_id)
        if call_id not in self.replies:
            self.replies[call_id] = make()
        return self.replies[call_id]

    def Transfer(self, request: Any, **_: Any) -> Any:
        def make() -> Any:
            self.venue.transfer(Decimal(request.amount))
            return venue_pb2.TransferReply(account=account_to_wire(self.venue))

        return self._once(request.transfer_id, make)

    def SubmitOrder(self, request: Any, **_: Any) -> Any:
        self.marks.append(request.mark_price)

        def make() -> Any:
            mark = Decimal(request.mark_price) if request.mark_price else None
            fill = self.venue.execute(
                request.ts_event_ns,
                Decimal(request.qty),
                Decimal(request.reference_price),
                mark=mark,
            )
            return venue_pb2.SubmitOrderReply(
                fill=fill_to_wire(fill), account=account_to_wire(self.venue)
            )

        return self._once(request.client_order_id, make)


def remote() -> tuple[RemoteVenue, FakeStub]:
    client = RemoteVenue(grpc.insecure_channel("127.0.0.1:1"), SPEC, CONFIG.venue)
    stub = FakeStub()
    client._stub = stub
    return client, stub


def test_calls_are_numbered_within_the_event() -> None:
    client, stub = remote()
    client.begin("BTC-USDT:7")
    client.transfer(Decimal(1000000))
    client.execute(1, Decimal("1.5"), Decimal(50000))
    client.begin("BTC-USDT:8")
    client.execute(2, Decimal("-0.5"), Decimal(51000))
    assert stub.ids == ["BTC-USDT:7:0", "BTC-USDT:7:1", "BTC-USDT:8:0"]


def test_a_rerun_from_saved_state_makes_the_same_calls_and_trades_once() -> None:
    client, stub = remote()
    client.begin("BTC-USDT:1")
    client.transfer(Decimal(1000000))
    saved = client.state()
    client.begin("BTC-USDT:2")
    first = client.execute(1, Decimal("2"), Decimal(50000))
    after = client.state()
    client.restore(saved)  # the crash: state as of event 1, event 2 re-run
    client.begin("BTC-USDT:2")
    assert client.execute(1, Decimal("2"), Decimal(50000)) == first
    assert client.state() == after == stub.venue.snapshot()
    assert stub.venue.position == Decimal(2)


def test_an_order_carries_the_mark_its_margin_is_judged_at() -> None:
    """The engine's mark went nowhere past the client: the venue judged the margin at a
    print the mark ignores, refusing what the engine sent at 5x (27.7x at the print)."""
    client, stub = remote()
    client.begin("BTC-USDT:1")
    client.transfer(Decimal(10000))
    client.execute(1, Decimal(1), Decimal(50000), mark=Decimal(50000))
    client.begin("BTC-USDT:2")
    client.execute(2, Decimal("0.1"), Decimal(41500), mark=Decimal("50000.0"))
    client.execute(2, Decimal("-0.1"), Decimal(41500))  # none given: none sent
    assert stub.marks == ["50000", "50000.0", ""]


def test_changing_the_account_needs_an_event() -> None:
    client, _ = remote()
    with pytest.raises(RuntimeError, match="begin"):
        client.transfer(Decimal(1))
    with pytest.raises(ValueError):
        client.begin("")
