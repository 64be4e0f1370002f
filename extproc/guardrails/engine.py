"""Compiled guardrails and the per-request check.

:func:`compile_guardrails` turns the policy's rules into detectors once per policy load
(regexes compiled, Presidio recognizers built and warmed, operator secrets read from the
environment). :meth:`Guardrails.check` then judges the texts of one request or answer:

- only rules whose stage and scope match run, each on the texts whose author it reads;
- every rule sees the *original* texts, so a rewrite by one rule can never hide a value
  from another rule that would block it;
- rules run in policy order; the first that blocks (``validate`` with a finding, or a
  ``mutate`` entity with ``action: block``) ends the check;
- ``mutate`` findings of all rules are merged (overlaps keep the strongest) and applied
  in one rewrite per text; ``audit`` findings are only recorded.

The result names rules, actions, entity types and counts, never a matched value, so it
can go to audit logs and metrics as it is. Compiled guardrails are immutable and safe to
share between threads; each call allocates its own state.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

from extproc.dialects.base import JsonPath, TextPart
from extproc.guardrails import config as cfg
from extproc.guardrails.answer import answer_texts
from extproc.guardrails.content import ContentDetector
from extproc.guardrails.findings import Finding, resolve_overlaps, rewrite
from extproc.guardrails.folding import folded
from extproc.guardrails.injection import Classifier, InjectionDetector
from extproc.guardrails.json_text import (
    Span,
    blanked,
    escapes,
    in_structure,
    outside,
    quotes,
    with_decoded,
)
from extproc.guardrails.linear import PatternError, Utf8
from extproc.guardrails.operators import OperatorError, Rewrite, build_operator
from extproc.guardrails.phone import PHONE_RECOGNIZER
from extproc.guardrails.pii import EntityScanner, entity_policy, with_context
from extproc.guardrails.presidio_backend import SPECS, presidio_recognizer
from extproc.guardrails.recognizers import Re2Recognizer, Recognizer
from extproc.guardrails.scope import ScopeMatcher, Subject
from extproc.guardrails.secrets import SECRETS_BY_TYPE

if TYPE_CHECKING:
    from extproc.guardrails.stream import StreamGuard

Stage = Literal["input", "output"]
Action = Literal["blocked", "rewritten", "recorded"]


class GuardrailConfigError(ValueError):
    """The rules cannot be compiled; the message names the rule and the reason."""


@dataclass(frozen=True, slots=True)
class Verdict:
    """What one rule did to one request or answer (no matched values, ever)."""

    rule: str
    detector: str
    """pii, secrets, injection or content."""
    stage: Stage
    action: Action
    entities: tuple[str, ...]
    """Entity types, attack families, ``topic:<name>``, ``banned_term`` or ``deny[i]``."""
    count: int
    """Findings (for injection: texts that scored over the threshold)."""
    score: float | None = None
    """The injection score, for injection rules."""


@dataclass(frozen=True, slots=True)
class GuardResult:
    verdicts: tuple[Verdict, ...] = ()
    rewrites: dict[JsonPath, str] = field(default_factory=dict)
    """New text per rewritten :class:`TextPart` path (empty when blocked)."""
    blocked_by: str | None = None
    """The rule that blocked, if any."""
    message: str | None = None
    """What to tell the caller when blocked: the rule's ``message`` or one naming it."""

    @property
    def blocked(self) -> bool:
        return self.blocked_by is not None


CLEAN = GuardResult()


class Detector(Protocol):
    def detect(self, text: Utf8) -> list[Finding]: ...


@dataclass(frozen=True, slots=True)
class EntityAction:
    block: bool
    rewrite: Rewrite


class CompiledRule:
    """One policy rule, ready to run."""

    __slots__ = (
        "actions",
        "default_action",
        "detector",
        "kind",
        "message",
        "mode",
        "name",
        "roles",
        "scope",
        "stages",
    )

    def __init__(
        self,
        rule: cfg.GuardrailRule,
        detector: Detector,
        actions: dict[str, EntityAction],
        default_action: EntityAction | None,
    ) -> None:
        self.name = rule.name
        self.kind: str = rule.detector.kind
        self.mode = rule.mode
        self.stages: frozenset[str] = (
            frozenset({"input", "output"}) if rule.stage == "both" else frozenset({rule.stage})
        )
        self.scope = ScopeMatcher(rule.scope)
        self.roles = frozenset(rule.roles) or None
        self.detector = detector
        self.actions = actions
        self.default_action = default_action
        self.message = rule.message or f"The content was blocked by guardrail {rule.name!r}."

    def applies(self, stage: str, subject: Subject) -> bool:
        return stage in self.stages and self.scope.matches(subject)

    def reads(self, part: TextPart) -> bool:
        return self.roles is None or part.role in self.roles

    def action(self, label: str) -> EntityAction | None:
        return self.actions.get(label, self.default_action)

    @property
    def holds_text(self) -> bool:
        """Whether a stream must hold text back for this rule (it may change or stop it)."""
        return self.mode != "audit"


