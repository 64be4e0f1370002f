"""Policies built in code for unit tests of the pure core."""

from __future__ import annotations

import hashlib
from typing import Any

from extproc.policy.compiled import CompiledPolicy, compile_policy
from extproc.policy.schema import Policy


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def make_policy(**overrides: Any) -> CompiledPolicy:
    data: dict[str, Any] = {
        "settings": {"jwt": {"team_claim": "groups"}},
        "teams": {
            "platform": {"models": {"allow": ["*"]}},
            "apps": {"models": {"allow": ["gpt-4o-mini", "claude-*"]}},
        },
        "users": {"bob": {"team": "apps", "models": {"allow": ["gpt-4o-mini"]}}},
        "keys": {
            "admin": {"sha256": sha("sk-admin"), "team": "platform", "user": "alice"},
            "bob": {"sha256": sha("sk-bob"), "team": "apps", "user": "bob"},
            "apps": {"sha256": sha("sk-apps"), "team": "apps"},
            "old": {
                "sha256": sha("sk-old"),
                "team": "platform",
                "expires_at": "2026-01-01T00:00:00Z",
            },
            "off": {"sha256": sha("sk-off"), "team": "platform", "disabled": True},
        },
        "models": {
            "gpt-4o-mini": {"aliases": ["mini"], "owned_by": "openai"},
            "gpt-4o": {"owned_by": "openai"},
            "claude-3-5-haiku": {"owned_by": "anthropic"},
        },
    }
    data.update(overrides)
    return compile_policy(Policy.model_validate(data), version="test")
