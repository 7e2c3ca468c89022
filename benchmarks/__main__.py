"""`python -m benchmarks`: every side-by-side speed comparison of the toolkit in one table.

    python -m benchmarks                       # default size, embedded model
    python -m benchmarks --size full           # ASR settings: 100 goals x 256 new tokens, 128 calibration prompts
    python -m benchmarks --threads 1           # on a shared CPU: CPU-time ratios stay meaningful
    python -m benchmarks --only generation snip --gen-new-tokens 256
    python -m benchmarks --model Qwen/Qwen2.5-7B-Instruct --no-write

Rows: generation (one prompt at a time vs batched `generate` vs the toolkit's continuous-batching
decoder, and vLLM when installed), SNIP (Wei et al.'s per-layer loop vs one pass), Wanda and SparseGPT
block-sequential pruning (time and peak memory, a small and the main model), direction
extraction (output_hidden_states vs hooks vs the shared-prefix default), and candidate scoring
for selection (one candidate at a time vs batched). Each group runs in its own process (peak
memory per row, see benchmarks/measure.py); the two sides of a row run in the same process on
the same inputs, so their ratio is the result, while absolute times on a shared CPU are noisy.
The table is printed and written into benchmarks/RESULTS.md with the machine and date.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Annotated, Literal

import torch
import tyro

from lm.cache import atomic_write_text
from lm.cli import parse_config
from lm.errors import UserError, cli
from lm.loading import resolve

from .settings import SIZES, Settings, settings_for
from .suite import GROUPS

RESULTS = Path(__file__).with_name("RESULTS.md")
BEGIN, END = "<!-- python -m benchmarks: begin -->", "<!-- python -m benchmarks: end -->"


def run_groups(groups: list[str], settings: Settings) -> list[dict]:
    """Rows of every group, each group measured in a fresh worker process."""
    rows = []
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    with tempfile.TemporaryDirectory(prefix="benchmarks-") as tmp:
        for group in groups:
            out = Path(tmp) / f"{group}.json"
            print(f"[{time.strftime('%H:%M:%S')}] {group} ...", file=sys.stderr, flush=True)
            start = time.perf_counter()
            proc = subprocess.run(
                [sys.executable, "-m", "benchmarks.suite", group, json.dumps(asdict(settings)), str(out)],
                env=env,
                stdout=subprocess.PIPE,
                text=True,
            )
            if proc.returncode != 0 or not out.is_file():
                lines = [line for line in (proc.stdout or "").splitlines() if line.strip()]
                raise UserError(
                    f"benchmark group {group!r} failed (exit {proc.returncode})" + (f": {lines[-1]}" if lines else "")
                )
            got = json.loads(out.read_text())["rows"]
            for r in got:
                r["group"] = group
            rows.extend(got)
            print(
                f"[{time.strftime('%H:%M:%S')}] {group} done in {time.perf_counter() - start:.0f} s",
                file=sys.stderr,
                flush=True,
            )
    return rows


def _num(x, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def table(rows: list[dict]) -> str:
    head = [
        "comparison",
        "baseline",
        "fast",
        "baseline s",
        "fast s",
        "speed-up",
        "baseline CPU s",
        "fast CPU s",
        "CPU speed-up",
        "baseline peak MiB",
        "fast peak MiB",
        "check",
        "note",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            r["comparison"],
            r["baseline"] or "-",
            r["fast"],
            _num(r["baseline_s"], ".1f"),
            _num(r["fast_s"], ".1f"),
            _num(r["speedup"], ".1f") + ("x" if r["speedup"] is not None else ""),
            _num(r["baseline_cpu_s"], ".1f"),
            _num(r["fast_cpu_s"], ".1f"),
            _num(r["cpu_speedup"], ".1f") + ("x" if r["cpu_speedup"] is not None else ""),
            _num(r["baseline_mib"], ".0f"),
            _num(r["fast_mib"], ".0f") + ("" if r.get("peak_exact", True) else " (since start)"),
            r["check"] or "-",
            r["note"] or "-",
        ]
        lines.append("| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            cpu = names[0]
    except OSError:
        pass
    dev = f"GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "CPU only"
    return f"{cpu}, {os.cpu_count()} cores, {dev}, torch {torch.__version__}, {torch.get_num_threads()} threads"


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def heading(command: str, argv: list[str]) -> str:
    """A results section's title: the command as it was run, and when."""
    return f"## `{' '.join([command, *argv])}`: {utc_now()}"


