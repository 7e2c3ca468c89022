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

    # float16, the format's own dtype (its scales are float16): GPTQModel's CPU kernels for most
    # widths accept no other; the dequantized model is then cast to the asked dtype.
    model = GPTQModel.load(path, device="cpu", dtype=torch.float16).model
    names = dense_in_place(model, is_packed, dequantize)
    return model.to(dtype), names


def is_packed(module: nn.Module) -> bool:
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear

    return isinstance(module, BaseQuantLinear)


def dequantize(module: nn.Module) -> torch.Tensor:
    return module.dequantize_weight().t().float()  # GPTQModel gives [in, out]


def stored_tensors(module: str, key: str) -> bool:
    """Whether the file tensor `key` is part of the packed form of `module` (its bias is not)."""
    return key in {f"{module}.{t}" for t in PACKED_TENSORS}


def exclude(qc: dict, modules: list[str], float_linears: tuple[str, ...] = ()) -> dict:
    dynamic = dict(qc.get("dynamic") or {})
    for module in modules:
        dynamic[f"-:^{re.escape(module)}$"] = {}
    return {**qc, "dynamic": dynamic}


SIDE_CONFIGS = ("quantize_config.json",)  # GPTQModel also writes the quantization config here


def quantize_with_gptqmodel(
    model_dir: str, out_dir: str, rows: list[list[int]], bits: int = 4, group_size: int = 128
) -> None:
    """A GPTQ checkpoint of `model_dir` made by GPTQModel itself (the maintained implementation), on
    the given calibration rows of token ids (compression.calibration.Calibration.rows), so it
    can be compared with the toolkit's own GPTQ on the same tokens. Symmetric, no act-order, as the
    toolkit's default."""
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(1, min(2, os.cpu_count() or 1))))
    from logbar import LogBar

    LogBar.shared().setLevel(logging.WARNING)
    from gptqmodel import GPTQModel, QuantizeConfig

    model = GPTQModel.load(
        model_dir, QuantizeConfig(bits=bits, group_size=group_size, desc_act=False, sym=True), device="cpu"
    )
    model.quantize([dict(input_ids=r, attention_mask=[1] * len(r)) for r in rows], batch_size=1)
    model.save(out_dir)


def save_gptq(
    model: nn.Module,
    tokenizer,
    out_dir,
    bits: int,
    group_size: int | None,
    grids: dict[str, tuple[torch.Tensor, torch.Tensor]],
) -> None:
    """Write `model` as a GPTQ checkpoint (GPTQModel's v1 format, as AutoGPTQ and vLLM read it) into
    the empty directory `out_dir`: each module of `grids` ({name: (integer codes [out, in],
    scales [out, groups])}, a symmetric grid) packed by GPTQModel's own packer, everything else in
    float16. Scales are stored in float16, as the format does."""
    import json
    from pathlib import Path

    from gptqmodel import QuantizeConfig
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear
    from gptqmodel.utils.model import convert_gptq_v2_to_v1_format_module
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    group = group_size or -1
    qcfg = QuantizeConfig(bits=bits, group_size=group, desc_act=False, sym=True)
    state = {
        k: v.detach().to("cpu", torch.float16 if v.dtype.is_floating_point else v.dtype).contiguous()
        for k, v in model.state_dict().items()
    }
    for name, (codes, scales) in grids.items():
        linear = model.get_submodule(name)
        width = group_size or linear.in_features
        grid = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None)
        with torch.no_grad():  # the packer re-derives the codes from weight, scales and zero points
            grid.weight.copy_(
                (codes.float().reshape(codes.shape[0], -1, width) * scales.float().unsqueeze(-1)).reshape(codes.shape)
            )
            if linear.bias is not None:
                grid.bias.copy_(linear.bias.detach().float())
        packed = TorchLinear(
            bits=bits,
            group_size=group,
            sym=True,
            desc_act=False,
            in_features=linear.in_features,
            out_features=linear.out_features,
            bias=linear.bias is not None,
        )
        zero = torch.full_like(scales, 2 ** (bits - 1), dtype=torch.int32)  # symmetric: code c is stored as c + 2^(b-1)
        packed.pack(grid, scales.float(), zero, torch.arange(linear.in_features, dtype=torch.int32) // width)
        convert_gptq_v2_to_v1_format_module(packed, qcfg)
        del state[f"{name}.weight"]
        for tensor in ("qweight", "qzeros", "scales", "g_idx") + (("bias",) if linear.bias is not None else ()):
            state[f"{name}.{tensor}"] = getattr(packed, tensor).detach().contiguous()
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    quantization = dict(
        bits=bits,
        group_size=group,
        desc_act=False,
        sym=True,
        lm_head=False,
        quant_method="gptq",
        checkpoint_format="gptq",
        pack_dtype="int32",
    )
    config = model.config.to_dict()
    config.update(quantization_config=quantization, torch_dtype="float16", dtype="float16")
    (out_dir / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    (out_dir / "quantize_config.json").write_text(json.dumps(quantization, indent=2), encoding="utf-8")
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