APPLIES_CACHE_LIMIT = 4_096


class Guardrails:
    """The compiled rules of one policy version."""

    __slots__ = ("_applies", "rules", "stream_window")

    def __init__(self, rules: Sequence[CompiledRule], stream_window: int = 64) -> None:
        self.rules = tuple(rules)
        self.stream_window = stream_window
        self._applies: dict[tuple[str, Subject], bool] = {}
        """Answers of :meth:`applies`, asked two or three times per request; the rules of a
        policy version never change, so an answer holds until the policy is replaced."""

    def rules_for(
        self,
        stage: Stage,
        *,
        team: str | None,
        key_id: str | None,
        model: str | None,
        path: str,
    ) -> tuple[CompiledRule, ...]:
        subject = Subject(team, key_id, model, path)
        return tuple(rule for rule in self.rules if rule.applies(stage, subject))

    def applies(
        self,
        stage: Stage,
        *,
        team: str | None,
        key_id: str | None,
        model: str | None,
        path: str,
    ) -> bool:
        """Whether any rule would look at this stage: if not, skip the phase entirely."""
        subject = Subject(team, key_id, model, path)
        known = self._applies.get((stage, subject))
        if known is None:
            known = any(rule.applies(stage, subject) for rule in self.rules)
            if len(self._applies) < APPLIES_CACHE_LIMIT:  # paths may be endless
                self._applies[(stage, subject)] = known
        return known

    def check(
        self,
        stage: Stage,
        texts: Sequence[TextPart],
        *,
        team: str | None,
        key_id: str | None,
        model: str | None,
        path: str,
        json_safe: bool = True,
    ) -> GuardResult:
        """Judge ``texts`` (a request's or an answer's) under the rules that apply.
        ``json_safe``: a finding whose rewrite would leave JSON source no JSON (a number)
        blocks; without it (an audit record's redaction) it is rewritten."""
        rules = self.rules_for(stage, team=team, key_id=key_id, model=model, path=path)
        return run_rules(rules, stage, texts, json_safe)

    def check_answer(
        self,
        dialect: str,
        body: Any,
        *,
        team: str | None,
        key_id: str | None,
        model: str | None,
        path: str,
    ) -> GuardResult:
        """Judge a non-streamed answer; rewrites are JSON paths into ``body``."""
        rules = self.rules_for("output", team=team, key_id=key_id, model=model, path=path)
        if not rules:
            return GuardResult()
        return run_rules(rules, "output", answer_texts(dialect, body))

    def stream(
        self,
        dialect: str,
        *,
        team: str | None,
        key_id: str | None,
        model: str | None,
        path: str,
    ) -> StreamGuard | None:
        """A guard for one streamed answer, or ``None`` when no output rule applies.

        Raises ``ValueError`` for a dialect whose streams cannot be read
        (see :data:`extproc.guardrails.sse.STREAM_DIALECTS`).
        """
        rules = self.rules_for("output", team=team, key_id=key_id, model=model, path=path)
        if not rules:
            return None
        from extproc.guardrails.stream import StreamGuard

        return StreamGuard(rules, dialect, self.stream_window)


