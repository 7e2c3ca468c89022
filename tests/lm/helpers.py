"""Shared by the lm tests (and tests/refusal/test_selection.py): prompts of varied length and a
snapshot of the hooks a model has registered."""

from __future__ import annotations

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
