"""OpenAI chat completions request → Anthropic Messages request.

The caller wrote against OpenAI's API, so a request must never be answered silently
under different terms than it asked for. A field Claude cannot honour is judged by the
*contract* of the answer:

* **rejected** (400, ``param`` naming the field) when the answer would have a different
  shape or guarantee than asked — several choices, log probabilities, token biases, JSON
  mode or a schema, audio, legacy ``functions``, reasoning effort, web search, OpenAI
  moderation, a temperature above Claude's range, unknown fields (as OpenAI does);
* **dropped** when it is a hint or bookkeeping the model may legitimately ignore —
  ``seed``, ``presence_penalty``, ``frequency_penalty``, ``verbosity``, ``store``,
  ``metadata``, ``service_tier``, ``prediction``, prompt-cache options, message
  ``name``, image ``detail``, and the defaults of the rejected fields
  (``n: 1``, ``logprobs: false``, ``response_format: {"type": "text"}``...).

Messages are translated by :mod:`extproc.translate.anthropic_turns`.
"""

from __future__ import annotations

from typing import Any

from extproc.dialects.base import JsonPath
from extproc.dialects.fields import (
    expect_list,
    expect_object,
    expect_str,
    format_param,
    invalid_type,
    invalid_value,
    optional_bool,
    optional_positive_int,
    optional_str,
)
from extproc.errors import InvalidRequest
from extproc.translate.anthropic_turns import Block, conversation

_TRANSLATED = frozenset(
    {
        "model",
        "messages",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "top_k",  # Anthropic's own sampling knob, sent by Claude-aware clients via extra_body
        "stop",
        "stream",
        "stream_options",  # include_usage is honoured by StreamTranslator, not the body
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "user",
        "safety_identifier",
    }
)
_DROPPED = frozenset(
    {
        "seed",
        "presence_penalty",
        "frequency_penalty",
        "verbosity",
        "store",
        "metadata",
        "service_tier",
        "prediction",
        "prompt_cache_key",
        "prompt_cache_options",
        "prompt_cache_retention",
    }
)
# Field → (values that mean "not used", why Claude cannot do anything else). An empty
# tuple rejects the field whenever it is set; ``None`` always counts as absent.
_LIMITED: dict[str, tuple[tuple[object, ...], str]] = {
    "n": ((1,), "Claude returns one choice per request"),
    "logprobs": ((False,), "Claude does not return log probabilities"),
    "top_logprobs": ((0,), "Claude does not return log probabilities"),
    "logit_bias": (({},), "Claude does not take token biases"),
    "response_format": (
        ({"type": "text"},),
        "JSON mode and JSON schemas are not translated for Claude; "
        "describe the format in the prompt or use a tool",
    ),
    "modalities": ((["text"],), "Claude answers in text only"),
    "audio": ((), "Claude answers in text only"),
    "reasoning_effort": (
        ("none", "minimal"),
        "extended thinking is not available through the chat completions API",
    ),
    "web_search_options": ((), "web search is not available through this API"),
    "moderation": ((), "OpenAI moderation cannot be applied to Claude"),
    "functions": ((), "use 'tools' instead of the deprecated 'functions'"),
    "function_call": ((), "use 'tool_choice' instead of the deprecated 'function_call'"),
}


def request_to_anthropic(
    body: dict[str, Any], upstream_model: str, default_max_tokens: int
) -> dict[str, Any]:
    """Build the Messages API body for ``body``, sent to ``upstream_model``.

    ``default_max_tokens`` fills ``max_tokens`` when the caller set no cap: Anthropic
    requires one, and it should equal what the budget reserved for an open cap.
    Raises :class:`InvalidRequest` naming the field Claude cannot honour.
    """
    _check_fields(body)
    system, turns = conversation(expect_list(body.get("messages"), ("messages",), non_empty=True))
    out: dict[str, Any] = {
        "model": upstream_model,
        "max_tokens": _max_tokens(body, default_max_tokens),
    }
    if system:
        # One plain text reads best as a string; blocks keep boundaries and cache marks.
        plain = len(system) == 1 and "cache_control" not in system[0]
        out["system"] = system[0]["text"] if plain else system
    out["messages"] = turns
    _sampling(body, out)
    _tools(body, out)
    if optional_bool(body, "stream"):
        out["stream"] = True  # usage comes on every Anthropic stream; nothing to ask for
    user = optional_str(body, "user", ()) or optional_str(body, "safety_identifier", ())
    if user:
        out["metadata"] = {"user_id": user}
    return out


def _check_fields(body: dict[str, Any]) -> None:
    for key, value in body.items():
        if key in _TRANSLATED or key in _DROPPED or value is None:
            continue
        limited = _LIMITED.get(key)
        if limited is None:
            raise InvalidRequest(
                f"Unrecognized request argument supplied: {key}",
                param=key,
                code="unknown_parameter",
            )
        accepted, why = limited
        if value not in accepted:
            code = "unsupported_value" if accepted else "unsupported_parameter"
            raise InvalidRequest(
                f"'{key}' is not supported for Claude models: {why}.", param=key, code=code
            )


def _stop_sequence(text: str, path: JsonPath) -> str:
    """A stop sequence Claude takes: Anthropic refuses one of whitespace only (such as the
    common ``"\n"``), naming its own field; refused here, naming the caller's."""
    if not text.strip():
        param = format_param(path)
        raise InvalidRequest(
            f"'{param}' is not supported for Claude models: a stop sequence must hold more "
            "than whitespace.",
            param=param,
            code="unsupported_value",
        )
    return text


