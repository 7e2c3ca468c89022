"""Fault injection on tiny random models: what a run promises (README, "What a run promises") holds
under kill -9 and SIGTERM at many points of the main job, damaged, truncated and swapped cache
files, two runs on one run directory, a full disk, and bad input to every entry point.

Interrupted runs are forked children of the test process (no second import of torch), each told to
signal itself at its N-th `os.replace`, i.e. in the middle of an atomic write whose temporary is
complete and not yet renamed; two more are real `python` processes signalled from outside.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch

from experiments import brittleness, compare_refusal, refusal_direction
from experiments.compare_refusal.comparison import Comparison
from lm import datasets
from lm.cache import OLD_MARK, TMP_MARK, RunClock, atomic_dir
from refusal.select import SelectionConfig
from repair import __main__ as repair_cli
from tests.tiny import build_model, build_tokenizer, save_tiny

REPO = Path(__file__).resolve().parents[1]

# A selection that passes on a random model, so the stages built on the direction (quality,
# ablated ASR) run and leave their artifacts too.
PERMISSIVE = SelectionConfig(
    n_train=4,
    n_val=3,
    kl_threshold=1e9,
    induce_threshold=-1e9,
    max_layer_fraction=1.0,
    search="lazy",
    batch_size=4,
    max_rows=12,
)


def use_permissive_selection():
    Comparison.selection_config = lambda self: PERMISSIVE


@pytest.fixture(scope="module", autouse=True)
def permissive_selection():
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Comparison, "selection_config", lambda self: PERMISSIVE)
        yield


@pytest.fixture(autouse=True)
def keep_cwd():
    """Reruns work in their run's directory; later tests get the working directory back."""
    cwd = os.getcwd()
    yield
    os.chdir(cwd)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tokenizer = build_tokenizer("chatml")
    return save_tiny(
        tmp_path_factory.mktemp("faults-model"), build_model("qwen2", tokenizer, seed=0, hidden=64, layers=2), tokenizer
    )


def job_argv(model_dir) -> list[str]:
    """The main job on the tiny model: two variants (one calibrated, one N:M), every stage on."""
    return [
        "--model",
        str(model_dir),
        "--runs-dir",
        "runs",
        "--name",
        "tiny",
        "--quick",
        "--variants",
        "wanda:0.5",
        "magnitude:2:4",
        "--n-asr",
        "2",
        "--n-harmless",
        "2",
        "--max-new-tokens",
        "3",
        "--n-train",
        "4",
        "--n-val",
        "3",
        "--ppl-windows",
        "1",
        "--ppl-seqlen",
        "16",
        "--calib-samples",
        "4",
        "--n-refusal-probe",
        "4",
        "--n-ablation-asr",
        "2",
        "--zero-shot-limit",
        "0",
        "--no-repair",
        "--prescreen-keep",
        "4",
    ]


