"""The hedging execution service: `python -m services.hedging`.

Consumes `leverage.targets` (every market event with the leverage decisions taken on it)
and `orders.events` (user opens and closes); per symbol, runs the core `Engine` on a
`RemoteVenue` (the venue service) and publishes one `HedgeUpdate` per input on
`hedge.fills`, then commits the desk's state (docs/pipeline.md: output before state).

Failures:
- a redelivered market event (seq at or below the last applied) or order (id applied)
  is skipped; a re-run after a crash makes the same venue calls with the same ids, which
  the venue answers from its record: the input an event began on is written before its
  first venue call (desks.Inflight), and a desk loaded with one runs it before anything
  else, whichever topic's record comes first after the restart;
- a transient failure (venue, Redis or Kafka unreachable) reloads the symbol's desk from
  Redis and retries the event until it goes through;
- anything else, a `BooksOutOfBalance` first of all, is a bug: it is logged loudly, the
  symbol halts on that event and /healthz turns unhealthy. Its later inputs are not
  applied, and the commits of their partitions stop at the first of them
  (`ConsumerRuntime.hold`): nothing is skipped, the symbol's input waits for a fix and a
  restart, while the instance's other symbols go on (their records read again after the
  restart are skipped by the seq guard, or for `orders.events` by the applied order ids).
- an order the books refuse (redeeming more units than the product has) goes to the
  `.dlq` with the reason, then is recorded as refused, so a redelivery (after orders
  that would now let it through) is skipped.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from smartlev.v1 import hedging_pb2, leverage_pb2, orders_pb2

from services.hedging.config import HedgingSettings
from services.hedging.desks import MARKET, ORDER, Desk, Desks, Inflight
from services.hedging.messages import (
    MarketStep,
    OrderStep,
    fresh_steps,
    hedge_update,
    market_step,
    order_step,
    products_by_symbol,
)
from services.hedging.reconcile_loop import install_reconcile_loop
from shared import codec
from shared.adapters.venue_client import venue_channel
from shared.consumer_stage import ConsumerRuntime, Records
from shared.core.accounting import QuoteMismatch, QuoteOutOfBand
from shared.core.config import StrategyConfig
from shared.core.market import FundingRate
from shared.core.money import MoneyError
from shared.core.venue import MIN_CALL_IDS_KEPT
from shared.health import HealthRegistry
from shared.logging import get_logger
from shared.settings import from_environment
from shared.stream import Input, Record, record_key
from shared.topics import HEDGE_FILLS, LEVERAGE_TARGETS, ORDERS_EVENTS
from shared.transient import is_transient as shared_is_transient

log = get_logger("hedging")

_TRANSIENT_GRPC = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)


def is_transient(exc: BaseException) -> bool:
    """Worth retrying the event: the venue is unreachable or busy, or the rule every
    service retries by (shared/transient.py) says so; anything else halts the symbol."""
    if isinstance(exc, grpc.RpcError):
        code = exc.code() if isinstance(exc, grpc.Call) else None
        return code in _TRANSIENT_GRPC
    return shared_is_transient(exc)


@dataclass(slots=True)
class ResumedRecord:
    """An order's record as its Inflight kept it (a `Record` for its dead letter)."""

    topic: str
    partition: int
    offset: int
    key: bytes
    value: bytes


class SymbolHalted(Exception):
    """The symbol stopped on a bug (`Hedger._halt`): its input is held, not applied."""


@dataclass
class HedgingRuntime(ConsumerRuntime):
    """The shared stream runtime plus a `books` health check: unhealthy once a symbol
    halted on a bug."""

    halted: dict[str, str] = field(default_factory=dict)

    def health(self) -> HealthRegistry:
        registry = super().health()
        registry.register("books", self._books_check)
        return registry

    def _books_check(self) -> bool | str:
        if not self.halted:
            return True
        return "; ".join(f"{symbol} halted: {why}" for symbol, why in sorted(self.halted.items()))


