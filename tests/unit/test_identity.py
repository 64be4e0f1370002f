"""Identity: keys by hash with expiry and disable flags; JWT claims from Envoy metadata."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from extproc.errors import PermissionDenied, Unauthenticated
from extproc.identity import VOUCHED_KEY, VOUCHED_NAMESPACE, identify, presented_key, xfcc_uri
from tests.unit.policies import make_policy

NOW = datetime(2026, 6, 1, tzinfo=UTC)
POLICY = make_policy()


@pytest.mark.parametrize(
    ("headers", "key"),
    [
        pytest.param({"authorization": "Bearer sk-1"}, "sk-1", id="bearer"),
        pytest.param({"authorization": "bearer   sk-1  "}, "sk-1", id="bearer-lowercase-spaces"),
        pytest.param({"x-api-key": "sk-2"}, "sk-2", id="x-api-key"),
        pytest.param(
            {"authorization": "Basic abc", "x-api-key": "sk-3"}, "sk-3", id="basic-falls-back"
        ),
        pytest.param({"authorization": "Bearer "}, None, id="empty-bearer"),
        pytest.param({}, None, id="none"),
    ],
)
def test_presented_key(headers: dict[str, str], key: str | None) -> None:
    assert presented_key(headers) == key


def test_key_resolves_team_user_and_models() -> None:
    who = identify(POLICY, {"authorization": "Bearer sk-bob"}, None, NOW)
    assert (who.source, who.key_id, who.team, who.user) == ("key", "bob", "apps", "bob")
    assert who.allowed_models == {"gpt-4o-mini"}
    apps = identify(POLICY, {"x-api-key": "sk-apps"}, None, NOW)
    assert apps.allowed_models == {"gpt-4o-mini", "claude-3-5-haiku"}


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        pytest.param({}, "missing_api_key", id="missing"),
        pytest.param({"authorization": "Bearer sk-nope"}, "invalid_api_key", id="unknown"),
        pytest.param({"authorization": "Bearer sk-old"}, "api_key_expired", id="expired"),
        pytest.param({"authorization": "Bearer sk-off"}, "api_key_disabled", id="disabled"),
    ],
)
def test_rejected_keys(headers: dict[str, str], code: str) -> None:
    with pytest.raises(Unauthenticated) as caught:
        identify(POLICY, headers, None, NOW)
    assert caught.value.code == code
    assert "sk-" not in caught.value.message


def test_expiry_is_checked_against_the_clock() -> None:
    before = datetime(2025, 12, 31, 23, 59, tzinfo=UTC)
    assert identify(POLICY, {"authorization": "Bearer sk-old"}, None, before).key_id == "old"


def _jwt(claims: dict[str, Any]) -> dict[str, Any]:
    return {"envoy.filters.http.jwt_authn": {"jwt_payload": claims}}


def test_jwt_claims_map_to_team_and_user() -> None:
    who = identify(POLICY, {}, _jwt({"sub": "bob", "groups": ["unknown", "apps"]}), NOW)
    assert (who.source, who.team, who.user, who.key_id) == ("jwt", "apps", "bob", None)
    assert who.allowed_models == {"gpt-4o-mini"}


def test_jwt_with_unknown_team_is_forbidden() -> None:
    with pytest.raises(PermissionDenied):
        identify(POLICY, {}, _jwt({"sub": "eve", "groups": ["nobody"]}), NOW)


def test_jwt_ignored_when_policy_has_no_jwt_settings() -> None:
    policy = make_policy(settings={})
    with pytest.raises(Unauthenticated):
        identify(policy, {}, _jwt({"sub": "bob", "groups": "apps"}), NOW)


def test_key_wins_over_jwt() -> None:
    who = identify(POLICY, {"x-api-key": "sk-admin"}, _jwt({"sub": "bob", "groups": "apps"}), NOW)
    assert who.team == "platform"


WORKLOAD = "spiffe://cluster.local/ns/search/sa/indexer"
POLICY_WITH_WORKLOAD = make_policy(workloads={WORKLOAD: {"team": "apps", "user": "indexer"}})
MESH = make_policy(
    workloads={WORKLOAD: {"team": "apps", "user": "indexer"}},
    settings={"jwt": {"team_claim": "groups"}, "workload_identity": {"trust_xfcc": True}},
)


def test_verified_peer_certificate_identifies_a_workload() -> None:
    who = identify(POLICY_WITH_WORKLOAD, {}, None, NOW, peer=WORKLOAD)
    assert (who.source, who.team, who.user, who.key_id) == ("workload", "apps", "indexer", None)
    assert who.allowed_models == {"gpt-4o-mini", "claude-3-5-haiku"}  # the team's models


def test_unknown_workload_is_unauthenticated() -> None:
    with pytest.raises(Unauthenticated):
        identify(POLICY_WITH_WORKLOAD, {}, None, NOW, peer="spiffe://cluster.local/ns/x/sa/y")


@pytest.mark.parametrize(
    ("trust", "expected"),
    [pytest.param(True, "apps", id="trusted"), pytest.param(False, None, id="not-trusted")],
)
def test_xfcc_only_when_trusted(trust: bool, expected: str | None) -> None:
    policy = MESH if trust else POLICY_WITH_WORKLOAD
    xfcc = f"By=spiffe://cluster.local/ns/gw/sa/egress;Hash=abc;URI={WORKLOAD}"
    headers = {"x-forwarded-client-cert": xfcc}
    if expected is None:
        with pytest.raises(Unauthenticated):
            identify(policy, headers, None, NOW)
    else:
        assert identify(policy, headers, None, NOW).team == expected


@pytest.mark.parametrize(
    "subject",
    [
        pytest.param('"O=x,URI=spiffe://cluster.local/ns/prod/sa/billing"', id="comma"),
        pytest.param('"CN=x;URI=spiffe://cluster.local/ns/prod/sa/billing"', id="semicolon"),
        pytest.param('"CN=\\"a,URI=spiffe://cluster.local/ns/prod/sa/billing\\""', id="escaped"),
    ],
)
def test_a_subject_naming_another_workload_is_not_its_uri(subject: str) -> None:
    """Envoy quotes the certificate's Subject, which the certificate's holder may choose:
    split on every comma or semicolon, it named the workload as another."""
    xfcc = f"By=spiffe://cluster.local/ns/gw/sa/egress;Hash=abc;Subject={subject};URI={WORKLOAD}"
    assert xfcc_uri(xfcc) == WORKLOAD


def test_vouched_principal_from_ext_authz_is_rebuilt_from_the_policy() -> None:
    metadata = {VOUCHED_NAMESPACE: {VOUCHED_KEY: {"source": "key", "key_id": "bob", "team": "x"}}}
    who = identify(POLICY, {}, metadata, NOW)
    assert (who.key_id, who.team, who.allowed_models) == ("bob", "apps", {"gpt-4o-mini"})
    expired = {VOUCHED_NAMESPACE: {VOUCHED_KEY: {"source": "key", "key_id": "old"}}}
    with pytest.raises(Unauthenticated):
        identify(POLICY, {}, expired, NOW)


def test_workload_wins_over_an_unknown_placeholder_key() -> None:
    headers = {"authorization": "Bearer placeholder-the-sdk-insists-on"}
    assert identify(POLICY_WITH_WORKLOAD, headers, None, NOW, peer=WORKLOAD).source == "workload"
    known = {"authorization": "Bearer sk-admin"}
    assert identify(POLICY_WITH_WORKLOAD, known, None, NOW, peer=WORKLOAD).team == "platform"
