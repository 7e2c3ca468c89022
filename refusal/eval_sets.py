"""Evaluation prompts, disjoint from every prompt a method fits or scores on.

Harmful sets (ASR): `advbench` is Wei et al.'s first 100 AdvBench goals minus the 17 that are also
in harmful_train (which the directions are extracted from and targeted restoration is scored on);
`jailbreakbench`, `harmbench` and `strongreject` are the three parts of the refusal-direction data's
held-out harmful_test split (100 + 159 + 313, in that order in the file). Harmless set
(over-refusal): `alpaca`, the harmless_test split, which nothing else reads. `file:PATH` is a
user's own file: one prompt per line (.txt), a JSON list of strings or of objects with a "prompt"
(or "instruction") field, or a CSV with a `prompt` column; its prompts that a stage fits on are
dropped too.

Every prompt has a stable id, `<source>:<row>`, so per-prompt records of two models can be paired.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from lm import datasets
from lm.errors import UserError

HARMFUL_SETS = ("advbench", "jailbreakbench", "harmbench", "strongreject")
HARMLESS_SETS = ("alpaca",)
# Rows of harmful_test.json per source (checked against the per-source files upstream).
_TEST_PARTS = {"jailbreakbench": (0, 100), "harmbench": (100, 259), "strongreject": (259, 572)}


@dataclass(frozen=True)
class Prompt:
    id: str
    source: str
    text: str
    category: str | None = None


@lru_cache(maxsize=1)
def fitted_prompts() -> frozenset[str]:
    """Every instruction any stage may fit, select, calibrate or score on.

    Whole splits, not the seeded samples a run draws from them, so disjointness holds for every
    n_train, n_val and seed: direction extraction and targeted scoring (harmful/harmless train),
    selection and the refusal probe (val), Wanda / SparseGPT / GPTQ calibration (harmless train),
    Wei et al.'s safety attribution (AdvBench goals 100-519 and their safety-short SFT prompts).
    """
    out = set()
    for kind in ("harmful", "harmless"):
        for split in ("train", "val"):
            out.update(datasets.instructions(kind, split))
    out.update(datasets.advbench_calibration())
    out.update(p for p, _ in datasets.safety_short())
    return frozenset(out)


def _rows(kind: str, split: str) -> list[dict]:
    with open(datasets.DATA / "refusal_direction" / f"{kind}_{split}.json", encoding="utf-8") as f:
        return json.load(f)


def builtin_set(name: str) -> list[Prompt]:
    """One named set, in file order, with every fitted prompt removed."""
    if name == "advbench":
        rows = [Prompt(f"advbench:{i}", "advbench", g) for i, g in enumerate(datasets.advbench_eval(100))]
    elif name in _TEST_PARTS:
        lo, hi = _TEST_PARTS[name]
        rows = [
            Prompt(f"{name}:{i - lo}", name, r["instruction"], r.get("category"))
            for i, r in enumerate(_rows("harmful", "test"))
            if lo <= i < hi
        ]
    elif name == "alpaca":
        rows = [
            Prompt(f"alpaca:{i}", "alpaca", r["instruction"], r.get("category"))
            for i, r in enumerate(_rows("harmless", "test"))
        ]
    else:
        raise UserError(
            f"unknown evaluation set {name!r}; choose from {', '.join(HARMFUL_SETS + HARMLESS_SETS)} or file:PATH"
        )
    return held_out(rows)


def user_file(path: str) -> list[Prompt]:
    """A user's prompts: .txt (one per line), .json (list of strings or {"prompt"} objects), .csv (`prompt` column)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"prompt file {path} does not exist")
    source = f"file:{p.name}"
    try:
        if p.suffix == ".json":
            data = json.loads(p.read_text(encoding="utf-8"))
            if not isinstance(data, list):
                raise UserError(f"{path}: expected a JSON list of prompts")
            texts = []
            for i, item in enumerate(data):
                text = (
                    item
                    if isinstance(item, str)
                    else (item.get("prompt") or item.get("instruction"))
                    if isinstance(item, dict)
                    else None
                )
                if not isinstance(text, str):
                    raise UserError(f"{path}: item {i} is neither a string nor an object with a 'prompt' string")
                texts.append(text)
        elif p.suffix == ".csv":
            with open(p, encoding="utf-8", newline="") as f:
                reader = csv.DictReader(f)
                if "prompt" not in (reader.fieldnames or []):
                    raise UserError(f"{path}: a CSV prompt file needs a 'prompt' column (has {reader.fieldnames})")
                texts = [row["prompt"] or "" for row in reader]
        else:
            texts = p.read_text(encoding="utf-8").splitlines()
    except (UnicodeDecodeError, json.JSONDecodeError, csv.Error) as e:
        raise UserError(f"{path}: cannot read prompts ({e.__class__.__name__}: {e})") from None
    prompts = [Prompt(f"{source}:{i}", source, t.strip()) for i, t in enumerate(texts) if t.strip()]
    if not prompts:
        raise UserError(f"{path}: no prompts in the file")
    return prompts


