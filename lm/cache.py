"""Where converted models and cached artifacts live, and atomic writes into it."""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from .progress import note_computed, note_reused

CACHE_ENV = "REFUSAL_REPAIR_CACHE"


def cache_root() -> Path:
    root = os.environ.get(CACHE_ENV)
    path = Path(root).expanduser() if root else Path.home() / ".cache" / "refusal-repair"
    path.mkdir(parents=True, exist_ok=True)
    return path


# Temporaries of atomic writes are named `.<final name>.<pid>.tmp-<random>` next to their final
# path, so a later run can tell the leftovers of a killed process (pid gone) from a live writer's.
TMP_MARK = ".tmp-"
OLD_MARK = ".old-"


def _tmp_prefix(final: Path) -> str:
    return f".{final.name}.{os.getpid()}{TMP_MARK}"


def warn(msg: str) -> None:
    """One warning line on stderr (a cached artifact that failed its check, a swept temporary)."""
    import sys

    print(f"warning: {msg}", file=sys.stderr, flush=True)


@contextmanager
def _signals_held():
    """SIGTERM and SIGINT wait (blocked, then delivered on leaving) while a temporary is created and
    its name bound, or a directory swapped in: an interruption then never leaves a temporary that no
    `except` knows about, nor a final directory moved aside and not yet replaced."""
    import signal

    held = {signal.SIGTERM, signal.SIGINT}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


