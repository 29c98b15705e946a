"""The order gateway: `python -m services.gateway`.

A grpc.aio server (smartlev.v1.Gateway, grpc.health.v1, reflection). Each call is
authenticated (auth.py), validated and quoted by the pure part (orders.py) and settled in
one atomic Redis step (ledger.py); the outbox relay (relay.py) publishes the settled
orders to `orders.events`, and feeds.py streams `nav.updates` and the positions
`orders.events` names to clients.

An order is three Redis round trips on one multiplexed connection (redis_wire.py): one
pipelined read (claim, record, NAV, ledger, position), the claim, and the atomic step;
the relay publishes in the background, off the request path (the outbox guarantees
delivery once the step committed).

Idempotency: a client_order_id is claimed per user with the request's hash and symbol
before the symbol's step; the step records the reply under (user, client_order_id). A
retry of the same request returns the recorded reply and changes nothing; a different
request under a used id is ALREADY_EXISTS. The step checks the product's revision and
the position, so an order computed from state that moved is recomputed from the fresh
state the refusal carries, whichever process moved it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import Decimal
from typing import NamedTuple, NoReturn, Protocol, TypeVar

import grpc
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from google.protobuf.message import Message
from prometheus_client import Counter, Histogram
from redis.asyncio import Redis
from redis.exceptions import RedisError
from smartlev.v1 import gateway_pb2, gateway_pb2_grpc, nav_pb2, orders_pb2

from services.gateway.auth import KeyRing, bearer_key, load_keys_file
from services.gateway.bounded import put_bounded
from services.gateway.config import GatewaySettings
from services.gateway.feeds import FeedUnavailable, StreamFeed, Subscriber
from services.gateway.ledger import Ledger, Snapshot, b64, ledger_fields, unb64
from services.gateway.orders import (
    MAX_PAGE_SIZE,
    Closed,
    Limits,
    Opened,
    PositionState,
    canonical,
    client_order_id,
    close_units,
    order_amount,
    order_id,
    page_size,
    page_start,
    page_token,
    position_id,
    quote_close,
    quote_open,
    request_hash,
)
from services.gateway.relay import OutboxRelay
from shared.adapters.record_batches import idempotent_producer
from shared.adapters.redis_wire import RedisWire, UndecodableReply
from shared.codec import decimal_to_wire, order_of
from shared.core.config import StrategyConfig
from shared.core.market import Side
from shared.core.products import SIDES, product_id
from shared.core.text import clipped
from shared.health import GrpcHealth, HealthRegistry, HealthServer, kafka_check, redis_check
from shared.logging import get_logger
from shared.redis_store import ApplyStatus
from shared.serving import SERVER_ANSWERED, Rejected, grpc_server, listen, register, run
from shared.settings import from_environment
from shared.topics import NAV_UPDATES, ORDERS_EVENTS
from shared.wire import known_regime_name

SERVICE_NAME = "smartlev.v1.Gateway"
OWNERS_CACHED = 100_000  # (user, position id) -> product entries kept in memory
CLOSED_REMEMBERED = 4096  # per position stream: ids it showed closed
# A position another gateway closed is stamped by that gateway's clock: a re-read shows
# again what closed up to this long before the previous listing (a clock behind ours).
CLOCKS_APART_NS = 60 * 10**9
CLIENT_PINGS_MS = 10_000  # the least time between a client's keepalive pings
T = TypeVar("T")
R = TypeVar("R", bound=Message)
Q = TypeVar("Q", bound="Quote")

REQUESTS = Counter(
    "smartlev_gateway_requests_total",
    "Gateway calls by rpc and outcome: ok, replayed (idempotent retry) or the status code.",
    ["rpc", "outcome"],
)
LATENCY = Histogram(
    "smartlev_gateway_request_seconds",
    "Time to answer a unary gateway call.",
    ["rpc"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1),
)

log = get_logger("gateway")


@functools.cache
def _requests(rpc: str, outcome: str) -> Counter:
    """REQUESTS' child for the labels: `labels()` takes a lock and checks them per call."""
    return REQUESTS.labels(rpc, outcome)


@functools.cache
def _latency(rpc: str) -> Histogram:
    return LATENCY.labels(rpc)


class Step(NamedTuple):
    """One settled order: the reply, the position's and the product's ledger entries'
    fields after it (wire text, as stored) and the event for orders.events."""

    reply: Message
    position: dict[str, str]
    ledger: dict[str, str]
    event: orders_pb2.OrderEvent


class Order(NamedTuple):
    """Who orders what: `claim` is the request's hash and symbol, `position` the
    position a close reads (None for an open: its position is new)."""

    user: str
    client_id: str
    claim: str
    symbol: str
    product: str
    order_id: str
    position: str | None

    @property
    def position_id(self) -> str:
        """The position the order opens or closes: an open's is named for its order."""
        return self.position or self.order_id


class Quote(Protocol):
    """An order priced and validated (orders.Opened, orders.Closed)."""

    @property
    def nav(self) -> Decimal: ...


class Replayed(Exception):
    """The order was settled before: answer with the recorded reply."""

    def __init__(self, reply: Message) -> None:
        self.reply = reply


def _fail(code: grpc.StatusCode, message: str) -> NoReturn:
    raise Rejected(code, message)


