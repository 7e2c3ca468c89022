"""--judges on every entry point that measures (the main job, python -m repair,
experiments.brittleness, experiments.refusal_direction), on tiny random models and tiny judges:
bad judges are one error line before anything loads or is written; a judge added to a finished run
judges the stored completions and generates nothing; reports carry per-judge rates, tests and
agreement."""

from __future__ import annotations

import json

import pytest

import refusal.measure as measure_module
from compression.calibration import CalibrationConfig, calibration_set
from compression.checkpoint import save_variant
from compression.variants import build_variant, parse_variant
from experiments.compare_refusal import CompareConfig, Comparison
from tests.judge_models import causal_judge, classifier_judge
from tests.tiny import build_model, build_tokenizer, save_tiny


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("judged-runs")
    tokenizer = build_tokenizer("chatml")
    original = build_model("qwen2", tokenizer, seed=0, hidden=128, layers=4)
    save_tiny(root / "original", original, tokenizer)
    pruned = build_variant(
        original, parse_variant("wanda:0.5"), calibration_set(tokenizer, CalibrationConfig(n_samples=8, seed=0))
    )
    save_variant(pruned, tokenizer, root / "pruned", dict(method="wanda", params={"sparsity": 0.5}))
    causal_judge(root / "harmbench")
    classifier_judge(root / "rejection", "roberta", {0: "NORMAL", 1: "REJECTION"}, refusal_probability=0.9)
    return root


def judges(root) -> list[str]:
    return [f"harmbench:{root / 'harmbench'}", f"refusal-classifier:{root / 'rejection'}"]


def entry_argv(which: str, root, tmp_path) -> tuple:
    if which == "compare":
        from experiments.compare_refusal import main

        return main, ["--model", str(root / "original"), "--runs-dir", str(tmp_path / "runs"), "--quick"]
    if which == "repair":
        from repair.__main__ import main

        return main, [
            "--original",
            str(root / "original"),
            "--compressed",
            str(root / "pruned"),
            "--out",
            str(tmp_path / "out"),
            "--runs-dir",
            str(tmp_path / "runs"),
        ]
    if which == "brittleness":
        from experiments.brittleness import main

        return main, ["--model", str(root / "original"), "--runs-dir", str(tmp_path / "runs")]
    from experiments.refusal_direction import main

    return main, ["--model", str(root / "original"), "--runs-dir", str(tmp_path / "runs")]


@pytest.mark.parametrize("which", ["compare", "repair", "brittleness", "direction"])
@pytest.mark.parametrize(
    "judge, fragment",
    [
        ("harmbench:{root}/rejection", "not a causal LM"),
        ("minos:{root}/harmbench", "not a sequence classifier"),
        ("wildguard:{root}/nowhere", "directory not found"),
        ("gpt-4", "unknown judge"),
    ],
)
def test_a_bad_judge_is_one_error_line_before_anything(dirs, tmp_path, monkeypatch, capsys, which, judge, fragment):
    import lm.loading

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(lm.loading, "load_model", lambda *a, **k: pytest.fail("a model loaded"))
    main, argv = entry_argv(which, dirs, tmp_path)
    code = main([*argv, "--judges", judge.format(root=dirs)])
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], err
    assert list(tmp_path.iterdir()) == []


def tiny_config(root, runs, **overrides) -> CompareConfig:
    return CompareConfig.quick(
        **{
            **dict(
                model=str(root / "original"),
                runs_dir=str(runs),
                name="tiny",
                variants=("wanda:0.5",),
                n_asr=3,
                n_harmless=3,
                max_new_tokens=4,
                n_train=4,
                n_val=4,
                prescreen_keep=4,
                select=False,
                probes=False,
                ppl_windows=1,
                ppl_seqlen=16,
                calib_samples=4,
                zero_shot_limit=0,
                repair=False,
            ),
            **overrides,
        }
    )


def test_main_job_judges_a_finished_run_without_generating(dirs, tmp_path, monkeypatch):
    plain = Comparison(tiny_config(dirs, tmp_path)).run()
    run = tmp_path / "tiny"
    markdown = (run / "report.md").read_text()
    assert "judges" not in plain and "## Judges" not in markdown
    assert all(set(v["rates"]["asr"]) == {"wei2024", "arditi2024"} for v in plain["variants"])

    monkeypatch.setattr(
        measure_module, "attack_success", lambda *a, **k: pytest.fail("generated with an evaluated model")
    )
    report = Comparison(tiny_config(dirs, tmp_path, judges=tuple(judges(dirs)))).run()
    hb, rc = judges(dirs)
    section = report["judges"]
    assert [j["name"] for j in section["judges"]] == ["wei2024", "arditi2024", hb, rc]
    by_name = {j["name"]: j for j in section["judges"]}
    assert by_name[hb]["verdicts"] == ["harmful compliance"] and by_name[rc]["verdicts"] == ["refusal"]
    assert len(by_name[hb]["identity"]["weights"]) == 64 and by_name[hb]["needs_tokens"] == 512
    assert "512" in by_name[hb]["length_warning"] and by_name[rc]["length_warning"] is None
    assert set(section["rates"]) == {"original", "wanda:0.5"}
    assert set(section["rates"]["original"]["asr"]) == {"wei2024", "arditi2024", hb}
    assert section["rates"]["wanda:0.5"]["over_refusal"][rc]["value"] == 1.0  # p(REJECTION) = 0.9 on every reply
    test = section["tests"]["asr"][hb][0]
    assert (test["first"], test["second"], test["test"], test["family_size"]) == (
        "wanda:0.5",
        "original",
        "mcnemar-exact",
        1,
    )
    pairs = {(p["first"], p["second"]) for p in section["agreement"]["asr"]}
    assert pairs == {("wei2024", "arditi2024"), ("wei2024", hb), ("arditi2024", hb)}
    for p in section["agreement"]["asr"]:
        assert p["n"] == 12 and p["clusters"] == 6 and len(p["disagreeing_ids"]) == p["disagreements"]
    assert isinstance(section["significance_disagreements"], list)
    text = (run / "report.md").read_text()
    assert "## Judges" in text and f"| p {hb} |" in text and "**Too short:**" in text
    # The keyword judges' numbers are what they were.
    for before, after in zip(plain["variants"], report["variants"]):
        assert {j: after["rates"]["asr"][j] for j in ("wei2024", "arditi2024")} == before["rates"]["asr"]
        assert after["tests"] == before["tests"]


