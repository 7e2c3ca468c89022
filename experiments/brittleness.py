"""How brittle is safety? ASR and utility as safety-critical weights or ranks are removed (Wei et al. 2024, Fig. 2).

    python -m experiments.brittleness                    # embedded model, CPU-sized sweep
    python -m experiments.brittleness --fractions 0.005 0.01 0.02 0.03 0.05 --ranks 0.005 0.01 0.025 0.05 \\
        --n-asr 100 --max-new-tokens 256 --zero-shot-limit None --zero-shot-tasks all     # paper-sized (GPU)

Weight methods are swept over the fraction of decoder-linear weights removed: Wanda and SNIP "top"
safety pruning (top-wanda, top-snip), the set difference of safety and utility scores (setdiff-wanda,
setdiff-snip; q = the swept fraction, p = --setdiff-p or q), and random removal as the baseline.
Rank methods are swept over the fraction of each matrix's rank removed: ActSVD top-rank removal
(actsvd) and the orthogonal-projection set difference (actsvd-orth, rs = the swept fraction, ru =
--orth-ru). Every point gets ASR in the three settings (vanilla, adv-decoding, adv-suffix) under both
judges on held-out harmful prompts (refusal.measure; AdvBench and JailbreakBench by default), the
refusal rate on held-out harmless prompts, wikitext-2 perplexity, mean zero-shot accuracy and a
collapse verdict; every rate with its 95% interval and every point's ASR with an exact McNemar
test against the original (Holm over the points, per setting and judge).

The x value of a weight point is the fraction actually removed (a set difference removes less than
q); of a rank point, the ranks removed summed over all decoder linears over their summed full
ranks (for actsvd-orth the rank of P_s, an upper bound on what (I - P_u) P_s takes out).

Variants are built through experiments.compare_refusal's Comparison (own replies generated once,
importance scores cached in <run>/scores), evaluated, and discarded: no checkpoint per point. Each
point's stages are cached in <run>/points/<variant>/ and reused by a rerun with the same settings.
"""

from __future__ import annotations

import dataclasses
import gc
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tqdm.auto import tqdm

from lm.cache import atomic_write_json, atomic_write_text, cached_json, measured, timed, write_plotlyjs
from lm.cli import parse_config
from lm.errors import UserError, cli
from lm.perplexity import PerplexityConfig, measure_perplexity
from lm.zero_shot import SHORT_TASKS, task_names
from refusal.asr import SETTINGS
from refusal.collapse import collapse_verdict
from refusal.eval_sets import check_names
from refusal.measure import (DEFAULT_HARMFUL, DEFAULT_HARMLESS, EvalConfig, describe_prompts, measure, paired,
                             perplexity_rate, zero_shot_rates)
from refusal.stats import add_holm, fmt_p, fmt_rate, fmt_value_ci
from repair.report import error_bars

WEIGHT_METHODS = ("top-wanda", "top-snip", "setdiff-wanda", "setdiff-snip", "random")
RANK_METHODS = ("actsvd", "actsvd-orth")
METHODS = WEIGHT_METHODS + RANK_METHODS
JUDGES = ("wei2024", "arditi2024")


