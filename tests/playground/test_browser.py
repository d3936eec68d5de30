"""The playground in a real browser.

Playwright driving Debian's Chromium against live daphne servers.

Happy path against the real SmolLM2 server; Stop, API token and faults against the fake upstream.
Without Chromium these tests are skipped with how to get it (`.ci/run` installs it).
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterator
from urllib.parse import quote

import httpx
import pytest

from testkit import servers
from testkit.servers import ROOT, manage, project_env

from .conftest import CHROMIUM, SKIP_REASON

ARTIFACTS = ROOT / "test-artifacts"
TOKEN = "playground-test-token"
STAFF_PASSWORD = "staff-password-for-tests"
# Unique per run: on PostgreSQL the servers share the suite's database across runs.
STAFF = f"staff-{uuid.uuid4().hex[:8]}"

pytestmark = [pytest.mark.browser, pytest.mark.timeout(120)]

if not os.path.exists(CHROMIUM):
    pytest.skip(SKIP_REASON, allow_module_level=True)

from playwright.sync_api import Browser, Page, Request, WebSocket, expect  # noqa: E402


@pytest.fixture(scope="module")
def smollm2_site(smollm2_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The project on the real model, with a staff user."""
    logs = tmp_path_factory.mktemp("playground-smollm2")
    env = project_env(
        logs,
        LM_STUDIO_BASE_URL=smollm2_server,
        LLM_MAX_TOKENS="96",
        DJANGO_SUPERUSER_PASSWORD=STAFF_PASSWORD,
    )
    with servers.daphne(env, logs) as base:
        manage(
            env, "createsuperuser", "--noinput", "--username", STAFF, "--email", "staff@example.com"
        )
        yield base


@pytest.fixture(scope="module")
def slow_site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The project on a slow fake upstream (200 tokens, 30 ms apart), behind API_TOKEN."""
    logs = tmp_path_factory.mktemp("playground-slow")
    with servers.fake_upstream(logs, "--tokens", "200", "--delay", "0.03") as upstream:
        env = project_env(logs, LM_STUDIO_BASE_URL=upstream, API_TOKEN=TOKEN)
        with servers.daphne(env, logs) as base:
            yield base


@pytest.fixture(scope="module")
def down_site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The project with its upstream down (nothing listens at the base URL)."""
    logs = tmp_path_factory.mktemp("playground-down")
    env = project_env(
        logs, LM_STUDIO_BASE_URL=f"http://127.0.0.1:{servers.free_port()}/v1", LLM_MAX_RETRIES="0"
    )
    with servers.daphne(env, logs) as base:
        yield base


def count_text_updates(page: Page) -> None:
    """Count how often the streamed reply's text changes (one per token frame)."""
    page.evaluate("""() => {
        window.__updates = 0;
        new MutationObserver(() => window.__updates++).observe(
            document.getElementById("messages"),
            {subtree: true, childList: true, characterData: true});
    }""")


def use_token(page: Page) -> None:
    page.fill("#token", TOKEN)
    page.locator("#token").dispatch_event("change")


def send(page: Page, text: str) -> None:
    page.fill("#prompt", text)
    page.click("#send")


def reply(page: Page, index: int = -1) -> str:
    return page.locator("#messages li.assistant .text").nth(index).inner_text()


@pytest.mark.smollm2
def test_a_reply_streams_token_by_token_with_its_figures(page: Page, smollm2_site: str) -> None:
    page.goto(smollm2_site + "/playground/")
    expect(page.locator("#model option")).to_have_count(
        2
    )  # "(provider default)" and the served model
    expect(page.locator("#model")).to_have_value("SmolLM2-135M-Instruct")
    expect(page.locator("#provider-status")).to_contain_text("reachable")
    count_text_updates(page)

    send(page, "Tell me a long story about a bicycle shop.")
    page.wait_for_function(
        "document.querySelector('#messages li.assistant .text').textContent.length > 10"
    )
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "playground-mid-stream.png"), full_page=True)
    expect(page.locator("#stop")).to_be_enabled()  # still streaming when the screenshot was taken

    expect(page.locator("#meta")).to_be_visible()
    assert page.locator("#finish-reason").inner_text() in ("stop", "length")
    assert re.fullmatch(
        r"\d+ prompt \+ \d+ completion = \d+ tokens \(estimated\)",
        page.locator("#usage").inner_text(),
    )
    assert re.fullmatch(r"\d+ ms", page.locator("#ttft").inner_text())
    assert float(page.locator("#tps").inner_text()) > 0
    assert page.evaluate("window.__updates") > 5  # the text grew frame by frame, not all at once
    assert len(reply(page)) > 20
    expect(page.locator("#error")).to_be_hidden()


@pytest.mark.smollm2
def test_the_conversation_continues_in_the_same_session(page: Page, smollm2_site: str) -> None:
    page.goto(smollm2_site + "/playground/")
    send(page, "My name is Ada.")
    expect(page.locator("#meta")).to_be_visible()
    session_id = page.locator("#session").inner_text()
    send(page, "What is my name?")
    expect(page.locator("#messages li")).to_have_count(4)
    expect(page.locator("#send")).to_be_enabled()
    assert page.locator("#session").inner_text() == session_id
    stored = httpx.get(f"{smollm2_site}/api/v1/sessions/{session_id}").json()
    assert [m["role"] for m in stored["messages"]] == [
        "system",
        "user",
        "assistant",
        "user",
        "assistant",
    ]
    assert stored["messages"][-1]["content"] == reply(page)


def test_a_second_tab_watches_the_same_reply_live(
    browser: Browser, page: Page, slow_site: str
) -> None:
    """Against the slow upstream, so the second tab always joins mid-reply."""
    page.goto(slow_site + "/playground/")
    use_token(page)
    send(page, "Hi")
    expect(page.locator("#session-line")).to_be_visible()
    session_id = page.locator("#session").inner_text()

    watcher = browser.new_context().new_page()
    watcher.add_init_script(f"sessionStorage.setItem('negotiator.apiToken', '{TOKEN}')")
    watcher.goto(f"{slow_site}/playground/?watch={session_id}")
    expect(watcher.locator("#watch-banner")).to_be_visible()
    expect(watcher.locator("#watch-id")).to_have_text(session_id)
    expect(watcher.locator("#watch-status")).to_have_text("streaming")
    expect(page.locator("#meta")).to_be_visible(timeout=20_000)
    expect(watcher.locator("#meta")).to_be_visible()
    assert reply(watcher) == reply(page) == "".join(f" t{i}" for i in range(200))
    assert (
        watcher.locator("#finish-reason").inner_text()
        == page.locator("#finish-reason").inner_text()
        == "stop"
    )
    expect(watcher.locator("#watch-status")).to_have_text("completed")
    watcher.context.close()


@pytest.mark.smollm2
def test_staff_get_a_link_to_the_session_in_admin(page: Page, smollm2_site: str) -> None:
    page.goto(smollm2_site + "/admin/login/?next=/playground/")
    page.fill("#id_username", STAFF)
    page.fill("#id_password", STAFF_PASSWORD)
    page.click("input[type=submit]")
    page.wait_for_url("**/playground/")
    send(page, "Hello")
    expect(page.locator("#admin-link")).to_be_visible()
    expect(page.locator("#meta")).to_be_visible()
    session_id = page.locator("#session").inner_text()
    page.locator("#admin-link").evaluate("link => link.target = '_self'")
    page.click("#admin-link")
    page.wait_for_url(f"**/admin/llm/session/{session_id}/change/")
    expect(page.locator("#content")).to_contain_text(session_id)
    expect(page.locator("#content")).to_contain_text("Completed")


def test_stop_cancels_mid_reply(page: Page, slow_site: str) -> None:
    page.goto(slow_site + "/playground/")
    use_token(page)
    send(page, "Hi")
    page.wait_for_function(
        "document.querySelector('#messages li.assistant .text').textContent.length > 20"
    )
    page.click("#stop")
    expect(page.locator("#finish-reason")).to_have_text("cancelled")
    partial = reply(page)
    assert 20 < len(partial) < len("".join(f" t{i}" for i in range(200)))
    expect(page.locator("#send")).to_be_enabled()


