"""Variant specs ('wanda:0.5', 'wanda:2:4', 'sparsegpt:0.5', 'sparsegpt:2:4', 'snip:0.5', 'magnitude:0.5',
'rtn:int8', 'rtn:int4:g32', 'gptq:int4', 'gptq:int8', 'gptq:int4:g32', 'torchao:int8', and 'path:DIR' for a
checkpoint compressed elsewhere, float or packed) and building them.

Two kinds of calibration: Wanda and SparseGPT read layer inputs on chat-formatted prompts
(`Calibration`); SNIP needs gradients of a loss on responses, so it takes (prompt, response) pairs
(`ResponseCalibration`, the model's own greedy replies to harmless instructions).

Wei et al.'s safety attribution ('setdiff-wanda:p=0.03,q=0.03', 'setdiff-snip:p=..,q=..',
'top-wanda:0.03', 'top-snip:0.03', 'random:0.03', 'actsvd:r=10', 'actsvd-orth:ru=..,rs=..'; grammar
in compression/attribution_variants.py) take `safety=` (the model's own refusals) and, for set
differences and orthogonal projection, `utility=` data, both ResponseCalibration
(compression.attribution.safety_calibration / utility_calibration). `scores_dir=` caches their
importance scores per (model fingerprint, method, data set, data digest).

Every method is one line of `REGISTRY`: its spec grammar (spec text -> params), what data it needs
and how it compresses a copy of the model; the algorithm itself lives in its own module. Adding a
compression method is a module and a line here.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

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

DATA_KINDS = ("calibration", "responses", "safety", "utility")
_DATA_HELP = {
    "calibration": "calibration data",
    "responses": "(prompt, response) calibration: pass responses=response_calibration_set(...)",
    "safety": "safety data (the model's own refusals): pass safety=attribution.safety_calibration(...)",
    "utility": "utility data (the model's own helpful replies): pass utility=attribution.utility_calibration(...)",
}


@dataclass(frozen=True)
class VariantData:
    """What a method may read besides the model: prompt calibration (Wanda, SparseGPT, GPTQ),
    (prompt, response) pairs (SNIP), the model's own refusals and helpful replies (Wei et al.)."""

    calibration: Calibration | None = None
    responses: ResponseCalibration | None = None
    safety: ResponseCalibration | None = None
    utility: ResponseCalibration | None = None
    scores_dir: object = None  # where attribution importance scores are cached (None: not cached)


@dataclass(frozen=True)
class Method:
    """One compression method: `parse(arg, text)` turns the part of the spec after 'method:' into
    JSON-able params (recorded in manifests and cache keys); `build(variant, original, spec, data)`
    compresses `variant`, a deep copy of `original`, in place and returns what it removed ({} if
    nothing to report); `needs` names the VariantData fields it reads."""

    name: str
    parse: Callable[[str, str], dict]
    build: Callable[..., dict | None]
    needs: tuple[str, ...] = ()


@dataclass(frozen=True)
class VariantSpec:
    method: str
    params: dict = field(default_factory=dict, hash=False, compare=True)
    text: str = ""

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9._-]+", "-", self.text).strip("-") or self.method

    @property
    def label(self) -> str:
        """A name for readers ("Wanda 50%", "GPTQ int4 g128", "set difference (Wanda) p = q = 1%");
        reports show it beside the spec, which stays the variant's id."""
        name, p = _DISPLAY.get(self.method, self.method), self.params
        if self.method == "original":
            return "original"
        if "ratio" in p:
            return f"{name} {p['n']}:{p['m']}" if p.get("n") else f"{name} {p['ratio']:.0%}"
        if "bits" in p:
            return f"{name} int{p['bits']}" + (" per row" if p.get("group_size") is None else f" g{p['group_size']}")
        if self.method == "path":
            return f"checkpoint {Path(p['path']).name}"
        if "p" in p and "q" in p:
            share = f"p = q = {p['p']:.0%}" if p["p"] == p["q"] else f"p = {p['p']:.0%}, q = {p['q']:.0%}"
            return f"{name} ({p['scores'].replace('wanda', 'Wanda').replace('snip', 'SNIP')}) {share}"
        if "fraction" in p:
            return f"{name} {p['fraction']:.0%}"
        ranks = ", ".join(f"{k} = {p[k]}" for k in ("r", "ru", "rs") if k in p)
        return f"{name} {ranks}".strip()

    @property
    def needs(self) -> tuple[str, ...]:
        return REGISTRY[self.method].needs

    @property
    def needs_calibration(self) -> bool:
        return "calibration" in self.needs

    @property
    def needs_responses(self) -> bool:
        return "responses" in self.needs

    @property
    def needs_safety(self) -> bool:
        return "safety" in self.needs

    @property
    def needs_utility(self) -> bool:
        return "utility" in self.needs

    @property
    def pattern(self) -> SparsityPattern:
        return SparsityPattern(self.params["ratio"], self.params["n"], self.params["m"])


