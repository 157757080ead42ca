"""Upstream costs in their own currencies, converted to credits exactly (ADR 0001).

Conversion is a product of decimals computed exactly and rounded once, up, to the
micro-credit; the property tests compare it with rational arithmetic.
"""

import math
from decimal import Decimal
from fractions import Fraction

from hypothesis import given, settings
from hypothesis import strategies as st

from pricing.catalog import Cost, load_catalog
from pricing.money import convert, plain, round_up_to_micro, to_micros
from pricing.quote import quote, upstream_cost
from pricing.request import resolve_request

CATALOG = load_catalog()
RATES = CATALOG.default_rates()

# Decimals as people write them: up to 12 places, up to 10^9.
figures = st.decimals(
    min_value=Decimal(0), max_value=Decimal(10) ** 9, places=12, allow_nan=False
).map(lambda d: d.normalize())
rates = st.decimals(
    min_value=Decimal("0.000001"), max_value=Decimal(10) ** 6, places=9, allow_nan=False
)


@settings(max_examples=300, deadline=None)
@given(figures, rates)
def test_conversion_is_the_exact_product_rounded_up_once(amount: Decimal, rate: Decimal) -> None:
    exact = Fraction(amount) * Fraction(rate)
    assert Fraction(convert(amount, rate)) == exact  # no rounding before the one
    micros = to_micros(convert(amount, rate))
    assert micros == math.ceil(exact * 1_000_000)  # the ceiling, never below the cost
    assert Fraction(micros, 1_000_000) - exact < Fraction(1, 1_000_000)


@settings(max_examples=300, deadline=None)
@given(figures, rates, rates)
def test_conversion_does_not_depend_on_grouping(amount: Decimal, a: Decimal, b: Decimal) -> None:
    assert to_micros(convert(convert(amount, a), b)) == to_micros(convert(amount, a * b))


@settings(max_examples=200, deadline=None)
@given(figures)
def test_round_up_to_micro_is_the_smallest_micro_figure_not_below(amount: Decimal) -> None:
    rounded = round_up_to_micro(amount)
    assert rounded >= amount
    assert rounded - amount < Decimal("0.000001")
    assert rounded * 1_000_000 == int(rounded * 1_000_000)


def test_seed_example_sd35_turbo_costs_exactly_0_0064_yuan() -> None:
    entry = CATALOG.model("stable-diffusion-3-5-large-turbo")
    assert entry is not None
    request = resolve_request(entry, {"prompt": "p", "size": "1024x512"})
    q = quote(entry, "default", CATALOG.groups["default"], request, rates=RATES)
    assert (q.cost_currency, q.exact_cost_native) == ("CNY", Decimal("0.0064"))
    assert q.exact_cost == Decimal("0.000896")  # 0.0064 × 0.14
    assert q.cost_micros == 896
    # The sale price: 0.5 MP × 4 steps × 0.000672 credits.
    assert q.amount_micros == 1344
    cost = upstream_cost(q.to_json(), 1)
    assert (cost.amount, cost.currency, cost.micros) == (Decimal("0.0064"), "CNY", 896)


def test_seed_example_flux_pro_costs_exactly_0_37_yuan_per_image() -> None:
    entry = CATALOG.model("flux-1-pro")
    assert entry is not None
    request = resolve_request(entry, {"prompt": "p", "size": "1024x512", "n": 2})
    q = quote(entry, "default", CATALOG.groups["default"], request, rates=RATES)
    assert (q.cost_currency, q.exact_cost_native) == ("CNY", Decimal("0.74"))
    one = upstream_cost(q.to_json(), 1)  # one image of two delivered
    assert (one.amount, one.micros) == (Decimal("0.37"), 51_800)


def test_a_channel_cost_in_another_currency_is_converted_at_the_quoted_rate() -> None:
    entry = CATALOG.model("flux-1-pro")
    assert entry is not None
    request = resolve_request(entry, {"prompt": "p", "n": 2})
    q = quote(entry, "default", CATALOG.groups["default"], request, rates=RATES)
    own = Cost.model_validate({"currency": "USD", "rule": "per_image", "amount": "0.05"})
    cost = upstream_cost(q.to_json(), 2, own, request)
    assert (str(cost.amount), cost.currency, cost.micros) == ("0.1", "USD", 100_000)
    # A currency the quote has no rate for falls back to the quote's own cost.
    unknown = Cost.model_validate({"currency": "EUR", "rule": "per_image", "amount": "9"})
    assert upstream_cost(q.to_json(), 2, unknown, request).currency == "CNY"


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 4), st.data())
def test_fewer_images_cost_exactly_their_share_in_the_upstreams_currency(
    asked: int, data: st.DataObject
) -> None:
    delivered = data.draw(st.integers(0, asked))
    entry = CATALOG.model("flux-1-pro")
    assert entry is not None
    request = resolve_request(entry, {"prompt": "p", "n": asked})
    q = quote(entry, "default", CATALOG.groups["default"], request, rates=RATES)
    cost = upstream_cost(q.to_json(), delivered)
    assert cost.amount == Decimal("0.37") * delivered  # exact: no 0.666… share
    assert cost.micros == math.ceil(Fraction(cost.amount) * Fraction(RATES["CNY"]) * 10**6)
    assert str(cost.amount) == str(plain(cost.amount))
    assert "E" not in str(cost.amount)


def test_plain_never_writes_an_exponent() -> None:
    assert str(plain(Decimal("200"))) == "200"
    assert str(plain(Decimal("0.100"))) == "0.1"
    assert str(round_up_to_micro(Decimal("10"))) == "10"
