"""The order gateway over a real gRPC channel, with the real Redis and Kafka.

Each test runs an in-process GatewayServer on a free port under its own namespace; the
NAV service is stood in for by writing its Redis hash (`<ns>nav:{product}`) directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import Decimal
from typing import Any
from uuid import uuid4

import grpc
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError, TopicAuthorizationFailedError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from prometheus_client import REGISTRY
from redis.asyncio import Redis
from smartlev.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, nav_pb2, orders_pb2

import services.gateway.main as gateway_main
from services.gateway.config import GatewaySettings
from services.gateway.feeds import Subscriber, Updates
from services.gateway.ledger import Settled, Snapshot
from services.gateway.main import GatewayServer
from services.gateway.orders import order_id
from services.gateway.relay import OutboxRelay
from services.hedging.messages import order_step, products_by_symbol
from shared.adapters.kafka_admin import ensure_topics
from shared.adapters.redis_wire import RedisWire
from shared.codec import decimal_from_wire, decode
from shared.core.accounting import issue_terms, redeem_terms
from shared.core.config import StrategyConfig
from shared.redis_store import ApplyStatus
from shared.serving import SERVER_ANSWERED
from shared.topics import NAV_UPDATES, ORDERS_EVENTS
from tests.integration.serving import refused_start
from tests.nav_marks import nav_hash

pytestmark = pytest.mark.integration

PRODUCT = "BTC-USDT:LONG"
ALICE = (("authorization", "Bearer dev-alice-key"),)
BOB = (("authorization", "Bearer dev-bob-key"),)
ACCOUNTING = StrategyConfig().accounting
NAV = Decimal("123.45678901")
# The seq of the tick `Env.set_nav` stands the NAV in for, and of the NAV service's next
# update: a position stream skips updates older than the NAV it read.
STORED_SEQ = 7
NEXT_SEQ = STORED_SEQ + 1


class Env:
    def __init__(self, redis: Redis, namespace: str, bootstrap: str, server: GatewayServer):
        self.redis = redis
        self.ns = namespace
        self.bootstrap = bootstrap
        self.server = server
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
        self.stub = gateway_pb2_grpc.GatewayStub(self.channel)

    async def set_nav(
        self,
        product: str,
        nav: Decimal,
        *,
        age_s: float = 0.0,
        units: Decimal = Decimal(1000),
        advanced: Decimal = Decimal(0),
    ) -> None:
        name, fields = nav_hash(
            self.ns,
            product,
            nav,
            units=units,
            age_s=age_s,
            price=Decimal(43000),
            target=Decimal(2),
            leverage=Decimal("1.9"),
            regime=common_pb2.TREND_UP,
            reasons="REGIME_TREND_ALIGNED,RATE_LIMITED",
            seq=STORED_SEQ,
            advanced=advanced,
        )
        await self.redis.hset(name, mapping=fields)

    async def state(self) -> dict[str, object]:
        """Every gateway key of this namespace and what it holds, but the outbox (the relay
        empties it whenever it likes)."""
        keys = sorted(
            [
                k
                async for k in self.redis.scan_iter(match=f"{self.ns}gw:*")
                if not k.endswith((":outbox", ":outbox:index"))
            ]
        )
        return {k: await self._read(k) for k in keys}

    async def _read(self, key: str) -> object:
        if key.endswith(":closed"):
            return await self.redis.smembers(key)
        if key.endswith(":ids"):
            return await self.redis.zrange(key, 0, -1)
        return await self.redis.hgetall(key)

    async def open(
        self, client_id: str, amount: str = "1000", who: tuple = ALICE, product: str = PRODUCT
    ) -> gateway_pb2.OpenPositionReply:
        request = gateway_pb2.OpenPositionRequest(
            client_order_id=client_id, product=product, amount_usdt=amount
        )
        return await self.stub.OpenPosition(request, metadata=who)

    async def events(self, expected: int, timeout_s: float = 10.0) -> list[orders_pb2.OrderEvent]:
        """Everything on the namespaced orders.events, waiting for `expected` messages."""
        topic = ORDERS_EVENTS.in_namespace(self.ns)
        consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False)
        await consumer.start()
        try:
            parts = [TopicPartition(topic.name, p) for p in range(topic.partitions)]
            consumer.assign(parts)
            await consumer.seek_to_beginning(*parts)
            out: list[orders_pb2.OrderEvent] = []
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                batch = await consumer.getmany(timeout_ms=300)
                for records in batch.values():
                    out.extend(decode(orders_pb2.OrderEvent, r.value) for r in records)
                if len(out) >= expected:
                    await asyncio.sleep(0.3)  # anything beyond `expected` shows up too
                    for records in (await consumer.getmany(timeout_ms=200)).values():
                        out.extend(decode(orders_pb2.OrderEvent, r.value) for r in records)
                    break
            return out
        finally:
            await consumer.stop()


def _settings(namespace: str, redis_url: str, bootstrap: str) -> GatewaySettings:
    return GatewaySettings(
        namespace=namespace,
        grpc_port=0,
        metrics_port=0,
        health_interval_s=0.1,
        outbox_poll_s=0.1,
        grace_s=0,
        max_nav_age_s=30,
        kafka={"bootstrap": bootstrap},
        redis={"url": redis_url},
    )


async def _env(redis_url: str, bootstrap: str, relay: bool) -> AsyncIterator[Env]:
    namespace = f"t{uuid4().hex[:8]}."
    await asyncio.to_thread(
        ensure_topics,
        bootstrap,
        [ORDERS_EVENTS.in_namespace(namespace), NAV_UPDATES.in_namespace(namespace)],
    )
    redis = Redis.from_url(redis_url, decode_responses=True)
    server = GatewayServer(_settings(namespace, redis_url, bootstrap), redis, relay=relay)
    await server.start()
    env = Env(redis, namespace, bootstrap, server)
    try:
        yield env
    finally:
        await env.channel.close()
        await server.stop()
        keys = [k async for k in redis.scan_iter(match=f"{namespace}*")]
        if keys:
            await redis.delete(*keys)
        await redis.aclose()


@pytest.fixture
async def env(redis_url: str, kafka_bootstrap: str) -> AsyncIterator[Env]:
    async for value in _env(redis_url, kafka_bootstrap, relay=True):
        yield value


@pytest.fixture
async def quiet_env(redis_url: str, kafka_bootstrap: str) -> AsyncIterator[Env]:
    """No relay task: the test decides when the outbox is published."""
    async for value in _env(redis_url, kafka_bootstrap, relay=False):
        yield value


async def _code(call: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call  # type: ignore[misc]
    return info.value.code(), info.value.details() or ""


# --------------------------------------------------------------------------- auth


async def test_calls_without_a_valid_key_are_unauthenticated(env: Env) -> None:
    """And counted: a client with a wrong key was invisible on /metrics."""
    labels = {"rpc": "ListProducts", "outcome": "UNAUTHENTICATED"}
    before = REGISTRY.get_sample_value("smartlev_gateway_requests_total", labels) or 0.0
    request = gateway_pb2.ListProductsRequest()
    for metadata in [
        (),
        (("authorization", "Bearer nope"),),
        (("authorization", "dev-alice-key"),),
    ]:
        code, details = await _code(env.stub.ListProducts(request, metadata=metadata))
        assert code is grpc.StatusCode.UNAUTHENTICATED, details
        assert "API key" in details
    assert REGISTRY.get_sample_value("smartlev_gateway_requests_total", labels) == before + 3
    code, _ = await _code(env.stub.Ping(gateway_pb2.PingRequest()))
    assert code is grpc.StatusCode.UNAUTHENTICATED
    assert (await env.stub.Ping(gateway_pb2.PingRequest(), metadata=ALICE)).ts_ns > 0


# --------------------------------------------------------------------------- orders


async def test_open_and_close_settle_at_the_nav_with_the_core_formulas(env: Env) -> None:
    await env.set_nav(PRODUCT, NAV)
    product = await env.stub.GetProduct(
        gateway_pb2.GetProductRequest(product=PRODUCT), metadata=ALICE
    )
    assert (product.nav, product.tradable, list(product.reasons)) == (
        str(NAV),
        True,
        ["REGIME_TREND_ALIGNED", "RATE_LIMITED"],
    )
    opened = await env.open("open-1", "1000.5")
    fee, _, units = issue_terms(Decimal("1000.5"), NAV, ACCOUNTING.open_fee)
    assert (opened.nav, opened.fee, opened.units) == (str(NAV), str(fee), str(units))
    assert opened.position.entry_nav == str(NAV) and opened.position.open

    half = units / 2
    closed = await env.stub.ClosePosition(
        gateway_pb2.ClosePositionRequest(
            client_order_id="close-1", position_id=opened.position_id, units=str(half)
        ),
        metadata=ALICE,
    )
    gross, close_fee = redeem_terms(half, NAV, ACCOUNTING.close_fee)
    cost = (Decimal("1000.5") / 2).quantize(Decimal("0.00000001"))
    assert (closed.gross, closed.fee, closed.payout) == (
        str(gross),
        str(close_fee),
        str(gross - close_fee),
    )
    assert Decimal(closed.realized_pnl) == gross - close_fee - cost
    rest = await env.stub.ClosePosition(
        gateway_pb2.ClosePositionRequest(
            client_order_id="close-2", position_id=opened.position_id, all=True
        ),
        metadata=ALICE,
    )
    assert Decimal(rest.units) == units - half and not rest.position.open
    # The costs of the closes add up to what was paid.
    assert Decimal(closed.payout) + Decimal(rest.payout) - Decimal("1000.5") == Decimal(
        rest.position.realized_pnl
    )
    listed = await env.stub.ListPositions(gateway_pb2.ListPositionsRequest(), metadata=ALICE)
    assert list(listed.positions) == []
    listed = await env.stub.ListPositions(
        gateway_pb2.ListPositionsRequest(include_closed=True), metadata=ALICE
    )
    assert [p.position_id for p in listed.positions] == [opened.position_id]
    # Three events, in order, each the order's id; hedging reads them as the gateway quoted.
    events = await env.events(3)
    assert [e.WhichOneof("event") for e in events] == ["opened", "closed", "closed"]
    assert events[0].opened.units == str(units) and events[0].opened.nav == str(NAV)
    steps = [order_step(e, products_by_symbol(StrategyConfig())) for e in events]
    assert steps[0].order_id == opened.order_id and steps[0].nav == NAV
    assert steps[1].payout == gross - close_fee
    assert await env.redis.hgetall(env.server.ledger.outbox_key("BTC-USDT")) == {}


async def test_the_gateway_quotes_the_fees_of_the_configured_policy(
    env: Env, redis_url: str
) -> None:
    """It quoted the default fees whatever the pipeline was configured with, so hedging's
    books (configured otherwise) refused every order as quoted otherwise."""
    policy = StrategyConfig.model_validate({"accounting": {"open_fee": "0.002"}})
    settings = _settings(env.ns, redis_url, env.bootstrap).model_copy(update={"strategy": policy})
    server = GatewayServer(settings, env.redis)
    await server.start()
    try:
        await env.set_nav(PRODUCT, NAV)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            opened = await gateway_pb2_grpc.GatewayStub(channel).OpenPosition(
                gateway_pb2.OpenPositionRequest(
                    client_order_id="policy-1", product=PRODUCT, amount_usdt="1000"
                ),
                metadata=ALICE,
            )
        fee, _, units = issue_terms(Decimal(1000), NAV, Decimal("0.002"))
        assert (opened.fee, opened.units) == (str(fee), str(units))
        assert fee == Decimal(2) != issue_terms(Decimal(1000), NAV, ACCOUNTING.open_fee)[0]
    finally:
        await server.stop()


def open_streams(kind: str) -> float:
    """The gateway's smartlev_gateway_stream_subscribers gauge (this process's servers)."""
    return REGISTRY.get_sample_value("smartlev_gateway_stream_subscribers", {"stream": kind}) or 0.0


POSITION_DECIMALS = (
    "units", "units_opened", "entry_nav", "amount", "cost", "nav", "value", "unrealized_pnl",
    "realized_pnl", "payout", "fees",
)  # fmt: skip


async def test_a_dust_close_pays_nothing_in_plain_decimals_that_hedging_takes(env: Env) -> None:
    """A whole position worth less than a minor unit (its NAV fell to 1e-8) closes at
    any worth: gross, fee and payout are zero, written "0.00000000" like every decimal
    the gateway sends, never "0E-8" (hedging's parser dead-letters that, and its books
    would miss the units)."""
    await env.set_nav(PRODUCT, Decimal(1000))
    opened = await env.open("dust-open", "10")
    await env.set_nav(PRODUCT, Decimal("0.00000001"))
    dust = await env.stub.ClosePosition(
        gateway_pb2.ClosePositionRequest(
            client_order_id="dust-close", position_id=opened.position_id, all=True
        ),
        metadata=ALICE,
    )
    assert dust.units == opened.units
    assert (dust.gross, dust.fee, dust.payout) == ("0.00000000",) * 3
    assert Decimal(dust.position.units) == Decimal(dust.position.cost) == 0
    for reply in (opened, dust):
        for name in (
            "units",
            "nav",
            "fee",
            *(("gross", "payout", "realized_pnl") if reply is not opened else ()),
        ):
            decimal_from_wire(getattr(reply, name), name=name)
        for name in POSITION_DECIMALS:
            decimal_from_wire(getattr(reply.position, name), name=f"position.{name}")
    products = products_by_symbol(StrategyConfig())
    steps = [order_step(e, products) for e in await env.events(2)]
    assert [s.payout for s in steps] == [None, Decimal(0)]
    assert steps[1].units == Decimal(opened.units)


async def test_listing_open_positions_skips_those_found_closed_before(env: Env) -> None:
    """A user's history grows, the positions held do not: once a listing has found a
    position closed, later listings of open positions do not read it again."""
    await env.set_nav(PRODUCT, NAV)
    opened = [await env.open(f"listed-{n}") for n in range(3)]
    for n, position in enumerate(opened[:2]):
        await env.stub.ClosePosition(
            gateway_pb2.ClosePositionRequest(
                client_order_id=f"listed-close-{n}", position_id=position.position_id, all=True
            ),
            metadata=ALICE,
        )
    request = gateway_pb2.ListPositionsRequest()
    listed = await env.stub.ListPositions(request, metadata=ALICE)
    assert [p.position_id for p in listed.positions] == [opened[2].position_id]
    closed = {p.position_id for p in opened[:2]}
    assert await env.redis.smembers(f"{env.ns}gw:{{user:alice}}:closed") == closed
    for pid in closed:  # were they read again, they would fail the call
        await env.redis.hset(env.server.ledger.position_key("BTC-USDT", pid), "units", "x")
    listed = await env.stub.ListPositions(request, metadata=ALICE)
    assert [p.position_id for p in listed.positions] == [opened[2].position_id]
    stream = env.stub.StreamPositions(gateway_pb2.StreamPositionsRequest(), metadata=ALICE)
    assert (await asyncio.wait_for(stream.read(), 10)).position_id == opened[2].position_id
    stream.cancel()


async def list_pages(
    env: Env, include_closed: bool, size: int
) -> list[gateway_pb2.ListPositionsReply]:
    """Every page of Alice's listing, following next_page_token."""
    pages, token = [], ""
    while True:
        request = gateway_pb2.ListPositionsRequest(
            include_closed=include_closed, page_size=size, page_token=token
        )
        pages.append(await env.stub.ListPositions(request, metadata=ALICE))
        token = pages[-1].next_page_token
        if not token:
            return pages


