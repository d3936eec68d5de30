"""The negotiation playground (`/playground/negotiations/`) in a real browser.

Playwright driving Debian's Chromium against live daphne servers: the happy path on the real
SmolLM2 server (two narrated agents bargaining over a library product, streaming in both columns,
the chart and the outcome card); watching, Stop, replay, playing the buyer, an upstream that dies
mid-move and the API token against a scripted fake upstream, which the model name steers (see
`ScriptedUpstream`). Without Chromium these tests are skipped with how to get it.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import threading
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, urlparse

import httpx
import pytest

from testkit import servers
from testkit.fake_upstream import FakeUpstream, Reply
from testkit.servers import ROOT, project_env

from .conftest import CHROMIUM, SKIP_REASON

ARTIFACTS = ROOT / "test-artifacts"
SCREENSHOT = "negotiation-mid-stream.png"
TOKEN = "negotiations-test-token"
PAGE = "/playground/negotiations/"

pytestmark = [pytest.mark.browser, pytest.mark.timeout(120)]

if not os.path.exists(CHROMIUM):
    pytest.skip(SKIP_REASON, allow_module_level=True)

from playwright.sync_api import Browser, Page, expect  # noqa: E402

# Playwright's `expect` waits 5 s by default: a model's move, on 2 shared cores, may take longer.
EXPECT_TIMEOUT = 20_000


@pytest.fixture(scope="module", autouse=True)
def _patient_expect() -> Iterator[None]:
    expect.set_options(timeout=EXPECT_TIMEOUT)
    yield
    expect.set_options(timeout=5_000)  # Playwright's default, for the other modules


WORDS = " Let us find a fair price for this one today, shall we".split(" ")[1:]


class ScriptedUpstream(FakeUpstream):
    """The fake upstream, steered by the model a side asks for: `slow` streams 20 tokens 0.1 s
    apart (a move takes 2 s), `cut` closes the connection after 3 tokens (a cut stream); any other
    model gets the default, 10 tokens 0.04 s apart."""

    SCRIPTS = {
        "slow": Reply(tokens=[f" {w}" for w in WORDS * 2][:20], delay=0.1),
        "cut": Reply(tokens=[f" {w}" for w in WORDS], delay=0.05, cut_after=3),
    }

    async def _answer(self, request: Any, reader: Any, writer: Any) -> bool:
        model = request.body.get("model") if isinstance(request.body, dict) else None
        if request.path.endswith("/chat/completions") and model in self.SCRIPTS:
            self.replies.appendleft(self.SCRIPTS[model])
        return await super()._answer(request, reader, writer)


@pytest.fixture(scope="module")
def smollm2_site(smollm2_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The project on the real bundled model, open (no API token)."""
    logs = tmp_path_factory.mktemp("negotiations-smollm2")
    env = project_env(logs, LM_STUDIO_BASE_URL=smollm2_server, LLM_LOCAL_MODEL="off")
    with servers.daphne(env, logs) as base:
        yield base


@pytest.fixture(scope="module")
def fake_site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The project on the scripted fake upstream (run on a thread of this process), behind
    API_TOKEN, with no retries: a cut stream fails its move at once."""
    upstream = ScriptedUpstream(Reply(tokens=[f" {w}" for w in WORDS], delay=0.04))
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="fake-upstream", daemon=True)
    thread.start()
    try:
        url = asyncio.run_coroutine_threadsafe(upstream.start(), loop).result(10)
        logs = tmp_path_factory.mktemp("negotiations-fake")
        env = project_env(logs, LM_STUDIO_BASE_URL=url, API_TOKEN=TOKEN, LLM_MAX_RETRIES="0")
        with servers.daphne(env, logs) as base:
            yield base
    finally:
        asyncio.run_coroutine_threadsafe(upstream.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


@pytest.fixture
def authed(page: Page) -> Page:
    """A page whose tab already holds the API token (as after typing it once)."""
    page.add_init_script(f"sessionStorage.setItem('negotiator.apiToken', '{TOKEN}')")
    return page


# Helpers ------------------------------------------------------------------------------------------


def money(value: float) -> str:
    return f"${value:,.2f}"


def start(
    page: Page,
    *,
    max_turns: int = 4,
    buyer: str = "narrated",
    buyer_model: str = "",
    seller_model: str = "",
    custom: bool = False,
) -> str:
    """Fill the form, press Start and wait for the snapshot: the negotiation's id."""
    expect(page.locator("#scenario option").first).to_be_attached()  # the library has loaded
    if custom:
        page.check("input[name=source][value=custom]")
    page.select_option("#buyer-policy", buyer)
    page.fill("#buyer-model", buyer_model)
    page.fill("#seller-model", seller_model)
    page.fill("#max-turns", str(max_turns))
    page.click("#start")
    expect(page.locator("#status")).to_have_text(re.compile(r"\w"))
    page.wait_for_url(re.compile(r"\?watch="))
    return parse_qs(urlparse(page.url).query)["watch"][0]


