"""The model catalogue: which models Tollgate sells, what each accepts, what each costs.

The catalogue is data (``pricing/catalog.toml`` unless an operator points
``TOLLGATE_CATALOG_PATH`` elsewhere). This module reads and validates it; a
malformed file raises ``CatalogError`` naming the entry and the field, so a
gateway or worker refuses to start rather than sell a model it cannot price.

Rules the loader enforces:
- model ids are unique; every group's per-model prices name a known model;
- a model has either a table of named ``sizes`` (size × quality → pixels) or
  ``dimensions`` bounds for ``WxH`` sizes, never both;
- ``per_megapixel_step`` pricing needs a ``num_inference_steps`` parameter;
- ``upstream_size = "aspect_ratio"`` needs named ``sizes`` whose names are
  ratios ``W:H`` of whole numbers;
- prices are decimal strings (never TOML floats, which are binary fractions);
- an ``upstream_cost`` names its currency (``USD``, ``CNY``, ``KCU``…), and that
  currency has a default rate in ``[exchange_rates]``;
- a model without a ``price`` gets the default sale price: each figure of its
  upstream cost × the currency's rate × ``default_markup``, rounded up to the
  micro-credit (``derive_price``; docs/catalog.md).
"""

import re
import tomllib
from collections.abc import Mapping
from decimal import Decimal, localcontext
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from pricing.money import EXACT, MoneyError, parse_credits, round_up_to_micro

DEFAULT_CATALOG_PATH = Path(__file__).with_name("catalog.toml")

# Fields of the unified request that every model takes; everything else a
# request may carry is a per-model parameter declared in the catalogue.
COMMON_FIELDS = ("model", "prompt", "size", "quality", "callback_url")

_ASPECT_RATIO = re.compile(r"[1-9][0-9]*:[1-9][0-9]*")
CURRENCY_PATTERN = r"^[A-Z]{3}$"
_MONEY_FIELDS = ("amount", "with_style_references", "with_moodboard")


class CatalogError(ValueError):
    """The catalogue cannot be used; the message names the entry and field."""


def _credits(value: object) -> Decimal:
    if not isinstance(value, str):
        raise ValueError('must be a decimal string such as "0.0032", not a TOML number')
    try:
        return parse_credits(value)
    except MoneyError as exc:
        raise ValueError(str(exc)) from exc


Credits = Annotated[Decimal, BeforeValidator(_credits)]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ParamSpec(_Frozen):
    """One optional request field a model accepts, with its range and default."""

    type: Literal["int", "bool", "str", "enum", "list"]
    description: str = ""
    min: int | None = None
    max: int | None = None
    max_length: int | None = None
    max_items: int | None = None
    values: tuple[str, ...] | None = None
    default: int | bool | str | None = None
    # The upstream ignores the field and always uses this value (for example
    # 4 steps for turbo models): a request may send it, but only this value.
    fixed: int | None = None

    @model_validator(mode="after")
    def _consistent(self) -> "ParamSpec":
        if self.type == "enum" and not self.values:
            raise ValueError("an enum parameter needs `values`")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError("`min` is greater than `max`")
        if self.default is not None and self.fixed is not None:
            raise ValueError("give `default` or `fixed`, not both")
        if self.default is not None:
            self._check_default(self.default)
        return self

    def _check_default(self, value: int | bool | str) -> None:
        if self.type == "bool":
            ok = isinstance(value, bool)
        elif self.type == "int":
            ok = (
                isinstance(value, int)
                and not isinstance(value, bool)
                and (self.min is None or value >= self.min)
                and (self.max is None or value <= self.max)
            )
        elif self.type == "enum":
            ok = value in (self.values or ())
        elif self.type == "str":
            ok = isinstance(value, str)
        else:
            ok = False  # a list parameter has no default
        if not ok:
            raise ValueError(f"`default` {value!r} is not a valid value of this parameter")


