"""Cheap refusal read-outs of a (partly restored) compressed model, without generation.

Every repair candidate is judged on the same three numbers: the mean refusal score on harmful
prompts (Arditi et al.'s log-odds of a refusal opening), the KL divergence of its next-token
distribution on harmless prompts from the unrepaired compressed model's, and the projection of
the residual stream at the original direction's source onto that direction (is the direction
induced again?). Restoring weights in block c leaves blocks 0..c-1 unchanged, so the block
inputs of one unrepaired pass are kept and each candidate is run from its first changed block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lm.chat import format_prompts, tokenize_prompts
from lm.errors import UserError
from lm.hooks import block_input, decoder_layers, hooks_registered
from lm.partial_forward import block_kwargs, layer_inputs, run_from_layer, uniform_layers
from refusal.score import kl_divergence, refusal_score


@dataclass(frozen=True)
class Reading:
    refusal: float  # mean refusal score on the harmful prompts
    kl: float  # mean KL(unrepaired || candidate) on the harmless prompts, last position
    projection: float  # mean <h_source, unit direction> on the harmful prompts

    def to_json(self) -> dict:
        return dict(refusal_score=self.refusal, kl=self.kl, projection=self.projection)


class RefusalReadout:
    """Harmful and harmless prompt batches with the unrepaired model's block inputs kept."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        harmful: list[str],
        harmless: list[str],
        token_ids: list[int],
        direction: torch.Tensor,
        source: tuple[int, int],
        batch_size: int = 16,
        system: str | None = None,
    ):
        if not harmful or not harmless:
            raise UserError("repair scoring needs non-empty harmful and harmless prompt sets")
        self.model, self.token_ids = model, token_ids
        self.position, self.layer = source
        self.unit = direction.float() / direction.float().norm()
        self.resumable = uniform_layers(model)
        device = next(model.parameters()).device
        self.tokenizer = tokenizer
        self.batches: dict[str, list[dict]] = {}
        self.prompts: dict[str, list[str]] = {}
        for kind, insts in (("harmful", harmful), ("harmless", harmless)):
            prompts = format_prompts(tokenizer, insts, system)
            self.prompts[kind] = prompts
            self.batches[kind] = [
                dict(enc=tokenize_prompts(tokenizer, prompts[i : i + batch_size]).to(device))
                for i in range(0, len(prompts), batch_size)
            ]
        self.base_harmless = None
        if self.resumable:
            for batches in self.batches.values():
                for b in batches:
                    ids, mask = b["enc"]["input_ids"], b["enc"]["attention_mask"]
                    b["inputs"], _ = layer_inputs(model, ids, mask)
                    b["kwargs"] = block_kwargs(model, ids, mask)
        self.baseline = self.read(first_layer=0, _baseline=True)

    @torch.no_grad()
    def _logits(self, batch: dict, first_layer: int, grab: list) -> torch.Tensor:
        block = decoder_layers(self.model)[self.layer]

        def pre(module, args, kwargs):
            grab.append(block_input(args, kwargs)[:, self.position].float().cpu())

        with hooks_registered([block.register_forward_pre_hook(pre, with_kwargs=True)]):
            if self.resumable:
                return (
                    run_from_layer(self.model, batch["inputs"][first_layer], batch["kwargs"], first_layer).float().cpu()
                )
            enc = batch["enc"]
            return (
                self.model(
                    input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], use_cache=False, logits_to_keep=1
                )
                .logits[:, -1]
                .float()
                .cpu()
            )

    def refusal_rate(self, max_new_tokens: int = 32) -> float:
        """Fraction of the harmful prompts whose greedy reply the Arditi et al. judge counts as a refusal.

        A behavioural check beside the first-token score, which a handful of restored weights can
        raise (a reply opening "I ...") without the model refusing.
        """
        from lm.generation import SamplingConfig, generate
        from refusal.judges import judges

        arditi = judges()[1]
        replies = generate(
            self.model,
            self.tokenizer,
            self.prompts["harmful"],
            SamplingConfig(max_new_tokens=max_new_tokens),
            desc="refusal rate",
        )
        return sum(not arditi.jailbroken(r[0]) for r in replies) / len(replies)

    def read(self, first_layer: int = 0, _baseline: bool = False) -> Reading:
        """Read-outs of the model as it is now; `first_layer` = the earliest block changed since construction."""
        first_layer = min(first_layer, self.layer)  # the source must be re-read, so never start after it
        grab: list = []
        harmful = torch.cat([self._logits(b, first_layer, grab) for b in self.batches["harmful"]])
        projection = torch.cat(grab) @ self.unit
        harmless = torch.cat([self._logits(b, first_layer, []) for b in self.batches["harmless"]])
        if _baseline:
            self.base_harmless = harmless
        return Reading(
            refusal=float(refusal_score(harmful, self.token_ids).mean()),
            kl=float(kl_divergence(self.base_harmless, harmless).mean()),
            projection=float(projection.mean()),
        )
