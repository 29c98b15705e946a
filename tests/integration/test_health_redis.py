"""The Redis health check against the real redis-server: a connection the server closed
(a restart, an idle timeout, CLIENT KILL) is not an unhealthy Redis."""

from __future__ import annotations

import pytest
import redis
from redis.asyncio import Redis

from shared.health import redis_check

pytestmark = pytest.mark.integration


async def test_a_pooled_connection_the_server_closed_is_not_an_outage(
    redis_url: str, redis_client: redis.Redis
) -> None:
    client = Redis.from_url(redis_url)
    check = redis_check(client)
    try:
        assert await check() is True
        pooled = await client.client_id()
        assert redis_client.client_kill_filter(_id=pooled) == 1  # as a restart would
        assert await check() is True  # one fresh connection later
        assert await client.client_id() != pooled
    finally:
        await client.aclose()


async def test_a_redis_that_does_not_answer_is_unhealthy() -> None:
    client = Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.5)  # nothing listens
    try:
        with pytest.raises(redis.ConnectionError):
            await redis_check(client)()
    finally:
        await client.aclose()