class Dimensions(_Frozen):
    """Bounds for models that take ``size`` as ``WxH`` pixels."""

    min_side: int = Field(ge=64)
    max_side: int = Field(ge=64)
    multiple_of: int = Field(default=8, ge=1)
    max_pixels: int = Field(ge=4096)
    default: str = "1024x1024"

    @model_validator(mode="after")
    def _consistent(self) -> "Dimensions":
        if self.min_side > self.max_side:
            raise ValueError("`min_side` is greater than `max_side`")
        width, _, height = self.default.partition("x")
        if not (width.isdigit() and height.isdigit()):
            raise ValueError("`default` must be WIDTHxHEIGHT")
        w, h = int(width), int(height)
        sides_ok = all(
            self.min_side <= side <= self.max_side and side % self.multiple_of == 0
            for side in (w, h)
        )
        if not sides_ok or w * h > self.max_pixels:
            raise ValueError(f"`default` {self.default} is outside these bounds")
        return self


class Price(_Frozen):
    """How a generation of one model is priced, in credits.

    ``amount`` is per generation (``per_call``), per image (``per_image``) or
    per megapixel (2**20 pixels) per step per image (``per_megapixel_step``).
    ``by_quality`` replaces ``amount`` for a quality tier. The surcharges are the
    price with style references or with a moodboard (Krea 2); with both, the
    moodboard price applies, not the sum.
    """

    rule: Literal["per_call", "per_image", "per_megapixel_step"]
    amount: Credits
    by_quality: dict[str, Credits] = Field(default_factory=dict)
    with_style_references: Credits | None = None
    with_moodboard: Credits | None = None


class Cost(Price):
    """What an upstream charges for a generation, in its own ``currency`` (USD, CNY, KCU…);
    without one, in credits."""

    currency: str | None = Field(default=None, pattern=CURRENCY_PATTERN)


class ModelEntry(_Frozen):
    id: str = Field(pattern=r"^[a-z0-9][a-z0-9.\-]*$")
    name: str
    provider: str
    upstream_model: str
    description: str = ""
    images_per_generation: int = Field(ge=1, le=16)
    estimated_seconds: int = Field(ge=0)
    max_resolution: str
    prompt_max_chars: int = Field(ge=1)
    can_cancel: bool = False
    sizes: dict[str, dict[str, tuple[int, int]]] | None = None
    default_size: str | None = None
    default_quality: str | None = None
    dimensions: Dimensions | None = None
    # How the size reaches an upstream that takes either form (Black Forest Labs): `pixels`
    # as width and height, `aspect_ratio` as the size's name. Adapters with one form ignore it.
    upstream_size: Literal["pixels", "aspect_ratio"] | None = None
    params: dict[str, ParamSpec] = Field(default_factory=dict)
    price: Price
    # What the upstream charges Tollgate, in its own currency; the same figures as
    # `price`, in credits, when absent.
    upstream_cost: Cost | None = None

    @model_validator(mode="after")
    def _consistent(self) -> "ModelEntry":
        if (self.sizes is None) == (self.dimensions is None):
            raise ValueError("give exactly one of `sizes` (named sizes) or `dimensions` (WxH)")
        if self.sizes is not None:
            if not self.sizes:
                raise ValueError("`sizes` is empty")
            if self.default_size not in self.sizes:
                raise ValueError(f"`default_size` {self.default_size!r} is not one of `sizes`")
            qualities = self.qualities
            if self.default_quality not in qualities:
                raise ValueError(f"`default_quality` {self.default_quality!r} is not offered")
            for size, by_quality in self.sizes.items():
                if set(by_quality) != set(qualities):
                    raise ValueError(f"size {size!r} does not list every quality {qualities}")
        if self.upstream_size == "aspect_ratio":
            if self.sizes is None:
                raise ValueError('`upstream_size = "aspect_ratio"` needs named `sizes`')
            for size in self.sizes:
                if not _ASPECT_RATIO.fullmatch(size):
                    raise ValueError(
                        f"size {size!r} is not an aspect ratio W:H, as `upstream_size = "
                        '"aspect_ratio"` needs'
                    )
        for common in COMMON_FIELDS:
            if common in self.params:
                raise ValueError(f"`params.{common}` is a common field, not a parameter")
        steps = self.params.get("num_inference_steps")
        if steps is not None and steps.default is None and steps.fixed is None:
            raise ValueError("`params.num_inference_steps` needs a `default` or `fixed` value")
        for price in (self.price, self.upstream_cost):
            if price is not None:
                self.check_price(price)
        return self

    def check_price(self, price: "Price") -> None:
        """A price (list, upstream cost or a group's own) must fit this model."""
        if price.rule == "per_megapixel_step" and "num_inference_steps" not in self.params:
            raise ValueError("per_megapixel_step pricing needs a `num_inference_steps` parameter")
        unknown = set(price.by_quality) - set(self.qualities)
        if unknown:
            raise ValueError(f"price for unknown quality {sorted(unknown)}")

    @property
    def qualities(self) -> tuple[str, ...]:
        if not self.sizes:
            return ()
        return tuple(next(iter(self.sizes.values())))

    @property
    def cost(self) -> Price:
        return self.upstream_cost or self.price

    @property
    def cost_currency(self) -> str | None:
        """The upstream cost's currency; None when it is the price itself, in credits."""
        return self.upstream_cost.currency if self.upstream_cost else None

    def max_images(self) -> int:
        spec = self.params.get("n")
        if spec is not None and spec.max is not None:
            return spec.max
        return self.images_per_generation


