"""The gateway as applications see it: real Envoy, the service, the mock upstream, real SDKs."""

from __future__ import annotations

import json
import threading
from typing import Any

import anthropic
import openai
import pytest

from tests.e2e.conftest import ADMIN_KEY, RESTRICTED_KEY, Http, Mock

pytestmark = pytest.mark.e2e


def oai(gateway_url: str, key: str = ADMIN_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway_url}/v1", api_key=key, max_retries=0)


def claude(gateway_url: str, key: str = ADMIN_KEY) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gateway_url, api_key=key, max_retries=0)


# --- allowed calls ------------------------------------------------------------------


def test_chat_completion_reaches_upstream_and_echoes(gateway_url: str, mock: Mock) -> None:
    text = "Hello through the gateway — ünïcödé and  two  spaces"
    reply = oai(gateway_url).chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": text}]
    )
    assert reply.choices[0].message.content == text
    seen = mock.last()
    assert seen["path"] == "/v1/chat/completions"
    assert json.loads(seen["body"])["model"] == "gpt-4o"


def test_streaming_chat_through_gateway(gateway_url: str) -> None:
    text = "stream me back, piece by piece, exactly as sent"
    stream = oai(gateway_url).chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": text}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_alias_is_resolved_to_the_catalogue_model(gateway_url: str, mock: Mock) -> None:
    oai(gateway_url).chat.completions.create(
        model="mini", messages=[{"role": "user", "content": "alias"}]
    )
    seen = mock.last()
    # The catalogue's backend serves gpt-4o-mini under its dated upstream name.
    assert json.loads(seen["body"])["model"] == "gpt-4o-mini-2024-07-18"
    assert seen["headers"]["x-gateway-model"] == "gpt-4o-mini"
    assert int(seen["headers"]["content-length"]) == len(seen["body"].encode())


def test_completions_and_embeddings(gateway_url: str) -> None:
    client = oai(gateway_url)
    done = client.completions.create(model="gpt-4o-mini", prompt="complete this")
    assert done.choices[0].text == "complete this"
    emb = client.embeddings.create(model="text-embedding-3-small", input=["a", "b"])
    assert len(emb.data) == 2


def test_anthropic_sdk_messages(gateway_url: str, mock_anthropic: Mock) -> None:
    msg = claude(gateway_url).messages.create(
        model="claude-3-5-haiku",
        max_tokens=100,
        system="be brief",
        messages=[{"role": "user", "content": "Bonjour Claude"}],
    )
    assert msg.content[0].type == "text" and msg.content[0].text == "Bonjour Claude"
    headers = mock_anthropic.last()["headers"]
    assert "x-api-key" not in headers and "authorization" not in headers


def test_anthropic_streaming(gateway_url: str) -> None:
    with claude(gateway_url).messages.stream(
        model="claude-3-5-haiku",
        max_tokens=100,
        messages=[{"role": "user", "content": "stream this answer"}],
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "stream this answer"
    assert final.usage.output_tokens > 0


# --- identity --------------------------------------------------------------------------


def test_gateway_key_never_reaches_upstream(gateway_url: str, mock: Mock) -> None:
    oai(gateway_url).chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "hi"}]
    )
    seen = mock.last()
    assert "authorization" not in seen["headers"]
    assert ADMIN_KEY not in json.dumps(seen)
    assert seen["headers"]["x-gateway-team"] == "platform"
    assert seen["headers"]["x-gateway-key-id"] == "demo-admin"


