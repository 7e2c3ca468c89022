"""Does a compressed checkpoint really derive from this original?

Repair copies original weights into the compressed model, which is only meaningful when the two
share a base. Pruning keeps every surviving weight exactly (up to the checkpoint's float format),
so a surviving weight that differs from the original's means another model; quantization and
low-rank edits change every weight a little, so a small relative error per matrix is required
instead. A packed checkpoint may be pruned and then quantized (llm-compressor's 2:4 + W4A16): there
the zeros are the pruning and the quantization error is measured on the weights it kept.
Parameters outside the decoder linears (embeddings, norms, LM head) must match. Before that, the
two must share an architecture (`check_same_architecture`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from lm.architecture import block_prefix, decoder_layers, decoder_matrices
from lm.errors import UserError

from .report import file_slug

# bfloat16 keeps 8 significant bits: a surviving weight saved in bf16 may differ from its float32
# original by up to half a unit in the last place, 2**-8 relative.
SURVIVOR_RTOL = 2.0**-7
# Relative Frobenius error a dense edit may cause: less than zeroing the matrix (1.0). int4
# round-to-nearest (group 128) gives about 0.1, SparseGPT at 50% (survivors updated) about 0.4;
# an unrelated model of the same shape gives about 1.4 (sqrt 2), half-pruned about 1.2.
DENSE_RTOL = 1.0


@dataclass(frozen=True)
class MatrixDerivation:
    name: str
    kind: str  # "identical", "pruned" or "dense" (quantized / low-rank edited)
    relative_error: float  # ||W_c - W_o||_F / ||W_o||_F
    removed: int  # weights nonzero in the original and zero in the compressed model
    changed: int  # entries that differ at all
    kept_error: float = 0.0  # the relative error over the weights W_c keeps (nonzero): what quantizing them cost


def _check_shapes(original: dict[str, torch.Tensor], compressed: dict[str, torch.Tensor]) -> None:
    missing = sorted(set(original) ^ set(compressed))
    if missing:
        raise UserError(
            f"the checkpoints have different parameters (e.g. {missing[0]}); is the compressed model of another architecture?"
        )
    for name, w in original.items():
        if w.shape != compressed[name].shape:
            raise UserError(
                f"shape mismatch in {name}: original {tuple(w.shape)} vs compressed {tuple(compressed[name].shape)}"
            )


def classify_matrix(name: str, w_orig: torch.Tensor, w_comp: torch.Tensor) -> MatrixDerivation:
    o, c = w_orig.float(), w_comp.float()
    diff = c - o
    norm = float(o.norm())
    rel = float(diff.norm()) / norm if norm > 0 else float(diff.norm() > 0)
    changed = int((diff != 0).sum())
    removed = int(((o != 0) & (c == 0)).sum())
    if changed == 0:
        return MatrixDerivation(name, "identical", 0.0, 0, 0)
    survivors = c != 0
    kept_norm = float(o[survivors].norm())
    kept = float(diff[survivors].norm()) / kept_norm if kept_norm > 0 else float(diff[survivors].norm() > 0)
    if bool((diff[survivors].abs() <= SURVIVOR_RTOL * o[survivors].abs()).all()):
        return MatrixDerivation(name, "pruned", rel, removed, changed, kept)
    return MatrixDerivation(name, "dense", rel, removed, changed, kept)


def check_derivation(
    original: nn.Module,
    compressed: nn.Module,
    decoder_linears: set[str],
    dense_rtol: float = DENSE_RTOL,
    bound_note: str = "",
    on_kept: bool = False,
) -> list[MatrixDerivation]:
    """Per-parameter derivation record; raises UserError when `compressed` is not from `original`.

    decoder_linears: names of the parameters compression may change (decoder linear weights, fused expert tensors);
    every other parameter must be identical up to float format. on_kept: hold a changed matrix's
    error on the weights it keeps to `dense_rtol` (a quantization bound), not its whole error, which
    for a pruned-and-quantized matrix is mostly the pruning (another base model is ~1.4 off either way).
    """
    o_params = dict(original.named_parameters())
    c_params = dict(compressed.named_parameters())
    _check_shapes(o_params, c_params)
    records = []
    for name, w in o_params.items():
        rec = classify_matrix(name, w.detach(), c_params[name].detach())
        if name not in decoder_linears:
            if rec.kind == "dense" and rec.relative_error > SURVIVOR_RTOL:
                raise UserError(
                    f"{name} differs from the original's (relative error {rec.relative_error:.3g}); "
                    "the compressed checkpoint does not derive from this original model"
                )
        elif rec.kind == "dense" and (err := rec.kept_error if on_kept else rec.relative_error) > dense_rtol:
            what = "relative error on the weights it keeps" if on_kept else "relative error"
            raise UserError(
                f"{name} is far from the original's ({what} {err:.3g} > {dense_rtol:.3g}{bound_note}); "
                "the compressed checkpoint does not derive from this original model"
            )
        records.append(rec)
    return records


def summarise_derivation(records: list[MatrixDerivation]) -> dict:
    kinds = sorted({r.kind for r in records if r.kind != "identical"})
    return dict(
        kind="+".join(kinds) if kinds else "identical",
        matrices={k: sum(r.kind == k for r in records) for k in ("identical", "pruned", "dense")},
        max_relative_error=max((r.relative_error for r in records), default=0.0),
        max_kept_error=max((r.kept_error for r in records), default=0.0),
        removed=sum(r.removed for r in records),
        changed=sum(r.changed for r in records),
        per_matrix=[asdict(r) for r in records if r.kind != "identical"],
    )


def check_same_architecture(original, compressed) -> None:
    a, b = original.config, compressed.config
    fields = (
        "model_type",
        "hidden_size",
        "num_hidden_layers",
        "vocab_size",
        "intermediate_size",
        "num_attention_heads",
    )
    for name in fields:
        if getattr(a, name, None) != getattr(b, name, None):
            raise UserError(
                f"architecture mismatch: {name} is {getattr(a, name, None)} in the original but "
                f"{getattr(b, name, None)} in the compressed checkpoint"
            )


def derivation_records(original, compressed) -> list[MatrixDerivation]:
    """The checks a repair starts with, on two LoadedModels: same architecture, same tokenizer, and
    every parameter derived from the original's (else a UserError naming the first that is not)."""
    check_same_architecture(original.model, compressed.model)
    if compressed.tokenizer.get_vocab() != original.tokenizer.get_vocab():
        raise UserError("the compressed checkpoint's tokenizer differs from the original's")
    packed = getattr(compressed, "packed", None)
    if packed is None:
        return check_derivation(original.model, compressed.model, decoder_linear_names(original.model))
    return check_derivation(
        original.model,
        compressed.model,
        decoder_linear_names(original.model),
        packed.error_bound,
        f", the bound for {packed.describe()}",
        on_kept=True,
    )


