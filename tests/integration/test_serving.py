"""The shell of the gRPC services: a SIGTERM is obeyed even while the start hangs."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest
from redis.asyncio import Redis

from shared.serving import serve_until_signalled

pytestmark = pytest.mark.integration


class StuckStart:
    """A server whose start waits on a dependency that never answers."""

    def __init__(self) -> None:
        self.starting = asyncio.Event()
        self.stopped = False

    async def start(self) -> None:
        self.starting.set()
        await asyncio.Event().wait()

    async def stop(self) -> None:
        self.stopped = True


async def test_sigterm_during_a_stuck_start_stops_the_service(redis_url: str) -> None:
    server = StuckStart()

    def make(redis: Redis) -> StuckStart:
        return server

    serving = asyncio.create_task(serve_until_signalled("svc", redis_url, make))
    loop = asyncio.get_running_loop()
    try:
        await asyncio.wait_for(server.starting.wait(), 10)
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(serving, 10)  # returns: neither hangs nor raises
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    assert server.stopped
