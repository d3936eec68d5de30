"""`llm.structured` on its own: schema checks, validation of a finished reply, the forms a server
takes and their memory, and `FieldReader` (one string field of an object read as it streams).

No Django, no sockets: every test here is pure and fast.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llm import structured
from llm.exceptions import InvalidOutput
from llm.structured import (
    FORMS,
    MAX_SCHEMA_BYTES,
    FieldReader,
    ResponseFormat,
    known_form,
    remember_form,
    schema_problem,
)

MOVE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "message": {"type": "string"},
        "action": {"enum": ["offer", "accept", "reject", "walk_away"]},
        "price": {"type": "number"},
    },
    "required": ["message", "action", "price"],
}
MOVE = ResponseFormat("move", MOVE_SCHEMA)


@pytest.fixture(autouse=True)
def _forget_forms() -> Iterator[None]:
    """Each test starts with no server's form known, and leaves none behind."""
    structured._forms.clear()
    yield
    structured._forms.clear()


def fed(reader: FieldReader, pieces: list[str]) -> str:
    return "".join(reader.feed(piece) for piece in pieces)


def split(text: str, cuts: list[int]) -> list[str]:
    bounds = [0, *sorted(cuts), len(text)]
    return [text[start:end] for start, end in itertools.pairwise(bounds)]


# schema_problem ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "schema",
    [
        MOVE_SCHEMA,
        {},  # anything goes
        {
            "$schema": "http://json-schema.org/draft-04/schema#",
            "minimum": 0,
            "exclusiveMinimum": True,
        },
        {"$schema": "http://json-schema.org/draft-06/schema#", "exclusiveMinimum": 0},
        {"$schema": "http://json-schema.org/draft-07/schema#", "if": {"type": "string"}},
        {"$schema": "https://json-schema.org/draft/2019-09/schema", "$defs": {"a": {}}},
        {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "type": "array",
            "prefixItems": [{"type": "string"}],
        },
        {
            "type": "object",
            "$defs": {"p": {"type": "number"}},
            "properties": {"a": {"$ref": "#/$defs/p"}},
        },
    ],
    ids=["move", "empty", "draft4", "draft6", "draft7", "2019-09", "2020-12", "local-ref"],
)
def test_valid_schemas_of_several_drafts_have_no_problem(schema: dict[str, Any]) -> None:
    assert schema_problem(schema) is None


def test_each_draft_is_checked_by_its_own_rules() -> None:
    """`exclusiveMinimum: 5` is a number in draft 6 and later, a boolean in draft 4."""
    assert schema_problem({"exclusiveMinimum": 5}) is None
    problem = schema_problem(
        {"$schema": "http://json-schema.org/draft-04/schema#", "exclusiveMinimum": 5}
    )
    assert problem == ("is not a valid JSON Schema at exclusiveMinimum: 5 is not of type 'boolean'")


@pytest.mark.parametrize("schema", [[MOVE_SCHEMA], "object", None, True, 3])
def test_a_schema_that_is_not_an_object_is_refused(schema: Any) -> None:
    assert schema_problem(schema) == "must be a JSON Schema object"


def test_an_unknown_type_is_refused_and_the_message_says_where() -> None:
    problem = schema_problem({"type": "nonsense"})
    assert problem is not None
    assert problem.startswith("is not a valid JSON Schema at type: 'nonsense' ")


def test_a_mistake_deep_in_the_schema_is_named_by_its_path() -> None:
    problem = schema_problem({"type": "object", "properties": {"price": {"type": 3}}})
    assert problem is not None
    assert problem.startswith("is not a valid JSON Schema at properties/price/type: 3 ")


def test_a_long_message_is_cut_short() -> None:
    problem = schema_problem({"type": "x" * 5000})
    assert problem is not None
    assert problem.endswith("…")
    assert len(problem) < 300


def _schema_of_size(size: int) -> dict[str, Any]:
    padding = size - len(orjson.dumps({"description": ""}))
    schema = {"description": "x" * padding}
    assert len(orjson.dumps(schema)) == size
    return schema


