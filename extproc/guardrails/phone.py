"""Phone numbers from their shape: digit groups, separators, country and area codes.

Presidio's phone recognizer runs python-phonenumbers' matcher once per region (eight by
default) over the text; on the evaluation set that was 10-20x the cost of every other
recognizer together and it still missed numbers written in the many national formats
the set uses (``0490 75 40 81``, ``+46 (0)8 928 571 38``). This recognizer instead finds
digit groups with RE2 and scores them by how phone-like they are written:

- an international prefix (``+44``, ``001``) or a parenthesised area code → likely;
- two or more separated groups (``078 8098 1119``) → likely;
- one separator (``467 3395``) or a bare 10-11 digit run → only with a context word
  (phone, call, fax, mobile…) nearby.

Shapes that are something else are rejected: IPv4 addresses, US SSNs, ZIP+4 codes,
dates, year ranges, thousands-grouped amounts, and long Luhn-valid runs (card numbers).
"""

from __future__ import annotations

import re

from extproc.guardrails.recognizers import Re2Recognizer

PATTERN = (
    r"(?:\+\s?|\b00\s?)?"
    r"(?:(?:\(\d{1,5}\)[ .-]?|\b)\d{1,15}(?:[ .-]\(\d{1,5}\)\s?\d{1,15}|[ .-]\d{1,15}){1,7}"
    r"|\b\d{7,15}\b)"
    r"(?:\s?(?:x|ext\.?|#)\s?\d{1,6}\b)?"
)
"""Two or more digit groups (a parenthesised group must be followed by digits, as in
``(0)8`` or ``(579)888``), or one run of 7-15 digits; optionally an extension."""

CONTEXT = (
    "phone",
    "telephone",
    "tel",
    "mobile",
    "cell",
    "cellphone",
    "call",
    "fax",
    "contact",
    "reach",
    "number",
    "whatsapp",
    "sms",
    "text",
    "dial",
    "landline",
    "desk",
    "office",
    "messages",
)

_DIGITS = re.compile(r"\d+")
_BEFORE_BLOCKERS = "-./:,_"
_AFTER_BLOCKERS = "-./:_"


def luhn_valid(digits: str) -> bool:
    total = 0
    for i, char in enumerate(reversed(digits)):
        value = ord(char) - 48
        if i % 2:
            value *= 2
            if value > 9:
                value -= 9
        total += value
    return total % 10 == 0


def _standalone(text: str, start: int, end: int) -> bool:
    """Not part of a longer token such as an IP address, a decimal, a date or an id."""
    if start > 0:
        before = text[start - 1]
        if before.isalnum() or (
            before in _BEFORE_BLOCKERS and start > 1 and text[start - 2].isdigit()
        ):
            return False
    if end < len(text):
        after = text[end]
        if after.isalnum():
            return False
        if after in _AFTER_BLOCKERS and end + 1 < len(text) and text[end + 1].isdigit():
            return False
    return True


def _is_other_shape(groups: list[str], separators: str, digits: str, international: bool) -> bool:
    sizes = [len(g) for g in groups]
    if sizes.count(1) > 2:
        return True  # digits listed one by one are not how numbers are dialled
    seps = set(separators)
    if len(groups) == 4 and seps == {"."} and all(n <= 3 for n in sizes):
        return all(int(g) <= 255 for g in groups)  # IPv4
    if sizes == [3, 2, 4] and seps <= {"-"}:
        return True  # US SSN
    if sizes == [5, 4] and seps == {"-"}:
        return True  # ZIP+4
    if len(groups) == 3 and seps <= {"-", "/", "."} and _date(groups):
        return True
    if sizes == [4, 4] and all(g[:2] in ("18", "19", "20") for g in groups):
        return True  # a year range
    if len(groups) >= 3 and sizes[0] == 1 and all(n == 3 for n in sizes[1:]):
        return True  # 1 000 000
    if seps == {"."} and len(groups) == 2:
        return True  # a decimal number
    return not international and len(digits) >= 13 and luhn_valid(digits)


def _date(groups: list[str]) -> bool:
    a, b, c = (int(g) for g in groups)
    if len(groups[0]) == 4:
        return 1 <= b <= 12 and 1 <= c <= 31
    if len(groups[2]) in (2, 4):
        return (1 <= a <= 31 and 1 <= b <= 12) or (1 <= a <= 12 and 1 <= b <= 31)
    return False


def score_phone(value: str, text: str, start: int, end: int) -> float | None:
    """The confidence that ``value`` (at ``start:end`` of ``text``) is a phone number."""
    main = value
    lowered = value.lower()
    for marker in ("ext", "x", "#"):  # the pattern allows these only before an extension
        cut = lowered.find(marker)
        if cut > 0:
            main = value[:cut]
            break
    groups = _DIGITS.findall(main)
    digits = "".join(groups)
    if not 7 <= len(digits) <= 15 or not _standalone(text, start, end):
        return None
    stripped = main.lstrip()
    international = stripped.startswith("+") or stripped.startswith("00")
    separators = "".join(c for c in ".- " if c in main.strip())
    if _is_other_shape(groups, separators, digits, international):
        return None
    if international:
        return 0.7
    parenthesised = "(" in main and ")" in main
    if len(groups) >= 3 or parenthesised:
        return 0.6
    if len(groups) == 2:
        return 0.45
    return 0.3 if 10 <= len(digits) <= 11 else 0.1


PHONE_RECOGNIZER = Re2Recognizer("PHONE_NUMBER", PATTERN, 0.5, CONTEXT, validator=score_phone)
