"""The gateway's books under any sequence of orders: a property test over a real channel.

Hypothesis picks an amount, the NAVs the product shows over time and a sequence of
partial closes (then, or not, a close of all; a part worth less than the minimum order,
or leaving less, is refused and changes nothing); a gateway subprocess (as deployed) settles
them against the real Redis, the NAV service stood in for by writing its hash. After
every sequence, to the minor unit:

- each open and close is the core's formula at the NAV shown then (issue_terms,
  redeem_terms), and the position reads back as the replies left it;
- the product's ledger moved by exactly the sequence's units, deposits, payouts and fees;
- a position closed in steps has taken its whole cost, no more: its realized PnL is what
  it paid out minus what it was paid;
- every decimal sent is exact and in plain notation (`decimal_from_wire` refuses "0E-8").
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from decimal import ROUND_DOWN, Decimal
from uuid import uuid4

import grpc
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from smartlev.v1 import gateway_pb2, gateway_pb2_grpc

from services.gateway.config import GatewaySettings
from shared.codec import decimal_from_wire
from shared.core.accounting import issue_terms, redeem_terms
from shared.core.config import StrategyConfig
from shared.core.money import usdt_down
from shared.pipeline_runner import GATEWAY, Pipeline
from tests.integration.pipeline import require_services
from tests.nav_marks import nav_hash

pytestmark = pytest.mark.integration

PRODUCT = "BTC-USDT:LONG"
ALICE = (("authorization", "Bearer dev-alice-key"),)
FEES = StrategyConfig().accounting
UNIT = Decimal("0.00000001")
LEDGER = ("units", "deposits", "payouts", "fees")
MIN_ORDER = GatewaySettings().min_order

AMOUNTS = st.integers(1_000, 1_000_000).map(lambda cents: Decimal(cents) / 100)
NAVS = st.integers(50 * 10**8, 200 * 10**8).map(lambda n: Decimal(n) * UNIT)
CLOSES = st.lists(st.tuples(st.integers(1, 99), NAVS), max_size=4)  # (percent of held, NAV)


@dataclass
class Desk:
    pipeline: Pipeline
    redis: redis.Redis
    stub: gateway_pb2_grpc.GatewayStub

    def show_nav(self, nav: Decimal) -> None:
        """What the NAV service writes (services/nav), fresh."""
        name, fields = nav_hash(self.pipeline.namespace, PRODUCT, nav, units=Decimal(1000))
        self.redis.hset(name, mapping=fields)

    def ledger(self) -> dict[str, Decimal]:
        fields = self.redis.hgetall(f"{self.pipeline.namespace}gw:{{BTC-USDT}}:ledger")
        return {name: Decimal(fields.get(f"{PRODUCT}:{name}", "0")) for name in LEDGER}

    def close(self, pid: str, units: Decimal | None) -> gateway_pb2.ClosePositionReply:
        request = gateway_pb2.ClosePositionRequest(
            client_order_id=uuid4().hex,
            position_id=pid,
            units="" if units is None else str(units),
            all=units is None,
        )
        reply: gateway_pb2.ClosePositionReply = self.stub.ClosePosition(request, metadata=ALICE)
        return reply


@pytest.fixture(scope="module")
def desk(kafka_bootstrap: str, redis_url: str) -> Iterator[Desk]:
    require_services([GATEWAY])
    with Pipeline.start((GATEWAY,), bootstrap=kafka_bootstrap, redis_url=redis_url) as pipeline:
        client = redis.Redis.from_url(redis_url, decode_responses=True)
        channel = grpc.insecure_channel(f"127.0.0.1:{pipeline.ports['gateway.grpc']}")
        try:
            yield Desk(pipeline, client, gateway_pb2_grpc.GatewayStub(channel))
        finally:
            channel.close()
            client.close()


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(amount=AMOUNTS, entry_nav=NAVS, closes=CLOSES, close_rest=st.booleans())
def test_any_order_sequence_keeps_the_books_exact(
    desk: Desk,
    amount: Decimal,
    entry_nav: Decimal,
    closes: list[tuple[int, Decimal]],
    close_rest: bool,
) -> None:
    before = desk.ledger()
    desk.show_nav(entry_nav)
    opened = desk.stub.OpenPosition(
        gateway_pb2.OpenPositionRequest(
            client_order_id=uuid4().hex, product=PRODUCT, amount_usdt=str(amount)
        ),
        metadata=ALICE,
    )
    fee, _, units = issue_terms(amount, entry_nav, FEES.open_fee)
    assert (decimal_from_wire(opened.units), decimal_from_wire(opened.fee)) == (units, fee)
    held, paid_out, fees = units, Decimal(0), fee
    replies = []
    for percent, nav in [*closes, *([(100, entry_nav)] if close_rest else [])]:
        wanted = None if percent == 100 else (held * percent / 100).quantize(UNIT, ROUND_DOWN)
        if wanted == 0:
            continue
        desk.show_nav(nav)
        redeemed = held if wanted is None else wanted
        gross, fee = redeem_terms(redeemed, nav, FEES.close_fee)
        left = held - redeemed
        if left and (gross < MIN_ORDER or usdt_down(left * nav) < MIN_ORDER):
            # part of a position: worth the minimum order, and leaving as much
            ledger = desk.ledger()
            with pytest.raises(grpc.RpcError) as refused:
                desk.close(opened.position_id, wanted)
            assert refused.value.code() is grpc.StatusCode.FAILED_PRECONDITION
            assert desk.ledger() == ledger
            continue
        reply = desk.close(opened.position_id, wanted)
        assert (
            decimal_from_wire(reply.units),
            decimal_from_wire(reply.gross),
            decimal_from_wire(reply.fee),
        ) == (
            redeemed,
            gross,
            fee,
        )
        assert decimal_from_wire(reply.payout) == gross - fee
        held, paid_out, fees = held - redeemed, paid_out + gross - fee, fees + fee
        replies.append(reply)
    position = desk.stub.GetPosition(
        gateway_pb2.GetPositionRequest(position_id=opened.position_id), metadata=ALICE
    )
    assert (decimal_from_wire(position.units), decimal_from_wire(position.payout)) == (
        held,
        paid_out,
    )
    assert decimal_from_wire(position.fees) == fees
    assert decimal_from_wire(position.realized_pnl) == sum(
        decimal_from_wire(r.realized_pnl) for r in replies
    )
    if held == 0:
        assert decimal_from_wire(position.cost) == 0
        assert decimal_from_wire(position.realized_pnl) == paid_out - amount
    after = desk.ledger()
    assert {name: after[name] - before[name] for name in LEDGER} == {
        "units": held,
        "deposits": amount,
        "payouts": paid_out,
        "fees": fees,
    }
