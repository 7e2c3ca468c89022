"""Safety attribution at the weight level (Wei et al. 2024, "Assessing the Brittleness of Safety
Alignment via Pruning and Low-Rank Modifications").

Importance scores of every decoder linear weight on a behaviour's data, and pruning by them:

  importance_scores   'wanda': |W_ij| * ||X_j||_2 of the *unpruned* model over every token of the
                      (prompt, response) sequences (Wei et al. dump Wanda scores without their
                      --disentangle flag, i.e. on the full sequence); 'snip': sum over samples of
                      |W * dL/dW| for the response loss (compression/snip.py).
  safety data         the model's own greedy replies to harmful instructions, kept when they are
                      refusals; Wei et al. used Llama-2-chat's own refusals to AdvBench goals.
  utility data        the model's own replies to harmless instructions (refusals dropped: Wei et
                      al.'s utility set, Alpaca-cleaned without safety-related pairs, has none).

Removal rules, each returning the realised fraction (`Removal`):

  prune_top           the highest-scoring `fraction` of each output row (Wei et al.'s --neg_prune
                      reuses Wanda's per-row sort); per='matrix' ranks the whole matrix instead.
  prune_bottom        the lowest-scoring `fraction`, per row (ordinary Wanda / SNIP pruning).
  prune_set_difference  S(p, q) = top-q safety  minus  top-p utility, per weight matrix (Wei et
                      al.'s code ranks each flattened matrix; per='row' ranks within rows). The
                      realised fraction is |S(p, q)| / size <= q: safety weights that are also
                      top utility weights are spared.
  prune_random        a uniformly random `fraction` of each matrix (Wei et al.'s baseline
                      thresholds the whole matrix, so per='matrix' is the default here).

Counts are exact: a fraction f of n entries selects int(f * n) of them (ties broken by topk), per
row or per matrix. Scores live on the CPU as float32; masks are moved to each weight's device.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lm import datasets
from lm.architecture import fused_parts
from lm.cache import cached_tensors
from lm.chat import format_prompt
from lm.errors import UserError

from .blockwise import compress_blockwise
from .calibration import Calibration, ResponseCalibration, tokenize_calibration, tokenize_pairs
from .snip import decoder_linear_weights, snip_scores_one_pass
from .wanda import InputNorms, wanda_scores

METHODS = ("wanda", "snip")
PER = ("row", "matrix")
SAFETY_SOURCES = ("advbench", "harmful")  # AdvBench goals 100..519 (disjoint from the ASR eval), or harmful_train

Scores = dict[str, torch.Tensor]  # "model.layers.{i}.{name}.weight" -> float32 [out, in]


# --- data: the model's own refusals and helpful replies ------------------------------------------


@dataclass(frozen=True)
class OwnRepliesConfig:
    n_samples: int = 128  # instructions sampled; fewer pairs survive the keep-rule
    max_new_tokens: int = 64
    seqlen: int = 256
    batch_size: int = 1  # 1: SNIP takes |.| per sample, as Wei et al. do
    seed: int = 0
    source: str = "advbench"  # for safety data: 'advbench' or 'harmful' (harmful_train)

    def __post_init__(self):
        if self.source not in SAFETY_SOURCES:
            raise UserError(f"unknown safety source {self.source!r}; choose one of {', '.join(SAFETY_SOURCES)}")
        if min(self.n_samples, self.max_new_tokens, self.seqlen, self.batch_size) <= 0:
            raise UserError("n_samples, max_new_tokens, seqlen and batch_size must be positive")


def refusal_strings() -> tuple[str, ...]:
    # Arditi et al.'s strings, read here rather than through refusal.judges: compression/ must not
    # depend on refusal/, and this keep-rule is the same case-insensitive substring match.
    return tuple(s.lower() for s in datasets.judge_definitions()["arditi2024"]["strings"])


def is_refusal(text: str) -> bool:
    lowered = text.lower()
    return any(s in lowered for s in refusal_strings())


def own_replies(model, tokenizer, instructions: list[str], max_new_tokens: int, seed: int = 0) -> list[tuple[str, str]]:
    """(chat-formatted prompt, greedy reply) for every instruction; empty replies dropped."""
    from lm.generation import SamplingConfig, generate

    prompts = [format_prompt(tokenizer, i) for i in instructions]
    replies = generate(
        model, tokenizer, prompts, SamplingConfig(max_new_tokens=max_new_tokens, seed=seed), desc="own replies"
    )
    return [(p, r[0]) for p, r in zip(prompts, replies) if tokenizer(r[0], add_special_tokens=False)["input_ids"]]


def safety_pairs(
    model, tokenizer, n: int = 128, seed: int = 0, max_new_tokens: int = 64, source: str = "advbench"
) -> list[tuple[str, str]]:
    """The model's own refusals: greedy replies to n sampled harmful instructions, refusals kept."""
    OwnRepliesConfig(n_samples=n, max_new_tokens=max_new_tokens, seed=seed, source=source)  # validates
    pool = datasets.advbench_calibration() if source == "advbench" else datasets.instructions("harmful", "train")
    kept = [
        (p, r)
        for p, r in own_replies(model, tokenizer, datasets.sample(pool, n, seed), max_new_tokens, seed)
        if is_refusal(r)
    ]
    if not kept:
        raise UserError(
            f"the model refused none of {n} harmful instructions; there is no safety behaviour to attribute"
        )
    return kept


