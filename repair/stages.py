"""What the repair's stages hand each other: the diagnosis of the compressed model (the original's
direction and source, and the prompts everything is measured on) and the choice of what to restore."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import torch


def digest(obj) -> str:
    """A short key of any JSON-able value (prompts, masks, directions) for the stage caches."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Diagnosis:
    """The original's refusal direction at its source, with the selection it came from; the
    compressed model's own selection when it was run; the validation prompts the repair is judged
    on, and the refusal readings of the original and the compressed model on them."""

    selection: object  # refusal.select.SelectionResult of the original
    source: tuple[int, int]  # (position, layer)
    direction: torch.Tensor
    own_selection: object | None  # the compressed model's SelectionResult, or None
    readout_harmful: list[str]
    readout_harmless: list[str]
    orig_reading: dict
    comp_reading: dict

    @property
    def prompts(self) -> dict[str, list[str]]:
        return self.selection.prompts

    @property
    def cell(self) -> tuple[int, int]:
        """The source as (position index, layer) into the selection's direction grid."""
        return self.selection.positions.index(self.source[0]), self.source[1]

    def readout_key(self, fingerprint: str) -> dict:
        return dict(
            model=fingerprint,
            source=list(self.source),
            direction=digest(self.direction.tolist()),
            harmful=digest(self.readout_harmful),
            harmless=digest(self.readout_harmless),
        )


@dataclass(frozen=True)
class Choice:
    """AIRD's chosen block (its candidates and reading) and, when run, targeted restoration's
    attribution scores and budget search, and the front (anchored restoration and the static baseline)."""

    aird: dict
    aird_masks: dict[str, torch.Tensor]
    aird_reading: dict
    targeted: dict | None = None
    scores: dict[str, torch.Tensor] | None = None
    #: repair.front.Front: the anchored search, the static baseline, the masks of their states
    front: object | None = None
