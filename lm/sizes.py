"""Run sizes: how much work a job spends (prompts, tokens, documents, restoration steps), as three
named presets shared by every entry point that takes `--size` (experiments.compare_refusal,
python -m repair). A size fills the defaults; a flag or a --config value given beside it wins.

quick  every stage once, on a handful of prompts, to check that a job runs end to end; its
       numbers are too few for any claim, and its report says so.
cpu    sized for a few CPU cores: greedy (vanilla) ASR only, zero-shot on 4 tasks x 24 documents.
paper  the published sizes, for a GPU: adversarial-suffix ASR too, zero-shot on 7 tasks x 200
       documents, each compressed model's own direction selected in the repair.

Without --size an entry point takes `paper` where CUDA is available and `cpu` elsewhere. The
chosen size is recorded in the run's config.json with every value it set.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import UserError
from .zero_shot_tasks import ALL_TASKS, SHORT_TASKS

SIZES = ("quick", "cpu", "paper")


@dataclass(frozen=True)
class RunSize:
    """One preset. Field names are the configs' own where both entry points share a setting; each
    config maps the rest (`CompareConfig.sized`, `RepairConfig.sized`)."""

    name: str
    # Held-out evaluation, both jobs.
    n_asr: int  # first prompts of each harmful set
    n_harmless: int  # first prompts of each harmless set
    max_new_tokens: int  # tokens per completion
    ppl_windows: int
    ppl_seqlen: int
    zero_shot_limit: int  # documents per task (0: no zero-shot)
    zero_shot_tasks: tuple[str, ...]
    # Directions and selection, both jobs.
    n_train: int
    n_val: int
    prescreen_n_val: int
    prescreen_keep: int
    n_refusal_probe: int  # harmful training prompts generated for the refusal-prediction probe (0: none)
    # The repair (python -m repair's own fields; the main job's repair_* fields).
    adv_suffix: bool  # adversarial-suffix ASR too (3 more generation passes per state)
    select_compressed: bool  # the compressed model's own selection inside the repair
    static_fractions: tuple[float, ...]
    static_samples: int  # harmful prompts answered by the original for the static baseline's safety scores
    anchored: dict = field(default_factory=dict)  # repair.anchored.AnchoredConfig fields that differ from its defaults
    # The main job only.
    variants: tuple[str, ...] | None = None  # None: the job's default list
    calib_samples: int = 128
    n_ablation_asr: int = 16
    #: Which variants the main job repairs; None: the job's default (the evidence criterion).
    #: "always" in the quick size, whose few prompts can make no variant's change significant.
    repair_when: str | None = None


_PAPER = RunSize(
    name="paper",
    n_asr=50,
    n_harmless=100,
    max_new_tokens=128,
    ppl_windows=16,
    ppl_seqlen=512,
    zero_shot_limit=200,
    zero_shot_tasks=ALL_TASKS,
    n_train=128,
    n_val=32,
    prescreen_n_val=8,
    prescreen_keep=16,
    n_refusal_probe=128,
    adv_suffix=True,
    select_compressed=True,
    static_fractions=(0.03, 0.1, 0.3),
    static_samples=128,
)

PRESETS: dict[str, RunSize] = {
    "paper": _PAPER,
    # The same prompts as paper (so the same detectable differences), without what costs hours on
    # CPU and changes no claim of the main table: adversarial suffixes (3 more passes per state),
    # 175 more documents per zero-shot task and 3 more tasks, the repair's second selection.
    "cpu": RunSize(
        **{
            **_PAPER.__dict__,
            "name": "cpu",
            "zero_shot_limit": 24,
            "zero_shot_tasks": SHORT_TASKS,
            "adv_suffix": False,
            "select_compressed": False,
        }
    ),
    # Every stage once on the embedded model in minutes. The selection needs n_val = 16 and 6
    # prescreened candidates: with 4 validation prompts (or 16 and 2 candidates) no candidate passed
    # the filters on the embedded model; 16 and 6 select (-1, 15) (measured 2026-12-07). Zero-shot
    # on arc_easy, whose documents are short (boolq's passages took 36 s for 8 documents).
    "quick": RunSize(
        name="quick",
        n_asr=8,
        n_harmless=8,
        max_new_tokens=16,
        ppl_windows=2,
        ppl_seqlen=128,
        zero_shot_limit=8,
        zero_shot_tasks=("arc_easy",),
        n_train=16,
        n_val=16,
        prescreen_n_val=2,
        prescreen_keep=6,
        n_refusal_probe=8,
        adv_suffix=False,
        select_compressed=False,
        static_fractions=(0.1,),
        static_samples=8,
        anchored=dict(
            n_harmful=8,  # the anchor reads the original's clean refusals among them (about 60%)
            n_harmless=4,
            reply_tokens=8,
            val_harmful=8,
            val_harmless=8,
            val_tokens=8,
            max_steps=2,
            step=0.05,
            bisect_steps=0,
            batch_size=4,
        ),
        # The set difference at p = q = 1% raised the embedded model's ASR from 37% to 90% in the
        # reference run, so the quick repair has something to restore (built here from 8 own
        # replies of 16 tokens; 87.5% against the original's 50% on the quick prompts, 2026-12-07).
        variants=("setdiff-wanda:p=0.01,q=0.01",),
        calib_samples=8,
        n_ablation_asr=4,
        repair_when="always",
    ),
}


#: The settings both entry points have under these names; each config maps the others itself.
SHARED = (
    "n_asr",
    "n_harmless",
    "max_new_tokens",
    "ppl_windows",
    "ppl_seqlen",
    "zero_shot_limit",
    "zero_shot_tasks",
    "n_train",
    "n_val",
    "prescreen_n_val",
    "prescreen_keep",
    "n_refusal_probe",
)


def shared_values(size: RunSize) -> dict:
    return {name: getattr(size, name) for name in SHARED}


def preset(name: str) -> RunSize:
    if name not in PRESETS:
        raise UserError(f"unknown size {name!r}; choose one of {', '.join(SIZES)}")
    return PRESETS[name]


def default_size() -> str:
    """The size a job takes when none is given: paper with CUDA, cpu without."""
    import torch

    return "paper" if torch.cuda.is_available() else "cpu"
