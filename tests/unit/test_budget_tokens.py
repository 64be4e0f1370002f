"""Prompt-token counting: exact against tiktoken's ids and OpenAI's recorded usage."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from extproc.budgets import tokens
from extproc.budgets.tokens import (
    CL100K,
    ESTIMATE,
    O200K,
    count_prompt_tokens,
    count_text_tokens,
    default_tokenizer,
)
from tests.unit.policies import make_policy, sha

CASSETTES = Path(
    os.environ.get(
        "EXTPROC_MOCK_CASSETTES",
        Path(__file__).resolve().parents[3] / "shared" / "data" / "cassettes" / "openai",
    )
)


@pytest.mark.parametrize(
    ("text", "o200k_ids", "cl100k_ids"),
    [
        pytest.param("hello world", [24912, 2375], [15339, 1917], id="hello-world"),
        pytest.param("Hello, world!", [13225, 11, 2375, 0], [9906, 11, 1917, 0], id="punct"),
        pytest.param(
            "tiktoken is great!",
            [83, 8251, 2488, 382, 2212, 0],
            [83, 1609, 5963, 374, 2294, 0],
            id="cookbook",
        ),
        pytest.param(
            "<|endoftext|>",
            [27, 91, 419, 1440, 919, 91, 29],
            [27, 91, 8862, 728, 428, 91, 29],
            id="special-marker-is-plain-text",
        ),
        pytest.param(" ", [220], [220], id="space"),
        pytest.param("", [], [], id="empty"),
    ],
)
def test_bpe_matches_tiktoken(text: str, o200k_ids: list[int], cl100k_ids: list[int]) -> None:
    bindings = importlib.import_module("bpe_openai._bindings")
    assert bindings.tokenizer_for_encoding("o200k_base").encode(text) == o200k_ids
    assert bindings.tokenizer_for_encoding("cl100k_base").encode(text) == cl100k_ids
    assert count_text_tokens(O200K, text) == len(o200k_ids)
    assert count_text_tokens(CL100K, text) == len(cl100k_ids)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("", 0, id="empty"),
        pytest.param("abc", 1, id="under-4-bytes"),
        pytest.param("abcd", 1, id="4-bytes"),
        pytest.param("abcde", 2, id="rounds-up"),
        pytest.param("é" * 4, 2, id="utf8-bytes-not-chars"),
        pytest.param("日本語", 3, id="cjk-3-bytes-each"),
        pytest.param("a\ud800", 1, id="lone-surrogate"),
    ],
)
def test_estimate_is_ceil_utf8_bytes_over_4(text: str, expected: int) -> None:
    assert count_text_tokens(ESTIMATE, text) == expected


def test_lone_surrogate_counts_as_replacement_char() -> None:
    assert count_text_tokens(O200K, "a\ud800b") == count_text_tokens(O200K, "a\ufffdb")


@pytest.mark.parametrize(
    ("texts", "messages", "expected"),
    [
        pytest.param(["hello world"], 0, 2, id="no-messages-no-framing"),
        pytest.param(["hello world"], 1, 2 + 3 + 3, id="one-message"),
        pytest.param(["hello", "world"], 2, 1 + 1 + 6 + 3, id="two-messages"),
        pytest.param([], 1, 6, id="empty-message"),
    ],
)
def test_chat_framing(texts: list[str], messages: int, expected: int) -> None:
    assert count_prompt_tokens(O200K, texts, messages) == expected


def test_unknown_tokenizer_and_negative_messages_are_errors() -> None:
    with pytest.raises(ValueError, match="unknown tokenizer"):
        count_text_tokens("gpt2", "x")
    with pytest.raises(ValueError, match="unknown tokenizer"):
        tokens.warm_up(["gpt2"])
    with pytest.raises(ValueError, match="messages"):
        count_prompt_tokens(O200K, [], -1)


@pytest.mark.parametrize(
    ("model", "tokenizer"),
    [
        ("gpt-5-nano", O200K),
        ("gpt-4o-mini-search-preview", O200K),
        ("gpt-4.1-nano", O200K),
        ("o3-mini", O200K),
        ("gpt-4-turbo", CL100K),
        ("gpt-3.5-turbo-instruct", CL100K),
        ("babbage-002", CL100K),
        ("text-embedding-3-small", CL100K),
        ("claude-sonnet-4", ESTIMATE),
        ("llama-3.1-8b", ESTIMATE),
    ],
)
def test_default_tokenizer(model: str, tokenizer: str) -> None:
    assert default_tokenizer(model) == tokenizer


# --- recorded OpenAI usage ---------------------------------------------------------------

EXACT = [
    "azure-chat-basic",
    "chat-basic",
    "chat-detailed-usage",
    "chat-json-mode",
    "chat-reasoning",
    "chat-streaming-detailed-usage",
    "completion-basic",
    "completion-streaming-usage",
    "completion-suffix",
    "completion-text-batch",
    "completion-token",
    "completion-token-batch",
    "embeddings-base64",
    "embeddings-basic",
    "embeddings-dimensions",
    "embeddings-large-text",
    "embeddings-max-tokens",
    "embeddings-mixed-batch",
    "embeddings-tokens",
    "embeddings-whitespace",
]
"""Cassettes where text tokens + chat framing is exactly the recorded prompt_tokens."""

KNOWN_GAPS = {
    "chat-multiturn": 5,  # developer + assistant turns in history: template tokens
    "chat-image-to-text": 3,  # a 16x16 PNG
    "chat-multimodal": 2233,  # a large image
    "chat-audio-to-text": 6,  # input audio
    "chat-text-to-audio": 1,  # audio output modality
    "chat-tools": 147,  # one function tool definition
    "chat-parallel-tools": 147,
    "chat-text-to-image-tool": 143,
    "chat-openai-agents-python": 94,  # system prompt + json_schema response format
    "chat-web-search": -6,  # search-preview models count fewer than the formula
}
"""Recorded prompt_tokens minus our count where the provider adds what we cannot see.

