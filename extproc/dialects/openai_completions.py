"""OpenAI legacy completions (``/v1/completions``), still served by vLLM and friends."""

from __future__ import annotations

from typing import Any

from extproc.dialects.base import Envelope, LLMRequest, TextPart
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
    envelope: Envelope = "openai"
    output_cap_field: str | None = "max_tokens"
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
        )


DIALECT = OpenAICompletions()