# How reports name each method (VariantSpec.label).
_DISPLAY = {
    "wanda": "Wanda",
    "sparsegpt": "SparseGPT",
    "snip": "SNIP",
    "magnitude": "magnitude",
    "rtn": "RTN",
    "gptq": "GPTQ",
    "torchao": "torchao",
    "setdiff-wanda": "set difference",
    "setdiff-snip": "set difference",
    "top-wanda": "top Wanda",
    "top-snip": "top SNIP",
    "random": "random",
    "actsvd": "ActSVD",
    "actsvd-orth": "ActSVD (orthogonal)",
}


# --- spec grammars ------------------------------------------------------------------------------


def _pruning(method: str, check: Callable[[SparsityPattern], None] | None = None) -> Callable[[str, str], dict]:
    """'<method>:0.5' (unstructured) or '<method>:2:4' (N:M)."""

    def parse(arg: str, text: str) -> dict:
        if not arg:
            raise UserError(f"variant {text!r}: give a sparsity, e.g. {method}:0.5 or {method}:2:4")
        try:
            pattern = SparsityPattern.parse(arg)
        except UserError as e:
            raise UserError(f"variant {text!r}: {e}") from None
        if check is not None:
            check(pattern)
        return {"sparsity": str(pattern), "ratio": pattern.ratio, "n": pattern.n, "m": pattern.m}

    return parse


def _quantization(method: str) -> Callable[[str, str], dict]:
    """'<method>:int8', '<method>:int4' (group 128), '<method>:int4:g32', '<method>:int4:grow' (per row);
    one grammar, so GPTQ and RTN variants name the same grids."""

    def parse(arg: str, text: str) -> dict:
        m = re.fullmatch(r"int([2-8])(?::g(\d+|row))?", arg)
        if not m:
            raise UserError(
                f"variant {text!r}: use {method}:int8, {method}:int4 or {method}:int4:g32 (group size, or g'row')"
            )
        group = None if m.group(2) == "row" else int(m.group(2) or 128)
        QuantConfig(int(m.group(1)), group)  # e.g. g0: fail here, not after the run has started
        return {"bits": int(m.group(1)), "group_size": group}

    return parse


def _torchao(arg: str, text: str) -> dict:
    # Real int8 weights at evaluation time; only int8 has a CPU kernel in torchao.
    if arg != "int8":
        raise UserError(f"variant {text!r}: use torchao:int8 (int8 weight-only, one scale per output row)")
    torchao_quantization()  # missing extra: fail before the run starts
    return {"bits": 8, "group_size": None, "backend": "torchao-int8-weight-only"}


def _checkpoint(arg: str, text: str) -> dict:
    """'path:DIR', a checkpoint compressed elsewhere (float, or packed: GPTQ, bitsandbytes). Its files'
    names, sizes and modification times stand in for its content in the params (cache keys)."""
    from lm.loading import resolve

    if not arg:
        raise UserError(f"variant {text!r}: give the checkpoint directory, e.g. path:./my-gptq-model")
    path, _ = resolve(arg)
    files = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in Path(path).iterdir() if f.is_file())
    return {"path": str(Path(path).resolve()), "files_sha256": hashlib.sha256(json.dumps(files).encode()).hexdigest()}


def _load_checkpoint(variant, spec: VariantSpec) -> dict:
    """The checkpoint's (dequantized) weights copied into `variant`; the report says how it is stored."""
    from lm.loading import load_model

    loaded = load_model(spec.params["path"], dtype=next(variant.parameters()).dtype)
    try:
        variant.load_state_dict(loaded.model.state_dict(), strict=True)
    except RuntimeError as e:
        raise UserError(
            f"variant {spec.text!r}: its weights do not fit the base model ({str(e).splitlines()[1].strip()})"
        ) from None
    return {"stored": loaded.packed.describe() if loaded.packed is not None else "float"}


def _no_arguments(arg: str, text: str) -> dict:
    if arg:
        raise UserError(f"variant {text!r}: 'original' takes no arguments")
    return {}


def _attribution(method: str) -> Method:
    return Method(
        method,
        lambda arg, text: attribution_variants.parse_params(method, arg, text),
        lambda v, o, s, d: attribution_variants.apply_variant(
            v, o, s.method, s.params, d.safety, d.utility, d.scores_dir
        ),
        ("safety",) + (("utility",) if method in attribution_variants.NEEDS_UTILITY else ())
        if method in attribution_variants.NEEDS_SAFETY
        else (),
    )


