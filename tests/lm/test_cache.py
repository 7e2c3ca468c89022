"""Atomic writes (lm.cache): nothing half-written is left by a failure or a SIGTERM."""

from __future__ import annotations

import json

import pytest

from lm.cache import atomic_dir, atomic_write_json


def test_atomic_dir_leaves_nothing_on_failure(tmp_path):
    final = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_dir(final) as tmp:
            (tmp / "half.txt").write_text("partial")
            raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []

    with atomic_dir(final) as tmp:
        atomic_write_json(tmp / "done.json", {"ok": True})
    assert json.loads((final / "done.json").read_text()) == {"ok": True}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_sigterm_during_an_atomic_write_leaves_nothing(tmp_path):
    """An entry point stopped with SIGTERM (kill, a scheduler, a CI timeout) unwinds its atomic writes."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    script = tmp_path / "job.py"
    script.write_text(
        "import sys, time\n"
        "from pathlib import Path\n"
        "from lm.cache import atomic_dir\n"
        "from lm.errors import cli\n"
        "@cli\n"
        "def main(argv=None):\n"
        f"    with atomic_dir(Path({str(tmp_path / 'run' / 'stage')!r})) as tmp:\n"
        "        (tmp / 'half.safetensors').write_text('partial')\n"
        "        print('started', flush=True)\n"
        "        time.sleep(60)\n"
        "    return 0\n"
        "sys.exit(main())\n"
    )
    proc = subprocess.Popen(
        [sys.executable, str(script)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parents[2],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])},
    )
    assert proc.stdout.readline().strip() == "started"
    assert len(list((tmp_path / "run").iterdir())) == 1  # the temporary directory, mid-write
    start = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    assert time.monotonic() - start < 30
    assert list((tmp_path / "run").iterdir()) == []
