"""How a side plays, one module per policy behind one small interface (`base.Policy`).

`narrated` (the default): a concession strategy decides, the model words the move. `llm`: the
model decides through structured output. `human`: a person moves through the API or the socket.
"""

from __future__ import annotations

from django.utils.module_loading import import_string

from .base import Policy, Proposal, SideConfig, TextSink

__all__ = ["POLICIES", "Policy", "Proposal", "SideConfig", "TextSink", "policy_class"]

# name -> dotted path, imported when first used.
POLICIES = {
    "narrated": "negotiation.policies.narrated.NarratedPolicy",
    "llm": "negotiation.policies.llm.LLMPolicy",
    "human": "negotiation.policies.human.HumanPolicy",
}


def policy_class(name: str) -> type[Policy]:
    try:
        path = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}: use {', '.join(POLICIES)}") from None
    policy: type[Policy] = import_string(path)
    return policy
