"""The ingestion validator and seq allocation (pure)."""

from __future__ import annotations

import itertools
import os
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.ingestion.validation import (
    EMPTY,
    Accepted,
    Policy,
    Reason,
    Rejected,
    SymbolState,
    admit,
    order_key,
)
from shared.core.market import MAX_FUNDING_RATE, FundingRate, Tick

EXAMPLES = int(os.environ.get("SMARTLEV_PROPERTY_EXAMPLES", "200"))
POLICY = Policy()
T0 = 1_600_000_000_000_000_000


def tick(ts: int = T0, price: object = Decimal("100"), mark: object = None) -> Tick:
    return Tick("BTC-USDT", ts, price, mark)  # type: ignore[arg-type]


def run(events: list[object], state: SymbolState = EMPTY) -> tuple[SymbolState, list[object]]:
    verdicts = []
    for event in events:
        state, verdict = admit(state, event, POLICY)
        verdicts.append(verdict)
    return state, verdicts


def test_first_tick_gets_seq_1_and_becomes_the_state() -> None:
    state, verdict = admit(EMPTY, tick(), POLICY)
    assert verdict == Accepted(1, tick())
    assert state == SymbolState(1, (T0, 1), Decimal("100"))


@pytest.mark.parametrize(
    ("event", "reason"),
    [
        (tick(price=Decimal("NaN")), Reason.NOT_FINITE),
        (tick(price=Decimal("Infinity")), Reason.NOT_FINITE),
        (tick(price=Decimal(0)), Reason.NOT_POSITIVE),
        (tick(price=Decimal("-1")), Reason.NOT_POSITIVE),
        (tick(price=100.5), Reason.SCHEMA),
        (tick(price="100"), Reason.SCHEMA),
        (tick(mark=Decimal("-3")), Reason.NOT_POSITIVE),
        (tick(mark=Decimal("sNaN")), Reason.NOT_FINITE),
        (tick(ts=0), Reason.SCHEMA),
        (tick(ts=-5), Reason.SCHEMA),
        (tick(ts=2**63), Reason.SCHEMA),  # past the wire's int64 (a Binance T of 10^13 ms)
        (tick(price=Decimal("1E+41")), Reason.OUT_OF_BOUNDS),  # past the wire's 40.40
        (tick(price=Decimal("0." + "1" * 41)), Reason.OUT_OF_BOUNDS),
        (tick(mark=Decimal("1E+41")), Reason.OUT_OF_BOUNDS),
        # within the wire, past any price: a tick at 5e37 traded, then halted hedging
        (tick(price=Decimal("5" + "0" * 37)), Reason.OUT_OF_BOUNDS),
        (tick(mark=Decimal("1000000000000.5")), Reason.OUT_OF_BOUNDS),
        (FundingRate("BTC-USDT", T0, Decimal("1E-41")), Reason.OUT_OF_BOUNDS),
        (Tick("BTC-USDT", 1.5e18, Decimal(1)), Reason.SCHEMA),  # type: ignore[arg-type]
        (Tick("", T0, Decimal(1)), Reason.SCHEMA),
        (Tick("BTC{USDT}", T0, Decimal(1)), Reason.SCHEMA),  # a Redis hash tag inside
        (Tick("BTC-USDT|signal", T0, Decimal(1)), Reason.SCHEMA),  # a regime table key
        (FundingRate("BTC-USDT", T0, Decimal(1)), Reason.OUT_OF_BOUNDS),
        # more than 12 decimal places, trailing zeros too: cash no wire could carry
        (tick(price=Decimal("50100." + "0" * 13)), Reason.OUT_OF_BOUNDS),
        (tick(mark=Decimal("1.0000000000001")), Reason.OUT_OF_BOUNDS),
        (FundingRate("BTC-USDT", T0, Decimal("0.0000000000001")), Reason.OUT_OF_BOUNDS),
        # a settlement one step past the bound: no product may pay it (MAX_FUNDING_RATE)
        (FundingRate("BTC-USDT", T0, Decimal("0.050001")), Reason.OUT_OF_BOUNDS),
        (FundingRate("BTC-USDT", T0, Decimal("-0.050001")), Reason.OUT_OF_BOUNDS),
        (FundingRate("BTC-USDT", T0, Decimal("NaN")), Reason.NOT_FINITE),
        ({"price": "1"}, Reason.SCHEMA),
    ],
)
def test_bad_events_are_rejected_with_a_reason_and_change_nothing(
    event: object, reason: Reason
) -> None:
    start = SymbolState(7, (T0 - 10, 1), Decimal("100"))
    state, verdict = admit(start, event, POLICY)
    assert isinstance(verdict, Rejected) and verdict.reason is reason
    assert state == start
    assert str(verdict).startswith(reason.value + ": ")


