"""Chat formatting through the tokenizer's own chat template, and the post-instruction tokens.

The post-instruction tokens are the template tokens that follow the user's instruction (for
ChatML: `<|im_end|>\\n<|im_start|>assistant\\n`); refusal directions are read at these positions.
They are derived from the template itself, per tokenizer, never hard-coded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import UserError

_PROBE = "Describe the structure of a water molecule in detail"


def format_prompt(tokenizer, instruction: str, system: str | None = None) -> str:
    """The chat-formatted prompt text, ending where the assistant's reply begins.

    `system=None` keeps the template's default (Qwen adds its own system prompt; Llama-3 none).
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise UserError("the tokenizer has no chat template; refusal analysis needs a chat model")
    messages = [{"role": "user", "content": instruction}]
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def format_prompts(tokenizer, instructions: list[str], system: str | None = None, suffix: str = "") -> list[str]:
    return [format_prompt(tokenizer, inst + suffix, system) for inst in instructions]


@dataclass(frozen=True)
class PostInstruction:
    token_ids: tuple[int, ...]  # the template tokens after the instruction
    text: str

    @property
    def positions(self) -> list[int]:
        """Negative indices of these tokens in a left-padded batch: [-n, ..., -1]."""
        return list(range(-len(self.token_ids), 0))


def post_instruction(tokenizer, system: str | None = None) -> PostInstruction:
    """Find the tokens the template appends after the instruction, using token offsets.

    Checked on two different probe instructions so an instruction-dependent tokenization at the
    boundary is detected instead of silently giving wrong positions.
    """
    found = []
    for probe in (_PROBE, _PROBE.upper() + " now"):
        text = format_prompt(tokenizer, probe, system)
        end = text.rfind(probe)
        if end < 0:
            raise UserError("cannot locate the instruction inside the rendered chat template")
        end += len(probe)
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = [tid for tid, (start, _) in zip(enc["input_ids"], enc["offset_mapping"]) if start >= end]
        found.append((tuple(ids), text[end:]))
    if found[0] != found[1] or not found[0][0]:
        raise UserError("the chat template's post-instruction tokens depend on the instruction; cannot pick positions")
    return PostInstruction(token_ids=found[0][0], text=found[0][1])


def tokenize_prompts(tokenizer, prompts: list[str]) -> dict[str, torch.Tensor]:
    """Left-padded batch; the chat template already contains BOS/special tokens."""
    tokenizer.padding_side = "left"
    return tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
