"""Zero-shot utility scoring with lm-eval-harness, fully offline on the vendored eval sets.

The seven tasks (BoolQ, RTE, HellaSwag, WinoGrande, ARC-Easy/Challenge, OpenBookQA) are the
utility suite of the pruning/quantization safety papers. lm-eval loads them from the HF hub by
default; here each task is an lm-eval YAML that points the `json` dataset loader at the files in
lm/data/zero_shot (see its README for sources). The prompts follow lm-eval 0.4's own task YAMLs;
only the mapping from the vendored file formats onto those prompts differs, and the few places
where a file format cannot reproduce lm-eval's text exactly are listed in lm/data/README.md.

    python -m lm.zero_shot --model embedded --limit 200 --tasks boolq arc_easy
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import tyro

from .cache import atomic_dir, cache_root
from .datasets import DATA
from .errors import UserError, cli
from .zero_shot_tasks import ALL_TASKS, SHORT_TASKS  # noqa: F401 - SHORT_TASKS is part of this module's API

ZERO_SHOT_DATA = DATA / "zero_shot"
# Bump when the generated YAMLs or the HellaSwag conversion change, so stale caches are not reused.
FORMAT_VERSION = 1
HELLASWAG_PARTS = tuple(f"hellaswag/hellaswag_val_full_part{i}.txt" for i in (1, 2, 3))
INSTALL_HINT = "pip install 'lm-eval>=0.4.9,<0.5'"


@dataclass(frozen=True)
class _Task:
    """An lm-eval multiple-choice task minus its dataset location (filled in at runtime)."""

    source: str | None  # file under lm/data/zero_shot; None = converted into the cache (HellaSwag)
    doc_to_text: str
    doc_to_choice: str | list[str]
    doc_to_target: str
    metrics: tuple[str, ...] = ("acc",)


# A bare field name (e.g. "gold") makes lm-eval return the raw value, which matters for
# WinoGrande: an int from doc_to_text switches lm-eval to "partial" scoring, where the choices
# are alternative contexts and the shared continuation is what gets scored.
TASKS: dict[str, _Task] = {
    # llm-foundry stored "Passage: {passage}\nQuestion: {question}?"; lm-eval has no "Passage: ".
    "boolq": _Task("boolq/boolq.jsonl", "{{query | replace('Passage: ', '', 1)}}\nAnswer:", ["no", "yes"], "gold"),
    # The SuperGLUE copy keeps string labels; GLUE/lm-eval index them entailment=0, not_entailment=1.
    "rte": _Task(
        "rte/val.jsonl",
        "{{premise}}\nQuestion: {{hypothesis}} True or False?\nAnswer:",
        ["True", "False"],
        "{{0 if label == 'entailment' else 1}}",
    ),
    "hellaswag": _Task(None, "{{query}}", "choices", "{{label}}", ("acc", "acc_norm")),
    "winogrande": _Task("winogrande/winogrande.jsonl", "gold", "context_options", "continuation"),
    "arc_easy": _Task("arc_easy/arc_easy.jsonl", "{{query}}\nAnswer:", "choices", "gold", ("acc", "acc_norm")),
    "arc_challenge": _Task(
        "arc_challenge/arc_challenge.jsonl", "{{query}}\nAnswer:", "choices", "gold", ("acc", "acc_norm")
    ),
    # Original AI2 schema: the stem and choices are nested under "question".
    "openbookqa": _Task(
        "openbookqa/test.jsonl",
        "{{question.stem}}",
        "{{question.choices | map(attribute='text') | list}}",
        "{{(question.choices | map(attribute='label') | list).index(answerKey.lstrip())}}",
        ("acc", "acc_norm"),
    ),
}


@dataclass(frozen=True)
class ZeroShotConfig:
    tasks: tuple[str, ...] = ALL_TASKS  # subset of boolq rte hellaswag winogrande arc_easy arc_challenge openbookqa
    limit: int | None = 200  # first N documents per task (lm-eval's --limit); None = the full split
    batch_size: int = 8  # documents per forward pass

    def __post_init__(self):
        object.__setattr__(self, "tasks", tuple(self.tasks))
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown or not self.tasks:
            raise UserError(
                f"unknown zero-shot task(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(ALL_TASKS)}"
            )
        if len(set(self.tasks)) != len(self.tasks):
            raise UserError(f"zero-shot tasks listed twice: {', '.join(self.tasks)}")
        if self.limit is not None and self.limit <= 0:
            raise UserError(f"limit must be a positive number of documents (or None for all), got {self.limit}")
        if self.batch_size <= 0:
            raise UserError(f"batch size must be positive, got {self.batch_size}")


def task_names(names: list[str] | None) -> tuple[str, ...] | None:
    """A CLI's --zero-shot-tasks, checked: the names given, 'all' for every task, None when not given."""
    if not names:
        return None
    tasks = ALL_TASKS if list(names) == ["all"] else tuple(names)
    ZeroShotConfig(tasks=tasks)  # an unknown name fails at parse time, before any model is loaded
    return tasks


