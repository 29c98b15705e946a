"""Run the stage services as subprocesses in one namespace, feed them, read their NAVs.

The demo, the end-to-end benchmark and the parity test all need the same thing: a whole
pipeline (`python -m services.<name>` each) isolated on the shared broker and Redis by a
namespace (docs/pipeline.md), started in order, each up only once its /healthz answers
200, stopped cleanly, with its log kept for whoever has to find out why it stalled.

    with Pipeline.start(namespace="demo.", services=STAGES) as pipeline:
        pipeline.deposit("BTC-USDT:LONG", Decimal(1_000_000))
        pipeline.replay(["--data", ..., "--speed", "max"])
        for update in pipeline.nav_updates(): ...
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from types import TracebackType
from typing import NamedTuple

import redis
from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
from smartlev.v1 import nav_pb2, orders_pb2

from shared import codec
from shared.adapters.kafka_admin import ensure_topics
from shared.adapters.market_data import parse_time
from shared.adapters.tick_replay import data_dir, file_stem, make_producer
from shared.stream import FAUST_DATA
from shared.topics import (
    ALL_TOPICS,
    HEDGE_FILLS,
    LEVERAGE_TARGETS,
    MARKET_REGIMES,
    MARKET_TICKS,
    NAV_UPDATES,
    ORDERS_EVENTS,
    TopicSpec,
    partition_for,
)

ROOT = Path(__file__).resolve().parents[1]
PIPELINE_LOGS = ROOT / ".run" / "pipelines"  # a directory of service logs per namespace
# One file per process using the stack (mark_stack_user), for the whole machine: every
# checkout of the project here shares the one loopback stack, and a run in a second
# checkout removed this one's namespaces under it, mid-test.
RUNS = Path(tempfile.gettempdir()) / "smartlev-stack-users"
_PORT_REF = re.compile(r"\{port:([a-z0-9_.]+)\}")
PYTHON = sys.executable


class PipelineError(RuntimeError):
    """A service did not come up, died, or the pipeline stalled; names whose log to read."""


@dataclass(frozen=True, slots=True)
class StageSpec:
    """A service as the runner starts it: `python -m <module>`, healthy on /healthz."""

    name: str
    module: str
    # Extra env (SMARTLEV_<NAME>_...) beside NAMESPACE and METRICS_PORT; "{port:<key>}"
    # in a value becomes a free port picked once per key for the whole pipeline.
    env: Mapping[str, str] = field(default_factory=dict)

    @property
    def prefix(self) -> str:
        return f"SMARTLEV_{self.name.upper()}_"


# Start order: a stage's dependencies first (hedging calls the venue over gRPC).
VENUE = StageSpec("venue", "services.venue", env={"SMARTLEV_VENUE_GRPC_PORT": "{port:venue.grpc}"})
HEDGING = StageSpec(
    "hedging",
    "services.hedging",
    env={"SMARTLEV_HEDGING_VENUE_ADDRESS": "127.0.0.1:{port:venue.grpc}"},
)
LEVERAGE = StageSpec("leverage", "services.leverage")
REGIME = StageSpec("regime", "services.regime")
NAV = StageSpec("nav", "services.nav")
# The order gateway (not in STAGES: only what takes user orders starts it).
GATEWAY = StageSpec(
    "gateway", "services.gateway", env={"SMARTLEV_GATEWAY_GRPC_PORT": "{port:gateway.grpc}"}
)
STAGES: tuple[StageSpec, ...] = (VENUE, HEDGING, LEVERAGE, REGIME, NAV)
# (inputs, service, output) of the stages that send one output per input message.
CHAIN: tuple[tuple[tuple[TopicSpec, ...], str, TopicSpec], ...] = (
    ((MARKET_TICKS,), "regime", MARKET_REGIMES),
    ((MARKET_REGIMES,), "leverage", LEVERAGE_TARGETS),
    ((LEVERAGE_TARGETS, ORDERS_EVENTS), "hedging", HEDGE_FILLS),
)


def missing_modules(specs: Sequence[StageSpec]) -> list[str]:
    """Service packages not in this tree yet (`services/<name>/main.py`)."""
    return [s.module for s in specs if not (ROOT / s.module.replace(".", "/") / "main.py").exists()]


def replay_args(symbol: str, start: str, end: str, speed: str = "max") -> list[str]:
    """`services.ingestion replay` flags for the real data set's files of `symbol`,
    from `start` to `end` (ISO-8601 dates or times, UTC unless they say, end
    exclusive). A time used to get "T00:00:00Z" after it, which ingestion refused,
    once the pipeline demo had started five services."""
    root, stem = data_dir(), file_stem(symbol)
    return [
        "--data", str(root / f"{stem}_perp_1h_2019_2023.csv"),
        "--funding", str(root / f"{stem}_funding_8h_2019_2023.csv"),
        "--marks", str(root / f"{stem}_mark_1h_2019_2023.csv"),
        "--symbol", symbol, "--start", _utc(start), "--end", _utc(end), "--speed", speed,
    ]  # fmt: skip


def _utc(text: str) -> str:
    """An instant `parse_time` reads, as ISO-8601 UTC."""
    ns = parse_time(text)
    assert ns is not None
    return datetime.fromtimestamp(ns / 1e9, UTC).isoformat().replace("+00:00", "Z")


def health_problem(port: int) -> str | None:
    """None if the service on `port` answers /healthz with 200, else what it said."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as reply:
            return None if reply.status == 200 else f"status {reply.status}"
    except urllib.error.HTTPError as exc:
        return str(exc.read().decode(errors="replace"))
    except OSError as exc:
        return str(exc)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def new_namespace(prefix: str = "t") -> str:
    return f"{prefix}{uuid.uuid4().hex[:8]}."


