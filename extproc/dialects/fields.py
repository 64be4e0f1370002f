"""Field checks shared by every dialect parser.

A parser must turn any JSON object into either a view or an :class:`InvalidRequest` that
names the field the way OpenAI does (``messages[2].content``), never a KeyError or
TypeError. These helpers give every dialect the same wording, and they build the ``param``
string only when they fail, because the happy path runs once per request.

``None`` counts as absent throughout: SDKs in other languages send ``null`` for unset
optional fields, and the upstream APIs accept that.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from extproc.dialects.base import JsonPath, LLMRequest, TextPart
from extproc.errors import InvalidRequest


def format_param(path: JsonPath) -> str:
    """OpenAI's spelling of a field path, which SDKs and users already recognise."""
    out: list[str] = []
    for step in path:
        if isinstance(step, int):
            out.append(f"[{step}]")
        else:
            if out:
                out.append(".")
            out.append(step)
    return "".join(out)


def json_type(value: object) -> str:
    """Name a value's JSON type for a message (never echo the value: it may be prompt text)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a decimal number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def missing(path: JsonPath) -> InvalidRequest:
    param = format_param(path)
    return InvalidRequest(
        f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter"
    )


def invalid_type(path: JsonPath, expected: str, value: object) -> InvalidRequest:
    """The error for a present value of the wrong type (``None`` reads as missing)."""
    if value is None:
        return missing(path)
    param = format_param(path)
    return InvalidRequest(
        f"Invalid type for '{param}': expected {expected}, but got {json_type(value)} instead.",
        param=param,
        code="invalid_type",
    )


def message_role(message: dict[str, Any], path: JsonPath, roles: tuple[str, ...]) -> str:
    """The message's ``role``, one of ``roles``; an unknown role is refused, so nothing
    reaches a model under a role policy does not know."""
    role = message.get("role")
    if role not in roles:
        if not isinstance(role, str):
            raise invalid_type((*path, "role"), "a string", role)
        raise invalid_value((*path, "role"), "one of " + ", ".join(roles))
    return str(role)


def invalid_value(path: JsonPath, expected: str) -> InvalidRequest:
    param = format_param(path)
    return InvalidRequest(
        f"Invalid value for '{param}': expected {expected}.", param=param, code="invalid_value"
    )


MAX_MODEL_CHARS = 256
"""Longer than any model name; a caller's string is kept in the audit record, so it is
bounded (a 7 MiB name, refused 404 a thousand times, pinned gigabytes in the records)."""


def require_model(body: dict[str, Any]) -> str:
    """Every dialect routes, authorises and prices by model, so it is checked first."""
    model = body.get("model")
    if not isinstance(model, str):
        raise invalid_type(("model",), "a string", model)
    if not model.strip():
        raise invalid_value(("model",), "a non-empty model name")
    if len(model) > MAX_MODEL_CHARS:
        raise invalid_value(("model",), f"a model name of at most {MAX_MODEL_CHARS} characters")
    return model


def expect_list(value: object, path: JsonPath, *, non_empty: bool = False) -> list[Any]:
    if not isinstance(value, list):
        raise invalid_type(path, "an array", value)
    if non_empty and not value:
        param = format_param(path)
        raise InvalidRequest(
            f"Invalid '{param}': empty array. Expected an array with at least one element.",
            param=param,
            code="empty_array",
        )
    return value


def expect_object(value: object, path: JsonPath) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise invalid_type(path, "an object", value)
    return value


def expect_str(value: object, path: JsonPath) -> str:
    if not isinstance(value, str):
        raise invalid_type(path, "a string", value)
    return value


def optional_str(obj: dict[str, Any], key: str, path: JsonPath) -> str | None:
    """An optional string field of ``obj``, which sits at ``path``."""
    value = obj.get(key)
    if value is None or isinstance(value, str):
        return value
    raise invalid_type((*path, key), "a string", value)


def optional_positive_int(body: dict[str, Any], key: str) -> int | None:
    """A token cap: ``True`` and ``10.0`` are rejected, as the upstream APIs do."""
    value = body.get(key)
    if value is None:
        return None
    if type(value) is not int:
        raise invalid_type((key,), "an integer", value)
    if value < 1:
        raise InvalidRequest(
            f"Invalid '{key}': integer below minimum value. "
            f"Expected a value >= 1, but got {value} instead.",
            param=key,
            code="integer_below_min_value",
        )
    return value


def required_positive_int(body: dict[str, Any], key: str) -> int:
    value = optional_positive_int(body, key)
    if value is None:
        raise missing((key,))
    return value


def optional_bool(body: dict[str, Any], key: str) -> bool:
    value = body.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise invalid_type((key,), "a boolean", value)
    return value


def string_leaves(value: object, path: JsonPath) -> list[tuple[JsonPath, str]]:
    """Every string inside ``value`` with its path, in document order.

    Walks with a stack of iterators rather than recursion: orjson accepts nesting deeper
    than Python's recursion limit, and a RecursionError must not escape a parser. Object
    keys are not included: they cannot be rewritten in place.
    """
    if isinstance(value, str):
        return [(path, value)]
    found: list[tuple[JsonPath, str]] = []
    stack: list[tuple[Iterator[tuple[Any, Any]], JsonPath]] = []
    if isinstance(value, dict | list):
        stack.append((_children(value), path))
    while stack:
        children, where = stack[-1]
        for step, child in children:
            if isinstance(child, str):
                found.append(((*where, step), child))
            elif isinstance(child, dict | list):
                stack.append((_children(child), (*where, step)))
                break  # descend now; this level's iterator resumes afterwards
        else:
            stack.pop()
    return found


def asks_hour_cache(body: dict[str, Any]) -> bool:
    """Whether a ``cache_control`` asks for Anthropic's 1-hour cache: the request's, a
    tool's, a system block's, a message block's or one inside a tool result (Anthropic's
    own requests, and chat ones translated for Claude, whose parts keep theirs). Read
    leniently: the shapes were checked or are the API's."""
    blocks: list[Any] = [body]
    for field in ("tools", "system"):
        if isinstance(body.get(field), list):
            blocks.extend(body[field])
    for message in body.get("messages") or ():
        content = message.get("content") if isinstance(message, dict) else None
        for block in content if isinstance(content, list) else ():
            blocks.append(block)
            inner = block.get("content") if isinstance(block, dict) else None
            if isinstance(inner, list):
                blocks.extend(inner)
    return any(
        isinstance(block, dict)
        and isinstance(control := block.get("cache_control"), dict)
        and control.get("ttl") == "1h"
        for block in blocks
    )


