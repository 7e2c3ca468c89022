"""Writing the repair's output directory: a rerun that found the same repair keeps the written
checkpoint (rewriting an identical multi-GB file is most of a cached rerun's cost)."""

from __future__ import annotations

import json
from pathlib import Path

from compression.checkpoint import MANIFEST


def unchanged_output(out: Path, manifest: dict, result: dict) -> dict | None:
    """The repair.json in `out` if `out` was written with this manifest and these results (wall time aside)."""
    try:
        stored = json.loads((out / "repair.json").read_text(encoding="utf-8"))
        stored_manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not any(out.glob("*.safetensors")) or stored_manifest != manifest:
        return None
    strip = lambda r: {k: v for k, v in r.items() if k != "wall_seconds"}
    return stored if strip(stored) == strip(result) else None


def jsonable(obj):
    return json.loads(json.dumps(obj, default=str))