async def test_listings_come_in_pages_that_cover_every_position_once(env: Env) -> None:
    """A heavy trader's history no longer has to fit one reply: pages of page_size by
    position id, each naming where the next starts, every position on exactly one."""
    await env.set_nav(PRODUCT, NAV)
    opened = [await env.open(f"paged-{n}", "100") for n in range(7)]
    for n, position in enumerate(opened[:2]):
        await env.stub.ClosePosition(
            gateway_pb2.ClosePositionRequest(
                client_order_id=f"paged-close-{n}", position_id=position.position_id, all=True
            ),
            metadata=ALICE,
        )
    every = sorted(o.position_id for o in opened)
    held = sorted(o.position_id for o in opened[2:])
    # Open ones first, before any listing learnt which are closed: a page whose closed
    # positions turn up when read is short, and the listing still goes on past it.
    pages = await list_pages(env, include_closed=False, size=2)
    assert [q.position_id for p in pages for q in p.positions] == held
    read = [every[i : i + 2] for i in range(0, 7, 2)]  # the ids each page reads
    assert [len(p.positions) for p in pages] == [len(set(r) & set(held)) for r in read]
    pages = await list_pages(env, include_closed=True, size=3)
    assert [len(p.positions) for p in pages] == [3, 3, 1]
    assert [q.position_id for p in pages for q in p.positions] == every
    pages = await list_pages(env, include_closed=False, size=5)  # ends on a page's edge
    assert [[q.position_id for q in p.positions] for p in pages] == [held]
    whole = await env.stub.ListPositions(gateway_pb2.ListPositionsRequest(), metadata=ALICE)
    assert [p.position_id for p in whole.positions] == held  # 0: the default page of 100
    assert whole.next_page_token == ""


async def test_a_page_looks_at_ten_times_its_size_at_most(env: Env) -> None:
    """A long run of positions known closed ends an open listing's page early (empty,
    naming where the next starts) rather than reading the user's whole history."""
    await env.set_nav(PRODUCT, NAV)
    opened = sorted(
        [await env.open(f"run-{n}", "100") for n in range(12)], key=lambda o: o.position_id
    )
    for n, position in enumerate(opened[:-1]):  # the one sorted last stays open
        await env.stub.ClosePosition(
            gateway_pb2.ClosePositionRequest(
                client_order_id=f"run-close-{n}", position_id=position.position_id, all=True
            ),
            metadata=ALICE,
        )
    await list_pages(env, include_closed=False, size=100)  # finds the 11 closed
    pages = await list_pages(env, include_closed=False, size=1)
    assert [[q.position_id for q in p.positions] for p in pages] == [
        [],  # ten closed ones looked at
        [opened[-1].position_id],
    ]
    assert pages[0].next_page_token.endswith(opened[9].position_id)


async def test_a_listing_rebuilds_the_ids_of_an_index_older_than_them(env: Env) -> None:
    """Positions indexed before the sorted ids existed are listed whole, in id order."""
    await env.set_nav(PRODUCT, NAV)
    opened = [await env.open(f"before-ids-{n}", "100") for n in range(5)]
    ids = f"{env.ns}gw:{{user:alice}}:ids"
    await env.redis.delete(ids)
    pages = await list_pages(env, include_closed=False, size=2)
    listed = [q.position_id for p in pages for q in p.positions]
    assert listed == sorted(o.position_id for o in opened)
    assert await env.redis.zcard(ids) == 5


@pytest.mark.parametrize(
    ("request_", "says"),
    [
        (gateway_pb2.ListPositionsRequest(page_size=-1), "page_size: must be 0"),
        (gateway_pb2.ListPositionsRequest(page_token="not-a-token"), "not a token"),
        (gateway_pb2.ListPositionsRequest(page_token="open." + "g" * 32), "not a token"),
        (
            gateway_pb2.ListPositionsRequest(include_closed=True, page_token="open." + "a" * 32),
            "include_closed=False, not True",
        ),
    ],
)
async def test_a_bad_page_request_is_refused_saying_why(
    env: Env, request_: gateway_pb2.ListPositionsRequest, says: str
) -> None:
    got, details = await _code(env.stub.ListPositions(request_, metadata=ALICE))
    assert got is grpc.StatusCode.INVALID_ARGUMENT and says in details, details


