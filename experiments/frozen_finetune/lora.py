"""LoRA fine-tuning (peft) with individual weights frozen, and the merged float32 updates it makes.

A LoRA update dB @ A is dense, so freezing a weight cannot mean freezing a LoRA row: the update
applied to each targeted matrix is instead

    delta = scaling * (B @ A), with delta[frozen] = 0   (masked_fill: exactly zero, not just small)

and the layer computes base(x) + dropout(x) @ delta^T. Each wrapped layer's forward is bound to its
own frozen mask when it is attached (functools.partial over that layer and that mask), so no layer
can pick up another layer's mask through a late-binding closure. Gradients reach A and B only
through the unfrozen entries, and the merged weight W0 + delta equals W0 bit for bit at every frozen
entry of every targeted matrix. Without frozen weights the ordinary low-rank peft forward runs.

The merged update is computed in float32 from A and B (never as a difference of two low-precision
merged checkpoints, which rounds small updates away).
"""

from __future__ import annotations

import random
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from compression.snip import response_loss
from lm.architecture import block_linears, decoder_layers, decoder_linears
from lm.errors import UserError

ADAPTER = "default"


@dataclass(frozen=True)
class LoraTrainConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    #: linear names (e.g. q_proj down_proj); None: every linear of the decoder blocks
    targets: tuple[str, ...] | None = None
    lr: float = 2e-4
    weight_decay: float = 0.0
    steps: int = 20
    seed: int = 0

    def __post_init__(self):
        if self.rank <= 0 or self.steps <= 0 or self.lr <= 0:
            raise UserError("LoRA rank, steps and learning rate must be positive")
        if not 0 <= self.dropout < 1:
            raise UserError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if self.targets is not None and not self.targets:
            raise UserError("no LoRA target modules")


def decoder_linear_modules(model: nn.Module) -> dict[str, nn.Linear]:
    """{'model.layers.{i}.{name}.weight': linear}, the naming of compression.snip.decoder_linear_weights."""
    return decoder_linears(model)


def linear_kinds(model: nn.Module) -> tuple[str, ...]:
    """The decoder blocks' linear names in block order (Llama: q_proj k_proj v_proj o_proj gate_proj up_proj down_proj)."""
    return tuple(dict.fromkeys(name.rsplit(".", 1)[-1] for name in block_linears(decoder_layers(model)[0])))


def check_targets(model: nn.Module, targets: tuple[str, ...]) -> None:
    """Every target must name a linear type of the decoder blocks (e.g. q_proj, down_proj)."""
    leafs = {n.removesuffix(".weight").rsplit(".", 1)[-1] for n in decoder_linear_modules(model)}
    missing = sorted(set(targets) - leafs)
    if missing:
        raise UserError(f"LoRA targets {missing} match no decoder linear (have: {', '.join(sorted(leafs))})")


