"""experiments.refusal_direction end to end on a tiny model, reusing a saved (permissive) selection."""

from __future__ import annotations

import json

import pytest

from experiments.refusal_direction import main
from refusal.select import SelectionConfig
from refusal.selection_artifacts import select_direction_cached
from tests.tiny import build_model, build_tokenizer, save_tiny


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tokenizer = build_tokenizer("chatml")
    model = build_model("qwen2", tokenizer, seed=0, hidden=64, layers=3)
    root = tmp_path_factory.mktemp("tiny-direction")
    model_dir = save_tiny(root / "model", model, tokenizer)
    permissive = SelectionConfig(
        n_train=4, n_val=3, kl_threshold=1e9, induce_threshold=-1e9, max_layer_fraction=1.0, batch_size=4, max_rows=12
    )
    select_direction_cached(model, tokenizer, root / "selection", permissive)
    return model_dir, root / "selection"


def test_refusal_direction_report(tiny, tmp_path, capsys):
    model_dir, selection = tiny
    code = main(
        [
            "--model",
            str(model_dir),
            "--selection-dir",
            str(selection),
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
        ]
    )
    assert code == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "d" / "report.json").read_text())
    assert set(report["rates"]) == {
        "harmful_baseline",
        "harmful_ablated",
        "harmless_baseline",
        "harmless_actadd",
        "harmful_orthogonalized",
    }
    for rates in report["rates"].values():
        assert set(rates) == {"wei2024", "arditi2024"}
        assert all(
            0 <= r["value"] <= 1 and r["ci95"][0] <= r["value"] <= r["ci95"][1] and r["method"] == "wilson"
            for r in rates.values()
        )
    for row in ("harmful_ablated", "harmful_orthogonalized", "harmless_actadd"):
        assert (
            report["tests"][row]["arditi2024"]["test"] == "mcnemar-exact"
            and report["tests"][row]["arditi2024"]["family_size"] == 3
        )
    assert report["evaluation"]["harmful"]["overlap_with_fitted"] == 0
    # Weight orthogonalization must reproduce hook ablation.
    assert report["max_abs_logit_diff_orthogonalized_vs_hooks"] < 1e-3
    assert (tmp_path / "d" / "orthogonalized" / "config.json").is_file()
    assert (tmp_path / "d" / "score_maps.html").is_file()
    assert "Refusal rate" in (tmp_path / "d" / "report.md").read_text()


def test_missing_selection_dir_is_a_clean_error(tiny, tmp_path, capsys):
    model_dir, _ = tiny
    code = main(
        ["--model", str(model_dir), "--selection-dir", str(tmp_path / "nope"), "--runs-dir", str(tmp_path / "runs")]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()
