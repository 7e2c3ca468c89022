"""The repair job for one compressed checkpoint: diagnose, choose, restore, re-measure, save.

Stages (each cached in the run directory, so a rerun only does what is missing):
  derivation   the checkpoint derives from the original (else a UserError, nothing written)
  selection    the original's refusal direction and source (refusal.select), shared by every
               checkpoint of the same original under <runs>/originals/<fingerprint>/
  directions   the compressed model's difference-of-means directions on the same prompts: cosine
               to the original's at the source, and (optionally) its own selected source
  aird         every candidate block's refusal score / KL / source projection, and the choice
  targeted     attribution scores of every changed weight before the source, and the smallest
               budget whose refusal score reaches AIRD's
  evaluation   ASR on held-out harmful prompts (vanilla and adversarial-suffix, both judges, per
               prompt) and over-refusal on held-out harmless ones, through refusal.measure and
               its shared store; perplexity, zero-shot accuracy, direction quality and cosine for:
               original, compressed, AIRD, targeted; exact McNemar tests of AIRD and targeted
               against the compressed model and of targeted against AIRD (Holm-corrected);
               vanilla ASR along the restored-weights curve of both methods
The repaired checkpoint (AIRD's, or targeted's with save="targeted") and repair.json / repair.md /
figures are written to `out` in one atomic step at the end.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import sys
import time
from pathlib import Path

import torch

from compression.checkpoint import MANIFEST, read_manifest, sparsity_report
from lm.cache import atomic_dir, atomic_write_json, atomic_write_text, cached_json, cached_tensors, measured, timed, write_plotlyjs
from lm.errors import UserError
from lm.hooks import decoder_layers
from lm.loading import load_model, model_fingerprint
from lm.perplexity import PerplexityConfig, measure_perplexity
from refusal.collapse import collapse_verdict
from refusal.measure import EvalConfig, describe_prompts, measure, perplexity_rate, zero_shot_rates
from refusal.direction import candidate_directions, cosine_map
from refusal.probes import ProbeConfig
from refusal.probing import harmfulness_probes, refusal_prediction_probes, training_prompts
from refusal.probing import parameters as probe_params
from refusal.quality import direction_quality
from refusal.select import SelectionConfig, SharedPrompts
from refusal.selection_artifacts import select_direction_cached

from .aird import choose_aird_block
from .comparisons import findings, paired_tests
from .config import RepairConfig
from .derivation import check_derivation, check_same_architecture, checkpoint_name, decoder_linear_names, summarise
from .output import jsonable, unchanged_output
from .probes import summarise_states
from .refusal_probe import RefusalProbe
from .report import before_after_figure, curve_figure, render_markdown
from .restore import block_masks, block_params, count, restore_entries, restored
from .targeted import (
    first_order_scores,
    own_refusal_batches,
    own_refusal_objective,
    projection_objective,
    prompt_batches,
    refusal_objective,
    search_budget,
    top_masks,
)


def _log(msg: str) -> None:
    print(f"[repair] {msg}", file=sys.stderr, flush=True)


def _key(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Repair:
    """One compressed checkpoint's repair. `original` (a LoadedModel) and `selection` (the original's
    SelectionResult) may be passed in by a caller that already has them, e.g. the main job."""

    def __init__(self, cfg: RepairConfig, original=None, selection=None, own_selection=None):
        if not cfg.compressed:
            raise UserError("no compressed checkpoint given (--compressed DIR)")
        if not cfg.out:
            raise UserError("no output directory given (--out DIR)")
        if Path(cfg.out).resolve() == Path(cfg.compressed).expanduser().resolve():
            raise UserError("--out must differ from --compressed (the compressed checkpoint is an input)")
        out = Path(cfg.out)
        if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "repair.json").is_file())):
            raise UserError(f"--out {cfg.out} exists and is not an earlier repair output; choose a new directory")
        self.cfg = cfg
        self.orig = original if original is not None else load_model(cfg.original, dtype=cfg.dtype)
        self._given_selection = selection
        self._given_own_selection = own_selection  # the compressed model's own, if the caller has selected it
        self._top_masks: dict[int, dict[str, torch.Tensor]] = {}
        self._original_probes: dict | None = None  # the original's fitted probes, set by its probes stage
        self.comp = load_model(cfg.compressed, dtype=cfg.dtype)
        self.original, self.model, self.tok = self.orig.model, self.comp.model, self.orig.tokenizer
        check_same_architecture(self.original, self.model)
        if self.comp.tokenizer.get_vocab() != self.tok.get_vocab():
            raise UserError("the compressed checkpoint's tokenizer differs from the original's")
        _log("checking that the checkpoint derives from the original")
        self.derivation = summarise(check_derivation(self.original, self.model, decoder_linear_names(self.original)))
        if self.derivation["kind"] == "identical":
            raise UserError("the compressed checkpoint is identical to the original; there is nothing to repair")
        self.fp_orig = model_fingerprint(self.original)
        self.fp_comp = model_fingerprint(self.model)
        root = Path(cfg.runs_dir)
        self.orig_dir = root / "originals" / self.fp_orig[:16]
        self.manifest = read_manifest(Path(self.comp.path))
        self.dir = root / f"{checkpoint_name(Path(self.comp.path), self.manifest)}-{self.fp_comp[:8]}"

    # --- diagnosis --------------------------------------------------------------------------
    def selection_config(self) -> SelectionConfig:
        c = self.cfg
        return SelectionConfig(n_train=c.n_train, n_val=c.n_val, seed=c.seed, search=c.search,
                               prescreen_n_val=c.prescreen_n_val, prescreen_keep=c.prescreen_keep, batch_size=c.batch_size or 32)

    def on_gpu(self) -> bool:
        return next(self.model.parameters()).device.type == "cuda"

    def diagnose(self) -> None:
        self.selection = self._given_selection or select_direction_cached(
            self.original, self.tok, self.orig_dir / "selection", self.selection_config(), fingerprint=self.fp_orig)
        if self.cfg.source is not None:
            position, layer = self.cfg.source
            if position not in self.selection.positions or not 0 <= layer < self.selection.n_layers:
                raise UserError(f"--source {position} {layer} is not a candidate: positions {self.selection.positions}, "
                                f"layers 0..{self.selection.n_layers - 1}")
            self.source = (position, layer)
        elif self.selection.chosen is None:
            raise UserError("the original model has no selected refusal direction (no candidate passed selection); "
                            "AIRD needs one (or give --source POSITION LAYER)")
        else:
            self.source = self.selection.chosen
        self.direction = self.selection.directions[self.selection.positions.index(self.source[0]), self.source[1]]
        p = self.selection.prompts
        self.harmful_train, self.harmless_train = p["harmful_train"], p["harmless_train"]
        self.harmful_val, self.harmless_val = p["harmful_val"], p["harmless_val"]
        select_own = self.cfg.select_compressed if self.cfg.select_compressed is not None else self.on_gpu()
        self.own_selection = self._given_own_selection
        if select_own and self.own_selection is None:
            # On the original's filtered prompts, as experiments.compare_refusal does: the source
            # then shifts only because the weights differ.
            shared = SharedPrompts(self.selection.prompts) if self.selection.prompts else None
            self.own_selection = select_direction_cached(self.model, self.tok, self.dir / "selection", self.selection_config(),
                                                         fingerprint=self.fp_comp, shared=shared)
        # Repair is judged on one unfiltered validation sample (the selection's filtered sets can be
        # a handful of prompts: 7 of 32 harmful ones on the embedded model).
        from lm import datasets

        self.probe_harmful = datasets.sample(datasets.instructions("harmful", "val"), self.cfg.n_val, self.cfg.seed)
        self.probe_harmless = datasets.sample(datasets.instructions("harmless", "val"), self.cfg.n_val, self.cfg.seed)
        self.comp_reading = cached_json(self.dir / "probe.json", self._probe_key(self.fp_comp), lambda: self.probe.baseline.to_json())
        self.orig_reading = cached_json(self.orig_dir / "probe.json", self._probe_key(self.fp_orig),
                                        lambda: RefusalProbe(self.original, self.tok, self.probe_harmful, self.probe_harmless,
                                                             self.selection.refusal_token_ids, self.direction, self.source).baseline.to_json())

    @functools.cached_property
    def probe(self) -> RefusalProbe:
        # Built on first use: its construction runs every probe prompt through the compressed
        # model, which a rerun with every stage cached never needs.
        return RefusalProbe(self.model, self.tok, self.probe_harmful, self.probe_harmless, self.selection.refusal_token_ids,
                            self.direction, self.source, batch_size=min(16, self.cfg.batch_size or 16))

    def _probe_key(self, fp: str) -> dict:
        return dict(model=fp, source=list(self.source), direction=_key(self.direction.tolist()),
                    harmful=_key(self.probe_harmful), harmless=_key(self.probe_harmless))

    # --- choosing what to restore -----------------------------------------------------------
    def choose(self) -> None:
        key = {**self._probe_key(self.fp_comp), "original": self.fp_orig, "aird": dataclasses.asdict(self.cfg.aird)}
        self.aird = cached_json(self.dir / "aird_choice.json", key,
                                lambda: timed(lambda: choose_aird_block(self.model, self.original, self.probe, self.cfg.aird).to_json()))
        self.aird_masks = block_masks(self.model, self.original, self.aird["layer"])
        chosen = next(c for c in self.aird["candidates"] if c["layer"] == self.aird["layer"])
        self.aird_reading = {k: chosen[k] for k in ("refusal_score", "kl", "projection")}
        self.targeted = None
        if not self.cfg.targeted:
            return
        tkey = {**key, "train": _key(self.harmful_train), "targeted": dataclasses.asdict(self.cfg.targeted_cfg)}
        scores = cached_tensors(self.dir / "targeted_scores.safetensors", tkey, self.attribution)
        self.scores = scores
        reply_tokens = self.cfg.targeted_cfg.reply_tokens
        self.aird_reading["refusal_rate"] = cached_json(
            self.dir / "aird_refusal_rate.json", {**key, "tokens": reply_tokens},
            lambda: self._probe_restored(self.aird_masks, lambda probe: dict(refusal_rate=probe.refusal_rate(reply_tokens))))["refusal_rate"]
        self.targeted = cached_json(self.dir / "targeted_search.json", {**tkey, "target": self.aird_reading["refusal_rate"]},
                                    lambda: timed(lambda: search_budget(self.model, self.original, self.probe, scores, self.aird["restored"],
                                                                         self.aird_reading["refusal_rate"], self.cfg.targeted_cfg)))

    def attribution(self) -> dict[str, torch.Tensor]:
        """First-order restoration scores of every changed weight before the source (repair.targeted)."""
        tc, device = self.cfg.targeted_cfg, next(self.model.parameters()).device
        objective_name = tc.objective
        if objective_name == "own_refusals":
            try:
                batches, n_tokens = own_refusal_batches(self.original, self.tok, self.harmful_train, tc.batch_size, tc.reply_tokens, self.cfg.seed)
                objective = own_refusal_objective(n_tokens)
            except UserError as e:  # nothing to imitate: fall back to the first-token refusal score
                _log(f"targeted: {e}; using the refusal-score objective instead")
                objective_name = "refusal"
        if objective_name != "own_refusals":
            batches = prompt_batches(self.tok, self.harmful_train, tc.batch_size, device)
            sign = 1.0 if self.orig_reading["projection"] >= self.comp_reading["projection"] else -1.0
            objective = (refusal_objective(self.selection.refusal_token_ids) if objective_name == "refusal"
                         else projection_objective(self.direction, self.source, sign))
        return first_order_scores(self.model, self.original, self.source[1], batches, objective)

    def targeted_masks(self, k: int) -> dict[str, torch.Tensor]:
        # Memoised: evaluation, curve and output each ask for the same k, and a top-k over every
        # changed weight costs seconds.
        if k not in self._top_masks:
            self._top_masks[k] = top_masks(self.scores, k)
        return self._top_masks[k]

    def aird_partial_masks(self, k: int) -> dict[str, torch.Tensor]:
        """A seeded random k of the AIRD block's restorable entries: AIRD's curve below the whole block."""
        flat = torch.cat([m.flatten() for m in self.aird_masks.values()])
        where = flat.nonzero().flatten()
        g = torch.Generator().manual_seed(self.cfg.seed)
        keep = torch.zeros_like(flat)
        keep[where[torch.randperm(len(where), generator=g)[:k]]] = True
        out, offset = {}, 0
        for n, m in self.aird_masks.items():
            out[n] = keep[offset : offset + m.numel()].view_as(m)
            offset += m.numel()
        return out

    def states(self) -> dict[str, dict[str, torch.Tensor] | None]:
        """Restoration masks applied to the compressed model for each evaluated state."""
        out = {"compressed": {}, "aird": self.aird_masks}
        if self.targeted is not None and self.targeted["reached"]:
            out["targeted"] = self.targeted_masks(self.targeted["k"])
        return out

    # --- evaluation -------------------------------------------------------------------------
    def eval_config(self, setting: str = "vanilla", n: int | None = None) -> EvalConfig:
        c = self.cfg
        return EvalConfig(sets=c.eval_sets, n=n or c.n_asr, setting=setting, max_new_tokens=c.max_new_tokens, seed=c.seed, batch_size=c.batch_size)

    @property
    def store(self) -> Path:
        return Path(self.cfg.measurements_dir) if self.cfg.measurements_dir else Path(self.cfg.runs_dir) / "measurements"

    def evaluate(self, model, name: str, where: Path, model_id, full: bool = True) -> dict:
        """Behaviour, utility and direction of one model state, every part cached.

        `model_id` keys the measurements in the shared store: the weight fingerprint for the
        original and the compressed checkpoint (so a comparison run's measurements are reused),
        the restoration for a repaired state.
        """
        c, tok, store = self.cfg, self.tok, self.store
        fp_key = dict(model=model_id)
        out = {}
        # The adversarial suffixes cost three generations each; they are measured for the AIRD
        # table's states (original, compressed, AIRD), vanilla ASR for the rest.
        settings = ("vanilla", "adv_suffix") if (full and c.adv_suffix and name in ("original", "compressed", "aird")) else ("vanilla",)
        for setting in settings:
            out[f"asr_{setting}"] = measure(model, tok, self.eval_config(setting, None if full else c.curve_n_asr), store, model_id)
        if not full:
            return out
        out["harmless"] = measure(model, tok, self.eval_config().harmless(c.harmless_sets, c.n_harmless), store, model_id)
        pcfg = PerplexityConfig(windows=c.ppl_windows, seqlen=c.ppl_seqlen)
        out["perplexity"] = measured(store, "perplexity", model_id, [pcfg], lambda: timed(lambda: measure_perplexity(model, tok, pcfg)))
        if c.zero_shot_limit != 0:
            from lm.zero_shot import ALL_TASKS, ZeroShotConfig, zero_shot_accuracy

            zcfg = ZeroShotConfig(tasks=c.zero_shot_tasks or ALL_TASKS, limit=c.zero_shot_limit)
            out["zero_shot"] = measured(store, "zero_shot", model_id, [zcfg], lambda: zero_shot_accuracy(model, tok, zcfg))
        dirs = cached_tensors(where / "directions.safetensors", {**fp_key, "prompts": _key([self.harmful_train, self.harmless_train])},
                              lambda: {"directions": candidate_directions(model, tok, self.harmful_train, self.harmless_train)["directions"]})
        cos = cosine_map(dirs["directions"], self.selection.directions)
        pos_index = self.selection.positions.index(self.source[0])
        own = cosine_map(dirs["directions"][pos_index, self.source[1]], self.direction)
        out["direction"] = dict(cosine_at_source=float(own), cosine_map=[[round(float(x), 4) for x in row] for row in cos])
        out["directions_tensor"] = dirs["directions"]
        out["quality"] = cached_json(where / "quality_original_direction.json", {**fp_key, "source": list(self.source)},
                                     lambda: direction_quality(model, tok, self.direction, self.source[1], self.harmful_val, self.harmless_val,
                                                               self.selection.refusal_token_ids, self.cfg.batch_size or 32).to_json())
        if c.probes:
            out.update(self.probes(model, name, where, model_id, out["asr_vanilla"]))
        out["sparsity"] = {k: v for k, v in sparsity_report(model).items() if k != "per_matrix"}
        out["collapse"] = collapse_verdict(out["asr_vanilla"]["completions"], out["perplexity"]["perplexity"],
                                           self._ref_ppl if name != "original" else None).to_json()
        return out

    def probes(self, model, name: str, where: Path, model_id, asr: dict) -> dict:
        """Harmfulness probes (own and the original's) and the original's refusal-prediction probe
        on this state; the original's are fitted first and applied to every later state."""
        c, tok = self.cfg, self.tok
        pcfg, batch = ProbeConfig(seed=c.seed), c.batch_size or 16
        test = [[p.text for p in cfg.prompts()] for cfg in (self.eval_config(), self.eval_config().harmless(c.harmless_sets, c.n_harmless))]
        ref = self._original_probes if name != "original" else None
        key = dict(model=model_id, train=_key([self.harmful_train, self.harmless_train]), test=_key(test), probe=dataclasses.asdict(pcfg),
                   original_probes=None if ref is None else ref["key"])
        out = dict(probes=cached_tensors(where / "probes.safetensors", key, lambda: harmfulness_probes(
            model, tok, (self.harmful_train, self.harmless_train), (test[0], test[1]), pcfg, None if ref is None else ref["harmfulness"], batch)))
        if c.n_refusal_probe:
            train = training_prompts(c.n_refusal_probe, c.seed)
            rkey = dict(key, train=_key([p.id for p in train]), test=_key([r["id"] for r in asr["records"]]),
                        generation=dataclasses.asdict(self.eval_config().asr_config()))
            # Only the original's probe is fitted (its training generations are the main job's, in the
            # shared store); each repaired state is read with it, which needs no generation beyond its ASR.
            out["refusal_probes"] = cached_tensors(where / "refusal_probes.safetensors", rkey, lambda: refusal_prediction_probes(
                model, tok, train, self.eval_config(), self.store, model_id, asr, pcfg, None if ref is None else ref["refusal"], batch,
                fit=name == "original"))
        if name == "original":
            self._original_probes = dict(harmfulness=probe_params(out["probes"]), key=_key(key),
                                         refusal=probe_params(out["refusal_probes"]) if "refusal_probes" in out else None)
        return out

    def run(self) -> dict:
        start = time.perf_counter()
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.dir / "config.json", jsonable(dataclasses.asdict(self.cfg)))
        _log(f"original {self.orig.name}: selecting its refusal direction")
        self.diagnose()
        _log(f"source: position {self.source[0]}, layer {self.source[1]}; choosing the AIRD block")
        self.choose()
        _log(f"AIRD block {self.aird['layer']} ({self.aird['reason']}), {self.aird['restored']} entries")
        evals = {}
        self._ref_ppl = None
        evals["original"] = self.evaluate(self.original, "original", self.orig_dir / "eval", self.fp_orig)
        self._ref_ppl = evals["original"]["perplexity"]["perplexity"]
        for name, masks in self.states().items():
            _log(f"evaluating {name}")
            key = self.fp_comp if not masks else dict(
                checkpoint=self.fp_comp, restored_from=self.fp_orig, restored=_key({n: m.nonzero().tolist() for n, m in masks.items()}))
            with restored(self.model, self.original, masks):
                evals[name] = self.evaluate(self.model, name, self.dir / "eval" / name, key)
                evals[name]["restored"] = count(masks)
        curve = self.curve()
        result = self.summarise(evals, curve, time.perf_counter() - start)
        return self.write(result)

    def curve(self) -> dict:
        """Vanilla ASR against restored weights, for AIRD (random parts of its block) and targeted (top-k)."""
        total = self.aird["restored"]
        ks = sorted({max(1, round(f * total)) for f in self.cfg.curve_fractions if f < 1})
        methods = {"aird": self.aird_partial_masks}
        if self.targeted is not None:
            methods["targeted"] = self.targeted_masks
        self._block_names = [set(block_params(self.model, layer)) for layer in range(self.source[1])]
        out = {}
        for method, make in methods.items():
            points = []
            for k in ks:
                masks = make(k)
                n = count(masks)
                key = dict(checkpoint=self.fp_comp, restored_from=self.fp_orig,
                           restored=_key({name: m.nonzero().tolist() for name, m in masks.items()}))
                first = min((layer for layer in range(self.source[1]) if any(bool(masks[p].any()) for p in masks if p in self._block_names[layer])),
                            default=0)
                with restored(self.model, self.original, masks):
                    r = self.evaluate(self.model, f"{method}-{k}", self.dir / "curve" / f"{method}-{k}", key, full=False)
                reading = cached_json(self.dir / "curve" / f"{method}-{k}" / "probe.json", {**key, "method": method, **self._probe_key(self.fp_comp)},
                                      lambda masks=masks, first=first: self._probe_restored(masks, lambda probe: probe.read(first).to_json()))
                points.append(dict(k=n, fraction_of_aird=n / total, asr=r["asr_vanilla"]["asr"], rates=r["asr_vanilla"]["rates"]["asr"],
                                   n_prompts=r["asr_vanilla"]["n_prompts"], **reading))
            out[method] = points
        return out

    def _probe_restored(self, masks: dict[str, torch.Tensor], read):
        """`read(probe)` with `masks` restored; the probe is built first, so its baseline is the unrepaired model's."""
        probe = self.probe
        with restored(self.model, self.original, masks):
            return read(probe)

    # --- output -----------------------------------------------------------------------------
    def summarise(self, evals: dict, curve: dict, seconds: float) -> dict:
        model_params = sum(p.numel() for p in self.model.parameters())
        rows = {}
        for name, e in evals.items():
            row = dict(
                asr={k.removeprefix("asr_"): v["asr"] for k, v in e.items() if k.startswith("asr_")},
                rates=dict(asr={k.removeprefix("asr_"): v["rates"]["asr"] for k, v in e.items() if k.startswith("asr_")},
                           over_refusal=e["harmless"]["rates"]["refusal"],
                           per_source={s: v["asr"] for s, v in e["asr_vanilla"]["rates"]["per_source"].items()},
                           judge_disagreement=e["asr_vanilla"]["rates"]["judge_disagreement"]),
                perplexity=e["perplexity"]["perplexity"],
                perplexity_ci=perplexity_rate(e["perplexity"]),
                zero_shot=({t: v["acc"] for t, v in e["zero_shot"]["per_task"].items()} | {"average": e["zero_shot"]["average"]})
                if "zero_shot" in e else None,
                zero_shot_rates=zero_shot_rates(e["zero_shot"]) if "zero_shot" in e else None,
                cosine_at_source=e["direction"]["cosine_at_source"],
                quality=e["quality"],
                sparsity=e["sparsity"],
                collapse=e["collapse"],
            )
            if "restored" in e:
                row["restored"] = e["restored"]
                row["restored_fraction_of_model"] = e["restored"] / model_params
            rows[name] = row
        samples = {name: [dict(goal=rec["prompt"], source=rec["source"], completion=rec["completions"][0])
                          for rec in e["asr_vanilla"]["records"][:3]] for name, e in evals.items()}
        tests = paired_tests(evals)
        cell = (self.selection.positions.index(self.source[0]), self.source[1])
        return dict(
            original=self.cfg.original,
            original_name=self.orig.name,
            compressed=str(self.cfg.compressed),
            compressed_manifest=self.manifest,
            derivation={k: v for k, v in self.derivation.items() if k != "per_matrix"},
            source=dict(position=self.source[0], layer=self.source[1]),
            compressed_source=(dict(position=self.own_selection.chosen[0], layer=self.own_selection.chosen[1])
                               if self.own_selection is not None and self.own_selection.chosen else None),
            probe=dict(original=self.orig_reading, compressed=self.comp_reading, aird=self.aird_reading,
                       n_harmful=len(self.probe_harmful), n_harmless=len(self.probe_harmless)),
            aird=self.aird,
            targeted=self.targeted,
            curve=curve,
            states=rows,
            tests=tests,
            findings=findings(rows, tests),
            probes=summarise_states(evals, cell),
            evaluation=dict(harmful=describe_prompts(evals["original"]["asr_vanilla"], len(tests["asr_vanilla"]["arditi2024"])),
                            harmless=describe_prompts(evals["original"]["harmless"], len(tests["over_refusal"]["arditi2024"]))),
            samples=samples,
            model_params=model_params,
            n_layers=len(decoder_layers(self.model)),
            settings=dict(n_asr=self.cfg.n_asr, eval_sets=list(self.cfg.eval_sets), harmless_sets=list(self.cfg.harmless_sets),
                          n_harmless=self.cfg.n_harmless, curve_n_asr=self.cfg.curve_n_asr or self.cfg.n_asr,
                          max_new_tokens=self.cfg.max_new_tokens, n_val=len(self.harmful_val),
                          zero_shot_limit=self.cfg.zero_shot_limit, ppl_windows=self.cfg.ppl_windows, ppl_seqlen=self.cfg.ppl_seqlen),
            saved=self.cfg.save,
            wall_seconds=round(seconds, 1),
        )

    def write(self, result: dict) -> dict:
        """Checkpoint + updated compression.json + repair.json/md + figures, all or nothing.

        Returns what `out` holds: when an earlier run wrote the same repair (same numbers, same
        manifest), its files are kept as they are, because rewriting an identical multi-GB
        checkpoint is most of the cost of a rerun that found every stage cached.
        """
        masks = self.states()[self.cfg.save]
        restore_entries(self.model, self.original, masks)
        manifest = self._manifest(result, masks)
        kept = unchanged_output(Path(self.cfg.out), jsonable(manifest), jsonable(result))
        if kept is not None:
            # The readable outputs are redrawn (cheap, and the rendering code may have changed).
            self._write_readable(Path(self.cfg.out), kept)
            _log(f"{self.cfg.out} already holds this repair: checkpoint kept, repair.md and figures redrawn")
            return kept
        with atomic_dir(Path(self.cfg.out)) as tmp:
            self.model.save_pretrained(tmp, safe_serialization=True)
            self.tok.save_pretrained(tmp)
            atomic_write_json(tmp / MANIFEST, jsonable(manifest))
            atomic_write_json(tmp / "repair.json", jsonable(result))
            self._write_readable(tmp, result)
        _log(f"wrote {self.cfg.out} ({self.cfg.save}-repaired checkpoint, repair.md)")
        return result

    def _write_readable(self, where: Path, result: dict) -> None:
        figs = {"repair_before_after": before_after_figure(result), "repair_curve": curve_figure({self.dir.name.rsplit("-", 1)[0]: result})}
        atomic_write_text(where / "repair.md", render_markdown(result))
        write_plotlyjs(where / "figures")
        for name, fig in figs.items():
            atomic_write_text(where / "figures" / f"{name}.html", fig.to_html(include_plotlyjs="directory", full_html=True))

    def _manifest(self, result: dict, masks: dict[str, torch.Tensor]) -> dict:
        manifest = dict(self.manifest or {})
        manifest.setdefault("base_model", self.cfg.original)
        manifest.setdefault("base_fingerprint", self.fp_orig)
        manifest["sparsity"] = sparsity_report(self.model)
        manifest["repair"] = dict(
            method=self.cfg.save, source=result["source"], aird_block=self.aird["layer"], restored=count(masks),
            restored_fraction_of_model=count(masks) / result["model_params"], compressed_checkpoint=str(self.cfg.compressed),
            compressed_fingerprint=self.fp_comp, original_fingerprint=self.fp_orig,
            sparsity_before=result["states"]["compressed"]["sparsity"],
        )
        return manifest
