"""MCP policy compiled for the hot path: servers by path, and one caller's permissions.

Compilation happens once per policy version. Tool, resource and prompt names are not
known in advance (they live on the MCP servers), so each principal's globs become one
regular expression per category and layer; a request then costs a few anchored matches,
memoised per name because agents call the same handful of tools over and over.

A caller's permissions are layers: the team's rules, then the user's and the key's, each
of which must permit a name. The team layer grants nothing in a category it has no
``allow`` for; a narrowing layer with no ``allow`` grants what the layers above grant.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType

from extproc.mcp.config import McpAccess, McpConfig, McpGlobs, normal_path

_MEMO_LIMIT = 4096
"""Names remembered per permission set; the bound keeps memory flat under odd traffic."""


class Kind(StrEnum):
    """What an MCP name refers to; each kind has its own allow/deny rules."""

    TOOL = "tool"
    RESOURCE = "resource"
    PROMPT = "prompt"


@dataclass(frozen=True, slots=True)
class CompiledServer:
    name: str
    cluster: str
    path: str
    unknown_methods: str
    """``reject`` or ``forward``: what happens to JSON-RPC methods the gateway does not know."""


class McpRegistry:
    """The MCP servers of one policy version, found by request path."""

    __slots__ = ("_by_path", "servers")

    def __init__(self, servers: Iterable[CompiledServer]) -> None:
        listed = tuple(servers)
        self.servers: Mapping[str, CompiledServer] = MappingProxyType({s.name: s for s in listed})
        self._by_path = {normal_path(s.path): s for s in listed}

    def for_path(self, path: str) -> CompiledServer | None:
        """The server whose endpoint ``path`` (query string and trailing slash ignored) is."""
        return self._by_path.get(normal_path(path.partition("?")[0]))


def compile_registry(config: McpConfig | None) -> McpRegistry:
    if config is None:
        return McpRegistry(())
    return McpRegistry(
        CompiledServer(name, s.cluster, s.path, s.unknown_methods)
        for name, s in config.servers.items()
    )


class _Rule:
    """One layer's globs for one category, as two compiled patterns."""

    __slots__ = ("_allow", "_deny", "_open")

    def __init__(self, globs: McpGlobs, narrowing: bool) -> None:
        self._allow = _union(globs.allow)
        self._deny = _union(globs.deny)
        self._open = narrowing and self._allow is None

    def permits(self, name: str) -> bool:
        if self._deny is not None and self._deny.fullmatch(name):
            return False
        if self._open:
            return True
        return self._allow is not None and self._allow.fullmatch(name) is not None


def _union(patterns: Iterable[str]) -> re.Pattern[str] | None:
    parts = [fnmatch.translate(p) for p in patterns]
    return re.compile("|".join(f"(?:{p})" for p in parts)) if parts else None


_NOTHING = _Rule(McpGlobs(), narrowing=False)
_EVERYTHING = _Rule(McpGlobs(allow=["*"]), narrowing=False)


class McpPermissions:
    """What one caller (team, user, key combined) may use on MCP servers.

    Immutable after construction apart from its memo, which only caches answers; safe to
    share between streams and threads (a lost memo write costs one extra match).
    """

    __slots__ = ("_memo", "_rules", "_servers")

    def __init__(self, servers: tuple[_Rule, ...], rules: Mapping[Kind, tuple[_Rule, ...]]) -> None:
        self._servers = servers
        self._rules = dict(rules)
        self._memo: dict[tuple[Kind | None, str], bool] = {}

    def may_use_server(self, server: str) -> bool:
        return self._cached(None, server, self._servers)

    def permits(self, kind: Kind, name: str) -> bool:
        """Whether the caller may call / read / fetch (and see listed) ``name``; a resource
        URI is matched as servers read it (:func:`canonical_uri`: ``SECRETS://`` or
        ``secrets://k%65y`` must not pass a ``deny: ["secrets://key"]``)."""
        if kind is Kind.RESOURCE:
            name = canonical_uri(name)
        return self._cached(kind, name, self._rules[kind])

    def _cached(self, kind: Kind | None, name: str, rules: tuple[_Rule, ...]) -> bool:
        key = (kind, name)
        hit = self._memo.get(key)
        if hit is None:
            hit = all(rule.permits(name) for rule in rules)
            if len(self._memo) < _MEMO_LIMIT:
                self._memo[key] = hit
        return hit


_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*")
_UNCLEAR_URI = re.compile(r"\\|[\x00-\x20\x7f]")
"""A backslash, whitespace or a control character, as written."""
_DOT_SEGMENT = re.compile(r"(?:^|/)\.{1,2}(?:/|$)")
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
_REFUSED = frozenset("/\\%") | frozenset(map(chr, range(0x20))) | {"\x7f"}
"""What an escape must not spell: a slash or backslash (a server decoding it sees another
path), ``%`` (escapes escaped twice), control characters."""
_KEPT = frozenset(":?#[]@!$&'()*+,;=")
"""Escapes left as written: decoded, they would read as delimiters they are not."""
_SPECIAL = {"http": "80", "https": "443", "ws": "80", "wss": "443", "ftp": "21", "file": ""}
"""Schemes whose URIs servers parse as URLs (with an authority), and their default ports."""


