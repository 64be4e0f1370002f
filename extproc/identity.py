"""Who is calling: a gateway key from the request headers, or JWT claims Envoy verified.

Keys are never stored: the policy holds SHA-256 digests and a presented key is hashed and
compared in constant time with the digest it maps to. JWT signatures are Envoy's job
(``jwt_authn``); this module only reads the claims Envoy put into dynamic metadata, which
clients cannot write.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from extproc.errors import PermissionDenied, Unauthenticated
from extproc.policy.compiled import CompiledPolicy, Limits, key_digest
from extproc.policy.schema import JwtSettings, header_safe


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller and everything policy decided about it up front."""

    source: Literal["key", "jwt"]
    key_id: str | None
    team: str
    user: str | None
    allowed_models: frozenset[str]
    limits: Limits


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
) -> Principal:
    """Resolve the caller, preferring a gateway key over JWT claims.

    Raises :class:`Unauthenticated` (401) when no credential is usable and
    :class:`PermissionDenied` (403) when a valid JWT maps to no team of the policy.
    """
    key = presented_key(headers)
    if key is not None:
        return _from_key(policy, key, now)
    claims = _jwt_claims(policy.jwt, metadata)
    if claims is not None and policy.jwt is not None:
        return _from_claims(policy, policy.jwt, claims)
    raise Unauthenticated(
        "Missing API key. Send it as 'Authorization: Bearer <key>' or 'x-api-key: <key>'.",
        code="missing_api_key",
    )


def _from_key(policy: CompiledPolicy, key: str, now: datetime) -> Principal:
    digest = key_digest(key)
    entry = policy.keys_by_digest.get(digest)
    if entry is None or not hmac.compare_digest(entry.digest, digest):
        raise Unauthenticated("Incorrect API key provided.")
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
    return Principal(
        source="jwt",
        key_id=None,
        team=team,
        user=user_name,
        allowed_models=policy.models_for(team, user_name),
        limits=policy.limits_for(team, user_name),
    )


def _first_known_team(policy: CompiledPolicy, claim: object) -> str | None:
    candidates = claim if isinstance(claim, list) else [claim]
    for candidate in candidates:
        if isinstance(candidate, str) and candidate in policy.team_models:
            return candidate
    return None
