"""Settings of experiments.brittleness and the sweep they define: which removal methods, at which
fractions of the weights or of the rank, as compression.variants specs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lm.errors import UserError
from lm.perplexity import PerplexityConfig
from lm.validation import FRACTION, NON_NEGATIVE, POSITIVE, Range, check_ranges, plain_name
from lm.zero_shot import SHORT_TASKS, ZeroShotConfig, task_names
from refusal.asr import SETTINGS
from refusal.behaviour import BehaviourConfig
from refusal.eval_sets import check_names, check_roles
from refusal.judge_spec import parse_judges
from refusal.measure import DEFAULT_HARMFUL, DEFAULT_HARMLESS, EvalConfig

WEIGHT_METHODS = ("top-wanda", "top-snip", "setdiff-wanda", "setdiff-snip", "random")
RANK_METHODS = ("actsvd", "actsvd-orth")
METHODS = WEIGHT_METHODS + RANK_METHODS
JUDGES = ("wei2024", "arditi2024")
# Where the numeric settings not checked by name below may lie (None is always fine).
RANGES = dict(
    fractions=FRACTION,
    ranks=Range(0, low_open=True),
    setdiff_p=FRACTION,
    orth_ru=Range(0, low_open=True),
    ppl_seqlen=Range(2),
    zero_shot_limit=POSITIVE,
    batch_size=POSITIVE,
    seed=NON_NEGATIVE,
)


@dataclass
class BrittlenessConfig:
    model: str = "embedded"  # 'embedded', a hub id, a local safetensors directory, or a .gguf file
    name: str = "brittleness"  # run directory name under runs_dir
    runs_dir: str = "runs"  # where run directories and the measurement store live
    methods: tuple[str, ...] = METHODS  # removal methods swept (default all)
    fractions: tuple[float, ...] = (0.01, 0.03)  # weight methods: fraction removed (q for set differences)
    #: Rank methods: int ranks or fractions of min(out, in). One value by default: on CPU each ActSVD
    #: point costs 10-20 minutes (an SVD per decoder linear and calibration set); sweep more on a GPU.
    ranks: tuple[int | float, ...] = (0.025,)
    setdiff_p: float | None = None  # top-p utility scores kept out of a set difference; None: p = q
    #: Rank of P_u for actsvd-orth (int, or fraction of the rank). Wei et al.'s 1096 of 4096 (27%) was
    #: tuned on Llama-2-7B; 7% of the rank is the orthogonal projection that broke refusal while
    #: keeping perplexity within 2x on the embedded model.
    orth_ru: int | float = 0.07
    #: ASR settings (adv-decoding samples 5 per prompt, adv-suffix tries 3 suffixes)
    settings: tuple[str, ...] = SETTINGS
    #: held-out harmful sets for ASR: advbench jailbreakbench harmbench strongreject, or file:PATH
    eval_sets: tuple[str, ...] = DEFAULT_HARMFUL
    n_asr: int = 16  # first prompts of each harmful evaluation set
    harmless_sets: tuple[str, ...] = DEFAULT_HARMLESS  # held-out harmless sets for over-refusal: alpaca or file:PATH
    n_harmless: int = 32  # first prompts of each harmless set
    measurements_dir: str | None = None  # the measurement store; None: <runs_dir>/measurements
    max_new_tokens: int = 48  # tokens generated per completion (Wei et al.: 256)
    #: Judges reported beside the two keyword judges (refusal.judge_spec): wei2024, arditi2024, or
    #: model judges as KIND:HUB-ID-OR-DIR, KIND one of harmbench, llama-guard, wildguard,
    #: refusal-classifier, minos. They read the stored completions (cached apart: adding one to a
    #: finished run generates nothing); see docs/judges.md for the completion length each needs.
    judges: tuple[str, ...] = ()
    ppl_windows: int = 4  # wikitext-2 windows for perplexity
    ppl_seqlen: int = 512  # tokens per perplexity window
    zero_shot_tasks: tuple[str, ...] = SHORT_TASKS  # zero-shot tasks, or 'all'
    zero_shot_limit: int | None = 24  # first N documents per zero-shot task; None = the full split
    calib_samples: int = 64  # instructions for the own refusals / own helpful replies (Wei et al.: 128)
    batch_size: int | None = None  # prompts per forward pass (None: chosen by device)
    seed: int = 0  # every sample, split and random choice
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # weights and activations
    figures_dir: str | None = None  # also export the figure here as HTML + PNG (the README's figures/)
    #: torch intra-op threads (None: torch's default). On a CPU shared with other jobs one thread
    #: generated 5-7x faster than two here: the second thread waits at every barrier.
    threads: int | None = None

    def __post_init__(self):
        for name in ("methods", "fractions", "ranks", "settings"):
            setattr(self, name, tuple(getattr(self, name)))
        self.zero_shot_tasks = task_names(self.zero_shot_tasks)
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise UserError(
                f"unknown method(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(METHODS)}"
            )
        bad = [s for s in self.settings if s not in SETTINGS]
        if bad or not self.settings:
            raise UserError(
                f"unknown ASR setting(s) {', '.join(bad) or '(none given)'}; choose from {', '.join(SETTINGS)}"
            )
        if "vanilla" not in self.settings:  # its greedy completions feed the collapse verdict
            raise UserError("the ASR settings must include vanilla (the collapse check reads its completions)")
        for label, values in (("fraction", self.fractions), ("rank", self.ranks)):
            if len(set(values)) != len(values):
                raise UserError(f"{label}s listed twice: {values}")
        plain_name(self.name)
        self.eval_sets, self.harmless_sets = check_names(self.eval_sets), check_names(self.harmless_sets)
        check_roles(self.eval_sets, self.harmless_sets)
        self.judges = tuple(str(j) for j in self.judges)
        parse_judges(self.judges)  # a malformed judge spec fails before any model loads
        if self.n_asr <= 0 or self.n_harmless <= 0:
            raise UserError(f"--n-asr and --n-harmless must be positive, got {self.n_asr} and {self.n_harmless}")
        if self.max_new_tokens <= 0 or self.ppl_windows <= 0 or self.ppl_seqlen <= 1 or self.calib_samples <= 0:
            raise UserError("max-new-tokens, ppl-windows, ppl-seqlen and calib-samples must be positive")
        if self.threads is not None and self.threads <= 0:
            raise UserError(f"--threads must be positive, got {self.threads}")
        check_ranges(self, RANGES)

    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.name

    def store(self) -> Path:
        return Path(self.measurements_dir) if self.measurements_dir else Path(self.runs_dir) / "measurements"

    def eval_config(self, setting: str) -> EvalConfig:
        return EvalConfig(
            sets=self.eval_sets,
            n=self.n_asr,
            setting=setting,
            max_new_tokens=self.max_new_tokens,
            seed=self.seed,
            batch_size=self.batch_size,
        )

    def behaviour_config(self) -> BehaviourConfig:
        """What each sweep point's held-out behaviour is measured on (refusal.behaviour)."""
        return BehaviourConfig(
            asr=self.eval_config("vanilla"),
            settings=tuple(self.settings),
            harmless=self.eval_config("vanilla").harmless(self.harmless_sets, self.n_harmless),
            perplexity=PerplexityConfig(windows=self.ppl_windows, seqlen=self.ppl_seqlen),
            zero_shot=ZeroShotConfig(tasks=self.zero_shot_tasks, limit=self.zero_shot_limit),
        )


