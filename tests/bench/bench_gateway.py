"""The order gateway under load: open+close round trips beside a no-op call (the ceiling).

    python -m tests.bench.bench_gateway [--seconds 3] [--rounds 3] [--clients 1,8,64]

Starts the gateway (`python -m services.gateway`, its own process, as deployed) in a
fresh namespace and writes a fresh NAV for every product the way the NAV service does
(`<ns>nav:{<product>}`), so orders settle against the real Redis and their events go to
the real Kafka through the outbox relay; no other stage runs, so only the gateway is
measured. For each number of concurrent clients (asyncio grpc.aio, one channel each,
loopback), every client opens a position and closes it (2 orders), again and again; then
the same clients call `Ping` (authentication and the gRPC round trip, nothing else) for
as long; the two take `--rounds` turns over `--seconds` each. Latency is per call, from
the client; the gateway process's CPU per call is the figure the machine's noise moves
least. A second table splits the machine's CPU per call between the gateway, these
clients, Redis and the broker: with both kinds of call saturating the cores, the ratio
cannot beat the no-op's total over the order's. Goals (issue #5): orders/s at least half
the no-op rate; p99 under 20 ms with 8 clients.
Run by `make bench`; never a timed assertion in a test.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
import uuid
from dataclasses import dataclass, field
from decimal import Decimal

import grpc
import redis
from rich.console import Console
from rich.table import Table
from smartlev.v1 import gateway_pb2, gateway_pb2_grpc

from shared.core.config import StrategyConfig
from shared.core.products import SIDES, product_id
from shared.pipeline_runner import GATEWAY, Pipeline, remove_leftover_namespaces
from shared.settings import ServiceSettings, from_environment
from tests.bench.cpu import cpu_seconds, stack_pid
from tests.nav_marks import nav_hash

console = Console(width=130)  # the tables stay whole when piped (80 columns otherwise)
KEYS = ("dev-alice-key", "dev-bob-key")  # services/gateway/api_keys.toml (local dev users)
AMOUNT = "100"
WARMUP_S = 0.5


GATEWAY_PART, CLIENTS_PART = "gateway", "clients (this benchmark)"
PARTS = {GATEWAY_PART: GATEWAY_PART, CLIENTS_PART: CLIENTS_PART, "redis": "Redis",
         "kafka": "broker (Kafka)"}  # fmt: skip


@dataclass
class Run:
    """What the clients of one case did: call latencies (s), the wall time and the CPU
    seconds of each part of the machine (PARTS) over the measured part."""

    latencies: list[float] = field(default_factory=list)
    seconds: float = 0.0
    cpu_s: dict[str, float] = field(default_factory=dict)

    def ms_per_call(self, part: str) -> float | None:
        """None: the part was not measured (no pid of the stack's for it: a stack started
        by compose or from another checkout), not 0."""
        if part not in self.cpu_s:
            return None
        return self.cpu_s[part] / len(self.latencies) * 1e3 if self.latencies else 0.0

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.seconds if self.seconds else 0.0

    def add(self, other: Run) -> None:
        """Count `other`'s calls, time and CPU as part of this run."""
        self.latencies += other.latencies
        self.seconds += other.seconds
        for part, cpu_s in other.cpu_s.items():
            self.cpu_s[part] = self.cpu_s.get(part, 0.0) + cpu_s

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(int(q * len(ordered)), len(ordered) - 1)] if ordered else 0.0


def write_navs(client: redis.Redis, namespace: str, products: list[str]) -> None:
    """A fresh mark per product, as services/nav writes it."""
    for product in products:
        name, fields = nav_hash(namespace, product, Decimal(100))
        client.hset(name, mapping=fields)


async def round_trip(
    stub: gateway_pb2_grpc.GatewayStub,
    auth: tuple[tuple[str, str], ...],
    client: int,
    n: int,
    product: str,
    tag: str,
    run: Run | None,
) -> None:
    """Open a position, then close all of it: two orders, each timed."""
    began = time.perf_counter()
    opened = await stub.OpenPosition(
        gateway_pb2.OpenPositionRequest(
            client_order_id=f"{tag}-{client}-{n}-o", product=product, amount_usdt=AMOUNT
        ),
        metadata=auth,
    )
    middle = time.perf_counter()
    await stub.ClosePosition(
        gateway_pb2.ClosePositionRequest(
            client_order_id=f"{tag}-{client}-{n}-c", position_id=opened.position_id, all=True
        ),
        metadata=auth,
    )
    if run is not None:
        run.latencies += [middle - began, time.perf_counter() - middle]


async def ping(
    stub: gateway_pb2_grpc.GatewayStub, auth: tuple[tuple[str, str], ...], run: Run | None
) -> None:
    began = time.perf_counter()
    await stub.Ping(gateway_pb2.PingRequest(), metadata=auth)
    if run is not None:
        run.latencies.append(time.perf_counter() - began)