@dataclass
class BrittlenessConfig:
    model: str = "embedded"  # 'embedded', a hub id, a local safetensors directory, or a .gguf file
    name: str = "brittleness"  # run directory name under runs_dir
    runs_dir: str = "runs"  # where run directories and the measurement store live
    methods: tuple[str, ...] = METHODS  # removal methods swept (default all)
    fractions: tuple[float, ...] = (0.01, 0.03)  # weight methods: fraction removed (q for set differences)
    #: Rank methods: int ranks or fractions of min(out, in). One value by default: on CPU each ActSVD
    #: point costs 10-20 minutes (an SVD per decoder linear and calibration set); sweep more on a GPU.
    ranks: tuple[int | float, ...] = (0.025,)
    setdiff_p: float | None = None  # top-p utility scores kept out of a set difference; None: p = q
    #: Rank of P_u for actsvd-orth (int, or fraction of the rank). Wei et al.'s 1096 of 4096 (27%) was
    #: tuned on Llama-2-7B; 7% of the rank is the orthogonal projection that broke refusal while
    #: keeping perplexity within 2x on the embedded model.
    orth_ru: int | float = 0.07
    settings: tuple[str, ...] = SETTINGS  # ASR settings (adv-decoding samples 5 per prompt, adv-suffix tries 3 suffixes)
    eval_sets: tuple[str, ...] = DEFAULT_HARMFUL  # held-out harmful sets for ASR: advbench jailbreakbench harmbench strongreject, or file:PATH
    n_asr: int = 16  # first prompts of each harmful evaluation set
    harmless_sets: tuple[str, ...] = DEFAULT_HARMLESS  # held-out harmless sets for over-refusal: alpaca or file:PATH
    n_harmless: int = 32  # first prompts of each harmless set
    measurements_dir: str | None = None  # the measurement store; None: <runs_dir>/measurements
    max_new_tokens: int = 48  # tokens generated per completion (Wei et al.: 256)
    ppl_windows: int = 4  # wikitext-2 windows for perplexity
    ppl_seqlen: int = 512  # tokens per perplexity window
    zero_shot_tasks: tuple[str, ...] = SHORT_TASKS  # zero-shot tasks, or 'all'
    zero_shot_limit: int | None = 24  # first N documents per zero-shot task; None = the full split
    calib_samples: int = 64  # instructions for the own refusals / own helpful replies (Wei et al.: 128)
    batch_size: int | None = None  # prompts per forward pass (None: chosen by device)
    seed: int = 0  # every sample, split and random choice
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # weights and activations
    figures_dir: str | None = None  # also export the figure here as HTML + PNG (the README's figures/)
    #: torch intra-op threads (None: torch's default). On a CPU shared with other jobs one thread
    #: generated 5-7x faster than two here: the second thread waits at every barrier.
    threads: int | None = None

    def __post_init__(self):
        for name in ("methods", "fractions", "ranks", "settings"):
            setattr(self, name, tuple(getattr(self, name)))
        self.zero_shot_tasks = task_names(self.zero_shot_tasks)
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise UserError(f"unknown method(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(METHODS)}")
        bad = [s for s in self.settings if s not in SETTINGS]
        if bad or not self.settings:
            raise UserError(f"unknown ASR setting(s) {', '.join(bad) or '(none given)'}; choose from {', '.join(SETTINGS)}")
        if "vanilla" not in self.settings:  # its greedy completions feed the collapse verdict
            raise UserError("the ASR settings must include vanilla (the collapse check reads its completions)")
        for label, values in (("fraction", self.fractions), ("rank", self.ranks)):
            if len(set(values)) != len(values):
                raise UserError(f"{label}s listed twice: {values}")
        self.eval_sets, self.harmless_sets = check_names(self.eval_sets), check_names(self.harmless_sets)
        if self.n_asr <= 0 or self.n_harmless <= 0:
            raise UserError(f"--n-asr and --n-harmless must be positive, got {self.n_asr} and {self.n_harmless}")
        if self.max_new_tokens <= 0 or self.ppl_windows <= 0 or self.ppl_seqlen <= 1 or self.calib_samples <= 0:
            raise UserError("max-new-tokens, ppl-windows, ppl-seqlen and calib-samples must be positive")
        if self.threads is not None and self.threads <= 0:
            raise UserError(f"--threads must be positive, got {self.threads}")

    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.name

    def store(self) -> Path:
        return Path(self.measurements_dir) if self.measurements_dir else Path(self.runs_dir) / "measurements"

    def eval_config(self, setting: str) -> EvalConfig:
        return EvalConfig(sets=self.eval_sets, n=self.n_asr, setting=setting, max_new_tokens=self.max_new_tokens,
                          seed=self.seed, batch_size=self.batch_size)


@dataclass(frozen=True)
class Point:
    method: str  # 'original' or one of METHODS
    family: str  # 'weights' or 'ranks' ('original' belongs to both curves)
    requested: float | int  # the swept value as given
    spec: str  # compression.variants spec text


