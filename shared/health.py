"""Health and metrics for every service.

(a) HTTP: `HealthServer` serves `/metrics` (Prometheus text format) and `/healthz`.
    `/healthz` runs the checks the service registered (Kafka reachable, Redis PING,
    "consumer made progress in the last N s", ...) and answers 200 only when all pass,
    503 otherwise, with a JSON body naming each check and why it failed. It is never a
    constant "OK".

        health = HealthRegistry()
        health.register("kafka", kafka_check(settings.kafka_bootstrap))
        health.register("redis", redis_check(redis_client))
        health.register("consumer", freshness_check(lambda: tracker.last_seen, max_age_s=60))
        server = HealthServer(health, port=settings.metrics_port, host=settings.metrics_host)
        await server.start(); ...; await server.stop()

(b) gRPC: `await GrpcHealth.install(server, service_names)` adds the standard grpc.health.v1
    servicer and reflection to a grpc.aio server; the service calls
    `await health.set_serving(True/False)` as its dependencies come and go (starts
    NOT_SERVING), and `await health.shutdown()` when it stops.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import struct
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import grpc
from aiohttp import web
from grpc_health.v1 import health as grpc_health
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Gauge,
    generate_latest,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from shared.logging import get_logger
from shared.serving import register

log = get_logger("health")

# A check passes by returning None/True; it fails by returning False or a string (the
# reason) or by raising. Sync or async.
CheckResult = bool | str | None
Check = Callable[[], CheckResult | Awaitable[CheckResult]]


@dataclass(frozen=True, slots=True)
class CheckOutcome:
    name: str
    ok: bool
    detail: str
    seconds: float


class HealthRegistry:
    """Named checks a service registers; `run()` evaluates them all concurrently."""

    def __init__(self, timeout_s: float = 2.0) -> None:
        self.timeout_s = timeout_s
        self._checks: dict[str, Check] = {}

    def register(self, name: str, check: Check) -> None:
        if name in self._checks:
            raise ValueError(f"health check {name!r} already registered")
        self._checks[name] = check

    def unregister(self, name: str) -> None:
        self._checks.pop(name, None)

    @property
    def names(self) -> list[str]:
        return sorted(self._checks)

    async def _run_one(self, name: str, check: Check) -> CheckOutcome:
        start = time.perf_counter()
        try:
            result = check()
            if inspect.isawaitable(result):
                result = await asyncio.wait_for(result, self.timeout_s)
        except TimeoutError:
            return CheckOutcome(name, False, f"timed out after {self.timeout_s}s", 0.0)
        except Exception as exc:
            detail = f"{type(exc).__name__}: {exc}"
            return CheckOutcome(name, False, detail, time.perf_counter() - start)
        elapsed = time.perf_counter() - start
        if result is None or result is True:
            return CheckOutcome(name, True, "ok", elapsed)
        if result is False:
            return CheckOutcome(name, False, "failed", elapsed)
        return CheckOutcome(name, False, str(result), elapsed)

    async def run(self) -> tuple[bool, list[CheckOutcome]]:
        """(all passed, outcomes). No checks registered counts as unhealthy."""
        if not self._checks:
            return False, [CheckOutcome("registry", False, "no health checks registered", 0.0)]
        outcomes = await asyncio.gather(
            *(self._run_one(name, check) for name, check in sorted(self._checks.items()))
        )
        return all(o.ok for o in outcomes), list(outcomes)


# --------------------------------------------------------------------------- checks


def _kafka_api_versions_request(correlation_id: int) -> bytes:
    client_id = b"smartlev-health"
    # RequestHeader v1: api_key=18 (ApiVersions), api_version=0, correlation id, client id.
    body = struct.pack(">hhih", 18, 0, correlation_id, len(client_id)) + client_id
    return struct.pack(">i", len(body)) + body


def kafka_check(bootstrap: str, timeout_s: float = 1.5) -> Check:
    """Kafka answers an ApiVersions request on some bootstrap host (not just TCP open)."""
    hosts = [h.strip() for h in bootstrap.split(",") if h.strip()]

    async def probe(host: str) -> None:
        name, _, port = host.rpartition(":")
        reader, writer = await asyncio.wait_for(asyncio.open_connection(name, int(port)), timeout_s)
        try:
            writer.write(_kafka_api_versions_request(7))
            await writer.drain()
            size = struct.unpack(">i", await asyncio.wait_for(reader.readexactly(4), timeout_s))
            payload = await asyncio.wait_for(reader.readexactly(size[0]), timeout_s)
            correlation_id, error_code = struct.unpack(">ih", payload[:6])
            if correlation_id != 7 or error_code != 0:
                raise ConnectionError(f"{host}: ApiVersions error_code={error_code}")
        finally:
            writer.close()

    async def check() -> CheckResult:
        errors = []
        for host in hosts:
            try:
                await probe(host)
                return True
            except (OSError, TimeoutError, asyncio.IncompleteReadError, struct.error) as exc:
                errors.append(f"{host}: {type(exc).__name__} {exc}".strip())
        return "kafka unreachable: " + "; ".join(errors)

    return check


# Redis refuses writes at its maxmemory (noeviction, scripts/redis/redis.conf). From this
# share of it on, each service logs a warning (once per crossing) while there is room to
# act; the check fails only once Redis is full: failing earlier turned services unhealthy
# (the gateway NOT_SERVING, `up` refusing to start them) while writes still went through.
REDIS_MEMORY_WARN = 0.9
REDIS_MEMORY = Gauge(
    "smartlev_redis_memory_ratio",
    "Redis's used_memory over its maxmemory at the last health check (0: no maxmemory)",
)


def redis_check(client: Any) -> Check:
    """Redis answers PING and is not full (its memory under its `maxmemory`, if it has
    one; `client` is a redis.asyncio.Redis or a sync redis.Redis). A pooled connection
    the server closed (a Redis restart, CLIENT KILL) fails its first command only: PING
    is tried once more, on a fresh connection, before Redis is called down (every service
    read unhealthy for a probe after each Redis restart). A user not allowed INFO (an ACL
    without @dangerous) is checked by PING alone."""
    near_full = False

    async def call(method: Callable[[], Any]) -> Any:
        result = method()
        return await result if inspect.isawaitable(result) else result

    async def ping() -> CheckResult:
        return True if await call(client.ping) else "redis PING returned false"

    async def room() -> CheckResult:
        nonlocal near_full
        try:
            memory = await call(lambda: client.info("memory"))
        except ResponseError:  # NoPermissionError: room unknown to this user
            return True
        used, limit = int(memory["used_memory"]), int(memory["maxmemory"])
        ratio = used / limit if limit else 0.0
        REDIS_MEMORY.set(ratio)
        what = f"redis memory {used / 2**20:,.1f} MiB is {ratio:.0%} of its maxmemory"
        if (ratio >= REDIS_MEMORY_WARN) != near_full:
            near_full = not near_full
            if near_full:
                log.warning("redis_memory_high", detail=f"{what}: raise it or free memory")
            else:
                log.info("redis_memory_ok", detail=what)
        if limit and used >= limit:
            return f"{what}: it refuses every write (services wait); raise it or free memory"
        return True

    async def check() -> CheckResult:
        try:
            answered = await ping()
        except RedisConnectionError:
            answered = await ping()
        return await room() if answered is True else answered

    return check


def freshness_check(
    last_seen: Callable[[], float | None], max_age_s: float, what: str = "progress"
) -> Check:
    """Fails when `last_seen()` (a time.monotonic() value) is None or older than max_age_s."""

    def check() -> CheckResult:
        seen = last_seen()
        if seen is None:
            return f"no {what} yet"
        age = time.monotonic() - seen
        return True if age <= max_age_s else f"last {what} {age:.1f}s ago (max {max_age_s}s)"

    return check


def stalled_check(
    last_progress: Callable[[], float | None],
    backlog_mark: Callable[[], Awaitable[tuple[object, int]]],
    max_age_s: float,
    in_hand_since: Callable[[], float | None] = lambda: None,
) -> Check:
    """Fails only when input is waiting and nothing was handled for max_age_s.

    An idle stage is healthy however long the market is quiet; a stuck one is not.
    `backlog_mark()` is what input the stage has (its assigned partitions) and a number
    that grows with new input to them (e.g. their high-water marks summed): when it
    moved since the last progress and the last progress is older than max_age_s, the
    stage is stuck. A new assignment starts a new baseline: one taken before the
    partitions were assigned (0) read their whole history as input waiting, and a
    caught-up stage idle for max_age_s as stuck.

    Input already on the topic when the stage got stuck never moves the mark, so a batch
    handed to the stage (`in_hand_since()`, its monotonic start) and not finished, with
    nothing handled for max_age_s, is stuck too, whatever arrives.
    """
    seen: dict[str, object] = {"progress": None, "mark": None, "input": None, "at": 0.0}

    async def check() -> CheckResult:
        progress = last_progress()
        held = in_hand_since()
        if held is not None:
            since = time.monotonic() - max(held, progress if progress is not None else held)
            if since > max_age_s:
                return f"a batch in hand, none of it handled for {since:.0f}s"
        inputs, mark = await backlog_mark()
        if seen["progress"] != progress or seen["mark"] is None or seen["input"] != inputs:
            # the backlog as of this progress, of this input, and since when
            seen["progress"], seen["mark"], seen["input"] = progress, mark, inputs
            seen["at"] = time.monotonic()
            return True
        baseline, at = seen["mark"], seen["at"]
        assert isinstance(baseline, int) and isinstance(at, float)
        since = time.monotonic() - (progress if progress is not None else at)
        if mark > baseline and since > max_age_s:
            return f"{mark - baseline} new input message(s) waiting, none handled for {since:.0f}s"
        return True

    return check


# --------------------------------------------------------------------------- HTTP


class HealthServer:
    """aiohttp server with /healthz (200/503 + JSON) and /metrics (Prometheus)."""

    def __init__(
        self,
        health: HealthRegistry,
        *,
        port: int,
        host: str,
        service: str = "smartlev",
        registry: CollectorRegistry = REGISTRY,
    ) -> None:
        self.health = health
        self.host = host
        self.port = port
        self.service = service
        self.registry = registry
        self._runner: web.AppRunner | None = None
        self._failing: tuple[str, ...] | None = None  # the checks that failed last time

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/metrics", self._metrics)
        return app

    async def _healthz(self, request: web.Request) -> web.Response:
        """The checks' outcomes; a change of which checks fail is logged with their
        details, so a service found unhealthy can say afterwards why it was."""
        ok, outcomes = await self.health.run()
        failing = {o.name: o.detail for o in outcomes if not o.ok}
        if tuple(failing) != self._failing:
            (log.info if ok else log.warning)("health_changed", healthy=ok, failing=failing)
            self._failing = tuple(failing)
        body = {
            "service": self.service,
            "status": "ok" if ok else "unhealthy",
            "checks": {
                o.name: {"ok": o.ok, "detail": o.detail, "ms": round(o.seconds * 1000, 1)}
                for o in outcomes
            },
        }
        return web.Response(
            text=json.dumps(body), status=200 if ok else 503, content_type="application/json"
        )

    async def _metrics(self, request: web.Request) -> web.Response:
        data = generate_latest(self.registry)
        return web.Response(body=data, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def start(self) -> int:
        """Start serving; returns the bound port (useful with port=0)."""
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        server = getattr(site, "_server", None)
        sockets = getattr(server, "sockets", None) or []
        if sockets:
            self.port = sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


# --------------------------------------------------------------------------- gRPC

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


class HealthService(health_pb2_grpc.HealthServicer):
    """grpc.health.v1 (Check and Watch) whose watchers never hold up a status change.
    The stock aio servicer writes each Watch update while holding the lock `set` needs:
    a client that never reads (an HTTP/2 window of 0; no API key needed) held it for
    good, so the service's health froze as it was and its shutdown hung on it."""

    def __init__(self) -> None:
        self._status: dict[str, health_pb2.HealthCheckResponse.ServingStatus] = {}
        self._changed = asyncio.Condition()
        self._shutting_down = False

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> health_pb2.HealthCheckResponse:
        status = self._status.get(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> None:
        """Each status the service is in as it changes (a watcher that reads slowly sees
        the latest, not every one); its writes wait for the client alone."""
        shown = None
        while True:
            async with self._changed:  # held only to wait, never across a write
                while (status := self._status.get(request.service, SERVICE_UNKNOWN)) == shown:
                    await self._changed.wait()
            shown = status
            await context.write(health_pb2.HealthCheckResponse(status=shown))

    async def List(
        self, request: health_pb2.HealthListRequest, context: grpc.aio.ServicerContext
    ) -> health_pb2.HealthListResponse:
        """Every service's status (the base class answered UNIMPLEMENTED, logging a
        traceback for each call)."""
        return health_pb2.HealthListResponse(
            statuses={
                name: health_pb2.HealthCheckResponse(status=status)
                for name, status in self._status.items()
            }
        )

    async def set(self, service: str, status: health_pb2.HealthCheckResponse.ServingStatus) -> None:
        if self._shutting_down:
            return
        async with self._changed:
            self._status[service] = status
            self._changed.notify_all()

    async def enter_graceful_shutdown(self) -> None:
        """Every service NOT_SERVING, for good."""
        async with self._changed:
            self._shutting_down = True
            self._status = dict.fromkeys(self._status, NOT_SERVING)
            self._changed.notify_all()


class GrpcHealth:
    """Standard grpc.health.v1 + reflection on a grpc.aio server, with a serving switch."""

    def __init__(self, servicer: HealthService, service_names: list[str]):
        self.servicer = servicer
        self.service_names = service_names

    @classmethod
    async def install(cls, server: grpc.aio.Server, service_names: Iterable[str]) -> GrpcHealth:
        """Add health + reflection for `service_names` (full names, e.g.
        "smartlev.v1.Gateway"). Every name, and the overall "" entry, starts NOT_SERVING
        until the service calls `set_serving(True)`."""
        names = list(service_names)
        servicer = HealthService()
        register(health_pb2_grpc.add_HealthServicer_to_server, servicer, server)
        reflected = [*names, grpc_health.SERVICE_NAME, reflection.SERVICE_NAME]
        register(
            reflection_pb2_grpc.add_ServerReflectionServicer_to_server,
            reflection.aio.ReflectionServicer(reflected),
            server,
        )
        health = cls(servicer, names)
        await health.set_serving(False)  # a fresh server is not, yet
        return health

    async def set_serving(self, serving: bool) -> None:
        status = SERVING if serving else NOT_SERVING
        for name in [grpc_health.OVERALL_HEALTH, *self.service_names]:
            await self.servicer.set(name, status)

    async def shutdown(self) -> None:
        """Permanently NOT_SERVING (call before server.stop(grace))."""
        await self.servicer.enter_graceful_shutdown()

    async def follow(self, checks: HealthRegistry, interval_s: float, service: str) -> None:
        """Until cancelled: SERVING exactly while `checks` pass, as /healthz says (the
        venue's gRPC health pinged Redis on its own: SERVING with Redis full and every
        call refused, NOT_SERVING for an interval after one dropped connection)."""
        serving: bool | None = None
        while True:
            ok, outcomes = await checks.run()
            if ok != serving:
                await self.set_serving(ok)
                failed = {o.name: o.detail for o in outcomes if not o.ok}
                log.info(f"{service}_health", serving=ok, failed=failed)
                serving = ok
            await asyncio.sleep(interval_s)
