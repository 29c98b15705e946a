"""The short kill/restart run inside `make test` (the long one is `make chaos`).

Two days of BTC paced through a namespaced pipeline with gateway orders between the
segments; three services are killed with -9 at seeded moments and restarted; the NAV
series must equal an uninterrupted run's tick by tick, every order is applied once and
reconcile passes (tests/chaos/driver.py).
"""

from __future__ import annotations

import time

import pytest
import redis

from shared.pipeline_runner import GATEWAY, STAGES, Pipeline, replay_args
from shared.topics import HEDGE_FILLS, LEVERAGE_TARGETS, MARKET_REGIMES, NAV_UPDATES, TopicSpec
from tests.chaos.driver import Plan, run_pair
from tests.chaos.faults import SYMBOL, drop_redis_connections, read_topic
from tests.integration.pipeline import (
    CAPITAL,
    PRODUCTS,
    Slice,
    backtest_reference,
    ns,
    require_services,
)

pytestmark = pytest.mark.integration

# Not the faust stages: a kill -9 of one stalls it for the broker's session timeout (15 s)
# before its partitions go to the restarted instance; `make chaos` kills them, and
# test_two_instances.py kills all four mid-replay.
PLAN = Plan(
    seed=7,
    cycles=3,
    days=("2021-05-12", "2021-05-13", "2021-05-14"),
    speed="8000",
    targets=("ingestion", "venue", "gateway"),
)


def test_kill_and_restart_changes_no_nav_and_loses_no_order(
    kafka_bootstrap: str, redis_url: str
) -> None:
    require_services([*STAGES, GATEWAY], ingestion=True)
    _, chaos, compared = run_pair(PLAN, kafka_bootstrap, redis_url)
    assert len(chaos.faults) == PLAN.cycles
    assert sum(chaos.dead_letters.values()) == 0, chaos.dead_letters
    print(f"\nchaos short: {chaos.faults}; {compared} NAV ticks equal; {chaos.reconcile}")


def test_dropped_redis_connections_lose_no_tick(kafka_bootstrap: str, redis_url: str) -> None:
    """Every stream stage's Redis connections are closed under it again and again during
    a replay: a transient error, to be retried; no stage may lose a tick."""
    require_services(STAGES, ingestion=True)
    window = Slice("2021-05-12", "2021-05-14")
    n = len(backtest_reference(window).ticks)
    client = redis.Redis.from_url(redis_url)
    with Pipeline.start(STAGES, bootstrap=kafka_bootstrap, redis_url=redis_url) as pipeline:
        for product in PRODUCTS:
            pipeline.deposit(product, CAPITAL, ns(window.start))
        replay = pipeline.start_replay(replay_args(SYMBOL, window.start, window.end, "8000"))
        dropped = 0
        while replay.poll() is None:
            for name in ("regime", "leverage", "hedging", "nav"):
                dropped += drop_redis_connections(client, pipeline.running[name].process.pid)
            time.sleep(0.5)
        assert replay.returncode == 0 and dropped > 0
        ticks: dict[str, set[int]] = {}
        while True:  # until every stage passed every tick on, or nothing moved for 5 s
            time.sleep(5)
            seen = {name: tick_seqs(pipeline, spec) for name, spec in OUTPUTS.items()}
            if seen == ticks or all(len(seqs) >= n for seqs in seen.values()):
                break
            ticks = seen
        ticks = seen
    client.close()
    lost = {name: n - len(seqs) for name, seqs in ticks.items() if len(seqs) < n}
    assert not lost, f"ticks lost per stage after {dropped} dropped connections: {lost}"


def tick_seqs(pipeline: Pipeline, spec: TopicSpec) -> set[int]:
    """The tick seqs a stage's output topic carries (NAV: marked for both products)."""
    messages = read_topic(pipeline.bootstrap, pipeline.topic(spec.name), spec.value_type)
    if spec is NAV_UPDATES:
        marked = [(u.product, u.seq) for u in messages if u.event_id == f"{u.product}:{u.seq}"]
        return {
            seq for product, seq in marked if (PRODUCTS[1 - PRODUCTS.index(product)], seq) in marked
        }
    events = [getattr(m, "market", m) for m in messages]
    return {e.tick.seq for e in events if e.HasField("tick")}


OUTPUTS = {
    "regime": MARKET_REGIMES,
    "leverage": LEVERAGE_TARGETS,
    "hedging": HEDGE_FILLS,
    "nav": NAV_UPDATES,
}
