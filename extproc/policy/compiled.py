"""A validated policy compiled into the lookups the hot path needs.

Compilation happens once per policy version, off the request path. Everything a request
asks of the policy becomes a dictionary lookup or a set membership test: key digest →
key, model name or alias → catalogue entry, principal → the frozen set of models it may
call (glob patterns are evaluated against the finite catalogue here, never per request).
"""

from __future__ import annotations

import fnmatch
import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from extproc.policy.schema import JwtSettings, ModelAccess, Policy


def key_digest(key: str) -> bytes:
    """The SHA-256 digest under which a gateway key is stored in the policy."""
    return hashlib.sha256(key.encode("utf-8")).digest()


@dataclass(frozen=True, slots=True)
class CatalogueModel:
    name: str
    aliases: tuple[str, ...]
    owned_by: str


@dataclass(frozen=True, slots=True)
class CompiledKey:
    key_id: str
    digest: bytes
    team: str
    user: str | None
    expires_at: datetime | None
    disabled: bool
    allowed_models: frozenset[str]


@dataclass(frozen=True, slots=True)
class CompiledPolicy:
    """An immutable policy snapshot; one is pinned per exchange."""

    version: str
    """A short content hash, logged on reload and attached to exchanges."""
    unknown_paths: str
    jwt: JwtSettings | None
    keys_by_digest: dict[bytes, CompiledKey]
    models: dict[str, CatalogueModel]
    """Canonical names and aliases, each mapped to its catalogue entry."""
    catalogue: tuple[CatalogueModel, ...]
    """Canonical entries in policy-file order (what /v1/models lists from)."""
    team_models: dict[str, frozenset[str]]
    user_models: dict[str, frozenset[str]]
    """Users with their own restrictions, already intersected with their team's."""

    def resolve_model(self, requested: str) -> CatalogueModel | None:
        return self.models.get(requested)

    def models_for(self, team: str, user: str | None) -> frozenset[str]:
        """What a caller identified only by team and user (e.g. via JWT) may call."""
        team_set = self.team_models.get(team, frozenset())
        if user is not None and user in self.user_models:
            return self.user_models[user] & team_set
        return team_set


class _Globs:
    """A ModelAccess rule turned into two compiled regular expressions."""

    __slots__ = ("_allow", "_deny")

    def __init__(self, access: ModelAccess) -> None:
        self._allow = _union(access.allow)
        self._deny = _union(access.deny)

    def permits(self, model: str) -> bool:
        if self._deny is not None and self._deny.match(model):
            return False
        return self._allow is not None and self._allow.match(model) is not None


def _union(patterns: Iterable[str]) -> re.Pattern[str] | None:
    parts = [fnmatch.translate(p) for p in patterns]
    return re.compile("|".join(f"(?:{p})" for p in parts)) if parts else None


def _allowed(names: Iterable[str], access: ModelAccess | None) -> frozenset[str]:
    if access is None:
        return frozenset(names)
    globs = _Globs(access)
    return frozenset(n for n in names if globs.permits(n))


def compile_policy(policy: Policy, version: str) -> CompiledPolicy:
    catalogue = tuple(
        CatalogueModel(name=name, aliases=tuple(m.aliases), owned_by=m.owned_by)
        for name, m in policy.models.items()
    )
    names = [m.name for m in catalogue]
    models: dict[str, CatalogueModel] = {}
    for entry in catalogue:
        models[entry.name] = entry
        for alias in entry.aliases:
            models[alias] = entry

    team_models = {t: _allowed(names, team.models) for t, team in policy.teams.items()}
    user_models = {
        u: _allowed(team_models[user.team], user.models)
        for u, user in policy.users.items()
        if user.models is not None
    }
    keys: dict[bytes, CompiledKey] = {}
    for key_id, key in policy.keys.items():
        base = team_models[key.team]
        if key.user is not None and key.user in user_models:
            base = user_models[key.user]
        digest = bytes.fromhex(key.sha256)
        keys[digest] = CompiledKey(
            key_id=key_id,
            digest=digest,
            team=key.team,
            user=key.user,
            expires_at=key.expires_at,
            disabled=key.disabled,
            allowed_models=_allowed(base, key.models),
        )
    return CompiledPolicy(
        version=version,
        unknown_paths=policy.settings.unknown_paths,
        jwt=policy.settings.jwt,
        keys_by_digest=keys,
        models=models,
        catalogue=catalogue,
        team_models=team_models,
        user_models=user_models,
    )
