"""Who is calling, from the sources Envoy gives us, most trusted first:

1. a principal our own ext_authz already resolved (mesh mode: ext_authz runs first and
   hands it to ext_proc as dynamic metadata, which clients cannot write);
2. a gateway key in ``Authorization: Bearer`` or ``x-api-key``;
3. JWT claims Envoy's ``jwt_authn`` verified (dynamic metadata again);
4. the mesh workload: the SPIFFE id of the client certificate Envoy verified (or, only
   when the policy trusts it, the ``x-forwarded-client-cert`` header a sidecar sanitised).

Keys are never stored: the policy holds SHA-256 digests and a presented key is hashed and
compared in constant time with the digest it maps to.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from extproc.errors import PermissionDenied, Unauthenticated
from extproc.mcp.access import McpPermissions
from extproc.policy.compiled import CompiledKey, CompiledPolicy, Limits, key_digest
from extproc.policy.schema import JwtSettings, header_safe

VOUCHED_NAMESPACE = "envoy.filters.http.ext_authz"
"""Where ext_authz's dynamic metadata reaches ext_proc (``forwarding_namespaces``)."""
VOUCHED_KEY = "extproc_principal"


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller and everything policy decided about it up front."""

    source: Literal["key", "jwt", "workload"]
    key_id: str | None
    team: str
    user: str | None
    allowed_models: frozenset[str]
    limits: Limits
    mcp: McpPermissions


def presented_key(headers: Mapping[str, str]) -> str | None:
    """The gateway key in ``Authorization: Bearer`` or ``x-api-key`` (lower-case names)."""
    auth = headers.get("authorization")
    if auth:
        scheme, _, token = auth.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    key = headers.get("x-api-key", "").strip()
    return key or None


def identify(
    policy: CompiledPolicy,
    headers: Mapping[str, str],
    metadata: Mapping[str, Any] | None,
    now: datetime,
    peer: str | None = None,
) -> Principal:
    """Resolve the caller from the first source that has one (see the module docstring).

    ``peer`` is the URI SAN of the client certificate Envoy verified, if any. Raises
    :class:`Unauthenticated` (401) when no credential is usable and
    :class:`PermissionDenied` (403) when a verified identity maps to no team.
    """
    vouched = _vouched(metadata)
    if vouched is not None:
        return _from_vouched(policy, vouched, now)
    workload = peer or (
        xfcc_uri(headers.get("x-forwarded-client-cert")) if policy.trust_xfcc else None
    )
    known_workload = workload if workload is not None and workload in policy.workloads else None
    key = presented_key(headers)
    if key is not None:
        try:
            return _from_key(policy, key, now)
        except Unauthenticated:
            # SDKs insist on sending some key; a verified, mapped workload still is one.
            if known_workload is None:
                raise
            return _from_workload(policy, known_workload)
    claims = _jwt_claims(policy.jwt, metadata)
    if claims is not None and policy.jwt is not None:
        return _from_claims(policy, policy.jwt, claims)
    if known_workload is not None:
        return _from_workload(policy, known_workload)
    raise Unauthenticated(
        "Missing API key. Send it as 'Authorization: Bearer <key>' or 'x-api-key: <key>'.",
        code="missing_api_key",
    )


def vouch(principal: Principal) -> dict[str, str]:
    """What ext_authz hands to ext_proc so the caller is not identified twice."""
    fields = {"source": principal.source, "team": principal.team}
    if principal.user is not None:
        fields["user"] = principal.user
    if principal.key_id is not None:
        fields["key_id"] = principal.key_id
    return fields


def xfcc_uri(header: str | None) -> str | None:
    """The ``URI=`` (SPIFFE id) of the nearest client in an x-forwarded-client-cert value.

    Elements and pairs are split outside double quotes only: Envoy quotes ``Subject="…"``,
    whose distinguished name may hold commas and semicolons, and a certificate whose
    Subject read ``O=x,URI=spiffe://…/victim`` was otherwise taken for the victim's."""
    if not header:
        return None
    nearest = _outside_quotes(header, ",")[-1]
    for pair in _outside_quotes(nearest, ";"):
        name, _, value = pair.partition("=")
        if name.strip().lower() == "uri":
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1].replace('\\"', '"')
            return value or None
    return None


