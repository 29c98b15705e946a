"""The NAV service alone on the real broker and Redis, fed HedgeUpdates that the core
makes in-process from a real BTC slice (as hedging would): its NAVs equal the
backtester's to the unit, a redelivered tick changes nothing, bad bytes and books the core
cannot mark are dead-lettered (the ticks after them still marked), and `nav:{product}` in
Redis holds the last mark with its seq."""

from __future__ import annotations

import re
from decimal import Decimal

import pytest
import redis
from kafka import KafkaConsumer, TopicPartition
from smartlev.v1 import common_pb2, hedging_pb2, market_pb2

from shared import codec
from shared.adapters.tick_replay import make_producer
from shared.core.config import StrategyConfig
from shared.pipeline_runner import NAV, Pipeline
from shared.topics import HEDGE_FILLS
from tests.integration.pipeline import (
    CAPITAL,
    PRODUCTS,
    SYMBOL,
    Slice,
    backtest_reference,
    collect,
    compare_navs,
    ns,
    seeded_books,
    tick_update,
)

pytestmark = pytest.mark.integration

WINDOW = Slice("2021-05-12", "2021-05-14")
# Within the wire's 40.40 digits, beyond what a NAV can be: the product's worth at any
# real price has more than 40 integer digits.
ABSURD_QTY = "9" * 39
SKIPPED = r'smartlev_stream_messages_total\{[^}]*outcome="skipped"[^}]*\} (\S+)'


def unmarkable(
    update: hedging_pb2.HedgeUpdate, units: str | None = None
) -> hedging_pb2.HedgeUpdate:
    """`update` with the first product's position blown past what can be marked."""
    broken = hedging_pb2.HedgeUpdate()
    broken.CopyFrom(update)
    broken.products[0].qty = ABSURD_QTY
    if units is not None:
        broken.products[0].units = units
    return broken


def test_nav_service_marks_the_core_books_exactly(
    kafka_bootstrap: str, redis_url: str, redis_client: redis.Redis
) -> None:
    config = StrategyConfig()
    reference = backtest_reference(WINDOW, config)
    n = len(reference.ticks)
    updates: list[hedging_pb2.HedgeUpdate] = list(seeded_books(config, ns(WINDOW.start)))
    for seq, record in enumerate(reference.ticks, start=1):
        updates.append(tick_update(record, seq))
        if seq == 8:  # poison first, then the real tick 8: marked as if nothing came before
            updates.insert(-1, unmarkable(updates[-1]))
        if seq == 6:  # a redelivery of an applied tick: skipped, no second NavUpdated
            updates.append(tick_update(reference.ticks[4], 5))
        if seq == 10:  # funding moves the books; the next tick marks them
            funding = market_pb2.MarketEvent(
                funding=market_pb2.FundingRateObserved(
                    event_id="f", symbol=SYMBOL, ts_event_ns=1, ts_init_ns=1, rate="0.0001", seq=11
                )
            )
            settled = hedging_pb2.HedgeUpdate(event_id="f", market=funding, products=record.states)
            updates.append(settled)
        if seq == 12:  # the funding read again, after a later tick marked both products
            updates.append(settled)
    # an order's books that cannot be marked at the last price (units changed: re-marked)
    updates.append(unmarkable(tick_update(reference.ticks[-1], n), units="1"))
    updates[-1].ClearField("market")
    # a deposit after the ticks: re-marked at the last price, in the last tick's regime
    # (an order's update carries none)
    late = tick_update(reference.ticks[-1], n)
    late.ClearField("market")
    late.event_id, late.regime = f"{SYMBOL}:order:late", 0
    book = late.products[0]
    book.units = str(Decimal(book.units) * 2)
    book.cash = str(Decimal(book.cash) * 2)
    updates.append(late)
    # orders on a product no tick marked yet: cash alone is worth the same at any price,
    # so the first is marked (price 0, as old as no price); a hedge cannot be valued
    # without one, so the second is not, until a tick marks it
    for name, units, cash, qty in (("cash", "10", "1000", "0"), ("hedged", "20", "-1000", "1")):
        unpriced = hedging_pb2.HedgeUpdate(event_id=f"ETH-USDT:order:{name}")
        unpriced.products.add(product="ETH-USDT:LONG", units=units, cash=cash, qty=qty)
        unpriced.products[0].target_leverage = "2"
        updates.append(unpriced)

    with Pipeline.start([NAV], bootstrap=kafka_bootstrap, redis_url=redis_url) as pipeline:
        topic = pipeline.topic(HEDGE_FILLS.name)
        producer = make_producer(
            kafka_bootstrap,
            client_id="test-nav",
            value_serializer=lambda v: v if isinstance(v, bytes) else codec.encode(v),
        )
        try:
            producer.send(topic, key=SYMBOL, value=b"\x08garbage")
            for update in updates:
                symbol = update.products[0].product.partition(":")[0]
                producer.send(topic, key=symbol, value=update)
            producer.flush()
        finally:
            producer.close()

        got = collect(pipeline, lambda u: len(u) >= 2 * n + 4, timeout_s=60, settle_s=1.0)

        orders = [u for u in got if u.event_id.startswith(f"{u.product}:deposit:")]
        # one partition per product: their order on the topic is not defined
        assert sorted((u.product, Decimal(u.nav), Decimal(u.equity)) for u in orders) == sorted(
            (p, Decimal(100), CAPITAL - CAPITAL * config.accounting.open_fee) for p in PRODUCTS
        )
        compared = compare_navs(reference, got)
        assert len(got) == 2 * n + 4
        print(f"compared {n} ticks, {sum(compared.values())} NAV updates: equal to the unit")

        last = reference.ticks[-1]
        assert last.regime  # the slice ends in a regime, so an order that drops it shows
        [remarked] = [u for u in got if u.event_id == f"{book.product}:{late.event_id}"]
        assert (common_pb2.Regime.Name(remarked.regime), remarked.seq) == (last.regime, n)
        # The last tick's price entered the system at its ts_init_ns; an order's re-mark
        # after it is as fresh as that price, not as the re-mark.
        [*_, last_tick] = [u.market.tick for u in updates if u.market.HasField("tick")]
        for product in PRODUCTS:
            state = redis_client.hgetall(f"{pipeline.namespace}nav:{{{product}}}")
            marked = remarked.nav if product == book.product else last.navs[product]
            assert Decimal(state["nav"]) == Decimal(marked)
            assert int(state["seq"]) == n
            assert state["regime"] == last.regime
            assert int(state["written_ns"]) == last_tick.ts_init_ns
        [cash_only] = [u for u in got if u.product == "ETH-USDT:LONG"]
        assert cash_only.event_id == "ETH-USDT:LONG:ETH-USDT:order:cash"
        assert Decimal(cash_only.nav) == 100  # 1000 of cash for 10 units
        state = redis_client.hgetall(f"{pipeline.namespace}nav:{{ETH-USDT:LONG}}")
        assert (state["units"], state["price"], state["written_ns"]) == ("10", "0", "0")

        dlq = KafkaConsumer(bootstrap_servers=kafka_bootstrap, enable_auto_commit=False)
        try:
            tp = TopicPartition(f"{topic}.dlq", 0)
            dlq.assign([tp])
            dlq.seek_to_beginning(tp)
            records = [r for rs in dlq.poll(timeout_ms=5000).values() for r in rs]
        finally:
            dlq.close()
        letters = [codec.decode(market_pb2.DeadLetter, r.value) for r in records]
        assert [(d.service, d.payload) for d in letters[:1]] == [("nav", b"\x08garbage")]
        poisoned = [codec.decode(hedging_pb2.HedgeUpdate, d.payload) for d in letters[1:]]
        assert [u.products[0].qty for u in poisoned] == [ABSURD_QTY, ABSURD_QTY]
        assert [u.market.tick.seq for u in poisoned] == [8, 0]
        assert all("cannot be marked" in d.reason for d in letters[1:]), letters
        skipped = re.search(SKIPPED, pipeline.metrics(NAV.name))
        assert skipped is not None and float(skipped.group(1)) == 2  # tick 5, the funding


