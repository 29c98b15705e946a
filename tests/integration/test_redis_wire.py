"""shared/adapters/redis_wire.py against the real redis-server: replies reach their own
callers under concurrency, errors stay with the command that caused them, a lost or
silent connection fails what was in flight and the next command reconnects."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from functools import partial
from pathlib import Path

import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY
from redis.asyncio import Redis as AsyncRedis
from redis.exceptions import BusyLoadingError, OutOfMemoryError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from shared.adapters.redis_wire import RedisWire, UndecodableReply
from shared.health import REDIS_MEMORY_WARN, redis_check
from shared.pipeline_runner import free_port
from shared.transient import is_transient

pytestmark = pytest.mark.integration


def fresh_key() -> str:
    return f"t{uuid.uuid4().hex[:8]}.wire"


@given(
    batches=st.lists(
        st.lists(st.text(min_size=0, max_size=40), min_size=1, max_size=5), min_size=1, max_size=40
    )
)
@settings(max_examples=25, deadline=None)
def test_concurrent_callers_each_get_their_own_replies(redis_url: str, batches: list[list[str]]):
    async def scenario() -> None:
        wire = RedisWire.from_url(redis_url)
        try:

            async def one(values: list[str]) -> list[str]:
                if len(values) == 1:
                    return [await wire.call("ECHO", values[0])]
                return await wire.pipeline([("ECHO", value) for value in values])

            assert await asyncio.gather(*(one(b) for b in batches)) == batches
        finally:
            await wire.aclose()

    asyncio.run(scenario())


async def test_an_error_reply_raises_for_its_command_only(redis_url: str, redis_client):
    name = fresh_key()
    wire = RedisWire.from_url(redis_url)
    try:
        await wire.call("SET", name, "text")
        bad, good = await asyncio.gather(
            wire.call("HGET", name, "field"), wire.call("GET", name), return_exceptions=True
        )
        assert isinstance(bad, ResponseError) and "WRONGTYPE" in str(bad)
        assert good == "text"
        with pytest.raises(ResponseError, match="WRONGTYPE"):
            await wire.pipeline([("GET", name), ("HGET", name, "f"), ("SET", name, "after")])
        # The whole pipeline ran and its replies were all consumed: nothing misaligned.
        assert await wire.call("GET", name) == "after"
    finally:
        redis_client.delete(name)
        await wire.aclose()


async def test_text_that_is_not_utf8_fails_its_command_only(redis_url: str, redis_client):
    """A stored value that is no UTF-8 escaped the reply parser: the shared connection
    went down with every command on it (a "transient" ConnectionError, so a stage
    re-ran its batch for good, and unrelated orders failed UNAVAILABLE). Its command
    alone fails, with an error no retry can cure; the others are answered."""
    name, other = fresh_key(), fresh_key()
    redis_client.set(name, b"\xc3(")
    redis_client.hset(other, mapping={"a": "1", "b": b"\xff"})
    wire = RedisWire.from_url(redis_url)
    try:
        await wire.call("SET", f"{other}:ok", "fine")
        protocol = wire._protocol
        bad, good, nested = await asyncio.gather(
            wire.call("GET", name),
            wire.call("GET", f"{other}:ok"),
            wire.call("HGETALL", other),
            return_exceptions=True,
        )
        assert isinstance(bad, UndecodableReply) and "not UTF-8" in str(bad)
        assert not is_transient(bad)
        assert good == "fine"
        assert isinstance(nested, UndecodableReply)  # a whole reply, however deep the bytes
        assert wire._protocol is protocol and protocol.lost is None  # the connection stays
        assert await wire.call("GET", f"{other}:ok") == "fine"
    finally:
        redis_client.delete(name, other, f"{other}:ok")
        await wire.aclose()


async def test_script_loads_itself_when_the_server_lacks_it(redis_url: str, redis_client):
    name = fresh_key()
    wire = RedisWire.from_url(redis_url)
    source = f"-- {name}\nreturn redis.call('INCRBY', KEYS[1], ARGV[1])"
    script = wire.script(source)
    try:
        assert redis_client.script_exists(script.sha) == [False]
        assert await script(keys=[name], args=[5]) == 5
        assert redis_client.script_exists(script.sha) == [True]
        assert await script(keys=[name], args=[2]) == 7
    finally:
        redis_client.delete(name)
        await wire.aclose()


async def test_a_killed_connection_fails_in_flight_commands_and_reconnects(
    redis_url: str, redis_client: redis.Redis
):
    wire = RedisWire.from_url(redis_url, retries=0)
    try:
        first_id = await wire.call("CLIENT", "ID")
        blocked = asyncio.create_task(wire.call("BLPOP", fresh_key(), 5))
        await asyncio.sleep(0.2)
        assert redis_client.client_kill_filter(_id=first_id) == 1
        with pytest.raises(RedisConnectionError):
            await asyncio.wait_for(blocked, 2)
        assert await wire.call("PING") == "PONG"
        assert await wire.call("CLIENT", "ID") != first_id
    finally:
        await wire.aclose()


async def test_a_command_lost_with_its_connection_is_sent_again_on_a_fresh_one(
    redis_url: str, redis_client: redis.Redis
):
    wire = RedisWire.from_url(redis_url)  # retries=1
    name = fresh_key()
    try:
        first_id = await wire.call("CLIENT", "ID")
        blocked = asyncio.create_task(wire.call("BLPOP", name, 1))
        await asyncio.sleep(0.2)
        assert redis_client.client_kill_filter(_id=first_id) == 1
        await asyncio.sleep(0.2)
        redis_client.rpush(name, "after-the-kill")
        assert await asyncio.wait_for(blocked, 3) == [name, "after-the-kill"]
        assert await wire.call("CLIENT", "ID") != first_id
    finally:
        redis_client.delete(name)
        await wire.aclose()


async def test_an_overdue_reply_times_out_and_the_next_command_reconnects(redis_url: str):
    wire = RedisWire.from_url(redis_url, timeout_s=0.4, retries=0)
    try:
        began = time.monotonic()
        with pytest.raises(RedisTimeoutError):
            await wire.call("BLPOP", fresh_key(), 5)
        assert time.monotonic() - began < 2
        assert await wire.call("ECHO", "again") == "again"
    finally:
        await wire.aclose()


async def test_a_cancelled_caller_does_not_shift_the_replies_of_the_others(redis_url: str):
    wire = RedisWire.from_url(redis_url)
    try:
        slow = asyncio.create_task(wire.call("BLPOP", fresh_key(), 1))
        await asyncio.sleep(0.05)
        queued = asyncio.create_task(wire.call("ECHO", "mine"))
        await asyncio.sleep(0.05)
        slow.cancel()
        assert await asyncio.wait_for(queued, 3) == "mine"
        assert await wire.call("ECHO", "next") == "next"
    finally:
        await wire.aclose()


async def test_the_url_picks_the_database(redis_url: str):
    name = fresh_key()
    base = redis_url.rsplit("/", 1)[0]
    wire = RedisWire.from_url(f"{base}/3")
    other = redis.Redis.from_url(f"{base}/3", decode_responses=True)
    try:
        await wire.call("SET", name, "in-db-3")
        assert other.get(name) == "in-db-3"
    finally:
        other.delete(name)
        other.close()
        await wire.aclose()


async def test_an_unreachable_server_is_a_connection_error():
    wire = RedisWire.from_url(f"redis://127.0.0.1:{free_port()}/0")
    with pytest.raises(RedisConnectionError, match="cannot connect"):
        await wire.call("PING")


def redis_argv(tmp_path, *extra: str) -> tuple[list[str], int]:
    """The command line of a redis-server of the test's own (to stop, restart or count
    the clients of), and its port."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed; run `make up` (it installs it)")
    port = free_port()
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp_path)]
    return [*argv, "--save", "", "--appendonly", "no", *extra], port


