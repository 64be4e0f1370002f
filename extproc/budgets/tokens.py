"""Prompt-token counts, computed before the call so a budget can be reserved.

Tokenizers (the catalogue names one per model; :func:`default_tokenizer` guesses for
models that do not):

``o200k`` / ``cl100k``
    Exact byte-pair encoding of OpenAI's ``o200k_base`` / ``cl100k_base``, computed by the
    Rust core of the ``bpe-openai`` package. Its ranks ship inside the wheel, so counting
    works fully offline, and its token ids match tiktoken's. Loading both tables takes
    ~0.1 s and ~50 MB of memory, so :func:`warm_up` does that at startup; otherwise the
    first request pays for it. Building them reads ~45 MB of the extension file, which
    would stay mapped (and counted in RSS) unless given back:
    :mod:`extproc.budgets.file_pages` does that after each table is built. Counting
    costs ~45-80 µs per KB of text on one core (measured: English 60, Python code 65-80,
    CJK 44-54, German 50) and is linear in the input; it holds the GIL, so a 1 MB prompt
    blocks the event loop for ~60 ms (bound bodies with the 413 limit, or count big
    bodies in a thread).
``estimate``
    ``ceil(utf8_bytes / 4)`` per text, for model families whose tokenizer we do not ship
    (Anthropic, Gemini, open models). It costs ~0.1 µs per KB for ASCII and ~1 µs per KB
    otherwise. Its bias, measured against o200k: English prose and code run ~4.5 bytes per
    token, so the estimate over-counts them by ~12 %; German by ~16 %; CJK runs ~3.9 bytes
    per token, so it under-counts by ~3 % (and by ~30 % against cl100k). There is no
    offline Claude or Gemini tokenizer to measure it against, so treat it as a rough
    figure (expect tens of percent either way) for those families. The reservation is
    replaced by the provider's reported usage after the call, so the bias only shifts
    when a request is admitted, never what is finally charged.

Chat requests add OpenAI's documented framing: ``CHAT_TOKENS_PER_MESSAGE`` per message
and ``CHAT_REPLY_PRIMING`` for the assistant turn the model starts. Against recorded
OpenAI usage (tests/unit/test_budget_tokens.py) this is exact for plain-text chat with one
message (any role, also with ``response_format: json_object``), for legacy completions
(prompt plus suffix; token-id prompts count their ids) and for embeddings. Tools, JSON
schemas, images, audio and multi-turn history with developer and assistant turns add
tokens from the provider's template that the formula does not see: those are
under-counted (by 5 tokens for a 4-turn chat, ~147 for one function tool, ~2,200 for an
image), and search models over-count slightly.
"""

from __future__ import annotations

import functools
import importlib.machinery
import importlib.util
import logging
import math
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Final, Protocol, cast

from extproc.budgets import file_pages

log = logging.getLogger(__name__)

O200K: Final = "o200k"
CL100K: Final = "cl100k"
ESTIMATE: Final = "estimate"
TOKENIZERS: Final = frozenset({O200K, CL100K, ESTIMATE})
"""Every tokenizer name the catalogue may use."""

CHAT_TOKENS_PER_MESSAGE: Final = 3
"""Framing tokens around each chat message (start, role, separator)."""
CHAT_REPLY_PRIMING: Final = 3
"""Tokens that open the assistant's reply (``<|start|>assistant<|message|>``)."""
ESTIMATE_BYTES_PER_TOKEN: Final = 4

_ENCODINGS: Final = {O200K: "o200k_base", CL100K: "cl100k_base"}
"""The largest table first: :func:`warm_up` builds them in this order."""
_BPE_PACKAGE: Final = "bpe_openai"
_BPE_EXTENSION: Final = "_bindings"

# First match wins, so a more specific prefix comes before a shorter one (gpt-4o, gpt-4).
_MODEL_PREFIXES: Final = (
    ("gpt-5", O200K),
    ("gpt-4.1", O200K),
    ("gpt-4.5", O200K),
    ("gpt-4o", O200K),
    ("chatgpt-4o", O200K),
    ("gpt-oss", O200K),
    ("o1", O200K),
    ("o3", O200K),
    ("o4", O200K),
    ("codex-", O200K),
    ("gpt-4", CL100K),
    ("gpt-3.5", CL100K),
    ("text-embedding-3", CL100K),
    ("text-embedding-ada-002", CL100K),
    ("babbage-002", CL100K),
    ("davinci-002", CL100K),
)


class _BpeCounter(Protocol):
    def count(self, text: str) -> int: ...


_loaded: dict[str, _BpeCounter] = {}