# --- data and task files -----------------------------------------------------------------


def _clean_hellaswag(text: str) -> str:
    # lm-eval's HellaSwag preprocessing; the klosax text already dropped most WikiHow markers,
    # this removes the ~18 bracketed spans it left in.
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hellaswag_docs(parts: tuple[Path, ...] | None = None) -> list[dict]:
    """The vendored HellaSwag text (6 lines per item: context, gold, 4 endings) as documents."""
    paths = parts or tuple(ZERO_SHOT_DATA / p for p in HELLASWAG_PARTS)
    lines = "".join(p.read_text(encoding="utf-8") for p in paths).split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise UserError(f"HellaSwag text has {len(lines)} lines, not a multiple of 6: the vendored files are damaged")
    docs = []
    for i in range(0, len(lines), 6):
        query, label, *endings = lines[i : i + 6]
        docs.append(
            {"query": _clean_hellaswag(query), "choices": [_clean_hellaswag(e) for e in endings], "label": int(label)}
        )
    return docs


def _task_yaml(name: str, data_file: Path, hf_cache: Path) -> dict:
    spec = TASKS[name]
    return {
        "task": name,
        "dataset_path": "json",
        # lm-eval hands dataset_kwargs to datasets.load_dataset; the json loader needs absolute
        # paths, and cache_dir keeps its Arrow cache beside ours instead of in ~/.cache/huggingface.
        "dataset_kwargs": {"data_files": {"test": str(data_file)}, "cache_dir": str(hf_cache)},
        "test_split": "test",
        "output_type": "multiple_choice",
        "num_fewshot": 0,
        "doc_to_text": spec.doc_to_text,
        "doc_to_choice": spec.doc_to_choice,
        "doc_to_target": spec.doc_to_target,
        "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in spec.metrics],
        "metadata": {"version": 1.0},
    }


def _fingerprint() -> str:
    digest = hashlib.sha256(f"{FORMAT_VERSION}\n{ZERO_SHOT_DATA.resolve()}\n".encode())
    digest.update(repr(sorted(TASKS.items())).encode())
    for part in HELLASWAG_PARTS:
        digest.update((ZERO_SHOT_DATA / part).read_bytes())
    return digest.hexdigest()[:16]


def task_dir() -> Path:
    """The directory of generated task YAMLs (plus the converted HellaSwag), built once per data version."""
    missing = [t for t, s in TASKS.items() if s.source and not (ZERO_SHOT_DATA / s.source).is_file()]
    missing += [p for p in HELLASWAG_PARTS if not (ZERO_SHOT_DATA / p).is_file()]
    if missing:
        raise UserError(f"vendored zero-shot data missing under {ZERO_SHOT_DATA}: {', '.join(missing)}")
    import yaml

    base = cache_root() / "zero_shot"
    final = base / _fingerprint()
    if (final / "tasks").is_dir():
        return final / "tasks"
    with atomic_dir(final) as tmp:
        (tmp / "tasks").mkdir()
        with open(tmp / "hellaswag.jsonl", "w", encoding="utf-8") as f:
            for doc in hellaswag_docs():
                f.write(json.dumps(doc, ensure_ascii=False) + "\n")
        for name, spec in TASKS.items():
            # Paths name `final`, not `tmp`: the YAMLs are only read after the rename.
            data_file = final / "hellaswag.jsonl" if spec.source is None else (ZERO_SHOT_DATA / spec.source).resolve()
            text = yaml.safe_dump(
                _task_yaml(name, data_file, base / "hf-datasets"), sort_keys=False, allow_unicode=True
            )
            (tmp / "tasks" / f"{name}.yaml").write_text(text, encoding="utf-8")
    return final / "tasks"


# --- lm-eval -----------------------------------------------------------------------------


