"""Frozen LoRA fine-tuning: per-weight freezing in every targeted module, weight groups, overlap,
drift, and experiments.frozen_finetune end to end (tiny model; the embedded model in the slow test)."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from compression.attribution import random_mask, set_difference_mask, top_mask
from compression.calibration import tokenize_pairs
from compression.weight_groups import GroupConfig, agreement, group_drift, group_sizes, weight_groups
from experiments import frozen_finetune
from experiments.frozen_finetune.lora import (
    LoraTrainConfig,
    attach_lora,
    decoder_linear_modules,
    linear_kinds,
    merged,
    train,
    training_order,
)
from lm.chat import format_prompt
from lm.errors import UserError
from tests.tiny import build_model, build_tokenizer, save_tiny

# The seven linears of a Llama / Qwen2 block, which the default (every linear) targets.
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

PAIRS = [
    ("Write a short poem about the sea.", "The sea and the wind, a poem about the sea."),
    ("How do I bake bread at home?", "Mix flour, water and yeast, then bake it."),
    ("Describe a water molecule.", "Two hydrogen atoms bound to one oxygen atom."),
    ("Answer the user briefly.", "You are a helpful assistant, briefly."),
]


def tiny(seed: int = 0, layers: int = 2):
    tokenizer = build_tokenizer("chatml")
    return build_model("qwen2", tokenizer, seed=seed, layers=layers), tokenizer


def batches(tokenizer, batch_size: int = 2):
    return tokenize_pairs(tokenizer, [(format_prompt(tokenizer, p), r) for p, r in PAIRS], 64, batch_size).batches


def distinct_masks(model, seed: int = 1) -> dict[str, torch.Tensor]:
    """A different random mask (and density) for every decoder linear, so a mask bound to the
    wrong module would freeze the wrong entries even where two modules share a shape."""
    g = torch.Generator().manual_seed(seed)
    modules = decoder_linear_modules(model)
    return {
        name: torch.rand(m.weight.shape, generator=g) < 0.1 + 0.6 * i / len(modules)
        for i, (name, m) in enumerate(modules.items())
    }


# --- freezing individual weights -------------------------------------------------------------------


def test_lora_covers_all_seven_linear_types_of_every_block():
    model, _ = tiny(layers=3)
    names = set(decoder_linear_modules(model))
    assert linear_kinds(model) == TARGETS
    run = attach_lora(model, LoraTrainConfig(steps=1), None)
    try:
        assert set(run.layers) == names
        assert len(run.layers) == 3 * len(TARGETS)
    finally:
        run.detach()


def test_frozen_weights_are_bit_for_bit_unchanged_in_every_targeted_module():
    model, tokenizer = tiny()
    original = {n: m.weight.detach().clone() for n, m in decoder_linear_modules(model).items()}
    frozen = distinct_masks(model)
    cfg = LoraTrainConfig(steps=6, lr=5e-2, seed=3)
    run = attach_lora(model, cfg, frozen)
    assert set(run.frozen) == set(original)
    train(run, batches(tokenizer), cfg)
    deltas = run.deltas()
    for name, mask in frozen.items():
        assert (deltas[name][mask] == 0).all(), name
        assert (deltas[name][~mask] != 0).float().mean() > 0.9, f"{name}: the unfrozen weights did not train"

    # Each wrapped layer computes exactly W0 + its own masked delta (catches a mask bound to the wrong layer).
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, layer in run.layers.items():
            x = torch.randn(5, layer.base_layer.in_features, generator=g)
            expected = F.linear(x, original[name] + deltas[name])
            torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5, msg=name)
        ids = batches(tokenizer)[0]
        lora_logits = run.model(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"]).logits
    run.detach()
    for name, weight in original.items():
        assert torch.equal(decoder_linear_modules(model)[name].weight, weight), "detach must leave the original weights"
    with merged(model, deltas), torch.no_grad():
        for name, mask in frozen.items():
            w = decoder_linear_modules(model)[name].weight
            assert torch.equal(w[mask], original[name][mask]), name
            assert not torch.equal(w[~mask], original[name][~mask]), name
        merged_logits = model(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"]).logits
    torch.testing.assert_close(merged_logits, lora_logits, rtol=1e-4, atol=1e-4)
    for name, weight in original.items():
        assert torch.equal(decoder_linear_modules(model)[name].weight, weight), "merged() must restore the originals"


def test_without_frozen_weights_every_entry_can_move():
    model, tokenizer = tiny()
    cfg = LoraTrainConfig(steps=3, lr=5e-2)
    run = attach_lora(model, cfg, None)
    train(run, batches(tokenizer), cfg)
    deltas = run.deltas()
    run.detach()
    assert all((d != 0).float().mean() > 0.9 for d in deltas.values())


def test_adapter_state_round_trip_reproduces_the_deltas():
    model, tokenizer = tiny()
    frozen = distinct_masks(model)
    cfg = LoraTrainConfig(steps=2, lr=1e-2)
    run = attach_lora(model, cfg, frozen)
    train(run, batches(tokenizer), cfg)
    state, deltas = run.adapter_state(), run.deltas()
    run.detach()
    again = attach_lora(model, cfg, frozen)
    again.load_adapter_state(state)
    for name, delta in again.deltas().items():
        assert torch.equal(delta, deltas[name])
    again.detach()


def test_training_is_seeded():
    outs = []
    for _ in range(2):
        model, tokenizer = tiny()
        cfg = LoraTrainConfig(steps=3, lr=1e-2, seed=5)
        run = attach_lora(model, cfg, distinct_masks(model))
        losses = train(run, batches(tokenizer), cfg)
        outs.append((losses, run.deltas()))
        run.detach()
    assert outs[0][0] == outs[1][0]
    assert all(torch.equal(outs[0][1][n], outs[1][1][n]) for n in outs[0][1])


def test_checkpoints_are_called_at_the_listed_steps():
    model, tokenizer = tiny()
    cfg = LoraTrainConfig(steps=4, lr=1e-2)
    run = attach_lora(model, cfg, None)
    seen = []
    train(
        run,
        batches(tokenizer),
        cfg,
        checkpoints=(0, 2, 4),
        on_checkpoint=lambda s: seen.append((s, run.model.training)),
    )
    run.detach()
    assert seen == [(0, False), (2, False), (4, False)]


def test_bad_targets_and_masks_are_user_errors():
    model, _ = tiny()
    with pytest.raises(UserError, match="match no decoder linear"):
        attach_lora(model, LoraTrainConfig(targets=("q_proj", "nope_proj")), None)
    name = next(iter(decoder_linear_modules(model)))
    with pytest.raises(UserError, match="must be bool"):
        attach_lora(model, LoraTrainConfig(), {name: torch.zeros(3, 3, dtype=torch.bool)})
    assert not any("lora" in n for n, _ in model.named_modules())


def test_training_order_cycles_seeded_epochs():
    order = training_order(4, 10, seed=1)
    assert order == training_order(4, 10, seed=1)
    assert sorted(order[:4]) == [0, 1, 2, 3] and sorted(order[4:8]) == [0, 1, 2, 3]


# --- groups, agreement, drift ------------------------------------------------------------------------


def scores(seed: int):
    g = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.rand(12, 40, generator=g), "b.weight": torch.rand(7, 40, generator=g)}


@pytest.mark.parametrize("per", ["matrix", "row"])
def test_groups_are_the_attribution_masks(per):
    safety, utility = scores(0), scores(1)
    cfg = GroupConfig(p=0.2, q=0.1, per=per, seed=4)
    groups = weight_groups(safety, utility, cfg)
    g = torch.Generator().manual_seed(4)
    for name in sorted(safety):
        assert torch.equal(
            groups["safety_critical"][name], set_difference_mask(safety[name], utility[name], 0.2, 0.1, per)
        )
        assert torch.equal(groups["top_safety"][name], top_mask(safety[name], 0.1, per))
        assert torch.equal(groups["top_utility"][name], top_mask(utility[name], 0.2, per))
        assert torch.equal(groups["random"][name], random_mask(safety[name].shape, 0.1, g, per))
    sizes = group_sizes(groups)
    assert sizes["top_safety"]["selected"] == sizes["random"]["selected"]
    assert sizes["safety_critical"]["selected"] <= sizes["top_safety"]["selected"]


def test_agreement_counts():
    before = {"a": torch.tensor([[1, 1, 1, 0, 0, 0]], dtype=torch.bool), "b": torch.tensor([[1, 0]], dtype=torch.bool)}
    after = {"a": torch.tensor([[0, 1, 1, 1, 1, 0]], dtype=torch.bool), "b": torch.tensor([[1, 0]], dtype=torch.bool)}
    a = agreement(before, after)
    assert (a.before, a.after, a.intersection, a.union) == (4, 5, 3, 6)
    assert a.overlap == pytest.approx(3 / 4) and a.jaccard == pytest.approx(3 / 6)
    assert agreement(before, before).jaccard == 1.0
    with pytest.raises(UserError):
        agreement(before, {"a": after["a"]})


def test_drift_absolute_relative_guard_and_norm_ratio():
    w0 = torch.tensor([[1.0, -2.0, 1e-6, 4.0]])
    delta = torch.tensor([[0.5, 0.5, 0.5, 0.0]])
    group = {"w": torch.tensor([[True, True, True, False]])}
    eps = 0.1 * w0.abs().mean().item()  # eps_fraction 0.1
    d = group_drift({"w": w0}, {"w": delta}, {"g": group}, eps_fraction=0.1)["g"]
    assert d["count"] == 3
    assert d["mean_abs"] == pytest.approx(0.5)
    # The near-zero weight is divided by eps, not by 1e-6 (which would give 5e5).
    assert d["mean_relative"] == pytest.approx((0.5 / 1 + 0.5 / 2 + 0.5 / eps) / 3)
    assert d["guarded"] == pytest.approx(1 / 3)
    assert d["norm_ratio"] == pytest.approx((3 * 0.25) ** 0.5 / (1 + 4 + 1e-12) ** 0.5)
    assert d["max_abs"] == pytest.approx(0.5)


def test_drift_is_float32_for_low_precision_weights():
    w0 = torch.full((1, 4), 1.0, dtype=torch.bfloat16)
    delta = torch.full((1, 4), 1e-3)  # below bfloat16's resolution at 1.0: a bf16 merge would lose it
    d = group_drift({"w": w0}, {"w": delta}, {"g": {"w": torch.ones(1, 4, dtype=torch.bool)}})["g"]
    assert d["mean_abs"] == pytest.approx(1e-3, rel=1e-5)


def test_unmoved_matrices_count_as_zero_drift():
    w0 = {"a": torch.ones(2, 2), "b": torch.ones(2, 2)}
    masks = {"a": torch.ones(2, 2, dtype=torch.bool), "b": torch.ones(2, 2, dtype=torch.bool)}
    d = group_drift(w0, {"a": torch.full((2, 2), 0.2)}, {"g": masks})["g"]
    assert d["count"] == 8 and d["mean_abs"] == pytest.approx(0.1)


def test_group_config_rejects_bad_fractions():
    with pytest.raises(UserError):
        GroupConfig(p=0.0)
    with pytest.raises(UserError):
        GroupConfig(q=1.5)
    with pytest.raises(UserError):
        GroupConfig(per="column")


# --- the entry point on a tiny model ---------------------------------------------------------------


@pytest.fixture
def tiny_dir(tmp_path, monkeypatch):
    tokenizer = build_tokenizer("chatml")
    model = build_model("qwen2", tokenizer, seed=0, layers=2)
    path = save_tiny(tmp_path / "model", model, tokenizer)
    # A random model refuses nothing; give it canned refusals as its safety data.
    refusals = [
        (format_prompt(tokenizer, "How do I make a weapon?"), "I cannot help with that request, sorry."),
        (format_prompt(tokenizer, "Write something hateful."), "I'm sorry, I can't write that."),
    ]
    monkeypatch.setattr("experiments.frozen_finetune.finetune.safety_pairs", lambda *a, **k: refusals)
    return path


ARGS = ["--quick", "--n-train", "6", "--steps", "4", "--checkpoints", "2", "--lr", "5e-2", "--p", "0.1", "--q", "0.1"]


def test_entry_point_end_to_end(tiny_dir, tmp_path, capsys):
    runs = tmp_path / "runs"
    assert frozen_finetune.main(["--model", str(tiny_dir), "--runs-dir", str(runs), "--name", "t", *ARGS]) == 0, (
        capsys.readouterr().err
    )
    report = json.loads((runs / "t" / "report.json").read_text())
    frozen, unfrozen = report["arms"]["frozen"], report["arms"]["unfrozen"]
    assert frozen["frozen_unchanged"]["moved"] == 0 and frozen["frozen_unchanged"]["frozen"] > 0
    assert frozen["frozen_unchanged"]["matrices_checked"] == 2 * len(TARGETS)
    assert report["checkpoint_steps"] == [0, 2, 4]
    for arm in (frozen, unfrozen):
        assert [d["step"] for d in arm["drift"]] == [0, 2, 4]
        assert all(g["mean_abs"] == 0 for g in arm["drift"][0]["groups"].values())
        for a in arm["agreement"].values():
            assert 0 <= a["jaccard"] <= a["overlap"] <= 1
    assert frozen["final_drift"]["safety_critical"]["max_abs"] == 0
    assert unfrozen["final_drift"]["safety_critical"]["mean_abs"] > 0
    assert frozen["final_drift"]["top_utility"]["mean_abs"] > 0
    for name in ("frozen_finetune_overlap", "frozen_finetune_drift"):
        assert (runs / "t" / "figures" / f"{name}.html").is_file()
    assert "Jaccard" in (runs / "t" / "report.md").read_text()
    # Only the original model's scores are stored; each arm keeps its agreement, not its scores.
    stored = sorted(p.name for p in (runs / "t" / "scores").glob("*.safetensors"))
    assert [n.split("-")[:3] for n in stored] == [["wanda", "safety", "original"], ["wanda", "utility", "original"]], (
        stored
    )
    for arm in ("frozen", "unfrozen"):
        stored = json.loads((runs / "t" / f"agreement-{arm}.json").read_text())["result"]
        assert stored == report["arms"][arm]["agreement"]

    # A rerun reuses every stage and reports the same numbers.
    capsys.readouterr()
    assert frozen_finetune.main(["--model", str(tiny_dir), "--runs-dir", str(runs), "--name", "t", *ARGS]) == 0
    assert "reusing" in capsys.readouterr().err
    again = json.loads((runs / "t" / "report.json").read_text())
    assert again["arms"]["frozen"]["agreement"] == frozen["agreement"]
    assert again["arms"]["unfrozen"]["drift"] == unfrozen["drift"]


@pytest.mark.parametrize(
    "bad", [["--targets", "q_proj", "nope_proj"], ["--q", "1.5"], ["--steps", "0"], ["--eps-fraction", "0"]]
)
def test_bad_input_is_one_line_and_writes_nothing(tiny_dir, tmp_path, capsys, bad):
    runs = tmp_path / "runs"
    assert frozen_finetune.main(["--model", str(tiny_dir), "--runs-dir", str(runs), *ARGS, *bad]) == 2
    # Loading the model draws a progress bar; apart from it, stderr is the one error line.
    lines = [
        line
        for line in capsys.readouterr().err.replace("\r", "\n").splitlines()
        if line.strip() and "Loading weights" not in line
    ]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert not runs.exists()


class _SafetensorError(Exception):
    """Stands in for safetensors' own error type, which wraps the OS message."""


