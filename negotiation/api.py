"""HTTP face of negotiations: the scenario library (`/api/v1/scenarios`) and
`/api/v1/negotiations` (start, list, read, move, cancel, resume).

Thin on purpose: what happens is `negotiation.service`'s, how errors look is `negotiator.api`'s
(each `NegotiatorError` becomes `{"error": {"code", "message"}}` with its status). The schemas
below only document the shapes the service returns.
"""

from collections.abc import Callable
from datetime import datetime
from functools import partial
from typing import Annotated, Any, Literal
from uuid import UUID

from django.conf import settings
from django.db.models import QuerySet
from django.http import HttpRequest
from ninja import Field, FilterSchema, Path, Query, Router, Schema, Status
from ninja.pagination import paginate
from pydantic import ConfigDict, WithJsonSchema

from llm.auth import api_token, client_key
from llm.exceptions import InvalidRequest
from llm.ratelimit import check_rate
from llm.schemas import ErrorDetail, ErrorOut, Text
from llm.sessions_api import SessionPages

from . import service
from .models import Negotiation
from .scenarios import DEFAULT_BUDGET_RATIO, Product, categories, get_product, search
from .schemas import MoveIn, NegotiationIn

scenarios_router = Router(tags=["scenarios"])
router = Router(tags=["negotiations"], auth=api_token)

Policy = Literal["narrated", "llm", "human"]
StatusName = Literal["running", "deal", "no_deal", "failed", "cancelled", "interrupted"]
EndedBy = Literal["accept", "walk_away", "max_turns", "timeout", "error", "cancel", "restart"]
SideName = Literal["buyer", "seller"]


# Responses ----------------------------------------------------------------------------------------


class ItemOut(Schema):
    title: str
    category: str


class ScenarioOut(Schema):
    index: int | None = Field(
        None, ge=0, description="The library product it comes from; absent for a custom one."
    )
    item: ItemOut
    list_price: float
    buyer_budget: float | None = Field(
        description="Private to the buyer: null while a person plays the seller, until the end."
    )
    seller_cost: float | None = Field(
        description="Private to the seller: null while a person plays the buyer, until the end."
    )


class LibraryScenarioOut(Schema):
    index: int = Field(ge=0, description='Start it with `{"scenario": index}`.')
    item: ItemOut
    list_price: float = Field(description="max(list price, highest price) of the product.")
    buyer_budget: float = Field(description=f"{DEFAULT_BUDGET_RATIO} x the list price (default).")
    seller_cost: float = Field(description="The product's lowest price.")
    mutual_interest: bool = Field(
        description="The cost is below the budget: a deal can profit both."
    )


class SideOut(Schema):
    policy: Policy
    provider: str | None
    model: str | None
    temperature: float | None
    persona: str | None
    beta: float | None


class MoveOut(Schema):
    turn: int = Field(ge=1)
    side: SideName
    action: Literal["offer", "accept", "reject", "walk_away"]
    price: float | None = Field(
        description="The offer's price; the accepted offer's for accept; null otherwise."
    )
    message: str
    invalid: bool = Field(description="Refused twice by the rules: stored, and the turn passed.")
    reason: str | None = Field(None, description="Why the rules refused it (invalid moves).")
    session_id: UUID | None = Field(
        description="The `llm` session that generated it (`GET /api/v1/sessions/{id}`)."
    )


class MetricsOut(Schema):
    deal: bool
    price: float | None
    mutual_interest: bool = Field(description="The seller's cost is below the buyer's budget.")
    buyer_profit: float | None = Field(description="(budget - price) / |budget - cost|.")
    seller_profit: float | None = Field(description="(price - cost) / |budget - cost|.")
    turns: int
    invalid_moves: int
    tokens: int
    duration_ms: int


class NegotiationOut(Schema):
    id: UUID
    status: StatusName
    ended_by: EndedBy | None
    scenario: ScenarioOut
    buyer: SideOut
    seller: SideOut
    max_turns: int
    opening: SideName
    metrics: MetricsOut | None = Field(description="Once it has ended.")
    error: ErrorDetail | None
    created_at: datetime
    finished_at: datetime | None


