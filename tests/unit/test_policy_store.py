"""The live policy store against edits that land while it reads: at start-up, and between
the watcher seeing a file hold still and the read."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from extproc.policy import store as policy_store
from extproc.policy.compiled import CompiledPolicy
from extproc.policy.store import PolicyStore
from tests.unit.test_policy import BASE, EXAMPLE, SteppedWatch

PASSTHROUGH = ("unknown_paths: reject", "unknown_paths: passthrough")


def _edit_during_load(monkeypatch: pytest.MonkeyPatch, edit: Callable[[], None]) -> list[Path]:
    """Make ``edit`` land once, just after the first load has read the files (the window
    in which the start-up once took its stat); the paths every load read."""
    real = policy_store.load_policy
    loads: list[Path] = []

    def load(path: Path, **options: Any) -> CompiledPolicy:
        policy = real(path, **options)
        if not loads:
            edit()
        loads.append(path)
        return policy

    monkeypatch.setattr(policy_store, "load_policy", load)
    return loads


def _keyed_policy(tmp_path: Path, key: str) -> tuple[Path, Path]:
    """A policy whose gpt-4o reads its provider key from a file; both paths."""
    key_file = tmp_path / "openai.key"
    key_file.write_text(key)
    path = tmp_path / "policy.yaml"
    path.write_text(
        BASE.replace(
            "  gpt-4o: {aliases: [four]}",
            f"  gpt-4o: {{aliases: [four], backend: {{cluster: openai, credential_file: {key_file}}}}}",
        )
    )
    return path, key_file


def _credential(store: PolicyStore) -> tuple[str, str] | None:
    backend = store.current.models["gpt-4o"].backend
    assert backend is not None
    return backend.credential


def test_a_policy_edit_made_while_the_service_starts_goes_live_at_the_first_poll(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "policy.yaml"
    text = EXAMPLE.read_text()
    path.write_text(text)
    _edit_during_load(monkeypatch, lambda: path.write_text(text.replace(*PASSTHROUGH, 1)))
    store = PolicyStore(path)
    assert store.current.unknown_paths == "reject"  # what was read
    assert store.reload_if_changed()
    assert store.current.unknown_paths == "passthrough" and store.reloads_ok == 1


def test_a_key_rotated_while_the_service_starts_goes_live_at_the_first_poll(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, key_file = _keyed_policy(tmp_path, "sk-old")

    def rotate() -> None:
        new = key_file.with_name("openai.key.tmp")
        new.write_text("sk-new")
        os.replace(new, key_file)

    _edit_during_load(monkeypatch, rotate)
    store = PolicyStore(path)
    assert _credential(store) == ("authorization", "Bearer sk-old")
    assert store.reload_if_changed()
    assert _credential(store) == ("authorization", "Bearer sk-new")


def test_files_unchanged_since_the_start_are_not_read_again_at_the_first_poll(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The key files are stat'ed before they are read, so a start that saw no change
    costs no second compile."""
    path, _ = _keyed_policy(tmp_path, "sk-old")
    loads = _edit_during_load(monkeypatch, lambda: None)
    store = PolicyStore(path)
    assert not store.reload_if_changed()
    assert len(loads) == 1 and store.reloads_ok == 0 and store.reloads_failed == 0


async def test_a_file_that_changes_again_after_holding_still_is_not_read_then(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The watcher saw the edit hold still for a poll; before its read began, the writer
    started over (truncated, then a valid prefix without any model). That prefix is not
    read: the file settles again first."""
    path = tmp_path / "policy.yaml"
    text = EXAMPLE.read_text()
    path.write_text(text)
    first = text.replace(*PASSTHROUGH, 1)
    second = first.replace("version: 1\n", "version: 1\n# edited again\n", 1)
    assert second != first
    prefix = second[: second.index("\nmodels:")] + "\n"

    async def writer_starts_over(work: Any, *args: Any) -> Any:
        path.write_text(prefix)
        return work(*args)

    async def inline(work: Any, *args: Any) -> Any:
        return work(*args)

    async with SteppedWatch(PolicyStore(path), monkeypatch) as watch:
        path.write_text(first)
        await watch.poll()  # changed: settling
        monkeypatch.setattr(policy_store.asyncio, "to_thread", writer_starts_over)
        await watch.poll()  # held still, so read: but it has changed again meanwhile
        assert watch.loaded == []
        monkeypatch.setattr(policy_store.asyncio, "to_thread", inline)
        path.write_text(second)  # the writer done
        await watch.poll()
        await watch.poll()
    [live] = watch.loaded
    assert "gpt-4o" in live.models and live.unknown_paths == "passthrough"
