"""The scenario library (`negotiation.scenarios`): every row of the bundled data set loads, becomes
a scenario by the paper's recipe (checked against the raw JSON, read here independently), and
can be found by category and words; custom scenarios refuse nonsense."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

import negotiation
from llm.exceptions import ClientError
from negotiation.rules import MAX_PRICE
from negotiation.scenarios import (
    Item,
    Product,
    Scenario,
    ScenarioNotFound,
    categories,
    custom,
    from_library,
    get_product,
    products,
    search,
)

DATA = Path(negotiation.__file__).parent / "data"
# What this data set holds (the paper's AmazonHistoryPrice): checked against the file below.
ROWS = 930
MUTUAL_AT_0_8 = 880


@pytest.fixture(scope="module")
def raw() -> list[dict[str, Any]]:
    rows = json.loads((DATA / "amazon-price-history.json").read_text(encoding="utf-8"))
    assert isinstance(rows, list)
    return rows


def test_the_data_ships_with_its_attribution_and_licence() -> None:
    notice = (DATA / "NOTICE.md").read_text(encoding="utf-8")
    assert "arXiv 2402.15813" in notice
    assert "Apache License 2.0" in notice
    licence = (DATA / "LICENSE-AmazonHistoryPrice.txt").read_text(encoding="utf-8")
    assert "Apache License" in licence
    assert "Version 2.0" in licence


def test_every_row_loads_in_order(raw: list[dict[str, Any]]) -> None:
    library = products()
    assert len(raw) == len(library) == ROWS
    for index, (row, product) in enumerate(zip(raw, library, strict=True)):
        assert product == Product(
            index=index,
            title=row["title"].strip(),
            category=row["category"],
            list_price=row["list_price"],
            highest_price=row["highest_price"],
            lowest_price=row["lowest_price"],
            average_price=row["average_price"],
            current_price=row["current_price"],
        )
    assert products() is library  # read once


def test_every_row_becomes_a_scenario_by_the_papers_recipe(raw: list[dict[str, Any]]) -> None:
    mutual = 0
    for index, row in enumerate(raw):
        list_price = round(max(row["list_price"], row["highest_price"]), 2)
        budget = round(0.8 * list_price, 2)
        cost = round(row["lowest_price"], 2)
        scenario = from_library(index)
        assert scenario == Scenario(
            item=Item(row["title"].strip(), row["category"]),
            list_price=list_price,
            buyer_budget=budget,
            seller_cost=cost,
            index=index,
        )
        assert scenario.mutual_interest == (cost < budget)
        mutual += cost < budget
    assert mutual == MUTUAL_AT_0_8
    assert sum(from_library(i).mutual_interest for i in range(ROWS)) == MUTUAL_AT_0_8


def test_a_library_scenario() -> None:
    # Row 0: list 925.00, highest 1,123.50, lowest 795.00.
    scenario = from_library(0)
    assert (scenario.list_price, scenario.buyer_budget, scenario.seller_cost) == (
        1123.5,
        898.8,
        795.0,
    )
    assert scenario.index == 0
    assert scenario.item.category == "automotive"
    assert scenario.mutual_interest
    assert from_library(0, budget_ratio=0.5).buyer_budget == 561.75
    assert not from_library(0, budget_ratio=0.5).mutual_interest
    assert from_library(0, budget_ratio=1.2).buyer_budget == 1348.2


@pytest.mark.parametrize("index", [-1, ROWS, ROWS + 5, True, "3", 1.0, None])
def test_an_unknown_index_is_scenario_not_found(index: Any) -> None:
    with pytest.raises(ScenarioNotFound) as caught:
        from_library(index)
    assert isinstance(caught.value, LookupError)
    assert isinstance(caught.value, ClientError)
    assert (caught.value.code, caught.value.status) == ("SCENARIO_NOT_FOUND", 404)
    assert "0 to 929" in caught.value.message
    with pytest.raises(ScenarioNotFound):
        get_product(index)


@pytest.mark.parametrize("ratio", [0, -0.8, math.nan, math.inf, "0.8", 1e-9])
def test_budget_ratio_must_be_positive(ratio: Any) -> None:
    with pytest.raises(ValueError):
        from_library(0, budget_ratio=ratio)


def test_as_dict_is_the_contracts_scenario_shape() -> None:
    library = from_library(3)
    assert library.as_dict() == {
        "index": 3,
        "item": {"title": library.item.title, "category": "automotive"},
        "list_price": library.list_price,
        "buyer_budget": library.buyer_budget,
        "seller_cost": library.seller_cost,
    }
    assert library.as_dict(private=False) == {
        "index": 3,
        "item": {"title": library.item.title, "category": "automotive"},
        "list_price": library.list_price,
    }
    mine = custom("Blue bicycle", 200, 150, 120)
    assert mine.as_dict() == {
        "item": {"title": "Blue bicycle", "category": ""},
        "list_price": 200.0,
        "buyer_budget": 150.0,
        "seller_cost": 120.0,
    }
    json.dumps(library.as_dict(), allow_nan=False)


def test_a_custom_scenario_is_rounded_to_cents() -> None:
    scenario = custom("  Blue bicycle ", 199.999, 150.004, 120, category=" sports-outdoors ")
    assert scenario == Scenario(
        item=Item("Blue bicycle", "sports-outdoors"),
        list_price=200.0,
        buyer_budget=150.0,
        seller_cost=120.0,
    )
    assert scenario.index is None
    assert scenario.mutual_interest
    assert not custom("Lamp", 10, 5, 5).mutual_interest  # cost == budget: conflicting


@pytest.mark.parametrize(
    "kwargs",
    [
        {"title": ""},
        {"title": "   "},
        {"title": None},
        {"category": None},
        {"list_price": 0},
        {"list_price": -1},
        {"list_price": 0.004},
        {"list_price": math.nan},
        {"buyer_budget": math.inf},
        {"buyer_budget": "150"},
        {"seller_cost": True},
        {"seller_cost": MAX_PRICE + 1},
    ],
)
def test_a_custom_scenario_refuses_nonsense(kwargs: dict[str, Any]) -> None:
    arguments: dict[str, Any] = {
        "title": "Lamp",
        "list_price": 100,
        "buyer_budget": 80,
        "seller_cost": 50,
    }
    with pytest.raises(ValueError):
        custom(**(arguments | kwargs))


def test_categories_are_sorted_and_distinct(raw: list[dict[str, Any]]) -> None:
    found = categories()
    assert found == sorted({row["category"] for row in raw})
    assert len(found) == 18
    assert "electronics" in found
    found.append("mutated")  # a copy: the library's list is not the caller's
    assert "mutated" not in categories()


def test_search_by_category_is_exact_and_any_case(raw: list[dict[str, Any]]) -> None:
    electronics = search(category="Electronics")
    assert [p.index for p in electronics] == [
        i for i, row in enumerate(raw) if row["category"] == "electronics"
    ]
    assert len(electronics) == 284
    assert search(category="electro") == []
    assert search(category="") == search() == list(products())


def test_search_by_text_needs_every_word_in_any_case(raw: list[dict[str, Any]]) -> None:
    found = search(text="ICE scraper")
    expected = [
        i
        for i, row in enumerate(raw)
        if "ice" in row["title"].lower() and "scraper" in row["title"].lower()
    ]
    assert [p.index for p in found] == expected
    assert 3 <= len(expected) < ROWS
    assert all("snow" in p.title.lower() for p in search(text="scraper snow"))
    assert len(search(text="scraper snow")) < len(found)
    assert search(text="no-such-word-anywhere") == []
    assert search(text="   ") == list(products())


def test_search_combines_both_filters() -> None:
    found = search(category="automotive", text="ice scraper")
    assert found
    assert all(p.category == "automotive" for p in found)
    assert found == [p for p in search(text="ice scraper") if p.category == "automotive"]
