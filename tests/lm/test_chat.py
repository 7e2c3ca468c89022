"""Chat formatting (lm.chat) on the tiny offline tokenizers, and those tokenizers' special tokens."""

from __future__ import annotations

import pytest

from lm.chat import format_prompt, format_prompts, post_instruction, tokenize_prompts
from lm.errors import UserError
from tests.lm.helpers import INSTRUCTIONS
from tests.tiny import DEFAULT_SYSTEM, SPECIAL_TOKENS, build_tokenizer

# --- tokenizer fixture sanity -------------------------------------------------------------


@pytest.mark.parametrize("template", ["chatml", "llama2"])
def test_special_tokens_are_single_ids(template):
    tokenizer = build_tokenizer(template)
    for token in SPECIAL_TOKENS:
        ids = tokenizer(token, add_special_tokens=False)["input_ids"]
        assert ids == [tokenizer.convert_tokens_to_ids(token)], token
    assert tokenizer.eos_token_id is not None and tokenizer.pad_token_id is not None


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
