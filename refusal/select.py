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

Scoring one candidate per forward pass costs 3 passes per candidate (hundreds for a real model).
Here several candidates share a pass: the prompt batch is repeated once per candidate and each
row carries its own direction (per-row hooks in lm.hooks.intervene). The induce score only
changes activations from the candidate's layer on, so those passes resume from a cached baseline
block input (lm.resume) instead of recomputing the unchanged prefix.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from tqdm.auto import tqdm

from lm.cache import atomic_save_tensors, atomic_write_json
from lm.chat import format_prompts, post_instruction, tokenize_prompts
from lm.datasets import instructions, sample
from lm.errors import UserError
from lm.hooks import decoder_layers, intervene
from lm.resume import block_kwargs, last_logits, layer_inputs, run_from_layer, uniform_layers

from .direction import candidate_directions
from .score import filter_by_score, kl_divergence, refusal_score, refusal_scores, refusal_tokens

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

    def records(self) -> list[dict]:
        """One entry per candidate, like Arditi et al.'s direction_evaluations.json."""
        out = []
        for i, pos in enumerate(self.positions):
            for layer in range(self.n_layers):
                out.append(dict(
                    position=pos,
                    layer=layer,
                    bypass_score=_finite_or_none(self.bypass[i, layer]),
                    induce_score=_finite_or_none(self.induce[i, layer]),
                    kl_score=_finite_or_none(self.kl[i, layer]),
                    norm=float(self.directions[i, layer].norm()),
                    passed_filter=self.reasons[i][layer] is None,
                    reason=self.reasons[i][layer],
                ))
        return out


def _finite_or_none(x: torch.Tensor) -> float | None:
    # JSON has no NaN; a missing score reads as null.
    value = float(x)
    return value if math.isfinite(value) else None


# --- the filter and the choice (pure) --------------------------------------------------------


def rejection_reasons(bypass: torch.Tensor, induce: torch.Tensor, kl: torch.Tensor, cfg: SelectionConfig) -> list[list[str | None]]:
    """Arditi et al.'s filter per candidate, first failing rule in their order; None = passes."""
    n_pos, n_layers = bypass.shape
    last_allowed = int(cfg.max_layer_fraction * n_layers)
    reasons = []
    for i in range(n_pos):
        row = []
        for layer in range(n_layers):
            b, s, k = float(bypass[i, layer]), float(induce[i, layer]), float(kl[i, layer])
            if any(math.isnan(v) for v in (b, s, k)):
                row.append("nan")
            elif any(math.isinf(v) for v in (b, s, k)):
                row.append("infinite")  # e.g. a refusal log-odds of -inf would otherwise win the argmin
            elif layer >= last_allowed:
                row.append("late_layer")
            elif k > cfg.kl_threshold:
                row.append("kl")
            elif s < cfg.induce_threshold:
                row.append("induce")
            else:
                row.append(None)
        reasons.append(row)
    return reasons


def choose(bypass: torch.Tensor, reasons: list[list[str | None]], positions: list[int]) -> tuple[int, int] | None:
    """(position, layer) with the lowest bypass score among passing candidates; ties go to the first."""
    best = None
    for i, pos in enumerate(positions):
        for layer, reason in enumerate(reasons[i]):
            if reason is None and (best is None or float(bypass[i, layer]) < best[0]):
                best = (float(bypass[i, layer]), pos, layer)
    return None if best is None else (best[1], best[2])


# --- batched candidate scoring ---------------------------------------------------------------


@dataclass
class CandidateScores:
    bypass: torch.Tensor  # [n_positions, n_layers] float64
    induce: torch.Tensor
    kl: torch.Tensor
    baseline_harmful: float  # mean refusal score without intervention
    baseline_harmless: float
    passes: dict
    evaluated: torch.Tensor | None = None  # [n_pos, n_layers] bool: all three scores computed


