"""Hedging end to end on the real broker and Redis, against a real venue process.

TargetsUpdates are made in-process by the same core calls the regime and leverage
services make (SignalPipeline + decide) over ~300 real BTC ticks from 2021-05-12 (the
May crash), funding merged in; two PositionOpened orders go first. The last HedgeUpdate's
books must equal, to the last digit, `smart_strategy` run in-process on the same input.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from uuid import uuid4

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from smartlev.v1 import (
    hedging_pb2,
    leverage_pb2,
    market_pb2,
    orders_pb2,
    venue_pb2,
    venue_pb2_grpc,
)

from services.hedging.desks import ORDER, Desks, Inflight
from services.hedging.main import Hedger
from services.hedging.messages import book_states, order_step, products_by_symbol
from shared import codec
from shared.adapters.kafka_admin import ensure_topics
from shared.adapters.market_data import load_bars, load_funding, load_marks
from shared.adapters.redis_wire import RedisWire
from shared.adapters.tick_replay import data_dir, file_stem
from shared.backtest import market_events
from shared.core.bars import ticks_from_bars
from shared.core.config import StrategyConfig
from shared.core.engine import SignalPipeline, decide, risk_price
from shared.core.market import FundingRate
from shared.core.products import SIDES, product_id, smart_controllers, smart_strategy
from shared.topics import HEDGE_FILLS, LEVERAGE_TARGETS, ORDERS_EVENTS
from shared.wire import targets_update

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SYMBOL = "BTC-USDT"
START = int(datetime(2021, 5, 12, tzinfo=UTC).timestamp()) * 1_000_000_000
BARS = 75  # x 4 ticks (open, low/high, high/low, close)
AMOUNTS = ("250000", "100000.5")  # deposited in the long and the short first


def deposits(symbol: str) -> dict[str, Decimal]:
    return {
        product_id(symbol, side): Decimal(amount)
        for side, amount in zip(SIDES, AMOUNTS, strict=True)
    }


@dataclass
class Input:
    targets: list[leverage_pb2.TargetsUpdate]
    orders: list[orders_pb2.OrderEvent]
    expected: list[hedging_pb2.ProductBookState]


def build_input(
    config: StrategyConfig,
    late: tuple[int, orders_pb2.OrderEvent] | None = None,
    symbol: str = SYMBOL,
) -> Input:
    """The messages, and the books the in-process strategy ends with on them; `late`:
    (k, an open) deposited after the first k market events."""
    stem, root = file_stem(symbol), data_dir()
    interval = config.features.bar_seconds * 1_000_000_000
    end = START + BARS * interval
    bars, _ = load_bars(root / f"{stem}_perp_1h_2019_2023.csv", symbol, start_ns=START, end_ns=end)
    rates, _ = load_funding(root / f"{stem}_funding_8h_2019_2023.csv", symbol)
    marks = load_marks(root / f"{stem}_mark_1h_2019_2023.csv", start_ns=START, end_ns=end)
    funding = [r for r in rates if START <= r.ts_ns < end]
    ticks = list(ticks_from_bars(bars, interval, marks))

    orders = [
        orders_pb2.OrderEvent(
            opened=orders_pb2.PositionOpened(
                event_id=f"open-{i}",
                position_id=f"p{i}",
                user_id="u",
                product=product,
                ts_event_ns=START,
                ts_init_ns=START,
                amount=codec.decimal_to_wire(amount),
            )
        )
        for i, (product, amount) in enumerate(deposits(symbol).items())
    ]
    signals = SignalPipeline(symbol, config.features, config.regime)
    controllers = smart_controllers(symbol, config)
    reference = smart_strategy(symbol, config)
    for product, amount in deposits(symbol).items():
        reference.engine.deposit(product, amount, START)
    targets = []
    for seq, event in enumerate(market_events(ticks, funding), start=1):
        if late is not None and seq == late[0] + 1:
            opened = late[1].opened
            reference.engine.deposit(opened.product, Decimal(opened.amount), opened.ts_event_ns)
        if isinstance(event, FundingRate):
            market = codec.market_event_from_funding(event, seq=seq, source="t", ts_init_ns=1)
            targets.append(targets_update(market, symbol, seq, False, "RANGE", [], 1))
            reference.engine.on_funding(event)
            continue
        market = codec.market_event_from_tick(event, seq=seq, source="t", ts_init_ns=1)
        regime = signals.on_tick(event.ts_ns, event.price)
        decisions = decide(controllers, event.ts_ns, event.price, risk_price(event), regime)
        name = "RANGE" if regime is None else str(regime.regime)
        targets.append(targets_update(market, symbol, seq, regime is not None, name, decisions, 1))
        reference.on_tick(event, regime)
    return Input(targets, orders, book_states(reference.engine))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start(module: str, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    handle = log.open("ab")  # a restarted service goes on in the same log
    return subprocess.Popen(
        [sys.executable, "-m", module],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'gen'}", **env},
        stdout=handle,
        stderr=subprocess.STDOUT,
    )


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(5)


@dataclass
class Stack:
    namespace: str
    venue_address: str
    metrics: str
    producer: KafkaProducer
    consumer: KafkaConsumer
    hedging_env: dict[str, str]
    log: Path
    hedging: subprocess.Popen[bytes] | None = None

    def start_hedging(self) -> None:
        self.hedging = start("services.hedging", self.hedging_env, self.log)

    def crash_hedging(self) -> None:
        assert self.hedging is not None
        self.hedging.kill()  # SIGKILL: nothing after the last commit is written
        self.hedging.wait(10)

    def fills(self, count: int, timeout_s: float = 60.0) -> list[hedging_pb2.HedgeUpdate]:
        out: list[hedging_pb2.HedgeUpdate] = []
        deadline = time.monotonic() + timeout_s
        while len(out) < count and time.monotonic() < deadline:
            for records in self.consumer.poll(timeout_ms=500).values():
                out += [codec.decode(hedging_pb2.HedgeUpdate, r.value) for r in records]
        return out

    def send(self, spec_name: str, messages: list[object], key: str = SYMBOL) -> None:
        for message in messages:
            self.producer.send(spec_name, key=key, value=message)
        self.producer.flush()

    def account(self) -> venue_pb2.VenueAccount:
        with grpc.insecure_channel(self.venue_address) as channel:
            stub = venue_pb2_grpc.VenueStub(channel)
            return stub.GetAccount(venue_pb2.GetAccountRequest(symbol=SYMBOL))

    def metric(self, name: str, *labels: str) -> float:
        """The sum of the service's /metrics samples `name{...}` carrying every label."""
        url = f"http://127.0.0.1:{self.metrics}/metrics"
        with urllib.request.urlopen(url) as reply:
            lines = reply.read().decode().splitlines()
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in lines
            if line.startswith(name + "{") and all(label in line for label in labels)
        )

    def skipped(self) -> float:
        """Redelivered targets the service skipped."""
        return self.metric(
            "smartlev_stream_messages_total", 'outcome="skipped"', 'topic="leverage.targets"'
        )


@pytest.fixture
def stack(kafka_bootstrap: str, redis_url: str, tmp_path: Path) -> Iterator[Stack]:
    namespace = f"t{uuid4().hex[:8]}."
    specs = [s.in_namespace(namespace) for s in (LEVERAGE_TARGETS, ORDERS_EVENTS, HEDGE_FILLS)]
    ensure_topics(kafka_bootstrap, [*specs, *(s.dlq() for s in specs)], verbose=False)
    grpc_port, metrics = free_port(), free_port()
    common = {"KAFKA__BOOTSTRAP": kafka_bootstrap, "REDIS__URL": redis_url, "NAMESPACE": namespace}
    venue = start(
        "services.venue",
        {f"SMARTLEV_VENUE_{k}": v for k, v in common.items()}
        | {"SMARTLEV_VENUE_GRPC_PORT": str(grpc_port), "SMARTLEV_VENUE_METRICS_PORT": "0"},
        tmp_path / "venue.log",
    )
    address = f"127.0.0.1:{grpc_port}"
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        reply = health.Check(health_pb2.HealthCheckRequest(), wait_for_ready=True, timeout=15)
        for _ in range(50):
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                break
            time.sleep(0.1)
            reply = health.Check(health_pb2.HealthCheckRequest(), timeout=5)
    hedging_env = {f"SMARTLEV_HEDGING_{k}": v for k, v in common.items()} | {
        "SMARTLEV_HEDGING_VENUE_ADDRESS": address,
        "SMARTLEV_HEDGING_METRICS_PORT": str(metrics),
    }
    producer = KafkaProducer(
        bootstrap_servers=kafka_bootstrap,
        key_serializer=codec.key_serializer,
        value_serializer=codec.serializer,
        acks="all",
    )
    consumer = KafkaConsumer(
        specs[2].name, bootstrap_servers=kafka_bootstrap, auto_offset_reset="earliest"
    )
    stack = Stack(
        namespace, address, str(metrics), producer, consumer, hedging_env,
        tmp_path / "hedging.log",
    )  # fmt: skip
    try:
        stack.start_hedging()
        yield stack
    finally:
        producer.close()
        consumer.close()
        if stack.hedging is not None:
            stop(stack.hedging)
        stop(venue)
        client = redis.Redis.from_url(redis_url)
        keys = list(client.scan_iter(match=f"{namespace}*"))
        if keys:
            client.delete(*keys)
        client.close()
        for name in ("venue.log", "hedging.log"):
            print(f"--- {name}\n" + (tmp_path / name).read_text()[-3000:])


