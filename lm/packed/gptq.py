"""GPTQ checkpoints (GPTQModel, AutoGPTQ: qweight / qzeros / scales / g_idx), read and written
through GPTQModel. Modules kept at full precision are excluded with GPTQModel's per-module
`dynamic` rules ('-:' + a regex of the module name means: not quantized)."""

from __future__ import annotations

import logging
import os
import re

import torch
from torch import nn

QUANT_METHOD, EXTRA, LIBRARIES = "gptq", "gptq", ("gptqmodel",)
PACKED_TENSORS = ("qweight", "qzeros", "scales", "g_idx")


def read_format(qc: dict):
    from . import PackedFormat

    return PackedFormat(QUANT_METHOD, int(qc.get("bits", 4)), qc.get("group_size"), qc)


def load(path: str, dtype: torch.dtype) -> tuple[nn.Module, list[str]]:
    from . import dense_in_place

    # GPTQModel sizes its CPU worker pool from the cores; on 2 cores its default asks for more than exist.
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(1, min(2, os.cpu_count() or 1))))
    from logbar import LogBar

    LogBar.shared().setLevel(logging.WARNING)  # its INFO tables would bury the toolkit's own output
    from gptqmodel import GPTQModel

    model = GPTQModel.load(path, device="cpu", dtype=dtype).model
    return model, dense_in_place(model, is_packed, dequantize)


def is_packed(module: nn.Module) -> bool:
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear

    return isinstance(module, BaseQuantLinear)


def dequantize(module: nn.Module) -> torch.Tensor:
    return module.dequantize_weight().t()  # GPTQModel gives [in, out]


def stored_tensors(module: str, key: str) -> bool:
    """Whether the file tensor `key` is part of the packed form of `module` (its bias is not)."""
    return key in {f"{module}.{t}" for t in PACKED_TENSORS}


def exclude(qc: dict, modules: list[str], float_linears: tuple[str, ...] = ()) -> dict:
    dynamic = dict(qc.get("dynamic") or {})
    for module in modules:
        dynamic[f"-:^{re.escape(module)}$"] = {}
    return {**qc, "dynamic": dynamic}


SIDE_CONFIGS = ("quantize_config.json",)  # GPTQModel also writes the quantization config here
