"""Variant specs ('wanda:0.5', 'wanda:2:4', 'sparsegpt:0.5', 'sparsegpt:2:4', 'snip:0.5', 'magnitude:0.5',
'rtn:int8', 'rtn:int4:g32', 'gptq:int4', 'gptq:int8', 'gptq:int4:g32', 'torchao:int8') and building them.

Two kinds of calibration: Wanda and SparseGPT read layer inputs on chat-formatted prompts
(`Calibration`); SNIP needs gradients of a loss on responses, so it takes (prompt, response) pairs
(`ResponseCalibration`, the model's own greedy replies to harmless instructions).

Wei et al.'s safety attribution ('setdiff-wanda:p=0.03,q=0.03', 'setdiff-snip:p=..,q=..',
'top-wanda:0.03', 'top-snip:0.03', 'random:0.03', 'actsvd:r=10', 'actsvd-orth:ru=..,rs=..'; grammar
in compression/attribution_variants.py) take `safety=` (the model's own refusals) and, for set
differences and orthogonal projection, `utility=` data, both ResponseCalibration
(compression.attribution.safety_calibration / utility_calibration). `scores_dir=` caches their
importance scores per (model fingerprint, method, data set, data digest).
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field

from lm.errors import UserError

from . import attribution_variants
from .calibration import Calibration, ResponseCalibration
from .gptq import GPTQConfig, quantize_gptq
from .int8_weight_only import quantize_int8_weight_only, torchao_quantization
from .magnitude import prune_magnitude
from .rtn import QuantConfig, quantize_model_rtn
from .snip import prune_snip, snip_scores_one_pass
from .sparsegpt import SparseGPTConfig, prune_sparsegpt
from .sparsity import SparsityPattern
from .wanda import prune_wanda

METHODS = ("original", "wanda", "sparsegpt", "snip", "magnitude", "rtn", "gptq", "torchao")
PRUNERS = ("wanda", "sparsegpt", "snip", "magnitude")
NEEDS_CALIBRATION = ("wanda", "sparsegpt", "gptq")  # prompt calibration (`calibration=`)
NEEDS_RESPONSES = ("snip",)  # (prompt, response) calibration (`responses=`)
METHODS += attribution_variants.METHODS  # safety attribution (`safety=`, `utility=`)


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

    @property
    def needs_responses(self) -> bool:
        return self.method in NEEDS_RESPONSES

    @property
    def needs_safety(self) -> bool:
        return self.method in attribution_variants.NEEDS_SAFETY

    @property
    def needs_utility(self) -> bool:
        return self.method in attribution_variants.NEEDS_UTILITY

    @property
    def pattern(self) -> SparsityPattern:
        return SparsityPattern(self.params["ratio"], self.params["n"], self.params["m"])


def parse_variant(text: str) -> VariantSpec:
    text = text.strip()
    method, _, arg = text.partition(":")
    if method == "original":
        return VariantSpec("original", {}, "original")
    if method in PRUNERS:
        if not arg:
            raise UserError(f"variant {text!r}: give a sparsity, e.g. {method}:0.5 or {method}:2:4")
        pattern = SparsityPattern.parse(arg)
        if method == "sparsegpt":
            SparseGPTConfig().validate_for(pattern)  # e.g. 2:3 does not tile 128-column blocks
        return VariantSpec(method, {"sparsity": str(pattern), "ratio": pattern.ratio, "n": pattern.n, "m": pattern.m}, text)
    if method in ("rtn", "gptq"):  # one grammar, so GPTQ and RTN variants name the same grids
        m = re.fullmatch(r"int([2-8])(?::g(\d+|row))?", arg)
        if not m:
            raise UserError(f"variant {text!r}: use {method}:int8, {method}:int4 or {method}:int4:g32 (group size, or g'row')")
        group = None if m.group(2) == "row" else int(m.group(2) or 128)
        QuantConfig(int(m.group(1)), group)  # e.g. g0: fail here, not after the run has started
        return VariantSpec(method, {"bits": int(m.group(1)), "group_size": group}, text)
    if method == "torchao":  # real int8 weights at evaluation time; only int8 has a CPU kernel in torchao
        if arg != "int8":
            raise UserError(f"variant {text!r}: use torchao:int8 (int8 weight-only, one scale per output row)")
        torchao_quantization()  # missing extra: fail before the run starts
        return VariantSpec(method, {"bits": 8, "group_size": None, "backend": "torchao-int8-weight-only"}, text)
    if method in attribution_variants.METHODS:
        return VariantSpec(method, attribution_variants.parse_params(method, arg, text), text)
    raise UserError(f"unknown variant {text!r}; methods: {', '.join(METHODS)}")


def validate_variant(spec: VariantSpec, model) -> None:
    """Check a spec against the model's layer widths before any work starts (N:M, group size)."""
    from lm.hooks import decoder_layers

    from .blockwise import block_linears

    widths = {lin.in_features for lin in block_linears(decoder_layers(model)[0]).values()}
    try:
        if spec.method in PRUNERS:
            spec.pattern.validate_for(model)
        group = spec.params.get("group_size")
        if group and any(w % group for w in widths):
            raise UserError(f"group size {group} does not divide the layer widths {sorted(widths)}")
    except UserError as e:
        raise UserError(f"variant {spec.text!r}: {e}") from None


