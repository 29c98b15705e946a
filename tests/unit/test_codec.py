"""Wire codec: every topic's value type round-trips exactly through faust and kafka-python;
bad bytes and bad decimals are refused with a DecodeError naming what was expected."""

from __future__ import annotations

from decimal import Decimal

import pytest
from faust.serializers import codecs as faust_codecs
from google.protobuf.message import Message
from hypothesis import example, given
from hypothesis import strategies as st
from smartlev.v1 import common_pb2, hedging_pb2, leverage_pb2, market_pb2, nav_pb2, orders_pb2

from shared import codec
from shared.core.market import FundingRate, Tick
from shared.topics import ALL_TOPICS, message_types

TS = 1_600_000_000_000_000_000


def tick_event() -> market_pb2.MarketEvent:
    return market_pb2.MarketEvent(
        tick=market_pb2.Tick(
            event_id="t-1",
            symbol="BTC-USDT",
            ts_event_ns=TS,
            ts_init_ns=TS + 5,
            price="43210.12",
            mark_price="43209.99",
            seq=1,
            source="test",
        )
    )


SAMPLES: dict[str, Message] = {
    "smartlev.v1.MarketEvent": tick_event(),
    "smartlev.v1.RegimeUpdate": market_pb2.RegimeUpdate(
        market=tick_event(),
        regime=market_pb2.RegimeDetected(
            event_id="r-1",
            symbol="BTC-USDT",
            ts_event_ns=TS,
            regime=common_pb2.TREND_UP,
            confidence=0.8125,
            changed=True,
            features=market_pb2.RegimeFeatures(
                sigma_ann=0.61,
                trend_score=1.5,
                drawdown=0.02,
                efficiency=[0.4, 0.3],
                momentum=[2.1],
            ),
        ),
    ),
    "smartlev.v1.TargetsUpdate": leverage_pb2.TargetsUpdate(
        market=tick_event(),
        bar_closed=True,
        regime=common_pb2.TREND_UP,
        targets=[
            leverage_pb2.LeverageTargetChanged(
                event_id="l-1",
                product="BTC-USDT:LONG",
                symbol="BTC-USDT",
                side=common_pb2.LONG,
                ts_event_ns=TS,
                target_leverage="3.25",
                previous_target="2.5",
                rebalance=True,
                reasons=["REGIME_TREND_ALIGNED", "VOL_SCALED_DOWN"],
                price="43210.12",
                regime=common_pb2.TREND_UP,
            )
        ],
    ),
    "smartlev.v1.HedgeUpdate": hedging_pb2.HedgeUpdate(
        event_id="BTC-USDT:1",
        market=tick_event(),
        products=[
            hedging_pb2.ProductBookState(
                product="BTC-USDT:LONG", units="10", cash="-5.5", qty="0.001"
            )
        ],
        filled=hedging_pb2.HedgeFilled(
            event_id="h-1",
            symbol="BTC-USDT",
            ts_event_ns=TS,
            net_qty="-0.125",
            fill_price="43200.5",
            venue_fee="2.16002500",
            slices=2,
            allocations=[
                hedging_pb2.FillAllocation(product="BTC-USDT:LONG", qty="0.5", fee="1"),
                hedging_pb2.FillAllocation(product="BTC-USDT:SHORT", qty="-0.625", fee="1.16"),
            ],
        ),
    ),
    "smartlev.v1.OrderEvent": orders_pb2.OrderEvent(
        opened=orders_pb2.PositionOpened(
            event_id="o-1",
            position_id="p-1",
            user_id="u-1",
            product="BTC-USDT:LONG",
            amount="100",
            fee="0.1",
            units="99.9",
            nav="1",
            client_order_id="c-1",
        )
    ),
    "smartlev.v1.NavUpdated": nav_pb2.NavUpdated(
        event_id="n-1", product="BTC-USDT:LONG", nav="1.00000001", equity="100.00000001"
    ),
    "smartlev.v1.DeadLetter": market_pb2.DeadLetter(
        event_id="d-1", topic="market.ticks", partition=2, offset=7, payload=b"\xff", reason="x"
    ),
}


def test_every_topic_value_type_has_a_sample() -> None:
    assert {codec.type_name(t) for t in message_types()} == set(SAMPLES)


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_faust_codec_round_trip(name: str) -> None:
    message = SAMPLES[name]
    registered = faust_codecs.get_codec(name)
    data = registered.dumps(message)
    assert data == message.SerializeToString(deterministic=True)
    back = registered.loads(data)
    assert back == message
    assert type(back) is type(message)


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_kafka_python_serializer_round_trip(name: str) -> None:
    message = SAMPLES[name]
    back = codec.deserializer(type(message))(codec.serializer(message))
    assert back == message


