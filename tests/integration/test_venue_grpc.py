"""The venue service over a real gRPC channel, its state in the real Redis."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
from collections.abc import AsyncIterator
from decimal import Decimal
from types import SimpleNamespace
from typing import Any, cast
from uuid import uuid4

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from smartlev.v1 import orders_pb2, venue_pb2, venue_pb2_grpc
from smartlev.v1.hedging_pb2 import HedgeUpdate

from services.hedging.desks import Desks
from services.hedging.main import Hedger, HedgingRuntime, SymbolHalted
from services.hedging.messages import MarketStep
from services.venue.config import VenueSettings
from services.venue.main import VenueServer
from shared import codec
from shared.adapters.redis_wire import RedisWire
from shared.adapters.venue_client import RemoteVenue, fill_from_wire, venue_channel
from shared.core.config import StrategyConfig
from shared.core.events import LeverageTargetChanged
from shared.core.market import Side, Tick
from shared.core.venue import Liquidity, PerpVenue
from shared.settings import RedisSettings
from shared.stream import Input, Record
from shared.wire import targets_update
from tests.integration.serving import refused_start

pytestmark = pytest.mark.integration

SYMBOL = "BTC-USDT"
LONG = "BTC-USDT:LONG"
CONFIG = StrategyConfig()
ORDERS = "the orders input"


class Venue:
    """An in-process venue server on a free port with its own Redis namespace."""

    def __init__(self, redis: Redis, namespace: str, ids_kept: int = 100_000) -> None:
        self.redis = redis
        at = redis.connection_pool.connection_kwargs  # the test's Redis, not the default
        settings = VenueSettings(
            namespace=namespace,
            grpc_port=0,
            metrics_port=0,
            health_interval_s=0.1,
            grace_s=0,
            redis=RedisSettings(url=f"redis://{at['host']}:{at['port']}/{at.get('db', 0)}"),
        )
        # below what the setting takes (MIN_CALL_IDS_KEPT), to see the bound work in a few calls
        self.settings = settings.model_copy(update={"applied_ids_kept": ids_kept})
        self.server = VenueServer(self.settings, redis)

    async def __aenter__(self) -> Venue:
        port = await self.server.start()
        self.target = f"127.0.0.1:{port}"
        self.channel = grpc.aio.insecure_channel(self.target)
        self.stub = venue_pb2_grpc.VenueStub(self.channel)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.channel.close()
        await self.server.stop()


@pytest.fixture
async def env(redis_url: str) -> AsyncIterator[tuple[Redis, str]]:
    namespace = f"t{uuid4().hex[:8]}."
    redis = Redis.from_url(redis_url, decode_responses=True)
    yield redis, namespace
    keys = [k async for k in redis.scan_iter(match=f"{namespace}*")]  # venue, hedging
    if keys:
        await redis.delete(*keys)
    await redis.aclose()


def order(
    order_id: str, qty: str, price: str = "50000", ts: int = 1, symbol: str = SYMBOL
) -> venue_pb2.SubmitOrderRequest:
    return venue_pb2.SubmitOrderRequest(
        symbol=symbol,
        client_order_id=order_id,
        qty=qty,
        reference_price=price,
        liquidity=venue_pb2.LIQUIDITY_TAKER,
        ts_event_ns=ts,
    )


async def account(stub: venue_pb2_grpc.VenueStub) -> venue_pb2.VenueAccount:
    return await stub.GetAccount(venue_pb2.GetAccountRequest(symbol=SYMBOL))


async def funded(stub: venue_pb2_grpc.VenueStub, amount: str) -> venue_pb2.VenueAccount:
    """The account once `amount` is paid in: what a refused call must leave it at."""
    await stub.Transfer(venue_pb2.TransferRequest(symbol=SYMBOL, transfer_id="t1", amount=amount))
    return await account(stub)


async def test_remote_venue_equals_perp_venue(env: tuple[Redis, str]) -> None:
    """The same calls through RemoteVenue (sync client, in a thread) and a local PerpVenue
    give the same fills, funding, liquidation check and account, exactly."""
    redis, namespace = env
    spec = CONFIG.instrument(SYMBOL)
    local = PerpVenue(spec, CONFIG.venue)
    async with Venue(redis, namespace) as venue:

        def run(target: object) -> list[object]:
            out: list[object] = []
            assert isinstance(target, PerpVenue | RemoteVenue)
            if isinstance(target, RemoteVenue):
                target.begin(f"{SYMBOL}:1")
            target.transfer(Decimal("100000.5"))
            out.append(target.execute(1, Decimal("3.217"), Decimal("50000.1")))
            out.append(target.execute(2, Decimal("-1.001"), Decimal("49000"), Liquidity.MAKER))
            out.append(target.execute(3, Decimal("-40"), Decimal("51234.5")))
            out.append(target.settle_funding(Decimal("0.0001"), Decimal("50500.25")))
            out.append(target.check_liquidation(4, Decimal("50000")))
            out.append((target.position, target.wallet, target.pnl(Decimal("49999.9"))))
            out.append(target.at_risk(1e9))
            return out

        channel = venue_channel(venue.target)
        remote = RemoteVenue(channel, spec, CONFIG.venue)
        try:
            remote_out = await asyncio.to_thread(run, remote)
        finally:
            channel.close()
        assert remote_out == run(local)
        assert remote.state() == local.snapshot()
        state = await account(venue.stub)
        assert state.wallet == str(local.wallet) and state.position == str(local.position)
        assert state.fees_paid == str(local.fees_paid)
        assert state.funding_paid == str(local.funding_paid)


async def test_repeated_id_returns_original_and_changes_nothing(env: tuple[Redis, str]) -> None:
    redis, namespace = env
    async with Venue(redis, namespace) as venue:
        await venue.stub.Transfer(
            venue_pb2.TransferRequest(symbol=SYMBOL, transfer_id="t1", amount="1000000")
        )
        first = await venue.stub.SubmitOrder(order("o1", "2.5"))
        after_first = await account(venue.stub)
        again = await venue.stub.SubmitOrder(order("o1", "2.5"))
        assert again == first
        assert await account(venue.stub) == after_first
        # The repeated transfer is not applied twice either.
        await venue.stub.Transfer(
            venue_pb2.TransferRequest(symbol=SYMBOL, transfer_id="t1", amount="1000000")
        )
        assert await account(venue.stub) == after_first
        # The same id for a different order is a caller bug: refused, nothing changes.
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await venue.stub.SubmitOrder(order("o1", "3"))
        assert err.value.code() is grpc.StatusCode.FAILED_PRECONDITION
        assert await account(venue.stub) == after_first
        assert fill_from_wire(first.fill).qty == Decimal("2.5")


async def test_an_id_reused_by_another_method_is_refused_as_reused(
    env: tuple[Redis, str],
) -> None:
    """A funding's id reused by an order, a transfer or a check was INTERNAL "record
    unreadable" (its reply parsed as the new call's type first), logged as corrupt state
    with Redis intact; every other pair was FAILED_PRECONDITION."""
    redis, namespace = env
    reuse = [
        ("SubmitOrder", order("f1", "0.1")),
        ("Transfer", venue_pb2.TransferRequest(symbol=SYMBOL, transfer_id="f1", amount="5")),
        (
            "CheckLiquidation",
            venue_pb2.CheckLiquidationRequest(
                symbol=SYMBOL, check_id="f1", mark_price="50000", ts_event_ns=1
            ),
        ),
    ]
    async with Venue(redis, namespace) as venue:
        await funded(venue.stub, "100000")
        await venue.stub.SubmitOrder(order("o1", "1"))
        await venue.stub.SettleFunding(
            venue_pb2.SettleFundingRequest(
                symbol=SYMBOL, settlement_id="f1", rate="0.0001", mark_price="50000"
            )
        )
        before = await account(venue.stub)
        for rpc, request in reuse:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await getattr(venue.stub, rpc)(request)
            assert err.value.code() is grpc.StatusCode.FAILED_PRECONDITION, rpc
            assert "'f1' was already used for a different SettleFunding" in (
                err.value.details() or ""
            )
        assert await account(venue.stub) == before


async def test_oversized_ids_and_symbols_are_invalid_argument_quoted_short(
    env: tuple[Redis, str],
) -> None:
    """A 20,000-character symbol was quoted whole in the refusal, past gRPC's 16 KiB of
    metadata: the caller got RESOURCE_EXHAUSTED; a 200,000-character id was applied and
    kept (up to `applied_ids_kept` of them)."""
    redis, namespace = env
    async with Venue(redis, namespace) as venue:
        before = await funded(venue.stub, "1000")
        huge = "X" * 20_000
        calls = [
            ("SubmitOrder", order("o1", "0.001", symbol=huge)),
            ("SubmitOrder", order("o" * 201, "0.001")),
            ("Transfer", venue_pb2.TransferRequest(symbol=SYMBOL, transfer_id=huge, amount="1")),
        ]
        for rpc, request in calls:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await getattr(venue.stub, rpc)(request)
            assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT, rpc
            assert len(err.value.details() or "") < 300
        assert await account(venue.stub) == before
        assert await redis.hlen(f"{namespace}venue:{{{SYMBOL}}}:applied") == 1  # t1
        await venue.stub.SubmitOrder(order("o" * 200, "0.001"))  # at the bound: taken


async def test_the_venue_remembers_its_newest_call_ids_only(env: tuple[Redis, str]) -> None:
    """Its records of applied calls are bounded (`applied_ids_kept`); the newest still
    answer a repeat with the original reply and change nothing."""
    redis, namespace = env
    async with Venue(redis, namespace, ids_kept=3) as venue:
        await venue.stub.Transfer(
            venue_pb2.TransferRequest(symbol=SYMBOL, transfer_id="t1", amount="1000000")
        )
        fills = [await venue.stub.SubmitOrder(order(f"o{n}", "0.1")) for n in range(5)]
        applied = f"{namespace}venue:{{{SYMBOL}}}:applied"
        assert set(await redis.hkeys(applied)) == {"o2", "o3", "o4"}
        before = await account(venue.stub)
        assert await venue.stub.SubmitOrder(order("o3", "0.1")) == fills[3]
        assert await account(venue.stub) == before


async def test_a_write_whose_reply_was_lost_is_read_back_from_redis(
    env: tuple[Redis, str],
) -> None:
    """The write landed and its reply did not: the venue answers UNAVAILABLE, then shows
    what Redis holds (it showed the account from before), and the retry is answered
    from the record, once."""
    redis, namespace = env
    async with Venue(redis, namespace) as venue:
        store = venue.server.ledger.store
        write = store.apply

        async def reply_lost(*args: Any, **kwargs: Any) -> Any:
            await write(*args, **kwargs)
            raise RedisConnectionError("connection lost before the reply")

        transfer = venue_pb2.TransferRequest(symbol=SYMBOL, transfer_id="t1", amount="1000")
        store.apply = reply_lost  # type: ignore[method-assign]
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await venue.stub.Transfer(transfer)
        assert err.value.code() is grpc.StatusCode.UNAVAILABLE
        store.apply = write  # type: ignore[method-assign]
        assert Decimal((await account(venue.stub)).wallet) == 1000
        await venue.stub.Transfer(transfer)
        assert Decimal((await account(venue.stub)).wallet) == 1000


async def test_an_unreadable_stored_account_is_an_internal_error(env: tuple[Redis, str]) -> None:
    redis, namespace = env
    async with Venue(redis, namespace) as venue:
        transfer = venue_pb2.TransferRequest(symbol=SYMBOL, transfer_id="t1", amount="1000")
        await venue.stub.Transfer(transfer)
        store = venue.server.ledger.store
        await redis.hset(store.state_key(SYMBOL, "applied"), "t1", "not json")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await venue.stub.Transfer(transfer)  # its record, read back
        assert err.value.code() is grpc.StatusCode.INTERNAL
        assert "record of 't1' unreadable" in (err.value.details() or "")
    # "NaN" and "Infinity" parse as Decimals: a reply carrying one was INVALID_ARGUMENT,
    # "the call's figures are out of range", blaming a GetAccount that sent none
    for stored in ("not a number", "NaN", "-Infinity"):
        await redis.hset(venue.server.ledger.store.state_key(SYMBOL, "account"), "wallet", stored)
        async with Venue(redis, namespace) as venue:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await account(venue.stub)
            assert err.value.code() is grpc.StatusCode.INTERNAL, stored
            assert "stored account unreadable" in (err.value.details() or "")


async def test_restart_continues_with_the_same_state(env: tuple[Redis, str]) -> None:
    redis, namespace = env
    async with Venue(redis, namespace) as venue:
        await venue.stub.Transfer(
            venue_pb2.TransferRequest(symbol=SYMBOL, transfer_id="t1", amount="500000")
        )
        first = await venue.stub.SubmitOrder(order("o1", "1.234"))
        before = await account(venue.stub)
    async with Venue(redis, namespace) as venue:
        assert await account(venue.stub) == before
        assert await venue.stub.SubmitOrder(order("o1", "1.234")) == first  # still known
        second = await venue.stub.SubmitOrder(order("o2", "-0.5", "51000", 2))
    local = PerpVenue(CONFIG.instrument(SYMBOL), CONFIG.venue)
    local.transfer(Decimal("500000"))
    local.execute(1, Decimal("1.234"), Decimal("50000"))
    fill = local.execute(2, Decimal("-0.5"), Decimal("51000"))
    assert fill_from_wire(second.fill) == fill
    assert second.account.wallet == str(local.wallet)
    assert second.account.position == str(local.position)


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (order("x1", "1", symbol="DOGE-USDT"), "unknown symbol"),
        (order("x1", "NaN"), "not a plain decimal"),
        (order("x1", "1e3"), "not a plain decimal"),
        (order("x1", "Infinity"), "not a plain decimal"),
        (order("x1", "0.0005"), "whole number of lots"),
        (order("x1", "0"), "whole number of lots"),
        (order("", "1"), "client_order_id is required"),
        (order("x1", "1", "-5"), "must be > 0"),
        (order("x1", "1", ""), "not a plain decimal"),
        (order("x1", "1" + "0" * 39, "100000"), "more than 30 significant digits"),
        (order("x1", "-2000000000", "50000"), "would fill at -"),  # impact past the price
        (order("x1", "1", ts=0), "ts_event_ns: must be > 0"),  # unset: all one instant
    ],
)
async def test_invalid_orders_change_nothing(
    env: tuple[Redis, str], request_: venue_pb2.SubmitOrderRequest, message: str
) -> None:
    redis, namespace = env
    async with Venue(redis, namespace) as venue:
        before = await funded(venue.stub, "1000")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await venue.stub.SubmitOrder(request_)
        assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert message in (err.value.details() or "")
        assert await account(venue.stub) == before
        assert not await redis.hexists(f"{namespace}venue:{{{SYMBOL}}}:applied", "x1")


@pytest.mark.parametrize(
    ("qty", "price"),
    [
        ("60", "50000"),  # 3,000,000 USDT on 1,000: 3,000x, liquidated at the next check
        ("1" + "0" * 29, "1" + "0" * 29),  # a 58-digit fee, out of the wire's range before
    ],
)
async def test_an_order_the_account_cannot_margin_is_refused(
    env: tuple[Redis, str], qty: str, price: str
) -> None:
    redis, namespace = env
    async with Venue(redis, namespace) as venue:
        before = await funded(venue.stub, "1000")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await venue.stub.SubmitOrder(order("x1", qty, price))
        assert err.value.code() is grpc.StatusCode.FAILED_PRECONDITION
        assert "below its initial margin" in (err.value.details() or "")
        assert await account(venue.stub) == before
        assert not await redis.hexists(f"{namespace}venue:{{{SYMBOL}}}:applied", "x1")


async def test_the_initial_margin_is_judged_at_the_mark_an_order_carries(
    env: tuple[Redis, str],
) -> None:
    """At a last trade 17% under the mark, a 5x long read 27.7x and its orders were
    refused (hedging halted the symbol); an order now carries the engine's mark."""
    redis, namespace = env
    async with Venue(redis, namespace) as venue:
        await funded(venue.stub, "10000")
        await venue.stub.SubmitOrder(order("o1", "1", "50000"))  # ~5x at 50,000
        at_print = order("o2", "0.1", "41500", ts=2)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await venue.stub.SubmitOrder(at_print)
        assert err.value.code() is grpc.StatusCode.FAILED_PRECONDITION
        before = await account(venue.stub)
        for bad in ("-1", "nan", "1e3"):
            refused = venue_pb2.SubmitOrderRequest()
            refused.CopyFrom(at_print)
            refused.client_order_id, refused.mark_price = f"x{bad}", bad
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await venue.stub.SubmitOrder(refused)
            assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT, bad
        assert await account(venue.stub) == before
        at_print.client_order_id, at_print.mark_price = "o3", "50000"
        filled = await venue.stub.SubmitOrder(at_print)
        assert fill_from_wire(filled.fill).qty == Decimal("0.1")
        # The record knows the order without its mark: a re-run after a crash that
        # carries another mark, or none (an older build's, across an upgrade), is
        # answered from it; it was FAILED_PRECONDITION "already used", halting hedging.
        after = await account(venue.stub)
        for mark in ("50010", ""):
            at_print.mark_price = mark
            assert await venue.stub.SubmitOrder(at_print) == filled
        assert await account(venue.stub) == after


