"""The kill/restart run: one namespaced pipeline, a paced replay of real data in
segments with gateway orders between them, and seeded kill -9 + restart of every
service at seeded moments; then the same script once more without faults, and the two
compared (docs/reliability.md).

Why two runs and not the backtester: user orders change the books, so the reference is
the uninterrupted pipeline doing the same thing. Orders go in only once the pipeline has
marked the last tick of a segment, so they meet the same NAV in both runs and the two
NAV series must be equal tick by tick, to the unit.
"""

from __future__ import annotations

import random
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import TypeVar

import grpc
import redis
from smartlev.v1 import gateway_pb2, gateway_pb2_grpc, market_pb2, nav_pb2

from services.ingestion.store import state_key
from shared.pipeline_runner import (
    GATEWAY,
    PYTHON,
    ROOT,
    STAGES,
    Pipeline,
    PipelineError,
    health_problem,
    replay_args,
)
from shared.topics import NAV_UPDATES
from tests.chaos.faults import CONSUMED, SYMBOL, read_topic
from tests.integration.pipeline import tick_navs

T = TypeVar("T")
PRODUCTS = (f"{SYMBOL}:LONG", f"{SYMBOL}:SHORT")
CAPITAL = Decimal(1_000_000)
ALICE = (("authorization", "Bearer dev-alice-key"),)
BOB = (("authorization", "Bearer dev-bob-key"),)
SERVICES = ("ingestion", *(s.name for s in STAGES), GATEWAY.name)
INFRA = ("kafka", "redis")
RETRY = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}


class ChaosFailure(AssertionError):
    """The run lost, duplicated or changed something, or a service did not recover."""


@dataclass(frozen=True, slots=True)
class Plan:
    """What a run does: replay `days` (segment boundaries) at `speed`, orders after the
    first and second segment, and `cycles` faults (seeded) spread over the segments."""

    seed: int
    cycles: int
    days: tuple[str, ...] = ("2021-05-12", "2021-05-13", "2021-05-16", "2021-05-19")
    speed: str = "2500"
    infra: bool = False  # also restart the shared broker and redis-server
    targets: tuple[str, ...] = SERVICES

    def segment_seconds(self) -> list[float]:
        """How long each segment's paced replay lasts (wall clock)."""
        return [
            (_ns(end) - _ns(start)) / 1e9 / float(self.speed)
            for start, end in zip(self.days, self.days[1:], strict=False)
        ]

    def faults(self) -> list[list[tuple[float, str]]]:
        """Per segment, (seconds into it, target) of each fault: every target in turn in a
        seeded order, each at a seeded moment of the whole replay."""
        rng = random.Random(self.seed)
        targets = list(self.targets) + (list(INFRA) if self.infra else [])
        order: list[str] = []
        while len(order) < self.cycles:
            rng.shuffle(targets)
            order.extend(targets)
        spans = self.segment_seconds()
        out: list[list[tuple[float, str]]] = [[] for _ in spans]
        for target in order[: self.cycles]:
            at = rng.uniform(0, sum(spans))
            index = 0
            while index < len(spans) - 1 and at >= spans[index]:
                at -= spans[index]
                index += 1
            out[index].append((at, target))
        return [sorted(faults) for faults in out]


def _ns(day: str) -> int:
    """'2021-05-12' -> UTC ns at midnight."""
    return int(datetime.fromisoformat(day).replace(tzinfo=UTC).timestamp()) * 1_000_000_000


@dataclass
class Outcome:
    """What one run left behind, for the comparison and the summary."""

    namespace: str
    navs: dict[tuple[str, int], str] = field(default_factory=dict)  # (product, seq) -> nav
    duplicates: int = 0  # identical NavUpdateds sent again after a restart
    orders: list[str] = field(default_factory=list)  # accepted order ids
    faults: list[tuple[float, str, float]] = field(default_factory=list)  # (t, target, down_s)
    dead_letters: dict[str, int] = field(default_factory=dict)
    reconcile: str = ""
    # broker/Redis restarted -> the services whose /healthz said unhealthy meanwhile
    unhealthy: dict[str, set[str]] = field(default_factory=dict)


