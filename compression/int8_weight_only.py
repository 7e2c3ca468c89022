"""Int8 weight-only inference through torchao (optional extra: pip install -e '.[int8]').

The RTN and GPTQ variants store dequantized weights: they reproduce the numerics of quantization,
not its memory. This variant ('torchao:int8') swaps every decoder linear weight for torchao's int8
tensor (symmetric, one scale per output row), so evaluation really runs on int8 weights: 1 byte per
weight instead of 4 (float32) or 2 (bfloat16). Embeddings, norms and the LM head stay as they are,
as for every other variant.

The int8 kernel dequantizes on the fly, so the same model with the dequantized weights stored as
floats computes the same logits up to float rounding. Checkpoints therefore hold the dequantized
weights (`dense_state_dict`): they load without torchao, and every analysis reads them as floats.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from lm.errors import UserError
from lm.hooks import decoder_layers

from .blockwise import block_linears

INSTALL_HINT = "int8 weight-only inference needs torchao: pip install -e '.[int8]'"


def torchao_quantization():
    """torchao.quantization, or a UserError saying how to install it."""
    try:
        with warnings.catch_warnings():
            # Its CUDA extensions fail to load on a CPU-only torch and say so; the CPU path is unaffected.
            warnings.simplefilter("ignore")
            import torchao.quantization as quantization
    except ImportError:
        raise UserError(INSTALL_HINT) from None
    return quantization


def torchao_available() -> bool:
    try:
        torchao_quantization()
    except UserError:
        return False
    return True


def is_quantized(weight: torch.Tensor) -> bool:
    """A torchao quantized tensor: it carries integer codes (`qdata`) beside its scales.

    Every torch.Tensor has a `dequantize` method, so that alone does not tell a quantized weight
    from any other tensor subclass.
    """
    return isinstance(weight, torch.Tensor) and hasattr(weight, "qdata")


def dense(weight: torch.Tensor) -> torch.Tensor:
    """The weight as a plain float tensor, whether or not it is int8."""
    return weight.dequantize() if is_quantized(weight) else weight


@torch.no_grad()
def quantize_int8_weight_only(model: nn.Module) -> None:
    """Every decoder linear weight becomes torchao int8 (per output row, symmetric), in place."""
    q = torchao_quantization()
    targets = {id(lin) for block in decoder_layers(model) for lin in block_linears(block).values()}
    for lin in (m for m in model.modules() if id(m) in targets):
        if not torch.isfinite(lin.weight).all():
            raise UserError("int8 quantization: a decoder weight is NaN or infinite")
    q.quantize_(
        model, q.Int8WeightOnlyConfig(granularity=q.PerRow()), filter_fn=lambda module, fqn: id(module) in targets
    )


def dense_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with every quantized weight dequantized (what a checkpoint stores)."""
    return {name: dense(t) for name, t in model.state_dict().items()}