def test_hedging_books_equal_the_in_process_strategy(stack: Stack) -> None:
    data = build_input(StrategyConfig())
    ns = stack.namespace
    stack.send(f"{ns}orders.events", list(data.orders))
    opened = stack.fills(len(data.orders))
    assert [u.event_id for u in opened] == [f"{SYMBOL}:order:open-{i}" for i in range(2)]

    stack.send(f"{ns}leverage.targets", list(data.targets))
    updates = stack.fills(len(data.targets))
    assert len(updates) == len(data.targets)
    seqs = [u.market.tick.seq or u.market.funding.seq for u in updates]
    assert seqs == list(range(1, len(data.targets) + 1))
    assert any(u.HasField("filled") for u in updates)
    assert any(u.HasField("funding") for u in updates)
    last = updates[-1]
    assert list(last.products) == data.expected  # every field, every digit

    # A redelivered TargetsUpdate (same seq) changes nothing and trades nothing.
    account = stack.account()
    stack.send(f"{ns}leverage.targets", [data.targets[-1]])
    deadline = time.monotonic() + 15
    while stack.skipped() < 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert stack.skipped() == 1
    assert stack.fills(1, timeout_s=1.0) == []
    assert stack.account() == account
    # Every input went through exactly one handled batch.
    inputs = len(data.orders) + len(data.targets) + 1
    assert stack.metric("smartlev_stream_batch_events_sum") == inputs
    assert 1 <= stack.metric("smartlev_stream_batch_events_count") <= inputs


def committed_through(redis_url: str, meta_key: str, seq: int, timeout_s: float = 15.0) -> None:
    """Wait until hedging's desk has committed market seq `seq` (its HedgeUpdates are
    published before the commit)."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    deadline = time.monotonic() + timeout_s
    try:
        while int(client.hget(meta_key, "offset:seq") or 0) < seq:
            assert time.monotonic() < deadline, f"seq {seq} never committed"
            time.sleep(0.05)
    finally:
        client.close()


async def cut_short(stack: Stack, redis_url: str, config: StrategyConfig, order: object) -> None:
    """What a hedging process killed inside an order does: its Inflight written, the
    venue's transfer and hedge made, no commit (hedging's own Desks and order work)."""
    assert isinstance(order, orders_pb2.OrderEvent)
    wire = RedisWire.from_url(redis_url)
    channel = grpc.insecure_channel(stack.venue_address)
    try:
        desks = Desks(wire, config, channel, namespace=stack.namespace)
        desk = await desks.current(SYMBOL)
        assert await desks.begin(desk, Inflight(ORDER, (order.SerializeToString(),)))
        step = order_step(order, products_by_symbol(config))
        await asyncio.to_thread(Hedger._order_work, desk, step)
    finally:
        channel.close()
        await wire.aclose()


def test_an_order_cut_short_by_a_crash_runs_before_the_next_market_event(
    stack: Stack, redis_url: str
) -> None:
    """Killed inside an order, hedging restarts and takes a market event first: the order
    must run first all the same (from the state it began on, its venue calls are the
    ones the venue recorded), or the venue's account and the books part and the symbol
    halts. The books end as the in-process strategy's with the order in that place."""
    config = StrategyConfig()
    k = 40
    late = orders_pb2.OrderEvent(
        opened=orders_pb2.PositionOpened(
            event_id="late-0", position_id="late", user_id="u", product=f"{SYMBOL}:LONG",
            ts_event_ns=START + 1, ts_init_ns=START + 1, amount="5000",
        )
    )  # fmt: skip
    data = build_input(config, late=(k, late))
    ns = stack.namespace
    stack.send(f"{ns}orders.events", list(data.orders))
    assert len(stack.fills(len(data.orders))) == len(data.orders)  # deposits first, as above
    stack.send(f"{ns}leverage.targets", data.targets[:k])
    assert len(stack.fills(k)) == k
    committed_through(redis_url, f"{ns}hedge:{{{SYMBOL}}}:meta", k)  # outputs go first

    stack.crash_hedging()
    asyncio.run(cut_short(stack, redis_url, config, late))
    stack.send(f"{ns}leverage.targets", [data.targets[k]])  # on the topic before the order
    stack.start_hedging()
    resumed = stack.fills(2)
    assert [u.event_id for u in resumed] == [f"{SYMBOL}:order:late-0", f"{SYMBOL}:{k + 1}"]

    stack.send(f"{ns}orders.events", [late])  # its own record comes at last: skipped
    stack.send(f"{ns}leverage.targets", data.targets[k + 1 :])
    rest = stack.fills(len(data.targets) - k - 1)
    assert len(rest) == len(data.targets) - k - 1
    assert list(rest[-1].products) == data.expected  # every field, every digit