def test_faust_codec_survives_clone_and_refuses_other_types() -> None:
    base = codec.ProtobufCodec(message_type=market_pb2.MarketEvent)
    cloned = base.clone()
    assert cloned.loads(cloned.dumps(tick_event())) == tick_event()
    with pytest.raises(codec.EncodeError, match="cannot encode"):
        base.dumps(SAMPLES["smartlev.v1.NavUpdated"])


def test_encoding_is_deterministic() -> None:
    message = SAMPLES["smartlev.v1.HedgeUpdate"]
    assert len({codec.encode(message) for _ in range(5)}) == 1


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\xff\xff\xff\xff", "malformed protobuf"),
        (b"garbage bytes", "malformed protobuf"),
        (b"", "no event set"),
        (None, "null"),
        # a valid NavUpdated is not a MarketEvent: its fields land nowhere in the oneof
        (SAMPLES["smartlev.v1.NavUpdated"].SerializeToString(), "smartlev.v1.MarketEvent"),
    ],
)
def test_garbage_is_a_decode_error(data: bytes | None, reason: str) -> None:
    with pytest.raises(codec.DecodeError, match=reason) as info:
        codec.decode(market_pb2.MarketEvent, data)
    assert info.value.expected == "smartlev.v1.MarketEvent"
    assert "smartlev.v1.MarketEvent" in str(info.value)


def test_event_without_id_is_refused() -> None:
    event = tick_event()
    event.tick.event_id = ""
    with pytest.raises(codec.DecodeError, match="event_id is empty"):
        codec.decode(market_pb2.MarketEvent, event.SerializeToString())


def test_faust_wraps_decode_error_with_our_reason() -> None:
    registered = faust_codecs.get_codec("smartlev.v1.MarketEvent")
    with pytest.raises(codec.DecodeError, match=r"cannot decode smartlev\.v1\.MarketEvent"):
        registered.loads(b"\x0a\x05junk!")


# --------------------------------------------------------------------------- decimals


@pytest.mark.parametrize(
    ("value", "wire"),
    [
        (Decimal("43210.12"), "43210.12"),
        (Decimal("0.00010000"), "0.00010000"),
        (Decimal("-0.0001"), "-0.0001"),
        (Decimal("1E+3"), "1000"),
        (Decimal("1E-10"), "0.0000000001"),
        (7, "7"),
    ],
)
def test_decimal_to_wire_plain_notation(value: Decimal | int, wire: str) -> None:
    assert codec.decimal_to_wire(value) == wire
    assert codec.decimal_from_wire(wire) == Decimal(value)


@pytest.mark.parametrize(
    "value", [Decimal("NaN"), Decimal("sNaN"), Decimal("Infinity"), Decimal("-Infinity")]
)
def test_decimal_to_wire_refuses_non_finite(value: Decimal) -> None:
    with pytest.raises(codec.EncodeError, match="not finite"):
        codec.decimal_to_wire(value)


@pytest.mark.parametrize("value", [0.1, True, "1.5", None])
def test_decimal_to_wire_refuses_floats_and_text(value: object) -> None:
    with pytest.raises(codec.EncodeError, match="expected Decimal"):
        codec.decimal_to_wire(value)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "text",
    ["NaN", "nan", "Infinity", "-inf", "1e5", "1E+3", " 1", "1 ", "+1", "", ".5", "1.", "1,5",
     "0x10", "1" * 41, "١٢"],
)  # fmt: skip
def test_decimal_from_wire_refuses_anything_but_plain_decimals(text: str) -> None:
    with pytest.raises(codec.DecodeError):
        codec.decimal_from_wire(text, name="price")


def test_optional_decimals() -> None:
    assert codec.optional_decimal_to_wire(None) == ""
    assert codec.optional_decimal_from_wire("") is None
    assert codec.optional_decimal_from_wire("2.50") == Decimal("2.50")


@given(
    st.decimals(allow_nan=False, allow_infinity=False, places=8, min_value=-(10**20),
                max_value=10**20)
)  # fmt: skip
def test_decimal_wire_round_trip_is_exact(value: Decimal) -> None:
    wire = codec.decimal_to_wire(value)
    back = codec.decimal_from_wire(wire)
    assert back == value
    assert codec.decimal_to_wire(back) == wire


