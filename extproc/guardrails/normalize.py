"""Unicode normalisation for matching: what a text says, not how it is spelled.

Attackers and careless writers spell the same word many ways: full-width or
mathematical letters, look-alike letters from other scripts (Cyrillic or Greek ``o``),
accents, zero-width and other invisible characters inside
words. :func:`fold` maps all of these onto plain lower-case letters: compatibility
decomposition (NFKD), combining marks dropped, case folding, a table of confusable
letters, invisible characters removed. :func:`fold_with_offsets` does the same while
remembering where each folded character came from, so a match in the folded text can be
rewritten in the original.
"""

from __future__ import annotations

import functools
import re
import unicodedata

from extproc.guardrails.linear import Regex, Utf8, compile_re2

_CONFUSABLE_SOURCE = (  # noqa: SIM905 (as a list literal it would be 72 lines)
    "\u0430a \u0432b \u0435e \u0451e \u043ak \u043cm \u043dh \u043eo \u0440p \u0441c "
    "\u0442t \u0443y \u0445x \u0455s \u0456i \u0457i \u0458j \u0501d \u051bq \u051dw "
    "\u04bbh \u04cfl \u0261g \u04afy \u03b1a \u03b2b \u03b5e \u03b7n \u03b9i \u03bak "
    "\u03bcu \u03bdv \u03bfo \u03c1p \u03c4t \u03c5u \u03c7x \u03c9w \u03f2c \u03f3j "
    "\u0131i \u0237j \u0142l \u00f8o \u0111d \u0127h \u0140l \u017fs \u0251a \u0269i "
    "\u026ai \u0280r \u028fy \u1d00a \u1d04c \u1d05d \u1d07e \u1d0aj \u1d0bk \u1d0dm "
    "\u1d0fo \u1d18p \u1d1bt \u1d1cu \u1d20v \u1d21w \u1d22z \u0274n \u029fl \u029ch "
    "\u0262g \ua731s "
).split()
"""Pairs of (look-alike, Latin letter): Cyrillic, Greek, IPA and small capitals."""
_CONFUSABLE_PAIRS = {pair[0]: pair[1] for pair in _CONFUSABLE_SOURCE}
"""Lower-case letters of other scripts that render like Latin ones (applied after
case folding, so upper-case forms are covered too)."""

_FILLERS = (0x115F, 0x1160, 0x3164, 0xFFA0, 0x2800, 0x034F, 0x061C)
"""Blank-looking letters and marks that Unicode does not class as format characters."""
_FORMAT_RANGES = (range(0x0080, 0x10000), range(0xE0000, 0xE1000))
_MARK_BLOCKS = (
    range(0x0300, 0x0370),  # combining diacritical marks: accents after NFKD, "Zalgo" text
    range(0x1AB0, 0x1B00),
    range(0x1DC0, 0x1E00),
    range(0x20D0, 0x2100),
    range(0xFE00, 0xFE10),  # variation selectors
    range(0xFE20, 0xFE30),
    range(0xE0100, 0xE01F0),
)
"""Script-independent marks; the vowel signs of Indic or Arabic scripts are kept."""
_WHITESPACE = re.compile(r"\s+")


@functools.cache
def _invisible() -> tuple[Regex, re.Pattern[str]]:
    """Every invisible code point: format characters (zero-width space and joiners, bidi
    controls, soft hyphen, tag characters), generic combining marks (so accents fold
    away after decomposition) and blank fillers, as one RE2 class (to look) and one ``re`` class
    (to delete). Built once (~20 ms); a single character class cannot backtrack."""
    points = set(_FILLERS)
    for block in _FORMAT_RANGES:
        points.update(p for p in block if unicodedata.category(chr(p)) == "Cf")
    for block in _MARK_BLOCKS:
        points.update(block)
    ordered = sorted(points)
    spans: list[tuple[int, int]] = []
    for point in ordered:
        if spans and point == spans[-1][1] + 1:
            spans[-1] = (spans[-1][0], point)
        else:
            spans.append((point, point))
    re2_class = "".join(f"\\x{{{a:x}}}-\\x{{{b:x}}}" for a, b in spans)
    py_class = "".join(f"\\U{a:08x}-\\U{b:08x}" for a, b in spans)
    return compile_re2(f"[{re2_class}]"), re.compile(f"[{py_class}]+")


_CONFUSABLE_RE = re.compile("[" + "".join(_CONFUSABLE_PAIRS) + "]")


def fold(text: str) -> str:
    """``text`` folded for matching (see the module docstring); whitespace kept.

    Each step runs only when the text needs it, so folding costs little more than one
    scan for the non-ASCII text that has nothing to fold.
    """
    if text.isascii():
        return text.lower()
    decomposed = unicodedata.normalize("NFKD", text)
    look, delete = _invisible()
    if look.search(Utf8(decomposed)):
        decomposed = delete.sub("", decomposed)
    folded = decomposed.casefold()
    if _CONFUSABLE_RE.search(folded):
        folded = _CONFUSABLE_RE.sub(_confusable, folded)
    return folded


def _confusable(match: re.Match[str]) -> str:
    return _CONFUSABLE_PAIRS[match.group()]


def fold_with_offsets(text: str) -> tuple[str, list[int] | None]:
    """Folded text and, for each folded character, the index of its source character.

    ``None`` stands for the identity map (ASCII text folds character by character).
    The map has one extra entry, ``len(text)``, so an end offset maps too.
    """
    if text.isascii():
        return text.lower(), None
    pieces: list[str] = []
    origin: list[int] = []
    for index, char in enumerate(text):
        folded = char.lower() if char.isascii() else fold(char)
        pieces.append(folded)
        origin.extend([index] * len(folded))
    origin.append(len(text))
    return "".join(pieces), origin


def collapse_whitespace(text: str) -> str:
    return _WHITESPACE.sub(" ", text).strip()
