"""Structured output: a reply constrained to a JSON Schema, in whatever form each server takes.

Users send OpenAI's shape (`{"type": "json_schema", "json_schema": {"name", "schema",
"strict"?}}`). Servers differ (measured 2026-12-06, `../shared/notes/negotiation.md`): LM Studio
and OpenRouter take that shape; llama-cpp-python's server (the bundled model) refuses it with
HTTP 500 and takes `{"type": "json_object", "schema": ...}`. The form a base URL takes is
remembered here once found (`remember_form`), so only the first request to an unknown server
may be asked twice.

Pure apart from that memory: schema checks, validation of a finished reply, and `FieldReader`,
which reads one string field of an object while it is still being written (jiter's partial
mode), so a structured reply can be shown token by token.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, cast

import jiter
import jsonschema
import orjson
import referencing
import referencing.exceptions
import referencing.jsonschema

from .exceptions import InvalidOutput

__all__ = [
    "FORMS",
    "MAX_SCHEMA_BYTES",
    "FieldReader",
    "Form",
    "ResponseFormat",
    "known_form",
    "remember_form",
    "schema_problem",
]

# A schema larger than this is refused (INVALID_REQUEST): it travels with every request.
MAX_SCHEMA_BYTES = 64 * 1024

# `$ref`s resolve within the schema, never by fetching: jsonschema's default registry opens any URL
# or file a schema names, and a schema is what a client sent.
_NO_RETRIEVAL = referencing.Registry()
# The draft of a schema without `$schema` (2020-12).
_LATEST = jsonschema.validators.validator_for({})

Form = Literal["json_schema", "json_object"]
# In the order an unknown server is asked: OpenAI's own first.
FORMS: tuple[Form, ...] = ("json_schema", "json_object")


@dataclass(frozen=True, slots=True)
class ResponseFormat:
    """A JSON Schema the reply must follow, as OpenAI's `response_format` names it."""

    name: str
    schema: dict[str, Any] = field(hash=False)
    strict: bool | None = None
    description: str | None = None

    def as_openai(self) -> dict[str, Any]:
        """OpenAI's shape: what users send, what LM Studio and OpenRouter take."""
        inner: dict[str, Any] = {"name": self.name, "schema": self.schema}
        if self.strict is not None:
            inner["strict"] = self.strict
        if self.description:
            inner["description"] = self.description
        return {"type": "json_schema", "json_schema": inner}

    def in_form(self, form: Form) -> dict[str, Any]:
        """The `response_format` to send a server that takes `form`."""
        if form == "json_object":  # llama-cpp-python's server: grammar-constrained to the schema
            return {"type": "json_object", "schema": self.schema}
        return self.as_openai()

    def validate(self, text: str) -> Any:
        """The reply parsed and checked against the schema; `InvalidOutput` when it is not JSON
        or does not follow the schema (the message says where)."""
        try:
            output = orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            raise InvalidOutput(
                f"The reply is not valid JSON ({exc}); it was asked to follow the schema "
                f"{self.name!r}"
            ) from exc
        validator = (_validator_class(self.schema) or _LATEST)(self.schema, registry=_NO_RETRIEVAL)
        try:
            error = jsonschema.exceptions.best_match(validator.iter_errors(output))
        except referencing.exceptions.Unresolvable as exc:  # a schema `schema_problem` refuses
            raise InvalidOutput(
                f"The reply could not be checked: the schema {self.name!r} has a $ref that "
                f"cannot be resolved ({_short(str(exc))})"
            ) from exc
        except RecursionError as exc:
            raise InvalidOutput(
                f"The reply is nested too deeply to check against the schema {self.name!r}"
            ) from exc
        if error is not None:
            where = "/".join(str(part) for part in error.absolute_path) or "the reply"
            raise InvalidOutput(
                f"The reply does not follow the schema {self.name!r} at {where}: "
                f"{_short(error.message)}"
            )
        return output


