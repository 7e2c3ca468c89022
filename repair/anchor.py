"""The original model as the repair's target: what "closer to the original" means, as a loss.

Restoration moves a compressed model back towards the original, so its objective measures the
distance to the original rather than the amount of refusal (a weight that makes the model refuse
or garble everything scores badly here, because the original does not do that). On training
prompts only (harmful_train, harmless_train: disjoint from every validation and held-out prompt):

    L = NLL(original's greedy replies | harmful prompts)            the original's own refusals
      + NLL(original's greedy replies | harmless prompts)           and helpful answers
      + first_token_weight * KL_first(harmful and harmless prompts) where it decides to refuse
      + hidden_weight * D(harmful prompts)                          its internal state

    KL_first = mean over prompts of KL(original || model) of the next-token distribution at the
               end of the prompt, on each kind of prompt

    D = mean over blocks l >= source and the post-instruction positions of
        ||h_l(model) - h_l(original)||^2 / ||h_l(original)||^2

the relative squared distance of the residual stream that the refusal direction is read from (the
source) and that later blocks turn into a reply (the readout): compression often keeps the
recognition of harm and breaks the readout after the source. Teacher forcing on the original's
replies makes the NLL terms the likelihood of exactly what the original said (the
"own_refusals" idea of repair.targeted, extended to harmless prompts, where it penalises
over-refusal). Kang Yang et al. 2025 match the aligned model's hidden states on harmful prompts;
here the reply likelihood is added because equal hidden states at a few positions do not fix
what the model says. The reply NLL weighs the first reply token as one of ~24, but that token is
where a chat model refuses or answers ("I'm sorry" / "Sure"): without KL_first, restoring the
weights that make the model open with a refusal looked cheap on harmless prompts, and on the
embedded model's set-difference variant the first 1% of restored weights took harmless refusal
from 0% to 34% (KL to the original 0.28 -> 0.74 on harmless validation prompts).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from lm import datasets
from lm.architecture import backbone, decoder_layers, logits_from_normed
from lm.chat import post_instruction
from lm.errors import UserError

HARMFUL_REPLIES = ("all", "refusals")


@dataclass(frozen=True)
class AnchorConfig:
    n_harmful: int = 64  # harmful_train instructions whose replies the loss reads (all, or the refusals among them)
    n_harmless: int = 32  # harmless_train instructions the loss reads
    reply_tokens: int = 24  # tokens of the original's greedy replies (teacher forcing)
    hidden_weight: float = 1.0  # weight of the residual-stream distance D
    first_token_weight: float = 1.0  # weight of the next-token KL to the original at the end of each prompt
    batch_size: int = 8  # sequences per forward / backward pass
    #: Which of the original's harmful replies L reads: all of them, or only its clean refusals
    #: (refusal.hollow). The original complies with about 4 in 10 harmful training prompts on the
    #: embedded model, and those replies are longer than its refusals, so with "all" most harmful
    #: reply tokens teach the original's compliance text rather than its decision to decline.
    #: An original that declines none of them cleanly (a random test model) is anchored on all
    #: its replies, and the Anchor says so.
    harmful_replies: Literal["all", "refusals"] = "refusals"

    def __post_init__(self):
        for name in ("n_harmful", "n_harmless", "reply_tokens", "batch_size"):
            if getattr(self, name) <= 0:
                raise UserError(f"anchor {name} must be positive, got {getattr(self, name)}")
        if self.harmful_replies not in HARMFUL_REPLIES:
            raise UserError(
                f"unknown anchor harmful_replies {self.harmful_replies!r}; choose one of {', '.join(HARMFUL_REPLIES)}"
            )
        if self.hidden_weight < 0 or self.first_token_weight < 0:
            raise UserError(
                f"anchor weights must be >= 0, got hidden {self.hidden_weight}, first token {self.first_token_weight}"
            )


@dataclass
class Anchor:
    """Teacher-forcing batches of the original's replies, with the original's residual stream
    (blocks `layers`, post-instruction positions) for the harmful ones."""

    #: input_ids, attention_mask, labels, kind ("harmful" / "harmless"), prompt_len, first (log-probs), target (harmful)
    batches: list[dict]
    layers: list[int]  # residual-stream inputs of these blocks enter D
    n_tokens: dict[str, int]  # reply tokens per kind (the NLL terms are means over them)
    n_sequences: dict[str, int]
    hidden_weight: float
    instructions: dict[str, list[str]]
    first_token_weight: float = 0.0
    harmful_replies: str = "all"  # which harmful replies the batches hold (AnchorConfig.harmful_replies, as applied)

    def kinds(self) -> tuple[str, ...]:
        return ("harmful", "harmless")


def anchor_instructions(cfg: AnchorConfig, seed: int) -> dict[str, list[str]]:
    """The training instructions the loss reads (seeded samples of the train splits)."""
    return dict(
        harmful=datasets.sample(datasets.instructions("harmful", "train"), cfg.n_harmful, seed),
        harmless=datasets.sample(datasets.instructions("harmless", "train"), cfg.n_harmless, seed),
    )


def build_anchor(
    original: nn.Module,
    tokenizer,
    cfg: AnchorConfig,
    source_layer: int,
    seed: int = 0,
    instructions: dict[str, list[str]] | None = None,
    log=lambda msg: None,
) -> Anchor:
    """The original's greedy replies to the training instructions, tokenized for teacher forcing,
    and its residual stream at blocks >= `source_layer` on the harmful ones."""
    from compression.attribution import own_replies
    from compression.calibration import tokenize_pairs

    instructions = instructions or anchor_instructions(cfg, seed)
    n_layers = len(decoder_layers(original))
    if not 0 <= source_layer < n_layers:
        raise UserError(f"source layer {source_layer} out of range for {n_layers} blocks")
    layers = list(range(source_layer, n_layers))
    used = cfg.harmful_replies
    n_post = len(post_instruction(tokenizer).token_ids)
    device = next(original.parameters()).device
    batches, n_tokens, n_seq = [], {}, {}
    for kind in ("harmful", "harmless"):
        pairs = own_replies(original, tokenizer, instructions[kind], cfg.reply_tokens, seed)
        if kind == "harmful" and cfg.harmful_replies == "refusals":
            refusals = refusal_pairs(pairs)
            if refusals:
                pairs = refusals
            else:
                used = "all (the original declined none cleanly)"
                log(
                    f"anchor: the original declined none of {len(pairs)} harmful training prompts cleanly; reading all its replies"
                )
        if not pairs:
            raise UserError(
                f"the original gave no reply to any of {len(instructions[kind])} {kind} training instructions"
            )
        cal = tokenize_pairs(tokenizer, pairs, seqlen=512, batch_size=cfg.batch_size)
        n_tokens[kind], n_seq[kind] = cal.n_response_tokens, len(pairs)
        for b in cal.batches:
            b = {k: v.to(device) for k, v in b.items()}
            prompt_len = (b["labels"] != -100).int().argmax(dim=1)  # the first reply token
            b.update(kind=kind, prompt_len=prompt_len)
            with torch.no_grad():
                out = backbone(original)(
                    input_ids=b["input_ids"],
                    attention_mask=b["attention_mask"],
                    output_hidden_states=True,
                    use_cache=False,
                )
                b["first"] = first_token_logprobs(original, out.last_hidden_state, prompt_len).detach()
                if kind == "harmful":
                    b["target"] = post_instruction_states(original, b, layers, n_post, out.hidden_states).detach()
            batches.append(b)
    return Anchor(batches, layers, n_tokens, n_seq, cfg.hidden_weight, instructions, cfg.first_token_weight, used)


def refusal_pairs(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The (prompt, reply) pairs whose reply is a clean refusal under Arditi et al.'s judge, the one
    the search's validation reads (refusal.hollow: an apology followed by compliance is not one)."""
    from refusal.hollow import clean_refusal
    from refusal.judges import judges

    arditi = judges()[1]
    return [(p, r) for p, r in pairs if clean_refusal(r, arditi)]


