"""What is negotiated over: the library of 930 real products, and custom scenarios.

The library is the paper's *AmazonHistoryPrice* data set (``data/amazon-price-history.json``;
attribution and Apache-2.0 licence in ``data/NOTICE.md`` and
``data/LICENSE-AmazonHistoryPrice.txt``), read once per process. A product becomes a scenario by
the paper's recipe (its ``product.py``): the public list price is
``max(list_price, highest_price)``, the seller's private cost is ``lowest_price``, the buyer's
private budget is ``budget_ratio`` (0.8) x that list price. Money is rounded to cents, the unit
every offer is made in.

A product's ``index`` is its 0-based position in the file: stable as long as the file is (it is
shipped, never edited), and what ``"scenario": <index>`` and ``/api/v1/scenarios/{index}`` name.
Pure: no Django, no database; the only I/O is the one read of the bundled file.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib.resources import files
from typing import Any

import orjson

from llm.exceptions import ClientError
from negotiation.rules import MAX_PRICE, MIN_PRICE, finite_float, round_cents

__all__ = [
    "DATA_FILE",
    "DEFAULT_BUDGET_RATIO",
    "Item",
    "Product",
    "Scenario",
    "ScenarioNotFound",
    "categories",
    "custom",
    "from_library",
    "get_product",
    "products",
    "search",
]

DATA_FILE = "amazon-price-history.json"
# The paper's buyer budget: 0.8 x the list price (its run_2stages.sh).
DEFAULT_BUDGET_RATIO = 0.8
_PRICE_FIELDS = ("list_price", "highest_price", "lowest_price", "average_price", "current_price")


class ScenarioNotFound(ClientError, LookupError):
    """No product of the library has that index."""

    code = "SCENARIO_NOT_FOUND"
    status = 404


@dataclass(frozen=True, slots=True)
class Item:
    title: str
    category: str = ""

    def as_dict(self) -> dict[str, str]:
        return {"title": self.title, "category": self.category}


@dataclass(frozen=True, slots=True)
class Scenario:
    """One negotiation's item and money. ``buyer_budget`` is private to the buyer, ``seller_cost``
    to the seller; ``index`` is the library product it comes from (None for a custom one)."""

    item: Item
    list_price: float
    buyer_budget: float
    seller_cost: float
    index: int | None = None

    @property
    def mutual_interest(self) -> bool:
        """Whether a deal can profit both sides: the seller's cost is below the buyer's budget."""
        return self.seller_cost < self.buyer_budget

    def as_dict(self, private: bool = True) -> dict[str, Any]:
        """The contract's scenario shape; ``private=False`` leaves out the budget and the cost
        (what either side, or the public, may see)."""
        data: dict[str, Any] = {}
        if self.index is not None:
            data["index"] = self.index
        data["item"] = self.item.as_dict()
        data["list_price"] = self.list_price
        if private:
            data["buyer_budget"] = self.buyer_budget
            data["seller_cost"] = self.seller_cost
        return data


@dataclass(frozen=True, slots=True)
class Product:
    """One row of the library, prices in US dollars as the data set has them."""

    index: int
    title: str
    category: str
    list_price: float
    highest_price: float
    lowest_price: float
    average_price: float
    current_price: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "title": self.title,
            "category": self.category,
            "list_price": self.list_price,
            "highest_price": self.highest_price,
            "lowest_price": self.lowest_price,
            "average_price": self.average_price,
            "current_price": self.current_price,
        }

    def scenario(self, budget_ratio: float = DEFAULT_BUDGET_RATIO) -> Scenario:
        """This product as a scenario, by the paper's recipe (see the module)."""
        ratio = finite_float(budget_ratio)
        if ratio is None or ratio <= 0:
            raise ValueError(f"budget_ratio must be a finite number > 0, not {budget_ratio!r}")
        list_price = round_cents(max(self.list_price, self.highest_price))
        budget = round_cents(ratio * list_price)
        if not MIN_PRICE <= budget <= MAX_PRICE:
            raise ValueError(
                f"budget_ratio {budget_ratio!r} gives a budget of ${budget:,.2f} for a list price "
                f"of ${list_price:,.2f}: outside [${MIN_PRICE}, ${MAX_PRICE:,.0f}]"
            )
        return Scenario(
            item=Item(self.title, self.category),
            list_price=list_price,
            buyer_budget=budget,
            seller_cost=round_cents(self.lowest_price),
            index=self.index,
        )


