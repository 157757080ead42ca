"""Money: integer micro-credits everywhere, ``Decimal`` only while quoting.

One credit is 1,000,000 micro-credits. A quote is computed exactly (as a
``Decimal`` with enough precision for every product of catalogue figures) and
rounded once, up to the next whole micro-credit, so Tollgate never charges less
than the price list says (docs/adr/0001-money-unit-and-rounding.md).
Amounts become decimals again only when rendered into JSON.
"""

from decimal import ROUND_CEILING, Context, Decimal, InvalidOperation, localcontext

MICROS_PER_CREDIT = 1_000_000
_MICRO = Decimal(1) / MICROS_PER_CREDIT

# Wide enough that no product of catalogue figures is ever rounded before the
# one rounding this module does: quoting runs inside ``exact()``.
EXACT = Context(prec=100)


class MoneyError(ValueError):
    """A money figure that is not a finite, non-negative decimal."""


def parse_credits(text: str) -> Decimal:
    """Read a price from text (never from a float) as an exact Decimal."""
    try:
        value = EXACT.create_decimal(text)
    except InvalidOperation as exc:
        raise MoneyError(f"{text!r} is not a decimal number") from exc
    if not value.is_finite() or value < 0:
        raise MoneyError(f"{text!r} must be a finite, non-negative number")
    return value


def to_micros(amount: Decimal) -> int:
    """Round an exact credit amount up to whole micro-credits: the one rounding rule."""
    with localcontext(EXACT):
        return int((amount / _MICRO).to_integral_value(rounding=ROUND_CEILING))


def plain(value: Decimal) -> Decimal:
    """The same number without trailing zeros, and never in exponent form (10, not 1E+1)."""
    with localcontext(EXACT):
        value = value.normalize()
    return value.quantize(Decimal(1)) if value == value.to_integral_value() else value


def round_up_to_micro(amount: Decimal) -> Decimal:
    """``amount`` rounded up to a whole micro-credit, as a Decimal (ADR 0001's one rounding)."""
    with localcontext(EXACT):
        return plain(Decimal(to_micros(amount)) / MICROS_PER_CREDIT)


def convert(amount: Decimal, rate: Decimal) -> Decimal:
    """``amount`` of a currency in credits at ``rate`` credits per unit: exact, unrounded.

    The product is exact (a 100-digit context holds any product of catalogue figures);
    the caller rounds once, up, with ``to_micros`` (ADR 0001).
    """
    with localcontext(EXACT):
        return amount * rate


def credits_from_micros(micros: int) -> Decimal:
    """The decimal credit figure of a micro-credit amount, for rendering."""
    with localcontext(EXACT):
        return plain(Decimal(micros) / MICROS_PER_CREDIT)


def micros_from_signed_text(text: str) -> int:
    """As ``micros_from_text``, but a leading minus is allowed (adjustments)."""
    text = text.strip()
    if text.startswith("-"):
        return -micros_from_text(text[1:])
    return micros_from_text(text)


def micros_from_text(text: str) -> int:
    """Parse a credit amount given by a person ("12.5") into micro-credits, exactly.

    Refuses more precision than a micro-credit rather than rounding a payment.
    """
    value = parse_credits(text)
    with localcontext(EXACT):
        micros = value * MICROS_PER_CREDIT
    if micros != micros.to_integral_value():
        raise MoneyError(f"{text!r} has more decimal places than a micro-credit (6)")
    return int(micros)