class HealthWatch:
    """Polls every running service's /healthz (5 times a second) while the broker or
    Redis restarts: who reported unhealthy, and that everyone is healthy again after."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.ports = {n: r.port for n, r in pipeline.running.items() if r.port}
        self.unhealthy: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> HealthWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _poll(self) -> None:
        while not self._stop.wait(0.2):
            self.unhealthy.update(self.sick())

    def sick(self) -> list[str]:
        return [n for n, port in self.ports.items() if health_problem(port) is not None]

    def until_all_healthy(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while sick := self.sick():
            if time.monotonic() > deadline:
                raise ChaosFailure(f"still unhealthy {timeout_s:.0f}s after the restart: {sick}")
            time.sleep(0.5)


class Run:
    """One pipeline run of a Plan, with or without faults."""

    def __init__(self, plan: Plan, *, chaos: bool, bootstrap: str, redis_url: str) -> None:
        self.plan = plan
        self.chaos = chaos
        self.bootstrap = bootstrap
        self.redis_url = redis_url
        self.redis = redis.Redis.from_url(redis_url, decode_responses=True)
        self.started = time.monotonic()

    def execute(self) -> Outcome:
        specs = (*STAGES, GATEWAY)
        with Pipeline.start(specs, bootstrap=self.bootstrap, redis_url=self.redis_url) as p:
            self.pipeline = p
            kind = "chaos" if self.chaos else "reference"
            print(f"{kind} run: namespace {p.namespace}, logs in {p.log_dir}", flush=True)
            self.outcome = Outcome(p.namespace)
            channel = grpc.insecure_channel(f"127.0.0.1:{p.ports['gateway.grpc']}")
            self.gateway = gateway_pb2_grpc.GatewayStub(channel)
            try:
                for product in PRODUCTS:
                    p.deposit(product, CAPITAL, _ns(self.plan.days[0]))
                faults = self.plan.faults() if self.chaos else [[] for _ in self.plan.days[1:]]
                segments = zip(self.plan.days, self.plan.days[1:], strict=False)
                for index, ((start, end), due) in enumerate(zip(segments, faults, strict=True)):
                    self.segment(start, end, due)
                    self.orders(index)
                self.outcome.navs, self.outcome.duplicates = self.nav_series()
                self.outcome.dead_letters = {
                    c.topic.dlq_name: len(
                        read_topic(self.bootstrap, p.topic(c.topic.dlq_name), market_pb2.DeadLetter)
                    )
                    for c in CONSUMED
                }
            finally:
                channel.close()
            self.outcome.reconcile = self.reconcile()
        return self.outcome

    # ------------------------------------------------------------------ faults

    def segment(self, start: str, end: str, due: list[tuple[float, str]]) -> None:
        """Replay [start, end) while injecting `due`; then wait until it is all marked."""
        args = replay_args(SYMBOL, start, end, self.plan.speed if self.chaos else "max")
        replay = self.pipeline.start_replay(args)
        begun = time.monotonic()
        pending = list(due)
        while True:
            if pending and time.monotonic() - begun >= pending[0][0]:
                self.fault(pending.pop(0)[1], args)
                replay = self.pipeline.running["ingestion"].process
            code = replay.poll()
            if code == 0 and not pending:
                break
            if code not in (None, 0):
                raise ChaosFailure(str(self.pipeline.failure("ingestion", f"exited {code}")))
            self.check_alive()
            time.sleep(0.05)
        self.drained()

    def fault(self, target: str, replay: Sequence[str]) -> None:
        """kill -9 `target` and start it again (same namespace, ports); wait till healthy.
        A finished replay is not restarted (there is nothing left to kill)."""
        began = time.monotonic()
        if target in INFRA:
            with HealthWatch(self.pipeline) as watch:
                subprocess.run(
                    ["bash", "scripts/stack.sh", f"restart-{target}"], cwd=ROOT, check=True
                )
                watch.until_all_healthy(timeout_s=120)
            self.outcome.unhealthy.setdefault(target, set()).update(watch.unhealthy)
        else:
            if self.pipeline.running[target].process.poll() is not None:  # replay ended
                self.outcome.faults.append((began - self.started, f"{target} (done)", 0.0))
                return
            self.pipeline.kill(target)
            if target == "ingestion":
                self.pipeline.start_replay(replay)
            else:
                self.pipeline.restart(target)
        self.outcome.faults.append((began - self.started, target, time.monotonic() - began))

    def check_alive(self) -> None:
        for name, running in self.pipeline.running.items():
            if name != "ingestion" and running.failed:
                raise ChaosFailure(str(self.pipeline.failure(name, "died by itself")))

    # ------------------------------------------------------------------ gateway

    def call(self, what: str, method: Callable[..., T], request: object, who: object) -> T:
        """A gateway call retried (same request: idempotent) while the gateway restarts."""
        deadline = time.monotonic() + 120
        while True:
            try:
                return method(request, metadata=who, timeout=10)
            except grpc.RpcError as exc:
                if exc.code() not in RETRY or time.monotonic() > deadline:
                    raise ChaosFailure(f"{what}: {exc.code()} {exc.details()}") from exc
                self.check_alive()
                time.sleep(0.2)

    def drained(self) -> None:
        """Wait until every product is marked at the last seq ingestion published."""
        last = int(self.redis.hget(state_key(self.pipeline.namespace, SYMBOL), "seq") or 0)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            self.check_alive()
            marked = {
                self.call("GetProduct", self.gateway.GetProduct,
                          gateway_pb2.GetProductRequest(product=p), ALICE).seq
                for p in PRODUCTS
            }  # fmt: skip
            if marked == {last}:
                return
            time.sleep(0.1)
        stage = self.pipeline.stalled_stage()
        raise ChaosFailure(f"not drained to seq {last}; stalled at {stage}\n{self.pipeline.logs()}")

    def orders(self, segment: int) -> None:
        """Opens after the first segment, closes after the second: the same in every run."""
        if segment == 0:
            for who, name, product, amount in (
                (ALICE, "alice", PRODUCTS[0], "25000"),
                (BOB, "bob", PRODUCTS[1], "12345.67"),
            ):
                request = gateway_pb2.OpenPositionRequest(
                    client_order_id=f"chaos-{name}-open", product=product, amount_usdt=amount
                )
                reply = self.call("OpenPosition", self.gateway.OpenPosition, request, who)
                self.outcome.orders.append(reply.order_id)
                setattr(self, f"{name}_position", reply.position_id)
        elif segment == 1:
            for who, name in ((ALICE, "alice"), (BOB, "bob")):
                request = gateway_pb2.ClosePositionRequest(
                    client_order_id=f"chaos-{name}-close",
                    position_id=getattr(self, f"{name}_position"),
                    all=True,
                )
                closed = self.call("ClosePosition", self.gateway.ClosePosition, request, who)
                self.outcome.orders.append(closed.order_id)
        if segment in (0, 1):
            self.drained()  # the orders are applied and re-marked before the next ticks

    # ------------------------------------------------------------------ evidence

    def nav_series(self) -> tuple[dict[tuple[str, int], str], int]:
        """Each product's NAV per tick; a NavUpdated sent again must be identical."""
        updates = read_topic(
            self.bootstrap, self.pipeline.topic(NAV_UPDATES.name), nav_pb2.NavUpdated
        )
        try:
            ticks, resent = tick_navs(updates)
        except AssertionError as exc:
            raise ChaosFailure(str(exc)) from exc
        return {key: update.nav for key, update in ticks.items()}, resent

    def reconcile(self) -> str:
        """`python -m shared.reconcile`: exit 0 or the differences it lists."""
        pipeline = self.pipeline
        command = [PYTHON, "-m", "shared.reconcile", "--namespace", pipeline.namespace]
        command += ["--bootstrap", pipeline.bootstrap, "--redis-url", pipeline.redis_url]
        done = subprocess.run(
            command,
            cwd=ROOT,
            env=pipeline.env_for("reconcile"),
            capture_output=True,
            text=True,
            timeout=180,
        )
        if done.returncode != 0:
            raise ChaosFailure(f"reconcile exit {done.returncode}:\n{done.stdout}{done.stderr}")
        return done.stdout.strip().splitlines()[-1] if done.stdout.strip() else "ok"


