"""Packed checkpoints made by their own libraries (GPTQModel; transformers + bitsandbytes): read
dense through that library, checked against the original, repaired, written back in their own
format and reloaded by the same library."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from lm.errors import UserError
from lm.loading import load_model
from repair.__main__ import main
from tests.tiny import build_model, build_tokenizer, save_tiny

pytest.importorskip("gptqmodel", reason="the gptq extra (pip install -e '.[gptq]') is not installed")
pytest.importorskip("bitsandbytes", reason="the bnb extra (pip install -e '.[bnb]') is not installed")
pytest.importorskip(
    "compressed_tensors",
    reason="the compressed-tensors extra (pip install -e '.[compressed-tensors]') is not installed",
)

FORMATS = ("gptq", "bnb-nf4", "bnb-int8", "ct-w4a16", "ct-2:4-w4a16")
CALIBRATION = [
    "Write a poem about the sea and the sky over it.",
    "How do I bake bread at home with flour?",
    "Name three fruits that are red.",
    "Describe a water molecule in detail.",
] * 4
SMALL = [
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
    "--curve-fractions",
    "0.1",
    "--source",
    "-1",
    "2",
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
    "0.02",
    "--static-fractions",
    "0.1",
]


def _gptq(src: Path, out: Path) -> None:
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    from gptqmodel import GPTQModel, QuantizeConfig

    model = GPTQModel.load(str(src), QuantizeConfig(bits=4, group_size=32, desc_act=False), device="cpu")
    model.quantize(CALIBRATION, batch_size=4)
    model.save(str(out))


def _bnb(src: Path, out: Path, tokenizer, four: bool) -> None:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = (
        BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
        if four
        else BitsAndBytesConfig(load_in_8bit=True)
    )
    AutoModelForCausalLM.from_pretrained(
        str(src), quantization_config=config, device_map="cpu", dtype=torch.float32
    ).save_pretrained(out)
    tokenizer.save_pretrained(out)


def _compressed_tensors(src: Path, out: Path, tokenizer, prune_24: bool = False) -> None:
    """W4A16 (int4, group 32, symmetric) pack-quantized, written by compressed-tensors' own API: the
    calls llm-compressor makes when saving, with min-max scales as its default observer computes
    them (llm-compressor itself pins transformers <= 5.17, below this project's). prune_24: 2:4
    magnitude pruning first, as llm-compressor's sparse W4A16 recipes prune before they quantize
    (compressed-tensors stores the result as W4A16: it has no sparse format any more)."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        QuantizationStatus,
        apply_quantization_config,
    )
    from compressed_tensors.quantization.utils import calculate_qparams
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
    if prune_24:
        from compression.magnitude import prune_magnitude
        from compression.sparsity import SparsityPattern

        prune_magnitude(model, SparsityPattern(n=2, m=4))
    args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=32)
    apply_quantization_config(
        model,
        QuantizationConfig(
            config_groups={"g": QuantizationScheme(targets=["Linear"], weights=args)}, ignore=["lm_head"]
        ),
    )
    for module in model.modules():
        if hasattr(module, "weight_scale"):
            groups = module.weight.data.reshape(module.weight.shape[0], -1, 32)
            scale, zero = calculate_qparams(groups.amin(-1), groups.amax(-1), args)
            module.weight_scale.data.copy_(scale.reshape(module.weight_scale.shape))
            module.weight_zero_point.data.copy_(zero.reshape(module.weight_zero_point.shape))
            module.quantization_status = QuantizationStatus.FROZEN
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="pack-quantized")
    compressor.compress_model(model)
    model.save_pretrained(out)
    compressor.update_config(str(out))
    tokenizer.save_pretrained(out)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("packed")
    tok = build_tokenizer("chatml")
    save_tiny(root / "original", build_model("qwen2", tok, seed=0, hidden=64, layers=3), tok)
    save_tiny(root / "other-base", build_model("qwen2", tok, seed=1, hidden=64, layers=3), tok)
    _gptq(root / "original", root / "gptq")
    _gptq(root / "other-base", root / "gptq-other-base")
    _bnb(root / "original", root / "bnb-nf4", tok, four=True)
    _bnb(root / "original", root / "bnb-int8", tok, four=False)
    _compressed_tensors(root / "original", root / "ct-w4a16", tok)
    _compressed_tensors(root / "original", root / "ct-2:4-w4a16", tok, prune_24=True)
    return root


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(path.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def _library_model(fmt: str, path: Path):
    """The checkpoint as its own library serves it (packed layers and kernels; compressed-tensors
    layers stay compressed until a first forward pass decompresses them)."""
    if fmt == "gptq":
        from gptqmodel import GPTQModel

        return GPTQModel.load(
            str(path), device="cpu", dtype=torch.float16
        ).model  # its CPU kernels for 8 bits take no float32
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), device_map="cpu", dtype=torch.float32)