def shown_moves(page: Page) -> list[tuple[str, str, str, str]]:
    """(turn, side, text, badge) of each move the page shows."""
    rows: list[list[str]] = page.eval_on_selector_all(
        "#moves .move",
        """cards => cards.map(c => [c.dataset.turn, c.dataset.side,
            c.querySelector('.text').textContent, c.querySelector('.badge').textContent])""",
    )
    return [(turn, side, text, badge) for turn, side, text, badge in rows]


def stored(base: str, negotiation_id: str, token: str | None = None) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    response = httpx.get(f"{base}/api/v1/negotiations/{negotiation_id}", headers=headers)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def badge(move: dict[str, Any]) -> str:
    label = {
        "offer": f"offer {money(move['price'] or 0)}",
        "accept": f"accept {money(move['price'] or 0)}",
        "reject": "reject",
        "walk_away": "walk away",
    }[move["action"]]
    return f"invalid: {label}" if move["invalid"] else label


def offer_points(page: Page, side: str) -> int:
    return page.locator(f"#chart-svg circle[data-offer={side}]").count()


def valid_offers(negotiation: dict[str, Any], side: str) -> int:
    return sum(
        1
        for m in negotiation["moves"]
        if m["side"] == side and m["action"] == "offer" and not m["invalid"]
    )


def record_streaming(page: Page) -> None:
    """Record, per side, each distinct length a move's text had before its badge appeared."""
    page.evaluate("""() => {
        window.__streamed = {buyer: [], seller: []};
        new MutationObserver(() => {
            for (const card of document.querySelectorAll('#moves .move')) {
                if (card.dataset.final === 'true') continue;
                const length = card.querySelector('.text').textContent.length;
                const seen = window.__streamed[card.dataset.side];
                if (length && !seen.includes(`${card.dataset.turn}:${length}`)) {
                    seen.push(`${card.dataset.turn}:${length}`);
                }
            }
        }).observe(document.getElementById('moves'),
                   {subtree: true, childList: true, characterData: true});
    }""")


def assert_card_matches(page: Page, negotiation: dict[str, Any]) -> None:
    """The outcome card says what the API stored."""
    metrics = negotiation["metrics"]
    expect(page.locator("#out-status")).to_have_text(negotiation["status"].replace("_", " "))
    if metrics["deal"]:
        expect(page.locator("#out-price")).to_have_text(money(metrics["price"]))
        for side in ("buyer", "seller"):
            shown = float(page.locator(f"#out-{side}-profit").inner_text())
            assert abs(shown - metrics[f"{side}_profit"]) < 0.006
    else:
        expect(page.locator("#out-price")).to_have_text("no deal")
    expect(page.locator("#out-turns")).to_have_text(str(metrics["turns"]))
    expect(page.locator("#out-invalid")).to_have_text(str(metrics["invalid_moves"]))
    expect(page.locator("#out-tokens")).to_have_text(str(metrics["tokens"]))
    expect(page.locator("#out-time")).to_have_text(re.compile(r"^\d+\.\d s$"))


# (a) The real model ---------------------------------------------------------------------------


# A move of the real model takes 1-2 s on an idle 2-core machine, and up to ~10 s on a busy one.
MODEL_WAIT = 150_000


