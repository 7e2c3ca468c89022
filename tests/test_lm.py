"""The shared model-access layer (lm/) on tiny random models: no hub, no embedded model."""

from __future__ import annotations

import json

import pytest
import torch

from lm.cache import atomic_dir, atomic_write_json
from lm.chat import format_prompt, format_prompts, post_instruction, tokenize_prompts
from lm.datasets import sample
from lm.errors import UserError
from lm.generation import SamplingConfig, generate, vllm_available
from lm.hooks import capture, decoder_layers, intervene, project_out
from lm.loading import check_model, load_model, model_fingerprint, prepare_tokenizer, resolve
from tests.tiny import DEFAULT_SYSTEM, SPECIAL_TOKENS, build_model, build_tokenizer, template_for

INSTRUCTIONS = [
    "hi",
    "Describe the structure of a water molecule in detail",
    "Write a short poem about the sea",
    "bread?",
    "How do I bake bread at home with flour, water and yeast?",
]


def hook_state(model) -> set:
    """Every registered forward (pre-)hook, by module and handle id.

    transformers 5 lazily installs its own permanent output-capturing hooks on decoder blocks
    (for output_hidden_states), so "no hooks left" means "the same hooks as before", not none.
    """
    return {
        (name, kind, key)
        for name, module in model.named_modules()
        for kind, hooks in (("pre", module._forward_pre_hooks), ("post", module._forward_hooks))
        for key in hooks
    }


def batch(model, tokenizer, instructions=INSTRUCTIONS[:3]):
    enc = tokenize_prompts(tokenizer, format_prompts(tokenizer, instructions))
    assert (enc["attention_mask"] == 0).any(), "the batch must actually contain left padding"
    return enc


