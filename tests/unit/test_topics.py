"""Topic registry invariants."""

from __future__ import annotations

import pytest
from smartlev.v1 import market_pb2

from shared import topics
from shared.topics import ALL_TOPICS, DEAD_LETTERS, SOURCES, TopicSpec


def test_names_are_unique() -> None:
    names = [spec.name for spec in ALL_TOPICS]
    assert len(names) == len(set(names))
    assert set(topics.BY_NAME) == set(names)


def test_every_topic_has_a_dlq_twin() -> None:
    for spec in SOURCES:
        twin = topics.BY_NAME[spec.dlq_name]
        assert twin.name == f"{spec.name}.dlq"
        assert twin.value_type is market_pb2.DeadLetter
        assert twin.key == spec.key
    assert len(DEAD_LETTERS) == len(SOURCES)
    assert all(spec.is_dlq for spec in DEAD_LETTERS)
    assert not any(spec.is_dlq for spec in SOURCES)


def test_keys_are_declared() -> None:
    for spec in ALL_TOPICS:
        assert spec.key in ("symbol", "product")
        assert spec.description


def test_the_design_topics_exist_with_their_payloads() -> None:
    expected = {
        "market.ticks": "smartlev.v1.MarketEvent",
        "market.regimes": "smartlev.v1.RegimeUpdate",
        "leverage.targets": "smartlev.v1.TargetsUpdate",
        "hedge.fills": "smartlev.v1.HedgeUpdate",
        "orders.events": "smartlev.v1.OrderEvent",
        "nav.updates": "smartlev.v1.NavUpdated",
    }
    for name, type_name in expected.items():
        assert topics.get(name).value_type.DESCRIPTOR.full_name == type_name


def test_everything_hedging_nets_is_keyed_by_symbol() -> None:
    # Hedging nets all products of an underlying: its inputs must co-locate by symbol.
    for name in ("market.ticks", "leverage.targets", "orders.events", "hedge.fills"):
        assert topics.get(name).key == "symbol"


def test_source_topics_are_co_partitioned() -> None:
    assert len({spec.partitions for spec in SOURCES}) == 1
    assert topics.MARKET_TICKS.partitions == 3


def test_configs() -> None:
    assert topics.MARKET_TICKS.configs() == {"cleanup.policy": "delete", "retention.ms": "-1"}
    assert topics.NAV_LATEST.configs() == {"cleanup.policy": "compact", "segment.ms": "3600000"}
    assert topics.get("market.ticks.dlq").configs()["retention.ms"] == str(30 * topics.DAY_MS)


def test_unknown_topic_names_the_known_ones() -> None:
    with pytest.raises(KeyError, match=r"market\.ticks"):
        topics.get("market.tick")


def test_spec_validation() -> None:
    with pytest.raises(ValueError, match="bad topic name"):
        TopicSpec(name="a b", key="symbol", value_type=market_pb2.Tick, description="x")
    with pytest.raises(ValueError, match="partitions"):
        TopicSpec(name="a", key="symbol", value_type=market_pb2.Tick, description="x", partitions=0)
    with pytest.raises(ValueError, match="itself a dead-letter"):
        _ = topics.get("market.ticks.dlq").dlq_name