@pytest.mark.smollm2
@pytest.mark.timeout(300)
def test_two_agents_of_the_bundled_model_bargain_live(page: Page, smollm2_site: str) -> None:
    page.set_viewport_size({"width": 1280, "height": 900})
    page.goto(smollm2_site + PAGE)
    page.fill("#scenario-search", "bike")
    expect(page.locator("#scenario option").first).to_contain_text(re.compile("bike", re.I))
    expect(page.locator("#scenario-details")).to_contain_text("list price")
    record_streaming(page)
    negotiation_id = start(page, max_turns=4)
    expect(page.locator("#mode")).to_have_text("live")
    expect(page.locator("#title")).to_contain_text(re.compile("bike", re.I))

    # Mid-negotiation: two moves made (the seller's opening, the buyer's counter, never a deal:
    # the list price is above the budget), the third being written.
    page.wait_for_function(
        """() =>
        document.querySelectorAll('#moves .badge:not([hidden])').length >= 2 &&
        [...document.querySelectorAll('#moves .move.streaming .text')]
            .some(t => t.textContent.length > 8)""",
        timeout=MODEL_WAIT,
    )
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / SCREENSHOT), full_page=True)
    if os.environ.get("UPDATE_DOCS_SCREENSHOT"):  # the README's picture, only when asked
        shutil.copyfile(ARTIFACTS / SCREENSHOT, ROOT / "docs" / "negotiations.png")

    expect(page.locator("#outcome")).to_be_visible(timeout=MODEL_WAIT)
    negotiation = stored(smollm2_site, negotiation_id)
    assert negotiation["status"] in ("deal", "no_deal"), negotiation
    assert_card_matches(page, negotiation)

    # Each move's text grew token by token before its badge appeared, in both columns ...
    streamed = page.evaluate("window.__streamed")
    moves = negotiation["moves"]
    for side in ("buyer", "seller"):
        seen = [
            len([s for s in streamed[side] if s.startswith(f"{m['turn']}:")])
            for m in moves
            if m["side"] == side
        ]
        assert seen and min(seen) >= 1 and max(seen) >= 3, (side, streamed)
    # ... and then showed the stored move: its final message and its badge.
    assert shown_moves(page) == [(str(m["turn"]), m["side"], m["message"], badge(m)) for m in moves]
    # The chart: one point per valid offer, per side; the list price, budget and cost lines.
    for side in ("buyer", "seller"):
        assert offer_points(page, side) == valid_offers(negotiation, side) > 0
    lines = page.eval_on_selector_all("#chart-svg [data-line]", "ls => ls.map(l => l.dataset.line)")
    assert lines == ["list", "budget", "cost"]
    expect(page.locator("#chart-svg [data-deal]")).to_have_count(
        1 if negotiation["metrics"]["deal"] else 0
    )
    # The past list has it, with its outcome (not necessarily first: on PostgreSQL the servers
    # of the other test worker share the database, and may have started one since).
    row = page.locator(f"#past-rows tr[data-id='{negotiation_id}']")
    expect(row).to_have_attribute("data-status", negotiation["status"])


# (b)-(g) The scripted fake upstream -------------------------------------------------------------


def test_a_second_page_watches_the_same_negotiation(
    browser: Browser, authed: Page, fake_site: str
) -> None:
    page = authed
    page.goto(fake_site + PAGE)
    start(page, max_turns=4, seller_model="slow")  # each seller move takes 2 s: joined mid-way
    expect(page.locator("#moves .move[data-turn='1'] .text")).not_to_be_empty()
    link = page.locator("#watch-link")
    expect(link).to_be_visible()
    assert link.get_attribute("target") == "_blank"

    watcher = browser.new_context().new_page()
    watcher.add_init_script(f"sessionStorage.setItem('negotiator.apiToken', '{TOKEN}')")
    watcher.goto(fake_site + str(link.get_attribute("href")))
    expect(watcher.locator("#mode")).to_have_text("watching")
    expect(watcher.locator("#status")).to_have_text("running")
    expect(watcher.locator("#moves .move")).not_to_have_count(0)

    expect(page.locator("#outcome")).to_be_visible()
    expect(watcher.locator("#outcome")).to_be_visible()
    assert shown_moves(watcher) == shown_moves(page)
    assert len(shown_moves(page)) >= 3
    for side in ("buyer", "seller"):
        assert offer_points(watcher, side) == offer_points(page, side)
    assert watcher.locator("#outcome dl").inner_text() == page.locator("#outcome dl").inner_text()
    watcher.context.close()