def started(argv: list[str], port: int) -> tuple[subprocess.Popen[bytes], redis.Redis]:
    """The server running, and a client of it once it answers."""
    server = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
    admin = redis.Redis(port=port)
    for _ in range(200):
        with contextlib.suppress(redis.ConnectionError):
            if admin.ping():
                break
        time.sleep(0.02)
    return server, admin


async def test_a_unix_socket_url_reaches_its_redis_in_its_db(tmp_path):
    """unix:///path?db=N, as redis-py reads it: the socket, then SELECT N."""
    # A socket's path holds 107 bytes at most, less than a long TMPDIR leaves.
    short_dir = Path(tempfile.mkdtemp(prefix="wire", dir="/tmp"))
    socket_path = short_dir / "redis.sock"
    argv, port = redis_argv(tmp_path, "--unixsocket", str(socket_path))
    server, admin = started(argv, port)
    try:
        wire = RedisWire.from_url(f"unix://{socket_path}?db=3")
        try:
            assert await wire.call("SET", "k", "v") == "OK"
            value, client = await wire.pipeline([("GET", "k"), ("CLIENT", "INFO")])
            assert value == "v"
            assert f" addr={socket_path}:0 " in client  # a socket peer, not host:port
        finally:
            await wire.aclose()
        assert admin.get("k") is None  # db 0
        with redis.Redis(port=port, db=3) as db3:
            assert db3.get("k") == b"v"
    finally:
        server.kill()
        server.wait()
        shutil.rmtree(short_dir, ignore_errors=True)