def compare(reference: Outcome, chaos: Outcome) -> int:
    """The chaos run's NAV per tick equals the reference's, every tick, and neither run
    dead-lettered anything (a redelivered event a restart should have skipped moves no
    NAV); returns how many ticks. That each order is applied once is reconcile's
    `orders.applied_once` (the runs accept their orders by the same calls)."""
    for run in (reference, chaos):
        if any(run.dead_letters.values()):
            raise ChaosFailure(f"run {run.namespace} dead-lettered {run.dead_letters}")
    if set(chaos.navs) != set(reference.navs):
        lost = sorted(set(reference.navs) - set(chaos.navs))[:10]
        extra = sorted(set(chaos.navs) - set(reference.navs))[:10]
        raise ChaosFailure(f"ticks marked differ: missing {lost}, extra {extra}")
    differ = [k for k in sorted(reference.navs) if reference.navs[k] != chaos.navs[k]]
    if differ:
        k = differ[0]
        raise ChaosFailure(
            f"{len(differ)} NAVs differ; first {k}: {chaos.navs[k]} != {reference.navs[k]}"
        )
    return len(reference.navs)


def run_pair(plan: Plan, bootstrap: str, redis_url: str) -> tuple[Outcome, Outcome, int]:
    """The uninterrupted reference, then the faulted run; raises ChaosFailure on a difference."""
    reference = Run(plan, chaos=False, bootstrap=bootstrap, redis_url=redis_url).execute()
    try:
        chaos = Run(plan, chaos=True, bootstrap=bootstrap, redis_url=redis_url).execute()
    except PipelineError as exc:
        raise ChaosFailure(str(exc)) from exc
    return reference, chaos, compare(reference, chaos)