class Hedger:
    """The two inputs' handlers; per symbol one event at a time (both inputs share it)."""

    def __init__(
        self,
        runtime: HedgingRuntime,
        desks: Desks,
        config: StrategyConfig,
        backoff_s: float,
        calls_per_inflight: int = MIN_CALL_IDS_KEPT // 4,
        orders: Input | None = None,
    ) -> None:
        """`orders`: the input whose dead letters an order refused when resumed goes to."""
        self.runtime = runtime
        self.desks = desks
        self.orders = orders
        self.calls_per_inflight = calls_per_inflight
        self.products = products_by_symbol(config)
        self.leverage = config.leverage
        self.backoff_s = backoff_s
        self.out = runtime.output(HEDGE_FILLS)
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        # per symbol: market steps a resumed Inflight committed, until counted
        self._resumed: defaultdict[str, list[MarketStep]] = defaultdict(list)

    def market_step(self, message: Any) -> MarketStep:
        return market_step(message, self.products, self.leverage)

    def order_step(self, message: Any) -> OrderStep:
        return order_step(message, self.products)

    async def on_market(self, inp: Input, steps: list[MarketStep]) -> None:
        """One symbol's market events, in order, as one step: the new ones (above the
        desk's last seq) run through the engine, their HedgeUpdates go out together,
        then the desk is committed once at the last seq (output before state; a batch
        of many venue calls in parts, `_run_market`)."""
        symbol = steps[0].symbol
        committed: list[MarketStep] = []  # by this call, over its attempts

        async def attempt() -> bool:
            desk = await self._ready(symbol)
            if desk is None:
                return False
            fresh = fresh_steps(desk.last_seq, steps)
            if fresh and not await self._run_market(desk, fresh, committed):
                return False
            # counted once the step is done: not again on every retry of a conflict, and
            # a part committed before one met a conflict, or resumed after an error (by
            # either input, in the retry's back-off), is this instance's, not a redelivery
            mine = {step.seq for step in committed + self._resumed.pop(symbol, [])}
            for step in steps:
                if step.seq in mine:
                    self.runtime.processed(inp, step.ts_init_ns)
                else:
                    self.runtime.skipped(inp)
            return True

        await self._guarded(symbol, attempt)

    async def on_order(self, inp: Input, record: Record, step: OrderStep) -> None:
        async def attempt() -> bool:
            desk = await self._ready(step.symbol)
            if desk is None:
                return False
            applied, open_refused = await self.desks.order_record(
                desk, step.order_id, step.position_id
            )
            if applied:
                self.runtime.skipped(inp)
                return True
            if step.amount is None and open_refused:
                # The gateway settled the open (an open's id is its position's) that the
                # books refused: its units are not in the product, and taken from it
                # they would be the other holders', whose own closes then fail.
                raise MoneyError(
                    f"position {step.position_id}: its open was refused (dead-lettered), "
                    "so its units are not in the product's books; this close is refused too"
                )
            source = (record.topic, record.partition, record.offset, record_key(record))
            if not await self._run_order(desk, step, record.value, source):
                return False
            self.runtime.processed(inp, step.ts_init_ns)
            return True

        async def refuse(reason: str) -> None:
            await self._refuse(inp, record, step, reason)

        await self._guarded(step.symbol, attempt, refuse)

    async def _refuse(self, inp: Input, record: Record, step: OrderStep, reason: str) -> None:
        # The dead letter first: a crash before the refusal is recorded refuses the
        # redelivery again (a second letter), never leaves the order without one.
        await self.runtime.reject(inp, record, reason)
        await self.desks.refuse(step.symbol, step.order_id, record.value, reason)
        log.error("order_refused", order=step.order_id, product=step.product, reason=reason)

    async def _ready(self, symbol: str) -> Desk | None:
        """The symbol's desk, once the input a crash cut short (Inflight) ran first;
        None: another writer moved the desk (it reloads). The market steps a resumed
        Inflight commits are kept for the symbol's next market count (`_resumed`)."""
        desk = await self.desks.current(symbol)
        inflight = desk.inflight
        if inflight is None:
            return desk
        log.warning(
            "inflight_resumed", symbol=symbol, kind=inflight.kind, events=len(inflight.payloads)
        )
        if inflight.kind == MARKET:
            messages = [codec.decode(leverage_pb2.TargetsUpdate, p) for p in inflight.payloads]
            try:
                steps = [self.market_step(m) for m in messages]
                done = await self._run_market(desk, steps, self._resumed[symbol])
            except MoneyError as exc:  # market input is never refused: a bug, halt
                raise RuntimeError(f"in-flight market input failed again: {exc}") from exc
        else:
            [payload] = inflight.payloads
            order = self.order_step(codec.decode(orders_pb2.OrderEvent, payload))
            try:
                done = await self._run_order(desk, order, payload)
            except MoneyError as exc:
                self.desks.drop(symbol)
                await self._refuse_resumed(inflight, order, str(exc))
                return None
        return desk if done else None

    async def _refuse_resumed(self, inflight: Inflight, order: OrderStep, reason: str) -> None:
        """An order the books refuse again when resumed: refused in full here, its letter
        from where its record was read and its record, since that record may not come
        again (the instance that began it, refusing it as a rebalance handed the symbol
        over, found its own record's write refused and committed past it). An Inflight
        from before it kept its source is cleared; its record's redelivery refuses it."""
        if inflight.source is None or self.orders is None:
            await self.desks.abandon(order.symbol, inflight)
            return
        topic, partition, offset, key = inflight.source
        record = ResumedRecord(topic, partition, offset, key.encode(), inflight.payloads[0])
        await self._refuse(self.orders, record, order, reason)

    async def _run_market(
        self, desk: Desk, steps: list[MarketStep], committed: list[MarketStep] | None = None
    ) -> bool:
        """The steps as one Inflight, cut where its venue calls reach
        `calls_per_inflight`: those run are committed and the rest are an Inflight of
        their own. A re-run repeats its Inflight's calls, which the venue answers from
        its records only while it still has them (the newest MIN_CALL_IDS_KEPT at
        least): a batch of 20,450 calls re-run after a crash traded its first ones
        again. `committed`: where the steps committed go."""
        while steps:
            inflight = desk.inflight or Inflight(
                MARKET, tuple(step.message.SerializeToString() for step in steps)
            )
            if not await self.desks.begin(desk, inflight):
                return False
            updates = await asyncio.to_thread(self._market_run, desk, steps)
            await self.runtime.send_many([(self.out, desk.symbol, u) for u in updates])
            last = steps[len(updates) - 1].seq
            if not await self.desks.commit(desk, seq=last):
                log.warning("state_conflict", symbol=desk.symbol, seq=last)
                return False
            if committed is not None:
                committed.extend(steps[: len(updates)])
            steps = steps[len(updates) :]
        return True

    def _market_run(self, desk: Desk, steps: list[MarketStep]) -> list[hedging_pb2.HedgeUpdate]:
        """The steps' updates, up to the one whose venue calls reach the budget: the same
        cut on a re-run from the same state, which makes the same calls."""
        start, updates = desk.venue.calls_made, []
        for step in steps:
            updates.append(self._market_work(desk, step))
            if desk.venue.calls_made - start >= self.calls_per_inflight:
                break
        return updates

    async def _run_order(
        self,
        desk: Desk,
        step: OrderStep,
        payload: bytes,
        source: tuple[str, int, int, str] | None = None,
    ) -> bool:
        if not await self.desks.begin(desk, desk.inflight or Inflight(ORDER, (payload,), source)):
            return False
        update = await asyncio.to_thread(self._order_work, desk, step)
        await self.runtime.send(self.out, step.symbol, update)
        if not await self.desks.commit(desk, order_id=step.order_id):
            log.warning("state_conflict", symbol=step.symbol, order=step.order_id)
            return False
        return True

    @staticmethod
    def _market_work(desk: Desk, step: MarketStep) -> hedging_pb2.HedgeUpdate:
        desk.venue.begin(step.event_id)
        engine = desk.engine
        if isinstance(step.event, FundingRate):
            events = engine.on_funding(step.event)
        else:
            events = engine.on_tick(step.event, step.decisions, step.message.bar_closed)
        return hedge_update(
            engine,
            step.event_id,
            events,
            ts_init_ns=step.ts_init_ns,
            market=step.message.market,
            targets=step.message.targets,
            regime=step.message.regime,
        )

    @staticmethod
    def _order_work(desk: Desk, step: OrderStep) -> hedging_pb2.HedgeUpdate:
        desk.venue.begin(step.event_id)
        engine = desk.engine
        try:  # the books settle exactly the gateway's quote, or nothing moves
            if step.amount is not None:
                events = engine.deposit(
                    step.product, step.amount, step.ts_ns, step.nav, quoted_units=step.units
                )
            else:
                assert step.units is not None
                events = engine.redeem(
                    step.product, step.units, step.ts_ns, step.nav, quoted_payout=step.payout
                )
        except (QuoteMismatch, QuoteOutOfBand) as exc:  # a bug, or a bad NAV: loud
            log.error("quote_refused", order=step.order_id, product=step.product, error=str(exc))
            raise
        return hedge_update(engine, step.event_id, events, ts_init_ns=step.ts_init_ns)

    async def _guarded(
        self,
        symbol: str,
        attempt: Callable[[], Awaitable[bool]],
        refuse: Callable[[str], Awaitable[None]] | None = None,
    ) -> None:
        """Run `attempt` under the symbol's lock until it is done (True; False: another
        writer moved the desk, so it reloads and runs again); see the module doc for
        what a refused order, a transient failure and a bug do."""
        while True:
            if symbol in self.runtime.halted:
                raise SymbolHalted(symbol)  # stopped on a bug: the caller holds the input
            async with self._locks[symbol]:
                try:
                    if await attempt():
                        return
                    continue
                except MoneyError as exc:
                    self.desks.drop(symbol)
                    if refuse is None:
                        self._halt(symbol, exc)
                    else:
                        await refuse(str(exc))
                        return
                except Exception as exc:
                    self.desks.drop(symbol)
                    if not is_transient(exc):
                        self._halt(symbol, exc)
                        continue
                    log.warning("event_retry", symbol=symbol, error=repr(exc))
            await asyncio.sleep(self.backoff_s)

    def _halt(self, symbol: str, exc: BaseException) -> None:
        reason = f"{type(exc).__name__}: {exc}"
        self.runtime.halted[symbol] = reason
        log.exception("symbol_halted", symbol=symbol, reason=reason)


