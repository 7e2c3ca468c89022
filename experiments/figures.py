"""Exporting plotly figures as interactive HTML plus a static PNG (for README.md and figures/).

PNG export goes through kaleido, which drives a headless Chromium. None is downloaded: set
BROWSER_PATH (e.g. Debian's chromium-headless-shell at /usr/lib/chromium/chromium-headless-shell)
or have one on the usual paths; without one, only the HTML is written and a line says why.
"""

from __future__ import annotations

import os
from pathlib import Path

from lm.cache import atomic_write_text, write_plotlyjs

BROWSER_CANDIDATES = ("/usr/lib/chromium/chromium-headless-shell", "/usr/bin/chromium", "/usr/bin/google-chrome")


def png_unavailable_reason() -> str | None:
    import importlib.util

    if importlib.util.find_spec("kaleido") is None:
        return "kaleido is not installed (pip install 'refusal-repair[figures]')"
    if browser_path() is None:
        return "no headless Chromium for kaleido (apt-get install chromium-headless-shell, or set BROWSER_PATH)"
    return None


def browser_path() -> str | None:
    path = os.environ.get("BROWSER_PATH")
    if path and Path(path).exists():
        return path
    return next((p for p in BROWSER_CANDIDATES if Path(p).exists()), None)


def export(figs: dict, out_dir: Path) -> list[str]:
    """Write <name>.html (offline: plotly.min.js is written once beside them) and <name>.png; returns log lines."""
    out_dir.mkdir(parents=True, exist_ok=True)
    reason = png_unavailable_reason()
    write_plotlyjs(out_dir)
    log = []
    for name, fig in figs.items():
        atomic_write_text(out_dir / f"{name}.html", fig.to_html(include_plotlyjs="directory", full_html=True))
        if reason is not None:
            continue
        os.environ.setdefault("BROWSER_PATH", browser_path())
        width = fig.layout.width or 900
        height = fig.layout.height or 450
        tmp = out_dir / f".{name}.png.partial"
        fig.write_image(str(tmp), format="png", width=width, height=height, scale=2)
        tmp.replace(out_dir / f"{name}.png")
    log.append(f"figures: {len(figs)} written to {out_dir}" + ("" if reason is None else f" as HTML only: {reason}"))
    return log
