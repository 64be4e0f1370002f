"""The HTTP authorizer: which requests it decides alone, and what it answers Envoy.

The decisions are driven through :func:`extproc.pipeline.decide_request` with the
in-memory budget store; the wire through a real socket (the e2e tests run it behind Envoy).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
import yaml

from extproc import accounting, http_server, pipeline, routing
from extproc.adapters import ext_authz_http
from extproc.budgets.memory_store import MemoryStore
from extproc.budgets.meter import Meter
from extproc.decisions import Forward, Reply
from extproc.exchange import Exchange
from extproc.guardrails.engine import HEADER_GUARDRAILS
from extproc.pipeline import decide_request
from extproc.policy.store import PolicyStore
from extproc.stack import GATEWAY_CONFIG
from extproc.telemetry.audit import AuditLog
from extproc.telemetry.observer import Observer
from extproc.ticket import TicketSigner, signing_key
from tests.unit.http_client import read_answers
from tests.unit.policies import make_policy, sha

LIMITED = {
    "platform": {"models": {"allow": ["*"]}},
    "apps": {
        "models": {"allow": ["gpt-4o-mini"]},
        "limits": [{"unit": "total_tokens", "window": "hour", "limit": 300}],
    },
}


def policy(accounting: str = "envoy", **overrides: Any) -> Any:
    settings = {"jwt": {"team_claim": "groups"}, "accounting": accounting}
    settings["unknown_paths"] = "passthrough"
    return make_policy(settings=settings, teams=LIMITED, **overrides)


def clock() -> datetime:
    return datetime(2026, 6, 1, tzinfo=UTC)


def chat(model: str = "gpt-4o-mini", text: str = "hi", **fields: Any) -> bytes:
    return orjson.dumps({"model": model, "messages": [{"role": "user", "content": text}], **fields})


def client_headers(
    key: str | None = "sk-apps", path: str = "/v1/chat/completions"
) -> dict[str, str]:
    headers = {":method": "POST", ":path": path, "x-request-id": "req-1"}
    if key is not None:
        headers["authorization"] = f"Bearer {key}"
    return headers


async def decide(
    body: bytes,
    key: str | None = "sk-apps",
    path: str = "/v1/chat/completions",
    meter: Meter | None = None,
    **policy_kw: Any,
) -> tuple[Exchange, Forward | Reply | None]:
    exchange = Exchange(policy=policy(**policy_kw))
    meter = meter or Meter(MemoryStore())
    decision = await decide_request(exchange, client_headers(key, path), body, meter, clock)
    return exchange, decision


async def budget_left_whole(meter: Meter) -> bool:
    """Whether a request needing the whole 300-token budget still fits: nothing reserved."""
    probe, _ = await decide(chat(max_tokens=1))
    whole = 300 - probe.input_tokens
    _, decision = await decide(chat(max_tokens=whole), meter=meter)
    return isinstance(decision, Forward)


async def test_an_unchanged_body_accounted_by_envoy_is_decided_alone() -> None:
    exchange, decision = await decide(chat(max_tokens=50))
    assert isinstance(decision, Forward)
    headers = dict(decision.set_headers)
    assert headers["x-gateway-team"] == "apps"
    assert headers["x-gateway-model"] == "gpt-4o-mini"
    assert headers["x-gateway-accounting"] == "envoy"
    assert "authorization" in decision.remove_headers
    assert decision.body is None
    assert exchange.reservation is not None  # settled later from Envoy's access log
    assert dict(decision.answer_headers)["x-ratelimit-limit-tokens"] == "300"


@pytest.mark.parametrize(
    ("why", "body", "key", "path", "accounting"),
    [
        ("an alias is rewritten", chat("mini", max_tokens=5), "sk-apps", None, "envoy"),
        (
            "stream_options is merged",
            chat(max_tokens=5, stream=True, stream_options={"include_usage": False}),
            "sk-apps",
            None,
            "envoy",
        ),
        ("JWT claims reach ext_proc only", chat(), None, None, "envoy"),
        ("models are listed by ext_proc", b"", "sk-apps", "/v1/models", "envoy"),
    ],
)
async def test_requests_ext_proc_must_see_are_handed_over(
    why: str, body: bytes, key: str | None, path: str | None, accounting: str
) -> None:
    meter = Meter(MemoryStore())
    _, decision = await decide(
        body, key, path or "/v1/chat/completions", meter, accounting=accounting
    )
    assert decision is None, why
    assert await budget_left_whole(meter), "nothing may be reserved before a hand-over"


@pytest.mark.parametrize("accounting", ["service", "envoy"])
async def test_an_answer_an_output_guardrail_checks_is_handed_over(accounting: str) -> None:
    guard = {"name": "no-keys-out", "stage": "output", "mode": "validate",
             "detector": {"kind": "secrets"}}  # fmt: skip
    meter = Meter(MemoryStore())
    _, decision = await decide(
        chat(max_tokens=5), meter=meter, accounting=accounting, guardrails=[guard]
    )
    assert decision is None
    assert await budget_left_whole(meter), "nothing may be reserved before a hand-over"


async def test_under_accounting_service_an_answer_read_only_for_its_usage_is_decided_here() -> None:
    """The request side is decided here; Envoy reports the answer before its end and the
    service settles it from the ticket (x-gateway-accounting: service, set when the
    ticket is issued: see the wire tests below)."""
    exchange, decision = await decide(chat(max_tokens=50), accounting="service")
    assert isinstance(decision, Forward)
    headers = dict(decision.set_headers)
    assert headers["x-gateway-model"] == "gpt-4o-mini"
    assert accounting.HEADER not in headers
    assert exchange.only_accounted and not exchange.accounted_by_envoy
    assert exchange.reservation is not None and not exchange.reservation.settled
    assert dict(decision.answer_headers)["x-ratelimit-limit-tokens"] == "300"


EMBEDDING_MODELS = {
    "gpt-4o-mini": {"owned_by": "openai"},
    "text-embedding-3-small": {"tokenizer": "cl100k"},
    "local-embed": {"tokenizer": "estimate"},
}


@pytest.mark.parametrize(
    ("model", "decided"), [("text-embedding-3-small", True), ("local-embed", False)]
)
async def test_an_embeddings_request_is_decided_here_unless_its_prompt_is_only_estimated(
    model: str, decided: bool
) -> None:
    """Its answer is accounted from the prompt the service counted, never read (it can
    pass the 8 MiB Envoy would hold it to); for a model whose prompt is only estimated,
    ext_proc reads the provider's count from the answer instead."""
    body = orjson.dumps({"model": model, "input": ["hello there", "general kenobi"]})
    exchange, decision = await decide(
        body, "sk-admin", "/v1/embeddings", accounting="service", models=EMBEDDING_MODELS
    )
    assert isinstance(decision, Forward) is decided  # else None: handed over to ext_proc
    assert exchange.only_accounted


