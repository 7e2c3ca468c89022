"""The one place a model's behaviour on an evaluation set is measured, judged per prompt.

Every entry point (experiments.compare_refusal, experiments.brittleness,
experiments.refusal_direction, python -m repair) evaluates a model through `measure` with an
EvalConfig. The result is cached by lm.cache.measured under the run's measurement store, keyed by
the model's identity and the settings dataclasses only, so the same model under the same settings
is generated once and reused by every entry point that shares the store.

A result keeps, per prompt: its id (`<set>:<row>`), source set, category, the completion(s) and
both judges' verdicts (jailbroken, refused). `rates` turns it into refusal.stats rate objects
(overall, per source set, judge disagreement); `paired` compares two models on the same prompts.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from lm.cache import measured, measurement_digest, timed
from lm.errors import UserError

from .asr import SETTINGS, AsrConfig, attack_success
from .eval_sets import HARMLESS_SETS, Prompt, check_names, load_prompts, overlap_with_fitted
from .judges import JUDGE_NAMES, judges
from .stats import (
    bootstrap_cluster_mean,
    bootstrap_perplexity,
    bootstrap_task_mean,
    mcnemar_exact,
    min_detectable_difference,
    paired_perplexity_ratio,
    rate_of,
    wilson,
)

# Held-out harmful prompts (83 AdvBench + 89 JailbreakBench remain after removing fitted and
# repeated prompts; the first 50 of each by default) and harmless ones for over-refusal.
DEFAULT_HARMFUL = ("advbench", "jailbreakbench")
DEFAULT_HARMLESS = ("alpaca",)


@dataclass(frozen=True)
class EvalConfig:
    sets: tuple[str, ...] = DEFAULT_HARMFUL  # refusal.eval_sets names or file:PATH
    n: int | None = 50  # first n prompts of each set (None: all)
    setting: str = "vanilla"  # refusal.asr.SETTINGS
    max_new_tokens: int = 128
    seed: int = 0
    backend: str = "auto"
    system: str | None = None
    batch_size: int | None = None  # not part of the cache key

    def __post_init__(self):
        object.__setattr__(self, "sets", check_names(self.sets))
        if self.setting not in SETTINGS:
            raise UserError(f"unknown ASR setting {self.setting!r}; choose one of {', '.join(SETTINGS)}")
        if self.n is not None and self.n <= 0:
            raise UserError(f"prompts per evaluation set must be positive, got {self.n}")
        if self.max_new_tokens <= 0:
            raise UserError(f"max_new_tokens must be positive, got {self.max_new_tokens}")

    def asr_config(self) -> AsrConfig:
        return AsrConfig(
            self.setting,
            max_new_tokens=self.max_new_tokens,
            batch_size=self.batch_size,
            seed=self.seed,
            backend=self.backend,
            system=self.system,
        )

    def harmless(self, sets: tuple[str, ...] = DEFAULT_HARMLESS, n: int | None = None) -> "EvalConfig":
        """The same generation settings on prompts that should not be refused (greedy, no attack)."""
        return replace(self, sets=tuple(sets), n=self.n if n is None else n, setting="vanilla")

    def prompts(self) -> list[Prompt]:
        return load_prompts(self.sets, self.n)


@dataclass(frozen=True)
class PromptDigest:
    """The prompts' ids and texts, so a user file edited in place is a new measurement."""

    sha256: str


def _digest(prompts: list[Prompt]) -> PromptDigest:
    return PromptDigest(hashlib.sha256("\n".join(f"{p.id}\t{p.text}" for p in prompts).encode()).hexdigest())


def measure(model, tokenizer, cfg: EvalConfig, store: Path, model_id, label: str | None = None, judges=None) -> dict:
    """Generations of `cfg`'s prompts, judged per prompt, cached; `model` may be a zero-argument
    callable that builds it (called only when the measurement is not cached). Rates are added on
    every load, so they follow the current statistics code. `label` names the pass on the progress
    bar (default: pass_label). `judges` (a refusal.judge_spec.JudgePanel) adds its model judges'
    verdicts on the stored completions, cached apart (refusal.judging), and `judged_by`."""
    prompts = cfg.prompts()

    def compute():
        m = model if isinstance(model, torch.nn.Module) else model()
        return timed(lambda: generate_records(m, tokenizer, prompts, cfg, label or pass_label(cfg)))

    kind, configs = f"generations-{cfg.setting}", [cfg, _digest(prompts)]
    result = measured(store, kind, model_id, configs, compute)
    if judges is not None and judges.model_judges:
        from .judging import judge_measurement

        result = judge_measurement(
            result,
            judges,
            store,
            dict(kind=kind, key=measurement_digest(model_id, *configs)),
            cfg.max_new_tokens,
            harmless=(label or pass_label(cfg)) == "over-refusal",
        )
    return dict(result, rates=rates(result))


