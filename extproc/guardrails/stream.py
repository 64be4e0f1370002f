"""Output guardrails on streamed (SSE) answers, with a bounded hold-back window.

The answer arrives as many small text deltas; a value a rule cares about (an e-mail, a
key, a banned phrase) can be split across them. The guard therefore holds back *events*
(not text): an event leaves when all of its text is *settled*, and it leaves byte for
byte as it came unless a rewrite touches its text, in which case it is re-serialised.
Events keep their order; events without text wait only behind held ones.

Per *channel* (a choice's content, a tool call's arguments, a content block) text is
settled up to the start of what may still be the beginning of something: the trailing
token (no whitespace yet; digit groups joined by single spaces count as one token, as in
``4111 1111``), and any finding that reaches into it. At most ``window`` characters stay
unsettled; past that the oldest are settled, and a finding cut there goes on being
rewritten (masked or dropped) until its token ends. The last settled characters are read
again as context (so ``Bearer`` sent earlier still qualifies the token arriving now).

A ``validate`` finding (or a ``mutate`` entity with ``action: block``) drops what is held
and ends the stream with an error event in the dialect's format; nothing after it is
sent. Rules in ``audit`` mode hold nothing back. The end of a channel (``finish_reason``,
``content_block_stop``, ``[DONE]``, ``message_stop``) settles everything it holds.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from extproc import sse
from extproc.guardrails.engine import (
    Action,
    CompiledRule,
    GuardResult,
    Stage,
    Verdict,
    readable,
)
from extproc.guardrails.findings import Finding, resolve_overlaps
from extproc.guardrails.folding import folded
from extproc.guardrails.json_text import outside
from extproc.guardrails.operators import Rewrite
from extproc.guardrails.secrets import PRIVATE_KEY_FOOTER
from extproc.guardrails.sse import (
    ALL,
    STREAM_DIALECTS,
    ChannelKey,
    Event,
    StreamDialect,
    parse_event,
)

MAX_EVENT_BYTES = 1024 * 1024
"""An incomplete event larger than this cannot be inspected: the stream is ended."""
_CONTEXT = 64
"""Characters of settled text read again as context."""
_ASSISTANT = "assistant"
_STAGE: Stage = "output"


@dataclass(slots=True)
class _Continuation:
    label: str
    rewrite: Rewrite
    keeps_length: bool
    pem: bool
    seen: str = ""
    """A private key's last characters so far: its footer ends the key, and the prose
    after it is no part of it."""


@dataclass(slots=True)
class _Channel:
    """Text of one channel, in absolute character offsets since the stream began."""

    buf: str = ""
    """Received, not settled."""
    settled: int = 0
    """Offset up to which text is settled (judged, rewrites decided)."""
    emitted: int = 0
    """Offset up to which text has been sent."""
    tail: str = ""
    """The last settled characters (context)."""
    rewrites: list[tuple[int, int, str]] = field(default_factory=list)
    """(start, end, replacement) for settled text not yet sent; sorted, disjoint."""
    continuation: _Continuation | None = None
    json_source: bool = False
    """Tool arguments: JSON source, read with its escapes blanked (:mod:`.json_text`)."""

    @property
    def received(self) -> int:
        return self.settled + len(self.buf)


@dataclass(slots=True)
class _Part:
    channel: ChannelKey
    start: int
    end: int
    text: str
    set_text: Callable[[str], None]


@dataclass(slots=True)
class _Queued:
    raw: bytes
    event: Event
    parts: list[_Part]


@dataclass(slots=True)
class _Tally:
    kind: str
    action: Action
    labels: set[str] = field(default_factory=set)
    count: int = 0
    score: float | None = None


@dataclass(frozen=True, slots=True)
class _Unreadable:
    """What blocks a stream whose event the guards cannot read (fail closed)."""

    name: str = "unreadable-answer"
    message: str = (
        "The provider's answer could not be checked by the gateway's output guardrails: "
        "an event of its stream is not valid JSON."
    )


UNREADABLE = _Unreadable()


class StreamGuard:
    """Guards one streamed answer; not thread-safe (one per exchange)."""

    def __init__(self, rules: Sequence[CompiledRule], dialect: str, window: int = 64) -> None:
        factory = STREAM_DIALECTS.get(dialect)
        if factory is None:
            raise ValueError(f"streams of {dialect!r} cannot be guarded")
        self._dialect: StreamDialect = factory()
        self._rules = tuple(r for r in rules if r.roles is None or _ASSISTANT in r.roles)
        self._holds = any(r.holds_text for r in self._rules)
        self._window = window
        self._events = sse.Events()
        self._channels: dict[ChannelKey, _Channel] = {}
        self._queue: deque[_Queued] = deque()
        self._tallies: dict[str, _Tally] = {}
        self._blocked: CompiledRule | _Unreadable | None = None

    @property
    def result(self) -> GuardResult:
        """Verdicts so far (and the blocking rule, if one fired)."""
        verdicts = tuple(
            Verdict(name, t.kind, _STAGE, t.action, tuple(sorted(t.labels)), t.count, t.score)
            for name, t in self._tallies.items()
        )
        blocked = self._blocked
        if blocked is None:
            return GuardResult(verdicts)
        return GuardResult(verdicts, {}, blocked.name, blocked.message)

    def feed(self, chunk: bytes) -> bytes:
        """The bytes to send to the client now for ``chunk`` of the upstream answer."""
        if self._blocked is not None:
            return b""
        out = bytearray()
        for raw in self._events.feed(chunk):
            out += self._event(raw)
            if self._blocked is not None:
                self._events.clear()
                return bytes(out)
        if self._events.held > MAX_EVENT_BYTES:
            if self._holds:  # it cannot be judged, so it cannot pass
                self._events.clear()
                holder = next(r for r in self._rules if r.holds_text)
                out += self._block(holder, ["oversized_event"], None)
            else:  # audit only: nothing is held back, so it passes unread, not piled up
                out += self._events.rest()
        return bytes(out)

    def finish(self) -> bytes:
        """The stream ended: settle and send everything held."""
        if self._blocked is not None:
            return b""
        out = bytearray()
        rest = self._events.rest()
        if rest.strip():
            out += self._event(rest + b"\n\n")
        if self._blocked is None:
            for channel in self._channels.values():
                self._settle(channel, "", final=True)
                if self._blocked is not None:
                    return bytes(out) + self._error()
            out += self._release()
        return bytes(out)

    # --- events ---------------------------------------------------------------------------

    def _event(self, raw: bytes) -> bytes:
        event = parse_event(raw)
        if self._rules and _malformed(event):
            # JSON the guards cannot read would pass unchecked: nothing passes instead.
            self._blocked = UNREADABLE
            return self._error()
        parts: list[_Part] = []
        for delta in self._dialect.deltas(event) if self._rules else []:
            channel = self._channels.get(delta.channel)
            if channel is None:
                channel = self._channels[delta.channel] = _Channel(json_source=delta.json_source)
            start = channel.received
            self._settle(channel, delta.text, final=False)
            if self._blocked is not None:
                return self._error()
            end = start + len(delta.text)
            parts.append(_Part(delta.channel, start, end, delta.text, delta.set_text))
        ends = self._dialect.ends(event) if self._channels else ()
        for key, channel in self._channels.items():
            if any(_ends(key, end) for end in ends):
                self._settle(channel, "", final=True)
                if self._blocked is not None:
                    return self._error()
        if not self._queue and not parts:
            return raw
        self._queue.append(_Queued(raw, event, parts))
        return self._release()

    def _release(self) -> bytes:
        """Send, in order, every queued event whose text is all settled."""
        out = bytearray()
        while self._queue:
            queued = self._queue[0]
            if any(p.end > self._channels[p.channel].settled for p in queued.parts):
                break
            self._queue.popleft()
            changed = False
            for part in queued.parts:
                channel = self._channels[part.channel]
                text = _apply(channel, part)
                if text is not None:
                    part.set_text(text)
                    changed = True
                channel.emitted = part.end
                if channel.rewrites and channel.rewrites[0][1] <= part.end:
                    channel.rewrites = [r for r in channel.rewrites if r[1] > part.end]
            out += queued.event.render() if changed else queued.raw
        return bytes(out)

    def _error(self) -> bytes:
        self._queue.clear()
        assert self._blocked is not None
        return self._dialect.error_event(self._blocked.message)

    # --- text -----------------------------------------------------------------------------

    def _settle(self, channel: _Channel, text: str, final: bool) -> None:
        """Append ``text``; settle what may be judged now and record its rewrites."""
        if channel.continuation is not None and text:
            text = self._continue(channel, text)
        channel.buf += text
        buf = channel.buf
        if not buf:
            return
        if not self._holds:
            hold = len(buf)
            findings = self._findings(channel, buf)
        else:
            findings = self._findings(channel, buf)
            if self._blocked is not None:
                return
            hold = len(buf) if final else self._hold(buf, len(channel.tail), findings)
        base = len(channel.tail)
        origin = channel.settled - base  # absolute offset of the window's start
        mutations: list[tuple[Finding, Rewrite]] = []
        for rule, finding in findings:
            if finding.end > base + hold:
                continue  # still growing: judged once it is complete
            self._tally(rule, finding)
            action = rule.action(finding.label)
            if rule.mode == "mutate" and action is not None:
                mutations.append((finding, action.rewrite))
                if finding.end == base + len(buf) and not final:
                    value = (channel.tail + buf)[
                        max(finding.start, finding.end - _PEM_SEEN) : finding.end
                    ]
                    channel.continuation = _continuation(finding, action.rewrite, value)
        window = channel.tail + buf
        for finding in resolve_overlaps(f for f, _ in mutations):
            operator = next(op for f, op in mutations if f is finding)
            start = max(origin + finding.start, channel.emitted)
            end = origin + finding.end
            if start < end:
                value = window[start - origin : finding.end]
                _record(channel, start, end, operator(finding.label, value))
        channel.tail = (channel.tail + buf[:hold])[-_CONTEXT:]
        channel.buf = buf[hold:]
        channel.settled += hold

    def _findings(self, channel: _Channel, buf: str) -> list[tuple[CompiledRule, Finding]]:
        base = len(channel.tail)
        window, spans = readable(channel.tail + buf, channel.json_source)
        found: list[tuple[CompiledRule, Finding]] = []
        for rule in self._rules:
            detected = rule.detector.detect(window)
            findings = [f for f in outside(detected, spans, window.text) if f.end > base]
            if findings and (
                rule.mode == "validate"
                or any((a := rule.action(f.label)) is not None and a.block for f in findings)
            ):
                score = max(f.score for f in findings) if rule.kind == "injection" else None
                self._block(rule, [f.label for f in findings], score)
                return []
            found.extend((rule, f) for f in findings)
        return found

    def _hold(self, buf: str, base: int, found: list[tuple[CompiledRule, Finding]]) -> int:
        """How much of ``buf`` may be settled now; the rest is held back (judged on the
        text as the detectors read it: a number's groups joined by no-break spaces are
        held as ASCII ones are)."""
        hold = _hold_start(folded(buf), self._window)
        for _, finding in found:  # a finding reaching into the held part is held whole
            if finding.start < base + hold < finding.end:
                hold = min(hold, max(finding.start - base, 0))
        if len(buf) - hold > self._window:
            # Too much held: settle the oldest text, and whole any finding cut there
            # (a value longer than the window is rewritten, then continued).
            hold = len(buf) - self._window
            for _, finding in sorted(found, key=lambda item: item[1].start):
                if finding.start < base + hold < finding.end:
                    hold = finding.end - base
        return hold

    def _continue(self, channel: _Channel, text: str) -> str:
        """Rewrite the rest of a value that was cut at the window edge; return the rest."""
        state = channel.continuation
        assert state is not None
        end, footer = 0, False
        while end < len(text) and _continues(text[end], state.pem):
            end += 1
            if state.pem:
                state.seen = (state.seen + text[end - 1])[-_PEM_SEEN:]
                if _PEM_FOOTER.search(state.seen):
                    footer = True
                    break
        if end < len(text) or footer:
            channel.continuation = None
        if end:
            start = channel.received
            piece = text[:end]
            replacement = state.rewrite(state.label, piece) if state.keeps_length else ""
            _record(channel, start, start + end, replacement)
            channel.tail = (channel.tail + piece)[-_CONTEXT:]
            channel.settled += end
        return text[end:]

    def _tally(self, rule: CompiledRule, finding: Finding) -> None:
        action: Action = "recorded" if rule.mode == "audit" else "rewritten"
        tally = self._tallies.setdefault(rule.name, _Tally(rule.kind, action))
        tally.labels.add(finding.label)
        tally.count += 1
        if rule.kind == "injection":
            tally.score = max(tally.score or 0.0, finding.score)

    def _block(self, rule: CompiledRule, labels: list[str], score: float | None) -> bytes:
        self._blocked = rule
        tally = self._tallies.setdefault(rule.name, _Tally(rule.kind, "blocked"))
        tally.action = "blocked"
        tally.labels.update(labels)
        tally.count += 1 if rule.kind == "injection" else len(labels)
        tally.score = score
        return self._error()


def _record(channel: _Channel, start: int, end: int, replacement: str) -> None:
    channel.rewrites.append((start, end, replacement))
    channel.rewrites.sort()


def _apply(channel: _Channel, part: _Part) -> str | None:
    """The part's text with the channel's rewrites, or ``None`` if none touch it.

    A replacement goes into the part where its span starts; the rest of the span is
    removed from later parts, so a value split over events is replaced exactly once.
    """
    touching = [r for r in channel.rewrites if r[0] < part.end and part.start < r[1]]
    if not touching:
        return None
    out: list[str] = []
    position = part.start
    for start, end, replacement in touching:
        cut = max(start, part.start)
        out.append(part.text[position - part.start : cut - part.start])
        if start >= part.start:
            out.append(replacement)
        position = max(position, min(end, part.end))
    out.append(part.text[position - part.start :])
    return "".join(out)


def _ends(key: ChannelKey, end: ChannelKey) -> bool:
    """Whether ``end`` closes channel ``key``: all of them, the channel itself and those
    under it (a block's texts), or a choice's tool calls."""
    return end == ALL or key[: len(end)] == end or (end[0] == "choice" and key[1] == end[1])


def _hold_start(buf: str, window: int) -> int:
    """Where the trailing may-be-a-value region of ``buf`` starts (at most ``window`` back).

    The region is the last token (no whitespace), extended backwards over single spaces
    that join groups of a number written in groups (card numbers, phone numbers, and
    IBANs, whose groups may be letters: ``GB82 WEST 1234``).
    """
    i = len(buf)
    floor = max(0, len(buf) - window)
    while i > floor:
        char = buf[i - 1]
        if not char.isspace():
            i -= 1
            continue
        before = _token_before(buf, i - 1)
        joins = char == " " and (_numberish(before[-1:]) or _bank_code(before))
        after = "" if i == len(buf) else _token_after(buf, i)
        if joins and (not after or _numberish(after[:1]) or _bank_code(after)):
            i -= 1
            continue
        break
    return i


def _token_before(buf: str, end: int) -> str:
    start = end
    while start > 0 and not buf[start - 1].isspace():
        start -= 1
    return buf[start:end]


def _token_after(buf: str, start: int) -> str:
    end = start
    while end < len(buf) and not buf[end].isspace():
        end += 1
    return buf[start:end]


def _numberish(char: str) -> bool:
    """A character that ends or starts a group of a number written in groups."""
    return char.isdigit() or (char != "" and char in "+()-")


def _bank_code(token: str) -> bool:
    """A short group of capitals and digits, as an IBAN writes its bank code."""
    return 0 < len(token) <= 4 and token.isascii() and token.isalnum() and token.isupper()


def _continues(char: str, pem: bool) -> bool:
    if pem:
        return char.isalnum() or char in "+/=-\r\n "
    return not char.isspace()


def _continuation(finding: Finding, operator: Rewrite, value: str) -> _Continuation | None:
    """How to go on rewriting a value cut at the window's edge (none for a private key
    whose footer it already holds)."""
    probe = operator(finding.label, "abcd")
    pem = finding.label == "PRIVATE_KEY"
    if pem and _PEM_FOOTER.search(value):
        return None
    return _Continuation(finding.label, operator, len(probe) == 4, pem, value)


_PEM_SEEN = 64
_PEM_FOOTER = re.compile(PRIVATE_KEY_FOOTER + "$")


def _malformed(event: Event) -> bool:
    """An event whose data looks like JSON (a ``{`` or ``[``) and is not; ``[DONE]`` is
    OpenAI's end marker, not JSON."""
    data = event.data.strip() if event.data is not None else b""
    return event.payload is None and data[:1] in (b"{", b"[") and data != b"[DONE]"
