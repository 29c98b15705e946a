"""Protobuf on the wire: faust codecs, kafka-python (de)serializers and exact decimals.

One payload format for every topic: the protobuf message named by the topic's
`TopicSpec.value_type` (shared/topics.py), serialized deterministically so that the same
input replays to the same bytes.

- faust: `ProtobufCodec(message_type=...)` is a `faust.serializers.codecs.Codec`; one is
  registered per message type under its full proto name (e.g. "smartlev.v1.MarketEvent"),
  so `app.topic(..., value_serializer="smartlev.v1.MarketEvent")` works; `faust_topic()`
  builds a topic straight from a `TopicSpec`.
- kafka-python: `value_serializer=serializer`, `value_deserializer=deserializer(cls)`.
  A consumer that must dead-letter bad input should read raw bytes and call
  `decode(cls, data)` itself: a raising `value_deserializer` fails inside the client.
- Decoding failure always raises `DecodeError` naming the expected type and the reason,
  which is exactly what goes into a `DeadLetter.reason`.

Money on the wire is a plain decimal string (see proto/smartlev/v1/common.proto):
`decimal_to_wire` / `decimal_from_wire` convert and refuse floats, NaN and infinities.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from faust.serializers import codecs as faust_codecs
from google.protobuf.message import DecodeError as ProtobufDecodeError
from google.protobuf.message import EncodeError as ProtobufEncodeError
from google.protobuf.message import Message
from kafka.serializer import Deserializer, Serializer
from smartlev.v1 import market_pb2, orders_pb2

from shared.core.market import FundingRate, Tick
from shared.core.text import clipped

if TYPE_CHECKING:
    import faust

    from shared.topics import TopicSpec

M = TypeVar("M", bound=Message)

# Plain decimal notation only: optional minus, digits, optional fraction. No exponent,
# no sign "+", no whitespace, no NaN/Infinity. Bounded so a hostile payload cannot ask
# for a 10^9-digit number.
# The gateway's order and position ids (services/gateway/orders.order_id): 32 lowercase
# hex digits. Orders on orders.events with other ids come from elsewhere (a pipeline's
# seed deposits), and no gateway position answers for them.
POSITION_ID = re.compile(r"[0-9a-f]{32}")
_WIRE_DECIMAL = re.compile(r"-?[0-9]{1,40}(\.[0-9]{1,40})?")
_MAX_WIRE_LEN = 82


class DecodeError(ValueError):
    """Bytes that are not a valid `expected` message; `reason` says why (for the DLQ)."""

    def __init__(self, expected: str, reason: str, payload: bytes | None = None) -> None:
        self.expected = expected
        self.reason = reason
        self.payload = payload
        size = "" if payload is None else f" ({len(payload)} bytes)"
        super().__init__(f"cannot decode {expected}{size}: {reason}")


class EncodeError(ValueError):
    """A value that must not go on the wire (wrong type, float money, NaN, ...)."""


# --------------------------------------------------------------------------- decimals


def decimal_to_wire(value: Decimal | int, *, name: str = "value") -> str:
    """Exact decimal -> wire string in plain notation ("43210.12", "0.00010000").

    Floats are refused (not exact), as are NaN and infinities.
    """
    if type(value) is Decimal:
        dec = value
    elif isinstance(value, bool) or not isinstance(value, Decimal | int):
        raise EncodeError(f"{name}: expected Decimal or int, got {type(value).__name__}")
    else:
        dec = value if isinstance(value, Decimal) else Decimal(value)
    if not dec.is_finite():
        raise EncodeError(f"{name}: {value!r} is not finite")
    # str() is plain notation unless it shows an exponent, at less than half the cost of
    # format(dec, "f"), which always is; up to 40 characters are always in range.
    text = str(dec)
    if "E" in text:
        exponent = dec.as_tuple().exponent
        if (dec and dec.adjusted() >= 40) or (isinstance(exponent, int) and exponent < -40):
            # refused before format() writes out every digit (1E+99999999999: MemoryError)
            raise EncodeError(f"{name}: {value!r} is outside the wire range (40.40 digits)")
        text = format(dec, "f")
    if len(text) > 40 and not _WIRE_DECIMAL.fullmatch(text):
        raise EncodeError(f"{name}: {value!r} is outside the wire range (40.40 digits)")
    return text


def wire_problem(value: Decimal, name: str = "value") -> str | None:
    """Why `value` cannot go on the wire (`decimal_to_wire` refuses it), or None: a
    check for input to refuse before it is published or computed with."""
    try:
        decimal_to_wire(value, name=name)
    except EncodeError as exc:
        return str(exc)
    return None


def decimal_from_wire(text: str, *, name: str = "value") -> Decimal:
    """Wire string -> exact Decimal; anything but a plain finite decimal is a DecodeError."""
    if not isinstance(text, str):
        raise DecodeError("decimal string", f"{name}: got {type(text).__name__}")
    if len(text) > _MAX_WIRE_LEN or not _WIRE_DECIMAL.fullmatch(text):
        shown = clipped(text, 40)
        raise DecodeError("decimal string", f"{name}: {shown!r} is not a plain decimal")
    try:
        return Decimal(text)
    except InvalidOperation as exc:  # pragma: no cover - the regex already guarantees it
        raise DecodeError("decimal string", f"{name}: {text!r}") from exc


def optional_decimal_to_wire(value: Decimal | int | None, *, name: str = "value") -> str:
    """`None` -> "" (absent); see decimal_to_wire."""
    return "" if value is None else decimal_to_wire(value, name=name)


def optional_decimal_from_wire(text: str, *, name: str = "value") -> Decimal | None:
    """ "" -> None (absent); see decimal_from_wire."""
    return None if text == "" else decimal_from_wire(text, name=name)


# --------------------------------------------------------------------------- messages


def type_name(message_type: type[Message]) -> str:
    """Full proto name, e.g. "smartlev.v1.MarketEvent" (also the faust codec name)."""
    return str(message_type.DESCRIPTOR.full_name)


def encode(message: Message) -> bytes:
    """Serialize deterministically (same message -> same bytes, for bit-exact replay)."""
    if not isinstance(message, Message):
        raise EncodeError(f"expected a protobuf message, got {type(message).__name__}")
    try:
        return message.SerializeToString(deterministic=True)
    except ProtobufEncodeError as exc:
        raise EncodeError(f"{type_name(type(message))}: {exc}") from exc


def _check_envelope(message: Message) -> None:
    """Reject payloads that parse but carry nothing: an empty oneof wrapper, no event_id.

    Protobuf accepts many byte strings (b"" is a valid empty message), so this is what
    turns "decoded to defaults" into a DecodeError a consumer can dead-letter.
    """
    descriptor = message.DESCRIPTOR
    for oneof in descriptor.oneofs:
        if oneof.name != "event":
            continue
        which = message.WhichOneof("event")
        if which is None:
            raise ValueError("no event set in the oneof wrapper")
        _check_envelope(getattr(message, which))
    if "event_id" in descriptor.fields_by_name and not getattr(message, "event_id"):  # noqa: B009
        raise ValueError("event_id is empty")


def order_of(event: orders_pb2.OrderEvent) -> orders_pb2.PositionOpened | orders_pb2.PositionClosed:
    """The user's order an `orders.events` record carries, opened or closed."""
    return event.opened if event.WhichOneof("event") == "opened" else event.closed


