"""The main job: how compression changes a chat model's refusal behaviour and refusal directions.

    python -m experiments.compare_refusal                 # embedded model, default variants
    python -m experiments.compare_refusal --quick         # CI-sized
    python -m experiments.compare_refusal --model Qwen/Qwen2.5-7B-Instruct --variants wanda:0.5 wanda:2:4

For the original and every variant: vanilla ASR on held-out harmful prompts (AdvBench and
JailbreakBench by default, none of them used to fit anything; both judges, per prompt) and the
refusal rate on held-out harmless prompts (over-refusal), each with a 95% interval and an exact
McNemar test against the original (Holm-corrected over the variants), wikitext-2 perplexity and
zero-shot accuracy with bootstrap intervals, a collapse check, difference-of-means directions at
every layer and post-instruction position and their cosine to the original's, the original's
selected direction (Arditi et al.) and its quality inside each variant; then AIRD and targeted
repair of every variant whose direction changed. One report (markdown, self-contained HTML, JSON).
Each stage leaves an artifact in runs/<name>/ and is reused on a rerun with the same settings, so
an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from compression.calibration import TEXT_SOURCE, CalibrationConfig, ResponseCalibrationConfig, calibration_set, response_calibration_set
from compression.checkpoint import read_manifest, save_variant, sparsity_report
from compression.variants import VariantSpec, build_variant_with_report, parse_variant, validate_variant
from lm import datasets
from lm.cache import RunClock, atomic_write_json, atomic_write_text, cached_json, cached_tensors, measured, timed, write_plotlyjs
from lm.chat import post_instruction
from lm.errors import UserError, cli
from lm.loading import load_model, model_fingerprint
from lm.perplexity import PerplexityConfig, check_disjoint_from_calibration, measure_perplexity
from lm.zero_shot import task_names
from refusal.eval_sets import check_names
from refusal.judges import JUDGE_NAMES as JUDGES
from refusal.measure import (DEFAULT_HARMFUL, DEFAULT_HARMLESS, EvalConfig, add_eval_arguments, describe_prompts, eval_overrides, measure, paired,
                             perplexity_rate, zero_shot_rates)
from refusal.stats import add_holm, describe_change
from refusal.collapse import collapse_verdict
from refusal.compare import cosine_heatmaps_figure, cosine_to_direction, quality_bars_figure, source_shift, source_shift_figure
from refusal.direction import candidate_directions, cosine_map, norm_peak, prompt_activations
from refusal.probes import PARAMETERS as PROBE_PARAMETERS
from refusal.probes import ProbeConfig, correct, fit_probe_grid, probe_parameters
from refusal.probes import summarise as summarise_probes
from refusal.quality import direction_quality
from refusal.score import refusal_tokens
from refusal.select import SelectionConfig, SharedPrompts, score_maps_figure, select_direction_cached

from .report import asr_figure, cosine_per_layer_figure, probe_transfer_figure, render_html, render_markdown

# The issue-sized comparison: Wanda at three sparsities and 2:4, SNIP, SparseGPT, Wei et al.'s set
# difference, GPTQ and RTN. Set difference at p = q = 1%: on the embedded model it broke refusal
# (ASR 19% -> 75%, experiments.brittleness) with 0.23% of the weights, where p = q = 3% gave 38%.
DEFAULT_VARIANTS = ("wanda:0.5", "wanda:0.6", "wanda:0.7", "wanda:2:4", "snip:0.5", "sparsegpt:0.5",
                    "setdiff-wanda:p=0.01,q=0.01", "gptq:int4", "rtn:int8")
QUICK_VARIANTS = ("wanda:0.5", "rtn:int8")


@dataclass
class CompareConfig:
    """Settings of the main job. Fields left None take a device-dependent value (see `resolved`):
    the paper-sized one on a GPU, a smaller one on CPU, where the same stages would take days."""

    model: str = "embedded"
    variants: tuple[str, ...] = DEFAULT_VARIANTS
    name: str | None = None  # run directory name under runs_dir
    runs_dir: str = "runs"
    # Held-out harmful prompts for ASR: refusal.eval_sets names or file:PATH, the first n_asr of each.
    eval_sets: tuple[str, ...] = DEFAULT_HARMFUL
    n_asr: int = 50
    # Held-out harmless prompts for over-refusal (the refusal rate where nothing should be refused).
    harmless_sets: tuple[str, ...] = DEFAULT_HARMLESS
    n_harmless: int = 50
    # The measurement store (refusal.measure), shared by every entry point that points at it, so
    # the same model under the same settings is generated once; None: <runs_dir>/measurements.
    measurements_dir: str | None = None
    max_new_tokens: int = 128
    n_train: int = 128  # harmful and harmless instructions for the directions, each
    ppl_windows: int = 8
    ppl_seqlen: int = 512
    calib_samples: int = 128
    # What Wanda, SparseGPT and GPTQ calibrate on: "harmless" train instructions (chat-formatted),
    # or "wikitext" text windows of calib_seqlen tokens (the papers' kind of calibration).
    calib_source: str = "harmless"
    calib_seqlen: int = 256
    batch_size: int | None = None
    seed: int = 0
    dtype: str = "float32"
    save_checkpoints: bool = True
    # Refusal-direction selection (Arditi et al.) for the original and, if select_variants, for
    # every variant; see refusal.select.SelectionConfig for search and prescreen.
    select: bool = True
    # Each variant's own selection runs on the original's filtered prompts and candidates
    # (refusal.select.SharedPrompts), which gives its source shift; off, variants are only scored
    # with the original's direction (cosine map, quality, ablation).
    select_variants: bool = True
    n_val: int = 32
    search: str = "lazy"
    prescreen_n_val: int = 8
    prescreen_keep: int = 16
    n_ablation_asr: int = 16  # prompts of each eval set generated with the original's direction ablated
    # Harmfulness probes (refusal.probes) per (position, layer): fitted on the direction prompts,
    # scored on the held-out ASR and over-refusal prompts; the original's also on each variant.
    probes: bool = True
    figures_dir: str | None = None  # also write the figures here as HTML + PNG (the README's figures/)
    # Zero-shot accuracy (lm-eval) per variant: documents per task (0 skips it) and tasks.
    # None = 200 documents of all 7 tasks on a GPU; 24 of the 4 short-document tasks on CPU.
    zero_shot_limit: int | None = None
    zero_shot_tasks: tuple[str, ...] | None = None
    # AIRD + targeted repair (repair/) for every variant whose direction changed (cosine at the
    # original's source below repair_below). Its evaluation sizes: None = the comparison's own
    # (so the original's and the compressed model's measurements are reused from the comparison),
    # on a GPU with adversarial suffixes and a 4-point restoration curve; on CPU vanilla ASR only
    # and a 2-point curve on 16 prompts per set.
    repair: bool = True
    repair_below: float = 0.99
    repair_n_asr: int | None = None
    repair_max_new_tokens: int | None = None
    repair_adv_suffix: bool | None = None
    repair_curve_fractions: tuple[float, ...] | None = None
    repair_curve_n_asr: int | None = None

    def __post_init__(self):
        self.eval_sets, self.harmless_sets = check_names(self.eval_sets), check_names(self.harmless_sets)
        self.eval_config()  # bad evaluation settings fail before any model loads
        self.calibration_config()  # fails on bad calibration settings before any work
        if self.calib_source == TEXT_SOURCE:
            check_disjoint_from_calibration(self.ppl_windows, self.ppl_seqlen)

    def eval_config(self, n: int | None = None) -> EvalConfig:
        return EvalConfig(sets=self.eval_sets, n=n or self.n_asr, setting="vanilla", max_new_tokens=self.max_new_tokens,
                          seed=self.seed, batch_size=self.batch_size)

    def harmless_config(self) -> EvalConfig:
        return self.eval_config().harmless(self.harmless_sets, self.n_harmless)

    def store(self) -> Path:
        return Path(self.measurements_dir) if self.measurements_dir else Path(self.runs_dir) / "measurements"

    def calibration_config(self) -> CalibrationConfig:
        return CalibrationConfig(source=self.calib_source, n_samples=self.calib_samples, seqlen=self.calib_seqlen, seed=self.seed)

    @classmethod
    def quick(cls, **overrides) -> "CompareConfig":
        """CI-sized: the same stages on a handful of prompts and two variants."""
        small = dict(variants=QUICK_VARIANTS, n_asr=8, n_harmless=8, max_new_tokens=24, n_train=16, ppl_windows=2, ppl_seqlen=256, calib_samples=16,
                     n_val=4, prescreen_n_val=2, prescreen_keep=4, n_ablation_asr=4, zero_shot_limit=0, repair=False)
        return cls(**{**small, **overrides})

    def resolved(self, on_gpu: bool) -> "CompareConfig":
        """A copy with every None replaced by its value on this device (recorded in config.json)."""
        from lm.zero_shot import ALL_TASKS, SHORT_TASKS

        gpu = dict(zero_shot_limit=200, zero_shot_tasks=ALL_TASKS, repair_n_asr=self.n_asr, repair_curve_n_asr=self.n_asr,
                   repair_max_new_tokens=self.max_new_tokens, repair_adv_suffix=True, repair_curve_fractions=(0.01, 0.03, 0.1, 0.3))
        cpu = dict(zero_shot_limit=24, zero_shot_tasks=SHORT_TASKS, repair_n_asr=self.n_asr, repair_curve_n_asr=min(16, self.n_asr),
                   repair_max_new_tokens=self.max_new_tokens, repair_adv_suffix=False, repair_curve_fractions=(0.03, 0.3))
        fill = {k: v for k, v in (gpu if on_gpu else cpu).items() if getattr(self, k) is None}
        return dataclasses.replace(self, **fill)

    def run_dir(self) -> Path:
        name = self.name or "compare-" + Path(self.model).name.replace("/", "-")
        return Path(self.runs_dir) / name


def _log(msg: str) -> None:
    print(f"[compare_refusal] {msg}", file=sys.stderr, flush=True)


class Comparison:
    """Runs the stages for one base model; every stage is cached in the run directory."""

    def __init__(self, cfg: CompareConfig):
        self.cfg = cfg
        self.specs = [parse_variant("original")] + [parse_variant(v) for v in cfg.variants]
        slugs = [s.slug for s in self.specs]
        if len(set(slugs)) != len(slugs):
            raise UserError(f"duplicate variants in {list(cfg.variants)}")
        self.dir = cfg.run_dir()
        self.base = load_model(cfg.model, dtype=cfg.dtype)
        self.cfg = cfg = cfg.resolved(on_gpu=next(self.base.model.parameters()).device.type == "cuda")
        for spec in self.specs:
            validate_variant(spec, self.base.model)
        self._fingerprint: str | None = None
        self._calibration = None
        self._responses = None
        self._original_selection = None
        self._own_replies: dict = {}
        self._original_probes: dict | None = None

    # --- shared inputs -------------------------------------------------------------------
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(self.base.model)
        return self._fingerprint

    def calibration(self):
        if self._calibration is None:
            # The model writes its own replies when the calibration source asks for them.
            self._calibration = calibration_set(self.base.tokenizer, self.cfg.calibration_config(), model=self.base.model)
        return self._calibration

    def own_replies(self, kind: str):
        """The base model's own refusals (safety) or helpful replies (utility), generated once (Wei et al.)."""
        from compression.attribution import OwnRepliesConfig, safety_calibration, utility_calibration

        if kind not in self._own_replies:
            cfg = OwnRepliesConfig(n_samples=self.cfg.calib_samples, max_new_tokens=min(64, self.cfg.max_new_tokens), seed=self.cfg.seed)
            make = safety_calibration if kind == "safety" else utility_calibration
            self._own_replies[kind] = make(self.base.model, self.base.tokenizer, cfg)
        return self._own_replies[kind]

    def responses(self):
        """(instruction, own greedy response) pairs for gradient-based scores (SNIP), generated once."""
        if self._responses is None:
            cfg = ResponseCalibrationConfig(n_samples=self.cfg.calib_samples, max_new_tokens=min(64, self.cfg.max_new_tokens), seed=self.cfg.seed)
            self._responses = response_calibration_set(self.base.model, self.base.tokenizer, cfg)
        return self._responses

    def direction_prompts(self) -> tuple[list[str], list[str]]:
        """The instructions every model's candidate directions are computed on.

        With selection on, these are the original's filtered train sets, so the original's
        candidates are exactly the ones its selection chose from and every variant is compared on
        the same prompts; otherwise a seeded unfiltered sample.
        """
        if self._original_selection is not None:
            p = self._original_selection.prompts
            return p["harmful_train"], p["harmless_train"]
        n, seed = self.cfg.n_train, self.cfg.seed
        return (
            datasets.sample(datasets.instructions("harmful", "train"), n, seed),
            datasets.sample(datasets.instructions("harmless", "train"), n, seed),
        )

    def selection_config(self) -> SelectionConfig:
        c = self.cfg
        return SelectionConfig(n_train=c.n_train, n_val=c.n_val, seed=c.seed, search=c.search,
                               prescreen_n_val=c.prescreen_n_val, prescreen_keep=c.prescreen_keep, batch_size=c.batch_size or 32)

    def val_prompts(self) -> tuple[list[str], list[str]]:
        """One unfiltered validation sample, shared by every variant so quality numbers compare."""
        n, seed = self.cfg.n_val, self.cfg.seed
        return (datasets.sample(datasets.instructions("harmful", "val"), n, seed),
                datasets.sample(datasets.instructions("harmless", "val"), n, seed))

    # --- per-variant stages --------------------------------------------------------------
    def variant_model(self, spec: VariantSpec):
        """The variant's model: built once, saved as a checkpoint, reloaded on later runs."""
        if spec.method == "original":
            return self.base.model
        ckpt = self.dir / "variants" / spec.slug / "model"
        params = self.variant_params(spec)
        manifest = read_manifest(ckpt)
        if self.reusable(spec, manifest, params):
            _log(f"{spec.text}: reusing checkpoint {ckpt}")
            return load_model(str(ckpt), dtype=self.cfg.dtype).model
        _log(f"{spec.text}: building")
        model, removal, seconds = self.build(spec)
        if self.cfg.save_checkpoints:
            save_variant(model, self.base.tokenizer, ckpt, dict(
                method=spec.method, spec=spec.text, params=params, build_seconds=seconds, removal=removal,
                calibration_sha256=self.calibration_digests(spec),
                calibration=self.calibration().description if spec.needs_calibration else None,
                base_model=self.cfg.model, base_fingerprint=self.fingerprint(),
            ))
        return model

    def reusable(self, spec: VariantSpec, manifest: dict | None, params: dict) -> bool:
        """Whether a saved variant was built by the same method from the same base and calibration.

        The prompt calibration is cheap to rebuild, so its digest is compared, which also catches a
        change in how it is made; the model's own replies (SNIP, set difference) would cost minutes
        of generation, so for them the settings in `params` stand in.
        """
        if manifest is None or manifest.get("params") != params or manifest.get("base_fingerprint") != self.fingerprint():
            return False
        if spec.needs_calibration:
            cal = self.calibration()
            if manifest.get("calibration_sha256", {}).get("prompts") != cal.digest or manifest.get("calibration") != cal.description:
                return False
        return True

    def build(self, spec: VariantSpec):
        """(variant model, what the method removed, seconds): built from the base model, never saved.

        Calibration and own replies are generated once per run; importance scores are cached in
        <run>/scores. experiments.brittleness builds its sweep points through this too.
        """
        start = time.perf_counter()
        model, removal = build_variant_with_report(
            self.base.model, spec,
            self.calibration() if spec.needs_calibration else None,
            responses=self.responses() if spec.needs_responses else None,
            safety=self.own_replies("safety") if spec.needs_safety else None,
            utility=self.own_replies("utility") if spec.needs_utility else None,
            scores_dir=self.dir / "scores",
        )
        return model, removal, time.perf_counter() - start

    def calibration_digests(self, spec: VariantSpec) -> dict:
        """SHA-256 of every calibration set the variant was built from, by role."""
        out = {}
        if spec.needs_calibration:
            out["prompts"] = self.calibration().digest
        if spec.needs_responses:
            out["responses"] = self.responses().digest
        if spec.needs_safety:
            out["safety"] = self.own_replies("safety").digest
        if spec.needs_utility:
            out["utility"] = self.own_replies("utility").digest
        return out

    def variant_params(self, spec: VariantSpec) -> dict:
        params = dict(spec.params)
        if spec.needs_calibration or spec.needs_responses or spec.needs_safety or spec.needs_utility:
            params.update(calib_samples=self.cfg.calib_samples, seed=self.cfg.seed)
        if spec.needs_calibration and (self.cfg.calib_source, self.cfg.calib_seqlen) != (CompareConfig.calib_source, CompareConfig.calib_seqlen):
            # Only when not the defaults, so runs cached before these settings existed stay valid.
            params.update(calib_source=self.cfg.calib_source, calib_seqlen=self.cfg.calib_seqlen)
        if spec.needs_responses or spec.needs_safety or spec.needs_utility:
            params.update(response_tokens=min(64, self.cfg.max_new_tokens))
        return params

    def model_id(self, spec: VariantSpec, model) -> str:
        """The weight fingerprint that keys the variant's measurements (the same one python -m repair
        computes for the saved checkpoint, so the repair stage reuses them)."""
        return self.fingerprint() if spec.method == "original" else model_fingerprint(model)

    def evaluate(self, spec: VariantSpec, model) -> dict:
        cfg, tok = self.cfg, self.base.tokenizer
        vdir = self.dir / "variants" / spec.slug
        key = dict(variant=spec.text, params=self.variant_params(spec), base=self.fingerprint())
        mid, store = self.model_id(spec, model), cfg.store()

        asr = measure(model, tok, cfg.eval_config(), store, mid)
        over = measure(model, tok, cfg.harmless_config(), store, mid)
        pcfg = PerplexityConfig(windows=cfg.ppl_windows, seqlen=cfg.ppl_seqlen)
        ppl = measured(store, "perplexity", mid, [pcfg], lambda: timed(lambda: measure_perplexity(model, tok, pcfg)))
        if cfg.zero_shot_limit:
            from lm.zero_shot import ZeroShotConfig, zero_shot_accuracy

            zcfg = ZeroShotConfig(tasks=cfg.zero_shot_tasks, limit=cfg.zero_shot_limit)
            zs = measured(store, "zero_shot", mid, [zcfg], lambda: zero_shot_accuracy(model, tok, zcfg))
        selection = None
        if cfg.select and spec.method == "original":
            selection = self._original_selection = select_direction_cached(
                model, tok, vdir / "selection", self.selection_config(), fingerprint=json.dumps(key, sort_keys=True))
        harmful, harmless = self.direction_prompts()
        dirs = cached_tensors(vdir / "directions.safetensors", {**key, "prompts": _digest(harmful + ["\0"] + harmless)},
                              lambda: candidate_directions(model, tok, harmful, harmless))
        if cfg.select and spec.method != "original" and cfg.select_variants:
            # On the original's filtered prompts (whose candidates are `dirs`): a different source
            # then means different weights, not a different set of prompts the variant still refuses.
            ref = self._original_selection
            shared = SharedPrompts(ref.prompts, dirs["directions"]) if ref is not None and ref.prompts else None
            selection = select_direction_cached(model, tok, vdir / "selection", self.selection_config(),
                                                fingerprint=json.dumps(key, sort_keys=True), shared=shared)
        out = dict(asr=asr, harmless=over, perplexity=ppl, directions=dirs, sparsity=sparsity_report(model), model_id=mid)
        if cfg.probes:
            out["probes"] = self.probes(spec, model, key, harmful, harmless)
        if cfg.zero_shot_limit:
            out["zero_shot"] = zs
        if selection is not None:
            out["selection"] = selection
        return out

    def probes(self, spec: VariantSpec, model, key: dict, harmful: list[str], harmless: list[str]) -> dict[str, torch.Tensor]:
        """Harmfulness probes fitted on the direction prompts, per-prompt correctness on the held-out
        ASR / over-refusal prompts, and the original's probes on this model's activations (transfer)."""
        cfg, tok = self.cfg, self.base.tokenizer
        test = [[p.text for p in c.prompts()] for c in (cfg.eval_config(), cfg.harmless_config())]
        pcfg = ProbeConfig(seed=cfg.seed)
        ref = self._original_probes
        pkey = {**key, "train": _digest(harmful + ["\0"] + harmless), "test": _digest(test[0] + ["\0"] + test[1]),
                "probe": dataclasses.asdict(pcfg), "original_probes": None if ref is None else ref["key"]}

        def compute():
            sets = dict(harmful_train=harmful, harmless_train=harmless, harmful_test=test[0], harmless_test=test[1])
            acts = {name: prompt_activations(model, tok, texts, cfg.batch_size or 16, desc=f"probe activations ({name})")
                    for name, texts in sets.items()}
            params = probe_parameters(fit_probe_grid(acts["harmful_train"], acts["harmless_train"], pcfg))
            out = dict(params, own_correct=correct(params, acts["harmful_test"], acts["harmless_test"]))
            if ref is not None:
                out["transfer_correct"] = correct(ref["params"], acts["harmful_test"], acts["harmless_test"])
            return out

        result = cached_tensors(self.dir / "variants" / spec.slug / "probes.safetensors", pkey, compute)
        if spec.method == "original":
            self._original_probes = dict(params={k: result[k] for k in PROBE_PARAMETERS}, key=_digest([json.dumps(pkey, sort_keys=True)]))
        return result

    def cross_evaluate(self, spec: VariantSpec, model, own: dict, original: dict) -> dict:
        """The original's direction inside the variant and the variant's inside the original."""
        cfg, tok = self.cfg, self.base.tokenizer
        vdir = self.dir / "variants" / spec.slug
        ref = original["selection"]
        if ref.chosen is None:
            return {}
        harmful, harmless = self.val_prompts()
        ids = refusal_tokens(tok)
        key = dict(variant=spec.text, params=self.variant_params(spec), base=self.fingerprint(), n_val=cfg.n_val,
                   seed=cfg.seed, original_source=list(ref.chosen))

        def quality(m, vec, layer):
            return direction_quality(m, tok, vec, layer, harmful, harmless, ids, cfg.batch_size or 32).to_json()

        out = dict(original_direction=cached_json(vdir / "quality_original_direction.json", key,
                                                  lambda: quality(model, ref.direction_raw, ref.chosen[1])))
        sel = own.get("selection")
        if spec.method != "original" and sel is not None and sel.chosen is not None:
            out["own_direction"] = cached_json(vdir / "quality_own_direction.json", {**key, "source": list(sel.chosen)},
                                               lambda: quality(model, sel.direction_raw, sel.chosen[1]))
            out["own_direction_in_original"] = cached_json(vdir / "quality_own_direction_in_original.json", {**key, "source": list(sel.chosen)},
                                                           lambda: quality(self.base.model, sel.direction_raw, sel.chosen[1]))
        if cfg.n_ablation_asr:
            from lm.hooks import intervene

            # The direction was fitted on train prompts and chosen on val ones: the ASR with it
            # ablated is measured on the held-out sets like every other ASR.
            ablated_id = dict(model=own["model_id"], ablate=_digest([repr(ref.direction_raw.tolist())]))
            with intervene(model, ablate=ref.direction_raw):
                out["asr_original_direction_ablated"] = measure(model, tok, cfg.eval_config(cfg.n_ablation_asr), cfg.store(), ablated_id)
        return out

    # --- the whole job -------------------------------------------------------------------
    def run(self) -> dict:
        self.dir.mkdir(parents=True, exist_ok=True)
        clock = RunClock(self.dir / "invocations.json")
        atomic_write_json(self.dir / "config.json", dataclasses.asdict(self.cfg))
        results = {}
        for spec in self.specs:
            model = self.variant_model(spec)
            _log(f"{spec.text}: evaluating")
            r = self.evaluate(spec, model)
            if self.cfg.select:
                r["cross"] = self.cross_evaluate(spec, model, r, results.get("original", (None, r))[1])
            results[spec.slug] = (spec, r)
            if model is not self.base.model:
                del model
            clock.tick()
        report = self.summarise(results, clock.seconds)
        if self.cfg.repair:
            report["repairs"] = self.repair(results, report, clock)
            report["wall_seconds"] = clock.seconds
        clock.tick(finished=True)
        report.update(clock.summary())
        figs = self.make_figures(results, report)
        report["figures"] = self.save_figures(figs)
        atomic_write_json(self.dir / "report.json", report)
        markdown_text = render_markdown(report)
        atomic_write_text(self.dir / "report.md", markdown_text)
        atomic_write_text(self.dir / "report.html", render_html(markdown_text, figs, report["model_name"]))
        if self.cfg.figures_dir:
            for line in self.export_figures(figs):
                _log(line)
        _log(f"report: {self.dir / 'report.md'}")
        return report

    def repair(self, results: dict, report: dict, clock: RunClock) -> dict:
        """AIRD + targeted repair of every saved variant whose direction changed at the original's source."""
        from repair.pipeline import Repair, RepairConfig

        ref = results["original"][1].get("selection")
        if ref is None or ref.chosen is None or not self.cfg.save_checkpoints:
            _log("repair skipped: it needs the original's selected direction and saved variant checkpoints")
            return {}
        c, out = self.cfg, {}
        for row in report["variants"][1:]:
            cos = row.get("cosine_at_original_source")
            if cos is None or cos >= c.repair_below:
                continue
            spec, own = next((s, r) for s, r in results.values() if s.text == row["variant"])
            vdir = self.dir / "variants" / spec.slug
            _log(f"{spec.text}: repairing (cosine at the original's source {cos:.3f})")
            rcfg = RepairConfig(original=c.model, compressed=str(vdir / "model"), out=str(vdir / "repaired"), runs_dir=str(self.dir / "repair"),
                                dtype=c.dtype, seed=c.seed, n_train=c.n_train, n_val=c.n_val, search=c.search,
                                prescreen_n_val=c.prescreen_n_val, prescreen_keep=c.prescreen_keep, n_asr=c.repair_n_asr,
                                eval_sets=c.eval_sets, harmless_sets=c.harmless_sets, n_harmless=c.n_harmless,
                                curve_n_asr=c.repair_curve_n_asr, measurements_dir=str(c.store()),
                                max_new_tokens=c.repair_max_new_tokens, adv_suffix=c.repair_adv_suffix,
                                curve_fractions=tuple(c.repair_curve_fractions), ppl_windows=c.ppl_windows, ppl_seqlen=c.ppl_seqlen,
                                zero_shot_limit=c.zero_shot_limit, zero_shot_tasks=tuple(c.zero_shot_tasks), batch_size=c.batch_size,
                                select_compressed=c.select_variants)
            out[row["variant"]] = Repair(rcfg, original=self.base, selection=ref, own_selection=own.get("selection")).run()
            clock.tick()
        return out

    def make_figures(self, results: dict, report: dict) -> dict:
        """Plotly figures of the comparison: behaviour, per-layer cosines and, with selection, the direction."""
        figs = {"asr": asr_figure(report), "cosine_per_layer": cosine_per_layer_figure(report)}
        if any(v.get("probes") for v in report["variants"]):
            figs["probe_transfer"] = probe_transfer_figure(report)
            cell = report["probe_cell"]
            accuracy = {v["variant"]: torch.tensor([[a["value"] for a in row] for row in v["probes"]["own_map"]])
                        for v in report["variants"] if v.get("probes")}
            figs["probe_accuracy_maps"] = cosine_heatmaps_figure(
                accuracy, report["positions"], (cell["position"], cell["layer"]),
                "Held-out accuracy of each model's own harmfulness probes (x: the probe cell)", value="accuracy", zrange=(0.5, 1),
                colorscale="Viridis", reverse=False)
        if report.get("repairs"):
            from repair.report import before_after_figure, curve_figure, file_slug

            for variant, r in report["repairs"].items():
                figs[f"repair_{file_slug(variant)}"] = before_after_figure(r, f"AIRD before/after: {variant}")
            figs["repair_curve"] = curve_figure(report["repairs"])
        ref = results["original"][1].get("selection")
        if ref is None:
            return figs
        figs["score_maps_original"] = score_maps_figure(ref)
        maps = {v["variant"]: torch.tensor(v["cosine_to_original_direction"]) for v in report["variants"] if "cosine_to_original_direction" in v}
        if not maps:  # the original has no selected direction: nothing to compare against
            return figs
        figs["cosine_maps"] = cosine_heatmaps_figure(maps, ref.positions, ref.chosen,
                                                     "Cosine of each variant's candidate directions to the original's chosen direction")
        # Only variants whose selection ran: a None source then means nothing passed the filters.
        sources = {v["variant"]: (v["source"]["position"], v["source"]["layer"]) if v.get("source") else None
                   for v in report["variants"] if v.get("source_shift") is not None}
        if len(sources) > 1:  # the original's source alone shifts nothing
            title = ("Chosen refusal-direction source per variant<br><sup>pos: post-instruction token (-1 = the last prompt token); "
                     "every variant selected on the original's filtered prompts</sup>")
            figs["source_shift"] = source_shift_figure(sources, report["n_layers"], title, reference=report["variants"][0]["variant"])
        figs["quality"] = quality_bars_figure([dict(variant=v["variant"], **(v.get("quality") or {})) for v in report["variants"]],
                                              "Direction quality: each variant's own direction vs the original's direction inside it")
        return figs

    def export_figures(self, figs: dict) -> list[str]:
        """Copy the figures to --figures-dir as HTML and, when a browser for kaleido is there, PNG."""
        from experiments.figures import export

        return export(figs, Path(self.cfg.figures_dir))

    def save_figures(self, figs: dict) -> dict:
        """Each figure as a standalone HTML file in <run>/figures/ (plotly.js written once beside them)."""
        fig_dir = self.dir / "figures"
        fig_dir.mkdir(parents=True, exist_ok=True)
        write_plotlyjs(fig_dir)
        written = {}
        for name, fig in figs.items():
            path = fig_dir / f"{name}.html"
            atomic_write_text(path, fig.to_html(include_plotlyjs="directory", full_html=True))
            written[name] = str(path.relative_to(self.dir))
        return written

    def summarise(self, results: dict, seconds: float) -> dict:
        original = results["original"][1]
        ref_dirs = original["directions"]["directions"]
        ref_ppl = original["perplexity"]["perplexity"]
        post = post_instruction(self.base.tokenizer)
        ref_sel = original.get("selection")
        if ref_sel is not None and ref_sel.chosen is not None:
            cell, cell_kind = (list(post.positions).index(ref_sel.chosen[0]), ref_sel.chosen[1]), "the original's selected source"
        else:
            cell, cell_kind = (len(post.positions) - 1, norm_peak(ref_dirs)), "the original's norm-peak layer at the last position (no selected source)"
        rows = []
        for slug, (spec, r) in results.items():
            dirs = r["directions"]["directions"]
            cos = cosine_map(dirs, ref_dirs)  # [position, layer]
            asr = r["asr"]
            ppl = r["perplexity"]["perplexity"]
            verdict = collapse_verdict(asr["completions"], ppl, ref_ppl)
            tests = None if slug == "original" else dict(
                asr={j: paired(asr, original["asr"], j) for j in JUDGES},
                over_refusal={j: paired(r["harmless"], original["harmless"], j, "refused") for j in JUDGES})
            peak = norm_peak(dirs)
            ref_peak = norm_peak(ref_dirs)
            rows.append(dict(
                variant=spec.text,
                method=spec.method,
                params=spec.params,
                decoder_sparsity=r["sparsity"]["decoder_linear_sparsity"],
                zero_shot=zero_shot_summary(r["zero_shot"]) if "zero_shot" in r else None,
                asr=asr["asr"],
                n_prompts=asr["n_prompts"],
                rates=dict(asr=asr["rates"]["asr"], over_refusal=r["harmless"]["rates"]["refusal"],
                           per_source={s: v["asr"] for s, v in asr["rates"]["per_source"].items()},
                           judge_disagreement=asr["rates"]["judge_disagreement"]),
                tests=tests,
                perplexity=ppl,
                perplexity_ci=perplexity_rate(r["perplexity"]),
                collapse=verdict.to_json(),
                norm_peak_layer=peak,
                cosine_at_original_peak=float(cos[-1, ref_peak]),
                cosine_per_layer_last_position=[round(float(c), 4) for c in cos[-1]],
                cosine_map=[[round(float(c), 4) for c in row] for row in cos],
                direction_norm_last_position=[round(float(n), 3) for n in dirs[-1].norm(dim=-1)],
                samples=[dict(goal=rec["prompt"], source=rec["source"], completion=rec["completions"][0]) for rec in asr["records"][:3]],
                seconds=dict(asr=r["asr"].get("seconds"), harmless=r["harmless"].get("seconds"), perplexity=r["perplexity"].get("seconds")),
                probes=summarise_probes(r["probes"], original["probes"], dirs, cell) if "probes" in r else None,
                **_direction_summary(r, original),
            ))
        correct_families(rows)
        return dict(
            model=self.cfg.model,
            model_name=self.base.name,
            evaluation=evaluation_summary(original["asr"], original["harmless"], len(rows) - 1),
            findings=findings(rows),
            base_fingerprint=self.fingerprint(),
            config=dataclasses.asdict(self.cfg),
            post_instruction_tokens=post.text,
            positions=post.positions,
            n_layers=int(ref_dirs.shape[1]),
            probe_cell=dict(position=post.positions[cell[0]], layer=cell[1], kind=cell_kind),
            wall_seconds=round(seconds, 1),
            variants=rows,
        )


