"""Giving back the pages of an extension file that only its loading read.

bpe-openai's Rust extension carries its rank tables inside the file (~70 MB, read-only
data) and builds its encoders from them once; after that nothing reads those bytes
(measured: counting tokens faults none of them back). Yet the pages that loading touched
stay resident, ~45 MB for both OpenAI encodings, counted in the process's RSS and in its
container's memory. They are clean pages of a read-only file mapping, so dropping them
(``madvise(MADV_DONTNEED)``) is safe: anything that reads them again gets them back from
the file. A mapping holding any anonymous or dirty page (the part the dynamic loader
relocated) is left alone, since dropping it would lose those writes.
"""

from __future__ import annotations

import ctypes
import logging
import re
from pathlib import Path
from typing import Final

log = logging.getLogger(__name__)

MADV_DONTNEED: Final = 4
_SMAPS: Final = Path("/proc/self/smaps")
_MAPPING = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S{4}) \S+ \S+ \S+\s*(.*)$")


def release(path: str) -> int:
    """Drop the resident clean pages of ``path``'s read-only mappings; the bytes dropped
    (0 where the system offers no ``/proc/self/smaps`` or ``madvise``)."""
    try:
        mappings = _clean_read_only(_SMAPS.read_text(), path)
    except OSError:
        return 0
    if not mappings:
        return 0
    madvise = _madvise()
    if madvise is None:
        return 0
    released = 0
    for start, end, resident in mappings:
        if madvise(start, end - start, MADV_DONTNEED) == 0:
            released += resident
        else:
            log.debug("madvise failed for %s at %#x (errno %d)", path, start, ctypes.get_errno())
    return released


def _clean_read_only(smaps: str, path: str) -> list[tuple[int, int, int]]:
    """``(start, end, resident bytes)`` of each mapping of ``path`` that is not writable
    and holds no anonymous or dirty page."""
    found: list[tuple[int, int, int]] = []
    current: dict[str, int] | None = None
    bounds = (0, 0)
    for line in smaps.splitlines():
        mapping = _MAPPING.match(line)
        if mapping is not None:
            if current is not None:
                found += _if_clean(bounds, current)
            start, end, perms, name = mapping.groups()
            matches = name == path and "w" not in perms
            current = {} if matches else None
            bounds = (int(start, 16), int(end, 16))
        elif current is not None and ":" in line:
            field, _, value = line.partition(":")
            parts = value.split()
            if parts and parts[0].isdigit():
                current[field] = int(parts[0]) * 1024
    if current is not None:
        found += _if_clean(bounds, current)
    return found


def _if_clean(bounds: tuple[int, int], fields: dict[str, int]) -> list[tuple[int, int, int]]:
    dirty = fields.get("Anonymous", 0) + fields.get("Private_Dirty", 0)
    dirty += fields.get("Shared_Dirty", 0)
    if dirty or not fields.get("Rss", 0):
        return []
    return [(bounds[0], bounds[1], fields["Rss"])]


def _madvise() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    """libc's ``madvise``, from the symbols the process already has loaded."""
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise
