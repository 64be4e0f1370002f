"""Role-based access to models: the catalogue lookup and the allow decision.

Glob rules were already evaluated against the catalogue when the policy was compiled,
so a decision here is one dictionary lookup and one set membership test.
"""

from __future__ import annotations

from extproc.errors import NotFound, PermissionDenied
from extproc.identity import Principal
from extproc.policy.compiled import CatalogueModel, CompiledPolicy


def authorize_model(policy: CompiledPolicy, principal: Principal, requested: str) -> CatalogueModel:
    """The catalogue entry for ``requested`` if this caller may use it.

    Unknown models are 404 (as OpenAI answers them); known models outside the caller's
    grant are 403, so SDKs raise ``NotFoundError`` and ``PermissionDeniedError``.
    """
    model = policy.resolve_model(requested)
    if model is None:
        raise NotFound(
            f"The model '{requested}' does not exist or is not served by this gateway.",
            code="model_not_found",
            param="model",
        )
    if model.name not in principal.allowed_models:
        raise PermissionDenied(
            _refusal(policy, principal, model.name), code="model_not_allowed", param="model"
        )
    return model


def _refusal(policy: CompiledPolicy, principal: Principal, model: str) -> str:
    """Who does not allow ``model``: the team, or the user or key narrowing what the team
    allows (a message blaming the team for a user's narrowing sends people to the wrong
    owner)."""
    team = principal.team
    if model not in policy.models_for(team, None):
        return f"Your team '{team}' may not use the model '{model}'."
    if principal.user is not None and model not in policy.models_for(team, principal.user):
        return f"The user '{principal.user}' may not use the model '{model}' (team '{team}' may)."
    return f"This key may not use the model '{model}' (team '{team}' may)."


def visible_models(policy: CompiledPolicy, principal: Principal) -> list[CatalogueModel]:
    """The catalogue entries this caller may use, in policy order."""
    return [m for m in policy.catalogue if m.name in principal.allowed_models]
