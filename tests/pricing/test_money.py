"""Money: integer micro-credits, exact parsing, and the one rounding rule (ceiling)."""

from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pricing.money import (
    MICROS_PER_CREDIT,
    MoneyError,
    credits_from_micros,
    micros_from_text,
    parse_credits,
    to_micros,
)


@pytest.mark.parametrize(
    "text",
    ["nan", "NaN", "sNaN", "inf", "Infinity", "-inf", "-1", "-0.000001", "", "abc", "1,5", "0x10"],
)
def test_parse_credits_refuses_non_finite_negative_and_non_numeric_text(text: str) -> None:
    with pytest.raises(MoneyError, match=r"decimal number|finite, non-negative"):
        parse_credits(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("0.0032", Decimal("0.0032")), ("0.37", Decimal("0.37")), ("8", Decimal(8)), ("0", 0)],
)
def test_parse_credits_reads_decimal_text_exactly(text: str, expected: Decimal) -> None:
    value = parse_credits(text)
    assert value == expected
    assert isinstance(value, Decimal)


def test_parse_credits_keeps_a_binary_unfriendly_fraction_exact() -> None:
    # 0.1 + 0.2 is not 0.3 in binary floating point; it must be here.
    assert parse_credits("0.1") + parse_credits("0.2") == parse_credits("0.3")


def test_to_micros_rounds_a_sub_micro_amount_up_to_one() -> None:
    assert to_micros(Decimal("0.0000001")) == 1


def test_to_micros_leaves_whole_micros_alone() -> None:
    assert to_micros(Decimal("0.0064")) == 6400
    assert to_micros(Decimal("0.000001")) == 1
    assert to_micros(Decimal(0)) == 0
    assert to_micros(Decimal(8)) == 8 * MICROS_PER_CREDIT


def test_to_micros_rounds_up_even_just_past_a_micro() -> None:
    assert to_micros(Decimal("0.0000010000000001")) == 2
    assert to_micros(Decimal("0.0000019999999999")) == 2


def test_to_micros_sees_a_fraction_far_past_the_micro() -> None:
    # 26 decimal places: the excess over one micro is in the 26th; it still rounds up.
    assert to_micros(Decimal("0.00000100000000000000000001")) == 2
    assert to_micros(Decimal("0.0000009999999")) == 1


@settings(max_examples=200)
@given(st.decimals(min_value=0, max_value=10**9, places=12, allow_nan=False, allow_infinity=False))
def test_to_micros_is_the_ceiling_of_the_exact_amount(amount: Decimal) -> None:
    micros = to_micros(amount)
    exact = amount * MICROS_PER_CREDIT
    assert micros >= exact
    assert micros - exact < 1


def test_micros_from_text_refuses_seven_decimal_places() -> None:
    with pytest.raises(MoneyError, match="more decimal places than a micro-credit"):
        micros_from_text("0.0000001")


def test_micros_from_text_accepts_six_decimal_places_and_trailing_zeros() -> None:
    assert micros_from_text("0.000001") == 1
    assert micros_from_text("12.5") == 12_500_000
    assert micros_from_text("0.0064000") == 6400
    assert micros_from_text("0") == 0


@pytest.mark.parametrize("text", ["-1", "nan", "inf", "ten"])
def test_micros_from_text_refuses_what_parse_credits_refuses(text: str) -> None:
    with pytest.raises(MoneyError):
        micros_from_text(text)


def test_micros_from_text_never_rounds_a_long_amount() -> None:
    # 23 digits of credits and 6 of micros: 29 significant digits.
    assert micros_from_text("12345678901234567890123.123457") == 12345678901234567890123123457


def test_micros_from_text_refuses_a_sub_micro_fraction_on_a_large_amount() -> None:
    with pytest.raises(MoneyError):
        micros_from_text("1000000000000000000000000.0000001")


def test_credits_from_micros_renders_the_seed_example() -> None:
    assert credits_from_micros(6400) == Decimal("0.0064")
    assert str(credits_from_micros(6400)) == "0.0064"


@pytest.mark.parametrize(
    ("micros", "text"),
    [(0, "0"), (1, "0.000001"), (740_000, "0.74"), (8_000_000, "8"), (12_500_000, "12.5")],
)
def test_credits_from_micros_renders_plain_decimals(micros: int, text: str) -> None:
    assert str(credits_from_micros(micros)) == text


@pytest.mark.parametrize(("micros", "text"), [(10_000_000, "10"), (200_000_000, "200")])
def test_credits_from_micros_renders_whole_tens_without_an_exponent(micros: int, text: str) -> None:
    assert str(credits_from_micros(micros)) == text


@settings(max_examples=200)
@given(st.integers(min_value=0, max_value=2**63 - 1))
def test_micros_survive_a_round_trip_through_their_credit_text(micros: int) -> None:
    assert micros_from_text(str(credits_from_micros(micros))) == micros
    assert to_micros(credits_from_micros(micros)) == micros
