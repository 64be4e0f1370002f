"""Prompts and answers recorded in audit records: redacted whatever their encoding."""

from __future__ import annotations

from extproc.dialects.base import TextPart
from extproc.telemetry.bodies import recorded, redactor
from tests.unit.policies import make_policy

REDACT = redactor()


def _arguments(text: str) -> TextPart:
    return TextPart(("arguments",), "assistant", "tool_arguments", text, True)


def test_tool_arguments_are_redacted_as_json_source() -> None:
    """Read as plain text, the "n" of a "\\n" escape stuck to the number after it, and
    the phone number was recorded as it was."""
    [record] = recorded(REDACT, [_arguments('{"body":"Reach me at\\n415-555-0132 or"}')], {})
    assert "415-555-0132" not in record["text"]
    assert record["text"] == '{"body":"Reach me at\\n<PHONE_NUMBER> or"}'


def test_an_address_spelled_with_escapes_is_redacted_not_recorded_raw() -> None:
    """The guardrails block what they cannot rewrite in place; a record that could not be
    redacted must not be written raw either."""
    [record] = recorded(REDACT, [_arguments('{"to":"jane\\u0040example.com"}')], {})
    assert record["text"] == '{"to":"<EMAIL_ADDRESS>"}'


def test_locked_texts_are_not_recorded() -> None:
    """A tool input's member names are read by the guardrails, but are no text of the
    body: recorded, they would repeat it out of place."""
    value = TextPart(("input", "to"), "assistant", "tool_arguments", "x")
    names = TextPart(("input",), "assistant", "tool_arguments", "to", locked=True)
    assert recorded(REDACT, [value, names], {}) == [
        {"role": "assistant", "kind": "tool_arguments", "text": "x"}
    ]


def test_a_number_the_guardrails_could_not_rewrite_is_still_redacted_in_the_record() -> None:
    """In JSON source a rewritten number would be no JSON, and the guardrails block; a
    record need not be JSON, so it is rewritten there, and the rest still read as JSON
    source (a \\n escape is no n glued to the number after it)."""
    arguments = '{"id": 2125551234, "body": "Reach me at\\n415-555-0132 or"}'
    [record] = recorded(REDACT, [_arguments(arguments)], {})
    assert record["text"] == '{"id": <PHONE_NUMBER>, "body": "Reach me at\\n<PHONE_NUMBER> or"}'


def test_the_redactor_is_built_with_a_policy_that_will_need_it_not_by_a_record() -> None:
    """Built by the first record, it stalled the event loop (~0.4 s in a new process):
    a policy with MCP servers (whose audit records redact resource URIs) builds it."""
    redactor.cache_clear()
    make_policy()
    assert redactor.cache_info().currsize == 0  # neither MCP servers nor recorded bodies
    make_policy(
        mcp={"servers": {"s": {"cluster": "mcp", "path": "/mcp"}}},
        upstreams={"mcp": {"url": "http://127.0.0.1:1"}},
    )
    assert redactor.cache_info().currsize == 1