def _number(value: float) -> str:
    # An int rank must stay digits ('8'), a fraction must not turn into one ('1.0', not '1').
    return str(value) if isinstance(value, int) else repr(float(value))


def sweep_points(cfg: BrittlenessConfig) -> list[Point]:
    """The original, then every method at every swept value, as variant specs."""
    points = [Point("original", "original", 0, "original")]
    for method in cfg.methods:
        if method in WEIGHT_METHODS:
            for f in cfg.fractions:
                if method.startswith("setdiff-"):
                    p = f if cfg.setdiff_p is None else cfg.setdiff_p
                    spec = f"{method}:p={_number(p)},q={_number(f)}"
                else:
                    spec = f"{method}:{_number(f)}"
                points.append(Point(method, "weights", f, spec))
        else:
            for r in cfg.ranks:
                spec = f"actsvd:r={_number(r)}" if method == "actsvd" else f"actsvd-orth:ru={_number(cfg.orth_ru)},rs={_number(r)}"
                points.append(Point(method, "ranks", r, spec))
    return points


def rank_fraction(ranks: dict, full_ranks: dict[str, int]) -> float:
    """Ranks removed over all matrices / their summed full ranks; actsvd-orth entries are (ru, rs): rs counts."""
    removed = sum(r[1] if isinstance(r, (list, tuple)) else r for r in ranks.values())
    total = sum(full_ranks[name] for name in ranks)
    return removed / total if total else 0.0


def full_ranks(model) -> dict[str, int]:
    """min(out, in) of every decoder linear, keyed as ActSVD reports its ranks."""
    from compression.blockwise import block_linears
    from lm.hooks import decoder_layers

    return {f"model.layers.{i}.{name}.weight": min(lin.out_features, lin.in_features)
            for i, block in enumerate(decoder_layers(model)) for name, lin in block_linears(block).items()}


def _log(msg: str) -> None:
    print(f"[brittleness] {msg}", file=sys.stderr, flush=True)




class _Variant:
    """The point's model, built only when a stage actually needs it (a full rerun builds nothing)."""

    def __init__(self, comparison, spec):
        self.comparison, self.spec = comparison, spec
        self.model = None
        self.removal: dict = {}
        self.seconds = 0.0

    def __call__(self):
        if self.model is None:
            if self.spec.method == "original":
                self.model = self.comparison.base.model
            else:
                _log(f"{self.spec.text}: building")
                self.model, self.removal, self.seconds = self.comparison.build(self.spec)
        return self.model


