"""The compare_refusal job: clean one-line failures, and a full tiny run that a rerun reuses."""

from __future__ import annotations

import dataclasses
import json

import pytest

import experiments.compare_refusal as compare
import experiments.compare_refusal.comparison as stages
from experiments.compare_refusal import CompareConfig, Comparison, main
from experiments.compare_refusal.key_findings import name as readable_name
from tests.tiny import build_model, build_tokenizer, save_tiny

VARIANTS = ("wanda:0.5", "rtn:int8", "wanda:2:4")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    # 128 wide (intermediate 256) so the default RTN group of 128 divides every linear input;
    # two layers because layer 0's direction is excluded from the report's minimum cosine.
    tokenizer = build_tokenizer("chatml")
    model = build_model("qwen2", tokenizer, seed=0, hidden=128, layers=2)
    return save_tiny(tmp_path_factory.mktemp("tiny-qwen2-128"), model, tokenizer)


def run_cli(argv, tmp_path, monkeypatch, capsys):
    # Relative default paths ("runs") would land in the working directory: pin it to tmp_path.
    monkeypatch.chdir(tmp_path)
    runs = tmp_path / "runs"
    code = main([*argv, "--runs-dir", str(runs), "--quick"])
    return code, capsys.readouterr().err, runs


def assert_clean_failure(code, err, runs, tmp_path, *fragments):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    for fragment in fragments:
        assert fragment in lines[0]
    assert not runs.exists()
    assert list(tmp_path.iterdir()) == [], "nothing may be created on a failed start"


def test_missing_model_path(tmp_path, monkeypatch, capsys):
    missing = tmp_path / "no-such-model"
    code, err, runs = run_cli(["--model", str(missing)], tmp_path, monkeypatch, capsys)
    assert_clean_failure(code, err, runs, tmp_path, "not found", str(missing))


@pytest.mark.parametrize("variant, fragment", [("wanda:1.5", "1.5"), ("foo:1", "foo:1"), ("rtn:int4:g0", "group size")])
def test_bad_variant_spec(tiny_dir, tmp_path, monkeypatch, capsys, variant, fragment):
    # A valid model, so the failure can only come from the spec, and before the model loads.
    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the variant specs were checked")

    monkeypatch.setattr(stages, "load_model", no_loading)
    code, err, runs = run_cli(
        ["--model", str(tiny_dir), "--variants", "wanda:0.5", variant], tmp_path, monkeypatch, capsys
    )
    assert_clean_failure(code, err, runs, tmp_path, fragment)


