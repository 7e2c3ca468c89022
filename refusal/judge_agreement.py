"""Check judges against human labels.

    python -m refusal.judge_agreement --labels FILE --judges wei2024 arditi2024 harmbench:DIR

FILE is a CSV with columns `prompt`, `completion`, `label` and optionally `category`, or a JSON
list of objects with those keys. `label` is `refused` or `complied` (the judges' refusal
verdicts are checked) or `harmful` or `safe` (their harm verdicts: attack success, harmful
compliance, unsafe response); one file holds one kind. Each judge reads every completion; the
report gives its accuracy (95% Wilson interval), Cohen's kappa against the labels (95% bootstrap
interval over items), the confusion matrix, sensitivity and specificity, the same per category
when the file has categories, and the judges' agreement with each other. `--out` also writes it
as JSON. Bad input is one `error:` line before any judge loads.
"""

from __future__ import annotations

import csv
import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from lm.cache import atomic_write_json
from lm.cli import parse_config
from lm.errors import UserError, cli

from .agreement import against_labels, pairwise
from .judge_spec import KEYWORD, JudgeSpec, check_judge, parse_judges
from .judges import JUDGE_NAMES, judges
from .stats import fmt_rate

#: label -> (verdict kind, positive)
LABELS = {
    "refused": ("refusal", True),
    "complied": ("refusal", False),
    "harmful": ("harm", True),
    "safe": ("harm", False),
}


@dataclass
class AgreementConfig:
    labels: str = ""  # CSV (prompt, completion, label[, category]) or JSON list of such objects; label refused/complied or harmful/safe
    #: keyword judges by name, model judges as KIND:HUB-ID-OR-DIR (refusal.judge_spec)
    judges: tuple[str, ...] = JUDGE_NAMES
    out: str | None = None  # also write the report here as JSON

    def __post_init__(self):
        self.judges = tuple(str(j) for j in self.judges)
        parse_judges(self.judges)


@dataclass(frozen=True)
class LabelledItem:
    prompt: str
    completion: str
    label: bool  # the positive label (refused, harmful)
    category: str | None


def read_labels(path: str) -> tuple[str, list[LabelledItem]]:
    """(verdict kind: 'refusal' or 'harm', items); every malformed row is one UserError naming it."""
    p = Path(path)
    if not path:
        raise UserError("--labels: give a labelled CSV or JSON file")
    if not p.is_file():
        raise UserError(f"labels file not found: {path}")
    try:
        text = p.read_text(encoding="utf-8")
        if p.suffix.lower() == ".json":
            rows = json.loads(text)
            if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
                raise UserError(f"{path}: expected a JSON list of objects with prompt, completion, label")
        else:
            reader = csv.DictReader(text.splitlines())
            missing = {"prompt", "completion", "label"} - set(reader.fieldnames or [])
            if missing:
                raise UserError(
                    f"{path}: no {', '.join(sorted(missing))} column (expected prompt, completion, label[, category])"
                )
            rows = list(reader)
    except (UnicodeDecodeError, ValueError, csv.Error) as e:
        raise UserError(f"cannot read labels file {path}: {str(e).splitlines()[0]}") from None
    if not rows:
        raise UserError(f"{path} holds no labelled completions")
    kinds, items = set(), []
    for i, row in enumerate(rows, start=1):
        where = f"{path}, item {i}"
        for key in ("prompt", "completion", "label"):
            if not isinstance(row.get(key), str):
                raise UserError(f"{where}: no {key} (a string)")
        label = row["label"].strip().lower()
        if label not in LABELS:
            raise UserError(f"{where}: label {row['label']!r} is not one of {', '.join(LABELS)}")
        kind, positive = LABELS[label]
        kinds.add(kind)
        category = row.get("category")
        items.append(
            LabelledItem(
                row["prompt"],
                row["completion"],
                positive,
                str(category).strip() or None if category is not None else None,
            )
        )
    if len(kinds) > 1:
        raise UserError(
            f"{path} mixes refusal labels (refused/complied) and harm labels (harmful/safe); give one kind per file"
        )
    return kinds.pop(), items


def check_verdicts(specs: tuple[JudgeSpec, ...], kind: str) -> None:
    for spec in specs:
        if kind == "refusal" and not spec.judges_refusal:
            raise UserError(
                f"judge {spec.name!r} gives {', '.join(spec.verdicts)} verdicts, not refusal verdicts; the labels are refused/complied"
            )
        if kind == "harm" and not spec.judges_harm:
            raise UserError(f"judge {spec.name!r} gives refusal verdicts only; the labels are harmful/safe")


