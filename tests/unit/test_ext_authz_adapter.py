"""The ext_authz adapter: the same decisions as ext_proc, as CheckResponses."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from envoy.service.auth.v3 import external_auth_pb2 as pb
from google.protobuf.json_format import MessageToDict
from google.rpc import code_pb2

from extproc.adapters.ext_authz import Authorization
from extproc.budgets.memory_store import MemoryStore
from extproc.budgets.meter import Meter
from extproc.identity import VOUCHED_KEY
from extproc.policy.store import PolicyStore
from extproc.stack import ROOT

WORKLOAD = "spiffe://cluster.local/ns/search/sa/indexer"


@pytest.fixture
def authz(tmp_path: Any) -> Authorization:
    policy = tmp_path / "p.yaml"
    policy.write_text(
        (ROOT / "policies" / "example.yaml").read_text()
        + f"\nworkloads:\n  {WORKLOAD}: {{ team: apps }}\n"
    )
    return Authorization(PolicyStore(policy), Meter(MemoryStore()))


def check(
    path: str,
    headers: dict[str, str],
    body: object | None = None,
    principal: str = "",
    method: str = "POST",
) -> pb.CheckRequest:
    request = pb.CheckRequest()
    http = request.attributes.request.http
    http.path, http.method = path, method
    http.headers.update(headers)
    if body is not None:
        http.raw_body = orjson.dumps(body)
    request.attributes.source.principal = principal
    return request


def chat(model: str) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}]}


def added(response: pb.CheckResponse) -> dict[str, str]:
    return {h.header.key: h.header.value for h in response.ok_response.headers}


async def test_allowed_request_gets_identity_headers_and_vouched_metadata(
    authz: Authorization,
) -> None:
    response = await authz.Check(
        check(
            "/v1/chat/completions",
            {"authorization": "Bearer sk-demo-admin", "x-gateway-team": "forged"},
            chat("gpt-4o"),
        ),
        None,
    )
    assert response.status.code == code_pb2.OK
    assert added(response) == {
        "x-gateway-team": "platform",
        "x-gateway-user": "alice",
        "x-gateway-key-id": "demo-admin",
        "x-gateway-model": "gpt-4o",
        "x-gateway-cluster": "openai",
    }
    # A header the answer sets is not also removed: Envoy removes after it sets, so the
    # forged copy is overwritten rather than the gateway's own lost.
    assert set(response.ok_response.headers_to_remove) == {"authorization"}
    vouched = MessageToDict(response.dynamic_metadata)[VOUCHED_KEY]
    assert vouched == {"source": "key", "team": "platform", "user": "alice", "key_id": "demo-admin"}


@pytest.mark.parametrize(
    ("headers", "body", "status", "grpc_code"),
    [
        pytest.param({}, chat("gpt-4o"), 401, code_pb2.UNAUTHENTICATED, id="no-key"),
        pytest.param(
            {"x-api-key": "sk-demo-restricted"},
            {**chat("gpt-4o"), "max_tokens": 5},
            403,
            code_pb2.PERMISSION_DENIED,
            id="forbidden-model",
        ),
        pytest.param(
            {"x-api-key": "sk-demo-admin"},
            {"model": 1},
            400,
            code_pb2.INVALID_ARGUMENT,
            id="bad-body",
        ),
    ],
)
async def test_denials_carry_status_and_dialect_body(
    authz: Authorization, headers: dict[str, str], body: object, status: int, grpc_code: int
) -> None:
    response = await authz.Check(check("/v1/messages", headers, body), None)
    assert response.status.code == grpc_code
    assert response.denied_response.status.code == status
    assert orjson.loads(response.denied_response.body)["type"] == "error"


async def test_budget_precheck_denies_with_429(authz: Authorization) -> None:
    body = {**chat("gpt-4o-mini"), "max_tokens": 2000}  # more than the 1,000 a minute
    response = await authz.Check(
        check("/v1/chat/completions", {"authorization": "Bearer sk-demo-capped"}, body), None
    )
    assert response.denied_response.status.code == 429
    headers = {h.header.key: h.header.value for h in response.denied_response.headers}
    assert int(headers["retry-after"]) >= 1


async def test_spiffe_principal_maps_to_its_team(authz: Authorization) -> None:
    response = await authz.Check(
        check("/v1/chat/completions", {}, chat("gpt-4o-mini"), principal=WORKLOAD), None
    )
    assert response.status.code == code_pb2.OK
    assert added(response)["x-gateway-team"] == "apps"
    forbidden = await authz.Check(
        check("/v1/chat/completions", {}, chat("gpt-4o"), principal=WORKLOAD), None
    )
    assert forbidden.denied_response.status.code == 403


async def test_headers_only_check_without_body(authz: Authorization) -> None:
    response = await authz.Check(
        check("/v1/chat/completions", {"authorization": "Bearer sk-demo-admin"}), None
    )
    assert response.status.code == code_pb2.OK
    assert "x-gateway-model" not in added(response)