class Brittleness:
    """Sweeps the removal methods; stage results are cached per point in <run>/points/<variant>/."""

    def __init__(self, cfg: BrittlenessConfig):
        from experiments.compare_refusal import CompareConfig, Comparison

        self.cfg = cfg
        self.points = sweep_points(cfg)
        # One Comparison holds the base model, its own replies and cached scores for every point;
        # selection and checkpoints are off: this sweep only builds, evaluates and discards.
        self.comparison = Comparison(CompareConfig(
            model=cfg.model, variants=tuple(p.spec for p in self.points[1:]), name=cfg.name, runs_dir=cfg.runs_dir,
            n_asr=cfg.n_asr, max_new_tokens=cfg.max_new_tokens, calib_samples=cfg.calib_samples,
            batch_size=cfg.batch_size, seed=cfg.seed, dtype=cfg.dtype, save_checkpoints=False, select=False,
        ))
        self.dir = cfg.run_dir()
        self.specs = dict(zip((p.spec for p in self.points), self.comparison.specs))

    def evaluate(self, point: Point) -> dict:
        """Every stage of one point, each cached; the variant is built only if a stage is missing."""
        cfg, cmp, tok = self.cfg, self.comparison, self.comparison.base.tokenizer
        spec = self.specs[point.spec]
        pdir = self.dir / "points" / spec.slug
        key = dict(variant=spec.text, params=cmp.variant_params(spec), base=cmp.fingerprint())
        variant = _Variant(cmp, spec)

        def built() -> dict:
            from compression.checkpoint import sparsity_report

            model = variant()
            return dict(removal=variant.removal, build_seconds=round(variant.seconds, 1),
                        decoder_sparsity=sparsity_report(model)["decoder_linear_sparsity"])

        out = dict(build=cached_json(pdir / "build.json", key, built), asr={})
        # The original is keyed by its weights (shared with the other entry points); a sweep point by
        # its spec on the base model, so a rerun need not build it to find its measurements.
        mid, store = cmp.fingerprint() if spec.method == "original" else key, cfg.store()
        for setting in cfg.settings:
            out["asr"][setting] = measure(variant, tok, cfg.eval_config(setting), store, mid)
        out["harmless"] = measure(variant, tok, cfg.eval_config("vanilla").harmless(cfg.harmless_sets, cfg.n_harmless), store, mid)
        pcfg = PerplexityConfig(windows=cfg.ppl_windows, seqlen=cfg.ppl_seqlen)
        out["perplexity"] = measured(store, "perplexity", mid, [pcfg], lambda: timed(lambda: measure_perplexity(variant(), tok, pcfg)))
        from lm.zero_shot import ZeroShotConfig

        zcfg = ZeroShotConfig(tasks=cfg.zero_shot_tasks, limit=cfg.zero_shot_limit)
        out["zero_shot"] = measured(store, "zero_shot", mid, [zcfg], lambda: self.zero_shot(variant(), zcfg))
        if variant.model is not None and variant.model is not cmp.base.model:
            variant.model = None
            gc.collect()
        return out

    def zero_shot(self, model, zcfg) -> dict:
        from lm.zero_shot import zero_shot_accuracy

        result = zero_shot_accuracy(model, self.comparison.base.tokenizer, zcfg)
        result["seconds"] = round(result["seconds"], 1)
        return result

    def run(self) -> dict:
        if self.cfg.threads:
            import torch

            torch.set_num_threads(self.cfg.threads)
        start = time.perf_counter()
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.dir / "config.json", dataclasses.asdict(self.cfg))
        results = []
        for point in tqdm(self.points, desc="brittleness sweep", unit="point"):
            _log(f"{point.spec}: evaluating")
            results.append((point, self.evaluate(point)))
        report = self.summarise(results, time.perf_counter() - start)
        fig = brittleness_figure(report)
        fig_dir = self.dir / "figures"
        write_plotlyjs(fig_dir)
        atomic_write_text(fig_dir / "brittleness.html", fig.to_html(include_plotlyjs="directory", full_html=True))
        report["figure"] = "figures/brittleness.html"
        atomic_write_json(self.dir / "report.json", report)
        atomic_write_text(self.dir / "report.md", render_markdown(report))
        if self.cfg.figures_dir:
            from experiments.figures import export

            for line in export({"brittleness": fig}, Path(self.cfg.figures_dir)):
                _log(line)
        _log(f"report: {self.dir / 'report.md'}")
        return report

    def summarise(self, results: list, seconds: float) -> dict:
        base = self.comparison.base
        ranks_full = full_ranks(base.model)
        ref_ppl = results[0][1]["perplexity"]["perplexity"]
        rows = []
        original = results[0][1]
        for point, r in results:
            removal = r["build"]["removal"]
            if point.family == "ranks":
                x = rank_fraction(removal["ranks"], ranks_full)
            else:
                x = removal.get("removed_fraction", 0.0)
            ppl = r["perplexity"]["perplexity"]
            completions = r["asr"]["vanilla"]["completions"]
            zs = zero_shot_rates(r["zero_shot"]) or {}
            rows.append(dict(
                method=point.method, family=point.family, spec=point.spec, requested=point.requested, x=x,
                decoder_sparsity=r["build"]["decoder_sparsity"],
                asr={s: a["asr"] for s, a in r["asr"].items()},
                rates=dict(asr={s: a["rates"]["asr"] for s, a in r["asr"].items()}, over_refusal=r["harmless"]["rates"]["refusal"],
                           judge_disagreement=r["asr"]["vanilla"]["rates"]["judge_disagreement"]),
                tests=None if point.method == "original" else dict(
                    asr={s: {j: paired(a, original["asr"][s], j) for j in JUDGES} for s, a in r["asr"].items()},
                    over_refusal={j: paired(r["harmless"], original["harmless"], j, "refused") for j in JUDGES}),
                perplexity=ppl,
                perplexity_ci=perplexity_rate(r["perplexity"]),
                zero_shot=dict(mean=r["zero_shot"]["average"], per_task={t: e["acc"] for t, e in r["zero_shot"]["per_task"].items()},
                               rate=zs.get("average"), per_task_rates=zs.get("per_task")),
                collapse=collapse_verdict(completions, ppl, ref_ppl).to_json(),
                seconds=dict(build=r["build"]["build_seconds"], perplexity=r["perplexity"]["seconds"], zero_shot=r["zero_shot"]["seconds"],
                             **{f"asr_{s}": a["seconds"] for s, a in r["asr"].items()}),
                sample=dict(goal=r["asr"]["vanilla"]["records"][0]["prompt"], completion=completions[0]),
            ))
        _holm(rows, self.cfg.settings)
        return dict(
            model=self.cfg.model, model_name=base.name, base_fingerprint=self.comparison.fingerprint(),
            config=dataclasses.asdict(self.cfg), n_asr=self.cfg.n_asr, settings=list(self.cfg.settings),
            evaluation=dict(harmful=describe_prompts(original["asr"]["vanilla"], len(rows) - 1),
                            harmless=describe_prompts(original["harmless"], len(rows) - 1)),
            wall_seconds=round(seconds, 1), points=rows,
        )


