"""Block-sequential compression on a model loaded with a device map (blocks spread out/offloaded).

On CPU the layouts are dicts that put some blocks on "cpu" and others on "disk" (accelerate
offload: those weights sit on the meta device between forward calls). Pruning must give exactly
the weights of the plain single-device run, and the offloaded model must run with them.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from compression.blockwise import block_linears
from compression.calibration import tokenize_calibration
from compression.sparsegpt import prune_sparsegpt
from compression.sparsity import SparsityPattern
from compression.wanda import prune_wanda
from lm.chat import format_prompts
from lm.hooks import decoder_layers
from lm.loading import load_model
from lm.placement import has_dispatch_hooks, resident
from tests.tiny import build_pair, save_tiny

PROMPTS = [
    "Describe the structure of a water molecule.",
    "Write a short poem about the sea.",
    "How do I bake bread at home?",
    "Answer the user briefly.",
]


def _layout(n_layers: int, offloaded: set[int]) -> dict:
    layout = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu"}
    layout.update({f"model.layers.{i}": "disk" if i in offloaded else "cpu" for i in range(n_layers)})
    return layout


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    model, tokenizer = build_pair("qwen2", seed=3)
    return save_tiny(tmp_path_factory.mktemp("tiny") / "model", model, tokenizer)


def _calibration(tokenizer):
    return tokenize_calibration(tokenizer, format_prompts(tokenizer, PROMPTS), seqlen=64, batch_size=2)


def _block_weights(model) -> dict[str, torch.Tensor]:
    """Every decoder linear weight as a CPU tensor, offloaded ones included."""
    out = {}
    for i, block in enumerate(decoder_layers(model)):
        with resident(block, "cpu"):
            for name, lin in block_linears(block).items():
                out[f"{i}.{name}"] = lin.weight.detach().clone()
    return out


@pytest.mark.parametrize("prune", [prune_wanda, prune_sparsegpt], ids=["wanda", "sparsegpt"])
def test_pruning_with_disk_offloaded_blocks_equals_plain_run(tiny_dir, tmp_path, prune):
    plain = load_model(str(tiny_dir))
    calib = _calibration(plain.tokenizer)
    n_layers = len(decoder_layers(plain.model))
    mapped = AutoModelForCausalLM.from_pretrained(
        tiny_dir, device_map=_layout(n_layers, {1, 3}), offload_folder=str(tmp_path)
    ).eval()
    assert has_dispatch_hooks(mapped)
    assert decoder_layers(mapped)[1].self_attn.q_proj.weight.device.type == "meta"

    pattern = SparsityPattern(ratio=0.5)
    prune(plain.model, calib, pattern)
    prune(mapped, calib, pattern)

    want, got = _block_weights(plain.model), _block_weights(mapped)
    assert set(got) == set(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name
    # Offloaded blocks stay offloaded, and the dispatched forward runs with the pruned weights.
    assert decoder_layers(mapped)[1].self_attn.q_proj.weight.device.type == "meta"
    ids = plain.tokenizer(format_prompts(plain.tokenizer, PROMPTS[:1]), return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(mapped(ids).logits, plain.model(ids).logits, rtol=1e-5, atol=1e-5)


def test_cpu_device_map_dict_through_load_model(tiny_dir):
    plain = load_model(str(tiny_dir))
    n_layers = len(decoder_layers(plain.model))
    mapped = load_model(str(tiny_dir), device_map=_layout(n_layers, set()))
    calib = _calibration(plain.tokenizer)
    prune_wanda(plain.model, calib, SparsityPattern(ratio=0.5))
    prune_wanda(mapped.model, calib, SparsityPattern(ratio=0.5))
    want, got = _block_weights(plain.model), _block_weights(mapped.model)
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_resident_restores_devices_and_hooks(tiny_dir, tmp_path):
    mapped = AutoModelForCausalLM.from_pretrained(
        tiny_dir, device_map=_layout(4, {2}), offload_folder=str(tmp_path)
    ).eval()
    block = decoder_layers(mapped)[2]
    hook = block.mlp.down_proj._hf_hook
    with resident(block, "cpu"), torch.no_grad():
        assert block.mlp.down_proj.weight.device.type == "cpu"
        assert block.mlp.down_proj._hf_hook is not hook  # switched off
        block.mlp.down_proj.weight[0, 0] = 123.0
    assert block.mlp.down_proj._hf_hook is hook
    assert block.mlp.down_proj.weight.device.type == "meta"
    assert float(hook.weights_map["weight"][0, 0]) == 123.0


def test_cpu_offloaded_weights_are_edited_in_place(tiny_dir):
    from accelerate import cpu_offload

    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    cpu_offload(model, execution_device=torch.device("cpu"))  # every weight on meta, kept in one CPU state dict
    block = decoder_layers(model)[0]
    hook = block.mlp.down_proj._hf_hook
    weights_map = hook.weights_map
    with resident(block, "cpu"), torch.no_grad():
        block.mlp.down_proj.weight[0, 0] = 7.0
    assert hook.weights_map is weights_map  # no private copy: the shared offload dict was edited
    assert float(hook.weights_map["weight"][0, 0]) == 7.0