def test_a_schema_of_64_kib_is_accepted_one_byte_more_is_refused() -> None:
    assert MAX_SCHEMA_BYTES == 64 * 1024
    assert schema_problem(_schema_of_size(MAX_SCHEMA_BYTES)) is None
    assert schema_problem(_schema_of_size(MAX_SCHEMA_BYTES + 1)) == (
        f"is {MAX_SCHEMA_BYTES + 1} bytes of JSON; at most {MAX_SCHEMA_BYTES} are accepted"
    )


def test_the_size_counts_utf8_bytes_not_characters() -> None:
    chars = MAX_SCHEMA_BYTES // 2  # each "é" is two bytes of UTF-8
    problem = schema_problem({"description": "é" * chars})
    assert problem is not None and "bytes of JSON" in problem


@pytest.mark.parametrize(
    "ref",
    [
        "#/definitions/missing",  # nowhere in the schema
        "#nowhere",  # an anchor no subschema has
        "http://127.0.0.1:9/schema.json",  # elsewhere: never fetched by the server
        "file:///etc/passwd",
    ],
)
def test_a_ref_that_cannot_be_resolved_within_the_schema_is_refused(ref: str) -> None:
    problem = schema_problem({"type": "object", "properties": {"a": {"items": {"$ref": ref}}}})
    assert problem == (
        f"is not usable: its $ref {ref!r} cannot be resolved (only references within the "
        "schema are followed)"
    )


@pytest.mark.parametrize(
    "schema",
    [
        {"$defs": {"p": {"type": "number"}}, "properties": {"a": {"$ref": "#/$defs/p"}}},
        {"properties": {"child": {"$ref": "#"}}},  # recursive
        {"$anchor": "top", "properties": {"a": {"$ref": "#top"}}},
        {
            "$schema": "http://json-schema.org/draft-04/schema#",
            "definitions": {"p": {}},
            "properties": {"a": {"$ref": "#/definitions/p"}},
        },
        {  # relative to a nested $id
            "$id": "https://example.com/root.json",
            "$defs": {"item": {"$id": "item.json", "$defs": {"x": {}}, "$ref": "#/$defs/x"}},
            "properties": {"a": {"$ref": "item.json"}},
        },
        {"enum": [{"$ref": "#/nowhere"}]},  # data, not a reference
    ],
    ids=["defs", "recursive", "anchor", "draft4", "nested-id", "in-enum"],
)
def test_refs_within_the_schema_are_accepted(schema: dict[str, Any]) -> None:
    assert schema_problem(schema) is None


@pytest.mark.parametrize("dialect", [[], 5, None, {"a": 1}, "http://example.com/my-draft"])
def test_a_schema_naming_an_unknown_draft_is_refused(dialect: Any) -> None:
    problem = schema_problem({"$schema": dialect, "type": "object"})
    assert problem is not None
    assert problem.startswith("names in $schema a draft that is not known here")


@pytest.mark.parametrize(
    ("depth", "problem"),
    [
        (150, "is nested too deeply to be checked"),  # deeper than jsonschema's recursion goes
        (300, "cannot be used: Recursion limit reached"),  # deeper than orjson goes
        (2000, "cannot be used: Recursion limit reached"),
    ],
)
def test_a_schema_nested_too_deeply_is_refused_not_raised(depth: int, problem: str) -> None:
    schema: dict[str, Any] = {}
    for _ in range(depth):
        schema = {"not": schema}
    assert schema_problem(schema) == problem


@pytest.mark.parametrize(
    "schema",
    [
        {"description": "a\x00b"},
        {"properties": {"a\x00": {}}},  # in a key
        {"enum": [["deep", {"x": "\x00"}]]},
    ],
)
def test_a_schema_holding_a_nul_character_is_refused(schema: dict[str, Any]) -> None:
    assert schema_problem(schema) == "must not contain NUL (\\u0000) characters"


def test_a_pattern_naming_nul_in_its_text_is_no_nul() -> None:
    assert schema_problem({"type": "string", "pattern": "^[^\\u0000]*$"}) is None


