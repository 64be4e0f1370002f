"""``extproc eval``: measure the detectors on public data sets, and what they cost.

Data (``../shared/data`` relative to the project): PII spans from Presidio's synthetic
set; labelled injections from InjecGuard's validation set; benign prompts full of
trigger words from NotInject; XSTest's safe prompts that look unsafe. The results are
reported as they are: nothing here tunes a detector. Secrets have no public set, so a
seeded synthetic one is generated (keys in sentences, plus look-alikes that are not keys).

- PII: per entity, a gold span is found when a prediction of the same entity overlaps
  it; a prediction is correct when it overlaps a gold span of its entity.
- Injection: true-positive rate on the injections; false-positive rate on each benign set.
- Cost: CPU per KB of the default rule set (PII mask + secrets + injection) on clean and
  PII-dense 1 KB prompts, and seconds for 1 MB pathological inputs.
"""

from __future__ import annotations

import csv
import json
import random
import statistics
import string
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from extproc.dialects.base import TextPart
from extproc.guardrails.config import GuardrailRule
from extproc.guardrails.engine import Guardrails, compile_guardrails
from extproc.guardrails.findings import Finding
from extproc.guardrails.injection import InjectionDetector
from extproc.guardrails.linear import Utf8

STRUCTURED = ("EMAIL_ADDRESS", "CREDIT_CARD", "IBAN_CODE", "US_SSN", "IP_ADDRESS", "PHONE_NUMBER")

DEFAULT_RULES = """
- name: mask-pii
  stage: both
  mode: mutate
  detector:
    kind: pii
    entities: [EMAIL_ADDRESS, CREDIT_CARD, IBAN_CODE, US_SSN, IP_ADDRESS, PHONE_NUMBER]
- name: mask-secrets
  stage: both
  mode: mutate
  detector: {kind: secrets}
- name: block-injection
  stage: input
  mode: validate
  detector: {kind: injection, threshold: 0.5}
"""
"""The rule set whose cost is measured (and a starting point for a policy)."""

PATHOLOGICAL: dict[str, Callable[[], str]] = {
    "'a' * 1e6": lambda: "a" * 1_000_000,
    "'@' * 1e6": lambda: "@" * 1_000_000,
    "'1 ' * 5e5": lambda: "1 " * 500_000,
    "'a@b.' * 2.5e5": lambda: "a@b." * 250_000,
    "'ignore ' * 1.4e5": lambda: "ignore " * 142_857,
}


def default_guardrails() -> Guardrails:
    rules = [GuardrailRule.model_validate(r) for r in yaml.safe_load(DEFAULT_RULES)]
    return compile_guardrails(rules)


def run_eval(data_dir: Path | str) -> dict[str, Any]:
    """Every measurement, as plain data (see :func:`format_report`)."""
    data = Path(data_dir)
    started = time.perf_counter()
    guardrails = default_guardrails()
    warmup = time.perf_counter() - started
    pii_rule = guardrails.rules[0]
    secrets_rule = guardrails.rules[1]
    report: dict[str, Any] = {"compile_seconds": round(warmup, 2)}
    pii_rows = json.loads((data / "pii" / "presidio_synth_dataset_v2.json").read_text())
    report["pii"] = _pii(pii_rows, lambda text: pii_rule.detector.detect(Utf8(text)))
    report["phone_presidio"] = _presidio_phone(pii_rows)
    report["secrets"] = _secrets(lambda text: secrets_rule.detector.detect(Utf8(text)))
    report["injection"] = _injection(data, InjectionDetector(0.5))
    report["cost"] = _cost(guardrails, pii_rows, data)
    return report


# --- PII ---------------------------------------------------------------------------------


def _pii(rows: list[dict[str, Any]], detect: Callable[[str], list[Finding]]) -> dict[str, Any]:
    tp: Counter[str] = Counter()
    fp: Counter[str] = Counter()
    fn: Counter[str] = Counter()
    for row in rows:
        text = row["full_text"]
        gold = [
            (s["entity_type"], s["start_position"], s["end_position"])
            for s in row["spans"]
            if s["entity_type"] in STRUCTURED
        ]
        found = [f for f in detect(text) if f.label in STRUCTURED]
        _score(gold, [(f.label, f.start, f.end) for f in found], tp, fp, fn)
    return _table(tp, fp, fn)


