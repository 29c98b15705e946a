"""The imperative shell every gRPC service shares: connect Redis, serve until a signal."""

from __future__ import annotations

import asyncio
import inspect
import signal
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Protocol

import grpc
import uvloop
from google.protobuf.message import DecodeError
from prometheus_client import Counter, Info
from redis.asyncio import Redis
from redis.exceptions import RedisError

from shared.adapters.redis_wire import redacted
from shared.heap import freeze_heap
from shared.logging import configure_logging, get_logger
from shared.settings import ServiceSettings

# Trailing metadata on every status a service sends itself: a client tells the server's
# own UNAVAILABLE (its store down, busy) from the transport's (no connection, one lost).
SERVER_ANSWERED = (("smartlev-answered", "1"),)


class Rejected(Exception):
    """A request refused before anything changed: the status code and what is wrong."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


STRATEGY = Info(
    "smartlev_strategy_config",
    "Digest of the strategy config this process applies (SMARTLEV_STRATEGY_CONFIG): "
    "stages with different ones disagree on fees or rules.",
)


def enter(service: str, settings: ServiceSettings) -> None:
    """What every service does first: JSON logs, and say which configuration it applies."""
    configure_logging(service, settings.log_level)
    digest = settings.strategy.digest()
    STRATEGY.info({"digest": digest})
    get_logger(service).info("strategy_config", digest=digest)


UNDECODABLE = Counter(
    "smartlev_grpc_undecodable_requests_total",
    "Calls refused INVALID_ARGUMENT because their request was no valid message, by method.",
    ["method"],
)


class _Undecodable:
    """A request its method's message type could not parse, and why."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


class _Guarded:
    """The server a generated `add_<Service>Servicer_to_server` is handed by `register`:
    the method handlers it registers parse requests through `_guarded`. (A server
    interceptor did the same at ~0.04 ms of the gateway's CPU on every call.)"""

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        """Left for `add_registered_method_handlers`, which gets the same handlers as a
        dict, and registers them both ways, guarded."""

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler]
    ) -> None:
        guarded = {name: _guarded(f"/{service}/{name}", h) for name, h in handlers.items()}
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(service, guarded),)
        )
        self._server.add_registered_method_handlers(service, guarded)


def register(add: Callable[[Any, Any], None], servicer: object, server: grpc.aio.Server) -> None:
    """`add(servicer, server)` (a generated add_<Service>Servicer_to_server), each method
    refusing a request that is no valid message of its type with INVALID_ARGUMENT, saying
    why: gRPC answered UNKNOWN with its exception's text ("Unexpected DecodeError"),
    logged a traceback for each such call, anonymous ones too, and /metrics saw none."""
    add(servicer, _Guarded(server))


def _guarded(method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    parse = handler.request_deserializer

    def deserialize(data: bytes) -> object:
        try:
            return parse(data)
        except DecodeError as exc:
            return _Undecodable(str(exc))

    async def refuse_undecodable(request: object, context: grpc.aio.ServicerContext) -> None:
        """End the call INVALID_ARGUMENT if `request` did not parse (abort raises)."""
        if isinstance(request, _Undecodable):
            UNDECODABLE.labels(method).inc()
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"the request is no valid message for {method}: {request.reason}",
                trailing_metadata=SERVER_ANSWERED,
            )

    if handler.request_streaming:  # (reflection's only: both ways, an async generator)
        converse = handler.stream_stream

        async def conversation(
            requests: AsyncIterator[object], context: grpc.aio.ServicerContext
        ) -> AsyncIterator[object]:
            async def parsed() -> AsyncIterator[object]:
                async for request in requests:
                    await refuse_undecodable(request, context)
                    yield request

            async for item in converse(parsed(), context):
                yield item

        return grpc.stream_stream_rpc_method_handler(
            conversation,
            request_deserializer=deserialize,
            response_serializer=handler.response_serializer,
        )
    if not handler.response_streaming:
        answer = handler.unary_unary

        async def unary(request: object, context: grpc.aio.ServicerContext) -> object:
            await refuse_undecodable(request, context)
            return await answer(request, context)

        return grpc.unary_unary_rpc_method_handler(
            unary, request_deserializer=deserialize, response_serializer=handler.response_serializer
        )
    stream = handler.unary_stream
    if inspect.isasyncgenfunction(stream):

        async def items(
            request: object, context: grpc.aio.ServicerContext
        ) -> AsyncIterator[object]:
            await refuse_undecodable(request, context)
            async for item in stream(request, context):
                yield item

        behaviour: Callable[..., Any] = items
    else:  # writes with context.write (grpc.health.v1's Watch)

        async def writes(request: object, context: grpc.aio.ServicerContext) -> None:
            await refuse_undecodable(request, context)
            await stream(request, context)

        behaviour = writes
    return grpc.unary_stream_rpc_method_handler(
        behaviour, request_deserializer=deserialize, response_serializer=handler.response_serializer
    )