def test_an_integer_beyond_64_bits_is_refused_not_raised() -> None:
    assert schema_problem({"maximum": 10**30}) == "cannot be used: Integer exceeds 64-bit range"


# ResponseFormat ------------------------------------------------------------------------------


def test_a_reply_that_follows_the_schema_is_returned_parsed() -> None:
    text = '{"message": "I offer 120.", "action": "offer", "price": 120.5}'
    assert MOVE.validate(text) == {"message": "I offer 120.", "action": "offer", "price": 120.5}


def test_a_top_level_array_or_null_is_returned_as_such() -> None:
    assert ResponseFormat("list", {"type": "array"}).validate("[1, 2]") == [1, 2]
    assert ResponseFormat("nothing", {"type": "null"}).validate("null") is None


@pytest.mark.parametrize(
    "text", ['Sure! {"message": "hi"}', '{"message": "hi", "action": "off', "", "   "]
)
def test_a_reply_that_is_not_json_is_invalid_output(text: str) -> None:
    with pytest.raises(InvalidOutput) as caught:
        MOVE.validate(text)
    error = caught.value
    assert error.code == "LLM_INVALID_OUTPUT" and error.status == 502
    assert error.message.startswith("The reply is not valid JSON (")
    assert error.message.endswith("; it was asked to follow the schema 'move'")


def test_a_wrong_type_deep_in_the_reply_is_named_by_its_path() -> None:
    offers = ResponseFormat(
        "offers",
        {
            "type": "object",
            "properties": {
                "offers": {
                    "type": "array",
                    "items": {"type": "object", "properties": {"price": {"type": "number"}}},
                }
            },
        },
    )
    with pytest.raises(InvalidOutput) as caught:
        offers.validate('{"offers": [{"price": 1}, {"price": "ten"}]}')
    assert caught.value.message == (
        "The reply does not follow the schema 'offers' at offers/1/price: "
        "'ten' is not of type 'number'"
    )


def test_a_reply_missing_a_field_is_named_at_the_top() -> None:
    with pytest.raises(InvalidOutput) as caught:
        MOVE.validate('{"message": "hi", "action": "offer"}')
    assert caught.value.message == (
        "The reply does not follow the schema 'move' at the reply: 'price' is a required property"
    )


def test_a_value_off_its_enum_is_invalid() -> None:
    with pytest.raises(InvalidOutput, match=r"at action: 'haggle' is not one of"):
        MOVE.validate('{"message": "hi", "action": "haggle", "price": 1}')


def test_validation_follows_the_schemas_draft() -> None:
    draft4 = ResponseFormat(
        "d4",
        {
            "$schema": "http://json-schema.org/draft-04/schema#",
            "maximum": 10,
            "exclusiveMaximum": True,
        },
    )
    assert draft4.validate("9") == 9
    with pytest.raises(InvalidOutput, match="at the reply: 10 is greater than or equal"):
        draft4.validate("10")


def test_validation_never_fetches_a_remote_ref() -> None:
    """Even a schema that skipped `schema_problem` fails closed: nothing is retrieved."""
    remote = ResponseFormat("remote", {"$ref": "http://127.0.0.1:9/schema.json"})
    with pytest.raises(InvalidOutput) as caught:
        remote.validate("{}")
    assert caught.value.message.startswith(
        "The reply could not be checked: the schema 'remote' has a $ref that cannot be resolved"
    )


def test_a_reply_nested_deeper_than_the_validator_goes_is_invalid_output() -> None:
    tree = ResponseFormat("tree", {"type": "object", "properties": {"a": {"$ref": "#"}}})
    deep = '{"a": ' * 900 + "{}" + "}" * 900
    with pytest.raises(InvalidOutput, match="nested too deeply"):
        tree.validate(deep)


def test_as_openai_without_strict_leaves_it_out() -> None:
    assert MOVE.as_openai() == {
        "type": "json_schema",
        "json_schema": {"name": "move", "schema": MOVE_SCHEMA},
    }


