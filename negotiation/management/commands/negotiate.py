"""`manage.py negotiate`: run one negotiation here and stream both sides to the terminal.

    manage.py negotiate --scenario 0 --max-turns 6
    manage.py negotiate --item "Used road bike" --list-price 400 --budget 320 --cost 250
    manage.py negotiate --scenario 12 --buyer llm --json

It is stored like any other (API, admin). The options make a `NegotiationIn`, so a bad value is
refused with the API's message, named by its option (exit 2, no traceback). The `llm` settings
decide the model (under `make run`: the bundled one at LM_STUDIO_BASE_URL). Exit 0 for a deal or
no deal, 1 when the negotiation failed (its error code printed), 130 on Ctrl-C (stored
`cancelled`). `--json` prints the stored negotiation (`GET /api/v1/negotiations/{id}`) instead.

The helpers below are shared with `negotiation_bench`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import IO, Any

from asgiref.sync import sync_to_async
from django.core.management.base import BaseCommand, CommandError, CommandParser, OutputWrapper
from django.core.serializers.json import DjangoJSONEncoder
from pydantic import ValidationError
from rich.console import Console
from rich.text import Text

from llm.checks import format_errors, run_llm_checks
from llm.providers import providers
from negotiation import service
from negotiation.checks import check_settings
from negotiation.rules import format_price
from negotiation.runner import Run
from negotiation.scenarios import ScenarioNotFound
from negotiation.schemas import NegotiationIn

__all__ = [
    "CLI_POLICIES",
    "INTERRUPTED",
    "USAGE_ERROR",
    "Command",
    "Transcript",
    "check_settings_or_fail",
    "close_connections",
    "describe_errors",
    "is_terminal",
    "make_console",
    "models_used",
    "money",
    "quiet_logs",
    "ratio",
    "side_policy",
    "usage_error",
    "validate",
]

# The policies a command line can run: a person plays through the API or the WebSocket.
CLI_POLICIES = ("narrated", "llm")
# Exit statuses besides 0 and 1: a usage error (as argparse's), and Ctrl-C (128 + SIGINT).
USAGE_ERROR = 2
INTERRUPTED = 130

# Each field of NegotiationIn, as the option that sets it (to name it in an error).
OPTION_OF = {
    "scenario": "--scenario",
    "item": "--item",
    "item.title": "--item",
    "item.category": "--category",
    "list_price": "--list-price",
    "buyer_budget": "--budget",
    "seller_cost": "--cost",
    "max_turns": "--max-turns",
    "opening": "--opening",
    "buyer": "--buyer",
    "buyer.policy": "--buyer",
    "buyer.model": "--buyer-model",
    "seller": "--seller",
    "seller.policy": "--seller",
    "seller.model": "--seller-model",
}
SIDE_STYLE = {"buyer": "bold cyan", "seller": "bold magenta"}
TEXT_STYLE = {"buyer": "cyan", "seller": "magenta"}
STATUS_STYLE = {
    "deal": "bold green",
    "no_deal": "bold yellow",
    "failed": "bold red",
    "cancelled": "bold yellow",
    "interrupted": "bold yellow",
}
PREFIX_WIDTH = len("seller: ")


# Shared with negotiation_bench --------------------------------------------------------------------


def usage_error(message: str) -> CommandError:
    return CommandError(message, returncode=USAGE_ERROR)


def check_settings_or_fail() -> None:
    """The LLM and negotiation settings, as `manage.py check` sees them: a bad one ends the
    command with its check id (`llm.E001`...), before anything runs."""
    problems = format_errors([*run_llm_checks(), *check_settings()])
    if problems:
        raise CommandError(problems)


def side_policy(option: str, policy: str) -> str:
    """A policy named on the command line; a person's side is refused with the reason."""
    if policy == "human":
        raise usage_error(
            f"{option} human: a person cannot play from the command line. A human side plays "
            "through the API (POST /api/v1/negotiations, then .../moves) or the WebSocket "
            f"(/ws/negotiations/). Here choose {' or '.join(CLI_POLICIES)}."
        )
    if policy not in CLI_POLICIES:
        raise usage_error(
            f"{option}: {policy!r} is not a policy: choose {' or '.join(CLI_POLICIES)}"
        )
    return policy


def describe_errors(exc: ValidationError) -> str:
    """The API's validation messages, each field named by its option (`--budget: ...`)."""
    parts = []
    for error in exc.errors():
        field = ".".join(str(part) for part in error.get("loc", ()))
        name = OPTION_OF.get(field, field)
        if error.get("type") == "extra_forbidden":
            message = "unknown field"
        else:
            message = str(error.get("msg", "is invalid")).removeprefix("Value error, ")
        parts.append(f"{name}: {message}" if name else message)
    return "; ".join(parts)


