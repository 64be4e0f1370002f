"""Translation between API dialects, so a caller of one API can reach another's provider.

Today: OpenAI chat completions ⇄ Anthropic Messages, letting an OpenAI-SDK application
call a Claude model through ``/v1/chat/completions``. Everything here is pure: no I/O,
plain JSON data or bytes in and out, the clock read only when no ``created`` time is
passed. The pipeline decides when to translate and owns headers, paths and metering.

    request_to_anthropic    OpenAI request body   → Anthropic request body
    response_from_anthropic Anthropic message     → OpenAI chat.completion
    error_from_anthropic    Anthropic error body  → OpenAI error body (same status)
    StreamTranslator        Anthropic SSE bytes   → OpenAI chat.completion.chunk SSE bytes

Fields Claude cannot honour raise :class:`extproc.errors.InvalidRequest` naming the
field; see :mod:`extproc.translate.anthropic_request` for what is dropped and rejected.
"""

from extproc.translate.anthropic_errors import error_from_anthropic
from extproc.translate.anthropic_request import request_to_anthropic
from extproc.translate.anthropic_response import response_from_anthropic
from extproc.translate.anthropic_stream import StreamTranslator

__all__ = [
    "StreamTranslator",
    "error_from_anthropic",
    "request_to_anthropic",
    "response_from_anthropic",
]