@pytest.mark.parametrize(
    ("path", "body", "key_header"),
    [
        (
            "/v1/chat/completions",
            {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
            "authorization",
        ),
        (
            "/v1/messages",
            {
                "model": "claude-3-5-haiku",
                "max_tokens": 9,
                "messages": [{"role": "user", "content": "hi"}],
            },
            "x-api-key",
        ),
    ],
)
def test_answers_come_uncompressed_and_without_the_providers_account(
    raw: Http, mock: Mock, mock_anthropic: Mock, path: str, body: dict[str, Any], key_header: str
) -> None:
    """Usage, guardrails and translation read the answer, so the gateway asks for it
    uncompressed whatever the client accepts; and the provider's organisation header
    stays at the gateway."""
    key = f"Bearer {ADMIN_KEY}" if key_header == "authorization" else ADMIN_KEY
    status, headers, answer = raw.request(
        "POST",
        path,
        json.dumps(body).encode(),
        {key_header: key, "content-type": "application/json", "accept-encoding": "gzip, br"},
    )
    assert status == 200, answer
    upstream = (mock_anthropic if path == "/v1/messages" else mock).last()
    assert "accept-encoding" not in upstream["headers"]
    assert "content-encoding" not in headers
    assert "openai-organization" not in headers
    assert "anthropic-organization-id" not in headers
    json.loads(answer)  # readable as sent


def test_spoofed_identity_headers_are_replaced(raw: Http, mock: Mock) -> None:
    status, _, _ = raw.post_json(
        "/v1/chat/completions",
        {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "spoof"}]},
        key=RESTRICTED_KEY,
        **{
            "x-gateway-team": "platform",
            "x-gateway-key-id": "demo-admin",
            "x-gateway-foo": "1",
            "x_gateway_team": "platform",  # some servers read _ as -
            "x_caller_note": "1",  # Envoy drops any name with an underscore
        },
    )
    assert status == 200
    headers = mock.last()["headers"]
    assert headers["x-gateway-team"] == "apps"
    assert headers["x-gateway-key-id"] == "demo-restricted"
    assert "x-gateway-foo" not in headers
    assert "x_gateway_team" not in headers and "x_caller_note" not in headers


def test_unknown_key_is_authentication_error(gateway_url: str, mock: Mock) -> None:
    with pytest.raises(openai.AuthenticationError) as caught:
        oai(gateway_url, key="sk-not-a-real-key").chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "hi"}]
        )
    assert caught.value.status_code == 401
    assert caught.value.body["code"] == "invalid_api_key"  # type: ignore[index]
    assert mock.requests() == []


def test_missing_key_is_401_in_both_dialects(raw: Http) -> None:
    status, _, body = raw.post_json("/v1/chat/completions", {"model": "gpt-4o"}, key=None)
    assert status == 401 and body["error"]["code"] == "missing_api_key"
    status, _, body = raw.post_json("/v1/messages", {"model": "x"}, key=None)
    assert status == 401
    assert body == {
        "type": "error",
        "error": {"type": "authentication_error", "message": body["error"]["message"]},
    }


def test_anthropic_unknown_key(gateway_url: str) -> None:
    with pytest.raises(anthropic.AuthenticationError):
        claude(gateway_url, key="wrong").messages.create(
            model="claude-3-5-haiku", max_tokens=5, messages=[{"role": "user", "content": "x"}]
        )


# --- RBAC ------------------------------------------------------------------------------


def test_forbidden_model_is_permission_denied(gateway_url: str, mock: Mock) -> None:
    with pytest.raises(openai.PermissionDeniedError) as caught:
        oai(gateway_url, RESTRICTED_KEY).chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "hi"}]
        )
    assert caught.value.body["code"] == "model_not_allowed"  # type: ignore[index]
    assert mock.requests() == []


def test_forbidden_model_anthropic_sdk(gateway_url: str) -> None:
    with pytest.raises(anthropic.PermissionDeniedError):
        claude(gateway_url, RESTRICTED_KEY).messages.create(
            model="claude-3-5-haiku", max_tokens=5, messages=[{"role": "user", "content": "x"}]
        )


def test_unknown_model_is_not_found(gateway_url: str) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        oai(gateway_url).chat.completions.create(
            model="gpt-9", messages=[{"role": "user", "content": "hi"}]
        )
    assert caught.value.body["code"] == "model_not_found"  # type: ignore[index]


