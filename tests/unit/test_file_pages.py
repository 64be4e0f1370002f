"""The tokenizer extension's file pages, given back once its tables are built."""

from __future__ import annotations

import os
from pathlib import Path

from extproc.budgets import file_pages, tokens

SMAPS = """\
7f0000000000-7f0004000000 r--p 00000000 08:01 42 /lib/ext.so
Rss:               40960 kB
Anonymous:             0 kB
Private_Dirty:         0 kB
7f0004000000-7f0004100000 r-xp 04000000 08:01 42 /lib/ext.so
Rss:                 512 kB
Anonymous:             0 kB
Private_Dirty:         0 kB
7f0004100000-7f0004110000 r--p 04100000 08:01 42 /lib/ext.so
Rss:                  64 kB
Anonymous:            64 kB
Private_Dirty:        64 kB
7f0004110000-7f0004120000 rw-p 04110000 08:01 42 /lib/ext.so
Rss:                  64 kB
Anonymous:            64 kB
7f0005000000-7f0006000000 r--p 00000000 08:01 43 /lib/other.so
Rss:                1024 kB
Anonymous:             0 kB
"""


def test_only_clean_read_only_mappings_of_the_file_are_chosen() -> None:
    """The loader's relocated part (anonymous, dirty) and writable data keep their pages:
    dropping them would lose what was written there."""
    chosen = file_pages._clean_read_only(SMAPS, "/lib/ext.so")
    assert chosen == [
        (0x7F0000000000, 0x7F0004000000, 40960 * 1024),
        (0x7F0004000000, 0x7F0004100000, 512 * 1024),
    ]


def extension_resident_bytes() -> int:
    path = os.path.realpath(tokens._bpe_bindings().__file__ or "")
    smaps = Path("/proc/self/smaps").read_text()
    resident, inside = 0, False
    for line in smaps.splitlines():
        mapping = file_pages._MAPPING.match(line)
        if mapping is not None:
            inside = mapping.group(4) == path
        elif inside and line.startswith("Rss:"):
            resident += int(line.split()[1]) * 1024
    return resident


def test_counting_works_with_the_extensions_pages_given_back() -> None:
    """Building both tables reads ~45 MB of the extension file; those pages are given back
    and counting does not read them again."""
    for tokenizer in (tokens.O200K, tokens.CL100K):
        assert tokens.count_text_tokens(tokenizer, "hello world") == 2
    text = Path(__file__).read_text() * 20
    counts = [tokens.count_text_tokens(t, text) for t in (tokens.O200K, tokens.CL100K)]
    assert all(count > 1000 for count in counts)
    assert extension_resident_bytes() < 8 * 2**20
