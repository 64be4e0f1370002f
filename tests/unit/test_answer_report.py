"""accounting: service through the HTTP authorizer: Envoy's Lua filter reports each
answer (status, bytes, the usage Envoy lifted, the ticket) before its end, and the
service settles the exchange from the ticket the authorizer issued."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from extproc import http_server
from extproc.accounting import (
    ANSWERED,
    AUTHZ_NAMESPACE,
    EXCHANGE_NAMESPACE,
    HEADER,
    HEADER_TICKET,
)
from extproc.adapters import ext_authz_http
from extproc.adapters.access_log import logged_answer
from extproc.adapters.answer_report import (
    HEADER_BYTES,
    HEADER_STATUS,
    REPORT_PATH,
    USAGE_PREFIX,
    reported_answer,
)
from extproc.budgets.memory_store import MemoryStore
from extproc.budgets.meter import Meter
from extproc.budgets.store import AdjustResult
from extproc.dialects.usage import BYTES_PER_TOKEN
from extproc.policy.store import PolicyStore
from extproc.routing import HEADER_SERVED_BY
from extproc.telemetry.audit import AuditLog
from extproc.telemetry.observer import Observer
from extproc.ticket import TicketSigner
from tests.unit.test_accounting import KEY, log_entry, policy_file

ROOT = Path(__file__).resolve().parents[2]
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
"""Nothing to mask: the body goes up unchanged, so the authorizer decides it."""
LIFTED = {"prompt_tokens": "1000", "completion_tokens": "3", "cached_tokens": "1000"}
"""The usage Envoy lifted from the answer, under the provider's names."""


SETTLED = 204
"""A settled report's reply: not 200, which ext_authz would take for "allowed" were a
client's request for the report path ever to carry a valid ticket."""


def authorizer(path: Path, store: MemoryStore) -> ext_authz_http.HttpAuthorizer:
    return ext_authz_http.HttpAuthorizer(
        PolicyStore(path), Meter(store), Observer(None, AuditLog([])), TicketSigner(KEY)
    )


class Processes:
    """The HTTP authorizers of two processes sharing a budget store (the Redis of several
    replicas) and the ticket key: one decides, the other gets the report."""

    def __init__(self, tmp_path: Path, store: MemoryStore | None = None) -> None:
        path = policy_file(tmp_path, "service")
        policy = yaml.safe_load(path.read_text())
        # The example sends gpt-4o-mini up under a dated name: a body rewrite, which only a
        # whole ext_proc stream makes. Called by its own name, the body goes up unchanged.
        del policy["models"]["gpt-4o-mini"]["backend"]["model"]
        path.write_text(yaml.safe_dump(policy))
        self.store = store if store is not None else MemoryStore()
        self.deciding = authorizer(path, self.store)
        self.reporting = authorizer(path, self.store)

    async def decide(self) -> str:
        """Send a chat request to the authorizer; the ticket it answers Envoy with."""
        headers = {
            ":method": "POST",
            ":path": "/v1/chat/completions",
            "authorization": "Bearer sk-demo-restricted",
            "x-request-id": "req-1",
        }
        status, answer, _ = await call(self.deciding, headers, orjson.dumps(CHAT))
        assert status == 200
        assert answer[HEADER] == ext_authz_http.ACCOUNTING_REPORTED
        assert ext_authz_http.HEADER_PROCESSING not in answer  # no ext_proc stream
        return answer[HEADER_TICKET]

    async def report(self, ticket: str | None, status: int = 200, **extra: str) -> int:
        """Report the answer as envoy/gateway.yaml's Lua filter does; the reply's status."""
        headers = {":method": "POST", ":path": REPORT_PATH, HEADER_STATUS: str(status)}
        headers |= {HEADER_BYTES: "321", HEADER_SERVED_BY: "openai_primary", **extra}
        if ticket is not None:
            headers[HEADER_TICKET] = ticket
        replied, _, _ = await call(self.reporting, headers, b"")
        return replied

    @property
    def recent(self) -> list[dict[str, object]]:
        return list(self.reporting._observer.recent)


async def call(
    authz: ext_authz_http.HttpAuthorizer, headers: dict[str, str], body: bytes
) -> tuple[int, dict[str, str], bytes]:
    written: list[bytes] = []
    await authz.answer(http_server.Request(headers, [body]), lambda d: written.append(d) is None)
    [answer] = written
    head, _, rest = answer.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    fields = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), fields, rest


