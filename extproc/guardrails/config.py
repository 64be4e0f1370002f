"""Guardrail rules as they appear in a policy file (pydantic v2, strict).

A rule says *what* to look for (``detector``), *where* (``stage`` and ``scope``) and
*what to do* (``mode``): ``validate`` blocks the request or answer, ``mutate`` rewrites
the matched text, ``audit`` only records a verdict. The policy embeds
``guardrails: list[GuardrailRule]`` at its top level and :class:`GuardrailSettings` under
``settings.guardrails``. Secrets used by operators (hash salt, encryption key) are never
written in the file: the file names an environment variable that holds them, read when
the policy is compiled.

Every model forbids unknown fields and is frozen; regexes are compiled with RE2 during
validation so an unsupported pattern is an error with its path, not a runtime surprise.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from extproc.guardrails.entities import (
    BUILTIN_ENTITIES,
    DEFAULT_SECRETS,
    SECRET_TYPES,
    unknown_entity_message,
)
from extproc.guardrails.linear import PatternError, compile_re2

_RULE_NAME = r"^[A-Za-z0-9][A-Za-z0-9._:@/-]{0,127}$"
_ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]{0,127}$"
_ENTITY_NAME = r"^[A-Z][A-Z0-9_]{1,63}$"

Stage = Literal["input", "output"]
RuleStage = Literal["input", "output", "both"]
Mode = Literal["validate", "mutate", "audit"]
Role = Literal["system", "developer", "user", "assistant", "tool"]


def _re2_pattern(pattern: str) -> str:
    try:
        compile_re2(pattern)
    except PatternError as exc:
        raise ValueError(str(exc)) from None
    return pattern


Re2Pattern = Annotated[
    str,
    Field(min_length=1, max_length=4096, description="An RE2 regular expression."),
    AfterValidator(_re2_pattern),
]
EnvName = Annotated[str, Field(pattern=_ENV_NAME, description="An environment variable name.")]
Score = Annotated[float, Field(ge=0.0, le=1.0)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --- operators (how a mutate rule rewrites a finding) -------------------------------------


class ReplaceOperator(_Strict):
    """Replace the value with ``new_value`` (default: the entity name, e.g. ``<EMAIL_ADDRESS>``)."""

    type: Literal["replace"] = "replace"
    new_value: str | None = Field(default=None, max_length=256)


class MaskOperator(_Strict):
    """Overwrite characters with ``masking_char``: all of them, or ``chars_to_mask``."""

    type: Literal["mask"] = "mask"
    masking_char: str = Field(default="*", min_length=1, max_length=1)
    chars_to_mask: int | None = Field(default=None, ge=1, description="Default: all.")
    from_end: bool = False


class RedactOperator(_Strict):
    """Remove the value."""

    type: Literal["redact"] = "redact"


class HashOperator(_Strict):
    """Salted hash: the same value hashes the same, so records stay joinable."""

    type: Literal["hash"] = "hash"
    hash_type: Literal["sha256", "sha512"] = "sha256"
    salt_env: EnvName | None = Field(
        default=None,
        description="Variable holding the salt (at least 16 bytes); default "
        "settings.guardrails.hash_salt_env.",
    )


class EncryptOperator(_Strict):
    """AES (Presidio's cipher): reversible by whoever holds the key."""

    type: Literal["encrypt"] = "encrypt"
    key_env: EnvName | None = Field(
        default=None,
        description="Variable holding a 16, 24 or 32 byte key; default "
        "settings.guardrails.encryption_key_env.",
    )


def _operator_shorthand(value: Any) -> Any:
    """``operator: mask`` means ``operator: {type: mask}``."""
    return {"type": value} if isinstance(value, str) else value


Operator = Annotated[
    ReplaceOperator | MaskOperator | RedactOperator | HashOperator | EncryptOperator,
    Field(discriminator="type"),
]


class _WithOperator(_Strict):
    @field_validator("operator", mode="before", check_fields=False)
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        return _operator_shorthand(value)


# --- PII and secrets ---------------------------------------------------------------------


class EntityRule(_WithOperator):
    """How one entity type is treated by a ``pii`` or ``secrets`` detector."""

    type: str = Field(pattern=_ENTITY_NAME, description="Entity name, e.g. EMAIL_ADDRESS.")
    action: Literal["rewrite", "block"] = Field(
        default="rewrite",
        description="In mutate mode: rewrite with the operator, or block the request.",
    )
    operator: Operator | None = Field(default=None, description="Default: the detector's.")
    threshold: Score | None = Field(
        default=None, description="Minimum confidence; default: the detector's."
    )
    allow_list: list[str] = Field(
        default_factory=list, description="Values never reported (compared case-insensitively)."
    )
    context: list[str] = Field(
        default_factory=list,
        description="Extra words that, near a candidate, raise its confidence.",
    )


def _entity_shorthand(value: Any) -> Any:
    """``entities: [EMAIL_ADDRESS]`` means ``entities: [{type: EMAIL_ADDRESS}]``."""
    if isinstance(value, list):
        return [{"type": item} if isinstance(item, str) else item for item in value]
    return value


EntityList = Annotated[list[EntityRule], BeforeValidator(_entity_shorthand)]


class CustomEntity(_Strict):
    """An entity of your own, found by an RE2 pattern (e.g. employee ids)."""

    name: str = Field(pattern=_ENTITY_NAME)
    pattern: Re2Pattern
    score: Score = 0.8
    context: list[str] = Field(default_factory=list)


class PiiDetector(_WithOperator):
    kind: Literal["pii"]
    entities: EntityList = Field(min_length=1)
    custom: list[CustomEntity] = Field(default_factory=list)
    operator: Operator = Field(default_factory=ReplaceOperator)
    threshold: Score = Field(default=0.5, description="Default minimum confidence.")
    allow_list: list[str] = Field(default_factory=list, description="For every entity.")

    @model_validator(mode="after")
    def _known_entities(self) -> PiiDetector:
        custom = {entity.name for entity in self.custom}
        clashes = sorted(custom & BUILTIN_ENTITIES)
        if clashes:
            raise ValueError(f"custom entity names clash with built-in ones: {clashes}")
        problems = [
            f"entities[{i}].type: {unknown_entity_message(rule.type)}"
            for i, rule in enumerate(self.entities)
            if rule.type not in BUILTIN_ENTITIES and rule.type not in custom
        ]
        problems.extend(_duplicates([rule.type for rule in self.entities], "entities"))
        if problems:
            raise ValueError("; ".join(problems))
        return self


class SecretsDetector(_WithOperator):
    kind: Literal["secrets"]
    types: EntityList = Field(
        default_factory=lambda: [EntityRule(type=name) for name in DEFAULT_SECRETS],
        description="Default: every secret type except ASSIGNED_SECRET.",
    )
    operator: Operator = Field(default_factory=ReplaceOperator)
    threshold: Score = 0.5
    allow_list: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _known_types(self) -> SecretsDetector:
        problems = [
            f"types[{i}].type: unknown secret type {rule.type!r}; known: " + ", ".join(SECRET_TYPES)
            for i, rule in enumerate(self.types)
            if rule.type not in SECRET_TYPES
        ]
        problems.extend(_duplicates([rule.type for rule in self.types], "types"))
        if problems:
            raise ValueError("; ".join(problems))
        return self


# --- prompt injection --------------------------------------------------------------------

Family = Literal[
    "instruction_override",
    "prompt_extraction",
    "roleplay_jailbreak",
    "delimiter_injection",
    "output_manipulation",
    "malicious_code",
]


class InjectionDetector(_Strict):
    """Offline heuristic scoring of attack-pattern families on normalised text."""

    kind: Literal["injection"]
    threshold: Score = Field(default=0.5, description="Fire at or above this score.")
    families: list[Family] | None = Field(
        default=None, description="Families that count; default: all."
    )
    decode: bool = Field(default=True, description="Also read base64, rot13 and reversed payloads.")
    classifier: str | None = Field(
        default=None,
        description="Name of a classifier registered with compile_guardrails; its score "
        "is combined with the heuristic one (the higher wins).",
    )


# --- content policy ----------------------------------------------------------------------


class ContentDetector(_Strict):
    """Deny patterns, banned terms and topics; ``allow`` patterns exempt what they match."""

    kind: Literal["content"]
    deny: list[Re2Pattern] = Field(default_factory=list, description="RE2 regexes.")
    allow: list[Re2Pattern] = Field(
        default_factory=list, description="RE2 regexes; a finding inside a match is exempt."
    )
    case_sensitive: bool = Field(default=False, description="For deny/allow regexes.")
    banned_terms: list[Annotated[str, Field(min_length=1, max_length=256)]] = Field(
        default_factory=list,
        description="Words or phrases, matched on word boundaries after Unicode "
        "normalisation (NFKC, case folding, look-alike letters, invisible characters).",
    )
    topics: dict[
        Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$")],
        list[Annotated[str, Field(min_length=1, max_length=256)]],
    ] = Field(default_factory=dict, description="Topic name → its terms and phrases.")
    replacement: str = Field(default="[REDACTED]", max_length=256, description="For mutate.")

    @model_validator(mode="after")
    def _not_empty(self) -> ContentDetector:
        if not (self.deny or self.banned_terms or any(self.topics.values())):
            raise ValueError("a content detector needs deny patterns, banned_terms or topics")
        return self


Detector = Annotated[
    PiiDetector | SecretsDetector | InjectionDetector | ContentDetector,
    Field(discriminator="kind"),
]


# --- rules -------------------------------------------------------------------------------


class Scope(_Strict):
    """Who and what a rule applies to; an empty list matches everything."""

    teams: list[str] = Field(default_factory=list)
    keys: list[str] = Field(default_factory=list, description="Key ids from the policy.")
    models: list[str] = Field(default_factory=list, description="Globs over model names.")
    routes: list[str] = Field(
        default_factory=list, description="Globs over request paths, e.g. /v1/chat/*."
    )


class GuardrailRule(_Strict):
    name: str = Field(pattern=_RULE_NAME, description="Named in verdicts and block messages.")
    detector: Detector
    stage: RuleStage = Field(description="input (prompts), output (answers) or both.")
    mode: Mode = Field(
        description="validate: block; mutate: rewrite (entities with action block still "
        "block); audit: record only."
    )
    scope: Scope = Field(default_factory=Scope)
    roles: list[Role] = Field(
        default_factory=list,
        description="Authors of the texts checked (system, developer, user, assistant, "
        "tool); empty: all. Answers are the assistant's.",
    )
    message: str | None = Field(
        default=None,
        max_length=512,
        description="Shown to the caller when this rule blocks; default names the rule.",
    )

    @model_validator(mode="after")
    def _mode_fits_detector(self) -> GuardrailRule:
        if self.mode == "mutate" and isinstance(self.detector, InjectionDetector):
            raise ValueError(
                "mode mutate: an injection cannot be rewritten away; use validate or audit"
            )
        return self


class GuardrailSettings(_Strict):
    """Shared guardrail settings (``settings.guardrails``)."""

    hash_salt_env: EnvName | None = Field(
        default=None, description="Variable holding the salt of hash operators."
    )
    encryption_key_env: EnvName | None = Field(
        default=None, description="Variable holding the key of encrypt operators."
    )
    stream_window: int = Field(
        default=64,
        ge=48,
        le=4096,
        description="Characters of a streamed answer held back at most while they may "
        "be the start of something a rule would rewrite or block. At least 48: a value is "
        "only recognised once enough of it is seen (a GitHub token needs 40 characters).",
    )


def guardrail_problems(rules: list[GuardrailRule], settings: GuardrailSettings) -> list[str]:
    """Cross-field problems the policy validator reports (unique names, secret sources).

    Returned as ``guardrails[i]…: message`` strings so the policy can join them with its
    own reference checks.
    """
    problems = _duplicates([rule.name for rule in rules], "guardrails", key="name")
    for i, rule in enumerate(rules):
        for where, operator in _operators(rule.detector):
            if isinstance(operator, HashOperator) and not (
                operator.salt_env or settings.hash_salt_env
            ):
                problems.append(
                    f"guardrails[{i}].detector.{where}: hash needs salt_env here or "
                    "settings.guardrails.hash_salt_env"
                )
            if isinstance(operator, EncryptOperator) and not (
                operator.key_env or settings.encryption_key_env
            ):
                problems.append(
                    f"guardrails[{i}].detector.{where}: encrypt needs key_env here or "
                    "settings.guardrails.encryption_key_env"
                )
    return problems


def _operators(detector: object) -> list[tuple[str, object]]:
    if isinstance(detector, PiiDetector | SecretsDetector):
        listed = detector.entities if isinstance(detector, PiiDetector) else detector.types
        field = "entities" if isinstance(detector, PiiDetector) else "types"
        found: list[tuple[str, object]] = [("operator", detector.operator)]
        found.extend(
            (f"{field}[{i}].operator", rule.operator)
            for i, rule in enumerate(listed)
            if rule.operator is not None
        )
        return found
    return []


def _duplicates(values: list[str], where: str, key: str = "type") -> list[str]:
    seen: set[str] = set()
    problems = []
    for i, value in enumerate(values):
        if value in seen:
            problems.append(f"{where}[{i}].{key}: {value!r} is listed twice")
        seen.add(value)
    return problems
