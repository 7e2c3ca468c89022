"""The repair's cost-benefit front: the anchored search, the static baseline and AIRD, all read on
the same validation prompts, and the masks of the states the held-out evaluation measures.

Every point is a restoration of some of the weights the compression changed, with its cost
(weights, and bytes for a packed checkpoint) and its validation reading (refusal on harmful and on
harmless prompts with Wilson intervals, KL to the original and to the compressed model on harmless
prompts). Stages are cached in the checkpoint's run directory like the rest of the repair.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lm.architecture import decoder_matrices
from lm.cache import cached_json, cached_tensors, read_cached_json, read_cached_tensors, tensors_digest

from .anchor import build_anchor
from .anchored import AnchoredConfig, AnchoredSearch
from .restoration_order import RestorationOrder
from .restore import count, restored
from .search_checkpoint import SearchCheckpoint
from .stages import digest
from .static_ranking import within_matrix_masks
from .units import layout_for
from .validation import Validator, validation_instructions


@dataclass(frozen=True)
class Front:
    """What the front stage hands the evaluation: the anchored search and the masks of each state."""

    search: dict  # AnchoredSearch.run's result: points, chosen, reached, reason, changed
    static_points: list[dict]
    aird_point: dict
    original_reading: dict
    masks: dict[str, dict[str, torch.Tensor]]  # state name -> restoration masks (anchored, static, anchored_at_aird)
    targeted_point: dict | None = None

    def to_json(self) -> dict:
        return dict(
            anchored=self.search,
            static=self.static_points,
            aird=self.aird_point,
            targeted=self.targeted_point,
            original=self.original_reading,
            restored={name: count(m) for name, m in self.masks.items()},
        )


def packed_matrix_bytes(loaded) -> dict[str, int] | None:
    """Net bytes each packed matrix of a LoadedModel adds to the output when it is stored at full
    precision (the float weight added, its packed tensors dropped); None for a float checkpoint."""
    from lm.packed.writer import full_precision_cost

    if loaded.packed is None:
        return None
    params = dict(loaded.model.named_parameters())
    out = {}
    for module in loaded.packed.quantized:
        name = f"{module}.weight"
        if name in params:
            cost = full_precision_cost(Path(loaded.path), loaded.packed, {module: tuple(params[name].shape)})
            out[name] = max(0, cost["bytes_added_net"])
    return out


def head_dim(model: nn.Module) -> int | None:
    cfg = model.config
    return getattr(cfg, "head_dim", None) or (
        cfg.hidden_size // cfg.num_attention_heads if getattr(cfg, "num_attention_heads", None) else None
    )


class FrontStage:
    """Runs the anchored search, places the static baseline and AIRD on the front, all cached
    under `where` (the checkpoint's run directory) and `original_dir` (per original)."""

    def __init__(
        self,
        model: nn.Module,
        original: nn.Module,
        tokenizer,
        cfg: AnchoredConfig,
        seed: int,
        source_layer: int,
        where: Path,
        original_dir: Path,
        keys: dict,
        matrix_bytes: dict[str, int] | None = None,
        log=print,
        static_samples: int = 128,
    ):
        self.model, self.original, self.tok, self.cfg, self.seed = model, original, tokenizer, cfg, seed
        self.source_layer, self.where, self.original_dir, self.log = source_layer, Path(where), Path(original_dir), log
        self.keys, self.matrix_bytes, self.static_samples = keys, matrix_bytes, static_samples
        self._validator: Validator | None = None
        self._anchor = None
        hd = head_dim(model)
        params = dict(model.named_parameters())
        self.layouts = {n: layout_for(n, tuple(params[n].shape), cfg.unit, hd) for n in decoder_matrices(model)}

    # --- shared inputs --------------------------------------------------------------------------
    def anchor_instructions(self) -> dict[str, list[str]]:
        from .anchor import anchor_instructions

        return anchor_instructions(self.cfg.anchor(), self.seed)

    def instructions(self) -> dict[str, list[str]]:
        return validation_instructions(self.cfg.validation(), self.anchor_instructions()["harmful"], self.seed)

    def validator(self) -> Validator:
        if self._validator is None:
            self._validator = Validator(self.tok, self.instructions(), self.cfg.validation(), self.original, self.model)
        return self._validator

    def validation_key(self) -> dict:
        return dict(validation=self.cfg.validation().__dict__, prompts=digest(self.instructions()))

    def read(self, path: Path, model_key, masks: dict[str, torch.Tensor] | None = None) -> dict:
        """The validation reading of the compressed model with `masks` restored (None: the model as is), cached at `path`."""
        key = dict(self.validation_key(), model=model_key)

        def compute():
            if masks is None:
                return self.validator().read(self.model).to_json()
            with restored(self.model, self.original, masks):
                return self.validator().read(self.model).to_json()

        return cached_json(path, key, compute)

    def original_reading(self) -> dict:
        key = dict(self.validation_key(), model=self.keys["original"])
        return cached_json(
            self.original_dir / "validation.json", key, lambda: self.validator().read(self.original).to_json()
        )

    # --- the anchored search --------------------------------------------------------------------
    def search_key(self) -> dict:
        return dict(
            self.keys,
            source_layer=self.source_layer,
            anchored=self.cfg.to_json(),
            seed=self.seed,
            validation=self.validation_key(),
        )

    def anchored(self) -> tuple[dict, RestorationOrder]:
        key = self.search_key()
        result = read_cached_json(self.where / "anchored.json", key)
        order = read_cached_tensors(self.where / "anchored_order.safetensors", key)
        if result is not None and order is not None and result.get("order_sha256") == tensors_digest(order):
            return result, RestorationOrder.from_tensors(order)
        original_reading = self.original_reading()
        compressed_reading = self.read(self.where / "validation.json", self.keys["compressed"])
        self.log("anchored restoration: the original's replies to the training prompts")
        anchor = build_anchor(
            self.original,
            self.tok,
            self.cfg.anchor(),
            self.source_layer,
            self.seed,
            self.anchor_instructions(),
            self.log,
        )
        search = AnchoredSearch(
            self.model, self.original, anchor, self.validator(), self.cfg, self.layouts, self.matrix_bytes, self.log
        )
        checkpoint = SearchCheckpoint(self.where, key)
        try:
            result = search.run(original_reading, compressed_reading, checkpoint)
        finally:
            search.reset()
        result["anchor"] = dict(harmful_replies=anchor.harmful_replies, sequences=anchor.n_sequences)
        tensors = search.order.to_tensors()
        result["order_sha256"] = tensors_digest(tensors)
        cached_tensors(self.where / "anchored_order.safetensors", key, lambda: tensors)
        result = cached_json(self.where / "anchored.json", key, lambda: result)
        checkpoint.clear()
        return result, search.order

    # --- the static baseline --------------------------------------------------------------------
    def safety_scores(self) -> dict[str, torch.Tensor]:
        """The original's Wanda scores on its own refusals (Wei et al.'s safety data), per original."""
        from compression.attribution import (
            OwnRepliesConfig,
            calibration_from_pairs,
            own_replies,
            safety_pairs,
            wanda_importance,
        )
        from lm import datasets
        from lm.errors import UserError

        own = OwnRepliesConfig(n_samples=self.static_samples, seed=self.seed)
        key = dict(model=self.keys["original"], kind="wanda-safety", replies=own.__dict__)

        def compute():
            self.log("static baseline: the original's Wanda scores on its own refusals")
            try:
                pairs = safety_pairs(self.original, self.tok, own.n_samples, own.seed, own.max_new_tokens, own.source)
            except UserError:  # an original that refuses nothing (a random test model): its replies unfiltered
                self.log("static baseline: the original refused none of the safety prompts; scoring on all its replies")
                pairs = own_replies(
                    self.original,
                    self.tok,
                    datasets.sample(datasets.advbench_calibration(), own.n_samples, own.seed),
                    own.max_new_tokens,
                    own.seed,
                )
            return wanda_importance(self.original, calibration_from_pairs(self.tok, pairs, own.seqlen))

        return cached_tensors(self.original_dir / "safety_scores.safetensors", key, compute)

    def changed(self) -> dict[str, torch.Tensor]:
        from .anchored import changed_masks

        return changed_masks(self.model, self.original, list(self.layouts))

    def static_points(self, ks: list[int]) -> tuple[list[dict], dict[int, dict[str, torch.Tensor]]]:
        scores, changed = self.safety_scores(), self.changed()
        total = sum(int(m.sum()) for m in changed.values())
        points, masks = [], {}
        for k in sorted(set(ks)):
            m = within_matrix_masks(scores, changed, k)
            masks[k] = m
            reading = self.read(self.where / "static" / f"{k}.json", dict(model=self.keys["compressed"], static=k), m)
            points.append(
                dict(
                    kind="static",
                    restored=count(m),
                    fraction_of_changed=count(m) / total,
                    bytes=self.bytes_of(m),
                    **reading,
                )
            )
        return points, masks

    def bytes_of(self, masks: dict[str, torch.Tensor]) -> int | None:
        if self.matrix_bytes is None:
            return None
        return int(sum(self.matrix_bytes.get(n, 0) for n, m in masks.items() if bool(m.any())))

    # --- everything -----------------------------------------------------------------------------
    def run(
        self, aird_masks: dict[str, torch.Tensor], static_fractions: tuple[float, ...], targeted_masks=None
    ) -> Front:
        search, order = self.anchored()
        shapes = {n: tuple(p.shape) for n, p in self.model.named_parameters() if n in self.layouts}
        chosen = search["points"][search["chosen"]]
        masks = {"anchored": order.masks(shapes, chosen["through"])}
        aird_count = count(aird_masks)
        if chosen["restored"] > aird_count:
            # The anchored state at AIRD's cost: the last point of the search within it.
            within = [p for p in search["points"] if p["restored"] <= aird_count and not p.get("undone")]
            at = max(within, key=lambda p: p["restored"])
            masks["anchored_at_aird"] = order.masks(shapes, at["through"])
        changed_total = search["changed"]
        ks = [max(1, math.ceil(f * changed_total)) for f in static_fractions] + [max(1, chosen["restored"])]
        static_points, static_masks = self.static_points(ks)
        masks["static"] = static_masks[max(1, chosen["restored"])]
        aird_reading = self.read(
            self.where / "aird_validation.json",
            dict(model=self.keys["compressed"], aird=digest_masks(aird_masks)),
            aird_masks,
        )
        aird_point = dict(
            kind="aird",
            restored=aird_count,
            fraction_of_changed=aird_count / changed_total,
            bytes=self.bytes_of(aird_masks),
            **aird_reading,
        )
        targeted_point = None
        if targeted_masks is not None:
            k = count(targeted_masks)
            reading = self.read(
                self.where / "targeted_validation.json",
                dict(model=self.keys["compressed"], targeted=digest_masks(targeted_masks)),
                targeted_masks,
            )
            targeted_point = dict(
                kind="targeted",
                restored=k,
                fraction_of_changed=k / changed_total,
                bytes=self.bytes_of(targeted_masks),
                **reading,
            )
        return Front(search, static_points, aird_point, self.original_reading(), masks, targeted_point)


def digest_masks(masks: dict[str, torch.Tensor]) -> str:
    return tensors_digest({n: m for n, m in masks.items() if bool(m.any())})
