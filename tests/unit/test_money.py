"""shared.core.money: parsing, rounding directions and exact pro-rata allocation.

Every expected value is worked by hand from the rules in money.py's docstring.
"""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.core.money import (
    USDT_QUANTUM,
    MoneyError,
    allocate,
    nav_of,
    positive,
    price_against,
    to_decimal,
    to_step,
    units_down,
    usdt_down,
)

D = Decimal
Q = USDT_QUANTUM  # 1e-8

# --- to_decimal / positive ------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("1.10", D("1.10")), (7, D(7)), (D("-0.00000001"), D("-0.00000001")), ("1e3", D(1000))],
)
def test_to_decimal_accepts_exact_inputs(raw: str | int | Decimal, expected: Decimal) -> None:
    result = to_decimal(raw)
    assert result == expected
    assert isinstance(result, Decimal)


def test_to_decimal_keeps_the_written_exponent() -> None:
    # "1.10" is two decimal places, not a float's 1.100000000000000088817841970012523...
    assert to_decimal("1.10").as_tuple() == (0, (1, 1, 0), -2)


@pytest.mark.parametrize("raw", [0.1, 1.0, float("nan"), float("inf")])
def test_to_decimal_refuses_floats_with_a_clear_message(raw: float) -> None:
    with pytest.raises(MoneyError, match=r"^amount: binary floats are not exact money"):
        to_decimal(raw, name="amount")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "raw", ["NaN", "nan", "sNaN", "Infinity", "-inf", D("NaN"), D("-Infinity")]
)
def test_to_decimal_refuses_non_finite(raw: str | Decimal) -> None:
    with pytest.raises(MoneyError, match=r"^price: .* is not finite$"):
        to_decimal(raw, name="price")


@pytest.mark.parametrize("raw", ["abc", "", "1,000", "1.2.3", "0x10", None, [1], b"1", object()])
def test_to_decimal_refuses_junk(raw: object) -> None:
    with pytest.raises(MoneyError, match=r"^qty: .* is not a decimal number$"):
        to_decimal(raw, name="qty")  # type: ignore[arg-type]


def test_money_error_is_a_value_error() -> None:
    assert issubclass(MoneyError, ValueError)


@pytest.mark.parametrize("raw", ["0", "-0", "-0.00000001", -5])
def test_positive_refuses_zero_and_negative(raw: str | int) -> None:
    with pytest.raises(MoneyError, match=r"^deposit: must be > 0"):
        positive(raw, name="deposit")


def test_positive_passes_a_positive_value() -> None:
    assert positive("0.00000001") == D("0.00000001")


# --- rounding directions ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("amount", "expected"),
    [
        ("1.999999999", "1.99999999"),  # 9th decimal dropped, not rounded up
        ("-1.999999999", "-1.99999999"),  # toward zero, not toward -inf
        ("1.23456789", "1.23456789"),  # already on the quantum: unchanged
        ("0.000000009", "0"),
    ],
)
def test_usdt_down_rounds_toward_zero(amount: str, expected: str) -> None:
    assert usdt_down(D(amount)) == D(expected)


@pytest.mark.parametrize(
    ("equity", "units", "expected"),
    [
        ("100", "3", "33.33333333"),  # 33.333333333.. -> cut
        ("200", "3", "66.66666666"),  # 66.666666666.. -> cut, never up
        ("0.000000025", "1", "0.00000002"),  # a half is cut too
        ("0.000000035", "1", "0.00000003"),
        ("-200", "3", "-66.66666666"),  # toward zero
    ],
)
def test_nav_of_rounds_toward_zero_to_8_places(equity: str, units: str, expected: str) -> None:
    assert nav_of(D(equity), D(units)) == D(expected)


@pytest.mark.parametrize(
    ("units", "expected"), [("0.123456789", "0.12345678"), ("9.999999999", "9.99999999")]
)
def test_units_down_never_rounds_up(units: str, expected: str) -> None:
    assert units_down(D(units)) == D(expected)


@pytest.mark.parametrize(
    ("qty", "expected"),
    [
        ("0.0019", "0.001"),
        ("-0.0019", "-0.001"),  # toward zero, NOT floor (-0.002)
        ("0.002", "0.002"),
        ("0.0009", "0"),
        ("-0.0009", "0"),
    ],
)
def test_to_step_rounds_toward_zero(qty: str, expected: str) -> None:
    assert to_step(D(qty), D("0.001")) == D(expected)


quantities = st.integers(-(10**12), 10**12).map(lambda n: D(n).scaleb(-7))
steps = st.sampled_from([D("0.001"), D("0.01"), D("1"), D("0.005"), D("25")])


@given(quantities, steps)
def test_to_step_properties(qty: Decimal, step: Decimal) -> None:
    result = to_step(qty, step)
    assert result % step == 0
    assert abs(result) <= abs(qty)
    assert abs(qty - result) < step
    assert result == 0 or (result > 0) == (qty > 0)