def grpc_server(options: Sequence[tuple[str, Any]] = ()) -> grpc.aio.Server:
    """A grpc.aio server that owns its port. gRPC binds with SO_REUSEPORT by default, so
    a second instance started on a taken port shares it and silently takes part of the
    connections (a second gateway did, beside the one `make up` started); this server
    fails to bind instead (`listen`)."""
    return grpc.aio.server(options=[("grpc.so_reuseport", 0), *options])


def listen(server: grpc.aio.Server, service: str, host: str, port: int) -> int:
    """Listen on host:port (port 0: any free one) and return the port, or stop saying why."""
    address = f"{host}:{port}"
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError as exc:  # grpcio raises where it used to return 0
        bound, why = 0, str(exc).partition(";")[0]
    else:
        why = "no address bound"
    if not bound:
        raise SystemExit(
            f"{service}: cannot listen on {address} ({why}): is another process on that "
            "port, or the host not this machine's?"
        )
    return bound


class Server(Protocol):
    async def start(self) -> object: ...

    async def stop(self) -> None: ...


async def serve_until_signalled(
    service: str,
    redis_url: str,
    make_server: Callable[[Redis], Server],
    *,
    freeze_heap_when_started: bool = False,
) -> None:
    """Stop with a clear message when Redis is missing; otherwise serve until SIGTERM or
    SIGINT, then stop gracefully and close Redis. The entrypoint freezes the started
    heap (shared/heap.py); a server run inside a test process does not."""
    redis = Redis.from_url(redis_url, decode_responses=True)
    try:
        await redis.ping()
    except (RedisError, OSError) as exc:
        raise SystemExit(
            f"{service}: Redis at {redacted(redis_url)} is not reachable: {exc}"
        ) from exc
    server = make_server(redis)
    log = get_logger(service)
    stop = asyncio.Event()
    starting = asyncio.current_task()
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        # A start stuck on a dependency must not make the process deaf to SIGTERM.
        if starting is not None and not started:
            starting.cancel()
        stop.set()

    started = False
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    try:
        await server.start()
    except asyncio.CancelledError:
        if starting is None or not stop.is_set():
            raise
        starting.uncancel()
        log.warning(f"{service}_stopped_while_starting")
    else:
        started = True
        if freeze_heap_when_started:
            log.info(f"{service}_heap_frozen", objects=freeze_heap())
        await stop.wait()
    finally:
        if started or stop.is_set():
            log.info(f"{service}_stopping")
            await server.stop()
            await redis.aclose()


def run(service: str, settings: ServiceSettings, make_server: Callable[[Redis], Server]) -> None:
    """A gRPC service's whole `main()`: structured logs, then serve until signalled, on
    uvloop (the gateway: ~40% more orders/s and no-op calls/s than asyncio's own loop)."""
    enter(settings.service, settings)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(
            serve_until_signalled(
                service, settings.redis_url, make_server, freeze_heap_when_started=True
            )
        )
