"""Reading a policy file into a compiled snapshot, with errors a person can act on."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from extproc.policy.compiled import CompiledPolicy, compile_policy, credential_files
from extproc.policy.schema import Policy


class PolicyError(Exception):
    """A policy file that cannot go live; ``problems`` lists each one with its field path.
    ``credential_files`` are the key files a policy valid as written but refused when
    compiled names (a key file missing, say): the store watches them, so the policy is
    read again when one appears. Empty when the file was not valid that far."""

    def __init__(
        self, source: str, problems: list[str], credential_files: tuple[Path, ...] = ()
    ) -> None:
        super().__init__(f"{source}: " + "; ".join(problems))
        self.source = source
        self.problems = problems
        self.credential_files = credential_files


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML whose mappings name each key once: PyYAML keeps the last of two silently, so
    a second ``keys:`` section appended to a policy would revoke every key of the first."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *anchor`: merged mappings may repeat keys on purpose
            key = self.construct_object(key_node, deep=deep)
            try:
                repeated = key in seen
            except TypeError:
                continue  # an unhashable key: the schema refuses it anyway
            if repeated:
                raise yaml.constructor.ConstructorError(
                    None, None, f"'{key}' is given twice in the same mapping", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def parse_policy(text: str, source: str = "<policy>") -> Policy:
    """Validate policy YAML text; raise :class:`PolicyError` naming every bad field."""
    try:
        data: Any = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader
    except RecursionError:
        raise PolicyError(source, ["invalid YAML: nested too deeply"]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise PolicyError(source, [f"{where}invalid YAML: {problem}"]) from None
    if data is None:
        # Not a policy with nothing allowed: a file caught half-written, or emptied by mistake.
        raise PolicyError(source, ["the file is empty (a policy states at least its version)"])
    if not isinstance(data, dict):
        raise PolicyError(source, ["the top level must be a mapping"])
    try:
        return Policy.model_validate(data)
    except RecursionError:
        raise PolicyError(source, ["nested too deeply"]) from None
    except ValidationError as exc:
        raise PolicyError(source, [_describe(err) for err in exc.errors()]) from None


def load_policy(
    path: Path,
    credentials: bool = True,
    before_compiling: Callable[[Policy], None] | None = None,
) -> CompiledPolicy:
    """Read, validate and compile the policy at ``path``; without ``credentials`` no
    secret is read, neither provider keys nor the guardrails' salts and keys (commands
    that never call a provider or judge a text need none; see :func:`compile_policy`).
    ``before_compiling`` sees the validated policy before any file it names is read."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise PolicyError(str(path), [f"cannot read: {exc.strerror or exc}"]) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise PolicyError(str(path), ["the file is not UTF-8"]) from None
    policy = parse_policy(text, str(path))
    if before_compiling is not None:
        before_compiling(policy)
    try:
        return compile_policy(
            policy, version=hashlib.sha256(raw).hexdigest()[:12], credentials=credentials
        )
    except ValueError as exc:  # references outside the file: environment, key files
        files = credential_files(policy) if credentials else ()
        raise PolicyError(str(path), [str(exc)], files) from None


def _describe(error: Any) -> str:
    path = ".".join(str(part) for part in error["loc"])
    message = str(error["msg"]).removeprefix("Value error, ")
    return f"{path}: {message}" if path else message
