"""Output guardrails on SSE streams: split values caught, clean streams untouched."""

from __future__ import annotations

import json

import orjson
import pytest

from extproc import sse
from extproc.guardrails import Guardrails, StreamGuard
from extproc.guardrails.sse import parse_event
from extproc.guardrails.testing import (
    OPENAI_DONE,
    anthropic_event,
    anthropic_text,
    completion_chunk,
    guardrails_from_yaml,
    openai_chunk,
    sse_payloads,
    streamed_text,
)

GUARDS = guardrails_from_yaml(
    """
- name: mask-pii
  stage: output
  mode: mutate
  detector: {kind: pii, entities: [EMAIL_ADDRESS, CREDIT_CARD], operator: mask}
- name: no-secrets
  stage: output
  mode: validate
  message: The answer contained a credential.
  detector: {kind: secrets}
"""
)


def guard(guardrails: Guardrails = GUARDS, dialect: str = "openai.chat") -> StreamGuard:
    found = guardrails.stream(dialect, team=None, key_id=None, model=None, path="/")
    assert found is not None
    return found


def run(stream: StreamGuard, chunks: list[bytes]) -> bytes:
    return b"".join(stream.feed(chunk) for chunk in chunks) + stream.finish()


OPENAI_END = [openai_chunk(finish="stop"), OPENAI_DONE]


@pytest.mark.parametrize(
    "pieces",
    [
        pytest.param(["Write to john.do", "e@example.com today."], id="split-in-local-part"),
        pytest.param(["Write to john.doe@", "example.com today."], id="split-at-at"),
        pytest.param(["Write to john.doe@exam", "ple.c", "om", " today."], id="split-thrice"),
        pytest.param(["Write to john.doe@example.com", " today."], id="ends-at-value"),
        pytest.param(["Write to ", "j", "o", "h", "n.doe@example.com today."], id="char-by-char"),
    ],
)
def test_email_split_across_chunks_is_masked(pieces: list[str]) -> None:
    stream = guard()
    out = run(stream, [openai_chunk(p) for p in pieces] + OPENAI_END)
    assert streamed_text(out) == "Write to ******************** today."
    assert stream.result.verdicts[0].entities == ("EMAIL_ADDRESS",)
    assert stream.result.verdicts[0].count == 1
    assert sse_payloads(out)[-1] == "[DONE]"


def test_card_split_on_digit_groups_is_masked() -> None:
    pieces = ["card 4111 1111", " 1111 1111 ok"]
    out = run(guard(), [openai_chunk(p) for p in pieces] + OPENAI_END)
    assert streamed_text(out) == "card ******************* ok"


def test_clean_stream_passes_byte_identical() -> None:
    chunks = [openai_chunk(""), openai_chunk("Hello"), openai_chunk(" there,"),
              openai_chunk(" friend. "), *OPENAI_END]  # fmt: skip
    stream = guard()
    sent = [stream.feed(c) for c in chunks]
    assert sent[0] == chunks[0]
    assert sent[1] == b""  # "Hello" may still grow into "Hello@example.com": held
    assert sent[2] == chunks[1]  # released as it came once the word ended
    assert b"".join(sent) + stream.finish() == b"".join(chunks)
    assert stream.result.verdicts == ()


def test_clean_stream_is_identical_however_it_is_cut() -> None:
    body = b"".join(
        [openai_chunk("The answer is "), openai_chunk("42. "), openai_chunk("Done. "), *OPENAI_END]
    )
    stream = guard()
    cut = [body[i : i + 7] for i in range(0, len(body), 7)]
    assert run(stream, cut) == body


def test_held_text_is_released_by_the_finish_chunk() -> None:
    stream = guard()
    chunks = [openai_chunk("ends with a word"), *OPENAI_END]
    assert stream.feed(chunks[0]) == b""
    assert stream.feed(chunks[1]) == chunks[0] + chunks[1]
    assert stream.feed(chunks[2]) == chunks[2]