def _source(selection) -> dict | None:
    if selection is None or selection.chosen is None:
        return None
    return dict(position=selection.chosen[0], layer=selection.chosen[1])


def _direction_summary(r: dict, original: dict) -> dict:
    """Source, cosine map against the original's chosen direction, quality and cross-application."""
    ref = original.get("selection")
    if ref is None or ref.chosen is None:
        return {}
    sel, cross = r.get("selection"), r.get("cross", {})
    cos = cosine_to_direction(r["directions"]["directions"], ref.direction)
    i = ref.positions.index(ref.chosen[0])
    own = cross.get("own_direction") if sel is not ref else cross.get("original_direction")
    ablated = cross.get("asr_original_direction_ablated")
    ref_ablated = original.get("cross", {}).get("asr_original_direction_ablated")
    return dict(
        source=_source(sel),
        source_shift=source_shift(ref.chosen, sel.chosen if sel is not None else None) if sel is not None else None,
        selection_forward_passes=sel.forward_passes.get("total") if sel is not None else None,
        cosine_to_original_direction=[[round(float(c), 4) for c in row] for row in cos],
        cosine_at_original_source=float(cos[i, ref.chosen[1]]),
        quality=dict(own=own, original_direction=cross.get("original_direction"), own_direction_in_original=cross.get("own_direction_in_original")),
        asr_original_direction_ablated=None if ablated is None else dict(
            asr=ablated["asr"], n_prompts=ablated["n_prompts"], rates=ablated["rates"]["asr"],
            # Ablation against no ablation in the same model, on the same prompts.
            test=None if _first_n(r["asr"], ablated) is None else {j: paired(ablated, _first_n(r["asr"], ablated), j) for j in JUDGES},
            vs_original_ablated=None if ref_ablated is None or r is original else {j: paired(ablated, ref_ablated, j) for j in JUDGES}),
    )


