"""Anchored restoration: bring the compressed model back to the original's refusal, a step at a time.

Each step scores every weight the compression changed and has not been restored yet by the
first-order decrease that restoring it predicts in the anchor loss L (repair.anchor: distance to
the original's replies and residual stream), computed on the model as it now is:

    gain(w) = -(w_orig - w_now) * dL/dw

groups the gains into units (repair.units), restores the best units by gain per cost up to `step`
of the changed weights, and reads the result on the validation prompts (repair.validation). When
the harmless side got worse (over-refusal above the original's interval, or the KL to the original
on harmless prompts up by more than `kl_tolerance`), the part of the step predicted to hurt the
harmless prompts most (`rollback` of its units, by their gain on the harmless terms alone) is put
back to its compressed values and the state read again. The search stops at the first state that
reaches the original (validation.reaches_original), refined by bisection inside the last step, or
when `budget` of the changed weights is spent; it then keeps the best state it saw.

Re-scoring after every step is what a one-shot ranking lacks: once a few thousand weights are
back, their neighbours' first-order scores no longer describe the model (Kang Yang et al. 2025
restore aligned weights iteratively for the same reason). Every visited state is a point of the
cost-benefit front, and the order in which entries were restored is kept, so any point's model can
be rebuilt from it.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Literal

import torch
from torch import nn

from lm.errors import UserError
from lm.trainable import gradients_only_for

from .anchor import Anchor, AnchorConfig, anchor_loss
from .restoration_order import RestorationOrder
from .search_checkpoint import SearchCheckpoint, SearchState
from .units import UNITS, Ranked, UnitLayout, rank_units, unit_count, unit_of, unit_sums
from .validation import AIMS, ValidationConfig, Validator, harmless_worse, reaches_original


@dataclass(frozen=True)
class AnchoredConfig:
    #: What a step restores at a time: single weights, output rows (neurons), attention heads
    #: (rows of q/k/v, columns of the output projection; rows elsewhere) or whole matrices.
    unit: Literal["weight", "row", "head", "matrix"] = "weight"
    #: Fraction of the changed weights restored per step. On the embedded model's set-difference
    #: variant one step of 1% took validation refusal from 2% to 91% (the original: 52%): steps
    #: are kept small and the step that gets there is bisected.
    step: float = 0.0025
    budget: float = 0.3  # stop when this fraction of the changed weights is restored
    max_steps: int = 40  # stop after this many steps
    rollback: float = 0.5  # share of a step's units put back when the harmless side got worse (0: never)
    kl_tolerance: float = 0.25  # relative rise of the harmless KL to the original a step may cause
    bisect_steps: int = 3  # bisection steps inside the step that first reaches the original
    #: Where the stop rule puts the bar on harmful validation refusal: the original's point
    #: estimate, or the lower end of its 95% interval (the first state inside the interval is
    #: taken, so "interval" lands low; repair.validation).
    aim: Literal["point", "interval"] = "point"
    #: Backtracking on the true objective: before a step is read on the validation prompts, L is
    #: computed (forward passes only) with these shares of the step's ranked units restored, and
    #: the share with the lowest L is kept. Empty: the whole step, as ranked. First-order gains
    #: overshoot at 0.25% steps on the set-difference variant (step 2 raised L from 2.80 to 3.70).
    line_search: tuple[float, ...] = ()
    #: What a unit costs: its weights, or (packed checkpoints) the bytes its matrix adds when first
    #: stored at full precision; auto: bytes for a packed checkpoint, weights otherwise.
    cost: Literal["auto", "weights", "bytes"] = "auto"
    #: anchor: harmful_train instructions whose original replies L reads (of which the embedded
    #: model declines about 60% cleanly: about 38 refusals with harmful_replies="refusals")
    n_harmful: int = 64
    n_harmless: int = 32  # anchor: harmless_train instructions
    reply_tokens: int = 24  # anchor: tokens of each original reply
    hidden_weight: float = 1.0  # anchor: weight of the residual-stream distance
    first_token_weight: float = 1.0  # anchor: weight of the next-token KL to the original at the end of each prompt
    batch_size: int = 8  # anchor: sequences per gradient pass
    #: anchor: which of the original's harmful replies L reads, all or only its clean refusals
    #: (repair.anchor). "refusals" since 2026-12-08: on the set-difference variant it took the
    #: held-out strict ASR to 27% with 5,293 weights, where "all" left it at 83%.
    harmful_replies: Literal["all", "refusals"] = "refusals"
    #: Restore only weights whose first-order gain on the harmless terms of L is not negative, i.e.
    #: that are predicted to bring the harmful side nearer the original without moving the
    #: harmless side away from it (Kang Yang et al. 2025 restore only where the update agrees with
    #: their loss's gradient). Off, a weight pays for harming the harmless side only through the
    #: summed gain, and a 0.25% step from the set-difference variant took harmless refusal to 67%.
    harmless_agree: bool = False
    val_harmful: int = 64  # validation: harmful prompts (harmful_val, then unused harmful_train)
    val_harmless: int = 64  # validation: harmless_val prompts
    val_tokens: int = 16  # validation: greedy tokens judged per reply
    #: validation: only clean refusals count on harmful prompts (repair.validation, refusal.hollow)
    strict: bool = True

    def __post_init__(self):
        if self.aim not in AIMS:
            raise UserError(f"unknown anchored aim {self.aim!r}; choose one of {', '.join(AIMS)}")
        if self.unit not in UNITS:
            raise UserError(f"unknown restoration unit {self.unit!r}; choose one of {', '.join(UNITS)}")
        if not 0 < self.step <= 1 or not 0 < self.budget <= 1:
            raise UserError(f"anchored step and budget must lie in (0, 1], got {self.step} and {self.budget}")
        if not 0 <= self.rollback < 1:
            raise UserError(f"anchored rollback must lie in [0, 1), got {self.rollback}")
        if any(not 0 < f <= 1 for f in self.line_search):
            raise UserError(f"anchored line_search shares must lie in (0, 1], got {self.line_search}")
        if self.max_steps <= 0 or self.bisect_steps < 0 or self.kl_tolerance < 0:
            raise UserError("anchored max_steps must be positive, bisect_steps and kl_tolerance >= 0")
        self.anchor(), self.validation()  # their own checks

    def anchor(self) -> AnchorConfig:
        return AnchorConfig(
            self.n_harmful,
            self.n_harmless,
            self.reply_tokens,
            self.hidden_weight,
            self.first_token_weight,
            self.batch_size,
            self.harmful_replies,
        )

    def validation(self) -> ValidationConfig:
        return ValidationConfig(self.val_harmful, self.val_harmless, self.val_tokens, strict=self.strict)

    def to_json(self) -> dict:
        out = asdict(self)
        if not out["line_search"]:
            # Off, the search is the one run before the option existed: its cached results stay valid.
            del out["line_search"]
        if not out["harmless_agree"]:
            del out["harmless_agree"]  # the same reason
        return out


def restoration_gains(model: nn.Module, original: nn.Module, anchor: Anchor, names: list[str]) -> tuple[dict, dict]:
    """({kind: {name: gain}}, {kind: loss}) with gain = -(w_orig - w_now) * dL_kind/dw for the
    parameters `names`, and each kind's share of L at the current state."""
    params = {n: p for n, p in model.named_parameters() if n in set(names)}
    grads = {kind: {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()} for kind in anchor.kinds()}
    losses = {kind: 0.0 for kind in anchor.kinds()}
    with gradients_only_for(model, list(params.values())):
        for batch in anchor.batches:
            loss = anchor_loss(model, anchor, batch)
            for n, g in zip(params, torch.autograd.grad(loss, list(params.values()))):
                grads[batch["kind"]][n] += g.float()
            losses[batch["kind"]] += float(loss.detach())
    o_params = dict(original.named_parameters())
    with torch.no_grad():
        for n, p in params.items():
            delta = o_params[n].detach().to(p.device, torch.float32) - p.detach().float()
            for kind in grads:
                grads[kind][n] = (-(delta * grads[kind][n])).cpu()
    return grads, losses


