"""MCP session ids bound to their caller (extproc/mcp/sessions.py), and the ticket key's
tags they use."""

from __future__ import annotations

import dataclasses

from extproc.identity import Principal
from extproc.mcp.access import NO_ACCESS
from extproc.mcp.sessions import SessionBinder
from extproc.policy.compiled import Limits
from extproc.ticket import TicketSigner, signing_key

ALICE = Principal("key", "k-alice", "apps", None, frozenset(), Limits(), NO_ACCESS)
"""A caller by gateway key; Limits and MCP access play no part in a session's tag."""


def binder(secret: str = "shared") -> SessionBinder:
    return SessionBinder(TicketSigner(signing_key(secret)))


def test_a_bound_id_comes_back_as_the_servers_for_its_caller_alone() -> None:
    sessions = binder()
    bound = sessions.bound("abc-123", ALICE)
    assert bound.startswith("abc-123.") and bound != "abc-123"
    assert sessions.unbound(bound, ALICE) == "abc-123"
    for other in (
        dataclasses.replace(ALICE, key_id="k-bob"),
        dataclasses.replace(ALICE, team="research"),
        dataclasses.replace(ALICE, source="jwt", key_id=None, user="alice"),
    ):
        assert sessions.unbound(bound, other) is None


def test_an_id_without_its_tag_or_with_another_is_refused() -> None:
    sessions = binder()
    bound = sessions.bound("abc", ALICE)
    assert sessions.unbound("abc", ALICE) is None
    assert sessions.unbound(".abc", ALICE) is None
    assert sessions.unbound(bound[:-1] + ("A" if bound[-1] != "A" else "B"), ALICE) is None
    assert sessions.unbound(sessions.bound("other", ALICE).replace("other", "abc"), ALICE) is None


def test_any_replica_sharing_the_key_reads_a_tag_and_none_other_does() -> None:
    """Nothing is stored: the tag is checked with the ticket key replicas share."""
    bound = binder("shared").bound("s-1", ALICE)
    assert binder("shared").unbound(bound, ALICE) == "s-1"
    assert binder("another").unbound(bound, ALICE) is None


def test_a_tag_made_for_one_purpose_is_no_tag_for_another() -> None:
    signer = TicketSigner(signing_key("shared"))
    tag = signer.tag(b"one", b"data")
    assert signer.tagged(b"one", b"data", tag)
    assert not signer.tagged(b"two", b"data", tag)
    assert not signer.tagged(b"one", b"other", tag)
