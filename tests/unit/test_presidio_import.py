"""Presidio's recognizers without its package ``__init__`` (spaCy, the analyzer engine).

Each check runs in a fresh interpreter: what is imported is the point, and this test
process may already hold Presidio either way.
"""

from __future__ import annotations

import json
import subprocess
import sys

from extproc.guardrails.presidio_import import RECOGNIZER_MODULES
from extproc.stack import ROOT

TEXT = (
    "mail bob@example.com, card 4111 1111 1111 1111, iban GB82 WEST 1234 5698 7654 32, "
    "ssn 078-05-1120, ip 192.168.1.20 and 2001:db8::1, see https://example.com/a, "
    "mac 00:1B:44:11:3A:B7, btc 1BoatSLRHtKNngkdXEeobR76b53LETtpyT, itin 912-70-1234, "
    "passport 912803456, account 945678901234, licence 123456789, nhs 401 023 2137, "
    "phone (212) 555-0100"
)
FIND_ALL = f"""
import json, sys
found = {{}}
for name in {sorted(RECOGNIZER_MODULES)!r}:
    cls = recognizer_class(name)
    results = cls().analyze({TEXT!r}, cls().supported_entities, None)
    found[name] = [cls.__module__, sorted((r.start, r.end, r.entity_type) for r in results)]
print(json.dumps({{"found": found, "spacy": "spacy" in sys.modules,
                  "engine": "presidio_analyzer.analyzer_engine" in sys.modules}}))
"""


def run(code: str) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_the_recognizers_are_presidios_own_and_find_what_they_find_when_imported_whole() -> None:
    bare = run("from extproc.guardrails.presidio_import import recognizer_class\n" + FIND_ALL)
    whole = run(
        "import presidio_analyzer.predefined_recognizers as r\n"
        "recognizer_class = lambda name: getattr(r, name)\n" + FIND_ALL
    )
    assert bare["found"] == whole["found"]
    found = bare["found"]
    assert isinstance(found, dict)
    for name, (module, results) in found.items():
        assert module.startswith("presidio_analyzer.predefined_recognizers."), name
        assert results, f"{name} found nothing in a text made to hold its entity"
    # The ordinary import brings spaCy and the engine; this module's does not.
    assert (whole["spacy"], whole["engine"]) == (True, True)
    assert (bare["spacy"], bare["engine"]) == (False, False)


def test_compiling_the_example_policy_imports_neither_spacy_nor_the_engine() -> None:
    """Its PII rules, masks and hashes build Presidio recognizers and anonymizer operators."""
    result = run(
        "import json, sys\n"
        "from pathlib import Path\n"
        "from extproc.policy.loader import load_policy\n"
        "policy = load_policy(Path('policies/example.yaml'))\n"
        "from extproc.guardrails.operators import decrypt\n"
        "from extproc.guardrails.presidio_import import anonymizer_operators\n"
        "token = anonymizer_operators().Encrypt().operate('4111', {'key': 'sixteen byte key'})\n"
        "assert token != '4111' and decrypt(token, 'sixteen byte key') == '4111'\n"
        "print(json.dumps({'spacy': 'spacy' in sys.modules,\n"
        "  'engine': 'presidio_analyzer.analyzer_engine' in sys.modules,\n"
        "  'anonymizer': 'presidio_anonymizer.operators' in sys.modules}))"
    )
    assert result == {"spacy": False, "engine": False, "anonymizer": True}


def test_a_process_that_imported_presidio_whole_keeps_it() -> None:
    result = run(
        "import json, presidio_analyzer\n"
        "from extproc.guardrails.presidio_import import recognizer_class\n"
        "from presidio_analyzer.predefined_recognizers import EmailRecognizer\n"
        "print(json.dumps({'same': recognizer_class('EmailRecognizer') is EmailRecognizer,\n"
        "  'engine': hasattr(presidio_analyzer, 'AnalyzerEngine')}))"
    )
    assert result == {"same": True, "engine": True}