@pytest.mark.parametrize(
    ("key", "audit", "read"),
    [
        ("sk-apps", False, True),  # a budget to settle
        ("sk-admin", True, True),  # no budget, but the audit log wants every answer
        ("sk-admin", False, False),  # nothing needs the answer: passed through, reported now
    ],
)
async def test_under_accounting_service_the_answer_is_read_when_something_needs_it(
    tmp_path: Any, key: str, audit: bool, read: bool
) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(
        orjson.dumps(
            {
                "settings": {"accounting": "service"},
                "teams": LIMITED,
                "keys": {
                    "apps": {"sha256": sha("sk-apps"), "team": "apps"},
                    "admin": {"sha256": sha("sk-admin"), "team": "platform"},
                },
                "models": {"gpt-4o-mini": {}},
            }
        ).decode()
    )
    observer = Recorder(audited=audit)
    signer = TicketSigner(signing_key("test"))
    authorizer = ext_authz_http.HttpAuthorizer(
        PolicyStore(path), Meter(MemoryStore()), observer, signer
    )
    check = chat_check("r-1")
    check.headers["authorization"] = f"Bearer {key}"
    written = (await answer(authorizer, check)).decode()
    head = answer_head(written)
    assert written.startswith("HTTP/1.1 200")
    assert ext_authz_http.HEADER_PROCESSING not in head  # never an ext_proc stream
    if read:
        assert head[accounting.HEADER] == "service"
        assert signer.read(head[accounting.HEADER_TICKET]).record["model"] == "gpt-4o-mini"
        assert observer.finished == []  # the answer's report settles and reports it
    else:
        assert accounting.HEADER not in head
        assert accounting.HEADER_TICKET not in head
        assert len(observer.finished) == 1