def _first_n(full: dict, subset: dict) -> dict:
    """`full` restricted to the prompts of `subset` (the ablation ASR runs on the first prompts of each set)."""
    ids = {rec["id"] for rec in subset["records"]}
    kept = [rec for rec in full["records"] if rec["id"] in ids]
    return dict(full, records=kept) if len(kept) == len(ids) else None


def zero_shot_summary(z: dict) -> dict:
    rates = zero_shot_rates(z) or {}
    return dict(average=z["average"], limit=z.get("limit"), rate=rates.get("average"), per_task=rates.get("per_task"))


def correct_families(rows: list[dict]) -> None:
    """Holm within each family: one family per judge and measure (ASR, over-refusal), over the variants."""
    for measure_name in ("asr", "over_refusal"):
        for j in JUDGES:
            family = [row["tests"][measure_name][j] for row in rows if row.get("tests") and row["tests"][measure_name][j]]
            if family:
                add_holm(family)
    for name in ("own", "transfer"):
        family = [row["probes"]["tests"][name] for row in rows if (row.get("probes") or {}).get("tests")]
        if family:
            add_holm(family)


def evaluation_summary(harmful: dict, harmless: dict, family_size: int) -> dict:
    return dict(harmful=describe_prompts(harmful, family_size), harmless=describe_prompts(harmless, family_size), judges=list(JUDGES))


