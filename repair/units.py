"""What one restoration step restores at a time: single weights, output rows (neurons), attention
heads or whole matrices, and what a unit costs.

A unit's score is the sum of its entries' scores (first-order effects add), its cost the number of
its entries still to restore (weights) or, for a packed checkpoint, the bytes its restoration adds
to the output: a packed matrix touched at all is stored at full precision, so the first unit
restored in a matrix pays for the whole matrix and later ones in it pay nothing more. Units are
taken in order of score per cost.

Heads: the rows of q/k/v projections and the columns of the attention output projection, in blocks
of head_dim; other matrices fall back to rows (MLP neurons for up / gate projections).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

UNITS = ("weight", "row", "head", "matrix")
COSTS = ("weights", "bytes")

# Names of the attention projections whose rows (q, k, v) or columns (o) are grouped per head.
HEAD_ROWS = ("q_proj", "k_proj", "v_proj", "query", "key", "value", "q", "k", "v")
HEAD_COLUMNS = ("o_proj", "out_proj", "dense", "o")


@dataclass(frozen=True)
class UnitLayout:
    """How one matrix divides into units: `kind` ('weight', 'row', 'column', 'matrix') and a block
    size along that axis (head_dim for heads, 1 otherwise)."""

    kind: str
    block: int = 1


def layout_for(name: str, shape: tuple[int, ...], unit: str, head_dim: int | None) -> UnitLayout:
    """The unit layout of parameter `name` (a decoder matrix) under `unit`."""
    if unit == "weight" or len(shape) != 2:
        return UnitLayout("weight")
    if unit == "matrix":
        return UnitLayout("matrix")
    leaf = name.removesuffix(".weight").rsplit(".", 1)[-1]
    if unit == "head" and head_dim:
        if leaf in HEAD_ROWS and shape[0] % head_dim == 0:
            return UnitLayout("row", head_dim)
        if leaf in HEAD_COLUMNS and shape[1] % head_dim == 0 and "attn" in name:
            return UnitLayout("column", head_dim)
    return UnitLayout("row")


def unit_sums(values: torch.Tensor, layout: UnitLayout) -> torch.Tensor:
    """Per-unit sums of an entry-wise tensor (scores, or remaining-entry counts), flat."""
    v = values.float()
    if layout.kind == "weight":
        return v.flatten()
    if layout.kind == "matrix":
        return v.sum().reshape(1)
    if layout.kind == "row":
        return v.reshape(v.shape[0] // layout.block, -1).sum(dim=1)
    return v.reshape(v.shape[0], v.shape[1] // layout.block, layout.block).sum(dim=(0, 2))


def unit_mask(chosen: torch.Tensor, shape: tuple[int, ...], layout: UnitLayout) -> torch.Tensor:
    """Entry mask of the units whose flat indices are `chosen`."""
    if layout.kind == "weight":
        mask = torch.zeros(int(torch.Size(shape).numel()), dtype=torch.bool)
        mask[chosen] = True
        return mask.view(shape)
    if layout.kind == "matrix":
        return torch.full(shape, bool(len(chosen)), dtype=torch.bool)
    if layout.kind == "row":
        units = torch.zeros(shape[0] // layout.block, dtype=torch.bool)
        units[chosen] = True
        return units.repeat_interleave(layout.block).unsqueeze(1).expand(shape).clone()
    units = torch.zeros(shape[1] // layout.block, dtype=torch.bool)
    units[chosen] = True
    return units.repeat_interleave(layout.block).unsqueeze(0).expand(shape).clone()


@dataclass(frozen=True)
class Ranked:
    """Restorable units, best score per cost first: parallel tensors over units."""

    names: list[str]  # matrix names; `matrix` indexes into them
    matrix: torch.Tensor  # long
    index: torch.Tensor  # long: the unit's flat index within its matrix's layout
    score: torch.Tensor  # float: predicted gain
    weights: torch.Tensor  # long: entries still to restore in the unit

    def __len__(self) -> int:
        return len(self.index)

    def take(self, budget: int) -> "Ranked":
        """The leading units until `budget` weights are reached (the unit that crosses it included)."""
        if len(self) == 0 or budget <= 0:
            return self.select(torch.zeros(0, dtype=torch.long))
        cum = self.weights.cumsum(0)
        n = int((cum < budget).sum()) + 1
        return self.select(torch.arange(min(n, len(self))))

    def select(self, rows: torch.Tensor) -> "Ranked":
        return Ranked(self.names, self.matrix[rows], self.index[rows], self.score[rows], self.weights[rows])

    def masks(self, shapes: dict[str, tuple[int, ...]], layouts: dict[str, UnitLayout]) -> dict[str, torch.Tensor]:
        """Entry masks (per matrix) of these units."""
        out = {}
        for m in self.matrix.unique().tolist():
            name = self.names[m]
            out[name] = unit_mask(self.index[self.matrix == m], shapes[name], layouts[name])
        return out


def rank_units(
    scores: dict[str, torch.Tensor],
    remaining: dict[str, torch.Tensor],
    layouts: dict[str, UnitLayout],
    budget: int,
    matrix_bytes: dict[str, int] | None = None,
    touched: set[str] | None = None,
) -> Ranked:
    """Units with a positive score and entries left to restore, best score per cost first, enough
    of them to fill `budget` weights (a unit holds at least one weight, so `budget` units suffice).

    matrix_bytes: net bytes a packed matrix adds when first touched (None: the cost is weights);
    touched: matrices already stored at full precision, whose units add no bytes.
    """
    touched = touched or set()
    names, parts = [], []
    for name, s in scores.items():
        left = remaining[name]
        if not bool(left.any()):
            continue
        layout = layouts[name]
        score = unit_sums(torch.where(left, s, torch.zeros((), dtype=s.dtype)), layout)
        count = unit_sums(left, layout)
        idx = ((score > 0) & (count > 0)).nonzero().flatten()
        if len(idx) == 0:
            continue
        score, count = score[idx], count[idx]
        extra = 0.0 if matrix_bytes is None or name in touched else float(matrix_bytes.get(name, 0))
        density = score / (count + extra)
        if len(idx) > budget:  # only the best `budget` of a matrix can ever be taken in one step
            keep = density.topk(budget).indices
            idx, score, count, density = idx[keep], score[keep], count[keep], density[keep]
        parts.append((torch.full_like(idx, len(names)), idx, score, count.long(), density))
        names.append(name)
    if not parts:
        empty = torch.zeros(0)
        return Ranked(names, empty.long(), empty.long(), empty, empty.long())
    matrix, index, score, weights, density = (torch.cat(x) for x in zip(*parts))
    order = density.argsort(descending=True, stable=True)
    if len(order) > budget:
        order = order[:budget]
    return Ranked(names, matrix[order], index[order], score[order], weights[order])


def unit_count(shape: tuple[int, ...], layout: UnitLayout) -> int:
    """How many units a matrix of `shape` holds under `layout`."""
    if layout.kind == "weight":
        return int(torch.Size(shape).numel())
    if layout.kind == "matrix":
        return 1
    return shape[0] // layout.block if layout.kind == "row" else shape[1] // layout.block


def unit_of(flat: torch.Tensor, shape: tuple[int, ...], layout: UnitLayout) -> torch.Tensor:
    """The unit index of each flat entry index of a matrix of `shape`."""
    if layout.kind == "weight":
        return flat
    if layout.kind == "matrix":
        return torch.zeros_like(flat)
    columns = shape[1]
    if layout.kind == "row":
        return (flat // columns) // layout.block
    return (flat % columns) // layout.block