def decoder_linear_names(model) -> set[str]:
    return set(decoder_matrices(model))


def module_groups(compressed: nn.Module, records: list[MatrixDerivation], packed=None) -> list[dict]:
    """The derivation per module group: each decoder linear kind (e.g. self_attn.q_proj) over all
    blocks, then every other parameter (embeddings, norms, head) together; with how the checkpoint
    stores it (float, or its packed format), the group's kinds of change, share of zero weights
    and largest relative error, over all weights and over the weights the checkpoint keeps."""
    by_name = {r.name: r for r in records}
    params = dict(compressed.named_parameters())
    quantized = set(packed.quantized) if packed is not None else set()
    prefixes = [block_prefix(compressed, i) for i in range(len(decoder_layers(compressed)))]
    members: dict[str, list[str]] = {}
    for name in decoder_matrices(compressed):
        prefix = next(p for p in prefixes if name.startswith(p))
        members.setdefault(name[len(prefix) :].removesuffix(".weight"), []).append(name)
    grouped = {n for names in members.values() for n in names}
    members["other parameters"] = [n for n in params if n not in grouped]
    out = []
    for group, names in members.items():
        recs = [by_name[n] for n in names if n in by_name]
        zeros = sum(int((params[n] == 0).sum()) for n in names)
        total = sum(params[n].numel() for n in names)
        packed_here = sum(n.removesuffix(".weight") in quantized for n in names)
        stored = (
            "float"
            if not packed_here
            else packed.describe()
            if packed_here == len(names)
            else f"{packed.describe()} ({packed_here} of {len(names)})"
        )
        out.append(
            dict(
                group=group,
                matrices=len(names),
                stored=stored,
                change="+".join(sorted({r.kind for r in recs} - {"identical"})) or "identical",
                sparsity=zeros / total if total else 0.0,
                max_relative_error=max((r.relative_error for r in recs), default=0.0),
                max_kept_error=max((r.kept_error for r in recs), default=0.0),
            )
        )
    return out


def checkpoint_name(path: Path, manifest: dict | None) -> str:
    """A readable run-directory name: the variant spec from compression.json, else the directory name."""
    spec = (manifest or {}).get("spec")
    if spec:
        return file_slug(spec)
    return path.resolve().name
