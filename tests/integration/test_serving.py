"""The shell of the gRPC services: a SIGTERM is obeyed even while the start hangs; a
server never shares its port."""

from __future__ import annotations

import asyncio
import os
import signal

import grpc
import pytest
from redis.asyncio import Redis

from shared.serving import grpc_server, listen, serve_until_signalled

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


async def test_a_taken_port_stops_the_second_server_saying_so() -> None:
    """gRPC's default (SO_REUSEPORT) would let the second server share the port and
    take part of its connections without a word."""
    first = grpc_server()
    port = listen(first, "svc", "127.0.0.1", 0)
    await first.start()
    try:
        with pytest.raises(SystemExit) as stopped:
            listen(grpc_server(), "svc", "127.0.0.1", port)
        assert f"svc: cannot listen on 127.0.0.1:{port}" in str(stopped.value)
        with pytest.raises(SystemExit):  # nor beside a server with gRPC's default options
            listen(
                grpc_server(),
                "svc",
                "127.0.0.1",
                listen(grpc.aio.server(), "other", "127.0.0.1", 0),
            )
    finally:
        await first.stop(0)