def utility_pairs(
    model, tokenizer, n: int = 128, seed: int = 0, max_new_tokens: int = 64, drop_refusals: bool = True
) -> list[tuple[str, str]]:
    """The model's own replies to n sampled harmless_train instructions (refusals dropped by default)."""
    pairs = own_replies(
        model, tokenizer, datasets.sample(datasets.instructions("harmless", "train"), n, seed), max_new_tokens, seed
    )
    if drop_refusals:
        pairs = [(p, r) for p, r in pairs if not is_refusal(r)]
    if not pairs:
        raise UserError(f"no usable replies to {n} harmless instructions")
    return pairs


def safety_calibration(model, tokenizer, cfg: OwnRepliesConfig = OwnRepliesConfig()) -> ResponseCalibration:
    pairs = safety_pairs(model, tokenizer, cfg.n_samples, cfg.seed, cfg.max_new_tokens, cfg.source)
    return tokenize_pairs(tokenizer, pairs, cfg.seqlen, cfg.batch_size)


def utility_calibration(model, tokenizer, cfg: OwnRepliesConfig = OwnRepliesConfig()) -> ResponseCalibration:
    pairs = utility_pairs(model, tokenizer, cfg.n_samples, cfg.seed, cfg.max_new_tokens)
    return tokenize_pairs(tokenizer, pairs, cfg.seqlen, cfg.batch_size)


def calibration_from_pairs(
    tokenizer, pairs: list[tuple[str, str]], seqlen: int = 256, batch_size: int = 16, *, raw_instructions: bool = False
) -> Calibration:
    """A prompt `Calibration` of whole chat-formatted prompt + response texts (Wanda on the full sequence).

    Pairs hold chat-formatted prompts (as from safety_pairs) unless `raw_instructions`, when each
    instruction is wrapped in the chat template first (e.g. lm.datasets.safety_short(): Wei et
    al.'s goals with Llama-2-chat's refusals). Texts longer than seqlen keep their last tokens.
    """
    if not pairs:
        raise UserError("no (prompt, response) pairs to calibrate on")
    texts = [(format_prompt(tokenizer, p) if raw_instructions else p) + r for p, r in pairs]
    return tokenize_calibration(tokenizer, texts, seqlen, batch_size)


# --- importance scores -------------------------------------------------------------------------


def wanda_importance(model: nn.Module, data) -> Scores:
    """|W| * ||X||_2 for every decoder linear, on the unpruned model, over every unpadded token.

    compress_blockwise is used only for its block-by-block activation stream: nothing is pruned,
    so each block's inputs are those of the original model.
    """
    scores: Scores = {}

    def record(name: str, linear: nn.Linear, norms: InputNorms) -> None:
        scores[f"{name}.weight"] = wanda_scores(linear.weight, norms.sq).cpu()

    compress_blockwise(model, data, InputNorms, record, desc="Wanda scores")
    return scores


