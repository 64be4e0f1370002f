"""Giving back the pages of an extension file that only its loading read.

bpe-openai's Rust extension carries its rank tables inside the file (~70 MB of read-only
data) and builds its encoders from them once; after that nothing reads those bytes
(measured: counting tokens faults none of them back). Yet the pages that loading touched
stay mapped, ~45 MB for both OpenAI encodings, counted in the process's RSS and PSS. They
are clean pages of a read-only file mapping, so unmapping them (``madvise(MADV_DONTNEED)``)
is safe: anything that reads them again gets them back from the file. The page cache
still holds them (reclaimable, and charged to the container's memory until reclaimed), so
the file is then also advised out of the cache (``posix_fadvise(POSIX_FADV_DONTNEED)``),
which evicts only pages no process maps.

Only mappings that are neither writable nor executable, and whose resident pages are all
the file's own (none anonymous, none swapped), are touched: a page the dynamic loader
relocated (anonymous, or swapped out since) would lose that write, and code pages are not
worth the reasoning. A page the smaps calls dirty but not anonymous is the page cache's,
not this process's: a file written a moment ago (pip installing the extension, then the
service starting) has its pages dirty until the kernel writes them back, and skipping
those left the tables' 45 MB mapped.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Final

log = logging.getLogger(__name__)

MADV_DONTNEED: Final = 4
_SMAPS: Final = Path("/proc/self/smaps")
_MAPPING = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S{4}) \S+ \S+ \S+\s*(.*)$")
_NOT_THE_FILES: Final = ("Anonymous", "Swap", "SwapPss")
"""Pages of a mapping that are this process's own, not the file's."""

Region = tuple[int, int, int]
"""Start address, end address, resident bytes."""


def release(path: str) -> int:
    """Give back the resident clean pages of ``path``'s read-only data mappings; the bytes
    unmapped (0 where the system offers no ``/proc/self/smaps`` or ``madvise``)."""
    try:
        mappings = _clean_read_only(_SMAPS.read_text(), path)
    except OSError:
        return 0
    madvise = _madvise() if mappings else None
    if madvise is None:
        return 0
    released = 0
    for start, end, resident in mappings:
        if madvise(start, end - start, MADV_DONTNEED) == 0:
            released += resident
        else:
            log.debug("madvise failed for %s at %#x (errno %d)", path, start, ctypes.get_errno())
    if released:
        _evict_from_cache(path)
    return released


def _clean_read_only(smaps: str, path: str) -> list[Region]:
    """The mappings of ``path`` that are read-only data and hold only the file's pages."""
    found: list[Region] = []
    fields: dict[str, int] | None = None
    bounds = (0, 0)
    for line in [*smaps.splitlines(), "0-0 ---p 0 0 0 0"]:  # a last header closes the last
        mapping = _MAPPING.match(line)
        if mapping is not None:
            if fields is not None and (clean := _clean(bounds, fields)) is not None:
                found.append(clean)
            start, end, perms, name = mapping.groups()
            fields = {} if name == path and perms.startswith("r--") else None
            bounds = (int(start, 16), int(end, 16))
        elif fields is not None and ":" in line:
            field, _, value = line.partition(":")
            parts = value.split()
            if parts and parts[0].isdigit():
                fields[field] = int(parts[0]) * 1024
    return found


def _clean(bounds: tuple[int, int], fields: dict[str, int]) -> Region | None:
    resident = fields.get("Rss", 0)
    if not resident or any(fields.get(f, 0) for f in _NOT_THE_FILES):
        return None
    return (bounds[0], bounds[1], resident)


def _evict_from_cache(path: str) -> None:
    advise = getattr(os, "posix_fadvise", None)
    if advise is None:
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        advise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except OSError:
        pass
    finally:
        os.close(fd)


def _madvise() -> Callable[[int, int, int], int] | None:
    """libc's ``madvise``, from the symbols the process already has loaded."""
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise
