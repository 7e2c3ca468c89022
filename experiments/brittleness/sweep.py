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

Variants are built through compression.builder, as the main job builds them (own replies generated once,
importance scores cached in <run>/scores), evaluated, and discarded: no checkpoint per point. Each
point's stages are cached in <run>/points/<variant>/ and reused by a rerun with the same settings.
"""

from __future__ import annotations

import dataclasses
import gc
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm

from compression.builder import BuildSettings, VariantBuilder
from compression.calibration import CalibrationConfig
from compression.variants import parse_variant, validate_variant
from lm.cache import (
    atomic_write_json,
    atomic_write_text,
    cached_json,
    sweep_temporaries,
    write_plotlyjs,
)
from lm.cli import parse_config
from lm.errors import cli
from lm.loading import load_model
from refusal.behaviour import measure_behaviour
from refusal.collapse import collapse_verdict
from refusal.judge_report import judges_section
from refusal.judge_spec import judge_panel
from refusal.measure import describe_prompts, paired, perplexity_rate, zero_shot_rates
from refusal.stats import add_holm

from .config import JUDGES, BrittlenessConfig, Point, sweep_points
from .report import brittleness_figure, render_markdown


def rank_fraction(ranks: dict, full_ranks: dict[str, int]) -> float:
    """Ranks removed over all matrices / their summed full ranks; actsvd-orth entries are (ru, rs): rs counts."""
    removed = sum(r[1] if isinstance(r, (list, tuple)) else r for r in ranks.values())
    total = sum(full_ranks[name] for name in ranks)
    return removed / total if total else 0.0


def full_ranks(model) -> dict[str, int]:
    """min(out, in) of every matrix ActSVD edits, keyed as it reports its ranks (each expert's, and
    each projection of a fused matrix, on its own)."""
    from compression.actsvd import projection_rows
    from lm.architecture import decoder_linears
    from lm.experts import experts_as_linears

    with experts_as_linears(model):
        return {
            key: min(len(rows), lin.in_features)
            for name, lin in decoder_linears(model).items()
            for key, rows in projection_rows(model, name.removesuffix(".weight"), lin)
        }


def _log(msg: str) -> None:
    print(f"[brittleness] {msg}", file=sys.stderr, flush=True)


class _Variant:
    """The point's model, built only when a stage actually needs it (a full rerun builds nothing)."""

    def __init__(self, builder: VariantBuilder, spec):
        self.builder, self.spec = builder, spec
        self.model = None
        self.removal: dict = {}
        self.seconds = 0.0

    def __call__(self):
        if self.model is None:
            if self.spec.method == "original":
                self.model = self.builder.base.model
            else:
                _log(f"{self.spec.text}: building")
                self.model, self.removal, self.seconds = self.builder.build(self.spec)
        return self.model