def _bpe(tokenizer: str) -> _BpeCounter:
    """The BPE counter for ``tokenizer``, loaded on first use and kept for the process.

    The package's public ``Encoding`` only offers ``encode`` (a list of ids per call); its
    Rust binding counts without building that list and is ~10 % faster, so we use it
    directly. Its interface is declared in the wheel's ``_bindings.pyi``.
    """
    counter = _loaded.get(tokenizer)
    if counter is None:
        bindings = _bpe_bindings()
        counter = cast(_BpeCounter, bindings.tokenizer_for_encoding(_ENCODINGS[tokenizer]))
        _loaded[tokenizer] = counter
        if bindings.__file__:
            # The table is built: the file pages it was read from are not needed again.
            released = file_pages.release(os.path.realpath(bindings.__file__))
            log.debug("%s loaded; %d bytes of the extension's pages released", tokenizer, released)
    return counter


@functools.cache
def _bpe_bindings() -> ModuleType:
    """bpe-openai's Rust extension, loaded without running its package's ``__init__``.

    That ``__init__`` builds a tiktoken-compatible registry of every encoding the wheel
    ships by decoding all three rank files into Python dicts: ~1 s and ~60 MB at start-up
    (measured), for tables we never read, since the extension holds its own. So the
    extension file is loaded by itself and registered under its usual name (a later
    ``import bpe_openai`` reuses it: a PyO3 module can be initialised only once per
    process). If the wheel's layout ever changes, the plain import still works.
    """
    name = f"{_BPE_PACKAGE}.{_BPE_EXTENSION}"
    if name in sys.modules:
        return sys.modules[name]
    package = importlib.util.find_spec(_BPE_PACKAGE)
    for folder in (package.submodule_search_locations or []) if package else []:
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            path = Path(folder) / f"{_BPE_EXTENSION}{suffix}"
            if path.is_file():
                loader = importlib.machinery.ExtensionFileLoader(name, str(path))
                spec = importlib.util.spec_from_loader(name, loader)
                assert spec is not None
                module = importlib.util.module_from_spec(spec)
                loader.exec_module(module)
                sys.modules[name] = module
                return module
    return importlib.import_module(name)


def warm_up(tokenizers: Iterable[str] = (O200K, CL100K)) -> None:
    """Load the BPE tables now (at startup) rather than on the first request.

    The largest first, whatever order they come in: building one reads its extension
    pages (o200k ~33 MB), given back once it is built, so o200k built while cl100k's table
    is already held would put both on the process's peak (measured: 147 against 131 MB).
    """
    wanted = set(tokenizers)
    for tokenizer in wanted:
        _check(tokenizer)
    for tokenizer in _ENCODINGS:
        if tokenizer in wanted:
            _bpe(tokenizer).count("warm up")


def count_text_tokens(tokenizer: str, text: str) -> int:
    """Tokens in one text; special-token markers like ``<|endoftext|>`` count as plain text."""
    if not text:
        return 0
    if tokenizer == ESTIMATE:
        return _estimate(text)
    if tokenizer not in _ENCODINGS:
        _check(tokenizer)
    try:
        return _bpe(tokenizer).count(text)
    except UnicodeEncodeError:
        # Lone surrogates (legal in JSON escapes) cannot be UTF-8 encoded; the provider
        # sees U+FFFD in their place, so count that.
        return _bpe(tokenizer).count(_replace_surrogates(text))


def count_prompt_tokens(tokenizer: str, texts: Sequence[str], messages: int) -> int:
    """Prompt tokens of a request carrying ``texts``.

    ``messages`` is the number of chat messages (0 for completions, embeddings and other
    non-chat inputs, which have no framing). A prompt given as token ids counts as the
    number of ids and is not passed here.
    """
    if messages < 0:
        raise ValueError(f"messages must be >= 0, got {messages}")
    total = sum(count_text_tokens(tokenizer, text) for text in texts)
    if messages:
        total += CHAT_TOKENS_PER_MESSAGE * messages + CHAT_REPLY_PRIMING
    return total


def default_tokenizer(model: str) -> str:
    """The tokenizer of a well-known OpenAI model name, or ``estimate`` for anything else."""
    name = model.lower()
    for prefix, tokenizer in _MODEL_PREFIXES:
        if name.startswith(prefix):
            return tokenizer
    return ESTIMATE


def _estimate(text: str) -> int:
    # str.isascii() is O(1) in CPython, so ASCII text never gets encoded.
    size = len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))
    return math.ceil(size / ESTIMATE_BYTES_PER_TOKEN)


def _replace_surrogates(text: str) -> str:
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _check(tokenizer: str) -> None:
    if tokenizer not in TOKENIZERS:
        raise ValueError(f"unknown tokenizer {tokenizer!r}; expected one of {sorted(TOKENIZERS)}")