@contextmanager
def atomic_dir(final: Path):
    """Yield a temporary sibling directory that replaces `final` only if the block succeeds.

    A crash or an exception leaves no partial `final`, which is what lets every stage decide
    "already done" by the mere existence of its output. Two processes writing the same `final`
    both succeed and the last one's directory stays (they hold the same artifact).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = None
    try:
        with _signals_held():
            tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(final), dir=final.parent))
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp creates 0700
        with _signals_held():
            _replace_dir(tmp, final)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace_dir(tmp: Path, final: Path) -> None:
    """os.replace for a directory whose target may exist: the old one is first moved aside
    (atomically), so `final` is never a mix of two writes, then removed."""
    for _ in range(100):
        try:
            os.replace(tmp, final)
            return
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.EISDIR):
                raise
        old = Path(tempfile.mkdtemp(prefix=f".{final.name}.{os.getpid()}{OLD_MARK}", dir=final.parent))
        try:
            os.replace(final, old / "x")
        except FileNotFoundError:  # another writer moved it first; try again
            pass
        shutil.rmtree(old, ignore_errors=True)
    raise OSError(f"could not replace {final}: other writers keep recreating it")


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = None
    try:
        with _signals_held():
            fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(path), dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; artifacts are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_save_tensors(path: Path, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = None
    try:
        with _signals_held():
            fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(path), dir=path.parent)
            os.close(fd)
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def sweep_temporaries(root: Path) -> list[Path]:
    """Remove the temporaries that killed processes left under `root` (files and directories named
    by the atomic writers, whose pid no longer runs); returns what was removed."""
    root = Path(root)
    if not root.is_dir():
        return []
    removed = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in list(dirnames) + filenames:
            if not name.startswith(".") or (TMP_MARK not in name and OLD_MARK not in name):
                continue
            mark = TMP_MARK if TMP_MARK in name else OLD_MARK
            pid = name.split(mark)[0].rsplit(".", 1)[-1]
            if not pid.isdigit() or _pid_alive(int(pid)):
                continue
            path = Path(dirpath) / name
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
                if name in dirnames:
                    dirnames.remove(name)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    if removed:
        warn(f"removed {len(removed)} temporary file(s) left under {root} by an interrupted run")
    return removed


def json_digest(obj) -> str:
    """SHA-256 of a JSON value's canonical text: the content digest stored beside a cached result."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def tensors_digest(tensors: dict) -> str:
    """SHA-256 over names, dtypes, shapes and bytes of a dict of tensors."""
    import torch

    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def files_digest(directory: Path, names: list[str]) -> dict[str, str]:
    """SHA-256 of each named file in `directory` (a checkpoint's weight files)."""
    out = {}
    for name in sorted(names):
        digest = hashlib.sha256()
        with open(Path(directory) / name, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                digest.update(chunk)
        out[name] = digest.hexdigest()
    return out


def read_cached_json(path: Path, params: dict, named_by_params: bool = False):
    """The stored result of `cached_json` if `path` holds one for `params` and its content digest
    verifies; None otherwise (an unreadable or altered file gets one warning line, and so does one
    for other params where the file's name is the params' digest: it was copied or swapped there)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        with open(path, encoding="utf-8") as f:
            stored = json.load(f)
        same = stored.get("params") == json.loads(json.dumps(params))
        if not same and named_by_params:
            warn(f"{path} holds the result of other settings than its name says; recomputing it")
        result = stored["result"] if same else None
        if same and stored.get("sha256") != json_digest(result):
            warn(f"{path} does not match its content digest; recomputing it")
            return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        warn(f"{path} is unreadable; recomputing it")
        return None
    return result


def cached_json(path: Path, params: dict, compute, named_by_params: bool = False):
    """Stage memoisation: reuse `path` if it was written with the same `params` and its content
    verifies, else compute and write.

    `compute()` returns a JSON-able dict; the stored file is {"params", "result", "sha256"}, the
    last the digest of the result (a file edited or damaged on disk is recomputed, not reused).
    """
    result = read_cached_json(path, params, named_by_params)
    if result is not None:
        note_reused(path)
        return result
    result = json.loads(json.dumps(compute()))
    write_cached_json(path, params, result)
    note_computed(path)
    return result


def write_cached_json(path: Path, params: dict, result) -> None:
    """`result` stored at `path` as `read_cached_json` verifies it (its params and its digest),
    overwriting what is there: for a stage's state that changes as it runs."""
    atomic_write_json(path, {"params": params, "result": result, "sha256": json_digest(result)})


# How work is batched or which device runs it does not change what a measurement means, so these
# fields never enter a key: the same model under the same settings is one cache entry everywhere.
NOT_IN_KEY = ("batch_size",)


def measurement_key(model, *configs) -> dict:
    """The cache key of one measurement: the model's identity and the settings dataclasses.

    `model` is a weight fingerprint (lm.loading.model_fingerprint) or a JSON-able dict that
    identifies a model state without hashing its weights (a variant spec on a base fingerprint, a
    restoration on a checkpoint). Every entry point builds its keys here and nowhere else.
    """
    settings = {
        type(c).__name__: {k: v for k, v in dataclasses.asdict(c).items() if k not in NOT_IN_KEY} for c in configs
    }
    return json.loads(json.dumps(dict(model=model, settings=settings), sort_keys=True, default=str))


def measurement_digest(model, *configs) -> str:
    """SHA-256 of a measurement's key: its file is named by the first 24 hex digits, and what is
    derived from the measurement (a model judge's verdicts on its completions) is keyed by it."""
    return hashlib.sha256(json.dumps(measurement_key(model, *configs), sort_keys=True).encode()).hexdigest()


def measured(store: Path, kind: str, model, configs, compute):
    """`compute()` cached in `store/kind/<sha256 of measurement_key>.json`, shared by every entry point."""
    params = measurement_key(model, *configs)
    digest = measurement_digest(model, *configs)[:24]
    return cached_json(Path(store) / kind / f"{digest}.json", params, compute, named_by_params=True)


def read_cached_tensors(path: Path, params: dict) -> dict | None:
    """The tensors `cached_tensors` stored at `path` for `params`, verified against their digest; None otherwise."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("params") != json.dumps(params, sort_keys=True):
            return None
        tensors = load_file(str(path))
        if meta.get("sha256") != tensors_digest(tensors):
            warn(f"{path} does not match its content digest; recomputing it")
            return None
    except Exception:  # safetensors raises its own error types for a truncated or garbled file
        warn(f"{path} is unreadable; recomputing it")
        return None
    return tensors


def cached_tensors(path: Path, params: dict, compute) -> dict:
    """Like `cached_json` for a dict of tensors, stored as safetensors with the params and the
    tensors' digest in its metadata."""
    tensors = read_cached_tensors(path, params)
    if tensors is not None:
        note_reused(path)
        return tensors
    tensors = compute()
    write_cached_tensors(path, params, tensors)
    note_computed(path)
    return tensors


def write_cached_tensors(path: Path, params: dict, tensors: dict) -> None:
    """`tensors` stored at `path` as `read_cached_tensors` verifies them, overwriting what is there."""
    atomic_save_tensors(
        path, tensors, metadata={"params": json.dumps(params, sort_keys=True), "sha256": tensors_digest(tensors)}
    )


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
    several invocations; each has its own entry in `path`, updated at every `tick()` and, used as a
    context manager, once more when the job ends by an exception or a signal (SIGTERM and Ctrl-C
    unwind), so an interrupted invocation's real time is counted; only kill -9 loses the time since
    its last tick. Concurrent invocations on one run directory update the file under an exclusive
    lock (fcntl.flock on a lock file beside it), each rewriting only its own entry, so none is lost.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.lock_path = self.path.with_name(f".{self.path.name}.lock")
        self.start = time.perf_counter()
        self.entry = dict(
            started=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            seconds=0.0,
            finished=False,
            invocation=f"{os.getpid()}-{os.urandom(4).hex()}",
        )
        self.entries: list[dict] = []
        self.tick()

    def __enter__(self) -> "RunClock":
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is not None:
            try:
                self.tick()
            except OSError:  # e.g. the full disk that ended the job: its own error is the one to report
                pass

    @property
    def seconds(self) -> float:
        """This invocation's wall time so far."""
        return round(time.perf_counter() - self.start, 1)

    def tick(self, finished: bool = False) -> None:
        import fcntl

        # Milliseconds in the log (an invocation stopped early may take less than a tenth of a second).
        self.entry.update(seconds=round(time.perf_counter() - self.start, 3), finished=finished)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            entries = self._read()
            mine = [i for i, e in enumerate(entries) if e.get("invocation") == self.entry["invocation"]]
            if mine:
                entries[mine[0]] = self.entry
            else:
                entries.append(self.entry)
            atomic_write_json(self.path, entries)
        self.entries = entries

    def _read(self) -> list[dict]:
        """The entries on disk; an unreadable or malformed file is started afresh with a warning."""
        if not self.path.is_file():
            return []
        try:
            entries = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            entries = None
        if not isinstance(entries, list) or not all(
            isinstance(e, dict) and isinstance(e.get("seconds"), (int, float)) for e in entries
        ):
            warn(f"{self.path} is unreadable or malformed; starting a new log of invocations")
            return []
        return entries

    def summary(self) -> dict:
        return dict(
            invocations=len(self.entries),
            wall_seconds_all_invocations=round(sum(e["seconds"] for e in self.entries), 1),
        )