class Brittleness:
    """Sweeps the removal methods; stage results are cached per point in <run>/points/<variant>/."""

    def __init__(self, cfg: BrittlenessConfig):
        self.cfg = cfg
        self.points = sweep_points(cfg)
        self.judges = judge_panel(cfg.judges)  # None without --judges
        self.dir = cfg.run_dir()
        self.specs = {p.spec: parse_variant(p.spec) for p in self.points}
        self.base = load_model(cfg.model, dtype=cfg.dtype)
        for spec in self.specs.values():
            validate_variant(spec, self.base.model)
        # One builder holds the base model, its own replies and cached scores for every point; no
        # checkpoints: this sweep only builds, evaluates and discards.
        calibration = CalibrationConfig(n_samples=cfg.calib_samples, seed=cfg.seed)
        self.builder = VariantBuilder(
            self.base,
            BuildSettings(cfg.model, calibration, min(64, cfg.max_new_tokens), cfg.dtype),
            self.dir / "scores",
        )

    def evaluate(self, point: Point) -> dict:
        """Every stage of one point, each cached; the variant is built only if a stage is missing."""
        cfg, builder, tok = self.cfg, self.builder, self.base.tokenizer
        spec = self.specs[point.spec]
        pdir = self.dir / "points" / spec.slug
        key = dict(variant=spec.text, params=builder.params(spec), base=builder.fingerprint())
        variant = _Variant(builder, spec)

        def built() -> dict:
            from compression.checkpoint import sparsity_report

            model = variant()
            return dict(
                removal=variant.removal,
                build_seconds=round(variant.seconds, 1),
                decoder_sparsity=sparsity_report(model)["decoder_linear_sparsity"],
            )

        out = dict(build=cached_json(pdir / "build.json", key, built))
        # The original is keyed by its weights (shared with the other entry points); a sweep point by
        # its spec on the base model, so a rerun need not build it to find its measurements.
        mid, store = builder.fingerprint() if spec.method == "original" else key, cfg.store()
        behaviour = measure_behaviour(variant, tok, cfg.behaviour_config(), store, mid, self.judges)
        out.update(asr=behaviour.asr, harmless=behaviour.harmless)
        out.update(perplexity=behaviour.perplexity, zero_shot=behaviour.zero_shot)
        if variant.model is not None and variant.model is not self.base.model:
            variant.model = None
            gc.collect()
        return out

    def run(self) -> dict:
        if self.cfg.threads:
            import torch

            torch.set_num_threads(self.cfg.threads)
        start = time.perf_counter()
        sweep_temporaries(self.dir)  # what a killed earlier invocation left half-written
        sweep_temporaries(self.cfg.store())
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
            from ..figures import export

            for line in export({"brittleness": fig}, Path(self.cfg.figures_dir)):
                _log(line)
        _log(f"report: {self.dir / 'report.md'}")
        return report

    def summarise(self, results: list, seconds: float) -> dict:
        base = self.base
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
            rows.append(
                dict(
                    method=point.method,
                    family=point.family,
                    spec=point.spec,
                    requested=point.requested,
                    x=x,
                    decoder_sparsity=r["build"]["decoder_sparsity"],
                    asr={s: a["asr"] for s, a in r["asr"].items()},
                    rates=dict(
                        asr={s: a["rates"]["asr"] for s, a in r["asr"].items()},
                        over_refusal=r["harmless"]["rates"]["refusal"],
                        judge_disagreement=r["asr"]["vanilla"]["rates"]["judge_disagreement"],
                    ),
                    tests=None
                    if point.method == "original"
                    else dict(
                        asr={s: {j: paired(a, original["asr"][s], j) for j in JUDGES} for s, a in r["asr"].items()},
                        over_refusal={j: paired(r["harmless"], original["harmless"], j, "refused") for j in JUDGES},
                    ),
                    perplexity=ppl,
                    perplexity_ci=perplexity_rate(r["perplexity"]),
                    zero_shot=dict(
                        mean=r["zero_shot"]["average"],
                        per_task={t: e["acc"] for t, e in r["zero_shot"]["per_task"].items()},
                        rate=zs.get("average"),
                        per_task_rates=zs.get("per_task"),
                    ),
                    collapse=collapse_verdict(completions, ppl, ref_ppl).to_json(),
                    seconds=dict(
                        build=r["build"]["build_seconds"],
                        perplexity=r["perplexity"]["seconds"],
                        zero_shot=round(r["zero_shot"]["seconds"], 1),
                        **{f"asr_{s}": a["seconds"] for s, a in r["asr"].items()},
                    ),
                    sample=dict(goal=r["asr"]["vanilla"]["records"][0]["prompt"], completion=completions[0]),
                )
            )
        _holm(rows, self.cfg.settings)
        extra = {}
        if (
            self.judges is not None
        ):  # --judges: every judge's rates, tests and agreement on vanilla ASR and over-refusal
            extra["judges"] = judges_section(
                self.judges,
                {p.spec: dict(asr=r["asr"]["vanilla"], harmless=r["harmless"]) for p, r in results},
                [(p.spec, "original") for p, _ in results if p.method != "original"],
                self.cfg.max_new_tokens,
            )
        return dict(
            model=self.cfg.model,
            model_name=base.name,
            base_fingerprint=self.builder.fingerprint(),
            config=dataclasses.asdict(self.cfg),
            n_asr=self.cfg.n_asr,
            settings=list(self.cfg.settings),
            evaluation=dict(
                harmful=describe_prompts(original["asr"]["vanilla"], len(rows) - 1),
                harmless=describe_prompts(original["harmless"], len(rows) - 1),
            ),
            wall_seconds=round(seconds, 1),
            points=rows,
            **extra,
        )


def _holm(rows: list[dict], settings) -> None:
    """Holm within each family: one setting (or over-refusal) and one judge, over the sweep points."""
    for j in JUDGES:
        families = [
            [r["tests"]["asr"][s][j] for r in rows if r.get("tests") and r["tests"]["asr"][s][j]] for s in settings
        ]
        families.append(
            [r["tests"]["over_refusal"][j] for r in rows if r.get("tests") and r["tests"]["over_refusal"][j]]
        )
        for family in families:
            if family:
                add_holm(family)


# --- CLI -------------------------------------------------------------------------------------


def parse_args(argv=None) -> BrittlenessConfig:
    """Flags generated from BrittlenessConfig's fields (lm.cli)."""
    return parse_config(
        BrittlenessConfig, argv, prog="python -m experiments.brittleness", description=__doc__.split("\n\n")[0]
    )[0]


def validate(cfg: BrittlenessConfig) -> None:
    """Every spec and the zero-shot config, before the model loads: bad input writes nothing."""
    from lm.loading import check_model_spec
    from lm.zero_shot import ZeroShotConfig

    check_model_spec(cfg.model)
    judge_panel(cfg.judges)
    for point in sweep_points(cfg):
        parse_variant(point.spec)
    ZeroShotConfig(tasks=cfg.zero_shot_tasks, limit=cfg.zero_shot_limit)


@cli
def main(argv=None) -> int:
    cfg = parse_args(argv)
    validate(cfg)
    Brittleness(cfg).run()
    return 0