# --- the registry: one line per method ----------------------------------------------------------

REGISTRY: dict[str, Method] = {
    m.name: m
    for m in (
        Method("original", _no_arguments, lambda v, o, s, d: {}),
        Method(
            "wanda", _pruning("wanda"), lambda v, o, s, d: prune_wanda(v, d.calibration, s.pattern), ("calibration",)
        ),
        # SparseGPT checks the pattern tiles its 128-column blocks (2:3 does not).
        Method(
            "sparsegpt",
            _pruning("sparsegpt", SparseGPTConfig().validate_for),
            lambda v, o, s, d: prune_sparsegpt(v, d.calibration, s.pattern),
            ("calibration",),
        ),
        # All layers at once from the original model's scores, as Wei et al. prune.
        Method(
            "snip",
            _pruning("snip"),
            lambda v, o, s, d: prune_snip(v, snip_scores_one_pass(v, d.responses.batches), s.pattern),
            ("responses",),
        ),
        Method("magnitude", _pruning("magnitude"), lambda v, o, s, d: prune_magnitude(v, s.pattern)),
        Method(
            "rtn",
            _quantization("rtn"),
            lambda v, o, s, d: quantize_model_rtn(v, QuantConfig(s.params["bits"], s.params["group_size"])),
        ),
        Method(
            "gptq",
            _quantization("gptq"),
            lambda v, o, s, d: quantize_gptq(v, d.calibration, GPTQConfig(s.params["bits"], s.params["group_size"])),
            ("calibration",),
        ),
        Method("torchao", _torchao, lambda v, o, s, d: quantize_int8_weight_only(v)),
        # A user's own compressed checkpoint, compared like the toolkit's variants (the main job checks it derives from the base first).
        Method("path", _checkpoint, lambda v, o, s, d: _load_checkpoint(v, s)),
        *(_attribution(m) for m in attribution_variants.METHODS),
    )
}
METHODS = tuple(REGISTRY)


def parse_variant(text: str) -> VariantSpec:
    text = text.strip()
    name, _, arg = text.partition(":")
    if name not in REGISTRY:
        raise UserError(f"unknown variant {text!r}; methods: {', '.join(METHODS)}")
    return VariantSpec(name, REGISTRY[name].parse(arg, text), text)


def validate_variant(spec: VariantSpec, model) -> None:
    """Check a spec against the model before any work starts: N:M and group size against the layer
    widths (experts' included), and that the method can reach a mixture of experts' tensors."""
    from lm.architecture import block_linears, check_dense
    from lm.experts import experts_as_linears
    from lm.hooks import decoder_layers

    if (
        spec.method == "torchao"
    ):  # torchao swaps nn.Linear weights for its own tensors, which cannot live in a fused 3-D tensor
        check_dense(model, f"variant {spec.text!r}")
    with experts_as_linears(model):
        widths = {lin.in_features for lin in block_linears(decoder_layers(model)[0]).values()}
        try:
            if "ratio" in spec.params:  # a sparsity pattern (the pruners' grammar): N:M must tile the rows
                spec.pattern.validate_for(model)
            group = spec.params.get("group_size")
            if group and any(w % group for w in widths):
                raise UserError(f"group size {group} does not divide the layer widths {sorted(widths)}")
        except UserError as e:
            raise UserError(f"variant {spec.text!r}: {e}") from None


def build_variant(model, spec: VariantSpec, calibration: Calibration | None = None, **data):
    """A compressed deep copy of `model`; see build_variant_with_report for the keyword data."""
    return build_variant_with_report(model, spec, calibration, **data)[0]


def build_variant_with_report(
    model,
    spec: VariantSpec,
    calibration: Calibration | None = None,
    *,
    responses: ResponseCalibration | None = None,
    safety: ResponseCalibration | None = None,
    utility: ResponseCalibration | None = None,
    scores_dir=None,
):
    """(compressed deep copy of `model`, report of what was removed); the original is left untouched.

    The report holds what a method measures while compressing (e.g. the realised fraction a set
    difference removed, which is below q, or the ranks ActSVD took out); {} for the others.
    """
    if spec.method == "original":
        return model, {}
    from lm.experts import experts_as_linears

    validate_variant(spec, model)
    data = VariantData(calibration, responses, safety, utility, scores_dir)
    for kind in spec.needs:
        if getattr(data, kind) is None:
            raise UserError(f"{spec.text} needs {_DATA_HELP[kind]}")
    variant = copy.deepcopy(model)
    # Experts are compressed, scored and reported like any linear (the original too: some methods score it).
    with experts_as_linears(variant, model):
        report = REGISTRY[spec.method].build(variant, model, spec, data)
    return variant, report if isinstance(report, dict) else {}