def unit_direction(d_model: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(d_model, generator=g)
    return d / d.norm()


# --- tokenizer fixture sanity -------------------------------------------------------------


@pytest.mark.parametrize("template", ["chatml", "llama2"])
def test_special_tokens_are_single_ids(template):
    tokenizer = build_tokenizer(template)
    for token in SPECIAL_TOKENS:
        ids = tokenizer(token, add_special_tokens=False)["input_ids"]
        assert ids == [tokenizer.convert_tokens_to_ids(token)], token
    assert tokenizer.eos_token_id is not None and tokenizer.pad_token_id is not None


# --- loading --------------------------------------------------------------------------------


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


# --- hooks ----------------------------------------------------------------------------------


def test_capture_resid_pre_matches_hidden_states(tiny_pair):
    model, tokenizer = tiny_pair
    enc = batch(model, tokenizer)
    positions = [0, 5, -4, -1]  # 0 is a pad slot in the short rows: must still line up
    n_layers = len(decoder_layers(model))
    with torch.no_grad():
        hidden = model(**enc, output_hidden_states=True).hidden_states
    hooks_before = hook_state(model)

    got = capture(model, enc["input_ids"], enc["attention_mask"], positions)["resid_pre"]

    assert got.shape == (3, len(positions), n_layers, model.config.hidden_size)
    assert got.dtype == torch.float32
    for layer in range(n_layers):
        torch.testing.assert_close(got[:, :, layer], hidden[layer][:, positions])
    assert hook_state(model) == hooks_before


def test_capture_subset_of_layers_stops_early(tiny_pair):
    model, tokenizer = tiny_pair
    enc = batch(model, tokenizer)
    with torch.no_grad():
        hidden = model(**enc, output_hidden_states=True).hidden_states
    # Unsorted, duplicated layer lists are normalised to ascending order.
    got = capture(model, enc["input_ids"], enc["attention_mask"], [-1], layers=[2, 0, 2])["resid_pre"]
    assert got.shape[2] == 2
    torch.testing.assert_close(got[:, 0, 0], hidden[0][:, -1])
    torch.testing.assert_close(got[:, 0, 1], hidden[2][:, -1])


def test_left_padding_does_not_change_real_token_activations(tiny_pair):
    model, tokenizer = tiny_pair
    enc = batch(model, tokenizer)
    short = tokenize_prompts(tokenizer, format_prompts(tokenizer, INSTRUCTIONS[:1]))
    n = short["input_ids"].shape[1]
    alone = capture(model, short["input_ids"], short["attention_mask"], range(-n, 0))["resid_pre"][0]
    padded = capture(model, enc["input_ids"], enc["attention_mask"], range(-n, 0))["resid_pre"][0]
    # Rotary attention depends only on relative positions, so the shift from padding is invisible
    # up to float rounding.
    torch.testing.assert_close(padded, alone, rtol=1e-4, atol=1e-4)


def test_attn_and_mlp_outputs_sum_to_next_residual(tiny_pair):
    model, tokenizer = tiny_pair
    enc = batch(model, tokenizer)
    positions = list(range(-6, 0))
    hooks_before = hook_state(model)
    acts = capture(
        model, enc["input_ids"], enc["attention_mask"], positions, sites=("resid_pre", "attn_out", "mlp_out")
    )
    resid, attn, mlp = acts["resid_pre"], acts["attn_out"], acts["mlp_out"]
    for layer in range(resid.shape[2] - 1):
        torch.testing.assert_close(resid[:, :, layer + 1], resid[:, :, layer] + attn[:, :, layer] + mlp[:, :, layer])
    assert hook_state(model) == hooks_before


def test_capture_rejects_unknown_site(tiny_qwen2):
    model, tokenizer = tiny_qwen2
    enc = batch(model, tokenizer)
    hooks_before = hook_state(model)
    with pytest.raises(ValueError, match="unknown sites"):
        capture(model, enc["input_ids"], enc["attention_mask"], [-1], sites=("resid_post",))
    assert hook_state(model) == hooks_before


def test_capture_removes_hooks_when_forward_fails(tiny_qwen2):
    model, tokenizer = tiny_qwen2
    bad_ids = torch.full((1, 4), model.config.vocab_size + 10)  # out of the embedding table
    hooks_before = hook_state(model)
    with pytest.raises(IndexError):
        capture(model, bad_ids, None, [-1], sites=("resid_pre", "mlp_out"))
    assert hook_state(model) == hooks_before


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_intervene_removes_hooks_when_body_raises(arch):
    # A fresh model: no forward has run, so not even transformers' own hooks exist yet and
    # "removed" can be checked as literally empty.
    tokenizer = build_tokenizer("chatml")
    model = build_model(arch, tokenizer)
    d_model = model.config.hidden_size
    assert hook_state(model) == set()
    with pytest.raises(RuntimeError, match="boom"):
        with intervene(model, ablate=unit_direction(d_model), add={1: torch.ones(d_model)}):
            assert hook_state(model)
            raise RuntimeError("boom")
    for module in model.modules():
        assert not module._forward_pre_hooks and not module._forward_hooks


def test_intervene_removes_hooks_when_forward_fails(tiny_qwen2):
    model, _ = tiny_qwen2
    hooks_before = hook_state(model)
    with pytest.raises(IndexError):
        with intervene(model, ablate=unit_direction(model.config.hidden_size)):
            model(input_ids=torch.full((1, 3), model.config.vocab_size + 1))
    assert hook_state(model) == hooks_before


def test_ablation_zeroes_the_direction_in_every_block_input(tiny_pair):
    model, tokenizer = tiny_pair
    enc = batch(model, tokenizer)
    direction = 3.0 * unit_direction(model.config.hidden_size)  # ablation must normalise it
    unit = direction / direction.norm()
    positions = list(range(enc["input_ids"].shape[1]))

    with torch.no_grad():
        model(**enc, output_hidden_states=True)  # let transformers install its own hooks first
    hooks_before = hook_state(model)

    before = capture(model, enc["input_ids"], enc["attention_mask"], positions)["resid_pre"]
    with intervene(model, ablate=direction):
        after = capture(model, enc["input_ids"], enc["attention_mask"], positions)["resid_pre"]
        with torch.no_grad():
            hidden = model(**enc, output_hidden_states=True).hidden_states

    real = enc["attention_mask"].bool()  # pad slots embed to zero and have no direction to measure

    def relative_projection(x):
        x = x[real]  # [batch, seq, ...] -> [n_real, ...]
        return ((x @ unit).abs() / x.norm(dim=-1)).max().item()

    assert relative_projection(before) > 1e-2, "the test direction must be present to begin with"
    assert relative_projection(after) < 1e-5
    # Block outputs (the next blocks' inputs as the model itself reports them) are clean too;
    # the last entry is after the final norm, which rescales coordinates, so it is excluded.
    for h in hidden[1:-1]:
        assert relative_projection(h) < 1e-5
    assert hook_state(model) == hooks_before


def test_activation_addition_shifts_only_its_layer_input(tiny_llama):
    model, tokenizer = tiny_llama
    enc = batch(model, tokenizer)
    vector = 0.5 * unit_direction(model.config.hidden_size, seed=7)
    positions = [0, -1]
    before = capture(model, enc["input_ids"], enc["attention_mask"], positions)["resid_pre"]
    with intervene(model, add={2: vector}):
        after = capture(model, enc["input_ids"], enc["attention_mask"], positions)["resid_pre"]
    torch.testing.assert_close(after[:, :, :2], before[:, :, :2])
    torch.testing.assert_close(after[:, :, 2], before[:, :, 2] + vector)
    assert not torch.allclose(after[:, :, 3], before[:, :, 3])


def test_project_out_is_orthogonal_and_idempotent():
    x = torch.randn(5, 3, 16, generator=torch.Generator().manual_seed(0))
    d = torch.randn(16, generator=torch.Generator().manual_seed(1))
    y = project_out(x, d)
    torch.testing.assert_close(y @ (d / d.norm()), torch.zeros(5, 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(project_out(y, d), y)


# --- chat formatting ------------------------------------------------------------------------


def _expected_ids(tokenizer, suffix: str) -> tuple[int, ...]:
    return tuple(tokenizer(suffix, add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize("system", [None, "Be terse."])
def test_post_instruction_chatml(chatml_tokenizer, system):
    tok = chatml_tokenizer
    suffix = "<|im_end|>\n<|im_start|>assistant\n"
    post = post_instruction(tok, system=system)

    assert post.text == suffix
    assert post.token_ids == _expected_ids(tok, suffix)
    assert post.token_ids[0] == tok.convert_tokens_to_ids("<|im_end|>")
    assert post.token_ids[2] == tok.convert_tokens_to_ids("<|im_start|>")
    assert post.positions == list(range(-len(post.token_ids), 0))

    prompt = format_prompt(tok, "hello", system=system)
    expected_system = DEFAULT_SYSTEM if system is None else system
    assert prompt.startswith(f"<|im_start|>system\n{expected_system}<|im_end|>\n<|im_start|>user\nhello")
    assert prompt.endswith(suffix)


@pytest.mark.parametrize("system", [None, "Be terse."])
def test_post_instruction_llama2(llama2_tokenizer, system):
    tok = llama2_tokenizer
    post = post_instruction(tok, system=system)

    assert post.text == " [/INST]"
    assert post.token_ids == _expected_ids(tok, " [/INST]")
    assert post.token_ids[-1] == tok.convert_tokens_to_ids("[/INST]")
    assert format_prompt(tok, "hello", system=system).startswith("<s>[INST] ")


@pytest.mark.parametrize("template", ["chatml", "llama2"])
def test_post_instruction_positions_index_a_left_padded_batch(template):
    tok = build_tokenizer(template)
    post = post_instruction(tok)
    enc = tokenize_prompts(tok, format_prompts(tok, INSTRUCTIONS))
    assert (enc["attention_mask"] == 0).any()
    for row in enc["input_ids"]:
        assert tuple(row[post.positions].tolist()) == post.token_ids


def test_format_prompt_requires_chat_template(chatml_tokenizer):
    chatml_tokenizer.chat_template = None
    with pytest.raises(UserError, match="chat template"):
        format_prompt(chatml_tokenizer, "hi")


def test_format_prompts_appends_suffix(chatml_tokenizer):
    [prompt] = format_prompts(chatml_tokenizer, ["Tell me"], suffix=" now!!")
    assert "Tell me now!!<|im_end|>" in prompt


# --- generation -----------------------------------------------------------------------------


def test_greedy_generation_is_independent_of_batch_size(tiny_pair):
    model, tokenizer = tiny_pair
    prompts = format_prompts(tokenizer, INSTRUCTIONS)
    hooks_before = hook_state(model)
    one = generate(model, tokenizer, prompts, SamplingConfig(max_new_tokens=6, batch_size=1))
    four = generate(model, tokenizer, prompts, SamplingConfig(max_new_tokens=6, batch_size=4))
    assert one == four
    assert all(len(c) == 1 for c in one)
    assert any(c[0] for c in one), "a random model should produce some non-special text"
    assert hook_state(model) == hooks_before


def test_continuous_batching_matches_transformers_generate(tiny_pair):
    """The engine drops finished rows from the KV cache; greedy text must equal `generate`'s."""
    model, tokenizer = tiny_pair
    prompts = format_prompts(tokenizer, INSTRUCTIONS)
    cfg = dict(max_new_tokens=12, batch_size=4)
    ours = generate(model, tokenizer, prompts, SamplingConfig(backend="hf", **cfg))
    reference = generate(model, tokenizer, prompts, SamplingConfig(backend="hf-generate", **cfg))
    assert ours == reference


def _ids(tokenizer, instructions):
    return [tokenizer(p, add_special_tokens=False)["input_ids"] for p in format_prompts(tokenizer, instructions)]


def _until_stop(tokens, stops):
    return next((tokens[: i + 1] for i, t in enumerate(tokens) if t in stops), tokens)


def test_continuous_batching_drops_finished_rows(tiny_qwen2):
    from lm.continuous_batching import decode_continuous
    from lm.generation import stop_token_ids

    model, tokenizer = tiny_qwen2
    sequences = _ids(tokenizer, INSTRUCTIONS[:4])
    first = decode_continuous(model, sequences, 1, [], batch_size=4)
    # Declare row 0's first token a stop token: row 0 ends after one token, others go on.
    stops = [first[0][0]]
    out = decode_continuous(model, sequences, 8, stops, batch_size=4)
    full = decode_continuous(model, sequences, 8, [], batch_size=4)
    assert out[0] == [first[0][0]]
    # Until a row meets a stop token, its tokens equal the unstopped run's.
    assert out == [_until_stop(f, stops) for f in full]
    assert stop_token_ids(model, tokenizer)


def test_continuous_batching_admits_prompts_into_freed_rows(tiny_pair, monkeypatch):
    """Waiting prompts join a running batch as rows finish; every row's tokens equal its
    decoding alone."""
    from lm import continuous_batching as cb

    model, tokenizer = tiny_pair
    sequences = _ids(tokenizer, INSTRUCTIONS + [i + " please" for i in INSTRUCTIONS])
    alone = [cb.decode_continuous(model, [s], 10, [], batch_size=1)[0] for s in sequences]
    # Tokens some prompts produce early become stop tokens, so rows finish at different steps.
    stops = sorted({alone[0][1], alone[3][4]})
    expected = [_until_stop(a, stops) for a in alone]
    assert len({len(e) for e in expected}) > 1, "the test needs rows that finish at different steps"
    joins = []
    concat = cb.concat_caches
    monkeypatch.setattr(cb, "concat_caches", lambda *a: joins.append(1) or concat(*a))
    assert cb.decode_continuous(model, sequences, 10, stops, batch_size=3) == expected
    assert joins, "no prompt was admitted into a running batch"


def test_sampled_completions_do_not_depend_on_the_batch(tiny_qwen2):
    model, tokenizer = tiny_qwen2
    prompts = format_prompts(tokenizer, INSTRUCTIONS)
    cfg = dict(max_new_tokens=6, temperature=1.0, n_samples=2, seed=3, backend="hf")
    one = generate(model, tokenizer, prompts, SamplingConfig(batch_size=1, **cfg))
    three = generate(model, tokenizer, prompts, SamplingConfig(batch_size=3, **cfg))
    assert one == three
    assert any(c[0] != c[1] for c in one), "two samples of a prompt should differ somewhere"


def test_sampling_is_reproducible_with_a_seed(tiny_qwen2):
    model, tokenizer = tiny_qwen2
    prompts = format_prompts(tokenizer, INSTRUCTIONS[:3])
    cfg = SamplingConfig(max_new_tokens=6, temperature=1.0, n_samples=2, seed=5, batch_size=2)
    first = generate(model, tokenizer, prompts, cfg)
    # Something else consuming the global RNG in between must not matter.
    torch.rand(10)
    second = generate(model, tokenizer, prompts, cfg)
    assert first == second
    assert len(first) == 3 and all(len(c) == 2 for c in first)


def test_generate_auto_batch_size_runs(tiny_llama):
    model, tokenizer = tiny_llama
    prompts = format_prompts(tokenizer, INSTRUCTIONS[:2])
    out = generate(model, tokenizer, prompts, SamplingConfig(max_new_tokens=2))
    assert len(out) == 2


def test_generate_rejects_empty_prompt_list(tiny_qwen2):
    model, tokenizer = tiny_qwen2
    with pytest.raises(UserError, match="no prompts"):
        generate(model, tokenizer, [], SamplingConfig(max_new_tokens=2))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(max_new_tokens=0), "positive"),
        (dict(n_samples=0, temperature=1.0), "positive"),
        (dict(temperature=-0.1), "temperature"),
        (dict(n_samples=3), "greedy"),
        (dict(backend="tgi"), "backend"),
    ],
)
def test_sampling_config_validation(kwargs, message):
    with pytest.raises(UserError, match=message):
        SamplingConfig(**kwargs)


def test_vllm_backend_without_vllm_is_a_user_error(tiny_qwen2):
    if vllm_available():
        pytest.skip("vllm is installed")
    model, tokenizer = tiny_qwen2
    prompts = format_prompts(tokenizer, ["hi"])
    with pytest.raises(UserError, match="vllm"):
        generate(model, tokenizer, prompts, SamplingConfig(max_new_tokens=2, backend="vllm"))


# --- cache and data helpers -----------------------------------------------------------------


def test_atomic_dir_leaves_nothing_on_failure(tmp_path):
    final = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_dir(final) as tmp:
            (tmp / "half.txt").write_text("partial")
            raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []

    with atomic_dir(final) as tmp:
        atomic_write_json(tmp / "done.json", {"ok": True})
    assert json.loads((final / "done.json").read_text()) == {"ok": True}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_sigterm_during_an_atomic_write_leaves_nothing(tmp_path):
    """An entry point stopped with SIGTERM (kill, a scheduler, a CI timeout) unwinds its atomic writes."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    script = tmp_path / "job.py"
    script.write_text(
        "import sys, time\n"
        "from pathlib import Path\n"
        "from lm.cache import atomic_dir\n"
        "from lm.errors import cli\n"
        "@cli\n"
        "def main(argv=None):\n"
        f"    with atomic_dir(Path({str(tmp_path / 'run' / 'stage')!r})) as tmp:\n"
        "        (tmp / 'half.safetensors').write_text('partial')\n"
        "        print('started', flush=True)\n"
        "        time.sleep(60)\n"
        "    return 0\n"
        "sys.exit(main())\n"
    )
    proc = subprocess.Popen(
        [sys.executable, str(script)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parents[1],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])},
    )
    assert proc.stdout.readline().strip() == "started"
    assert len(list((tmp_path / "run").iterdir())) == 1  # the temporary directory, mid-write
    start = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    assert time.monotonic() - start < 30
    assert list((tmp_path / "run").iterdir()) == []


def test_sample_is_seeded_and_validated():
    items = list(range(50))
    assert sample(items, 10, seed=1) == sample(items, 10, seed=1)
    assert sample(items, None, seed=1) == items
    with pytest.raises(UserError):
        sample([], 3, seed=0)
    with pytest.raises(UserError):
        sample(items, 0, seed=0)


def test_foreign_hooks_ignore_transformers_output_capturing(tiny_llama):
    from lm.hooks import foreign_hooks

    model, tok = tiny_llama
    enc = tok(["hello there"], return_tensors="pt")
    with torch.no_grad():
        model(**enc, output_hidden_states=True)  # transformers may leave its recording hooks installed
    assert foreign_hooks(model) == []
    handle = decoder_layers(model)[0].register_forward_hook(lambda *a: None)
    try:
        assert len(foreign_hooks(model)) == 1
    finally:
        handle.remove()


def test_gradients_only_for_freezes_the_rest_and_restores_flags_and_mode():
    from lm.trainable import gradients_only_for

    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Dropout(0.5), torch.nn.Linear(3, 1))
    model.train()
    model[2].bias.requires_grad_(False)  # a caller's own frozen flag must survive
    with torch.no_grad(), gradients_only_for(model, [model[0].weight]):
        assert not model.training
        model(torch.ones(2, 3)).sum().backward()
    assert model[0].weight.grad is not None
    assert all(p.grad is None for p in (model[0].bias, model[2].weight, model[2].bias))
    assert model.training and [p.requires_grad for p in model.parameters()] == [True, True, True, False]