def held_out(prompts: list[Prompt]) -> list[Prompt]:
    """`prompts` without any that a stage fits on (a user's file may repeat AdvBench or train prompts)."""
    fitted = fitted_prompts()
    return [p for p in prompts if p.text not in fitted]


def load_prompts(names: tuple[str, ...], n: int | None = None) -> list[Prompt]:
    """The first n prompts (None: all) of each set, concatenated. A prompt that an earlier set holds
    (anywhere in it, so the result does not depend on n) is dropped: 9 JailbreakBench behaviours
    are AdvBench goals. Fewer n means the first prompts of the larger selection."""
    if not names:
        raise UserError("no evaluation set given")
    if n is not None and n <= 0:
        raise UserError(f"prompts per evaluation set must be positive, got {n}")
    out, seen = [], set()
    for name in names:
        rows = held_out(user_file(name.removeprefix("file:"))) if name.startswith("file:") else builtin_set(name)
        kept, texts = [], set()
        for p in rows:
            if p.text not in seen and p.text not in texts:
                kept.append(p)
                texts.add(p.text)
        seen |= texts
        out.extend(kept[:n])
    if not out:
        raise UserError(f"evaluation sets {', '.join(names)} hold no prompts")
    return out


def check_names(names) -> tuple[str, ...]:
    """A CLI's set names, checked before any model loads (a user file is read and parsed here, and
    must hold at least one prompt that no stage fits on)."""
    names = tuple(names)
    for name in names:
        if name.startswith("file:"):
            path = name.removeprefix("file:")
            if not held_out(user_file(path)):
                raise UserError(
                    f"{path}: every prompt in the file is one a stage fits on (direction, selection or calibration "
                    "prompts); evaluation prompts must be held out"
                )
        elif name not in HARMFUL_SETS + HARMLESS_SETS:
            raise UserError(
                f"unknown evaluation set {name!r}; choose from {', '.join(HARMFUL_SETS + HARMLESS_SETS)} or file:PATH"
            )
    return names


def check_roles(harmful: tuple[str, ...], harmless: tuple[str, ...]) -> None:
    """ASR is measured on harmful sets and over-refusal on harmless ones: a built-in set given in the
    other role would report a refusal rate on harmful prompts as over-refusal (or the reverse)."""
    for names, role, allowed, flag in (
        (harmful, "harmful", HARMFUL_SETS, "eval_sets"),
        (harmless, "harmless", HARMLESS_SETS, "harmless_sets"),
    ):
        wrong = [n for n in names if not n.startswith("file:") and n not in allowed]
        if wrong:
            raise UserError(
                f"{flag} (--{flag.replace('_', '-')}) takes {role} sets ({', '.join(allowed)} or file:PATH), "
                f"got {', '.join(wrong)}"
            )


def overlap_with_fitted(prompts: list[Prompt]) -> int:
    """How many evaluation prompts any stage also fits on (0 for the built-in sets, by construction)."""
    fitted = fitted_prompts()
    return sum(p.text in fitted for p in prompts)