def measure_prompts(model, tokenizer, prompts: list[Prompt], cfg: EvalConfig, store: Path, model_id) -> dict:
    """`measure` on prompts that are not an evaluation set (e.g. the training instructions a
    refusal-prediction probe is fitted on): keyed by the prompts and the generation settings only,
    so a change of evaluation sets does not regenerate them."""
    if not prompts:
        raise UserError("no prompts to measure")
    result = measured(
        store,
        f"generations-{cfg.setting}",
        model_id,
        [cfg.asr_config(), _digest(prompts)],
        lambda: timed(lambda: generate_records(model, tokenizer, prompts, cfg, "refusal-probe training prompts")),
    )
    return dict(result, rates=rates(result))


def pass_label(cfg: EvalConfig) -> str:
    """What a generation pass is for, as its progress bar says: over-refusal on the built-in harmless
    sets, else ASR (a caller measuring a user's harmless file says so with measure's `label`)."""
    return "over-refusal" if set(cfg.sets) <= set(HARMLESS_SETS) else "ASR"


def generate_records(model, tokenizer, prompts: list[Prompt], cfg: EvalConfig, label: str = "ASR") -> dict:
    """Generate and judge: refusal.asr's result plus one record per prompt (`label`: the progress bar's)."""
    r = attack_success(model, tokenizer, [p.text for p in prompts], cfg.asr_config(), label)
    if cfg.setting == "vanilla":
        per_prompt = [[c] for c in r["completions"]]
    elif cfg.setting == "adv_decoding":
        per_prompt = [list(c) for c in r["completions"]]
    else:  # one completion per GCG suffix, in suffix order
        per_prompt = [[s["completions"][i] for s in r["per_suffix"]] for i in range(len(prompts))]
    records = []
    for p, completions in zip(prompts, per_prompt):
        records.append(
            dict(
                id=p.id,
                source=p.source,
                category=p.category,
                prompt=p.text,
                completions=completions,
                jailbroken={j.name: [j.jailbroken(c) for c in completions] for j in judges()},
                refused={j.name: [j.refused(c) for c in completions] for j in judges()},
            )
        )
    return dict(r, records=records)


def _best_suffix(records: list[dict], judge: str, field: str) -> int:
    """The suffix with the most successes: the published adv-suffix ASR is the max over suffixes
    (for a judge with refusal verdicts only, the suffix with the fewest refusals)."""
    if judge not in records[0][field]:
        return min(
            range(len(records[0]["refused"][judge])), key=lambda s: (sum(r["refused"][judge][s] for r in records), s)
        )
    n_suffixes = len(records[0][field][judge])
    return max(range(n_suffixes), key=lambda s: (sum(r[field][judge][s] for r in records), -s))


def outcomes(result: dict, judge: str, field: str = "jailbroken") -> dict[str, bool] | None:
    """One 0/1 outcome per prompt id (None for adv_decoding, whose 5 samples per prompt are a rate)."""
    records, setting = result["records"], result["setting"]
    if setting == "adv_decoding":
        return None
    s = 0 if setting == "vanilla" else _best_suffix(records, judge, "jailbroken")
    return {r["id"]: bool(r[field][judge][s]) for r in records}


def _rate(records: list[dict], setting: str, judge: str, field: str) -> dict:
    if setting == "adv_decoding":
        return bootstrap_cluster_mean([r[field][judge] for r in records])
    s = 0 if setting == "vanilla" else _best_suffix(records, judge, "jailbroken")
    rate = rate_of(r[field][judge][s] for r in records)
    if setting == "adv_suffix":
        rate["method"] = "wilson, best of the suffixes (optimistic: the max is chosen on the same prompts)"
    return rate