def test_stop_cancels_the_negotiation(authed: Page, fake_site: str) -> None:
    page = authed
    page.goto(fake_site + PAGE)
    negotiation_id = start(page, max_turns=10, seller_model="slow")
    expect(page.locator("#stop")).to_be_enabled()
    page.wait_for_function("document.querySelector('#moves .move .text')?.textContent.length > 8")
    page.click("#stop")
    expect(page.locator("#out-status")).to_have_text("cancelled")
    expect(page.locator("#status")).to_have_text("cancelled")
    expect(page.locator("#out-ended-by")).to_have_text("cancel")
    expect(page.locator("#stop")).to_be_disabled()
    expect(page.locator("#moves .move .note").first).to_contain_text("Cut off")
    assert stored(fake_site, negotiation_id, TOKEN)["status"] == "cancelled"


def test_a_finished_negotiation_replays_move_by_move(authed: Page, fake_site: str) -> None:
    page = authed
    page.goto(fake_site + PAGE)
    negotiation_id = start(page, max_turns=4)
    expect(page.locator("#outcome")).to_be_visible()
    played = shown_moves(page)
    outcome = page.locator("#outcome dl").inner_text()

    page.goto(fake_site + PAGE)  # a fresh page: the past list offers it
    row = page.locator(f"#past-rows tr[data-id='{negotiation_id}']")
    row.get_by_role("button", name=re.compile("^Replay")).click()
    page.wait_for_url(re.compile(rf"\?replay={negotiation_id}"))
    expect(page.locator("#mode")).to_have_text("replay")
    expect(page.locator("#watch-link")).to_be_hidden()
    # One move at a time, the chart drawing as it goes.
    expect(page.locator("#moves .move")).to_have_count(1)
    expect(page.locator("#outcome")).to_be_hidden()
    expect(page.locator("#chart-svg circle[data-offer]")).to_have_count(1)
    expect(page.locator("#moves .move")).to_have_count(2)
    expect(page.locator("#outcome")).to_be_visible()
    assert shown_moves(page) == played
    assert page.locator("#outcome dl").inner_text() == outcome
    negotiation = stored(fake_site, negotiation_id, TOKEN)
    for side in ("buyer", "seller"):
        assert offer_points(page, side) == valid_offers(negotiation, side)
    assert_card_matches(page, negotiation)


def test_a_person_plays_the_buyer_to_a_deal(authed: Page, fake_site: str) -> None:
    page = authed
    page.goto(fake_site + PAGE)
    negotiation_id = start(page, custom=True, buyer="human", seller_model="slow", max_turns=6)
    play = page.locator("#play")
    expect(play).to_be_visible()
    expect(page.locator("#play-title")).to_have_text("You play the buyer: your budget is $320.00")
    # Only the player's own number is on the chart (the seller's cost is private).
    lines = page.eval_on_selector_all("#chart-svg [data-line]", "ls => ls.map(l => l.dataset.line)")
    assert lines == ["list", "budget"]
    expect(page.locator("#move-accept")).to_be_disabled()  # no offer of the seller's yet

    # The seller opens; then it is our turn, and focus is in the price field: Enter offers.
    expect(page.locator("#your-turn")).to_contain_text("Your turn (turn 2 of 6)")
    expect(page.locator("#move-price")).to_be_focused()
    # The keyboard reaches the message box and the four moves, in order.
    for target in ("move-message", "move-offer", "move-accept", "move-reject", "move-walk"):
        page.keyboard.press("Tab")
        expect(page.locator(f"#{target}")).to_be_focused()
    page.fill("#move-message", "Would you take 200?")
    page.fill("#move-price", "200")
    page.press("#move-price", "Enter")
    ours = page.locator("#moves .move[data-turn='2'][data-side='buyer']")
    expect(ours.locator(".badge")).to_have_text("offer $200.00")
    expect(ours.locator(".text")).to_have_text("Would you take 200?")

    # Out of turn: the server refuses, and the page says so with the contract's code.
    expect(page.locator("#your-turn")).to_contain_text("The seller's turn")
    page.fill("#move-price", "210")
    page.get_by_role("button", name="Offer", exact=True).click()
    expect(page.locator("#error-code")).to_have_text("NOT_YOUR_TURN")
    expect(page.locator("#error-message")).to_have_text(
        "it is the seller's turn (turn 3), not the buyer's; wait for the seller's move"
    )

    # The seller counters; accept its latest offer.
    counter = page.locator("#moves .move[data-turn='3'][data-side='seller'] .badge")
    expect(counter).to_have_text(re.compile(r"^offer \$"))
    offered = counter.inner_text().removeprefix("offer ")
    accept = page.get_by_role("button", name=f"Accept {offered}")
    expect(accept).to_be_enabled()
    accept.click()
    expect(page.locator("#out-status")).to_have_text("deal")
    expect(page.locator("#out-price")).to_have_text(offered)
    expect(page.locator("#moves .move[data-turn='4'] .badge")).to_have_text(f"accept {offered}")
    expect(play).to_be_hidden()
    negotiation = stored(fake_site, negotiation_id, TOKEN)
    assert negotiation["buyer"]["policy"] == "human"
    assert [m["action"] for m in negotiation["moves"]] == ["offer", "offer", "offer", "accept"]
    assert money(negotiation["metrics"]["price"]) == offered
    assert_card_matches(page, negotiation)