def interruptible() -> None:
    """In the child, before it starts: Ctrl-C's default action back. A shell starts background jobs
    with SIGINT ignored and children inherit that, so Python never installs its KeyboardInterrupt
    handler; a user's job in a terminal has it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def job_main():
    """Entry of the real-process runs: the main job with the permissive selection; with FAULT_SIGNAL
    and FAULT_AT set, the process sends itself that signal at its FAULT_AT-th os.replace."""
    use_permissive_selection()
    if "FAULT_SIGNAL" in os.environ:
        fail_at_rename(signal.Signals(int(os.environ["FAULT_SIGNAL"])), int(os.environ["FAULT_AT"]))
    sys.exit(compare_refusal.main(sys.argv[1:]))


def fail_at_rename(fault: signal.Signals, at: int) -> None:
    """This process sends itself `fault` at its `at`-th os.replace, before the rename."""
    real, count = os.replace, [0]

    def replace(src, dst, *args, **kwargs):
        count[0] += 1
        if count[0] == at:
            os.kill(os.getpid(), fault)
        return real(src, dst, *args, **kwargs)

    os.replace = replace


def spawn_job(model_dir, cwd: Path, fault: signal.Signals | None = None, at: int = 0) -> subprocess.Popen:
    """A fresh interpreter running the main job in cwd (output to <cwd>.log), optionally failing at
    its `at`-th rename. Not a fork of pytest: a child forked from a process whose other threads
    (GPTQModel's workers, torch's pools) held locks hung in its first forward pass, in CI and here,
    once the slow tests had run earlier in the same session."""
    env = dict(os.environ, PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM="false")
    env["OMP_NUM_THREADS"] = str(torch.get_num_threads())  # the baseline's thread count: the same float sums
    if fault is not None:
        env.update(FAULT_SIGNAL=str(int(fault)), FAULT_AT=str(at))
    with open(job_log(cwd), "a") as log:
        return subprocess.Popen(
            [sys.executable, "-c", "from tests.test_faults import job_main; job_main()", *job_argv(model_dir)],
            cwd=cwd,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=interruptible,
        )


def job_log(cwd: Path) -> Path:
    """Where a child running in cwd writes its output."""
    return cwd.with_name(cwd.name + ".log")


def signal_at_first_measurement(job: subprocess.Popen, cwd: Path, sig: signal.Signals) -> int:
    """Send `sig` to the job once it has stored its first measurement (or after 120 s); its exit status."""
    deadline, store = time.monotonic() + 120, cwd / "runs" / "measurements"
    while job.poll() is None and time.monotonic() < deadline and not any(store.rglob("*.json")):
        time.sleep(0.01)
    job.send_signal(sig)
    return job.wait(60)


def numbers(obj):
    """A report without what a rerun may change: wall times and invocation counts."""
    if isinstance(obj, dict):
        return {k: numbers(v) for k, v in obj.items() if "seconds" not in k and "invocations" not in k}
    if isinstance(obj, list):
        return [numbers(v) for v in obj]
    return obj


def report_numbers(cwd: Path) -> dict:
    return numbers(json.loads((cwd / "runs" / "tiny" / "report.json").read_text()))


def leftovers(root: Path) -> list[Path]:
    """Temporaries of atomic writes under root."""
    return [p for p in root.rglob("*") if p.name.startswith(".") and (TMP_MARK in p.name or OLD_MARK in p.name)]


def tree(root: Path) -> dict:
    return {str(p.relative_to(root)): p.stat().st_size if p.is_file() else None for p in sorted(root.rglob("*"))}


def rerun(model_dir, cwd: Path, capsys) -> str:
    """The main job again in cwd, in this process; its stderr. It must succeed and leave no temporary."""
    os.chdir(cwd)
    capsys.readouterr()
    code = compare_refusal.main(job_argv(model_dir))
    err = capsys.readouterr().err
    assert code == 0, err
    assert "Traceback" not in err
    assert leftovers(cwd) == []
    return err


@pytest.fixture(scope="module")
def baseline(model_dir, tmp_path_factory):
    """An uninterrupted run: its directory, its report's numbers, and the targets of its atomic renames in order."""
    cwd = tmp_path_factory.mktemp("baseline")
    renames, real = [], os.replace

    def counting(src, dst, *args, **kwargs):
        renames.append(str(dst))
        return real(src, dst, *args, **kwargs)

    previous = os.getcwd()
    os.chdir(cwd)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(os, "replace", counting)
            assert compare_refusal.main(job_argv(model_dir)) == 0
    finally:
        os.chdir(previous)
    return cwd, report_numbers(cwd), renames


def spawn(run, cwd: Path, fault: signal.Signals | None = None, at: int = 0) -> int:
    """The pid of a forked child running `run()` in cwd (its output goes to <cwd>.log); with a
    fault, the child sends itself that signal at its `at`-th os.replace, before the rename. For
    runs that never touch torch (file writers); the main job runs in spawn_job's fresh interpreter."""
    log = job_log(cwd)
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        status = 70
        try:
            out = open(log, "a", buffering=1)
            os.dup2(out.fileno(), 1)
            os.dup2(out.fileno(), 2)
            sys.stdout = sys.stderr = out
            os.chdir(cwd)
            if fault is not None:
                fail_at_rename(fault, at)
            status = run()
        except SystemExit as e:
            status = e.code if isinstance(e.code, int) else 1
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(status)
    return pid


