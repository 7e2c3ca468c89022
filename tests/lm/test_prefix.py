"""The shared-prefix KV cache (lm.prefix) gives the activations of the plain left-padded pass."""

from __future__ import annotations

import torch

from lm.chat import format_prompts, post_instruction, tokenize_prompts
from lm.hooks import capture
from lm.prefix import SharedPrefix, common_prefix_length
from refusal.direction import mean_activations

INSTRUCTIONS = [
    "Describe the structure of a water molecule in detail.",
    "Write a poem.",
    "How do I bake bread at home? Mix flour, water and yeast.",
    "Answer briefly.",
]


def test_common_prefix_length():
    assert common_prefix_length([[1, 2, 3], [1, 2, 4, 5], [1, 2]]) == 2
    assert common_prefix_length([[1, 2], [3]]) == 0
    assert common_prefix_length([]) == 0


def test_build_leaves_the_requested_suffix():
    class Never:  # build must not run a model when there is nothing to share
        def parameters(self):
            raise AssertionError("no forward expected")

    assert SharedPrefix.build(Never(), [[1, 2, 3], [4, 5]]) is None
    assert SharedPrefix.build(Never(), [[1, 2, 3], [1, 2, 3]], keep_last=3) is None


def test_capture_with_shared_prefix_matches_padded_pass(tiny_pair):
    model, tok = tiny_pair
    prompts = format_prompts(tok, INSTRUCTIONS)
    positions = post_instruction(tok).positions
    sequences = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    prefix = SharedPrefix.build(model, sequences, keep_last=len(positions))
    assert prefix is not None and prefix.length >= 2
    enc = tokenize_prompts(tok, prompts)
    want = capture(model, enc["input_ids"], enc["attention_mask"], positions)["resid_pre"]
    kwargs = prefix.batch(model, sequences, tok.pad_token_id)
    ids, mask = kwargs.pop("input_ids"), kwargs.pop("attention_mask")
    assert ids.shape[1] < enc["input_ids"].shape[1]  # only the suffixes run
    got = capture(model, ids, mask, positions, forward_kwargs=kwargs)["resid_pre"]
    # Float rounding only (the tiny models' wide random weights amplify it to ~3e-5); a wrong
    # mask or position would be off by O(1).
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_mean_activations_unchanged_by_prefix_and_order(tiny_pair):
    model, tok = tiny_pair
    positions = post_instruction(tok).positions
    enc = tokenize_prompts(tok, format_prompts(tok, INSTRUCTIONS))
    plain = capture(model, enc["input_ids"], enc["attention_mask"], positions)["resid_pre"].double().mean(0).float()
    for batch_size in (1, 3):
        torch.testing.assert_close(
            mean_activations(model, tok, INSTRUCTIONS, batch_size=batch_size), plain, rtol=1e-4, atol=1e-4
        )
