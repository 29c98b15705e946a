"""Every gRPC method of the gateway and the venue, fuzzed through a real channel.

Hypothesis builds requests from each method's request descriptor (so a new field is
fuzzed without touching this file): strings from a pool of hostile ones (huge, empty,
NaN, exponents, negative, extreme, unicode, ids of the right shape), integers over their
whole wire range, enums including unknown values, nested messages likewise. The servers
run as subprocesses of a namespaced pipeline that has real NAVs (deposits and a day of
BTC), so valid-looking orders reach the deep paths, not just the validators.

For every call: the reply is OK or a proper status (never UNKNOWN or INTERNAL, never a
hang); a rejected call changes nothing (the namespace's Redis keys and the order topic
are the same before and after); and after the run both servers still answer
grpc.health.v1 and no process died.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
import redis
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kafka import KafkaConsumer, TopicPartition
from smartlev.v1 import gateway_pb2, venue_pb2

from services.gateway.config import GatewaySettings
from services.ingestion.store import state_key
from shared.core.config import StrategyConfig
from shared.core.products import SIDES, product_id
from shared.pipeline_runner import GATEWAY, STAGES, Pipeline
from shared.topics import ORDERS_EVENTS
from tests.integration.pipeline import (
    CAPITAL,
    PRODUCTS,
    SYMBOL,
    Slice,
    collect,
    ns,
    require_services,
)

pytestmark = pytest.mark.integration

WINDOW = Slice("2021-05-12", "2021-05-13")
EXAMPLES = int(os.environ.get("SMARTLEV_FUZZ_EXAMPLES", "30"))  # per method (make chaos: more)
ALICE = (("authorization", "Bearer dev-alice-key"),)
BAD_STATUSES = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}

HOSTILE = st.sampled_from(
    [
        "", " ", "NaN", "-NaN", "sNaN", "Infinity", "-Infinity", "inf", "1e999999999",
        "-1e-999999999", "1E+3", "0e0", "-0", "0", "-1", "1", "0.1", "25000", "-25000",
        "0.000000001", "99999999999999999999999999999999999", "1_000", "0x10", " 5", "5 ",
        "١٢٣", "\x00", "💥", "BTC-USDT", "BTC-USDT:LONG", "BTC-USDT:SHORT", "BTC-USDT:UP",
        "ETH-USDT", "btc-usdt", "a" * 65, "0" * 32, "f" * 32, "chaos-order-1",
    ]
)  # fmt: skip
HUGE = st.sampled_from([1_000, 100_000, 1_000_000]).map(lambda n: "9" * n)
STRINGS = st.one_of(HOSTILE, HUGE, st.text(max_size=40))
RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_ENUM: (-(2**31), 2**31 - 1),  # proto3 enums are open
}


def _scalar(field: FieldDescriptor) -> st.SearchStrategy[Any]:
    if field.type == FieldDescriptor.TYPE_STRING:
        return STRINGS
    if field.type == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if field.type in RANGES:
        low, high = RANGES[field.type]
        edges = st.sampled_from([low, high, 0, 1, -1 if low < 0 else 2])
        return st.one_of(edges, st.integers(low, high))
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return messages(field.message_type)
    raise NotImplementedError(f"no strategy for {field.full_name} (type {field.type})")


def messages(descriptor: Descriptor) -> st.SearchStrategy[Message]:
    """Any message of `descriptor`'s type, every field either unset or hostile."""
    cls = GetMessageClass(descriptor)
    fields = {}
    for field in descriptor.fields:
        value: st.SearchStrategy[Any] = _scalar(field)
        if field.is_repeated:
            value = st.lists(value, max_size=4)
        fields[field.name] = st.none() | value

    def build(values: dict[str, Any]) -> Message:
        message = cls()
        for name, value in values.items():
            if value is None:
                continue
            target = getattr(message, name)
            if isinstance(value, list):
                for item in value:
                    if isinstance(item, Message):
                        target.add().CopyFrom(item)
                    else:
                        target.append(item)
            elif isinstance(value, Message):
                target.CopyFrom(value)
            else:
                setattr(message, name, value)
        return message

    return st.fixed_dictionaries(fields).map(build)


@dataclass
class Server:
    name: str
    channel: grpc.Channel
    service: str  # full name, e.g. smartlev.v1.Gateway
    metadata: tuple[tuple[str, str], ...]


@dataclass
class State:
    """What a rejected call must not change: the namespace's Redis keys and the size of
    its order topic (read by one long-lived consumer: a new one per call is slow)."""

    client: redis.Redis
    namespace: str
    orders: KafkaConsumer
    partitions: list[TopicPartition]

    def snapshot(self) -> dict[str, Any]:
        out = _redis_values(self.client, self.namespace)
        out["<orders.events>"] = self.orders.end_offsets(self.partitions)
        return out


