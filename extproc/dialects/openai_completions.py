"""OpenAI legacy completions (``/v1/completions``), still served by vLLM and friends."""

from __future__ import annotations

from typing import Any

from extproc.dialects.base import DialectEnvelope, LLMRequest, TextPart
from extproc.dialects.fields import (
    optional_bool,
    optional_positive_int,
    optional_str,
    require_model,
    text_or_tokens,
    token_id_count,
)


class OpenAICompletions:
    """``prompt`` and ``suffix`` are both text the model reads, so both are exposed."""

    name: str = "openai.completions"
    envelope: DialectEnvelope = "openai"
    output_cap_field: str | None = "max_tokens"
    min_output_cap: int = 1
    asks_stream_usage = True

    def parse(self, body: dict[str, Any]) -> LLMRequest:
        model = require_model(body)
        max_tokens = optional_positive_int(body, "max_tokens")
        stream = optional_bool(body, "stream")
        texts = text_or_tokens(body, "prompt", "prompt")
        suffix = optional_str(body, "suffix", ())
        if suffix is not None:
            texts.append(TextPart(("suffix",), "user", "prompt", suffix))
        return LLMRequest(
            dialect=self.name,
            model=model,
            texts=tuple(texts),
            max_output_tokens=max_tokens,
            stream=stream,
            tools=(),
            body=body,
            prompt_token_ids=token_id_count(body["prompt"]),
            answers=_answers(body),
        )


def _answers(body: dict[str, Any]) -> int:
    """``best_of`` answers are generated (and billed) per prompt, ``n`` returned; a list of
    prompts (strings, or lists of token ids) is that many prompts."""
    per_prompt = max(
        optional_positive_int(body, "n") or 1, optional_positive_int(body, "best_of") or 1
    )
    prompt = body["prompt"]
    prompts = (
        len(prompt) if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int) else 1
    )
    return per_prompt * prompts


DIALECT = OpenAICompletions()