@pytest.mark.parametrize("strict", [True, False])
def test_as_openai_with_strict_passes_it_on_even_when_false(strict: bool) -> None:
    assert ResponseFormat("move", MOVE_SCHEMA, strict).as_openai() == {
        "type": "json_schema",
        "json_schema": {"name": "move", "schema": MOVE_SCHEMA, "strict": strict},
    }


def test_in_form_gives_each_server_its_own_shape() -> None:
    strict = ResponseFormat("move", MOVE_SCHEMA, True)
    assert strict.in_form("json_schema") == strict.as_openai()
    # llama-cpp-python's form: the schema alone (it knows neither the name nor strict).
    assert strict.in_form("json_object") == {"type": "json_object", "schema": MOVE_SCHEMA}
    assert FORMS == ("json_schema", "json_object")  # OpenAI's own is asked first


def test_a_response_format_hashes_without_its_schema() -> None:
    """Frozen, yet a dict inside: equal formats are equal and it can still be hashed."""
    assert hash(ResponseFormat("move", MOVE_SCHEMA)) == hash(ResponseFormat("move", {}))
    assert ResponseFormat("move", dict(MOVE_SCHEMA)) == MOVE


# The forms' memory ---------------------------------------------------------------------------


def test_an_unknown_server_has_no_known_form() -> None:
    assert known_form("http://127.0.0.1:8080/v1") is None


def test_a_remembered_form_is_found_with_or_without_a_trailing_slash() -> None:
    remember_form("http://127.0.0.1:8080/v1/", "json_object")
    assert known_form("http://127.0.0.1:8080/v1") == "json_object"
    assert known_form("http://127.0.0.1:8080/v1/") == "json_object"
    assert known_form("http://127.0.0.1:8081/v1") is None  # another server
    assert known_form("http://127.0.0.1:8080/v2") is None


def test_the_last_form_found_wins() -> None:
    remember_form("http://host/v1", "json_object")
    remember_form("http://host/v1", "json_schema")
    assert known_form("http://host/v1/") == "json_schema"


# FieldReader ---------------------------------------------------------------------------------

MESSAGE = 'I said "no", then \\ and\nline two, caf\u00e9 \U0001f600 \u2028.'
DOCUMENTS = [
    # message first, as the schema should put it; ensure_ascii turns é and 😀 into \u escapes
    json.dumps({"message": MESSAGE, "action": "offer", "price": 120}),
    json.dumps({"message": MESSAGE, "action": "offer", "price": 120}, ensure_ascii=False),
    # message after other fields, one of which mentions a "message" key inside a string
    json.dumps({"note": '"message": "fake"', "price": 1.5, "message": MESSAGE}),
    # nested objects with a message of their own: only the top-level one is read
    json.dumps({"meta": {"message": "inner"}, "message": MESSAGE, "list": [{"message": "x"}]}),
]


@pytest.mark.parametrize("document", DOCUMENTS, ids=["ascii", "raw", "not-first", "nested"])
def test_every_split_into_three_pieces_yields_exactly_the_value(document: str) -> None:
    assert json.loads(document)["message"] == MESSAGE
    length = len(document)
    for first in range(length + 1):
        for second in range(first, length + 1):
            reader = FieldReader("message")
            pieces = [document[:first], document[first:second], document[second:]]
            assert fed(reader, pieces) == MESSAGE, pieces


@pytest.mark.parametrize("document", DOCUMENTS, ids=["ascii", "raw", "not-first", "nested"])
def test_one_character_at_a_time_yields_the_value_as_it_comes(document: str) -> None:
    reader = FieldReader("message")
    seen = ""
    for index, char in enumerate(document):
        seen += reader.feed(char)
        assert MESSAGE.startswith(seen), (index, seen)
    assert seen == MESSAGE


def test_the_value_streams_before_the_object_is_closed() -> None:
    reader = FieldReader("message")
    assert reader.feed('{"mess') == ""
    assert reader.feed('age": "Hel') == "Hel"
    assert reader.feed("lo") == "lo"
    assert reader.feed("\\") == ""  # an escape not yet complete
    assert reader.feed('n" ') == "\n"
    assert reader.feed(', "action": "offer"}') == ""


