"""The live policy: one snapshot at a time, swapped atomically when the file changes.

Each exchange pins the snapshot current when it starts, so a reload never changes the
rules halfway through a request. A file that fails validation is logged with its
problems and the last good snapshot stays live. The key files (``credential_file``) the
live policy names are watched beside the policy file, so a rotated provider key goes live
at the next poll without the policy being touched; one that cannot be read is refused
like an invalid policy. So are those a refused policy names: when the policy (a
ConfigMap) names a key file that is not there yet (the Secret volume syncs later), it is
read again when that file appears.

Every file is stat'ed before it is read, at start-up too: an edit landing while a file is
read is then seen as a change at the next poll, never taken for what was read.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from pathlib import Path

from extproc.budgets import tokens
from extproc.policy.compiled import CompiledPolicy, credential_files
from extproc.policy.loader import PolicyError, load_policy
from extproc.policy.schema import Policy

log = logging.getLogger(__name__)

MAX_MOVING_POLLS = 5
"""Polls a changing policy file is waited on before it is read all the same."""

_Stat = tuple[int, int, int] | None
"""Inode, mtime in ns and size of a file; ``None`` when it cannot be stat'ed."""
_Signature = tuple[tuple[Path, _Stat], ...]
_UNSEEN: _Signature = ()
"""A signature no files have: the next poll reads them again."""


class PolicyStore:
    def __init__(self, path: Path) -> None:
        self._path = path
        before = [(path, _stat(path))]

        def stat_key_files(policy: Policy) -> None:
            before.extend((p, _stat(p)) for p in credential_files(policy))

        self._current = load_policy(path, before_compiling=stat_key_files)
        self._rejected: PolicyError | None = None
        """The refusal of what the policy file holds now, if it was refused."""
        after = self._stat_signature()
        # Stat'ed after reading, an edit made meanwhile (a ConfigMap or Secret swapped as
        # the pod starts) would pass for what was read, and never go live.
        self._signature = after if after == tuple(before) else _UNSEEN
        self.reloads_ok = 0
        self.reloads_failed = 0

    @property
    def current(self) -> CompiledPolicy:
        return self._current

    @property
    def path(self) -> Path:
        return self._path

    def reload_if_changed(self, settled: _Signature | None = None) -> bool:
        """Load the file again if it, or a ``credential_file`` the live policy or the
        refused one names, changed on disk; return whether a new policy went live.
        ``settled``: the files as the watcher saw them hold still; changed again since
        (a writer starting over, truncating first), they are not read now.

        The signature includes the inode so a Kubernetes ConfigMap or Secret update (a
        symlink swap with an unchanged mtime resolution) is noticed too. A policy that
        names other key files is read once more at the next poll, against theirs (stat'ed
        before they are read, so none changing meanwhile is missed); the same refusal
        found again while the policy file is unchanged is not logged again.
        """
        signature = self._stat_signature()
        if signature == self._signature or (settled is not None and signature != settled):
            return False
        try:
            policy = load_policy(self._path)
        except PolicyError as exc:
            if self._stat_signature() != signature:
                return False  # still being written: read again at the next poll
            known = (
                self._rejected is not None
                and self._rejected.problems == exc.problems
                and signature[:1] == self._signature[:1]  # the policy file's own stat
            )
            self._signature, self._rejected = signature, exc
            if known:
                return False  # only key files moved, and it is refused as before: logged
            self.reloads_failed += 1
            log.error(
                "policy reload rejected; keeping version %s: %s",
                self._current.version,
                "; ".join(exc.problems),
            )
            return False
        if self._stat_signature() != signature:
            return False  # changed while read (a write not yet done): read it again next poll
        self._signature, self._rejected = signature, None
        if policy.version == self._current.version and not _credentials_changed(
            policy, self._current
        ):
            return False
        # The tables the new policy counts with, built here (a worker thread under watch):
        # built by the first metered request instead, they stalled its event loop.
        tokens.warm_up(policy.counted_tokenizers)
        self._current = policy
        self.reloads_ok += 1
        log.info("policy reloaded: version %s from %s", policy.version, self._path)
        return True

    async def watch(
        self, interval: float, on_change: Callable[[CompiledPolicy], None] | None = None
    ) -> None:
        """Poll the files forever; polling survives editors, symlink swaps and NFS alike.
        A changed file is read once it has not changed for a poll, and compiled in a
        worker thread (tens of milliseconds for
        a real policy, which would stall every stream on the event loop); the new
        snapshot replaces the old in one assignment."""
        settling: _Signature | None = None
        moving = 0
        while True:
            await asyncio.sleep(interval)
            signature = self._stat_signature()
            if signature == self._signature:
                moving = 0
                continue
            if signature != settling and moving < MAX_MOVING_POLLS:
                # Changed since the last poll: a writer pausing between writes (a large
                # cp, scp, kubectl cp) could leave a prefix that is valid YAML, with half
                # the catalogue or rules. Read once it has held still for a poll, or after
                # a few polls anyway (a job rewriting it every poll must not starve it).
                settling = signature
                moving += 1
                continue
            moving = 0
            held_still = signature if signature == settling else None
            try:
                reloaded = await asyncio.to_thread(self.reload_if_changed, held_still)
            except Exception:
                # Never the end of watching: later edits must still go live.
                self.reloads_failed += 1
                self._signature = signature
                log.exception("policy reload failed; keeping version %s", self._current.version)
                continue
            if reloaded and on_change is not None:
                on_change(self._current)

    def _stat_signature(self) -> _Signature:
        """The policy file's and the live and refused policies' key files' stats: a few
        stats a poll."""
        files = self._current.credential_files
        if self._rejected is not None:
            files = tuple(dict.fromkeys((*files, *self._rejected.credential_files)))
        return tuple((p, _stat(p)) for p in (self._path, *files))


def _stat(path: Path) -> _Stat:
    try:
        st = os.stat(path)  # follows symlinks: a swapped ..data target is a new inode
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def _credentials_changed(new: CompiledPolicy, old: CompiledPolicy) -> bool:
    """Whether a provider key read from outside the policy file changed (a rotated
    ``credential_file``): it goes live though the policy's bytes, and version, did not."""
    return [m.backend and m.backend.credential for m in new.catalogue] != [
        m.backend and m.backend.credential for m in old.catalogue
    ]