@pytest.mark.parametrize(
    ("options", "envoy_adds"),
    [
        (None, True),  # none sent: Envoy inserts {"include_usage": true}
        ({"include_usage": True}, False),  # asked for already: nothing to add
    ],
)
async def test_a_stream_is_decided_alone_when_envoy_can_ask_for_its_usage(
    options: dict[str, bool] | None, envoy_adds: bool
) -> None:
    fields: dict[str, Any] = {"stream": True, "max_tokens": 5}
    if options is not None:
        fields["stream_options"] = options
    _, decision = await decide(chat(**fields))
    assert isinstance(decision, Forward) and decision.body is None
    headers = dict(decision.set_headers)
    assert headers["x-gateway-accounting"] == "envoy"
    assert (headers.get(accounting.HEADER_STREAM_USAGE) == "include") is envoy_adds


async def test_a_path_no_dialect_serves_is_passed_through_with_its_caller_identified() -> None:
    exchange, decision = await decide(b"{}", path="/v1/files", accounting="service")
    assert isinstance(decision, Forward)
    assert dict(decision.set_headers) == {"x-gateway-team": "apps", "x-gateway-key-id": "apps"}
    assert decision.remove_headers == ("authorization",)
    assert not exchange.accounted_by_envoy  # nothing to settle: reported at once
    _, refused = await decide(b"{}", key="sk-wrong", path="/v1/files")
    assert refused is None  # ext_proc decides who it is (it may have JWT claims)


async def test_a_request_that_fits_only_capped_is_handed_over_unreserved() -> None:
    meter = Meter(MemoryStore())
    # 300 tokens an hour; the default output cap alone is larger, so only a cap fits.
    _, decision = await decide(chat(), meter=meter)
    assert decision is None
    assert await budget_left_whole(meter)


async def test_refusals_are_answered_here() -> None:
    _, denied = await decide(chat("gpt-4o"))
    assert isinstance(denied, Reply) and denied.status == 403
    _, limited = await decide(chat(max_tokens=400))
    assert isinstance(limited, Reply) and limited.status == 429


# -- the wire ---------------------------------------------------------------------------


class Recorder(Observer):
    def __init__(self, audited: bool = False) -> None:
        super().__init__(None, AuditLog([]))
        self.finished: list[Exchange] = []
        self._audited = audited

    @property
    def wants_responses(self) -> bool:
        return self._audited

    def finish(self, exchange: Exchange) -> None:
        self.finished.append(exchange)
        super().finish(exchange)


Served = tuple[http_server.Server, ext_authz_http.HttpAuthorizer]


@pytest.fixture
async def served(tmp_path: Any) -> AsyncIterator[Served]:
    path = tmp_path / "policy.yaml"
    path.write_text(
        orjson.dumps(
            {
                "settings": {"accounting": "envoy"},
                "teams": LIMITED,
                "keys": {"apps": {"sha256": sha("sk-apps"), "team": "apps"}},
                "models": {"gpt-4o-mini": {"aliases": ["mini"]}, "gpt-4o": {}},
            }
        ).decode()
    )
    meter = Meter(MemoryStore())
    observer = Recorder()
    authorizer = ext_authz_http.HttpAuthorizer(
        PolicyStore(path), meter, observer, TicketSigner(signing_key("test"))
    )
    server = await ext_authz_http.start(authorizer, "127.0.0.1", 0)
    yield server, authorizer
    server.close()


@pytest.fixture
def authz(served: Served) -> tuple[int, ext_authz_http.HttpAuthorizer]:
    server, authorizer = served
    return server.port, authorizer