def test_time_must_move_forward_funding_before_tick_of_same_instant() -> None:
    funding = FundingRate("BTC-USDT", T0, Decimal("0.0001"))
    state, verdicts = run([tick(T0 - 1), funding, tick(T0), tick(T0), tick(T0 - 1), funding])
    kinds = [type(v).__name__ for v in verdicts]
    assert kinds == ["Accepted", "Accepted", "Accepted", "Rejected", "Rejected", "Rejected"]
    assert [v.seq for v in verdicts if isinstance(v, Accepted)] == [1, 2, 3]
    assert all(v.reason is Reason.NOT_FORWARD for v in verdicts if isinstance(v, Rejected))
    assert state.seq == 3


def test_a_jump_beyond_max_is_published_and_flagged() -> None:
    _, verdicts = run([tick(T0), tick(T0 + 1, Decimal("131")), tick(T0 + 2, Decimal("130"))])
    assert [v.jump for v in verdicts] == [None, Decimal("0.31"), None]  # type: ignore[union-attr]
    _, verdicts = run([tick(T0), tick(T0 + 1, Decimal("69"))])
    assert verdicts[1] == Accepted(2, tick(T0 + 1, Decimal("69")), Decimal("0.31"))


def test_a_mark_jump_is_flagged_against_the_last_mark_not_the_last_tick() -> None:
    """Marks come with some ticks only (hourly in the replays): each is judged against
    the last mark accepted, however many ticks without one came between."""
    events = [
        tick(T0, Decimal("100"), mark=Decimal("100")),
        tick(T0 + 1, Decimal("100")),  # no mark: the reference stays 100
        tick(T0 + 2, Decimal("101"), mark=Decimal("60")),  # the trade held, the mark fell
        tick(T0 + 3, Decimal("101"), mark=Decimal("61")),
    ]
    state, verdicts = run(events)
    assert [v.mark_jump for v in verdicts] == [None, None, Decimal("0.4"), None]  # type: ignore[union-attr]
    assert [v.jump for v in verdicts] == [None] * 4  # type: ignore[union-attr]
    assert state.last_mark == Decimal("61") and state.last_price == Decimal("101")


def test_funding_keeps_the_jump_reference() -> None:
    funding = FundingRate("BTC-USDT", T0 + 1, Decimal("-0.0002"))
    state, _ = run([tick(T0, mark=Decimal("99")), funding])
    assert (state.last_price, state.last_mark, state.seq) == (Decimal("100"), Decimal("99"), 2)


@st.composite
def candidates(draw: st.DrawFn) -> list[object]:
    prices = st.one_of(
        st.decimals(min_value=Decimal("0.01"), max_value=Decimal("1e6"), places=2),
        st.sampled_from([Decimal(0), Decimal("-1"), Decimal("NaN"), Decimal("Infinity")]),
    )
    out: list[object] = []
    for _ in range(draw(st.integers(0, 40))):
        ts = draw(st.integers(T0 - 100, T0 + 100))
        if draw(st.booleans()):
            out.append(tick(ts, draw(prices)))
        else:
            rate = draw(
                st.one_of(
                    st.decimals(min_value=Decimal("-2"), max_value=Decimal("2"), places=6),
                    st.sampled_from([MAX_FUNDING_RATE, -MAX_FUNDING_RATE]),  # the bound itself
                )
            )
            out.append(FundingRate("BTC-USDT", ts, rate))
    return out


@settings(max_examples=EXAMPLES, deadline=None)
@given(candidates())
def test_accepted_stream_is_strictly_ordered_with_seqs_1_to_n(events: list[object]) -> None:
    state, verdicts = run(events)
    accepted = [v for v in verdicts if isinstance(v, Accepted)]
    assert [v.seq for v in accepted] == list(range(1, len(accepted) + 1))
    keys = [order_key(v.event) for v in accepted]
    assert all(a < b for a, b in itertools.pairwise(keys))
    for v in accepted:
        if isinstance(v.event, Tick):
            assert v.event.price.is_finite() and v.event.price > 0
        else:
            assert abs(v.event.rate) <= MAX_FUNDING_RATE
    assert state.seq == len(accepted)
    assert (state.last_key is None) == (not accepted)


def test_policy_refuses_a_non_positive_jump() -> None:
    with pytest.raises(ValueError):
        Policy(max_jump=Decimal(0))