def _product(index: int, row: object) -> Product:
    """A row of the data file, checked: a broken file fails loudly at the first read."""
    if not isinstance(row, dict):
        raise ValueError(f"{DATA_FILE}: row {index} is not an object")
    title, category = row.get("title"), row.get("category")
    if not isinstance(title, str) or not title.strip():
        raise ValueError(f"{DATA_FILE}: row {index} has no title")
    if not isinstance(category, str):
        raise ValueError(f"{DATA_FILE}: row {index} has no category")
    prices = {}
    for field in _PRICE_FIELDS:
        value = finite_float(row.get(field))
        if value is None or value <= 0:
            raise ValueError(f"{DATA_FILE}: row {index} has no valid {field}")
        prices[field] = value
    return Product(index=index, title=title.strip(), category=category.strip(), **prices)


@functools.cache
def products() -> tuple[Product, ...]:
    """The whole library, in file order (``products()[i].index == i``), read once per process."""
    raw = files("negotiation").joinpath("data", DATA_FILE).read_bytes()
    rows = orjson.loads(raw)
    if not isinstance(rows, list):
        raise ValueError(f"{DATA_FILE} is not a JSON list")
    return tuple(_product(index, row) for index, row in enumerate(rows))


def get_product(index: int) -> Product:
    """The library's product ``index``; `ScenarioNotFound` for anything else (a negative index
    does not count from the end)."""
    library = products()
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(library):
        raise ScenarioNotFound(
            f"no scenario {index!r}: the library's scenarios are 0 to {len(library) - 1}"
        )
    return library[index]


def from_library(index: int, budget_ratio: float = DEFAULT_BUDGET_RATIO) -> Scenario:
    """The scenario of the library's product ``index`` (see the module for the recipe).

    Raises `ScenarioNotFound` for an unknown index, ValueError for a ``budget_ratio`` that is not
    a finite number > 0 (or so small the budget rounds to $0.00).
    """
    return get_product(index).scenario(budget_ratio)


def custom(
    title: str,
    list_price: float,
    buyer_budget: float,
    seller_cost: float,
    category: str = "",
) -> Scenario:
    """A scenario the client describes. The API schema validates its input first; this refuses
    nonsense too (ValueError): an empty title, a price that is not a finite number from $0.01 to
    `MAX_PRICE` once rounded to cents."""
    if not isinstance(title, str) or not title.strip():
        raise ValueError("title must be a non-empty string")
    if not isinstance(category, str):
        raise ValueError("category must be a string")
    money = {}
    for name, value in (
        ("list_price", list_price),
        ("buyer_budget", buyer_budget),
        ("seller_cost", seller_cost),
    ):
        number = finite_float(value)
        if number is None or not MIN_PRICE <= round_cents(number) <= MAX_PRICE:
            raise ValueError(
                f"{name} must be a finite number from ${MIN_PRICE} to ${MAX_PRICE:,.0f}, "
                f"not {value!r}"
            )
        money[name] = round_cents(number)
    return Scenario(
        item=Item(title.strip(), category.strip()),
        list_price=money["list_price"],
        buyer_budget=money["buyer_budget"],
        seller_cost=money["seller_cost"],
    )


def search(*, category: str | None = None, text: str | None = None) -> list[Product]:
    """The library's products in ``category`` (exact, any case) whose title contains every word
    of ``text`` (any case, anywhere), in library order. None or blank filters nothing."""
    wanted = category.strip().casefold() if category and category.strip() else None
    words = text.casefold().split() if text else []
    return [
        product
        for product in products()
        if (wanted is None or product.category.casefold() == wanted)
        and all(word in product.title.casefold() for word in words)
    ]


@functools.cache
def _categories() -> tuple[str, ...]:
    return tuple(sorted({product.category for product in products()}))


def categories() -> list[str]:
    """The library's categories, sorted, each once."""
    return list(_categories())
