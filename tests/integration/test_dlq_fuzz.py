"""Bad input everywhere: malformed, truncated, wrong-schema, empty, tombstone and invalid
messages on every stage's input topic go to the matching `.dlq` with the reason, and do
not stop the consumer.

One namespaced pipeline (venue, hedging, leverage, regime, NAV). Every bad kind
(tests/chaos/faults.py) is produced, keyed by the symbol so it lands in the partition the
good events use, on market.ticks, market.regimes, leverage.targets, orders.events and
hedge.fills; then the deposits and a real day of BTC go through. The good flow must be
untouched: its NAV series equals the backtester's to the unit (a bad message that was
applied, or a consumer that stopped, breaks that), and each bad message is on its .dlq
exactly once, dead-lettered by its consumer, with a reason. So is a valid market event
keyed by another symbol than its own (it sits in that symbol's partition), one of a
symbol no instrument has (refused by the first stage it reaches, not carried on as
state), and anything keyed by bytes that are not UTF-8.
"""

from __future__ import annotations

import time
from decimal import Decimal

import pytest
from smartlev.v1 import market_pb2

from shared import codec
from shared.pipeline_runner import REGIME, STAGES, Pipeline
from shared.topics import LEVERAGE_TARGETS, MARKET_REGIMES, MARKET_TICKS
from tests.chaos.faults import (
    CONSUMED,
    bad_payloads,
    dead_letters,
    market,
    publish_raw,
    read_topic,
)
from tests.integration.pipeline import (
    CAPITAL,
    PRODUCTS,
    Slice,
    backtest_reference,
    collect,
    compare_navs,
    ns,
    require_services,
)

pytestmark = pytest.mark.integration

WINDOW = Slice("2021-05-12", "2021-05-13")
CARRY_A_MARKET_EVENT = {MARKET_TICKS.name, MARKET_REGIMES.name, LEVERAGE_TARGETS.name}
UNKNOWN_SYMBOL = "DOGE-USDT"  # well formed, not an instrument of StrategyConfig


def test_fault_payloads_really_fail_to_decode() -> None:
    """The truncated and malformed payloads are not accidentally valid protobuf."""
    for consumed in CONSUMED:
        payloads = bad_payloads(consumed)
        for kind in ("malformed", "truncated", "tombstone"):
            with pytest.raises(codec.DecodeError):
                codec.decode(consumed.topic.value_type, payloads[kind])


def test_bad_input_on_every_topic_is_dead_lettered_and_the_flow_goes_on(
    kafka_bootstrap: str, redis_url: str
) -> None:
    require_services(STAGES, ingestion=True)
    reference = backtest_reference(WINDOW)
    n = len(reference.ticks)

    with Pipeline.start(STAGES, bootstrap=kafka_bootstrap, redis_url=redis_url) as pipeline:
        sent: dict[str, dict[tuple[int, int], str]] = {}
        for consumed in CONSUMED:
            kinds = bad_payloads(consumed)
            where = publish_raw(
                kafka_bootstrap, pipeline.topic(consumed.topic.name), list(kinds.values())
            )
            sent[consumed.topic.name] = dict(zip(where, kinds, strict=True))
            valid = codec.encode(consumed.wrap(market()))
            stranger = codec.encode(consumed.wrap(market(symbol=UNKNOWN_SYMBOL)))
            for kind, key, value in (
                ("mis_keyed", "ETH-USDT", valid),
                ("key_not_utf8", b"\xff\xfe", valid),
                ("unknown_symbol", UNKNOWN_SYMBOL, stranger),
            ):
                if kind != "key_not_utf8" and consumed.topic.name not in CARRY_A_MARKET_EVENT:
                    continue  # (the others' `valid` is refused for its content)
                where = publish_raw(
                    kafka_bootstrap, pipeline.topic(consumed.topic.name), [value], key
                )
                sent[consumed.topic.name][where[0]] = kind
        for product in PRODUCTS:
            pipeline.deposit(product, CAPITAL, ns(WINDOW.start))
        seeded = collect(pipeline, lambda u: len(u) >= len(PRODUCTS), timeout_s=30)
        assert all(Decimal(u.nav) == Decimal(100) for u in seeded)
        pipeline.replay(WINDOW.replay_args())
        updates = collect(
            pipeline,
            lambda u: sum(1 for x in u if x.event_id == f"{x.product}:{x.seq}") >= 2 * n,
            timeout_s=60,
            settle_s=1.0,
        )
        letters = dead_letters(kafka_bootstrap, pipeline.namespace)
        pipeline.check_alive()

    compared = compare_navs(reference, updates)
    counts = {}
    for consumed in CONSUMED:
        name = consumed.topic.name
        mine = [d for d in letters[name] if d.service == consumed.service]
        got = {(d.partition, d.offset): d for d in mine}
        assert len(got) == len(mine), f"{name}: a bad message was dead-lettered twice"
        missing = {kind for where, kind in sent[name].items() if where not in got}
        assert not missing, f"{name}: {consumed.service} did not dead-letter {sorted(missing)}"
        extra = [d.reason for where, d in got.items() if where not in sent[name]]
        assert not extra, f"{name}: {consumed.service} dead-lettered good input: {extra}"
        for letter in mine:
            assert letter.reason and letter.topic == pipeline.topic(name)
            kind = sent[name][(letter.partition, letter.offset)]
            if kind == "mis_keyed":
                assert letter.reason == "record key 'ETH-USDT' is not its symbol 'BTC-USDT'"
            if kind == "unknown_symbol":  # refused where it enters, kept as no state
                assert letter.reason.startswith(f"unknown symbol {UNKNOWN_SYMBOL!r}"), letter
            if kind == "key_not_utf8":
                assert letter.key == b"\xff\xfe", letter
                if name in CARRY_A_MARKET_EVENT:
                    shown = repr(b"\xff\xfe".decode("utf-8", "backslashreplace"))
                    assert letter.reason == f"record key {shown} is not its symbol 'BTC-USDT'"
        counts[name] = len(mine)
    print(f"\ndlq fuzz: {counts}; {sum(compared.values())} NAV updates equal to the backtest")