class Leftovers(NamedTuple):
    """The namespaces a kind of run leaves behind: the names of their topics and of their
    faust data and log directories match `names`; their Redis keys match `keys`."""

    names: re.Pattern[str]
    keys: tuple[str, ...]


# Test, bench and chaos runs (`new_namespace` and the tests' own): t<8 hex>. and
# bench<8 hex>.; and the pipeline benchmark's raw chain topics, which a killed benchmark
# leaves behind. A run keeps its namespace for whoever reads a failure; the next run
# removes it.
# Redis globs of the same names: `?` would take any character, and a namespace of the
# services' own (`trading01.`) lost its books to the next test run.
HEX8_GLOB = "[0-9a-f]" * 8
TEST_RUNS = Leftovers(
    re.compile(r"^(t|bench)[0-9a-f]{8}\.|^bench\.chain\.[0-9a-f]{10}$"),
    (f"t{HEX8_GLOB}.*", f"bench{HEX8_GLOB}.*"),
)
# `make demo`'s pipeline (demo<8 hex>.): kept to be looked at (README, "Inspecting the
# topics") until the next demo starts.
DEMO_RUNS = Leftovers(re.compile(r"^demo[0-9a-f]{8}\."), (f"demo{HEX8_GLOB}.*",))


def chain_topic() -> str:
    """A fresh topic for the pipeline benchmark's raw produce -> consume chain."""
    return f"bench.chain.{uuid.uuid4().hex[:10]}"


def mark_stack_user(runs: Path = RUNS) -> None:
    """Say, until this process exits, that it keeps namespaces on the stack (a file named
    by its pid, holding its start time), so another run's `remove_leftover_namespaces`
    leaves them alone."""
    mark, started = runs / str(os.getpid()), process_start_time(os.getpid()) or ""
    with contextlib.suppress(OSError):
        if mark.read_text() == started:
            return  # this process's (a dead one's under the same pid is written over)
    if not runs.is_dir():
        runs.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(PermissionError):  # another user made it first
            runs.chmod(0o1777)  # as /tmp: anyone marks, only the owner unmarks
    mark.write_text(started)
    mark.chmod(0o644)  # whatever the umask: every user's cleanup reads it
    atexit.register(mark.unlink, missing_ok=True)


def other_stack_users(runs: Path = RUNS) -> list[int]:
    """Live processes but this one that marked themselves. A mark whose process is gone
    (kill -9 runs no exit handler) is removed, also when its pid now names another
    process (the start time differs)."""
    alive = []
    for mark in runs.glob("*") if runs.is_dir() else ():
        if not mark.name.isdigit() or int(mark.name) == os.getpid():
            continue
        try:
            recorded = mark.read_text()
        except OSError:  # its process ended and removed it since the glob
            continue
        started = process_start_time(int(mark.name))
        if started is not None and started == recorded:
            alive.append(int(mark.name))
        else:
            with contextlib.suppress(PermissionError):  # another user's: theirs to clear
                mark.unlink(missing_ok=True)
    return sorted(alive)


