"""What each budget has used in its current window: the data behind ``extproc usage``."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from extproc.budgets.keys import Scope, Unit
from extproc.budgets.pricing import micro_to_usd
from extproc.budgets.store import BudgetStore
from extproc.budgets.windows import window_bounds
from extproc.policy.compiled import CompiledLimit, CompiledPolicy


@dataclass(frozen=True, slots=True)
class UsageLine:
    scope: str
    scope_id: str
    model: str
    unit: str
    window: str
    used: str
    limit: str
    remaining: str
    resets_at: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _limits(policy: CompiledPolicy, team: str | None) -> Iterator[CompiledLimit]:
    if team is None:
        yield from policy.global_limits
    for name, limits in policy.team_limits.items():
        if team in (None, name):
            yield from limits
    for user, limits in policy.user_limits.items():
        user_team = next((k.team for k in policy.keys_by_digest.values() if k.user == user), None)
        if team is None or user_team == team:
            yield from limits
    for key in policy.keys_by_digest.values():
        if team in (None, key.team):
            yield from (limit for limit in key.limits if limit.scope is Scope.KEY)


def _subjects(policy: CompiledPolicy, limit: CompiledLimit) -> list[tuple[str | None, str | None]]:
    """A limit's counters as (what the line names, the counter's subject): one per model
    for a per-model limit, one per MCP server for a tool limit (its per-tool counters
    cannot be listed: tools are whatever the servers offer), else one."""
    if limit.tools is not None:
        if limit.per_model:
            return []
        servers = policy.mcp_servers.servers
        return [(f"mcp:{name}", limit.server_subject(name)) for name in servers]
    if limit.per_model:
        return [(m.name, m.name) for m in policy.catalogue if limit.counts(m.name)]
    return [("+".join(sorted(limit.models)) if limit.models else None, limit.only)]


async def usage_report(
    policy: CompiledPolicy, store: BudgetStore, now: datetime, team: str | None = None
) -> list[UsageLine]:
    """One line per counter the policy defines (per model where a limit is per model)."""
    rows: list[tuple[CompiledLimit, str | None, str, int]] = []
    for limit in _limits(policy, team):
        start, end = window_bounds(limit.window, now)
        for label, subject in _subjects(policy, limit):
            key = limit.key(subject, start)
            rows.append((limit, label, key, end))
    values = await store.read([key for _, _, key, _ in rows]) if rows else ()
    lines = []
    for (limit, model, _, end), used in zip(rows, values, strict=True):
        show = micro_to_usd if limit.unit is Unit.USD else str
        lines.append(
            UsageLine(
                scope=limit.scope.value,
                scope_id=limit.scope_id,
                model=model or "*",
                unit=limit.unit.value,
                window=limit.window.value,
                used=show(used),
                limit=show(limit.limit),
                remaining=show(max(0, limit.limit - used)),
                resets_at=datetime.fromtimestamp(end, UTC).isoformat().replace("+00:00", "Z"),
            )
        )
    return lines


def format_table(lines: list[UsageLine]) -> str:
    header = ("SCOPE", "ID", "MODEL", "UNIT", "WINDOW", "USED", "LIMIT", "REMAINING", "RESETS AT")
    table = [header] + [
        (
            line.scope,
            line.scope_id,
            line.model,
            line.unit,
            line.window,
            line.used,
            line.limit,
            line.remaining,
            line.resets_at,
        )
        for line in lines
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in table
    )
