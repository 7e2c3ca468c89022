"""benchmarks.scale (the 7B GPU run) exercised at the tiny shape on CPU: every stage, the table, the JSON."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from benchmarks.scale import SHAPES, ScaleConfig, chat_shaped_prompts, main

TINY = [
    "--shape",
    "tiny",
    "--device",
    "cpu",
    "--dtype",
    "float32",
    "--calib-samples",
    "4",
    "--calib-seqlen",
    "16",
    "--calib-batch",
    "2",
    "--snip-samples",
    "2",
    "--snip-seqlen",
    "16",
    "--gen-prompts",
    "5",
    "--gen-new-tokens",
    "4",
    "--gen-batch",
    "2",
]


def test_tiny_run_times_every_stage(tmp_path, capsys):
    raw, results = tmp_path / "rows.json", tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\nkept\n")
    assert main(TINY + ["--json", str(raw), "--results", str(results)]) == 0
    rows = json.loads(raw.read_text())["rows"]
    assert [r["stage"].split(",")[0] for r in rows] == ["Wanda 50%", "SparseGPT 50%", "SNIP scores", "generation"]
    # A random model never stops early: every prompt gets all its new tokens.
    assert rows[-1]["tokens"] == 5 * 4
    assert all(r["seconds"] > 0 for r in rows)
    text = results.read_text()
    assert text.startswith("# Benchmark results\n\nkept\n") and "| SNIP scores, 2 samples x 16 tokens |" in text
    assert "| generation, 5 x 4 tokens, default decoder |" in capsys.readouterr().out


def test_prompts_share_a_template_prefix_and_pad_left():
    cfg = ScaleConfig(shape="tiny", device="cpu", gen_prompts=6)
    prompts = chat_shaped_prompts(cfg, 512)
    assert (
        len(prompts) == 6 and len({tuple(p[:24]) for p in prompts}) == 1 and len({tuple(p[-5:]) for p in prompts}) == 1
    )
    assert all(24 + 10 + 5 <= len(p) <= 24 + 35 + 5 for p in prompts)


def test_llama_2_7b_shape():
    with torch.device("meta"):
        params = sum(
            p.numel() for p in AutoModelForCausalLM.from_config(LlamaConfig(**SHAPES["llama-2-7b"])).parameters()
        )
    assert 6.7e9 < params < 6.8e9  # Llama-2-7B: 6.74B


@pytest.mark.parametrize(
    "bad", [["--gen-prompts", "0"], ["--device", "cuda"] if not torch.cuda.is_available() else ["--gen-batch", "-1"]]
)
def test_bad_input_is_one_line(bad, capsys):
    assert main(TINY + bad) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ")