def total_gains(gains: dict[str, dict[str, torch.Tensor]], harmless_agree: bool = False) -> dict[str, torch.Tensor]:
    """Per weight, the gain on L (harmful + harmless terms); with `harmless_agree`, zero (never
    restored) where the harmless terms alone predict a loss."""
    out = {}
    for n, harmful in gains["harmful"].items():
        harmless = gains["harmless"][n]
        total = harmful + harmless
        out[n] = torch.where(harmless < 0, torch.zeros((), dtype=total.dtype), total) if harmless_agree else total
    return out


def changed_masks(model: nn.Module, original: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    o_params, c_params = dict(original.named_parameters()), dict(model.named_parameters())
    return {
        n: (c_params[n].detach() != o_params[n].detach().to(c_params[n].device, c_params[n].dtype)).cpu() for n in names
    }


def unit_gains(
    ranked: Ranked, gains: dict[str, torch.Tensor], layouts: dict[str, UnitLayout], remaining: dict[str, torch.Tensor]
) -> torch.Tensor:
    """Each ranked unit's summed gain under another gain map (the harmless terms alone)."""
    out = torch.zeros(len(ranked))
    for m in ranked.matrix.unique().tolist():
        name = ranked.names[m]
        rows = (ranked.matrix == m).nonzero().flatten()
        g = gains[name]
        sums = unit_sums(torch.where(remaining[name], g, torch.zeros((), dtype=g.dtype)), layouts[name])
        out[rows] = sums[ranked.index[rows]]
    return out


class AnchoredSearch:
    """The search on one compressed model: which entries are back (a RestorationOrder), the
    compressed values of every changed entry (so any state can be set), the front so far."""

    def __init__(
        self,
        model: nn.Module,
        original: nn.Module,
        anchor: Anchor,
        validator: Validator,
        cfg: AnchoredConfig,
        layouts: dict[str, UnitLayout],
        matrix_bytes: dict[str, int] | None = None,
        log=lambda msg: None,
    ):
        self.model, self.original, self.anchor, self.validator, self.cfg = model, original, anchor, validator, cfg
        self.layouts, self.matrix_bytes, self.log = layouts, matrix_bytes, log
        self.names = list(layouts)
        self.params = {n: p for n, p in model.named_parameters() if n in set(self.names)}
        self.shapes = {n: tuple(p.shape) for n, p in self.params.items()}
        self.changed = changed_masks(model, original, self.names)
        self.total = int(sum(int(m.sum()) for m in self.changed.values()))
        if self.total == 0:
            raise UserError("the compressed model equals the original in every restorable matrix; nothing to restore")
        self.base = {n: self.params[n].detach()[self.changed[n].to(self.params[n].device)].clone() for n in self.names}
        self.order = RestorationOrder()
        self.remaining = {n: m.clone() for n, m in self.changed.items()}
        self.touched: set[str] = set()

    # --- the model's state ----------------------------------------------------------------------
    @torch.no_grad()
    def set_state(self, through: int | None = None) -> None:
        """The compressed model with exactly the order's entries numbered <= `through` restored."""
        masks = self.order.masks(self.shapes, through)
        o_params = dict(self.original.named_parameters())
        for n in self.names:
            p, changed = self.params[n], self.changed[n].to(self.params[n].device)
            p[changed] = self.base[n]
            m = masks.get(n)
            if m is not None:
                m = m.to(p.device)
                p[m] = o_params[n].detach().to(p.device, p.dtype)[m]
        self.remaining = {n: self.changed[n] & ~masks[n] if n in masks else self.changed[n].clone() for n in self.names}
        self.touched = set(masks)

    @torch.no_grad()
    def reset(self) -> None:
        """Back to the compressed model (the order is kept: `masks()` still gives the state reached)."""
        for n in self.names:
            p = self.params[n]
            p[self.changed[n].to(p.device)] = self.base[n]

    def masks(self, through: int | None = None) -> dict[str, torch.Tensor]:
        """Entry masks of the state at `through` (None: the state the search ended in)."""
        return self.order.masks(self.shapes, through)

    def restore_all(self) -> None:
        """Restore everything the compression changed (tests; the far end of the front)."""
        for n in self.names:
            flat = self.remaining[n].flatten().nonzero().flatten()
            self.order.add(n, flat, torch.full_like(flat, self.order.next_seq))
        self.order.next_seq += 1
        self.set_state()

    def restored_count(self) -> int:
        return self.total - int(sum(int(m.sum()) for m in self.remaining.values()))

    def stored_bytes(self) -> int | None:
        if self.matrix_bytes is None:
            return None
        return int(sum(self.matrix_bytes.get(n, 0) for n in self.touched))

    def apply(self, ranked: Ranked) -> tuple[int, int]:
        """Restore `ranked`'s units, numbered in their order; returns (first, last) sequence number."""
        first = self.order.next_seq
        for m in ranked.matrix.unique().tolist():
            n = ranked.names[m]
            rows = (ranked.matrix == m).nonzero().flatten()
            unit_seq = torch.full((unit_count(self.shapes[n], self.layouts[n]),), -1, dtype=torch.long)
            unit_seq[ranked.index[rows]] = first + rows
            flat = self.remaining[n].flatten().nonzero().flatten()
            seq = unit_seq[unit_of(flat, self.shapes[n], self.layouts[n])]
            self.order.add(n, flat[seq >= 0], seq[seq >= 0])
        self.order.next_seq = first + len(ranked)
        self.set_state()
        return first, self.order.next_seq - 1

    def forget(self, seqs: torch.Tensor) -> None:
        """Drop the units numbered `seqs` from the order (a rollback, or a bisection's tail)."""
        gone = seqs.long()
        for n in list(self.order.parts):
            self.order.keep(n, lambda s: ~torch.isin(s, gone))
        self.set_state()

    def point(self, reading: dict, kind: str, step: int, through: int, **extra) -> dict:
        # A packed checkpoint's point names the matrices it stores at full precision (what its bytes are).
        where = dict(full_precision=sorted(self.touched)) if self.matrix_bytes is not None else {}
        return dict(
            kind=kind,
            step=step,
            through=through,
            restored=self.restored_count(),
            fraction_of_changed=self.restored_count() / self.total,
            bytes=self.stored_bytes(),
            **where,
            **reading,
            **extra,
        )

    # --- the search -----------------------------------------------------------------------------
    def run(self, original_reading: dict, compressed_reading: dict, checkpoint: SearchCheckpoint | None = None) -> dict:
        """The search from the compressed model, or from the state `checkpoint` last saved (it is
        saved after every step that did not reach the original)."""
        cfg, start = self.cfg, time.perf_counter()
        step_weights = max(1, math.ceil(cfg.step * self.total))
        limit = math.ceil(cfg.budget * self.total)
        points = [self.point(compressed_reading, "compressed", 0, -1)]
        reached = reaches_original(compressed_reading, original_reading, cfg.aim)
        chosen, reason, step, earlier = 0, "", 0, 0.0
        saved = checkpoint.load() if checkpoint is not None else None
        if saved is not None:
            points, step, self.order, earlier = saved.points, saved.step, saved.order, saved.seconds
            self.set_state()
            self.log(f"anchored search: resuming after step {step} ({self.restored_count():,} weights restored)")
        while not reached and step < cfg.max_steps and self.restored_count() < limit:
            step += 1
            gains, losses = restoration_gains(self.model, self.original, self.anchor, self.names)
            points[-1]["loss"] = dict(losses, total=sum(losses.values()))
            total = total_gains(gains, cfg.harmless_agree)
            ranked = self.rank(total, min(step_weights, limit - self.restored_count()))
            if len(ranked) == 0:
                reason = "no weight left whose restoration is predicted to bring the model closer to the original"
                break
            before = points[-1]
            harmless_gain = unit_gains(ranked, gains["harmless"], self.layouts, self.remaining)
            del gains, total
            first, last = self.apply(ranked)
            tried = self.line_search(first, last) if cfg.line_search else None
            lowest = min(x["loss"] for x in tried["losses"]) if tried is not None else None
            if lowest is not None and lowest >= before["loss"]["total"]:
                # No share lowers L: first-order gains that far off (SNIP 50%: a 0.25% step took L
                # from 1.78 to 19.6 and the model to KL 18) are not a step to take.
                self.forget(torch.arange(first, last + 1))
                reason = (
                    f"no share of step {step} lowers the anchor loss "
                    f"({before['loss']['total']:.3f} before, {lowest:.3f} at best)"
                )
                self.log(f"anchored search: {reason}; the step is undone and the search stops")
                break
            if tried is not None:
                last = tried["kept_through"]
                harmless_gain = harmless_gain[: last - first + 1]
            reading = self.validator.read(self.model).to_json()
            extra = dict(line_search=tried["losses"]) if tried is not None else {}
            points.append(self.point(reading, "step", step, last, units=last - first + 1, **extra))
            self.log(
                f"anchored step {step}: {self.restored_count():,} of {self.total:,} changed weights restored; validation refusal "
                f"{reading['refusal_harmful']['value']:.0%} harmful, {reading['refusal_harmless']['value']:.0%} harmless, "
                f"KL to the original {reading['kl_original']:.3f}"
            )
            if cfg.rollback and harmless_worse(reading, before, original_reading, cfg.kl_tolerance):
                points[-1]["undone"] = True  # this state is gone after the rollback: never chosen
                worst = harmless_gain.argsort()[: max(1, math.ceil(cfg.rollback * len(harmless_gain)))]
                before_count = self.restored_count()
                self.forget(first + worst)
                reading = self.validator.read(self.model).to_json()
                points.append(
                    self.point(
                        reading,
                        "rollback",
                        step,
                        last,
                        units=len(harmless_gain) - len(worst),
                        rolled_back=before_count - self.restored_count(),
                    )
                )
                self.log(
                    f"anchored step {step}: the harmless side got worse; {before_count - self.restored_count():,} weights put back"
                )
            if reaches_original(reading, original_reading, cfg.aim):
                # The smallest prefix of this step (what a rollback kept of it) that still gets there.
                reached = True
                chosen = self.bisect(points, first, last, original_reading, step)
                break
            if checkpoint is not None:
                checkpoint.save(SearchState(points, step, self.order, earlier + time.perf_counter() - start))
        if not reached:
            reason = reason or ("budget spent" if self.restored_count() >= limit else "step limit reached")
            chosen = best_point(points, original_reading)
        else:
            hi = original_reading["refusal_harmful"]["ci95"][1]
            over = points[chosen]["refusal_harmful"]["value"] > hi
            reason = (
                "reached the original's validation refusal"
                if not over
                else "reached the original's validation refusal, overshooting its interval (the smallest prefix found still refuses more)"
            )
        if "loss" not in points[-1] and not points[-1].get("undone"):
            points[-1]["loss"] = self.losses_at(points[-1]["through"])
        self.keep_point(points[chosen])
        return dict(
            points=points,
            chosen=chosen,
            reached=reached,
            reason=reason,
            aim=cfg.aim,
            changed=self.total,
            step_weights=step_weights,
            seconds=round(earlier + time.perf_counter() - start, 1),
        )

    def line_search(self, first: int, last: int) -> dict:
        """The share of the step just applied (units numbered first..last) whose restoration gives
        the lowest anchor loss, among cfg.line_search's shares; the rest of the step is forgotten.
        Returns {kept_through, losses: [{units, loss}]}."""
        from .anchor import anchor_losses

        n = last - first + 1
        sizes = sorted({max(1, math.ceil(f * n)) for f in self.cfg.line_search} | {n})
        losses = []
        for k in sizes:
            self.set_state(first + k - 1)
            losses.append(dict(units=k, loss=anchor_losses(self.model, self.anchor)["total"]))
        best = min(losses, key=lambda x: (x["loss"], x["units"]))["units"]
        self.log(
            f"anchored line search: {best:,} of the step's {n:,} units kept (L {[round(x['loss'], 3) for x in losses]})"
        )
        if best < n:
            self.forget(torch.arange(first + best, last + 1))
        else:
            self.set_state()
        return dict(kept_through=first + best - 1, losses=losses)

    def losses_at(self, through: int) -> dict:
        from .anchor import anchor_losses

        self.set_state(through)
        return anchor_losses(self.model, self.anchor)

    def rank(self, gains: dict[str, torch.Tensor], budget: int) -> Ranked:
        byte_cost = self.matrix_bytes if self.cost_in_bytes() else None
        return rank_units(gains, self.remaining, self.layouts, budget, byte_cost, self.touched).take(budget)

    def cost_in_bytes(self) -> bool:
        return self.cfg.cost == "bytes" or (self.cfg.cost == "auto" and self.matrix_bytes is not None)

    def bisect(self, points: list[dict], first: int, last: int, original_reading: dict, step: int) -> int:
        """The smallest prefix of the last step's units (first..last) that still reaches the
        original, found by bisection; each tried prefix becomes a point. Returns the chosen point."""
        lo, hi, best = first - 1, last, len(points) - 1
        for _ in range(self.cfg.bisect_steps):
            mid = (lo + hi) // 2
            if mid <= lo:
                break
            self.set_state(mid)
            reading = self.validator.read(self.model).to_json()
            points.append(self.point(reading, "bisect", step, mid, units=mid - first + 1))
            if reaches_original(reading, original_reading, self.cfg.aim):
                hi, best = mid, len(points) - 1
            else:
                lo = mid
        return best

    def keep_point(self, point: dict) -> None:
        """Leave the model (and the order) at `point`: later-numbered entries are forgotten."""
        through = point["through"]
        for n in list(self.order.parts):
            self.order.keep(n, lambda s: s <= through)
        self.order.next_seq = through + 1
        self.set_state()


def best_point(points: list[dict], original_reading: dict) -> int:
    """When no point reaches the original: the highest harmful validation refusal among points whose
    harmless refusal is not above the original's interval (fewest weights on ties); the
    compressed model itself when none qualifies."""
    ceiling = original_reading["refusal_harmless"]["ci95"][1]
    ok = [i for i, p in enumerate(points) if p["refusal_harmless"]["value"] <= ceiling and not p.get("undone")]
    if not ok:
        return 0
    return max(ok, key=lambda i: (points[i]["refusal_harmful"]["value"], -points[i]["restored"]))