def dead_letters(bootstrap: str, topic: str) -> list[market_pb2.DeadLetter]:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    try:
        partition = TopicPartition(topic, 0)
        consumer.assign([partition])
        consumer.seek_to_beginning(partition)
        records = [r for rs in consumer.poll(timeout_ms=3000).values() for r in rs]
        return [codec.decode(market_pb2.DeadLetter, r.value) for r in records]
    finally:
        consumer.close()


def test_a_refused_order_stays_refused_when_it_comes_again(
    stack: Stack, kafka_bootstrap: str
) -> None:
    """A close of more units than the product has is dead-lettered, and recorded: its
    redelivery after a deposit made those units (a crash before the offset commit) is
    skipped, not settled against books it never met in its place."""
    ns, product = stack.namespace, f"{SYMBOL}:LONG"
    close = orders_pb2.OrderEvent(
        closed=orders_pb2.PositionClosed(
            event_id="too-many", position_id="p", user_id="u", product=product, units="5",
            ts_event_ns=START, ts_init_ns=START,
        )
    )  # fmt: skip
    deposit = orders_pb2.OrderEvent(
        opened=orders_pb2.PositionOpened(
            event_id="later", position_id="q", user_id="u", product=product,
            ts_event_ns=START, ts_init_ns=START, amount="10000",
        )
    )  # fmt: skip
    stack.send(f"{ns}orders.events", [close, deposit])
    [opened] = stack.fills(1)
    assert opened.event_id == f"{SYMBOL}:order:later"
    [letter] = dead_letters(kafka_bootstrap, f"{ns}orders.events.dlq")
    assert "cannot redeem 5 of 0 units" in letter.reason

    stack.send(f"{ns}orders.events", [close])  # redelivered: within the units now
    skipped = ('outcome="skipped"', 'topic="orders.events"')
    deadline = time.monotonic() + 15
    while stack.metric("smartlev_stream_messages_total", *skipped) < 1:
        assert time.monotonic() < deadline, "the redelivered refusal was not skipped"
        time.sleep(0.2)
    assert stack.fills(1, timeout_s=1.0) == []
    assert len(dead_letters(kafka_bootstrap, f"{ns}orders.events.dlq")) == 1


def test_the_close_of_a_position_whose_open_was_refused_is_refused_too(
    stack: Stack, kafka_bootstrap: str
) -> None:
    """The gateway settled (and answered) an open the books refused: its units are not
    in the product. Its close was redeemed from the product all the same, out of the
    other holders' units, whose own closes then failed ("cannot redeem")."""
    ns, product = stack.namespace, f"{SYMBOL}:LONG"

    def opened(pid: str, units: str = "") -> orders_pb2.OrderEvent:
        return orders_pb2.OrderEvent(
            opened=orders_pb2.PositionOpened(
                event_id=pid, position_id=pid, user_id=pid, product=product, amount="10000",
                nav="100" if units else "", units=units, ts_event_ns=START, ts_init_ns=START,
            )
        )  # fmt: skip

    bad = opened("bad", units="1")  # the books issue 99.9 units for it: QuoteMismatch
    close = orders_pb2.OrderEvent(
        closed=orders_pb2.PositionClosed(
            event_id="bad-close", position_id="bad", user_id="bad", product=product,
            units="5", ts_event_ns=START, ts_init_ns=START,
        )
    )  # fmt: skip
    stack.send(f"{ns}orders.events", [bad, opened("good"), close])
    [fill] = stack.fills(1)
    assert fill.event_id == f"{SYMBOL}:order:good"
    deadline = time.monotonic() + 15
    while len(letters := dead_letters(kafka_bootstrap, f"{ns}orders.events.dlq")) < 2:
        assert time.monotonic() < deadline, f"{len(letters)} dead letters, not 2"
        time.sleep(0.2)
    assert "its open was refused" in letters[1].reason
    assert stack.fills(1, timeout_s=1.0) == []  # the other holder's units untouched