async def _abort(
    context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str
) -> NoReturn:
    """End the call with `code`, marked as the gateway's own answer (SERVER_ANSWERED)."""
    await context.abort(code, message, trailing_metadata=SERVER_ANSWERED)
    raise AssertionError("context.abort() raises")  # its stub does not say NoReturn


def _wire_texts(**figures: Decimal) -> dict[str, str]:
    """Exact decimals as the wire carries them: plain notation ("0.00000000", not "0E-8",
    which every reader's decimal_from_wire refuses)."""
    return {name: decimal_to_wire(value, name=name) for name, value in figures.items()}


def _reply_and_event(
    reply_type: type[R],
    kind: str,
    event_type: type[Message],
    *,
    order: Order,
    now: int,
    position: gateway_pb2.Position,
    figures: dict[str, str],
) -> tuple[R, orders_pb2.OrderEvent]:
    """An order's reply and its event (`kind`: "opened" or "closed") for orders.events:
    the same ids, time and figures, as the same text."""
    pid = order.position_id
    reply = reply_type(
        order_id=order.order_id,
        position_id=pid,
        product=order.product,
        ts_event_ns=now,
        position=position,
        **figures,
    )
    happened = event_type(
        event_id=order.order_id,
        position_id=pid,
        user_id=order.user,
        product=order.product,
        ts_event_ns=now,
        ts_init_ns=now,
        client_order_id=order.client_id,
        **figures,
    )
    return reply, orders_pb2.OrderEvent(**{kind: happened})


def _known_regime(name: str) -> str:
    """A stored regime name, or REGIME_UNSPECIFIED for one this build does not know (a
    hash another build's NAV service wrote): the reply cannot carry it."""
    return name if known_regime_name(name) else "REGIME_UNSPECIFIED"


def _decimal(fields: dict[str, str], name: str) -> Decimal | None:
    return Decimal(fields[name]) if fields.get(name) else None


class ShownPositions:
    """What a position stream has shown: the open positions it holds (to show again as a
    NAV or an order moves them) and the ids of those it showed closed. It forgets a
    position once shown closed (units only fall: it never changes again) but its id,
    bounded, so a late copy of its event is not shown again: a stream open for days
    holds the positions open, not every one it saw close or (`include_closed`) listed."""

    def __init__(self, include_closed: bool) -> None:
        self.include_closed = include_closed
        self.held: dict[str, PositionState] = {}
        self._closed: dict[str, None] = {}
        self.listed_ns = 0  # when the last listing began (0: none yet)

    def changed(self, position: PositionState) -> bool:
        """Whether the stream has not shown `position` as it is."""
        pid = position.position_id
        return self.held.get(pid) != position and pid not in self._closed

    def listed_before(self, position: PositionState) -> bool:
        """Whether a listing before showed `position` closed (or, of open positions, left
        it out as closed): it closed before that listing began, and the stream did not
        hold it open since. A re-read of a user's whole history (`include_closed`) shows
        those again otherwise, once their ids fell out of the remembered ones."""
        return (
            position.units == 0
            and position.position_id not in self.held
            and 0 < position.ts_closed_ns < self.listed_ns - CLOCKS_APART_NS
        )

    def show(self, position: PositionState) -> None:
        pid = position.position_id
        if position.units > 0:
            self.held[pid] = position
            return
        self.held.pop(pid, None)
        put_bounded(self._closed, pid, None, CLOSED_REMEMBERED)


class StreamNavs:
    """The NAV a position stream values each product at, and the seq it was marked at.
    The NAV service sends a batch's updates before it stores them, so a stream that read
    the store can be past updates still in its queue: those are skipped (they showed
    NAVs going back), and a stored NAV older than one shown is not taken."""

    def __init__(self) -> None:
        self.current: dict[str, Decimal | None] = {}
        self._seqs: dict[str, int] = {}

    def stored(self, product: str, fields: dict[str, str]) -> None:
        seq = int(fields.get("seq") or 0)
        if seq >= self._seqs.get(product, 0):
            self.current[product], self._seqs[product] = _decimal(fields, "nav"), seq

    def updated(self, update: nav_pb2.NavUpdated) -> bool:
        """Take `update` unless it is older than the NAV shown (an order's re-mark
        repeats its tick's seq: an equal seq is taken); whether the NAV moved (a tick at
        the same NAV, as an unhedged product's, changes no position's value)."""
        if update.seq < self._seqs.get(update.product, 0):
            return False
        nav = Decimal(update.nav)
        moved = nav != self.current.get(update.product)
        self.current[update.product], self._seqs[update.product] = nav, update.seq
        return moved