def build_variant(model, spec: VariantSpec, calibration: Calibration | None = None, **data):
    """A compressed deep copy of `model`; see build_variant_with_report for the keyword data."""
    return build_variant_with_report(model, spec, calibration, **data)[0]


def build_variant_with_report(model, spec: VariantSpec, calibration: Calibration | None = None, *, responses: ResponseCalibration | None = None,
                  safety: ResponseCalibration | None = None, utility: ResponseCalibration | None = None, scores_dir=None):
    """(compressed deep copy of `model`, report of what was removed); the original is left untouched.

    The report holds what a method measures while compressing (e.g. the realised fraction a set
    difference removed, which is below q, or the ranks ActSVD took out); {} for the others.
    """
    if spec.method == "original":
        return model, {}
    if spec.needs_calibration and calibration is None:
        raise UserError(f"{spec.text} needs calibration data")
    if spec.needs_responses and responses is None:
        raise UserError(f"{spec.text} needs (prompt, response) calibration: pass responses=response_calibration_set(...)")
    if spec.needs_safety and safety is None:
        raise UserError(f"{spec.text} needs safety data (the model's own refusals): pass safety=attribution.safety_calibration(...)")
    if spec.needs_utility and utility is None:
        raise UserError(f"{spec.text} needs utility data (the model's own helpful replies): pass utility=attribution.utility_calibration(...)")
    variant = copy.deepcopy(model)
    if spec.method in attribution_variants.METHODS:
        return variant, attribution_variants.apply_variant(variant, model, spec.method, spec.params, safety, utility, scores_dir)
    if spec.method == "wanda":
        prune_wanda(variant, calibration, spec.pattern)
    elif spec.method == "sparsegpt":
        prune_sparsegpt(variant, calibration, spec.pattern)
    elif spec.method == "snip":
        # All layers at once from the original model's scores, as Wei et al. prune.
        prune_snip(variant, snip_scores_one_pass(variant, responses.batches), spec.pattern)
    elif spec.method == "magnitude":
        prune_magnitude(variant, spec.pattern)
    elif spec.method == "rtn":
        quantize_model_rtn(variant, QuantConfig(spec.params["bits"], spec.params["group_size"]))
    elif spec.method == "gptq":
        quantize_gptq(variant, calibration, GPTQConfig(spec.params["bits"], spec.params["group_size"]))
    elif spec.method == "torchao":
        quantize_int8_weight_only(variant)
    return variant, {}