def build(settings: HedgingSettings) -> HedgingRuntime:
    """The runtime with its two inputs' handlers, wired to Redis and the venue."""
    config = settings.strategy
    runtime = HedgingRuntime(settings)
    wire = runtime.connect_redis(decode_responses=True)
    channel = venue_channel(settings.venue_address)

    async def close() -> None:
        channel.close()

    runtime.on_stop(close)
    desks = Desks(
        wire,
        config,
        channel,
        namespace=settings.namespace,
        venue_timeout_s=settings.venue_timeout_s,
    )
    install_reconcile_loop(runtime, settings, config)
    targets_in = runtime.input(LEVERAGE_TARGETS)
    orders_in = runtime.input(ORDERS_EVENTS)
    hedger = Hedger(runtime, desks, config, settings.retry_backoff_s, orders=orders_in)

    async def handle_targets(batch: Records) -> None:
        by_symbol: dict[str, list[tuple[Record, MarketStep]]] = defaultdict(list)
        for record in batch:
            step = await runtime.parse(targets_in, record, hedger.market_step)
            if step is not None:
                by_symbol[step.symbol].append((record, step))
        for pairs in by_symbol.values():
            try:
                await hedger.on_market(targets_in, [step for _, step in pairs])
            except SymbolHalted:
                for record, _ in pairs:
                    runtime.hold(record)

    async def handle_orders(batch: Records) -> None:
        for record in batch:
            step = await runtime.parse(orders_in, record, hedger.order_step)
            if step is not None:
                try:
                    await hedger.on_order(orders_in, record, step)
                except SymbolHalted:
                    runtime.hold(record)

    runtime.on_batch(targets_in, handle_targets)
    runtime.on_batch(orders_in, handle_orders)
    return runtime


def main() -> None:
    build(from_environment(HedgingSettings)).run()