def raw_check(body: bytes, key: str = "sk-apps", extra: str = "") -> bytes:
    return (
        f"POST /v1/chat/completions HTTP/1.1\r\nhost: extproc\r\nauthorization: Bearer {key}\r\n"
        f"x-request-id: r-{len(body)}\r\n{extra}content-length: {len(body)}\r\n\r\n"
    ).encode() + body


async def test_checks_on_one_connection_are_answered_in_order(
    authz: tuple[int, ext_authz_http.HttpAuthorizer],
) -> None:
    port, authorizer = authz
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    allowed = raw_check(chat(max_tokens=10), extra="x-gateway-team: forged\r\n")
    refused = raw_check(chat("gpt-4o", max_tokens=10))
    handed_over = raw_check(chat("mini", max_tokens=10))
    writer.write(allowed + refused[:40])  # the second check arrives in pieces
    await asyncio.sleep(0.01)
    writer.write(refused[40:] + handed_over)
    (ok, ok_headers, _), (no, _, no_body), (over, over_headers, _) = await read_answers(reader, 3)
    writer.close()

    assert ok == 200
    assert ok_headers["x-gateway-team"] == "apps"
    assert ok_headers["x-gateway-accounting"] == "envoy"
    assert ok_headers["x-ratelimit-limit-tokens"] == "300"
    # The forged copy is overwritten, not removed after being set.
    assert ok_headers[ext_authz_http.HEADERS_TO_REMOVE] == "authorization"
    assert ext_authz_http.HEADER_PROCESSING not in ok_headers
    # Settled by its access-log record, which carries this ticket.
    ticket = TicketSigner(signing_key("test")).read(ok_headers[accounting.HEADER_TICKET])
    assert ticket.record["team"] == "apps" and ticket.record["model"] == "gpt-4o-mini"
    assert ticket.settlement is not None and ticket.settlement.reserved.output_tokens == 10

    assert no == 403
    assert orjson.loads(no_body)["error"]["code"] == "model_not_allowed"

    assert over == 200 and over_headers == {
        "content-length": "0",
        ext_authz_http.HEADER_PROCESSING: "ext_proc",
    }
    observer = authorizer._observer
    assert isinstance(observer, Recorder)
    assert [e.status for e in observer.finished] == [403]  # only the refusal is reported here


async def test_shutdown_closes_idle_connections(served: Served) -> None:
    """On SIGTERM Envoy's kept-alive connections close; Envoy then fails checks closed."""
    server, _ = served
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(raw_check(chat(max_tokens=10)))
    await read_answers(reader, 1)
    server.close()
    assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the server
    writer.close()


async def test_a_check_the_parser_cannot_read_is_handed_over_and_the_connection_closed(
    authz: tuple[int, ext_authz_http.HttpAuthorizer],
) -> None:
    """llhttp knows fewer methods than Envoy: ext_proc answers those (e.g. 404 in dialect)."""
    port, _ = authz
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"FROB /v1/chat/completions HTTP/1.1\r\ncontent-length: 0\r\n\r\n")
    answer = await reader.read()  # read to the end: the connection is closed
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"x-gateway-processing: ext_proc\r\n" in answer and b"connection: close" in answer
    writer.close()


def chat_check(request_id: str) -> http_server.Request:
    """A check as Envoy sends it for a chat request of the 300-token team."""
    headers = {
        ":method": "POST",
        ":path": "/v1/chat/completions",
        "authorization": "Bearer sk-apps",
        "x-request-id": request_id,
    }
    return http_server.Request(headers, [chat(max_tokens=250)])


async def answer(authorizer: ext_authz_http.HttpAuthorizer, check: http_server.Request) -> bytes:
    """What the authorizer writes back for ``check`` on a live connection."""
    written: list[bytes] = []
    await authorizer.answer(check, lambda data: written.append(data) is None)
    [data] = written
    return data


def answer_head(written: str) -> dict[str, str]:
    """The header fields of an HTTP answer the authorizer wrote."""
    return dict(line.split(": ", 1) for line in written.split("\r\n")[1:] if ": " in line)