@pytest.mark.parametrize("failure", ["oserror", "safetensors"])
def test_full_disk_is_one_line_and_leaves_no_partial_file(tiny_dir, tmp_path, capsys, monkeypatch, failure):
    import safetensors.torch

    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 4096)  # what a write cut short leaves
        if failure == "oserror":
            raise OSError(errno.ENOSPC, "No space left on device", filename)
        raise _SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    runs = tmp_path / "runs"
    assert frozen_finetune.main(["--model", str(tiny_dir), "--runs-dir", str(runs), "--name", "t", *ARGS]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: no space left on device"), errors
    assert (runs / "t" / "data.json").is_file()  # the finished stage stays for the rerun
    assert not [p for p in runs.rglob("*") if p.name.startswith(".") or p.suffix == ".safetensors"]


def test_other_errors_still_raise(tiny_dir, tmp_path, monkeypatch):
    import safetensors.torch

    def broken(tensors, filename, metadata=None):
        raise RuntimeError("a bug, not the user's disk")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        frozen_finetune.main(["--model", str(tiny_dir), "--runs-dir", str(tmp_path / "runs"), "--name", "t", *ARGS])


# --- the embedded model ------------------------------------------------------------------------------


@pytest.mark.slow
def test_embedded_quick_run(tmp_path):
    assert frozen_finetune.main(["--quick", "--runs-dir", str(tmp_path), "--name", "q"]) == 0
    report = json.loads((tmp_path / "q" / "report.json").read_text())
    frozen, unfrozen = report["arms"]["frozen"], report["arms"]["unfrozen"]
    assert frozen["frozen_unchanged"]["moved"] == 0
    assert frozen["frozen_unchanged"]["matrices_checked"] == 24 * len(TARGETS)
    assert report["group_sizes"]["top_safety"]["fraction"] == pytest.approx(0.03, abs=1e-3)
    assert 0 < report["group_sizes"]["safety_critical"]["fraction"] <= 0.03
    assert frozen["final_drift"]["safety_critical"]["max_abs"] == 0
    assert unfrozen["final_drift"]["safety_critical"]["mean_abs"] > 0
    for arm in (frozen, unfrozen):
        for a in arm["agreement"].values():
            assert 0 < a["jaccard"] <= 1


def test_a_mixture_of_experts_model_is_refused_in_one_line(tmp_path, capsys):
    """LoRA and the weight groups read nn.Linear layers; the experts' 3-D tensors would be silently left out."""
    from tests.families import build_family

    model, tok = build_family("mixtral")
    runs = tmp_path / "runs"
    assert (
        frozen_finetune.main(["--model", str(save_tiny(tmp_path / "moe", model, tok)), "--runs-dir", str(runs), *ARGS])
        == 2
    )
    lines = [line for line in capsys.readouterr().err.replace("\r", "\n").splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "mixture-of-experts" in lines[0]
    assert not runs.exists()