def exit_status(pid: int) -> int:
    """A child's exit status as a shell shows it (-9: killed by SIGKILL)."""
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def child_log(cwd: Path) -> str:
    log = job_log(cwd)
    return log.read_text()[-3000:] if log.is_file() else ""


def kill_point(renames: list[str], name: str) -> int:
    """The 1-based index of a named point among the baseline's atomic renames."""
    first = {
        "start": lambda r: r.endswith("invocations.json"),
        "config": lambda r: r.endswith("tiny/config.json"),
        "measurement": lambda r: "measurements/" in r,
        "selection": lambda r: r.endswith("selection/selection.json"),
        "checkpoint": lambda r: r.endswith("/model"),
        "quality": lambda r: "quality_" in r,
        "last-variant": lambda r: "magnitude-2-4/directions" in r,
        "report": lambda r: r.endswith("report.json"),
    }
    if name == "middle":
        return len(renames) // 2
    return 1 + next(i for i, r in enumerate(renames) if first[name](r))


# --- kill -9 and SIGTERM, then a rerun ----------------------------------------------------------


@pytest.mark.parametrize(
    "fault, point",
    [
        (signal.SIGKILL, "start"),
        (signal.SIGKILL, "measurement"),
        (signal.SIGKILL, "selection"),
        (signal.SIGKILL, "checkpoint"),
        (signal.SIGKILL, "middle"),
        (signal.SIGKILL, "quality"),
        (signal.SIGKILL, "report"),
        (signal.SIGTERM, "measurement"),
        (signal.SIGTERM, "checkpoint"),
        (signal.SIGTERM, "last-variant"),
        (signal.SIGTERM, "report"),
        (signal.SIGINT, "selection"),
    ],
)
def test_interrupted_run_resumes_to_the_same_report(fault, point, model_dir, baseline, tmp_path, capsys):
    _, expected, renames = baseline
    cwd = tmp_path / "work"
    cwd.mkdir()
    status = spawn_job(model_dir, cwd, fault, kill_point(renames, point)).wait()
    if fault == signal.SIGKILL:
        assert status == -signal.SIGKILL, child_log(cwd)
        assert leftovers(cwd), "killed between writing a temporary and renaming it"
    else:
        # SIGTERM and Ctrl-C unwind: exit 143 (130), no temporary left, the invocation's real time recorded.
        assert status == 128 + fault, child_log(cwd)
        assert leftovers(cwd) == []
        log = json.loads((cwd / "runs" / "tiny" / "invocations.json").read_text())
        assert log[-1]["finished"] is False and log[-1]["seconds"] > 0
    assert not (cwd / "runs" / "tiny" / "report.json").exists()
    err = rerun(model_dir, cwd, capsys)
    assert ("temporary file(s) left under" in err) == (fault == signal.SIGKILL)  # swept, with one warning line
    assert report_numbers(cwd) == expected


@pytest.mark.parametrize("fault", [signal.SIGKILL, signal.SIGTERM])
def test_a_real_process_signalled_from_outside_resumes(fault, model_dir, baseline, tmp_path, capsys):
    """`python` running the job, signalled by another process when its first measurement is stored."""
    cwd = tmp_path / "work"
    cwd.mkdir()
    code = signal_at_first_measurement(spawn_job(model_dir, cwd), cwd, fault)
    assert code in (-fault, 128 + fault), child_log(cwd)
    if fault == signal.SIGTERM:
        assert leftovers(cwd) == [], child_log(cwd)
    rerun(model_dir, cwd, capsys)
    assert report_numbers(cwd) == baseline[1]


def test_two_runs_on_one_run_directory(model_dir, baseline, tmp_path):
    cwd = tmp_path / "work"
    cwd.mkdir()
    jobs = [spawn_job(model_dir, cwd) for _ in range(2)]
    assert [job.wait() for job in jobs] == [0, 0], child_log(cwd)
    assert leftovers(cwd) == []
    assert report_numbers(cwd) == baseline[1]
    log = json.loads((cwd / "runs" / "tiny" / "invocations.json").read_text())
    assert len(log) == 2 and all(e["finished"] for e in log)