def test_gateway_config_lets_through_every_header_the_authorizer_sets() -> None:
    """Envoy drops answer headers its allow-lists do not name: keep them in step."""
    config = yaml.safe_load(GATEWAY_CONFIG.read_text())
    manager = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    filters = {f["name"]: f["typed_config"] for f in manager["typed_config"]["http_filters"]}
    response = filters["envoy.filters.http.ext_authz"]["http_service"]["authorization_response"]
    upstream = {p["exact"] for p in response["allowed_upstream_headers"]["patterns"]}
    assert upstream == {
        pipeline.HEADER_TEAM,
        pipeline.HEADER_USER,
        pipeline.HEADER_KEY_ID,
        routing.HEADER_MODEL,
        routing.HEADER_CLUSTER,
        accounting.HEADER,
        accounting.HEADER_STREAM_USAGE,
        ext_authz_http.HEADER_PROCESSING,
        *pipeline.CREDENTIAL_HEADERS,  # a backend's provider key
    }
    kept = response["dynamic_metadata_from_headers"]["patterns"]
    assert {p.get("exact") or p["prefix"] for p in kept} == {
        "x-ratelimit-",
        HEADER_GUARDRAILS,
        accounting.HEADER_TICKET,
    }
    assert "allowed_client_headers_on_success" not in response  # appended, not replaced
    tree = filters["ext-proc-when-handed-over"]["xds_matcher"]["matcher_tree"]
    assert tree["input"]["typed_config"]["header_name"] == ext_authz_http.HEADER_PROCESSING
    assert ext_authz_http._HANDED_OVER.endswith(
        f"{ext_authz_http.HEADER_PROCESSING}: ext_proc\r\n\r\n".encode()
    )


async def test_a_failure_after_reserving_gives_the_reservation_back(
    authz: tuple[int, ext_authz_http.HttpAuthorizer], monkeypatch: pytest.MonkeyPatch
) -> None:
    """ext_proc decides a handed-over request afresh: what was reserved must not stay."""
    _, authorizer = authz

    def broken(*_: object) -> bytes:
        raise ValueError("header value with a line break")

    monkeypatch.setattr(ext_authz_http, "_allowed", broken)
    check = chat_check("r-broken")
    assert await answer(authorizer, check) == ext_authz_http._HANDED_OVER
    monkeypatch.undo()
    # The 300-token budget is whole again: the same request fits a second time.
    again = chat_check("r2")
    assert b"x-gateway-accounting: envoy" in await answer(authorizer, again)


async def test_a_check_envoy_gave_up_on_is_not_charged(
    authz: tuple[int, ext_authz_http.HttpAuthorizer],
) -> None:
    """Envoy timed out or the caller left: the answer cannot be written, nothing went up."""
    _, authorizer = authz
    check = chat_check("r-gone")
    await authorizer.answer(check, lambda data: False)
    observer = authorizer._observer
    assert isinstance(observer, Recorder)
    [gone] = observer.finished
    assert (gone.status, gone.error_code) == (0, "check_abandoned")
    assert not authorizer._tickets._kept  # its ticket will never be read
    # The 300-token budget is whole again: the same request fits.
    again = chat_check("r2")
    assert b"x-gateway-accounting: envoy" in await answer(authorizer, again)