def _frozen_forward(layer, frozen: torch.Tensor, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    result = layer.base_layer(x, *args, **kwargs)
    delta = masked_delta(layer, frozen)
    x = layer.lora_dropout[ADAPTER](x.to(delta.dtype))
    return result + F.linear(x, delta).to(result.dtype)


def masked_delta(layer, frozen: torch.Tensor | None) -> torch.Tensor:
    """scaling * B @ A in float32, zero at the frozen entries (a bool mask shaped like the weight)."""
    a = layer.lora_A[ADAPTER].weight.float()
    b = layer.lora_B[ADAPTER].weight.float()
    delta = (b @ a) * layer.scaling[ADAPTER]
    return delta if frozen is None else delta.masked_fill(frozen, 0.0)


@dataclass
class LoraRun:
    """A model with LoRA adapters attached; `layers` maps each targeted weight name to its peft layer."""

    model: nn.Module  # the peft model (its base model is the caller's model, modified in place)
    layers: dict[str, nn.Module]
    frozen: dict[str, torch.Tensor] = field(default_factory=dict)  # weight name -> bool mask, targeted weights only
    requires_grad: dict[str, bool] = field(default_factory=dict)  # the base model's flags, restored on detach

    def parameters(self) -> list[nn.Parameter]:
        return [
            p for layer in self.layers.values() for p in (layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight)
        ]

    @torch.no_grad()
    def deltas(self) -> dict[str, torch.Tensor]:
        """The merged float32 update of every targeted weight (W = W0 + delta)."""
        return {name: masked_delta(layer, self.frozen.get(name)).cpu() for name, layer in self.layers.items()}

    def adapter_state(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, layer in self.layers.items():
            stem = name.removesuffix(".weight")
            out[f"{stem}.lora_A"] = layer.lora_A[ADAPTER].weight.detach().cpu().contiguous()
            out[f"{stem}.lora_B"] = layer.lora_B[ADAPTER].weight.detach().cpu().contiguous()
        return out

    @torch.no_grad()
    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        expected = set(self.adapter_state())
        if set(state) != expected:
            raise UserError("the saved adapter does not match the targeted modules")
        for name, layer in self.layers.items():
            stem = name.removesuffix(".weight")
            layer.lora_A[ADAPTER].weight.copy_(state[f"{stem}.lora_A"])
            layer.lora_B[ADAPTER].weight.copy_(state[f"{stem}.lora_B"])

    def detach(self) -> nn.Module:
        """Remove the adapters, leaving the original (unmerged) base model as it was."""
        base = self.model.unload()
        for name, param in base.named_parameters():
            param.requires_grad_(self.requires_grad.get(name, param.requires_grad))
        return base


def attach_lora(model: nn.Module, cfg: LoraTrainConfig, frozen: dict[str, torch.Tensor] | None = None) -> LoraRun:
    """Wrap every decoder linear named in cfg.targets with a LoRA adapter; `frozen` entries of a
    targeted weight never change (masks for untargeted weights are moot: those stay frozen whole)."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import Linear as LoraLinear

    modules = decoder_linear_modules(model)
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    names_by_module = {id(m): n for n, m in modules.items()}
    targets = cfg.targets if cfg.targets is not None else linear_kinds(model)
    check_targets(model, targets)
    frozen = dict(frozen or {})
    for name, mask in frozen.items():
        if name not in modules:
            raise UserError(f"frozen mask for unknown weight {name}")
        if mask.shape != modules[name].weight.shape or mask.dtype != torch.bool:
            raise UserError(
                f"frozen mask for {name} must be bool {tuple(modules[name].weight.shape)}, got {mask.dtype} {tuple(mask.shape)}"
            )
    torch.manual_seed(cfg.seed)  # peft's A initialisation
    # layers_pattern/to_transform are not needed: target names are matched within decoder blocks
    # only, because the lm_head and embeddings carry other names.
    config = LoraConfig(
        r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=list(targets), bias="none"
    )
    peft_model = get_peft_model(model, config)
    layers = {}
    for module in peft_model.modules():
        if isinstance(module, LoraLinear):
            name = names_by_module.get(id(module.base_layer))
            if name is None:
                continue  # a target name outside the decoder blocks: stays an ordinary (unmasked) adapter
            layers[name] = module
    targeted = {n for n in modules if n.removesuffix(".weight").rsplit(".", 1)[-1] in targets}
    if set(layers) != targeted:
        raise UserError(f"peft wrapped {len(layers)} of {len(targeted)} targeted decoder linears")
    kept = {}
    for name, layer in layers.items():
        mask = frozen.get(name)
        if mask is None or not mask.any():
            continue  # nothing frozen here: the ordinary low-rank forward is exact and cheaper
        mask = mask.to(layer.base_layer.weight.device)
        layer.forward = partial(_frozen_forward, layer, mask)  # bound now: this layer, this mask
        kept[name] = mask
    peft_model.eval()  # get_peft_model leaves the model in train mode; train() switches it when it trains
    return LoraRun(model=peft_model, layers=layers, frozen=kept, requires_grad=requires_grad)


def training_order(n_batches: int, steps: int, seed: int) -> list[int]:
    """Batch index of each step: seeded shuffles of all batches, epoch after epoch."""
    if n_batches <= 0:
        raise UserError("no training batches")
    rng = random.Random(seed)
    order: list[int] = []
    while len(order) < steps:
        epoch = list(range(n_batches))
        rng.shuffle(epoch)
        order += epoch
    return order[:steps]


def train(
    run: LoraRun,
    batches: list[dict[str, torch.Tensor]],
    cfg: LoraTrainConfig,
    checkpoints: tuple[int, ...] = (),
    on_checkpoint=None,
    desc: str = "LoRA",
) -> list[float]:
    """AdamW on the response loss; calls on_checkpoint(step) after each step listed in checkpoints
    (and at step 0 if listed). Returns the loss of every step."""
    from tqdm.auto import tqdm

    params = run.parameters()
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    order = training_order(len(batches), cfg.steps, cfg.seed)
    torch.manual_seed(cfg.seed)  # dropout
    losses = []
    if on_checkpoint is not None and 0 in checkpoints:
        on_checkpoint(0)
    run.model.train()
    try:
        bar = tqdm(order, desc=desc, unit="step")
        for step, index in enumerate(bar, start=1):
            loss = response_loss(run.model, batches[index])
            if not torch.isfinite(loss):
                raise UserError(f"LoRA training diverged at step {step} (loss {float(loss)}); lower --lr")
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            if on_checkpoint is not None and step in checkpoints:
                run.model.eval()
                on_checkpoint(step)
                run.model.train()
    finally:
        run.model.eval()
    return losses


@contextmanager
def merged(model: nn.Module, deltas: dict[str, torch.Tensor]):
    """Temporarily add float32 updates to the model's decoder linear weights; the originals are
    restored bit for bit on exit (kept as copies, not recomputed by subtraction)."""
    modules = decoder_linear_modules(model)
    unknown = sorted(set(deltas) - set(modules))
    if unknown:
        raise UserError(f"updates for unknown weights: {unknown[:3]}")
    saved = {}
    try:
        with torch.no_grad():
            for name, delta in deltas.items():
                w = modules[name].weight
                saved[name] = w.detach().clone()
                w.copy_((w.float() + delta.to(w.device)).to(w.dtype))
        yield model
    finally:
        with torch.no_grad():
            for name, original in saved.items():
                modules[name].weight.copy_(original)