@given(
    st.one_of(
        st.decimals(allow_nan=False, allow_infinity=False),
        st.builds(
            lambda digits, exponent, sign: Decimal((sign, tuple(digits), exponent)),
            st.lists(st.integers(0, 9), min_size=1, max_size=45),
            st.integers(-45, 45),
            st.integers(0, 1),
        ),
    )
)
@example(Decimal("1" * 40))  # plain text past 40 characters, at the edge of the range
@example(Decimal("-" + "9" * 40 + "." + "9" * 40))
@example(Decimal("1" * 41))
@example(Decimal("0." + "1" * 41))
@example(Decimal("-" + "1" * 41))
def test_decimal_to_wire_takes_exactly_the_wire_range(value: Decimal) -> None:
    """Inside 40 integer and 40 fraction digits: encoded in plain notation; outside:
    refused (the range every reader accepts)."""
    plain = format(value, "f")
    integer, _, fraction = plain.lstrip("-").partition(".")
    if len(integer) <= 40 and len(fraction) <= 40:
        assert codec.decimal_to_wire(value) == plain
        assert codec.decimal_from_wire(plain) == value
    else:
        with pytest.raises(codec.EncodeError, match="outside the wire range"):
            codec.decimal_to_wire(value)


@pytest.mark.parametrize(
    "value", ["1E+99999999999", "-1E+999999999999999999", "1E-999999999999", "0E-999999999999"]
)
def test_a_huge_exponent_is_refused_before_its_digits_are_written(value: str) -> None:
    """format() would write out every digit first: a gigabyte, or MemoryError (a CSV cell
    of 1E+999999999999999999 ended a backtest with a traceback)."""
    with pytest.raises(codec.EncodeError, match="outside the wire range"):
        codec.decimal_to_wire(Decimal(value))
    assert codec.decimal_to_wire(Decimal("0E+999999999999")) == "0"


# --------------------------------------------------------------------------- core <-> wire


def test_core_tick_round_trip_through_market_event() -> None:
    tick = Tick("BTC-USDT", TS, Decimal("43210.12"), Decimal("43209.5"))
    event = codec.market_event_from_tick(tick, seq=9, source="replay", ts_init_ns=TS + 1)
    assert event.tick.event_id == "replay|BTC-USDT|9"
    decoded = codec.decode(market_pb2.MarketEvent, codec.encode(event))
    assert codec.tick_from_proto(decoded.tick) == tick


def test_core_tick_without_mark_and_funding() -> None:
    tick = Tick("BTC-USDT", TS, Decimal("1.5"))
    event = codec.market_event_from_tick(tick, seq=1, source="s", ts_init_ns=TS)
    assert event.tick.mark_price == ""
    assert codec.tick_from_proto(event.tick) == tick
    funding = FundingRate("BTC-USDT", TS, Decimal("-0.00012500"))
    fevent = codec.market_event_from_funding(funding, seq=2, source="s", ts_init_ns=TS)
    assert codec.funding_from_proto(fevent.funding) == funding
    assert fevent.funding.rate == "-0.00012500"
    # the replay's ids: one per event (the proto's rule), the seq in it as for a tick
    assert fevent.funding.event_id == "s|BTC-USDT|2"
    later = codec.market_event_from_funding(funding, seq=3, source="s", ts_init_ns=TS)
    assert later.funding.event_id == "s|BTC-USDT|3"


def test_every_registered_topic_type_is_a_faust_codec() -> None:
    for spec in ALL_TOPICS:
        assert isinstance(
            faust_codecs.get_codec(codec.type_name(spec.value_type)), codec.ProtobufCodec
        )


def test_faust_topic_from_spec() -> None:
    import faust

    from shared.topics import MARKET_TICKS

    app = faust.App("test-codec", store="memory://", web_enabled=False)
    decoded = codec.faust_topic(app, MARKET_TICKS)
    raw = codec.faust_topic(app, MARKET_TICKS, decode_values=False)
    assert decoded.get_topic_name() == raw.get_topic_name() == "market.ticks"
    assert isinstance(decoded.value_serializer, codec.ProtobufCodec)
    assert raw.value_serializer == "raw" and raw.value_type is bytes and raw.key_type is bytes
    assert decoded.partitions == 3


def test_a_key_that_is_not_utf8_reads_escaped_instead_of_stopping_the_reader() -> None:
    """kafka-python deserializes keys inside `poll`: a raise there stopped `reconcile` on
    every attempt (such records sit on topics the stages dead-letter them from)."""
    assert codec.key_deserializer.deserialize("t", None, b"BTC-USDT") == "BTC-USDT"
    assert codec.key_deserializer.deserialize("t", None, b"\xff\xfe") == "\\xff\\xfe"
    assert codec.key_deserializer.deserialize("t", None, None) is None