def _holm(rows: list[dict], settings) -> None:
    """Holm within each family: one setting (or over-refusal) and one judge, over the sweep points."""
    for j in JUDGES:
        families = [[r["tests"]["asr"][s][j] for r in rows if r.get("tests") and r["tests"]["asr"][s][j]] for s in settings]
        families.append([r["tests"]["over_refusal"][j] for r in rows if r.get("tests") and r["tests"]["over_refusal"][j]])
        for family in families:
            if family:
                add_holm(family)


# --- rendering (from the report dict alone, so report.json can be re-rendered without a model) ---

SETTING_LABELS = {"vanilla": "vanilla", "adv_decoding": "adv-decoding", "adv_suffix": "adv-suffix"}
JUDGE_LABELS = {"wei2024": "Wei et al. judge", "arditi2024": "Arditi et al. judge"}
METHOD_COLOURS = {"top-wanda": "#1f77b4", "top-snip": "#ff7f0e", "setdiff-wanda": "#2ca02c", "setdiff-snip": "#d62728",
                  "random": "#7f7f7f", "actsvd": "#9467bd", "actsvd-orth": "#8c564b"}


def curves(report: dict) -> dict[tuple[str, str], list[dict]]:
    """(family, method) -> its points sorted by x, each curve starting at the original (x = 0)."""
    rows = report["points"]
    original = next(r for r in rows if r["method"] == "original")
    out: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        if r["method"] != "original":
            out.setdefault((r["family"], r["method"]), [original]).append(r)
    return {k: sorted(v, key=lambda r: r["x"]) for k, v in out.items()}