def process_start_time(pid: int) -> str | None:
    """The process's start time (clock ticks since boot, /proc/<pid>/stat field 22)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[19]


def remove_leftover_namespaces(
    bootstrap: str, redis_url: str, runs: Path = RUNS, leftovers: Leftovers = TEST_RUNS
) -> None:
    """Delete the topics, Redis keys, faust data and service logs earlier runs of a kind
    left behind. Thousands of leftover partitions made a broker restart outlast its 60 s
    start timeout, and every request the broker serves costs more with them; the logs of
    a day of test runs took a gigabyte. Skipped while another run uses the stack: its
    namespaces look the same."""
    mark_stack_user(runs)  # first: two runs starting at once then both keep theirs
    others = other_stack_users(runs)
    if others:
        pids = ", ".join(map(str, others))
        print(f"leftover namespaces kept: another run uses the stack (pid {pids})", flush=True)
        return
    admin = KafkaAdminClient(bootstrap_servers=bootstrap.split(","), client_id="cleanup")
    try:
        old = sorted(t for t in admin.list_topics() if leftovers.names.match(t))
        for start in range(0, len(old), 200):
            admin.delete_topics(old[start : start + 200], timeout_ms=120_000)
    finally:
        admin.close()
    remove_leftover_data(ROOT / FAUST_DATA, leftovers)
    remove_leftover_data(PIPELINE_LOGS, leftovers)
    client = redis.Redis.from_url(redis_url)
    try:
        for pattern in leftovers.keys:
            batch = [k for k in client.scan_iter(match=pattern, count=1000)]
            for start in range(0, len(batch), 1000):
                client.delete(*batch[start : start + 1000])
    finally:
        client.close()


def remove_leftover_data(directory: Path, leftovers: Leftovers = TEST_RUNS) -> None:
    """The directories of those runs: the faust stages' local data (one per app and run,
    named `<namespace><app>`) or the services' logs (one per run, `<namespace>` without
    its dot)."""
    for path in directory.glob("*"):
        if path.is_dir() and (
            leftovers.names.match(path.name) or leftovers.names.match(f"{path.name}.")
        ):
            shutil.rmtree(path)


@dataclass
class Running:
    spec: StageSpec
    process: subprocess.Popen[bytes]
    log_path: Path
    port: int
    oneshot: bool = False  # a job that ends (a replay): exit code 0 is success

    @property
    def failed(self) -> bool:
        code = self.process.poll()
        return code is not None and (code != 0 or not self.oneshot)

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(text[-lines:])


class Pipeline:
    """Services of one namespace; a context manager that always stops what it started."""

    def __init__(
        self, namespace: str, log_dir: Path, bootstrap: str, redis_url: str, env: Mapping[str, str]
    ) -> None:
        self.namespace = namespace
        self.log_dir = log_dir
        self.bootstrap = bootstrap
        self.redis_url = redis_url
        self.base_env = dict(env)
        self.running: dict[str, Running] = {}
        self.ports: dict[str, int] = {}

    @classmethod
    def start(
        cls,
        services: Sequence[StageSpec] = STAGES,
        *,
        namespace: str | None = None,
        log_dir: Path | None = None,
        bootstrap: str = "127.0.0.1:9092",
        redis_url: str = "redis://127.0.0.1:6379/0",
        env: Mapping[str, str] | None = None,
        timeout_s: float = 60.0,
    ) -> Pipeline:
        """Create the namespace's topics, then start `services` in order, each healthy."""
        mark_stack_user()
        namespace = namespace or new_namespace()
        log_dir = log_dir or PIPELINE_LOGS / namespace.rstrip(".")
        log_dir.mkdir(parents=True, exist_ok=True)
        pipeline = cls(namespace, log_dir, bootstrap, redis_url, env or {})
        ensure_topics(bootstrap, [s.in_namespace(namespace) for s in ALL_TOPICS], verbose=False)
        try:
            for spec in services:
                pipeline._launch(spec)
                pipeline._wait_healthy(pipeline.running[spec.name], timeout_s)
        except BaseException:
            pipeline.stop()
            raise
        return pipeline

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ----------------------------------------------------------------- processes

    def env_for(self, name: str, port: int | None = None) -> dict[str, str]:
        """The environment of service `name`: connection, namespace, metrics port."""
        prefix = f"SMARTLEV_{name.upper()}_"
        env = {**os.environ, **self.base_env}
        env.update(
            {
                f"{prefix}NAMESPACE": self.namespace,
                f"{prefix}KAFKA__BOOTSTRAP": self.bootstrap,
                f"{prefix}REDIS__URL": self.redis_url,
                f"{prefix}METRICS_PORT": str(port or 0),
                "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "gen")]),
            }
        )
        return env

    def _port(self, key: str) -> int:
        """A port of this pipeline's own: the kernel hands a port it freed out again, and
        two of a pipeline's (a service's metrics and the gateway's gRPC) once got the
        same one, a health check then reaching the gRPC server (CI, session 27)."""
        while key not in self.ports:
            port = free_port()
            if port not in self.ports.values():
                self.ports[key] = port
        return self.ports[key]

    def _launch(self, spec: StageSpec, instance: str | None = None) -> None:
        """Start `spec` as `instance` (default: the spec's name); an instance keeps its
        metrics port and log across restarts, and shares every other port of the spec."""
        instance = instance or spec.name
        port = self._port(instance)
        env = self.env_for(spec.name, port)
        for name, value in spec.env.items():
            env[name] = _PORT_REF.sub(lambda m: str(self._port(m.group(1))), value)
        log_path = self.log_dir / f"{instance}.log"
        with log_path.open("ab") as log:
            process = subprocess.Popen(
                [PYTHON, "-m", spec.module],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.running[instance] = Running(spec, process, log_path, port)

    def add_instance(self, spec: StageSpec, timeout_s: float = 60.0) -> str:
        """One more instance of a stage (same consumer group); returns its name
        (`<service>#2`, ...), healthy. Only for services without a fixed listening port."""
        count = sum(1 for r in self.running.values() if r.spec.name == spec.name)
        instance = f"{spec.name}#{count + 1}"
        self._launch(spec, instance)
        self._wait_healthy(self.running[instance], timeout_s)
        return instance

    def kill(self, instance: str) -> None:
        """kill -9 the instance (its whole process group) and reap it."""
        process = self.running[instance].process
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()

    def restart(self, instance: str, timeout_s: float = 90.0) -> None:
        """Start a stopped or killed instance again on its ports; wait until healthy."""
        self._launch(self.running[instance].spec, instance)
        self._wait_healthy(self.running[instance], timeout_s)

    def metrics(self, instance: str) -> str:
        """The instance's Prometheus exposition text."""
        url = f"http://127.0.0.1:{self.running[instance].port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as reply:
            return str(reply.read().decode("utf-8"))

    def _wait_healthy(self, running: Running, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        detail: str | None = "no answer"
        while time.monotonic() < deadline:
            if running.process.poll() is not None:
                raise self.failure(running.spec.name, f"exited with {running.process.returncode}")
            if (detail := health_problem(running.port)) is None:
                return
            time.sleep(0.2)
        raise self.failure(running.spec.name, f"not healthy after {timeout_s:.0f}s: {detail}")

    def failure(self, name: str, what: str) -> PipelineError:
        running = self.running.get(name)
        if running is None:
            return PipelineError(f"{name}: {what}")
        return PipelineError(
            f"service {name} {what}; read its log {running.log_path}\n"
            f"--- last lines of {running.log_path.name} ---\n{running.log_tail()}"
        )

    def check_alive(self) -> None:
        for name, running in self.running.items():
            if running.failed:
                raise self.failure(name, f"died with exit code {running.process.returncode}")

    def logs(self) -> str:
        """Every service's log tail (attach to a failing test's output)."""
        return "\n".join(
            f"--- {name} ({r.log_path}) ---\n{r.log_tail()}" for name, r in self.running.items()
        )

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM every service (last started first); SIGKILL what outlives the grace."""
        for running in reversed(list(self.running.values())):
            if running.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(running.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for running in self.running.values():
            try:
                running.process.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(running.process.pid, signal.SIGKILL)
                running.process.wait()

    # ----------------------------------------------------------------- input

    def topic(self, name: str) -> str:
        return f"{self.namespace}{name}"

    def deposit(self, product: str, amount: Decimal, ts_ns: int, user: str = "seed") -> str:
        """Publish a PositionOpened on orders.events (keyed by symbol); returns its id."""
        event_id = f"deposit:{product}:{user}"
        opened = orders_pb2.PositionOpened(
            event_id=event_id,
            position_id=event_id,
            user_id=user,
            product=product,
            ts_event_ns=ts_ns,
            ts_init_ns=time.time_ns(),
            amount=codec.decimal_to_wire(amount),
            client_order_id=event_id,
        )
        producer = make_producer(self.bootstrap, client_id="smartlev-pipeline-orders")
        try:
            producer.send(
                self.topic(ORDERS_EVENTS.name),
                key=product.split(":")[0],
                value=orders_pb2.OrderEvent(opened=opened),
            ).get(timeout=30)
        finally:
            producer.close()
        return event_id

    def start_replay(self, args: Sequence[str]) -> subprocess.Popen[bytes]:
        """Start `python -m services.ingestion replay <args>` in this namespace."""
        log_path = self.log_dir / "ingestion.log"
        with log_path.open("ab") as log:
            process = subprocess.Popen(
                [PYTHON, "-m", "services.ingestion", "replay", *args],
                cwd=ROOT,
                env=self.env_for("ingestion"),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.running["ingestion"] = Running(
            StageSpec("ingestion", "services.ingestion"), process, log_path, 0, oneshot=True
        )
        return process

    def replay(self, args: Sequence[str], timeout_s: float = 600.0) -> None:
        """Replay to the end; raises naming ingestion's log if it fails."""
        process = self.start_replay(args)
        code = process.wait(timeout=timeout_s)
        if code != 0:
            raise self.failure("ingestion", f"replay exited with {code}")

    def topic_counts(self, names: Sequence[str]) -> dict[str, int]:
        """Messages written so far to each (namespaced) topic: the sum of end offsets."""
        consumer = KafkaConsumer(bootstrap_servers=self.bootstrap.split(","))
        try:
            out = {}
            for name in names:
                topic = self.topic(name)
                parts = [
                    TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()
                ]
                out[name] = sum(consumer.end_offsets(parts).values())
            return out
        finally:
            consumer.close()

    def stalled_stage(self) -> str:
        """The service whose log explains a stall: a dead one, else the first stage whose
        output lags its input (regime, leverage and hedging send one message per input)."""
        for name, running in self.running.items():
            if running.failed:
                return name
        counts = self.topic_counts(sorted({t.name for ins, _, out in CHAIN for t in (*ins, out)}))
        if counts[MARKET_TICKS.name] == 0:
            return "ingestion"
        for inputs, service, output in CHAIN:
            if counts[output.name] < sum(counts[t.name] for t in inputs):
                return service
        return "nav"

    # ----------------------------------------------------------------- output

    def nav_consumer(self, products: Collection[str] | None = None) -> NavReader:
        return NavReader(self.bootstrap, self.topic(NAV_UPDATES.name), products)


# Readers beside the pipeline (demo, tests, benchmarks) are not part of it: their
# fetches wait for 64 KB or 100 ms, so they take less of the machine's CPU from the
# services (the benchmark's readers: 0.08 cores instead of 0.11 at 1,000 ticks/s).
READER_FETCH: dict[str, int] = {"fetch_min_bytes": 1 << 16, "fetch_max_wait_ms": 100}


class NavReader:
    """Reads a namespace's nav.updates from the beginning, no group: every partition, or
    only those holding `products` (a reader that wants one product reads less)."""

    def __init__(self, bootstrap: str, topic: str, products: Collection[str] | None = None) -> None:
        self.consumer = KafkaConsumer(
            bootstrap_servers=bootstrap.split(","),
            enable_auto_commit=False,
            key_deserializer=codec.key_deserializer,
            client_id="smartlev-nav-reader",
            **READER_FETCH,
        )
        partitions = self.consumer.partitions_for_topic(topic) or set()
        if products is not None:
            partitions = {partition_for(p, len(partitions)) for p in products}
        assigned = [TopicPartition(topic, p) for p in sorted(partitions)]
        self.consumer.assign(assigned)
        self.consumer.seek_to_beginning(*assigned)

    def poll(self, timeout_ms: int = 200) -> Iterator[tuple[int, nav_pb2.NavUpdated]]:
        """(when the NAV service published it, ns, update) for every message that arrived.
        The record's CreateTime (ms, the NAV service's clock at send), not when this
        reader got round to it: a polling reader's own delays are not the pipeline's."""
        for records in self.consumer.poll(timeout_ms=timeout_ms).values():
            for record in records:
                yield record.timestamp * 1_000_000, codec.decode(nav_pb2.NavUpdated, record.value)

    def close(self) -> None:
        self.consumer.close()
