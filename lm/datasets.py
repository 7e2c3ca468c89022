"""Loaders for the vendored data in lm/data (see its README for sources and licences)."""

from __future__ import annotations

import csv
import json
import random
from functools import lru_cache
from importlib.resources import files
from pathlib import Path

from .errors import UserError

DATA = Path(str(files("lm") / "data"))
SPLITS = ("train", "val", "test")


def _read_json(rel: str):
    with open(DATA / rel, encoding="utf-8") as f:
        return json.load(f)


def instructions(kind: str, split: str) -> list[str]:
    """Instructions of the refusal-direction splits; kind is 'harmful' or 'harmless'."""
    if kind not in ("harmful", "harmless") or split not in SPLITS:
        raise UserError(f"unknown split {kind}_{split}: kind is harmful|harmless, split is {'|'.join(SPLITS)}")
    return [row["instruction"] for row in _read_json(f"refusal_direction/{kind}_{split}.json")]


def sample(items: list, n: int | None, seed: int) -> list:
    """Seeded sample without replacement; the whole list (in order) when n is None or too large."""
    if not items:
        raise UserError("cannot sample from an empty dataset")
    if n is None or n >= len(items):
        return list(items)
    if n <= 0:
        raise UserError(f"sample size must be positive, got {n}")
    return random.Random(seed).sample(items, n)


@lru_cache(maxsize=1)
def advbench() -> tuple[tuple[str, str], ...]:
    with open(DATA / "advbench" / "harmful_behaviors.csv", encoding="utf-8", newline="") as f:
        return tuple((row["goal"], row["target"]) for row in csv.DictReader(f))


def advbench_eval(n: int = 100) -> list[str]:
    """Wei et al.'s ASR prompts: the first n (at most 100) AdvBench goals, in file order."""
    if not 0 < n <= 100:
        raise UserError(f"the AdvBench eval split has 100 goals; asked for {n}")
    return [goal for goal, _ in advbench()[:n]]


def advbench_calibration() -> list[str]:
    """The 420 AdvBench goals after the eval split, usable as harmful calibration prompts."""
    return [goal for goal, _ in advbench()[100:]]


def gcg_suffixes() -> list[str]:
    return list(_read_json("alignment_attribution/gcg_suffixes.json")["suffixes"])


def judge_definitions() -> dict:
    return _read_json("judges.json")


def safety_short() -> list[tuple[str, str]]:
    """Wei et al.'s safety-short SFT data as (goal, Llama-2 refusal) pairs, [INST] wrapper removed."""
    pairs = []
    with open(
        DATA / "alignment_attribution" / "SFT_aligned_llama2-7b-chat-hf_train_short.csv", encoding="utf-8", newline=""
    ) as f:
        for row in csv.DictReader(f):
            prompt = row["prompt"].strip()
            prompt = prompt.removeprefix("[INST]").removesuffix("[/INST]").strip()
            pairs.append((prompt, row["response"].strip()))
    return pairs


@lru_cache(maxsize=1)
def wikitext2_test() -> str:
    """The raw wikitext-2 test text, newlines normalised to '\\n'."""
    return (DATA / "wikitext2" / "wiki.test.raw").read_text(encoding="utf-8").replace("\r\n", "\n")


# Only the wikitext-2 test split is vendored, so text calibration takes its second half and
# perplexity must read the first half only (lm.perplexity checks this for calibrated runs).
WIKITEXT_CALIBRATION_FROM = 640_000  # characters of wikitext2_test()


def wikitext2_calibration_text() -> str:
    """The part of the wikitext-2 test text that text calibration may use (never evaluated on)."""
    return wikitext2_test()[WIKITEXT_CALIBRATION_FROM:]
