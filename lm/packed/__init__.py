"""Packed (quantized) checkpoints as users hold them: GPTQ (GPTQModel / AutoGPTQ), bitsandbytes
4- and 8-bit, and compressed-tensors (llm-compressor's pack-quantized / int-quantized).

Reading goes through the format's own library, which dequantizes every packed linear into a
plain nn.Linear (each format module's `load` returns the model and those linears' names), so the
rest of the toolkit sees a dense float model. Writing keeps the format:
every tensor of the input is copied as it is, except the modules a repair changed, which are
stored as float weights and listed in the format's own exclusion mechanism so that the same
library (and the servers built on it) loads them at full precision.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError


@dataclass(frozen=True)
class PackedFormat:
    name: str  # the checkpoint's quant_method
    bits: int
    group_size: int | None
    quantization_config: dict = field(repr=False)  # as stored in config.json
    quantized: tuple[str, ...] = ()  # module names the checkpoint stores packed
    float_linears: tuple[str, ...] = ()  # linears it stores unquantized (e.g. lm_head)

    @property
    def error_bound(self) -> float:
        """Largest relative error (Frobenius, per matrix) a b-bit quantization of a matrix is taken
        to make: 2^(3-b). Round-to-nearest on a b-bit grid gives about 2^-b on Gaussian weights;
        GPTQ's error feedback moves weights further: GPTQModel's int4 g128 of the embedded model
        measured 0.11-0.27 per matrix (median 0.15), so 0.5 at 4 bits leaves about twice the worst.
        A matrix of another base model is ~sqrt(2) off, and its unquantized tensors (embeddings,
        norms), which must match exactly, differ anyway."""
        return 2.0 ** (3 - self.bits)

    def describe(self) -> str:
        group = f" g{self.group_size}" if self.group_size and self.group_size > 0 else ""
        return f"{self.name} int{self.bits}{group}"


def format_modules() -> dict:
    """The module of each packed format, by the quant_method name its config carries."""
    from . import bnb, compressed_tensors, gptq

    return {m.QUANT_METHOD: m for m in (gptq, bnb, compressed_tensors)}


def quantization_config(path: Path) -> dict | None:
    try:
        config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    qc = config.get("quantization_config")
    return qc if isinstance(qc, dict) else None


def packed_format(path: Path) -> PackedFormat | None:
    """The checkpoint's packed format (None for a float checkpoint); a UserError for a format this
    toolkit does not read."""
    qc = quantization_config(path)
    if qc is None:
        return None
    method = qc.get("quant_method")
    formats = format_modules()
    if method not in formats:
        raise UserError(f"{path}: quantized with {method!r}, which is not supported (supported: {', '.join(formats)})")
    return formats[method].read_format(qc)


def require(fmt: PackedFormat) -> object:
    """The format's module, once its library is importable; else a UserError naming the extra."""
    module = format_modules()[fmt.name]
    missing = [lib for lib in module.LIBRARIES if importlib.util.find_spec(lib) is None]
    if missing:
        raise UserError(
            f"this is a {fmt.name} checkpoint; reading it needs {', '.join(missing)}: pip install -e '.[{module.EXTRA}]'"
        )
    return module


def load_packed(path: str, spec: str, dtype: torch.dtype) -> tuple[nn.Module, PackedFormat]:
    """(dense float model on the CPU, its format with the packed module names)."""
    fmt = packed_format(Path(path))
    module = require(fmt)
    try:
        model, quantized = module.load(path, dtype)
    except UserError:
        raise
    except Exception as e:  # the libraries raise anything from OSError to RuntimeError on a bad file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot read the {fmt.name} checkpoint {spec!r} with {module.LIBRARIES[0]}: {first}") from None
    float_linears = tuple(n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in quantized)
    if not quantized:
        raise UserError(
            f"{spec!r} says it is a {fmt.name} checkpoint but {module.LIBRARIES[0]} found no packed layer in it"
        )
    _forget_quantization(model)
    return model, PackedFormat(
        fmt.name, fmt.bits, fmt.group_size, fmt.quantization_config, tuple(quantized), float_linears
    )


def dense_in_place(model: nn.Module, is_packed, dequantize) -> list[str]:
    """Swap every packed linear for an nn.Linear with its dequantized [out, in] weight; returns their names."""
    names = [name for name, m in model.named_modules() if is_packed(m)]
    for name in names:
        packed = model.get_submodule(name)
        weight = dequantize(packed).detach()
        bias = getattr(packed, "bias", None)
        dtype = model.dtype if model.dtype.is_floating_point else torch.float32
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=dtype)
        with torch.no_grad():
            linear.weight.copy_(weight.to(dtype))
            if bias is not None:
                linear.bias.copy_(bias.detach().to(dtype))
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, linear)
    return names


def _forget_quantization(model: nn.Module) -> None:
    """After dequantizing, the model is a plain float model: saving or compressing it must not
    go through the quantizer that loaded it."""
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    for config in {
        id(c): c for c in (model.config, getattr(model.config, "get_text_config", lambda: None)()) if c is not None
    }.values():
        if hasattr(config, "quantization_config"):
            del config.quantization_config
    for attr in ("is_quantized", "quantization_method"):
        if attr in vars(model):
            delattr(model, attr)
