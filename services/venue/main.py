"""The venue service: `python -m services.venue`.

A grpc.aio server (smartlev.v1.Venue, grpc.health.v1, reflection) over `VenueLedger`.
This module only validates requests, calls the ledger and maps errors to status codes;
the exchange rules are the core's `PerpVenue`, the persistence and idempotency the
ledger's.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import TypeVar

import grpc
from google.protobuf.message import Message
from prometheus_client import Counter, Histogram
from redis.asyncio import Redis
from redis.exceptions import RedisError
from smartlev.v1 import venue_pb2, venue_pb2_grpc

from services.venue.config import VenueSettings
from services.venue.ledger import CorruptState, IdReused, StateConflict, VenueLedger
from shared.adapters.redis_wire import RedisWire
from shared.adapters.venue_client import (
    LIQUIDITY_FROM_WIRE,
    account_to_wire,
    fill_to_wire,
    liquidation_to_wire,
)
from shared.codec import DecodeError, EncodeError, decimal_from_wire, decimal_to_wire
from shared.core.money import MoneyError
from shared.core.venue import InsufficientMargin, PerpVenue
from shared.health import GrpcHealth, HealthRegistry, HealthServer, redis_check
from shared.logging import get_logger
from shared.serving import Rejected, grpc_server, listen, register, run
from shared.settings import from_environment

SERVICE_NAME = "smartlev.v1.Venue"
T = TypeVar("T")
R = TypeVar("R", bound=Message)

REQUESTS = Counter(
    "smartlev_venue_requests_total",
    "Venue calls by rpc and outcome: applied, replayed (repeated id), or the status code.",
    ["rpc", "outcome"],
)
FILLS = Counter("smartlev_venue_fills_total", "Orders filled (not replays).", ["symbol"])
LATENCY = Histogram(
    "smartlev_venue_request_seconds",
    "Time to answer a venue call, Redis write included.",
    ["rpc"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1),
)

log = get_logger("venue")


# --------------------------------------------------------------------------- validation


# Hedging's call ids are `<symbol>:<seq>:<n>` and `<symbol>:order:<order id>:<n>`, under
# 80 characters; the venue keeps up to `applied_ids_kept` of them per symbol.
MAX_ID_CHARS = 200


def _id(value: str, name: str) -> str:
    if not value.strip():
        raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, f"{name} is required")
    if len(value) > MAX_ID_CHARS:
        raise Rejected(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"{name}: {len(value):,} characters, at most {MAX_ID_CHARS}",
        )
    return value


# The most significant digits an amount, quantity or price may have: the sums an account
# makes keep 60 (shared/core/money.py), so an amount of 80 the wire admits was applied
# and recorded as another, rounded, one. A billion USDT to 1e-8 takes 18.
MAX_DIGITS = 30


def _decimal(text: str, name: str, *, positive: bool = False) -> Decimal:
    try:
        value = decimal_from_wire(text, name=name)
    except DecodeError as exc:
        raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, exc.reason) from None
    if len(value.as_tuple().digits) > MAX_DIGITS:
        raise Rejected(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"{name}: {text!r} has more than {MAX_DIGITS} significant digits",
        )
    if positive and value <= 0:
        raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, f"{name}: must be > 0, got {value}")
    return value


class VenueServicer(venue_pb2_grpc.VenueServicer):
    def __init__(self, ledger: VenueLedger) -> None:
        self.ledger = ledger

    def _symbol(self, symbol: str) -> str:
        try:
            self.ledger.config.instrument(symbol)
        except ValueError as exc:
            raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        return symbol

    async def _answer(
        self, rpc: str, context: grpc.aio.ServicerContext, work: Callable[[], Awaitable[T]]
    ) -> T:
        start = time.perf_counter()
        try:
            result = await work()
        except Rejected as exc:
            REQUESTS.labels(rpc, exc.code.name).inc()
            await context.abort(exc.code, str(exc))
        except (IdReused, InsufficientMargin) as exc:  # nothing was written
            REQUESTS.labels(rpc, "FAILED_PRECONDITION").inc()
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except (EncodeError, MoneyError, ArithmeticError) as exc:  # nothing was written
            REQUESTS.labels(rpc, "INVALID_ARGUMENT").inc()
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"the call's figures are out of range: {exc}"
            )
        except CorruptState as exc:
            REQUESTS.labels(rpc, "INTERNAL").inc()
            log.error("venue_state_corrupt", rpc=rpc, error=str(exc))
            await context.abort(grpc.StatusCode.INTERNAL, str(exc))
        except (StateConflict, RedisError, OSError) as exc:
            REQUESTS.labels(rpc, "UNAVAILABLE").inc()
            log.error("venue_unavailable", rpc=rpc, error=f"{type(exc).__name__}: {exc}")
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"venue state unavailable: {exc}")
        LATENCY.labels(rpc).observe(time.perf_counter() - start)
        return result

    async def _apply(
        self,
        rpc: str,
        symbol: str,
        call_id: str,
        request: Message,
        reply_type: type[R],
        mutate: Callable[[PerpVenue], R],
    ) -> tuple[R, bool]:
        """(reply, replayed) of a mutating call, counted."""
        reply, replayed = await self.ledger.apply(symbol, call_id, rpc, request, reply_type, mutate)
        REQUESTS.labels(rpc, "replayed" if replayed else "applied").inc()
        return reply, replayed

    async def SubmitOrder(
        self, request: venue_pb2.SubmitOrderRequest, context: grpc.aio.ServicerContext
    ) -> venue_pb2.SubmitOrderReply:
        async def work() -> venue_pb2.SubmitOrderReply:
            symbol = self._symbol(request.symbol)
            order_id = _id(request.client_order_id, "client_order_id")
            qty = _decimal(request.qty, "qty")
            reference = _decimal(request.reference_price, "reference_price", positive=True)
            mark = (
                _decimal(request.mark_price, "mark_price", positive=True)
                if request.mark_price
                else None
            )
            lot = self.ledger.config.instrument(symbol).lot_step
            if qty == 0 or qty % lot != 0:
                raise Rejected(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"qty: {qty} is not a non-zero whole number of lots ({lot})",
                )
            liquidity = LIQUIDITY_FROM_WIRE.get(request.liquidity)
            if liquidity is None:
                raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, "liquidity: TAKER or MAKER")
            if request.ts_event_ns <= 0:  # the instant its walk of the book belongs to
                raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, "ts_event_ns: must be > 0")

            def fill(venue: PerpVenue) -> venue_pb2.SubmitOrderReply:
                filled = venue.execute(request.ts_event_ns, qty, reference, liquidity, mark)
                return venue_pb2.SubmitOrderReply(
                    client_order_id=order_id,
                    fill=fill_to_wire(filled),
                    account=account_to_wire(venue),
                )

            # The order as its record knows it: its mark decides only whether it is
            # taken, so a re-run carrying another mark (or none: an older build's,
            # across an upgrade) is the same order, answered from the record.
            identity = venue_pb2.SubmitOrderRequest()
            identity.CopyFrom(request)
            identity.ClearField("mark_price")
            reply, replayed = await self._apply(
                "SubmitOrder", symbol, order_id, identity, venue_pb2.SubmitOrderReply, fill
            )
            if not replayed:
                FILLS.labels(symbol).inc()
            return reply

        return await self._answer("SubmitOrder", context, work)

    async def Transfer(
        self, request: venue_pb2.TransferRequest, context: grpc.aio.ServicerContext
    ) -> venue_pb2.TransferReply:
        async def work() -> venue_pb2.TransferReply:
            symbol = self._symbol(request.symbol)
            transfer_id = _id(request.transfer_id, "transfer_id")
            amount = _decimal(request.amount, "amount")

            def move(venue: PerpVenue) -> venue_pb2.TransferReply:
                held = venue.wallet
                venue.transfer(amount)
                if amount < 0 and not venue.position and venue.wallet < 0:
                    # an account with no position holds its wallet: past it, the insurance
                    # fund paid the rest at the next liquidation check (a real exchange
                    # refuses such a withdrawal; one beside a position is not checked)
                    raise Rejected(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        f"amount: withdrawing {-amount} from an account holding {held}",
                    )
                return venue_pb2.TransferReply(
                    transfer_id=transfer_id, account=account_to_wire(venue)
                )

            reply, _ = await self._apply(
                "Transfer", symbol, transfer_id, request, venue_pb2.TransferReply, move
            )
            return reply

        return await self._answer("Transfer", context, work)

    async def SettleFunding(
        self, request: venue_pb2.SettleFundingRequest, context: grpc.aio.ServicerContext
    ) -> venue_pb2.SettleFundingReply:
        async def work() -> venue_pb2.SettleFundingReply:
            symbol = self._symbol(request.symbol)
            settlement_id = _id(request.settlement_id, "settlement_id")
            rate = _decimal(request.rate, "rate")
            if abs(rate) >= 1:  # a rate of 100% a period is no rate (ingestion admits 5%)
                raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, f"rate: |{rate}| must be < 1")
            mark = _decimal(request.mark_price, "mark_price", positive=True)

            def settle(venue: PerpVenue) -> venue_pb2.SettleFundingReply:
                amount = venue.settle_funding(rate, mark)
                return venue_pb2.SettleFundingReply(
                    settlement_id=settlement_id,
                    amount=decimal_to_wire(amount, name="amount"),
                    account=account_to_wire(venue),
                )

            reply, _ = await self._apply(
                "SettleFunding",
                symbol,
                settlement_id,
                request,
                venue_pb2.SettleFundingReply,
                settle,
            )
            return reply

        return await self._answer("SettleFunding", context, work)

    async def CheckLiquidation(
        self, request: venue_pb2.CheckLiquidationRequest, context: grpc.aio.ServicerContext
    ) -> venue_pb2.CheckLiquidationReply:
        async def work() -> venue_pb2.CheckLiquidationReply:
            symbol = self._symbol(request.symbol)
            check_id = _id(request.check_id, "check_id")
            mark = _decimal(request.mark_price, "mark_price", positive=True)

            if request.ts_event_ns <= 0:  # the instant a liquidation it finds is stamped
                raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, "ts_event_ns: must be > 0")

            def check(venue: PerpVenue) -> venue_pb2.CheckLiquidationReply:
                event = venue.check_liquidation(request.ts_event_ns, mark)
                reply = venue_pb2.CheckLiquidationReply(
                    check_id=check_id, account=account_to_wire(venue)
                )
                if event is not None:
                    reply.liquidated.CopyFrom(liquidation_to_wire(event))
                return reply

            reply, _ = await self._apply(
                "CheckLiquidation",
                symbol,
                check_id,
                request,
                venue_pb2.CheckLiquidationReply,
                check,
            )
            return reply

        return await self._answer("CheckLiquidation", context, work)

    async def GetAccount(
        self, request: venue_pb2.GetAccountRequest, context: grpc.aio.ServicerContext
    ) -> venue_pb2.VenueAccount:
        async def work() -> venue_pb2.VenueAccount:
            symbol = self._symbol(request.symbol)
            account = account_to_wire(await self.ledger.account(symbol))
            REQUESTS.labels("GetAccount", "applied").inc()
            return account

        return await self._answer("GetAccount", context, work)


# --------------------------------------------------------------------------- the server


class VenueServer:
    """The gRPC server, its health switch (SERVING only while Redis answers) and the
    /metrics + /healthz endpoint; `start()` / `stop()` so tests run it in-process."""

    def __init__(
        self,
        settings: VenueSettings,
        redis: Redis,
    ) -> None:
        self.settings = settings
        self.redis = redis
        # Calls go over a multiplexed connection (redis_wire: ~8x less CPU per command
        # than redis-py); `redis` serves the health checks.
        self.wire = RedisWire.from_url(settings.redis_url)
        self.ledger = VenueLedger(
            self.wire, settings.strategy, settings.namespace, settings.applied_ids_kept
        )
        self.server = grpc_server()
        self.port = 0
        self._health: GrpcHealth | None = None
        self._watch: asyncio.Task[None] | None = None
        self._http: HealthServer | None = None

    async def start(self) -> int:
        """Serve; returns the bound gRPC port."""
        register(
            venue_pb2_grpc.add_VenueServicer_to_server, VenueServicer(self.ledger), self.server
        )
        self._health = await GrpcHealth.install(self.server, [SERVICE_NAME])
        host = self.settings.grpc_host
        self.port = listen(self.server, "venue", host, self.settings.grpc_port)
        await self.server.start()
        checks = HealthRegistry()
        checks.register("redis", redis_check(self.redis))
        interval_s = self.settings.health_interval_s
        self._watch = asyncio.create_task(self._health.follow(checks, interval_s, "venue"))
        if self.settings.metrics_port:
            self._http = HealthServer(
                checks,
                port=self.settings.metrics_port,
                host=self.settings.metrics_host,
                service=self.settings.service,
            )
            await self._http.start()
        log.info("venue_started", grpc=f"{self.settings.grpc_host}:{self.port}")
        return self.port

    async def stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        if self._health is not None:
            await self._health.shutdown()
        await self.server.stop(self.settings.grace_s)
        if self._http is not None:
            await self._http.stop()
        await self.wire.aclose()


def main() -> None:
    settings = from_environment(VenueSettings)
    run("venue", settings, lambda redis: VenueServer(settings, redis))