def verdicts_of(spec: JudgeSpec, kind: str, items: list[LabelledItem]) -> tuple[list[bool], int]:
    """(one verdict per item, answers that could not be parsed: counted as the negative verdict)."""
    if spec.kind == KEYWORD:
        judge = {j.name: j for j in judges()}[spec.target]
        read = judge.refused if kind == "refusal" else judge.jailbroken
        return [read(it.completion) for it in items], 0
    from .model_judges import load_judge

    readings = load_judge(spec).read([(it.prompt, it.completion) for it in items])
    values = [r.refused if kind == "refusal" else r.harmful for r in readings]
    return [bool(v) for v in values], sum(not r.parsed for r in readings)


def agreement_report(cfg: AgreementConfig) -> dict:
    kind, items = read_labels(cfg.labels)
    specs = parse_judges(cfg.judges)
    if not specs:
        raise UserError("--judges: give at least one judge")
    check_verdicts(specs, kind)
    for spec in specs:
        check_judge(spec)
    categories = [it.category for it in items]
    labels = [it.label for it in items]
    per_judge, all_verdicts = {}, {}
    for spec in specs:
        verdicts, unparsed = verdicts_of(spec, kind, items)
        all_verdicts[spec.name] = verdicts
        per_judge[spec.name] = dict(against_labels(labels, verdicts, categories), unparsed=unparsed)
    described = [
        dict(id=str(i), prompt=it.prompt[:200], completion=it.completion[:300]) for i, it in enumerate(items, start=1)
    ]
    return dict(
        labels=cfg.labels,
        sha256=hashlib.sha256(Path(cfg.labels).read_bytes()).hexdigest(),
        kind=kind,
        positive="refused" if kind == "refusal" else "harmful",
        n=len(items),
        positives=sum(labels),
        judges=per_judge,
        between_judges=pairwise(all_verdicts, described, None) if len(specs) > 1 else [],
    )


def render(r: dict) -> str:
    lines = [
        f"Judges against {r['n']} labelled completions in {r['labels']} ({r['positives']} labelled {r['positive']}); "
        "accuracy with its 95% Wilson interval, Cohen's kappa with a 95% bootstrap interval over items.",
        "",
        f"| judge | accuracy | kappa | judge {r['positive']} & label {r['positive']} | judge {r['positive']}, label not | "
        f"judge not, label {r['positive']} | neither | sensitivity | specificity | unparsed |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, j in r["judges"].items():
        c = j["confusion"]
        kappa = (
            "undefined"
            if j["kappa"] is None
            else f"{j['kappa']:.2f}"
            + (f" [{j['kappa_ci95'][0]:.2f}, {j['kappa_ci95'][1]:.2f}]" if j["kappa_ci95"] else "")
        )
        lines.append(
            f"| {name} | {fmt_rate(j['accuracy'])} | {kappa} | {c['judge_yes_label_yes']} | {c['judge_yes_label_no']} | "
            f"{c['judge_no_label_yes']} | {c['judge_no_label_no']} | {fmt_rate(j['sensitivity'])} | {fmt_rate(j['specificity'])} | "
            f"{j['unparsed']} |"
        )
    per = [(name, j["per_category"]) for name, j in r["judges"].items() if j.get("per_category")]
    if per:
        categories = list(per[0][1])
        lines += [
            "",
            "Accuracy per category:",
            "",
            "| judge | " + " | ".join(f"{c} (n={per[0][1][c]['n']})" for c in categories) + " |",
            "|---|" + "---|" * len(categories),
        ]
        for name, cats in per:
            lines.append(f"| {name} | " + " | ".join(fmt_rate(cats[c]["accuracy"]) for c in categories) + " |")
    if r["between_judges"]:
        lines += ["", "| judges | agreement | kappa | disagreeing items |", "|---|---|---|---|"]
        for p in r["between_judges"]:
            kappa = "undefined" if p["kappa"] is None else f"{p['kappa']:.2f}"
            lines.append(
                f"| {p['first']} / {p['second']} | {fmt_rate(p['agreement'])} | {kappa} | {', '.join(p['disagreeing_ids']) or '-'} |"
            )
    return "\n".join(lines) + "\n"


@cli
def main(argv=None) -> int:
    cfg, _ = parse_config(
        AgreementConfig, argv, prog="python -m refusal.judge_agreement", description=__doc__.split("\n\n")[0]
    )
    report = agreement_report(cfg)
    if cfg.out:
        atomic_write_json(Path(cfg.out), report)
    print(render(report), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
