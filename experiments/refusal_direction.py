"""Does the selected direction mediate refusal? Ablation, activation addition and weight orthogonalization.

    python -m experiments.refusal_direction                       # embedded model
    python -m experiments.refusal_direction --selection-dir runs/compare-embedded/variants/original/selection

Selects the refusal direction (Arditi et al. 2024; or reuses a saved selection), then measures on
held-out prompts (refusal.measure; none used to fit or select the direction): greedy ASR on the
harmful evaluation sets with and without the direction ablated (hooks), the refusal rate on
harmless prompts with and without the raw direction added at its layer, the same ablation done by
weight orthogonalization saved as a normal checkpoint (its ASR and its max logit difference to
hook ablation). Every rate with its 95% interval, every intervention against its baseline with an
exact McNemar test (Holm over the three). Writes runs/direction-<model>/report.{json,md} and the
score-map figure.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from lm.cache import (
    atomic_dir,
    atomic_write_json,
    atomic_write_text,
    cached_json,
    sweep_temporaries,
    warn,
    write_plotlyjs,
)
from lm.chat import format_prompts, tokenize_prompts
from lm.cli import parse_config
from lm.errors import UserError, cli
from lm.hooks import intervene
from lm.loading import check_model_spec, load_model, model_fingerprint
from lm.validation import NON_NEGATIVE, POSITIVE, check_ranges, plain_name
from refusal.eval_sets import check_names, check_roles
from refusal.interventions import orthogonalize_weights
from refusal.judge_report import judges_markdown, judges_section
from refusal.judge_spec import judge_panel, parse_judges
from refusal.judges import JUDGE_NAMES
from refusal.measure import DEFAULT_HARMFUL, DEFAULT_HARMLESS, EvalConfig, describe_prompts, measure, paired
from refusal.select import SelectionConfig
from refusal.selection_artifacts import load_selection, score_maps_figure, select_direction_cached
from refusal.stats import add_holm, describe_change, fmt_p, fmt_rate

LABELS = {
    "harmful_baseline": "harmful, baseline",
    "harmful_ablated": "harmful, direction ablated (hooks)",
    "harmless_baseline": "harmless, baseline",
    "harmless_actadd": "harmless, direction added",
    "harmful_orthogonalized": "harmful, weights orthogonalized",
}


@dataclass
class DirectionConfig:
    model: str = "embedded"  # 'embedded', a hub id, a local safetensors directory, or a .gguf file
    name: str | None = None  # run directory name under runs_dir (None: direction-<model>)
    runs_dir: str = "runs"  # where run directories and the measurement store live
    #: reuse a saved selection (selection.json + direction.safetensors) instead of selecting
    selection_dir: str | None = None
    #: held-out harmful sets: advbench jailbreakbench harmbench strongreject, or file:PATH
    eval_sets: tuple[str, ...] = DEFAULT_HARMFUL
    harmless_sets: tuple[str, ...] = DEFAULT_HARMLESS  # held-out harmless sets: alpaca or file:PATH
    n_test: int = 32  # first prompts of each harmful set
    n_harmless: int = 64  # first prompts of each harmless set
    max_new_tokens: int = 64  # tokens generated per completion
    measurements_dir: str | None = None  # the measurement store; None: <runs_dir>/measurements
    n_train: int = 128  # harmful and harmless instructions for the directions, each
    n_val: int = 32  # validation prompts per class for selection
    search: Literal["lazy", "exhaustive"] = "lazy"  # selection search (lazy: the same choice in fewer passes)
    prescreen_n_val: int = 8  # prescreen candidates on this many harmful prompts (0: off)
    seed: int = 0  # every sample, split and random choice
    batch_size: int | None = None  # prompts per forward pass (None: chosen by device)
    #: Judges reported beside the two keyword judges (refusal.judge_spec): wei2024, arditi2024, or
    #: model judges as KIND:HUB-ID-OR-DIR, KIND one of harmbench, llama-guard, wildguard,
    #: refusal-classifier, minos. They read the stored completions (cached apart: adding one to a
    #: finished run generates nothing); see docs/judges.md for the completion length each needs.
    judges: tuple[str, ...] = ()

    def __post_init__(self):
        plain_name(self.name)
        self.judges = tuple(str(j) for j in self.judges)
        parse_judges(self.judges)
        check_ranges(
            self,
            dict(
                n_test=POSITIVE,
                n_harmless=POSITIVE,
                max_new_tokens=POSITIVE,
                n_train=POSITIVE,
                n_val=POSITIVE,
                prescreen_n_val=NON_NEGATIVE,
                seed=NON_NEGATIVE,
                batch_size=POSITIVE,
            ),
        )
        self.eval_sets, self.harmless_sets = check_names(self.eval_sets), check_names(self.harmless_sets)
        check_roles(self.eval_sets, self.harmless_sets)
        self.eval_config()

    def run_dir(self) -> Path:
        return Path(self.runs_dir) / (self.name or "direction-" + Path(self.model).name.replace("/", "-"))

    def eval_config(self) -> EvalConfig:
        return EvalConfig(
            sets=self.eval_sets,
            n=self.n_test,
            max_new_tokens=self.max_new_tokens,
            seed=self.seed,
            batch_size=self.batch_size,
        )

    def store(self) -> Path:
        return Path(self.measurements_dir) if self.measurements_dir else Path(self.runs_dir) / "measurements"


# Each intervention against its baseline: (row, baseline row, outcome compared).
COMPARISONS = (
    ("harmful_ablated", "harmful_baseline", "jailbroken"),
    ("harmful_orthogonalized", "harmful_baseline", "jailbroken"),
    ("harmless_actadd", "harmless_baseline", "refused"),
)


def run(cfg: DirectionConfig) -> dict:
    start = time.perf_counter()
    panel = judge_panel(cfg.judges)
    loaded = load_model(cfg.model)
    model, tok = loaded.model, loaded.tokenizer
    out = cfg.run_dir()
    sweep_temporaries(out)  # what a killed earlier invocation left half-written
    sweep_temporaries(cfg.store())
    out.mkdir(parents=True, exist_ok=True)
    fingerprint = model_fingerprint(model)
    if cfg.selection_dir:
        sel = load_selection(Path(cfg.selection_dir))
    else:
        sel = select_direction_cached(
            model,
            tok,
            out / "selection",
            SelectionConfig(
                n_train=cfg.n_train,
                n_val=cfg.n_val,
                seed=cfg.seed,
                search=cfg.search,
                prescreen_n_val=cfg.prescreen_n_val,
            ),
            fingerprint,
        )
    if sel.chosen is None:
        raise UserError(f"{sel.no_direction_reason()}; see the score maps in selection.json")
    if sel.non_finite_note():
        print(f"note: {sel.non_finite_note()}", file=sys.stderr)
    write_plotlyjs(out)
    atomic_write_text(out / "score_maps.html", score_maps_figure(sel).to_html(include_plotlyjs="directory"))
    pos, layer = sel.chosen
    raw = sel.direction_raw
    harmful_cfg, store = cfg.eval_config(), cfg.store()
    harmless_cfg = harmful_cfg.harmless(cfg.harmless_sets, cfg.n_harmless)
    harmful = [p.text for p in harmful_cfg.prompts()]
    direction = dict(
        source=[pos, layer], direction=hashlib.sha256(raw.detach().float().cpu().numpy().tobytes()).hexdigest()[:16]
    )

    def intervened(eval_cfg, **intervention):
        with intervene(model, **intervention):
            return measure(
                model,
                tok,
                eval_cfg,
                store,
                dict(model=fingerprint, **direction, intervention=sorted(intervention)),
                judges=panel,
            )

    results = {
        "harmful_baseline": measure(model, tok, harmful_cfg, store, fingerprint, judges=panel),
        "harmful_ablated": intervened(harmful_cfg, ablate=raw),
        "harmless_baseline": measure(model, tok, harmless_cfg, store, fingerprint, "over-refusal", judges=panel),
        "harmless_actadd": intervened(harmless_cfg, add={layer: raw}),
    }
    key = dict(fingerprint=fingerprint, **direction)

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
        measured = measure(reloaded, tok, harmful_cfg, store, model_fingerprint(reloaded))
        return dict(
            max_abs_logit_diff_vs_hooks=diff,
            checkpoint=str(ckpt),
            model_id=model_fingerprint(reloaded),
            seconds=measured["seconds"],
        )

    ortho = cached_json(out / "orthogonalized.json", key, orthogonalized)

    def reloaded():
        """The saved checkpoint if its weights are still the ones measured, else orthogonalized again
        (deterministic: the same weights)."""
        try:
            reloaded = load_model(ortho["checkpoint"]).model
            if model_fingerprint(reloaded) == ortho["model_id"]:
                return reloaded
        except UserError:
            pass
        warn(
            f"{ortho['checkpoint']} is not the checkpoint that was measured (damaged or replaced); orthogonalizing again"
        )
        return orthogonalize_weights(copy.deepcopy(model), raw)

    # Measured inside orthogonalized(); reloaded only if the store lost that entry.
    results["harmful_orthogonalized"] = measure(reloaded, tok, harmful_cfg, store, ortho["model_id"], judges=panel)
    tests = {}
    for row, baseline, outcome in COMPARISONS:
        tests[row] = {j: paired(results[row], results[baseline], j, outcome) for j in JUDGE_NAMES}
    for j in JUDGE_NAMES:
        add_holm([tests[row][j] for row, _, _ in COMPARISONS])
    i = sel.positions.index(pos)
    report = dict(
        model=cfg.model,
        model_name=loaded.name,
        config=dataclasses.asdict(cfg),
        source=dict(position=pos, layer=layer),
        n_layers=sel.n_layers,
        scores=dict(bypass=float(sel.bypass[i, layer]), induce=float(sel.induce[i, layer]), kl=float(sel.kl[i, layer])),
        selection_counts=sel.counts,
        selection_forward_passes=sel.forward_passes,
        # ASR on the harmful rows, the refusal rate (refusal strings) on the harmless ones.
        rates={k: v["rates"]["asr" if k.startswith("harmful") else "refusal"] for k, v in results.items()},
        tests=tests,
        findings=[
            describe_change(
                LABELS[b],
                LABELS[r],
                results[b]["rates"][m]["arditi2024"],
                results[r]["rates"][m]["arditi2024"],
                dict(tests[r]["arditi2024"], b=tests[r]["arditi2024"]["c"], c=tests[r]["arditi2024"]["b"]),
                "ASR (Arditi judge)" if m == "asr" else "Refusal rate (Arditi judge)",
            )
            for r, b, outcome in COMPARISONS
            for m in ["asr" if outcome == "jailbroken" else "refusal"]
        ],
        evaluation=dict(
            harmful=describe_prompts(results["harmful_baseline"], len(COMPARISONS)),
            harmless=describe_prompts(results["harmless_baseline"], len(COMPARISONS)),
        ),
        n_test=cfg.n_test,
        max_abs_logit_diff_orthogonalized_vs_hooks=ortho["max_abs_logit_diff_vs_hooks"],
        samples={k: [r["completions"][0] for r in v["records"][:2]] for k, v in results.items()},
        wall_seconds=round(time.perf_counter() - start, 1),
    )
    if panel is not None:
        report["judges"] = judges_section(
            panel,
            {
                "baseline": dict(asr=results["harmful_baseline"], harmless=results["harmless_baseline"]),
                LABELS["harmful_ablated"]: dict(asr=results["harmful_ablated"]),
                LABELS["harmless_actadd"]: dict(harmless=results["harmless_actadd"]),
                LABELS["harmful_orthogonalized"]: dict(asr=results["harmful_orthogonalized"]),
            },
            [(LABELS[k], "baseline") for k in ("harmful_ablated", "harmful_orthogonalized", "harmless_actadd")],
            cfg.max_new_tokens,
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
        f"Greedy, <= {r['config']['max_new_tokens']} new tokens, on {r['evaluation']['harmful']['n']} held-out harmful prompts "
        f"({', '.join(f'{k} {n}' for k, n in r['evaluation']['harmful']['per_source'].items())}) and {r['evaluation']['harmless']['n']} "
        f"held-out harmless ones; overlap with any prompt a stage fits on: {r['evaluation']['harmful']['overlap_with_fitted']} and "
        f"{r['evaluation']['harmless']['overlap_with_fitted']}. Harmful rows: ASR; harmless rows: refusal rate. 95% Wilson intervals; "
        "p: exact McNemar test against the row's baseline, Holm over the three interventions (* = significant at 5%).",
        "",
        "| setting | Arditi judge | p | Wei judge | p |",
        "|---|---|---|---|---|",
    ]
    tests = r.get("tests", {})
    for k, v in rates.items():
        t = tests.get(k, {})
        lines.append(
            f"| {LABELS[k]} | {fmt_rate(v['arditi2024'])} | {fmt_p(t.get('arditi2024'))} | "
            f"{fmt_rate(v['wei2024'])} | {fmt_p(t.get('wei2024'))} |"
        )
    lines += [""] + [f"- {f}" for f in r.get("findings", [])]
    lines += [
        "",
        f"Orthogonalized checkpoint vs hook ablation: max |logit difference| {r['max_abs_logit_diff_orthogonalized_vs_hooks']:.2e} (float32).",
        "",
        f"Wall time {r['wall_seconds']:.0f} s.",
        "",
    ]
    if r.get("judges"):
        lines += judges_markdown(r["judges"])
    return "\n".join(lines)


@cli
def main(argv=None) -> int:
    cfg, _ = parse_config(
        DirectionConfig, argv, prog="python -m experiments.refusal_direction", description=__doc__.split("\n\n")[0]
    )
    check_model_spec(cfg.model)
    judge_panel(cfg.judges)  # a judge directory of the wrong kind fails before the model loads
    if cfg.selection_dir:
        if not Path(cfg.selection_dir).is_dir():
            raise UserError(f"selection directory not found: {cfg.selection_dir}")
        load_selection(Path(cfg.selection_dir))  # unreadable or altered: fails before the model loads
    report = run(cfg)
    print(render(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
