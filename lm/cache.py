"""Where converted models and cached artifacts live, and atomic writes into it."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

CACHE_ENV = "REFUSAL_REPAIR_CACHE"


def cache_root() -> Path:
    root = os.environ.get(CACHE_ENV)
    path = Path(root).expanduser() if root else Path.home() / ".cache" / "refusal-repair"
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def atomic_dir(final: Path):
    """Yield a temporary sibling directory that replaces `final` only if the block succeeds.

    A crash or an exception leaves no partial `final`, which is what lets every stage decide
    "already done" by the mere existence of its output.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp creates 0700
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; artifacts are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_save_tensors(path: Path, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def cached_json(path: Path, params: dict, compute):
    """Stage memoisation: reuse `path` if it was written with the same `params`, else compute and write.

    `compute()` returns a JSON-able dict; the stored file is {"params": ..., "result": ...}.
    """
    path = Path(path)
    if path.is_file():
        with open(path, encoding="utf-8") as f:
            stored = json.load(f)
        if stored.get("params") == json.loads(json.dumps(params)):
            return stored["result"]
    result = compute()
    atomic_write_json(path, {"params": params, "result": result})
    return result


# How work is batched or which device runs it does not change what a measurement means, so these
# fields never enter a key: the same model under the same settings is one cache entry everywhere.
NOT_IN_KEY = ("batch_size",)


def measurement_key(model, *configs) -> dict:
    """The cache key of one measurement: the model's identity and the settings dataclasses.

    `model` is a weight fingerprint (lm.loading.model_fingerprint) or a JSON-able dict that
    identifies a model state without hashing its weights (a variant spec on a base fingerprint, a
    restoration on a checkpoint). Every entry point builds its keys here and nowhere else.
    """
    settings = {type(c).__name__: {k: v for k, v in dataclasses.asdict(c).items() if k not in NOT_IN_KEY} for c in configs}
    return json.loads(json.dumps(dict(model=model, settings=settings), sort_keys=True, default=str))


def measured(store: Path, kind: str, model, configs, compute):
    """`compute()` cached in `store/kind/<sha256 of measurement_key>.json`, shared by every entry point."""
    params = measurement_key(model, *configs)
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:24]
    return cached_json(Path(store) / kind / f"{digest}.json", params, compute)


def cached_tensors(path: Path, params: dict, compute) -> dict:
    """Like `cached_json` for a dict of tensors, stored as safetensors with the params in its metadata."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    key = json.dumps(params, sort_keys=True)
    if path.is_file():
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("params") == key:
                return load_file(str(path))
    tensors = compute()
    atomic_save_tensors(path, tensors, metadata={"params": key})
    return tensors


def write_plotlyjs(directory: Path) -> None:
    """plotly.min.js beside HTML figures written with include_plotlyjs="directory" (offline viewing)."""
    from plotly.offline import get_plotlyjs

    path = Path(directory) / "plotly.min.js"
    if not path.exists():
        atomic_write_text(path, get_plotlyjs())


def timed(compute):
    """compute() with its wall time added as "seconds": for stage results stored by cached_json."""
    start = time.perf_counter()
    out = compute()
    out["seconds"] = round(time.perf_counter() - start, 1)
    return out


class RunClock:
    """Wall time of every invocation that worked on one run directory.

    Stages are cached, so a job interrupted and rerun (or rerun just to redraw the report) is
    several invocations; each appends an entry to `path` and updates it at every `tick()`, so the
    total survives an interruption up to its last tick.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.start = time.perf_counter()
        self.entries = json.loads(self.path.read_text()) if self.path.is_file() else []
        self.entries.append(dict(started=time.strftime("%Y-%m-%dT%H:%M:%S%z"), seconds=0.0, finished=False))
        self.tick()

    @property
    def seconds(self) -> float:
        """This invocation's wall time so far."""
        return round(time.perf_counter() - self.start, 1)

    def tick(self, finished: bool = False) -> None:
        self.entries[-1].update(seconds=self.seconds, finished=finished)
        atomic_write_json(self.path, self.entries)

    def summary(self) -> dict:
        return dict(invocations=len(self.entries), wall_seconds_all_invocations=round(sum(e["seconds"] for e in self.entries), 1))
