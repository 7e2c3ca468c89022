"""One table and one set of figures for several `python -m repair` outputs.

    python -m experiments.repair_summary runs/repaired/* --figures-dir figures

Reads each directory's repair.json (no model is loaded) and prints the markdown table of the main
job's repair section; with --figures-dir, writes the AIRD-vs-targeted curve of all checkpoints and
each checkpoint's before/after bars and cost-benefit front there as HTML + PNG.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lm.errors import UserError, cli

from .compare_refusal.report import repair_section


def load_results(dirs: list[str]) -> dict[str, dict]:
    out = {}
    for d in dirs:
        path = Path(d) / "repair.json"
        if not path.is_file():
            raise UserError(f"no repair.json in {d} (not a python -m repair output)")
        with open(path, encoding="utf-8") as f:
            result = json.load(f)
        manifest = result.get("compressed_manifest") or {}
        out[manifest.get("spec") or Path(d).name] = result
    if not out:
        raise UserError("no repair outputs given")
    return out


@cli
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.repair_summary", description=__doc__.split("\n\n")[0])
    p.add_argument("dirs", nargs="+", help="output directories of python -m repair")
    p.add_argument("--figures-dir", help="write repair_curve and repair_<checkpoint> figures here (HTML + PNG)")
    a = p.parse_args(argv)
    results = load_results(a.dirs)
    print("\n".join(repair_section(results)).strip())
    if a.figures_dir:
        from repair.figures import before_after_figure, curve_figure
        from repair.front_report import front_figure
        from repair.report import file_slug

        from .figures import export

        curves = {name: r for name, r in results.items() if r.get("curve")}
        figs = {"repair_curve": curve_figure(curves)} if curves else {}
        for name, r in results.items():
            figs[f"repair_{file_slug(name)}"] = before_after_figure(r, f"Repair before/after: {name}")
            if r.get("front"):
                figs[f"repair_front_{file_slug(name)}"] = front_figure(r, f"Repair front: {name}")
        for line in export(figs, Path(a.figures_dir)):
            print(line, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