def member_names(value: object) -> list[str]:
    """Every object member name inside ``value``, each object's names before those of
    its values (iteratively, as :func:`string_leaves`): the model reads a tool input's
    names with its values."""
    names: list[str] = []
    stack: list[object] = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            names.extend(key for key in node if isinstance(key, str))
            stack.extend(reversed(list(node.values())))
        elif isinstance(node, list):
            stack.extend(reversed(node))
    return names


def names_text(value: object, path: JsonPath, role: str, kind: str) -> TextPart | None:
    """The member names of a decoded tool input as one text, locked (they have no place
    to be rewritten in: a rule that would rewrite them blocks); ``None`` without any."""
    names = member_names(value)
    return TextPart(path, role, kind, "\n".join(names), locked=True) if names else None


def _children(node: dict[str, Any] | list[Any]) -> Iterator[tuple[Any, Any]]:
    return iter(node.items()) if isinstance(node, dict) else enumerate(node)


def text_or_tokens(body: dict[str, Any], key: str, kind: str) -> list[TextPart]:
    """The ``prompt`` / ``input`` of the legacy completions and embeddings APIs.

    Both take a string, an array of strings, an array of token ids or an array of such
    arrays. Token arrays are checked only for what matters to policy: that no string (or
    object holding one) hides among the ids, where a lenient upstream might accept it
    unseen. Whether an id is a valid integer is left to the upstream.
    """
    value = body.get(key)
    if isinstance(value, str):
        return [TextPart((key,), "user", kind, value)]
    expected = "a string, an array of strings or an array of token ids"
    if not isinstance(value, list):
        raise invalid_type((key,), expected, value)
    if _numbers_only(value):
        return []  # one prompt of token ids: the common large case
    texts: list[TextPart] = []
    for i, item in enumerate(value):
        if isinstance(item, str):
            texts.append(TextPart((key, i), "user", kind, item))
        elif isinstance(item, list):
            if not _numbers_only(item):
                j = next(j for j, token in enumerate(item) if not isinstance(token, int | float))
                raise invalid_type((key, i, j), "an integer token id", item[j])
        elif not isinstance(item, int | float):
            raise invalid_type((key, i), expected, item)
    return texts


def asked_for_usage(request: LLMRequest) -> bool:
    """Whether the caller asked for the final usage chunk of an OpenAI stream."""
    options = request.body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def include_usage_rewrites(request: LLMRequest) -> dict[JsonPath, Any]:
    """OpenAI streams report usage only with ``stream_options.include_usage``."""
    if not request.stream or asked_for_usage(request):
        return {}
    options = request.body.get("stream_options")
    return {
        ("stream_options",): {
            **(options if isinstance(options, dict) else {}),
            "include_usage": True,
        }
    }


def token_id_count(value: Any) -> int:
    """How many token ids a ``prompt`` / ``input`` holds (0 for text prompts)."""
    if not isinstance(value, list) or not value:
        return 0
    if _numbers_only(value):
        return len(value)
    return sum(len(item) for item in value if isinstance(item, list))


def _numbers_only(items: list[Any]) -> bool:
    """``sum`` fails on anything but numbers and runs in C: 6x faster than a type loop."""
    try:
        sum(items)
    except TypeError:
        return False
    return True