def test_concurrent_writers_of_one_directory_and_one_clock(tmp_path):
    """atomic_dir: every writer succeeds and the directory left is one writer's whole copy;
    RunClock: no invocation's entry is lost."""
    cwd = tmp_path / "work"
    cwd.mkdir()
    final = cwd / "artifact"

    def write_many():
        for _ in range(15):
            with atomic_dir(final) as tmp:
                for name in ("a", "b"):
                    (tmp / name).write_text(str(os.getpid()))
        return 0

    def tick_many():
        clock = RunClock(cwd / "invocations.json")
        for _ in range(10):
            clock.tick()
        clock.tick(finished=True)
        return 0

    for run in (write_many, tick_many):
        pids = [spawn(run, cwd) for _ in range(4)]
        assert [exit_status(pid) for pid in pids] == [0] * 4, child_log(cwd)
    assert sorted(p.name for p in final.iterdir()) == ["a", "b"] and len({(final / n).read_text() for n in "ab"}) == 1
    assert leftovers(cwd) == []
    log = json.loads((cwd / "invocations.json").read_text())
    assert len(log) == 4 and all(e["finished"] for e in log)


# --- damaged, truncated and swapped cache files ---------------------------------------------------


def _measurement(run: Path, index: int = 0) -> Path:
    return sorted((run / "measurements" / "generations-vanilla").glob("*.json"))[index]


def _garbage(path: Path) -> Path:
    path.write_bytes(b"\x00\xffnot what was written{")
    return path


def _truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _edit_result(path: Path) -> Path:
    """Valid JSON with one value of the result changed: only the content digest can tell."""
    stored = json.loads(path.read_text())

    def edit(node) -> bool:
        for key, value in node.items() if isinstance(node, dict) else enumerate(node):
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                node[key] = value + 1
                return True
            if isinstance(value, str):
                node[key] = value + " (edited)"
                return True
            if isinstance(value, (dict, list)) and edit(value):
                return True
        return False

    assert edit(stored["result"])
    path.write_text(json.dumps(stored))
    return path


def _swap(path: Path, other: Path) -> Path:
    shutil.copyfile(other, path)
    return path


def _scribble(path: Path) -> Path:
    """Finite garbage in the tensors: the lowest bit of every byte flipped in a block in the middle
    of the file (the data, past the header); a float32 stays finite."""
    data = bytearray(path.read_bytes())
    start, n = len(data) // 2, min(4096, len(data) // 8)
    data[start : start + n] = bytes(b ^ 1 for b in data[start : start + n])
    path.write_bytes(bytes(data))
    return path


def _edit_selection(path: Path) -> Path:
    stored = json.loads(path.read_text())
    stored["counts"]["edited"] = 1
    path.write_text(json.dumps(stored))
    return path


