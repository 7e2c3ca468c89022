"""Settings of the main job (experiments.compare_refusal): which variants, and evaluation sizes at
a named size (lm.sizes: quick, cpu, paper; `CompareConfig.sized`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import tyro

from compression.calibration import TEXT_SOURCE, CalibrationConfig
from lm.errors import UserError
from lm.perplexity import PerplexityConfig, check_disjoint_from_calibration
from lm.sizes import PRESETS, preset, shared_values
from lm.validation import FRACTION, NON_NEGATIVE, POSITIVE, Range, check_ranges, plain_name
from lm.zero_shot import ALL_TASKS, ZeroShotConfig, task_names
from refusal.behaviour import BehaviourConfig
from refusal.eval_sets import check_names, check_roles
from refusal.judge_spec import parse_judges
from refusal.measure import DEFAULT_HARMFUL, DEFAULT_HARMLESS, EvalConfig
from repair.anchored import AnchoredConfig

# The issue-sized comparison: Wanda at three sparsities and 2:4, SNIP, SparseGPT, Wei et al.'s set
# difference, GPTQ and RTN. Set difference at p = q = 1%: on the embedded model it broke refusal
# (ASR 19% -> 75%, experiments.brittleness) with 0.23% of the weights, where p = q = 3% gave 38%.
DEFAULT_VARIANTS = (
    "wanda:0.5",
    "wanda:0.6",
    "wanda:0.7",
    "wanda:2:4",
    "snip:0.5",
    "sparsegpt:0.5",
    "setdiff-wanda:p=0.01,q=0.01",
    "gptq:int4",
    "rtn:int8",
)
QUICK_VARIANTS = PRESETS["quick"].variants

# Where each numeric setting may lie (None, where a field allows it, is always fine).
RANGES = dict(
    n_asr=POSITIVE,
    n_harmless=POSITIVE,
    max_new_tokens=POSITIVE,
    n_train=POSITIVE,
    ppl_windows=POSITIVE,
    ppl_seqlen=Range(2),
    calib_samples=POSITIVE,
    calib_seqlen=Range(2),
    batch_size=POSITIVE,
    seed=NON_NEGATIVE,
    n_val=POSITIVE,
    prescreen_n_val=NON_NEGATIVE,
    prescreen_keep=POSITIVE,
    n_ablation_asr=NON_NEGATIVE,
    n_refusal_probe=NON_NEGATIVE,
    zero_shot_limit=NON_NEGATIVE,
    repair_below=Range(-1, 1),
    repair_n_asr=POSITIVE,
    repair_max_new_tokens=POSITIVE,
    repair_curve_fractions=FRACTION,
    repair_curve_n_asr=POSITIVE,
    repair_static_fractions=FRACTION,
    repair_static_samples=POSITIVE,
)


@dataclass
class CompareConfig:
    """Settings of the main job. The defaults are the paper size; `sized(name)` gives another
    (lm.sizes), which is what the command line starts from (--size, by device when not given)."""

    #: The size the evaluation settings were taken from (lm.sizes): quick, cpu or paper; recorded
    #: in config.json. Without --size: paper where CUDA is available, cpu elsewhere.
    size: Literal["quick", "cpu", "paper"] = "paper"
    model: str = "embedded"  # 'embedded', a hub id, a local safetensors directory, or a .gguf file
    variants: tuple[str, ...] = DEFAULT_VARIANTS  # variant specs, e.g. wanda:0.6 wanda:2:4 magnitude:0.5 rtn:int4:g32
    name: str | None = None  # run directory name under runs_dir (None: compare-<model>, quick-<model> with --quick)
    runs_dir: str = "runs"  # where run directories and the measurement store live
    #: held-out harmful sets for ASR: advbench jailbreakbench harmbench strongreject, or file:PATH
    eval_sets: tuple[str, ...] = DEFAULT_HARMFUL
    n_asr: int = 50  # first prompts of each harmful evaluation set
    harmless_sets: tuple[str, ...] = DEFAULT_HARMLESS  # held-out harmless sets for over-refusal: alpaca or file:PATH
    #: first prompts of each harmless set (100: what a repair's over-refusal claim needs; 50 detects 16 points)
    n_harmless: int = 100
    #: The measurement store (refusal.measure), shared by every entry point that points at it, so the
    #: same model under the same settings is generated once; None: <runs_dir>/measurements.
    measurements_dir: str | None = None
    max_new_tokens: int = 128  # tokens generated per completion
    #: Judges reported beside the two keyword judges (refusal.judge_spec): wei2024, arditi2024, or
    #: model judges as KIND:HUB-ID-OR-DIR, KIND one of harmbench, llama-guard, wildguard,
    #: refusal-classifier, minos. They read the stored completions (cached apart: adding one to a
    #: finished run generates nothing); see docs/judges.md for the completion length each needs.
    judges: tuple[str, ...] = ()
    n_train: int = 128  # harmful and harmless instructions for the directions, each
    #: wikitext-2 windows for perplexity (16: the paired Wilcoxon test can reach p < 0.05 after Holm; 8 cannot)
    ppl_windows: int = 16
    ppl_seqlen: int = 512  # tokens per perplexity window
    calib_samples: int = 128  # calibration samples (Wanda, SparseGPT, GPTQ)
    #: What Wanda, SparseGPT and GPTQ calibrate on: "harmless" train instructions (chat-formatted),
    #: or "wikitext" text windows of calib_seqlen tokens (the papers' kind of calibration).
    calib_source: Literal["harmless", "wikitext"] = "harmless"
    calib_seqlen: int = 256  # calibration tokens per sample
    batch_size: int | None = None  # prompts per forward pass (None: chosen by device)
    seed: int = 0  # every sample, split and random choice
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # weights and activations
    save_checkpoints: bool = True  # save every variant as a safetensors checkpoint
    #: Refusal-direction selection (Arditi et al.) for the original and, if select_variants, for every
    #: variant (and everything built on it: quality, ablation, repair).
    select: bool = True
    #: Each variant's own selection, on the original's filtered prompts and candidates
    #: (refusal.select.SharedPrompts), which gives its source shift; off, variants are only scored with
    #: the original's direction (cosine map, quality, ablation).
    select_variants: bool = True
    n_val: int = 32  # validation prompts per class for selection
    search: Literal["lazy", "exhaustive"] = "lazy"  # selection search (lazy: the same choice in fewer passes)
    prescreen_n_val: int = 8  # prescreen candidates on this many harmful prompts (0: off)
    prescreen_keep: int = 16  # candidates the prescreen keeps
    n_ablation_asr: int = 16  # prompts of each eval set generated with the original's direction ablated
    #: Harmfulness probes (refusal.probes) per (position, layer): fitted on the direction prompts,
    #: scored on the held-out ASR and over-refusal prompts; the original's also on each variant.
    probes: bool = True
    #: The refusal-prediction probe (refusal.probing): this many harmful training instructions are
    #: generated by each model (judged as in the ASR) to fit it; 0 skips it.
    n_refusal_probe: int = 128
    figures_dir: str | None = None  # also write the figures here as HTML + PNG (the README's figures/)
    zero_shot_limit: int = 200  # zero-shot documents per task (lm-eval); 0 skips zero-shot (cpu size: 24)
    zero_shot_tasks: tuple[str, ...] = ALL_TASKS  # zero-shot tasks, or 'all' (cpu size: boolq rte winogrande arc_easy)
    #: Repair (repair/: anchored restoration, AIRD and the static baseline) of the variants that need
    #: it: with repair_when="evidence", those whose held-out ASR rose significantly against the
    #: original (exact McNemar, Arditi judge, Holm over the variants) and did not collapse; with
    #: "direction", those whose direction's cosine at the original's source is below repair_below.
    repair: bool = True
    #: Which variants are repaired: ASR rose significantly, the direction moved, or every variant
    #: (the quick size's, whose few prompts can make no change significant: it checks the stage runs).
    repair_when: Literal["evidence", "direction", "always"] = "evidence"
    #: with repair_when="direction": repair a variant whose cosine at the original's source is below this
    repair_below: float = 0.99
    #: The anchored restoration's settings (the same flags as python -m repair's --anchored.*).
    anchored: Annotated[AnchoredConfig, tyro.conf.arg(name="anchored")] = field(default_factory=AnchoredConfig)
    #: The repair's evaluation (the repair_* fields, python -m repair's n_asr, max_new_tokens,
    #: adv_suffix, curve_fractions, curve_n_asr): None = the comparison's own, so the original's and
    #: the compressed model's measurements are reused.
    repair_n_asr: int | None = None
    repair_max_new_tokens: int | None = None  # tokens per completion in the repair's evaluation (None: max_new_tokens)
    repair_adv_suffix: bool = True  # adversarial-suffix ASR in the repair (cpu and quick sizes: off)
    #: restored fractions of AIRD's count on the AIRD / targeted curve (empty: none)
    repair_curve_fractions: tuple[float, ...] = ()
    repair_curve_n_asr: int | None = None  # prompts of each set per repair-curve point (None: the repair's n_asr)
    #: the static baseline's validation points (python -m repair's static_fractions)
    repair_static_fractions: tuple[float, ...] = (0.03, 0.1, 0.3)
    repair_static_samples: int = 128  # the static baseline's safety-score prompts (python -m repair's static_samples)

    def __post_init__(self):
        self.variants, self.zero_shot_tasks = tuple(self.variants), task_names(self.zero_shot_tasks) or ALL_TASKS
        if not self.variants:
            raise UserError(
                "variants (--variants): give at least one variant spec to compare with the original, e.g. wanda:0.5"
            )
        plain_name(self.name)
        check_ranges(self, RANGES)
        self.eval_sets, self.harmless_sets = check_names(self.eval_sets), check_names(self.harmless_sets)
        check_roles(self.eval_sets, self.harmless_sets)
        self.judges = tuple(str(j) for j in self.judges)
        parse_judges(self.judges)  # a malformed judge spec fails before any model loads
        self.eval_config()  # bad evaluation settings fail before any model loads
        self.calibration_config()  # fails on bad calibration settings before any work
        if self.calib_source == TEXT_SOURCE:
            check_disjoint_from_calibration(self.ppl_windows, self.ppl_seqlen)

    def eval_config(self, n: int | None = None) -> EvalConfig:
        return EvalConfig(
            sets=self.eval_sets,
            n=n or self.n_asr,
            setting="vanilla",
            max_new_tokens=self.max_new_tokens,
            seed=self.seed,
            batch_size=self.batch_size,
        )

    def harmless_config(self) -> EvalConfig:
        return self.eval_config().harmless(self.harmless_sets, self.n_harmless)

    def behaviour_config(self) -> BehaviourConfig:
        """What each model's held-out behaviour is measured on (refusal.behaviour)."""
        return BehaviourConfig(
            asr=self.eval_config(),
            harmless=self.harmless_config(),
            perplexity=PerplexityConfig(windows=self.ppl_windows, seqlen=self.ppl_seqlen),
            zero_shot=ZeroShotConfig(tasks=self.zero_shot_tasks, limit=self.zero_shot_limit)
            if self.zero_shot_limit
            else None,
        )

    def store(self) -> Path:
        return Path(self.measurements_dir) if self.measurements_dir else Path(self.runs_dir) / "measurements"

    def calibration_config(self) -> CalibrationConfig:
        return CalibrationConfig(
            source=self.calib_source, n_samples=self.calib_samples, seqlen=self.calib_seqlen, seed=self.seed
        )

    @classmethod
    def sized(cls, size: str, **overrides) -> "CompareConfig":
        """The main job at a named size (lm.sizes), `overrides` applied over it."""
        s = preset(size)
        values = dict(
            shared_values(s),
            size=s.name,
            calib_samples=s.calib_samples,
            n_ablation_asr=s.n_ablation_asr,
            repair_adv_suffix=s.adv_suffix,
            repair_static_fractions=s.static_fractions,
            repair_static_samples=s.static_samples,
            anchored=dataclasses.replace(AnchoredConfig(), **s.anchored),
        )
        if s.variants is not None:
            values["variants"] = s.variants
        if s.repair_when is not None:
            values["repair_when"] = s.repair_when
        return cls(**{**values, **overrides})

    @classmethod
    def quick(cls, **overrides) -> "CompareConfig":
        """The quick size (every stage on a handful of prompts), `overrides` applied over it."""
        return cls.sized("quick", **overrides)

    def run_dir(self) -> Path:
        name = self.name or "compare-" + Path(self.model).name.replace("/", "-")
        return Path(self.runs_dir) / name