def usage_headers(lifted: dict[str, str]) -> dict[str, str]:
    return {USAGE_PREFIX + name: value for name, value in lifted.items()}


async def test_a_report_settles_the_reservation_with_the_lifted_usage(tmp_path: Path) -> None:
    processes = Processes(tmp_path)
    ticket = await processes.decide()
    [(counter, (reserved, _))] = processes.store._entries.items()  # the global USD limit
    assert await processes.report(ticket, **usage_headers(LIFTED)) == SETTLED
    [record] = processes.recent
    assert record["team"] == "apps" and record["status"] == 200
    assert record["served_by"] == "openai_primary"
    assert (record["input_tokens"], record["output_tokens"]) == (1000, 3)
    assert record["cost_micro_usd"] == 77 and record["usage_source"] == "provider"
    assert reserved > 77 and processes.store._entries[counter][0] == 77


async def test_an_exchange_reported_twice_is_settled_and_recorded_once(tmp_path: Path) -> None:
    """The caller left while its report was being settled: Envoy also logs the exchange,
    unmarked. The record's settlement finds the reservation's token used and writes
    nothing: one audit record, the budget charged once."""
    processes = Processes(tmp_path)
    ticket = await processes.decide()
    [counter] = processes.store._entries
    assert await processes.report(ticket, **usage_headers(LIFTED)) == SETTLED
    entry = log_entry("req-1", 200, {k: float(v) for k, v in LIFTED.items()})
    entry.common_properties.metadata.filter_metadata[AUTHZ_NAMESPACE].update(
        {HEADER_TICKET: ticket}
    )
    logged = logged_answer(entry)
    assert logged is not None
    assert await processes.deciding._accountant.settle(logged)  # another process's log
    assert await processes.report(ticket, **usage_headers(LIFTED)) == SETTLED  # a replay
    assert len(processes.recent) == 1
    assert not processes.deciding._observer.recent  # its log record wrote nothing
    assert processes.store._entries[counter][0] == 77


async def test_a_report_without_usage_is_estimated_from_the_bytes_sent(tmp_path: Path) -> None:
    processes = Processes(tmp_path)
    ticket = await processes.decide()
    assert await processes.report(ticket, **{HEADER_BYTES: "6400"}) == SETTLED
    [record] = processes.recent
    assert record["usage_source"] == "estimate"
    assert record["output_tokens"] == 6400 // BYTES_PER_TOKEN


async def test_an_error_answer_gives_the_reservation_back(tmp_path: Path) -> None:
    processes = Processes(tmp_path)
    ticket = await processes.decide()
    [counter] = processes.store._entries
    assert await processes.report(ticket, status=429) == SETTLED
    [record] = processes.recent
    assert record["status"] == 429 and record["cost_micro_usd"] == 0
    assert processes.store._entries[counter][0] == 0


async def test_without_a_ticket_it_signed_a_report_is_refused_as_an_unknown_path(
    tmp_path: Path,
) -> None:
    """ext_authz sends the authorizer any path a client asks for: a client's request for
    the report path, forged ticket or none, is refused like any unknown path, settles
    nothing and reports nothing."""
    processes = Processes(tmp_path)
    ticket = await processes.decide()
    [(counter, (reserved, _))] = processes.store._entries.items()
    forged = ticket[:-2] + ("AA" if not ticket.endswith("AA") else "BB")
    for sent in (None, forged):
        headers = {":method": "POST", ":path": REPORT_PATH, HEADER_STATUS: "200"}
        if sent is not None:
            headers[HEADER_TICKET] = sent
        status, fields, body = await call(processes.reporting, headers, b"")
        assert status == 404
        assert orjson.loads(body)["error"]["code"] == "unknown_url"
        assert fields["content-type"] == "application/json"
    assert processes.recent == []
    assert processes.store._entries[counter][0] == reserved


async def test_only_a_post_reports(tmp_path: Path) -> None:
    processes = Processes(tmp_path)
    ticket = await processes.decide()
    [(counter, (reserved, _))] = processes.store._entries.items()
    headers = {":method": "GET", ":path": REPORT_PATH, HEADER_STATUS: "200", HEADER_TICKET: ticket}
    status, _, _ = await call(processes.reporting, headers, b"")
    assert status == 404
    assert processes.recent == []
    assert processes.store._entries[counter][0] == reserved