def test_validate_ends_openai_stream_with_error_event() -> None:
    stream = guard()
    out = run(
        stream,
        [
            openai_chunk("your key is AKIAIOSFO"),
            openai_chunk("DNN7EXAMPLE ok"),
            openai_chunk("more"),
        ],
    )
    payloads = sse_payloads(out)
    assert payloads[-2] == {
        "error": {
            "message": "The answer contained a credential.",
            "type": "invalid_request_error",
            "code": "guardrail_blocked",
            "param": None,
        }
    }
    assert payloads[-1] == "[DONE]"
    assert "AKIA" not in out.decode()
    assert streamed_text(out) == ""  # the event holding the key's start is dropped too
    assert stream.result.blocked_by == "no-secrets"
    assert stream.feed(openai_chunk("after")) == b""


def test_validate_ends_anthropic_stream_with_error_event() -> None:
    stream = guard(dialect="anthropic.messages")
    start = anthropic_event(
        "content_block_start", index=0, content_block={"type": "text", "text": ""}
    )
    out = run(
        stream,
        [
            start,
            anthropic_text("token ghp_1a2B3c4D5e6F7g8H9i0J"),
            anthropic_text("1k2L3m4N5o6P7q8R fin"),
        ],
    )
    assert out.endswith(
        b'event: error\ndata: {"type":"error","error":{"type":"permission_error",'
        b'"message":"The answer contained a credential."}}\n\n'
    )
    assert b"ghp_" not in out
    assert out.startswith(start)


def test_anthropic_text_deltas_are_masked_and_flushed_at_block_stop() -> None:
    stream = guard(dialect="anthropic.messages")
    chunks = [
        anthropic_event("message_start", message={"id": "m", "usage": {"input_tokens": 3}}),
        anthropic_event("content_block_start", index=0, content_block={"type": "text", "text": ""}),
        anthropic_text("mail a.b@exam"),
        anthropic_text("ple.org"),
        anthropic_event("content_block_stop", index=0),
        anthropic_event(
            "message_delta", delta={"stop_reason": "end_turn"}, usage={"output_tokens": 5}
        ),
        anthropic_event("message_stop"),
    ]
    out = run(stream, chunks)
    assert streamed_text(out) == "mail " + "*" * len("a.b@example.org")
    assert out.startswith(chunks[0] + chunks[1])
    assert out.endswith(chunks[4] + chunks[5] + chunks[6])


@pytest.mark.parametrize(
    "block",
    [
        {"type": "mcp_tool_result", "tool_use_id": "m", "content": "mail a.b@example.org"},
        {
            "type": "mcp_tool_result",
            "tool_use_id": "m",
            "content": [{"type": "text", "text": "mail a.b@example.org"}],
        },
        {
            "type": "bash_code_execution_tool_result",
            "tool_use_id": "b",
            "content": {
                "type": "bash_code_execution_result",
                "stdout": "mail a.b@example.org",
                "stderr": "",
                "return_code": 0,
                "content": [],
            },
        },
    ],
    ids=["mcp-string", "mcp-text-blocks", "bash-stdout"],
)
def test_an_anthropic_tool_result_streamed_whole_is_guarded(block: dict[str, object]) -> None:
    """A tool's result arrives whole in its content_block_start: as in a JSON answer, its
    texts are read (they went out unread in a stream)."""
    chunks = [
        anthropic_event("message_start", message={"id": "m", "usage": {"input_tokens": 3}}),
        anthropic_event("content_block_start", index=0, content_block=block),
        anthropic_event("content_block_stop", index=0),
        anthropic_event("message_stop"),
    ]
    out = run(guard(dialect="anthropic.messages"), chunks)
    assert b"a.b@example.org" not in out
    assert b"mail " + b"*" * len("a.b@example.org") in out
    started = next(
        e
        for e in sse_payloads(out)
        if isinstance(e, dict) and e.get("type") == "content_block_start"
    )
    assert started["content_block"]["type"] == block["type"]


