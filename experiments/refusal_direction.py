"""Does the selected direction mediate refusal? Ablation, activation addition and weight orthogonalization.

    python -m experiments.refusal_direction                       # embedded model
    python -m experiments.refusal_direction --selection-dir runs/compare-embedded/variants/original/selection

Selects the refusal direction (Arditi et al. 2024; or reuses a saved selection), then measures on
held-out prompts: greedy refusal on harmful_test with and without the direction ablated (hooks),
refusal on harmless_test with and without the raw direction added at its layer, the same
ablation done by weight orthogonalization saved as a normal checkpoint (its refusal rate and
its max logit difference to hook ablation), and KL on harmless val. Writes
runs/direction-<model>/report.{json,md} and the score-map figure.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lm import datasets
from lm.cache import atomic_dir, atomic_write_json, atomic_write_text, cached_json, write_plotlyjs
from lm.chat import format_prompts, tokenize_prompts
from lm.errors import UserError, cli
from lm.generation import SamplingConfig, generate
from lm.hooks import intervene
from lm.loading import load_model, model_fingerprint
from refusal.interventions import orthogonalize_weights
from refusal.judges import asr, judges
from refusal.select import SelectionConfig, load_selection, score_maps_figure, select_direction_cached


@dataclass
class DirectionConfig:
    model: str = "embedded"
    name: str | None = None
    runs_dir: str = "runs"
    selection_dir: str | None = None  # reuse a saved selection instead of selecting
    n_test: int = 64
    max_new_tokens: int = 64
    n_train: int = 128
    n_val: int = 32
    search: str = "lazy"
    prescreen_n_val: int = 8
    seed: int = 0
    batch_size: int | None = None

    def run_dir(self) -> Path:
        return Path(self.runs_dir) / (self.name or "direction-" + Path(self.model).name.replace("/", "-"))


def refusal_rates(completions: list[str]) -> dict:
    """Fraction of completions each judge counts as a refusal (not a jailbreak)."""
    return {j.name: 1 - asr(completions, j) for j in judges()}


def run(cfg: DirectionConfig) -> dict:
    start = time.perf_counter()
    loaded = load_model(cfg.model)
    model, tok = loaded.model, loaded.tokenizer
    out = cfg.run_dir()
    out.mkdir(parents=True, exist_ok=True)
    fingerprint = model_fingerprint(model)
    if cfg.selection_dir:
        sel = load_selection(Path(cfg.selection_dir))
    else:
        sel = select_direction_cached(model, tok, out / "selection", SelectionConfig(
            n_train=cfg.n_train, n_val=cfg.n_val, seed=cfg.seed, search=cfg.search, prescreen_n_val=cfg.prescreen_n_val), fingerprint)
    if sel.chosen is None:
        raise UserError("no candidate direction passed selection; see the score maps in selection.json")
    write_plotlyjs(out)
    atomic_write_text(out / "score_maps.html", score_maps_figure(sel).to_html(include_plotlyjs="directory"))
    pos, layer = sel.chosen
    raw = sel.direction_raw
    harmful = datasets.sample(datasets.instructions("harmful", "test"), cfg.n_test, cfg.seed)
    harmless = datasets.sample(datasets.instructions("harmless", "test"), cfg.n_test, cfg.seed)
    gen = SamplingConfig(max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, seed=cfg.seed)
    key = dict(fingerprint=fingerprint, source=[pos, layer], n_test=cfg.n_test, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)

    def completions(instructions, desc, **intervention):
        with intervene(model, **intervention):
            outs = generate(model, tok, format_prompts(tok, instructions), gen, desc=desc)
        flat = [o[0] for o in outs]
        return dict(rates=refusal_rates(flat), completions=flat)

    results = {
        "harmful_baseline": cached_json(out / "harmful_baseline.json", key, lambda: completions(harmful, "harmful")),
        "harmful_ablated": cached_json(out / "harmful_ablated.json", key, lambda: completions(harmful, "harmful ablated", ablate=raw)),
        "harmless_baseline": cached_json(out / "harmless_baseline.json", key, lambda: completions(harmless, "harmless")),
        "harmless_actadd": cached_json(out / "harmless_actadd.json", key, lambda: completions(harmless, "harmless actadd", add={layer: raw})),
    }

    def orthogonalized():
        ortho = orthogonalize_weights(copy.deepcopy(model), raw)
        ckpt = out / "orthogonalized"
        with atomic_dir(ckpt) as tmp:
            ortho.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
        del ortho
        reloaded = load_model(str(ckpt)).model
        enc = tokenize_prompts(tok, format_prompts(tok, harmful[:8]))
        with torch.no_grad():
            with intervene(model, ablate=raw):
                hooked = model(**enc).logits
            weights = reloaded(**enc).logits
        mask = enc["attention_mask"].bool()
        diff = float((hooked - weights).abs()[mask].max())
        outs = generate(reloaded, tok, format_prompts(tok, harmful), gen, desc="harmful orthogonalized")
        flat = [o[0] for o in outs]
        return dict(rates=refusal_rates(flat), completions=flat, max_abs_logit_diff_vs_hooks=diff, checkpoint=str(ckpt))

    results["harmful_orthogonalized"] = cached_json(out / "harmful_orthogonalized.json", key, orthogonalized)
    i = sel.positions.index(pos)
    report = dict(
        model=cfg.model, model_name=loaded.name, config=dataclasses.asdict(cfg),
        source=dict(position=pos, layer=layer), n_layers=sel.n_layers,
        scores=dict(bypass=float(sel.bypass[i, layer]), induce=float(sel.induce[i, layer]), kl=float(sel.kl[i, layer])),
        selection_counts=sel.counts, selection_forward_passes=sel.forward_passes,
        rates={k: v["rates"] for k, v in results.items()},
        n_test=cfg.n_test,
        max_abs_logit_diff_orthogonalized_vs_hooks=results["harmful_orthogonalized"]["max_abs_logit_diff_vs_hooks"],
        samples={k: v["completions"][:2] for k, v in results.items()},
        wall_seconds=round(time.perf_counter() - start, 1),
    )
    atomic_write_json(out / "report.json", report)
    atomic_write_text(out / "report.md", render(report))
    return report


def render(r: dict) -> str:
    rates = r["rates"]
    lines = [
        f"# Refusal direction of {r['model_name']}",
        "",
        f"Source: position {r['source']['position']}, layer {r['source']['layer']} of {r['n_layers']}. "
        f"Selection scores: bypass {r['scores']['bypass']:.2f}, induce {r['scores']['induce']:.2f}, KL {r['scores']['kl']:.3f}."
        + (f" Fallback: {r['selection_counts']['fallback']['note']}." if r["selection_counts"].get("fallback") else ""),
        "",
        f"Refusal rate (1 - ASR) on {r['n_test']} held-out prompts, greedy, <= {r['config']['max_new_tokens']} new tokens:",
        "",
        "| setting | Arditi judge | Wei judge |",
        "|---|---|---|",
    ]
    for k, v in rates.items():
        lines.append(f"| {k.replace('_', ' ')} | {v['arditi2024']:.1%} | {v['wei2024']:.1%} |")
    lines += ["", f"Orthogonalized checkpoint vs hook ablation: max |logit difference| {r['max_abs_logit_diff_orthogonalized_vs_hooks']:.2e} (float32).",
              "", f"Wall time {r['wall_seconds']:.0f} s.", ""]
    return "\n".join(lines)


@cli
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.refusal_direction", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="embedded")
    p.add_argument("--name")
    p.add_argument("--runs-dir", default="runs")
    p.add_argument("--selection-dir", help="reuse a saved selection (selection.json + direction.safetensors)")
    p.add_argument("--n-test", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--search", choices=["exhaustive", "lazy"], default="lazy")
    p.add_argument("--prescreen", type=int, default=8)
    p.add_argument("--batch-size", type=int)
    a = p.parse_args(argv)
    cfg = DirectionConfig(model=a.model, name=a.name, runs_dir=a.runs_dir, selection_dir=a.selection_dir, n_test=a.n_test,
                          max_new_tokens=a.max_new_tokens, search=a.search, prescreen_n_val=a.prescreen, batch_size=a.batch_size)
    if cfg.selection_dir and not Path(cfg.selection_dir).is_dir():
        raise UserError(f"selection directory not found: {cfg.selection_dir}")
    report = run(cfg)
    print(render(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
