"""Real broker + Redis: the regime and leverage services as processes (`python -m
services.<name>`), each test in its own namespace (topics, consumer groups, Redis keys).

Real BTC/ETH history around the March 2020 crash goes into `<ns>market.ticks`; what comes
out of `<ns>leverage.targets` must be exactly what `SignalPipeline` + `decide` give
in-process on the same events, one output per event, in order.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from smartlev.v1 import leverage_pb2, market_pb2

from shared import codec
from shared.adapters.kafka_admin import ensure_topics
from shared.adapters.tick_replay import ReplaySource, make_producer, publish
from shared.core.config import StrategyConfig
from shared.core.engine import SignalPipeline, decide, funding_paid, risk_price
from shared.core.events import LeverageTargetChanged
from shared.core.leverage import SmartLeverageController
from shared.core.market import Tick
from shared.core.products import smart_controllers
from shared.core.regime import RegimeState
from shared.topics import (
    COMPACTED_SEGMENT_MS,
    LEVERAGE_TARGETS,
    MARKET_REGIMES,
    MARKET_TICKS,
    TopicSpec,
)
from shared.wire import decision, regime_state
from tests.integration.kafka_configs import topic_configs

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
CRASH_NS = 1583884800 * 1_000_000_000  # 2020-03-11 00:00 UTC: the COVID crash follows
TOPICS = (MARKET_TICKS, MARKET_REGIMES, LEVERAGE_TARGETS)


def replay(symbol: str, ticks: int) -> list[market_pb2.MarketEvent]:
    return list(ReplaySource(symbol=symbol, start_ns=CRASH_NS).events(limit=ticks))


@dataclass
class Expected:
    """What the backtester's calls give on the same events, per event."""

    regimes: list[RegimeState | None] = field(default_factory=list)
    decisions: list[list[LeverageTargetChanged]] = field(default_factory=list)
    controllers: list[SmartLeverageController] = field(default_factory=list)
    mark: float = 0.0  # the last tick's, which funding is drawn at


def expected(events: list[market_pb2.MarketEvent]) -> Expected:
    config = StrategyConfig()
    symbol = _symbol(events[0])
    pipeline = SignalPipeline(symbol, config.features, config.regime)
    out = Expected(controllers=smart_controllers(symbol, config))
    for event in events:
        if not event.HasField("tick"):
            funding_paid(out.controllers, codec.funding_from_proto(event.funding), out.mark)
            out.regimes.append(None)
            out.decisions.append([])
            continue
        tick: Tick = codec.tick_from_proto(event.tick)
        regime = pipeline.on_tick(tick.ts_ns, tick.price)
        out.regimes.append(regime)
        out.mark = risk_price(tick)
        out.decisions.append(decide(out.controllers, tick.ts_ns, tick.price, out.mark, regime))
    return out


@dataclass
class Stack:
    bootstrap: str
    namespace: str
    redis_url: str
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def spec(self, spec: TopicSpec) -> TopicSpec:
        return spec.in_namespace(self.namespace)

    def topics(self) -> list[str]:
        """Every topic of the namespace, the ones faust created included."""
        admin = KafkaAdminClient(bootstrap_servers=self.bootstrap)
        try:
            return [t for t in admin.list_topics() if t.startswith(self.namespace)]
        finally:
            admin.close()

    def start(self, service: str) -> subprocess.Popen[bytes]:
        prefix = f"SMARTLEV_{service.upper()}_"
        env = {
            **os.environ,
            "PYTHONPATH": f"{ROOT}:{ROOT / 'gen'}",
            prefix + "NAMESPACE": self.namespace,
            prefix + "KAFKA__BOOTSTRAP": self.bootstrap,
            prefix + "REDIS__URL": self.redis_url,
            prefix + "METRICS_PORT": "0",
            prefix + "LOG_LEVEL": "WARNING",
        }
        proc = subprocess.Popen([sys.executable, "-m", f"services.{service}"], cwd=ROOT, env=env)
        self.procs.append(proc)
        return proc

    def publish(self, events: list[market_pb2.MarketEvent]) -> None:
        producer = make_producer(self.bootstrap)
        try:
            publish(producer, events, topic=self.spec(MARKET_TICKS).name)
        finally:
            producer.close()

    def send_raw(self, key: bytes, payload: bytes) -> None:
        producer = KafkaProducer(bootstrap_servers=self.bootstrap, acks="all")
        try:
            producer.send(self.spec(MARKET_TICKS).name, key=key, value=payload).get(30)
        finally:
            producer.close()

    def read(self, spec: TopicSpec, count: int, timeout_s: float = 25.0) -> list[bytes]:
        """The first `count` values of a topic (all partitions), then nothing more within 1 s."""
        consumer = KafkaConsumer(
            self.spec(spec).name,
            bootstrap_servers=self.bootstrap,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            consumer_timeout_ms=500,
        )
        values: list[bytes] = []
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline and len(values) < count:
                values.extend(record.value for record in consumer)
            extra_until = time.monotonic() + 1.0
            while time.monotonic() < extra_until:
                values.extend(record.value for record in consumer)
        finally:
            consumer.close()
        return values

    def stop(self, proc: subprocess.Popen[bytes]) -> int:
        proc.send_signal(signal.SIGTERM)
        return proc.wait(timeout=15)


