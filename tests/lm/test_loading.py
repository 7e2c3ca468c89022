"""Loading models and tokenizers (lm.loading) from tiny saved checkpoints."""

from __future__ import annotations

import json

import pytest
import torch

from lm.chat import format_prompts, tokenize_prompts
from lm.errors import UserError
from lm.hooks import decoder_layers
from lm.loading import check_model, load_model, model_fingerprint, prepare_tokenizer, resolve
from tests.lm.helpers import INSTRUCTIONS
from tests.tiny import build_model, build_tokenizer, template_for


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_load_model_round_trip_gives_identical_logits(tiny_model_dir, arch):
    path = tiny_model_dir(arch, seed=3)
    tokenizer = build_tokenizer(template_for(arch))
    original = build_model(arch, tokenizer, seed=3)

    loaded = load_model(str(path))

    assert loaded.name == path.name and loaded.path == str(path)
    assert loaded.tokenizer.padding_side == "left"
    assert not loaded.model.training
    assert model_fingerprint(loaded.model) == model_fingerprint(original)
    prompts = format_prompts(tokenizer, INSTRUCTIONS[:3])
    assert format_prompts(loaded.tokenizer, INSTRUCTIONS[:3]) == prompts
    enc = tokenize_prompts(tokenizer, prompts)
    enc_loaded = tokenize_prompts(loaded.tokenizer, prompts)
    assert torch.equal(enc["input_ids"], enc_loaded["input_ids"])
    with torch.no_grad():
        expected = original(**enc).logits
        got = loaded.model(**enc_loaded).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_load_model_rejects_unknown_dtype(tiny_model_dir):
    with pytest.raises(UserError, match="dtype"):
        load_model(str(tiny_model_dir()), dtype="int3")


def test_resolve_missing_paths(tmp_path):
    with pytest.raises(UserError, match="not found"):
        resolve(str(tmp_path / "nope"))
    with pytest.raises(UserError, match="not found"):
        resolve("./definitely-not-here")
    with pytest.raises(UserError, match="GGUF file not found"):
        resolve(str(tmp_path / "model.gguf"))


def test_resolve_hub_id_passes_through():
    assert resolve("some-org/some-model") == ("some-org/some-model", "some-org/some-model")


def test_resolve_rejects_non_model_directories(tmp_path):
    file = tmp_path / "weights.txt"
    file.write_text("x")
    with pytest.raises(UserError, match="not a model directory"):
        resolve(str(file))

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="config.json"):
        resolve(str(empty))


def test_resolve_refuses_pickle_only_checkpoint(tmp_path):
    d = tmp_path / "pickled"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(UserError, match="safetensors"):
        resolve(str(d))
    with pytest.raises(UserError, match="safetensors"):
        load_model(str(d))


def test_missing_tokenizer_is_a_user_error(tiny_model_dir):
    path = tiny_model_dir()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (path / name).unlink()
    # Without this check transformers 5 returns an empty tokenizer that encodes text to [].
    with pytest.raises(UserError, match="no tokenizer"):
        load_model(str(path))


def test_malformed_tokenizer_is_a_user_error(tiny_model_dir):
    path = tiny_model_dir()
    (path / "tokenizer.json").write_text("{not json")
    with pytest.raises(UserError, match="tokenizer"):
        load_model(str(path))


def test_corrupt_safetensors_is_a_user_error(tiny_model_dir):
    path = tiny_model_dir()
    (path / "model.safetensors").write_bytes(b"garbage" * 16)
    with pytest.raises(UserError, match="cannot load weights"):
        load_model(str(path))


def _poison(value):
    def mutate(model):
        with torch.no_grad():
            decoder_layers(model)[1].mlp.up_proj.weight[0, 0] = value

    return mutate


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_rejected(tiny_model_dir, value):
    path = tiny_model_dir("llama", mutate=_poison(value))
    with pytest.raises(UserError, match=r"non-finite.*layers\.1\.mlp\.up_proj"):
        load_model(str(path))


def test_check_model_rejects_unsupported_layout():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50, n_positions=32))
    with pytest.raises(UserError, match="unsupported architecture"):
        check_model(gpt2, "gpt2-tiny")


def test_prepare_tokenizer_falls_back_to_eos_for_padding():
    tokenizer = build_tokenizer("llama2")
    tokenizer.pad_token = None
    tokenizer.padding_side = "right"
    prepare_tokenizer(tokenizer)
    assert tokenizer.pad_token == tokenizer.eos_token
    assert tokenizer.padding_side == "left"
