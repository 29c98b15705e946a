"""What a position stream keeps of what it showed (services/gateway/main.py,
ShownPositions): each state of a position once, and only the positions that can still
change, so a stream open for days holds the open positions, not its whole history."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st
from smartlev.v1 import nav_pb2

import services.gateway.main as gateway_main
from services.gateway.main import ShownPositions, StreamNavs
from services.gateway.orders import PositionState

LONG = "BTC-USDT:LONG"


def nav_update(seq: int, nav: str) -> nav_pb2.NavUpdated:
    return nav_pb2.NavUpdated(event_id=f"{LONG}:{seq}", product=LONG, nav=nav, seq=seq)


def state(pid: str, units: int) -> PositionState:
    return PositionState(
        position_id=pid,
        user="alice",
        product="BTC-USDT:LONG",
        units=Decimal(units),
        units_opened=Decimal(9),
        entry_nav=Decimal(100),
        amount=Decimal(900),
        cost=Decimal(900),
        realized_pnl=Decimal(0),
        payout=Decimal(0),
        fees=Decimal(0),
        ts_opened_ns=1,
        ts_closed_ns=0 if units else 2,
    )


@given(
    st.booleans(),
    st.lists(st.tuples(st.integers(0, 5), st.integers(0, 4)), max_size=80),
)
def test_each_state_is_shown_once_and_only_what_can_change_is_held(
    include_closed: bool, steps: list[tuple[int, int]]
) -> None:
    """Positions whose units only fall (an event may repeat a state): every state is shown
    once, in order; the stream holds each open position as it is now, and none that
    closed (whether or not it lists closed ones)."""
    shown = ShownPositions(include_closed)
    units: dict[str, int] = {}
    reached: list[tuple[str, int]] = []
    shows: list[tuple[str, int]] = []
    for n, fall in steps:
        pid = f"{n:032x}"
        units[pid] = max(units.get(pid, 9) - fall, 0)
        reached.append((pid, units[pid]))
        position = state(pid, units[pid])
        if shown.changed(position):
            shown.show(position)
            shows.append((pid, units[pid]))
        assert all(p.units == units[pid] > 0 for pid, p in shown.held.items())
    assert shows == list(dict.fromkeys(reached))


def test_a_stream_remembers_only_the_latest_closed_ids(monkeypatch: pytest.MonkeyPatch) -> None:
    """The ids of positions shown closed are bounded: past the bound the oldest is
    forgotten, and a late copy of its event would show it closed once more."""
    monkeypatch.setattr(gateway_main, "CLOSED_REMEMBERED", 2)
    shown = ShownPositions(include_closed=False)
    for pid in ("a", "b", "c"):
        shown.show(state(pid, 0))
    assert [shown.changed(state(pid, 0)) for pid in ("a", "b", "c")] == [True, False, False]
    assert shown.held == {}


def test_a_position_stream_does_not_take_back_a_nav_it_read_newer() -> None:
    """The NAV service sends a batch's updates (seq 2, 3, 4) before it stores them: a
    stream that read the store at seq 4 then showed NAV 102, 103, 104 from its queue."""
    navs = StreamNavs()
    navs.stored(LONG, {"nav": "104", "seq": "4"})
    moved = [navs.updated(nav_update(seq, f"10{seq}")) for seq in (2, 3, 4, 5)]
    assert moved == [False, False, False, True] and navs.current[LONG] == Decimal("105")
    navs.stored(LONG, {"nav": "104", "seq": "4"})  # a re-read of an older store
    assert navs.current[LONG] == Decimal("105")
    navs.stored("BTC-USDT:SHORT", {})  # no NAV stored yet
    assert navs.current["BTC-USDT:SHORT"] is None


@given(st.lists(st.tuples(st.booleans(), st.integers(0, 6), st.integers(1, 999)), max_size=40))
def test_the_nav_a_stream_shows_follows_the_latest_seq_it_saw(
    steps: list[tuple[bool, int, int]],
) -> None:
    """Whatever order store reads and updates come in, the stream takes a NAV marked at
    a seq no older than the one it shows (an equal seq, an order's re-mark, is taken),
    and keeps the one it shows otherwise; an update says the positions move only when
    it moved the NAV (a tick at the same NAV repeated every position of the product)."""
    navs = StreamNavs()
    shown_seq, shown_nav = 0, None
    for from_store, seq, nav in steps:
        if from_store:
            navs.stored(LONG, {"nav": str(nav), "seq": str(seq)})
        else:
            moved = seq >= shown_seq and Decimal(nav) != shown_nav
            assert navs.updated(nav_update(seq, str(nav))) == moved
        if seq >= shown_seq:
            shown_seq, shown_nav = seq, Decimal(nav)
        assert navs.current.get(LONG) == shown_nav
