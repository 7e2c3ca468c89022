"""Choosing the refusal direction among all (position, layer) candidates (Arditi et al. 2024, App. C).

Every difference-of-means candidate is scored three ways on held-out instructions:

bypass  mean refusal score on harmful val with the (normalised) direction ablated from every block
        input and every attention/MLP output at all layers: low means ablating it stops refusal;
induce  mean refusal score on harmless val after adding the raw vector to its own layer's input
        at every position: high means adding it causes refusal;
kl      KL(baseline || ablated) of the next-token distribution on harmless val: ablating a good
        direction should barely change harmless behaviour.

Candidates with a NaN or infinite score, in the last 20% of layers, with KL > 0.1 or induce < 0 are rejected;
the lowest bypass among the rest wins.

Scoring one candidate per forward pass costs 3 passes per candidate (hundreds for a real model);
refusal.candidate_scores puts several candidates in one pass. The scores' artifacts and the
cached entry point are in refusal.selection_artifacts, the filter and the choice in refusal.selection_filter.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import asdict, dataclass, field

import torch

from lm.chat import post_instruction
from lm.datasets import instructions, sample
from lm.errors import UserError
from lm.hooks import decoder_layers

from .candidate_scores import CandidateScores, batch_plan, chunks, score_candidates
from .direction import candidate_directions
from .score import filter_by_score, refusal_scores, refusal_tokens
from .selection_filter import choose, finite_or_none, no_direction_reason, non_finite_note, rejection_reasons

SELECTION_JSON = "selection.json"
DIRECTION_FILE = "direction.safetensors"

# Config fields that only decide how work is batched; they change results by float rounding at
# most, so a cached selection stays valid when they change.
_EXECUTION_FIELDS = ("batch_size", "max_rows")


@dataclass(frozen=True)
class SelectionConfig:
    n_train: int = 128  # harmful and harmless instructions each, for the candidate directions
    n_val: int = 32  # harmful and harmless instructions each, for scoring candidates
    seed: int = 42
    kl_threshold: float = 0.1
    max_layer_fraction: float = 0.8  # reject layers >= int(fraction * n_layers)
    induce_threshold: float = 0.0
    filter_by_refusal: bool = True  # keep harmful prompts the model refuses, harmless it answers
    refusal_tokens: tuple[int, ...] | None = None  # None: derived from the chat template
    system: str | None = None  # None keeps the template's default system prompt
    batch_size: int = 32  # prompts per plain forward pass (filtering, directions, baselines)
    max_rows: int = 256  # rows (candidates x prompts) per batched candidate-scoring pass
    # "exhaustive" scores every candidate three ways (the published score maps). "lazy" gives the
    # same choice for less: late layers (never eligible) are not scored, and KL / induce are
    # computed in increasing bypass order only until a candidate passes the filters.
    search: str = "exhaustive"
    # Optional approximation for slow hardware: rank eligible candidates by bypass on the first
    # `prescreen_n_val` harmful val prompts and score only the `prescreen_keep` best in full.
    prescreen_n_val: int = 0
    prescreen_keep: int = 16
    # When no candidate passes every filter (small models whose added direction raises refusal a
    # lot but not past 50%), "relax_induce" picks the lowest bypass among candidates that pass
    # all but the induce rule, and records that it did; "none" leaves the choice empty.
    fallback: str = "relax_induce"

    def __post_init__(self):
        if self.refusal_tokens is not None:
            object.__setattr__(self, "refusal_tokens", tuple(int(t) for t in self.refusal_tokens))
        if min(self.n_train, self.n_val, self.batch_size, self.max_rows) <= 0:
            raise UserError("n_train, n_val, batch_size and max_rows must be positive")
        if not 0 < self.max_layer_fraction <= 1:
            raise UserError(f"max_layer_fraction must be in (0, 1], got {self.max_layer_fraction}")
        if self.search not in ("exhaustive", "lazy"):
            raise UserError(f"search must be 'exhaustive' or 'lazy', got {self.search!r}")
        if self.fallback not in ("relax_induce", "none"):
            raise UserError(f"fallback must be 'relax_induce' or 'none', got {self.fallback!r}")
        if self.prescreen_n_val < 0 or self.prescreen_keep <= 0:
            raise UserError("prescreen_n_val must be >= 0 and prescreen_keep positive")

    def cache_key(self) -> dict:
        """The fields that determine the result (everything but batching)."""
        return {k: v for k, v in asdict(self).items() if k not in _EXECUTION_FIELDS}


@dataclass
class SelectionResult:
    config: SelectionConfig
    positions: list[int]  # negative indices of the post-instruction tokens, -n..-1
    bypass: torch.Tensor  # [n_positions, n_layers] float64
    induce: torch.Tensor
    kl: torch.Tensor
    reasons: list[list[str | None]]  # why each candidate was rejected; None if it passed
    chosen: tuple[int, int] | None  # (position as a negative index, layer); None if none passed
    directions: torch.Tensor  # [n_positions, n_layers, d_model] raw difference of means, float32
    refusal_token_ids: list[int]
    counts: dict = field(default_factory=dict)  # prompt-set sizes before/after filtering
    forward_passes: dict = field(default_factory=dict)
    fingerprint: str | None = None
    prompts: dict = field(default_factory=dict)  # the filtered instruction sets actually used
    shared_prompts: str | None = None  # SharedPrompts.digest() when the sets were given, not sampled

    @property
    def n_layers(self) -> int:
        return self.bypass.shape[1]

    def _chosen_index(self) -> tuple[int, int]:
        if self.chosen is None:
            raise UserError("no candidate direction passed the selection filters")
        pos, layer = self.chosen
        return self.positions.index(pos), layer

    @property
    def direction_raw(self) -> torch.Tensor:
        i, layer = self._chosen_index()
        return self.directions[i, layer]

    @property
    def direction(self) -> torch.Tensor:
        raw = self.direction_raw
        return raw / raw.norm()

    def no_direction_reason(self) -> str:
        """One line: why nothing was chosen, and whether the model refuses at all."""
        return no_direction_reason(self.reasons, (self.counts.get("baseline_score") or {}).get("harmful_val"))

    def non_finite_note(self) -> str | None:
        return non_finite_note(self.reasons)

    def records(self) -> list[dict]:
        """One entry per candidate, like Arditi et al.'s direction_evaluations.json."""
        out = []
        for i, pos in enumerate(self.positions):
            for layer in range(self.n_layers):
                out.append(
                    dict(
                        position=pos,
                        layer=layer,
                        bypass_score=finite_or_none(self.bypass[i, layer]),
                        induce_score=finite_or_none(self.induce[i, layer]),
                        kl_score=finite_or_none(self.kl[i, layer]),
                        norm=float(self.directions[i, layer].norm()),
                        passed_filter=self.reasons[i][layer] is None,
                        reason=self.reasons[i][layer],
                    )
                )
        return out