async def drive(
    target: str, clients: int, seconds: float, orders: bool, products: list[str], server: int
) -> Run:
    """`clients` concurrent loops for WARMUP_S (not counted) and then `seconds`; the
    CPU the `server` process, these clients, Redis and the broker used in between."""
    run = Run()
    tag = uuid.uuid4().hex[:8]
    channels = [grpc.aio.insecure_channel(target) for _ in range(clients)]
    stubs = [gateway_pb2_grpc.GatewayStub(c) for c in channels]
    start = time.perf_counter() + WARMUP_S
    stop = start + seconds

    async def client(i: int) -> None:
        auth = (("authorization", f"Bearer {KEYS[i % len(KEYS)]}"),)
        product = products[i % len(products)]
        n = 0
        while (now := time.perf_counter()) < stop:
            counted = run if now >= start else None
            if orders:
                await round_trip(stubs[i], auth, i, n, product, tag, counted)
            else:
                await ping(stubs[i], auth, counted)
            n += 1

    pids = {GATEWAY_PART: server, CLIENTS_PART: os.getpid()}
    pids |= {name: pid for name in ("redis", "kafka") if (pid := stack_pid(name)) is not None}

    async def meter() -> None:
        await asyncio.sleep(max(start - time.perf_counter(), 0))
        began = {name: cpu_seconds([pid]) for name, pid in pids.items()}
        await asyncio.sleep(max(stop - time.perf_counter(), 0))
        run.cpu_s = {name: cpu_seconds([pid]) - began[name] for name, pid in pids.items()}

    try:
        await asyncio.gather(meter(), *(client(i) for i in range(clients)))
        run.seconds = time.perf_counter() - start
    finally:
        await asyncio.gather(*(c.close() for c in channels))
    return run


def cpu_table(rows: list[tuple[int, Run, Run]]) -> Table:
    """The machine's CPU per call by part, orders beside no-ops: with both saturating the
    cores, orders/s over no-ops/s is at most the no-op's machine CPU over the order's."""
    table = Table(title="Where a call's CPU goes (ms per call; the stack's processes by pid)")
    table.add_column("clients", justify="right")
    table.add_column("call")
    for label in PARTS.values():
        table.add_column(label, justify="right")
    table.add_column("all four", justify="right")
    table.add_column("no-op / order", justify="right")
    for clients, trades, noop in rows:
        figures = [[run.ms_per_call(part) for part in PARTS] for run in (trades, noop)]
        # a sum or a bound over parts not all measured is no figure: "-"
        totals = [None if None in f else sum(x for x in f if x is not None) for f in figures]
        for name, cells, total in zip(("order", "no-op"), figures, totals, strict=True):
            bound = ""
            if name == "order" and totals[0] and totals[1] is not None:
                bound = f"{totals[1] / totals[0]:.2f}"
            table.add_row(str(clients), name, *map(_ms, cells), _ms(total), bound)
    return table


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="measured time per case")
    parser.add_argument(
        "--rounds", type=int, default=3, help="turns of orders and no-ops sharing --seconds"
    )
    parser.add_argument("--clients", default="1,8,64", help="concurrent clients per case")
    args = parser.parse_args()
    levels = [int(c) for c in args.clients.split(",")]
    settings = from_environment(ServiceSettings)
    products = [product_id(s, side) for s in StrategyConfig().instruments for side in SIDES]
    # Earlier runs' namespaces cost the broker on every request: measure without them.
    remove_leftover_namespaces(settings.kafka_bootstrap, settings.redis_url)
    namespace = f"bench{uuid.uuid4().hex[:8]}."
    store = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    console.print(f"[bold]==> gateway: starting it in namespace {namespace}[/]")
    rows = []
    with Pipeline.start(
        (GATEWAY,), namespace=namespace, bootstrap=settings.kafka_bootstrap,
        redis_url=settings.redis_url,
    ) as pipeline:  # fmt: skip
        target = f"127.0.0.1:{pipeline.ports['gateway.grpc']}"
        server = pipeline.running["gateway"].process.pid
        for clients in levels:
            # Orders and no-ops take turns, so both meet the machine as it is then (its
            # speed drifts by up to a third within a minute).
            trades, noop = Run(), Run()
            turn = args.seconds / args.rounds
            for _ in range(args.rounds):
                write_navs(store, namespace, products)
                trades.add(asyncio.run(drive(target, clients, turn, True, products, server)))
                pipeline.check_alive()
                noop.add(asyncio.run(drive(target, clients, turn, False, products, server)))
            rows.append((clients, trades, noop))
            console.print(
                f"    {clients} clients: {trades.rate:,.0f} orders/s, no-op {noop.rate:,.0f}/s"
            )
    for name in store.scan_iter(f"{namespace}*", count=1000):  # this run's keys only
        store.delete(name)
    store.close()

    table = Table(
        title="Gateway: open+close orders vs a no-op call (loopback; latency and the gateway "
        "process's CPU per call in ms)"
    )
    columns = (
        "clients", "orders/s", "p50", "p99", "no-op/s", "no-op p50", "no-op p99", "ratio",
        "CPU/order", "CPU/no-op",
    )  # fmt: skip
    for column in columns:
        table.add_column(column, justify="right")
    for clients, trades, noop in rows:
        ratio = trades.rate / noop.rate if noop.rate else 0.0
        table.add_row(
            str(clients),
            f"{trades.rate:,.0f}",
            f"{trades.percentile(0.50) * 1e3:.1f}",
            f"{trades.percentile(0.99) * 1e3:.1f}",
            f"{noop.rate:,.0f}",
            f"{noop.percentile(0.50) * 1e3:.1f}",
            f"{noop.percentile(0.99) * 1e3:.1f}",
            f"{ratio:.2f}",
            _ms(trades.ms_per_call(GATEWAY_PART)),
            _ms(noop.ms_per_call(GATEWAY_PART)),
        )
    console.print(table)
    console.print(cpu_table(rows))
    by_clients = {clients: (trades, noop) for clients, trades, noop in rows}
    if 8 in by_clients:
        trades, noop = by_clients[8]
        half = trades.rate >= noop.rate / 2
        fast = trades.percentile(0.99) < 0.020
        console.print(
            f"goals, 8 clients: orders/s >= no-op/s / 2: {'met' if half else 'NOT met'}; "
            f"p99 < 20 ms: {'met' if fast else 'NOT met'}"
        )


if __name__ == "__main__":
    main()