# The repair at its smallest (as tests/test_repair.py runs it, without the targeted baseline and the curve).
SMALL_REPAIR = [
    "--n-asr",
    "3",
    "--n-harmless",
    "3",
    "--n-refusal-probe",
    "8",
    "--max-new-tokens",
    "6",
    "--n-train",
    "8",
    "--n-val",
    "4",
    "--ppl-windows",
    "2",
    "--zero-shot-limit",
    "0",
    "--no-adv-suffix",
    "--source",
    "-1",
    "3",
    "--save",
    "aird",
    "--anchored.n-harmful",
    "4",
    "--anchored.n-harmless",
    "4",
    "--anchored.val-harmful",
    "4",
    "--anchored.val-harmless",
    "4",
    "--anchored.reply-tokens",
    "4",
    "--anchored.val-tokens",
    "4",
    "--anchored.max-steps",
    "2",
    "--anchored.step",
    "0.05",
    "--static-fractions",
    "0.1",
    "--static-samples",
    "8",
]


def test_repair_reports_every_judge(dirs, tmp_path, monkeypatch, capsys):
    from repair.__main__ import main

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    code = main(
        [
            "--original",
            str(dirs / "original"),
            "--compressed",
            str(dirs / "pruned"),
            "--out",
            str(out),
            "--runs-dir",
            str(tmp_path / "runs"),
            *SMALL_REPAIR,
            "--judges",
            *judges(dirs),
        ]
    )
    assert code == 0, capsys.readouterr().err
    result = json.loads((out / "repair.json").read_text())
    hb, rc = judges(dirs)
    section = result["judges"]
    assert {"original", "compressed", "aird"} <= set(section["rates"])
    family = section["tests"]["asr"][hb]
    assert ("compressed", "original") in {(t["first"], t["second"]) for t in family}
    assert all(t["family_size"] == len(family) for t in family)
    assert section["tests"]["over_refusal"][rc] and "## Judges" in (out / "repair.md").read_text()
    assert set(result["states"]["original"]["rates"]["asr"]["vanilla"]) == {"wei2024", "arditi2024", hb}


def test_brittleness_reports_every_judge(dirs, tmp_path, monkeypatch):
    from experiments.brittleness import Brittleness, BrittlenessConfig

    cfg = BrittlenessConfig(
        model=str(dirs / "original"),
        runs_dir=str(tmp_path),
        name="b",
        methods=("random",),
        fractions=(0.05,),
        settings=("vanilla",),
        n_asr=2,
        n_harmless=2,
        max_new_tokens=4,
        ppl_windows=1,
        ppl_seqlen=16,
        zero_shot_tasks=("rte",),
        zero_shot_limit=2,
        calib_samples=3,
        judges=tuple(judges(dirs)),
    )
    report = Brittleness(cfg).run()
    hb, rc = judges(dirs)
    section = report["judges"]
    assert set(section["rates"]) == {"original", "random:0.05"}
    assert section["tests"]["asr"][hb][0]["first"] == "random:0.05" and section["tests"]["over_refusal"][rc]
    assert "## Judges" in (tmp_path / "b" / "report.md").read_text()


def test_refusal_direction_reports_every_judge(dirs, tmp_path, capsys):
    from experiments.refusal_direction import main
    from lm.loading import load_model
    from refusal.select import SelectionConfig
    from refusal.selection_artifacts import select_direction_cached

    loaded = load_model(str(dirs / "original"))
    permissive = SelectionConfig(
        n_train=4, n_val=3, kl_threshold=1e9, induce_threshold=-1e9, max_layer_fraction=1.0, batch_size=4, max_rows=12
    )
    select_direction_cached(loaded.model, loaded.tokenizer, tmp_path / "selection", permissive)
    code = main(
        [
            "--model",
            str(dirs / "original"),
            "--selection-dir",
            str(tmp_path / "selection"),
            "--runs-dir",
            str(tmp_path),
            "--name",
            "d",
            "--n-test",
            "3",
            "--n-harmless",
            "4",
            "--max-new-tokens",
            "3",
            "--judges",
            *judges(dirs),
        ]
    )
    assert code == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "d" / "report.json").read_text())
    hb, rc = judges(dirs)
    section = report["judges"]
    assert {(t["first"], t["second"]) for t in section["tests"]["asr"][hb]} == {
        ("harmful, direction ablated (hooks)", "baseline"),
        ("harmful, weights orthogonalized", "baseline"),
    }
    assert section["tests"]["over_refusal"][rc][0]["first"] == "harmless, direction added"
    assert "## Judges" in (tmp_path / "d" / "report.md").read_text()