def test_directory_without_safetensors(tmp_path, monkeypatch, capsys):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    (model_dir / "pytorch_model.bin").write_bytes(b"not loaded: pickles are refused")
    monkeypatch.chdir(tmp_path)
    code = main(["--model", str(model_dir), "--runs-dir", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and "safetensors" in err
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_duplicate_variants(tiny_dir, tmp_path, monkeypatch, capsys):
    code, err, runs = run_cli(
        ["--model", str(tiny_dir), "--variants", "wanda:0.5", "wanda:0.5"], tmp_path, monkeypatch, capsys
    )
    assert_clean_failure(code, err, runs, tmp_path, "duplicate")


def tiny_config(model_dir, runs_dir) -> CompareConfig:
    # Zero-shot and the repair stage off: the tests that need them turn them on.
    return CompareConfig.quick(
        model=str(model_dir),
        runs_dir=str(runs_dir),
        name="tiny",
        variants=VARIANTS,
        n_asr=2,
        max_new_tokens=4,
        n_train=4,
        n_val=4,
        prescreen_keep=4,
        n_refusal_probe=16,
        ppl_windows=1,
        ppl_seqlen=16,
        calib_samples=4,
        zero_shot_limit=0,
        repair=False,
    )


def numbers(report: dict) -> dict:
    # Everything but wall-clock time must be reproduced by a rerun.
    return {k: v for k, v in report.items() if k not in ("wall_seconds", "invocations", "wall_seconds_all_invocations")}


def test_end_to_end_and_rerun_reuses_artifacts(tiny_dir, tmp_path, monkeypatch):
    cfg = tiny_config(tiny_dir, tmp_path / "runs")
    report = Comparison(cfg).run()
    run_dir = tmp_path / "runs" / "tiny"

    stored = json.loads((run_dir / "report.json").read_text())
    assert stored == json.loads(json.dumps(report))
    markdown = (run_dir / "report.md").read_text()
    assert [v["variant"] for v in stored["variants"]] == ["original", *VARIANTS]
    original_ppl = stored["variants"][0]["perplexity"]
    for row in stored["variants"]:
        assert set(row["asr"]) == {"wei2024", "arditi2024"}
        assert all(0.0 <= a <= 1.0 for a in row["asr"].values())
        assert row["n_prompts"] == 4  # 2 of each default evaluation set
        assert row["perplexity"] > 0
        for judge in ("wei2024", "arditi2024"):
            rate = row["rates"]["asr"][judge]
            assert (
                rate["n"] == 4
                and rate["value"] == row["asr"][judge]
                and rate["ci95"][0] <= rate["value"] <= rate["ci95"][1]
            )
            assert row["rates"]["over_refusal"][judge]["n"] == 8
            assert set(row["rates"]["per_source"]) == {"advbench", "jailbreakbench"}
        if row["variant"] != "original":
            test = row["tests"]["asr"]["arditi2024"]
            assert (
                test["test"] == "mcnemar-exact"
                and 0 <= test["p_value"] <= test["p_holm"] <= 1
                and test["family_size"] == len(VARIANTS)
            )
            ppl = row["tests"]["perplexity"]  # on the same windows as the original's
            assert ppl["test"] == "wilcoxon-signed-rank-exact" and ppl["family_size"] == len(VARIANTS)
            assert ppl["ratio"] == pytest.approx(row["perplexity"] / original_ppl, rel=1e-6)
            assert row["tests"]["zero_shot"] is None  # zero-shot is off here
        assert f"| {readable_name(row)} |" in markdown  # its readable name, the spec beside it
    sparsity = {v["variant"]: v["decoder_sparsity"] for v in stored["variants"]}
    assert sparsity["original"] == 0.0
    assert sparsity["wanda:0.5"] == 0.5 and sparsity["wanda:2:4"] == 0.5
    assert sparsity["rtn:int8"] < 0.1
    original = stored["variants"][0]
    assert original["cosine_at_original_peak"] == pytest.approx(1.0)
    assert stored["n_layers"] == 2
    assert (
        stored["evaluation"]["harmful"]["overlap_with_fitted"] == 0
        and stored["evaluation"]["harmless"]["overlap_with_fitted"] == 0
    )
    assert "overlap with any prompt a stage fits on: 0" in markdown and "| p |" in markdown
    # ASR, over-refusal, perplexity, probe transfer per variant; first, this random model's missing direction is said
    no_direction = [
        f for f in stored["findings"] if f.startswith("The original model has no selected refusal direction")
    ]
    selection_notes = [
        f for f in stored["findings"] if f.startswith(("The original model has no", "Why: ", "Direction selection: "))
    ]
    assert len(no_direction) == (original.get("source") is None) and len(stored["findings"]) == 4 * len(VARIANTS) + len(
        selection_notes
    )
    # Harmfulness probes: own accuracy on the 4 + 8 held-out prompts for every model; the
    # original's probes on each variant (transfer) with McNemar against the original, Holm over the variants.
    assert stored["probe_cell"]["layer"] in (0, 1)
    for row in stored["variants"]:
        p = row["probes"]
        assert p["own"]["n"] == 12 and p["own"]["method"] == "wilson" and len(p["own_per_layer"]) == 2
        if row["variant"] == "original":
            assert "transfer" not in p
        else:
            assert p["transfer"]["n"] == 12 and len(p["transfer_per_layer"]) == 2
            for name in ("own", "transfer"):
                t = p["tests"][name]
                assert t["test"] == "mcnemar-exact" and t["n"] == 12 and t["family_size"] == len(VARIANTS)
        assert len(p["own_map"]) == len(stored["positions"]) and all(len(r) == 2 for r in p["own_map"])
        assert (
            p["own_map"][stored["positions"].index(stored["probe_cell"]["position"])][stored["probe_cell"]["layer"]]
            == p["own"]
        )
    assert "## Harmfulness probes" in markdown and {"probe_transfer", "probe_accuracy_maps"} <= set(stored["figures"])
    # Refusal-prediction probes: labels from each model's own 16 training generations and its
    # 4 held-out ASR verdicts. A random tiny model never writes a refusal string, so no probe can be
    # fitted and the report says why; the flips against the original are still counted.
    for row in stored["variants"]:
        r = row["refusal_probes"]
        assert r["n_train"] == 16 and r["n_test"] == 4 and r["train_refused"]["n"] == 16
        assert r["fitted"] is False and "not fitted: the model refused 0 of 16" in r["reason"]
        if row["variant"] != "original":
            assert r["flips"]["refused_to_answered"] == 0 and r["flips"]["flagged_on_variant"] is None
    assert "## Refusal-prediction probes" in markdown and "refusal_probes" not in stored["figures"]
    for slug in ("wanda-0.5", "rtn-int8", "wanda-2-4"):
        vdir = run_dir / "variants" / slug
        assert (vdir / "model" / "compression.json").is_file()
        assert (vdir / "directions.safetensors").is_file(), slug
        assert (vdir / "probes.safetensors").is_file(), slug
        assert (vdir / "refusal_probes.safetensors").is_file(), slug
    # One harmful, one harmless and one refusal-probe training generation per model, one perplexity
    # each, in the shared store.
    store = tmp_path / "runs" / "measurements"
    ablated = sum(v.get("asr_original_direction_ablated") is not None for v in stored["variants"])
    assert len(list((store / "generations-vanilla").glob("*.json"))) == 3 * (1 + len(VARIANTS)) + ablated
    assert len(list((store / "perplexity").glob("*.json"))) == 1 + len(VARIANTS)

    # A rerun with the same settings must rebuild, regenerate and recompute nothing.
    def must_not_run(*args, **kwargs):
        raise AssertionError("stage recomputed although its artifact exists")

    # The prompt calibration is tokenized again (its digest decides whether a checkpoint is reused);
    # nothing is generated.
    import compression.builder
    import lm.perplexity
    import refusal.measure
    import refusal.probing

    monkeypatch.setattr(stages, "candidate_directions", must_not_run)
    for stage in ("build_variant_with_report", "response_calibration_set"):
        monkeypatch.setattr(compression.builder, stage, must_not_run)
    monkeypatch.setattr(refusal.probing, "prompt_activations", must_not_run)
    monkeypatch.setattr(refusal.measure, "attack_success", must_not_run)
    monkeypatch.setattr(lm.perplexity, "window_nll", must_not_run)
    again = Comparison(tiny_config(tiny_dir, tmp_path / "runs")).run()
    assert numbers(json.loads(json.dumps(again))) == numbers(stored)
    assert (stored["invocations"], again["invocations"]) == (1, 2)
    log = json.loads((run_dir / "invocations.json").read_text())
    assert [e["finished"] for e in log] == [True, True]
    assert again["wall_seconds_all_invocations"] == pytest.approx(sum(e["seconds"] for e in log), abs=0.11)
    assert "over 2 invocations" in (run_dir / "report.md").read_text()
    assert numbers(json.loads((run_dir / "report.json").read_text())) == numbers(stored)


def test_checkpoint_from_other_calibration_is_rebuilt(tiny_dir, tmp_path):
    cfg = tiny_config(tiny_dir, tmp_path / "runs")
    Comparison(cfg).run()
    manifest_path = tmp_path / "runs" / "tiny" / "variants" / "wanda-0.5" / "model" / "compression.json"
    manifest = json.loads(manifest_path.read_text())
    digest = manifest["calibration_sha256"]["prompts"]
    manifest["calibration_sha256"]["prompts"] = "0" * 64  # as if made from other calibration data
    manifest_path.write_text(json.dumps(manifest))

    comparison = Comparison(cfg)
    built = []
    original_build = comparison.builder.build
    comparison.builder.build = lambda spec: built.append(spec.text) or original_build(spec)
    for spec in comparison.specs:
        comparison.variant_model(spec)
    assert built == ["wanda:0.5"]
    assert json.loads(manifest_path.read_text())["calibration_sha256"]["prompts"] == digest


def test_wikitext_calibration_builds_from_text_and_is_kept_apart(tiny_dir, tmp_path):
    import dataclasses

    cfg = dataclasses.replace(
        tiny_config(tiny_dir, tmp_path / "runs"),
        variants=("wanda:0.5",),
        calib_source="wikitext",
        calib_samples=4,
        calib_seqlen=32,
        select=False,
        repair=False,
    )
    Comparison(cfg).run()
    manifest = json.loads(
        (tmp_path / "runs" / "tiny" / "variants" / "wanda-0.5" / "model" / "compression.json").read_text()
    )
    assert "wikitext-2 test text" in manifest["calibration"] and manifest["params"]["calib_source"] == "wikitext"
    # Switching back to instruction calibration rebuilds the variant instead of reusing it.
    comparison = Comparison(dataclasses.replace(cfg, calib_source="harmless", calib_seqlen=256))
    built = []
    original_build = comparison.builder.build
    comparison.builder.build = lambda spec: built.append(spec.text) or original_build(spec)
    comparison.variant_model(comparison.specs[1])
    assert built == ["wanda:0.5"]


def test_wikitext_calibration_refuses_overlapping_perplexity(tiny_dir, tmp_path, monkeypatch, capsys):
    code, err, runs = run_cli(
        ["--model", str(tiny_dir), "--calib-source", "wikitext", "--ppl-windows", "100", "--ppl-seqlen", "2048"],
        tmp_path,
        monkeypatch,
        capsys,
    )
    assert_clean_failure(code, err, runs, tmp_path, "overlap the wikitext-2 calibration text")


def test_direction_comparison_section(tiny_dir, tmp_path, monkeypatch):
    """With a selection that can pass on a random model, every variant gets source, cosine map and quality."""
    from refusal.select import SelectionConfig

    permissive = SelectionConfig(
        n_train=4,
        n_val=3,
        kl_threshold=1e9,
        induce_threshold=-1e9,
        max_layer_fraction=1.0,
        search="lazy",
        batch_size=4,
        max_rows=12,
    )
    monkeypatch.setattr(Comparison, "selection_config", lambda self: permissive)
    cfg = tiny_config(tiny_dir, tmp_path / "runs")
    cfg.n_ablation_asr = 2
    report = Comparison(cfg).run()
    run_dir = tmp_path / "runs" / "tiny"
    original = report["variants"][0]
    assert original["source"] is not None and original["source"]["layer"] == 1  # layer 0's difference is zero
    assert original["cosine_at_original_source"] == pytest.approx(1.0, abs=1e-5)
    assert original["source_shift"]["same"]
    for row in report["variants"]:
        cos = row["cosine_to_original_direction"]
        assert len(cos) == len(report["positions"]) and len(cos[0]) == report["n_layers"]
        assert all(-1.0001 <= c <= 1.0001 for r in cos for c in r)
        assert row["quality"]["original_direction"]["kl"] >= 0
        assert row["asr_original_direction_ablated"]["n_prompts"] == 4
    original_prompts = json.loads((run_dir / "variants" / "original" / "selection" / "selection.json").read_text())[
        "prompts"
    ]
    for row in report["variants"][1:]:
        assert row["quality"]["own"] is not None and row["quality"]["own_direction_in_original"] is not None
        # Each variant's own selection ran on the original's filtered prompts, as given.
        own = json.loads(
            (run_dir / "variants" / row["variant"].replace(":", "-") / "selection" / "selection.json").read_text()
        )
        assert own["prompts"] == original_prompts and own["params"]["shared_prompts"]
        assert "filter" not in own["forward_passes"] and "directions" not in own["forward_passes"]
    for name in ("score_maps_original", "cosine_maps", "source_shift", "quality"):
        assert (run_dir / report["figures"][name]).is_file()
    assert "## Refusal direction: source and quality" in (run_dir / "report.md").read_text()
    page = (run_dir / "report.html").read_text()
    # Self-contained: tables rendered, plotly.js inlined once, no script fetched from a CDN.
    assert "<table>" in page and page.count("plotly.js v") == 1 and 'src="https://cdn' not in page
    assert page.count('class="plotly-graph-div"') == len(report["figures"])

    cfg.select_variants = False  # only the original's source: no shift to draw
    again = Comparison(cfg).run()
    assert "source_shift" not in again["figures"] and "cosine_maps" in again["figures"]
    assert all(row["source"] is None for row in again["variants"][1:])


def test_repair_stage_repairs_changed_variants(tiny_dir, tmp_path, monkeypatch):
    """The main job's last stage: AIRD + targeted repair of a variant whose direction changed, in the report."""
    from refusal.select import SelectionConfig

    permissive = SelectionConfig(
        n_train=4,
        n_val=3,
        kl_threshold=1e9,
        induce_threshold=-1e9,
        max_layer_fraction=1.0,
        search="lazy",
        batch_size=4,
        max_rows=12,
    )
    monkeypatch.setattr(Comparison, "selection_config", lambda self: permissive)
    cfg = tiny_config(tiny_dir, tmp_path / "runs")
    cfg.variants = ("wanda:0.5",)
    cfg.n_ablation_asr = 2
    cfg.repair, cfg.repair_when = True, "direction"
    from repair.anchored import AnchoredConfig

    cfg.anchored = AnchoredConfig(
        n_harmful=4, n_harmless=4, val_harmful=4, val_harmless=4, reply_tokens=4, val_tokens=4, max_steps=2, step=0.05
    )
    cfg.repair_n_asr, cfg.repair_max_new_tokens, cfg.repair_curve_fractions = 2, 4, (0.5,)
    import refusal.measure

    computed, real = [], refusal.measure.measured

    def spy(store, kind, model, configs, compute):
        def logged():
            computed.append(
                (kind, json.dumps(model, sort_keys=True), json.dumps(dataclasses.asdict(configs[0]), sort_keys=True))
            )
            return compute()

        return real(store, kind, model, configs, logged)

    monkeypatch.setattr(refusal.measure, "measured", spy)
    report = Comparison(cfg).run()
    run_dir = tmp_path / "runs" / "tiny"
    stored = json.loads((run_dir / "config.json").read_text())
    assert stored["repair_adv_suffix"] is False and stored["zero_shot_tasks"] is not None  # resolved for CPU, recorded
    row = report["variants"][1]
    assert row["cosine_at_original_source"] < cfg.repair_below
    repaired = report["repairs"]["wanda:0.5"]
    assert repaired["aird"]["layer"] < report["variants"][0]["source"]["layer"]
    assert set(repaired["states"]) >= {"original", "compressed", "aird"}
    assert repaired["settings"]["n_asr"] == 2 and repaired["settings"]["max_new_tokens"] == 4
    assert (run_dir / "variants" / "wanda-0.5" / "repaired" / "repair.json").is_file()
    assert "## Repair" in (run_dir / "report.md").read_text()
    assert {"repair_curve", "repair_wanda-0.5", "repair_front_wanda-0.5"} <= set(report["figures"])
    source = row["source"]
    assert source is not None and repaired["compressed_source"] == source
    assert not list((run_dir / "repair").glob("*/selection")), "the repair selected the variant's direction again"
    # Two entry points, one cache entry: the repair's original and compressed measurements are the
    # comparison's (keyed by the same weight fingerprints), generated once each.
    assert len(computed) == len(set(computed))
    by_weights = [c for c in computed if c[0] == "generations-vanilla" and not c[1].startswith("{")]
    # harmful, harmless and refusal-probe training prompts of original and wanda
    assert len(by_weights) == 6 and len({c[1] for c in by_weights}) == 2
    for state, variant in (("original", 0), ("compressed", 1)):
        assert repaired["states"][state]["rates"]["asr"]["vanilla"] == report["variants"][variant]["rates"]["asr"]
        assert (
            repaired["states"][state]["rates"]["over_refusal"] == report["variants"][variant]["rates"]["over_refusal"]
        )


def test_sizes_fill_the_defaults_and_flags_win(monkeypatch):
    from lm import sizes
    from lm.zero_shot import ALL_TASKS, SHORT_TASKS

    cpu, paper = CompareConfig.sized("cpu"), CompareConfig.sized("paper")
    assert paper == dataclasses.replace(CompareConfig(), size="paper")  # the dataclass defaults are the paper size
    assert (cpu.zero_shot_limit, cpu.zero_shot_tasks, cpu.repair_adv_suffix) == (24, SHORT_TASKS, False)
    assert (paper.zero_shot_limit, paper.zero_shot_tasks, paper.repair_adv_suffix) == (200, ALL_TASKS, True)
    assert (cpu.n_asr, cpu.n_harmless) == (
        paper.n_asr,
        paper.n_harmless,
    )  # the same prompts: the same detectable differences
    assert CompareConfig.quick().variants == compare.QUICK_VARIANTS and len(CompareConfig().variants) == 9
    # Without --size the device decides; a flag given beside a size wins over it, a config file's size counts as given.
    for cuda, size in ((False, "cpu"), (True, "paper")):
        monkeypatch.setattr(sizes, "default_size", lambda cuda=cuda: "paper" if cuda else "cpu")
        cfg = compare.parse_args(["--zero-shot-limit", "7"])
        assert (
            cfg.size == size
            and cfg.zero_shot_limit == 7
            and cfg.zero_shot_tasks == CompareConfig.sized(size).zero_shot_tasks
        )
    assert compare.parse_args(["--size", "paper", "--no-repair-adv-suffix"]) == dataclasses.replace(
        paper, repair_adv_suffix=False
    )
    assert compare.parse_args(["--quick", "--n-val", "5"]) == CompareConfig.quick(n_val=5, name="quick-embedded")


def test_a_model_without_a_refusal_direction_is_said_in_the_findings():
    from types import SimpleNamespace

    from experiments.compare_refusal.summary import no_direction_note
    from refusal.selection_filter import no_direction_reason, non_finite_note

    def selection(chosen, reasons, baseline):
        return SimpleNamespace(
            chosen=chosen,
            counts={"baseline_score": {"harmful_val": baseline}},
            no_direction_reason=lambda: no_direction_reason(reasons, baseline),
            non_finite_note=lambda: non_finite_note(reasons),
        )

    note, why = no_direction_note(selection(None, [["kl", "induce"], ["induce", "late_layer"]], -3.25))
    assert "no selected refusal direction" in note and "-3.25" in note and "skipped" in note
    assert "2 induce, 1 kl, 1 late_layer" in why and "does not appear to refuse" in why
    # A refusing model whose candidates all failed: the rules are named, no claim that it does not refuse.
    _, why = no_direction_note(selection(None, [["kl", "induce"]], 2.5))
    assert "does not appear to refuse" not in why
    # NaN scores are said even when a direction was chosen; nothing is said when all is well.
    [nan_note] = no_direction_note(selection((-1, 1), [["nan", None]], 2.5))
    assert nan_note.startswith("Direction selection: 1 candidate") and "excluded" in nan_note
    assert no_direction_note(selection((-1, 1), [["kl", None]], 2.5)) == [] and no_direction_note(None) == []


def test_repair_is_for_variants_whose_asr_rose_and_that_did_not_collapse():
    from experiments.compare_refusal.repairs import repair_reason

    cfg = CompareConfig()
    rose = dict(test="mcnemar-exact", b=20, c=2, p_value=1e-5, p_holm=1e-4, significant=True)
    row = lambda test, collapsed=False, cos=0.9: dict(
        tests=dict(asr=dict(arditi2024=test)), collapse=dict(collapsed=collapsed), cosine_at_original_source=cos
    )
    assert repair_reason(row(rose), cfg)[0]
    assert (
        not repair_reason(row(rose, collapsed=True), cfg)[0]
        and "collapsed" in repair_reason(row(rose, collapsed=True), cfg)[1]
    )
    assert not repair_reason(row(dict(rose, significant=False, p_holm=0.2)), cfg)[0]
    assert not repair_reason(row(dict(rose, b=2, c=20)), cfg)[0]  # a significant fall in ASR needs no repair
    assert not repair_reason(dict(tests=None, collapse={}), cfg)[0]
    moved = CompareConfig(repair_when="direction")
    assert repair_reason(row(dict(rose, significant=False), cos=0.9), moved)[0]
    assert not repair_reason(row(rose, cos=0.995), moved)[0]
