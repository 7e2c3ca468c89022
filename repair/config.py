"""Settings of the repair job (`python -m repair`, and the main job's repair stage), at a named size
(lm.sizes) and from a main job's settings (`main_job_settings`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import tyro

from lm.errors import UserError
from lm.sizes import preset, shared_values
from refusal.eval_sets import check_names
from refusal.judge_spec import parse_judges
from refusal.measure import DEFAULT_HARMFUL, DEFAULT_HARMLESS

from .aird import AirdConfig
from .anchored import AnchoredConfig
from .targeted import TargetedConfig

METHODS = ("anchored", "aird", "targeted", "static")


@dataclass
class RepairConfig:
    """The defaults are the paper size; `sized(name)` gives another (lm.sizes), which is what the
    command line starts from (--size, by device when not given)."""

    #: The size the evaluation settings were taken from (lm.sizes): quick, cpu or paper; recorded
    #: in config.json. Without --size: paper where CUDA is available, cpu elsewhere.
    size: Literal["quick", "cpu", "paper"] = "paper"
    original: str = "embedded"  # the uncompressed model: 'embedded', a hub id, a local directory or a .gguf file
    compressed: str = ""  # the compressed checkpoint (a Hugging Face directory with safetensors); required
    #: output directory: the repaired checkpoint, repair.json, repair.md, figures/; required unless --check
    out: str = ""
    check: bool = False  # only check that the checkpoint derives from the original, per module group; exit 0 if it does, 2 if not; writes nothing
    runs_dir: str = "runs/repair"  # where stage artifacts are cached
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # weights and activations
    seed: int = 0  # every sample, split and random choice
    n_train: int = 128  # harmful and harmless instructions for the original's directions, each
    n_val: int = 32  # validation prompts per class for the original's selection (Arditi et al.)
    search: Literal["lazy", "exhaustive"] = "lazy"  # selection search (lazy: the same choice in fewer passes)
    prescreen_n_val: int = 8  # prescreen candidates on this many harmful prompts (0: off)
    prescreen_keep: int = 16  # candidates the prescreen keeps
    #: also select the compressed model's own direction (source shift); None: on a GPU only (cpu size: off)
    select_compressed: bool | None = True
    #: Use the original's difference-of-means direction at this (negative position, layer) instead of
    #: its selected one.
    source: tuple[int, int] | None = None
    aird: Annotated[AirdConfig, tyro.conf.OmitArgPrefixes] = field(default_factory=AirdConfig)  # AIRD's block choice
    anchored: bool = True  # run the anchored restoration (repair.anchored; the default repair)
    #: Anchored restoration: iterative, re-scored restoration towards the original's replies and
    #: residual stream, stopped where refusal on validation prompts reaches the original's.
    anchored_cfg: Annotated[AnchoredConfig, tyro.conf.arg(name="anchored")] = field(default_factory=AnchoredConfig)
    #: The static baseline (repair.static_ranking): the original's Wanda safety score ranked within
    #: each matrix; read on the validation prompts at these fractions of the changed weights (and
    #: at the anchored repair's count, where it is also evaluated on the held-out prompts).
    static_fractions: tuple[float, ...] = (0.03, 0.1, 0.3)
    #: harmful prompts the original answers for the static baseline's Wanda safety scores (Wei et al.: 128)
    static_samples: int = 128
    targeted: bool = False  # also run the one-shot first-order targeted restoration (repair.targeted; a baseline)
    #: targeted restoration's settings
    targeted_cfg: Annotated[TargetedConfig, tyro.conf.arg(name="targeted")] = field(default_factory=TargetedConfig)
    #: Restored fractions of AIRD's count at which vanilla ASR is measured on held-out prompts for
    #: the AIRD / targeted curve (empty: none; the front on validation prompts replaces it).
    curve_fractions: tuple[float, ...] = ()
    #: Which repaired model becomes the output checkpoint; None: the anchored repair's, or AIRD's
    #: when the anchored repair is off.
    save: Literal["anchored", "aird", "targeted", "static"] | None = None
    #: held-out harmful sets for ASR: advbench jailbreakbench harmbench strongreject, or file:PATH
    eval_sets: tuple[str, ...] = DEFAULT_HARMFUL
    n_asr: int = 50  # first prompts of each harmful evaluation set
    harmless_sets: tuple[str, ...] = DEFAULT_HARMLESS  # held-out harmless sets for over-refusal: alpaca or file:PATH
    n_harmless: int = 100  # first prompts of each harmless set (100: n = 50 could only detect 16 points)
    curve_n_asr: int | None = None  # prompts of each set for the restoration curve's points (None: n_asr)
    #: the measurement store, shared with the other entry points; None: <runs_dir>/measurements
    measurements_dir: str | None = None
    max_new_tokens: int = 128  # tokens generated per completion
    #: Judges reported beside the two keyword judges (refusal.judge_spec): wei2024, arditi2024, or
    #: model judges as KIND:HUB-ID-OR-DIR, KIND one of harmbench, llama-guard, wildguard,
    #: refusal-classifier, minos. They read the stored completions (cached apart: adding one to a
    #: finished run generates nothing); see docs/judges.md for the completion length each needs.
    judges: tuple[str, ...] = ()
    adv_suffix: bool = True  # also measure the adversarial-suffix ASR (cpu size: off)
    ppl_windows: int = 16  # wikitext-2 windows for perplexity (the main job's, so its measurements are reused)
    ppl_seqlen: int = 512  # tokens per perplexity window
    #: zero-shot documents per task; 0 skips zero-shot, None: the full splits (cpu size: 24)
    zero_shot_limit: int | None = 200
    #: zero-shot tasks, or 'all'; None: all seven (cpu size: boolq rte winogrande arc_easy)
    zero_shot_tasks: tuple[str, ...] | None = None
    batch_size: int | None = None  # prompts per forward pass (None: chosen by device)
    #: Probes of every evaluated state (refusal.probing): harmfulness probes fitted on the direction
    #: prompts (own, and the original's applied unchanged: transfer), and the original's
    #: refusal-prediction probe against each state's held-out verdicts.
    probes: bool = True
    #: harmful training prompts the original generates to fit its refusal-prediction probe (0: none)
    n_refusal_probe: int = 128

    def __post_init__(self):
        if self.save is not None and self.save not in METHODS:
            raise UserError(f"save must be one of {', '.join(METHODS)}, got {self.save!r}")
        for method in ("anchored", "targeted"):
            if self.save == method and not getattr(self, method):
                raise UserError(f"--save {method} needs the {method} repair (do not disable it)")
        if self.save == "static" and not self.anchored:
            raise UserError("--save static needs the anchored repair (the static baseline is evaluated at its cost)")
        if any(not 0 < f <= 1 for f in self.curve_fractions):
            raise UserError(f"curve fractions must lie in (0, 1], got {self.curve_fractions}")
        if self.static_samples <= 0:
            raise UserError(f"static_samples must be positive, got {self.static_samples}")
        if any(not 0 < f <= 1 for f in self.static_fractions):
            raise UserError(f"static fractions must lie in (0, 1], got {self.static_fractions}")
        self.eval_sets, self.harmless_sets = check_names(self.eval_sets), check_names(self.harmless_sets)
        self.judges = tuple(str(j) for j in self.judges)
        parse_judges(self.judges)  # a malformed judge spec fails before any model loads
        for name in ("n_asr", "n_harmless", "n_val", "n_train", "max_new_tokens", "ppl_windows"):
            if getattr(self, name) <= 0:
                raise UserError(f"{name} must be positive, got {getattr(self, name)}")
        if self.n_refusal_probe < 0:
            raise UserError(f"n_refusal_probe must be 0 (off) or positive, got {self.n_refusal_probe}")
        if self.zero_shot_limit is not None and self.zero_shot_limit < 0:
            raise UserError(
                f"zero_shot_limit must be 0 (skip), positive or None (the full splits), got {self.zero_shot_limit}"
            )
        if self.batch_size is not None and self.batch_size <= 0:
            raise UserError(f"batch_size must be positive, got {self.batch_size}")
        from lm.zero_shot import task_names

        self.zero_shot_tasks = task_names(self.zero_shot_tasks)  # an unknown task fails here, not after hours of work

    @classmethod
    def sized(cls, size: str, **overrides) -> "RepairConfig":
        """The repair at a named size (lm.sizes), `overrides` applied over it."""
        s = preset(size)
        values = dict(
            shared_values(s),
            size=s.name,
            adv_suffix=s.adv_suffix,
            select_compressed=s.select_compressed,
            static_fractions=s.static_fractions,
            static_samples=s.static_samples,
            anchored_cfg=dataclasses.replace(AnchoredConfig(), **s.anchored),
        )
        return cls(**{**values, **overrides})

    @property
    def saved_method(self) -> str:
        """The repair whose checkpoint is written: --save, else anchored (AIRD when anchored is off)."""
        return self.save or ("anchored" if self.anchored else "aird")


#: A main job's settings (experiments.compare_refusal's CompareConfig, as in its config.json) that
#: its repair stage hands to the repair under the repair's own name. Every other repair setting the
#: main job has is under the same name in both; MAIN_JOB_ONLY are the job's settings the repair has
#: no use for (tests/lm/test_cli.py checks that the three cover every CompareConfig field).
FROM_MAIN_JOB = dict(
    model="original",
    anchored="anchored_cfg",
    select_variants="select_compressed",
    repair_adv_suffix="adv_suffix",
    repair_curve_fractions="curve_fractions",
    repair_static_fractions="static_fractions",
    repair_static_samples="static_samples",
)
MAIN_JOB_ONLY = (
    "name",
    "runs_dir",
    "variants",
    "calib_samples",
    "calib_source",
    "calib_seqlen",
    "save_checkpoints",
    "select",
    "n_ablation_asr",
    "figures_dir",
    "repair",
    "repair_when",
    "repair_below",
    "repair_n_asr",
    "repair_max_new_tokens",
    "repair_curve_n_asr",
    "measurements_dir",
)


def main_job_settings(job: Mapping) -> dict:
    """RepairConfig settings from a main job's (a mapping of CompareConfig fields): the settings its
    repair stage uses, so `python -m repair --config <run>/config.json` repairs a checkpoint as the
    main job would. The main job's repair_n_asr / repair_max_new_tokens / repair_curve_n_asr (None:
    its own n_asr / max_new_tokens) become n_asr / max_new_tokens / curve_n_asr."""
    out = {FROM_MAIN_JOB.get(k, k): v for k, v in job.items() if k not in MAIN_JOB_ONLY}
    for main, own in (
        ("repair_n_asr", "n_asr"),
        ("repair_max_new_tokens", "max_new_tokens"),
        ("repair_curve_n_asr", "curve_n_asr"),
    ):
        if job.get(main) is not None:
            out[own] = job[main]
    if job.get("measurements_dir") is not None or "runs_dir" in job:
        # The main job's measurement store, so its measurements of the original are reused.
        out["measurements_dir"] = job.get("measurements_dir") or str(Path(job["runs_dir"]) / "measurements")
    return out