def section(rows: list[dict], settings: Settings, argv: list[str], seconds: float, loads: tuple[float, float]) -> str:
    sizes = ", ".join(f"{f.name}={getattr(settings, f.name)}" for f in fields(settings))
    return "\n".join(
        [
            BEGIN,
            heading("python -m benchmarks", argv),
            "",
            f"Machine: {machine()}. Load average (1 min) {loads[0]:.1f} at the start, {loads[1]:.1f} at the end "
            f"(other jobs share this machine: wall-clock times are noisy; with one thread, CPU times are not). "
            f"Wall time {seconds / 60:.1f} min. Settings: {sizes}.",
            "",
            table(rows),
            "",
            "Peak MiB: the high-water mark of the resident set while that implementation ran, minus the "
            "resident set (model loaded) just before it (Linux VmHWM, reset through /proc/self/clear_refs; "
            "on a GPU, peak allocated device memory). Speed-up: baseline time / fast time by wall clock, CPU speed-up "
            "the same by the process's CPU time (generation: tokens/s ratios). Rows without a baseline are single measurements.",
            END,
        ]
    )


def write_results(path: Path, text: str, begin: str = BEGIN, end: str = END) -> None:
    """Replace the section of RESULTS.md between `begin` and `end` with `text` (which carries the
    two markers), or insert it after the introduction."""
    old = path.read_text() if path.is_file() else "# Benchmark results\n"
    if begin in old and end in old:
        new = old[: old.index(begin)] + text + old[old.index(end) + len(end) :]
    else:
        # After the title and the introductory paragraph, before the other sections (and their markers).
        cut = min((i for i in (old.find("\n## "), old.find("\n<!-- ")) if i >= 0), default=-1)
        new = (old.rstrip("\n") + "\n\n" + text + "\n") if cut < 0 else old[: cut + 1] + text + "\n\n" + old[cut + 1 :]
    atomic_write_text(path, new)


@dataclass(frozen=True)
class BenchmarkRun:
    settings: Annotated[Settings, tyro.conf.OmitArgPrefixes] = Settings()  # the sizes (from --size, then the flags)
    size: Literal[tuple(SIZES)] = "default"  # preset sizes (individual flags override)
    only: tuple[Literal[GROUPS], ...] | None = None  # run only these groups
    results: str = str(RESULTS)  # markdown file to update
    write: bool = True  # write the table into --results (--no-write: print it only)
    json: str | None = None  # also write the raw rows here


def parse(argv) -> BenchmarkRun:
    """Flags generated from Settings (lm.cli); --size picks the preset the flags start from."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--size", default="default")
    size = pre.parse_known_args(argv)[0].size
    base = BenchmarkRun(settings=settings_for(size), size=size)
    return parse_config(
        BenchmarkRun,
        argv,
        prog="python -m benchmarks",
        description="\n\n".join(__doc__.split("\n\n")[:2]),
        defaults=base,
    )[0]


@cli
def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    a = parse(argv)
    settings = a.settings
    resolve(settings.model)  # a bad model spec fails here, before any work
    if settings.small_model != "scaled":
        resolve(settings.small_model)
    start, load0 = time.perf_counter(), os.getloadavg()[0]
    rows = run_groups(list(a.only or GROUPS), settings)
    seconds, load1 = time.perf_counter() - start, os.getloadavg()[0]
    text = section(rows, settings, argv, seconds, (load0, load1))
    print(text.split("\n", 2)[2].rsplit("\n", 1)[0])
    if a.json:
        from lm.cache import atomic_write_json

        atomic_write_json(Path(a.json), dict(settings=asdict(settings), rows=rows))
    if a.write:
        write_results(Path(a.results), text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