def importance_scores(model: nn.Module, method: str, data) -> Scores:
    """Scores of every decoder linear weight. `data`: a ResponseCalibration (both methods; Wanda reads
    its whole prompt + response sequences) or a Calibration (Wanda only)."""
    if method not in METHODS:
        raise UserError(f"unknown importance method {method!r}; choose one of {', '.join(METHODS)}")
    if method == "wanda":
        return wanda_importance(model, data)
    if not isinstance(data, ResponseCalibration):
        raise UserError("SNIP scores need (prompt, response) data with response labels (a ResponseCalibration)")
    return snip_scores_one_pass(model, data.batches)


def scores_params(method: str, data, fingerprint: str, name: str) -> dict:
    return dict(
        kind="importance-scores", version=1, method=method, dataset=name, data_sha256=data.digest, model=fingerprint
    )


def scores_file(root: Path, method: str, name: str, fingerprint: str, digest: str) -> Path:
    # Fingerprint and digest in the name let several models / data sets share one directory.
    return Path(root) / f"{method}-{name}-{fingerprint[:12]}-{digest[:12]}.safetensors"


def scores_cached(model: nn.Module, method: str, data, path: Path, fingerprint: str, name: str = "data") -> Scores:
    """importance_scores, computed once per (model fingerprint, method, data set name, data digest).

    `path` is the safetensors file, or a directory (any path not ending in .safetensors) in which
    scores_file() names it. The params live in the file's metadata; a mismatch recomputes.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        path = scores_file(path, method, name, fingerprint, data.digest)
    return cached_tensors(
        path, scores_params(method, data, fingerprint, name), lambda: importance_scores(model, method, data)
    )


# --- masks (pure) ------------------------------------------------------------------------------


def _check_fraction(label: str, fraction: float) -> None:
    if not 0 <= fraction <= 1:
        raise UserError(f"{label} must be in [0, 1], got {fraction}")


def _check_per(per: str) -> None:
    if per not in PER:
        raise UserError(f"unknown ranking group {per!r}; choose one of {', '.join(PER)}")


def extreme_mask(scores: torch.Tensor, fraction: float, largest: bool, per: str = "row") -> torch.Tensor:
    """Boolean mask of the int(fraction * n) highest (or lowest) scores of each row, or of the matrix."""
    _check_fraction("fraction", fraction)
    _check_per(per)
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if per == "row":
        k = int(scores.shape[1] * fraction)
        if k:
            mask.scatter_(1, scores.topk(k, dim=1, largest=largest).indices, True)
        return mask
    k = int(scores.numel() * fraction)
    if k:
        mask.view(-1)[scores.reshape(-1).topk(k, largest=largest).indices] = True
    return mask


def top_mask(scores: torch.Tensor, fraction: float, per: str = "row") -> torch.Tensor:
    return extreme_mask(scores, fraction, largest=True, per=per)


def bottom_mask(scores: torch.Tensor, fraction: float, per: str = "row") -> torch.Tensor:
    return extreme_mask(scores, fraction, largest=False, per=per)


def random_mask(shape: torch.Size, fraction: float, generator: torch.Generator, per: str = "matrix") -> torch.Tensor:
    # The top of i.i.d. uniform scores: a uniformly random subset with the exact count.
    return top_mask(torch.rand(shape, generator=generator), fraction, per)


def set_difference_mask(
    safety: torch.Tensor, utility: torch.Tensor, p: float, q: float, per: str = "matrix"
) -> torch.Tensor:
    """Weights in the top-q fraction of safety scores and not in the top-p fraction of utility scores."""
    if safety.shape != utility.shape:
        raise UserError(f"safety and utility scores differ in shape: {tuple(safety.shape)} vs {tuple(utility.shape)}")
    _check_fraction("p", p)
    _check_fraction("q", q)
    return top_mask(safety, q, per) & ~top_mask(utility, p, per)


# --- removal on a model ------------------------------------------------------------------------


@dataclass
class Removal:
    """How many weights of each decoder linear a rule selected (and zeroed)."""

    selected: dict[str, int]
    sizes: dict[str, int]

    @property
    def fraction(self) -> float:
        return sum(self.selected.values()) / sum(self.sizes.values())

    @property
    def per_matrix(self) -> dict[str, float]:
        return {name: self.selected.get(name, 0) / size for name, size in self.sizes.items()}

    def to_dict(self) -> dict:
        return dict(fraction=self.fraction, per_matrix=self.per_matrix)


def _check_scores(weights: dict[str, nn.Parameter], scores: Scores, label: str = "scores") -> None:
    unknown = sorted(set(scores) - set(weights))
    if unknown:
        raise UserError(f"{label} for unknown weights: {unknown[:3]}")
    for name, score in scores.items():
        if score.shape != weights[name].shape:
            raise UserError(
                f"{label} for {name} have shape {tuple(score.shape)}, weight has {tuple(weights[name].shape)}"
            )


@torch.no_grad()
def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> Removal:
    """Zero the masked entries of decoder linear weights in place."""
    weights = decoder_linear_weights(model)
    _check_scores(weights, masks, "masks")
    for name, mask in masks.items():
        weights[name][mask.to(weights[name].device)] = 0
    return Removal(
        selected={n: int(m.sum()) for n, m in masks.items()}, sizes={n: w.numel() for n, w in weights.items()}
    )


def _per_projection(model: nn.Module, shapes: dict[str, torch.Size], select, per: str) -> dict[str, torch.Tensor]:
    """{name: mask}, `select(name, rows)` giving the mask of those output rows. Ranked per matrix,
    a fused matrix (Phi-3 qkv_proj, GPT-NeoX query_key_value, gate_up_proj) is ranked per
    projection, as the unfused q / k / v matrices of a Llama are; per row it makes no difference."""
    masks = {}
    for name, shape in shapes.items():
        every = torch.arange(shape[0])
        parts = fused_parts(model, name, shape[0]).values() if per == "matrix" else [every]
        mask = None
        for rows in parts:
            part = select(name, rows)
            mask = torch.zeros(shape, dtype=torch.bool, device=part.device) if mask is None else mask
            mask[rows.to(part.device)] = part
        masks[name] = mask
    return masks


def prune_top(model: nn.Module, scores: Scores, fraction: float, per: str = "row") -> Removal:
    return apply_masks(
        model,
        _per_projection(
            model,
            {n: s.shape for n, s in scores.items()},
            lambda n, rows: top_mask(scores[n][rows], fraction, per),
            per,
        ),
    )


def prune_bottom(model: nn.Module, scores: Scores, fraction: float, per: str = "row") -> Removal:
    return apply_masks(
        model,
        _per_projection(
            model,
            {n: s.shape for n, s in scores.items()},
            lambda n, rows: bottom_mask(scores[n][rows], fraction, per),
            per,
        ),
    )


def prune_random(model: nn.Module, fraction: float, seed: int = 0, per: str = "matrix") -> Removal:
    # One CPU generator walked in model order: the same seed picks the same weights on any device.
    generator = torch.Generator().manual_seed(seed)
    shapes = {name: w.shape for name, w in decoder_linear_weights(model).items()}
    return apply_masks(
        model,
        _per_projection(
            model, shapes, lambda n, rows: random_mask((len(rows), shapes[n][1]), fraction, generator, per), per
        ),
    )


def prune_set_difference(
    model: nn.Module, safety: Scores, utility: Scores, p: float, q: float, per: str = "matrix"
) -> Removal:
    """Zero S(p, q) in every matrix scored by both; the realised fraction is at most q."""
    if set(safety) != set(utility):
        raise UserError("safety and utility scores cover different weights")
    return apply_masks(
        model,
        _per_projection(
            model,
            {n: s.shape for n, s in safety.items()},
            lambda n, rows: set_difference_mask(safety[n][rows], utility[n][rows], p, q, per),
            per,
        ),
    )
