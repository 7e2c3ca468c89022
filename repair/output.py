"""Writing the repair's output directory: a rerun that found the same repair keeps the written
checkpoint (rewriting an identical multi-GB file is most of a cached rerun's cost)."""

from __future__ import annotations

import json
from pathlib import Path

from compression.checkpoint import MANIFEST


def unchanged_output(out: Path, manifest: dict, result: dict) -> dict | None:
    """The repair.json in `out` if `out` was written with this manifest and these results (wall times aside)."""
    try:
        stored = json.loads((out / "repair.json").read_text(encoding="utf-8"))
        stored_manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not any(out.glob("*.safetensors")) or stored_manifest != manifest:
        return None
    strip = lambda r: {k: v for k, v in r.items() if k not in ("wall_seconds", "stage_seconds")}
    return stored if strip(stored) == strip(result) else None


def jsonable(obj):
    return json.loads(json.dumps(obj, default=str))


def repair_manifest(
    cfg, base_manifest: dict | None, model, result: dict, aird_block: int, masks: dict, fingerprints: tuple[str, str]
) -> dict:
    """The compressed checkpoint's compression.json, with the repair recorded in it."""
    from compression.checkpoint import sparsity_report

    from .restore import count

    fp_orig, fp_comp = fingerprints
    manifest = dict(base_manifest or {})
    manifest.setdefault("base_model", cfg.original)
    manifest.setdefault("base_fingerprint", fp_orig)
    manifest["sparsity"] = sparsity_report(model)
    manifest["repair"] = dict(
        method=cfg.saved_method,
        source=result["source"],
        aird_block=aird_block,
        restored=count(masks),
        restored_fraction_of_model=count(masks) / result["model_params"],
        compressed_checkpoint=str(cfg.compressed),
        compressed_fingerprint=fp_comp,
        original_fingerprint=fp_orig,
        sparsity_before=result["states"]["compressed"]["sparsity"],
    )
    return manifest


def write_readable(where: Path, result: dict, label: str) -> None:
    """repair.md and the figures (cheap; redrawn even when the checkpoint is kept)."""
    from lm.cache import atomic_write_text, write_plotlyjs

    from .figures import before_after_figure, curve_figure
    from .front_report import front_figure, front_section
    from .report import render_markdown

    figs = {"repair_before_after": before_after_figure(result)}
    if result.get("curve"):
        figs["repair_curve"] = curve_figure({label: result})
    if result.get("front"):
        figs["repair_front"] = front_figure(result)
    atomic_write_text(where / "repair.md", render_markdown(result, middle=front_section(result)))
    write_plotlyjs(where / "figures")
    for name, fig in figs.items():
        atomic_write_text(where / "figures" / f"{name}.html", fig.to_html(include_plotlyjs="directory", full_html=True))


def packed_weights(model, masks: dict, packed_modules) -> dict:
    """{module name: weight} of every packed matrix the repair touched: what a packed output stores
    at full precision. Other touched tensors (biases, norms) are stored unquantized in the input
    already, rounded from the original's, which is what restoring them gives at that precision."""
    params, packed = dict(model.named_parameters()), set(packed_modules)
    return {
        name.removesuffix(".weight"): params[name]
        for name, mask in masks.items()
        if name.endswith(".weight") and name.removesuffix(".weight") in packed and bool(mask.any())
    }


def write_output(
    out: Path, model, tokenizer, manifest: dict, result: dict, label: str, packed_from=None, dtype=None
) -> tuple[dict, bool]:
    """Checkpoint + compression.json + repair.json/md + figures, all or nothing: (what `out` holds,
    whether it was written). When an earlier run wrote the same repair (same numbers, same
    manifest), its files are kept as they are: rewriting an identical multi-GB checkpoint is most
    of the cost of a rerun that found every stage cached.

    packed_from: (source directory, PackedFormat, {module: weight}) for a packed input, which is
    written in its own format (lm.packed.writer) instead of as a float checkpoint. dtype: the
    precision a float checkpoint is written in (the compressed input's, lm.loading.stored_dtype),
    whatever precision the repair computed in; `model` is cast to it."""
    from lm.cache import atomic_dir, atomic_write_json

    kept = unchanged_output(out, jsonable(manifest), jsonable(result))
    if kept is not None:
        write_readable(out, kept, label)
        return kept, False
    with atomic_dir(out) as tmp:
        if packed_from is not None:
            from lm.packed.writer import write_packed

            source, fmt, weights = packed_from
            write_packed(source, tmp, fmt, weights)
        else:
            if dtype is not None and next(model.parameters()).dtype != dtype:
                # Restored and kept weights both come from checkpoints stored in this dtype, so
                # casting back loses nothing; the repair's float32 copy would be twice a bf16 file.
                model.to(dtype)
                model.config.dtype = dtype
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / MANIFEST, jsonable(manifest))
        atomic_write_json(tmp / "repair.json", jsonable(result))
        write_readable(tmp, result, label)
    return result, True
