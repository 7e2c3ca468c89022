"""AIRD (Chhabra & Khalili 2025): restore one decoder block so the original refusal direction is induced again.

The refusal direction is read from the residual stream at its source (position p, layer l), i.e.
the input of block l, which blocks 0..l-1 write. Compression changed what those blocks write;
AIRD undoes the compression of exactly one of them. Which one: among the `window` blocks just
before l, the block whose restoration gives the highest mean refusal score on harmful prompts,
provided it keeps the harmless next-token distribution close to the unrepaired model's
(KL <= kl_max; repair should change refusal, not everything). No public code exists; these
choices follow the paper's description and are recorded with every candidate's numbers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from lm.errors import UserError
from lm.hooks import decoder_layers

from .readout import Reading, RefusalReadout
from .restore import block_masks, count, restored


@dataclass(frozen=True)
class AirdConfig:
    window: int = 4  # candidate blocks: this many before the source layer
    kl_max: float = 0.1  # largest KL on harmless prompts a chosen block may cause
    layer: int | None = None  # restore this block instead of choosing one

    def __post_init__(self):
        if self.window < 1:
            raise UserError(f"AIRD window must be >= 1, got {self.window}")
        if self.kl_max < 0:
            raise UserError(f"AIRD kl_max must be >= 0, got {self.kl_max}")


@dataclass(frozen=True)
class AirdChoice:
    layer: int
    reason: str  # "best_refusal_within_kl", "forced", or "no_candidate_within_kl_lowest_kl"
    restored: int  # entries the chosen block restores
    candidates: list[dict]  # every candidate block's reading and restored count

    def to_json(self) -> dict:
        return asdict(self)


def candidate_layers(source_layer: int, n_layers: int, window: int) -> list[int]:
    """The blocks writing the residual stream read at `source_layer`, nearest `window` of them."""
    if not 0 <= source_layer < n_layers:
        raise UserError(f"source layer {source_layer} out of range for {n_layers} blocks")
    return list(range(max(0, source_layer - window), source_layer))


def choose_block(readings: dict[int, Reading], kl_max: float) -> tuple[int, str]:
    within = {c: r for c, r in readings.items() if r.kl <= kl_max}
    if within:
        return max(within, key=lambda c: (within[c].refusal, -c)), "best_refusal_within_kl"
    return min(readings, key=lambda c: readings[c].kl), "no_candidate_within_kl_lowest_kl"


def choose_aird_block(
    compressed: nn.Module, original: nn.Module, readout: RefusalReadout, cfg: AirdConfig = AirdConfig()
) -> AirdChoice:
    """Score restoring each candidate block (temporarily) and pick one."""
    n_layers = len(decoder_layers(compressed))
    if cfg.layer is not None:
        if not 0 <= cfg.layer < n_layers:
            raise UserError(f"--layer {cfg.layer} out of range for a model with {n_layers} blocks")
        layers = [cfg.layer]
    else:
        layers = candidate_layers(readout.layer, n_layers, cfg.window)
        if not layers:
            raise UserError(
                "the refusal direction is sourced at layer 0 (the embeddings); no block writes it, so AIRD has nothing to restore"
            )
    readings, sizes = {}, {}
    for layer in layers:
        masks = block_masks(compressed, original, layer)
        sizes[layer] = count(masks)
        with restored(compressed, original, masks):
            readings[layer] = readout.read(first_layer=layer)
    if cfg.layer is not None:
        chosen, reason = cfg.layer, "forced"
    else:
        chosen, reason = choose_block(readings, cfg.kl_max)
    candidates = [dict(layer=c, restored=sizes[c], **readings[c].to_json()) for c in layers]
    return AirdChoice(layer=chosen, reason=reason, restored=sizes[chosen], candidates=candidates)