def _redis_values(client: redis.Redis, namespace: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in client.scan_iter(match=f"{namespace}*", count=1000):
        kind = client.type(name)
        read = {
            "string": client.get,
            "hash": client.hgetall,
            "set": client.smembers,
            "list": lambda k: client.lrange(k, 0, -1),
            "zset": lambda k: client.zrange(k, 0, -1, withscores=True),
            "stream": lambda k: client.xrange(k),
        }[kind]
        out[name] = read(name)
    return out


KNOWN = {product_id(s, side) for s in StrategyConfig().instruments for side in SIDES}


def stream_to_follow(method: MethodDescriptor, request: Message) -> bool:
    """Whether the gateway should keep this stream open (the fuzz calls carry a valid
    key): a request within the size limit naming only known products. Any other must
    end with a status, not stay open as if it were valid."""
    if request.ByteSize() > GatewaySettings().max_message_bytes:
        return False
    if method.name == "StreamNav":
        return all(product in KNOWN for product in request.products)  # type: ignore[attr-defined]
    return True


def call(server: Server, method: MethodDescriptor, request: Message) -> grpc.StatusCode:
    """One call; OK or the status it failed with (a stream: read what comes in 0.5 s)."""
    path = f"/{server.service}/{method.name}"
    reply_cls = GetMessageClass(method.output_type)
    kwargs = {"request_serializer": type(request).SerializeToString}
    kwargs["response_deserializer"] = reply_cls.FromString
    stays_open = method.server_streaming and stream_to_follow(method, request)
    try:
        if method.server_streaming:
            stream = server.channel.unary_stream(path, **kwargs)(
                request, metadata=server.metadata, timeout=0.5 if stays_open else 10
            )
            for _ in stream:
                pass
        else:
            server.channel.unary_unary(path, **kwargs)(
                request, metadata=server.metadata, timeout=10
            )
    except grpc.RpcError as exc:
        code: grpc.StatusCode = exc.code()
        if code is grpc.StatusCode.DEADLINE_EXCEEDED and stays_open:
            return grpc.StatusCode.OK  # a live stream that was still open
        assert code not in BAD_STATUSES, f"{method.full_name}({request!r:.300}) -> {exc!r:.500}"
        assert code is not grpc.StatusCode.DEADLINE_EXCEEDED, f"{method.full_name} hung"
        return code
    return grpc.StatusCode.OK


@pytest.fixture(scope="module")
def stack(kafka_bootstrap: str, redis_url: str) -> Iterator[tuple[Pipeline, list[Server]]]:
    require_services([*STAGES, GATEWAY], ingestion=True)
    with Pipeline.start((*STAGES, GATEWAY), bootstrap=kafka_bootstrap, redis_url=redis_url) as p:
        for product in PRODUCTS:
            p.deposit(product, CAPITAL, ns(WINDOW.start))
        collect(p, lambda u: len(u) >= len(PRODUCTS), timeout_s=30)
        p.replay(WINDOW.replay_args())
        _wait_until_marked(p, redis_url)  # a "before" snapshot must not race the pipeline
        servers = [
            Server("gateway", grpc.insecure_channel(f"127.0.0.1:{p.ports['gateway.grpc']}"),
                   "smartlev.v1.Gateway", ALICE),
            Server("venue", grpc.insecure_channel(f"127.0.0.1:{p.ports['venue.grpc']}"),
                   "smartlev.v1.Venue", ()),
        ]  # fmt: skip
        try:
            yield p, servers
        finally:
            for server in servers:
                server.channel.close()


def _wait_until_marked(pipeline: Pipeline, redis_url: str, timeout_s: float = 60.0) -> None:
    """Until NAV has marked every product at the last seq ingestion published."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    ns = pipeline.namespace
    try:
        last = client.hget(state_key(ns, SYMBOL), "seq")
        assert last is not None, "ingestion published nothing"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            marked = {client.hget(f"{ns}nav:{{{p}}}", "seq") for p in PRODUCTS}
            if marked == {last}:
                return
            pipeline.check_alive()
            time.sleep(0.2)
        raise AssertionError(f"NAV did not mark seq {last} within {timeout_s:.0f}s")
    finally:
        client.close()


FUZZED: Counter[str] = Counter()
SERVICES = {
    "gateway": gateway_pb2.DESCRIPTOR.services_by_name["Gateway"],
    "venue": venue_pb2.DESCRIPTOR.services_by_name["Venue"],
}
METHODS = [(name, m) for name, svc in SERVICES.items() for m in svc.methods]


@pytest.mark.parametrize(("server_name", "method"), METHODS, ids=[m.full_name for _, m in METHODS])
def test_fuzzed_calls_answer_a_proper_status_and_rejections_change_nothing(
    stack: tuple[Pipeline, list[Server]],
    redis_client: redis.Redis,
    server_name: str,
    method: MethodDescriptor,
) -> None:
    pipeline, servers = stack
    server = next(s for s in servers if s.name == server_name)
    orders = KafkaConsumer(bootstrap_servers=pipeline.bootstrap.split(","))
    topic = pipeline.topic(ORDERS_EVENTS.name)
    parts = [TopicPartition(topic, p) for p in orders.partitions_for_topic(topic) or ()]
    state = State(redis_client, pipeline.namespace, orders, parts)

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(request=messages(method.input_type), anonymous=st.booleans())
    def fuzz(request: Message, anonymous: bool) -> None:
        who = Server(
            server.name, server.channel, server.service, () if anonymous else server.metadata
        )
        before = state.snapshot()
        code = call(who, method, request)
        FUZZED[f"{method.full_name} {code.name}"] += 1
        if code is not grpc.StatusCode.OK:
            after = state.snapshot()
            changed = sorted(
                k for k in before.keys() | after.keys() if before.get(k) != after.get(k)
            )
            assert not changed, f"rejected {method.full_name} ({code.name}) changed {changed}"

    try:
        fuzz()
    finally:
        orders.close()
    pipeline.check_alive()
    health = health_pb2_grpc.HealthStub(server.channel)
    reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    counts = {k: v for k, v in FUZZED.items() if k.startswith(method.full_name)}
    print(f"\ngrpc fuzz {method.full_name}: {sum(counts.values())} calls {counts}")


def _not_messages(method: MethodDescriptor) -> list[tuple[str, bytes]]:
    """Bytes no message of the method's request type parses from: a truncated tag, a
    field longer than what was sent, and (where field 1 is a string) bytes not UTF-8."""
    bodies = [("bad-tag", b"\xff\xff\xff\xff"), ("truncated", b"\x0a\x7f")]
    first = method.input_type.fields_by_number.get(1)
    if first is not None and first.type == FieldDescriptor.TYPE_STRING:
        bodies.append(("bad-utf8", b"\x0a\x02\xff\xfe"))
    return bodies


NOT_MESSAGES = [(n, m, body) for n, m in METHODS for _, body in _not_messages(m)]


@pytest.mark.parametrize(
    ("server_name", "method", "body"),
    NOT_MESSAGES,
    ids=[f"{m.full_name}-{why}" for _, m in METHODS for why, _ in _not_messages(m)],
)
def test_a_request_that_is_no_message_is_invalid_argument_and_changes_nothing(
    stack: tuple[Pipeline, list[Server]],
    redis_client: redis.Redis,
    server_name: str,
    method: MethodDescriptor,
    body: bytes,
) -> None:
    """Bytes that parse as no message of the method's type: gRPC answered UNKNOWN
    ("Unexpected DecodeError", its text) and logged a traceback for each, with or without
    an API key, and /metrics saw none of them."""
    pipeline, servers = stack
    server = next(s for s in servers if s.name == server_name)
    before = _redis_values(redis_client, pipeline.namespace)
    path = f"/{server.service}/{method.name}"
    raw = {"request_serializer": bytes, "response_deserializer": bytes}
    with pytest.raises(grpc.RpcError) as refused:
        if method.server_streaming:
            for _ in server.channel.unary_stream(path, **raw)(
                body, metadata=server.metadata, timeout=10
            ):
                pass
        else:
            server.channel.unary_unary(path, **raw)(body, metadata=server.metadata, timeout=10)
    error: Any = refused.value
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert "no valid message" in error.details()
    assert _redis_values(redis_client, pipeline.namespace) == before


def test_health_and_reflection_answer_without_a_traceback(
    stack: tuple[Pipeline, list[Server]],
) -> None:
    """Health and reflection are open to any caller on both services' ports: `List`
    answered UNIMPLEMENTED and logged a traceback for each call, and reflection's
    stream took bytes no message parses from as an UNKNOWN error, logged the same."""
    _, servers = stack
    bad = b"\x0a\x02\xff\xfe"  # field 1 (a string in both requests), not UTF-8
    raw = {"request_serializer": bytes, "response_deserializer": bytes}
    for server in servers:
        listed = health_pb2_grpc.HealthStub(server.channel).List(
            health_pb2.HealthListRequest(), timeout=10
        )
        assert listed.statuses[""].status == health_pb2.HealthCheckResponse.SERVING
        reflect = server.channel.stream_stream(
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", **raw
        )
        with pytest.raises(grpc.RpcError) as refused:
            for _ in reflect(iter([bad]), timeout=10):
                pass
        error: Any = refused.value
        assert error.code() is grpc.StatusCode.INVALID_ARGUMENT, error.details()
        check = server.channel.unary_unary("/grpc.health.v1.Health/Check", **raw)
        with pytest.raises(grpc.RpcError) as refused:
            check(bad, timeout=10)
        error = refused.value
        assert error.code() is grpc.StatusCode.INVALID_ARGUMENT, error.details()