def validate(data: Mapping[str, Any]) -> NegotiationIn:
    """A start request from options, checked as the API checks its body, and its scenario."""
    try:
        spec = NegotiationIn.model_validate(dict(data))
    except ValidationError as exc:
        raise usage_error(describe_errors(exc)) from None
    try:
        service.scenario_of(spec)
    except ScenarioNotFound as exc:
        raise usage_error(f"--scenario: {exc.message}") from None
    except ValueError as exc:
        raise usage_error(str(exc)) from None
    return spec


def make_console(stdout: OutputWrapper, *, no_color: bool, force_color: bool) -> Console:
    """A rich console on the command's stdout: colours and live displays when it is a terminal
    (or with --force-color), plain text otherwise (or with --no-color, or NO_COLOR set)."""
    stream: IO[str] = getattr(stdout, "_out", stdout)
    tty = is_terminal(stdout)
    colour = (tty or force_color) and not no_color
    return Console(
        file=stream,
        force_terminal=colour or tty,
        color_system="auto" if colour else None,
        no_color=True if not colour else None,
        highlight=False,
        markup=False,
        emoji=False,
        soft_wrap=True,
    )


@contextlib.contextmanager
def quiet_logs(verbosity: int) -> Iterator[None]:
    """Below -v 2, the apps' INFO lines (one per upstream request) stay out of the transcript;
    warnings and errors still show."""
    loggers = [logging.getLogger(name) for name in ("llm", "negotiation")]
    levels = [logger.level for logger in loggers]
    if verbosity < 2:
        for logger in loggers:
            logger.setLevel(max(logger.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def is_terminal(stdout: OutputWrapper) -> bool:
    try:
        return bool(stdout.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


async def close_connections() -> None:
    """Close the database connections opened by this event loop's ORM thread and its LLM
    clients: the command's loop ends here (and PostgreSQL drops no database still in use)."""
    from django.db import connections

    await providers.aclose()
    await sync_to_async(connections.close_all)()


async def models_used(negotiation_ids: Iterable[str]) -> list[str]:
    """`provider model` of the generations of these negotiations, each once."""
    from llm.models import Session

    ids = list(negotiation_ids)

    def query() -> list[str]:
        pairs = (
            Session.objects.filter(negotiation_moves__negotiation_id__in=ids)
            .values_list("provider", "model")
            .distinct()
        )
        return sorted({f"{provider} {model}".strip() for provider, model in pairs})

    return await sync_to_async(query)()


def money(value: float | None) -> str:
    return "-" if value is None else format_price(value)


def ratio(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


# The transcript --------------------------------------------------------------------------------


class Transcript:
    """Prints a run's frames as they come: each move on its own lines, `seller:` / `buyer:`
    first, its text as the model writes it, then what the move was."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.line_open = False  # a message is being written on the current line
        self.streamed = False  # the current turn's message has shown some text
        self.refusal = ""  # the last refusal shown (not repeated for the invalid move after it)

    def write(self, text: str, style: str = "", end: str = "") -> None:
        self.console.print(Text(text, style=style), end=end)

    def header(self, run: Run) -> None:
        record = run.record
        scenario = record.scenario
        title = scenario.item.title
        where = f"library scenario {scenario.index}" if scenario.index is not None else "custom"
        category = f", {scenario.item.category}" if scenario.item.category else ""
        self.write(f"Negotiation {run.id}", "bold", end="\n")
        self.write(f"  {title} ({where}{category})", end="\n")
        interest = "mutual interest" if scenario.mutual_interest else "conflicting interest"
        self.write(
            f"  list price {money(scenario.list_price)}, buyer's budget "
            f"{money(scenario.buyer_budget)}, seller's cost {money(scenario.seller_cost)} "
            f"({interest})",
            end="\n",
        )
        self.write(
            f"  buyer {record.buyer.policy}, seller {record.seller.policy}, at most "
            f"{record.max_turns} turns, the {record.opening} opens",
            "dim",
            end="\n\n",
        )

    def frame(self, frame: dict[str, Any]) -> None:
        kind = frame["type"]
        if kind == "turn":
            self._end_line()
            if frame.get("reason"):
                self.refusal = frame["reason"]
                note = f"(refused: {self.refusal}; asked again)"
                self.write(" " * PREFIX_WIDTH + note, "dim", "\n")
            self._start(frame["side"])
        elif kind == "token":
            self._text(frame["side"], frame["text"])
        elif kind == "move":
            if not self.line_open:
                self._start(frame["side"])
            if not self.streamed and frame.get("message"):
                self._text(frame["side"], frame["message"])
            self._end_line()
            if frame.get("reason") == self.refusal:
                frame = {**frame, "reason": "the same"}
            self.write(f"{'':{PREFIX_WIDTH}}-> {what_it_did(frame)}", "dim", "\n")
            self.refusal = ""
        elif kind == "end":
            self._end_line()

    def _start(self, side: str) -> None:
        self.write(f"{side}:".ljust(PREFIX_WIDTH), SIDE_STYLE.get(side, "bold"))
        self.line_open, self.streamed = True, False

    def _text(self, side: str, text: str) -> None:
        # One line per message: a model's line breaks become spaces, leading blanks go.
        text = re.sub(r"\s*\n\s*", " ", text)
        if not self.streamed:
            text = text.lstrip()
        if text:
            self.write(text, TEXT_STYLE.get(side, ""))
            self.streamed = True

    def _end_line(self) -> None:
        if self.line_open:
            self.write("" if self.streamed else "(nothing said)", "dim", end="\n")
            self.line_open = False

    def outcome(
        self,
        status: str,
        ended_by: str,
        metrics: Mapping[str, Any] | None,
        error: Mapping[str, Any] | None,
        models: list[str],
    ) -> None:
        metrics = metrics or {}
        self.write("", end="\n")
        label = status.replace("_", " ")
        if metrics.get("deal"):
            label += f" at {money(metrics.get('price'))}"
        self.write("Outcome:   ", end="")
        self.write(label, STATUS_STYLE.get(status, "bold"))
        self.write(f" (ended by {(ended_by or '-').replace('_', ' ')})", end="\n")
        if error:
            self.write("Error:     ", end="")
            self.write(f"{error.get('code')}: {error.get('message')}", "red", end="\n")
            if error.get("code") in ("LLM_UNAVAILABLE", "LLM_TIMEOUT"):
                self.write(
                    "           is the model server up? `make run` starts the bundled one; "
                    "`manage.py llm_ping` checks it",
                    "dim",
                    end="\n",
                )
        self.write(
            f"Profits:   buyer {ratio(metrics.get('buyer_profit'))}, seller "
            f"{ratio(metrics.get('seller_profit'))} (normalised by |budget - cost|)",
            end="\n",
        )
        self.write(
            f"Turns:     {metrics.get('turns', 0)} ({metrics.get('invalid_moves', 0)} invalid)",
            end="\n",
        )
        self.write(f"Tokens:    {metrics.get('tokens', 0)}", end="\n")
        self.write(f"Duration:  {(metrics.get('duration_ms') or 0) / 1000:.1f} s", end="\n")
        if models:
            self.write(f"Model:     {', '.join(models)}", end="\n")


def what_it_did(move: Mapping[str, Any]) -> str:
    """`offer $120.00`, `accept $118.00 (deal)`, ...: a move frame in a few words."""
    action, price = move["action"], move.get("price")
    words = {
        "offer": f"offers {money(price)}" if price is not None else "an offer without a price",
        "accept": f"accepts {money(price)}",
        "reject": "rejects the offer",
        "walk_away": "walks away",
    }.get(action, action)
    if move.get("invalid"):
        reason = f" ({move['reason']})" if move.get("reason") else ""
        return f"refused again{reason}: {words}, stored as invalid; the turn passes"
    return words


# The command -----------------------------------------------------------------------------------


class Command(BaseCommand):
    help = (
        "Run one negotiation (a library scenario or a custom item) and stream both sides as they "
        "speak. Exit 0 for a deal or no deal, 1 when it failed, 130 on Ctrl-C (cancelled). "
        "-v 2 shows the upstream requests' log lines."
    )
    # The LLM and negotiation settings are checked in handle(), so call_command() checks them too.
    requires_system_checks: list[str] = []

    def add_arguments(self, parser: CommandParser) -> None:
        what = parser.add_argument_group(
            "scenario", "a library product (--scenario) or a custom item (all four of the rest)"
        )
        what.add_argument(
            "--scenario", type=int, metavar="N", help="A library product (GET /api/v1/scenarios)."
        )
        what.add_argument("--item", metavar="TITLE", help="A custom item's title.")
        what.add_argument("--list-price", type=float, metavar="P", help="Its public list price.")
        what.add_argument("--budget", type=float, metavar="B", help="The buyer's private budget.")
        what.add_argument("--cost", type=float, metavar="C", help="The seller's private cost.")
        what.add_argument("--category", metavar="C", help="A custom item's category.")
        sides = parser.add_argument_group("sides")
        sides.add_argument(
            "--buyer", default="narrated", metavar="POLICY", help="narrated (default) or llm."
        )
        sides.add_argument(
            "--seller", default="narrated", metavar="POLICY", help="narrated (default) or llm."
        )
        sides.add_argument("--buyer-model", metavar="M", help="Default: the provider's model.")
        sides.add_argument("--seller-model", metavar="M", help="Default: the provider's model.")
        sides.add_argument(
            "--max-turns", type=int, default=10, metavar="N", help="2 to 40 (default 10)."
        )
        sides.add_argument(
            "--opening", choices=["seller", "buyer"], default="seller", help="Who moves first."
        )
        parser.add_argument(
            "--json",
            action="store_true",
            dest="as_json",
            help="No streaming: print the stored negotiation as JSON at the end.",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        spec = validate(self.spec_data(options))
        check_settings_or_fail()
        transcript = None
        if not options["as_json"]:
            transcript = Transcript(
                make_console(
                    self.stdout,
                    no_color=options.get("no_color", False),
                    force_color=options.get("force_color", False),
                )
            )
        self.run_id: str | None = None
        try:
            with quiet_logs(options["verbosity"]):
                report = asyncio.run(self.negotiate(spec, transcript))
        except KeyboardInterrupt:  # a second Ctrl-C while the first was being handled
            # asyncio.run cancels what is left: a negotiation under way still ends `cancelled`.
            which = f" (negotiation {self.run_id} is cancelled)" if self.run_id else ""
            self.stderr.write(f"Interrupted{which}.")
            raise SystemExit(INTERRUPTED) from None
        if options["as_json"]:
            self.stdout.write(json.dumps(report["negotiation"], cls=DjangoJSONEncoder, indent=2))
        elif transcript is not None:
            stored = report["negotiation"]
            transcript.outcome(
                stored["status"],
                stored["ended_by"] or "",
                stored["metrics"],
                stored.get("error"),
                report["models"],
            )
            transcript.write(f"Stored as {stored['id']}", "dim", end="\n")
        status = report["negotiation"]["status"]
        if report["interrupted"]:
            self.stderr.write(f"Interrupted: negotiation {self.run_id} is {status}.")
            raise SystemExit(INTERRUPTED)
        if status not in ("deal", "no_deal"):
            raise SystemExit(1)

    def spec_data(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """The start request the options describe (validated by `validate`)."""
        custom = {
            "--item": options["item"],
            "--list-price": options["list_price"],
            "--budget": options["budget"],
            "--cost": options["cost"],
        }
        given = [name for name, value in custom.items() if value is not None]
        if options["category"] is not None:
            given.append("--category")
        data: dict[str, Any] = {}
        if options["scenario"] is not None:
            if given:
                raise usage_error(
                    f"--scenario names a library product, which has its own prices: leave out "
                    f"{', '.join(given)} (or leave out --scenario for a custom item)"
                )
            data["scenario"] = options["scenario"]
        elif not given:
            raise usage_error(
                "say what is negotiated: --scenario N (a library product), or a custom item "
                "with --item TITLE --list-price P --budget B --cost C"
            )
        else:
            missing = [name for name, value in custom.items() if value is None]
            if missing:
                raise usage_error(f"a custom item needs {', '.join(missing)} too")
            item = {"title": options["item"]}
            if options["category"] is not None:
                item["category"] = options["category"]
            data |= {
                "item": item,
                "list_price": options["list_price"],
                "buyer_budget": options["budget"],
                "seller_cost": options["cost"],
            }
        for side in ("buyer", "seller"):
            config: dict[str, Any] = {"policy": side_policy(f"--{side}", options[side])}
            if options[f"{side}_model"] is not None:
                config["model"] = options[f"{side}_model"]
            data[side] = config
        data["max_turns"] = options["max_turns"]
        data["opening"] = options["opening"]
        return data

    async def negotiate(self, spec: NegotiationIn, transcript: Transcript | None) -> dict[str, Any]:
        """Run it to its end (or Ctrl-C's cancel); the stored negotiation and the models used."""
        interrupted = False
        try:
            run = await service.start(spec)
            self.run_id = run.id
            if transcript is not None:
                transcript.header(run)
                run.listen(transcript.frame)  # no await since start(): no frame is missed
            try:
                await run.done.wait()
            except asyncio.CancelledError:
                # Ctrl-C: asyncio.run cancels this task. Stop the negotiation (stored
                # `cancelled`, its upstream request closed) and report it.
                interrupted = True
                await run.stop()
            return {
                "negotiation": await service.describe(run.id),
                "models": await models_used([run.id]),
                "interrupted": interrupted,
            }
        finally:
            await close_connections()
