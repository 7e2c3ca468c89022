"""bitsandbytes 4-bit (nf4 / fp4) and 8-bit (LLM.int8) checkpoints, read through transformers and
bitsandbytes. Modules kept at full precision are listed in `llm_int8_skip_modules`, which
transformers honours for both widths."""

from __future__ import annotations

import torch
from torch import nn

QUANT_METHOD, EXTRA, LIBRARIES = "bitsandbytes", "bnb", ("bitsandbytes",)


def read_format(qc: dict):
    from . import PackedFormat

    four = bool(qc.get("load_in_4bit") or qc.get("_load_in_4bit"))
    return PackedFormat(QUANT_METHOD, 4 if four else 8, None, qc)


def load(path: str, dtype: torch.dtype) -> tuple[nn.Module, list[str]]:
    from transformers import AutoModelForCausalLM

    from . import dense_in_place

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map="cpu", use_safetensors=True)
    return model, dense_in_place(model, is_packed, dequantize)


def is_packed(module: nn.Module) -> bool:
    import bitsandbytes as bnb

    return isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))


def dequantize(module: nn.Module) -> torch.Tensor:
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    weight = module.weight
    if isinstance(module, bnb.nn.Linear4bit):
        return F.dequantize_4bit(weight.data, weight.quant_state).float()
    scb = weight.SCB if getattr(weight, "SCB", None) is not None else module.state.SCB
    return F.int8_vectorwise_dequant(weight.data, scb).float()


def stored_tensors(module: str, key: str) -> bool:
    """weight (packed), its quant state (absmax, quant_map, ...) and the 8-bit SCB / weight_format."""
    return (
        key == f"{module}.weight"
        or key.startswith(f"{module}.weight.")
        or key in (f"{module}.SCB", f"{module}.weight_format")
    )


def exclude(qc: dict, modules: list[str], float_linears: tuple[str, ...]) -> dict:
    # A list replaces transformers' default (the LM head): start from every linear the input kept in float.
    given = qc.get("llm_int8_skip_modules")
    skip = list(given) if given is not None else list(float_linears)
    return {**qc, "llm_int8_skip_modules": skip + [m for m in modules if m not in skip]}


SIDE_CONFIGS = ()
