"""``Mcp-Param-*`` headers (extproc/mcp/params.py): the SDK's codec, and which copies of
rewritten arguments can be made to agree with the body."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from mcp.shared.inbound import decode_header_value, encode_header_value

from extproc.mcp.jsonrpc import parse_body
from extproc.mcp.params import Unfaithful, agreeing, argument_changes, carried, decode, encode

VALUES = ["OPS", "", " edge ", "José", "line\nbreak", "=?base64?T1BT?=", "a" * 300, "\U0001f600"]


@pytest.mark.parametrize("value", VALUES)
def test_the_codec_is_the_sdks(value: str) -> None:
    """A header the gateway writes must read, at the server, as the body's value."""
    assert encode(value) == encode_header_value(value)
    assert decode(encode(value)) == value == decode_header_value(encode_header_value(value))


@pytest.mark.parametrize(
    "raw", ["=?base64?T1BT?=", "=?base64?T1BTx?=", "=?base64?T1BU?=", "=?base64?/w==?=", "plain"]
)
def test_decoding_agrees_with_the_sdk_on_what_does_not_decode(raw: str) -> None:
    assert decode(raw) == decode_header_value(raw)


def _call(arguments: dict[str, Any]) -> Any:
    message = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "tools/call",
        "params": {"name": "t", "arguments": arguments},
    }
    return parse_body(orjson.dumps(message))


def test_changes_are_the_rewritten_arguments_by_their_original_text() -> None:
    body = _call({"to": "bob@example.com", "cc": ["bob@example.com"], "n": "x"})
    rewrites = {
        ("params", "arguments", "to"): "<EMAIL_ADDRESS>",
        ("params", "arguments", "cc", 0): "<EMAIL_ADDRESS>",
        ("params", "arguments", "n"): "x",  # unchanged: no copy needs to change
    }
    assert argument_changes(body, rewrites) == {"bob@example.com": "<EMAIL_ADDRESS>"}


def test_one_text_rewritten_two_ways_cannot_be_copied_faithfully() -> None:
    body = _call({"to": "bob@example.com", "cc": "bob@example.com"})
    rewrites = {("params", "arguments", "to"): "<A>", ("params", "arguments", "cc"): "<B>"}
    changes = argument_changes(body, rewrites)
    assert changes == {"bob@example.com": None}
    with pytest.raises(Unfaithful, match="two ways"):
        agreeing({"mcp-param-to": "bob@example.com"}, changes)
    assert agreeing({"mcp-param-other": "x"}, changes) == (("mcp-param-other", "x"),)


def test_every_copy_is_set_once_anything_is_rewritten() -> None:
    """Envoy hands over a repeated header's last value; setting each one replaces every
    copy, so an earlier one carrying the original cannot go on unseen."""
    headers = {"mcp-param-to": "bob@example.com", "mcp-param-project": "OPS", "accept": "*/*"}
    changes = {"bob@example.com": "<EMAIL_ADDRESS>"}
    assert agreeing(headers, changes) == (
        ("mcp-param-to", "<EMAIL_ADDRESS>"),
        ("mcp-param-project", "OPS"),
    )
    assert agreeing(headers, {}) == ()
    assert carried({"Mcp-Param-X": "1", "mcp-name": "t"}) == {"Mcp-Param-X": "1"}