async def test_a_position_stream_skips_late_events_of_positions_closed_before_it(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The relay may publish an order again (a crash between the ack and the delete): a
    stream of open positions that began after the close does not show it. (Closed more
    than the clocks may be apart before: here they are one clock, so no margin.)"""
    monkeypatch.setattr(gateway_main, "CLOCKS_APART_NS", 0)
    await env.set_nav(PRODUCT, NAV)
    gone = await env.open("gone")
    await env.stub.ClosePosition(
        gateway_pb2.ClosePositionRequest(
            client_order_id="gone-close", position_id=gone.position_id, all=True
        ),
        metadata=ALICE,
    )
    close_event = (await env.events(2))[1]
    stream = env.stub.StreamPositions(gateway_pb2.StreamPositionsRequest(), metadata=ALICE)
    first = await env.open("live-1")
    assert (await asyncio.wait_for(stream.read(), 10)).position_id == first.position_id
    producer = AIOKafkaProducer(bootstrap_servers=env.bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(
            ORDERS_EVENTS.in_namespace(env.ns).name,
            close_event.SerializeToString(),
            key=b"BTC-USDT",
        )
    finally:
        await producer.stop()
    second = await env.open("live-2")  # its event comes after the repeated one
    assert (await asyncio.wait_for(stream.read(), 10)).position_id == second.position_id
    stream.cancel()


async def alices_position_stream(env: Env) -> Any:
    """Alice's StreamPositions call, once the gateway has subscribed it."""
    before = open_streams("positions")
    stream = env.stub.StreamPositions(gateway_pb2.StreamPositionsRequest(), metadata=ALICE)
    await until_streams("positions", before + 1)
    return stream


async def test_a_position_stream_shows_one_opened_and_closed_after_it_began(
    quiet_env: Env,
) -> None:
    """Both events of a quick open-and-close may arrive after the close settled (the relay
    lingers): the stream re-reads the position, finds it closed, and shows it all the
    same, as an order on the caller's positions since the stream began."""
    env = quiet_env
    await env.set_nav(PRODUCT, NAV)
    stream = await alices_position_stream(env)
    quick = await env.open("quick")
    await env.stub.ClosePosition(
        gateway_pb2.ClosePositionRequest(
            client_order_id="quick-close", position_id=quick.position_id, all=True
        ),
        metadata=ALICE,
    )
    assert await env.server.relay.sweep() == 2  # both events go out only now
    shown = await asyncio.wait_for(stream.read(), 10)
    assert (shown.position_id, shown.open, shown.units) == (quick.position_id, False, "0.00000000")
    stream.cancel()


async def test_a_position_stream_shows_one_settled_after_it_by_a_gateway_whose_clock_is_behind(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Several gateways serve at once, each stamping the orders it settles with its own
    clock. One 2 s behind opened and closed a position just after a stream began on
    another: its times read as before the stream, which skipped both events as late
    copies, and the stream never showed the position."""
    await env.set_nav(PRODUCT, NAV)
    subscriber = Subscriber(None, "alice", Updates(16))
    request = gateway_pb2.StreamPositionsRequest()
    updates = env.server.gateway._position_updates("alice", request, subscriber)
    first = asyncio.ensure_future(anext(updates))  # the snapshot: nothing, so it waits
    await asyncio.sleep(0.2)
    now_ns = time.time_ns
    with monkeypatch.context() as behind:  # the settling gateway's clock, 2 s behind
        behind.setattr(gateway_main.time, "time_ns", lambda: now_ns() - 2 * 10**9)
        quick = await env.open("behind")
        await env.stub.ClosePosition(
            gateway_pb2.ClosePositionRequest(
                client_order_id="behind-close", position_id=quick.position_id, all=True
            ),
            metadata=ALICE,
        )
    for event in await env.events(2):
        subscriber.offer(event)
    shown = await asyncio.wait_for(first, 5)
    assert (shown.position_id, shown.open, shown.units) == (quick.position_id, False, "0.00000000")
    await updates.aclose()


async def test_a_position_opened_after_the_stream_began_comes_valued(quiet_env: Env) -> None:
    """The stream knew the NAVs of the products in its snapshot only: a position opened
    in another product came with no NAV, value or PnL, until that product's next NAV
    update (never, in a quiet market), while GetPosition showed it valued."""
    env = quiet_env
    await env.set_nav(PRODUCT, NAV)
    stream = await alices_position_stream(env)
    opened = await env.open("valued-at-once")
    assert await env.server.relay.sweep() == 1
    shown = await asyncio.wait_for(stream.read(), 10)
    got = await env.stub.GetPosition(
        gateway_pb2.GetPositionRequest(position_id=opened.position_id), metadata=ALICE
    )
    assert (shown.position_id, shown.nav, shown.value) == (opened.position_id, str(NAV), got.value)
    assert shown.value and shown.unrealized_pnl == got.unrealized_pnl
    stream.cancel()


async def test_a_slow_position_stream_that_lost_an_order_reads_its_positions_afresh(
    env: Env,
) -> None:
    """A slow reader's full queue drops its oldest update, which may be an order event:
    the stream must not go on showing that position as it was. Here the close's event
    is pushed out by NAV updates of two products; the next item reads the positions
    again."""
    await env.set_nav(PRODUCT, NAV)
    opened = await env.open("slow")
    subscriber = Subscriber(None, "alice", Updates(2))
    request = gateway_pb2.StreamPositionsRequest()
    updates = env.server.gateway._position_updates("alice", request, subscriber)
    assert (await anext(updates)).position_id == opened.position_id  # the snapshot
    await env.stub.ClosePosition(
        gateway_pb2.ClosePositionRequest(
            client_order_id="slow-close", position_id=opened.position_id, all=True
        ),
        metadata=ALICE,
    )
    [_, close_event] = await env.events(2)
    subscriber.offer(close_event)
    for product in (PRODUCT, "ETH-USDT:LONG"):  # the queue holds two: the close goes
        subscriber.offer(
            nav_pb2.NavUpdated(event_id=product, product=product, nav="124", seq=NEXT_SEQ)
        )
    assert subscriber.lost
    shown = await asyncio.wait_for(anext(updates), 5)
    assert (shown.position_id, shown.open, shown.units) == (
        opened.position_id,
        False,
        "0.00000000",
    )
    await updates.aclose()


async def test_a_position_stream_that_lost_a_nav_update_shows_the_nav_it_reads(
    env: Env,
) -> None:
    """The re-read after a loss showed only the positions whose state had changed: one
    whose product's NAV moved in the update the stream lost went on at the old value."""
    await env.set_nav(PRODUCT, NAV)
    opened = await env.open("valued")
    subscriber = Subscriber(None, "alice", Updates(16))
    request = gateway_pb2.StreamPositionsRequest()
    updates = env.server.gateway._position_updates("alice", request, subscriber)
    assert Decimal((await anext(updates)).nav) == NAV  # the snapshot
    await env.set_nav(PRODUCT, Decimal(150))  # stored; its update is the one lost
    subscriber.lost = True
    subscriber.offer(nav_pb2.NavUpdated(event_id="e", product="ETH-USDT:LONG", nav="9", seq=9))
    shown = await asyncio.wait_for(anext(updates), 5)
    assert (shown.position_id, Decimal(shown.nav)) == (opened.position_id, Decimal(150))
    await updates.aclose()


async def test_a_stream_of_open_positions_forgets_those_it_showed_closed(env: Env) -> None:
    """Shown closed once, a position leaves a stream of open positions: a late copy of its
    event shows nothing, and a re-read after a loss does not read it again (a stream open
    for days held, and re-read one by one, every position it had seen close)."""
    await env.set_nav(PRODUCT, NAV)
    gone = [await env.open(f"gone-{i}") for i in range(3)]
    subscriber = Subscriber(None, "alice", Updates(16))
    request = gateway_pb2.StreamPositionsRequest()
    updates = env.server.gateway._position_updates("alice", request, subscriber)
    snapshot = [(await anext(updates)).position_id for _ in gone]
    assert sorted(snapshot) == sorted(o.position_id for o in gone)
    for i, opened in enumerate(gone):
        await env.stub.ClosePosition(
            gateway_pb2.ClosePositionRequest(
                client_order_id=f"gone-close-{i}", position_id=opened.position_id, all=True
            ),
            metadata=ALICE,
        )
    kept = await env.open("kept")
    events = await env.events(7)
    closes = [e for e in events if e.WhichOneof("event") == "closed"]
    for event in closes:
        subscriber.offer(event)
        shown = await asyncio.wait_for(anext(updates), 5)
        assert (shown.position_id, shown.open) == (event.closed.position_id, False)
    subscriber.offer(closes[0])  # a late copy: nothing to show
    subscriber.offer(events[-1])  # kept's open
    assert (await asyncio.wait_for(anext(updates), 5)).position_id == kept.position_id
    gateway = env.server.gateway
    read_one = gateway._position
    reads: list[tuple[Any, ...]] = []

    async def counted(*args: Any) -> Any:
        reads.append(args)
        return await read_one(*args)

    gateway._position = counted  # type: ignore[method-assign]
    subscriber.lost = True  # the next item reads the positions afresh first
    subscriber.offer(nav_pb2.NavUpdated(event_id="n", product=PRODUCT, nav="130", seq=NEXT_SEQ))
    shown = await asyncio.wait_for(anext(updates), 5)
    assert (shown.position_id, shown.nav) == (kept.position_id, "130")
    assert reads == []  # the open listing had kept; the closed ones were not looked up
    await updates.aclose()


async def test_a_stream_of_all_positions_shows_its_history_once_across_losses(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stream of all positions lists the user's history at its start and at each re-read
    after a loss. Once more closed positions had been shown than their remembered ids,
    every re-read showed the whole history again (and a reader that slow lost updates
    again). History is shown once; what the listing brings after is new."""
    monkeypatch.setattr(gateway_main, "CLOSED_REMEMBERED", 2)  # fewer than the history
    monkeypatch.setattr(gateway_main, "CLOCKS_APART_NS", 0)  # one gateway: one clock
    await env.set_nav(PRODUCT, NAV)
    history = []
    for i in range(4):
        opened = await env.open(f"old-{i}")
        await env.stub.ClosePosition(
            gateway_pb2.ClosePositionRequest(
                client_order_id=f"old-close-{i}", position_id=opened.position_id, all=True
            ),
            metadata=ALICE,
        )
        history.append(opened.position_id)
    subscriber = Subscriber(None, "alice", Updates(16))
    request = gateway_pb2.StreamPositionsRequest(include_closed=True)
    updates = env.server.gateway._position_updates("alice", request, subscriber)
    assert sorted([(await anext(updates)).position_id for _ in history]) == sorted(history)
    for _ in range(2):  # two re-reads after losses
        subscriber.lost = True
        subscriber.offer(nav_pb2.NavUpdated(event_id="n", product=PRODUCT, nav="130", seq=NEXT_SEQ))
    fresh = await env.open("fresh")
    subscriber.offer((await env.events(9))[-1])  # its open
    assert (await asyncio.wait_for(anext(updates), 5)).position_id == fresh.position_id
    await updates.aclose()


async def test_a_user_holds_at_most_max_streams_per_user_streams(env: Env) -> None:
    """Every NAV update is offered to every stream: one key's thousands of idle streams
    made each update cost everyone. Past the limit a user's stream is RESOURCE_EXHAUSTED;
    other users' are not, and ending one frees its place."""
    gateway = env.server.gateway
    gateway.settings = gateway.settings.model_copy(update={"max_streams_per_user": 2})
    navs, positions = open_streams("nav"), open_streams("positions")
    first = env.stub.StreamNav(gateway_pb2.StreamNavRequest(), metadata=ALICE)
    second = env.stub.StreamPositions(gateway_pb2.StreamPositionsRequest(), metadata=ALICE)
    await until_streams("nav", navs + 1)
    await until_streams("positions", positions + 1)
    for call in (
        env.stub.StreamNav(gateway_pb2.StreamNavRequest(), metadata=ALICE),
        env.stub.StreamPositions(gateway_pb2.StreamPositionsRequest(), metadata=ALICE),
    ):
        async with asyncio.timeout(10):
            code, details = await _code(call.read())
        assert code is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "2 streams open" in details and "MAX_STREAMS_PER_USER" in details
    bobs = env.stub.StreamNav(gateway_pb2.StreamNavRequest(), metadata=BOB)
    await until_streams("nav", navs + 2)
    first.cancel()
    await until_streams("nav", navs + 1)
    again = env.stub.StreamNav(gateway_pb2.StreamNavRequest(), metadata=ALICE)
    await until_streams("nav", navs + 2)
    for call in (second, bobs, again):
        call.cancel()
    await until_streams("nav", navs)
    await until_streams("positions", positions)
    assert gateway._streams == {}


async def test_another_users_position_is_not_found(env: Env) -> None:
    await env.set_nav(PRODUCT, NAV)
    opened = await env.open("mine")
    before = await env.state()
    code, details = await _code(
        env.stub.GetPosition(
            gateway_pb2.GetPositionRequest(position_id=opened.position_id), metadata=BOB
        )
    )
    assert code is grpc.StatusCode.NOT_FOUND and opened.position_id in details
    missing = "0" * 32
    code2, details2 = await _code(
        env.stub.GetPosition(gateway_pb2.GetPositionRequest(position_id=missing), metadata=BOB)
    )
    assert code2 is grpc.StatusCode.NOT_FOUND  # same answer as for one that does not exist
    assert details2 == details.replace(opened.position_id, missing)
    code, _ = await _code(
        env.stub.ClosePosition(
            gateway_pb2.ClosePositionRequest(
                client_order_id="steal", position_id=opened.position_id, all=True
            ),
            metadata=BOB,
        )
    )
    assert code is grpc.StatusCode.NOT_FOUND
    listed = await env.stub.ListPositions(gateway_pb2.ListPositionsRequest(), metadata=BOB)
    assert list(listed.positions) == []
    assert await env.state() == before


async def test_a_retry_returns_the_original_and_a_different_request_is_refused(env: Env) -> None:
    await env.set_nav(PRODUCT, NAV)
    first = await env.open("retry-me", "500")
    await env.events(1)
    before = await env.state()
    await env.set_nav(PRODUCT, NAV * 2)  # the NAV moved: the retry still gets the original
    again = await env.open("retry-me", "500.000")
    assert again == first
    assert await env.state() == before
    code, details = await _code(env.open("retry-me", "501"))
    assert code is grpc.StatusCode.ALREADY_EXISTS and "retry-me" in details
    code, _ = await _code(env.open("retry-me", "500", product="ETH-USDT:LONG"))
    assert code is grpc.StatusCode.ALREADY_EXISTS
    assert await env.state() == before
    # The same id is a different order for another user.
    bobs = await env.open("retry-me", "500", who=BOB)
    assert bobs.position_id != first.position_id
    assert len(await env.events(2)) == 2


async def test_concurrent_duplicates_make_exactly_one_position(quiet_env: Env) -> None:
    env = quiet_env
    await env.set_nav(PRODUCT, NAV)
    replies = await asyncio.gather(*(env.open("dup", "250") for _ in range(20)))
    assert len({r.SerializeToString() for r in replies}) == 1
    outbox = await env.redis.hgetall(env.server.ledger.outbox_key("BTC-USDT"))
    assert len(outbox) == 1
    ledger = await env.redis.hgetall(env.server.ledger.ledger_key("BTC-USDT"))
    assert ledger[f"{PRODUCT}:units"] == replies[0].units
    assert await env.server.relay.flush("BTC-USDT") == 1
    events = await env.events(1)
    assert [e.opened.event_id for e in events] == [replies[0].order_id]


async def test_concurrent_orders_of_one_product_all_settle_exactly(quiet_env: Env) -> None:
    """No lock around the reads: every order lands once and the ledger sums them; a step
    computed from a moved product is refused with the fresh state (another process)."""
    env = quiet_env
    await env.set_nav(PRODUCT, NAV)
    opened = await asyncio.gather(*(env.open(f"many-{i}", "100") for i in range(20)))
    closes = [
        env.stub.ClosePosition(
            gateway_pb2.ClosePositionRequest(
                client_order_id=f"shut-{i}", position_id=o.position_id, all=True
            ),
            metadata=ALICE,
        )
        for i, o in enumerate(opened[:10])
    ]
    closed = await asyncio.gather(*closes, *(env.open(f"more-{i}", "100") for i in range(10)))
    ledger_key = env.server.ledger.ledger_key("BTC-USDT")
    ledger = await env.redis.hgetall(ledger_key)
    held = sum(Decimal(o.units) for o in opened[10:]) + sum(
        Decimal(r.units) for r in closed[10:] if isinstance(r, gateway_pb2.OpenPositionReply)
    )
    assert Decimal(ledger[f"{PRODUCT}:units"]) == held
    assert Decimal(ledger[f"{PRODUCT}:deposits"]) == 30 * Decimal("100")
    assert len(await env.redis.hgetall(env.server.ledger.outbox_key("BTC-USDT"))) == 40
    # A step computed before those orders (revision 0) is refused, with the state now.
    stale = Snapshot(0, "", {}, {})
    settled = await env.server.ledger.settle(
        "BTC-USDT",
        PRODUCT,
        stale,
        record_id="alice:late",
        record="x:y",
        pid="0" * 32,
        position={"units": "1"},
        ledger={f"{PRODUCT}:units": "1"},
        event=b"",
    )
    assert settled.status is ApplyStatus.CONFLICT and settled.snapshot is not None
    meta = await env.redis.hgetall(env.server.ledger.meta_key("BTC-USDT"))
    assert settled.snapshot[:3] == (40, meta[f"step:{PRODUCT}"], ledger)
    assert await env.redis.hgetall(ledger_key) == ledger


@pytest.mark.parametrize(("field", "value"), [("version", "x"), (f"rev:{PRODUCT}", "x"),
                                             (f"rev:{PRODUCT}", "")])  # fmt: skip
async def test_a_settle_on_a_corrupted_meta_writes_nothing_however_often_retried(
    quiet_env: Env, field: str, value: str
) -> None:
    """The settle script wrote the position and the ledger before the step that failed
    on a version that is not a number, and Redis keeps a script's writes before an error:
    each retry added the deposit again (3,000 booked for three tries of 1,000 that never
    settled). A revision that is not a number cut the conflict reply short (IndexError,
    gRPC UNKNOWN). Both are UNAVAILABLE now, before any write; an order settled before
    is still answered with its recorded reply."""
    env = quiet_env
    await env.set_nav(PRODUCT, NAV)
    good = await env.open("good", "1000")
    meta_key = env.server.ledger.meta_key("BTC-USDT")
    ledger_key = env.server.ledger.ledger_key("BTC-USDT")
    await env.redis.hset(meta_key, field, value)
    assert await env.open("good", "1000") == good

    async def symbols_state() -> dict[str, object]:  # (a validated order keeps its claim)
        return {k: v for k, v in (await env.state()).items() if "{BTC-USDT}" in k}

    before = await symbols_state()
    assert before[ledger_key]
    for _ in range(3):
        code, details = await _code(env.open("bad", "1000"))
        assert code is grpc.StatusCode.UNAVAILABLE, details
        assert "not a number" in details or "not an integer" in details, details
    assert await symbols_state() == before
    assert len(await env.redis.hgetall(env.server.ledger.outbox_key("BTC-USDT"))) == 1


async def test_stored_text_that_is_not_utf8_is_internal_not_unavailable(env: Env) -> None:
    """A NAV hash field that is no UTF-8 failed the call UNAVAILABLE, which tells a
    client to retry: every retry reads the same bytes. It is INTERNAL, saying why; the
    connection the other calls share is not taken down with it."""
    await env.set_nav(PRODUCT, NAV)
    await env.set_nav("ETH-USDT:LONG", NAV)
    name, _ = nav_hash(env.ns, PRODUCT, NAV)
    await env.redis.hset(name, "regime", b"\xc3(")
    request = gateway_pb2.GetProductRequest(product=PRODUCT)
    code, details = await _code(env.stub.GetProduct(request, metadata=ALICE))
    assert code is grpc.StatusCode.INTERNAL and "cannot read" in details, details
    other = gateway_pb2.GetProductRequest(product="ETH-USDT:LONG")
    assert (await env.stub.GetProduct(other, metadata=ALICE)).nav == str(NAV)


@contextlib.asynccontextmanager
async def another_gateway(
    env: Env, redis_url: str, *, relay: bool = False
) -> AsyncIterator[gateway_pb2_grpc.GatewayStub]:
    """A second gateway on the same namespace: its own locks and caches, as another process
    has; only Redis orders the two."""
    server = GatewayServer(_settings(env.ns, redis_url, env.bootstrap), env.redis, relay=relay)
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        yield gateway_pb2_grpc.GatewayStub(channel)
    finally:
        await channel.close()
        await server.stop()


async def test_a_claim_lost_to_another_request_leaves_the_index_to_the_winner(
    quiet_env: Env,
) -> None:
    """Two requests under one client order id, both read no claim: the second's claim
    script must not index the position under its own product (owner() then sent the
    winner's own lookups to the other symbol: NOT_FOUND on a position that exists)."""
    ledger = quiet_env.server.ledger
    pid = order_id("alice", "raced-claim")
    won = await ledger.claim("alice", "raced-claim", "a" * 32 + "|BTC-USDT", pid, PRODUCT)
    lost = await ledger.claim("alice", "raced-claim", "b" * 32 + "|ETH-USDT", pid, "ETH-USDT:LONG")
    assert lost == won == "a" * 32 + "|BTC-USDT"
    assert await ledger.owner("alice", pid) == PRODUCT


async def test_a_quiet_stream_whose_client_pings_it_is_kept(
    quiet_env: Env, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`smartlev watch` pings the gateway (every 20 s) to notice one that stopped
    answering; on a quiet market the gateway sends nothing, and gRPC's default took a
    ping more often than every 5 minutes for abuse: two, and it dropped the connection.
    Here at a tenth of a second both ways, the stream stays up."""
    env = quiet_env
    monkeypatch.setattr(gateway_main, "CLIENT_PINGS_MS", 100)
    server = GatewayServer(_settings(env.ns, redis_url, env.bootstrap), env.redis)
    await server.start()
    channel = grpc.aio.insecure_channel(
        f"127.0.0.1:{server.port}",
        options=[
            ("grpc.keepalive_time_ms", 200),
            ("grpc.keepalive_timeout_ms", 2000),
            ("grpc.http2.ping_timeout_ms", 2000),
            ("grpc.http2.max_pings_without_data", 0),
        ],
    )
    try:
        stream = gateway_pb2_grpc.GatewayStub(channel).StreamNav(
            gateway_pb2.StreamNavRequest(products=[PRODUCT]), metadata=ALICE
        )
        read = asyncio.ensure_future(stream.read())
        done, _ = await asyncio.wait({read}, timeout=5.0)  # pings, and no update
        assert not done, read.exception() if read.done() else None
        stream.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await read
    finally:
        await channel.close()
        await server.stop()


async def test_racing_closes_of_a_position_from_two_gateways_settle_once(
    quiet_env: Env, redis_url: str
) -> None:
    """Closes of one position from two gateways at once: one close settles, the others
    find it closed, and every copy of a request gets the same answer."""
    env = quiet_env
    await env.set_nav(PRODUCT, NAV)
    opened = {o.position_id: o for o in [await env.open(f"raced-{p}") for p in range(6)]}
    # Per position, requests 0..5 each sent twice, spread over both gateways.
    sent = [(pid, f"race-{pid[:6]}-{i}") for pid in opened for i in range(6)] * 2
    async with another_gateway(env, redis_url) as other:
        stubs = [env.stub, other]
        answers = await asyncio.gather(
            *(
                stubs[n % 2].ClosePosition(
                    gateway_pb2.ClosePositionRequest(
                        client_order_id=cid, position_id=pid, all=True
                    ),
                    metadata=ALICE,
                )
                for n, (pid, cid) in enumerate(sent)
            ),
            return_exceptions=True,
        )
    outcomes: dict[str, set[object]] = {}
    closes: dict[str, set[str]] = {pid: set() for pid in opened}
    for (pid, cid), answer in zip(sent, answers, strict=True):
        if isinstance(answer, grpc.aio.AioRpcError):
            assert answer.code() is grpc.StatusCode.FAILED_PRECONDITION, answer.details()
            assert "is closed" in (answer.details() or ""), answer.details()
            outcomes.setdefault(cid, set()).add(answer.code())
        else:
            assert isinstance(answer, gateway_pb2.ClosePositionReply), answer
            outcomes.setdefault(cid, set()).add(answer.SerializeToString())
            closes[pid].add(answer.order_id)
    assert all(len(seen) == 1 for seen in outcomes.values()), outcomes
    assert all(len(ids) == 1 for ids in closes.values()), closes
    paid = [redeem_terms(Decimal(o.units), NAV, ACCOUNTING.close_fee) for o in opened.values()]
    ledger = await env.redis.hgetall(env.server.ledger.ledger_key("BTC-USDT"))
    assert Decimal(ledger[f"{PRODUCT}:units"]) == 0
    assert Decimal(ledger[f"{PRODUCT}:payouts"]) == sum(gross - fee for gross, fee in paid)
    assert Decimal(ledger[f"{PRODUCT}:fees"]) == sum(Decimal(o.fee) for o in opened.values()) + sum(
        fee for _, fee in paid
    )
    assert await env.server.relay.flush("BTC-USDT") == 2 * len(opened)  # opens, one close each
    events = await env.events(2 * len(opened))
    assert Counter(e.WhichOneof("event") for e in events) == {"opened": 6, "closed": 6}


async def close_again_with_twin_between_reads(
    env: Env, other: gateway_pb2_grpc.GatewayStub, split: int, same_request: bool
) -> int:
    """Open a position, then send a close-all of it to `env`'s gateway while the same close
    settles on `other` right after the first `split` of the order's reads; `same_request`
    False sends another request (explicit units) under that id. Returns how many reads
    the order makes."""
    wire = env.server.wire
    read = wire.pipeline
    opened = await env.open(f"split-{split}")
    cid, pid = f"close-{split}", opened.position_id
    first = gateway_pb2.ClosePositionRequest(client_order_id=cid, position_id=pid, all=True)
    again = first if same_request else gateway_pb2.ClosePositionRequest(
        client_order_id=cid, position_id=pid, units=opened.units
    )  # fmt: skip
    twins: list[gateway_pb2.ClosePositionReply] = []
    reads: list[int] = []

    async def twin_between(commands: list[tuple[str, ...]]) -> list[Any]:
        wire.pipeline = read  # type: ignore[method-assign]
        reads.append(len(commands))
        head = await read(commands[:split])
        twins.append(await other.ClosePosition(first, metadata=ALICE))
        return head + await read(commands[split:])

    wire.pipeline = twin_between  # type: ignore[method-assign]
    try:
        if same_request:
            answer = await env.stub.ClosePosition(again, metadata=ALICE)
            assert answer == twins[0], f"the twin settled after read {split}"
        else:
            code, details = await _code(env.stub.ClosePosition(again, metadata=ALICE))
            assert code is grpc.StatusCode.ALREADY_EXISTS, (split, details)
    finally:
        wire.pipeline = read  # type: ignore[method-assign]
    return reads[0]


@pytest.mark.parametrize("same_request", [True, False], ids=["retry", "other-request"])
async def test_a_close_whose_twin_settles_between_its_reads_gets_the_twins_answer(
    quiet_env: Env, redis_url: str, same_request: bool
) -> None:
    """A close-all sent again reaches this gateway while the first copy settles on another
    one, between any two of the copy's reads (a pipeline's commands are not one atomic
    step): the copy gets the first one's reply, and another request under the same id
    ALREADY_EXISTS, wherever between the reads the twin landed; never "is closed"."""
    env = quiet_env
    await env.set_nav(PRODUCT, NAV)
    async with another_gateway(env, redis_url) as other:
        reads = await close_again_with_twin_between_reads(env, other, 1, same_request)
        for split in range(2, reads):
            await close_again_with_twin_between_reads(env, other, split, same_request)
    assert reads == 6  # NAV, revision, ledger, position, claim, record: every gap tried
    ledger = await env.redis.hgetall(env.server.ledger.ledger_key("BTC-USDT"))
    assert Decimal(ledger[f"{PRODUCT}:units"]) == 0  # each position closed, once


async def test_a_snapshot_cached_from_before_redis_lost_writes_is_not_settled_on(
    quiet_env: Env, redis_url: str
) -> None:
    """Redis comes back without its last writes (appendfsync everysec) while this gateway
    still holds the snapshot its last step left; another gateway's steps bring the
    product's revision back to the same number with other entries. This gateway's next
    order is recomputed from those, not settled on the lost ledger: the books stay the
    sum of the positions that exist."""
    env = quiet_env
    await env.set_nav(PRODUCT, NAV)
    raw = Redis.from_url(redis_url)  # bytes: DUMP and RESTORE
    try:
        await env.open("kept", "1000")
        saved = {k: await raw.dump(k) async for k in raw.scan_iter(match=f"{env.ns}*")}
        await env.open("lost-1", "5000")
        await env.open("lost-2", "7000")
        await raw.delete(*[k async for k in raw.scan_iter(match=f"{env.ns}*")])
        for name, dumped in saved.items():
            await raw.restore(name, 0, dumped)
        async with another_gateway(env, redis_url) as other:

            async def open_there(client_id: str) -> None:
                request = gateway_pb2.OpenPositionRequest(
                    client_order_id=client_id, product=PRODUCT, amount_usdt="300"
                )
                await other.OpenPosition(request, metadata=BOB)

            await open_there("theirs-1")
            settle = env.server.ledger.settle

            async def theirs_first(*args: Any, **kwargs: Any) -> Settled:
                env.server.ledger.settle = settle  # type: ignore[method-assign]
                await open_there("theirs-2")  # between this order's read and its step
                return await settle(*args, **kwargs)

            env.server.ledger.settle = theirs_first  # type: ignore[method-assign]
            await env.open("ours", "100")
    finally:
        await raw.aclose()
    positions = [
        await env.redis.hgetall(k)
        async for k in env.redis.scan_iter(match=f"{env.ns}gw:{{BTC-USDT}}:pos:*")
    ]
    assert len(positions) == 4  # kept, theirs-1, theirs-2, ours
    ledger = await env.redis.hgetall(env.server.ledger.ledger_key("BTC-USDT"))
    assert Decimal(ledger[f"{PRODUCT}:units"]) == sum(Decimal(p["units"]) for p in positions)
    assert Decimal(ledger[f"{PRODUCT}:deposits"]) == sum(Decimal(p["amount"]) for p in positions)


async def test_an_owner_cached_from_before_redis_lost_writes_is_read_again(
    quiet_env: Env, redis_url: str
) -> None:
    """The position id comes from (user, client_order_id): after Redis lost the opens
    that this gateway settled and cached the owners of, the client's ids settled again
    on another gateway, for another product. This gateway's cache still named the lost
    product, so GetPosition and ClosePosition answered NOT_FOUND for positions that
    exist, until a restart."""
    env = quiet_env
    other_product, other_side = "ETH-USDT:LONG", "BTC-USDT:SHORT"
    for product, nav in ((PRODUCT, NAV), (other_product, NAV), (other_side, NAV / 2)):
        await env.set_nav(product, nav)
    client_ids = ("shown", "closed", "other-side")
    raw = Redis.from_url(redis_url)  # bytes: DUMP and RESTORE
    try:
        saved = {k: await raw.dump(k) async for k in raw.scan_iter(match=f"{env.ns}*")}
        lost = [await env.open(client_id, "1000") for client_id in client_ids]
        await raw.delete(*[k async for k in raw.scan_iter(match=f"{env.ns}*")])
        for name, dumped in saved.items():
            await raw.restore(name, 0, dumped)
    finally:
        await raw.aclose()
    async with another_gateway(env, redis_url) as other:
        there = [
            await other.OpenPosition(
                gateway_pb2.OpenPositionRequest(
                    client_order_id=client_id, product=product, amount_usdt="2000"
                ),
                metadata=ALICE,
            )
            for client_id, product in zip(
                client_ids, (other_product, other_product, other_side), strict=True
            )
        ]
    assert [p.position_id for p in there] == [p.position_id for p in lost]
    shown = gateway_pb2.GetPositionRequest(position_id=there[0].position_id)
    both = await asyncio.gather(  # at once: each finds the cached owner wrong
        *(env.stub.GetPosition(shown, metadata=ALICE) for _ in range(2))
    )
    assert [(got.product, got.units) for got in both] == [(other_product, there[0].units)] * 2
    closed = await env.stub.ClosePosition(
        gateway_pb2.ClosePositionRequest(
            client_order_id="closed-close", position_id=there[1].position_id, all=True
        ),
        metadata=ALICE,
    )
    assert (closed.product, closed.units) == (other_product, there[1].units)
    # the other side of the same symbol: the cached owner's key holds a position, the
    # other side's, which was closed at this side's NAV into this side's ledger
    closed = await env.stub.ClosePosition(
        gateway_pb2.ClosePositionRequest(
            client_order_id="other-side-close", position_id=there[2].position_id, all=True
        ),
        metadata=ALICE,
    )
    assert (closed.product, Decimal(closed.nav)) == (other_side, NAV / 2)
    ledger = await env.redis.hgetall(env.server.ledger.ledger_key("BTC-USDT"))
    assert Decimal(ledger[f"{other_side}:units"]) == 0
    assert Decimal(ledger.get(f"{PRODUCT}:units", "0")) == 0


async def test_opens_from_two_gateways_at_once_all_count_in_the_ledger(
    quiet_env: Env, redis_url: str
) -> None:
    """Each gateway orders its own settles of a product; across the two only the step's
    revision check does: a step computed from a ledger the other moved is recomputed."""
    env = quiet_env
    await env.set_nav(PRODUCT, NAV)
    async with another_gateway(env, redis_url) as other:
        stubs = [env.stub, other]
        opened = await asyncio.gather(
            *(
                stubs[n % 2].OpenPosition(
                    gateway_pb2.OpenPositionRequest(
                        client_order_id=f"both-{n}", product=PRODUCT, amount_usdt="100"
                    ),
                    metadata=ALICE,
                )
                for n in range(40)
            )
        )
    ledger = await env.redis.hgetall(env.server.ledger.ledger_key("BTC-USDT"))
    assert Decimal(ledger[f"{PRODUCT}:units"]) == sum(Decimal(o.units) for o in opened)
    assert Decimal(ledger[f"{PRODUCT}:deposits"]) == 40 * Decimal("100")
    assert Decimal(ledger[f"{PRODUCT}:fees"]) == sum(Decimal(o.fee) for o in opened)
    assert await env.server.relay.flush("BTC-USDT") == 40


async def test_outbox_republishes_after_a_crash_between_ack_and_delete(quiet_env: Env) -> None:
    env = quiet_env
    await env.set_nav(PRODUCT, NAV)
    opened = await env.open("crash", "100")
    fields = await env.server.relay.publish("BTC-USDT")  # acked, then the process "dies"
    assert len(fields) == 1
    assert await env.server.relay.flush("BTC-USDT") == 1  # the restart publishes again
    events = await env.events(2)
    # the same event twice, by its id (hedging applies an id once: test_hedging.py)
    assert [e.opened.event_id for e in events] == [opened.order_id] * 2
    assert events[0] == events[1]
    assert await env.server.relay.flush("BTC-USDT") == 0


async def test_an_ack_deletes_only_the_event_it_was_for(quiet_env: Env) -> None:
    """Redis can lose its last writes (AOF fsyncs once a second): a settle the relay had
    read and published is gone, and the next settle takes its version, the outbox field
    the relay is about to delete. Deleted by field alone, that order never went out."""
    env = quiet_env
    await env.set_nav(PRODUCT, NAV)
    await env.open("published", "100")
    relay, outbox = env.server.relay, env.server.ledger.outbox_key("BTC-USDT")
    [(field, event)] = await relay.publish("BTC-USDT")  # acked by Kafka, not yet deleted
    later = await env.open("reused", "100")
    [newer] = [f for f in await env.redis.hkeys(outbox) if f != field]
    await env.redis.hset(outbox, field, await env.redis.hget(outbox, newer))  # Redis lost
    await env.redis.hdel(outbox, newer)  # the first settle; the second took its version
    await env.redis.zrem(env.server.ledger.outbox_index_key("BTC-USDT"), newer)
    await env.server.ledger.acked("BTC-USDT", [(field, event)])
    assert await env.redis.hkeys(outbox) == [field]  # not the event it was for: kept
    assert await relay.flush("BTC-USDT") == 1
    events = await env.events(2)
    assert [e.opened.event_id for e in events][-1] == later.order_id


def window_relay(env: Env, window: int) -> OutboxRelay:
    """A relay of `env`'s outbox that reads `window` entries at a time (not running)."""
    server = env.server
    return OutboxRelay(
        server.ledger,
        server.producer,
        ORDERS_EVENTS.in_namespace(env.ns).name,
        StrategyConfig().instruments,
        poll_s=1.0,
        window=window,
    )


async def test_a_backlog_goes_out_a_window_at_a_time_oldest_first(quiet_env: Env) -> None:
    """After a Kafka outage the outbox holds a backlog: read whole, it was one Redis reply
    every order waited behind. Each read takes the oldest `window`; all go, in order."""
    env = quiet_env
    await env.set_nav(PRODUCT, NAV)
    opened = [await env.open(f"backlog-{i}", "100") for i in range(25)]
    ledger = env.server.ledger
    settled = await env.redis.zrange(ledger.outbox_index_key("BTC-USDT"), 0, -1)
    assert len(settled) == 25
    relay = window_relay(env, window=10)
    first = await relay.publish("BTC-USDT")  # published, not yet deleted
    assert [field for field, _ in first] == sorted(settled)[:10]
    await ledger.acked("BTC-USDT", first)
    assert await relay.flush("BTC-USDT") == 15
    events = await env.events(25)
    assert [e.opened.event_id for e in events] == [o.order_id for o in opened]
    assert await env.redis.exists(ledger.outbox_key("BTC-USDT")) == 0
    assert await env.redis.exists(ledger.outbox_index_key("BTC-USDT")) == 0


async def older_gateway_left_the_outbox_alone(redis: Redis, index: str, outbox: str) -> None:
    """An outbox from before its index; the one entry indexed lost its event."""
    fields = await redis.zrange(index, 0, -1)
    await redis.delete(index)
    await redis.zadd(index, {fields[0]: int(fields[0])})
    await redis.hdel(outbox, fields[0])


async def rolling_deploy_with_equal_counts(redis: Redis, index: str, outbox: str) -> None:
    """An older relay deleted an indexed entry's event and an older gateway settled an
    entry it did not index: the counts agree, the contents do not."""
    fields = await redis.zrange(index, 0, -1)
    await redis.hdel(outbox, fields[0])
    await redis.zrem(index, fields[1])
    assert await redis.zcard(index) == await redis.hlen(outbox)


@pytest.mark.parametrize(
    ("settled", "window", "tamper"),
    [(4, 2, older_gateway_left_the_outbox_alone), (3, 1, rolling_deploy_with_equal_counts)],
)
async def test_an_index_that_does_not_match_its_outbox_is_rebuilt_from_it(
    quiet_env: Env,
    settled: int,
    window: int,
    tamper: Callable[[Redis, str, str], Awaitable[None]],
) -> None:
    """Every event still in the outbox goes out, in order; none whose event is gone."""
    env = quiet_env
    ledger = env.server.ledger
    await env.set_nav(PRODUCT, NAV)
    opened = [await env.open(f"tampered-{i}", "100") for i in range(settled)]
    index = ledger.outbox_index_key("BTC-USDT")
    await tamper(env.redis, index, ledger.outbox_key("BTC-USDT"))
    assert await window_relay(env, window=window).flush("BTC-USDT") == settled - 1
    events = await env.events(settled - 1)
    assert [e.opened.event_id for e in events] == [o.order_id for o in opened[1:]]
    assert await env.redis.exists(index) == 0


async def test_entries_left_in_an_outbox_go_out_while_other_symbols_keep_the_relay_busy(
    quiet_env: Env,
) -> None:
    """A relay sweeps every symbol at least every poll_s, however often settles of
    another symbol wake it: an entry a failed sweep, a crash or another instance left
    must not wait for a quiet moment."""
    env = quiet_env
    server = env.server
    # Another instance's relay, as it were: this gateway's own does not run here.
    relay = OutboxRelay(
        server.ledger,
        server.producer,
        ORDERS_EVENTS.in_namespace(env.ns).name,
        StrategyConfig().instruments,
        poll_s=0.3,
        interval_s=0.02,
    )

    async def eth_settles() -> None:
        while True:
            relay.wake("ETH-USDT")
            await asyncio.sleep(0.05)

    tasks = [asyncio.create_task(relay.run()), asyncio.create_task(eth_settles())]
    try:
        await asyncio.sleep(0.5)  # the relay's first full sweep is behind it
        await env.set_nav(PRODUCT, NAV)
        opened = await env.open("left-behind", "100")  # wakes nothing this relay hears
        events = await env.events(1, timeout_s=5)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    assert [e.opened.event_id for e in events] == [opened.order_id]


async def test_the_relay_sweeps_at_once_after_a_quiet_spell_and_at_most_every_interval(
    quiet_env: Env,
) -> None:
    """An order after a quiet spell goes out at once; orders settled right after a sweep
    wait for the interval and go out together (one sweep, one produce request)."""
    env = quiet_env
    relay = env.server.relay
    relay.interval_s, relay.poll_s = 1.0, 60.0
    sweeps: list[tuple[float, int]] = []  # (when it began, events published) if any
    flush = relay.flush

    async def timed(symbol: str) -> int:
        began = time.monotonic()
        count = await flush(symbol)
        if count:
            sweeps.append((began, count))
        return count

    async def published(total: int) -> None:
        async with asyncio.timeout(5):
            while sum(count for _, count in sweeps) < total:
                await asyncio.sleep(0.01)

    relay.flush = timed  # type: ignore[method-assign]
    await env.set_nav(PRODUCT, NAV)
    task = asyncio.create_task(relay.run())
    try:
        await asyncio.sleep(1.2)  # the first (full) sweep, then longer than an interval
        began = time.monotonic()
        await env.open("after-quiet", "100")
        await published(1)
        first = sweeps[0][0]
        assert first - began < 0.5  # not an interval later
        await asyncio.gather(*(env.open(f"busy-{n}", "100") for n in range(3)))
        await published(4)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert [count for _, count in sweeps] == [1, 3]
    assert sweeps[1][0] - first >= relay.interval_s - 1e-3  # an interval after the first


async def test_a_relay_whose_producer_lost_its_sequence_renews_it(quiet_env: Env) -> None:
    """A batch that expired unsent (a partition without a leader past the request
    timeout) takes sequence numbers the broker never sees: the idempotent producer then
    sends every later batch of that partition past the gap, refused for good
    (OutOfOrderSequenceNumber), and the orders stayed settled and unpublished until a
    restart. A failed flush now renews the producer; the order goes out, once."""
    env = quiet_env
    relay, topic = env.server.relay, ORDERS_EVENTS.in_namespace(env.ns).name
    relay.interval_s, relay.poll_s = 0.02, 0.2
    await env.set_nav(PRODUCT, NAV)
    first = await env.open("before-the-gap", "100")
    assert await relay.flush("BTC-USDT") == 1
    stale = env.server.producer
    partition = await relay.sender.partition(topic, b"BTC-USDT")
    stale._txn_manager.increment_sequence_number(TopicPartition(topic, partition), 50)
    after = await env.open("after-the-gap", "100")
    with pytest.raises(KafkaError):  # as it was: refused, and every retry the same
        await relay.flush("BTC-USDT")
    task = asyncio.create_task(relay.run())
    try:
        events = await env.events(2)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert [e.opened.event_id for e in events] == [first.order_id, after.order_id]
    assert env.server.producer is not stale and relay.sender.producer is env.server.producer


async def test_a_symbol_whose_send_hangs_holds_up_no_other(quiet_env: Env) -> None:
    """A sweep waited for every symbol's flush: a BTC send that hung (a partition
    without a leader) held ETH's orders for as long, and a sweep that failed left its
    other flushes running while the next one flushed the same symbols again (each ETH
    event published three times in three seconds)."""
    env = quiet_env
    relay = env.server.relay
    relay.interval_s, relay.poll_s = 0.02, 0.2
    send_all = relay.sender.send_all
    hung = asyncio.Event()
    published: list[bytes] = []

    async def send(messages: Any) -> None:
        batch = list(messages)
        if any(key == b"BTC-USDT" for _, key, _ in batch):
            hung.set()
            await asyncio.Event().wait()  # never acked
        await send_all(batch)
        published.extend(event for _, _, event in batch)

    relay.sender.send_all = send  # type: ignore[method-assign]
    await env.set_nav(PRODUCT, NAV)
    await env.set_nav("ETH-USDT:LONG", NAV)
    task = asyncio.create_task(relay.run())
    try:
        await env.open("stuck", "100")
        await asyncio.wait_for(hung.wait(), 5)
        eth = [await env.open(f"eth-{n}", "100", product="ETH-USDT:LONG") for n in range(2)]
        await asyncio.sleep(1.0)  # five full sweeps
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    events = [orders_pb2.OrderEvent.FromString(e).opened.event_id for e in published]
    assert events == [o.order_id for o in eth]  # each once, while BTC's send hangs
    assert relay._flushing == {}  # the hung flush ended with the relay


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("client_id", "product", "amount", "code", "says"),
    [
        ("v1", "DOGE-USDT:LONG", "100", grpc.StatusCode.NOT_FOUND, "unknown product"),
        ("v2", "", "100", grpc.StatusCode.INVALID_ARGUMENT, "product is required"),
        ("v3", PRODUCT, "0", grpc.StatusCode.INVALID_ARGUMENT, "must be > 0"),
        ("v4", PRODUCT, "-5", grpc.StatusCode.INVALID_ARGUMENT, "must be > 0"),
        ("v5", PRODUCT, "NaN", grpc.StatusCode.INVALID_ARGUMENT, "not a finite number"),
        ("v6", PRODUCT, "Infinity", grpc.StatusCode.INVALID_ARGUMENT, "not a finite number"),
        ("v7", PRODUCT, "1e3", grpc.StatusCode.INVALID_ARGUMENT, "not a plain decimal"),
        ("v8", PRODUCT, "100.123456789", grpc.StatusCode.INVALID_ARGUMENT, "decimal places"),
        ("v9", PRODUCT, "9.99", grpc.StatusCode.INVALID_ARGUMENT, "below the minimum"),
        ("v10", PRODUCT, "1000000.01", grpc.StatusCode.INVALID_ARGUMENT, "above the maximum"),
        ("v11", PRODUCT, "", grpc.StatusCode.INVALID_ARGUMENT, "amount_usdt is required"),
        ("bad id!", PRODUCT, "100", grpc.StatusCode.INVALID_ARGUMENT, "client_order_id"),
        ("", PRODUCT, "100", grpc.StatusCode.INVALID_ARGUMENT, "client_order_id"),
        ("x" * 65, PRODUCT, "100", grpc.StatusCode.INVALID_ARGUMENT, "client_order_id"),
    ],
)
async def test_invalid_opens_change_nothing(
    env: Env, client_id: str, product: str, amount: str, code: grpc.StatusCode, says: str
) -> None:
    await env.set_nav(PRODUCT, NAV)
    await env.open("existing")
    before = await env.state()
    got, details = await _code(env.open(client_id, amount, product=product))
    assert (got, says in details) == (code, True), details
    assert await env.state() == before


async def test_closes_that_cannot_be_done_change_nothing(env: Env) -> None:
    await env.set_nav(PRODUCT, NAV)
    opened = await env.open("held")
    before = await env.state()
    cases = [
        (
            "c1",
            opened.position_id,
            str(Decimal(opened.units) + Decimal("0.00000001")),
            False,
            grpc.StatusCode.FAILED_PRECONDITION,
            "the position holds",
        ),
        (
            "c1-dust",
            opened.position_id,
            "0.08",  # 9.87654312 USDT at NAV 123.45678901
            False,
            grpc.StatusCode.FAILED_PRECONDITION,
            "below the minimum order of 10; close more of the position, or all of it",
        ),
        ("c2", "not-an-id", "1", False, grpc.StatusCode.INVALID_ARGUMENT, "position_id"),
        ("c3", "f" * 32, "1", False, grpc.StatusCode.NOT_FOUND, "not found"),
        ("c4", opened.position_id, "1", True, grpc.StatusCode.INVALID_ARGUMENT, "not both"),
        (
            "c5",
            opened.position_id,
            "",
            False,
            grpc.StatusCode.INVALID_ARGUMENT,
            "units is required",
        ),
        (
            "c6",
            opened.position_id,
            "0.000000001",
            False,
            grpc.StatusCode.INVALID_ARGUMENT,
            "decimal places",
        ),
    ]
    for client_id, pid, units, close_all, code, says in cases:
        request = gateway_pb2.ClosePositionRequest(
            client_order_id=client_id, position_id=pid, units=units, all=close_all
        )
        got, details = await _code(env.stub.ClosePosition(request, metadata=ALICE))
        assert (got, says in details) == (code, True), (client_id, details)
    assert await env.state() == before


async def test_an_order_the_ledger_keeps_moving_under_is_unavailable_to_retry(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Other instances settling the product faster than this one re-quotes: after 50
    tries the order ended UNKNOWN (a RuntimeError), which says nothing to retry on."""
    await env.set_nav(PRODUCT, NAV)
    ledger = env.server.ledger
    books = await env.redis.hgetall(ledger.ledger_key("BTC-USDT"))
    settle = ledger.settle

    async def someone_else_first(
        symbol: str, product: str, snapshot: Snapshot, **step: Any
    ) -> Settled:
        await env.redis.hincrby(ledger.meta_key(symbol), f"rev:{product}", 1)
        settled = await settle(symbol, product, snapshot, **step)
        assert settled.status is ApplyStatus.CONFLICT  # refused: the product moved
        return settled

    monkeypatch.setattr(ledger, "settle", someone_else_first)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await env.open("contended")
    got, details = refused.value.code(), refused.value.details() or ""
    assert (got, "retry with the same client_order_id" in details) == (
        grpc.StatusCode.UNAVAILABLE,
        True,
    )
    # marked as the gateway's own (a client tells it from a lost connection: shared/cli.py)
    assert set(SERVER_ANSWERED) <= set(refused.value.trailing_metadata() or ())
    position = ledger.position_key("BTC-USDT", order_id("alice", "contended"))
    assert not await env.redis.exists(position)  # nothing settled ...
    assert await env.redis.hgetall(ledger.ledger_key("BTC-USDT")) == books
    monkeypatch.setattr(ledger, "settle", settle)
    retried = await env.open("contended")  # ... and the retry settles
    assert retried.position.open and retried.position_id == order_id("alice", "contended")


async def refused_both_ways(env: Env, position_id: str, tag: str, why: str) -> None:
    """PRODUCT is not tradable, and an open of it and a close of `position_id` are
    FAILED_PRECONDITION (the open saying `why`), changing nothing."""
    before = await env.state()
    product = await product_of(env, PRODUCT)  # as the orders below find it, saying why
    assert not product.tradable and why in product.not_tradable_reason
    code, details = await _code(env.open(tag))
    assert code is grpc.StatusCode.FAILED_PRECONDITION and why in details
    code, _ = await _code(
        env.stub.ClosePosition(
            gateway_pb2.ClosePositionRequest(
                client_order_id=f"{tag}-close", position_id=position_id, all=True
            ),
            metadata=ALICE,
        )
    )
    assert code is grpc.StatusCode.FAILED_PRECONDITION
    assert await env.state() == before


async def test_no_fresh_nav_means_no_trading(env: Env) -> None:
    await env.set_nav(PRODUCT, NAV)
    opened = await env.open("before-stale")
    await env.set_nav(PRODUCT, NAV, age_s=60)
    await refused_both_ways(env, opened.position_id, "stale", "stale")
    # A product nobody holds and the NAV service never marked opens at the initial NAV.
    untouched = await product_of(env, "ETH-USDT:SHORT")
    assert untouched.tradable and untouched.not_tradable_reason == ""
    first = await env.open("first-eth", "100", product="ETH-USDT:SHORT")
    assert first.nav == str(ACCOUNTING.initial_nav)
    # Held now, and still no NAV from the NAV service: not tradable, as an order finds it.
    assert not (await product_of(env, "ETH-USDT:SHORT")).tradable
    code, details = await _code(env.open("second-eth", "100", product="ETH-USDT:SHORT"))
    assert code is grpc.StatusCode.FAILED_PRECONDITION and "no NAV published yet" in details
    # A stale NAV of a product with no units anywhere: nothing can move it, tradable.
    await env.set_nav("ETH-USDT:LONG", NAV, age_s=600, units=Decimal(0))
    assert (await product_of(env, "ETH-USDT:LONG")).tradable
    assert (await env.open("stale-but-empty", "100", product="ETH-USDT:LONG")).nav == str(NAV)
    listed = await env.stub.ListProducts(gateway_pb2.ListProductsRequest(), metadata=ALICE)
    assert {p.product: p.tradable for p in listed.products}["ETH-USDT:SHORT"] is False
    # Units out, and a NAV only orders marked (cash, no price yet): not tradable either.
    await env.set_nav("ETH-USDT:LONG", NAV)
    await env.redis.hset(f"{env.ns}nav:{{ETH-USDT:LONG}}", mapping={"written_ns": 0, "price": 0})
    code, details = await _code(env.open("unpriced", "100", product="ETH-USDT:LONG"))
    assert code is grpc.StatusCode.FAILED_PRECONDITION and "no price has marked" in details


async def test_no_orders_at_a_nav_the_insurance_fund_holds_up_at_a_print(env: Env) -> None:
    """At a last trade the mark ignores, the books' NAV is held up by the fund's advance:
    1% of the mark's value for a 3x short at a print 3.3x the mark. A deposit at it
    bought 100x the units its money is worth, a close got 1% of it."""
    await env.set_nav(PRODUCT, NAV)
    opened = await env.open("before-print")
    await env.set_nav(PRODUCT, NAV / 100, advanced=Decimal("5876386.42"))
    await refused_both_ways(env, opened.position_id, "at-print", "print the mark ignores")
    await env.set_nav(PRODUCT, NAV)  # the next price: repaid, nothing advanced
    assert (await env.open("after-print")).nav == str(NAV)


async def test_a_regime_this_build_does_not_know_reads_as_unspecified(env: Env) -> None:
    """A NAV hash another build's NAV service wrote, in a regime this build lacks: the
    product still reads (GetProduct and ListProducts failed UNKNOWN on it)."""
    await env.set_nav(PRODUCT, NAV)
    await env.redis.hset(f"{env.ns}nav:{{{PRODUCT}}}", "regime", "REGIME_FROM_THE_FUTURE")
    assert (await product_of(env, PRODUCT)).regime == common_pb2.REGIME_UNSPECIFIED
    listed = await env.stub.ListProducts(gateway_pb2.ListProductsRequest(), metadata=ALICE)
    [mine] = [p for p in listed.products if p.product == PRODUCT]
    assert (mine.regime, mine.nav) == (common_pb2.REGIME_UNSPECIFIED, str(NAV))


@pytest.mark.parametrize(
    ("products", "code", "detail"),
    [
        ([""], grpc.StatusCode.INVALID_ARGUMENT, "product is required"),
        ([PRODUCT, "DOGE-USDT:LONG"], grpc.StatusCode.NOT_FOUND, "unknown product"),
    ],
)
async def test_a_nav_stream_of_a_bad_product_is_refused_as_orders_are(
    env: Env, products: list[str], code: grpc.StatusCode, detail: str
) -> None:
    stream = env.stub.StreamNav(gateway_pb2.StreamNavRequest(products=products), metadata=ALICE)
    got, details = await _code(stream.read())
    assert got is code and detail in details


async def product_of(env: Env, product: str) -> gateway_pb2.Product:
    reply: gateway_pb2.Product = await env.stub.GetProduct(
        gateway_pb2.GetProductRequest(product=product), metadata=ALICE
    )
    return reply


async def test_oversized_message_is_refused(env: Env) -> None:
    """Over the gateway's limit: INVALID_ARGUMENT saying the size; far over it, the
    transport refuses it before any handler runs. Nothing changes either way."""
    await env.set_nav(PRODUCT, NAV)
    before = await env.state()
    limit = env.server.settings.max_message_bytes
    for method, request in [
        (
            env.stub.OpenPosition,
            gateway_pb2.OpenPositionRequest(
                client_order_id="big", product=PRODUCT, amount_usdt="1" * (limit + 1)
            ),
        ),
        (env.stub.ListProducts, gateway_pb2.ListProductsRequest()),  # within the limit
        (
            env.stub.GetProduct,
            gateway_pb2.GetProductRequest(product="X" * (limit + 1)),
        ),
    ]:
        if request.ByteSize() <= limit:
            await method(request, metadata=ALICE)
            continue
        code, details = await _code(method(request, metadata=ALICE))
        assert code is grpc.StatusCode.INVALID_ARGUMENT, details
        size = request.ByteSize()
        assert details == f"request is {size:,} bytes, over the gateway's limit of {limit:,}"
    stream = env.stub.StreamNav(
        gateway_pb2.StreamNavRequest(products=["P" * 100] * (limit // 100)), metadata=ALICE
    )
    code, details = await _code(stream.read())
    assert code is grpc.StatusCode.INVALID_ARGUMENT and "over the gateway's limit" in details
    huge = gateway_pb2.OpenPositionRequest(
        client_order_id="huge",
        product=PRODUCT,
        amount_usdt="1" * (env.server.settings.transport_max_bytes + 1),
    )
    code, _ = await _code(env.stub.OpenPosition(huge, metadata=ALICE))
    assert code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert await env.state() == before


# --------------------------------------------------------------------------- service


async def test_health_serving_and_reflection(env: Env) -> None:
    health = health_pb2_grpc.HealthStub(env.channel)
    for _ in range(50):
        reply = await health.Check(health_pb2.HealthCheckRequest(service="smartlev.v1.Gateway"))
        if reply.status == health_pb2.HealthCheckResponse.SERVING:
            break
        await asyncio.sleep(0.1)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    sync_channel = grpc.insecure_channel(f"127.0.0.1:{env.server.port}")
    try:
        database = ProtoReflectionDescriptorDatabase(sync_channel)
        services = await asyncio.to_thread(database.get_services)
        assert "smartlev.v1.Gateway" in services
    finally:
        sync_channel.close()


async def read_while_publishing(
    env: Env, stream: grpc.aio.UnaryStreamCall, navs: list[tuple[str, str]]
) -> nav_pb2.NavUpdated:
    """Publish `navs` ((product, nav) NAV updates) to nav.updates again and again until
    `stream` delivers something; returns it. A stream subscribes a moment after the call
    starts, and the feed reads from the end on: until then an update is not for it."""
    producer = AIOKafkaProducer(bootstrap_servers=env.bootstrap)
    await producer.start()
    topic = NAV_UPDATES.in_namespace(env.ns).name

    async def publish() -> None:
        for seq in itertools.count(NEXT_SEQ):  # each a new one: the feed shows none again
            for product, nav in navs:
                update = nav_pb2.NavUpdated(
                    event_id=f"{product}:{nav}:{seq}", product=product, nav=nav, seq=seq
                )
                await producer.send_and_wait(
                    topic, update.SerializeToString(), key=product.encode()
                )
            await asyncio.sleep(0.25)

    publisher = asyncio.create_task(publish())
    try:
        got: nav_pb2.NavUpdated = await asyncio.wait_for(stream.read(), 10)
    finally:
        publisher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await publisher
        await producer.stop()
    return got


async def test_stream_nav_delivers_published_updates(env: Env) -> None:
    stream = env.stub.StreamNav(gateway_pb2.StreamNavRequest(products=[PRODUCT]), metadata=ALICE)
    positions = env.stub.StreamPositions(gateway_pb2.StreamPositionsRequest(), metadata=ALICE)
    await env.set_nav(PRODUCT, NAV)
    opened = await env.open("streamed")
    first = await asyncio.wait_for(positions.read(), 5)
    assert first.position_id == opened.position_id
    got = await read_while_publishing(env, stream, [("ETH-USDT:LONG", "1"), (PRODUCT, "130.5")])
    assert (got.product, got.nav) == (PRODUCT, "130.5")  # the ETH update was filtered out
    moved = await asyncio.wait_for(positions.read(), 10)
    assert moved.nav == "130.5"
    assert Decimal(moved.value) == (Decimal(opened.units) * Decimal("130.5")).quantize(
        Decimal("0.00000001"), rounding="ROUND_DOWN"
    )
    stream.cancel()
    positions.cancel()


async def test_a_position_stream_shows_a_nav_update_only_when_it_moves_the_nav(
    env: Env,
) -> None:
    """An unhedged product's ticks keep its NAV: each one sent every position of the
    product again, unchanged, to every holder's stream."""
    positions = env.stub.StreamPositions(gateway_pb2.StreamPositionsRequest(), metadata=ALICE)
    await env.set_nav(PRODUCT, NAV)
    opened = await env.open("steady")
    assert (await asyncio.wait_for(positions.read(), 5)).position_id == opened.position_id
    moved = await read_while_publishing(env, positions, [(PRODUCT, "130.5")])
    assert moved.nav == "130.5"
    # the same NAV again (other event ids: the feed drops one it saw), then 131 at the
    # same seq: only 131 is news
    again = [(PRODUCT, "130.50"), (PRODUCT, "131")]
    later = await read_while_publishing(env, positions, again)
    assert (later.position_id, later.nav) == (opened.position_id, "131")
    positions.cancel()


async def test_a_position_stream_skips_updates_it_could_not_show(env: Env) -> None:
    """A NavUpdated whose NAV is no decimal and an order event of the caller whose
    position id is no id are skipped by the feed; the stream goes on (they ended it
    UNKNOWN: the NAV failed to parse, the id to make a Redis key)."""
    positions = env.stub.StreamPositions(gateway_pb2.StreamPositionsRequest(), metadata=ALICE)
    await env.set_nav(PRODUCT, NAV)
    opened = await env.open("before-poison")
    assert (await asyncio.wait_for(positions.read(), 5)).position_id == opened.position_id
    poison = orders_pb2.OrderEvent(
        opened=orders_pb2.PositionOpened(
            event_id="poison", position_id="", user_id="alice", product=PRODUCT
        )
    )
    producer = AIOKafkaProducer(bootstrap_servers=env.bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(
            ORDERS_EVENTS.in_namespace(env.ns).name, poison.SerializeToString(), key=b"BTC-USDT"
        )
        bad_nav = nav_pb2.NavUpdated(event_id="poison", product=PRODUCT, nav="NaN")
        await producer.send_and_wait(
            NAV_UPDATES.in_namespace(env.ns).name,
            bad_nav.SerializeToString(),
            key=PRODUCT.encode(),
        )
    finally:
        await producer.stop()
    after = await env.open("after-poison")  # its event follows the poison on the partition
    assert (await asyncio.wait_for(positions.read(), 10)).position_id == after.position_id
    moved = await read_while_publishing(env, positions, [(PRODUCT, "130.5")])
    assert moved.nav == "130.5"
    positions.cancel()


async def test_streams_end_unavailable_when_the_feed_stops(env: Env) -> None:
    """A fetch loop that ends (a bug in it) ends every open stream UNAVAILABLE, refuses
    new ones and fails /healthz's stream_feed check, instead of leaving streams waiting
    forever on a feed that stopped while the gateway says it serves."""
    feed = env.server.feed
    assert feed.health() is True
    stream = env.stub.StreamNav(gateway_pb2.StreamNavRequest(products=[PRODUCT]), metadata=ALICE)
    await asyncio.sleep(0.5)  # subscribed

    def bug(topic: str, offset: int, value: bytes) -> None:
        raise RuntimeError("a bug in the feed")

    feed._dispatch = bug  # type: ignore[method-assign]
    code, details = await _code(read_while_publishing(env, stream, [(PRODUCT, "130.5")]))
    assert code is grpc.StatusCode.UNAVAILABLE and "a bug in the feed" in details
    assert "stream feed stopped" in str(feed.health())
    late = env.stub.StreamNav(gateway_pb2.StreamNavRequest(), metadata=ALICE)
    code, details = await _code(late.read())
    assert code is grpc.StatusCode.UNAVAILABLE and "stream feed stopped" in details


async def test_streams_end_unavailable_when_fetches_keep_failing(env: Env) -> None:
    """A fetch error is retried; one that lasts (an authorization revoked) stops the
    feed, ending its streams UNAVAILABLE, instead of retrying behind a green check."""
    feed = env.server.feed
    feed.give_up_s = 0.5
    stream = env.stub.StreamNav(gateway_pb2.StreamNavRequest(products=[PRODUCT]), metadata=ALICE)
    await asyncio.sleep(0.5)  # subscribed

    async def refused(*args: object, **kwargs: object) -> object:
        raise TopicAuthorizationFailedError("not allowed to read")

    feed.consumer.getmany = refused  # type: ignore[method-assign]
    code, details = await _code(asyncio.wait_for(stream.read(), 10))
    assert code is grpc.StatusCode.UNAVAILABLE and "TopicAuthorizationFailedError" in details
    assert "stream feed stopped" in str(feed.health())


def paused_topics(env: Env) -> set[str]:
    """The topics whose partitions the gateway's stream feed does not fetch."""
    return {partition.topic for partition in env.server.feed.consumer.paused()}


async def until_streams(kind: str, count: float) -> None:
    async with asyncio.timeout(10):  # a stream (un)subscribes a moment after its call
        while open_streams(kind) != count:
            await asyncio.sleep(0.02)


FROZEN_CLIENT = """
import sys, grpc
from smartlev.v1 import gateway_pb2, gateway_pb2_grpc
stub = gateway_pb2_grpc.GatewayStub(grpc.insecure_channel(sys.argv[1]))
key = (("authorization", "Bearer dev-alice-key"),)
for _ in stub.StreamNav(gateway_pb2.StreamNavRequest(), metadata=key):
    pass
"""


async def test_a_stream_whose_client_froze_ends(env: Env, redis_url: str) -> None:
    """A client gone without closing TCP (a dropped network, a frozen host: here a
    stopped process) held its stream, its queue and its subscription until TCP gave up,
    two hours on. The gateway pings a quiet connection and drops a peer that does not
    answer."""
    settings = _settings(env.ns, redis_url, env.bootstrap).model_copy(
        update={"keepalive_s": 1.0, "keepalive_timeout_s": 1.0}
    )
    server = GatewayServer(settings, env.redis)
    await server.start()
    before = open_streams("nav")
    client = subprocess.Popen(
        [sys.executable, "-c", FROZEN_CLIENT, f"127.0.0.1:{server.port}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        await until_streams("nav", before + 1)
        client.send_signal(signal.SIGSTOP)  # its TCP stays open; it answers nothing
        await until_streams("nav", before)  # within keepalive + timeout (+ slack)
    finally:
        client.kill()
        client.wait()
        await server.stop()


async def test_the_feed_fetches_only_the_topics_that_open_streams_follow(env: Env) -> None:
    """No stream, no fetching; a NAV stream follows nav.updates, a position stream both
    topics; a stream opened after the others ended starts from now, not from where the
    feed paused (what was published meanwhile is not news)."""
    navs_topic = NAV_UPDATES.in_namespace(env.ns).name
    orders_topic = ORDERS_EVENTS.in_namespace(env.ns).name
    assert paused_topics(env) == {navs_topic, orders_topic}
    before = {kind: open_streams(kind) for kind in ("nav", "positions")}
    first = env.stub.StreamNav(gateway_pb2.StreamNavRequest(products=[PRODUCT]), metadata=ALICE)
    assert (await read_while_publishing(env, first, [(PRODUCT, "101")])).nav == "101"
    assert paused_topics(env) == {orders_topic}
    positions = env.stub.StreamPositions(gateway_pb2.StreamPositionsRequest(), metadata=ALICE)
    await until_streams("positions", before["positions"] + 1)
    assert paused_topics(env) == set()
    positions.cancel()
    await until_streams("positions", before["positions"])
    assert paused_topics(env) == {orders_topic}
    first.cancel()
    await until_streams("nav", before["nav"])
    assert paused_topics(env) == {navs_topic, orders_topic}

    producer = AIOKafkaProducer(bootstrap_servers=env.bootstrap)
    await producer.start()
    try:
        stale = nav_pb2.NavUpdated(event_id="stale", product=PRODUCT, nav="102")
        await producer.send_and_wait(navs_topic, stale.SerializeToString(), key=PRODUCT.encode())
    finally:
        await producer.stop()
    second = env.stub.StreamNav(gateway_pb2.StreamNavRequest(products=[PRODUCT]), metadata=ALICE)
    assert (await read_while_publishing(env, second, [(PRODUCT, "103")])).nav == "103"
    second.cancel()


async def test_a_stream_ending_while_another_starts_leaves_no_followed_topic_paused(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A position stream starts (reading where orders.events ends, slowly here) while the
    only NAV stream ends: nav.updates must still be fetched once the position stream is
    in, which follows it too (it stayed paused with a follower: no NAV ever again)."""
    navs_topic = NAV_UPDATES.in_namespace(env.ns).name
    before = {kind: open_streams(kind) for kind in ("nav", "positions")}
    nav = env.stub.StreamNav(gateway_pb2.StreamNavRequest(products=[PRODUCT]), metadata=ALICE)
    assert (await read_while_publishing(env, nav, [(PRODUCT, "101")])).nav == "101"
    consumer = env.server.feed.consumer
    real_end_offsets = consumer.end_offsets

    async def slow_end_offsets(partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
        await asyncio.sleep(0.5)
        ends: dict[TopicPartition, int] = await real_end_offsets(partitions)
        return ends

    monkeypatch.setattr(consumer, "end_offsets", slow_end_offsets)
    positions = env.stub.StreamPositions(gateway_pb2.StreamPositionsRequest(), metadata=ALICE)
    await asyncio.sleep(0.2)  # the position stream is reading where orders.events ends
    nav.cancel()
    await until_streams("nav", before["nav"])
    await until_streams("positions", before["positions"] + 1)
    assert paused_topics(env) == set()
    await env.set_nav(PRODUCT, NAV)
    await env.open("held")  # a position for the stream to show NAV moves of
    assert (await asyncio.wait_for(positions.read(), 10)).product == PRODUCT
    moved = await read_while_publishing(env, positions, [(PRODUCT, "130.5")])
    assert moved.nav == "130.5"
    assert navs_topic not in paused_topics(env)
    positions.cancel()


async def test_a_stream_that_cannot_reach_kafka_to_start_ends_unavailable(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first stream of a topic reads where it ends; when Kafka does not answer in time
    the call ends UNAVAILABLE, subscribes nothing, and the next stream works."""
    before = open_streams("nav")
    monkeypatch.setattr("services.gateway.feeds.FOLLOW_TIMEOUT_S", 0.0)
    stream = env.stub.StreamNav(gateway_pb2.StreamNavRequest(products=[PRODUCT]), metadata=ALICE)
    code, details = await _code(stream.read())
    assert code is grpc.StatusCode.UNAVAILABLE, details
    assert "stream feed unavailable: cannot read where" in details
    assert open_streams("nav") == before
    assert paused_topics(env) == {
        NAV_UPDATES.in_namespace(env.ns).name,
        ORDERS_EVENTS.in_namespace(env.ns).name,
    }
    monkeypatch.undo()
    again = env.stub.StreamNav(gateway_pb2.StreamNavRequest(products=[PRODUCT]), metadata=ALICE)
    assert (await read_while_publishing(env, again, [(PRODUCT, "104")])).nav == "104"
    again.cancel()


async def test_position_streams_show_orders_that_another_gateway_settled(
    env: Env, redis_url: str
) -> None:
    """Any gateway instance may take a user's order: a position stream on one shows what
    another settled (through orders.events), and only the caller's own positions."""
    await env.set_nav(PRODUCT, NAV)
    streams_before = open_streams("positions")
    streams = {
        who: env.stub.StreamPositions(gateway_pb2.StreamPositionsRequest(), metadata=who)
        for who in (ALICE, BOB)
    }

    async def next_of(who: tuple) -> gateway_pb2.Position:
        position: gateway_pb2.Position = await asyncio.wait_for(streams[who].read(), 10)
        return position

    # One order each through this gateway first: once it shows, the stream is live.
    for n, who in enumerate((ALICE, BOB)):
        here = await env.open(f"here-{n}", who=who)
        assert (await next_of(who)).position_id == here.position_id
    assert open_streams("positions") == streams_before + 2
    async with another_gateway(env, redis_url) as other:
        opened = await other.OpenPosition(
            gateway_pb2.OpenPositionRequest(
                client_order_id="there-1", product=PRODUCT, amount_usdt="500"
            ),
            metadata=ALICE,
        )
        shown = await next_of(ALICE)
        assert (shown.position_id, shown.units, shown.open) == (
            opened.position_id,
            opened.units,
            True,
        )
        closed = await other.ClosePosition(
            gateway_pb2.ClosePositionRequest(
                client_order_id="there-2", position_id=opened.position_id, all=True
            ),
            metadata=ALICE,
        )
        shown = await next_of(ALICE)
        assert (shown.position_id, shown.units, shown.open, shown.payout) == (
            opened.position_id,
            "0.00000000",
            False,
            closed.payout,
        )
        bobs = await other.OpenPosition(
            gateway_pb2.OpenPositionRequest(
                client_order_id="there-3", product=PRODUCT, amount_usdt="700"
            ),
            metadata=BOB,
        )
        assert (await next_of(BOB)).position_id == bobs.position_id  # not Alice's two
    for stream in streams.values():
        stream.cancel()
    await until_streams("positions", streams_before)


async def test_a_position_stream_that_loses_redis_ends_unavailable(
    env: Env, redis_url: str
) -> None:
    """An order settled elsewhere must be re-read here; with this gateway's Redis gone the
    stream ends UNAVAILABLE (the client reconnects for a fresh snapshot), not UNKNOWN."""
    await env.set_nav(PRODUCT, NAV)
    stream = env.stub.StreamPositions(gateway_pb2.StreamPositionsRequest(), metadata=ALICE)
    here = await env.open("before-the-loss")
    assert (await asyncio.wait_for(stream.read(), 10)).position_id == here.position_id
    working = env.server.ledger.redis
    env.server.ledger.redis = RedisWire("127.0.0.1", 1, timeout_s=1)  # nothing listens
    try:
        # This gateway's relay reads the outbox over the lost connection: the other's
        # publishes the order.
        async with another_gateway(env, redis_url, relay=True) as other:
            await other.OpenPosition(
                gateway_pb2.OpenPositionRequest(
                    client_order_id="elsewhere", product=PRODUCT, amount_usdt="100"
                ),
                metadata=ALICE,
            )
            code, details = await _code(asyncio.wait_for(stream.read(), 10))
    finally:
        await env.server.ledger.redis.aclose()
        env.server.ledger.redis = working
    assert code is grpc.StatusCode.UNAVAILABLE, details
    assert "state store unavailable" in details


async def test_a_second_gateway_on_a_taken_port_stops_saying_so(env: Env, redis_url: str) -> None:
    settings = _settings(env.ns, redis_url, env.bootstrap)
    second = GatewayServer(settings.model_copy(update={"grpc_port": env.server.port}), env.redis)
    assert f"gateway: cannot listen on 127.0.0.1:{env.server.port}" in await refused_start(second)


async def test_a_gateway_without_its_topics_stops_saying_so(
    redis_url: str, kafka_bootstrap: str
) -> None:
    namespace = f"t{uuid4().hex[:8]}."  # no topics were created in it
    redis = Redis.from_url(redis_url, decode_responses=True)
    settings = GatewaySettings(
        namespace=namespace,
        grpc_port=0,
        metrics_port=0,
        kafka={"bootstrap": kafka_bootstrap},
        redis={"url": redis_url},
    )
    server = GatewayServer(settings, redis)
    try:
        with pytest.raises(SystemExit) as stopped:
            async with asyncio.timeout(30):  # without the check: metadata requests forever
                await server.start()
    finally:
        await server.producer.stop()
        await server.wire.aclose()
        await redis.aclose()
    topic = NAV_UPDATES.in_namespace(namespace).name
    assert f"gateway: topic {topic} does not exist on Kafka at {kafka_bootstrap}" in str(
        stopped.value
    )
