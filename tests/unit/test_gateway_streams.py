"""What a position stream keeps of what it showed (services/gateway/main.py,
ShownPositions): each state of a position once, and only the positions that can still
change, so a stream open for days holds the open positions, not its whole history."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

import services.gateway.main as gateway_main
from services.gateway.main import ShownPositions
from services.gateway.orders import PositionState


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