def brittleness_figure(report: dict):
    """ASR (three settings, both judges), mean zero-shot accuracy and perplexity vs the amount removed.

    Top row: weight methods against the fraction of weights removed; bottom row: ActSVD against the
    fraction of ranks removed. Wei judge solid, Arditi judge dotted; collapsed points are crosses.
    """
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    settings = report["settings"]
    titles = [f"{SETTING_LABELS[s]} ASR" for s in settings] + ["mean zero-shot accuracy", "wikitext-2 perplexity"]
    cols = len(titles)
    by_curve = curves(report)
    families = [f for f in ("weights", "ranks") if any(k[0] == f for k in by_curve)] or ["weights"]
    fig = make_subplots(rows=len(families), cols=cols, subplot_titles=[t for _ in families for t in titles],
                        horizontal_spacing=0.06, vertical_spacing=0.16 if len(families) > 1 else 0.1)
    shown = set()
    for (family, method), pts in by_curve.items():
        row = families.index(family) + 1
        x = [100 * p["x"] for p in pts]
        symbols = ["x" if p["collapse"]["collapsed"] else "circle" for p in pts]
        hover = [f"{p['spec']}<br>removed {100 * p['x']:.2f}%<br>perplexity {p['perplexity']:.1f}"
                 f"<br>zero-shot {100 * p['zero_shot']['mean']:.1f}%" + ("<br>COLLAPSED: " + p["collapse"]["reason"] if p["collapse"]["collapsed"] else "")
                 for p in pts]
        style = dict(name=method, legendgroup=method, text=hover, hovertemplate="%{text}<br>y %{y:.1f}<extra>" + method + "</extra>",
                     marker=dict(symbol=symbols, size=[11 if s == "x" else 7 for s in symbols], color=METHOD_COLOURS.get(method, "black")))
        colour = style["marker"]["color"]
        panels = [(col, [100 * p["asr"][setting][judge] for p in pts], dash,
                   [((p.get("rates") or {}).get("asr", {}).get(setting) or {}).get(judge) for p in pts])
                  for col, setting in enumerate(settings, start=1) for judge, dash in (("wei2024", "solid"), ("arditi2024", "dot"))]
        panels += [(cols - 1, [100 * p["zero_shot"]["mean"] for p in pts], "solid", [p["zero_shot"].get("rate") for p in pts]),
                   (cols, [p["perplexity"] for p in pts], "solid", None)]
        for col, y, dash, rates in panels:
            if rates is None:  # perplexity: its own units
                cis = [p.get("perplexity_ci") for p in pts]
                err = dict(type="data", symmetric=False, visible=any(cis), array=[c["ci95"][1] - c["value"] if c else 0 for c in cis],
                           arrayminus=[c["value"] - c["ci95"][0] if c else 0 for c in cis])
            else:
                err = error_bars(rates)
            fig.add_trace(go.Scatter(x=x, y=y, mode="lines+markers", showlegend=method not in shown, error_y=dict(err, thickness=1),
                                     line=dict(color=colour, dash=dash, width=2), **style), row=row, col=col)
            shown.add(method)
    # Legend keys for the line styles and the collapse marker.
    for name, line, marker in (("Wei et al. judge", dict(color="black", dash="solid"), dict(symbol="circle", color="black")),
                               ("Arditi et al. judge", dict(color="black", dash="dot"), dict(symbol="circle", color="black")),
                               ("collapsed (x)", dict(color="rgba(0,0,0,0)"), dict(symbol="x", size=11, color="black"))):
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="lines+markers", name=name, line=line, marker=marker), row=1, col=1)
    for row, family in enumerate(families, start=1):
        xlabel = "weights removed (%)" if family == "weights" else "ranks removed (%)"
        for col in range(1, cols + 1):
            fig.update_xaxes(title_text=xlabel, row=row, col=col)
        for col in range(1, len(settings) + 1):
            fig.update_yaxes(title_text="ASR (%)" if col == 1 else None, range=[-3, 103], row=row, col=col)
        fig.update_yaxes(title_text="accuracy (%)", row=row, col=cols - 1)
        fig.update_yaxes(title_text="perplexity (log)", type="log", row=row, col=cols)
    fig.update_layout(
        # Two lines: a model name as long as the embedded one's does not fit one line at this width.
        title=f"Brittleness of safety: {report.get('model_name', report['model'])}<br>"
              f"<sup>{_n_prompts(report)} held-out harmful prompts per ASR point, 95% intervals; top row: weights removed, "
              "bottom row: ranks removed</sup>",
        width=1250, height=370 * len(families) + 150, font=dict(size=14),
        legend=dict(orientation="h", yanchor="top", y=-0.12, xanchor="center", x=0.5),
        margin=dict(l=60, r=20, t=110, b=110),
    )
    return fig


