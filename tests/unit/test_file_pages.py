"""The tokenizer extension's file pages, given back once its tables are built."""

from __future__ import annotations

import mmap
import os
import sys
from pathlib import Path

import pytest

from extproc.budgets import file_pages, tokens


def mapping(start: int, perms: str, path: str, **fields: int) -> str:
    header = f"{start:x}-{start + 0x100000:x} {perms} 00000000 08:01 42 {path}".rstrip()
    return "\n".join([header, *(f"{name}: {kb:>8} kB" for name, kb in fields.items())])


CLEAN = {"Rss": 1024, "Private_Clean": 1024, "Anonymous": 0, "Swap": 0}
SMAPS = "\n".join(
    [
        mapping(0x1000000, "r--p", "/lib/ext.so", **CLEAN),
        mapping(0x2000000, "r-xp", "/lib/ext.so", **CLEAN),  # code: left alone
        # The part the loader relocated: written, so anonymous...
        mapping(0x3000000, "r--p", "/lib/ext.so", Rss=64, Private_Dirty=64, Anonymous=64),
        # ... or, once swapped out, still not the file's bytes.
        mapping(0x4000000, "r--p", "/lib/ext.so", Rss=1024, Private_Clean=1024, Swap=64),
        # Dirty in the page cache (written a moment ago, not yet written back): the file's.
        mapping(0x5000000, "r--s", "/lib/ext.so", Rss=64, Shared_Clean=32, Shared_Dirty=32),
        mapping(0xB000000, "r--p", "/lib/ext.so", Rss=128, Private_Dirty=128, Anonymous=0),
        mapping(0x6000000, "rw-p", "/lib/ext.so", Rss=64, Private_Dirty=64),
        mapping(0x7000000, "r--p", "/lib/other ext.so", **CLEAN),
        mapping(0x8000000, "r--p", "/lib/ext.so (deleted)", **CLEAN),
        mapping(0x9000000, "r--p", "", **CLEAN),
        mapping(0xA000000, "r--p", "/lib/ext.so", Rss=2048, Shared_Clean=2048),  # the last
    ]
)


def test_only_the_files_own_read_only_data_is_chosen() -> None:
    """Dropping a written (anonymous) or swapped page would lose what was written there;
    a page dirty in the page cache is the file's, and stays there."""
    chosen = file_pages._clean_read_only(SMAPS, "/lib/ext.so")
    assert chosen == [
        (0x1000000, 0x1100000, 1024 * 1024),
        (0x5000000, 0x5100000, 64 * 1024),
        (0xB000000, 0xB100000, 128 * 1024),
        (0xA000000, 0xA100000, 2048 * 1024),
    ]
    assert file_pages._clean_read_only(SMAPS, "/lib/other ext.so") == [
        (0x7000000, 0x7100000, 1024 * 1024)
    ]


def extension_resident_bytes() -> int:
    path = os.path.realpath(tokens._bpe_bindings().__file__ or "")
    resident, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        header = file_pages._MAPPING.match(line)
        if header is not None:
            inside = header.group(4) == path
        elif inside and line.startswith("Rss:"):
            resident += int(line.split()[1]) * 1024
    return resident


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")
def test_counting_works_with_the_extensions_pages_given_back() -> None:
    """Building both tables reads ~45 MB of the extension file; those pages are given back
    and counting does not read them again. (The extension builds each table once per
    process, whoever asks first: so this holds whatever tests ran before.)"""
    for tokenizer in (tokens.O200K, tokens.CL100K):
        assert tokens.count_text_tokens(tokenizer, "hello world") == 2
    text = Path(__file__).read_text() * 20
    counts = [tokens.count_text_tokens(t, text) for t in (tokens.O200K, tokens.CL100K)]
    assert all(count > 1000 for count in counts)
    assert extension_resident_bytes() < 8 * 2**20


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")
def test_a_file_written_a_moment_ago_is_given_back_too(tmp_path: Path) -> None:
    """Just installed (pip, then the service or the tests at once), the extension's pages
    are dirty in the page cache until written back: they were skipped, and its 45 MB
    stayed mapped (the counting test failed now and then on a fresh clone)."""
    path = tmp_path / "fresh.bin"
    path.write_bytes(os.urandom(4 * 2**20))
    with path.open("rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
        assert sum(data[i] for i in range(0, len(data), 4096)) >= 0  # fault every page in
        assert file_pages.release(str(path)) >= 2**20
        assert sum(data[i] for i in range(0, len(data), 4096)) >= 0  # read back from the file