def test_an_upstream_that_dies_mid_move_fails_the_negotiation(authed: Page, fake_site: str) -> None:
    page = authed
    page.goto(fake_site + PAGE)
    start(page, max_turns=4, buyer_model="cut")  # the seller opens; the buyer's stream is cut
    expect(page.locator("#error-code")).to_have_text("LLM_BAD_GATEWAY")
    expect(page.locator("#error-message")).to_contain_text("cut the stream")
    expect(page.locator("#out-status")).to_have_text("failed")
    expect(page.locator("#out-ended-by")).to_have_text("error")
    expect(page.locator("#out-error-code")).to_have_text("LLM_BAD_GATEWAY")
    expect(page.locator("#status")).to_have_text("failed")
    # The seller's move stands; the buyer's keeps the words it had when the stream died.
    expect(page.locator("#moves .move[data-side='seller'] .badge")).to_have_text(
        re.compile(r"^offer \$")
    )
    cut = page.locator("#moves .move[data-side='buyer']")
    expect(cut.locator(".text")).to_have_text(" Let us find")
    expect(cut.locator(".badge")).to_be_hidden()
    expect(cut.locator(".note")).to_contain_text("Cut off")


def test_the_token_field_unlocks_a_protected_server(page: Page, fake_site: str) -> None:
    page.goto(fake_site + PAGE)
    expect(page.locator("#past-status")).to_contain_text("UNAUTHORIZED")
    expect(page.locator("#scenario option").first).to_be_attached()  # the library is public
    page.click("#start")
    expect(page.locator("#error-code")).to_have_text("CONNECTION_CLOSED")
    expect(page.locator("#error-message")).to_contain_text("API token")

    page.fill("#token", TOKEN)
    page.locator("#token").dispatch_event("change")
    expect(page.locator("#past-status")).to_have_text(re.compile("newest first|None yet"))
    start(page, max_turns=10, seller_model="slow")
    expect(page.locator("#error")).to_be_hidden()
    expect(page.locator("#moves .move .text").first).not_to_be_empty()
    assert TOKEN not in page.url
    page.click("#stop")
    expect(page.locator("#out-status")).to_have_text("cancelled")


def test_the_page_loads_nothing_from_other_hosts(authed: Page, fake_site: str) -> None:
    requested: list[str] = []
    authed.on("request", lambda request: requested.append(request.url))
    authed.goto(fake_site + PAGE)
    authed.wait_for_load_state("networkidle")
    expect(authed.locator("#past-status")).to_have_text(re.compile("newest first|None yet"))
    assert requested and all(url.startswith(fake_site) for url in requested), requested


def test_the_root_and_the_chat_playground_link_to_it(page: Page, fake_site: str) -> None:
    body = httpx.get(fake_site + "/").json()
    assert body["negotiations_playground"] == PAGE
    page.goto(fake_site + "/playground/")
    page.get_by_role("link", name="Negotiation playground").click()
    page.wait_for_url(f"**{PAGE}")
    page.get_by_role("link", name="Chat playground").click()
    page.wait_for_url("**/playground/")
