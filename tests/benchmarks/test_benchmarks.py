"""`python -m benchmarks` end to end at the tiny size: every row, the table, RESULTS.md (no timing claims)."""

from __future__ import annotations

import json

import pytest

from benchmarks.__main__ import BEGIN, END, main
from benchmarks.measure import measure
from benchmarks.selection import candidate_layers
from benchmarks.settings import Settings, settings_for
from benchmarks.suite import GROUPS
from lm.errors import UserError
from lm.generation import vllm_available
from tests.tiny import build_pair, save_tiny

EXISTING = "# Benchmark results\n\nIntro paragraph.\n\n## Older hand-written section\n\nkept as is\n"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    model, tokenizer = build_pair("qwen2", seed=1)
    return save_tiny(tmp_path_factory.mktemp("bench") / "tiny-qwen2", model, tokenizer)


def test_tiny_run_prints_every_row_and_updates_results(tiny_dir, tmp_path, capsys):
    results, raw = tmp_path / "RESULTS.md", tmp_path / "rows.json"
    results.write_text(EXISTING)
    argv = ["--size", "tiny", "--model", str(tiny_dir), "--threads", "1", "--results", str(results), "--json", str(raw)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    rows = json.loads(raw.read_text())["rows"]
    assert {r["group"] for r in rows} == set(GROUPS)
    by_group = {g: [r for r in rows if r["group"] == g] for g in GROUPS}
    # Two vLLM rows more where vllm is installed and can serve the tiny model (not in CI).
    assert len(by_group["generation"]) in ((2, 4) if vllm_available() else (2,))
    assert len(by_group["direction"]) == 2 and len(by_group["pruning"]) == 4
    for r in rows:
        assert r["fast_s"] > 0 and r["fast_mib"] is not None and r["fast_mib"] >= 0
        assert r["comparison"] in printed
    for r in by_group["generation"]:
        assert r["check"] == "100% same text"  # greedy, batched or not: the same completions
    (snip,) = by_group["snip"]
    assert snip["check"].startswith("max rel. diff") and float(snip["check"].split()[-1]) < 1e-4
    acts, fit = by_group["probes"]
    assert (
        acts["baseline_s"] is None
        and fit["check"].startswith("held-out accuracy at (-1, ")
        and "forward passes' time" in fit["note"]
    )
    for r in by_group["direction"] + by_group["selection"]:
        assert float(r["check"].split()[-1]) < 1e-3, r
    text = results.read_text()
    assert (
        text.startswith("# Benchmark results\n\nIntro paragraph.\n")
        and "## Older hand-written section\n\nkept as is" in text
    )
    assert text.index(BEGIN) < text.index("## Older hand-written section")
    assert "| comparison |" in text and "Machine:" in text

    # A second run replaces the generated section instead of adding another one.
    assert main(argv + ["--only", "snip"]) == 0
    again = results.read_text()
    assert again.count(BEGIN) == again.count(END) == 1 and "direction extraction" not in again
    assert "## Older hand-written section\n\nkept as is" in again


def test_bad_model_fails_before_any_work(tmp_path, capsys):
    results = tmp_path / "RESULTS.md"
    assert main(["--size", "tiny", "--model", str(tmp_path / "missing"), "--results", str(results)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert not results.exists()


def test_settings_and_presets():
    assert settings_for("default") == Settings()
    assert settings_for("full").gen_new_tokens == 256
    assert settings_for("default", gen_prompts=5, snip_samples=None).gen_prompts == 5
    with pytest.raises(UserError):
        settings_for("huge")
    with pytest.raises(UserError):
        Settings(gen_prompts=0)


def test_candidate_layers_skip_layer_zero():
    assert (
        candidate_layers(24, 12)[0] == 1 and candidate_layers(24, 12)[-1] == 23 and len(candidate_layers(24, 12)) == 12
    )
    assert candidate_layers(4, 10) == [1, 2, 3]


def test_measure_sees_an_allocation():
    import torch

    m = measure(lambda: torch.ones(64 << 20, dtype=torch.uint8).sum())  # 64 MiB, touched
    assert m.peak_exact and m.peak_mib >= 60 and int(m.result) == 64 << 20


@pytest.mark.slow
def test_benchmarks_on_the_embedded_model(tmp_path):
    raw = tmp_path / "rows.json"
    argv = [
        "--size",
        "tiny",
        "--only",
        "generation",
        "direction",
        "selection",
        "--snip-samples",
        "1",
        "--no-write",
        "--json",
        str(raw),
    ]
    assert main(argv) == 0
    rows = json.loads(raw.read_text())["rows"]
    assert {r["group"] for r in rows} == {"generation", "direction", "selection"}
    for r in rows:
        if r["group"] == "direction":
            assert float(r["check"].split()[-1]) < 1e-4


@pytest.mark.slow  # minutes: it makes llm-compressor's own environment on first use (pip), then compresses 9 times
def test_the_toolkits_compressors_against_the_maintained_ones_on_a_tiny_model(tmp_path, capsys):
    from benchmarks import maintained
    from tests.tiny import build_model, build_tokenizer, template_for

    tokenizer = build_tokenizer(template_for("qwen2"))
    tiny = save_tiny(
        tmp_path / "tiny", build_model("qwen2", tokenizer, seed=3, hidden=128, layers=2), tokenizer
    )  # group 128 must divide the widths
    results = tmp_path / "RESULTS.md"
    results.write_text(EXISTING)
    argv = [
        "--model",
        str(tiny),
        "--calibration-samples",
        "8",
        "--n-per-set",
        "2",
        "--max-new-tokens",
        "4",
        "--ppl-windows",
        "3",
        "--run-dir",
        str(tmp_path / "run"),
        "--measurements-dir",
        str(tmp_path / "measurements"),
        "--results",
        str(results),
    ]
    assert maintained.main(argv) == 0
    rows = json.loads((tmp_path / "run" / "maintained.json").read_text())["rows"]
    assert [(r["row"], r["implementation"]) for r in rows] == [
        (row, impl.name) for row, impls in maintained.ROWS.values() for impl in impls
    ]
    for r in rows:
        pruned = not r["row"].startswith("GPTQ")
        assert (
            r["sparsity"] > 0.49
        ) == pruned  # llm-compressor's pruners really prune (targets="Linear" made them prune nothing)
        if r["implementation"] != "toolkit":
            # Same algorithm, same tokens, same windows. Wanda has no freedom: the same weights go.
            # SparseGPT and GPTQ differ in float order and, for GPTQModel, precision (float16);
            # a random model's perplexity is touchy (quantizing it moved its perplexity by 7% one way
            # for the toolkit and 8% the other way for GPTQModel), so GPTQ gets a wide band: it
            # still catches a wrong group size or scale, which multiply the perplexity.
            ratio = r["ppl_vs_toolkit"]["ratio"]
            band = {"Wanda 50%": 1e-3, "SparseGPT 50%": 0.05, "SparseGPT 2:4": 0.05}.get(r["row"], 0.3)
            assert abs(ratio - 1) < band, r
            assert r["asr_vs_toolkit"]["test"] == "mcnemar-exact" and "p_holm" in r["asr_vs_toolkit"]
    # Every maintained checkpoint passed the derivation check (a pruned LM head would have stopped the run).
    assert len(list((tmp_path / "run" / "models").glob("*/benchmark_fingerprint.json"))) == 5
    text = results.read_text()
    assert maintained.BEGIN in text and "Older hand-written section" in text and text.count("| SparseGPT 2:4 |") == 2
    # A rerun reuses every checkpoint and measurement; --libraries leaves a library's rows out.
    stamps = {p: p.stat().st_mtime for p in (tmp_path / "run").rglob("*.json")}
    assert maintained.main(argv + ["--no-write", "--rows", "gptq", "--libraries", "llmcompressor"]) == 0
    assert all(p.stat().st_mtime == t for p, t in stamps.items() if p.name != "maintained.json")
    rows = json.loads((tmp_path / "run" / "maintained.json").read_text())["rows"]
    assert [r["implementation"] for r in rows] == ["toolkit", "llm-compressor 0.14"]

    # The precision study on these checkpoints: given llm-compressor's block 0, the toolkit's
    # SparseGPT picks llm-compressor's block-1 masks (a different algorithm would not).
    from benchmarks import sparsegpt_precision

    capsys.readouterr()
    assert (
        sparsegpt_precision.main(
            [
                "--model",
                str(tiny),
                "--maintained",
                str(tmp_path / "run" / "models" / "llmcompressor-sparsegpt-2-4"),
                "--calibration-samples",
                "8",
                "--ppl-windows",
                "3",
                "--measurements-dir",
                str(tmp_path / "measurements"),
                "--results",
                str(results),
            ]
        )
        == 0
    )
    table = capsys.readouterr().out
    agreements = [
        float(line.split("|")[3].strip().rstrip("%"))
        for line in table.splitlines()
        if "on llm-compressor's block 0" in line
    ]
    assert len(agreements) == 7 and min(agreements) >= 99.0, table
    assert "toolkit float32 / toolkit float64" in table and sparsegpt_precision.BEGIN in results.read_text()