def _n_prompts(report: dict) -> str:
    ev = report.get("evaluation")
    return str(ev["harmful"]["n"]) if ev else str(report["n_asr"])


def render_markdown(report: dict) -> str:
    settings = report["settings"]
    head = ["method", "spec", "removed (%)"] + [f"{SETTING_LABELS[s]} ASR Arditi | p" for s in settings] + \
           ["vanilla ASR Wei", "over-refusal (Arditi) | p", "perplexity", "zero-shot mean", "collapsed"]
    ev = report.get("evaluation") or {}
    what = (f"ASR on {ev['harmful']['n']} held-out harmful prompts ({', '.join(f'{k} {n}' for k, n in ev['harmful']['per_source'].items())}; "
            f"overlap with any prompt a stage fits on: {ev['harmful']['overlap_with_fitted']}), over-refusal on {ev['harmless']['n']} held-out "
            f"harmless prompts" if ev else f"ASR on the first {report['n_asr']} AdvBench goals")
    lines = [f"# Brittleness sweep: {report.get('model_name', report['model'])}", "",
             (f"{what}; zero-shot tasks {', '.join(report['config']['zero_shot_tasks'])} "
              f"(limit {report['config']['zero_shot_limit'] or 'all'}); run time {report['wall_seconds']:.0f} s. "
              "95% intervals (Wilson; adv-decoding: bootstrap over prompts; adv-suffix: best suffix; perplexity and zero-shot: "
              "bootstrap). p: exact McNemar test against the original on the same prompts, Holm over the points per column; "
              "* = significant at 5% (adv-decoding's 5 samples per prompt have no McNemar test)."), "",
             "| " + " | ".join(head) + " |", "|" + "---|" * (len(head) + len(settings) + 1)]
    for p in report["points"]:
        r, t = p.get("rates") or {}, p.get("tests") or {}
        asr = []
        for s in settings:
            rate = r.get("asr", {}).get(s, {}).get("arditi2024")
            asr += [fmt_rate(rate) if rate else f"{100 * p['asr'][s]['arditi2024']:.0f}%",
                    fmt_p((t.get("asr", {}).get(s) or {}).get("arditi2024")) if t else ""]
        unit = "ranks" if p["family"] == "ranks" else "weights"
        wei = r.get("asr", {}).get("vanilla", {}).get("wei2024")
        zs = p["zero_shot"].get("rate")
        cells = [p["method"], f"`{p['spec']}`", f"{100 * p['x']:.2f} {unit}" if p["method"] != "original" else "0", *asr,
                 fmt_rate(wei) if wei else f"{100 * p['asr']['vanilla']['wei2024']:.0f}%",
                 fmt_rate(r.get("over_refusal", {}).get("arditi2024")), fmt_p((t.get("over_refusal") or {}).get("arditi2024")) if t else "",
                 fmt_value_ci(p["perplexity_ci"], ".1f") if p.get("perplexity_ci") else f"{p['perplexity']:.1f}",
                 fmt_rate(zs) if zs else f"{100 * p['zero_shot']['mean']:.1f}%",
                 ("yes: " + p["collapse"]["reason"]) if p["collapse"]["collapsed"] else "no"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# --- CLI -------------------------------------------------------------------------------------


def parse_args(argv=None) -> BrittlenessConfig:
    """Flags generated from BrittlenessConfig's fields (lm.cli)."""
    return parse_config(BrittlenessConfig, argv, prog="python -m experiments.brittleness", description=__doc__.split("\n\n")[0])[0]


def validate(cfg: BrittlenessConfig) -> None:
    """Every spec and the zero-shot config, before the model loads: bad input writes nothing."""
    from compression.variants import parse_variant
    from lm.zero_shot import ZeroShotConfig

    for point in sweep_points(cfg):
        parse_variant(point.spec)
    ZeroShotConfig(tasks=cfg.zero_shot_tasks, limit=cfg.zero_shot_limit)


@cli
def main(argv=None) -> int:
    cfg = parse_args(argv)
    validate(cfg)
    Brittleness(cfg).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