def test_each_text_of_a_streamed_tool_result_is_guarded_apart() -> None:
    """stdout and stderr are two texts, as in a JSON answer: a value is never matched
    across them, nor moved from one into the other by its rewrite."""
    block = {
        "type": "bash_code_execution_tool_result",
        "tool_use_id": "b",
        "content": {
            "type": "bash_code_execution_result",
            "stdout": "id 555",
            "stderr": "a.b@example.org",
            "return_code": 0,
            "content": [],
        },
    }
    chunks = [
        anthropic_event("message_start", message={"id": "m", "usage": {"input_tokens": 3}}),
        anthropic_event("content_block_start", index=0, content_block=block),
        anthropic_event("content_block_stop", index=0),
        anthropic_event("message_stop"),
    ]
    out = run(guard(dialect="anthropic.messages"), chunks)
    started = next(
        e
        for e in sse_payloads(out)
        if isinstance(e, dict) and e.get("type") == "content_block_start"
    )
    result = started["content_block"]["content"]
    assert (result["stdout"], result["stderr"]) == ("id 555", "*" * len("a.b@example.org"))


@pytest.mark.parametrize(
    ("field", "pieces", "expected"),
    [
        ("arguments", ['{"to": "x.y@exa', 'mple.com"}'], '{"to": "***************"}'),
        # A custom tool's input: free text, not JSON, streamed in pieces as arguments are.
        ("custom_input", ["mail x.y@exa", "mple.com now"], "mail *************** now"),
    ],
    ids=["function-arguments", "custom-input"],
)
def test_openai_tool_call_texts_are_guarded(field: str, pieces: list[str], expected: str) -> None:
    chunks = [*(openai_chunk(**{field: piece}) for piece in pieces), *OPENAI_END]
    assert streamed_text(run(guard(), chunks)) == expected


def test_completions_stream() -> None:
    chunks = [completion_chunk("mail z@exa"), completion_chunk("mple.com now"),
              completion_chunk("", finish="stop"), OPENAI_DONE]  # fmt: skip
    out = run(guard(dialect="openai.completions"), chunks)
    assert streamed_text(out) == "mail ************* now"


def test_audit_only_streams_are_untouched_but_recorded() -> None:
    audit = guardrails_from_yaml(
        "- {name: a, stage: output, mode: audit, detector: {kind: pii, entities: [EMAIL_ADDRESS]}}"
    )
    chunks = [openai_chunk("mail q@exa"), openai_chunk("mple.com ok"), *OPENAI_END]
    stream = guard(audit)
    assert run(stream, chunks) == b"".join(chunks)
    assert stream.result.verdicts[0].action == "recorded"
    assert stream.result.verdicts[0].entities == ("EMAIL_ADDRESS",)


def test_long_value_beyond_the_window_keeps_being_rewritten() -> None:
    masking = guardrails_from_yaml(
        "- {name: s, stage: output, mode: mutate, detector: {kind: secrets, operator: mask}}",
        settings={"stream_window": 48},
    )
    token = "ghp_" + "aB3" * 60
    pieces = [token[i : i + 5] for i in range(0, len(token), 5)] + [" done"]
    out = run(guard(masking), [openai_chunk(p) for p in pieces] + OPENAI_END)
    assert streamed_text(out) == "*" * len(token) + " done"


def test_unsupported_dialect_is_refused() -> None:
    with pytest.raises(ValueError, match=r"openai\.responses"):
        guard(dialect="openai.responses")


def test_oversized_event_fails_closed() -> None:
    stream = guard()
    out = stream.feed(b"data: " + b"x" * (1024 * 1024 + 10))
    assert b"guardrail_blocked" in out
    assert stream.result.blocked_by == "mask-pii"


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(b'data: {"choices": [{"delta": {"content": "leak john.doe@exa', id="cut"),
        pytest.param(b'data: {"choices": [{"delta": {"content": "\xff\xfe"}}]}', id="not-utf8"),
    ],
)
def test_an_event_the_guards_cannot_read_ends_the_stream_with_an_error(bad: bytes) -> None:
    """Guards fail closed: an event that looks like JSON and is not would pass unchecked
    (it could carry anything), so the stream ends there with an error event instead."""
    stream = guard()
    out = run(stream, [openai_chunk("Hello"), bad + b"\n\n", openai_chunk("after"), *OPENAI_END])
    assert b"john.doe" not in out and b"after" not in out
    assert b"could not be checked by the gateway's output guardrails" in out
    assert stream.result.blocked_by == "unreadable-answer"


