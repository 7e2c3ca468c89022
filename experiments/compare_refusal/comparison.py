"""The main job's stages for one base model (experiments.compare_refusal): build or reuse each
variant, evaluate it through refusal.measure, extract and select its directions, probe it,
cross-apply the original's direction, then report and repair. Every stage is cached in the run
directory, so an interrupted run resumes where it stopped."""

from __future__ import annotations

import dataclasses
import json
import sys

import torch

from compression.builder import BuildSettings, VariantBuilder
from compression.checkpoint import sparsity_report
from compression.variants import VariantSpec, parse_variant, validate_variant
from lm import datasets
from lm.cache import (
    RunClock,
    atomic_write_json,
    atomic_write_text,
    cached_json,
    cached_tensors,
    sweep_temporaries,
)
from lm.errors import UserError
from lm.loading import load_model, model_fingerprint
from lm.progress import JobProgress
from refusal.behaviour import measure_behaviour
from refusal.direction import candidate_directions
from refusal.judge_spec import judge_panel
from refusal.measure import measure
from refusal.probes import ProbeConfig
from refusal.probing import fitted_probe_parameters, harmfulness_probes, refusal_prediction_probes, training_prompts
from refusal.quality import direction_quality
from refusal.score import refusal_tokens
from refusal.select import SelectionConfig, SelectionResult, SharedPrompts
from refusal.selection_artifacts import select_direction_cached

from .config import CompareConfig
from .figures import export_figures, make_figures, save_figures
from .repairs import repair_variants
from .report import render_html, render_markdown
from .summary import summarise_comparison


def _log(msg: str) -> None:
    print(f"[compare_refusal] {msg}", file=sys.stderr, flush=True)


@dataclasses.dataclass(frozen=True)
class FittedProbes:
    """A model's fitted probe parameters and the digest of the cache key they were fitted under
    (a variant's cached transfer result names the probes it read)."""

    params: dict[str, torch.Tensor] | None
    key: str


@dataclasses.dataclass(frozen=True)
class OriginalReference:
    """What every variant's evaluation reads from the original's: its selection (the filtered
    prompts all directions are computed on, the chosen direction) and its fitted probes, whose
    transfer to the variant is measured. Passed to each variant's evaluation as an argument, so a
    variant's result depends on nothing but its inputs."""

    selection: SelectionResult | None = None
    probes: FittedProbes | None = None
    refusal_probes: FittedProbes | None = None