def decode(message_type: type[M], data: bytes | bytearray | memoryview | None) -> M:
    """Parse `data` as `message_type`; any failure is a DecodeError saying what and why."""
    expected = type_name(message_type)
    if data is None:
        raise DecodeError(expected, "payload is null (tombstone)")
    payload = bytes(data)
    message = message_type()
    try:
        message.ParseFromString(payload)
    except (ProtobufDecodeError, RuntimeError, ValueError, TypeError) as exc:
        raise DecodeError(expected, f"malformed protobuf: {exc}", payload) from exc
    try:
        _check_envelope(message)
    except ValueError as exc:
        raise DecodeError(expected, str(exc), payload) from exc
    return message


class ProtobufSerializer(Serializer):
    """kafka-python `value_serializer` for any protobuf message; also a plain callable."""

    def serialize(self, topic: str, headers: Any, data: Message) -> bytes:
        return encode(data)

    def __call__(self, message: Message) -> bytes:
        return encode(message)


class ProtobufDeserializer(Deserializer, Generic[M]):
    """kafka-python `value_deserializer` for one message type (raises DecodeError)."""

    def __init__(self, message_type: type[M]) -> None:
        self.message_type = message_type

    def deserialize(self, topic: str, headers: Any, data: bytes) -> M:
        return decode(self.message_type, data)

    def __call__(self, data: bytes) -> M:
        return decode(self.message_type, data)


class Utf8KeySerializer(Serializer, Deserializer):
    """Keys are symbols/products as UTF-8 text."""

    def serialize(self, topic: str, headers: Any, data: str | bytes | None) -> bytes | None:
        if data is None or isinstance(data, bytes):
            return data
        return data.encode("utf-8")

    def deserialize(self, topic: str, headers: Any, data: bytes | None) -> str | None:
        """Bytes that are not UTF-8 come escaped (no symbol: stages dead-letter them; a
        reader such as reconcile must not stop on one)."""
        return None if data is None else data.decode("utf-8", "backslashreplace")


#: `KafkaProducer(value_serializer=serializer)`; `serializer(msg) -> bytes` works too.
serializer = ProtobufSerializer()
#: `KafkaProducer(key_serializer=key_serializer)` / `KafkaConsumer(key_deserializer=...)`.
key_serializer = Utf8KeySerializer()
key_deserializer = key_serializer