async def test_a_login_that_fails_or_never_answers_closes_its_connection(tmp_path):
    """AUTH/SELECT on a fresh connection: refused, the connection is closed (it was left
    open, one per call); unanswered (the server stopped: the kernel still accepts), the
    call fails within `timeout_s` (it hung every caller on the connecting lock)."""
    argv, port = redis_argv(tmp_path)
    server, admin = started(argv, port)
    try:
        refused = RedisWire.from_url(f"redis://:wrong@127.0.0.1:{port}/0", retries=0)
        for _ in range(5):
            with pytest.raises(redis.AuthenticationError, match="AUTH"):
                await refused.call("PING")
        await asyncio.sleep(0.1)
        assert admin.info("clients")["connected_clients"] == 1  # only `admin`
        server.send_signal(signal.SIGSTOP)
        silent = RedisWire.from_url(f"redis://127.0.0.1:{port}/1", timeout_s=0.5, retries=0)
        began = time.monotonic()
        with pytest.raises(RedisTimeoutError, match="AUTH/SELECT"):
            await asyncio.wait_for(silent.call("PING"), 10)
        assert time.monotonic() - began < 3
        server.send_signal(signal.SIGCONT)
        assert await silent.call("PING") == "PONG"  # a fresh login, answered now
        await silent.aclose()
    finally:
        server.send_signal(signal.SIGCONT)
        server.terminate()
        server.wait(10)
        admin.close()


async def test_a_redis_still_loading_its_data_raises_a_transient_error(tmp_path):
    """A restarted Redis answers LOADING until its data is read back. That must be
    redis-py's BusyLoadingError, which every stage waits out (`is_transient`), not a
    plain ResponseError: the leverage stage stopped on one in a chaos run (seed 12)."""
    argv, port = redis_argv(tmp_path, "--enable-debug-command", "local")
    first, admin = started(argv, port)
    try:
        admin.execute_command("DEBUG", "POPULATE", 2_000_000)  # ~1 s to load back
        admin.save()
        admin.shutdown(nosave=True)
    except redis.ConnectionError:
        pass  # SHUTDOWN closes the connection
    first.wait(10)
    second = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
    wire = RedisWire.from_url(f"redis://127.0.0.1:{port}/0", retries=0)
    seen: list[Exception] = []
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                await wire.call("GET", "key:1")
                break  # loaded
            except BusyLoadingError as exc:
                seen.append(exc)
            except RedisConnectionError:
                pass  # not listening yet
            await asyncio.sleep(0.005)
        assert seen, "never saw Redis loading (a faster machine needs a bigger dataset)"
        assert all(is_transient(exc) for exc in seen)
        assert await wire.call("GET", "key:1") == "value:1"  # the same connection works on
    finally:
        await wire.aclose()
        second.terminate()
        second.wait(10)


async def test_a_full_redis_refuses_a_step_whole_and_says_so_before(tmp_path, caplog):
    """At its maxmemory Redis (noeviction, as configured) refuses a write: a script with
    several writes is refused before its first, the error is the OutOfMemoryError every
    stage waits out (stopping would restart into the same refusal). Health warns from
    90% of maxmemory on (a log line, the gauge) and stays healthy while writes still go
    through; once Redis refuses them it is unhealthy, and healthy again once freed. A
    user not allowed INFO is checked by PING alone."""
    argv, port = redis_argv(tmp_path, "--maxmemory", "4mb", "--maxmemory-policy", "noeviction")
    server, admin = started(argv, port)
    wire = RedisWire.from_url(f"redis://127.0.0.1:{port}/0", retries=0)
    step = wire.script("redis.call('SET', KEYS[1], ARGV[1]); redis.call('SET', KEYS[2], ARGV[1])")
    client = AsyncRedis(port=port)
    health = redis_check(client)
    admin.acl_setuser(
        "limited", enabled=True, passwords=["+pw"], keys=["*"], commands=["+@all", "-@dangerous"]
    )
    limited = AsyncRedis(port=port, username="limited", password="pw")
    ratio = partial(REGISTRY.get_sample_value, "smartlev_redis_memory_ratio")
    try:
        assert await health() is True and ratio() < REDIS_MEMORY_WARN
        limit = int(admin.info("memory")["maxmemory"])
        near_full = None
        for filler in range(10_000):  # ~200 fill 4 MB
            try:
                await wire.call("SET", f"filler:{filler}", "x" * 20_000)
            except OutOfMemoryError as exc:
                refused = exc
                break
            used = int(admin.info("memory")["used_memory"])
            if REDIS_MEMORY_WARN * limit <= used < limit and near_full is None:
                with caplog.at_level(logging.WARNING):
                    near_full = (await health(), ratio())
        else:
            pytest.fail("Redis never refused a write")
        assert near_full is not None and near_full[0] is True and near_full[1] >= REDIS_MEMORY_WARN
        assert [r.getMessage() for r in caplog.records].count("redis_memory_high") == 1
        assert is_transient(refused)
        with pytest.raises(OutOfMemoryError):
            await step(keys=["a", "b"], args=["v"])
        assert admin.exists("a", "b") == 0  # nothing of the step
        assert "refuses every write" in str(await health())
        assert await redis_check(limited)() is True  # INFO not allowed: PING alone
        admin.delete(*(f"filler:{i}" for i in range(filler)))
        assert await health() is True and ratio() < REDIS_MEMORY_WARN
        await step(keys=["a", "b"], args=["v"])
        assert admin.mget("a", "b") == [b"v", b"v"]
    finally:
        await wire.aclose()
        await client.aclose()
        await limited.aclose()
        server.terminate()
        server.wait(10)
        admin.close()
