"""`llm.models`: the stored session and its messages."""

from __future__ import annotations

from llm.models import Message, Session


def test_messages_are_ordered_by_their_own_columns_without_a_join() -> None:
    """Messages in order of session and position, read from the message table alone.

    The admin lists them.
    """
    query = str(Message.objects.all().query)
    assert "JOIN" not in query.upper(), query
    assert query.endswith(
        'ORDER BY "llm_message"."session_id" ASC, "llm_message"."position" ASC'
    ), query


def test_sessions_are_newest_first() -> None:
    assert Session._meta.ordering == ["-created_at"]


def test_total_tokens_adds_the_parts_when_either_is_known() -> None:
    assert Session(prompt_tokens=None, completion_tokens=None).total_tokens is None
    assert Session(prompt_tokens=5, completion_tokens=None).total_tokens == 5
    assert Session(prompt_tokens=5, completion_tokens=7).total_tokens == 12