def run_rules(
    rules: Sequence[CompiledRule],
    stage: Stage,
    texts: Sequence[TextPart],
    json_safe: bool = True,
) -> GuardResult:
    """The check itself, on rules already selected (streams select them once)."""
    if not rules or not texts:
        return GuardResult()
    texts = with_decoded(texts)
    encoded: dict[int, tuple[Utf8, list[Span]]] = {}
    verdicts: list[Verdict] = []
    pending: dict[int, list[tuple[Finding, Rewrite]]] = {}
    for rule in rules:
        hits: list[tuple[int, list[Finding]]] = []
        for i, part in enumerate(texts):
            if not part.text or not rule.reads(part):
                continue
            entry = encoded.get(i)
            if entry is None:
                entry = encoded[i] = readable(part.text, part.json_source)
            data, spans = entry
            found = rule.detector.detect(data)
            if spans:
                found = outside(found, spans, data.text)
            if found:
                hits.append((i, found))
        if not hits:
            continue
        findings = [f for _, found in hits for f in found]
        if rule.mode == "audit":
            verdicts.append(_verdict(rule, stage, "recorded", findings, len(hits)))
            continue
        if rule.mode == "validate":
            verdicts.append(_verdict(rule, stage, "blocked", findings, len(hits)))
            return GuardResult(tuple(verdicts), {}, rule.name, rule.message)
        quoted = {i: quotes(encoded[i][1]) for i, _ in hits if texts[i].json_source}
        blocking = [
            f
            for i, found in hits
            for f in found
            if (a := rule.action(f.label)) is not None
            and (
                a.block
                or texts[i].locked
                or (json_safe and texts[i].json_source and in_structure(f, quoted[i]))
            )
        ]
        if blocking:
            verdicts.append(_verdict(rule, stage, "blocked", blocking, len(hits)))
            return GuardResult(tuple(verdicts), {}, rule.name, rule.message)
        for i, found in hits:
            slot = pending.setdefault(i, [])
            for finding in found:
                action = rule.action(finding.label)
                if action is not None:
                    slot.append((finding, action.rewrite))
        verdicts.append(_verdict(rule, stage, "rewritten", findings, len(hits)))
    rewrites: dict[JsonPath, str] = {}
    for i, items in pending.items():
        new = apply_findings(texts[i].text, items)
        if new != texts[i].text:
            rewrites[texts[i].path] = new
    return GuardResult(tuple(verdicts), rewrites)


def readable(text: str, json_source: bool) -> tuple[Utf8, list[Span]]:
    """``text`` as detectors read it, and its escapes (whole texts and stream windows
    alike): look-alikes of ASCII folded (:mod:`.folding`); JSON source read as such
    (:mod:`.json_text`). Findings in it are offsets in ``text``."""
    spans = escapes(text) if json_source else []
    return Utf8(folded(blanked(text, spans) if spans else text)), spans


def apply_findings(text: str, items: Sequence[tuple[Finding, Rewrite]]) -> str:
    """``text`` with every finding rewritten by its operator (overlaps keep the best)."""
    by_finding: dict[int, Rewrite] = {}
    for finding, operator in items:
        by_finding.setdefault(id(finding), operator)
    kept = resolve_overlaps(f for f, _ in items)
    return rewrite(text, kept, lambda f, value: by_finding[id(f)](f.label, value))


def _verdict(
    rule: CompiledRule, stage: Stage, action: Action, findings: list[Finding], texts: int
) -> Verdict:
    labels = tuple(sorted({f.label for f in findings}))
    if rule.kind == "injection":
        return Verdict(
            rule.name, rule.kind, stage, action, labels, texts, max(f.score for f in findings)
        )
    return Verdict(rule.name, rule.kind, stage, action, labels, len(findings))


# --- compilation -------------------------------------------------------------------------


def compile_guardrails(
    rules: Sequence[cfg.GuardrailRule],
    settings: cfg.GuardrailSettings | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    classifiers: Mapping[str, Classifier] | None = None,
) -> Guardrails:
    """Compile validated rules; raises :class:`GuardrailConfigError` naming the rule.

    ``environ`` (default: ``os.environ``) supplies operator secrets; ``classifiers``
    supplies the injection classifiers rules may name.
    """
    settings = settings or cfg.GuardrailSettings()
    env = os.environ if environ is None else environ
    problems = cfg.guardrail_problems(list(rules), settings)
    if problems:
        raise GuardrailConfigError("; ".join(problems))
    compiled = []
    for i, rule in enumerate(rules):
        try:
            compiled.append(_compile_rule(rule, settings, env, classifiers or {}))
        except (OperatorError, PatternError, KeyError) as exc:
            reason = exc.args[0] if exc.args else str(exc)
            raise GuardrailConfigError(f"guardrails[{i}] ({rule.name}): {reason}") from None
    return Guardrails(compiled, settings.stream_window)


def _compile_rule(
    rule: cfg.GuardrailRule,
    settings: cfg.GuardrailSettings,
    environ: Mapping[str, str],
    classifiers: Mapping[str, Classifier],
) -> CompiledRule:
    det = rule.detector
    if isinstance(det, cfg.InjectionDetector):
        classifier = None
        if det.classifier is not None:
            if det.classifier not in classifiers:
                raise KeyError(f"no classifier named {det.classifier!r} is registered")
            classifier = classifiers[det.classifier]
        detector = InjectionDetector(det.threshold, det.families, det.decode, classifier)
        return CompiledRule(rule, detector, {}, None)
    if isinstance(det, cfg.ContentDetector):
        content = ContentDetector(
            list(det.deny), list(det.allow), list(det.banned_terms),
            {k: list(v) for k, v in det.topics.items()}, det.case_sensitive,
        )  # fmt: skip
        replacement = det.replacement
        action = EntityAction(block=False, rewrite=lambda entity, value: replacement)
        return CompiledRule(rule, content, {}, action)
    scanner, actions = _entity_scanner(det, settings, environ)
    return CompiledRule(rule, scanner, actions, None)