def test_done_and_non_json_events_still_pass() -> None:
    stream = guard()
    out = run(stream, [b": keep-alive\n\n", openai_chunk("fine"), *OPENAI_END])
    assert streamed_text(out) == "fine" and out.endswith(b"data: [DONE]\n\n")
    assert stream.result.blocked_by is None


def test_an_event_with_space_before_its_json_is_still_guarded() -> None:
    """``data:  {...}`` (two spaces) is JSON to an SDK: the guards read it too, neither
    letting it pass unread nor refusing it."""
    chunk = openai_chunk("Write to john.doe@example.com now.").replace(b"data: ", b"data:  ", 1)
    stream = guard()
    out = run(stream, [chunk, *OPENAI_END])
    assert b"john.doe@example.com" not in out and stream.result.blocked_by is None


JSON_ARGUMENTS = '{"body": "Hi,\\njane@example.com\\n4111 1111 1111 1111\\nbye"}'
"""Tool arguments as a model streams them: JSON source, with ``\\n`` escapes."""


@pytest.mark.parametrize("size", [1, 3, 7, 64])
def test_tool_arguments_are_read_as_json_source_however_they_are_cut(size: int) -> None:
    """The ``n`` of ``\\n`` is no letter of the e-mail after it (which left an invalid
    ``\\<`` escape the client's JSON parser refused), nor does it hide the card after it."""
    pieces = [JSON_ARGUMENTS[i : i + size] for i in range(0, len(JSON_ARGUMENTS), size)]
    out = run(guard(), [openai_chunk(arguments=p) for p in pieces] + OPENAI_END)
    assert json.loads(streamed_text(out)) == {
        "body": "Hi,\n" + "*" * len("jane@example.com") + "\n" + "*" * 19 + "\nbye"
    }


def test_anthropic_partial_json_is_read_as_json_source() -> None:
    chunks = [
        anthropic_event("content_block_start", index=0, content_block={"type": "tool_use"}),
        *(
            anthropic_event(
                "content_block_delta",
                index=0,
                delta={"type": "input_json_delta", "partial_json": JSON_ARGUMENTS[i : i + 5]},
            )
            for i in range(0, len(JSON_ARGUMENTS), 5)
        ),
        anthropic_event("content_block_stop", index=0),
        anthropic_event("message_stop"),
    ]
    out = run(guard(dialect="anthropic.messages"), chunks)
    body = json.loads(streamed_text(out))["body"]
    assert body == "Hi,\n" + "*" * len("jane@example.com") + "\n" + "*" * 19 + "\nbye"


def _with_logprobs(chunk: bytes) -> bytes:
    payload = sse_payloads(chunk)[0]
    choice = payload["choices"][0]
    text = choice["delta"].get("content") or ""
    choice["logprobs"] = {"content": [{"token": text, "logprob": -0.1, "top_logprobs": []}]}
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def test_a_rewritten_chunk_loses_its_logprobs_whose_tokens_spell_the_original() -> None:
    pieces = ["Mail ", "jane.doe@exa", "mple.com", " today."]
    out = run(guard(), [_with_logprobs(openai_chunk(p)) for p in pieces] + OPENAI_END)
    assert streamed_text(out) == "Mail " + "*" * len("jane.doe@example.com") + " today."
    tokens = [
        entry["token"]
        for payload in sse_payloads(out)
        if isinstance(payload, dict)
        for choice in payload["choices"]
        for entry in (choice.get("logprobs") or {}).get("content", [])
    ]
    assert tokens == ["Mail ", " today."]  # untouched chunks keep theirs


