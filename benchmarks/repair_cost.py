"""`python -m benchmarks.repair_cost`: the repair of one variant before and after anchored restoration,
timed side by side at the main job's CPU settings.

    python -m benchmarks.repair_cost --compressed runs/reference-embedded/variants/setdiff-wanda-p-0.01-q-0.01/model

Runs `python -m repair` twice on the same checkpoint, one after the other, each in a fresh run
directory (so each selects the original's direction and scores AIRD itself) and both reading the
same measurement store (so the original's and the compressed model's held-out measurements, which
the main job has already made, are reused by both, as in the main job's repair stage):

  before   the repair as it was until 2026-12-07: AIRD + one-shot targeted restoration, the
           restoration curve (0.03, 0.3 of AIRD's count on 16 prompts per set), 50 harmless prompts
  after    today's default: AIRD + anchored restoration + the static baseline, 100 harmless prompts

Both at the main job's CPU evaluation sizes (100 held-out harmful prompts, greedy, 128 tokens;
perplexity 16 x 512; zero-shot 4 tasks x 24 documents; no adversarial suffixes; no refusal probe).
The ratio after / before is the result; the absolute times follow the machine's load.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from lm.cli import parse_config
from lm.errors import UserError, cli

BEGIN, END = "<!-- python -m benchmarks.repair_cost: begin -->", "<!-- python -m benchmarks.repair_cost: end -->"

CPU_SETTINGS = (
    "--zero-shot-limit",
    "24",
    "--zero-shot-tasks",
    "boolq",
    "rte",
    "winogrande",
    "arc_easy",
    "--no-adv-suffix",
    "--n-refusal-probe",
    "0",
)
ARMS = {
    "before": (
        "--no-anchored",
        "--targeted",
        "--save",
        "aird",
        "--curve-fractions",
        "0.03",
        "0.3",
        "--curve-n-asr",
        "16",
        "--n-harmless",
        "50",
    ),
    "after": (),
}


@dataclass(frozen=True)
class RepairCostRun:
    compressed: str = ""  # the compressed checkpoint (required)
    original: str = "embedded"
    measurements_dir: str = "runs/measurements"  # shared with the main job, whose measurements both arms reuse
    work_dir: str = "runs/repair-cost"  # each arm's --runs-dir and --out live here (fresh per arm)
    arms: tuple[str, ...] = ("before", "after")
    results: str = str(Path(__file__).with_name("RESULTS.md"))
    write: bool = True


def run_arm(cfg: RepairCostRun, arm: str) -> dict:
    root = Path(cfg.work_dir) / arm
    if root.exists():
        raise UserError(f"{root} exists: remove it (each arm must start from a fresh run directory)")
    cmd = [
        sys.executable,
        "-m",
        "repair",
        "--original",
        cfg.original,
        "--compressed",
        cfg.compressed,
        "--out",
        str(root / "out"),
        "--runs-dir",
        str(root / "runs"),
        "--measurements-dir",
        cfg.measurements_dir,
        *CPU_SETTINGS,
        *ARMS[arm],
    ]
    print(f"[repair_cost] {arm}: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    start, cpu = time.perf_counter(), os.times()
    proc = subprocess.run(cmd)
    end = os.times()
    if proc.returncode != 0:
        raise UserError(f"the {arm} repair failed (exit {proc.returncode}); its output is above")
    return dict(
        arm=arm,
        seconds=round(time.perf_counter() - start, 1),
        cpu_seconds=round((end.children_user + end.children_system) - (cpu.children_user + cpu.children_system), 1),
        command="python -m repair " + " ".join(cmd[3:]),
    )


def table(rows: list[dict], argv: list[str]) -> str:
    from .__main__ import heading, machine

    lines = [
        BEGIN,
        heading("python -m benchmarks.repair_cost", argv),
        "",
        f"Machine: {machine()}.",
        "",
        "One variant's `python -m repair` at the main job's CPU settings, both arms in one run, one after the other, each with a "
        "fresh run directory and the main job's measurement store. *before*: AIRD + one-shot targeted + curve, 50 harmless "
        "prompts; *after*: AIRD + anchored restoration + static baseline, 100 harmless prompts.",
        "",
        "| arm | wall time | CPU time (children) | command |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {r['arm']} | {r['seconds'] / 60:.1f} min | {r['cpu_seconds'] / 60:.1f} min | `{r['command']}` |"
        for r in rows
    ]
    by = {r["arm"]: r for r in rows}
    if {"before", "after"} <= set(by):
        lines += [
            "",
            f"after / before: {by['after']['seconds'] / by['before']['seconds']:.2f} (wall), "
            f"{by['after']['cpu_seconds'] / max(by['before']['cpu_seconds'], 1e-9):.2f} (CPU).",
        ]
    return "\n".join(lines + [END])


@cli
def main(argv=None) -> int:
    cfg, _ = parse_config(
        RepairCostRun, argv, prog="python -m benchmarks.repair_cost", description=__doc__.strip().split("\n\n")[0]
    )
    if not cfg.compressed:
        raise UserError("--compressed is required")
    if not Path(cfg.compressed).is_dir():
        raise UserError(f"--compressed {cfg.compressed} is not a directory")
    unknown = sorted(set(cfg.arms) - set(ARMS))
    if unknown:
        raise UserError(f"unknown arm {unknown[0]!r}; choose from {', '.join(ARMS)}")
    rows = [run_arm(cfg, arm) for arm in cfg.arms]
    text = table(rows, list(argv if argv is not None else sys.argv[1:]))
    print(text)
    if cfg.write:
        from .__main__ import write_results

        write_results(Path(cfg.results), text, BEGIN, END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