def test_the_token_field_opens_a_protected_server(page: Page, slow_site: str) -> None:
    page.goto(slow_site + "/playground/")
    send(page, "Hi")
    expect(page.locator("#error")).to_be_visible()
    expect(page.locator("#error-message")).to_contain_text("API token")
    use_token(page)
    send(page, "Hi again")
    page.wait_for_function(
        "document.querySelector('#messages li.assistant:last-child .text').textContent.length > 5"
    )
    assert TOKEN not in page.url
    page.click("#stop")
    expect(page.locator("#finish-reason")).to_have_text("cancelled")


def test_an_upstream_fault_shows_its_error_frame(page: Page, down_site: str) -> None:
    page.goto(down_site + "/playground/")
    expect(page.locator("#provider-status")).to_contain_text("LLM_UNAVAILABLE")
    send(page, "Hi")
    expect(page.locator("#error")).to_be_visible()
    expect(page.locator("#error-code")).to_have_text("LLM_UNAVAILABLE")
    expect(page.locator("#error-message")).to_contain_text("unreachable")
    expect(page.locator("#send")).to_be_enabled()


def test_the_root_links_to_the_playground(down_site: str) -> None:
    body = httpx.get(down_site + "/").json()
    assert body["playground"] == "/playground/" and body["docs"] == "/api/v1/docs"
    assert httpx.get(down_site + body["playground"]).status_code == 200


def test_the_page_loads_nothing_from_other_hosts(page: Page, down_site: str) -> None:
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    page.goto(down_site + "/playground/")
    page.wait_for_load_state("networkidle")
    assert requested and all(
        url.startswith(down_site) or url.startswith("ws://127.0.0.1") for url in requested
    )


def test_the_token_travels_only_as_a_header_and_on_the_socket(page: Page, slow_site: str) -> None:
    """What a proxy logs is URLs: the token must be in none but the WebSocket's (`?token=`, the
    only place a browser socket can carry it), and go as `Authorization: Bearer` over HTTP."""
    requests: list[Request] = []
    sockets: list[WebSocket] = []
    page.on("request", lambda request: requests.append(request))
    page.on("websocket", lambda socket: sockets.append(socket))

    page.goto(slow_site + "/playground/")  # its model list is fetched as it loads, without a token
    typed = len(requests)
    use_token(page)  # reconnects with the token and reloads the model list with it
    send(page, "Hi")
    page.wait_for_function(
        "document.querySelector('#messages li.assistant .text').textContent.length > 20"
    )
    page.click("#stop")
    expect(page.locator("#finish-reason")).to_have_text("cancelled")
    session_id = page.locator("#session").inner_text()
    page.goto(f"{slow_site}/playground/?watch={session_id}")  # the token comes from sessionStorage
    expect(page.locator("#watch-status")).to_have_text("cancelled")
    page.wait_for_load_state("networkidle")

    forms = {TOKEN, quote(TOKEN, safe=""), f"Bearer {TOKEN}"}
    assert requests, "no request recorded"
    for request in requests:
        if request.url.startswith(("ws://", "wss://")):
            continue  # the socket's own handshake, checked below
        assert not any(form in request.url for form in forms), (
            f"the token is in the URL {request.url}"
        )
        for name, value in request.all_headers().items():  # e.g. a Referer carrying the page URL
            assert name == "authorization" or TOKEN not in value, (
                f"the token is in {name}: {request.url}"
            )

    # Once the token is entered, every API request carries it: after typing it, and on the
    # watch page (which takes it from sessionStorage).
    api = [
        r for r in requests[typed:] if r.resource_type in ("fetch", "xhr") and "/api/v1/" in r.url
    ]
    assert len(api) >= 2, [r.url for r in requests]
    for request in api:
        assert request.all_headers().get("authorization") == f"Bearer {TOKEN}", (
            request.url,
            request.all_headers(),
        )

    socket_urls = [ws.url for ws in sockets]
    assert socket_urls and all(url.startswith("ws://") for url in socket_urls), socket_urls
    assert any(
        url.endswith(f"/ws/llm/stream/?token={quote(TOKEN, safe='')}") for url in socket_urls
    ), socket_urls
    assert TOKEN not in page.url