def bypass_score(ablated_logits: torch.Tensor, token_ids: list[int]) -> torch.Tensor:
    """Per harmful prompt: the refusal score with the direction ablated everywhere (low: ablating it stops refusal)."""
    return refusal_score(ablated_logits, token_ids)


def induce_score(added_logits: torch.Tensor, token_ids: list[int]) -> torch.Tensor:
    """Per harmless prompt: the refusal score with the raw vector added at its layer (high: adding it causes refusal)."""
    return refusal_score(added_logits, token_ids)


def kl_score(baseline_logits: torch.Tensor, ablated_logits: torch.Tensor) -> torch.Tensor:
    """Per harmless prompt: KL(baseline || ablated) at the last position (low: ablation leaves harmless replies alone)."""
    return kl_divergence(baseline_logits, ablated_logits)


def _chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def batch_plan(n_prompts: int, max_rows: int) -> tuple[int, int]:
    """(prompts per pass, candidates per pass): all prompts in a pass if they fit, else chunks."""
    chunk = min(n_prompts, max_rows)
    return chunk, max(1, max_rows // chunk)


def _encode(tokenizer, insts: list[str], chunk: int, system: str | None, device) -> list[dict]:
    prompts = format_prompts(tokenizer, insts, system)
    return [tokenize_prompts(tokenizer, part).to(device) for part in _chunks(prompts, chunk)]


def _repeated(enc, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    # Candidate-major rows: row g * P + p is prompt p under the g-th candidate of the group.
    return enc["input_ids"].repeat(k, 1), enc["attention_mask"].repeat(k, 1)


@torch.no_grad()
def _ablated_means(model, batches, flat, candidates, k, per_row, n_prompts, passes, stage) -> torch.Tensor:
    """Mean over prompts of per_row(logits under each candidate's ablation); NaN for others."""
    sums = torch.full((flat.shape[0],), float("nan"), dtype=torch.float64)
    sums[candidates] = 0.0
    for bi, enc in enumerate(batches):
        p = enc["input_ids"].shape[0]
        for group in tqdm(_chunks(candidates, k), desc=stage, unit="pass", leave=False):
            ids, mask = _repeated(enc, len(group))
            with intervene(model, ablate=flat[group].repeat_interleave(p, dim=0)):
                logits = last_logits(model, ids, mask)
            sums[group] += per_row(logits, bi, len(group)).view(len(group), p).sum(dim=1).cpu()
            passes[stage] += 1
    return sums / n_prompts


@torch.no_grad()
def score_candidates(
    model,
    tokenizer,
    directions: torch.Tensor,
    harmful_val: list[str],
    harmless_val: list[str],
    token_ids: list[int],
    max_rows: int = 256,
    system: str | None = None,
    reuse_prefix: bool | None = None,
    subset: list[int] | None = None,
    which: tuple[str, ...] = ("bypass", "kl", "induce"),
) -> CandidateScores:
    """Mean bypass_score, induce_score and kl_score of every candidate in `directions` [n_pos, n_layers, d].

    reuse_prefix: resume induce passes from cached baseline block inputs (default: whenever the
    model's blocks share their keyword arguments, see lm.resume.uniform_layers).
    subset / which: score only these flat candidate indices (position_index * n_layers + layer)
    and only these scores; everything else is NaN.
    """
    if not harmful_val or (not harmless_val and ("kl" in which or "induce" in which)):
        raise UserError("candidate scoring needs non-empty harmful and harmless validation sets")
    n_pos, n_layers, d = directions.shape
    if n_layers != len(decoder_layers(model)):
        raise UserError(f"directions have {n_layers} layers, the model {len(decoder_layers(model))}")
    if reuse_prefix is None:
        reuse_prefix = uniform_layers(model)
    device = next(model.parameters()).device
    # Candidate c = position_index * n_layers + layer. Raw vectors throughout: the ablation hooks
    # normalise them, exactly as a one-candidate run would.
    flat = directions.reshape(-1, d).float().to(device)
    n_cand = flat.shape[0]
    layer_of = [c % n_layers for c in range(n_cand)]
    norms = flat.norm(dim=-1)
    # A zero difference (e.g. layer 0, where every post-instruction token embeds identically) has
    # no direction; Arditi et al.'s normalisation gives NaN scores there, which the filter rejects.
    wanted = set(range(n_cand) if subset is None else subset)
    ablatable = [c for c in range(n_cand) if c in wanted and norms[c] > 0 and torch.isfinite(norms[c])]
    passes: Counter = Counter()

    chunk_h, k_h = batch_plan(len(harmful_val), max_rows)
    chunk_s, k_s = batch_plan(max(1, len(harmless_val)), max_rows)
    harmful = _encode(tokenizer, harmful_val, chunk_h, system, device) if "bypass" in which else []
    harmless = _encode(tokenizer, harmless_val, chunk_s, system, device) if ("kl" in which or "induce" in which) else []

    base_logits, prefix = [], []
    base_harmful = base_harmless = 0.0
    for enc in harmful:
        base_harmful += float(refusal_score(last_logits(model, enc["input_ids"], enc["attention_mask"]), token_ids).sum())
        passes["baseline"] += 1
    for enc in harmless:
        inputs, logits = layer_inputs(model, enc["input_ids"], enc["attention_mask"])
        base_logits.append(logits)
        prefix.append(inputs if reuse_prefix else None)
        base_harmless += float(refusal_score(logits, token_ids).sum())
        passes["baseline"] += 1

    nothing = torch.full((n_cand,), float("nan"), dtype=torch.float64)
    bypass = _ablated_means(
        model, harmful, flat, ablatable, k_h, lambda logits, bi, k: bypass_score(logits, token_ids),
        len(harmful_val), passes, "bypass") if "bypass" in which else nothing.clone()
    kl = _ablated_means(
        model, harmless, flat, ablatable, k_s, lambda logits, bi, k: kl_score(base_logits[bi].repeat(k, 1), logits),
        len(harmless_val), passes, "kl") if "kl" in which else nothing.clone()

    # Grouping candidates by layer keeps each group's earliest layer, where resuming starts, late.
    order = sorted(wanted, key=lambda c: (layer_of[c], c)) if "induce" in which else []
    induce = nothing.clone()
    induce[order] = 0.0
    blocks_run = 0
    for bi, enc in enumerate(harmless):
        p = enc["input_ids"].shape[0]
        kwargs_by_size: dict[int, dict] = {}
        for group in tqdm(_chunks(order, k_s), desc="induce", unit="pass", leave=False):
            ids, mask = _repeated(enc, len(group))
            adds: dict[int, torch.Tensor] = {}
            for g, c in enumerate(group):
                rows = adds.setdefault(layer_of[c], torch.zeros(len(group) * p, d, device=device))
                rows[g * p : (g + 1) * p] = flat[c]  # rows of other candidates stay zero: unchanged
            start = min(layer_of[c] for c in group)
            if reuse_prefix:
                if len(group) not in kwargs_by_size:
                    kwargs_by_size[len(group)] = block_kwargs(model, ids, mask)
                hidden = prefix[bi][start].repeat(len(group), 1, 1)
                with intervene(model, add=adds):
                    logits = run_from_layer(model, hidden, kwargs_by_size[len(group)], start)
                blocks_run += n_layers - start
            else:
                with intervene(model, add=adds):
                    logits = last_logits(model, ids, mask)
                blocks_run += n_layers
            induce[group] += induce_score(logits, token_ids).view(len(group), p).sum(dim=1).cpu()
            passes["induce"] += 1
    induce /= max(1, len(harmless_val))

    shape = (n_pos, n_layers)
    # The same scores one candidate per pass: a pass per candidate and prompt batch, per score.
    one_at_a_time = len(ablatable) * len(harmful) + (len(ablatable) if "kl" in which else 0) * len(harmless) + len(order) * len(harmless)
    passes = dict(passes)
    passes.update(
        candidates=n_cand,
        candidates_per_pass=dict(harmful=min(k_h, n_cand), harmless=min(k_s, n_cand)),
        scoring_passes=passes.get("bypass", 0) + passes.get("kl", 0) + passes.get("induce", 0),
        scoring_passes_one_at_a_time=one_at_a_time,
        induce_block_fraction=blocks_run / max(1, passes.get("induce", 0) * n_layers),
        resumed_induce=bool(reuse_prefix),
    )
    return CandidateScores(
        bypass=bypass.view(shape), induce=induce.view(shape), kl=kl.view(shape),
        baseline_harmful=base_harmful / len(harmful_val) if harmful else float("nan"),
        baseline_harmless=base_harmless / len(harmless_val) if harmless else float("nan"),
        passes=dict(passes),
    )


def _merge(into: torch.Tensor, part: torch.Tensor) -> None:
    into.copy_(torch.where(torch.isnan(part), into, part))


def _search(model, tokenizer, directions, harmful_val, harmless_val, token_ids, cfg: SelectionConfig):
    """Score candidates per cfg.search / prescreen; returns (CandidateScores, prescreen summary)."""
    n_pos, n_layers, _ = directions.shape
    evaluated = torch.zeros(n_pos, n_layers, dtype=torch.bool)
    if cfg.search == "exhaustive" and not cfg.prescreen_n_val:
        scores = score_candidates(model, tokenizer, directions, harmful_val, harmless_val, token_ids, cfg.max_rows, cfg.system)
        scores.evaluated = evaluated | True
        return scores, None

    last_allowed = int(cfg.max_layer_fraction * n_layers)
    eligible = [c for c in range(n_pos * n_layers) if c % n_layers < last_allowed]
    passes: Counter = Counter()
    prescreen = None
    if cfg.prescreen_n_val:
        pre = score_candidates(model, tokenizer, directions, harmful_val[: cfg.prescreen_n_val], [], token_ids,
                               cfg.max_rows, cfg.system, subset=eligible, which=("bypass",))
        flat = pre.bypass.flatten()
        ranked = sorted((c for c in eligible if torch.isfinite(flat[c])), key=lambda c: float(flat[c]))
        eligible = ranked[: cfg.prescreen_keep]
        passes["prescreen"] += pre.passes.get("bypass", 0) + pre.passes.get("baseline", 0)
        prescreen = dict(n_val=min(cfg.prescreen_n_val, len(harmful_val)), kept=len(eligible),
                         kept_candidates=[dict(position=c // n_layers - n_pos, layer=c % n_layers, bypass=float(flat[c])) for c in eligible])
    by = score_candidates(model, tokenizer, directions, harmful_val, harmless_val, token_ids, cfg.max_rows, cfg.system,
                          subset=eligible, which=("bypass",))
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
        groups = _chunks(order, k_s)
    baseline_harmless = float("nan")
    for group in groups:
        if not group:
            continue
        part = score_candidates(model, tokenizer, directions, harmful_val, harmless_val, token_ids, cfg.max_rows, cfg.system,
                                subset=group, which=("kl", "induce"))
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
    return CandidateScores(bypass=bypass, induce=induce, kl=kl, baseline_harmful=by.baseline_harmful,
                           baseline_harmless=baseline_harmless, passes=out, evaluated=evaluated), prescreen


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
def select_direction(model, tokenizer, cfg: SelectionConfig = SelectionConfig(), shared: SharedPrompts | None = None) -> SelectionResult:
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
        directions = candidate_directions(model, tokenizer, sets["harmful_train"], sets["harmless_train"], cfg.batch_size, cfg.system)["directions"]
        passes["directions"] += sum(math.ceil(len(sets[n]) / cfg.batch_size) for n in ("harmful_train", "harmless_train"))
    n_positions = len(post_instruction(tokenizer, cfg.system).positions)
    if tuple(directions.shape[:2]) != (n_positions, len(decoder_layers(model))):
        raise UserError(f"candidate directions have shape {tuple(directions.shape)}; this model needs "
                        f"({n_positions}, {len(decoder_layers(model))}, d_model)")

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
        counts["fallback"] = dict(rule_relaxed="induce", chosen=list(chosen) if chosen else None,
                                  note="no candidate passed every filter; induce >= 0 was dropped")
    return SelectionResult(
        config=cfg, positions=positions, bypass=scores.bypass, induce=scores.induce, kl=scores.kl,
        reasons=reasons, chosen=chosen, directions=directions.float().cpu(),
        refusal_token_ids=token_ids, counts=counts, forward_passes=forward_passes, prompts=sets,
        shared_prompts=shared.digest() if shared is not None else None,
    )


# --- artifacts -------------------------------------------------------------------------------


def _params(cfg: SelectionConfig, fingerprint: str | None, shared_prompts: str | None = None) -> dict:
    params = dict(config=cfg.cache_key(), fingerprint=fingerprint)
    if shared_prompts is not None:  # given directions follow from the model and the prompts: no key of their own
        params["shared_prompts"] = shared_prompts
    return json.loads(json.dumps(params, sort_keys=True))


def save_selection(result: SelectionResult, out_dir: Path) -> None:
    """selection.json (scores per candidate, choice, passes) and direction.safetensors, atomically.

    The tensors are written first and both carry the same params, so a crash between the two
    writes can never pair a selection.json with another run's tensors.
    """
    out_dir = Path(out_dir)
    params = _params(result.config, result.fingerprint, result.shared_prompts)
    tensors = dict(candidates=result.directions, bypass=result.bypass, induce=result.induce, kl=result.kl)
    if result.chosen is not None:
        tensors.update(direction=result.direction, direction_raw=result.direction_raw.clone())
    atomic_save_tensors(out_dir / DIRECTION_FILE, tensors, metadata={"params": json.dumps(params, sort_keys=True)})
    chosen = None
    if result.chosen is not None:
        i, layer = result._chosen_index()
        chosen = dict(position=result.chosen[0], layer=layer, bypass_score=float(result.bypass[i, layer]),
                      induce_score=float(result.induce[i, layer]), kl_score=float(result.kl[i, layer]))
    atomic_write_json(out_dir / SELECTION_JSON, dict(
        params=params,
        chosen=chosen,
        config=asdict(result.config),
        positions=result.positions,
        n_layers=result.n_layers,
        refusal_tokens=result.refusal_token_ids,
        counts=result.counts,
        forward_passes=result.forward_passes,
        candidates=result.records(),
        prompts=result.prompts,
    ))


def load_selection(out_dir: Path) -> SelectionResult:
    from safetensors.torch import load_file

    out_dir = Path(out_dir)
    try:
        with open(out_dir / SELECTION_JSON, encoding="utf-8") as f:
            meta = json.load(f)
        tensors = load_file(str(out_dir / DIRECTION_FILE))
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read the direction selection in {out_dir}: {err}") from None
    known = {f.name for f in fields(SelectionConfig)}
    cfg = SelectionConfig(**{k: v for k, v in meta["config"].items() if k in known})
    n_pos, n_layers = len(meta["positions"]), meta["n_layers"]
    reasons = [[None] * n_layers for _ in range(n_pos)]
    for rec in meta["candidates"]:
        reasons[meta["positions"].index(rec["position"])][rec["layer"]] = rec["reason"]
    chosen = meta["chosen"]
    return SelectionResult(
        config=cfg, positions=meta["positions"], bypass=tensors["bypass"], induce=tensors["induce"], kl=tensors["kl"],
        reasons=reasons, chosen=None if chosen is None else (chosen["position"], chosen["layer"]),
        directions=tensors["candidates"], refusal_token_ids=meta["refusal_tokens"], counts=meta["counts"],
        forward_passes=meta["forward_passes"], fingerprint=meta["params"].get("fingerprint"),
        prompts=meta.get("prompts", {}), shared_prompts=meta["params"].get("shared_prompts"),
    )


def _stored_params(out_dir: Path) -> tuple[dict | None, str | None]:
    from safetensors import safe_open

    try:
        with open(out_dir / SELECTION_JSON, encoding="utf-8") as f:
            stored = json.load(f).get("params")
        with safe_open(str(out_dir / DIRECTION_FILE), framework="pt") as f:
            tensor_params = (f.metadata() or {}).get("params")
    except (OSError, ValueError):
        return None, None
    return stored, tensor_params


def select_direction_cached(model, tokenizer, out_dir: Path, cfg: SelectionConfig = SelectionConfig(), fingerprint: str | None = None,
                            shared: SharedPrompts | None = None) -> SelectionResult:
    """select_direction, reusing out_dir's artifact when its config and model fingerprint match.

    fingerprint: identifies the weights (default: lm.loading.model_fingerprint, a hash of every
    parameter; pass a known one to skip hashing).
    """
    if fingerprint is None:
        from lm.loading import model_fingerprint

        fingerprint = model_fingerprint(model)
    out_dir = Path(out_dir)
    params = _params(cfg, fingerprint, shared.digest() if shared is not None else None)
    stored, tensor_params = _stored_params(out_dir)
    if stored == params and tensor_params == json.dumps(params, sort_keys=True):
        return load_selection(out_dir)
    result = select_direction(model, tokenizer, cfg, shared)
    result.fingerprint = fingerprint
    save_selection(result, out_dir)
    return result


# --- figure ----------------------------------------------------------------------------------


def score_maps_figure(result: SelectionResult):
    """Plotly figure: bypass, induce and KL heatmaps (x = layer, y = position), choice marked."""
    from plotly.subplots import make_subplots
    import plotly.graph_objects as go

    layers = list(range(result.n_layers))
    labels = [str(p) for p in result.positions]
    maps = (("bypass score (ablate; lower = better)", result.bypass, "RdBu_r"),
            ("induce score (add; higher = better)", result.induce, "RdBu_r"),
            ("KL(baseline || ablated), harmless", result.kl, "Viridis"))
    fig = make_subplots(rows=1, cols=3, subplot_titles=[m[0] for m in maps], horizontal_spacing=0.12)
    for col, (title, values, scale) in enumerate(maps, start=1):
        z = [[_finite_or_none(v) for v in row] for row in values]
        fig.add_trace(go.Heatmap(
            z=z, x=layers, y=labels, colorscale=scale, zmid=0 if scale == "RdBu_r" else None,
            colorbar=dict(title=title.split(" ")[0].split("(")[0], x=fig.layout[f"xaxis{col}"].domain[1] + 0.005, len=0.9, thickness=14),
            hovertemplate="layer %{x}<br>position %{y}<br>%{z:.3f}<extra>" + title.split(" ")[0] + "</extra>",
        ), row=1, col=col)
        if result.chosen is not None:
            fig.add_trace(go.Scatter(
                x=[result.chosen[1]], y=[str(result.chosen[0])], mode="markers", showlegend=False,
                marker=dict(symbol="x", size=12, color="black"), hoverinfo="skip",
            ), row=1, col=col)
        fig.update_xaxes(title_text="layer", row=1, col=col)
        fig.update_yaxes(title_text="position (from end)", type="category", row=1, col=col)
    chosen = "none passed the filters" if result.chosen is None else f"chosen: position {result.chosen[0]}, layer {result.chosen[1]}"
    fig.update_layout(title=f"Refusal direction candidates ({chosen})", height=420, width=1400)
    return fig
