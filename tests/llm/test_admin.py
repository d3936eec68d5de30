"""Stored sessions in Django admin (issue 3, item 8).

Read-only, filterable, searchable, no secret.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import timedelta
from html import unescape as html_unescape
from typing import Any
from urllib.parse import urlencode

import pytest
from django.contrib import admin
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from llm.models import Message, Session

pytestmark = pytest.mark.django_db

SECRET = "sk-or-v1-SECRET123"
CHANGELIST = "/admin/llm/session/"


def make_session(
    *, texts: tuple[str, ...] = ("Hello", "Hi there"), age: timedelta = timedelta(0), **fields: Any
) -> Session:
    created = timezone.now() - age
    values = {
        "provider": "lm_studio",
        "model": "fake-model",
        "status": "completed",
        "finish_reason": "stop",
        "prompt_tokens": 11,
        "completion_tokens": 22,
        "ttft_ms": 123.4,
        "tokens_per_second": 45.6,
        "created_at": created,
        "first_token_at": created + timedelta(milliseconds=123),
        "finished_at": created + timedelta(seconds=1),
        "updated_at": created,
    }
    values.update(fields)
    session = Session.objects.create(**values)
    roles = ["user", "assistant"]
    for position, text in enumerate(texts):
        Message.objects.create(
            session=session, position=position, role=roles[position % 2], content=text
        )
    return session


@pytest.fixture
def staff(client: Client, admin_user: Any) -> Client:
    client.force_login(admin_user)
    return client


@pytest.fixture
def sessions() -> dict[str, Session]:
    return {
        "completed": make_session(texts=("What about the red bicycle?", "The red one is 90.")),
        "failed": make_session(
            status="failed",
            error_code="LLM_BAD_GATEWAY",
            error_message="cut",
            provider="openrouter",
            model="openrouter/auto",
            texts=("Tell me about zeppelins", "Zeppe"),
        ),
        "old": make_session(
            status="cancelled",
            model="other-model",
            age=timedelta(days=40),
            texts=("An old conversation", "ancient"),
        ),
    }


def listed(response: Any) -> set[Session]:
    assert response.status_code == 200
    return set(response.context["cl"].result_list)


# The changelist ------------------------------------------------------------------------------


def test_changelist_renders_with_its_columns(staff: Client, sessions: dict[str, Session]) -> None:
    response = staff.get(CHANGELIST)
    assert response.status_code == 200
    assert listed(response) == set(sessions.values())

    columns = response.context["cl"].list_display
    for field in ("status", "provider", "model", "ttft_ms", "created_at"):
        assert field in columns, field
    assert any("token" in column and column != "tokens_per_second" for column in columns), columns

    html = response.content.decode()
    headers = [
        re.sub(r"<[^>]+>", "", h).strip().lower()
        for h in re.findall(r'<th scope="col"[^>]*>(.*?)</th>', html, flags=re.S)
    ]
    joined = " | ".join(headers)
    for label in ("status", "provider", "model", "tokens", "ttft", "created"):
        assert label in joined, (label, headers)
    assert "123.4" in html  # the TTFT value is shown


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("status__exact=failed", {"failed"}),
        ("status__exact=completed", {"completed"}),
        ("status__exact=cancelled", {"old"}),
        ("provider=openrouter", {"failed"}),  # the links the provider and model filters offer
        ("provider=lm_studio", {"completed", "old"}),
        ("model=other-model", {"old"}),
        ("model=fake-model", {"completed"}),
        ("model=openrouter%2Fauto", {"failed"}),
        ("status__exact=completed&provider=lm_studio", {"completed"}),
    ],
)
def test_changelist_filters_by_status_provider_and_model(
    staff: Client, sessions: dict[str, Session], query: str, expected: set[str]
) -> None:
    assert listed(staff.get(f"{CHANGELIST}?{query}")) == {sessions[name] for name in expected}


def test_changelist_filters_by_date(staff: Client, sessions: dict[str, Session]) -> None:
    response = staff.get(CHANGELIST)
    # The filters shown include the status, provider, model and date choices.
    html = response.content.decode()
    for param in (
        '"?status__exact=failed"',
        '"?provider=openrouter"',
        '"?model=other-model"',
        '"?created_at__gte=',
    ):
        assert param in html, param

    # Follow the date filter's own links: "Today", "Past 7 days", "This month", "This year".
    links = [html_unescape(link) for link in re.findall(r'href="(\?created_at__gte=[^"]*)"', html)]
    assert len(links) == 4, links
    for link in links[:2]:
        assert listed(staff.get(CHANGELIST + link)) == {
            sessions["completed"],
            sessions["failed"],
        }, link

    midnight = timezone.localtime().replace(hour=0, minute=0, second=0, microsecond=0)
    window = urlencode(
        {
            "created_at__gte": (midnight - timedelta(days=60)).isoformat(),
            "created_at__lt": (midnight - timedelta(days=20)).isoformat(),
        }
    )
    assert listed(staff.get(f"{CHANGELIST}?{window}")) == {sessions["old"]}

    old_day = (timezone.now() - timedelta(days=40)).date()
    by_hierarchy = staff.get(
        f"{CHANGELIST}?created_at__year={old_day.year}&created_at__month={old_day.month}&created_at__day={old_day.day}"
    )
    assert listed(by_hierarchy) == {sessions["old"]}


def test_changelist_searches_message_text(staff: Client, sessions: dict[str, Session]) -> None:
    assert listed(staff.get(f"{CHANGELIST}?q=zeppelins")) == {sessions["failed"]}
    assert listed(staff.get(f"{CHANGELIST}?q=red+one")) == {sessions["completed"]}  # a reply's text
    assert listed(staff.get(f"{CHANGELIST}?q=nowhere-to-be-found")) == set()


def test_search_over_several_matching_messages_lists_the_session_once(staff: Client) -> None:
    session = make_session(texts=("bicycle", "bicycle bicycle", "bicycle?"))
    response = staff.get(f"{CHANGELIST}?q=bicycle")
    assert list(response.context["cl"].result_list) == [session]


# The detail page ---------------------------------------------------------------------------------


def test_detail_page_shows_the_session_and_its_messages_in_order(staff: Client) -> None:
    session = Session.objects.create(
        provider="lm_studio",
        model="fake-model",
        status="failed",
        error_code="LLM_TIMEOUT",
        error_message="no token within 60 s",
        prompt_tokens=5,
        completion_tokens=2,
        ttft_ms=77.7,
    )
    # Created out of order: the page shows them by position.
    for position, role, text in [
        (2, "assistant", "THIRD-turn"),
        (0, "system", "FIRST-turn"),
        (1, "user", "SECOND-turn"),
    ]:
        Message.objects.create(session=session, position=position, role=role, content=text)

    response = staff.get(f"{CHANGELIST}{session.pk}/change/")
    assert response.status_code == 200
    html = response.content.decode()
    positions = [html.index(text) for text in ("FIRST-turn", "SECOND-turn", "THIRD-turn")]
    assert positions == sorted(positions)
    for shown in ("LLM_TIMEOUT", "no token within 60 s", "77.7", "fake-model"):
        assert shown in html, shown
    # Read-only: no form fields to edit and no save button.
    assert 'name="_save"' not in html
    assert 'name="status"' not in html
    assert 'name="messages-0-content"' not in html


def test_history_cannot_be_added_changed_or_deleted(
    staff: Client, sessions: dict[str, Session]
) -> None:
    session = sessions["completed"]
    assert staff.get(f"{CHANGELIST}add/").status_code == 403
    assert (
        staff.post(f"{CHANGELIST}add/", {"provider": "x", "status": "completed"}).status_code == 403
    )
    assert staff.get(f"{CHANGELIST}{session.pk}/delete/").status_code == 403
    assert staff.post(f"{CHANGELIST}{session.pk}/delete/", {"post": "yes"}).status_code == 403
    response = staff.post(
        f"{CHANGELIST}{session.pk}/change/", {"status": "failed", "provider": "x"}
    )
    assert response.status_code == 403
    # No bulk delete either.
    changelist = staff.get(CHANGELIST)
    assert "delete_selected" not in changelist.content.decode()
    assert staff.post(
        CHANGELIST, {"action": "delete_selected", "_selected_action": [session.pk]}
    ).status_code in (
        200,
        302,
        403,
    )
    assert Session.objects.count() == 3
    session.refresh_from_db()
    assert (session.status, session.provider) == ("completed", "lm_studio")
    # The Add link is not offered.
    assert f'href="{CHANGELIST}add/"' not in changelist.content.decode()
    # Messages are read-only as well.
    message = session.messages.first()
    assert staff.get("/admin/llm/message/add/").status_code == 403
    assert staff.get(f"/admin/llm/message/{message.pk}/delete/").status_code == 403
    assert (
        staff.post(f"/admin/llm/message/{message.pk}/change/", {"content": "changed"}).status_code
        == 403
    )
    message.refresh_from_db()
    assert message.content == "What about the red bicycle?"


# Who may see it ----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", [CHANGELIST, "/admin/llm/message/", "/admin/"])
def test_anonymous_user_is_sent_to_the_login_page(
    client: Client, sessions: dict[str, Session], path: str
) -> None:
    response = client.get(path)
    assert response.status_code == 302
    assert response["Location"].startswith(reverse("admin:login"))


def test_anonymous_user_cannot_open_a_session(client: Client, sessions: dict[str, Session]) -> None:
    response = client.get(f"{CHANGELIST}{sessions['failed'].pk}/change/")
    assert response.status_code == 302
    assert response["Location"].startswith(reverse("admin:login"))
    assert b"zeppelins" not in response.content


def test_non_staff_user_is_sent_to_the_login_page(client: Client, django_user_model: Any) -> None:
    user = django_user_model.objects.create_user("plain", password="pw")
    client.force_login(user)
    response = client.get(CHANGELIST)
    assert response.status_code == 302
    assert response["Location"].startswith(reverse("admin:login"))


def test_openrouter_key_appears_on_no_admin_page(
    staff: Client, sessions: dict[str, Session], llm_config: Callable[..., Any]
) -> None:
    llm_config(openrouter={"api_key": SECRET})
    message = Message.objects.first()
    pages = [
        "/admin/",
        "/admin/llm/",
        CHANGELIST,
        f"{CHANGELIST}?status__exact=failed",
        f"{CHANGELIST}?q=zeppelins",
        f"{CHANGELIST}{sessions['failed'].pk}/change/",
        f"{CHANGELIST}{sessions['completed'].pk}/change/",
        f"{CHANGELIST}{sessions['completed'].pk}/history/",
        "/admin/llm/message/",
        f"/admin/llm/message/{message.pk}/change/",
    ]
    # Every registered model's changelist too (a settings/config admin must not leak it either).
    for model in admin.site._registry:
        pages.append(reverse(f"admin:{model._meta.app_label}_{model._meta.model_name}_changelist"))
    for page in pages:
        response = staff.get(page)
        assert response.status_code == 200, page
        assert SECRET.encode() not in response.content, page
        assert b"SECRET123" not in response.content, page


def test_the_index_names_them_llm_sessions_not_djangos_sessions(staff: Client) -> None:
    """Django's own login sessions are "Sessions" too: ours must not be mistaken for them."""
    page = staff.get("/admin/").content.decode()
    assert ">LLM sessions<" in page and ">LLM messages<" in page, page
    assert ">Sessions<" not in page
    title = staff.get("/admin/llm/session/").content.decode()
    assert "Select LLM session to view" in title