class Group(_Frozen):
    """A user group: a multiplier on list prices, or its own price per model."""

    multiplier: Credits = Decimal(1)
    prices: dict[str, Price] = Field(default_factory=dict)


def derive_price(cost: Mapping[str, Any], rate: Decimal, markup: Decimal) -> dict[str, Any]:
    """The default sale price of an upstream cost: every figure × rate × markup, rounded up
    to the micro-credit (ADR 0001). Same rule and modifiers as the cost."""

    def sale(text: Any) -> str:
        with localcontext(EXACT):
            return str(round_up_to_micro(_credits(text) * rate * markup))

    price: dict[str, Any] = {"rule": cost.get("rule")} if "rule" in cost else {}
    for name in _MONEY_FIELDS:
        if cost.get(name) is not None:
            price[name] = sale(cost[name])
    if cost.get("by_quality"):
        price["by_quality"] = {tier: sale(v) for tier, v in dict(cost["by_quality"]).items()}
    return price


class Catalog(_Frozen):
    """The models, the groups, and the money settings of the prices in the file.

    ``credit_currency`` is the currency the prices are in (one credit, one unit);
    ``exchange_rates`` the default credits per unit of each upstream currency (the
    operator's rates in the database take precedence, ``gateway/prices``);
    ``default_markup`` the factor of a default sale price over the upstream cost.
    """

    models: tuple[ModelEntry, ...]
    groups: dict[str, Group] = Field(default_factory=lambda: {"default": Group()})
    credit_currency: str = Field(default="USD", pattern=CURRENCY_PATTERN)
    exchange_rates: dict[str, Credits] = Field(default_factory=dict)
    default_markup: Credits = Decimal("1.5")

    @model_validator(mode="before")
    @classmethod
    def _derive_prices(cls, raw: Any) -> Any:
        """Give a model without a ``price`` its default sale price from its upstream cost."""
        if not isinstance(raw, Mapping) or not isinstance(raw.get("models"), list | tuple):
            return raw
        credit = raw.get("credit_currency", "USD")
        rates = dict(raw.get("exchange_rates") or {})
        markup = raw.get("default_markup", "1.5")
        models = []
        for entry in raw["models"]:
            if isinstance(entry, Mapping) and "price" not in entry:
                cost = entry.get("upstream_cost")
                if isinstance(cost, Mapping):
                    currency = cost.get("currency")
                    rate_text = "1" if currency in (None, credit) else rates.get(currency)
                    if rate_text is None:
                        raise ValueError(
                            f"model {entry.get('id')!r}: no `price`, and no rate in "
                            f"`exchange_rates` for its upstream currency {currency!r} to derive one"
                        )
                    try:
                        price = derive_price(cost, _credits(rate_text), _credits(markup))
                    except (TypeError, ValueError):
                        # A malformed figure: validation reports it at its field.
                        models.append(entry)
                        continue
                    entry = {**entry, "price": price}
            models.append(entry)
        return {**raw, "models": models}

    @model_validator(mode="after")
    def _consistent(self) -> "Catalog":
        seen: set[str] = set()
        for entry in self.models:
            if entry.id in seen:
                raise ValueError(f"model id {entry.id!r} appears twice")
            seen.add(entry.id)
        if "default" not in self.groups:
            raise ValueError("there must be a `default` group")
        for entry in self.models:
            currency = entry.upstream_cost.currency if entry.upstream_cost else None
            if currency not in (None, self.credit_currency, *self.exchange_rates):
                raise ValueError(
                    f"model {entry.id!r}: upstream currency {currency!r} has no rate in "
                    "`exchange_rates`"
                )
        by_id = {entry.id: entry for entry in self.models}
        for name, group in self.groups.items():
            unknown = set(group.prices) - seen
            if unknown:
                raise ValueError(f"group {name!r} prices unknown models {sorted(unknown)}")
            for model_id, price in group.prices.items():
                try:
                    by_id[model_id].check_price(price)
                except ValueError as exc:
                    raise ValueError(f"group {name!r}, price of {model_id}: {exc}") from None
        return self

    def default_rates(self) -> dict[str, Decimal]:
        """Credits per unit of each currency the file knows; the credit currency is 1."""
        return {**self.exchange_rates, self.credit_currency: Decimal(1)}

    def model(self, model_id: str) -> ModelEntry | None:
        return self._by_id().get(model_id)

    def _by_id(self) -> Mapping[str, ModelEntry]:
        by_id: dict[str, ModelEntry] | None = self.__dict__.get("_by_id_cache")
        if by_id is None:
            by_id = {entry.id: entry for entry in self.models}
            # Frozen model: cache the index on the instance dict, computed once.
            object.__setattr__(self, "_by_id_cache", by_id)
        return by_id


