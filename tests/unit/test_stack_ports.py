"""The ports a test stack is given: free, and never one twice."""

from __future__ import annotations

import dataclasses
import socket

from extproc.stack import Ports


def test_free_ports_are_all_different_and_bindable() -> None:
    for _ in range(5000):  # one closed too early came back about once in 500 draws
        ports = list(dataclasses.astuple(Ports.free()))
        assert len(set(ports)) == len(ports)
    for port in ports:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_ports_chosen_for_a_second_stack_avoid_the_firsts() -> None:
    first = Ports.free()
    taken = set(dataclasses.astuple(first))
    for _ in range(2000):
        assert not taken & set(dataclasses.astuple(Ports.free(avoid=first)))
