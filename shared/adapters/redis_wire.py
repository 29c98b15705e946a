"""One multiplexed Redis connection for hot paths: every concurrent caller shares it.

Why: redis-py's asyncio client spends ~120 us of CPU per command (pool checkout, retry
wrapper, a timeout per call, Python packing); this connection writes a command packed by
hiredis and matches replies in order (Redis answers one connection in order), ~15 us.
The commands callers send in one event-loop iteration go out in one write, so concurrent
callers pipeline by themselves. Same exceptions as redis-py (`redis.exceptions`), so
callers and `is_transient` treat both alike:

- an error reply raises to its caller only, as redis-py's class for it (`ResponseError`,
  `NoScriptError` for NOSCRIPT, `BusyLoadingError` while a restarted Redis loads its data);
- a lost connection fails every command in flight (their outcome is unknown) and the next
  command reconnects; a failed command is sent again on the fresh connection `retries`
  times (1, as redis-py), then raises `ConnectionError`: callers send idempotent steps;
- a reply overdue by `timeout_s` closes the connection the same way (`TimeoutError`).

    wire = RedisWire.from_url("redis://127.0.0.1:6379/0")
    await wire.call("HGET", "k", "f")
    await wire.pipeline([("HGET", "k", "f"), ("HGETALL", "h")])
    settle = wire.script(LUA); await settle(keys=[...], args=[...])
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import deque
from collections.abc import Sequence
from typing import Any, cast
from urllib.parse import parse_qs, unquote, urlsplit, urlunsplit

import hiredis
from redis._parsers.base import BaseParser
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import DataError, NoScriptError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

Arg = str | int | bytes
Command = tuple[Arg, ...]


def redacted(url: str) -> str:
    """A Redis URL as an error message or a log line shows it: its password `***`
    (the gateway and the venue printed it whole when Redis was not reachable)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


class _Batch:
    """The commands of one `send`: their replies, and one future for all of them."""

    __slots__ = ("count", "future", "replies", "sent_at")

    def __init__(self, future: asyncio.Future[list[Any]], count: int, sent_at: float) -> None:
        self.future = future
        self.count = count
        self.replies: list[Any] = []
        self.sent_at = sent_at


class UndecodableReply(DataError):
    """A reply holding text that is not UTF-8 (a stored value no writer of ours made):
    its command's error alone, and no retry reads other bytes."""


class _Protocol(asyncio.Protocol):
    """Replies fill the oldest waiting batch; a batch whose caller was cancelled
    meanwhile still takes its replies, unseen."""

    def __init__(self) -> None:
        # Python 3.11's get_running_loop() is a getpid() syscall each time: asked once.
        self.loop = asyncio.get_running_loop()
        self.reader = hiredis.Reader(encoding="utf-8", replyError=ResponseError)
        self.waiting: deque[_Batch] = deque()
        self.transport: asyncio.Transport | None = None
        self.lost: Exception | None = None
        self.unsent: list[bytes] = []  # commands of this loop iteration, written together

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while True:
            try:
                reply = self.reader.gets()
            except hiredis.ProtocolError as exc:
                self.fail(RedisConnectionError(f"Redis protocol error: {exc}"))
                return
            except UnicodeDecodeError as exc:
                # a stored value that is no UTF-8: hiredis has read the whole reply, so
                # it is this command's error alone (it took the connection, and every
                # caller on it, down with a "transient" ConnectionError, again and again)
                reply = UndecodableReply(f"Redis replied with text that is not UTF-8: {exc}")
            if reply is False:
                return
            batch = self.waiting[0]
            if isinstance(reply, ResponseError):
                # redis-py's class for the reply: LOADING (a restarted Redis reading its
                # data back) is BusyLoadingError, a ConnectionError, so it is transient
                reply = BaseParser.parse_error(str(reply))
            batch.replies.append(reply)
            if len(batch.replies) == batch.count:
                self.waiting.popleft()
                if not batch.future.done():
                    batch.future.set_result(batch.replies)

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(exc or RedisConnectionError("Redis closed the connection"))

    def fail(self, exc: Exception) -> None:
        if self.lost is None:
            self.lost = (
                exc
                if isinstance(exc, RedisError)
                else RedisConnectionError(f"Redis connection lost: {exc}")
            )
        self.unsent.clear()
        while self.waiting:
            future = self.waiting.popleft().future
            if not future.done():
                future.set_exception(self.lost)
        if self.transport is not None:
            self.transport.abort()

    def send(self, packed: bytes, count: int) -> asyncio.Future[list[Any]]:
        """The future of the `count` commands' replies, in order (error replies as
        exceptions in their place)."""
        assert self.transport is not None
        future: asyncio.Future[list[Any]] = self.loop.create_future()
        self.waiting.append(_Batch(future, count, time.monotonic()))
        if not self.unsent:
            self.loop.call_soon(self.flush)
        self.unsent.append(packed)
        return future

    def flush(self) -> None:
        """One write (one syscall) for every command sent since the last flush."""
        if self.unsent and self.transport is not None and self.lost is None:
            self.transport.write(b"".join(self.unsent))
        self.unsent.clear()


