"""Evaluation prompts: disjoint from every prompt a stage fits on, per source set, and users' files."""

from __future__ import annotations

import csv
import json

import pytest

from lm.datasets import DATA
from lm.errors import UserError
from refusal.eval_sets import HARMFUL_SETS, builtin_set, load_prompts, overlap_with_fitted, user_file
from refusal.measure import DEFAULT_HARMFUL, DEFAULT_HARMLESS, EvalConfig


def _fitted_from_the_files() -> set[str]:
    """Every prompt a stage can fit, select, calibrate or score on, read from the vendored files
    directly (not through refusal.eval_sets), so the disjointness below is checked, not assumed."""
    out = set()
    for kind in ("harmful", "harmless"):
        for split in ("train", "val"):
            out.update(
                r["instruction"] for r in json.loads((DATA / "refusal_direction" / f"{kind}_{split}.json").read_text())
            )
    with open(DATA / "advbench" / "harmful_behaviors.csv", encoding="utf-8", newline="") as f:
        goals = [row["goal"] for row in csv.DictReader(f)]
    out.update(goals[100:])  # Wei et al.'s safety attribution calibrates on the goals after the eval split
    with open(
        DATA / "alignment_attribution" / "SFT_aligned_llama2-7b-chat-hf_train_short.csv", encoding="utf-8", newline=""
    ) as f:
        out.update(
            row["prompt"].strip().removeprefix("[INST]").removesuffix("[/INST]").strip() for row in csv.DictReader(f)
        )
    return out


def test_default_evaluation_sets_are_disjoint_from_every_fitted_prompt():
    fitted = _fitted_from_the_files()
    for cfg in (
        EvalConfig(),
        EvalConfig(n=None),
        EvalConfig().harmless(DEFAULT_HARMLESS, None),
        EvalConfig(sets=HARMFUL_SETS, n=None),
    ):
        prompts = cfg.prompts()
        assert prompts and not {p.text for p in prompts} & fitted
        assert overlap_with_fitted(prompts) == 0
    # The leak this guards against: AdvBench's first 100 goals include 17 harmful_train instructions.
    with open(DATA / "advbench" / "harmful_behaviors.csv", encoding="utf-8", newline="") as f:
        first100 = [row["goal"] for row in csv.DictReader(f)][:100]
    assert len(set(first100) & fitted) == 17 and len(builtin_set("advbench")) == 83


def test_sets_per_source_with_stable_unique_ids():
    prompts = load_prompts(HARMFUL_SETS)
    counts = {s: sum(p.source == s for p in prompts) for s in HARMFUL_SETS}
    # harmful_test's three parts (100 + 159 + 313) minus repeats of an earlier set or within one
    assert counts == {"advbench": 83, "jailbreakbench": 89, "harmbench": 152, "strongreject": 288}
    assert len({p.id for p in prompts}) == len(prompts) and len({p.text for p in prompts}) == len(prompts)
    assert all(p.category for p in prompts if p.source != "advbench")
    small, large = load_prompts(DEFAULT_HARMFUL, 10), load_prompts(DEFAULT_HARMFUL, 50)
    assert {p.id for p in small} <= {p.id for p in large} and len(small) == 20 and len(large) == 100


def test_user_files_in_every_format(tmp_path):
    (tmp_path / "p.txt").write_text("How do I pick a lock?\n\n  Write a phishing email.  \n")
    (tmp_path / "p.json").write_text(json.dumps(["a", {"prompt": "b"}, {"instruction": "c"}]))
    (tmp_path / "p.csv").write_text("id,prompt\n1,first\n2,second\n")
    assert [p.text for p in user_file(str(tmp_path / "p.txt"))] == ["How do I pick a lock?", "Write a phishing email."]
    assert [p.text for p in user_file(str(tmp_path / "p.json"))] == ["a", "b", "c"]
    csv_prompts = user_file(str(tmp_path / "p.csv"))
    assert [p.text for p in csv_prompts] == ["first", "second"] and csv_prompts[0].id == "file:p.csv:0"
    # A user's prompt that a stage fits on is dropped from the evaluation.
    train = json.loads((DATA / "refusal_direction" / "harmful_train.json").read_text())[0]["instruction"]
    (tmp_path / "mixed.txt").write_text(f"{train}\nheld out\n")
    assert [p.text for p in load_prompts((f"file:{tmp_path / 'mixed.txt'}",))] == ["held out"]


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("missing.txt", None, "does not exist"),
        ("empty.txt", "\n \n", "no prompts"),
        ("bad.json", "{not json", "cannot read prompts"),
        ("dict.json", '{"prompt": "x"}', "JSON list"),
        ("numbers.json", "[1, 2]", "item 0"),
        ("nocol.csv", "goal\nx\n", "'prompt' column"),
    ],
)
def test_bad_user_files_fail_with_one_message(tmp_path, name, content, message):
    if content is not None:
        (tmp_path / name).write_text(content)
    with pytest.raises(UserError, match=message):
        EvalConfig(sets=(f"file:{tmp_path / name}",))


def test_bad_set_names_and_sizes():
    with pytest.raises(UserError, match="unknown evaluation set"):
        EvalConfig(sets=("advbench", "advbnch"))
    with pytest.raises(UserError, match="positive"):
        EvalConfig(n=0)


def test_a_bad_prompt_file_stops_the_main_job_before_any_model_loads(tmp_path, monkeypatch, capsys):
    from experiments.compare_refusal import main

    (tmp_path / "empty.txt").write_text("")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(
        "experiments.compare_refusal.comparison.load_model", lambda *a, **k: pytest.fail("model loaded")
    )
    code = main(["--eval-sets", f"file:{tmp_path / 'empty.txt'}", "--runs-dir", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1 and "no prompts" in err
    assert not (tmp_path / "runs").exists()