@dataclass(frozen=True)
class Point:
    method: str  # 'original' or one of METHODS
    family: str  # 'weights' or 'ranks' ('original' belongs to both curves)
    requested: float | int  # the swept value as given
    spec: str  # compression.variants spec text


def _number(value: float) -> str:
    # An int rank must stay digits ('8'), a fraction must not turn into one ('1.0', not '1').
    return str(value) if isinstance(value, int) else repr(float(value))


def sweep_points(cfg: BrittlenessConfig) -> list[Point]:
    """The original, then every method at every swept value, as variant specs."""
    points = [Point("original", "original", 0, "original")]
    for method in cfg.methods:
        if method in WEIGHT_METHODS:
            for f in cfg.fractions:
                if method.startswith("setdiff-"):
                    p = f if cfg.setdiff_p is None else cfg.setdiff_p
                    spec = f"{method}:p={_number(p)},q={_number(f)}"
                else:
                    spec = f"{method}:{_number(f)}"
                points.append(Point(method, "weights", f, spec))
        else:
            for r in cfg.ranks:
                spec = (
                    f"actsvd:r={_number(r)}"
                    if method == "actsvd"
                    else f"actsvd-orth:ru={_number(cfg.orth_ru)},rs={_number(r)}"
                )
                points.append(Point(method, "ranks", r, spec))
    return points