class RedisWire:
    def __init__(
        self,
        host: str,
        port: int,
        *,
        db: int = 0,
        password: str | None = None,
        username: str | None = None,
        timeout_s: float = 10.0,
        retries: int = 1,
        socket_path: str | None = None,
    ) -> None:
        """`socket_path`: Redis's unix socket, used instead of host:port (a `unix://`
        URL, which the services' settings accept and redis-py reads)."""
        self.host, self.port, self.db = host, port, db
        self.socket_path = socket_path
        self.password, self.username = password, username
        self.timeout_s = timeout_s
        self.retries = retries
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Lock | None = None
        self._watchdog: asyncio.TimerHandle | None = None

    @classmethod
    def from_url(cls, url: str, *, timeout_s: float = 10.0, retries: int = 1) -> RedisWire:
        """redis://[[user]:password@]host[:port][/db] or, as redis-py reads it,
        unix://[[user]:password@]/path/to/redis.sock[?db=N]"""
        parts = urlsplit(url)
        in_query = parse_qs(parts.query).get("db", [""])[0]  # redis-py: the query wins
        if parts.scheme == "unix" and parts.path:
            db = in_query
            host, port, socket_path = "localhost", 0, unquote(parts.path)
        elif parts.scheme == "redis" and parts.hostname:
            db = in_query or parts.path.lstrip("/")
            host, port, socket_path = parts.hostname, parts.port or 6379, None
        else:
            raise ValueError(
                f"unsupported Redis URL {url!r} (want redis://host:port/db or "
                "unix:///path/to/redis.sock?db=N)"
            )
        if db and not db.isdigit():
            raise ValueError(f"Redis URL {url!r}: db {db!r} is not a number")
        return cls(
            host,
            port,
            db=int(db) if db else 0,
            password=unquote(parts.password) if parts.password else None,
            username=unquote(parts.username) if parts.username else None,
            timeout_s=timeout_s,
            retries=retries,
            socket_path=socket_path,
        )

    @property
    def address(self) -> str:
        return self.socket_path or f"{self.host}:{self.port}"

    async def _connected(self) -> _Protocol:
        protocol = self._protocol
        if protocol is not None and protocol.lost is None:
            return protocol
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            protocol = self._protocol
            if protocol is not None and protocol.lost is None:
                return protocol
            loop = asyncio.get_running_loop()
            connect = (
                loop.create_unix_connection(_Protocol, self.socket_path)
                if self.socket_path
                else loop.create_connection(_Protocol, self.host, self.port)
            )
            try:
                _, fresh = await asyncio.wait_for(connect, self.timeout_s)
            except (OSError, TimeoutError) as exc:
                raise RedisConnectionError(
                    f"cannot connect to Redis at {self.address}: {exc}"
                ) from exc
            hello: list[Command] = []
            if self.password is not None:
                auth = (self.username, self.password) if self.username else (self.password,)
                hello.append(("AUTH", *auth))
            if self.db:
                hello.append(("SELECT", self.db))
            if hello:
                await self._hello(fresh, hello)
            self._protocol = fresh
            return fresh

    async def _hello(self, fresh: _Protocol, hello: list[Command]) -> None:
        """AUTH/SELECT on a fresh connection, within `timeout_s` (the watchdog watches the
        connection in use only: a server that accepts and never answers held every caller
        on the lock); a connection that failed them is closed, not left open."""
        try:
            await asyncio.wait_for(self._send(fresh, hello), self.timeout_s)
        except BaseException as exc:
            fresh.fail(RedisConnectionError("the connection's AUTH/SELECT failed"))
            if isinstance(exc, TimeoutError):
                raise RedisTimeoutError(
                    f"no reply from Redis to AUTH/SELECT in {self.timeout_s:.1f}s"
                ) from None
            raise

    async def _send(self, protocol: _Protocol, commands: Sequence[Command]) -> list[Any]:
        # hiredis' stub types the argument as a 1-tuple; it takes any length.
        packed = b"".join(map(hiredis.pack_command, commands))  # type: ignore[arg-type]
        batch = protocol.send(packed, len(commands))
        if self._watchdog is None:
            self._arm_watchdog()
        # Cancelled meanwhile, the batch still takes its replies when they arrive (the
        # protocol skips a done future).
        replies = await batch
        for reply in replies:
            if isinstance(reply, RedisError):
                raise reply  # the first error; every reply was taken
        return replies

    def _arm_watchdog(self) -> None:
        loop = asyncio.get_running_loop()
        self._watchdog = loop.call_later(self.timeout_s / 4, self._check_overdue)

    def _check_overdue(self) -> None:
        """Fail the connection if its oldest command waited longer than `timeout_s`."""
        self._watchdog = None
        protocol = self._protocol
        if protocol is None or not protocol.waiting:
            return
        age = time.monotonic() - protocol.waiting[0].sent_at
        if age > self.timeout_s:
            protocol.fail(RedisTimeoutError(f"no reply from Redis in {age:.1f}s"))
        else:
            self._arm_watchdog()

    async def call(self, *command: Arg) -> Any:
        return (await self._run([command]))[0]

    async def pipeline(self, commands: Sequence[Command]) -> list[Any]:
        """Send all in one write; the replies in order (the first error raises)."""
        return await self._run(commands) if commands else []

    async def _run(self, commands: Sequence[Command]) -> list[Any]:
        """Commands lost with their connection are sent again on a fresh one, `retries`
        times (redis-py's default does the same): callers send idempotent steps only."""
        failed = 0
        while True:
            protocol = self._protocol
            if protocol is None or protocol.lost is not None:
                protocol = await self._connected()
            try:
                return await self._send(protocol, commands)
            except (RedisConnectionError, RedisTimeoutError):
                failed += 1
                if failed > self.retries:
                    raise

    def script(self, source: str) -> Script:
        return Script(self, source)

    async def aclose(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if self._protocol is not None:
            self._protocol.fail(RedisConnectionError("closed by the client"))
            self._protocol = None


class Script:
    """A Lua script run by its sha (EVALSHA), loaded by EVAL when the server lacks it."""

    def __init__(self, wire: RedisWire, source: str) -> None:
        self.wire = wire
        self.source = source
        self.sha = hashlib.sha1(source.encode("utf-8")).hexdigest()

    async def __call__(self, keys: Sequence[str], args: Sequence[Arg]) -> Any:
        try:
            return await self.wire.call("EVALSHA", self.sha, len(keys), *keys, *args)
        except NoScriptError:
            return await self.wire.call("EVAL", self.source, len(keys), *keys, *args)