class NegotiationDetailOut(NegotiationOut):
    moves: list[MoveOut]


# Requests -----------------------------------------------------------------------------------------

# A title must have more than whitespace (str.strip's whitespace, which JSON Schema's \s lacks).
_NOT_BLANK = r"[^\s\x1c-\x1f\x85]"


def _start_rules(schema: dict[str, Any]) -> None:
    """Publish what NegotiationIn's validators refuse, so the document alone tells which bodies
    are accepted: a library scenario or a custom one, a known provider, beta for narrated only."""
    extra: Any = NegotiationIn.model_config.get("json_schema_extra")
    schema["examples"] = extra["examples"]
    absent = {"type": "null"}
    custom = ("item", "list_price", "buyer_budget", "seller_cost")
    schema["anyOf"] = [
        {
            "title": "library scenario",
            "required": ["scenario"],
            "properties": {
                "scenario": {"type": "integer"},
                **{name: {"type": "null"} for name in custom},
            },
        },
        {
            "title": "custom scenario",
            "required": list(custom),
            "properties": {
                "scenario": absent,
                "budget_ratio": absent,
                "item": {"type": "object", "properties": {"title": {"pattern": _NOT_BLANK}}},
                **{name: {"type": "number"} for name in custom[1:]},
            },
        },
    ]
    # The smallest ratio that gives every library product a budget of at least a cent.
    ratio = schema["properties"]["budget_ratio"]["anyOf"][0]
    ratio.pop("exclusiveMinimum", None)
    ratio["minimum"] = 0.01
    side_rules = {
        "properties": {"provider": {"anyOf": [{"enum": list(settings.LLM["PROVIDERS"])}, absent]}},
        "anyOf": [
            {"properties": {"beta": absent}},
            {"properties": {"policy": {"const": "narrated"}}},
        ],
    }
    for side in ("buyer", "seller"):
        schema["properties"][side] = {"allOf": [schema["properties"][side], side_rules]}


class NegotiationStart(NegotiationIn):
    __doc__ = NegotiationIn.__doc__
    model_config = ConfigDict(json_schema_extra=_start_rules)


class ScenarioFilters(Schema):
    category: Text | None = Field(
        None, max_length=100, description="Exact, any case (`GET /api/v1/scenarios/categories`)."
    )
    search: Text | None = Field(
        None, max_length=200, description="Words the title contains, any case."
    )


class NegotiationFilters(FilterSchema):
    status: StatusName | None = None
    buyer_policy: Policy | None = None
    seller_policy: Policy | None = None


NegotiationId = Annotated[
    str,
    Path(description="A negotiation's id."),
    WithJsonSchema({"type": "string", "format": "uuid"}),
]


def _uuid(negotiation_id: str) -> str:
    """The id, checked here rather than by ninja: a POST without a body whose path fails ninja's
    validation is answered as an empty body (INVALID_JSON) by `negotiator.api`."""
    try:
        return str(UUID(negotiation_id))
    except ValueError:
        raise InvalidRequest(f"negotiation_id: not a UUID: {negotiation_id[:40]!r}") from None


