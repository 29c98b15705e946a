"""The chaos run's verdict (tests/chaos/driver.py `compare`): what fails it."""

from __future__ import annotations

import pytest

from tests.chaos.driver import ChaosFailure, Outcome, compare

NAVS = {("BTC-USDT:LONG", 1): "100.00000000", ("BTC-USDT:LONG", 2): "101.00000000"}


def test_equal_runs_compare_every_tick() -> None:
    assert compare(Outcome("ref.", dict(NAVS)), Outcome("chaos.", dict(NAVS))) == 2


@pytest.mark.parametrize("which", ["reference", "chaos"])
def test_a_dead_letter_in_either_run_fails_it(which: str) -> None:
    """`make chaos` promised "nothing is dead-lettered" and only printed the count: a
    restart that dead-letters a redelivered event the stage should have skipped moves
    no NAV, so the run passed with a polluted DLQ."""
    reference, chaos = Outcome("ref.", dict(NAVS)), Outcome("chaos.", dict(NAVS))
    (reference if which == "reference" else chaos).dead_letters = {"market.regimes.dlq": 3}
    with pytest.raises(ChaosFailure, match="dead-lettered"):
        compare(reference, chaos)


def test_a_nav_that_differs_fails_it() -> None:
    moved = {**NAVS, ("BTC-USDT:LONG", 2): "101.00000001"}
    with pytest.raises(ChaosFailure, match="1 NAVs differ"):
        compare(Outcome("ref.", dict(NAVS)), Outcome("chaos.", moved))