@pytest.mark.parametrize("space", ["\u00a0", "\u3000"], ids=["no-break", "ideographic"])
def test_a_number_in_groups_joined_by_unicode_spaces_is_held_whole(space: str) -> None:
    """Its groups were settled and sent one by one before the number was whole (the
    detectors read such spaces as spaces, the holding did not): 12 of 16 digits leaked."""
    card = space.join(["4111", "1111", "1111", "1111"])
    stream = guard()
    out = run(stream, [openai_chunk(c) for c in f"card {card} ok"] + OPENAI_END)
    assert streamed_text(out) == "card " + "*" * len(card) + " ok"


SECRETS = guardrails_from_yaml(
    "- {name: s, stage: output, mode: mutate, detector: {kind: secrets, types: [PRIVATE_KEY]}}"
)


@pytest.mark.parametrize("size", [16, 100])
def test_a_private_key_longer_than_the_window_is_rewritten_and_the_prose_after_it_kept(
    size: int,
) -> None:
    """The key's rewrite went on past its footer over letters and spaces, so the sentence
    after the key was dropped up to its full stop."""
    key = "".join(chr(65 + (i * 7) % 26) for i in range(1200))
    body = "\n".join(key[i : i + 64] for i in range(0, len(key), 64))
    text = (
        "Here is the key:\n-----BEGIN RSA PRIVATE KEY-----\n"
        + body
        + "\n-----END RSA PRIVATE KEY-----\nKeep it safe."
    )
    pieces = [text[i : i + size] for i in range(0, len(text), size)]
    out = streamed_text(run(guard(SECRETS), [openai_chunk(p) for p in pieces] + OPENAI_END))
    assert out.endswith("\nKeep it safe.")
    assert not any(line[:20] in out for line in body.split("\n"))


@pytest.mark.parametrize(
    "framing",
    [
        b"event\nevent: content_block_delta\n",  # the last event line names it
        b"event:  content_block_delta \n",  # one space dropped, the rest is the name
        b"event: content_block_delta\nevent:\n",  # empty: a message
        b"id: 7\r\nevent: content_block_delta\r\n: a comment\r\n",
        b"",  # no event line: the OpenAI SDK tells it from an empty one
    ],
    ids=["bare-then-named", "spaces", "named-then-empty", "crlf-id-comment", "unnamed"],
)
def test_a_rewritten_event_keeps_its_type_as_the_client_reads_it(framing: bytes) -> None:
    """A rewritten event was sent with one synthesized ``event:`` line (the name stripped,
    a bare ``event`` line ignored): ``event`` then ``event: x`` became a message, a name
    with spaces another name. Its own lines are kept instead, and only its data changes."""
    newline = b"\r\n" if b"\r\n" in framing else b"\n"
    delta = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta"}}
    text = {**delta, "delta": {"type": "text_delta", "text": "mail a.b@example.org now"}}
    event = framing + b"data: " + orjson.dumps(text) + newline + newline
    stop = anthropic_event("content_block_stop", index=0)
    out = run(guard(dialect="anthropic.messages"), [event, stop])
    masked = {**delta, "delta": {"type": "text_delta", "text": "mail " + "*" * 15 + " now"}}
    sent = framing + b"data: " + orjson.dumps(masked) + newline + newline
    assert out == sent + stop
    assert sse.name(sent) == sse.name(event)


def test_an_event_is_named_as_a_client_names_it() -> None:
    """The last ``event`` line wins, a bare or empty one names a message (as
    :func:`extproc.sse.name` reads it for every other reader)."""
    assert parse_event(b"event: a\nevent\ndata: {}\n\n").name == "message"
    assert parse_event(b"event\nevent: message_stop\ndata: 1\n\n").name == "message_stop"
    assert parse_event(b"event:  x \ndata: 1\n\n").name == " x "
    assert parse_event(b"data: 1\n\n").name == "message"