Pinned so a change in either the formula or the dialects shows up here, not in budgets.
"""


def _usage(body: str) -> dict[str, Any] | None:
    try:
        usage = json.loads(body).get("usage")
        return usage if isinstance(usage, dict) else None
    except json.JSONDecodeError:
        found = None
        for line in body.splitlines():
            if line.startswith("data: {"):
                found = json.loads(line[len("data: ") :]).get("usage") or found
        return found


def _count(url: str, request: dict[str, Any]) -> int:
    """Our count of a recorded request, as the pipeline would compute it."""
    tokenizer = default_tokenizer(request["model"])
    if url.endswith("/chat/completions"):
        texts: list[str] = []
        for message in request["messages"]:
            content = message.get("content")
            if isinstance(content, str):
                texts.append(content)
            elif isinstance(content, list):
                texts += [p["text"] for p in content if p.get("type") == "text"]
        return count_prompt_tokens(tokenizer, texts, len(request["messages"]))
    field = "prompt" if url.endswith("/completions") else "input"
    value = request[field]
    items = value if isinstance(value, list) and not all(type(v) is int for v in value) else [value]
    ids = sum(len(v) for v in items if isinstance(v, list))
    strings = [v for v in items if isinstance(v, str)]
    if isinstance(request.get("suffix"), str):
        strings.append(request["suffix"])
    return ids + count_prompt_tokens(tokenizer, strings, 0)


def _recorded() -> dict[str, tuple[int, int]]:
    """Cassette name → (recorded prompt_tokens, our count) for every one with usage."""
    if not CASSETTES.is_dir():
        pytest.fail(f"no cassettes at {CASSETTES} (set EXTPROC_MOCK_CASSETTES)")
    found = {}
    for path in sorted(CASSETTES.glob("*.yaml")):
        interaction = yaml.safe_load(path.read_text())["interactions"][0]
        usage = _usage(interaction["response"]["body"])
        if not usage or "prompt_tokens" not in usage:
            continue
        request = json.loads(interaction["request"]["body"])
        found[path.stem] = (usage["prompt_tokens"], _count(interaction["request"]["url"], request))
    return found


@pytest.fixture(scope="module")
def recorded() -> dict[str, tuple[int, int]]:
    return _recorded()


@pytest.mark.parametrize("name", EXACT)
def test_exact_on_recorded_usage(name: str, recorded: dict[str, tuple[int, int]]) -> None:
    actual, ours = recorded[name]
    assert ours == actual


@pytest.mark.parametrize("name", sorted(KNOWN_GAPS))
def test_documented_gap_on_recorded_usage(name: str, recorded: dict[str, tuple[int, int]]) -> None:
    actual, ours = recorded[name]
    assert actual - ours == KNOWN_GAPS[name]


def test_every_recorded_usage_is_classified(recorded: dict[str, tuple[int, int]]) -> None:
    assert set(recorded) == set(EXACT) | set(KNOWN_GAPS)


def test_loading_the_tables_skips_the_packages_python_registry() -> None:
    """Start-up loads only the Rust extension: bpe-openai's ``__init__`` would decode every
    rank file into Python dicts (~1 s and ~60 MB) that counting never reads."""
    script = (
        "import sys\n"
        "from extproc.budgets import tokens\n"
        "tokens.warm_up()\n"
        "print(tokens.count_text_tokens('o200k', 'Hello world'),"
        " tokens.count_text_tokens('cl100k', 'Hello world'),"
        " 'bpe_openai.compat' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[2],
    ).stdout
    assert out.split() == ["2", "2", "False"]


def test_the_tables_loaded_at_start_are_those_a_budget_will_count_with() -> None:
    """No budget anywhere: nothing is counted, so no table is loaded (~50 MB saved); any
    budget, on any scope: the catalogue's tokenizers."""
    catalogue = {
        "gpt-4o-mini": {"tokenizer": "o200k"},
        "text-embedding-3-small": {"tokenizer": "cl100k"},
        "claude-3-5-haiku": {"tokenizer": "estimate"},
    }
    assert make_policy(models=catalogue).counted_tokenizers == frozenset()
    limit = [{"unit": "requests", "window": "minute", "limit": 10}]
    on_a_key = {"k": {"sha256": sha("sk-k"), "team": "apps", "limits": limit}}
    on_a_team = {
        "platform": {"models": {"allow": ["*"]}},
        "apps": {"models": {"allow": ["*"]}, "limits": limit},
    }
    for scoped in (
        {"keys": on_a_key},
        {"teams": on_a_team},
        {"settings": {"budgets": {"global_limits": limit}}},
    ):
        policy = make_policy(models=catalogue, **scoped)
        assert policy.counted_tokenizers == {"o200k", "cl100k", "estimate"}