class Pages(SessionPages):
    """Pages as `/api/v1/sessions` has them, each item shown through `show`."""

    def __init__(self, *, show: Callable[[Any], dict[str, Any]], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.show = show

    async def apaginate_queryset(
        self, queryset: Any, pagination: Any, request: Any, **params: Any
    ) -> Any:
        page = await super().apaginate_queryset(queryset, pagination, request, **params)
        page["items"] = [self.show(obj) for obj in page["items"]]
        return page


# The scenario library -----------------------------------------------------------------------------


@scenarios_router.get(
    "",
    response={200: list[LibraryScenarioOut], 422: ErrorOut},
    summary="List the library's scenarios",
    description="In library order; filter by `category` and `search`; `page` and `page_size`.",
)
@paginate(Pages, show=service.library_scenario, page_size=50, max_page_size=100)
async def list_scenarios(request: HttpRequest, filters: Query[ScenarioFilters]) -> list[Product]:
    return search(category=filters.category, text=filters.search)


@scenarios_router.get("/categories", response=list[str], summary="The library's categories")
async def list_categories(request: HttpRequest) -> list[str]:
    return categories()


@scenarios_router.get(
    "/{index}",
    response={200: LibraryScenarioOut, 404: ErrorOut, 422: ErrorOut},
    summary="Read one scenario of the library",
)
async def get_scenario(request: HttpRequest, index: int) -> dict[str, Any]:
    return service.library_scenario(get_product(index))  # SCENARIO_NOT_FOUND


# Negotiations -------------------------------------------------------------------------------------

STARTS = (400, 401, 404, 413, 422, 429)


@router.post(
    "",
    response={201: NegotiationDetailOut, STARTS: ErrorOut},
    exclude_unset=True,  # `scenario.index` only for a library scenario
    summary="Start a negotiation",
    description=(
        "Stores it and runs it in the background on the server; follow it with `GET .../{id}` "
        "or the WebSocket `/ws/negotiations/`. Rate limited as generating is (`LLM_RATE_LIMIT`)."
    ),
)
async def start_negotiation(
    request: HttpRequest, payload: NegotiationStart
) -> Status[dict[str, Any]]:
    await check_rate(client_key(request))
    run = await service.start(payload)
    return Status(201, await service.describe(run.id))


@router.get(
    "",
    response={200: list[NegotiationOut], 401: ErrorOut, 422: ErrorOut},
    exclude_unset=True,
    summary="List negotiations",
    description="Newest first, without their moves; filter by status and the sides' policies.",
)
@paginate(
    Pages, show=partial(service.row_as_dict, with_moves=False), page_size=50, max_page_size=100
)
async def list_negotiations(
    request: HttpRequest, filters: Query[NegotiationFilters]
) -> QuerySet[Negotiation]:
    return filters.filter(Negotiation.objects.order_by("-created_at", "-pk"))


@router.get(
    "/{negotiation_id}",
    response={200: NegotiationDetailOut, 401: ErrorOut, 404: ErrorOut, 422: ErrorOut},
    exclude_unset=True,
    summary="Read one negotiation with its moves",
)
async def get_negotiation(request: HttpRequest, negotiation_id: NegotiationId) -> dict[str, Any]:
    return await service.describe(_uuid(negotiation_id))


@router.post(
    "/{negotiation_id}/moves",
    response={201: MoveOut, (400, 401, 404, 409, 413, 422, 503): ErrorOut},
    summary="Make a person's move",
    description=(
        "For a side played by a person (`human`), on its turn. A move the rules refuse is "
        "`INVALID_MOVE` and may be made again once; refused again, it is stored invalid and the "
        "turn passes."
    ),
)
async def make_move(
    request: HttpRequest, negotiation_id: NegotiationId, payload: MoveIn
) -> Status[dict[str, Any]]:
    move = await service.move(
        _uuid(negotiation_id), payload.side, payload.action, payload.price, payload.message
    )
    return Status(201, move)


@router.post(
    "/{negotiation_id}/cancel",
    response={200: NegotiationDetailOut, (401, 404, 409, 422): ErrorOut},
    exclude_unset=True,
    summary="Cancel a negotiation",
)
async def cancel_negotiation(request: HttpRequest, negotiation_id: NegotiationId) -> dict[str, Any]:
    await service.cancel(_uuid(negotiation_id))
    return await service.describe(_uuid(negotiation_id))


@router.post(
    "/{negotiation_id}/resume",
    response={202: NegotiationDetailOut, (401, 404, 409, 422, 429): ErrorOut},
    exclude_unset=True,
    summary="Resume an interrupted negotiation",
    description="It goes on from its last stored move, in the background. Rate limited as start.",
)
async def resume_negotiation(
    request: HttpRequest, negotiation_id: NegotiationId
) -> Status[dict[str, Any]]:
    negotiation_id = _uuid(negotiation_id)
    await check_rate(client_key(request))
    run = await service.resume(negotiation_id)
    return Status(202, await service.describe(run.id))