def test_ingestion_recovery_skips_an_invalid_tick(kafka_bootstrap: str, redis_url: str) -> None:
    """Ingestion reads market.ticks back when Redis has no state: a bad tick there is a
    consumer's to dead-letter, not a reason for ingestion never to start again."""
    require_services([], ingestion=True)
    with Pipeline.start((), bootstrap=kafka_bootstrap, redis_url=redis_url) as pipeline:
        topic = pipeline.topic(MARKET_TICKS.name)
        bad = codec.encode(market(price="NaN", seq=1))
        publish_raw(kafka_bootstrap, topic, [bad])
        pipeline.replay(WINDOW.replay_args(), timeout_s=60)
        events = read_topic(kafka_bootstrap, topic, market_pb2.MarketEvent)
    bars, funding, _ = WINDOW.load()
    published = [e for e in events if getattr(e, e.WhichOneof("event")).source != "chaos"]
    # every event of the window once, numbered from 1: the bad tick's seq 1 and time were
    # not taken as where to resume
    assert [getattr(e, e.WhichOneof("event")).seq for e in published] == list(
        range(1, 4 * len(bars) + len(funding) + 1)
    )
    assert sum(1 for e in published if e.HasField("tick")) == 4 * len(bars)


def test_an_input_near_the_brokers_size_limit_is_dead_lettered_cut(
    kafka_bootstrap: str, redis_url: str
) -> None:
    """Its letter (the payload, plus where it was and why) passed the broker's 1 MiB per
    message: the broker refused it, and the stage died on that input at every restart.
    The letter now carries the payload's first 512 KiB, and says so."""
    require_services([REGIME])
    with Pipeline.start([REGIME], bootstrap=kafka_bootstrap, redis_url=redis_url) as pipeline:
        topic = pipeline.topic(MARKET_TICKS.name)
        huge = b"\xff" * 1_048_400  # as large as the broker takes
        [(partition, offset)] = publish_raw(kafka_bootstrap, topic, [huge])
        # a key of 300,000 bytes that are not UTF-8: escaped, the letter's Kafka key was
        # 1.2 MB, and the stage died on it as well
        long_key = b"\xff" * 300_000
        [keyed] = publish_raw(kafka_bootstrap, topic, [b"\xff" * 700_000], key=long_key)
        deadline = time.monotonic() + 30
        letters: list = []
        while len(letters) < 2 and time.monotonic() < deadline:
            pipeline.check_alive()
            time.sleep(0.5)
            letters = dead_letters(kafka_bootstrap, pipeline.namespace)[MARKET_TICKS.name]
        by_place = {(letter.partition, letter.offset): letter for letter in letters}
        assert set(by_place) == {(partition, offset), keyed}
        letter = by_place[partition, offset]
        assert letter.payload == huge[: 512 * 1024]
        assert "payload cut to its first 524,288 of 1,048,400 bytes" in letter.reason
        assert by_place[keyed].key == long_key[:1024]
        pipeline.check_alive()
