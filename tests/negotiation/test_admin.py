"""Negotiations in Django admin: read-only, filterable, searchable, moves inline with links to
their `llm` sessions, metrics shown readably."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

import pytest
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from llm.models import Session
from negotiation.models import Move, Negotiation

pytestmark = pytest.mark.django_db(transaction=True)

CHANGELIST = "/admin/negotiation/negotiation/"
METRICS = {
    "deal": True,
    "price": 1234.5,
    "mutual_interest": True,
    "buyer_profit": 0.25,
    "seller_profit": 0.75,
    "turns": 3,
    "invalid_moves": 1,
    "tokens": 42,
    "duration_ms": 1500,
}


def make_negotiation(
    title: str,
    *,
    status: str = "deal",
    ended_by: str = "accept",
    buyer: str = "narrated",
    seller: str = "narrated",
    metrics: dict[str, Any] | None = None,
    age: timedelta = timedelta(0),
) -> Negotiation:
    created = timezone.now() - age
    return Negotiation.objects.create(
        status=status,
        ended_by=ended_by,
        item_title=title,
        item_category="sports",
        list_price=1500,
        buyer_budget=1300,
        seller_cost=1000,
        buyer={"policy": buyer, "persona": "a careful student"},
        seller={"policy": seller},
        buyer_policy=buyer,
        seller_policy=seller,
        metrics=metrics,
        created_at=created,
        updated_at=created,
    )


@pytest.fixture
def staff(client: Client, admin_user: Any) -> Client:
    client.force_login(admin_user)
    return client


@pytest.fixture
def negotiations() -> dict[str, Negotiation]:
    made = {
        "deal": make_negotiation("Red bicycle", metrics=METRICS),
        "human": make_negotiation(
            "Espresso machine",
            status="no_deal",
            ended_by="walk_away",
            buyer="human",
            seller="llm",
            metrics={**METRICS, "deal": False, "price": None},
        ),
        "running": make_negotiation("Old camera", status="running", ended_by="", seller="llm"),
        "old": make_negotiation(
            "Vintage lamp",
            status="cancelled",
            ended_by="cancel",
            buyer="llm",
            age=timedelta(days=40),
        ),
    }
    deal = made["deal"]
    session = Session.objects.create(provider="lm_studio", model="fake-model", status="completed")
    Move.objects.create(negotiation=deal, turn=3, side="seller", action="accept", price=1234.5)
    Move.objects.create(
        negotiation=deal,
        turn=1,
        side="seller",
        action="offer",
        price=1234.5,
        message="FIRST-move",
        session=session,
    )
    Move.objects.create(
        negotiation=deal,
        turn=2,
        side="buyer",
        action="offer",
        message="SECOND-move",
        invalid=True,
        reason="an offer needs a price",
    )
    return made


def listed(response: Any) -> set[Negotiation]:
    assert response.status_code == 200
    return set(response.context["cl"].result_list)


def test_changelist_shows_the_columns(staff: Client, negotiations: dict[str, Negotiation]) -> None:
    response = staff.get(CHANGELIST)
    assert listed(response) == set(negotiations.values())
    html = response.content.decode()
    headers = " | ".join(
        re.sub(r"<[^>]+>", "", h).strip().lower()
        for h in re.findall(r'<th scope="col"[^>]*>(.*?)</th>', html, flags=re.S)
    )
    for label in (
        "item",
        "status",
        "ended by",
        "buyer",
        "seller",
        "deal price",
        "turns",
        "created",
    ):
        assert label in headers, (label, headers)
    assert "$1,234.50" in html  # the deal price, from the metrics
    row = next(r for r in re.findall(r"<tr.*?</tr>", html, flags=re.S) if "Red bicycle" in r)
    assert re.search(r'class="field-turns">3<', row), row  # three moves stored


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("status__exact=deal", {"deal"}),
        ("status__exact=running", {"running"}),
        ("buyer_policy__exact=human", {"human"}),
        ("buyer_policy__exact=llm", {"old"}),
        ("seller_policy__exact=llm", {"human", "running"}),
        ("ended_by__exact=walk_away", {"human"}),
        ("status__exact=no_deal&seller_policy__exact=llm", {"human"}),
    ],
)
def test_changelist_filters(
    staff: Client, negotiations: dict[str, Negotiation], query: str, expected: set[str]
) -> None:
    assert listed(staff.get(f"{CHANGELIST}?{query}")) == {negotiations[n] for n in expected}


def test_changelist_offers_the_filters_and_dates(
    staff: Client, negotiations: dict[str, Negotiation]
) -> None:
    html = staff.get(CHANGELIST).content.decode()
    for param in (
        "?status__exact=deal",
        "?buyer_policy__exact=human",
        "?seller_policy__exact=llm",
        "?ended_by__exact=cancel",
        "?created_at__gte=",
    ):
        assert param in html, param
    today = timezone.localtime().replace(hour=0, minute=0, second=0, microsecond=0)
    recent = staff.get(CHANGELIST, {"created_at__gte": (today - timedelta(days=7)).isoformat()})
    assert negotiations["old"] not in listed(recent)
    assert negotiations["deal"] in listed(recent)


def test_changelist_searches_item_titles(
    staff: Client, negotiations: dict[str, Negotiation]
) -> None:
    assert listed(staff.get(CHANGELIST, {"q": "espresso"})) == {negotiations["human"]}
    assert listed(staff.get(CHANGELIST, {"q": "nowhere"})) == set()


def test_change_page_shows_moves_in_order_with_session_links(
    staff: Client, negotiations: dict[str, Negotiation]
) -> None:
    deal = negotiations["deal"]
    html = staff.get(f"{CHANGELIST}{deal.pk}/change/").content.decode()
    first, second = html.index("FIRST-move"), html.index("SECOND-move")
    assert first < second < html.index("field-turn", second)  # turn 3 comes last
    session_id = deal.moves.get(turn=1).session_id
    link = reverse("admin:llm_session_change", args=[session_id])
    assert f'href="{link}"' in html
    links = re.findall(r'<td class="field-llm_session">(.*?)</td>', html, flags=re.S)
    cells = [re.sub(r"</?p>", "", cell).strip() for cell in links]
    assert cells[0] == f'<a href="{link}">{str(session_id)[:8]}</a>', cells
    assert cells[1:] == ["-", "-"], cells  # a person's move, a move without a session
    assert "an offer needs a price" in html  # the invalid move's reason
    # The metrics, readably.
    for shown in ("<th>deal</th><td>yes</td>", "<th>price</th><td>$1,234.50</td>"):
        assert shown in html, shown
    for shown in ("buyer profit", "0.250", "duration ms", "1500", "a careful student"):
        assert shown in html, shown
    # Nothing to edit.
    assert 'name="_save"' not in html
    assert 'name="status"' not in html and 'name="moves-0-message"' not in html
    assert 'name="moves-0-DELETE"' not in html


def test_change_page_without_metrics(staff: Client, negotiations: dict[str, Negotiation]) -> None:
    response = staff.get(f"{CHANGELIST}{negotiations['running'].pk}/change/")
    assert response.status_code == 200
    assert "Old camera" in response.content.decode()


def test_nothing_can_be_added_changed_or_deleted(
    staff: Client, negotiations: dict[str, Negotiation]
) -> None:
    deal = negotiations["deal"]
    assert staff.get(f"{CHANGELIST}add/").status_code == 403
    assert staff.post(f"{CHANGELIST}add/", {"item_title": "x"}).status_code == 403
    assert staff.get(f"{CHANGELIST}{deal.pk}/delete/").status_code == 403
    assert staff.post(f"{CHANGELIST}{deal.pk}/delete/", {"post": "yes"}).status_code == 403
    assert staff.post(f"{CHANGELIST}{deal.pk}/change/", {"status": "failed"}).status_code == 403
    changelist = staff.get(CHANGELIST).content.decode()
    assert "delete_selected" not in changelist
    assert f'href="{CHANGELIST}add/"' not in changelist
    deal.refresh_from_db()
    assert deal.status == "deal" and deal.moves.count() == 3
    assert Negotiation.objects.count() == 4


def test_anonymous_users_are_sent_to_log_in(
    client: Client, negotiations: dict[str, Negotiation]
) -> None:
    response = client.get(f"{CHANGELIST}{negotiations['deal'].pk}/change/")
    assert response.status_code == 302
    assert response["Location"].startswith(reverse("admin:login"))
    assert b"Red bicycle" not in response.content
