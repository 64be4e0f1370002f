"""``GET /v1/models`` answered by the gateway: exactly the models the caller may use.

Both SDKs call this path; the Anthropic one sends ``anthropic-version``, and gets
Anthropic's list format, everyone else gets OpenAI's.
"""

from __future__ import annotations

from typing import Any

import orjson

from extproc.decisions import Reply
from extproc.errors import NotFound
from extproc.policy.compiled import CatalogueModel

MODELS_PATH = "/v1/models"
_CREATED = 1_700_000_000
_CREATED_AT = "2023-11-14T22:13:20Z"
_JSON = (("content-type", "application/json"),)


def is_models_path(path: str) -> bool:
    """``/v1/models`` or ``/v1/models/{id}`` (``path`` without its query)."""
    return path == MODELS_PATH or path.startswith(MODELS_PATH + "/")


def list_models(models: list[CatalogueModel], path: str, *, anthropic: bool) -> Reply:
    """Answer ``GET /v1/models`` or ``GET /v1/models/{id}`` from ``models``, in
    Anthropic's list format when the caller is Anthropic's SDK (the exchange's envelope,
    decided from its headers), OpenAI's otherwise."""
    wanted = path[len(MODELS_PATH) :].strip("/")
    if wanted:
        match = next((m for m in models if wanted == m.name or wanted in m.aliases), None)
        if match is None:
            raise NotFound(f"The model '{wanted}' does not exist.", code="model_not_found")
        item = _anthropic_item(match) if anthropic else _openai_item(match)
        return Reply(status=200, body=orjson.dumps(item), headers=_JSON)
    if anthropic:
        data = [_anthropic_item(m) for m in models]
        payload: dict[str, Any] = {
            "data": data,
            "has_more": False,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
        }
    else:
        payload = {"object": "list", "data": [_openai_item(m) for m in models]}
    return Reply(status=200, body=orjson.dumps(payload), headers=_JSON)


def _openai_item(model: CatalogueModel) -> dict[str, Any]:
    return {"id": model.name, "object": "model", "created": _CREATED, "owned_by": model.owned_by}


def _anthropic_item(model: CatalogueModel) -> dict[str, Any]:
    return {
        "type": "model",
        "id": model.name,
        "display_name": model.name,
        "created_at": _CREATED_AT,
        # Required by Anthropic's SDK (read back as None without it): callers keeping
        # the active models only saw none.
        "lifecycle": "active",
    }
