"""Health endpoints reflect real checks (503 when one fails), and gRPC health flips."""

from __future__ import annotations

import asyncio
import json
import logging

import aiohttp
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shared.health import (
    NOT_SERVING,
    SERVING,
    GrpcHealth,
    HealthRegistry,
    HealthServer,
    HealthService,
    freshness_check,
    kafka_check,
)


async def _get(port: int, path: str) -> tuple[int, str]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}{path}") as response,
    ):
        return response.status, await response.text()


async def test_healthz_is_503_until_every_check_passes(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    state = {"ok": False}
    registry = HealthRegistry(timeout_s=0.5)
    server = HealthServer(registry, port=0, host="127.0.0.1", service="t")
    port = await server.start()
    try:
        status, body = await _get(port, "/healthz")
        assert status == 503 and "no health checks registered" in body

        registry.register("dep", lambda: True if state["ok"] else "dependency down")
        registry.register("async", _async_ok)
        status, body = await _get(port, "/healthz")
        assert status == 503
        assert json.loads(body)["checks"]["dep"] == {
            "ok": False, "detail": "dependency down", "ms": json.loads(body)["checks"]["dep"]["ms"]
        }  # fmt: skip

        state["ok"] = True
        status, body = await _get(port, "/healthz")
        assert status == 200 and json.loads(body)["status"] == "ok"
        await _get(port, "/healthz")  # no change: nothing more logged
        changes = [r.smartlev_fields for r in caplog.records if r.msg == "health_changed"]
        assert changes == [
            {"healthy": False, "failing": {"registry": "no health checks registered"}},
            {"healthy": False, "failing": {"dep": "dependency down"}},
            {"healthy": True, "failing": {}},
        ]

        status, body = await _get(port, "/metrics")
        assert status == 200 and "python_info" in body
    finally:
        await server.stop()


async def _async_ok() -> None:
    return None


def _boom() -> bool:
    raise ZeroDivisionError("division by zero")


async def test_a_raising_or_unreachable_check_fails() -> None:
    registry = HealthRegistry(timeout_s=1.0)
    registry.register("boom", _boom)
    registry.register("kafka", kafka_check("127.0.0.1:1", timeout_s=0.3))
    registry.register("fresh", freshness_check(lambda: None, max_age_s=5, what="tick"))
    ok, outcomes = await registry.run()
    assert not ok
    details = {o.name: o.detail for o in outcomes}
    assert "ZeroDivisionError" in details["boom"]
    assert details["kafka"].startswith("kafka unreachable")
    assert details["fresh"] == "no tick yet"
    with pytest.raises(ValueError, match="already registered"):
        registry.register("boom", lambda: True)


async def test_grpc_health_starts_not_serving_and_flips() -> None:
    server = grpc.aio.server()
    health = await GrpcHealth.install(server, ["smartlev.v1.Gateway"])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)

            async def status(name: str) -> int:
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=name))
                return int(reply.status)

            assert await status("") == health_pb2.HealthCheckResponse.NOT_SERVING
            assert await status("smartlev.v1.Gateway") == health_pb2.HealthCheckResponse.NOT_SERVING
            await health.set_serving(True)
            assert await status("smartlev.v1.Gateway") == health_pb2.HealthCheckResponse.SERVING
            await health.shutdown()
            assert await status("") == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        await server.stop(None)


class _StuckWrite:
    """A Watch client that never reads: its first write never completes."""

    async def write(self, message: object) -> None:
        await asyncio.Event().wait()


class _Reader:
    def __init__(self) -> None:
        self.seen: list[int] = []

    async def write(self, message: health_pb2.HealthCheckResponse) -> None:
        self.seen.append(message.status)


async def test_a_watcher_that_never_reads_holds_up_no_status_change() -> None:
    """The stock aio servicer wrote each Watch update holding the lock `set` needs: a
    client advertising an HTTP/2 window of 0 (no API key needed) froze the service's
    health as it was, and its shutdown waited on it for good."""
    service = HealthService()
    await service.set("", SERVING)
    request = health_pb2.HealthCheckRequest(service="")
    stuck = asyncio.create_task(service.Watch(request, _StuckWrite()))  # type: ignore[arg-type]
    reader = _Reader()
    watching = asyncio.create_task(service.Watch(request, reader))  # type: ignore[arg-type]
    await asyncio.sleep(0.05)  # both wrote SERVING; the stuck one is in its write
    await asyncio.wait_for(service.set("", NOT_SERVING), 1)
    await asyncio.sleep(0.05)
    await asyncio.wait_for(service.set("", SERVING), 1)
    await asyncio.sleep(0.05)
    await asyncio.wait_for(service.enter_graceful_shutdown(), 1)
    await asyncio.sleep(0.05)
    assert reader.seen == [SERVING, NOT_SERVING, SERVING, NOT_SERVING]
    await service.set("", SERVING)  # shut down: for good
    await asyncio.sleep(0.05)
    assert reader.seen[-1] == NOT_SERVING
    for task in (stuck, watching):
        task.cancel()
    await asyncio.gather(stuck, watching, return_exceptions=True)
