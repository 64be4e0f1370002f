"""Minting gateway keys: the key is shown once; only its SHA-256 goes into the policy."""

from __future__ import annotations

import hashlib
import secrets

import yaml

KEY_PREFIX = "sk-gw-"


def new_key() -> str:
    """A random key with 256 bits of entropy and a recognisable prefix (secret scanners)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def policy_entry(key: str, key_id: str, team: str, user: str | None) -> str:
    """The YAML to paste under the policy's ``keys:`` (indented for it, without the
    ``keys:`` line itself: a second ``keys:`` section is an error)."""
    entry: dict[str, str] = {"sha256": hashlib.sha256(key.encode()).hexdigest(), "team": team}
    if user:
        entry["user"] = user
    text = yaml.safe_dump({key_id: entry}, sort_keys=False)
    return "".join(f"  {line}" for line in text.splitlines(keepends=True))
