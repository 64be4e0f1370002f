"""MCP sessions bound to the caller that opened them.

A Streamable HTTP server names a session in the ``Mcp-Session-Id`` header of its answer to
``initialize``, and the client sends it back with every later request; many servers take
the id alone as who is asking. Passed through as it is, any caller the gateway admits
could use another's session (the id seen in a log, a shared trace) and read what the
server sends that session. So the gateway hands clients the server's id with a tag, a MAC
of the id and the caller's identity under the service's ticket key (shared by replicas,
:mod:`extproc.ticket`), and takes the tag off on the way back. An id whose tag is not this
caller's is answered as the spec answers a session the server does not know: HTTP 404,
after which a client starts a new session. Nothing is stored: any replica checks a tag.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from extproc.identity import Principal

if TYPE_CHECKING:  # the ticket module reads exchanges, which hold a binder
    from extproc.ticket import TicketSigner

HEADER = "mcp-session-id"
_PURPOSE = b"mcp-session"
_SEPARATOR = "."


@dataclass(frozen=True, slots=True)
class SessionBinder:
    """Tags session ids for their caller, with the keys of ``signer``."""

    signer: TicketSigner

    def bound(self, session_id: str, principal: Principal) -> str:
        """The id the client gets: the server's, then the caller's tag."""
        return session_id + _SEPARATOR + self.signer.tag(_PURPOSE, _caller(principal, session_id))

    def unbound(self, presented: str, principal: Principal) -> str | None:
        """The server's id in ``presented``, if its tag is this caller's; else ``None``."""
        session_id, separator, tag = presented.rpartition(_SEPARATOR)
        if not separator or not session_id:
            return None
        caller = _caller(principal, session_id)
        return session_id if self.signer.tagged(_PURPOSE, caller, tag) else None


def _caller(principal: Principal, session_id: str) -> bytes:
    """Who the caller is (how it was identified, its key, team and user) and the id."""
    fields = (principal.source, principal.key_id or "", principal.team, principal.user or "")
    return "\0".join((*fields, session_id)).encode("utf-8", "surrogatepass")
