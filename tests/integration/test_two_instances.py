"""Two instances of every stream stage in one consumer group; kill -9 the one that holds
the symbol's partition: the survivor takes it over and nothing is lost or doubled.

Regime, leverage, hedging and NAV each run twice in a fresh namespace (venue once: it
is a gRPC server, not a consumer; ingestion once: a symbol has one publisher, its seq
allocation refuses a second writer). Once the groups have split the partitions, BTC is
replayed paced; a third of the way in, the instance of every stage that holds BTC's
partition (read from its `smartlev_stream_assigned_partitions` metric) is killed with
-9, all four at once. The survivors must take the partitions over (after the broker's
session timeout) and finish from the state the dead ones committed: the NAV series,
with any re-sent NavUpdated identical to the first, equals the backtester's to the unit.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable

import pytest
from smartlev.v1 import nav_pb2

from shared.pipeline_runner import (
    HEDGING,
    LEVERAGE,
    NAV,
    REGIME,
    STAGES,
    Pipeline,
    replay_args,
)
from shared.stream import RECOVERY_STALLED_EXIT
from shared.topics import (
    HEDGE_FILLS,
    LEVERAGE_TARGETS,
    MARKET_REGIMES,
    MARKET_TICKS,
    TopicSpec,
    partition_for,
)
from tests.integration.pipeline import (
    CAPITAL,
    PRODUCTS,
    Slice,
    backtest_reference,
    compare_navs,
    ns,
    require_services,
    tick_navs,
)

pytestmark = pytest.mark.integration

WINDOW = Slice("2021-05-12", "2021-05-15")
SPEED = "12000"  # x real time: the three days take ~22 s
INPUTS: dict[str, TopicSpec] = {
    REGIME.name: MARKET_TICKS,
    LEVERAGE.name: MARKET_REGIMES,
    HEDGING.name: LEVERAGE_TARGETS,
    NAV.name: HEDGE_FILLS,
}
ASSIGNED = re.compile(
    r'^smartlev_stream_assigned_partitions\{partition="(\d+)",service="[^"]+",topic="([^"]+)"\}'
    r" 1\.0$",
    re.MULTILINE,
)


def assigned(pipeline: Pipeline, instance: str) -> set[tuple[str, int]]:
    """(topic, partition) the instance consumes now, from its /metrics."""
    return {(t, int(p)) for p, t in ASSIGNED.findall(pipeline.metrics(instance))}


def holders(pipeline: Pipeline, stage: str, instances: list[str]) -> list[str]:
    """The instances of `stage` that hold BTC's partition of the stage's input."""
    topic = INPUTS[stage]
    wanted = (topic.name, partition_for(WINDOW.symbol, topic.partitions))
    return [i for i in instances if wanted in assigned(pipeline, i)]


def wait_until(
    what: str, condition: Callable[[], bool], timeout_s: float, pipeline: Pipeline
) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        pipeline.check_alive()
        if time.monotonic() > deadline:
            pytest.fail(f"{what} after {timeout_s:.0f}s\n{pipeline.logs()}")
        time.sleep(0.5)


def supervised_collect(
    pipeline: Pipeline, ticks: int, survivors: list[list[str]], timeout_s: float = 240
) -> tuple[list[nav_pb2.NavUpdated], list[str]]:
    """nav.updates until `ticks` tick updates are in, acting as the survivors' supervisor
    (docker-compose's restart policy): a survivor that exits with RECOVERY_STALLED_EXIT
    (faust's takeover hang, shared/stream.RecoveryWatch) is started again; any other
    death fails. Returns the updates and the instances restarted."""
    reader = pipeline.nav_consumer()
    updates: list[nav_pb2.NavUpdated] = []
    restarted: list[str] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len({u.event_id for u in updates if u.event_id == f"{u.product}:{u.seq}"}) < ticks:
            for (instance,) in survivors:
                code = pipeline.running[instance].process.poll()
                if code == RECOVERY_STALLED_EXIT:
                    restarted.append(instance)
                    pipeline.restart(instance)
            for name, running in pipeline.running.items():
                if running.failed and running.process.returncode != RECOVERY_STALLED_EXIT:
                    raise pipeline.failure(name, f"died with {running.process.returncode}")
            if time.monotonic() > deadline:
                pytest.fail(f"nav.updates stalled at {len(updates)}\n{pipeline.logs()}")
            updates.extend(u for _, u in reader.poll())
        settled = time.monotonic() + 1.0
        while time.monotonic() < settled:
            updates.extend(u for _, u in reader.poll())
    finally:
        reader.close()
    return updates, restarted


def test_survivors_take_over_from_killed_instances(kafka_bootstrap: str, redis_url: str) -> None:
    require_services(STAGES, ingestion=True)
    reference = backtest_reference(WINDOW)
    n = len(reference.ticks)
    with Pipeline.start(STAGES, bootstrap=kafka_bootstrap, redis_url=redis_url) as pipeline:
        pairs = {
            s.name: [s.name, pipeline.add_instance(s)] for s in (REGIME, LEVERAGE, HEDGING, NAV)
        }

        def split() -> bool:  # every group rebalanced: both instances hold some partition
            return all(
                len(holders(pipeline, stage, pair)) == 1
                and all(assigned(pipeline, i) for i in pair)
                for stage, pair in pairs.items()
            )

        wait_until("the groups did not split the partitions", split, 90, pipeline)
        for product in PRODUCTS:
            pipeline.deposit(product, CAPITAL, ns(WINDOW.start))
        replay = pipeline.start_replay(replay_args(WINDOW.symbol, WINDOW.start, WINDOW.end, SPEED))
        reader = pipeline.nav_consumer()
        marked: set[str] = set()

        def a_third_marked() -> bool:
            marked.update(u.event_id for _, u in reader.poll())
            return len(marked) >= 2 * n // 3

        wait_until("no third of the ticks marked", a_third_marked, 60, pipeline)
        reader.close()
        killed = {stage: holders(pipeline, stage, pair)[0] for stage, pair in pairs.items()}
        for instance in killed.values():
            pipeline.kill(instance)
        survivors = {stage: [i for i in pairs[stage] if i != killed[stage]] for stage in pairs}
        for instance in killed.values():
            del pipeline.running[instance]  # dead on purpose: not a failure to report
        assert replay.wait(timeout=120) == 0
        updates, restarted = supervised_collect(pipeline, 2 * n, [*survivors.values()])
        for stage, (survivor,) in survivors.items():
            assert holders(pipeline, stage, [survivor]) == [survivor], f"{stage} not taken over"

    compared = compare_navs(reference, list(tick_navs(updates)[0].values()))
    print(
        f"\ntwo instances: killed {sorted(killed.values())} while they held BTC; "
        f"{sum(compared.values())} NAV updates equal the backtester's; "
        f"restarted after a stalled table recovery: {restarted or 'none'}"
    )
