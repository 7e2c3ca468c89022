"""Writing a repaired packed checkpoint in its own format: the input's files, tensor for tensor,
except the modules whose weights the repair changed, which are stored as float [out, in]
weights and excluded from quantization in the format's config."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import UserError
from . import PackedFormat, format_modules

INDEX = "model.safetensors.index.json"


def _float_dtype(src: Path) -> torch.dtype:
    """The dtype the checkpoint keeps its unquantized tensors in (its embeddings'), for the restored weights."""
    for shard in sorted(src.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            for key in f.keys():
                if key.endswith(("embed_tokens.weight", "embed_in.weight", "wte.weight")):
                    return f.get_tensor(key).dtype
    return torch.float16


_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}


def full_precision_cost(src: Path, fmt: PackedFormat, modules: dict[str, tuple[int, int]]) -> dict:
    """What storing `modules` ({name: (out, in)}) at full precision costs in `src`'s files: the
    packed tensors dropped, the float weights added (in the dtype of its unquantized tensors)."""
    format_module = format_modules()[fmt.name]
    dtype = _float_dtype(Path(src))
    removed = 0
    for shard in sorted(Path(src).glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            for key in f.keys():
                if any(format_module.stored_tensors(m, key) for m in modules):
                    piece = f.get_slice(key)
                    removed += _BYTES[piece.get_dtype()] * int(torch.Size(piece.get_shape()).numel())
    weights = sum(o * i for o, i in modules.values())
    added = weights * torch.empty(0, dtype=dtype).element_size()
    return dict(
        format=fmt.describe(),
        full_precision_modules=sorted(modules),
        weights=weights,
        dtype=str(dtype).removeprefix("torch."),
        bytes_removed=removed,
        bytes_added=added,
        bytes_added_net=added - removed,
    )


def write_packed(src: Path, dst: Path, fmt: PackedFormat, weights: dict[str, torch.Tensor]) -> None:
    """Copy checkpoint `src` into the (empty, temporary) directory `dst` with `weights`
    ({module name: [out, in] float weight}) stored at full precision in place of their packed
    tensors, and excluded from quantization in its config."""
    src, dst = Path(src), Path(dst)
    module = format_modules()[fmt.name]
    unknown = sorted(set(weights) - set(fmt.quantized))
    if unknown:
        raise UserError(
            f"cannot store {unknown[0]} at full precision: it is not a packed module of this {fmt.name} checkpoint"
        )
    dtype = _float_dtype(src)
    placed, weight_map = set(), {}
    for shard in sorted(src.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            metadata = f.metadata()
            tensors = {key: f.get_tensor(key) for key in f.keys()}
        for name, weight in weights.items():
            packed = [key for key in tensors if module.stored_tensors(name, key)]
            if not packed:
                continue
            for key in packed:
                del tensors[key]
            tensors[f"{name}.weight"] = weight.detach().to("cpu", dtype).contiguous()
            placed.add(name)
        save_file(tensors, str(dst / shard.name), metadata=metadata)
        weight_map.update({key: shard.name for key in tensors})
    if placed != set(weights):
        raise UserError(f"the packed tensors of {sorted(set(weights) - placed)[0]} are not in {src}")
    for path in src.iterdir():
        if (
            path.is_file()
            and path.suffix != ".safetensors"
            and path.name not in (INDEX, "config.json", *module.SIDE_CONFIGS)
        ):
            shutil.copy2(path, dst / path.name)
    if (src / INDEX).is_file():
        index = json.loads((src / INDEX).read_text(encoding="utf-8"))
        index["weight_map"] = dict(sorted(weight_map.items()))
        (dst / INDEX).write_text(json.dumps(index, indent=2), encoding="utf-8")
    modules = sorted(weights)
    config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    config["quantization_config"] = module.exclude(config["quantization_config"], modules, fmt.float_linears)
    (dst / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    for side in module.SIDE_CONFIGS:
        if (src / side).is_file():
            qc = json.loads((src / side).read_text(encoding="utf-8"))
            (dst / side).write_text(
                json.dumps(module.exclude(qc, modules, fmt.float_linears), indent=2), encoding="utf-8"
            )