async def test_a_ticket_too_long_for_a_header_hands_the_request_over(
    authz: tuple[int, ext_authz_http.HttpAuthorizer], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ticket too long for Envoy's answer headers (the limit lowered here: the caller's
    ids are bounded, so only extreme policy names could do it): ext_proc decides the
    request instead (its metadata has no such limit)."""
    _, authorizer = authz
    monkeypatch.setattr(ext_authz_http, "MAX_TICKET_CHARS", 100)
    assert await answer(authorizer, chat_check("r1")) == ext_authz_http._HANDED_OVER
    assert not authorizer._tickets._kept  # ext_proc issues its own
    monkeypatch.undo()
    # Nothing stays reserved for it: the 300-token budget fits the same request again.
    assert b"x-gateway-accounting: envoy" in await answer(authorizer, chat_check("r2"))


async def test_a_callers_oversized_ids_are_cut_and_the_authorizer_still_decides(
    authz: tuple[int, ext_authz_http.HttpAuthorizer],
) -> None:
    """A 20 KB x-request-id (and traceparent) would make the ticket too long for a header:
    the id is cut to MAX_REQUEST_ID_CHARS in the record and ticket, the traceparent, not a
    W3C one at that length, ignored."""
    _, authorizer = authz
    check = chat_check("r" * 20_000)
    check.headers["traceparent"] = "00-" + "a" * 20_000
    written = (await answer(authorizer, check)).decode()
    assert "x-gateway-accounting: envoy" in written
    ticket = answer_head(written)[accounting.HEADER_TICKET]
    read = authorizer._tickets.read(ticket)
    assert read.record["request_id"] == "r" * pipeline.MAX_REQUEST_ID_CHARS
    assert read.record["trace_id"] is None
    assert read.traceparent is None


@pytest.mark.parametrize(
    ("traceparent", "carried"),
    [
        pytest.param("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", True, id="w3c"),
        pytest.param("00-not-a-trace-01", False, id="malformed"),
        pytest.param("00-" + "0" * 32 + "-00f067aa0ba902b7-01", False, id="all-zero"),
        pytest.param(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-" + "f" * 100,
            False,
            id="over-128-chars",
        ),
    ],
)
async def test_only_a_valid_traceparent_is_carried_to_the_answers_span(
    authz: tuple[int, ext_authz_http.HttpAuthorizer], traceparent: str, carried: bool
) -> None:
    """The ticket carries the caller's traceparent to whichever process reports the
    answer, which continues the trace from it: one without a trace id is dropped here."""
    _, authorizer = authz
    check = chat_check("trace")
    check.headers["traceparent"] = traceparent
    written = (await answer(authorizer, check)).decode()
    ticket = answer_head(written)[accounting.HEADER_TICKET]
    read = authorizer._tickets.read(ticket)
    assert read.traceparent == (traceparent if carried else None)
    assert (read.record["trace_id"] is not None) is carried


async def test_a_failure_after_answering_writes_no_second_answer(
    authz: tuple[int, ext_authz_http.HttpAuthorizer], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second answer on the same keep-alive connection would be taken for the next
    check's, and every later check on it would get an earlier one's answer."""
    _, authorizer = authz

    def broken(_: Exchange) -> None:
        raise RuntimeError("observer failed")

    monkeypatch.setattr(ext_authz_http, "_answer_is_read", lambda _: False)
    monkeypatch.setattr(authorizer._observer, "finish", broken)
    written = await answer(authorizer, chat_check("r-once"))  # exactly one write
    assert written.startswith(b"HTTP/1.1 200")


async def test_a_request_with_no_cap_reserves_its_models_maximum_output() -> None:
    """The policy's default (4,096) under-reserved a model that writes up to 16,384
    tokens uncapped: requests in flight together overran the budget by the difference."""
    models = {
        "gpt-4o-mini": {"owned_by": "openai", "max_output_tokens": 16_384},
        "gpt-4o": {"owned_by": "openai"},
    }
    teams = {
        **LIMITED,
        "apps": {
            "models": {"allow": ["gpt-4o*"]},
            "limits": [{"unit": "total_tokens", "window": "hour", "limit": 10**6}],
        },
    }
    settings = {"jwt": {"team_claim": "groups"}, "accounting": "envoy"}
    reserved = {}
    for model in ("gpt-4o-mini", "gpt-4o"):
        compiled = make_policy(settings=settings, teams=teams, models=models)
        exchange = Exchange(policy=compiled)
        await decide_request(exchange, client_headers(), chat(model), Meter(MemoryStore()), clock)
        assert exchange.reservation is not None
        reserved[model] = exchange.reservation.counters[0].amount - exchange.input_tokens
    assert reserved == {"gpt-4o-mini": 16_384, "gpt-4o": 4_096}