async def test_invalid_transfer_funding_and_check_change_nothing(env: tuple[Redis, str]) -> None:
    redis, namespace = env
    bad = [
        ("Transfer", venue_pb2.TransferRequest(symbol=SYMBOL, transfer_id="b", amount="nan")),
        ("Transfer", venue_pb2.TransferRequest(symbol=SYMBOL, amount="1")),
        (
            "SettleFunding",
            venue_pb2.SettleFundingRequest(
                symbol=SYMBOL, settlement_id="b", rate="5", mark_price="1"
            ),
        ),
        (
            "SettleFunding",
            venue_pb2.SettleFundingRequest(
                symbol=SYMBOL, settlement_id="b", rate="0.0001", mark_price="0"
            ),
        ),
        (
            "SettleFunding",
            venue_pb2.SettleFundingRequest(
                symbol=SYMBOL, settlement_id="b", rate="-inf", mark_price="1"
            ),
        ),
        (
            "CheckLiquidation",
            venue_pb2.CheckLiquidationRequest(symbol=SYMBOL, check_id="b", mark_price="x"),
        ),
        (  # a liquidation it found was stamped 0 (ts_event_ns left out) or below
            "CheckLiquidation",
            venue_pb2.CheckLiquidationRequest(symbol=SYMBOL, check_id="b", mark_price="1"),
        ),
        (  # 50 significant digits: applied and recorded rounded to 60 in sums before
            "Transfer",
            venue_pb2.TransferRequest(symbol=SYMBOL, transfer_id="b", amount="1" * 30 + ".5"),
        ),
        ("GetAccount", venue_pb2.GetAccountRequest(symbol="")),
    ]
    async with Venue(redis, namespace) as venue:
        before = await account(venue.stub)
        for rpc, request in bad:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await getattr(venue.stub, rpc)(request)
            assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT, rpc
        assert await account(venue.stub) == before
        assert await redis.hlen(f"{namespace}venue:{{{SYMBOL}}}:applied") == 0