def first_token_logprobs(model: nn.Module, normed: torch.Tensor, prompt_len: torch.Tensor) -> torch.Tensor:
    """[batch, vocab] log-probabilities of the first reply token: the LM head at each prompt's last position."""
    rows = torch.arange(normed.shape[0], device=normed.device)
    return torch.log_softmax(logits_from_normed(model, normed[rows, prompt_len - 1]).float(), dim=-1)


def first_token_kl(logprobs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Summed KL(target || model) over rows, both [batch, vocab] log-probabilities."""
    return (target.exp() * (target - logprobs)).sum()


def post_instruction_positions(prompt_len: torch.Tensor, n_post: int) -> torch.Tensor:
    """[batch, n_post] indices of the last n_post prompt tokens of right-padded rows."""
    offsets = torch.arange(-n_post, 0, device=prompt_len.device)
    return (prompt_len.unsqueeze(1) + offsets).clamp_min(0)


def post_instruction_states(
    model: nn.Module, batch: dict, layers: list[int], n_post: int, hidden_states=None
) -> torch.Tensor:
    """[batch, len(layers), n_post, d]: the inputs of blocks `layers` at the post-instruction positions."""
    if hidden_states is None:
        with torch.no_grad():
            hidden_states = backbone(model)(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                output_hidden_states=True,
                use_cache=False,
            ).hidden_states
    pos = post_instruction_positions(batch["prompt_len"], n_post)
    rows = torch.arange(pos.shape[0], device=pos.device).unsqueeze(1)
    return torch.stack([hidden_states[layer][rows, pos] for layer in layers], dim=1)


def relative_distance(states: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Sum over rows of the mean (over blocks and positions) of ||s - t||^2 / ||t||^2."""
    t = target.float()
    return (((states.float() - t) ** 2).sum(-1) / (t**2).sum(-1).clamp_min(1e-12)).mean(dim=(1, 2)).sum()


def reply_nll(model: nn.Module, normed: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed negative log-likelihood of the label tokens; the LM head runs only where a label is."""
    targets = labels[:, 1:]
    where = targets != -100
    logits = logits_from_normed(model, normed[:, :-1][where])
    return torch.nn.functional.cross_entropy(logits.float(), targets[where], reduction="sum")


def anchor_loss(model: nn.Module, anchor: Anchor, batch: dict) -> torch.Tensor:
    """This batch's share of L (so the sum over batches is L)."""
    out = backbone(model)(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        output_hidden_states=batch["kind"] == "harmful",
        use_cache=False,
    )
    kind = batch["kind"]
    loss = reply_nll(model, out.last_hidden_state, batch["labels"]) / anchor.n_tokens[kind]
    if anchor.first_token_weight > 0:
        first = first_token_logprobs(model, out.last_hidden_state, batch["prompt_len"])
        loss = loss + anchor.first_token_weight * first_token_kl(first, batch["first"]) / anchor.n_sequences[kind]
    if kind == "harmful" and anchor.hidden_weight > 0:
        states = post_instruction_states(model, batch, anchor.layers, batch["target"].shape[2], out.hidden_states)
        loss = loss + anchor.hidden_weight * relative_distance(states, batch["target"]) / anchor.n_sequences[kind]
    return loss


@torch.no_grad()
def anchor_losses(model: nn.Module, anchor: Anchor) -> dict[str, float]:
    """L's terms as they stand (no gradient): per kind, and the total."""
    parts = {kind: 0.0 for kind in anchor.kinds()}
    for b in anchor.batches:
        parts[b["kind"]] += float(anchor_loss(model, anchor, b))
    return dict(parts, total=sum(parts.values()))
