"""The negotiation app's errors, on `llm`'s one tree: each carries its contract code and status.

The rules' own refusals (`INVALID_MOVE`, `NOT_YOUR_TURN`, `NEGOTIATION_OVER`) live beside the
rules in `negotiation.rules`, `SCENARIO_NOT_FOUND` beside the library in `negotiation.scenarios`.
"""

from __future__ import annotations

from llm.exceptions import ClientError, NegotiatorError


class NegotiationNotFound(ClientError):
    code = "NEGOTIATION_NOT_FOUND"
    status = 404


class NegotiationUnavailable(NegotiatorError):
    """The negotiation is stored `running`, but no process answers for it (it stopped, or the
    channel layer is down): a move or a cancel cannot reach it now."""

    code = "NEGOTIATION_UNAVAILABLE"
    status = 503
