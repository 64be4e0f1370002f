"""The names a policy may use for what the PII and secrets detectors find.

This module is data only (no Presidio import), so validating a policy stays cheap: a
typo in an entity name is an error at load, naming the entities that exist.
"""

from __future__ import annotations

PRESIDIO_ENTITIES: tuple[str, ...] = (
    "EMAIL_ADDRESS",
    "CREDIT_CARD",
    "IBAN_CODE",
    "US_SSN",
    "IP_ADDRESS",
    "URL",
    "MAC_ADDRESS",
    "CRYPTO",
    "US_ITIN",
    "US_PASSPORT",
    "US_BANK_NUMBER",
    "US_DRIVER_LICENSE",
    "UK_NHS",
)
"""Found by Presidio's pattern recognizers (with their checksums), run only on windows
around the shapes the prefilter saw."""

OWN_ENTITIES: tuple[str, ...] = ("PHONE_NUMBER",)
"""Found by our own RE2 recognizers: Presidio's phone recognizer (python-phonenumbers,
eight regions per window) costs more than everything else together and found fewer
numbers on the evaluation set; see :mod:`extproc.guardrails.phone`."""

SECRET_TYPES: tuple[str, ...] = (
    "OPENAI_API_KEY",
    "ANTHROPIC_API_KEY",
    "AWS_ACCESS_KEY",
    "AWS_SECRET_KEY",
    "GITHUB_TOKEN",
    "GITLAB_TOKEN",
    "SLACK_TOKEN",
    "GOOGLE_API_KEY",
    "STRIPE_KEY",
    "PRIVATE_KEY",
    "JWT",
    "BEARER_TOKEN",
    "ASSIGNED_SECRET",
)
"""Credentials, found by :mod:`extproc.guardrails.secrets`."""

OPT_IN_SECRETS: frozenset[str] = frozenset({"ASSIGNED_SECRET"})
"""``password = …`` style assignments: useful, but code prompts trip it, so a
``secrets`` detector includes it only when listed explicitly."""

DEFAULT_SECRETS: tuple[str, ...] = tuple(t for t in SECRET_TYPES if t not in OPT_IN_SECRETS)

BUILTIN_ENTITIES: frozenset[str] = frozenset((*PRESIDIO_ENTITIES, *OWN_ENTITIES, *SECRET_TYPES))

NEEDS_NLP: frozenset[str] = frozenset(
    {"PERSON", "LOCATION", "ORGANIZATION", "NRP", "DATE_TIME", "GPE", "STREET_ADDRESS"}
)
"""Entities Presidio finds with a spaCy/transformer model; this gateway loads none."""


def unknown_entity_message(name: str) -> str:
    if name in NEEDS_NLP:
        return (
            f"{name} needs an NLP model (spaCy), which the gateway does not load; "
            "use a custom RE2 entity under 'custom' instead"
        )
    return f"unknown entity {name!r}; known: " + ", ".join(sorted(BUILTIN_ENTITIES))