def test_an_order_quoted_far_from_the_books_is_dead_lettered(
    stack: Stack, kafka_bootstrap: str
) -> None:
    """A close quoted at a NAV the books' own rules out (1e30: a corrupted NAV hash) is
    refused to the dead-letter topic, saying why, and moves nothing: the market events
    after it are hedged to the in-process strategy's books, to the last digit, as if it
    never came."""
    config = StrategyConfig()
    data = build_input(config)
    ns, k = stack.namespace, 10
    stack.send(f"{ns}orders.events", list(data.orders))
    assert len(stack.fills(len(data.orders))) == len(data.orders)  # deposits first
    stack.send(f"{ns}leverage.targets", data.targets[:k])
    assert len(stack.fills(k)) == k
    absurd = orders_pb2.OrderEvent(
        closed=orders_pb2.PositionClosed(
            event_id="absurd", position_id="p0", user_id="u", product=f"{SYMBOL}:LONG",
            units="1", nav="1" + "0" * 30, ts_event_ns=START, ts_init_ns=START,
        )
    )  # fmt: skip
    stack.send(f"{ns}orders.events", [absurd])
    deadline = time.monotonic() + 15
    while not (letters := dead_letters(kafka_bootstrap, f"{ns}orders.events.dlq")):
        assert time.monotonic() < deadline, "the absurd quote was not dead-lettered"
    [letter] = letters
    assert "within a factor of 10 of one of them" in letter.reason
    assert f"quoted NAV {absurd.closed.nav}" in letter.reason
    stack.send(f"{ns}leverage.targets", data.targets[k:])
    rest = stack.fills(len(data.targets) - k)
    assert rest[0].event_id == f"{SYMBOL}:{k + 1}"  # no fill for the close
    assert list(rest[-1].products) == data.expected  # every field, every digit


def test_a_halted_symbol_holds_its_input_while_the_others_go_on(
    stack: Stack, redis_url: str
) -> None:
    """A bug in one symbol's books (here its saved state made unreadable) halts that
    symbol alone: the other symbol is hedged meanwhile, to the last digit, and /healthz
    says which halted; the halted symbol's input is held (its partitions not committed
    past it), so after the fix and a restart it is all applied, none of it lost."""
    config, eth = StrategyConfig(), "ETH-USDT"
    btc_in, eth_in = build_input(config), build_input(config, symbol=eth)
    ns, k = stack.namespace, 20
    stack.send(f"{ns}orders.events", list(btc_in.orders))
    stack.send(f"{ns}leverage.targets", btc_in.targets[:k])
    assert len(stack.fills(len(btc_in.orders) + k)) == len(btc_in.orders) + k
    committed_through(redis_url, f"{ns}hedge:{{{SYMBOL}}}:meta", k)

    stack.crash_hedging()
    client = redis.Redis.from_url(redis_url)
    state = f"{ns}hedge:{{{SYMBOL}}}:state"
    saved = client.hget(state, "engine")
    client.hset(state, "engine", "{")  # the bug: the symbol's books cannot be read
    stack.start_hedging()
    stack.send(f"{ns}leverage.targets", btc_in.targets[k:])
    stack.send(f"{ns}orders.events", list(eth_in.orders), key=eth)
    hedged = stack.fills(len(eth_in.orders))  # the deposits first, as the reference
    stack.send(f"{ns}leverage.targets", eth_in.targets, key=eth)
    hedged += stack.fills(len(eth_in.targets))
    assert {u.event_id.split(":")[0] for u in hedged} == {eth}
    assert len(hedged) == len(eth_in.orders) + len(eth_in.targets)
    assert list(hedged[-1].products) == eth_in.expected
    url = f"http://127.0.0.1:{stack.metrics}/healthz"
    with pytest.raises(urllib.error.HTTPError) as unhealthy:
        urllib.request.urlopen(url)
    assert f"{SYMBOL} halted" in unhealthy.value.read().decode()
    time.sleep(2.5)  # a commit or two of the partitions (every 1 s)

    assert stack.hedging is not None
    stop(stack.hedging)  # SIGTERM: the stop commits what was handled, up to the hold
    client.hset(state, "engine", saved)  # the fix
    client.close()
    stack.start_hedging()
    resumed = stack.fills(len(btc_in.targets) - k)
    assert [u.event_id for u in resumed] == [
        f"{SYMBOL}:{seq}" for seq in range(k + 1, len(btc_in.targets) + 1)
    ]
    assert list(resumed[-1].products) == btc_in.expected