def test_a_report_takes_counts_only() -> None:
    answer = reported_answer(
        {
            HEADER_TICKET: "t",
            HEADER_STATUS: "200",
            HEADER_BYTES: "-5",
            USAGE_PREFIX + "prompt_tokens": "12",
            USAGE_PREFIX + "completion_tokens": "many",
        }
    )
    assert answer.ticket == "t" and answer.status == 200
    assert answer.response_bytes == 0
    assert dict(answer.usage) == {"prompt_tokens": 12}
    assert answer.served_by is None


def test_the_access_log_leaves_a_reported_answer_alone() -> None:
    """Envoy logs every exchange whose caller left (DC): one whose answer was reported is
    settled by that report; one whose caller left before the answer's end only by its
    record."""
    entry = log_entry("r1", 0, {})
    entry.common_properties.metadata.filter_metadata[AUTHZ_NAMESPACE].update({HEADER_TICKET: "t"})
    before_the_end = logged_answer(entry)
    assert before_the_end is not None and before_the_end.ticket == "t"
    entry.common_properties.metadata.filter_metadata[EXCHANGE_NAMESPACE].update(
        {ANSWERED: "report"}
    )
    assert logged_answer(entry) is None


class FailingOnceStore(MemoryStore):
    """A store whose first settlement fails as nothing expected (a bug, not Redis down,
    which the resilient store absorbs)."""

    def __init__(self) -> None:
        super().__init__()
        self.failed = False

    async def adjust(self, deltas: Any, *, token: str | None = None) -> AdjustResult:
        if not self.failed:
            self.failed = True
            raise RuntimeError("unexpected")
        return await super().adjust(deltas, token=token)


async def test_a_report_whose_settlement_fails_is_left_to_the_access_log(tmp_path: Path) -> None:
    """Not answered 204, the report leaves the exchange unmarked, and Envoy's access log
    sends its record: settled and recorded then, once (the report recorded nothing)."""
    processes = Processes(tmp_path, store=FailingOnceStore())
    ticket = await processes.decide()
    [counter] = processes.store._entries
    assert await processes.report(ticket, **usage_headers(LIFTED)) != SETTLED
    assert not processes.recent
    entry = log_entry("req-1", 200, {k: float(v) for k, v in LIFTED.items()})
    entry.common_properties.metadata.filter_metadata[AUTHZ_NAMESPACE].update(
        {HEADER_TICKET: ticket}
    )
    logged = logged_answer(entry)
    assert logged is not None and await processes.reporting._accountant.settle(logged)
    [record] = processes.recent
    assert record["cost_micro_usd"] == 77 and processes.store._entries[counter][0] == 77


def test_the_lua_filter_reports_what_the_service_reads() -> None:
    """envoy/gateway.yaml's report filter and this module name the same path and headers."""
    config = yaml.safe_load((ROOT / "envoy" / "gateway.yaml").read_text())
    [listener] = config["static_resources"]["listeners"]
    manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
    [report] = [f for f in manager["http_filters"] if f["name"] == "report-answer-when-asked"]
    tree = report["typed_config"]["xds_matcher"]["matcher_tree"]
    assert tree["input"]["typed_config"]["header_name"] == HEADER
    action = tree["exact_match_map"]["map"][ext_authz_http.ACCOUNTING_REPORTED]["action"]
    lua = action["typed_config"]["typed_config"]["typed_config"]["default_source_code"]
    lua = lua["inline_string"]
    for name in (REPORT_PATH, HEADER_TICKET, HEADER_STATUS, HEADER_BYTES, USAGE_PREFIX):
        assert f'"{name}' in lua, name
    assert f'"{HEADER_SERVED_BY}"' in lua
    assert f'"{EXCHANGE_NAMESPACE}", "{ANSWERED}"' in lua


@pytest.mark.parametrize("lifted", ["json", "sse"])
def test_the_usage_is_lifted_under_service_as_under_envoy(lifted: str) -> None:
    config = yaml.safe_load((ROOT / "envoy" / "gateway.yaml").read_text())
    [listener] = config["static_resources"]["listeners"]
    manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
    [lift] = [f for f in manager["http_filters"] if f["name"] == f"lift-usage-{lifted}"]
    matcher = lift["typed_config"]["xds_matcher"]
    if lifted == "json":  # past the embeddings answers, which are never lifted
        matcher = matcher["on_no_match"]["matcher"]
    actions = matcher["matcher_tree"]["exact_match_map"]["map"]
    assert actions[ext_authz_http.ACCOUNTING_REPORTED] == actions["envoy"]