def deserializer(message_type: type[M]) -> ProtobufDeserializer[M]:
    """`KafkaConsumer(value_deserializer=deserializer(MarketEvent))`; callable on bytes."""
    return ProtobufDeserializer(message_type)


# --------------------------------------------------------------------------- faust


class ProtobufCodec(faust_codecs.Codec):
    """faust codec for one protobuf message type: `ProtobufCodec(message_type=Tick)`.

    The type travels in `kwargs` so faust's `clone()` / codec chaining keeps it.
    """

    def __init__(
        self,
        children: tuple[faust_codecs.CodecT, ...] | None = None,
        *,
        message_type: type[Message],
        **kwargs: Any,
    ) -> None:
        super().__init__(children=children, message_type=message_type, **kwargs)
        self.message_type = message_type

    def _dumps(self, obj: Any) -> bytes:
        if not isinstance(obj, self.message_type):
            raise EncodeError(
                f"codec {type_name(self.message_type)} cannot encode {type(obj).__name__}"
            )
        return encode(obj)

    def _loads(self, s: bytes) -> Any:
        return decode(self.message_type, s)


def register_faust_codecs(message_types: Iterable[type[Message]]) -> list[str]:
    """Register one ProtobufCodec per type under its full proto name; idempotent."""
    names = []
    for message_type in message_types:
        name = type_name(message_type)
        faust_codecs.register(name, ProtobufCodec(message_type=message_type))
        names.append(name)
    return names


def faust_topic(
    app: faust.App, spec: TopicSpec, *, decode_values: bool = True, **kwargs: Any
) -> faust.TopicT:
    """A faust topic for a registry entry: UTF-8 str keys, protobuf values.

    faust turns a value that fails to decode into an exception thrown into the agent
    (`Channel.on_value_decode_error`), i.e. the agent crashes. A consumer that must
    dead-letter bad input instead uses `decode_values=False` (values and keys arrive as
    bytes)
    and calls `decode(spec.value_type, value)` itself, sending a `DeadLetter` to
    `<topic>.dlq` on `DecodeError`.

    The topic is created by `ensure_topics` (partitions, retention), not by faust; the
    spec's partition count is passed for faust's co-partitioning checks only.
    """
    kwargs.setdefault("partitions", spec.partitions)
    if decode_values:
        value_serializer: Any = ProtobufCodec(message_type=spec.value_type)
        kwargs.setdefault("value_type", None)
        key_type: type = str
    else:  # keys as bytes too: one that is not UTF-8 would crash the agent like a value
        value_serializer = "raw"
        kwargs.setdefault("value_type", bytes)
        key_type = bytes
    return app.topic(
        spec.name,
        key_type=key_type,
        key_serializer="raw",
        value_serializer=value_serializer,
        **kwargs,
    )


# --------------------------------------------------------------------------- core <-> wire


def market_event_from_tick(
    tick: Tick, *, seq: int, source: str, ts_init_ns: int, event_id: str | None = None
) -> market_pb2.MarketEvent:
    """Wrap a core Tick for market.ticks. The default event_id is deterministic
    (source|symbol|seq) so a replay of the same input yields the same messages."""
    return market_pb2.MarketEvent(
        tick=market_pb2.Tick(
            event_id=event_id or f"{source}|{tick.symbol}|{seq}",
            symbol=tick.symbol,
            ts_event_ns=tick.ts_ns,
            ts_init_ns=ts_init_ns,
            price=decimal_to_wire(tick.price, name="price"),
            mark_price=optional_decimal_to_wire(tick.mark_price, name="mark_price"),
            seq=seq,
            source=source,
        )
    )


def market_event_from_funding(
    funding: FundingRate, *, seq: int, source: str, ts_init_ns: int, event_id: str | None = None
) -> market_pb2.MarketEvent:
    return market_pb2.MarketEvent(
        funding=market_pb2.FundingRateObserved(
            event_id=event_id or f"{source}|{funding.symbol}|{seq}",
            symbol=funding.symbol,
            ts_event_ns=funding.ts_ns,
            ts_init_ns=ts_init_ns,
            rate=decimal_to_wire(funding.rate, name="rate"),
            seq=seq,
            source=source,
        )
    )


def tick_from_proto(message: market_pb2.Tick) -> Tick:
    """Wire Tick -> core Tick (exact decimals; DecodeError on a bad number)."""
    return Tick(
        symbol=message.symbol,
        ts_ns=message.ts_event_ns,
        price=decimal_from_wire(message.price, name="price"),
        mark_price=optional_decimal_from_wire(message.mark_price, name="mark_price"),
    )


def funding_from_proto(message: market_pb2.FundingRateObserved) -> FundingRate:
    return FundingRate(
        symbol=message.symbol,
        ts_ns=message.ts_event_ns,
        rate=decimal_from_wire(message.rate, name="rate"),
    )


def _register_all() -> None:
    from shared.topics import message_types

    register_faust_codecs(message_types())


_register_all()
