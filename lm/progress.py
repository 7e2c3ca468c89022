"""Where a long job stands, for the person waiting on it.

A job declares its plan (every stage of every model, in order) and wraps each stage in
`JobProgress.stage`, which prints one line when the stage starts:

    [compare_refusal] model 3 of 10 (wanda:0.6) · ASR · 0:12:03 elapsed · job ETA ~1:45:10

The ETA sums, over the stages still to run, the mean time this invocation measured for stages of
the same kind; a stage whose results were all reused from the cache does not count as a
measurement (it did no real work; one that reused some and computed others does), and while some kind has not been timed yet the ETA is a
lower bound and says so. A stage that reused cached results says what it reused, so a rerun shows
where it picks up. The stage count is what an interrupted job reports (`stopped_line`, through
`take_stopped`, which lm.errors.cli reads).
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from pathlib import Path

_current: "JobProgress | None" = None


_stopped: "JobProgress | None" = None


def current() -> "JobProgress | None":
    """The job running in this process, if it declared its progress."""
    return _current


def take_stopped() -> "JobProgress | None":
    """The job that an exception (Ctrl-C, SIGTERM) ended last, once: what lm.errors.cli reports."""
    global _stopped
    job, _stopped = _stopped, None
    return job


def note_reused(path) -> None:
    """Called by lm.cache when a stage's result is read back from `path` instead of computed."""
    if _current is not None:
        _current.reused(path)


def note_computed(path) -> None:
    """Called by lm.cache when a stage's result is computed and stored at `path`."""
    if _current is not None:
        _current.computed(path)


def clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class JobProgress:
    """The stage lines of one job. `plan` lists (model label, stage kind) in the order they run;
    `extend` adds stages decided later (e.g. the repairs, once the comparison says which)."""

    def __init__(self, job: str, plan: list[tuple[str, str]], models: list[str], stream=None):
        self.job, self.plan, self.models = job, list(plan), list(models)
        self.stream = stream or sys.stderr
        self.done = 0
        self.start = time.perf_counter()
        self.durations: dict[str, list[float]] = {}
        self._reused: list[str] = []
        self._computed: list[str] = []

    def __enter__(self) -> "JobProgress":
        global _current
        self._previous, _current = _current, self
        return self

    def __exit__(self, kind, value, traceback) -> None:
        global _current, _stopped
        _current = self._previous
        if kind is not None:  # unwinding from a stop or an error: the entry point's handler reports it
            _stopped = self

    def extend(self, stages: list[tuple[str, str]]) -> None:
        self.plan.extend(stages)

    def reused(self, path) -> None:
        self._reused.append(str(path))

    def computed(self, path) -> None:
        self._computed.append(str(path))

    def log(self, message: str) -> None:
        print(f"[{self.job}] {message}", file=self.stream, flush=True)

    @contextmanager
    def stage(self, model: str, kind: str, detail: str = ""):
        """One stage of `model` (a plan entry): its line on entry, its time (or what it reused) on exit."""
        where = (
            f"model {self.models.index(model) + 1} of {len(self.models)} ({model})" if model in self.models else model
        )
        self.log(
            f"{where} · {kind}{f' ({detail})' if detail else ''} · stage {self.done + 1} of {len(self.plan)} · "
            f"{clock(time.perf_counter() - self.start)} elapsed · {self.eta(self.done)}"
        )
        self._reused, self._computed, start = [], [], time.perf_counter()
        yield
        seconds = time.perf_counter() - start
        if self._reused:
            names = sorted(
                {
                    Path(p).name if "/measurements/" not in p else "measurement " + Path(p).parent.name
                    for p in self._reused
                }
            )
            self.log(
                f"  reused {len(self._reused)} cached result(s) ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
            )
        if self._computed or not self._reused:  # only a stage that did its work measures its kind
            self.durations.setdefault(kind, []).append(seconds)
        self.done += 1

    def eta(self, position: int) -> str:
        """The job's remaining time from `position` on, from the mean measured time of each kind."""
        left = [kind for _, kind in self.plan[position:]]
        if not left:
            return "job ETA 0:00:00"
        known = sum(sum(self.durations[k]) / len(self.durations[k]) for k in left if k in self.durations)
        untimed = sorted({k for k in left if k not in self.durations})
        if not untimed:
            return f"job ETA ~{clock(known)}"
        if not self.durations:
            return "job ETA: after the first stages are timed"
        return f"job ETA > {clock(known)} ({len(untimed)} kind(s) of stage not timed yet)"

    def stopped_line(self) -> str:
        return f"stopped; rerun the same command to continue: {self.done} of {len(self.plan)} stages done"
