"""Where things are in a causal LM: the one place that knows module paths.

Every stage reaches a model's decoder blocks, their linears, what each block adds to the residual
stream, the final norm and the logits through these functions, never by spelling a path. A family
is a `Layout` (a row of LAYOUTS); one whose modules are not where its layout says gives one
`UserError` naming what is missing.

Families differ where it changes a formula:
- post-norm blocks (Gemma 2 / 3 sandwich norms, OLMo 2): what attention and the MLP add to the stream
  is the output of `post_attention_layernorm` / `post_feedforward_layernorm`, so hooks ablate
  there, and no weight edit removes a direction exactly (a norm sits between the last linear and
  the residual add): weight orthogonalization refuses these families;
- the logits: Gemma 2's final soft-capping and Granite's `logits_scaling` are applied after the head;
- mixture-of-experts blocks store experts as 3-D tensors (Mixtral, Qwen-MoE, OLMoE in transformers 5):
  the stages that read nn.Linear layers run inside lm.experts.experts_as_linears, where every
  expert's projections are linears; `decoder_matrices` lists the fused tensors with the linears.
  Routers (the MoE block's `gate` / `router` / `shared_expert_gate`) are never among the linears.
- fused projections (Phi-3 qkv_proj and gate_up_proj, GPT-NeoX query_key_value) are one matrix
  whose rows belong to several projections; `fused_parts` says which rows are whose, for the
  methods that treat each projection as a unit (ActSVD's ranks, per-matrix ranking).
- GPT-2's Conv1D layers (weights stored [in, out]) are not linears: that family is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import UserError


@dataclass(frozen=True)
class Layout:
    family: str
    backbone: str  # attribute of the causal LM holding the decoder stack
    layers: str  # attribute of the backbone: the nn.ModuleList of blocks
    final_norm: str  # attribute of the backbone
    attn: str  # attribute of a block: the attention module
    mlp: str  # attribute of a block: the MLP (or mixture of experts)
    attn_writer: str  # attribute of the attention module: the linear writing its output
    mlp_writer: str  # attribute of the MLP: the linear (or expert tensor) writing its output
    post_norm: bool = False  # sublayer outputs pass a norm before the residual add (see the module docstring)


# Llama, Mistral, Qwen 2 / 3, Phi-3, Granite, Mixtral / Qwen-MoE and the other families that copied
# Llama's layout; model types not listed here are tried against it.
LLAMA = Layout("llama-style", "model", "layers", "norm", "self_attn", "mlp", "o_proj", "down_proj")
LAYOUTS = {
    "gemma2": Layout("gemma2", "model", "layers", "norm", "self_attn", "mlp", "o_proj", "down_proj", post_norm=True),
    "gemma3_text": Layout(
        "gemma3", "model", "layers", "norm", "self_attn", "mlp", "o_proj", "down_proj", post_norm=True
    ),
    "olmo2": Layout("olmo2", "model", "layers", "norm", "self_attn", "mlp", "o_proj", "down_proj", post_norm=True),
    "gpt_neox": Layout(
        "gpt_neox", "gpt_neox", "layers", "final_layer_norm", "attention", "mlp", "dense", "dense_4h_to_h"
    ),
    # Found so that check_linears can name why it is refused (Conv1D), not "no decoder blocks".
    "gpt2": Layout("gpt2", "transformer", "h", "ln_f", "attn", "mlp", "c_proj", "c_proj"),
}
POST_NORMS = (
    "post_attention_layernorm",
    "post_feedforward_layernorm",
)  # what a post-norm block adds, attention then MLP


def layout(model: nn.Module) -> Layout:
    config = getattr(model, "config", None)
    text = config.get_text_config() if config is not None and hasattr(config, "get_text_config") else config
    return LAYOUTS.get(getattr(text, "model_type", None), LLAMA)


def _missing(model: nn.Module, what: str) -> UserError:
    return UserError(
        f"unsupported architecture {type(model).__name__} ({layout(model).family} layout): cannot find {what}"
    )


def backbone(model: nn.Module) -> nn.Module:
    """The decoder stack without the LM head (what `model.model` is for Llama)."""
    base = getattr(model, layout(model).backbone, None)
    return base if base is not None else model


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    lay = layout(model)
    layers = getattr(backbone(model), lay.layers, None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise _missing(model, f"its decoder blocks ({lay.backbone}.{lay.layers})")
    return layers


def block_parts(model: nn.Module, block: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(attention, MLP) of a decoder block."""
    lay = layout(model)
    attn, mlp = getattr(block, lay.attn, None), getattr(block, lay.mlp, None)
    if attn is None or mlp is None:
        raise _missing(model, f"the {lay.attn}/{lay.mlp} submodules of {type(block).__name__}")
    return attn, mlp