def test_models_list_is_scoped_to_the_caller(gateway_url: str, mock: Mock) -> None:
    admin = {m.id for m in oai(gateway_url).models.list()}
    restricted = {m.id for m in oai(gateway_url, RESTRICTED_KEY).models.list()}
    assert admin == {"gpt-4o-mini", "gpt-4o", "claude-3-5-haiku", "text-embedding-3-small"}
    assert restricted == {"gpt-4o-mini"}
    assert oai(gateway_url, RESTRICTED_KEY).models.retrieve("gpt-4o-mini").id == "gpt-4o-mini"
    with pytest.raises(openai.NotFoundError):
        oai(gateway_url, RESTRICTED_KEY).models.retrieve("gpt-4o")
    anthropic_view = list(claude(gateway_url, RESTRICTED_KEY).models.list())
    assert [(m.id, m.lifecycle) for m in anthropic_view] == [("gpt-4o-mini", "active")]
    with pytest.raises(anthropic.NotFoundError) as refused:
        claude(gateway_url, RESTRICTED_KEY).models.retrieve("gpt-4o")
    assert isinstance(refused.value.body, dict)
    assert refused.value.body["type"] == "error"  # Anthropic's envelope, not OpenAI's
    assert refused.value.body["error"]["type"] == "not_found_error"
    assert mock.requests() == []


# --- bad input -------------------------------------------------------------------------

CHAT = "/v1/chat/completions"
JSON = {"content-type": "application/json", "authorization": f"Bearer {ADMIN_KEY}"}


@pytest.mark.parametrize(
    ("body", "status", "code_or_param"),
    [
        pytest.param(b"{not json", 400, "invalid_request", id="malformed-json"),
        pytest.param(b"[1, 2]", 400, "invalid_request", id="array-body"),
        pytest.param(b'"text"', 400, "invalid_request", id="string-body"),
        pytest.param(b"", 400, "invalid_request", id="empty-body"),
        pytest.param(
            b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "\xff\xfe"}]}',
            400,
            "invalid_request",
            id="non-utf8",
        ),
        pytest.param(
            b'{"messages": [{"role": "user", "content": "hi"}]}', 400, "model", id="missing-model"
        ),
        pytest.param(
            b'{"model": 7, "messages": [{"role": "user", "content": "hi"}]}',
            400,
            "model",
            id="model-not-string",
        ),
        pytest.param(
            b'{"model": "gpt-4o", "messages": "hi"}', 400, "messages", id="messages-not-list"
        ),
        pytest.param(
            b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}],'
            b' "max_tokens": "5"}',
            400,
            "max_tokens",
            id="max-tokens-string",
        ),
        pytest.param(
            b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}],'
            b' "stream": "yes"}',
            400,
            "stream",
            id="stream-not-bool",
        ),
    ],
)
def test_bad_input_gets_openai_error(
    raw: Http, mock: Mock, body: bytes, status: int, code_or_param: str
) -> None:
    got, headers, payload = raw.request("POST", CHAT, body, JSON)
    assert got == status
    assert headers["content-type"] == "application/json"
    error = json.loads(payload)["error"]
    assert set(error) == {"message", "type", "code", "param"}
    assert code_or_param in (error["code"], error["param"])
    assert mock.requests() == []


def test_bad_input_on_messages_gets_anthropic_error(raw: Http) -> None:
    status, _, payload = raw.request(
        "POST", "/v1/messages", b"{oops", {**JSON, "anthropic-version": "2023-06-01"}
    )
    body = json.loads(payload)
    assert status == 400
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"


def test_four_megabyte_prompt_passes(raw: Http) -> None:
    text = "word " * (4 * 1024 * 1024 // 5)
    status, _, body = raw.post_json(
        CHAT, {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}]}
    )
    assert status == 200
    assert body["choices"][0]["message"]["content"] == text


