"""Which requests a rule applies to: teams, keys, model globs, route globs."""

from __future__ import annotations

from dataclasses import dataclass

from extproc.guardrails.config import Scope
from extproc.guardrails.linear import GlobSet

_CACHE_LIMIT = 4096
"""Model names and paths memoised per scope (they repeat; the bound keeps memory flat)."""


@dataclass(frozen=True, slots=True)
class Subject:
    """Who is calling what: the plain data a rule's scope is matched against."""

    team: str | None
    key_id: str | None
    model: str | None
    path: str


class ScopeMatcher:
    __slots__ = ("_keys", "_memo", "_models", "_routes", "_teams", "everything")

    def __init__(self, scope: Scope) -> None:
        self._teams = frozenset(scope.teams)
        self._keys = frozenset(scope.keys)
        self._models = GlobSet(scope.models)
        self._routes = GlobSet(sorted({*scope.routes, *map(_endpoint, scope.routes)}))
        self._memo: dict[tuple[str, str], bool] = {}
        self.everything = not (self._teams or self._keys or self._models or self._routes)

    def matches(self, subject: Subject) -> bool:
        if self.everything:
            return True
        if self._teams and subject.team not in self._teams:
            return False
        if self._keys and subject.key_id not in self._keys:
            return False
        # An unknown model (``None``: asked before the body is read) may still match.
        if (
            self._models
            and subject.model is not None
            and not self._glob("m", self._models, subject.model)
        ):
            return False
        if not self._routes:
            return True
        path = subject.path.partition("?")[0]
        if self._glob("r", self._routes, path):
            return True
        endpoint = _endpoint(path)
        return endpoint != path and self._glob("r", self._routes, endpoint)

    def _glob(self, kind: str, globs: GlobSet, value: str) -> bool:
        key = (kind, value)
        hit = self._memo.get(key)
        if hit is None:
            hit = globs.matches(value)
            if len(self._memo) < _CACHE_LIMIT:
                self._memo[key] = hit
        return hit


def _endpoint(path: str) -> str:
    """``/mcp/`` and ``/mcp`` are one endpoint, to the dialect and MCP lookups as to a
    client: a rule scoped to one covers the other."""
    return path.rstrip("/") or "/"
