"""ActSVD (Wei et al. 2024): attributing a behaviour to ranks of each layer's outputs.

A decoder linear with weight W [out, in] maps calibration inputs X [n, in] (one row per token) to
outputs A = X W^T [n, out]. The top-r singular directions of A in output space, U_r [out, r],
span what the layer mostly writes on that data (Wei et al. write A = W X_in with X_in = X^T, so
U_r are A's left singular vectors there; here they are the right singular vectors of X W^T).

  remove_top_ranks                   W <- W - U_r U_r^T W: the layer stops writing into the top-r
                                     directions of the (safety) data.
  orthogonal_projection_difference   W <- W - (I - P_u) P_s W, P_u = U_u U_u^T from utility data,
                                     P_s = U_s U_s^T from safety data: remove the safety
                                     directions except where utility directions span them too.

U_r without holding X: the input Gram G = X^T X [in, in] is accumulated in float64 as batches
stream by (memory in^2 per linear, whatever the token count), and A^T A = W G W^T [out, out] has
U as its top eigenvectors. When out > in it is cheaper to factor G = V L V^T and take the left
singular vectors of B = W V L^(1/2) [out, in], since B B^T = A^T A. Both are exact; Wei et al.
use randomized torch.svd_lowrank (20 power iterations) on A itself.

Tokens. Wei et al.'s ActSVD code asserts --disentangle: only activations at response tokens
(labels != -100) enter A. tokens='response' (default) does that and needs a ResponseCalibration;
tokens='all' uses every unpadded token (prompt and response, as the Wanda scores do).

Order. Their code edits layer l in place before the forward pass that records layer l+1, so each
block's activations come from the model whose earlier blocks are already edited: that is the
block-sequential recipe of compress_blockwise, and sequential=True (default) follows it.
sequential=False computes every block's directions from the unedited model's activations.

Ranks are an int (clipped to min(out, in), the most A can have) or a float in [0, 1] (that
fraction of min(out, in), floored); a rank beyond the number of calibration tokens reaches
directions the data never excite (zero energy, arbitrary basis). ru and rs are the ranks of P_u
and P_s. Wei et al.'s low_rank_diff flags are complements (their projectors have rank
min(out, in) - rank_pos and min(out, in) - rank_neg), so their r^u = 3000, r^s = 4000 on
Llama-2-7B is ru = 1096, rs = 96 here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from lm.architecture import block_prefix, fused_parts
from lm.errors import UserError
from lm.hooks import decoder_layers

from .blockwise import block0_inputs, block_linears, collect, run_block

TOKENS = ("response", "all")
Rank = int | float


@dataclass(frozen=True)
class ActSVDConfig:
    tokens: str = "response"
    sequential: bool = True

    def __post_init__(self):
        if self.tokens not in TOKENS:
            raise UserError(f"unknown ActSVD token selection {self.tokens!r}; choose one of {', '.join(TOKENS)}")


def resolve_rank(rank: Rank, out_features: int, in_features: int) -> int:
    full = min(out_features, in_features)
    if isinstance(rank, bool) or not isinstance(rank, (int, float)):
        raise UserError(f"a rank is an int or a fraction in [0, 1], got {rank!r}")
    if isinstance(rank, int):
        if rank < 0:
            raise UserError(f"rank must be >= 0, got {rank}")
        return min(rank, full)
    if not 0 <= rank <= 1:
        raise UserError(f"a rank fraction must be in [0, 1], got {rank}")
    return int(rank * full)


# --- pure tensor functions ---------------------------------------------------------------------


class InputGram:
    """X^T X of one linear's inputs, float64 so that a long calibration stream loses nothing."""

    def __init__(self, linear: nn.Linear):
        self.gram = torch.zeros(
            linear.in_features, linear.in_features, dtype=torch.float64, device=linear.weight.device
        )

    def add(self, x: torch.Tensor) -> None:
        x = x.double()
        self.gram.addmm_(x.T, x)


def top_output_directions(weight: torch.Tensor, gram_in: torch.Tensor, r: int) -> torch.Tensor:
    """U_r [out, r] (float64, orthonormal columns, descending singular values) of A = X W^T, given X^T X."""
    w = weight.detach().double()
    g = gram_in.to(device=w.device, dtype=torch.float64)
    g = (g + g.T) / 2  # accumulated sums are symmetric only up to rounding; eigh wants exact symmetry
    out_features, in_features = w.shape
    r = resolve_rank(r, out_features, in_features)
    if r == 0:
        return w.new_zeros(out_features, 0)
    if out_features <= in_features:
        gram_out = w @ g @ w.T
        _, vectors = torch.linalg.eigh((gram_out + gram_out.T) / 2)
        return vectors[:, -r:].flip(-1)
    values, v = torch.linalg.eigh(g)
    u, _, _ = torch.linalg.svd(w @ (v * values.clamp_min(0).sqrt()), full_matrices=False)
    return u[:, :r]