class Comparison:
    """Runs the stages for one base model; every stage is cached in the run directory."""

    def __init__(self, cfg: CompareConfig):
        self.cfg = cfg
        self.specs = [parse_variant("original")] + [parse_variant(v) for v in cfg.variants]
        slugs = [s.slug for s in self.specs]
        if len(set(slugs)) != len(slugs):
            raise UserError(f"duplicate variants in {list(cfg.variants)}")
        self.dir = cfg.run_dir()
        self.judges = judge_panel(cfg.judges)  # None without --judges: the keyword judges alone
        self.base = load_model(cfg.model, dtype=cfg.dtype)
        for spec in self.specs:
            validate_variant(spec, self.base.model)
            if (
                spec.method == "path"
            ):  # a checkpoint made elsewhere must come from this base model, as the repair demands
                self.check_derives(spec)
        self.builder = VariantBuilder(
            self.base,
            BuildSettings(cfg.model, cfg.calibration_config(), min(64, cfg.max_new_tokens), cfg.dtype),
            self.dir / "scores",
        )
        self.progress = JobProgress("compare_refusal", [], [])  # run() replaces it with the job's plan

    def check_derives(self, spec: VariantSpec) -> None:
        from repair.derivation import derivation_records

        try:
            derivation_records(self.base, load_model(spec.params["path"], dtype=self.cfg.dtype))
        except UserError as e:
            raise UserError(f"variant {spec.text!r}: {e}") from None

    # --- shared inputs -------------------------------------------------------------------
    def fingerprint(self) -> str:
        return self.builder.fingerprint()

    def direction_prompts(self, selection: SelectionResult | None) -> tuple[list[str], list[str]]:
        """The instructions every model's candidate directions are computed on.

        With selection on, these are the original's filtered train sets, so the original's
        candidates are exactly the ones its selection chose from and every variant is compared on
        the same prompts; otherwise a seeded unfiltered sample.
        """
        if selection is not None:
            p = selection.prompts
            return p["harmful_train"], p["harmless_train"]
        n, seed = self.cfg.n_train, self.cfg.seed
        return (
            datasets.sample(datasets.instructions("harmful", "train"), n, seed),
            datasets.sample(datasets.instructions("harmless", "train"), n, seed),
        )

    def selection_config(self) -> SelectionConfig:
        c = self.cfg
        return SelectionConfig(
            n_train=c.n_train,
            n_val=c.n_val,
            seed=c.seed,
            search=c.search,
            prescreen_n_val=c.prescreen_n_val,
            prescreen_keep=c.prescreen_keep,
            batch_size=c.batch_size or 32,
        )

    def val_prompts(self) -> tuple[list[str], list[str]]:
        """One unfiltered validation sample, shared by every variant so quality numbers compare."""
        n, seed = self.cfg.n_val, self.cfg.seed
        return (
            datasets.sample(datasets.instructions("harmful", "val"), n, seed),
            datasets.sample(datasets.instructions("harmless", "val"), n, seed),
        )

    # --- per-variant stages --------------------------------------------------------------
    def variant_model(self, spec: VariantSpec):
        """The variant's model: built once, saved as a checkpoint, reloaded on later runs."""
        ckpt = self.dir / "variants" / spec.slug / "model"
        return self.builder.checkpointed(spec, ckpt, save=self.cfg.save_checkpoints, log=_log)

    def model_id(self, spec: VariantSpec, model) -> str:
        """The weight fingerprint that keys the variant's measurements (the same one python -m repair
        computes for the saved checkpoint, so the repair stage reuses them)."""
        return self.fingerprint() if spec.method == "original" else model_fingerprint(model)

    def evaluate(
        self, spec: VariantSpec, model, reference: OriginalReference | None
    ) -> tuple[dict, OriginalReference | None]:
        """(the model's results, and for the original the reference every variant is then evaluated
        against); `reference` is None for the original itself."""
        cfg, tok = self.cfg, self.base.tokenizer
        ref = reference or OriginalReference()
        vdir = self.dir / "variants" / spec.slug
        key = dict(variant=spec.text, params=self.builder.params(spec), base=self.fingerprint())
        mid, store = self.model_id(spec, model), cfg.store()

        step = lambda kind: self.progress.stage(spec.text, kind)  # noqa: E731 - one line per stage (lm.progress)

        behaviour = measure_behaviour(model, tok, cfg.behaviour_config(), store, mid, self.judges, step)
        asr, over, ppl, zs = behaviour.asr["vanilla"], behaviour.harmless, behaviour.perplexity, behaviour.zero_shot
        selection = None
        if cfg.select and spec.method == "original":
            with step("selection"):
                selection = select_direction_cached(
                    model, tok, vdir / "selection", self.selection_config(), fingerprint=json.dumps(key, sort_keys=True)
                )
        harmful, harmless = self.direction_prompts(selection if reference is None else ref.selection)
        with step("directions"):
            dirs = cached_tensors(
                vdir / "directions.safetensors",
                {**key, "prompts": _digest(harmful + ["\0"] + harmless)},
                lambda: candidate_directions(model, tok, harmful, harmless),
            )
        if cfg.select and spec.method != "original" and cfg.select_variants:
            # On the original's filtered prompts (whose candidates are `dirs`): a different source
            # then means different weights, not a different set of prompts the variant still refuses.
            orig = ref.selection
            shared = SharedPrompts(orig.prompts, dirs["directions"]) if orig is not None and orig.prompts else None
            with step("selection"):
                selection = select_direction_cached(
                    model,
                    tok,
                    vdir / "selection",
                    self.selection_config(),
                    fingerprint=json.dumps(key, sort_keys=True),
                    shared=shared,
                )
        out = dict(
            asr=asr, harmless=over, perplexity=ppl, directions=dirs, sparsity=sparsity_report(model), model_id=mid
        )
        probes = refusal_probes = None
        if cfg.probes:
            with step("harmfulness probes"):
                out["probes"], probes = self.probes(spec, model, key, harmful, harmless, ref.probes)
            if cfg.n_refusal_probe:
                with step("refusal-prediction probe"):
                    out["refusal_probes"], refusal_probes = self.refusal_probes(
                        spec, model, key, asr, mid, ref.refusal_probes
                    )
        if zs is not None:
            out["zero_shot"] = zs
        if selection is not None:
            out["selection"] = selection
        if reference is not None:
            return out, None
        return out, OriginalReference(selection, probes, refusal_probes)

    def probes(
        self, spec: VariantSpec, model, key: dict, harmful: list[str], harmless: list[str], ref: FittedProbes | None
    ) -> tuple[dict[str, torch.Tensor], FittedProbes]:
        """Harmfulness probes fitted on the direction prompts, per-prompt correctness on the held-out
        ASR / over-refusal prompts, and the original's probes (`ref`) on this model's activations
        (transfer); with this model's fitted probes."""
        cfg, tok = self.cfg, self.base.tokenizer
        test = [[p.text for p in c.prompts()] for c in (cfg.eval_config(), cfg.harmless_config())]
        pcfg = ProbeConfig(seed=cfg.seed)
        pkey = {
            **key,
            "train": _digest(harmful + ["\0"] + harmless),
            "test": _digest(test[0] + ["\0"] + test[1]),
            "probe": dataclasses.asdict(pcfg),
            "original_probes": None if ref is None else ref.key,
        }

        result = cached_tensors(
            self.dir / "variants" / spec.slug / "probes.safetensors",
            pkey,
            lambda: harmfulness_probes(
                model,
                tok,
                (harmful, harmless),
                (test[0], test[1]),
                pcfg,
                None if ref is None else ref.params,
                cfg.batch_size or 16,
            ),
        )
        return result, FittedProbes(fitted_probe_parameters(result), _digest([json.dumps(pkey, sort_keys=True)]))

    def refusal_probes(
        self, spec: VariantSpec, model, key: dict, asr: dict, model_id, ref: FittedProbes | None
    ) -> tuple[dict[str, torch.Tensor], FittedProbes]:
        """The refusal-prediction probe (refusal.probing): fitted on this model's own verdicts on
        harmful training prompts, scored against its verdicts on the held-out ASR prompts, and the
        original's (`ref`) read on this model; with this model's fitted probe."""
        cfg, tok = self.cfg, self.base.tokenizer
        train = training_prompts(cfg.n_refusal_probe, cfg.seed)
        pcfg = ProbeConfig(seed=cfg.seed)
        rkey = {
            **key,
            "model_id": model_id,
            "train": _digest([p.id for p in train]),
            "test": _digest([r["id"] for r in asr["records"]]),
            "generation": dataclasses.asdict(cfg.eval_config().asr_config()),
            "probe": dataclasses.asdict(pcfg),
            "original_probes": None if ref is None else ref.key,
        }
        result = cached_tensors(
            self.dir / "variants" / spec.slug / "refusal_probes.safetensors",
            rkey,
            lambda: refusal_prediction_probes(
                model,
                tok,
                train,
                cfg.eval_config(),
                cfg.store(),
                model_id,
                asr,
                pcfg,
                None if ref is None else ref.params,
                cfg.batch_size or 16,
            ),
        )
        return result, FittedProbes(fitted_probe_parameters(result), _digest([json.dumps(rkey, sort_keys=True)]))

    def cross_evaluate(self, spec: VariantSpec, model, own: dict, original: dict) -> dict:
        """The original's direction inside the variant and the variant's inside the original."""
        cfg, tok = self.cfg, self.base.tokenizer
        vdir = self.dir / "variants" / spec.slug
        ref = original["selection"]
        if ref.chosen is None:
            return {}
        harmful, harmless = self.val_prompts()
        ids = refusal_tokens(tok)
        key = dict(
            variant=spec.text,
            params=self.builder.params(spec),
            base=self.fingerprint(),
            n_val=cfg.n_val,
            seed=cfg.seed,
            original_source=list(ref.chosen),
        )

        def quality(m, vec, layer):
            return direction_quality(m, tok, vec, layer, harmful, harmless, ids, cfg.batch_size or 32).to_json()

        out = dict(
            original_direction=cached_json(
                vdir / "quality_original_direction.json", key, lambda: quality(model, ref.direction_raw, ref.chosen[1])
            )
        )
        sel = own.get("selection")
        if spec.method != "original" and sel is not None and sel.chosen is not None:
            out["own_direction"] = cached_json(
                vdir / "quality_own_direction.json",
                {**key, "source": list(sel.chosen)},
                lambda: quality(model, sel.direction_raw, sel.chosen[1]),
            )
            out["own_direction_in_original"] = cached_json(
                vdir / "quality_own_direction_in_original.json",
                {**key, "source": list(sel.chosen)},
                lambda: quality(self.base.model, sel.direction_raw, sel.chosen[1]),
            )
        if cfg.n_ablation_asr:
            from lm.hooks import intervene

            # The direction was fitted on train prompts and chosen on val ones: the ASR with it
            # ablated is measured on the held-out sets like every other ASR.
            ablated_id = dict(model=own["model_id"], ablate=_digest([repr(ref.direction_raw.tolist())]))
            with intervene(model, ablate=ref.direction_raw):
                out["asr_original_direction_ablated"] = measure(
                    model, tok, cfg.eval_config(cfg.n_ablation_asr), cfg.store(), ablated_id
                )
        return out

    # --- the whole job -------------------------------------------------------------------
    def stage_plan(self) -> list[tuple[str, str]]:
        """(model, stage kind) of every stage the comparison runs, in order (lm.progress); the
        repairs are added once the comparison has said which variants need one."""
        c, plan = self.cfg, []
        for spec in self.specs:
            kinds = [] if spec.method == "original" else ["model"]
            kinds += ["ASR", "over-refusal", "perplexity"] + (["zero-shot"] if c.zero_shot_limit else [])
            kinds += ["selection"] if c.select and spec.method == "original" else []
            kinds += ["directions"] + (
                ["selection"] if c.select and spec.method != "original" and c.select_variants else []
            )
            kinds += (
                (["harmfulness probes"] + (["refusal-prediction probe"] if c.n_refusal_probe else []))
                if c.probes
                else []
            )
            kinds += (["quality and ablation"] if c.select else []) + ["report"]
            plan += [(spec.text, kind) for kind in kinds]
        return plan + [("the job", "report")]

    def run(self) -> dict:
        # What a killed earlier invocation left half-written goes first (a live one's is kept).
        sweep_temporaries(self.dir)
        sweep_temporaries(self.cfg.store())
        self.dir.mkdir(parents=True, exist_ok=True)
        models = [s.text for s in self.specs]
        with (
            RunClock(self.dir / "invocations.json") as clock,
            JobProgress("compare_refusal", self.stage_plan(), models) as self.progress,
        ):
            atomic_write_json(self.dir / "config.json", dataclasses.asdict(self.cfg))
            self.progress.log(
                f"{len(models)} models at the {self.cfg.size} size, {len(self.progress.plan)} stages before the repairs; "
                f"the report ({self.dir / 'report.md'}) is rewritten after each model"
            )
            results, reference = {}, None
            for spec in self.specs:  # the original first: its reference is every variant's argument
                if spec.method == "original":
                    model = self.variant_model(spec)
                else:
                    with self.progress.stage(spec.text, "model"):
                        model = self.variant_model(spec)
                r, own_reference = self.evaluate(spec, model, reference)
                reference = reference or own_reference
                if self.cfg.select:
                    with self.progress.stage(spec.text, "quality and ablation"):
                        r["cross"] = self.cross_evaluate(spec, model, r, results.get("original", (None, r))[1])
                results[spec.slug] = (spec, r)
                if model is not self.base.model:
                    del model
                clock.tick()
                with self.progress.stage(spec.text, "report", "partial"):
                    self.write_report(self.summary(results, clock), results, partial=True)
            report = self.summary(results, clock)
            if self.cfg.repair:
                report["repairs"] = repair_variants(
                    self.cfg, self.base, self.dir, results, report, clock, self.progress
                )
                report["wall_seconds"] = clock.seconds
            with self.progress.stage("the job", "report"):
                clock.tick(finished=True)
                report.update(clock.summary())
                figs = self.write_report(report, results, partial=False)
        if self.cfg.figures_dir:
            for line in export_figures(figs, self.cfg.figures_dir):
                _log(line)
        _log(f"report: {self.dir / 'report.md'}")
        return report

    def summary(self, results: dict, clock: RunClock) -> dict:
        return summarise_comparison(
            results, self.cfg, self.base.tokenizer, self.base.name, self.fingerprint(), clock.seconds
        )

    def write_report(self, report: dict, results: dict, partial: bool) -> dict:
        """report.md, report.html and the figures (and report.json once the job is done); a partial
        report, written after each model, says how many models it holds. The figures are returned."""
        if partial:
            report = dict(report, partial=dict(models_done=len(results), models=len(self.specs)))
        figs = make_figures(results, report)
        report["figures"] = save_figures(self.dir, figs)
        if not partial:
            atomic_write_json(self.dir / "report.json", report)
        markdown_text = render_markdown(report)
        atomic_write_text(self.dir / "report.md", markdown_text)
        atomic_write_text(self.dir / "report.html", render_html(markdown_text, figs, report["model_name"]))
        return figs


def _digest(texts: list[str]) -> str:
    import hashlib

    return hashlib.sha256("\n".join(texts).encode()).hexdigest()