V = Path("tiny") / "variants"
DAMAGE = {
    "measurement-garbage": lambda r: _garbage(_measurement(r)),
    "measurement-truncated": lambda r: _truncate(_measurement(r)),
    "measurement-edited": lambda r: _edit_result(_measurement(r)),
    "measurement-swapped": lambda r: _swap(_measurement(r, 0), _measurement(r, 1)),
    "perplexity-garbage": lambda r: _garbage(sorted((r / "measurements" / "perplexity").glob("*.json"))[0]),
    "directions-truncated": lambda r: _truncate(r / V / "wanda-0.5" / "directions.safetensors"),
    "directions-garbage": lambda r: _garbage(r / V / "original" / "directions.safetensors"),
    "probes-scribbled": lambda r: _scribble(r / V / "wanda-0.5" / "probes.safetensors"),
    "quality-edited": lambda r: _edit_result(r / V / "wanda-0.5" / "quality_original_direction.json"),
    "selection-truncated": lambda r: _truncate(r / V / "original" / "selection" / "selection.json"),
    "selection-edited": lambda r: _edit_selection(r / V / "wanda-0.5" / "selection" / "selection.json"),
    "selection-tensors-swapped": lambda r: _swap(
        r / V / "wanda-0.5" / "selection" / "direction.safetensors",
        r / V / "magnitude-2-4" / "selection" / "direction.safetensors",
    ),
    "checkpoint-scribbled": lambda r: _scribble(r / V / "wanda-0.5" / "model" / "model.safetensors"),
    "checkpoint-swapped": lambda r: _swap(
        r / V / "wanda-0.5" / "model" / "model.safetensors", r / V / "magnitude-2-4" / "model" / "model.safetensors"
    ),
    "manifest-garbage": lambda r: _garbage(r / V / "magnitude-2-4" / "model" / "compression.json"),
    "invocations-garbage": lambda r: _garbage(r / "tiny" / "invocations.json"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_a_damaged_cache_file_is_recomputed_with_a_warning(case, model_dir, baseline, tmp_path, capsys):
    cwd = tmp_path / "work"
    shutil.copytree(baseline[0], cwd)
    damaged = DAMAGE[case](cwd / "runs")
    bad = damaged.read_bytes()
    err = rerun(model_dir, cwd, capsys)
    warnings = [line for line in err.splitlines() if line.startswith("warning: ")]
    # One line naming the file (the model directory for a checkpoint's weights).
    named = "/".join(damaged.parts[-3:-1]) if damaged.name == "model.safetensors" else damaged.name
    assert any(named in line for line in warnings), err[-3000:]
    assert report_numbers(cwd) == baseline[1]  # never reused: an edited number would show here
    if case != "invocations-garbage":
        assert damaged.read_bytes() != bad, "the damaged file was left in place"


# --- a full disk ---------------------------------------------------------------------------------


def test_a_full_disk_is_one_error_and_a_rerun_with_space_completes(model_dir, baseline, tmp_path, capsys):
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        os.chdir(mount)
        capsys.readouterr()
        assert compare_refusal.main(job_argv(model_dir)) == 2
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if "error" in line.lower()]
        assert len(errors) == 1 and errors[0].startswith("error: no space left on device"), err[-3000:]
        assert "Traceback" not in err and leftovers(mount) == []
        subprocess.run(["mount", "-o", "remount,size=64m", str(mount)], check=True)
        rerun(model_dir, mount, capsys)
        assert report_numbers(mount) == baseline[1]
    finally:
        os.chdir(tmp_path)
        subprocess.run(["umount", str(mount)], check=False)


# --- bad input: one `error:` line, exit 2, nothing written ----------------------------------------


def _inputs(root: Path) -> dict[str, str]:
    """Files the bad inputs name, made before the directory tree is recorded."""
    inputs = root / "inputs"
    inputs.mkdir()
    files = {
        "fitted.txt": "\n".join(datasets.instructions("harmful", "train")[:3]) + "\n",
        "type-str.json": json.dumps({"n_asr": "abc"}),
        "type-bool.json": json.dumps({"select": "no"}),
        "type-list.json": json.dumps({"variants": 5}),
        "type-float.json": json.dumps({"n_asr": 2.5}),
        "type-literal.yaml": "dtype: float64\n",
        "type-string-list.yaml": "eval_sets: advbench\n",
        "type-null.yaml": "n_train: null\n",
        "unknown.yaml": "n_asrr: 3\n",
        "not-mapping.json": "[1, 2]",
        "broken.yaml": "n_asr: [1, 2\n",
        "b-fractions.json": json.dumps({"fractions": "0.01"}),
        "d-n-test.json": json.dumps({"n_test": "x"}),
        "r-bool.json": json.dumps({"compressed": "c", "out": "o", "adv_suffix": "no"}),
        "r-nested.yaml": "compressed: c\nout: o\naird: 5\n",
        "empty.txt": "\n\n",
        "selection/selection.json": "{not json",
        "selection/direction.safetensors": "garbage",
    }
    for name, text in files.items():
        (inputs / name).parent.mkdir(parents=True, exist_ok=True)
        (inputs / name).write_text(text)
    return {**{name: str(inputs / name) for name in files}, "selection": str(inputs / "selection")}


C, B, D, R = "compare_refusal", "brittleness", "refusal_direction", "repair"
MAINS = {C: compare_refusal.main, B: brittleness.main, D: refusal_direction.main, R: repair_cli.main}
# (entry point, argv with {file} placeholders and {model} for the tiny model, a fragment of the error)
BAD_INPUTS = [
    (C, ["--n-asrr", "3"], "--n-asrr"),
    (C, ["--n-asr", "abc"], "abc"),
    (C, ["--n-asr"], "--n-asr"),
    (C, ["--dtype", "float64"], "float64"),
    (C, ["--config"], "--config"),
    (C, ["--variants", "wanda:2:0"], "0 < N < M"),
    (C, ["--variants", "magnitude:-1:-2"], "0 < N < M"),
    (C, ["--variants", "wanda:4:2"], "0 < N < M"),
    (C, ["--variants", "wanda:1.5"], "1.5"),
    (C, ["--variants", "foo:1"], "foo:1"),
    (C, ["--variants", "rtn:int4:g0"], "group size"),
    (C, ["--variants", "wanda:0.5", "wanda:0.5"], "duplicate"),
    (C, ["--variants", "wanda:3:5"], "does not divide"),  # checked against the loaded model's widths
    (C, ["--name", "../../x"], "plain directory name"),
    (C, ["--name", "a/b"], "plain directory name"),
    (C, ["--name", ".."], "plain directory name"),
    (C, ["--harmless-sets", "advbench"], "harmless sets"),
    (C, ["--eval-sets", "alpaca"], "harmful sets"),
    (C, ["--eval-sets", "nope"], "unknown evaluation set"),
    (C, ["--eval-sets", "file:{fitted.txt}"], "held out"),
    (C, ["--harmless-sets", "file:{empty.txt}"], "no prompts"),
    (C, ["--harmless-sets", "file:missing.txt"], "does not exist"),
    (C, ["--n-train", "0"], "n_train"),
    (C, ["--ppl-windows", "0"], "ppl_windows"),
    (C, ["--ppl-seqlen", "1"], "ppl_seqlen"),
    (C, ["--n-val", "0"], "n_val"),
    (C, ["--max-new-tokens", "0"], "max_new_tokens"),
    (C, ["--calib-samples", "0"], "calib_samples"),
    (C, ["--batch-size", "0"], "batch_size"),
    (C, ["--seed", "-1"], "seed"),
    (C, ["--repair-below", "2"], "repair_below"),
    (C, ["--repair-curve-fractions", "0"], "repair_curve_fractions"),
    (C, ["--n-refusal-probe", "-1"], "n_refusal_probe"),
    (C, ["--zero-shot-tasks", "nope"], "nope"),
    (C, ["--calib-source", "wikitext", "--ppl-windows", "100", "--ppl-seqlen", "2048"], "overlap"),
    (C, ["--model", "models/x"], "not found"),
    (C, ["--model", "./nope"], "not found"),
    (C, ["--model", "/nonexistent/model"], "not found"),
    (C, ["--model", "{fitted.txt}"], "not a model directory"),
    (C, ["--config", "{type-str.json}"], "n_asr = 'abc' is not an integer"),
    (C, ["--config", "{type-bool.json}"], "select = 'no' is not true or false"),
    (C, ["--config", "{type-list.json}"], "variants = 5"),
    (C, ["--config", "{type-float.json}"], "n_asr = 2.5"),
    (C, ["--config", "{type-literal.yaml}"], "dtype = 'float64'"),
    (C, ["--config", "{type-string-list.yaml}"], "eval_sets = 'advbench' is not a list of strings"),
    (C, ["--config", "{type-null.yaml}"], "n_train = None"),
    (C, ["--config", "{unknown.yaml}"], "unknown setting"),
    (C, ["--config", "{not-mapping.json}"], "mapping"),
    (C, ["--config", "{broken.yaml}"], "cannot read config file"),
    (C, ["--config", "missing.yaml"], "not found"),
    (B, ["--methods", "nope"], "unknown method"),
    (B, ["--fractions", "0"], "fractions"),
    (B, ["--fractions", "1.5"], "1.5"),
    (B, ["--ranks", "0"], "ranks"),
    (B, ["--setdiff-p", "2"], "setdiff_p"),
    (B, ["--name", "../x"], "plain directory name"),
    (B, ["--harmless-sets", "harmbench"], "harmless sets"),
    (B, ["--n-asr", "0"], "positive"),
    (B, ["--threads", "0"], "threads"),
    (B, ["--methods", "random", "--fractionz", "0.1"], "--fractionz"),
    (B, ["--config", "{b-fractions.json}"], "fractions = '0.01'"),
    (B, ["--model", "models/x"], "not found"),
    (D, ["--n-test", "0"], "n_test"),
    (D, ["--n-train", "0"], "n_train"),
    (D, ["--name", "a/b"], "plain directory name"),
    (D, ["--harmless-sets", "advbench"], "harmless sets"),
    (D, ["--eval-sets", "file:{fitted.txt}"], "held out"),
    (D, ["--selection-dir", "missing"], "not found"),
    (D, ["--selection-dir", "{selection}"], "cannot read the direction selection"),
    (D, ["--prescreen-n-val", "-1"], "prescreen_n_val"),
    (D, ["--n-tset", "3"], "--n-tset"),
    (D, ["--config", "{d-n-test.json}"], "n_test = 'x'"),
    (D, ["--model", "~/no-such-model"], "not found"),
    (R, ["--compressed", "c"], "--out is required"),
    (R, ["--compressed", "./missing", "--out", "o"], "not found"),
    (R, ["--original", "models/x", "--compressed", "{model}", "--out", "o"], "not found"),
    (R, ["--compressed", "{model}", "--out", "o", "--harmless-sets", "advbench"], "harmless sets"),
    (R, ["--compressed", "{model}", "--out", "{fitted.txt}"], "not a directory"),
    (R, ["--compressed", "{model}", "--out", "o", "--curve-fractions", "0"], "curve fractions"),
    (R, ["--compressed", "{model}", "--out", "o", "--n-asr", "0"], "n_asr"),
    (R, ["--compressed", "{model}", "--out", "o", "--kl-maxx", "1"], "--kl-maxx"),
    (R, ["--config", "{r-bool.json}"], "adv_suffix = 'no'"),
    (R, ["--config", "{r-nested.yaml}"], "aird = 5"),
]


@pytest.mark.parametrize("entry, argv, fragment", BAD_INPUTS, ids=[f"{e}:{' '.join(a)}" for e, a, _ in BAD_INPUTS])
def test_bad_input_is_one_error_line_exit_2_and_nothing_written(
    entry, argv, fragment, model_dir, tmp_path, monkeypatch, capsys
):
    files = {**_inputs(tmp_path), "model": str(model_dir)}
    monkeypatch.chdir(tmp_path)
    for name, path in files.items():
        argv = [a.replace("{" + name + "}", path) for a in argv]
    model_flag = "--original" if entry == R else "--model"
    if model_flag not in argv:  # never the embedded model: a check that failed to fire would load it
        argv = [*argv, model_flag, str(model_dir)]
    before = tree(tmp_path)
    capsys.readouterr()
    code = MAINS[entry]([*argv, "--runs-dir", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert code == 2, err[-3000:]
    assert len(errors) == 1 and errors[0].startswith("error: ") and fragment in errors[0], err[-3000:]
    assert "Traceback" not in err and "warning:" not in err
    if "--ppl-windows" in argv:
        assert "too short" not in errors[0]  # the count is wrong, not the text
    assert tree(tmp_path) == before


def test_bad_inputs_cover_every_entry_point():
    assert len(BAD_INPUTS) >= 40 and {e for e, _, _ in BAD_INPUTS} == set(MAINS)


def test_repair_keeps_its_measurements_under_its_runs_dir(tmp_path):
    common = ["--compressed", "c", "--out", "o"]
    assert repair_cli.parse_args(common).measurements_dir == "runs/measurements"  # the main job's store, shared
    assert repair_cli.parse_args([*common, "--runs-dir", str(tmp_path)]).measurements_dir == str(
        tmp_path / "measurements"
    )
    assert (
        repair_cli.parse_args([*common, "--runs-dir", str(tmp_path), "--measurements-dir", "m"]).measurements_dir == "m"
    )