async def test_health_serving_and_reflection(env: tuple[Redis, str]) -> None:
    redis, namespace = env
    async with Venue(redis, namespace) as venue:
        health = health_pb2_grpc.HealthStub(venue.channel)
        for _ in range(50):
            reply = await health.Check(health_pb2.HealthCheckRequest(service="smartlev.v1.Venue"))
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                break
            await asyncio.sleep(0.05)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING

        def services() -> set[str]:
            with grpc.insecure_channel(venue.target) as channel:
                return set(ProtoReflectionDescriptorDatabase(channel).get_services())

        assert "smartlev.v1.Venue" in await asyncio.to_thread(services)


async def test_grpc_health_follows_the_checks_healthz_runs(
    env: tuple[Redis, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """gRPC health pinged Redis on its own: SERVING with Redis full, every call refused
    (the compose and stack health checks, and hedging, read the gRPC one)."""
    redis, namespace = env

    async def status(venue: Venue) -> int:
        health = health_pb2_grpc.HealthStub(venue.channel)
        reply = await health.Check(health_pb2.HealthCheckRequest(service="smartlev.v1.Venue"))
        return int(reply.status)

    async with Venue(redis, namespace) as venue:
        serving = health_pb2.HealthCheckResponse.SERVING
        async with asyncio.timeout(5):
            while await status(venue) != serving:
                await asyncio.sleep(0.05)

        async def full(section: str) -> dict[str, int]:
            return {"used_memory": 2**30, "maxmemory": 2**30}

        monkeypatch.setattr(redis, "info", full)
        async with asyncio.timeout(5):
            while await status(venue) == serving:
                await asyncio.sleep(0.05)
        monkeypatch.undo()
        async with asyncio.timeout(5):
            while await status(venue) != serving:
                await asyncio.sleep(0.05)


async def test_a_second_venue_on_a_taken_port_stops_saying_so(env: tuple[Redis, str]) -> None:
    redis, namespace = env
    async with Venue(redis, namespace) as first:
        port = first.server.port
        second = VenueServer(first.settings.model_copy(update={"grpc_port": port}), redis)
        assert f"venue: cannot listen on 127.0.0.1:{port}" in await refused_start(second)


async def test_a_withdrawal_past_what_an_account_holds_is_refused(env: tuple[Redis, str]) -> None:
    """An account with no position that put in 100 took out 1,000,000, and the next
    liquidation check had the insurance fund pay the 999,900 it owed."""
    redis, namespace = env
    async with Venue(redis, namespace) as venue:
        before = await funded(venue.stub, "100")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await venue.stub.Transfer(
                venue_pb2.TransferRequest(symbol=SYMBOL, transfer_id="out", amount="-1000000")
            )
        assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "from an account holding 100" in (err.value.details() or "")
        assert await account(venue.stub) == before
        assert not await redis.hexists(f"{namespace}venue:{{{SYMBOL}}}:applied", "out")
        reply = await venue.stub.Transfer(  # all it holds: taken
            venue_pb2.TransferRequest(symbol=SYMBOL, transfer_id="all", amount="-100")
        )
        assert Decimal(reply.account.wallet) == 0


class Crash(BaseException):
    """The hedging process killed (not an Exception: nothing in it handles this)."""


class HedgingRun:
    """Hedging's Hedger and Desks in this process, on the venue at `target`; `crash_at`:
    the event whose HedgeUpdate is never sent (the process dies first)."""

    def __init__(self, redis_url: str, target: str, namespace: str, budget: int = 2500) -> None:
        self.halted: dict[str, str] = {}
        self.crash_at: str | None = None
        self.crash_at_letter = False
        self.letters: list[tuple[object, str, int, int, bytes, str]] = []
        self.wire = RedisWire.from_url(redis_url)
        self.channel = venue_channel(target)
        desks = Desks(self.wire, CONFIG, self.channel, namespace=namespace)
        runtime = cast(HedgingRuntime, self)
        self.hedger = Hedger(
            runtime, desks, CONFIG, backoff_s=0.01, calls_per_inflight=budget,
            orders=cast(Input, ORDERS),
        )  # fmt: skip

    def output(self, spec: object) -> object:
        return spec

    async def send_many(self, messages: list[tuple[object, str, HedgeUpdate]]) -> None:
        if any(update.event_id == self.crash_at for _, _, update in messages):
            raise Crash

    async def send(self, out: object, key: str, update: HedgeUpdate) -> None:
        await self.send_many([(out, key, update)])

    async def reject(self, inp: object, record: Record, reason: str) -> None:
        if self.crash_at_letter:
            raise Crash
        where = (record.topic, record.partition, record.offset, record.key)
        self.letters.append((inp, *where, reason))

    def processed(self, inp: object, ts_init_ns: int) -> None:
        pass

    def skipped(self, inp: object) -> None:
        pass

    async def close(self) -> None:
        self.channel.close()
        await self.wire.aclose()


def price_step(hedger: Hedger, seq: int, decisions: list[LeverageTargetChanged]) -> MarketStep:
    tick = Tick(SYMBOL, seq * 1000, Decimal(30000))
    market = codec.market_event_from_tick(tick, seq=seq, source="t", ts_init_ns=1)
    return hedger.market_step(targets_update(market, SYMBOL, seq, False, "RANGE", decisions, 1))


def rebalances(hedger: Hedger, targets: list[str]) -> list[MarketStep]:
    """A tick at 30,000 for each target, the long product rebalanced to it."""
    steps, previous = [], "1"
    for seq, target in enumerate(targets, start=2):
        decision = LeverageTargetChanged(
            LONG, Side.LONG, seq * 1000, Decimal(30000), Decimal(target), Decimal(previous),
            True, False, (), "RANGE",
        )  # fmt: skip
        steps.append(price_step(hedger, seq, [decision]))
        previous = target
    return steps


async def hedged_long(hedging: HedgingRun) -> None:
    """A first price, then 10M paid into the long (hedged at 1x)."""
    hedger = hedging.hedger
    await hedger.on_market(cast(Input, None), [price_step(hedger, 1, [])])
    opened = orders_pb2.OrderEvent(
        opened=orders_pb2.PositionOpened(
            event_id="open-1", position_id="p1", user_id="u", product=LONG,
            ts_event_ns=1500, ts_init_ns=1, amount="10000000",
        )
    )  # fmt: skip
    await hedger.on_order(cast(Input, None), order_record(opened, 40), hedger.order_step(opened))


def order_record(event: orders_pb2.OrderEvent, offset: int) -> Record:
    """`event` as read from orders.events (partition 3) at `offset`."""
    record = SimpleNamespace(
        topic="orders.events", partition=3, offset=offset, key=SYMBOL.encode(),
        value=event.SerializeToString(),
    )  # fmt: skip
    return cast(Record, record)


@pytest.mark.parametrize("budget", [10, 10**9])
async def test_a_market_batch_a_crash_cut_short_repeats_only_calls_the_venue_remembers(
    env: tuple[Redis, str], redis_url: str, budget: int
) -> None:
    """The venue remembers the newest call ids only, and hedging re-runs the Inflight a
    crash cut short: a batch of more calls than are remembered (20,450 against 10,000)
    traded its first ones again (a venue position of 295,550 BTC against 49,503) and
    halted the symbol. Batches are cut at hedging's budget of calls, so a re-run repeats
    only what the venue still has. Here: 40 ids kept, ~10 calls a rebalance, 6 of them;
    the crash comes before the last one's commit. Without the cut (`budget` 10**9) the
    re-run trades its first calls again, and the venue and the books differ."""
    redis, namespace = env
    outcomes = []
    for run in ("crash", "reference"):
        ns = f"{namespace}{run}."
        async with Venue(redis, ns, ids_kept=40) as venue:
            hedging = HedgingRun(redis_url, venue.target, ns, budget if run == "crash" else 10)
            await hedged_long(hedging)
            batch = rebalances(hedging.hedger, ["3", "1", "3", "1", "3", "1"])
            if run == "crash":
                hedging.crash_at = batch[-1].event_id
                with pytest.raises(Crash):
                    await hedging.hedger.on_market(cast(Input, None), batch)
                await hedging.close()
                hedging = HedgingRun(redis_url, venue.target, ns, budget)  # the restart
            with contextlib.suppress(SymbolHalted):  # (un-cut: its books and venue differ)
                await hedging.hedger.on_market(cast(Input, None), batch)
            desk = await hedging.hedger.desks.current(SYMBOL)
            request = venue_pb2.GetAccountRequest(symbol=SYMBOL)
            account = await venue.stub.GetAccount(request)
            books = desk.engine.books.products[LONG].qty
            outcomes.append((hedging.halted, desk.last_seq, books, account.position,
                             account.wallet, account.fees_paid))  # fmt: skip
            await hedging.close()
    crash, reference = outcomes
    assert reference[:2] == ({}, 7) and Decimal(reference[3]) == reference[2] > 0
    if budget == 10:
        assert crash == reference
    else:
        assert "BooksOutOfBalance" in crash[0][SYMBOL] and crash[3] != reference[3]


@pytest.mark.parametrize("written_by", ["this build", "an older build", "an older build's next"])
async def test_an_order_refused_when_resumed_is_refused_in_full_there(
    env: tuple[Redis, str], redis_url: str, written_by: str
) -> None:
    """An order the books refuse, cut short before its refusal was written: the instance
    that resumes it (after a crash, or a rebalance that handed it the symbol) only
    cleared it, counting on its record coming again, which it does not once the first
    instance committed past it: a close of a position that order opened would then go
    through (reliability 197). It now letters the order from where its record was read
    and records it refused. An Inflight an older build wrote, which keeps no source, is
    cleared; and one it began over this build's (its writes leave the source) does not
    take that order's place for its own letter."""
    redis, namespace = env
    async with Venue(redis, namespace) as venue:
        first = HedgingRun(redis_url, venue.target, namespace)
        await hedged_long(first)

        def too_many(event_id: str) -> orders_pb2.OrderEvent:
            return orders_pb2.OrderEvent(
                closed=orders_pb2.PositionClosed(
                    event_id=event_id, position_id="p1", user_id="u", product=LONG,
                    units="10000000", ts_event_ns=2500, ts_init_ns=1,
                )
            )  # fmt: skip

        step = first.hedger.order_step(too_many("too-many"))
        first.crash_at_letter = True  # dies refusing it: its Inflight stays
        with pytest.raises(Crash):
            await first.hedger.on_order(
                cast(Input, None), order_record(too_many("too-many"), 41), step
            )
        await first.close()
        inflight = f"{namespace}hedge:{{{SYMBOL}}}:inflight"
        if written_by == "an older build":  # no source
            await redis.hset(inflight, "source", "")
        elif written_by == "an older build's next":  # its payloads over this build's source
            step = first.hedger.order_step(too_many("too-many-2"))
            payload = base64.b64encode(too_many("too-many-2").SerializeToString()).decode()
            await redis.hset(inflight, "payloads", json.dumps([payload]))
        resumed = HedgingRun(redis_url, venue.target, namespace)
        await resumed.hedger.on_market(cast(Input, None), [price_step(resumed.hedger, 2, [])])
        desk = await resumed.hedger.desks.current(SYMBOL)
        assert desk.inflight is None and desk.last_seq == 2
        refused = await resumed.hedger.desks.order_record(desk, step.order_id, "p1")
        if written_by == "this build":
            [(inp, *where, reason)] = resumed.letters
            assert inp == ORDERS and where == ["orders.events", 3, 41, SYMBOL.encode()]
            assert "cannot redeem" in reason and refused == (True, False)
        else:
            assert resumed.letters == [] and refused == (False, False)
        await resumed.close()
