"""The README's annotated policy example is a policy the schema accepts, field for field."""

from __future__ import annotations

import re

import yaml

from extproc.policy.schema import Policy
from extproc.stack import ROOT


def readme_example() -> dict[str, object]:
    text = (ROOT / "README.md").read_text()
    start = text.index("```yaml", text.index("A condensed example of every field")) + len("```yaml")
    example = text[start : text.index("```", start)]
    # The README shortens key digests for reading; the schema wants all 64 hex digits.
    example = re.sub(r"sha256: ([0-9a-f]+)…?", lambda m: f"sha256: {m.group(1):0<64}", example)
    loaded = yaml.safe_load(example)
    assert isinstance(loaded, dict)
    return loaded


def test_the_readme_policy_example_is_valid() -> None:
    policy = Policy.model_validate(readme_example())
    assert policy.settings.accounting == "service"  # the documented default, shown as such


def test_the_readme_policy_example_shows_every_top_level_section() -> None:
    assert set(readme_example()) == set(Policy.model_fields)