def schema_problem(schema: Any) -> str | None:
    """Why `schema` cannot be used, or None: not an object, too large or too deep, holding a NUL,
    of a draft jsonschema does not know, not valid JSON Schema, or with a `$ref` that does not
    resolve within it (nothing is ever fetched)."""
    if not isinstance(schema, dict):
        return "must be a JSON Schema object"
    try:
        size = len(orjson.dumps(schema))
    except orjson.JSONEncodeError as exc:  # over 255 levels deep, or an integer over 64 bits
        return f"cannot be used: {exc}"
    if size > MAX_SCHEMA_BYTES:
        return f"is {size} bytes of JSON; at most {MAX_SCHEMA_BYTES} are accepted"
    if _holds_nul(schema):  # it is stored with the session, and PostgreSQL refuses NUL
        return "must not contain NUL (\\u0000) characters"
    validator = _validator_class(schema)
    if validator is None:
        return (
            "names in $schema a draft that is not known here (draft-03 to 2020-12 are; without "
            "$schema, 2020-12 is used)"
        )
    try:
        validator.check_schema(schema)
        ref = _unresolvable_ref(schema)
    except jsonschema.exceptions.SchemaError as exc:
        where = "/".join(str(part) for part in exc.absolute_path)
        return f"is not a valid JSON Schema{f' at {where}' if where else ''}: {_short(exc.message)}"
    except RecursionError:
        return "is nested too deeply to be checked"
    if ref is not None:
        return (
            f"is not usable: its $ref {_short(ref)!r} cannot be resolved (only references "
            "within the schema are followed)"
        )
    return None


def _holds_nul(value: Any) -> bool:
    """Whether a NUL character is in any string of `value` (keys too)."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return True
        elif isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return False


def _validator_class(schema: dict[str, Any]) -> type[jsonschema.protocols.Validator] | None:
    """The validator of the draft `schema` names in `$schema` (the latest when it names none), or
    None when it names one jsonschema does not know (which `validator_for` would only warn of,
    or raise a TypeError for, when it is not a string)."""
    if "$schema" not in schema:
        return _LATEST
    if not isinstance(schema["$schema"], str):
        return None
    return jsonschema.validators.validator_for(schema, default=cast(Any, None))


def _unresolvable_ref(schema: dict[str, Any]) -> str | None:
    """The first `$ref` (or `$dynamicRef`) of `schema` that does not resolve without fetching."""
    specification = referencing.jsonschema.specification_with(
        schema.get("$schema", ""), default=referencing.jsonschema.DRAFT202012
    )
    resolver = _NO_RETRIEVAL.resolver_with_root(specification.create_resource(schema))

    def first(resource: referencing.Resource[Any], resolver: Any) -> str | None:
        resolver = resolver.in_subresource(resource)
        contents = resource.contents
        if isinstance(contents, dict):
            for keyword in ("$ref", "$dynamicRef"):
                ref = contents.get(keyword)
                if isinstance(ref, str):
                    try:
                        resolver.lookup(ref)
                    except referencing.exceptions.Unresolvable:
                        return ref
        for subresource in resource.subresources():
            found = first(subresource, resolver)
            if found is not None:
                return found
        return None

    return first(specification.create_resource(schema), resolver)


def _short(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


# base URL -> the form its server takes, as found or as `make run` knows it.
_forms: dict[str, Form] = {}


def remember_form(base_url: str, form: Form) -> None:
    _forms[base_url.rstrip("/")] = form


def known_form(base_url: str) -> Form | None:
    return _forms.get(base_url.rstrip("/"))


class FieldReader:
    """The text of one top-level string field of a JSON object, as the object is written.

    `feed(piece)` takes the next piece of the reply and returns what it added to the field's
    value (often nothing: keys, other fields, an escape not yet complete). Concatenated, the
    returns are the field's whole value. Each feed re-reads the text so far with jiter's partial
    mode: the replies it serves are a few hundred characters.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._text = bytearray()
        self._shown = 0

    def feed(self, piece: str) -> str:
        self._text += piece.encode()
        try:
            value = jiter.from_json(bytes(self._text), partial_mode="trailing-strings")
        except ValueError:  # not an object yet, or a piece cut inside an escape
            return ""
        found = value.get(self.name) if isinstance(value, dict) else None
        if not isinstance(found, str) or len(found) <= self._shown:
            return ""
        added = found[self._shown :]
        self._shown = len(found)
        return added
