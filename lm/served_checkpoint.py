"""Which saved checkpoint holds exactly the weights of an in-memory model.

A serving engine such as vLLM loads weights from disk, not from the Python object, so it may
only stand in for a model when the directory the model names (`name_or_path`) still holds every
one of its weights bit for bit and nothing changes the forward pass from outside (hooks, e.g. a
directional ablation). A model pruned or edited in memory after loading, or one whose variant
was saved elsewhere, fails the check and keeps the transformers path.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import UserError
from .hooks import foreign_hooks

# (id(model), path) -> the parameter versions that matched; in-place edits bump a tensor's _version.
_VERIFIED: dict[tuple[int, str], tuple] = {}


def _versions(model) -> tuple:
    return tuple((p.data_ptr(), p._version) for p in model.parameters())


def served_checkpoint(model) -> Path:
    """The model's safetensors directory if it reproduces the model exactly; else a UserError saying why."""
    raw = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None)
    path = Path(raw).expanduser() if raw else None
    if path is None or not path.is_dir() or not any(path.glob("*.safetensors")):
        raise UserError(f"the model is not backed by a local safetensors directory ({raw!r}); save it first")
    if foreign_hooks(model):
        raise UserError(
            "the model has forward hooks (an intervention); a server loading the checkpoint would ignore them"
        )
    key = (id(model), str(path.resolve()))
    versions = _versions(model)
    if _VERIFIED.get(key) != versions:
        mismatch = _first_mismatch(model, path)
        if mismatch:
            raise UserError(
                f"the weights in {path} differ from the model in memory ({mismatch}); save the edited model first"
            )
        _VERIFIED[key] = versions
    return path


def _first_mismatch(model, path: Path) -> str | None:
    from safetensors import safe_open

    state = model.state_dict()
    seen: set[int] = set()
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                if name not in state:
                    continue
                mine = state[name]
                saved = f.get_tensor(name).to(mine.dtype)
                if saved.shape != mine.shape or not torch.equal(saved, mine.detach().cpu()):
                    return name
                seen.add(mine.data_ptr())
    # A tensor missing from the files is fine only if it shares storage with one that was
    # compared (tied embeddings); anything else would be re-initialised by the server.
    for name, tensor in state.items():
        if tensor.data_ptr() not in seen:
            return f"{name} not saved"
    return None
