"""Residual-stream probing along the refusal direction (shared by the notebooks in notebooks/).

The notebooks answer one question twice, with TransformerLens and with nnsight: how far does
each layer's residual stream (resid_pre = the input of decoder block l, at the last prompt
token) point along the refusal direction, for harmful versus harmless chat prompts?
compare_variant.ipynb asks it of a compressed variant beside its original (check_comparable
first: same architecture and tokenizer).

The direction always comes from a saved artifact:

* a selection directory (selection.json + direction.safetensors, written by
  refusal.selection_artifacts.select_direction_cached) is read with refusal.selection_artifacts.load_selection and its
  chosen (position, layer) is used;
* otherwise difference-of-means candidates (refusal.direction.candidate_directions) on a small
  seeded train sample are saved to <run_dir>/direction.safetensors (reused while the model and
  sample are unchanged) and read back from that file; the direction at the last post-instruction
  position and layer round(0.58 * n_layers) is used (14 of 24 for the embedded model, the layer
  reported for it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from lm.cache import atomic_save_tensors
from lm.chat import post_instruction, tokenize_prompts
from lm.datasets import instructions, sample
from lm.errors import UserError
from lm.hooks import capture, decoder_layers

from .direction import candidate_directions
from .select import DIRECTION_FILE, SELECTION_JSON
from .selection_artifacts import load_selection

DEFAULT_LAYER_FRACTION = 0.58
PROBE_DIRECTION_FILE = "direction.safetensors"

# TransformerBridge.boot_transformers takes a hub name; with hf_model= given it only picks the
# architecture adapter (the config and weights come from the loaded model), so any model of the
# same architecture works and nothing is downloaded.
BRIDGE_ARCHITECTURE_NAMES = {
    "qwen2": "Qwen/Qwen2.5-0.5B-Instruct",
    "llama": "meta-llama/Llama-3.2-1B-Instruct",
    "mistral": "mistralai/Mistral-7B-Instruct-v0.3",
    "gemma2": "google/gemma-2-2b-it",
}


def default_layer(n_layers: int) -> int:
    """round(0.58 * n_layers): 14 for a 24-layer model."""
    return int(round(DEFAULT_LAYER_FRACTION * n_layers))


def bridge_architecture_name(model, fallback: str) -> str:
    return BRIDGE_ARCHITECTURE_NAMES.get(getattr(model.config, "model_type", None), fallback)


@dataclass
class ProbeDirection:
    direction: torch.Tensor  # unit vector [d_model], float32
    raw: torch.Tensor  # the unnormalised difference of means
    position: int  # post-instruction position it was read at (negative index)
    layer: int  # resid_pre layer it was read at
    source: str  # "selection" or "diff-of-means"
    path: Path  # the artifact file it was read from
    how: str  # one sentence stating where the direction and its (position, layer) come from

    def params(self) -> dict:
        return dict(source=self.source, path=str(self.path), position=self.position, layer=self.layer)


def has_selection(directory) -> bool:
    return (
        directory is not None
        and (Path(directory) / SELECTION_JSON).is_file()
        and (Path(directory) / DIRECTION_FILE).is_file()
    )


def _check_width(raw: torch.Tensor, model, where: str) -> None:
    width = model.get_input_embeddings().weight.shape[1]
    if raw.shape[-1] != width:
        raise UserError(
            f"the direction in {where} has width {raw.shape[-1]}, the model {width}: another model's artifact"
        )


def load_probe_direction(
    model,
    tokenizer,
    direction_dir=None,
    run_dir="runs/probe",
    n_train: int = 32,
    seed: int = 0,
    system: str | None = None,
    model_id: str = "",
) -> ProbeDirection:
    """The refusal direction to probe with, always read from a saved artifact (see module doc)."""
    n_layers = len(decoder_layers(model))
    if has_selection(direction_dir):
        result = load_selection(Path(direction_dir))
        if result.n_layers != n_layers:
            raise UserError(f"the selection in {direction_dir} has {result.n_layers} layers, the model {n_layers}")
        path = Path(direction_dir) / DIRECTION_FILE
        if result.chosen is not None:
            position, layer = result.chosen
            raw = result.direction_raw
            how = (
                f"selected direction from {path} (Arditi et al.'s selection: lowest bypass score among "
                f"filtered candidates): position {position}, layer {layer}"
            )
        else:
            position, layer = -1, default_layer(n_layers)
            raw = result.directions[result.positions.index(position), layer]
            how = (
                f"no candidate in {path} passed the selection filters; using its difference-of-means candidate "
                f"at the last position (-1) and layer round({DEFAULT_LAYER_FRACTION} * {n_layers}) = {layer}"
            )
        _check_width(raw, model, str(path))
        return ProbeDirection(raw / raw.norm(), raw, position, layer, "selection", path, how)

    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(run_dir) / PROBE_DIRECTION_FILE
    params = json.dumps(
        dict(model=model_id, n_layers=n_layers, n_train=n_train, seed=seed, system=system), sort_keys=True
    )
    stored = None
    if path.is_file():
        with safe_open(str(path), framework="pt") as f:
            stored = (f.metadata() or {}).get("params")
    if stored != params:
        harmful = sample(instructions("harmful", "train"), n_train, seed)
        harmless = sample(instructions("harmless", "train"), n_train, seed)
        found = candidate_directions(model, tokenizer, harmful, harmless, batch_size=16, system=system)
        positions = post_instruction(tokenizer, system).positions
        atomic_save_tensors(
            path,
            dict(
                candidates=found["directions"], mean_harmful=found["mean_harmful"], mean_harmless=found["mean_harmless"]
            ),
            metadata=dict(params=params, positions=json.dumps(positions)),
        )
    # Read back: the probe uses what is on disk, never the in-memory result.
    with safe_open(str(path), framework="pt") as f:
        positions = json.loads(f.metadata()["positions"])
    candidates = load_file(str(path))["candidates"]
    position, layer = -1, default_layer(n_layers)
    raw = candidates[positions.index(position), layer]
    _check_width(raw, model, str(path))
    how = (
        f"difference-of-means direction ({n_train} harmful vs {n_train} harmless train instructions, seed {seed}) "
        f"read from {path}: last post-instruction position (-1), layer round({DEFAULT_LAYER_FRACTION} * {n_layers}) = {layer}"
    )
    if direction_dir is not None:
        how = f"no {SELECTION_JSON} + {DIRECTION_FILE} in {direction_dir}; " + how
    return ProbeDirection(raw / raw.norm(), raw, position, layer, "diff-of-means", path, how)


# Config fields two models must share for one's activations to be read in the other's basis.
COMPARED_CONFIG = (
    "model_type",
    "num_hidden_layers",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
)


def check_comparable(original, variant) -> None:
    """One UserError listing every difference between two loaded models (lm.loading.LoadedModel)
    that makes comparing their activations meaningless: architecture (COMPARED_CONFIG), tokenizer
    vocabulary or chat template (the same instruction must become the same tokens, and the
    post-instruction positions must be the same)."""
    problems = []
    for name in COMPARED_CONFIG:
        a, b = getattr(original.model.config, name, None), getattr(variant.model.config, name, None)
        if a != b:
            problems.append(f"{name} {a} vs {b}")
    if original.tokenizer.get_vocab() != variant.tokenizer.get_vocab():
        problems.append("the tokenizer vocabularies differ")
    if getattr(original.tokenizer, "chat_template", None) != getattr(variant.tokenizer, "chat_template", None):
        problems.append("the chat templates differ")
    if problems:
        raise UserError(
            f"{variant.spec!r} is not a variant of {original.spec!r} (original vs variant: {'; '.join(problems)}); "
            "compare a compressed checkpoint only with the model it was made from"
        )


def probe_instructions(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """n harmful and n harmless instructions from the held-out test splits (disjoint from train/val)."""
    return sample(instructions("harmful", "test"), n, seed), sample(instructions("harmless", "test"), n, seed)


def batches(prompts: list[str], size: int) -> list[list[str]]:
    return [prompts[i : i + size] for i in range(0, len(prompts), size)]


@torch.no_grad()
def toolkit_resid_last(model, tokenizer, prompts: list[str], batch_size: int = 16) -> torch.Tensor:
    """resid_pre at the last token of every prompt via lm.hooks.capture: [n, n_layers, d_model]."""
    device = next(model.parameters()).device
    parts = []
    for chunk in batches(prompts, batch_size):
        enc = tokenize_prompts(tokenizer, chunk).to(device)
        parts.append(capture(model, enc["input_ids"], enc["attention_mask"], [-1])["resid_pre"][:, 0])
    return torch.cat(parts)


def project(resid: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
    """Scalar projection of [..., d] activations onto a unit vector, in float64: [...]."""
    return resid.double() @ unit.double()


def projection_traces(harmful: torch.Tensor, harmless: torch.Tensor, showlegend: bool = True) -> list:
    """Plotly traces of the mean projection per layer ([n, n_layers] inputs), harmful vs harmless,
    each with a ±1 s.d. band: for projection_figure, or for one panel of a larger figure."""
    import plotly.graph_objects as go

    traces = []
    layers = list(range(harmful.shape[1]))
    for name, values, color in (("harmful", harmful, "214,39,40"), ("harmless", harmless, "31,119,180")):
        mean = values.mean(dim=0)
        std = values.std(dim=0) if values.shape[0] > 1 else torch.zeros_like(mean)
        traces += [
            go.Scatter(
                x=layers,
                y=(mean + std).tolist(),
                mode="lines",
                line=dict(width=0),
                showlegend=False,
                hoverinfo="skip",
                legendgroup=name,
            ),
            go.Scatter(
                x=layers,
                y=(mean - std).tolist(),
                mode="lines",
                line=dict(width=0),
                fill="tonexty",
                fillcolor=f"rgba({color},0.2)",
                name=f"{name} ±1 s.d.",
                hoverinfo="skip",
                legendgroup=name,
                showlegend=showlegend,
            ),
            go.Scatter(
                x=layers,
                y=mean.tolist(),
                mode="lines+markers",
                line=dict(color=f"rgb({color})"),
                name=f"{name} mean (n={values.shape[0]})",
                legendgroup=name,
                showlegend=showlegend,
                hovertemplate="layer %{x}<br>mean %{y:.3f}<extra>" + name + "</extra>",
            ),
        ]
    return traces


def projection_figure(harmful: torch.Tensor, harmless: torch.Tensor, direction: ProbeDirection, title: str):
    """Mean projection per layer ([n, n_layers] inputs), harmful vs harmless, with ±1 s.d. bands."""
    import plotly.graph_objects as go

    fig = go.Figure(projection_traces(harmful, harmless))
    fig.add_vline(
        x=direction.layer,
        line_dash="dot",
        line_color="gray",
        annotation_text=f"direction read here (pos {direction.position}, layer {direction.layer})",
    )
    fig.update_layout(
        title=title,
        xaxis_title="layer l (resid_pre: input of decoder block l), last prompt token",
        yaxis_title="projection onto the unit refusal direction",
        height=480,
        width=900,
        template="plotly_white",
    )
    return fig


def separation(harmful: torch.Tensor, harmless: torch.Tensor) -> torch.Tensor:
    """Per-layer (mean harmful - mean harmless) / pooled s.d.: how well the projection separates."""
    diff = harmful.mean(dim=0) - harmless.mean(dim=0)
    pooled = ((harmful.var(dim=0) + harmless.var(dim=0)) / 2).sqrt()
    return torch.where(pooled > 0, diff / pooled.clamp_min(1e-12), torch.zeros_like(diff))


def save_projections(path, harmful: torch.Tensor, harmless: torch.Tensor, params: dict) -> None:
    atomic_save_tensors(
        Path(path), dict(harmful=harmful, harmless=harmless), metadata=dict(params=json.dumps(params, sort_keys=True))
    )


def load_projections(path, params: dict) -> dict | None:
    """The projections saved at `path` if they were computed with the same params, else None."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        if (f.metadata() or {}).get("params") != json.dumps(params, sort_keys=True):
            return None
    return load_file(str(path))
