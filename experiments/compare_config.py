"""Settings of the main job (experiments.compare_refusal): which variants, evaluation sizes, and
the values that depend on the device (`CompareConfig.resolved`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import tyro

from compression.calibration import TEXT_SOURCE, CalibrationConfig
from lm.errors import UserError
from lm.perplexity import check_disjoint_from_calibration
from lm.validation import FRACTION, NON_NEGATIVE, POSITIVE, Range, check_ranges, plain_name
from refusal.eval_sets import check_names, check_roles
from refusal.measure import DEFAULT_HARMFUL, DEFAULT_HARMLESS, EvalConfig
from repair.anchored import AnchoredConfig

# The issue-sized comparison: Wanda at three sparsities and 2:4, SNIP, SparseGPT, Wei et al.'s set
# difference, GPTQ and RTN. Set difference at p = q = 1%: on the embedded model it broke refusal
# (ASR 19% -> 75%, experiments.brittleness) with 0.23% of the weights, where p = q = 3% gave 38%.
DEFAULT_VARIANTS = ("wanda:0.5", "wanda:0.6", "wanda:0.7", "wanda:2:4", "snip:0.5", "sparsegpt:0.5",
                    "setdiff-wanda:p=0.01,q=0.01", "gptq:int4", "rtn:int8")
QUICK_VARIANTS = ("wanda:0.5", "rtn:int8")

# Where each numeric setting may lie (None, where a field allows it, is always fine).
RANGES = dict(
    n_asr=POSITIVE, n_harmless=POSITIVE, max_new_tokens=POSITIVE, n_train=POSITIVE, ppl_windows=POSITIVE, ppl_seqlen=Range(2),
    calib_samples=POSITIVE, calib_seqlen=Range(2), batch_size=POSITIVE, seed=NON_NEGATIVE, n_val=POSITIVE, prescreen_n_val=NON_NEGATIVE,
    prescreen_keep=POSITIVE, n_ablation_asr=NON_NEGATIVE, n_refusal_probe=NON_NEGATIVE, zero_shot_limit=NON_NEGATIVE,
    repair_below=Range(-1, 1), repair_n_asr=POSITIVE, repair_max_new_tokens=POSITIVE, repair_curve_fractions=FRACTION,
    repair_curve_n_asr=POSITIVE,
)


@dataclass
class CompareConfig:
    """Settings of the main job. Fields left None take a device-dependent value (see `resolved`):
    the paper-sized one on a GPU, a smaller one on CPU, where the same stages would take days."""

    model: str = "embedded"  # 'embedded', a hub id, a local safetensors directory, or a .gguf file
    variants: tuple[str, ...] = DEFAULT_VARIANTS  # variant specs, e.g. wanda:0.6 wanda:2:4 magnitude:0.5 rtn:int4:g32
    name: str | None = None  # run directory name under runs_dir (None: compare-<model>, quick-<model> with --quick)
    runs_dir: str = "runs"  # where run directories and the measurement store live
    eval_sets: tuple[str, ...] = DEFAULT_HARMFUL  # held-out harmful sets for ASR: advbench jailbreakbench harmbench strongreject, or file:PATH
    n_asr: int = 50  # first prompts of each harmful evaluation set
    harmless_sets: tuple[str, ...] = DEFAULT_HARMLESS  # held-out harmless sets for over-refusal: alpaca or file:PATH
    n_harmless: int = 100  # first prompts of each harmless set (100: what a repair's over-refusal claim needs; 50 detects 16 points)
    #: The measurement store (refusal.measure), shared by every entry point that points at it, so the
    #: same model under the same settings is generated once; None: <runs_dir>/measurements.
    measurements_dir: str | None = None
    max_new_tokens: int = 128  # tokens generated per completion
    n_train: int = 128  # harmful and harmless instructions for the directions, each
    ppl_windows: int = 16  # wikitext-2 windows for perplexity (16: the paired Wilcoxon test can reach p < 0.05 after Holm; 8 cannot)
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
    #: Zero-shot documents per task (lm-eval); 0 skips zero-shot. None: 200 on a GPU, 24 on CPU.
    zero_shot_limit: int | None = None
    #: Zero-shot tasks, or 'all'. None: all 7 on a GPU; boolq rte winogrande arc_easy on CPU.
    zero_shot_tasks: tuple[str, ...] | None = None
    #: Repair (repair/: anchored restoration, AIRD and the static baseline) of the variants that need
    #: it: with repair_when="evidence", those whose held-out ASR rose significantly against the
    #: original (exact McNemar, Arditi judge, Holm over the variants) and did not collapse; with
    #: "direction", those whose direction's cosine at the original's source is below repair_below.
    repair: bool = True
    repair_when: Literal["evidence", "direction"] = "evidence"  # which variants are repaired: ASR rose significantly, or the direction moved
    repair_below: float = 0.99  # with repair_when="direction": repair a variant whose cosine at the original's source is below this
    #: The anchored restoration's settings (the same flags as python -m repair's --anchored.*).
    anchored: Annotated[AnchoredConfig, tyro.conf.arg(name="anchored")] = field(default_factory=AnchoredConfig)
    #: The repair's evaluation sizes (the repair_* fields): None = the comparison's own (so the
    #: original's and the compressed model's measurements are reused), on a GPU with adversarial
    #: suffixes and a 4-point restoration curve; on CPU vanilla ASR only and a 2-point curve on 16
    #: prompts per set.
    repair_n_asr: int | None = None
    repair_max_new_tokens: int | None = None  # tokens per completion in the repair's evaluation (None: max_new_tokens)
    repair_adv_suffix: bool | None = None  # adversarial-suffix ASR in the repair (None: on a GPU only)
    repair_curve_fractions: tuple[float, ...] | None = None  # restored fractions of AIRD's count on the repair curve
    repair_curve_n_asr: int | None = None  # prompts of each set per repair-curve point

    def __post_init__(self):
        from lm.zero_shot import task_names

        self.variants, self.zero_shot_tasks = tuple(self.variants), task_names(self.zero_shot_tasks)
        if not self.variants:
            raise UserError("variants (--variants): give at least one variant spec to compare with the original, e.g. wanda:0.5")
        plain_name(self.name)
        check_ranges(self, RANGES)
        self.eval_sets, self.harmless_sets = check_names(self.eval_sets), check_names(self.harmless_sets)
        check_roles(self.eval_sets, self.harmless_sets)
        self.eval_config()  # bad evaluation settings fail before any model loads
        self.calibration_config()  # fails on bad calibration settings before any work
        if self.calib_source == TEXT_SOURCE:
            check_disjoint_from_calibration(self.ppl_windows, self.ppl_seqlen)

    def eval_config(self, n: int | None = None) -> EvalConfig:
        return EvalConfig(sets=self.eval_sets, n=n or self.n_asr, setting="vanilla", max_new_tokens=self.max_new_tokens,
                          seed=self.seed, batch_size=self.batch_size)

    def harmless_config(self) -> EvalConfig:
        return self.eval_config().harmless(self.harmless_sets, self.n_harmless)

    def store(self) -> Path:
        return Path(self.measurements_dir) if self.measurements_dir else Path(self.runs_dir) / "measurements"

    def calibration_config(self) -> CalibrationConfig:
        return CalibrationConfig(source=self.calib_source, n_samples=self.calib_samples, seqlen=self.calib_seqlen, seed=self.seed)

    @classmethod
    def quick(cls, **overrides) -> "CompareConfig":
        """CI-sized: the same stages on a handful of prompts and two variants."""
        small = dict(variants=QUICK_VARIANTS, n_asr=8, n_harmless=8, max_new_tokens=24, n_train=16, ppl_windows=2, ppl_seqlen=256, calib_samples=16,
                     n_val=4, prescreen_n_val=2, prescreen_keep=4, n_ablation_asr=4, n_refusal_probe=16, zero_shot_limit=0, repair=False)
        return cls(**{**small, **overrides})

    def resolved(self, on_gpu: bool) -> "CompareConfig":
        """A copy with every None replaced by its value on this device (recorded in config.json)."""
        from lm.zero_shot import ALL_TASKS, SHORT_TASKS

        gpu = dict(zero_shot_limit=200, zero_shot_tasks=ALL_TASKS, repair_n_asr=self.n_asr, repair_curve_n_asr=self.n_asr,
                   repair_max_new_tokens=self.max_new_tokens, repair_adv_suffix=True, repair_curve_fractions=(0.01, 0.03, 0.1, 0.3))
        cpu = dict(zero_shot_limit=24, zero_shot_tasks=SHORT_TASKS, repair_n_asr=self.n_asr, repair_curve_n_asr=min(16, self.n_asr),
                   repair_max_new_tokens=self.max_new_tokens, repair_adv_suffix=False, repair_curve_fractions=(0.03, 0.3))
        fill = {k: v for k, v in (gpu if on_gpu else cpu).items() if getattr(self, k) is None}
        return dataclasses.replace(self, **fill)

    def run_dir(self) -> Path:
        name = self.name or "compare-" + Path(self.model).name.replace("/", "-")
        return Path(self.runs_dir) / name


