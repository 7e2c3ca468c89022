"""Variant specs for Wei et al.'s safety-attribution removals, parsed and built for compression/variants.py.

Grammar: 'method:' then comma-separated key=value fields; the first field may omit its key.

  setdiff-wanda:p=0.03,q=0.03[,per=row]   zero top-q safety minus top-p utility Wanda scores (per matrix)
  setdiff-snip:p=0.03,q=0.03[,per=row]    the same with SNIP scores
  top-wanda:0.03[,per=matrix]             zero the top 3% safety Wanda scores of each row
  top-snip:0.03[,per=matrix]              the same with SNIP scores
  random:0.03[,seed=0][,per=row]          zero a random 3% of each matrix
  actsvd:r=10[,tokens=all][,order=original]          remove the top-10 safety output directions
  actsvd-orth:ru=100,rs=10[,tokens=all][,order=original]   W - (I - P_u) P_s W

Fractions are plain (0.03) or percentages (3%). Ranks are ints (10) or fractions of min(out, in)
(0.01 or 1%). Safety data are the model's own refusals and utility data its own replies to
harmless instructions (compression.attribution.safety_calibration / utility_calibration).
"""

from __future__ import annotations

from pathlib import Path

from lm.errors import UserError

from .actsvd import TOKENS, ActSVDConfig, actsvd_orthogonal, actsvd_remove_top
from .attribution import PER, importance_scores, prune_random, prune_set_difference, prune_top, scores_cached

SET_DIFFERENCE = ("setdiff-wanda", "setdiff-snip")
TOP = ("top-wanda", "top-snip")
ACTSVD = ("actsvd", "actsvd-orth")
METHODS = SET_DIFFERENCE + TOP + ("random",) + ACTSVD
NEEDS_SAFETY = SET_DIFFERENCE + TOP + ACTSVD
NEEDS_UTILITY = SET_DIFFERENCE + ("actsvd-orth",)
ORDERS = ("sequential", "original")

_KEYS = {
    "setdiff-wanda": ("p", "q", "per"),
    "setdiff-snip": ("p", "q", "per"),
    "top-wanda": ("fraction", "per"),
    "top-snip": ("fraction", "per"),
    "random": ("fraction", "seed", "per"),
    "actsvd": ("r", "tokens", "order"),
    "actsvd-orth": ("ru", "rs", "tokens", "order"),
}
_REQUIRED = {
    "setdiff-wanda": ("p", "q"),
    "setdiff-snip": ("p", "q"),
    "top-wanda": ("fraction",),
    "top-snip": ("fraction",),
    "random": ("fraction",),
    "actsvd": ("r",),
    "actsvd-orth": ("ru", "rs"),
}
_EXAMPLES = {
    "setdiff-wanda": "setdiff-wanda:p=0.03,q=0.03",
    "setdiff-snip": "setdiff-snip:p=0.03,q=0.03",
    "top-wanda": "top-wanda:0.03",
    "top-snip": "top-snip:0.03",
    "random": "random:0.03",
    "actsvd": "actsvd:r=10",
    "actsvd-orth": "actsvd-orth:ru=100,rs=10",
}


def _fraction(text: str, value: str) -> float:
    try:
        number = float(value.rstrip("%")) / (100 if value.endswith("%") else 1)
    except ValueError:
        raise UserError(f"variant {text!r}: {value!r} is not a fraction (e.g. 0.03 or 3%)") from None
    if not 0 <= number <= 1:
        raise UserError(f"variant {text!r}: fraction {value!r} is outside [0, 1]")
    return number


def _rank(text: str, value: str) -> int | float:
    if value.isdigit():
        return int(value)
    return _fraction(text, value)


def _fields(text: str, method: str, arg: str) -> dict[str, str]:
    allowed, fields = _KEYS[method], {}
    for i, item in enumerate(part.strip() for part in arg.split(",") if part.strip()):
        key, eq, value = item.partition("=")
        if not eq:
            if i:
                raise UserError(f"variant {text!r}: only the first field may omit its key; got {item!r}")
            key, value = allowed[0], item
        key, value = key.strip(), value.strip()
        if key not in allowed:
            raise UserError(f"variant {text!r}: unknown field {key!r}; {method} takes {', '.join(allowed)}")
        if key in fields:
            raise UserError(f"variant {text!r}: {key} given twice")
        fields[key] = value
    missing = [k for k in _REQUIRED[method] if k not in fields]
    if missing:
        raise UserError(f"variant {text!r}: missing {', '.join(missing)}; e.g. {_EXAMPLES[method]}")
    return fields


def parse_params(method: str, arg: str, text: str) -> dict:
    """JSON-able params of an attribution variant (recorded in manifests)."""
    fields = _fields(text, method, arg)
    params: dict = {}
    for key in ("p", "q", "fraction"):
        if key in fields:
            params[key] = _fraction(text, fields[key])
    for key in ("r", "ru", "rs"):
        if key in fields:
            params[key] = _rank(text, fields[key])
    if method in SET_DIFFERENCE + TOP + ("random",):
        params["per"] = fields.get("per", "matrix" if method in SET_DIFFERENCE + ("random",) else "row")
        if params["per"] not in PER:
            raise UserError(f"variant {text!r}: per is one of {', '.join(PER)}")
    if method in SET_DIFFERENCE + TOP:
        params["scores"] = method.split("-")[1]
    if method == "random":
        if not fields.get("seed", "0").isdigit():
            raise UserError(f"variant {text!r}: seed must be a non-negative integer")
        params["seed"] = int(fields.get("seed", "0"))
    if method in ACTSVD:
        params["tokens"] = fields.get("tokens", "response")
        params["order"] = fields.get("order", "sequential")
        if params["tokens"] not in TOKENS or params["order"] not in ORDERS:
            raise UserError(f"variant {text!r}: tokens is one of {', '.join(TOKENS)}, order one of {', '.join(ORDERS)}")
    return params


def apply_variant(
    variant, model, method: str, params: dict, safety=None, utility=None, scores_dir: Path | None = None
) -> dict:
    """Edit `variant` (a copy of `model`) in place; scores come from `model`. Returns a small report."""
    fingerprint = None

    def scores(data, name: str):
        nonlocal fingerprint
        if scores_dir is None:
            return importance_scores(model, params["scores"], data)
        if fingerprint is None:
            from lm.loading import model_fingerprint

            fingerprint = model_fingerprint(model)
        return scores_cached(model, params["scores"], data, Path(scores_dir), fingerprint, name)

    if method in SET_DIFFERENCE:
        removal = prune_set_difference(
            variant, scores(safety, "safety"), scores(utility, "utility"), params["p"], params["q"], params["per"]
        )
        return dict(removed_fraction=removal.fraction)
    if method in TOP:
        return dict(
            removed_fraction=prune_top(variant, scores(safety, "safety"), params["fraction"], params["per"]).fraction
        )
    if method == "random":
        return dict(removed_fraction=prune_random(variant, params["fraction"], params["seed"], params["per"]).fraction)
    cfg = ActSVDConfig(tokens=params["tokens"], sequential=params["order"] == "sequential")
    if method == "actsvd":
        return dict(ranks=actsvd_remove_top(variant, safety, params["r"], cfg))
    if method == "actsvd-orth":
        return dict(ranks=actsvd_orthogonal(variant, utility, safety, params["ru"], params["rs"], cfg))
    raise UserError(f"unknown attribution variant method {method!r}")
