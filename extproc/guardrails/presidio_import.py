"""Presidio's pattern recognizers and anonymizer operators, without the rest of Presidio.

``presidio_analyzer``'s package ``__init__`` imports its analyzer engine, its NLP engines
(and so spaCy) and every predefined recognizer, although a pattern recognizer uses none of
them; ``presidio_anonymizer`` imports that package too (for an Azure operator's helper).
Measured here: 1.2 s and 116 MB of peak memory for the import, against 0.3 s and 44 MB for
the modules the guardrails use, which is most of the service's start-up and a third of its
memory.

The recognizer modules themselves import only six names from the package's top level
(``Pattern``, ``PatternRecognizer``, ``EntityRecognizer``, ``LocalRecognizer``,
``RecognizerResult``, ``AnalysisExplanation``, each from a module of its own) and
``NlpArtifacts`` for type hints. So this
module puts a bare ``presidio_analyzer`` package in ``sys.modules`` (its real directory,
its ``__init__`` not run) that holds those names, bare subpackages on the way to the
recognizer modules, and a stand-in ``NlpArtifacts``; then it imports just the modules
asked for, from the installed files. Presidio is pinned in pyproject.toml; the unit tests
hold that the recognizers found here are Presidio's and detect as they do when imported
the ordinary way, and that spaCy is not imported.

If the real package was imported first (a tool that uses Presidio's engine in the same
process), it is used as it is. Once the bare package is in place, the rest of Presidio's
analyzer (``AnalyzerEngine``, the package's re-exports) cannot be imported in the same
process; nothing in the service does.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import logging
import sys
import threading
import types
from typing import Any

PACKAGE = "presidio_analyzer"
_BARE = "__extproc_bare_package__"
"""Marks the modules this module made, so that the real package can be told apart."""
_CORE = (
    # In the order they import one another.
    ("analysis_explanation", "AnalysisExplanation"),
    ("recognizer_result", "RecognizerResult"),
    ("pattern", "Pattern"),
    ("entity_recognizer", "EntityRecognizer"),
    ("local_recognizer", "LocalRecognizer"),
    ("pattern_recognizer", "PatternRecognizer"),
)
RECOGNIZER_MODULES = {
    "EmailRecognizer": "generic.email_recognizer",
    "CreditCardRecognizer": "generic.credit_card_recognizer",
    "IbanRecognizer": "generic.iban_recognizer",
    "IpRecognizer": "generic.ip_recognizer",
    "UrlRecognizer": "generic.url_recognizer",
    "MacAddressRecognizer": "generic.mac_recognizer",
    "CryptoRecognizer": "generic.crypto_recognizer",
    "PhoneRecognizer": "generic.phone_recognizer",
    "UsSsnRecognizer": "country_specific.us.us_ssn_recognizer",
    "UsItinRecognizer": "country_specific.us.us_itin_recognizer",
    "UsPassportRecognizer": "country_specific.us.us_passport_recognizer",
    "UsBankRecognizer": "country_specific.us.us_bank_recognizer",
    "UsLicenseRecognizer": "country_specific.us.us_driver_license_recognizer",
    "NhsRecognizer": "country_specific.uk.uk_nhs_recognizer",
}
"""Where each predefined recognizer the guardrails use lives in the package."""
_INSTALLING = threading.Lock()


class NlpArtifacts:
    """Stands in for Presidio's (a spaCy-backed type); pattern recognizers never get one."""


def recognizer_class(name: str) -> Any:
    """Presidio's predefined recognizer class ``name`` (a key of RECOGNIZER_MODULES)."""
    _install_bare_package()
    if _real_package_loaded():
        return getattr(importlib.import_module(f"{PACKAGE}.predefined_recognizers"), name)
    module = importlib.import_module(f"{PACKAGE}.predefined_recognizers.{RECOGNIZER_MODULES[name]}")
    return getattr(module, name)


def pattern_class() -> Any:
    """Presidio's ``Pattern``, for recognizers given extra patterns."""
    return core_class("Pattern")


def core_class(name: str) -> Any:
    """One of the package's core names (``Pattern``, ``RecognizerResult``,
    ``EntityRecognizer``, ...), from the bare package or the real one."""
    _install_bare_package()
    return getattr(sys.modules[PACKAGE], name)


def anonymizer_operators() -> types.ModuleType:
    """``presidio_anonymizer.operators`` (Mask, Hash, Encrypt, Decrypt, …)."""
    _install_bare_package()  # else importing the anonymizer imports the whole analyzer
    return importlib.import_module("presidio_anonymizer.operators")


def _real_package_loaded() -> bool:
    package = sys.modules.get(PACKAGE)
    return package is not None and not getattr(package, _BARE, False)


def _install_bare_package() -> None:
    """Put the bare package in place unless a ``presidio_analyzer`` (bare or real) already
    is: once per process, also when threads race to it; on failure ``sys.modules`` is
    left as it was."""
    with _INSTALLING:
        if PACKAGE in sys.modules:
            return
        logging.getLogger("presidio-analyzer").setLevel(logging.ERROR)
        spec = importlib.util.find_spec(PACKAGE)
        if spec is None or not spec.submodule_search_locations:
            raise ImportError(f"{PACKAGE} is not installed")
        root = next(iter(spec.submodule_search_locations))
        before = set(sys.modules)
        try:
            package = _bare(PACKAGE, root)
            for module_name, name in _CORE:
                module = importlib.import_module(f"{PACKAGE}.{module_name}")
                setattr(package, name, getattr(module, name))
            _bare(f"{PACKAGE}.nlp_engine", None).NlpArtifacts = NlpArtifacts  # type: ignore[attr-defined]
            for subpackage in (
                "predefined_recognizers",
                "predefined_recognizers.generic",
                "predefined_recognizers.country_specific",
                "predefined_recognizers.country_specific.us",
                "predefined_recognizers.country_specific.uk",
            ):
                _bare(f"{PACKAGE}.{subpackage}", f"{root}/{subpackage.replace('.', '/')}")
        except BaseException:
            for name in set(sys.modules) - before:
                if name == PACKAGE or name.startswith(f"{PACKAGE}."):
                    del sys.modules[name]
            raise


def _bare(name: str, directory: str | None) -> types.ModuleType:
    """A package module whose ``__init__`` is not run: its submodules import from
    ``directory``, and importing it by name finds this module. Its spec says so, for
    tools that look a package up (``importlib.util.find_spec``)."""
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
    if directory is not None:
        module.__path__ = [directory]
        module.__spec__.submodule_search_locations = [directory]
    setattr(module, _BARE, True)
    sys.modules[name] = module
    return module