def _max_tokens(body: dict[str, Any], default: int) -> int:
    """``max_completion_tokens`` wins over the legacy ``max_tokens``, as on OpenAI."""
    completion = optional_positive_int(body, "max_completion_tokens")
    if completion is not None:
        return completion
    legacy = optional_positive_int(body, "max_tokens")
    return legacy if legacy is not None else default


def _sampling(body: dict[str, Any], out: dict[str, Any]) -> None:
    temperature = _number(body, "temperature")
    if temperature is not None:
        if temperature > 1:
            raise InvalidRequest(
                f"'temperature' is not supported for Claude models above 1 (got {temperature}): "
                "Claude's range is 0 to 1.",
                param="temperature",
                code="unsupported_value",
            )
        if temperature < 0:
            raise invalid_value(("temperature",), "a number between 0 and 1")
        out["temperature"] = temperature
    top_p = _number(body, "top_p")
    if top_p is not None and top_p != 1:  # 1 samples from everything: no setting at all
        if temperature is not None:
            # Claude models since Opus 4.1 refuse the two together (OpenAI takes both).
            raise InvalidRequest(
                "Claude models take 'temperature' or 'top_p', not both: leave one out "
                "(or set top_p to 1).",
                param="top_p",
                code="unsupported_value",
            )
        out["top_p"] = top_p
    top_k = optional_positive_int(body, "top_k")
    if top_k is not None:
        out["top_k"] = top_k
    stop = body.get("stop")
    if isinstance(stop, str):
        out["stop_sequences"] = [_stop_sequence(stop, ("stop",))]
    elif isinstance(stop, list):
        if stop:
            out["stop_sequences"] = [
                _stop_sequence(expect_str(s, ("stop", i)), ("stop", i)) for i, s in enumerate(stop)
            ]
    elif stop is not None:
        raise invalid_type(("stop",), "a string or an array of strings", stop)
    options = body.get("stream_options")
    if options is not None:
        expect_object(options, ("stream_options",))


def _number(body: dict[str, Any], key: str) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise invalid_type((key,), "a number", value)
    return value


def _tools(body: dict[str, Any], out: dict[str, Any]) -> None:
    tools: list[Block] = []
    raw = body.get("tools")
    if raw is not None:
        for i, tool in enumerate(expect_list(raw, ("tools",))):
            tools.append(_tool(expect_object(tool, ("tools", i)), ("tools", i)))
    choice = _tool_choice(body.get("tool_choice"))
    if not tools:
        if choice is not None and choice["type"] not in ("auto", "none"):
            raise invalid_value(("tool_choice",), "'auto' or 'none' when no tools are given")
        used = _tools_used(out["messages"])
        if used:
            # Anthropic refuses tool_use blocks in a request without tools ("must define
            # tools"), which OpenAI takes (a summary of a conversation that used some):
            # the tools named, bare, with none to be called now.
            out["tools"] = [{"name": name, "input_schema": {"type": "object"}} for name in used]
            out["tool_choice"] = {"type": "none"}
        return  # Anthropic rejects a tool_choice without tools; auto and none mean nothing
    out["tools"] = tools
    serial = body.get("parallel_tool_calls") is not None and not optional_bool(
        body, "parallel_tool_calls"
    )
    if serial and (choice is None or choice["type"] != "none"):
        choice = {**(choice or {"type": "auto"}), "disable_parallel_tool_use": True}
    if choice is not None:
        out["tool_choice"] = choice


def _tools_used(turns: list[Block]) -> list[str]:
    """The names of the tools the conversation's tool_use blocks called, in order."""
    names = (
        block["name"]
        for turn in turns
        for block in turn["content"]
        if isinstance(block, dict) and block.get("type") == "tool_use"
    )
    return list(dict.fromkeys(names))


def _tool(tool: dict[str, Any], where: JsonPath) -> Block:
    ttype = tool.get("type", "function")
    if ttype != "function":
        raise invalid_value(
            (*where, "type"), "'function' (other tool types are not supported for Claude)"
        )
    spec = expect_object(tool.get("function"), (*where, "function"))
    out: Block = {"name": expect_str(spec.get("name"), (*where, "function", "name"))}
    description = optional_str(spec, "description", (*where, "function"))
    if description:
        out["description"] = description
    if spec.get("strict") is True:
        out["strict"] = True  # the same guarantee: inputs valid against the schema
    parameters = spec.get("parameters")
    if parameters is None:
        out["input_schema"] = {"type": "object", "properties": {}}  # Anthropic requires one
    else:
        schema = expect_object(parameters, (*where, "function", "parameters"))
        out["input_schema"] = schema if "type" in schema else {"type": "object", **schema}
    return out


def _tool_choice(choice: object) -> Block | None:
    if choice is None:
        return None
    if isinstance(choice, str):
        mapped = {"auto": "auto", "none": "none", "required": "any"}.get(choice)
        if mapped is None:
            raise invalid_value(("tool_choice",), "'auto', 'none', 'required' or a named function")
        return {"type": mapped}
    spec = expect_object(choice, ("tool_choice",))
    if spec.get("type") != "function":
        raise invalid_value(
            ("tool_choice", "type"),
            "'function' (allowed_tools and custom are not supported for Claude)",
        )
    function = expect_object(spec.get("function"), ("tool_choice", "function"))
    return {
        "type": "tool",
        "name": expect_str(function.get("name"), ("tool_choice", "function", "name")),
    }
