"""A validated policy compiled into the lookups the hot path needs.

Compilation happens once per policy version, off the request path. Everything a request
asks of the policy becomes a dictionary lookup or a set membership test: key digest →
key, model name or alias → catalogue entry, principal → the frozen set of models it may
call (glob patterns are evaluated against the finite catalogue here, never per request).
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from extproc.budgets.keys import Scope, Unit, key_parts, keyed
from extproc.budgets.pricing import Price, usd_to_micro
from extproc.budgets.tokens import ESTIMATE, default_tokenizer
from extproc.budgets.windows import Window
from extproc.guardrails.engine import Guardrails, compile_guardrails
from extproc.mcp.access import McpPermissions, McpRegistry, compile_access, compile_registry
from extproc.policy.schema import Backend, JwtSettings, Limit, ModelAccess, Policy, Workload
from extproc.telemetry.bodies import redactor


def key_digest(key: str) -> bytes:
    """The SHA-256 digest under which a gateway key is stored in the policy."""
    return hashlib.sha256(key.encode("utf-8")).digest()


@dataclass(frozen=True, slots=True)
class CompiledBackend:
    cluster: str
    provider: str
    upstream_model: str
    credential: tuple[str, str] | None = field(default=None, repr=False)
    """(header, value) carrying the provider key upstream; never printed or logged."""


@dataclass(frozen=True, slots=True)
class CatalogueModel:
    name: str
    aliases: tuple[str, ...]
    owned_by: str
    tokenizer: str
    price: Price | None
    backend: CompiledBackend | None = None
    max_output_tokens: int | None = None
    """Reserved for a request that sets no output cap (else the policy's default)."""


@dataclass(frozen=True, slots=True)
class CompiledLimit:
    """One budget with its scope bound: which counter it is and how much it admits."""

    scope: Scope
    scope_id: str
    unit: Unit
    window: Window
    limit: int
    """Whole requests or tokens, or micro-USD for :attr:`Unit.USD`."""
    per_model: bool
    models: frozenset[str] | None
    """Canonical models this limit counts; ``None`` for every model."""
    alerts: tuple[int, ...] = ()
    """Percentages of the limit that raise an alert when crossed."""
    tools: re.Pattern[str] | None = None
    """For a limit on MCP tool calls: the tool names it counts (else it counts models)."""
    only: str | None = None
    """For a limit on some models or tools only, not per model: a tag of its globs, which
    names its counter apart (``only-<hash>``), so two such limits of one scope, unit and
    window count what each names, not each other's traffic."""
    affixes: tuple[str, str] = field(init=False, repr=False, compare=False)
    """Its counters' keys before and after the model (:func:`extproc.budgets.keys.keyed`),
    made once: every request names its counters."""

    def __post_init__(self) -> None:
        parts = key_parts(self.scope, self.scope_id, self.unit, self.window)
        object.__setattr__(self, "affixes", parts)

    def key(self, subject: str | None, window_start: int) -> str:
        """The key of this limit's counter of ``subject`` (:meth:`subject`,
        :meth:`tool_subject`) in the window starting at ``window_start``: what
        :func:`extproc.budgets.keys.counter_key` names, from the parts made once."""
        head, tail = self.affixes
        return keyed(head, subject, tail, window_start)

    def counts(self, model: str) -> bool:
        return self.tools is None and (self.models is None or model in self.models)

    def counts_tool(self, tool: str) -> bool:
        return self.tools is not None and self.tools.fullmatch(tool) is not None

    def subject(self, model: str) -> str | None:
        """What names this limit's counter of ``model``'s traffic beside its scope, unit
        and window: the model per model, the limit's tag, or ``None`` (every model)."""
        return model if self.per_model else self.only

    def tool_subject(self, server: str, tool: str) -> str:
        """The same for a call of ``tool`` on MCP ``server``."""
        return f"mcp:{server}:{tool}" if self.per_model else self.server_subject(server)

    def server_subject(self, server: str) -> str:
        """What names this (not per-tool) limit's counter of MCP ``server``'s calls."""
        return f"mcp:{server}:{self.only}" if self.only else f"mcp:{server}"


Limits = tuple[CompiledLimit, ...]


@dataclass(frozen=True, slots=True)
class CompiledKey:
    key_id: str
    digest: bytes
    team: str
    user: str | None
    expires_at: datetime | None
    disabled: bool
    allowed_models: frozenset[str]
    limits: Limits
    """Every limit this key's traffic counts against: key, user, team and global."""
    mcp: McpPermissions


@dataclass(frozen=True, slots=True)
class CompiledPolicy:
    """An immutable policy snapshot; one is pinned per exchange."""

    version: str
    """A short content hash, logged on reload and attached to exchanges."""
    unknown_paths: str
    jwt: JwtSettings | None
    keys_by_digest: dict[bytes, CompiledKey]
    keys_by_id: dict[str, CompiledKey]
    workloads: dict[str, Workload]
    """SPIFFE id → the team (and label) a mesh workload acts as."""
    trust_xfcc: bool
    models: dict[str, CatalogueModel]
    """Canonical names and aliases, each mapped to its catalogue entry."""
    catalogue: tuple[CatalogueModel, ...]
    """Canonical entries in policy-file order (what /v1/models lists from)."""
    anthropic_models: frozenset[str]
    """Models on an Anthropic backend (an OpenAI chat request for one is translated)."""
    estimated_models: frozenset[str]
    """Models whose prompts are only estimated (``tokenizer: estimate``): an embeddings
    answer of one is read for the provider's count (:func:`extproc.accounting.only_accounted`)."""
    team_models: dict[str, frozenset[str]]
    user_models: dict[str, frozenset[str]]
    """Users with their own restrictions, already intersected with their team's."""
    team_limits: dict[str, Limits]
    user_limits: dict[str, Limits]
    global_limits: Limits
    default_max_output_tokens: int
    on_store_error: str
    alert_webhook: str | None
    accounting: str
    """``service`` (ext_proc's response phases) or ``envoy`` (access log; accounting.py)."""
    guardrails: Guardrails
    audit_redactor: Guardrails | None
    """Set when the policy records prompts and answers in the audit log."""
    mcp_servers: McpRegistry
    team_mcp: dict[str, McpPermissions]
    user_mcp: dict[str, McpPermissions]
    """Users' MCP access, already combined with their team's."""
    credential_files: tuple[Path, ...]
    """The ``credential_file`` paths the provider keys were read from (none when compiled
    without credentials): the store watches them, so a rotated key goes live."""

    def resolve_model(self, requested: str) -> CatalogueModel | None:
        return self.models.get(requested)

    def models_for(self, team: str, user: str | None) -> frozenset[str]:
        """What a caller identified only by team and user (e.g. via JWT) may call."""
        team_set = self.team_models.get(team, frozenset())
        if user is not None and user in self.user_models:
            return self.user_models[user] & team_set
        return team_set

    def mcp_for(self, team: str, user: str | None) -> McpPermissions:
        """MCP access of a caller identified by team and user (JWT, workload)."""
        if user is not None and user in self.user_mcp:
            return self.user_mcp[user]
        return self.team_mcp.get(team) or compile_access(None)

    def reserved_output(self, model: CatalogueModel) -> int:
        """Output tokens reserved for a request to ``model`` that sets no cap (and, for a
        Claude model asked through OpenAI's API, written as its required ``max_tokens``)."""
        return model.max_output_tokens or self.default_max_output_tokens

    def limits_for(self, team: str, user: str | None) -> Limits:
        """Limits of a caller identified by team and user (JWT); keys have theirs compiled."""
        user_limits = self.user_limits.get(user, ()) if user is not None else ()
        return (*user_limits, *self.team_limits.get(team, ()), *self.global_limits)

    @property
    def counted_tokenizers(self) -> frozenset[str]:
        """The tokenizers requests will count with: the catalogue's, if any budget is set
        (prompt tokens are counted for metered callers only), else none."""
        if not (
            self.global_limits
            or any(self.team_limits.values())
            or any(self.user_limits.values())
            or any(key.limits for key in self.keys_by_digest.values())
        ):
            return frozenset()
        return frozenset(model.tokenizer for model in self.catalogue)


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


def _allowed(
    names: Iterable[str], access: ModelAccess | None, narrowing: bool = False
) -> frozenset[str]:
    """The names ``access`` permits. A narrowing rule (user, key) with no ``allow`` list
    keeps everything it inherits and only applies its ``deny``; a team with no ``allow``
    list may use nothing."""
    if access is None:
        return frozenset(names)
    if narrowing and not access.allow:
        access = ModelAccess(allow=["*"], deny=access.deny)
    globs = _Globs(access)
    return frozenset(n for n in names if globs.permits(n))


def _limits(limits: list[Limit], scope: Scope, scope_id: str, names: list[str]) -> Limits:
    compiled = []
    for limit in limits:
        unit = Unit(limit.unit)
        amount = usd_to_micro(limit.limit, "limit") if unit is Unit.USD else int(limit.limit)
        models = (
            frozenset(_allowed(names, ModelAccess(allow=limit.models))) if limit.models else None
        )
        compiled.append(
            CompiledLimit(
                scope,
                scope_id,
                unit,
                Window(limit.window),
                amount,
                limit.per_model,
                models,
                tuple(sorted(set(limit.alerts))),
                _union(limit.tools) if limit.tools else None,
                None if limit.per_model else _only(limit.tools or limit.models),
            )
        )
    return tuple(compiled)


def _only(globs: list[str] | None) -> str | None:
    """The tag of a limit's model or tool globs (as written: a model added to the catalogue
    later joins the same counter)."""
    if not globs:
        return None
    digest = hashlib.sha256("\n".join(sorted(set(globs))).encode("utf-8")).hexdigest()
    return f"only-{digest[:12]}"


def _price(model_name: str, policy: Policy) -> Price | None:
    pricing = policy.models[model_name].pricing
    if pricing is None:
        return None
    return Price.from_usd(
        input=pricing.input,
        output=pricing.output,
        cached_input=pricing.cached_input,
        cache_write=pricing.cache_write,
        cache_write_1h=pricing.cache_write_1h,
    )


def _backend(name: str, backend: Backend | None, credentials: bool) -> CompiledBackend | None:
    """Resolve a backend, reading its provider key from the environment or a file (unless
    ``credentials`` is false: for commands that never call a provider).

    Raises :class:`ValueError` naming the field (never the key) when the key is missing.
    """
    if backend is None:
        return None
    key: str | None = None
    where = f"models.{name}.backend"
    if credentials and backend.credential_env:
        key = os.environ.get(backend.credential_env, "").strip()
        if not key:
            raise ValueError(
                f"{where}.credential_env: environment variable {backend.credential_env} is not set"
            )
    elif credentials and backend.credential_file:
        try:
            key = Path(backend.credential_file).read_text().strip()
        except OSError as exc:
            raise ValueError(f"{where}.credential_file: cannot read: {exc.strerror}") from None
        if not key:
            raise ValueError(f"{where}.credential_file: the file is empty")
    if key and not key.isprintable():
        # A header value cannot hold it (a key file of two lines, say): refused here, not
        # on every request.
        source = "credential_env" if backend.credential_env else "credential_file"
        raise ValueError(f"{where}.{source}: the key holds a line break or control character")
    credential = None
    if key:
        credential = (
            ("x-api-key", key)
            if backend.provider == "anthropic"
            else (
                "authorization",
                f"Bearer {key}",
            )
        )
    return CompiledBackend(
        cluster=backend.cluster,
        provider=backend.provider,
        upstream_model=backend.model or name,
        credential=credential,
    )


def compile_policy(policy: Policy, version: str, credentials: bool = True) -> CompiledPolicy:
    """The policy in the form the request path reads. Without ``credentials`` (commands
    that judge no request, such as ``extproc usage``) neither the provider keys nor the
    guardrails' operator secrets are read, and no guardrail is compiled."""
    catalogue = tuple(
        CatalogueModel(
            name=name,
            aliases=tuple(m.aliases),
            owned_by=m.owned_by,
            # Guessed from the model the backend is asked for, when it names one: a
            # catalogue name can front another provider's model.
            tokenizer=m.tokenizer
            or default_tokenizer(m.backend.model if m.backend and m.backend.model else name),
            price=_price(name, policy),
            backend=_backend(name, m.backend, credentials),
            max_output_tokens=m.max_output_tokens,
        )
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
        u: _allowed(team_models[user.team], user.models, narrowing=True)
        for u, user in policy.users.items()
        if user.models is not None
    }
    team_limits = {
        t: _limits(team.limits, Scope.TEAM, t, names) for t, team in policy.teams.items()
    }
    user_limits = {
        u: _limits(user.limits, Scope.USER, u, names) for u, user in policy.users.items()
    }
    budgets = policy.settings.budgets
    global_limits = _limits(budgets.global_limits, Scope.GLOBAL, "*", names)
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
            allowed_models=_allowed(base, key.models, narrowing=True),
            mcp=compile_access(
                policy.teams[key.team].mcp,
                policy.users[key.user].mcp if key.user in policy.users else None,
                key.mcp,
            ),
            limits=(
                *_limits(key.limits, Scope.KEY, key_id, names),
                *(user_limits.get(key.user, ()) if key.user else ()),
                *team_limits[key.team],
                *global_limits,
            ),
        )
    audit_redactor = redactor() if policy.settings.audit.record_bodies else None
    if policy.mcp.servers:
        redactor()  # built now: audit records redact the MCP resource URIs they name
    return CompiledPolicy(
        version=version,
        unknown_paths=policy.settings.unknown_paths,
        jwt=policy.settings.jwt,
        keys_by_digest=keys,
        keys_by_id={k.key_id: k for k in keys.values()},
        workloads=dict(policy.workloads),
        trust_xfcc=policy.settings.workload_identity.trust_xfcc,
        models=models,
        catalogue=catalogue,
        anthropic_models=frozenset(
            m.name for m in catalogue if m.backend is not None and m.backend.provider == "anthropic"
        ),
        estimated_models=frozenset(m.name for m in catalogue if m.tokenizer == ESTIMATE),
        team_models=team_models,
        user_models=user_models,
        team_limits=team_limits,
        user_limits=user_limits,
        global_limits=global_limits,
        default_max_output_tokens=budgets.default_max_output_tokens,
        on_store_error=budgets.on_store_error,
        alert_webhook=budgets.alert_webhook,
        accounting=policy.settings.accounting,
        guardrails=compile_guardrails(
            policy.guardrails if credentials else [], policy.settings.guardrails
        ),
        audit_redactor=audit_redactor,
        mcp_servers=compile_registry(policy.mcp),
        team_mcp={t: compile_access(team.mcp) for t, team in policy.teams.items()},
        user_mcp={
            u: compile_access(policy.teams[user.team].mcp, user.mcp)
            for u, user in policy.users.items()
        },
        credential_files=credential_files(policy) if credentials else (),
    )


def credential_files(policy: Policy) -> tuple[Path, ...]:
    """Each backend's key file once, as written (never resolved: a Kubernetes Secret's
    path stays, while the ``..data`` directory it points through is swapped). Known from
    the validated policy alone, so a policy refused for a key file can name it too."""
    files = (m.backend.credential_file for m in policy.models.values() if m.backend)
    return tuple(dict.fromkeys(Path(f) for f in files if f))
