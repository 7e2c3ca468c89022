"""Does harmless fine-tuning move the safety-critical weights? (the CS2881 extension of Wei et al. 2024)

    python -m experiments.frozen_finetune                   # embedded model, CPU-sized defaults
    python -m experiments.frozen_finetune --quick           # CI-sized
    python -m experiments.frozen_finetune --model Qwen/Qwen2.5-7B-Instruct --dtype bfloat16 \\
        --steps 500 --lr 2e-4 --batch-size 16 --n-train 1024 --n-safety 128 --n-utility 128 --max-new-tokens 128 --seqlen 384

1. Scores: Wanda importance (compression.attribution) of every decoder linear weight on the
   model's own refusals to harmful instructions (safety) and its own replies to harmless ones
   (utility); the groups of compression.weight_groups: safety-critical (top-q safety minus top-p
   utility), top safety, top utility, random.
2. Frozen arm: LoRA (peft, all seven linear types of every decoder block by default) on harmless
   instructions with the model's own greedy replies as targets, every safety-critical weight
   frozen individually (experiments.frozen_finetune.lora). Then the three scored groups are recomputed
   on the merged model with the same data and settings, and compared with the originals (overlap
   and Jaccard). The frozen weights are checked to be bit-for-bit unchanged.
3. Unfrozen arm: the same training with nothing frozen, the same recomputation, and the drift of
   the four groups at evenly spaced checkpoints (float32, from the merged updates; absolute and
   guarded relative drift, and norm ratios).

Training data: the CS2881 study fine-tuned on a harmless instruction set; the harmless_train
instructions here (Alpaca) ship without responses, so the targets are the model's own greedy
replies (refusals dropped), on instructions disjoint from the utility-scoring ones. This is
close to self-distillation: the loss starts low and the updates are smaller than training on
another model's answers would give.

Defaults (CPU-sized): 32 harmful and 32 harmless scoring instructions, 48 training instructions,
replies of at most 40 tokens, p = q = 3% per matrix, LoRA rank 8 on q/k/v/o/gate/up/down of every
block, 20 AdamW steps of 4 sequences at lr 1e-3, drift at steps 0, 5, 10, 15, 20. The frozen arm
costs about 2.5 times the unfrozen one per step (its update is materialised densely so the mask
is exact). GPU-sized runs take the same command with larger numbers (see above).

Every stage is cached in runs/<name>/ and reused by a rerun with the same settings.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from compression.attribution import (
    importance_scores,
    is_refusal,
    own_replies,
    safety_pairs,
    scores_cached,
    utility_pairs,
)
from compression.calibration import tokenize_pairs
from compression.weight_groups import (
    SCORED_GROUPS,
    GroupConfig,
    agreement,
    group_drift,
    group_sizes,
    scored_groups,
    weight_groups,
)
from lm import datasets
from lm.architecture import check_dense
from lm.cache import atomic_dir, atomic_save_tensors, atomic_write_json, atomic_write_text, cached_json
from lm.cli import parse_config
from lm.errors import UserError, cli
from lm.loading import load_model, model_fingerprint

from .lora import (
    LoraTrainConfig,
    attach_lora,
    check_targets,
    decoder_linear_modules,
    linear_kinds,
    merged,
    train,
)
from .report import drift_figure, overlap_figure, render_markdown

ARMS = ("frozen", "unfrozen")
# CS2881 (Jaccard of each group before vs after fine-tuning with the safety-critical weights frozen).
PUBLISHED_JACCARD = {"safety_critical": 0.15, "top_safety": 0.24, "top_utility": 0.34}


@dataclass
class FrozenFinetuneConfig:
    model: str = "embedded"  # 'embedded', a hub id, a local safetensors directory, or a .gguf file
    name: str | None = None  # run directory name under runs_dir (None: frozen-finetune[-quick][-<model>])
    runs_dir: str = "runs"  # where run directories live
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # weights and activations
    seed: int = 0  # every sample, split and random choice
    n_safety: int = 32  # harmful instructions sampled; the model's own refusals among them are the safety data
    n_utility: int = 32  # harmless instructions for the utility scores (the model's own greedy replies)
    n_train: int = 48  # harmless instructions (disjoint from the utility ones) for fine-tuning
    max_new_tokens: int = 40  # reply length
    seqlen: int = 160  # prompt + reply tokens per sequence
    score_batch_size: int = 8  # sequences per Wanda-scoring pass
    p: float = 0.03  # top-p utility fraction spared by the set difference
    q: float = 0.03  # top-q safety fraction
    per: Literal["matrix", "row"] = "matrix"  # rank scores per matrix or per output row
    rank: int = 8  # LoRA rank
    alpha: float = 16.0  # LoRA alpha
    dropout: float = 0.0  # LoRA dropout
    #: LoRA target linear names (e.g. q_proj down_proj); None: every linear of the decoder blocks
    targets: tuple[str, ...] | None = None
    #: AdamW learning rate. CPU-sized: 20 steps at 1e-3 move the adapter about as far as 100 at 2e-4
    #: (a usual LoRA rate); at GPU scale use e.g. --lr 2e-4 --steps 500.
    lr: float = 1e-3
    steps: int = 20  # optimizer steps per arm
    batch_size: int = 4  # sequences per step
    checkpoints: int = 4  # drift is measured at this many evenly spaced steps (and step 0)
    eps_fraction: float = 0.1  # relative-drift guard: eps = eps_fraction * mean |W0| of each matrix
    figures_dir: str | None = None  # also export the figures here as HTML + PNG (e.g. figures/)

    def __post_init__(self):
        if (
            min(
                self.n_safety,
                self.n_utility,
                self.n_train,
                self.max_new_tokens,
                self.seqlen,
                self.score_batch_size,
                self.batch_size,
                self.checkpoints,
            )
            <= 0
        ):
            raise UserError("sample counts, token lengths, batch sizes and checkpoints must be positive")
        if self.eps_fraction <= 0:
            raise UserError(f"--eps-fraction must be positive, got {self.eps_fraction}")
        self.group_config()
        self.train_config()

    @classmethod
    def quick(cls, **overrides) -> FrozenFinetuneConfig:
        """CI-sized: every stage on a handful of short sequences."""
        small = dict(
            n_safety=6, n_utility=4, n_train=4, max_new_tokens=12, seqlen=96, steps=2, batch_size=2, checkpoints=1
        )
        return cls(**{**small, **overrides})

    def group_config(self) -> GroupConfig:
        return GroupConfig(p=self.p, q=self.q, per=self.per, seed=self.seed)

    def train_config(self) -> LoraTrainConfig:
        return LoraTrainConfig(
            rank=self.rank,
            alpha=self.alpha,
            dropout=self.dropout,
            targets=None if self.targets is None else tuple(self.targets),
            lr=self.lr,
            steps=self.steps,
            seed=self.seed,
        )

    def checkpoint_steps(self) -> tuple[int, ...]:
        n = min(self.checkpoints, self.steps)
        return tuple(sorted({0} | {round(self.steps * k / n) for k in range(1, n + 1)}))

    def run_dir(self) -> Path:
        if self.name:
            return Path(self.runs_dir) / self.name
        slug = "" if self.model == "embedded" else "-" + Path(self.model).name.replace("/", "-")
        return Path(self.runs_dir) / f"frozen-finetune{slug}"


def _log(msg: str) -> None:
    print(f"[frozen_finetune] {msg}", file=sys.stderr, flush=True)


def _digest_tensors(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class FrozenFinetune:
    def __init__(self, cfg: FrozenFinetuneConfig):
        self.base = load_model(cfg.model, dtype=cfg.dtype)
        check_dense(self.base.model, "the frozen fine-tuning experiment (LoRA and weight groups on nn.Linear layers)")
        # Resolved before anything is keyed or recorded, so config.json names the linears trained.
        self.cfg = cfg = dataclasses.replace(
            cfg, targets=tuple(cfg.targets) if cfg.targets is not None else linear_kinds(self.base.model)
        )
        self.dir = cfg.run_dir()
        check_targets(self.base.model, cfg.targets)
        self.fingerprint = model_fingerprint(self.base.model)

    # --- data ----------------------------------------------------------------------------
    def data(self) -> dict:
        """Safety, utility and training pairs (chat-formatted prompt, own greedy reply), generated once."""
        c, model, tok = self.cfg, self.base.model, self.base.tokenizer
        params = dict(
            model=self.fingerprint,
            n_safety=c.n_safety,
            n_utility=c.n_utility,
            n_train=c.n_train,
            max_new_tokens=c.max_new_tokens,
            seed=c.seed,
        )

        def make():
            safety = safety_pairs(model, tok, c.n_safety, c.seed, c.max_new_tokens)
            utility = utility_pairs(model, tok, c.n_utility, c.seed, c.max_new_tokens)
            pool = datasets.instructions("harmless", "train")
            # utility_pairs draws datasets.sample(pool, n_utility, seed); training avoids those instructions.
            held_out = set(datasets.sample(pool, c.n_utility, c.seed))
            instructions = datasets.sample([i for i in pool if i not in held_out], c.n_train, c.seed + 1)
            train_pairs = [
                (p, r) for p, r in own_replies(model, tok, instructions, c.max_new_tokens, c.seed) if not is_refusal(r)
            ]
            if not train_pairs:
                raise UserError(f"the model refused all {c.n_train} harmless training instructions")
            return dict(safety=safety, utility=utility, train=train_pairs)

        return cached_json(self.dir / "data.json", params, make)

    # --- scores and groups ---------------------------------------------------------------
    def calibration(self, data: dict) -> dict:
        """The safety and utility pairs tokenized for scoring."""
        c, tok = self.cfg, self.base.tokenizer
        return {
            kind: tokenize_pairs(tok, [tuple(pair) for pair in data[kind]], c.seqlen, c.score_batch_size)
            for kind in ("safety", "utility")
        }

    def original_scores(self, calibration: dict) -> dict:
        """Wanda safety and utility scores of the original model, cached as safetensors."""
        return {
            kind: scores_cached(
                self.base.model, "wanda", cal, self.dir / "scores", self.fingerprint, name=f"{kind}-original"
            )
            for kind, cal in calibration.items()
        }

    def agreement(self, arm: str, adapter_sha256: str, deltas: dict, calibration: dict, groups: dict) -> dict:
        """Overlap of each scored group before and after the arm's update, cached as JSON.

        The merged model's scores are used once and dropped: stored, they would be two full-size
        float32 tensors per arm (2.9 GB per arm on the 0.5B model) for a few numbers.
        """
        c = self.cfg
        params = dict(
            arm=arm,
            model=self.fingerprint,
            adapter=adapter_sha256,
            groups=dataclasses.asdict(c.group_config()),
            data={kind: cal.digest for kind, cal in calibration.items()},
        )

        def make():
            with merged(self.base.model, deltas):
                after = {kind: importance_scores(self.base.model, "wanda", cal) for kind, cal in calibration.items()}
            new = scored_groups(after["safety"], after["utility"], c.group_config())
            return {g: agreement(groups[g], new[g]).to_json() for g in SCORED_GROUPS}

        return cached_json(self.dir / f"agreement-{arm}.json", params, make)

    # --- fine-tuning arms ----------------------------------------------------------------
    def arm(self, arm: str, data: dict, groups: dict, data_digest: str) -> dict:
        """Train one arm (or reuse it): adapter.safetensors + log.json with losses and drift per checkpoint."""
        c, tok = self.cfg, self.base.tokenizer
        train_cfg = c.train_config()
        params = dict(
            arm=arm,
            model=self.fingerprint,
            data=data_digest,
            train=dataclasses.asdict(train_cfg),
            batch_size=c.batch_size,
            seqlen=c.seqlen,
            groups=dataclasses.asdict(c.group_config()),
            checkpoints=list(c.checkpoint_steps()),
            eps_fraction=c.eps_fraction,
        )
        arm_dir = self.dir / arm
        frozen = groups["safety_critical"] if arm == "frozen" else None
        log_path = arm_dir / "log.json"
        if log_path.is_file() and json.loads(log_path.read_text()).get("params") == json.loads(json.dumps(params)):
            from safetensors.torch import load_file

            _log(f"{arm}: reusing {arm_dir}")
            run = attach_lora(self.base.model, train_cfg, frozen)
            run.load_adapter_state(load_file(str(arm_dir / "adapter.safetensors")))
            deltas = run.deltas()
            run.detach()
            return dict(log=json.loads(log_path.read_text())["result"], deltas=deltas)

        _log(
            f"{arm}: LoRA r={c.rank} on {len(data['train'])} pairs, {c.steps} steps of {c.batch_size}"
            + (f", {sum(int(m.sum()) for m in frozen.values())} safety-critical weights frozen" if frozen else "")
        )
        batches = tokenize_pairs(tok, [tuple(pair) for pair in data["train"]], c.seqlen, c.batch_size).batches
        initial = {name: m.weight for name, m in decoder_linear_modules(self.base.model).items()}
        run = attach_lora(self.base.model, train_cfg, frozen)
        drift = []

        def checkpoint(step: int) -> None:
            drift.append(dict(step=step, groups=group_drift(initial, run.deltas(), groups, c.eps_fraction)))

        start = time.perf_counter()
        try:
            losses = train(run, batches, train_cfg, c.checkpoint_steps(), checkpoint, desc=f"LoRA ({arm})")
            seconds = time.perf_counter() - start
            state, deltas = run.adapter_state(), run.deltas()
        finally:
            run.detach()
        log = dict(
            losses=losses,
            drift=drift,
            train_seconds=round(seconds, 1),
            n_pairs=len(data["train"]),
            adapter_sha256=_digest_tensors(state),
        )
        with atomic_dir(arm_dir) as tmp:
            atomic_save_tensors(
                tmp / "adapter.safetensors", state, metadata={"params": json.dumps(params, sort_keys=True)}
            )
            atomic_write_json(tmp / "log.json", dict(params=params, result=log))
        return dict(log=log, deltas=deltas)

    # --- the whole job -------------------------------------------------------------------
    def run(self) -> dict:
        c = self.cfg
        start = time.perf_counter()
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.dir / "config.json", dataclasses.asdict(c))
        data = self.data()
        data_digest = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()
        _log(
            f"data: {len(data['safety'])} refusals, {len(data['utility'])} utility and {len(data['train'])} training pairs"
        )

        calibration = self.calibration(data)
        original = self.original_scores(calibration)
        groups = weight_groups(original["safety"], original["utility"], c.group_config())
        del original  # on disk; only the masks are needed from here on
        sizes = group_sizes(groups)
        initial = {name: m.weight for name, m in decoder_linear_modules(self.base.model).items()}

        arms = {}
        for arm in ARMS:
            result = self.arm(arm, data, groups, data_digest)
            deltas = result["deltas"]
            arms[arm] = dict(
                agreement=self.agreement(arm, result["log"]["adapter_sha256"], deltas, calibration, groups),
                drift=result["log"]["drift"],
                final_drift=group_drift(initial, deltas, groups, c.eps_fraction),
                losses=result["log"]["losses"],
                train_seconds=result["log"]["train_seconds"],
                frozen_unchanged=frozen_unchanged(deltas, groups["safety_critical"]) if arm == "frozen" else None,
            )
            del deltas
        report = dict(
            model=c.model,
            model_name=self.base.name,
            base_fingerprint=self.fingerprint,
            config=dataclasses.asdict(c),
            checkpoint_steps=list(c.checkpoint_steps()),
            n_pairs={k: len(v) for k, v in data.items()},
            group_sizes=sizes,
            chance_jaccard=chance_jaccard(sizes),
            published_jaccard=PUBLISHED_JACCARD,
            arms=arms,
            wall_seconds=round(time.perf_counter() - start, 1),
        )
        figs = dict(frozen_finetune_overlap=overlap_figure(report), frozen_finetune_drift=drift_figure(report))
        atomic_write_json(self.dir / "report.json", report)
        atomic_write_text(self.dir / "report.md", render_markdown(report))
        from ..figures import export

        for line in export(figs, self.dir / "figures"):
            _log(line)
        if c.figures_dir:
            for line in export(figs, Path(c.figures_dir)):
                _log(line)
        _log(f"report: {self.dir / 'report.md'}")
        return report


def frozen_unchanged(deltas: dict[str, torch.Tensor], frozen: dict[str, torch.Tensor]) -> dict:
    """Frozen weights the update touched (must be 0) and how many targeted matrices were checked."""
    moved = sum(int((deltas[n][m] != 0).sum()) for n, m in frozen.items() if n in deltas)
    return dict(
        frozen=sum(int(frozen[n].sum()) for n in frozen if n in deltas),
        moved=moved,
        matrices_checked=sum(1 for n in frozen if n in deltas),
    )


def chance_jaccard(sizes: dict[str, dict]) -> dict[str, float]:
    """Expected Jaccard of two independent uniformly random sets of each group's share f: f / (2 - f)."""
    return {g: s["fraction"] / (2 - s["fraction"]) if s["fraction"] < 1 else 1.0 for g, s in sizes.items()}


def parse_args(argv=None) -> FrozenFinetuneConfig:
    """Flags generated from FrozenFinetuneConfig's fields (lm.cli); --quick starts from FrozenFinetuneConfig.quick()."""
    cfg, presets = parse_config(
        FrozenFinetuneConfig,
        argv,
        prog="python -m experiments.frozen_finetune",
        description=__doc__.split("\n\n")[0],
        presets={"quick": (FrozenFinetuneConfig.quick, "CI-sized run: a handful of short sequences, 2 steps")},
    )
    if presets and cfg.name is None:
        cfg = dataclasses.replace(
            cfg,
            name="frozen-finetune-quick"
            + ("" if cfg.model == "embedded" else "-" + Path(cfg.model).name.replace("/", "-")),
        )
    return cfg


@cli
def main(argv=None) -> int:
    cfg = parse_args(argv)
    FrozenFinetune(cfg).run()
    return 0