def residual_contributions(model: nn.Module, block: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The modules whose outputs are what the block's attention and MLP add to the residual stream."""
    if not layout(model).post_norm:
        return block_parts(model, block)
    norms = tuple(getattr(block, name, None) for name in POST_NORMS)
    if any(n is None for n in norms):
        raise _missing(model, f"the post-norms {' / '.join(POST_NORMS)} of {type(block).__name__}")
    return norms


def residual_writers(model: nn.Module, block: nn.Module) -> list[nn.Module]:
    """The linears (or 3-D expert modules) whose outputs are added to the stream unchanged; a
    post-norm family has none (a norm follows every one), which is a UserError here."""
    lay = layout(model)
    if lay.post_norm:
        raise UserError(
            f"{lay.family}: attention and MLP outputs pass through {' / '.join(POST_NORMS)} before the residual add, "
            "so no weight edit removes a direction exactly; use hook ablation (lm.hooks.intervene) instead"
        )
    attn, mlp = block_parts(model, block)
    writers = []
    for module, name in ((attn, lay.attn_writer), (mlp, lay.mlp_writer)):
        writer = getattr(module, name, None)
        if writer is None and hasattr(
            module, "experts"
        ):  # mixture of experts: experts' down projections, then a shared expert's
            writer = module.experts
            shared = getattr(module, "shared_expert", None)
            if shared is not None:
                writers.append(getattr(shared, name))
        if writer is None:
            raise _missing(model, f"{name}, the layer of {type(module).__name__} that writes into the residual stream")
        writers.append(writer)
    return writers


def final_norm(model: nn.Module) -> nn.Module:
    norm = getattr(backbone(model), layout(model).final_norm, None)
    if norm is None:
        raise _missing(model, f"its final norm ({layout(model).backbone}.{layout(model).final_norm})")
    return norm


def logits_from_normed(model: nn.Module, normed: torch.Tensor) -> torch.Tensor:
    """What the causal-LM head makes of final-normed hidden states, family scalings included."""
    head = model.get_output_embeddings()
    if head is None:
        raise _missing(model, "its LM head")
    logits = head(normed)
    scaling = getattr(model.config, "logits_scaling", None)  # Granite divides the logits
    if scaling:
        logits = logits / scaling
    cap = getattr(model.config, "final_logit_softcapping", None)  # Gemma 2
    return torch.tanh(logits / cap) * cap if cap else logits


ROUTERS = ("gate", "router", "shared_expert_gate")  # children of a mixture-of-experts MLP that route tokens


def block_linears(block: nn.Module) -> dict[str, nn.Linear]:
    """Every nn.Linear of a decoder block by its path inside the block (e.g. 'self_attn.q_proj'),
    routers excepted; experts' linears appear only inside lm.experts.experts_as_linears."""
    routers = {
        f"{name}.{r}" if name else r for name, m in block.named_modules() if hasattr(m, "experts") for r in ROUTERS
    }
    return {name: m for name, m in block.named_modules() if isinstance(m, nn.Linear) and name not in routers}


def block_prefix(model: nn.Module, layer: int) -> str:
    """Parameter-name prefix of decoder block `layer` (e.g. 'model.layers.17.')."""
    block = decoder_layers(model)[layer]
    for name, module in model.named_modules():
        if module is block:
            return name + "."
    raise _missing(model, f"block {layer} among the model's submodules")


def linear_weight_name(model: nn.Module, layer: int, name: str) -> str:
    """The parameter name of a block linear's weight (e.g. 'model.layers.3.mlp.down_proj.weight')."""
    return f"{block_prefix(model, layer)}{name}.weight"


def decoder_linears(model: nn.Module, layers=None) -> dict[str, nn.Linear]:
    """{weight parameter name: linear} for every linear of the chosen blocks (all by default)."""
    blocks = decoder_layers(model)
    indices = range(len(blocks)) if layers is None else layers
    prefixes = {i: block_prefix(model, i) for i in indices}  # one walk over the modules per block, not per linear
    return {f"{prefixes[i]}{name}.weight": lin for i in indices for name, lin in block_linears(blocks[i]).items()}


def expert_weights(model: nn.Module) -> list[str]:
    """Parameters of the decoder blocks with more than two dimensions: fused expert tensors."""
    return [
        f"{block_prefix(model, i)}{n}"
        for i, block in enumerate(decoder_layers(model))
        for n, p in block.named_parameters()
        if p.dim() > 2
    ]


def decoder_matrices(model: nn.Module) -> dict[str, torch.Tensor]:
    """{parameter name: weight} of every matrix compression may change: the decoder blocks'
    linears (routers excepted) and their fused expert tensors."""
    params = dict(model.named_parameters())
    out = {name: lin.weight for name, lin in decoder_linears(model).items()}
    out.update({name: params[name] for name in expert_weights(model)})
    return out


def check_dense(model: nn.Module, what: str) -> None:
    """A UserError when `what`, which cannot run on expert tensors, would silently skip them."""
    experts = expert_weights(model)
    if experts:
        raise UserError(
            f"{what} does not support this mixture-of-experts model's expert tensors "
            f"({experts[0]}, {len(experts)} in all)"
        )


def check_linears(model: nn.Module) -> None:
    """A UserError for a family whose projections are not nn.Linear (GPT-2's Conv1D)."""
    block = decoder_layers(model)[0]
    conv = [name for name, m in block.named_modules() if type(m).__name__ == "Conv1D"]
    if conv:
        raise UserError(
            f"unsupported architecture {type(model).__name__}: its projections ({conv[0]}, ...) are Conv1D layers "
            "with transposed [in, out] weights, which no stage of this toolkit reads"
        )


def fused_parts(model: nn.Module, name: str, rows: int) -> dict[str, torch.Tensor]:
    """{projection: row indices} of the decoder linear with weight parameter `name` and `rows`
    output rows, where those rows belong to several projections (qkv_proj, query_key_value,
    gate_up_proj); {its own kind: all rows} for any other linear."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    path = name.removesuffix(".weight")
    kind = path.rsplit(".", 1)[-1]
    every = torch.arange(rows)
    heads = getattr(config, "num_attention_heads", None)
    if kind == "qkv_proj" and heads:  # Phi-3: [q; k; v] stacked
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        q, kv = heads * head_dim, getattr(config, "num_key_value_heads", heads) * head_dim
        if q + 2 * kv == rows:
            return {"q": every[:q], "k": every[q : q + kv], "v": every[q + kv :]}
    if kind == "query_key_value" and heads and rows % (3 * heads) == 0:  # GPT-NeoX: per head [q; k; v]
        per_head = every.view(heads, 3, rows // (3 * heads))
        return {p: per_head[:, i].reshape(-1) for i, p in enumerate("qkv")}
    if kind == "gate_up_proj" and rows % 2 == 0:  # Phi-3 and most experts: [gate; up]; gpt-oss interleaves them
        owner = model.get_submodule(path.rsplit(".", 2)[0]) if path.count(".") >= 2 else None
        if owner is not None and getattr(owner, "is_concatenated", True) is False:
            return {"gate": every[0::2], "up": every[1::2]}
        return {"gate": every[: rows // 2], "up": every[rows // 2 :]}
    return {kind: every}