def unclear_uri(uri: str) -> bool:
    """A URI a server may resolve outside what its text matches, refused rather than
    judged: a dot segment, escaped or not (``docs://../secrets/key`` matches
    ``docs://*``), a backslash, whitespace or control characters as written (a server
    strips them: ``" secrets://key"``), an escaped space at either end (``%20secrets://``),
    an escape spelling a slash, ``%`` or a control character (``%2f``, ``%252f``), a URL
    scheme without its ``//`` (``https:host/x`` is ``https://host/x`` to a URL parser).
    An escaped space inside (``My%20Documents``) is an ordinary name."""
    if _UNCLEAR_URI.search(uri) is not None:
        return True
    if any(chr(int(code, 16)) in _REFUSED for code in _ESCAPE.findall(uri)):
        return True
    decoded = _decoded(uri)
    if decoded != decoded.strip() or _DOT_SEGMENT.search(decoded) is not None:
        return True
    scheme, colon, rest = uri.partition(":")
    return bool(colon) and scheme.lower() in _SPECIAL and not rest.startswith("//")


def canonical_uri(uri: str) -> str:
    """``uri`` as servers read it, for matching (the URI sent on is the caller's): the
    scheme in lower case (``SECRETS://`` is ``secrets://``), escapes of ASCII other than
    delimiters decoded (``m%6Fscow`` is ``moscow``, ``My%20Plans`` is ``My Plans``, as a
    glob writes it), and for a URL its host in lower case
    without its default port (``https://INTERNAL.corp:443/x`` is
    ``https://internal.corp/x``)."""
    scheme, colon, rest = uri.partition(":")
    if not colon or not _SCHEME.fullmatch(scheme):
        return _decoded(uri)
    scheme = scheme.lower()
    rest = _decoded(rest)
    if scheme in _SPECIAL and rest.startswith("//"):
        end = next((i for i, c in enumerate(rest[2:], 2) if c in "/?#"), len(rest))
        userinfo, at, host = rest[2:end].rpartition("@")
        host = host.lower().removesuffix(f":{_SPECIAL[scheme]}")
        rest = "//" + userinfo + at + host + rest[end:]
    return scheme + colon + rest


def _decoded(text: str) -> str:
    return _ESCAPE.sub(_ascii_escape, text) if "%" in text else text


def _ascii_escape(escape: re.Match[str]) -> str:
    """An escape of ASCII other than a delimiter decoded; a delimiter's, or a byte of a
    multi-byte character, kept as written."""
    char = chr(int(escape.group(1), 16))
    return char if char.isascii() and char not in _KEPT else escape.group(0)


def compile_access(team: McpAccess | None, *narrowing: McpAccess | None) -> McpPermissions:
    """Compile a team's MCP rules and the user / key rules that narrow them.

    ``compile_access(team.mcp, user.mcp, key.mcp)`` for a key; ``compile_access(team.mcp,
    user.mcp)`` for a JWT caller; ``None`` entries are skipped. A team without an
    ``mcp`` entry may reach no MCP server at all; one with an entry but no ``servers``
    rule reaches every server, and there uses only what its categories allow.
    """
    base = team or McpAccess()
    if team is None:
        servers = [_NOTHING]  # no mcp entry at all: not even initialize reaches a server
    else:
        servers = [_Rule(base.servers, False) if base.servers is not None else _EVERYTHING]
    rules: dict[Kind, list[_Rule]] = {
        kind: [_Rule(globs, False) if globs is not None else _NOTHING]
        for kind, globs in _categories(base)
    }
    for layer in narrowing:
        if layer is None:
            continue
        if layer.servers is not None:
            servers.append(_Rule(layer.servers, True))
        for kind, globs in _categories(layer):
            if globs is not None:
                rules[kind].append(_Rule(globs, True))
    return McpPermissions(tuple(servers), {k: tuple(v) for k, v in rules.items()})


def _categories(access: McpAccess) -> tuple[tuple[Kind, McpGlobs | None], ...]:
    return (
        (Kind.TOOL, access.tools),
        (Kind.RESOURCE, _canonical_globs(access.resources)),
        (Kind.PROMPT, access.prompts),
    )


def _canonical_globs(globs: McpGlobs | None) -> McpGlobs | None:
    """Resource globs as the URIs they match are compared (:func:`canonical_uri`)."""
    if globs is None:
        return None
    return McpGlobs(
        allow=[canonical_uri(g) for g in globs.allow], deny=[canonical_uri(g) for g in globs.deny]
    )


NO_ACCESS = compile_access(None)
"""Permissions of a caller the policy grants nothing on MCP servers."""
