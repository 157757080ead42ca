"""Quote a validated request: the charge to the tenant and the upstream's cost.

Three rules, chosen per model in the catalogue:

- ``per_call``: one price per generation, whatever number of images it returns;
- ``per_image``: price × images;
- ``per_megapixel_step``: (width × height / 1,048,576) × steps × price × images.

The unit price is the model's list price, or the group's own price for the
model; a group without its own price multiplies the list price. Quality tiers
and the Krea 2 surcharges (style references, moodboard; both together cost the
moodboard price) choose the unit price before the rule applies. All arithmetic
is exact ``Decimal``; the one rounding (up, to a micro-credit) happens last.

The upstream cost is priced the same way from the model's ``upstream_cost`` (or a
channel's own cost, at settlement) in the upstream's currency, then converted to
credits at the rates in force when the task was quoted (kept in the quote), and
rounded up on its own.

A quote made at submit is the most the task can cost; ``quote`` with a smaller
``images`` gives the charge when fewer images came back.
"""

from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal, localcontext
from typing import Any

from pricing.catalog import Cost, Group, ModelEntry, Price
from pricing.money import EXACT, plain, to_micros
from pricing.request import ImageRequest

MEGAPIXEL = 1_048_576


@dataclass(frozen=True, slots=True)
class Quote:
    billing_rule: str
    amount_micros: int
    cost_micros: int
    units: dict[str, int | str]
    breakdown: tuple[str, ...]
    # The unrounded figures and the images they count, kept with the task so
    # that settlement uses this quote, never a later price list.
    images: int = 1
    exact_amount: Decimal = Decimal(0)
    exact_cost: Decimal = Decimal(0)
    # The upstream cost in its own currency (None: in credits), and the rates in force.
    cost_currency: str | None = None
    exact_cost_native: Decimal = Decimal(0)
    rates: Mapping[str, Decimal] | None = None

    def to_json(self) -> dict[str, object]:
        return {
            "billing_rule": self.billing_rule,
            "amount_micros": self.amount_micros,
            "cost_micros": self.cost_micros,
            "units": self.units,
            "breakdown": list(self.breakdown),
            "images": self.images,
            "exact_amount": str(self.exact_amount),
            "exact_cost": str(self.exact_cost),
            "cost_currency": self.cost_currency,
            "exact_cost_native": str(self.exact_cost_native),
            "rates": {k: str(v) for k, v in (self.rates or {}).items()},
        }


@dataclass(frozen=True, slots=True)
class UpstreamCost:
    """A task's upstream cost: exact, in its currency, and in micro-credits (rounded up)."""

    amount: Decimal
    currency: str | None
    micros: int


def upstream_cost(
    quoted: Mapping[str, Any],
    delivered: int,
    price: Cost | None = None,
    request: ImageRequest | None = None,
) -> UpstreamCost:
    """The upstream cost of a task quoted ``quoted`` that gave ``delivered`` images.

    ``price`` is the cost of the channel that made it when the channel has its own;
    otherwise the quote's catalogue cost, scaled like the charge. Converted at the
    quote's rates (the rates in force when the task was priced); a currency the quote
    has no rate for falls back to the quote's own cost.
    """
    rates = {k: Decimal(v) for k, v in dict(quoted.get("rates") or {}).items()}
    with localcontext(EXACT):
        if price is not None and request is not None and price.currency in rates:
            counted = int(quoted["images"]) if price.rule == "per_call" else delivered
            native, _, _ = _amount(price, request, min(counted, int(quoted["images"])))
            cost = native * rates[price.currency]
            return UpstreamCost(plain(native), price.currency, to_micros(cost))
        quoted_images = int(quoted["images"])
        native = Decimal(quoted.get("exact_cost_native") or quoted["exact_cost"])
        exact = Decimal(quoted["exact_cost"])
        if quoted["billing_rule"] != "per_call" and 0 <= delivered < quoted_images:
            # Multiplied, then divided: the quoted figure is a multiple of its images, so
            # the share of the delivered ones is exact (1.11 × 2 / 3 = 0.74).
            native = native * delivered / quoted_images
            exact = exact * delivered / quoted_images
        return UpstreamCost(plain(native), quoted.get("cost_currency"), to_micros(exact))