def test_an_escaped_emoji_cut_between_its_surrogates_comes_whole() -> None:
    reader = FieldReader("message")
    assert reader.feed('{"message": "a\\ud83d') == "a"
    assert reader.feed("\\ude") == ""
    assert reader.feed('00b"}') == "\U0001f600b"


def test_another_field_name_can_be_read() -> None:
    reader = FieldReader("text")
    assert fed(reader, ['{"message": "no", "te', 'xt": "ye', 's"}']) == "yes"


@pytest.mark.parametrize(
    "document",
    [
        '{"message": 42, "action": "offer"}',
        '{"message": null}',
        '{"message": {"text": "hi"}}',
        '{"message": ["hi"]}',
        '{"message": true}',
        '{"action": "offer", "price": 1}',  # no message at all
    ],
)
def test_a_message_that_is_not_a_string_yields_nothing(document: str) -> None:
    for cut in range(len(document) + 1):
        reader = FieldReader("message")
        assert fed(reader, [document[:cut], document[cut:]]) == ""


@pytest.mark.parametrize(
    "document",
    [
        'Sure! Here is my move: {"message": "hi", "price": 1}',  # prose before the object
        '"message": "hi"',  # a JSON string, not an object
        '["message", "hi"]',  # a JSON array
        "message: hi",
    ],
)
def test_text_that_is_not_an_object_yields_nothing_and_never_raises(document: str) -> None:
    reader = FieldReader("message")
    assert fed(reader, list(document)) == ""


# The same, for any message and any way the stream is cut (hypothesis).

# (as written in the JSON text, as decoded): escapes servers and json.dumps produce.
ESCAPES = [
    ('\\"', '"'),
    ("\\\\", "\\"),
    ("\\/", "/"),
    ("\\n", "\n"),
    ("\\r", "\r"),
    ("\\t", "\t"),
    ("\\b", "\b"),
    ("\\f", "\f"),
    ("\\u00e9", "\u00e9"),
    ("\\u0000", "\x00"),
    ("\\u2028", "\u2028"),
    ("\\ud83d\\ude00", "\U0001f600"),
    ("\\uD83E\\uDD1D", "\U0001f91d"),
]
# Characters written as they are: anything but a quote, a backslash, a control or a surrogate.
PLAIN = st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters='"\\').map(
    lambda c: (c, c)
)
ATOMS = st.one_of(
    PLAIN,
    st.sampled_from(ESCAPES),
    st.sampled_from(["\U0001f600", "é", "€", " "]).map(lambda c: (c, c)),
)


@st.composite
def streamed_documents(draw: st.DrawFn) -> tuple[list[str], str]:
    atoms = draw(st.lists(ATOMS, max_size=40))
    literal = '"' + "".join(written for written, _ in atoms) + '"'
    value = "".join(decoded for _, decoded in atoms)
    before = draw(
        st.sampled_from(
            ['{"message": ', '{ "price" : 12.5 , "message":', '{"a": {"message": "no"}, "message":']
        )
    )
    after = draw(st.sampled_from(["}", ', "action": "offer", "price": 1}', ' , "tail": "\\"}"}']))
    document = before + literal + after
    assert json.loads(document)["message"] == value  # the document is what it claims to be
    cuts = draw(st.lists(st.integers(0, len(document)), max_size=12))
    return split(document, cuts), value


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(streamed_documents())
def test_any_message_cut_anywhere_yields_exactly_its_value(case: tuple[list[str], str]) -> None:
    pieces, value = case
    reader = FieldReader("message")
    seen = ""
    for piece in pieces:
        seen += reader.feed(piece)
        assert value.startswith(seen)  # never a character that is later taken back
    assert seen == value


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=60), st.data())
def test_any_text_dumped_by_json_yields_itself(text: str, data: st.DataObject) -> None:
    ensure_ascii = data.draw(st.booleans())
    document = json.dumps({"message": text, "price": 1}, ensure_ascii=ensure_ascii)
    cuts = data.draw(st.lists(st.integers(0, len(document)), max_size=10))
    assert fed(FieldReader("message"), split(document, cuts)) == text
