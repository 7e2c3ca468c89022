"""A model state's behaviour on the held-out prompts, measured one way by every entry point.

ASR on the harmful evaluation sets (one generation pass per setting), over-refusal on the
harmless sets, perplexity and zero-shot accuracy: each cached in the shared measurement store
(`lm.cache.measured`) under the state's model id, so a measurement one job made is the one the
others read. The main job, the repair and the brittleness sweep call `measure_behaviour` and add
only their own parts (directions, probes, collapse).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from lm.cache import measured, timed
from lm.perplexity import PerplexityConfig, measure_perplexity

from .measure import EvalConfig, measure

if TYPE_CHECKING:  # lm.zero_shot is imported only where zero-shot runs
    from lm.zero_shot import ZeroShotConfig


@dataclass(frozen=True)
class BehaviourConfig:
    asr: EvalConfig  # the harmful prompts and generation settings; its `setting` is replaced by each of `settings`
    settings: tuple[str, ...] = ("vanilla",)  # refusal.asr.SETTINGS measured, in order
    harmless: EvalConfig | None = None  # the over-refusal pass (None: not measured)
    perplexity: PerplexityConfig | None = None
    zero_shot: ZeroShotConfig | None = None
    judges: bool = True  # the model judges (when a panel is given) read the harmful passes too


@dataclass(frozen=True)
class Behaviour:
    """measure() results per ASR setting, the over-refusal pass, perplexity and zero-shot (None
    where the config left them out). The dicts are the measurement store's, unchanged."""

    asr: dict[str, dict]
    harmless: dict | None = None
    perplexity: dict | None = None
    zero_shot: dict | None = None

    def to_json(self) -> dict:
        out = {f"asr_{s}": r for s, r in self.asr.items()}
        for name in ("harmless", "perplexity", "zero_shot"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        return out


def measure_behaviour(
    model,
    tokenizer,
    cfg: BehaviourConfig,
    store: Path,
    model_id,
    judges=None,
    stage: Callable[[str], AbstractContextManager] = lambda name: nullcontext(),
) -> Behaviour:
    """`cfg`'s measurements of one model state. `model` may be a zero-argument callable that builds
    it, called only when a measurement is not cached; `stage(name)` wraps each part (a job's
    progress line). `judges` is a refusal.judge_spec.JudgePanel or None."""
    load = (lambda: model) if isinstance(model, torch.nn.Module) else model
    asr = {}
    for setting in cfg.settings:
        with stage("ASR"):
            asr[setting] = measure(
                load,
                tokenizer,
                replace(cfg.asr, setting=setting),
                store,
                model_id,
                judges=judges if cfg.judges else None,
            )
    harmless = perplexity = zero_shot = None
    if cfg.harmless is not None:
        with stage("over-refusal"):
            harmless = measure(load, tokenizer, cfg.harmless, store, model_id, "over-refusal", judges=judges)
    if cfg.perplexity is not None:
        pcfg = cfg.perplexity
        with stage("perplexity"):
            perplexity = measured(
                store,
                "perplexity",
                model_id,
                [pcfg],
                lambda: timed(lambda: measure_perplexity(load(), tokenizer, pcfg)),
            )
    if cfg.zero_shot is not None:
        from lm.zero_shot import zero_shot_accuracy

        zcfg = cfg.zero_shot
        with stage("zero-shot"):
            zero_shot = measured(
                store, "zero_shot", model_id, [zcfg], lambda: zero_shot_accuracy(load(), tokenizer, zcfg)
            )
    return Behaviour(asr, harmless, perplexity, zero_shot)