class Gateway(gateway_pb2_grpc.GatewayServicer):
    def __init__(
        self,
        settings: GatewaySettings,
        ledger: Ledger,
        keys: KeyRing,
        config: StrategyConfig,
        feed: StreamFeed | None,
        wake_relay: Callable[[str], None],
    ) -> None:
        self.settings = settings
        self.ledger = ledger
        self.keys = keys
        self.feed = feed
        self.wake_relay = wake_relay
        self.accounting = config.accounting
        self.products: dict[str, tuple[str, Side]] = {
            product_id(symbol, side): (symbol, side)
            for symbol in config.instruments
            for side in SIDES
        }
        self.symbols = tuple(config.instruments)
        self.limits = Limits(
            min_order=settings.min_order,
            max_order=settings.max_order,
            amount_decimals=settings.amount_decimals,
            units_decimals=settings.units_decimals,
        )
        self._owners: dict[tuple[str, str], str] = {}
        self._queues: dict[str, asyncio.Lock] = {}
        self._latest: dict[str, Snapshot] = {}  # per product: as the last settle left it
        self._streams: dict[str, int] = {}  # per user: open streams

    # ------------------------------------------------------------------ plumbing

    async def _caller(self, rpc: str, request: Message, context: grpc.aio.ServicerContext) -> str:
        """The authenticated user. A request over `max_message_bytes` is INVALID_ARGUMENT
        saying so (the transport takes up to `transport_max_bytes`, so it reaches here).
        Both refusals are counted under `rpc` (a client with a wrong key was invisible on
        /metrics)."""
        key = bearer_key(context.invocation_metadata())
        user = None if key is None else self.keys.user_for(key)
        if user is None:
            why = "missing" if key is None else "unknown"
            _requests(rpc, grpc.StatusCode.UNAUTHENTICATED.name).inc()
            await _abort(
                context,
                grpc.StatusCode.UNAUTHENTICATED,
                f"{why} API key: send metadata 'authorization: Bearer <api key>'",
            )
        assert user is not None
        size, limit = request.ByteSize(), self.settings.max_message_bytes
        if size > limit:
            _requests(rpc, grpc.StatusCode.INVALID_ARGUMENT.name).inc()
            await _abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"request is {size:,} bytes, over the gateway's limit of {limit:,}",
            )
        return user

    async def _answer(
        self,
        rpc: str,
        request: Message,
        context: grpc.aio.ServicerContext,
        work: Callable[[str], Awaitable[T]],
    ) -> T:
        user = await self._caller(rpc, request, context)
        start = time.perf_counter()
        outcome = "ok"
        try:
            result = await work(user)
        except Replayed as replay:
            outcome = "replayed"
            result = replay.reply
        except Rejected as exc:
            _requests(rpc, exc.code.name).inc()
            await _abort(context, exc.code, str(exc))
        except (RedisError, OSError) as exc:
            await self._unavailable(rpc, context, exc)
        _requests(rpc, outcome).inc()
        _latency(rpc).observe(time.perf_counter() - start)
        return result

    async def _unavailable(
        self, rpc: str, context: grpc.aio.ServicerContext, exc: Exception
    ) -> NoReturn:
        """UNAVAILABLE (retry later), but INTERNAL for stored text that is no UTF-8
        (`UndecodableReply`): a retry reads the same bytes."""
        unreadable = isinstance(exc, UndecodableReply)
        code = grpc.StatusCode.INTERNAL if unreadable else grpc.StatusCode.UNAVAILABLE
        _requests(rpc, code.name).inc()
        log.error("gateway_unavailable", rpc=rpc, error=f"{type(exc).__name__}: {exc}")
        what = "stream feed" if isinstance(exc, FeedUnavailable) else "state store"
        why = "holds data the gateway cannot read" if unreadable else "unavailable"
        await _abort(context, code, f"{what} {why}: {exc}")

    def _product(self, name: str) -> tuple[str, Side]:
        if not name:
            _fail(grpc.StatusCode.INVALID_ARGUMENT, "product is required, e.g. BTC-USDT:LONG")
        found = self.products.get(name)
        if found is None:
            known = ", ".join(sorted(self.products))
            _fail(grpc.StatusCode.NOT_FOUND, f"unknown product {clipped(name)!r}; known: {known}")
        return found

    def _tradable_nav(self, product: str, nav: dict[str, str], snap: Snapshot) -> Decimal:
        """The NAV an order of `product` settles at, or FAILED_PRECONDITION."""
        ledger_units = Decimal(snap.ledger.get(f"{product}:units", "0"))
        if not nav:
            if ledger_units == 0:
                return self.accounting.initial_nav
            _fail(grpc.StatusCode.FAILED_PRECONDITION, f"{product}: no NAV published yet")
        value = Decimal(nav["nav"])
        if ledger_units == 0 and Decimal(nav.get("units", "0")) == 0:
            return value  # no units anywhere: the NAV cannot move, however old the mark
        priced = int(nav.get("written_ns") or "0")  # when its price came in (nav/marking.py)
        if not priced:
            _fail(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"{product}: no price has marked its NAV yet; try again when prices flow",
            )
        age_s = (time.time_ns() - priced) / 1e9
        if age_s > self.settings.max_nav_age_s:
            _fail(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"{product}: the last NAV is stale ({age_s:.0f}s old, max "
                f"{self.settings.max_nav_age_s:.0f}s); try again when prices flow",
            )
        if value <= 0:
            _fail(grpc.StatusCode.FAILED_PRECONDITION, f"{product}: NAV is {value}")
        if Decimal(nav.get("advanced") or "0") > 0:
            # The NAV of the books at a last trade the mark ignores, held up by the fund:
            # 1% of the mark's value for a 3x short at a print 3.3x the mark. A deposit
            # at it bought 100x the units its money is worth, a close got 1%.
            _fail(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"{product}: the last trade is a print the mark ignores, and the NAV at it "
                "is held up by the insurance fund; try again when the next price comes",
            )
        return value

    def _refuse_reuse(self, client_id: str) -> NoReturn:
        _fail(
            grpc.StatusCode.ALREADY_EXISTS,
            f"client_order_id {client_id!r} was already used for a different request",
        )

    def _recorded(self, record: str, claim: str, client_id: str, reply_type: type[R]) -> R:
        """The reply recorded for the client order id, if it was for this request."""
        digest, _, payload = record.partition(":")
        if digest != claim.partition("|")[0]:
            self._refuse_reuse(client_id)
        reply = reply_type()
        reply.ParseFromString(unb64(payload))
        return reply

    async def _settle(
        self,
        order: Order,
        reply_type: type[R],
        quote: Callable[[dict[str, str], Snapshot], Q],
        render: Callable[[Q, Snapshot], Step],
    ) -> Step:
        """Read (one round trip), quote, claim the client order id (once the quote
        validated the order) and settle atomically (one round trip).

        The settle script is what keeps the rules: it applies a duplicate once and
        answers the others with the recorded reply, and refuses a step computed from a
        product or position that moved, answering with the fresh state to recompute
        from. The product's queue only orders this process's settles of one product
        (one round trip each) and hands each the state the previous one left, so they do
        not refuse one another; reads, claims and other products go on concurrently.
        A quote is re-made when what it came from moved; the step (replies, event,
        fields: most of an order's CPU) is rendered once per settle sent."""
        user, client_id, claim = order.user, order.client_id, order.claim
        view = await self.ledger.order_view(
            user, client_id, order.symbol, order.product, order.position
        )
        if view.claim is not None and view.claim != claim:
            self._refuse_reuse(client_id)
        if view.record is not None:
            raise Replayed(self._recorded(view.record, claim, client_id, reply_type))
        snap = view.snapshot
        quoted = quote(view.nav, snap)
        index = order.position_id
        if view.claim is None:
            if await self.ledger.claim(user, client_id, claim, index, order.product) != claim:
                self._refuse_reuse(client_id)
            self._remember(user, index, order.product)
        queue = self._queues.get(order.product)
        if queue is None:
            queue = self._queues[order.product] = asyncio.Lock()
        async with queue:
            for _ in range(50):
                latest = self._latest.get(order.product)
                if latest is not None and latest.rev > snap.rev:
                    # The same position on a newer ledger: a quote reads the ledger only
                    # for its NAV (`_tradable_nav`), so an unchanged NAV keeps the quote.
                    snap = Snapshot(latest.rev, latest.step, latest.ledger, snap.position)
                    if self._tradable_nav(order.product, view.nav, snap) != quoted.nav:
                        quoted = quote(view.nav, snap)
                step = render(quoted, snap)
                settled = await self.ledger.settle(
                    order.symbol,
                    order.product,
                    snap,
                    record_id=f"{user}:{client_id}",
                    record=f"{claim.partition('|')[0]}:{b64(step.reply.SerializeToString())}",
                    pid=step.position["position_id"],
                    position=step.position,
                    ledger=step.ledger,
                    event=step.event.SerializeToString(deterministic=True),
                )
                if settled.record is not None:
                    raise Replayed(self._recorded(settled.record, claim, client_id, reply_type))
                assert settled.snapshot is not None
                self._latest[order.product] = settled.snapshot
                if settled.status is ApplyStatus.APPLIED:
                    self.wake_relay(order.symbol)
                    return step
                snap = settled.snapshot
                quoted = quote(view.nav, snap)
        # other instances settling the product faster than this one can re-quote: the
        # client retries (the same client order id; nothing was settled)
        _fail(
            grpc.StatusCode.UNAVAILABLE,
            f"{order.product}: busy, the product's ledger kept changing under the order; "
            "retry with the same client_order_id",
        )

    def _remember(self, user: str, pid: str, product: str) -> None:
        """Cache an index entry (they never change once written), bounded."""
        put_bounded(self._owners, (user, pid), product, OWNERS_CACHED)

    # ------------------------------------------------------------------ products

    def _not_tradable(self, product: str, nav: dict[str, str], ledger: dict[str, str]) -> str:
        """Why an order would find no NAV to settle at now ("": it would): `_tradable_nav`'s
        own rule and refusal on the same state (the NAV hash and the product's ledger)."""
        try:
            self._tradable_nav(product, nav, Snapshot(0, "", ledger, {}))
        except Rejected as refusal:
            return str(refusal)
        return ""

    def _product_reply(
        self, product: str, nav: dict[str, str], ledger: dict[str, str]
    ) -> gateway_pb2.Product:
        symbol, side = self.products[product]
        not_tradable = self._not_tradable(product, nav, ledger)
        reply = gateway_pb2.Product(
            product=product,
            symbol=symbol,
            side=side.name,
            nav=nav.get("nav", decimal_to_wire(self.accounting.initial_nav)),
            units=nav.get("units", "0"),
            equity=nav.get("equity", "0"),
            target_leverage=nav.get("target", ""),
            actual_leverage=nav.get("leverage", ""),
            regime=_known_regime(nav.get("regime", "")),
            ts_event_ns=int(nav.get("ts", "0")),
            reasons=[r for r in nav.get("reasons", "").split(",") if r],
            price=nav.get("price", ""),
            seq=int(nav.get("seq", "0")),
            tradable=not not_tradable,
            not_tradable_reason=not_tradable,
            min_order=decimal_to_wire(self.limits.min_order),
            max_order=decimal_to_wire(self.limits.max_order),
            amount_decimals=self.limits.amount_decimals,
            units_decimals=self.limits.units_decimals,
            open_fee_rate=decimal_to_wire(self.accounting.open_fee),
            close_fee_rate=decimal_to_wire(self.accounting.close_fee),
        )
        return reply

    async def ListProducts(
        self, request: gateway_pb2.ListProductsRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.ListProductsReply:
        async def work(user: str) -> gateway_pb2.ListProductsReply:
            names = sorted(self.products)
            navs = await self.ledger.navs(names)
            ledgers = await self.ledger.ledgers(list(self.symbols))
            return gateway_pb2.ListProductsReply(
                products=[
                    self._product_reply(p, n, ledgers[self.products[p][0]])
                    for p, n in zip(names, navs, strict=True)
                ]
            )

        return await self._answer("ListProducts", request, context, work)

    async def GetProduct(
        self, request: gateway_pb2.GetProductRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.Product:
        async def work(user: str) -> gateway_pb2.Product:
            symbol, _ = self._product(request.product)
            nav = await self.ledger.nav(request.product)
            ledgers = await self.ledger.ledgers([symbol])
            return self._product_reply(request.product, nav, ledgers[symbol])

        return await self._answer("GetProduct", request, context, work)

    # ------------------------------------------------------------------ orders

    async def OpenPosition(
        self, request: gateway_pb2.OpenPositionRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.OpenPositionReply:
        async def work(user: str) -> gateway_pb2.OpenPositionReply:
            client_id = client_order_id(request.client_order_id)
            product = request.product
            symbol, _ = self._product(product)
            amount = order_amount(request.amount_usdt, self.limits)
            claim = f"{request_hash('open', product, canonical(amount))}|{symbol}"
            pid = order_id(user, client_id)
            order = Order(user, client_id, claim, symbol, product, pid, None)

            def quote(nav_fields: dict[str, str], snap: Snapshot) -> Opened:
                return quote_open(
                    pid=pid,
                    user=user,
                    product=product,
                    amount=amount,
                    nav=self._tradable_nav(product, nav_fields, snap),
                    fee_rate=self.accounting.open_fee,
                    ts_ns=time.time_ns(),
                )

            def render(opened: Opened, snap: Snapshot) -> Step:
                nav, now = opened.nav, opened.ts_ns
                position = opened.position.fields()
                reply, event = _reply_and_event(
                    gateway_pb2.OpenPositionReply,
                    "opened",
                    orders_pb2.PositionOpened,
                    order=order,
                    now=now,
                    position=opened.position.to_proto(nav, position),
                    figures=_wire_texts(amount=amount, fee=opened.fee, units=opened.units, nav=nav),
                )
                ledger = ledger_fields(
                    product, snap.ledger, units=opened.units, deposits=amount, fees=opened.fee
                )
                return Step(reply, position, ledger, event)

            step = await self._settle(order, gateway_pb2.OpenPositionReply, quote, render)
            log.info("position_opened", user=user, position=pid, product=product)
            assert isinstance(step.reply, gateway_pb2.OpenPositionReply)
            return step.reply

        return await self._answer("OpenPosition", request, context, work)

    async def _owned(self, user: str, pid: str, act: Callable[[str, str], Awaitable[T]]) -> T:
        """`act(product, symbol)` on the caller's position, else NOT_FOUND (also for
        another user's position: its existence is not revealed). An owner from the cache
        that `act` finds no position under is read again: after Redis lost its last
        writes, the client order id the position id comes from can settle again on
        another product, and the cache named the lost one until a restart (`act` finds
        none under a product that is not the position's: on the same symbol, the other
        side's position was closed at this side's NAV)."""
        product = self._owners.get((user, pid))
        if product is not None:
            try:
                return await act(product, self.products[product][0])
            except Rejected as refusal:
                if refusal.code is not grpc.StatusCode.NOT_FOUND:
                    raise
                self._owners.pop((user, pid), None)  # a concurrent call may have already
        product = await self.ledger.owner(user, pid)
        if product is None or product not in self.products:
            _fail(grpc.StatusCode.NOT_FOUND, f"position {pid} not found")
        self._remember(user, pid, product)
        return await act(product, self.products[product][0])

    async def ClosePosition(
        self, request: gateway_pb2.ClosePositionRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.ClosePositionReply:
        async def work(user: str) -> gateway_pb2.ClosePositionReply:
            client_id = client_order_id(request.client_order_id)
            pid = position_id(request.position_id)
            units = close_units(request.units, request.all, self.limits)

            async def close(product: str, symbol: str) -> gateway_pb2.ClosePositionReply:
                wanted = "all" if units is None else canonical(units)
                claim = f"{request_hash('close', pid, wanted)}|{symbol}"
                oid = order_id(user, client_id)
                order = Order(user, client_id, claim, symbol, product, oid, pid)

                def quote(nav_fields: dict[str, str], snap: Snapshot) -> Closed:
                    stored = snap.position  # (another product's, from a stale owner: none)
                    if stored.get("user") != user or stored.get("product") != product:
                        _fail(grpc.StatusCode.NOT_FOUND, f"position {pid} not found")
                    position = PositionState.from_fields(stored)
                    if position.units <= 0:
                        _fail(grpc.StatusCode.FAILED_PRECONDITION, f"position {pid} is closed")
                    nav = self._tradable_nav(product, nav_fields, snap)
                    return quote_close(
                        position,
                        units,
                        nav,
                        self.accounting.close_fee,
                        time.time_ns(),
                        min_order=self.limits.min_order,
                    )

                def render(closed: Closed, snap: Snapshot) -> Step:
                    nav, now = closed.nav, closed.ts_ns
                    position = closed.position.fields()
                    figures = _wire_texts(
                        units=closed.units,
                        nav=nav,
                        gross=closed.gross,
                        fee=closed.fee,
                        payout=closed.payout,
                        realized_pnl=closed.realized_pnl,
                    )
                    reply, event = _reply_and_event(
                        gateway_pb2.ClosePositionReply,
                        "closed",
                        orders_pb2.PositionClosed,
                        order=order,
                        now=now,
                        position=closed.position.to_proto(nav, position),
                        figures=figures,
                    )
                    ledger = ledger_fields(
                        product,
                        snap.ledger,
                        units=-closed.units,
                        payouts=closed.payout,
                        fees=closed.fee,
                    )
                    return Step(reply, position, ledger, event)

                step = await self._settle(order, gateway_pb2.ClosePositionReply, quote, render)
                log.info("position_closed", user=user, position=pid, order=oid, product=product)
                assert isinstance(step.reply, gateway_pb2.ClosePositionReply)
                return step.reply

            return await self._owned(user, pid, close)

        return await self._answer("ClosePosition", request, context, work)

    # ------------------------------------------------------------------ positions

    async def _page(
        self, user: str, include_closed: bool, after: str | None, size: int
    ) -> tuple[list[PositionState], str | None]:
        """Up to `size` of the user's positions by id after position `after` (open ones
        only unless `include_closed`), and the id the next page starts after (None: no
        more). Positions found closed are remembered, so open listings skip them later."""
        entries, following = await self.ledger.position_page(user, after, size, not include_closed)
        known = [(pid, product) for pid, product in entries if product in self.products]
        found = await self.ledger.positions([(self.products[p][0], pid) for pid, p in known])
        positions = [
            PositionState.from_fields(fields)
            for fields in found
            if fields and fields.get("user") == user
        ]
        closed = [p.position_id for p in positions if p.units == 0]
        if closed and not include_closed:
            await self.ledger.remember_closed(user, closed)
        return [p for p in positions if include_closed or p.units > 0], following

    async def _positions(self, user: str, include_closed: bool) -> list[PositionState]:
        """All of the user's positions (open ones only unless `include_closed`), a page
        at a time."""
        listed: list[PositionState] = []
        after: str | None = None
        while True:
            page, after = await self._page(user, include_closed, after, MAX_PAGE_SIZE)
            listed += page
            if after is None:
                return listed

    async def _position(self, user: str, symbol: str, pid: str) -> PositionState | None:
        """The user's position as stored (None: no such position, or another user's)."""
        fields = await self.ledger.position(symbol, pid)
        return PositionState.from_fields(fields) if fields.get("user") == user else None

    async def _navs(self, products: set[str]) -> dict[str, Decimal | None]:
        navs = StreamNavs()
        await self._read_navs(products, navs)
        return navs.current

    async def _read_navs(self, products: set[str], navs: StreamNavs) -> None:
        names = sorted(products)
        for name, fields in zip(names, await self.ledger.navs(names), strict=True):
            navs.stored(name, fields)

    async def GetPosition(
        self, request: gateway_pb2.GetPositionRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.Position:
        async def work(user: str) -> gateway_pb2.Position:
            pid = position_id(request.position_id)

            async def shown(product: str, symbol: str) -> gateway_pb2.Position:
                position = await self._position(user, symbol, pid)
                if position is None or position.product != product:
                    _fail(grpc.StatusCode.NOT_FOUND, f"position {pid} not found")
                return position.to_proto(_decimal(await self.ledger.nav(product), "nav"))

            return await self._owned(user, pid, shown)

        return await self._answer("GetPosition", request, context, work)

    async def ListPositions(
        self, request: gateway_pb2.ListPositionsRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.ListPositionsReply:
        async def work(user: str) -> gateway_pb2.ListPositionsReply:
            everything = request.include_closed
            after = page_start(request.page_token, everything)
            positions, last = await self._page(
                user, everything, after, page_size(request.page_size)
            )
            navs = await self._navs({p.product for p in positions})
            return gateway_pb2.ListPositionsReply(
                positions=[p.to_proto(navs[p.product]) for p in positions],
                next_page_token="" if last is None else page_token(everything, last),
            )

        return await self._answer("ListPositions", request, context, work)

    # ------------------------------------------------------------------ streams

    @contextlib.asynccontextmanager
    async def _stream_slot(
        self, rpc: str, user: str, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[None]:
        """One of the user's `max_streams_per_user` open streams, else RESOURCE_EXHAUSTED."""
        open_now = self._streams.get(user, 0)
        if open_now >= self.settings.max_streams_per_user:
            _requests(rpc, "RESOURCE_EXHAUSTED").inc()
            await _abort(
                context,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"this user has {open_now} streams open on this gateway, the most it takes "
                "(SMARTLEV_GATEWAY_MAX_STREAMS_PER_USER); end one first",
            )
        self._streams[user] = open_now + 1
        try:
            yield
        finally:
            left = self._streams[user] - 1
            if left:
                self._streams[user] = left
            else:
                del self._streams[user]

    async def StreamNav(
        self, request: gateway_pb2.StreamNavRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[nav_pb2.NavUpdated]:
        user = await self._caller("StreamNav", request, context)
        for name in request.products:
            try:
                self._product(name)
            except Rejected as exc:
                await _abort(context, exc.code, str(exc))
        if self.feed is None:
            await _abort(context, grpc.StatusCode.UNAVAILABLE, "stream feed not running")
        assert self.feed is not None
        try:
            async with (
                self._stream_slot("StreamNav", user, context),
                self.feed.subscribe(frozenset(request.products) or None) as subscriber,
            ):
                _requests("StreamNav", "ok").inc()
                while True:
                    update = await subscriber.queue.get()
                    if isinstance(update, FeedUnavailable):
                        raise update
                    assert isinstance(update, nav_pb2.NavUpdated)
                    yield update
        except FeedUnavailable as exc:
            await self._unavailable("StreamNav", context, exc)

    async def StreamPositions(
        self, request: gateway_pb2.StreamPositionsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[gateway_pb2.Position]:
        user = await self._caller("StreamPositions", request, context)
        if self.feed is None:
            await _abort(context, grpc.StatusCode.UNAVAILABLE, "stream feed not running")
        assert self.feed is not None
        try:
            async with (
                self._stream_slot("StreamPositions", user, context),
                self.feed.subscribe(None, user) as subscriber,
            ):
                _requests("StreamPositions", "ok").inc()
                async for position in self._position_updates(user, request, subscriber):
                    yield position
        except (FeedUnavailable, RedisError, OSError) as exc:  # the client reconnects
            await self._unavailable("StreamPositions", context, exc)

    async def _position_updates(
        self, user: str, request: gateway_pb2.StreamPositionsRequest, subscriber: Subscriber
    ) -> AsyncIterator[gateway_pb2.Position]:
        """The user's positions now, then each one again as an order or a NAV moves it."""
        started = time.time_ns()
        shown = ShownPositions(request.include_closed)
        navs = StreamNavs()
        async for proto in self._read_afresh(user, shown, navs):
            yield proto  # the snapshot
        while True:
            item = await subscriber.queue.get()
            if isinstance(item, FeedUnavailable):
                raise item
            if subscriber.lost:  # updates were dropped for a slow reader
                subscriber.lost = False
                async for proto in self._read_afresh(user, shown, navs):
                    yield proto
            if isinstance(item, orders_pb2.OrderEvent):
                changed = await self._changed_position(user, item)
                if changed is None or not shown.changed(changed):
                    continue  # the snapshot above, or an earlier event, had it
                if changed.position_id not in shown.held and not (
                    request.include_closed
                    or changed.units > 0
                    or changed.ts_closed_ns >= started - CLOCKS_APART_NS
                ):
                    # closed before the snapshot (a late or repeated event); its time is
                    # the settling gateway's clock, which may be behind ours: one opened
                    # and closed just after the stream began read as before it
                    continue
                shown.show(changed)
                if changed.product not in navs.current:  # a product not valued yet
                    await self._read_navs({changed.product}, navs)
                yield changed.to_proto(navs.current.get(changed.product))
            elif isinstance(item, nav_pb2.NavUpdated) and navs.updated(item):
                for position in shown.held.values():
                    if position.product == item.product and position.units > 0:
                        yield position.to_proto(navs.current[item.product])

    async def _read_afresh(
        self, user: str, shown: ShownPositions, navs: StreamNavs
    ) -> AsyncIterator[gateway_pb2.Position]:
        """Every position the stream shows or should show, read again (with the NAVs);
        those it has not shown as they are now, or at the NAV they are valued at now, are
        shown (all of them, for the first snapshot). `shown` and `navs` are updated in
        place."""
        began = time.time_ns()
        current = {p.position_id: p for p in await self._positions(user, shown.include_closed)}
        for pid, position in shown.held.items():
            if pid not in current:  # closed since: a listing of open ones leaves it out
                again = await self._position(user, self.products[position.product][0], pid)
                if again is not None:
                    current[pid] = again
        valued = dict(navs.current)
        await self._read_navs({p.product for p in current.values()}, navs)
        fresh = [
            p
            for p in current.values()
            if (shown.changed(p) and not shown.listed_before(p))
            or (
                p.position_id in shown.held and valued.get(p.product) != navs.current.get(p.product)
            )
        ]  # as it is now, or valued at a NAV an update the stream lost moved
        shown.listed_ns = began
        for position in fresh:
            shown.show(position)
            yield position.to_proto(navs.current.get(position.product))

    async def _changed_position(
        self, user: str, event: orders_pb2.OrderEvent
    ) -> PositionState | None:
        """The position an order event changed, as it is now (a later order may have
        changed it again: the stream shows the latest state, once)."""
        order = order_of(event)
        found = self.products.get(order.product)
        return None if found is None else await self._position(user, found[0], order.position_id)

    async def Ping(
        self, request: gateway_pb2.PingRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.PingReply:
        await self._caller("Ping", request, context)
        return gateway_pb2.PingReply(ts_ns=time.time_ns())


# --------------------------------------------------------------------------- the server


def key_ring(settings: GatewaySettings) -> KeyRing:
    from_file = load_keys_file(settings.api_keys_file) if settings.api_keys_file else {}
    return KeyRing.build(from_file, settings.api_keys)


class GatewayServer:
    """The gRPC server, the outbox relay, the NAV feed, the health switch (SERVING only
    while Redis and Kafka answer) and /metrics + /healthz; `start()` / `stop()` so tests
    run it in-process (`relay=False`: the test drives the relay itself)."""

    def __init__(
        self,
        settings: GatewaySettings,
        redis: Redis,
        *,
        relay: bool = True,
    ) -> None:
        self.settings = settings
        self.redis = redis
        self.config = settings.strategy
        # The order path's own connection (redis_wire: ~8x less CPU per command than
        # redis-py); `redis` serves the health check.
        self.wire = RedisWire.from_url(settings.redis_url)
        self.ledger = Ledger(self.wire, settings.namespace)
        self.run_relay = relay
        self.producer = idempotent_producer(
            settings.kafka_bootstrap, f"{settings.namespace}gateway"
        )
        self.relay = OutboxRelay(
            self.ledger,
            self.producer,
            ORDERS_EVENTS.in_namespace(settings.namespace).name,
            self.config.instruments,
            settings.outbox_poll_s,
            settings.outbox_interval_s,
            settings.outbox_window,
            renew=self._renewed_producer,
        )
        self._retiring: set[asyncio.Task[None]] = set()  # producers replaced, stopping
        self.feed = StreamFeed(
            settings.kafka_bootstrap,
            NAV_UPDATES.in_namespace(settings.namespace),
            ORDERS_EVENTS.in_namespace(settings.namespace),
            settings.stream_queue,
        )
        self.gateway = Gateway(
            settings, self.ledger, key_ring(settings), self.config, self.feed, self.relay.wake
        )
        options = [
            ("grpc.max_receive_message_length", settings.transport_max_bytes),
            ("grpc.max_send_message_length", 16 * 1024 * 1024),
            ("grpc.keepalive_time_ms", int(settings.keepalive_s * 1000)),
            ("grpc.keepalive_timeout_ms", int(settings.keepalive_timeout_s * 1000)),
            # the core times a ping out on its own (60 s by default), not at the above
            ("grpc.http2.ping_timeout_ms", int(settings.keepalive_timeout_s * 1000)),
            ("grpc.http2.max_pings_without_data", 0),  # a quiet stream is pinged on
            # clients may ping as often (`smartlev watch` every 20 s); gRPC's default, 5
            # min, ends their connection after two pings on a quiet stream
            ("grpc.http2.min_ping_interval_without_data_ms", CLIENT_PINGS_MS),
        ]
        self.server = grpc_server(options)
        self.port = 0
        self.health: GrpcHealth | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._http: HealthServer | None = None
        self._checks = HealthRegistry()
        self._checks.register("redis", redis_check(redis))
        self._checks.register("kafka", kafka_check(settings.kafka_bootstrap))
        self._checks.register("stream_feed", self.feed.health)

    async def start(self) -> int:
        """Serve; returns the bound gRPC port."""
        register(gateway_pb2_grpc.add_GatewayServicer_to_server, self.gateway, self.server)
        host = self.settings.grpc_host
        self.port = listen(self.server, "gateway", host, self.settings.grpc_port)
        self.health = await GrpcHealth.install(self.server, [SERVICE_NAME])
        await self.producer.start()
        await self.feed.start(lambda topic: self.producer.partitions_for(topic))
        await self.server.start()
        if self.run_relay:
            self._tasks.append(asyncio.create_task(self.relay.run()))
        watch = self.health.follow(self._checks, self.settings.health_interval_s, "gateway")
        self._tasks.append(asyncio.create_task(watch))
        if self.settings.metrics_port:
            self._http = HealthServer(
                self._checks,
                port=self.settings.metrics_port,
                host=self.settings.metrics_host,
                service=self.settings.service,
            )
            await self._http.start()
        log.info("gateway_started", grpc=f"{self.settings.grpc_host}:{self.port}")
        return self.port

    async def stop(self) -> None:
        if self.health is not None:
            await self.health.shutdown()
        await self.server.stop(self.settings.grace_s)
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.run_relay:
            with contextlib.suppress(KafkaError, RedisError, OSError):
                await self.relay.sweep()  # what was settled during the grace period
        await self.feed.stop()
        await self.producer.stop()
        await asyncio.gather(*self._retiring, return_exceptions=True)
        await self.wire.aclose()
        if self._http is not None:
            await self._http.stop()

    async def _renewed_producer(self) -> AIOKafkaProducer:
        """A started producer for the relay in place of the one it failed on (`relay.py`);
        the old one stops in the background (its batches still in flight end first)."""
        fresh = idempotent_producer(
            self.settings.kafka_bootstrap, f"{self.settings.namespace}gateway"
        )
        try:
            await fresh.start()
        except BaseException:
            await fresh.stop()
            raise
        old, self.producer = self.producer, fresh
        retiring = asyncio.create_task(old.stop())
        self._retiring.add(retiring)
        retiring.add_done_callback(self._retiring.discard)
        return fresh


def main() -> None:
    settings = from_environment(GatewaySettings)
    run("gateway", settings, lambda redis: GatewayServer(settings, redis))
