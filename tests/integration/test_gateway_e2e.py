"""End to end: users trade through the gateway while real prices move the NAVs.

The whole pipeline (venue, hedging, leverage, regime, NAV) and the gateway run as
subprocesses in a fresh namespace (shared/pipeline_runner.py). Both BTC products are
seeded, real BTC history is replayed so the NAVs move, and two users trade over a real
gRPC channel: alice goes long, bob short; then more history (the 2021-05-19 crash), and
both close (alice in two steps). Every fill is checked to the last minor unit against
the core's own formulas at the NAV the product showed at that moment:

    open:  (fee, units) = issue_terms(amount, nav, open_fee)
    close: gross = units x NAV (cut to 1e-8), fee = redeem_terms(...), payout = gross - fee

and at the end the books balance (DESIGN section 5): hedging's books, restored from its
Redis state, against the venue's own account fetched over gRPC; hedging dead-lettered
no order (it settles each at the gateway's NAV and refuses any mismatch).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import TypeVar

import grpc
import pytest
import redis
from smartlev.v1 import gateway_pb2, gateway_pb2_grpc, venue_pb2, venue_pb2_grpc

from services.ingestion.store import state_key
from shared.adapters.venue_client import account_from_wire
from shared.core.accounting import Books, issue_terms, redeem_terms
from shared.core.config import StrategyConfig
from shared.core.money import usdt_down
from shared.pipeline_runner import GATEWAY, STAGES, Pipeline, missing_modules
from shared.topics import HEDGE_FILLS, ORDERS_EVENTS
from tests.integration.pipeline import CAPITAL, PRODUCTS, SYMBOL, Slice, ns

pytestmark = pytest.mark.integration

CONFIG = StrategyConfig()
FEES = CONFIG.accounting
LONG, SHORT = PRODUCTS  # BTC-USDT:LONG, BTC-USDT:SHORT
ALICE = (("authorization", "Bearer dev-alice-key"),)
BOB = (("authorization", "Bearer dev-bob-key"),)
BEFORE = Slice("2021-05-12", "2021-05-13")  # NAVs move before anyone trades
AFTER = Slice("2021-05-13", "2021-05-20")  # ... and while they hold (incl. the crash)
TIMEOUT_S = 60.0


T = TypeVar("T")


def wait_for(what: str, probe: Callable[[], T | None], pipeline: Pipeline) -> T:
    """Poll `probe` until it returns a value; fail naming the stalled service."""
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        pipeline.check_alive()
        found = probe()
        if found is not None:
            return found
        time.sleep(0.1)
    stage = pipeline.stalled_stage()
    raise AssertionError(f"timed out waiting for {what}; stalled at {stage}\n{pipeline.logs()}")


class Desk:
    """The test's view of the running pipeline: gRPC stubs and hedging's Redis state."""

    def __init__(self, pipeline: Pipeline, client: redis.Redis) -> None:
        self.pipeline = pipeline
        self.redis = client
        self.channel = grpc.insecure_channel(f"127.0.0.1:{pipeline.ports['gateway.grpc']}")
        self.gateway = gateway_pb2_grpc.GatewayStub(self.channel)
        self.venue_channel = grpc.insecure_channel(f"127.0.0.1:{pipeline.ports['venue.grpc']}")
        self.venue = venue_pb2_grpc.VenueStub(self.venue_channel)
        self.hedge = f"{pipeline.namespace}hedge:{{{SYMBOL}}}"

    def close(self) -> None:
        self.channel.close()
        self.venue_channel.close()

    def product(self, name: str) -> gateway_pb2.Product:
        reply: gateway_pb2.Product = self.gateway.GetProduct(
            gateway_pb2.GetProductRequest(product=name), metadata=ALICE, timeout=10
        )
        return reply

    def drained(self) -> None:
        """Wait until NAV marked the last tick ingestion published (both slices end on a
        tick): the NAVs stand still, so a quote is the NAV the product shows."""
        raw = self.redis.hget(state_key(self.pipeline.namespace, SYMBOL), "seq")
        assert raw is not None, "ingestion published nothing"
        last = int(raw)

        def settled() -> bool | None:
            marked = {self.product(p).seq for p in PRODUCTS}
            return True if marked == {last} else None

        wait_for(f"the pipeline to mark seq {last}", settled, self.pipeline)

    def applied(self, order_id: str, product: str, units: Decimal) -> None:
        """Wait until hedging applied the order and NAV re-marked the product's units."""

        def done() -> bool | None:
            if not self.redis.hexists(f"{self.hedge}:applied", order_id):
                return None
            return True if Decimal(self.product(product).units) == units else None

        wait_for(f"order {order_id} to be settled", done, self.pipeline)

    def books(self) -> tuple[Books, Decimal]:
        """Hedging's books as committed, and the last price they were marked at."""
        engine = json.loads(self.redis.hget(f"{self.hedge}:state", "engine") or "{}")
        return Books.restore(FEES, engine["books"]), Decimal(engine["price"])

    def open(
        self, who: tuple[tuple[str, str], ...], product: str, amount: str, order: str
    ) -> gateway_pb2.OpenPositionReply:
        shown = self.product(product)
        request = gateway_pb2.OpenPositionRequest(
            client_order_id=order, product=product, amount_usdt=amount
        )
        reply: gateway_pb2.OpenPositionReply = self.gateway.OpenPosition(
            request, metadata=who, timeout=10
        )
        fee, _, units = issue_terms(Decimal(amount), Decimal(shown.nav), FEES.open_fee)
        assert (reply.nav, Decimal(reply.fee), Decimal(reply.units)) == (shown.nav, fee, units)
        retry = self.gateway.OpenPosition(request, metadata=who, timeout=10)
        assert retry == reply  # the same client_order_id: the same fill, nothing new
        self.applied(reply.order_id, product, Decimal(shown.units) + units)
        return reply

    def close_position(
        self,
        who: tuple[tuple[str, str], ...],
        position: str,
        order: str,
        units: Decimal | None = None,
    ) -> gateway_pb2.ClosePositionReply:
        held: gateway_pb2.Position = self.gateway.GetPosition(
            gateway_pb2.GetPositionRequest(position_id=position), metadata=who, timeout=10
        )
        shown = self.product(held.product)
        request = gateway_pb2.ClosePositionRequest(
            client_order_id=order,
            position_id=position,
            units="" if units is None else str(units),
            all=units is None,
        )
        reply: gateway_pb2.ClosePositionReply = self.gateway.ClosePosition(
            request, metadata=who, timeout=10
        )
        redeemed = Decimal(held.units) if units is None else units
        nav = Decimal(shown.nav)
        gross, fee = redeem_terms(redeemed, nav, FEES.close_fee)
        assert Decimal(reply.units) == redeemed and reply.nav == shown.nav
        assert Decimal(reply.gross) == gross == usdt_down(redeemed * nav)
        assert Decimal(reply.fee) == fee
        assert Decimal(reply.payout) == gross - fee
        assert Decimal(reply.position.units) == Decimal(held.units) - redeemed
        self.applied(reply.order_id, held.product, Decimal(shown.units) - redeemed)
        return reply


