"""compressed-tensors checkpoints (llm-compressor: quant_method compressed-tensors) with integer
weight quantization, packed ('pack-quantized': W4A16, W8A16, ...) or not ('int-quantized'), read
through transformers, which decompresses them with the compressed-tensors library. Modules kept at
full precision go in the config's `ignore` list.

Sparse models: compressed-tensors dropped its sparsity compressors after 0.16, so llm-compressor
0.14 stores a 2:4-pruned model as plain float weights (read like any float checkpoint) and a 2:4
model quantized W4A16 as pack-quantized weights with the zeros inside (`sparsity_config: {}`), read
here like any W4A16 one. Checkpoints written in the old sparse formats (`sparsity_config` with
sparse-24-bitmask / sparse-bitmask) are refused: no compressed-tensors that transformers 5 accepts
reads them. So are float formats (FP8, NVFP4)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from ..errors import UserError

QUANT_METHOD, EXTRA, LIBRARIES = "compressed-tensors", "compressed-tensors", ("compressed_tensors",)
# A quantized module's tensors; int-quantized checkpoints keep the integer weight under `weight`.
PACKED_TENSORS = ("weight", "weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx")


def read_format(qc: dict):
    from . import PackedFormat

    if qc.get("sparsity_config"):
        fmt = qc["sparsity_config"].get("format", "sparse") if isinstance(qc["sparsity_config"], dict) else "sparse"
        raise UserError(
            f"this compressed-tensors checkpoint stores its weights in the {fmt} format, which compressed-tensors "
            "dropped after 0.16; decompress it with compressed-tensors <= 0.16 (in its own environment) and save the dense weights to repair it"
        )
    weights = [g["weights"] for g in (qc.get("config_groups") or {}).values() if g.get("weights")]
    if not weights:
        raise UserError(
            "this compressed-tensors checkpoint quantizes no weights; only weight quantization is supported"
        )
    if any(w.get("type", "int") != "int" for w in weights):
        raise UserError(
            f"compressed-tensors {weights[0].get('type')} weights (FP8, NVFP4, ...) are not supported; integer quantization is"
        )
    return PackedFormat(QUANT_METHOD, max(int(w["num_bits"]) for w in weights), weights[0].get("group_size"), qc)


def load(path: str, dtype: torch.dtype) -> tuple[nn.Module, list[str]]:
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    model = AutoModelForCausalLM.from_pretrained(
        path,
        dtype=dtype,
        device_map="cpu",
        use_safetensors=True,
        quantization_config=CompressedTensorsConfig(run_compressed=False),
    )
    return model, sorted(_quantized_modules(Path(path)))


def _quantized_modules(path: Path) -> set[str]:
    """Modules stored quantized: the ones with a weight scale in the files."""
    names = set()
    for shard in sorted(path.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            names.update(key.removesuffix(".weight_scale") for key in f.keys() if key.endswith(".weight_scale"))
    return names


def stored_tensors(module: str, key: str) -> bool:
    return key in {f"{module}.{t}" for t in PACKED_TENSORS}


def exclude(qc: dict, modules: list[str], float_linears: tuple[str, ...] = ()) -> dict:
    ignore = list(qc.get("ignore") or [])
    return {**qc, "ignore": ignore + [m for m in modules if m not in ignore]}


SIDE_CONFIGS = ()