def _order(
    name: str, after: hedging_pb2.HedgeUpdate, product: str, factor: str
) -> hedging_pb2.HedgeUpdate:
    """An order's HedgeUpdate: the books of `after` with `product`'s units and cash
    scaled by `factor` (a deposit or a close; the other product as it was)."""
    update = hedging_pb2.HedgeUpdate(event_id=f"{SYMBOL}:order:{name}")
    update.products.extend(after.products)
    for book in update.products:
        if book.product == product:
            book.units = str(Decimal(book.units) * Decimal(factor))
            book.cash = str(Decimal(book.cash) * Decimal(factor))
    return update


def test_an_orders_update_read_again_marks_nothing_back(
    kafka_bootstrap: str, redis_url: str, redis_client: redis.Redis
) -> None:
    """An order's update carries every product of the symbol; NAV re-marks those whose
    units it changed. Read again (NAV restarted before its commit, or a fenced hedging
    instance sending it late) after a later order moved a product it had passed over,
    it marked that product back with its own, older books: the hash and nav.latest
    held units and equity that no longer were, until the next tick."""
    reference = backtest_reference(WINDOW, StrategyConfig())
    tick = tick_update(reference.ticks[0], 1)
    long, short = PRODUCTS
    early = _order("early", tick, long, "0.5")  # before any price: hedged, not re-marked
    first = _order("first", tick, long, "2")
    second = _order("second", first, short, "2")
    with Pipeline.start([NAV], bootstrap=kafka_bootstrap, redis_url=redis_url) as pipeline:
        producer = make_producer(
            kafka_bootstrap, client_id="test-nav", value_serializer=codec.encode
        )
        try:
            for update in (early, tick, first, second, first, early):
                producer.send(pipeline.topic(HEDGE_FILLS.name), key=SYMBOL, value=update)
            producer.flush()
        finally:
            producer.close()
        got = collect(pipeline, lambda u: len(u) >= 4, timeout_s=60, settle_s=2.0)
        assert sorted(u.event_id for u in got) == sorted(
            [f"{long}:1", f"{short}:1", f"{long}:{first.event_id}", f"{short}:{second.event_id}"]
        )
        for product in PRODUCTS:
            [book] = [b for b in second.products if b.product == product]
            state = redis_client.hgetall(f"{pipeline.namespace}nav:{{{product}}}")
            assert (Decimal(state["units"]), int(state["seq"])) == (Decimal(book.units), 1)
        counted = pipeline.metrics(NAV.name)
        skipped = re.search(SKIPPED, counted)
        assert skipped is not None and float(skipped.group(1)) == 2  # the two read again