def test_warm_up_builds_the_largest_table_first(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever order the set of tokenizers comes in: o200k's build, built while cl100k's
    table is already held, would add both to the process's peak memory."""
    built: list[str] = []

    class Counter:
        def count(self, text: str) -> int:
            return len(text)

    def bpe(tokenizer: str) -> Counter:
        built.append(tokenizer)
        return Counter()

    monkeypatch.setattr(tokens, "_bpe", bpe)
    tokens.warm_up(iter(["estimate", "cl100k", "o200k"]))
    assert built == ["o200k", "cl100k"]


def test_a_catalogue_model_is_counted_as_the_backends_model() -> None:
    """A catalogue name can front another provider's model: its tokenizer is guessed from
    the model the backend is asked for (an exact count would be charged as one)."""
    policy = make_policy(
        models={
            "text-embedding-3-small": {"backend": {"cluster": "vllm", "model": "nomic-embed-text"}},
            "gpt-4o-mini": {"backend": {"cluster": "openai", "model": "gpt-4o-mini-2024-07-18"}},
            "text-embedding-3-large": {},
        }
    )
    tokenizers = {m.name: m.tokenizer for m in policy.catalogue}
    assert tokenizers == {
        "text-embedding-3-small": "estimate",
        "gpt-4o-mini": "o200k",
        "text-embedding-3-large": "cl100k",
    }