def _is_packed_layer(fmt: str, module) -> bool:
    return hasattr(module, "weight_packed") if fmt.startswith("ct-") else type(module).__name__ != "Linear"


@pytest.mark.parametrize("fmt", FORMATS)
def test_packed_checkpoints_read_dense_give_the_librarys_own_logits(ckpts, fmt):
    loaded = load_model(str(ckpts / fmt))
    assert loaded.packed is not None and loaded.packed.bits == (8 if fmt == "bnb-int8" else 4)
    assert len(loaded.packed.quantized) == 3 * 7 and "lm_head" in loaded.packed.float_linears
    assert all(type(m).__name__ == "Linear" for n, m in loaded.model.named_modules() if n in loaded.packed.quantized)
    assert not hasattr(loaded.model.config, "quantization_config")
    # Each dequantized matrix computes what the library's own packed layer computes (its CPU kernels
    # run in reduced precision, GPTQModel's in bf16 and LLM.int8 with int8 activations: hence the tolerance;
    # a wrong zero point or scale would be off by a whole quantization step on every output).
    served, ours = _library_model(fmt, ckpts / fmt), dict(loaded.model.named_modules())
    if fmt.startswith("ct-"):
        with torch.no_grad():
            served(input_ids=torch.tensor([[1, 2, 3]]))  # compressed-tensors decompresses on the first forward pass
    for name in loaded.packed.quantized:
        x = torch.randn(6, ours[name].in_features, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            theirs, mine = served.get_submodule(name)(x.to(served.dtype)).float(), ours[name](x)
        torch.testing.assert_close(mine, theirs, atol=0.02 * float(theirs.abs().max()), rtol=0)


@pytest.mark.parametrize("fmt", FORMATS)
def test_check_reports_the_format_per_module_group_and_writes_nothing(ckpts, fmt, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["--check", "--original", str(ckpts / "original"), "--compressed", str(ckpts / fmt)]) == 0
    out = capsys.readouterr().out
    described = {"gptq": "gptq int4 g32", "bnb-nf4": "bitsandbytes int4", "bnb-int8": "bitsandbytes int8"}.get(
        fmt, "compressed-tensors int4 g32"
    )
    rows = {
        line.split(" | ")[0].strip("| "): line.split(" | ")
        for line in out.splitlines()
        if line.startswith("| ") and "---" not in line
    }
    assert rows["self_attn.q_proj"][1:4] == ["3", described, "dense"]
    assert rows["other parameters"][2] == "float"
    zeros = float(rows["mlp.down_proj"][4].rstrip("%")) / 100
    assert (zeros >= 0.5) == fmt.startswith("ct-2:4")  # 2:4 pruned: at least half zeros (quantization adds a few)
    assert f"packed {described}" in out and list(tmp_path.iterdir()) == []


def _error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, lines
    return lines[0]


def test_a_packed_checkpoint_of_another_base_is_refused(ckpts, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["--check", "--original", str(ckpts / "original"), "--compressed", str(ckpts / "gptq-other-base")]) == 2
    line = _error_line(capsys)
    assert "does not derive" in line


def test_a_missing_extra_is_named(ckpts, tmp_path, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gptqmodel" else real(name, *a))
    monkeypatch.chdir(tmp_path)
    assert main(["--check", "--original", str(ckpts / "original"), "--compressed", str(ckpts / "gptq")]) == 2
    assert "pip install -e '.[gptq]'" in _error_line(capsys)


def test_truncated_and_unknown_formats_are_one_line_errors(ckpts, tmp_path, monkeypatch, capsys):
    broken = tmp_path / "truncated"
    shutil.copytree(ckpts / "gptq", broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(UserError, match="cannot read the gptq checkpoint"):
        load_model(str(broken))
    awq = tmp_path / "awq"
    shutil.copytree(ckpts / "gptq", awq)
    config = json.loads((awq / "config.json").read_text())
    config["quantization_config"]["quant_method"] = "awq"
    (awq / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="'awq', which is not supported"):
        load_model(str(awq))
    legacy = tmp_path / "sparse-24-bitmask"  # what llm-compressor wrote for 2:4 models before compressed-tensors 0.17
    shutil.copytree(ckpts / "ct-2:4-w4a16", legacy)
    config = json.loads((legacy / "config.json").read_text())
    config["quantization_config"]["sparsity_config"] = {
        "format": "sparse-24-bitmask",
        "sparsity_structure": "2:4",
        "targets": ["Linear"],
    }
    (legacy / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="sparse-24-bitmask format, which compressed-tensors dropped"):
        load_model(str(legacy))


def test_a_pruned_and_quantized_checkpoint_is_held_to_the_bound_on_the_weights_it_keeps(ckpts):
    from repair.derivation import check_derivation, derivation_records

    original = load_model(str(ckpts / "original"))
    for fmt in ("ct-w4a16", "ct-2:4-w4a16"):
        recs = [r for r in derivation_records(original, load_model(str(ckpts / fmt))) if r.kind == "dense"]
        assert len(recs) == 3 * 7
        if fmt == "ct-2:4-w4a16":  # the zeros are the pruning; what quantizing the rest cost is the kept error
            assert all(r.removed >= 0.5 * original.model.get_parameter(r.name).numel() for r in recs)
            assert all(r.kept_error < 0.6 * r.relative_error for r in recs)
        else:
            assert all(r.kept_error <= r.relative_error + 1e-6 for r in recs)
    # Another base's matrices are ~1.4 off on the weights they keep too (every parameter counted as
    # changeable here, so that a linear, not the embedding, is the one refused).
    other = load_model(str(ckpts / "gptq-other-base"))
    with pytest.raises(UserError, match="on the weights it keeps"):
        check_derivation(
            original.model, other.model, {n for n, _ in original.model.named_parameters()}, 0.5, on_kept=True
        )


@pytest.mark.parametrize("fmt", ["gptq", "bnb-nf4", "ct-w4a16", "ct-2:4-w4a16"])
def test_repair_writes_the_inputs_format_and_its_library_reloads_it(ckpts, fmt, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    monkeypatch.chdir(tmp_path)
    code = main(
        [
            "--original",
            str(ckpts / "original"),
            "--compressed",
            str(ckpts / fmt),
            "--out",
            str(out),
            "--runs-dir",
            str(tmp_path / "runs"),
            *SMALL,
        ]
    )
    assert code == 0, capsys.readouterr().err
    manifest = json.loads((out / "compression.json").read_text())
    stored = manifest["repair"]["stored"]
    block = manifest["repair"]["aird_block"]
    touched = set(stored["full_precision_modules"])
    assert touched == {
        f"model.layers.{block}.{kind}"
        for kind in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        )
    }
    assert (
        stored["weights"] >= manifest["repair"]["restored"] > 0 and stored["bytes_added"] > stored["bytes_removed"] > 0
    )
    assert "Written as the input is stored" in (out / "repair.md").read_text()
    assert "kept weights changed" in (out / "repair.md").read_text()  # quantized: not "pruned"

    # Every tensor of the input that is not part of a touched module's packed form is copied byte for byte.
    before, after = _tensors(ckpts / fmt), _tensors(out)
    kept = {k for k in before if not any(k.startswith(m + ".") and not k.endswith(".bias") for m in touched)}
    assert kept and all(torch.equal(before[k].view(torch.uint8), after[k].view(torch.uint8)) for k in kept)
    assert set(after) == kept | {f"{m}.weight" for m in touched}

    # The format's own library reloads it: touched modules as float linears holding the original's weights, the rest packed.
    served = _library_model(fmt, out)
    original = dict(load_model(str(ckpts / "original")).model.named_parameters())
    packed_before = set(load_model(str(ckpts / fmt)).packed.quantized)
    assert touched < packed_before
    for name in touched:
        module = served.get_submodule(name)
        assert not _is_packed_layer(fmt, module)
        torch.testing.assert_close(module.weight.float(), original[f"{name}.weight"], atol=0, rtol=2.0**-7)
    assert all(_is_packed_layer(fmt, served.get_submodule(name)) for name in packed_before - touched)
    assert set(load_model(str(out)).packed.quantized) == packed_before - touched


def test_the_main_job_compares_packed_checkpoints_as_variants(ckpts, tmp_path, monkeypatch, capsys):
    from experiments.compare_refusal import main as compare
    from experiments.compare_refusal.comparison import Comparison
    from experiments.compare_refusal.config import CompareConfig

    monkeypatch.chdir(tmp_path)
    variants = [f"path:{ckpts / 'gptq'}", f"path:{ckpts / 'bnb-int8'}"]
    cfg = CompareConfig.quick(
        model=str(ckpts / "original"),
        runs_dir=str(tmp_path / "runs"),
        name="packed",
        variants=tuple(variants),
        n_asr=2,
        max_new_tokens=4,
        n_train=4,
        n_val=4,
        prescreen_keep=4,
        ppl_windows=1,
        ppl_seqlen=16,
        calib_samples=4,
        zero_shot_limit=0,
        repair=False,
    )
    report = Comparison(cfg).run()
    rows = {row["variant"]: row for row in report["variants"]}
    assert set(rows) == {"original", *variants}
    for spec in variants:
        assert set(rows[spec]["asr"]) == {"wei2024", "arditi2024"}
    assert not list(
        (tmp_path / "runs" / "packed" / "variants").glob("*/model/*.safetensors")
    )  # the user's checkpoint is not copied
    # A packed checkpoint of another base model stops the job before anything is written.
    code = compare(
        [
            "--model",
            str(ckpts / "original"),
            "--variants",
            f"path:{ckpts / 'gptq-other-base'}",
            "--runs-dir",
            str(tmp_path / "r2"),
            "--quick",
        ]
    )
    assert code == 2 and "does not derive" in _error_line(capsys) and not (tmp_path / "r2").exists()


@pytest.mark.slow
def test_a_gptqmodel_checkpoint_of_the_embedded_model_is_repaired_in_its_format(tmp_path, monkeypatch, capsys):
    """The embedded model quantized by GPTQModel itself (int4 g128), checked, repaired by AIRD and
    written back as GPTQ that GPTQModel loads, at a tiny evaluation size."""
    from compression.calibration import CalibrationConfig, calibration_set
    from lm.embedded import embedded_model_dir
    from lm.packed.gptq import quantize_with_gptqmodel

    torch.set_num_threads(2)
    tok = load_model("embedded").tokenizer
    quantize_with_gptqmodel(
        str(embedded_model_dir()), str(tmp_path / "gptq"), calibration_set(tok, CalibrationConfig(n_samples=16)).rows()
    )
    monkeypatch.chdir(tmp_path)
    assert main(["--check", "--compressed", str(tmp_path / "gptq")]) == 0
    assert "| self_attn.q_proj | 24 | gptq int4 g128 | dense |" in capsys.readouterr().out
    out = tmp_path / "out"
    code = main(
        [
            "--compressed",
            str(tmp_path / "gptq"),
            "--out",
            str(out),
            "--runs-dir",
            str(tmp_path / "runs"),
            "--n-asr",
            "2",
            "--n-harmless",
            "2",
            "--max-new-tokens",
            "8",
            "--n-train",
            "8",
            "--n-val",
            "2",
            "--ppl-windows",
            "1",
            "--zero-shot-limit",
            "0",
            "--no-adv-suffix",
            "--no-targeted",
            "--curve-fractions",
            "0.5",
            "--window",
            "3",
            "--source",
            "-1",
            "14",
            "--no-probes",
            # AIRD's output: a whole block of seven matrices, whatever the anchored search found at this size.
            "--save",
            "aird",
            # The quick size for every setting not given here (the anchored search, the static baseline).
            "--size",
            "quick",
        ]
    )
    assert code == 0, capsys.readouterr().err
    manifest = json.loads((out / "compression.json").read_text())
    block = manifest["repair"]["aird_block"]
    assert block in (11, 12, 13) and len(manifest["repair"]["stored"]["full_precision_modules"]) == 7
    assert manifest["repair"]["stored"]["bytes_added"] > manifest["repair"]["stored"]["bytes_removed"] > 0
    served = _library_model("gptq", out)
    assert type(served.get_submodule(f"model.layers.{block}.mlp.down_proj")).__name__ == "Linear"
    assert type(served.get_submodule(f"model.layers.{(block + 1) % 24}.mlp.down_proj")).__name__ != "Linear"


@pytest.mark.parametrize("spec", ["rtn:int4:g32", "gptq:int4:g32", "rtn:int8:g32"])
def test_toolkit_variants_export_as_gptq_that_gptqmodel_serves(ckpts, spec, tmp_path, capsys):
    from compression.calibration import Calibration
    from compression.checkpoint import save_variant
    from compression.export import main as export
    from compression.variants import build_variant, parse_variant
    from lm.chat import format_prompts, tokenize_prompts

    original = load_model(str(ckpts / "original"))
    batch = tokenize_prompts(original.tokenizer, format_prompts(original.tokenizer, CALIBRATION[:4]))
    variant = build_variant(original.model, parse_variant(spec), Calibration(batches=[dict(batch)], digest="t"))
    parsed = parse_variant(spec)
    save_variant(
        variant, original.tokenizer, tmp_path / "variant", dict(method=parsed.method, spec=spec, params=parsed.params)
    )
    assert export(["--variant", str(tmp_path / "variant"), "--out", str(tmp_path / "packed")]) == 0
    assert "linears packed as GPTQ" in capsys.readouterr().out
    packed = load_model(str(tmp_path / "packed"))
    assert packed.packed.describe() == f"gptq int{parsed.params['bits']} g32" and len(packed.packed.quantized) == 3 * 7
    ours = dict(variant.named_parameters())
    for name, param in packed.model.named_parameters():
        if name.removesuffix(".weight") in packed.packed.quantized:  # float16 scales: within 2^-9 of the largest weight
            torch.testing.assert_close(param, ours[name], atol=2.0**-9 * float(ours[name].abs().max()), rtol=0)
    served = _library_model("gptq", tmp_path / "packed")  # GPTQModel's own kernels run it
    ids = original.tokenizer(["Name three fruits."], return_tensors="pt")
    with torch.no_grad():
        assert torch.isfinite(served(**ids).logits).all()


def test_export_refuses_what_is_not_a_quantized_variant(ckpts, tmp_path, capsys):
    from compression.checkpoint import save_variant
    from compression.export import main as export
    from compression.variants import build_variant, parse_variant

    original = load_model(str(ckpts / "original"))
    save_variant(
        build_variant(original.model, parse_variant("magnitude:0.5")),
        original.tokenizer,
        tmp_path / "pruned",
        dict(method="magnitude", spec="magnitude:0.5", params={}),
    )
    assert export(["--variant", str(tmp_path / "pruned"), "--out", str(tmp_path / "packed")]) == 2
    assert "not a toolkit gptq / rtn variant" in _error_line(capsys) and not (tmp_path / "packed").exists()
    # A float checkpoint that claims to be RTN int4 but is not on the grid.
    save_variant(
        original.model,
        original.tokenizer,
        tmp_path / "liar",
        dict(method="rtn", spec="rtn:int4:g32", params={"bits": 4, "group_size": 32}),
    )
    assert export(["--variant", str(tmp_path / "liar"), "--out", str(tmp_path / "packed")]) == 2
    assert "not on a 4-bit grid" in _error_line(capsys) and not (tmp_path / "packed").exists()


def test_only_packed_matrices_are_stored_at_full_precision():
    """AIRD restores a whole block, biases and norms included; those are unquantized in the input already."""
    from repair.output import packed_weights

    model = build_model("qwen2", build_tokenizer("chatml"), seed=0, hidden=64, layers=1)
    masks = {
        n: torch.ones_like(p, dtype=torch.bool) for n, p in model.named_parameters() if n.startswith("model.layers.0.")
    }
    masks["model.layers.0.mlp.up_proj.weight"][:] = False  # untouched
    packed = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj"]
    assert set(packed_weights(model, masks, packed)) == {
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.mlp.down_proj",
    }


def test_anchored_search_counts_the_bytes_of_packed_matrices(ckpts):
    """On a packed checkpoint each point's cost in bytes is the net bytes of the matrices it stores at
    full precision, by the format's own accounting, and units in a matrix already paid for come first."""
    from lm.architecture import decoder_matrices
    from lm.packed.writer import full_precision_cost
    from refusal.stats import wilson
    from repair.anchor import AnchorConfig, build_anchor
    from repair.anchored import AnchoredConfig, AnchoredSearch
    from repair.front import packed_matrix_bytes
    from repair.units import layout_for

    original, packed = load_model(str(ckpts / "original")), load_model(str(ckpts / "gptq"))
    costs = packed_matrix_bytes(packed)
    assert costs and all(v > 0 for v in costs.values())
    name = next(iter(costs))
    shape = tuple(packed.model.get_parameter(name).shape)
    assert (
        costs[name]
        == full_precision_cost(ckpts / "gptq", packed.packed, {name.removesuffix(".weight"): shape})["bytes_added_net"]
    )

    anchor = build_anchor(
        original.model,
        original.tokenizer,
        AnchorConfig(n_harmful=4, n_harmless=4, reply_tokens=4, batch_size=4),
        source_layer=1,
    )
    reading = lambda k: dict(
        refusal_harmful=wilson(k, 10), refusal_harmless=wilson(0, 10), kl_original=0.1, kl_compressed=0.0
    )

    class Never:  # never reaches the original (10 of 10 refused), never hurts the harmless side
        def read(self, model):
            return type("R", (), {"to_json": lambda self: reading(0)})()

    cfg = AnchoredConfig(unit="weight", step=0.01, max_steps=2, rollback=0)
    params = dict(packed.model.named_parameters())
    layouts = {n: layout_for(n, tuple(params[n].shape), cfg.unit, 16) for n in decoder_matrices(packed.model)}
    search = AnchoredSearch(packed.model, original.model, anchor, Never(), cfg, layouts, costs)
    result = search.run(reading(10), reading(0))
    steps = [p for p in result["points"] if p["kind"] == "step"]
    assert len(steps) == 2 and steps[0]["restored"] > 0
    for p in steps:
        assert p["bytes"] == sum(costs[n] for n in p["full_precision"]) > 0
    # Byte costs: the second step prefers the matrices the first already stores at full precision.
    assert len(steps[1]["full_precision"]) < len(costs)