@pytest.mark.parametrize("path", [CHAT, "/v1/messages"])
def test_forty_megabyte_body_is_413_in_dialect(raw: Http, mock: Mock, path: str) -> None:
    text = "x" * (40 * 1024 * 1024)
    body = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": text}]})
    status, payload = raw.upload(path, body.encode(), JSON)
    assert status == 413
    parsed = json.loads(payload)
    if path == CHAT:
        assert parsed["error"]["code"] == "request_too_large"
    else:
        assert parsed["type"] == "error" and parsed["error"]["type"] == "request_too_large"
    assert mock.requests() == []


def test_small_requests_are_answered_while_a_huge_body_is_processed(
    raw: Http, gateway_url: str
) -> None:
    """End to end only: that large bodies leave the event loop is proven by the adapter's
    unit test (test_large_bodies_are_processed_off_the_event_loop); timing is not asserted."""
    text = "big " * (4 * 1024 * 1024 // 4)
    results: dict[str, Any] = {}

    def big() -> None:
        results["big"] = raw.post_json(
            CHAT, {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}]}
        )[0]

    worker = threading.Thread(target=big)
    worker.start()
    client = oai(gateway_url)
    small = [
        client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": f"small {i}"}]
        )
        .choices[0]
        .message.content
        for i in range(10)
    ]
    worker.join(timeout=60)
    assert small == [f"small {i}" for i in range(10)]
    assert results["big"] == 200


def test_unknown_v1_path_is_rejected_by_policy(raw: Http, mock: Mock) -> None:
    status, _, payload = raw.request("POST", "/v1/audio/speech", b"{}", JSON)
    assert status == 404
    assert json.loads(payload)["error"]["message"] == "Invalid URL (POST /v1/audio/speech)"
    assert mock.requests() == []


def test_wrong_method_is_rejected(raw: Http) -> None:
    status, _, _ = raw.request("GET", CHAT, None, JSON)
    assert status == 404


def test_ready_route_skips_policy(raw: Http) -> None:
    status, _, body = raw.request("GET", "/ready")
    assert status == 200 and body == b"ok\n"


# --- budgets with the example policy (in-process store) ------------------------------


def test_demo_capped_key_hits_its_budget_within_a_minute(gateway_url: str) -> None:
    capped = oai(gateway_url, "sk-demo-capped")
    admitted = 0
    with pytest.raises(openai.RateLimitError) as caught:
        for _ in range(10):
            capped.chat.completions.create(
                model="gpt-4o-mini",
                messages=[{"role": "user", "content": "tell me a story " * 30}],
                max_tokens=150,
            )
            admitted += 1
    assert 1 <= admitted <= 6
    assert "team 'capped'" in caught.value.message
    assert 1 <= int(caught.value.response.headers["retry-after"]) <= 60


def test_answers_carry_remaining_budget_headers(gateway_url: str) -> None:
    reply = oai(gateway_url).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], max_tokens=5
    )
    assert reply.headers["x-ratelimit-limit-usd"] == "500"
    assert float(reply.headers["x-ratelimit-remaining-usd"]) < 500


@pytest.mark.parametrize("path", ["/v1//chat/completions", "/v1/./chat/completions"])
def test_a_path_spelled_another_way_is_the_path_it_names(raw: Http, mock: Mock, path: str) -> None:
    """Envoy normalises the path before the service matches it: RBAC holds for the chat
    API however its path is spelled (unknown_paths: passthrough would forward an unknown
    path with identity alone)."""
    status, _, body = raw.post_json(
        path, {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}, RESTRICTED_KEY
    )
    assert status == 403 and body["error"]["code"] == "model_not_allowed"


def test_an_encoded_slash_in_the_path_is_refused(raw: Http, mock: Mock) -> None:
    before = len(mock.requests())
    status, _, _ = raw.request("POST", "/v1/chat%2Fcompletions", b"{}", {"authorization": "x"})
    assert status == 400
    assert len(mock.requests()) == before