def settlement(quote: Mapping[str, Any], delivered: int) -> tuple[int, int]:
    """(charge, cost) in micro-credits of a task quoted ``quote`` that gave ``delivered`` images.

    ``per_call`` costs the same whatever came back. The image-counting rules
    scale the exact quoted amount by delivered / quoted images, rounded once;
    never more than was reserved.
    """
    reserved, cost = int(quote["amount_micros"]), int(quote["cost_micros"])
    quoted = int(quote["images"])
    if quote["billing_rule"] == "per_call" or delivered >= quoted:
        return reserved, cost
    with localcontext(EXACT):
        # Multiplied, then divided: exact, as the quoted figure is a multiple of its images.
        delivered = max(delivered, 0)
        charge = to_micros(Decimal(quote["exact_amount"]) * delivered / quoted)
        actual_cost = to_micros(Decimal(quote["exact_cost"]) * delivered / quoted)
    return min(charge, reserved), min(actual_cost, cost)


def _unit_price(price: Price, request: ImageRequest) -> tuple[Decimal, str]:
    if request.has_moodboard and price.with_moodboard is not None:
        return price.with_moodboard, "with moodboard"
    if request.has_style_references and price.with_style_references is not None:
        return price.with_style_references, "with style references"
    if request.quality is not None and request.quality in price.by_quality:
        return price.by_quality[request.quality], f"quality {request.quality}"
    return price.amount, "list price"


def _amount(
    price: Price, request: ImageRequest, images: int
) -> tuple[Decimal, dict[str, int | str], str]:
    unit, why = _unit_price(price, request)
    if price.rule == "per_call":
        return unit, {"calls": 1}, f"{unit} per call ({why})"
    if price.rule == "per_image":
        return unit * images, {"images": images}, f"{unit} per image ({why}) × {images} image(s)"
    steps = request.steps or 0
    pixels = request.width * request.height
    megapixels = Decimal(pixels) / MEGAPIXEL
    amount = megapixels * steps * unit * images
    units: dict[str, int | str] = {"images": images, "pixels": pixels, "steps": steps}
    line = (
        f"{request.width}×{request.height} = {megapixels} MP × {steps} step(s) × "
        f"{unit} per MP-step ({why}) × {images} image(s)"
    )
    return amount, units, line


def quote(
    entry: ModelEntry,
    group_name: str,
    group: Group,
    request: ImageRequest,
    *,
    images: int | None = None,
    rates: Mapping[str, Decimal] | None = None,
) -> Quote:
    """The charge and cost of ``request``, or of the same request yielding ``images`` images.

    ``rates``: credits per unit of each upstream currency (the operator's, in force now).
    """
    with localcontext(EXACT):
        return _quote(
            entry,
            group_name,
            group,
            request,
            request.images if images is None else images,
            rates or {},
        )


def _quote(
    entry: ModelEntry,
    group_name: str,
    group: Group,
    request: ImageRequest,
    counted: int,
    rates: Mapping[str, Decimal],
) -> Quote:
    own_price = group.prices.get(entry.id)
    price = own_price or entry.price
    amount, units, line = _amount(price, request, counted)
    lines = [f"{entry.id}: {price.rule}: {line} = {amount} credits"]
    if own_price is None and group.multiplier != 1:
        amount *= group.multiplier
        lines.append(f"group {group_name}: × {group.multiplier} = {amount} credits")
    elif own_price is not None:
        lines.append(f"group {group_name}: its own price for {entry.id}")
    amount_micros = to_micros(amount)
    lines.append(f"rounded up to the micro-credit: {amount_micros} micro-credits")
    native, _, _ = _amount(entry.cost, request, counted)
    currency = entry.cost_currency
    cost = native if currency is None else native * rates[currency]
    return Quote(
        billing_rule=price.rule,
        amount_micros=amount_micros,
        cost_micros=to_micros(cost),
        units=units,
        breakdown=tuple(lines),
        images=counted,
        exact_amount=amount,
        exact_cost=cost,
        cost_currency=currency,
        exact_cost_native=native,
        rates=dict(rates),
    )