def _outside_quotes(text: str, separator: str) -> list[str]:
    """``text`` split on ``separator`` where it stands outside a double-quoted value (a
    backslash escapes a quote inside one)."""
    parts: list[str] = []
    start, quoted, escaped = 0, False, False
    for index, char in enumerate(text):
        if escaped:
            escaped = False
        elif char == "\\" and quoted:
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == separator and not quoted:
            parts.append(text[start:index])
            start = index + 1
    parts.append(text[start:])
    return parts


def _vouched(metadata: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    if not metadata:
        return None
    namespace = metadata.get(VOUCHED_NAMESPACE)
    vouched = namespace.get(VOUCHED_KEY) if isinstance(namespace, Mapping) else None
    return vouched if isinstance(vouched, Mapping) else None


def _from_vouched(policy: CompiledPolicy, vouched: Mapping[str, Any], now: datetime) -> Principal:
    """Rebuild the principal ext_authz resolved, against this process's policy snapshot."""
    key_id = vouched.get("key_id")
    if isinstance(key_id, str):
        entry = policy.keys_by_id.get(key_id)
        if entry is None:
            raise Unauthenticated("Incorrect API key provided.")
        return _key_principal(entry, now)
    team, user = vouched.get("team"), vouched.get("user")
    if not isinstance(team, str) or team not in policy.team_models:
        raise PermissionDenied(
            "The caller's team is not known to the gateway.", code="team_not_allowed"
        )
    user_name = user if isinstance(user, str) else None
    if vouched.get("source") == "workload":
        return _team_principal(policy, "workload", team, user_name)
    return _team_principal(policy, "jwt", team, user_name)


def _from_workload(policy: CompiledPolicy, spiffe_id: str) -> Principal:
    workload = policy.workloads[spiffe_id]
    return _team_principal(policy, "workload", workload.team, workload.user)


def _team_principal(
    policy: CompiledPolicy, source: Literal["jwt", "workload"], team: str, user: str | None
) -> Principal:
    """A caller known by team and user only (no key): the policy's access for those."""
    return Principal(
        source=source,
        key_id=None,
        team=team,
        user=user,
        allowed_models=policy.models_for(team, user),
        limits=policy.limits_for(team, user),
        mcp=policy.mcp_for(team, user),
    )


def _from_key(policy: CompiledPolicy, key: str, now: datetime) -> Principal:
    digest = key_digest(key)
    entry = policy.keys_by_digest.get(digest)
    if entry is None or not hmac.compare_digest(entry.digest, digest):
        raise Unauthenticated("Incorrect API key provided.")
    return _key_principal(entry, now)


def _key_principal(entry: CompiledKey, now: datetime) -> Principal:
    if entry.disabled:
        raise Unauthenticated("This API key has been disabled.", code="api_key_disabled")
    if entry.expires_at is not None and now >= entry.expires_at:
        raise Unauthenticated("This API key has expired.", code="api_key_expired")
    return Principal(
        source="key",
        key_id=entry.key_id,
        team=entry.team,
        user=entry.user,
        allowed_models=entry.allowed_models,
        limits=entry.limits,
        mcp=entry.mcp,
    )


def _jwt_claims(
    settings: JwtSettings | None, metadata: Mapping[str, Any] | None
) -> Mapping[str, Any] | None:
    if settings is None or not metadata:
        return None
    namespace = metadata.get(settings.metadata_namespace)
    if not isinstance(namespace, Mapping):
        return None
    claims = namespace.get(settings.payload_key)
    return claims if isinstance(claims, Mapping) else None


def _from_claims(
    policy: CompiledPolicy, settings: JwtSettings, claims: Mapping[str, Any]
) -> Principal:
    user = claims.get(settings.user_claim)
    user_name = user if isinstance(user, str) and header_safe(user) else None
    team = _first_known_team(policy, claims.get(settings.team_claim))
    if team is None:
        raise PermissionDenied(
            f"The token's '{settings.team_claim}' claim names no team known to the gateway.",
            code="team_not_allowed",
        )
    return _team_principal(policy, "jwt", team, user_name)


def _first_known_team(policy: CompiledPolicy, claim: object) -> str | None:
    candidates = claim if isinstance(claim, list) else [claim]
    for candidate in candidates:
        if isinstance(candidate, str) and candidate in policy.team_models:
            return candidate
    return None
