"""Variant specs ('wanda:0.5', 'wanda:2:4', 'magnitude:0.5', 'rtn:int8', 'rtn:int4:g32') and building them."""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field

from lm.errors import UserError

from .calibration import Calibration
from .magnitude import prune_magnitude
from .rtn import QuantConfig, quantize_model_rtn
from .sparsity import SparsityPattern
from .wanda import prune_wanda

METHODS = ("original", "wanda", "magnitude", "rtn")
NEEDS_CALIBRATION = ("wanda",)


@dataclass(frozen=True)
class VariantSpec:
    method: str
    params: dict = field(default_factory=dict, hash=False, compare=True)
    text: str = ""

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9._-]+", "-", self.text).strip("-") or self.method

    @property
    def needs_calibration(self) -> bool:
        return self.method in NEEDS_CALIBRATION


def parse_variant(text: str) -> VariantSpec:
    text = text.strip()
    method, _, arg = text.partition(":")
    if method == "original":
        return VariantSpec("original", {}, "original")
    if method in ("wanda", "magnitude"):
        if not arg:
            raise UserError(f"variant {text!r}: give a sparsity, e.g. {method}:0.5 or {method}:2:4")
        pattern = SparsityPattern.parse(arg)
        return VariantSpec(method, {"sparsity": str(pattern), "ratio": pattern.ratio, "n": pattern.n, "m": pattern.m}, text)
    if method == "rtn":
        m = re.fullmatch(r"int([2-8])(?::g(\d+|row))?", arg)
        if not m:
            raise UserError(f"variant {text!r}: use rtn:int8, rtn:int4 or rtn:int4:g32 (group size, or g'row')")
        group = None if m.group(2) == "row" else int(m.group(2) or 128)
        return VariantSpec("rtn", {"bits": int(m.group(1)), "group_size": group}, text)
    raise UserError(f"unknown variant {text!r}; methods: {', '.join(METHODS)}")


def build_variant(model, spec: VariantSpec, calibration: Calibration | None = None):
    """A compressed deep copy of `model` (the original is left untouched)."""
    if spec.method == "original":
        return model
    variant = copy.deepcopy(model)
    if spec.method == "wanda":
        if calibration is None:
            raise UserError("Wanda needs calibration data")
        prune_wanda(variant, calibration, SparsityPattern(spec.params["ratio"], spec.params["n"], spec.params["m"]))
    elif spec.method == "magnitude":
        prune_magnitude(variant, SparsityPattern(spec.params["ratio"], spec.params["n"], spec.params["m"]))
    elif spec.method == "rtn":
        quantize_model_rtn(variant, QuantConfig(spec.params["bits"], spec.params["group_size"]))
    return variant