@pytest.fixture
def desk(kafka_bootstrap: str, redis_url: str, redis_client: redis.Redis) -> Iterator[Desk]:
    missing = missing_modules([*STAGES, GATEWAY])
    if missing:
        pytest.fail(f"services missing from the tree: {', '.join(missing)}")
    with Pipeline.start(
        services=(*STAGES, GATEWAY), bootstrap=kafka_bootstrap, redis_url=redis_url
    ) as pipeline:
        view = Desk(pipeline, redis_client)
        try:
            yield view
        finally:
            view.close()


def test_long_and_short_round_trips_pay_units_times_nav_and_books_balance(desk: Desk) -> None:
    pipeline = desk.pipeline
    for product in PRODUCTS:
        pipeline.deposit(product, CAPITAL, ns(BEFORE.start))
    pipeline.replay(BEFORE.replay_args())
    desk.drained()
    navs_before = {p: desk.product(p).nav for p in PRODUCTS}
    assert navs_before[LONG] != navs_before[SHORT]  # the prices really moved them

    alice = desk.open(ALICE, LONG, "25000", "e2e-alice-open")
    bob = desk.open(BOB, SHORT, "12345.67", "e2e-bob-open")
    with pytest.raises(grpc.RpcError) as foreign:  # bob cannot see alice's position
        desk.gateway.GetPosition(
            gateway_pb2.GetPositionRequest(position_id=alice.position_id), metadata=BOB
        )
    assert foreign.value.code() is grpc.StatusCode.NOT_FOUND

    pipeline.replay(AFTER.replay_args())
    desk.drained()
    navs_after = {p: desk.product(p).nav for p in PRODUCTS}
    assert navs_after[LONG] != navs_before[LONG] and navs_after[SHORT] != navs_before[SHORT]

    half = (Decimal(alice.units) / 2).quantize(Decimal("0.00000001"))
    first = desk.close_position(ALICE, alice.position_id, "e2e-alice-close-1", half)
    second = desk.close_position(ALICE, alice.position_id, "e2e-alice-close-2")
    closed = desk.close_position(BOB, bob.position_id, "e2e-bob-close")

    for who, opened, closes in ((ALICE, alice, [first, second]), (BOB, bob, [closed])):
        final: gateway_pb2.Position = desk.gateway.GetPosition(
            gateway_pb2.GetPositionRequest(position_id=opened.position_id), metadata=who
        )
        paid_out = sum((Decimal(c.payout) for c in closes), Decimal(0))
        assert not final.open and Decimal(final.units) == 0
        assert Decimal(final.payout) == paid_out
        assert Decimal(final.realized_pnl) == paid_out - Decimal(opened.amount)
        assert Decimal(final.fees) == Decimal(opened.fee) + sum(
            (Decimal(c.fee) for c in closes), Decimal(0)
        )

    # The books balance: hedging's committed books against the venue's own account.
    books, price = desk.books()
    account = desk.venue.GetAccount(venue_pb2.GetAccountRequest(symbol=SYMBOL), timeout=10)
    venue = account_from_wire(account, CONFIG.instrument(SYMBOL), CONFIG.venue)
    books.check_balanced(venue, price)  # raises BooksOutOfBalance on any difference
    print(
        f"NAVs {navs_before} -> {navs_after}; alice {alice.amount} -> "
        f"{first.payout} + {second.payout}, bob {bob.amount} -> {closed.payout}"
    )
    amounts = Decimal(alice.amount) + Decimal(bob.amount)
    assert books.deposits == 2 * CAPITAL + amounts
    payouts = sum((Decimal(c.payout) for c in (first, second, closed)), Decimal(0))
    assert books.payouts == payouts
    seeded = {p: issue_terms(CAPITAL, FEES.initial_nav, FEES.open_fee)[2] for p in PRODUCTS}
    assert {p: b.units for p, b in books.products.items() if p in seeded} == seeded
    dead = pipeline.topic_counts([ORDERS_EVENTS.dlq().name, HEDGE_FILLS.dlq().name])
    assert dead == {ORDERS_EVENTS.dlq().name: 0, HEDGE_FILLS.dlq().name: 0}