def remove_top_ranks(weight: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """W - U U^T W, computed in float64 and returned in W's dtype."""
    if directions.shape[1] == 0:
        return weight.detach().clone()
    w = weight.detach().double()
    u = directions.to(w)
    return (w - u @ (u.T @ w)).to(weight.dtype)


def orthogonal_projection_difference(weight: torch.Tensor, utility: torch.Tensor, safety: torch.Tensor) -> torch.Tensor:
    """W - (I - U_u U_u^T) U_s U_s^T W, without forming any [out, out] projector."""
    w = weight.detach().double()
    u_u, u_s = utility.to(w), safety.to(w)
    safety_part = u_s @ (u_s.T @ w)
    return (w - (safety_part - u_u @ (u_u.T @ safety_part))).to(weight.dtype)


# --- model-level drivers -----------------------------------------------------------------------


def token_states(model: nn.Module, data, tokens: str) -> list:
    """block0_inputs, with each batch's collection mask narrowed to response tokens if asked."""
    states = block0_inputs(model, data)
    if tokens == "all":
        return states
    if not all("labels" in b for b in data.batches):
        raise UserError("ActSVD on response tokens needs (prompt, response) data with labels (a ResponseCalibration)")
    # Every token still flows through the blocks (responses attend to their prompts); only the
    # Gram sees response positions alone. Labels are -100 on padding too.
    return [
        (hidden, kwargs, b["labels"].to(mask.device) != -100) for (hidden, kwargs, mask), b in zip(states, data.batches)
    ]


Edit = Callable[[str, nn.Linear, list[torch.Tensor]], None]  # (layer name, linear, one Gram per data set)


@torch.no_grad()
def edit_blockwise(
    model: nn.Module, datas: list, edit: Edit, cfg: ActSVDConfig = ActSVDConfig(), desc: str = "ActSVD"
) -> None:
    """Stream each data set block by block; `edit` every linear from its input Grams, in place."""
    streams = [token_states(model, d, cfg.tokens) for d in datas]
    for index, block in enumerate(tqdm(decoder_layers(model), desc=desc, unit="block", leave=False)):
        grams = [collect(block, s, InputGram) for s in streams]
        if not cfg.sequential:
            streams = [run_block(block, s) for s in streams]  # before the edit: the original block feeds the next
        prefix = block_prefix(model, index)
        for name, linear in block_linears(block).items():
            edit(prefix + name, linear, [g[name].gram for g in grams])
        if cfg.sequential:
            streams = [run_block(block, s) for s in streams]


def projection_rows(model: nn.Module, name: str, linear: nn.Linear) -> list[tuple[str, torch.Tensor]]:
    """(report key, output rows) of each projection in the linear: a fused one (Phi-3 qkv_proj,
    GPT-NeoX query_key_value, gate_up_proj) gets its ranks per projection, as the unfused
    q_proj / k_proj / v_proj of a Llama would."""
    parts = fused_parts(model, f"{name}.weight", linear.out_features)
    if len(parts) == 1:
        return [(f"{name}.weight", next(iter(parts.values())))]
    return [(f"{name}.weight[{part}]", rows) for part, rows in parts.items()]


def actsvd_remove_top(model: nn.Module, data, rank: Rank, cfg: ActSVDConfig = ActSVDConfig()) -> dict[str, int]:
    """Remove each decoder linear's top-r output directions on `data` (safety data); returns r per weight."""
    removed = {}

    def edit(name, linear, grams):
        for key, rows in projection_rows(model, name, linear):
            w = linear.weight[rows]
            r = resolve_rank(rank, *w.shape)
            linear.weight[rows] = remove_top_ranks(w, top_output_directions(w, grams[0], r))
            removed[key] = r

    edit_blockwise(model, [data], edit, cfg, desc=f"ActSVD r={rank}")
    return removed


def actsvd_orthogonal(
    model: nn.Module, utility, safety, rank_utility: Rank, rank_safety: Rank, cfg: ActSVDConfig = ActSVDConfig()
) -> dict[str, tuple[int, int]]:
    """W <- W - (I - P_u) P_s W for every decoder linear; returns (ru, rs) per weight."""
    ranks = {}

    def edit(name, linear, grams):
        for key, rows in projection_rows(model, name, linear):
            w = linear.weight[rows]
            ru, rs = resolve_rank(rank_utility, *w.shape), resolve_rank(rank_safety, *w.shape)
            linear.weight[rows] = orthogonal_projection_difference(
                w, top_output_directions(w, grams[0], ru), top_output_directions(w, grams[1], rs)
            )
            ranks[key] = (ru, rs)

    edit_blockwise(model, [utility, safety], edit, cfg, desc=f"ActSVD ru={rank_utility} rs={rank_safety}")
    return ranks