# --- batched candidate scoring ---------------------------------------------------------------


def _merge(into: torch.Tensor, part: torch.Tensor) -> None:
    into.copy_(torch.where(torch.isnan(part), into, part))


def _search(model, tokenizer, directions, harmful_val, harmless_val, token_ids, cfg: SelectionConfig):
    """Score candidates per cfg.search / prescreen; returns (CandidateScores, prescreen summary)."""
    n_pos, n_layers, _ = directions.shape
    evaluated = torch.zeros(n_pos, n_layers, dtype=torch.bool)
    if cfg.search == "exhaustive" and not cfg.prescreen_n_val:
        scores = score_candidates(
            model, tokenizer, directions, harmful_val, harmless_val, token_ids, cfg.max_rows, cfg.system
        )
        scores.evaluated = evaluated | True
        return scores, None

    last_allowed = int(cfg.max_layer_fraction * n_layers)
    eligible = [c for c in range(n_pos * n_layers) if c % n_layers < last_allowed]
    passes: Counter = Counter()
    prescreen = None
    if cfg.prescreen_n_val:
        pre = score_candidates(
            model,
            tokenizer,
            directions,
            harmful_val[: cfg.prescreen_n_val],
            [],
            token_ids,
            cfg.max_rows,
            cfg.system,
            subset=eligible,
            which=("bypass",),
        )
        flat = pre.bypass.flatten()
        ranked = sorted((c for c in eligible if torch.isfinite(flat[c])), key=lambda c: float(flat[c]))
        eligible = ranked[: cfg.prescreen_keep]
        passes["prescreen"] += pre.passes.get("bypass", 0) + pre.passes.get("baseline", 0)
        prescreen = dict(
            n_val=min(cfg.prescreen_n_val, len(harmful_val)),
            kept=len(eligible),
            kept_candidates=[
                dict(position=c // n_layers - n_pos, layer=c % n_layers, bypass=float(flat[c])) for c in eligible
            ],
        )
    by = score_candidates(
        model,
        tokenizer,
        directions,
        harmful_val,
        harmless_val,
        token_ids,
        cfg.max_rows,
        cfg.system,
        subset=eligible,
        which=("bypass",),
    )
    for k in ("baseline", "bypass"):
        passes[k] += by.passes.get(k, 0)
    bypass = by.bypass.clone()
    induce = torch.full_like(bypass, float("nan"))
    kl = torch.full_like(bypass, float("nan"))
    flat_by = bypass.flatten()
    order = sorted((c for c in eligible if torch.isfinite(flat_by[c])), key=lambda c: float(flat_by[c]))
    if cfg.search == "exhaustive":
        groups = [order]
    else:
        _, k_s = batch_plan(len(harmless_val), cfg.max_rows)
        groups = chunks(order, k_s)
    baseline_harmless = float("nan")
    for group in groups:
        if not group:
            continue
        part = score_candidates(
            model,
            tokenizer,
            directions,
            harmful_val,
            harmless_val,
            token_ids,
            cfg.max_rows,
            cfg.system,
            subset=group,
            which=("kl", "induce"),
        )
        for k in ("baseline", "kl", "induce"):
            passes[k] += part.passes.get(k, 0)
        _merge(kl, part.kl)
        _merge(induce, part.induce)
        baseline_harmless = part.baseline_harmless
        for c in group:
            evaluated[c // n_layers, c % n_layers] = True
        reasons = rejection_reasons(bypass, induce, kl, cfg)
        if any(reasons[c // n_layers][c % n_layers] is None for c in group):
            break  # candidates later in the order have higher bypass: the choice is made
    out = dict(passes)
    out["scoring_passes"] = passes["bypass"] + passes["kl"] + passes["induce"] + passes["prescreen"]
    return CandidateScores(
        bypass=bypass,
        induce=induce,
        kl=kl,
        baseline_harmful=by.baseline_harmful,
        baseline_harmless=baseline_harmless,
        passes=out,
        evaluated=evaluated,
    ), prescreen


# --- the pipeline ----------------------------------------------------------------------------

PROMPT_SETS = ("harmful_train", "harmless_train", "harmful_val", "harmless_val")


@dataclass(frozen=True)
class SharedPrompts:
    """Prompt sets fixed in advance (another model's filtered sets), instead of sampling and filtering.

    Selecting a compressed variant's direction on the original's filtered prompts keeps the
    prompts fixed, so a shift of the chosen source comes from the weights and not from which
    prompts the variant still refuses; it also skips the filtering and, when `directions` (this
    model's candidates on `prompts["harmful_train"]` / `["harmless_train"]`) are given, the
    extraction passes.
    """

    prompts: dict
    directions: torch.Tensor | None = None

    def __post_init__(self):
        missing = [k for k in PROMPT_SETS if not self.prompts.get(k)]
        if missing:
            raise UserError(f"shared prompt sets missing or empty: {', '.join(missing)}")

    def digest(self) -> str:
        import hashlib

        return hashlib.sha256(json.dumps({k: list(self.prompts[k]) for k in PROMPT_SETS}).encode()).hexdigest()


def _prompt_sets(cfg: SelectionConfig) -> dict[str, list[str]]:
    return {
        f"{kind}_{split}": sample(instructions(kind, split), cfg.n_train if split == "train" else cfg.n_val, cfg.seed)
        for kind in ("harmful", "harmless")
        for split in ("train", "val")
    }


@torch.no_grad()
def select_direction(
    model, tokenizer, cfg: SelectionConfig = SelectionConfig(), shared: SharedPrompts | None = None
) -> SelectionResult:
    """Sample, filter by the model's own refusal score, build candidates, score all, choose one.

    shared: use these prompt sets as they are (no sampling, no filtering) and, if it carries
    them, these candidate directions.
    """
    token_ids = refusal_tokens(tokenizer, cfg.refusal_tokens)
    sets = {k: list(shared.prompts[k]) for k in PROMPT_SETS} if shared is not None else _prompt_sets(cfg)
    counts, passes = {}, Counter()
    for name, insts in sets.items():
        counts[name] = dict(sampled=len(insts))
        if shared is not None:
            counts[name]["shared"] = True
            continue
        if not cfg.filter_by_refusal:
            continue
        scores = refusal_scores(model, tokenizer, insts, token_ids, cfg.batch_size, cfg.system)
        passes["filter"] += math.ceil(len(insts) / cfg.batch_size)
        kept = filter_by_score(insts, scores, "positive" if name.startswith("harmful") else "negative")
        counts[name].update(kept=len(kept), mean_score=float(scores.mean()))
        if not kept:
            # A model that refuses nothing (e.g. after heavy compression) would otherwise end the
            # run; its scores are the interesting part, so score on the unfiltered set instead.
            counts[name]["unfiltered_fallback"] = True
            kept = insts
        sets[name] = kept

    if shared is not None and shared.directions is not None:
        directions = shared.directions
    else:
        directions = candidate_directions(
            model, tokenizer, sets["harmful_train"], sets["harmless_train"], cfg.batch_size, cfg.system
        )["directions"]
        passes["directions"] += sum(
            math.ceil(len(sets[n]) / cfg.batch_size) for n in ("harmful_train", "harmless_train")
        )
    n_positions = len(post_instruction(tokenizer, cfg.system).positions)
    if tuple(directions.shape[:2]) != (n_positions, len(decoder_layers(model))):
        raise UserError(
            f"candidate directions have shape {tuple(directions.shape)}; this model needs "
            f"({n_positions}, {len(decoder_layers(model))}, d_model)"
        )

    scores, prescreen = _search(model, tokenizer, directions, sets["harmful_val"], sets["harmless_val"], token_ids, cfg)
    counts["baseline_score"] = dict(harmful_val=scores.baseline_harmful, harmless_val=scores.baseline_harmless)
    for stage in ("baseline", "prescreen", "bypass", "kl", "induce"):
        passes[stage] += scores.passes.get(stage, 0)
    forward_passes = dict(passes)
    forward_passes["total"] = sum(passes.values())
    forward_passes.update({k: v for k, v in scores.passes.items() if k not in passes})
    forward_passes["max_rows"] = cfg.max_rows
    n_pos, n_layers = directions.shape[:2]
    b_h = math.ceil(len(sets["harmful_val"]) / batch_plan(len(sets["harmful_val"]), cfg.max_rows)[0])
    b_s = math.ceil(len(sets["harmless_val"]) / batch_plan(len(sets["harmless_val"]), cfg.max_rows)[0])
    # Arditi et al.'s loop: every candidate, one pass per prompt batch, for each of the three scores.
    forward_passes["exhaustive_one_at_a_time"] = n_pos * n_layers * (b_h + 2 * b_s)
    forward_passes["search"] = cfg.search
    if prescreen is not None:
        counts["prescreen"] = prescreen

    positions = post_instruction(tokenizer, cfg.system).positions
    reasons = rejection_reasons(scores.bypass, scores.induce, scores.kl, cfg)
    for i in range(len(reasons)):
        for layer, reason in enumerate(reasons[i]):
            # In a lazy or prescreened search a NaN means "never needed", not a numerical failure.
            if reason == "nan" and not scores.evaluated[i, layer]:
                reasons[i][layer] = "late_layer" if layer >= int(cfg.max_layer_fraction * n_layers) else "not_scored"
    chosen = choose(scores.bypass, reasons, positions)
    if chosen is None and cfg.fallback == "relax_induce":
        relaxed = [[None if r == "induce" else r for r in row] for row in reasons]
        chosen = choose(scores.bypass, relaxed, positions)
        counts["fallback"] = dict(
            rule_relaxed="induce",
            chosen=list(chosen) if chosen else None,
            note="no candidate passed every filter; induce >= 0 was dropped",
        )
    return SelectionResult(
        config=cfg,
        positions=positions,
        bypass=scores.bypass,
        induce=scores.induce,
        kl=scores.kl,
        reasons=reasons,
        chosen=chosen,
        directions=directions.float().cpu(),
        refusal_token_ids=token_ids,
        counts=counts,
        forward_passes=forward_passes,
        prompts=sets,
        shared_prompts=shared.digest() if shared is not None else None,
    )
