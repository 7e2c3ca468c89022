"""What a person waiting on the main job sees, on tiny random models: one line per stage with the
job's ETA, one line and exit 130 / 143 when it is stopped, what a rerun reuses, a report rewritten
after each model and marked partial, and a report page that leads with its key findings."""

from __future__ import annotations

import io
import re
import signal

import pytest

from experiments import compare_refusal
from experiments.compare_refusal.comparison import Comparison
from lm.progress import JobProgress
from tests.test_faults import PERMISSIVE, job_argv, job_log, leftovers, signal_at_first_measurement, spawn_job
from tests.tiny import build_model, build_tokenizer, save_tiny

STOPPED = re.compile(r"stopped; rerun the same command to continue: (\d+) of (\d+) stages done")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tokenizer = build_tokenizer("chatml")
    return save_tiny(
        tmp_path_factory.mktemp("progress-model"),
        build_model("qwen2", tokenizer, seed=0, hidden=64, layers=2),
        tokenizer,
    )


@pytest.fixture
def permissive(monkeypatch):
    monkeypatch.setattr(Comparison, "selection_config", lambda self: PERMISSIVE)


def test_the_eta_sums_measured_stage_times_and_says_when_it_is_a_lower_bound(monkeypatch):
    now = [0.0]
    monkeypatch.setattr("lm.progress.time.perf_counter", lambda: now[0])
    out = io.StringIO()
    plan = [("a", "ASR"), ("a", "probe"), ("b", "ASR"), ("b", "probe"), ("b", "extra")]
    progress = JobProgress("job", plan, ["a", "b"], stream=out)
    assert progress.eta(0) == "job ETA: after the first stages are timed"
    with progress.stage("a", "ASR"):
        now[0] += 10
    with progress.stage("a", "probe"):
        now[0] += 4
    # 10 s per ASR and 4 s per probe measured; "extra" not timed yet, so a lower bound.
    assert progress.eta(2) == "job ETA > 0:00:14 (1 kind(s) of stage not timed yet)"
    with progress.stage("b", "ASR"):
        progress.reused("runs/measurements/generations-vanilla/abc.json")  # a cached stage is no measurement
    with progress.stage("b", "probe"):
        progress.reused("runs/x/probes.safetensors")
        progress.computed("runs/x/refusal_probes.safetensors")  # one that also computed something is
        now[0] += 6
    assert progress.durations == {"ASR": [10.0], "probe": [4.0, 6.0]}
    progress.extend([("b", "ASR")])
    assert progress.eta(3) == "job ETA > 0:00:15 (1 kind(s) of stage not timed yet)"
    assert progress.eta(5) == "job ETA ~0:00:10"
    lines = out.getvalue().splitlines()
    assert (
        lines[0]
        == "[job] model 1 of 2 (a) · ASR · stage 1 of 5 · 0:00:00 elapsed · job ETA: after the first stages are timed"
    )
    assert (
        lines[1]
        == "[job] model 1 of 2 (a) · probe · stage 2 of 5 · 0:00:10 elapsed · job ETA > 0:00:10 (2 kind(s) of stage not timed yet)"
    )
    assert lines[-3] == "[job]   reused 1 cached result(s) (measurement generations-vanilla)"
    assert lines[-1] == "[job]   reused 1 cached result(s) (probes.safetensors)"
    assert progress.stopped_line() == "stopped; rerun the same command to continue: 4 of 6 stages done"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_stopped_job_says_how_far_it_got_and_its_rerun_what_it_reuses(
    sig, model_dir, tmp_path, monkeypatch, capsys, permissive
):
    code = signal_at_first_measurement(spawn_job(model_dir, tmp_path), tmp_path, sig)
    err = job_log(tmp_path).read_text()
    assert code == 128 + sig, err[-3000:]
    assert "Traceback" not in err and leftovers(tmp_path) == []
    done, total = map(int, STOPPED.fullmatch(err.strip().splitlines()[-1]).groups())
    assert done < total
    assert "model 1 of 3 (original) · ASR · stage 1 of" in err  # the stage line of the first stage

    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert compare_refusal.main(job_argv(model_dir)) == 0
    rerun = capsys.readouterr().err
    assert "reused 1 cached result(s) (measurement generations-vanilla)" in rerun  # the ASR the first run stored
    assert "model 3 of 3 (magnitude:2:4) · quality and ablation" in rerun


def test_the_report_is_rewritten_after_each_model_and_leads_with_its_findings(
    model_dir, tmp_path, monkeypatch, permissive
):
    monkeypatch.chdir(tmp_path)
    seen, real = [], Comparison.write_report

    def spy(self, report, results, partial):
        figs = real(self, report, results, partial)
        seen.append((partial, (self.dir / "report.md").read_text(), (self.dir / "report.json").exists()))
        return figs

    monkeypatch.setattr(Comparison, "write_report", spy)
    assert compare_refusal.main(job_argv(model_dir)) == 0
    assert [partial for partial, _, _ in seen] == [True, True, True, False]
    for i, (_, markdown, written) in enumerate(seen[:-1], start=1):
        assert (
            f"**Partial report: {i} of 3 models measured.**" in markdown and not written
        )  # report.json only at the end
    final = seen[-1][1]
    assert "Partial report" not in final and seen[-1][2]
    # The page a user opens: key findings, then the figures, then the tables and methods.
    html = (tmp_path / "runs" / "tiny" / "report.html").read_text()
    findings, figures, table = html.index("<h2>Key findings</h2>"), html.index("<h2>Figures</h2>"), html.index("<table")
    assert findings < figures < table < html.index("<h2>How these numbers were measured</h2>")
    assert html.index('class="plotly-graph-div"') < table
    assert (
        "Quick size" in html[findings:figures]
        and "Attack success rate changed significantly in" in html[findings:figures]
    )