@contextmanager
def offline():
    """Force the HF hub and `datasets` offline for the duration, including already-imported modules.

    huggingface_hub and datasets read these variables once at import, and transformers has
    usually imported huggingface_hub long before an evaluation starts, so setting the
    environment alone would not stop a lookup.
    """
    names = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
    saved_env = {n: os.environ.get(n) for n in names}
    patched = []
    for module, attrs in (
        ("huggingface_hub.constants", ("HF_HUB_OFFLINE",)),
        ("datasets.config", ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")),
    ):
        mod = sys.modules.get(module)
        for attr in attrs if mod is not None else ():
            if hasattr(mod, attr):
                patched.append((mod, attr, getattr(mod, attr)))
    try:
        os.environ.update({n: "1" for n in names})
        for mod, attr, _ in patched:
            setattr(mod, attr, True)
        yield
    finally:
        for mod, attr, value in patched:
            setattr(mod, attr, value)
        for n, value in saved_env.items():
            if value is None:
                os.environ.pop(n, None)
            else:
                os.environ[n] = value


def _require_lm_eval():
    try:
        import lm_eval  # noqa: F401
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise UserError(f"zero-shot scoring needs lm-eval ({e}); install it with: {INSTALL_HINT}") from None
    return TaskManager


def task_manager():
    """An lm-eval TaskManager that knows only our offline tasks.

    Built-in tasks are left out: they share these names but would fetch from the hub.
    """
    TaskManager = _require_lm_eval()
    return TaskManager(include_path=str(task_dir()), include_defaults=False)


def load_tasks(names=ALL_TASKS) -> dict:
    """lm-eval Task objects (documents loaded) by name, for inspection without a model."""
    ZeroShotConfig(tasks=tuple(names))  # validates the names
    with offline():
        return task_manager().load(list(names))["tasks"]


def zero_shot_accuracy(model, tokenizer, cfg: ZeroShotConfig | None = None) -> dict:
    """Zero-shot multiple-choice accuracy per task, scored by lm-eval's HFLM on this model object.

    Returns {"per_task": {task: {"acc", "acc_norm" (where lm-eval reports it), "n", "per_document"}},
    "average": mean acc over the tasks, "limit", "seconds"}.
    """
    cfg = cfg or ZeroShotConfig()
    _require_lm_eval()
    start = time.perf_counter()
    with offline():
        import lm_eval
        from lm_eval.models.huggingface import HFLM

        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=cfg.batch_size)
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=list(cfg.tasks),
            task_manager=task_manager(),
            num_fewshot=0,
            limit=cfg.limit,
            bootstrap_iters=0,  # no stderr: bootstrapping costs minutes and we report point estimates
            log_samples=True,  # per-document correctness, for the bootstrap interval of the mean
            # None = leave the caller's RNG state alone; scoring is deterministic anyway.
            random_seed=None,
            numpy_random_seed=None,
            torch_random_seed=None,
            fewshot_random_seed=None,
        )
    per_task = {}
    for name in cfg.tasks:
        scores = results["results"][name]
        entry = {metric: float(scores[f"{metric},none"]) for metric in TASKS[name].metrics}
        entry["n"] = int(results["n-samples"][name]["effective"])
        samples = sorted(results["samples"][name], key=lambda d: d["doc_id"])
        entry["per_document"] = [float(d["acc"]) for d in samples]
        per_task[name] = entry
    return {
        "per_task": per_task,
        "average": sum(e["acc"] for e in per_task.values()) / len(per_task),
        "limit": cfg.limit,
        "seconds": time.perf_counter() - start,
    }


# --- CLI ---------------------------------------------------------------------------------


def format_table(result: dict) -> str:
    rows = ["| task | n | acc | acc_norm |", "|---|---:|---:|---:|"]
    for name, e in result["per_task"].items():
        norm = f"{e['acc_norm']:.4f}" if "acc_norm" in e else "-"
        rows.append(f"| {name} | {e['n']} | {e['acc']:.4f} | {norm} |")
    rows.append(f"| average | | {result['average']:.4f} | |")
    return "\n".join(rows)


@dataclass
class _Args:
    model: str = "embedded"  # 'embedded', a hub id, a local safetensors directory, or a .gguf file
    #: what is evaluated
    cfg: Annotated[ZeroShotConfig, tyro.conf.OmitArgPrefixes] = field(default_factory=ZeroShotConfig)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # weights and activations
    output: str | None = None  # also write the result as JSON to this path


def parse_args(argv=None) -> _Args:
    from .cli import parse_config

    return parse_config(
        _Args, argv, prog="python -m lm.zero_shot", description="Zero-shot utility accuracy with lm-eval, offline."
    )[0]


@cli
def main(argv=None) -> int:
    args = parse_args(argv)
    _require_lm_eval()  # before spending a minute loading the model
    from .loading import load_model

    loaded = load_model(args.model, dtype=args.dtype)
    result = zero_shot_accuracy(loaded.model, loaded.tokenizer, args.cfg)
    print(f"{loaded.name}: zero-shot, limit {args.cfg.limit or 'all'}, {result['seconds']:.0f} s")
    print(format_table(result))
    if args.output:
        from .cache import atomic_write_json

        atomic_write_json(Path(args.output), {"model": loaded.spec, **result})
    return 0


if __name__ == "__main__":
    sys.exit(main())