def _score(
    gold: list[tuple[str, int, int]],
    found: list[tuple[str, int, int]],
    tp: Counter[str],
    fp: Counter[str],
    fn: Counter[str],
) -> None:
    def hit(a: tuple[str, int, int], b: tuple[str, int, int]) -> bool:
        return a[0] == b[0] and a[1] < b[2] and b[1] < a[2]

    for g in gold:
        if any(hit(g, f) for f in found):
            tp[g[0]] += 1
        else:
            fn[g[0]] += 1
    for f in found:
        if not any(hit(f, g) for g in gold):
            fp[f[0]] += 1


def _table(tp: Counter[str], fp: Counter[str], fn: Counter[str]) -> dict[str, Any]:
    table: dict[str, Any] = {}
    for entity in sorted(set(tp) | set(fp) | set(fn)):
        t, p, n = tp[entity], fp[entity], fn[entity]
        table[entity] = {
            "support": t + n,
            "tp": t,
            "fp": p,
            "fn": n,
            "precision": round(t / (t + p), 3) if t + p else None,
            "recall": round(t / (t + n), 3) if t + n else None,
        }
    return table


def _presidio_phone(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Presidio's own phone recognizer on the same texts, for the record of the choice."""
    from extproc.guardrails.presidio_import import recognizer_class

    recognizer: Any = recognizer_class("PhoneRecognizer")()
    tp: Counter[str] = Counter()
    fp: Counter[str] = Counter()
    fn: Counter[str] = Counter()
    size = 0
    started = time.process_time()
    for row in rows:
        text = row["full_text"]
        size += len(text.encode())
        found = [("PHONE_NUMBER", r.start, r.end) for r in recognizer.analyze(text, [], None)]
        gold = [
            (s["entity_type"], s["start_position"], s["end_position"])
            for s in row["spans"]
            if s["entity_type"] == "PHONE_NUMBER"
        ]
        _score(gold, found, tp, fp, fn)
    seconds = time.process_time() - started
    return {**_table(tp, fp, fn), "ms_per_kb": round(seconds * 1000 / (size / 1024), 3)}


# --- secrets -----------------------------------------------------------------------------


def _token(rng: random.Random, alphabet: str, n: int) -> str:
    return "".join(rng.choice(alphabet) for _ in range(n))


def secret_samples(seed: int = 7) -> tuple[list[tuple[str, str]], list[str]]:
    """(type, sentence) with one credential each, and look-alike sentences with none."""
    rng = random.Random(seed)
    alnum = string.ascii_letters + string.digits
    b32 = string.ascii_uppercase + "234567"
    b64url = alnum + "-_"

    def jwt() -> str:
        import base64

        header = base64.urlsafe_b64encode(b'{"alg":"HS256","typ":"JWT"}').rstrip(b"=").decode()
        body = base64.urlsafe_b64encode(b'{"sub":"%d"}' % rng.randrange(10**6)).rstrip(b"=")
        return f"{header}.{body.decode()}.{_token(rng, b64url, 43)}"

    makers: dict[str, Callable[[], str]] = {
        "OPENAI_API_KEY": lambda: "sk-proj-" + _token(rng, b64url, 48),
        "ANTHROPIC_API_KEY": lambda: "sk-ant-api03-" + _token(rng, b64url, 93),
        "AWS_ACCESS_KEY": lambda: "AKIA" + _token(rng, b32, 16),
        "GITHUB_TOKEN": lambda: "ghp_" + _token(rng, alnum, 36),
        "SLACK_TOKEN": lambda: (
            "xoxb-" + _token(rng, string.digits, 12) + "-" + _token(rng, alnum, 24)
        ),
        "GOOGLE_API_KEY": lambda: "AIza" + _token(rng, b64url, 35),
        "STRIPE_KEY": lambda: "sk_live_" + _token(rng, alnum, 24),
        "JWT": jwt,
        "PRIVATE_KEY": lambda: (
            "-----BEGIN RSA PRIVATE KEY-----\n"
            + "\n".join(_token(rng, alnum + "+/", 64) for _ in range(4))
            + "\n-----END RSA PRIVATE KEY-----"
        ),
    }
    frames = [
        "Here is my key {} please debug why it fails",
        "config:\n  token: {}\n  region: eu",
        "export CREDENTIAL={}",
        "Use {} for the staging account.",
    ]
    positives = [
        (kind, rng.choice(frames).format(make()))
        for kind, make in makers.items()
        for _ in range(25)
    ]
    negatives = [
        "I use sk-learn and scikit-learn for my task-list app.",
        "The ticket AKIA-1234 was closed yesterday.",
        "Set the header Authorization: Bearer <your-token-here> before calling.",
        "My GitHub handle is ghp and I like xox games.",
        "The eyJhbGciOi prefix is how a JWT header starts, for instance.",
        "Our -----BEGIN CERTIFICATE----- blocks are public certificates.",
        "Call the function sk_live_mode() to switch environments.",
        "The AIza prefix identifies Google keys; never paste one here.",
    ] * 10
    return positives, negatives


def _secrets(detect: Callable[[str], list[Finding]]) -> dict[str, Any]:
    positives, negatives = secret_samples()
    tp: Counter[str] = Counter()
    fp: Counter[str] = Counter()
    fn: Counter[str] = Counter()
    for kind, text in positives:
        labels = {f.label for f in detect(text)}
        if kind in labels:
            tp[kind] += 1
        else:
            fn[kind] += 1
        for other in labels - {kind}:
            fp[other] += 1
    for text in negatives:
        for finding in detect(text):
            fp[finding.label] += 1
    return _table(tp, fp, fn)


# --- injection ---------------------------------------------------------------------------


def _injection(data: Path, detector: InjectionDetector) -> dict[str, Any]:
    valid = json.loads((data / "injection" / "injecguard_valid.json").read_text())
    notinject = [
        row["prompt"]
        for name in ("one", "two", "three")
        for row in json.loads((data / "injection" / f"notinject_{name}.json").read_text())
    ]
    with (data / "safety" / "xstest_prompts.csv").open(newline="") as handle:
        xstest = list(csv.DictReader(handle))

    def rate(prompts: Sequence[str]) -> dict[str, Any]:
        fired = sum(1 for p in prompts if detector.score(p)[0] >= detector.threshold)
        return {"n": len(prompts), "fired": fired, "rate": round(fired / len(prompts), 3)}

    return {
        "threshold": detector.threshold,
        "injecguard_injections_tpr": rate([r["prompt"] for r in valid if r["label"] == 1]),
        "injecguard_benign_fpr": rate([r["prompt"] for r in valid if r["label"] == 0]),
        "notinject_fpr": rate(notinject),
        "xstest_safe_fpr": rate([r["prompt"] for r in xstest if r["label"] == "safe"]),
        "xstest_unsafe_fired": rate([r["prompt"] for r in xstest if r["label"] == "unsafe"]),
    }


# --- cost --------------------------------------------------------------------------------


def _chunks(texts: Sequence[str], size: int = 1024) -> list[str]:
    chunks, current = [], ""
    for text in texts:
        current = f"{current} {text}" if current else text
        if len(current.encode()) >= size:
            chunks.append(current.encode()[:size].decode("utf-8", "ignore"))
            current = ""
    return chunks


def _ms_per_kb(guardrails: Guardrails, texts: Sequence[str], rounds: int = 5) -> float:
    parts = [[TextPart(("messages", 0, "content"), "user", "message", t)] for t in texts]
    size = sum(len(t.encode()) for t in texts) / 1024
    samples = []
    for _ in range(rounds):
        started = time.process_time()
        for part in parts:
            guardrails.check("input", part, team=None, key_id=None, model=None, path="/")
        samples.append((time.process_time() - started) * 1000 / size)
    return round(statistics.median(samples), 4)


def _cost(guardrails: Guardrails, pii_rows: list[dict[str, Any]], data: Path) -> dict[str, Any]:
    valid = json.loads((data / "injection" / "injecguard_valid.json").read_text())
    with (data / "safety" / "xstest_prompts.csv").open(newline="") as handle:
        safe = [r["prompt"] for r in csv.DictReader(handle) if r["label"] == "safe"]
    benign = [r["prompt"] for r in valid if r["label"] == 0] + safe
    dense = [r["full_text"] for r in pii_rows if r["spans"]]
    clean = _chunks(benign)
    pii_dense = _chunks(dense)
    pathological: dict[str, float] = {}
    for name, make in PATHOLOGICAL.items():
        text = make()
        part = [TextPart(("messages", 0, "content"), "user", "message", text)]
        started = time.process_time()
        guardrails.check("input", part, team=None, key_id=None, model=None, path="/")
        pathological[name] = round(time.process_time() - started, 3)
    return {
        "clean_1kb_ms_per_kb": _ms_per_kb(guardrails, clean),
        "clean_prompts": len(clean),
        "pii_dense_1kb_ms_per_kb": _ms_per_kb(guardrails, pii_dense),
        "pii_dense_prompts": len(pii_dense),
        "pathological_1mb_seconds": pathological,
    }


# --- report ------------------------------------------------------------------------------


def format_report(report: dict[str, Any]) -> str:
    """The report as Markdown tables."""
    lines = ["# Guardrail evaluation", ""]
    lines += ["## PII (presidio_synth_dataset_v2, structured entities)", ""]
    lines += _entity_table(report["pii"])
    phone = report.get("phone_presidio")
    if phone:
        row = phone.get("PHONE_NUMBER", {})
        lines += [
            "",
            f"Presidio's own PhoneRecognizer on the same texts: precision {row.get('precision')}, "
            f"recall {row.get('recall')}, {phone['ms_per_kb']} ms/KB (not used).",
        ]
    lines += ["", "## Secrets (synthetic, seeded; 25 per type + 80 look-alikes)", ""]
    lines += _entity_table(report["secrets"])
    inj = report["injection"]
    lines += ["", f"## Prompt injection (threshold {inj['threshold']})", ""]
    lines += ["| set | n | fired | rate |", "| --- | ---: | ---: | ---: |"]
    for key in (
        "injecguard_injections_tpr",
        "injecguard_benign_fpr",
        "notinject_fpr",
        "xstest_safe_fpr",
        "xstest_unsafe_fired",
    ):
        row = inj[key]
        lines.append(f"| {key} | {row['n']} | {row['fired']} | {row['rate']} |")
    cost = report["cost"]
    lines += ["", "## Cost of the default rule set (CPU)", ""]
    lines += [
        f"- clean prompts: {cost['clean_1kb_ms_per_kb']} ms/KB ({cost['clean_prompts']} x 1 KB)",
        f"- PII-dense prompts: {cost['pii_dense_1kb_ms_per_kb']} ms/KB "
        f"({cost['pii_dense_prompts']} x 1 KB)",
        f"- compile + warm-up: {report['compile_seconds']} s",
        "",
        "| 1 MB pathological input | seconds |",
        "| --- | ---: |",
    ]
    lines += [f"| `{k}` | {v} |" for k, v in cost["pathological_1mb_seconds"].items()]
    return "\n".join(lines) + "\n"


def _entity_table(table: dict[str, Any]) -> list[str]:
    lines = ["| entity | support | precision | recall |", "| --- | ---: | ---: | ---: |"]
    for entity, row in table.items():
        lines.append(f"| {entity} | {row['support']} | {row['precision']} | {row['recall']} |")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="extproc eval", description=__doc__)
    parser.add_argument("--data", default="../shared/data", help="the data directory")
    parser.add_argument("--json", action="store_true", help="print JSON instead of Markdown")
    args = parser.parse_args(argv)
    report = run_eval(args.data)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