def _entity_scanner(
    det: cfg.PiiDetector | cfg.SecretsDetector,
    settings: cfg.GuardrailSettings,
    environ: Mapping[str, str],
) -> tuple[EntityScanner, dict[str, EntityAction]]:
    listed = det.entities if isinstance(det, cfg.PiiDetector) else det.types
    custom = det.custom if isinstance(det, cfg.PiiDetector) else []
    custom_specs = {
        c.name: Re2Recognizer(c.name, c.pattern, c.score, tuple(c.context)) for c in custom
    }
    configured = {rule.type: rule for rule in listed}
    for name in custom_specs:
        configured.setdefault(name, cfg.EntityRule(type=name))

    def operator(op: cfg.Operator) -> Rewrite:
        return build_operator(op, environ, settings.hash_salt_env, settings.encryption_key_env)

    default_rewrite = operator(det.operator)
    recognizers: list[Recognizer] = []
    policies = {}
    actions = {}
    for index, (name, entity) in enumerate(configured.items()):
        recognizer = _recognizer(name, custom_specs)
        recognizers.append(recognizer)
        context = [*recognizer.context, *entity.context]
        policies[name] = entity_policy(
            _threshold(det, entity, recognizer, bool(context), index),
            [*det.allow_list, *entity.allow_list],
            context,
        )
        actions[name] = EntityAction(
            block=entity.action == "block",
            rewrite=default_rewrite if entity.operator is None else operator(entity.operator),
        )
    return EntityScanner(recognizers, policies), actions


def _threshold(
    det: cfg.PiiDetector | cfg.SecretsDetector,
    entity: cfg.EntityRule,
    recognizer: Recognizer,
    context: bool,
    index: int,
) -> float:
    """The entity's threshold. Presidio scores some entities so low (US_PASSPORT 0.1,
    US_BANK_NUMBER 0.05: any run of digits) that even a context word near them left them
    under the default 0.5: listed, they were never reported. For an entity the detector's
    threshold reaches with no candidate, it is lowered to what a context word gives the
    weakest (reported with one, never without); an entity's own threshold that no
    candidate could reach is refused."""
    scores: tuple[float, ...] | None = getattr(recognizer, "pattern_scores", None)
    if scores is None:
        return det.threshold if entity.threshold is None else entity.threshold
    if context:
        scores = tuple(with_context(score) for score in scores)
    ceiling = scores[-1]
    if entity.threshold is None:
        # Every candidate with a context word near it, when the default reaches none.
        return det.threshold if det.threshold <= ceiling else scores[0]
    if entity.threshold > ceiling:
        raise ValueError(
            f"entities[{index}].threshold: {entity.type} scores at most {ceiling:.2f} (with "
            f"a context word near it); a threshold of {entity.threshold:g} never reports it"
        )
    return entity.threshold


def _recognizer(name: str, custom: Mapping[str, Re2Recognizer]) -> Recognizer:
    if name in custom:
        return custom[name].compiled()
    if name in SECRETS_BY_TYPE:
        return SECRETS_BY_TYPE[name].compiled()
    if name == PHONE_RECOGNIZER.entity:
        return PHONE_RECOGNIZER.compiled()
    if name in SPECS:
        return presidio_recognizer(name)
    raise KeyError(f"unknown entity {name!r}")


def describe(result: GuardResult) -> list[dict[str, Any]]:
    """Verdicts as plain dicts (for JSON audit records and logs)."""
    return [
        {
            "rule": v.rule,
            "detector": v.detector,
            "stage": v.stage,
            "action": v.action,
            "entities": list(v.entities),
            "count": v.count,
            **({"score": round(v.score, 3)} if v.score is not None else {}),
        }
        for v in result.verdicts
    ]


HEADER_GUARDRAILS = "x-gateway-guardrails"
"""Lists the guardrail verdicts on the answer (rule, action, entity types, counts)."""


def verdict_header(verdicts: Sequence[Mapping[str, Any]]) -> tuple[tuple[str, str], ...]:
    """``x-gateway-guardrails: rule=action[ENTITY,...]xCOUNT; ...`` (never matched values)."""
    if not verdicts:
        return ()
    items = [
        f"{v['rule']}={v['action']}"
        + (f"[{','.join(v['entities'])}]" if v["entities"] else "")
        + f"x{v['count']}"
        for v in verdicts
    ]
    return ((HEADER_GUARDRAILS, "; ".join(items)),)