def rates(result: dict, examples: int = 3) -> dict:
    """ASR and refusal rate per judge (95% intervals), the same per source set, and judge
    disagreement (between the two keyword judges). A model judge's verdicts merged into the
    records (refusal.judging) give its rates beside the keyword judges': ASR for a harmful-compliance
    or unsafe-response verdict, refusal for a refusal verdict."""
    records, setting = result["records"], result["setting"]
    names = list(JUDGE_NAMES)
    asr_judges, refusal_judges = (
        list(records[0]["jailbroken"]) if records else names,
        list(records[0]["refused"]) if records else names,
    )

    def block(rs):
        return dict(
            asr={j: _rate(rs, setting, j, "jailbroken") for j in asr_judges},
            refusal={j: _rate(rs, setting, j, "refused") for j in refusal_judges},
            n=len(rs),
        )

    sources = sorted({r["source"] for r in records}, key=[r["source"] for r in records].index)
    split = []
    for r in records:
        for i, c in enumerate(r["completions"]):
            verdicts = {j: r["jailbroken"][j][i] for j in names}
            if len(set(verdicts.values())) > 1:
                split.append(dict(id=r["id"], prompt=r["prompt"], completion=c[:400], jailbroken=verdicts))
    n_completions = sum(len(r["completions"]) for r in records)
    return dict(
        **block(records),
        setting=setting,
        per_source={s: block([r for r in records if r["source"] == s]) for s in sources},
        # Over completions; with adv_decoding's 5 samples per prompt this interval is too narrow.
        judge_disagreement=dict(
            rate=rate_of([True] * len(split) + [False] * (n_completions - len(split))), examples=split[:examples]
        ),
    )


def paired(a: dict, b: dict, judge: str, field: str = "jailbroken") -> dict | None:
    """Exact McNemar test of model a against model b on the same prompts (matched by id); b counts
    prompts where only a's outcome is true. None for adv_decoding."""
    oa, ob = outcomes(a, judge, field), outcomes(b, judge, field)
    if oa is None or ob is None:
        return None
    if oa.keys() != ob.keys():
        raise ValueError("paired test of measurements on different prompts")
    ids = list(oa)
    return mcnemar_exact([oa[i] for i in ids], [ob[i] for i in ids])


def paired_perplexity(a: dict, b: dict) -> dict | None:
    """Perplexity of model a over model b on the same windows (ratio, bootstrap interval, exact
    Wilcoxon signed-rank test); None for a measurement made before per-window NLL was kept."""
    if "window_nll" not in a or "window_nll" not in b:
        return None
    if a["window_tokens"] != b["window_tokens"]:
        raise ValueError("paired perplexity of measurements on different windows")
    return paired_perplexity_ratio(a["window_nll"], b["window_nll"], a["window_tokens"])


def paired_zero_shot(a: dict | None, b: dict | None) -> dict | None:
    """Exact McNemar test of two models' per-document correctness, pooled over the tasks both ran
    (the same first documents of each task); None when either kept no per-document results."""
    if not a or not b:
        return None
    da, db = _per_document(a), _per_document(b)
    if da.keys() != db.keys() or any(da[t] is None or db[t] is None for t in da):
        return None
    if any(len(da[t]) != len(db[t]) for t in da):
        raise ValueError("paired zero-shot test of measurements on different documents")
    return mcnemar_exact([x >= 0.5 for t in da for x in da[t]], [x >= 0.5 for t in db for x in db[t]])


def describe_prompts(result: dict, family_size: int = 1) -> dict:
    """What a measurement ran on: n, prompts per source set, the overlap with any prompt a stage fits
    on (0 for the built-in sets) and the smallest paired difference n can detect after Holm over
    `family_size`: as the family's smallest p (Holm's first step) and at best (its last step)."""
    prompts = [Prompt(r["id"], r["source"], r["prompt"]) for r in result["records"]]
    per_source: dict[str, int] = {}
    for p in prompts:
        per_source[p.source] = per_source.get(p.source, 0) + 1
    return dict(
        n=len(prompts),
        per_source=per_source,
        overlap_with_fitted=overlap_with_fitted(prompts),
        min_detectable_difference=min_detectable_difference(len(prompts), max(1, family_size)),
        min_detectable_difference_last_step=min_detectable_difference(len(prompts)),
    )


def perplexity_rate(p: dict) -> dict | None:
    """A perplexity measurement (lm.perplexity.measure_perplexity) with its bootstrap interval over windows."""
    return bootstrap_perplexity(p["window_nll"], p["window_tokens"]) if "window_nll" in p else None


def _per_document(z: dict) -> dict:
    """Each task's per-document correctness (None for a task measured before it was kept)."""
    return {t: e.get("per_document") for t, e in z["per_task"].items()}


def zero_shot_rates(z: dict) -> dict | None:
    """Mean zero-shot accuracy over tasks (bootstrap over documents) and each task's Wilson interval."""
    docs = _per_document(z)
    if not docs or any(d is None for d in docs.values()):
        return None
    return dict(average=bootstrap_task_mean(docs), per_task={t: wilson(round(sum(d)), len(d)) for t, d in docs.items()})
