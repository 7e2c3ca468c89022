"""Settings of the repair job (`python -m repair`, and the main job's repair stage)."""

from __future__ import annotations

from dataclasses import dataclass, field

from lm.errors import UserError
from refusal.eval_sets import check_names
from refusal.measure import DEFAULT_HARMFUL, DEFAULT_HARMLESS

from .aird import AirdConfig
from .targeted import TargetedConfig


@dataclass
class RepairConfig:
    original: str = "embedded"
    compressed: str = ""
    out: str = ""
    runs_dir: str = "runs/repair"
    dtype: str = "float32"
    seed: int = 0
    # the original's direction (Arditi et al. selection; see refusal.select.SelectionConfig)
    n_train: int = 128
    n_val: int = 32
    search: str = "lazy"
    prescreen_n_val: int = 8
    prescreen_keep: int = 16
    select_compressed: bool | None = None  # the compressed model's own selection (source shift); None = on GPU only
    source: tuple[int, int] | None = None  # (position, layer) to use instead of the original's selected source
    aird: AirdConfig = field(default_factory=AirdConfig)
    targeted: bool = True
    targeted_cfg: TargetedConfig = field(default_factory=TargetedConfig)
    curve_fractions: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3)  # of AIRD's restored count, for the ASR curve
    save: str = "aird"  # which repaired model becomes the output checkpoint
    # evaluation: held-out harmful prompts (refusal.eval_sets names or file:PATH; the first n_asr
    # of each) and harmless ones for over-refusal; the restoration curve on the first curve_n_asr
    # of each set (None: n_asr)
    eval_sets: tuple[str, ...] = DEFAULT_HARMFUL
    n_asr: int = 50
    harmless_sets: tuple[str, ...] = DEFAULT_HARMLESS
    n_harmless: int = 50
    curve_n_asr: int | None = None
    measurements_dir: str | None = None  # the measurement store; None: <runs_dir>/measurements
    max_new_tokens: int = 128
    adv_suffix: bool = True
    ppl_windows: int = 8
    ppl_seqlen: int = 512
    zero_shot_limit: int | None = 200  # None: the full splits; 0: skip zero-shot
    zero_shot_tasks: tuple[str, ...] | None = None  # None: all seven
    batch_size: int | None = None
    # Probes of every evaluated state (refusal.probing): harmfulness probes fitted on the direction
    # prompts (own, and the original's applied unchanged: transfer), and the original's
    # refusal-prediction probe, fitted on its own verdicts on this many harmful training prompts
    # (0: no refusal-prediction probe), against each state's held-out verdicts.
    probes: bool = True
    n_refusal_probe: int = 128

    def __post_init__(self):
        if self.save not in ("aird", "targeted"):
            raise UserError(f"save must be 'aird' or 'targeted', got {self.save!r}")
        if self.save == "targeted" and not self.targeted:
            raise UserError("save='targeted' needs the targeted repair (do not disable it)")
        if any(not 0 < f <= 1 for f in self.curve_fractions):
            raise UserError(f"curve fractions must lie in (0, 1], got {self.curve_fractions}")
        self.eval_sets, self.harmless_sets = check_names(self.eval_sets), check_names(self.harmless_sets)
        for name in ("n_asr", "n_harmless", "n_val", "n_train", "max_new_tokens", "ppl_windows"):
            if getattr(self, name) <= 0:
                raise UserError(f"{name} must be positive, got {getattr(self, name)}")
        if self.n_refusal_probe < 0:
            raise UserError(f"n_refusal_probe must be 0 (off) or positive, got {self.n_refusal_probe}")
        if self.zero_shot_tasks:
            from lm.zero_shot import ZeroShotConfig

            ZeroShotConfig(tasks=self.zero_shot_tasks)  # an unknown task fails here, not after hours of work