@pytest.mark.parametrize(
    ("price", "buying", "expected"),
    [
        ("100.01", True, "100.1"),
        ("100.01", False, "100.0"),
        ("100.09", False, "100.0"),  # a sell never rounds up, even from .09
        ("100.1", True, "100.1"),  # on the tick: unchanged both ways
        ("100.1", False, "100.1"),
    ],
)
def test_price_against_rounds_buys_up_and_sells_down(
    price: str, buying: bool, expected: str
) -> None:
    assert price_against(D(price), D("0.1"), buying) == D(expected)


@given(
    st.integers(1, 10**12).map(lambda n: D(n).scaleb(-5)),
    st.sampled_from([D("0.1"), D("0.01"), D("0.5"), D("1")]),
)
def test_price_against_properties(price: Decimal, tick: Decimal) -> None:
    up = price_against(price, tick, True)
    down = price_against(price, tick, False)
    assert up % tick == 0 and down % tick == 0
    assert down <= price <= up
    assert up - price < tick and price - down < tick


# --- allocate ---------------------------------------------------------------------------


def test_allocate_leftover_quantum_goes_to_the_lower_index_on_ties() -> None:
    # 10 / 3 = 3.333333333..; floors 3.33333333 x 3 = 9.99999999, 1 quantum left over,
    # equal remainders -> lowest index.
    assert allocate(D(10), [D(1), D(1), D(1)]) == [
        D("3.33333334"),
        D("3.33333333"),
        D("3.33333333"),
    ]


def test_allocate_negative_total_mirrors_the_positive_split() -> None:
    assert allocate(D(-10), [D(1), D(1), D(1)]) == [
        D("-3.33333334"),
        D("-3.33333333"),
        D("-3.33333333"),
    ]


def test_allocate_leftover_goes_to_the_largest_remainder() -> None:
    # 0.0162 x 10/14 = 0.01157142857.. (rem .857q), x 4/14 = 0.00462857142.. (rem .143q)
    assert allocate(D("0.0162"), [D(10), D(4)]) == [D("0.01157143"), D("0.00462857")]
    # 0.12000648 x 10/14 = 0.0857189142.. (rem .43q), x 4/14 = 0.0342875657.. (rem .57q)
    assert allocate(D("0.12000648"), [D(10), D(4)]) == [D("0.08571891"), D("0.03428757")]


def test_allocate_dust_below_the_quantum_goes_to_the_largest_weight() -> None:
    # whole 1.00000000 split 1:3 = 0.25 / 0.75; the 0.000000005 dust goes to weight 3.
    assert allocate(D("1.000000005"), [D(1), D(3)]) == [D("0.25"), D("0.750000005")]


def test_allocate_all_zero_weights_split_equally() -> None:
    assert allocate(D(1), [D(0), D(0)]) == [D("0.5"), D("0.5")]
    # one quantum cannot be halved: it goes to the first
    assert allocate(Q, [D(0), D(0)]) == [Q, D(0)]


def test_allocate_zero_weight_gets_nothing() -> None:
    assert allocate(D("7.5"), [D(0), D(2), D(0), D(1)]) == [D(0), D(5), D(0), D("2.5")]


def test_allocate_single_weight_takes_everything_even_dust() -> None:
    assert allocate(D("-1.123456789123"), [D(5)]) == [D("-1.123456789123")]
    assert allocate(D("3"), [D(0)]) == [D(3)]


@pytest.mark.parametrize("weights", [[D(-1)], [D(1), D(-1)], []])
def test_allocate_refuses_negative_or_no_weights(weights: list[Decimal]) -> None:
    with pytest.raises(MoneyError, match="allocate"):
        allocate(D(1), weights)


totals = st.builds(
    lambda n, exp: D(n).scaleb(-exp),
    st.integers(-(10**15), 10**15),
    st.integers(0, 12),  # up to 12 places: totals finer than the quantum carry dust
)
weight = st.one_of(
    st.just(D(0)),
    st.integers(0, 10**9).map(lambda n: D(n).scaleb(-3)),
)


@settings(max_examples=400, deadline=None)
@given(totals, st.lists(weight, min_size=1, max_size=8))
def test_allocate_properties(total: Decimal, weights: list[Decimal]) -> None:
    parts = allocate(total, weights)
    assert len(parts) == len(weights)
    assert sum(parts, D(0)) == total  # exactly, not approximately
    assert allocate(total, weights) == parts  # deterministic
    assert all(p == 0 or (p > 0) == (total > 0) for p in parts)
    if len(weights) == 1:
        assert parts == [total]
        return
    sign = -1 if total < 0 else 1
    whole = abs(total).quantize(Q, rounding="ROUND_DOWN")
    dust = abs(total) - whole
    effective = weights if sum(weights) > 0 else [D(1)] * len(weights)
    weight_sum = sum(effective, D(0))
    largest = max(range(len(effective)), key=lambda i: (effective[i], -i))
    for i, (part, w) in enumerate(zip(parts, effective, strict=True)):
        exact = whole * w / weight_sum
        magnitude = sign * part - (dust if i == largest else 0)
        assert abs(magnitude - exact) < Q, (i, part, exact)
        # largest remainder: a part is the floor of its share or one quantum above it
        assert magnitude % Q == 0
        if w == 0:
            assert part == 0