def findings(rows: list[dict]) -> list[str]:
    """The report's sentences, one per variant and measure, each a change only where the test says so."""
    out, original = [], rows[0]
    for row in rows[1:]:
        for measure_name, what in (("asr", "ASR (Arditi judge)"), ("over_refusal", "Over-refusal (Arditi judge)")):
            test = (row.get("tests") or {}).get(measure_name, {}).get("arditi2024")
            if test:
                a, b = original["rates"][measure_name]["arditi2024"], row["rates"][measure_name]["arditi2024"]
                out.append(f"{row['variant']}: " + describe_change("original", row["variant"], a, b, _flip(test), what))
        probes = row.get("probes") or {}
        if probes.get("tests"):
            base = original["probes"]["own"]
            out.append(f"{row['variant']}: " + describe_change("original", row["variant"], base, probes["transfer"], _flip(probes["tests"]["transfer"]),
                                                               "held-out accuracy of the original's harmfulness probe"))
    return out


def _flip(test: dict) -> dict:
    """A test of (variant, original) read as (original, variant): b and c swap, p stays."""
    return dict(test, b=test["c"], c=test["b"])


def _digest(texts: list[str]) -> str:
    import hashlib

    return hashlib.sha256("\n".join(texts).encode()).hexdigest()




def parse_args(argv=None) -> CompareConfig:
    p = argparse.ArgumentParser(prog="python -m experiments.compare_refusal", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="embedded", help="'embedded', a hub id, a local safetensors directory, or a .gguf file")
    p.add_argument("--variants", nargs="+", default=None, help=f"variant specs (default: {' '.join(DEFAULT_VARIANTS)}); e.g. wanda:0.6 wanda:2:4 magnitude:0.5 rtn:int4:g32")
    p.add_argument("--name", default=None, help="run directory name (default compare-<model>)")
    p.add_argument("--runs-dir", default="runs")
    p.add_argument("--quick", action="store_true", help="CI-sized run: few prompts, short generations")
    add_eval_arguments(p, n_asr=CompareConfig.n_asr, n_harmless=CompareConfig.n_harmless)
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--n-train", type=int)
    p.add_argument("--ppl-windows", type=int)
    p.add_argument("--ppl-seqlen", type=int)
    p.add_argument("--calib-samples", type=int, help="calibration samples (default 128)")
    p.add_argument("--calib-source", choices=["harmless", TEXT_SOURCE],
                   help="Wanda / SparseGPT / GPTQ calibration: harmless instructions (default) or wikitext text windows")
    p.add_argument("--calib-seqlen", type=int, help="calibration tokens per sample (default 256)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--no-checkpoints", action="store_true", help="do not save variant checkpoints")
    p.add_argument("--figures-dir", help="also export the figures here as HTML and PNG (e.g. figures/)")
    p.add_argument("--no-selection", action="store_true", help="skip refusal-direction selection (and everything built on it)")
    p.add_argument("--select-variants", action=argparse.BooleanOptionalAction, default=None,
                   help="select every variant's own direction too, on the original's prompts (default: on)")
    p.add_argument("--n-val", type=int, help="validation prompts per class for selection (default 32)")
    p.add_argument("--search", choices=["exhaustive", "lazy"], help="selection search (default lazy: same choice, fewer passes)")
    p.add_argument("--prescreen", type=int, help="prescreen candidates on this many harmful prompts (0 = off; default 8)")
    p.add_argument("--n-ablation-asr", type=int, help="prompts of each evaluation set generated with the original's direction ablated (default 16)")
    p.add_argument("--zero-shot-limit", type=int, help="zero-shot documents per task (0 = skip; default 200 on GPU, 24 on CPU)")
    p.add_argument("--zero-shot-tasks", nargs="+", help="zero-shot tasks, or 'all' (default: all 7 on GPU, boolq rte winogrande arc_easy on CPU)")
    p.add_argument("--probes", action=argparse.BooleanOptionalAction, default=None,
                   help="harmfulness probes per (position, layer) with transfer of the original's to each variant (default: on)")
    p.add_argument("--repair", action=argparse.BooleanOptionalAction, default=None,
                   help="AIRD + targeted repair of every variant whose direction changed (default: on)")
    p.add_argument("--repair-n-asr", type=int, help="prompts of each evaluation set in the repair's evaluation (default: --n-asr)")
    a = p.parse_args(argv)
    overrides = {k: v for k, v in dict(
        model=a.model, variants=tuple(a.variants) if a.variants else None, name=a.name, runs_dir=a.runs_dir,
        n_asr=a.n_asr, max_new_tokens=a.max_new_tokens, n_train=a.n_train, ppl_windows=a.ppl_windows, ppl_seqlen=a.ppl_seqlen,
        calib_samples=a.calib_samples, calib_source=a.calib_source, calib_seqlen=a.calib_seqlen, batch_size=a.batch_size, seed=a.seed, dtype=a.dtype,
        select_variants=a.select_variants, n_val=a.n_val, search=a.search, prescreen_n_val=a.prescreen,
        n_ablation_asr=a.n_ablation_asr, figures_dir=a.figures_dir, zero_shot_limit=a.zero_shot_limit, repair=a.repair,
        zero_shot_tasks=task_names(a.zero_shot_tasks), repair_n_asr=a.repair_n_asr, probes=a.probes,
    ).items() if v is not None}
    overrides.update(eval_overrides(a))
    if a.no_selection:
        overrides["select"] = False
    if a.no_checkpoints:
        overrides["save_checkpoints"] = False
    if a.quick and "name" not in overrides:
        overrides["name"] = "quick-" + Path(a.model).name.replace("/", "-")
    return CompareConfig.quick(**overrides) if a.quick else CompareConfig(**overrides)


@cli
def main(argv=None) -> int:
    cfg = parse_args(argv)
    for v in cfg.variants:
        parse_variant(v)  # fail on a bad spec before loading anything
    Comparison(cfg).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