@pytest.fixture
def stack(kafka_bootstrap: str, redis_url: str) -> Iterator[Stack]:
    namespace = f"t{uuid.uuid4().hex[:8]}."
    specs = [s.in_namespace(namespace) for spec in TOPICS for s in (spec, spec.dlq())]
    ensure_topics(kafka_bootstrap, specs, verbose=False)
    stack = Stack(kafka_bootstrap, namespace, redis_url)
    yield stack
    for proc in stack.procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    try:  # ours only: every topic of the namespace, faust's changelogs included
        admin.delete_topics([t for t in admin.list_topics() if t.startswith(namespace)])
    finally:
        admin.close()
    client = redis.Redis.from_url(redis_url)
    for key in client.scan_iter(match=f"{namespace}*"):
        client.delete(key)
    client.close()


def targets(values: list[bytes]) -> list[leverage_pb2.TargetsUpdate]:
    return [codec.decode(leverage_pb2.TargetsUpdate, v) for v in values]


def test_regime_and_leverage_equal_in_process_decide(stack: Stack) -> None:
    events = replay("BTC-USDT", 230)  # ends with funding drawn since a rebalance
    want = expected(events)
    assert sum(len(d) for d in want.decisions) >= 3  # the data exercises the policy
    for service in ("regime", "leverage"):
        stack.start(service)
    stack.publish(events[:150])
    # A redelivery (an old seq again), garbage, and an invalid price, then more ticks.
    stack.publish([events[100]])
    stack.send_raw(b"BTC-USDT", b"\xff\x00 not protobuf")
    bad = market_pb2.MarketEvent()
    bad.CopyFrom(events[151])
    bad.tick.price = "-1"
    bad.tick.seq = 10_000
    stack.publish([bad])
    stack.publish(events[150:])
    started = time.monotonic()

    out = targets(stack.read(LEVERAGE_TARGETS, len(events)))
    elapsed = time.monotonic() - started

    assert len(out) == len(events)
    for event, update, regime, decisions in zip(
        events, out, want.regimes, want.decisions, strict=True
    ):
        assert update.market == event  # forwarded unchanged, in order, once
        assert update.bar_closed == (regime is not None)
        assert [decision(t) for t in update.targets] == decisions
        seq = event.tick.seq if event.HasField("tick") else event.funding.seq
        for target, wanted in zip(update.targets, decisions, strict=True):
            assert target.event_id == f"BTC-USDT:{seq}:{wanted.product}"
            assert target.target_leverage == codec.decimal_to_wire(wanted.target)

    assert any(t.emergency for u in out for t in u.targets)  # on the very tick

    letters = [codec.decode(market_pb2.DeadLetter, v) for v in stack.read(MARKET_TICKS.dlq(), 2)]
    assert len(letters) == 2
    assert letters[0].payload == b"\xff\x00 not protobuf"
    assert "malformed protobuf" in letters[0].reason
    assert letters[0].service == "regime"
    assert letters[0].topic == stack.spec(MARKET_TICKS).name
    assert "price must be positive" in letters[1].reason
    print(f"\n{len(events)} events through regime+leverage, drained in {elapsed:.2f}s")

    for proc in stack.procs:
        assert stack.stop(proc) == 0
    # what it stored (on a clean stop, the last batch's write done) is the reference's
    # models, what funding drew since their last rebalance included
    models = {c.product: c.snapshot() for c in want.controllers}
    assert any(model["drawn"] for model in models.values())
    client = redis.Redis.from_url(stack.redis_url, decode_responses=True)
    stored = client.hgetall(f"{stack.namespace}lev:{{BTC-USDT}}:controllers")
    client.close()
    assert int(stored["seq"]) == _seq(events[-1]) and float(stored["mark"]) == want.mark
    # the regime table's changelog is compacted an hour at a time (a restart replays that)
    [changelog] = [n for n in stack.topics() if n.endswith("regime-state-changelog")]
    assert topic_configs(stack.bootstrap, changelog)["segment.ms"] == str(COMPACTED_SEGMENT_MS)
    assert json.loads(stored["controllers"]) == json.loads(json.dumps(models))


def test_two_regime_instances_share_the_group_and_agree(stack: Stack) -> None:
    """A second instance joins mid-stream, then the first stops: whatever partitions the
    symbols sit on (BTC-USDT and ETH-USDT both hash to partition 2 of 3), the instance
    left finishes them from state it restored out of the table changelog, never having
    seen the first events."""
    symbols = ("BTC-USDT", "ETH-USDT")
    events = {s: replay(s, 120) for s in symbols}
    want = {s: expected(e) for s, e in events.items()}
    total = sum(len(e) for e in events.values())
    first = stack.start("regime")
    for symbol in symbols:
        stack.publish(events[symbol][:60])
    assert len(stack.read(MARKET_REGIMES, 120)) == 120
    stack.start("regime")
    time.sleep(3)  # the group rebalances over both instances
    for symbol in symbols:
        stack.publish(events[symbol][60:90])
    assert stack.stop(first) == 0  # its partitions move to the second instance
    for symbol in symbols:
        stack.publish(events[symbol][90:])

    out = [codec.decode(market_pb2.RegimeUpdate, v) for v in stack.read(MARKET_REGIMES, total)]
    got_ids = [(_symbol(u.market), _seq(u.market)) for u in out]
    want_ids = [(_symbol(e), _seq(e)) for s in symbols for e in events[s]]
    assert len(out) == total, f"missing {sorted(set(want_ids) - set(got_ids))}"
    for symbol in symbols:
        mine = [u for u in out if _symbol(u.market) == symbol]
        assert [u.market for u in mine] == events[symbol]
        got = [regime_state(u.regime) if u.HasField("regime") else None for u in mine]
        assert got == want[symbol].regimes


def _seq(event: market_pb2.MarketEvent) -> int:
    return event.tick.seq if event.HasField("tick") else event.funding.seq


def _symbol(event: market_pb2.MarketEvent) -> str:
    return event.tick.symbol if event.HasField("tick") else event.funding.symbol