def _where(raw: Mapping[str, Any], loc: tuple[int | str, ...]) -> str:
    """Render a pydantic location, naming a model by its id rather than its index."""
    parts: list[str] = []
    for i, part in enumerate(loc):
        if loc[:1] == ("models",) and i == 1 and isinstance(part, int):
            models = raw.get("models") or []
            entry = models[part] if part < len(models) else None
            ident = entry.get("id") if isinstance(entry, dict) else None
            parts.append(f"[{part}] ({ident})" if ident else f"[{part}]")
        elif isinstance(part, int):
            parts.append(f"[{part}]")
        else:
            parts.append(f".{part}" if parts else str(part))
    return "".join(parts)


def parse_catalog(raw: Mapping[str, Any]) -> Catalog:
    try:
        return Catalog.model_validate(raw)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = tuple(p for p in err["loc"] if not str(p).startswith("function-"))
            problems.append(f"{_where(raw, loc) or 'catalog'}: {err['msg']}")
        raise CatalogError("invalid model catalogue:\n  " + "\n  ".join(problems)) from None


def load_catalog(path: Path | str | None = None) -> Catalog:
    """Read and validate a catalogue file; raises CatalogError with a readable message."""
    file = Path(path) if path else DEFAULT_CATALOG_PATH
    try:
        raw = tomllib.loads(file.read_text(encoding="utf-8"))
    except OSError as exc:
        raise CatalogError(f"cannot read model catalogue {file}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise CatalogError(f"model catalogue {file} is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise CatalogError(f"model catalogue {file} is not valid TOML: {exc}") from None
    try:
        return parse_catalog(raw)
    except CatalogError as exc:
        raise CatalogError(f"{file}: {exc}") from None
