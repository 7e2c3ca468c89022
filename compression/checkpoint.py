"""Saving compressed variants as Hugging Face directories with a `compression.json` manifest."""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from lm.architecture import decoder_matrices
from lm.cache import atomic_dir, atomic_write_json, files_digest, warn

from .int8_weight_only import dense, dense_state_dict, is_quantized

MANIFEST = "compression.json"


def sparsity_report(model: nn.Module) -> dict:
    """Fraction of exact zeros in every matrix compression may change (decoder linears, fused
    expert tensors), and overall / whole-model figures."""
    per_matrix, zeros, total = {}, 0, 0
    for name, weight in decoder_matrices(model).items():
        z = int((dense(weight) == 0).sum())
        per_matrix[name] = z / weight.numel()
        zeros += z
        total += weight.numel()
    model_params = sum(p.numel() for p in model.parameters())
    return dict(
        decoder_linear_sparsity=zeros / total,
        model_sparsity=zeros / model_params,
        decoder_linear_params=total,
        model_params=model_params,
        per_matrix=per_matrix,
    )


def save_variant(model: nn.Module, tokenizer, out_dir: Path, manifest: dict) -> dict:
    """Write model + tokenizer + manifest atomically; returns the manifest as written."""
    manifest = dict(manifest)
    manifest["sparsity"] = sparsity_report(model)
    with atomic_dir(Path(out_dir)) as tmp:
        # int8 weights (torchao) are stored dequantized, so the checkpoint loads without torchao.
        quantized = any(is_quantized(p) for p in model.parameters())
        model.save_pretrained(
            tmp, safe_serialization=True, **(dict(state_dict=dense_state_dict(model)) if quantized else {})
        )
        tokenizer.save_pretrained(tmp)
        manifest["weights_sha256"] = files_digest(tmp, [f.name for f in tmp.glob("*.safetensors")])
        atomic_write_json(tmp / MANIFEST, manifest)
    return manifest


def weights_verified(model_dir: Path, manifest: dict) -> bool:
    """Whether the checkpoint's weight files are the ones its manifest recorded when it was saved
    (a file damaged or replaced on disk is not reused); one warning line when they are not."""
    recorded = manifest.get("weights_sha256")
    model_dir = Path(model_dir)
    if not recorded:
        warn(f"{model_dir} has no recorded weight digest (saved by an older version); rebuilding it")
        return False
    present = sorted(f.name for f in model_dir.glob("*.safetensors"))
    try:
        ok = present == sorted(recorded) and files_digest(model_dir, present) == recorded
    except OSError:
        ok = False
    if not ok:
        warn(f"{model_dir}: weight files do not match the digest recorded when it was saved; rebuilding it")
    return ok


def read_manifest(model_dir: Path) -> dict | None:
    path = Path(model_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        warn(f"{path} is unreadable; treating the checkpoint as unverified")
        return None
    return manifest if isinstance(manifest, dict) else None
