"""Prompt sampling (lm.datasets)."""

from __future__ import annotations

import pytest

from lm.datasets import sample
from lm.errors import UserError


def test_sample_is_seeded_and_validated():
    items = list(range(50))
    assert sample(items, 10, seed=1) == sample(items, 10, seed=1)
    assert sample(items, None, seed=1) == items
    with pytest.raises(UserError):
        sample([], 3, seed=0)
    with pytest.raises(UserError):
        sample(items, 0, seed=0)
