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
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from compression.checkpoint import read_manifest
from lm.cache import atomic_write_json, cached_json, cached_tensors, timed
from lm.errors import UserError
from lm.loading import load_model, model_fingerprint, stored_dtype
from lm.packed.writer import full_precision_cost
from refusal.select import SelectionConfig, SharedPrompts
from refusal.selection_artifacts import select_direction_cached

from .aird import choose_aird_block
from .config import RepairConfig
from .derivation import checkpoint_name, derivation_records, summarise_derivation
from .evaluation import StateEvaluation
from .front import FrontStage, packed_matrix_bytes
from .output import jsonable, packed_weights, repair_manifest, write_output
from .readout import RefusalReadout
from .restore import block_masks, block_params, count, restore_entries, restored
from .stages import Choice, Diagnosis, digest
from .summary import summarise_repair
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


class Repair:
    """One compressed checkpoint's repair. `original` (a LoadedModel) and `selection` (the original's
    SelectionResult) may be passed in by a caller that already has them, e.g. the main job.

    Stages hand each other typed values: diagnose() -> Diagnosis, choose(Diagnosis) -> Choice,
    evaluation and the curve take both; the attributes set here are the inputs and two memos."""

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
        # Memos: the compressed model's RefusalReadout (building it runs every read-out prompt, which a
        # fully cached rerun never needs) and top-k masks (evaluation, curve and output ask for the same k).
        self._readout: RefusalReadout | None = None
        self._top_masks: dict[int, dict[str, torch.Tensor]] = {}
        self.comp = load_model(cfg.compressed, dtype=cfg.dtype)
        self.original, self.model, self.tok = self.orig.model, self.comp.model, self.orig.tokenizer
        _log("checking that the checkpoint derives from the original")
        self.derivation = summarise_derivation(derivation_records(self.orig, self.comp))
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
        return SelectionConfig(
            n_train=c.n_train,
            n_val=c.n_val,
            seed=c.seed,
            search=c.search,
            prescreen_n_val=c.prescreen_n_val,
            prescreen_keep=c.prescreen_keep,
            batch_size=c.batch_size or 32,
        )

    def on_gpu(self) -> bool:
        return next(self.model.parameters()).device.type == "cuda"

    def _source(self, selection) -> tuple[int, int]:
        if self.cfg.source is not None:
            position, layer = self.cfg.source
            if position not in selection.positions or not 0 <= layer < selection.n_layers:
                raise UserError(
                    f"--source {position} {layer} is not a candidate: positions {selection.positions}, "
                    f"layers 0..{selection.n_layers - 1}"
                )
            return position, layer
        if selection.chosen is None:
            raise UserError(
                f"the original model has no selected refusal direction: {selection.no_direction_reason()}; "
                "AIRD needs one (or give --source POSITION LAYER)"
            )
        return selection.chosen

    def diagnose(self) -> Diagnosis:
        selection = self._given_selection or select_direction_cached(
            self.original, self.tok, self.orig_dir / "selection", self.selection_config(), fingerprint=self.fp_orig
        )
        source = self._source(selection)
        direction = selection.directions[selection.positions.index(source[0]), source[1]]
        select_own = self.cfg.select_compressed if self.cfg.select_compressed is not None else self.on_gpu()
        own_selection = self._given_own_selection
        if select_own and own_selection is None:
            # On the original's filtered prompts, as experiments.compare_refusal does: the source
            # then shifts only because the weights differ.
            shared = SharedPrompts(selection.prompts) if selection.prompts else None
            own_selection = select_direction_cached(
                self.model,
                self.tok,
                self.dir / "selection",
                self.selection_config(),
                fingerprint=self.fp_comp,
                shared=shared,
            )
        # Repair is judged on one unfiltered validation sample (the selection's filtered sets can be
        # a handful of prompts: 7 of 32 harmful ones on the embedded model).
        from lm import datasets

        readout_harmful = datasets.sample(datasets.instructions("harmful", "val"), self.cfg.n_val, self.cfg.seed)
        readout_harmless = datasets.sample(datasets.instructions("harmless", "val"), self.cfg.n_val, self.cfg.seed)
        d = Diagnosis(
            selection,
            source,
            direction,
            own_selection,
            readout_harmful,
            readout_harmless,
            orig_reading={},
            comp_reading={},
        )
        comp_reading = cached_json(
            self.dir / "probe.json", d.readout_key(self.fp_comp), lambda: self.readout(d).baseline.to_json()
        )
        orig_reading = cached_json(
            self.orig_dir / "probe.json",
            d.readout_key(self.fp_orig),
            lambda: RefusalReadout(
                self.original,
                self.tok,
                readout_harmful,
                readout_harmless,
                selection.refusal_token_ids,
                direction,
                source,
            ).baseline.to_json(),
        )
        return dataclasses.replace(d, orig_reading=orig_reading, comp_reading=comp_reading)

    def readout(self, d: Diagnosis) -> RefusalReadout:
        """The compressed model's refusal read-out on the diagnosis' validation prompts, built on first use."""
        if self._readout is None:
            self._readout = RefusalReadout(
                self.model,
                self.tok,
                d.readout_harmful,
                d.readout_harmless,
                d.selection.refusal_token_ids,
                d.direction,
                d.source,
                batch_size=min(16, self.cfg.batch_size or 16),
            )
        return self._readout

    # --- choosing what to restore -----------------------------------------------------------
    def choose(self, d: Diagnosis) -> Choice:
        key = {**d.readout_key(self.fp_comp), "original": self.fp_orig, "aird": dataclasses.asdict(self.cfg.aird)}
        aird = cached_json(
            self.dir / "aird_choice.json",
            key,
            lambda: timed(
                lambda: choose_aird_block(self.model, self.original, self.readout(d), self.cfg.aird).to_json()
            ),
        )
        aird_masks = block_masks(self.model, self.original, aird["layer"])
        chosen = next(c for c in aird["candidates"] if c["layer"] == aird["layer"])
        aird_reading = {k: chosen[k] for k in ("refusal_score", "kl", "projection")}
        targeted, scores = (
            self.choose_targeted(d, key, aird, aird_masks, aird_reading) if self.cfg.targeted else (None, None)
        )
        front = None
        if self.cfg.anchored:
            stage = FrontStage(
                self.model,
                self.original,
                self.tok,
                self.cfg.anchored_cfg,
                self.cfg.seed,
                d.source[1],
                self.dir,
                self.orig_dir,
                keys=dict(original=self.fp_orig, compressed=self.fp_comp),
                matrix_bytes=self.matrix_bytes(),
                log=_log,
                static_samples=self.cfg.static_samples,
            )
            reached = targeted is not None and targeted["reached"]
            front = stage.run(
                aird_masks, self.cfg.static_fractions, top_masks(scores, targeted["k"]) if reached else None
            )
            a = front.search
            _log(
                f"anchored restoration: {a['points'][a['chosen']]['restored']:,} of {a['changed']:,} changed weights ({a['reason']})"
            )
        return Choice(aird, aird_masks, aird_reading, targeted, scores, front)

    def matrix_bytes(self) -> dict[str, int] | None:
        return packed_matrix_bytes(self.comp)

    def choose_targeted(self, d: Diagnosis, key: dict, aird: dict, aird_masks, aird_reading: dict):
        """The one-shot first-order targeted restoration (a baseline): its scores and budget search."""
        tkey = {
            **key,
            "train": digest(d.prompts["harmful_train"]),
            "targeted": dataclasses.asdict(self.cfg.targeted_cfg),
        }
        scores = cached_tensors(self.dir / "targeted_scores.safetensors", tkey, lambda: self.attribution(d))
        reply_tokens = self.cfg.targeted_cfg.reply_tokens
        aird_reading["refusal_rate"] = cached_json(
            self.dir / "aird_refusal_rate.json",
            {**key, "tokens": reply_tokens},
            lambda: self._read_restored(
                d, aird_masks, lambda readout: dict(refusal_rate=readout.refusal_rate(reply_tokens))
            ),
        )["refusal_rate"]
        targeted = cached_json(
            self.dir / "targeted_search.json",
            {**tkey, "target": aird_reading["refusal_rate"]},
            lambda: timed(
                lambda: search_budget(
                    self.model,
                    self.original,
                    self.readout(d),
                    scores,
                    aird["restored"],
                    aird_reading["refusal_rate"],
                    self.cfg.targeted_cfg,
                )
            ),
        )
        return targeted, scores

    def attribution(self, d: Diagnosis) -> dict[str, torch.Tensor]:
        """First-order restoration scores of every changed weight before the source (repair.targeted)."""
        tc, device = self.cfg.targeted_cfg, next(self.model.parameters()).device
        harmful_train = d.prompts["harmful_train"]
        objective_name = tc.objective
        if objective_name == "own_refusals":
            try:
                batches, n_tokens = own_refusal_batches(
                    self.original, self.tok, harmful_train, tc.batch_size, tc.reply_tokens, self.cfg.seed
                )
                objective = own_refusal_objective(n_tokens)
            except UserError as e:  # nothing to imitate: fall back to the first-token refusal score
                _log(f"targeted: {e}; using the refusal-score objective instead")
                objective_name = "refusal"
        if objective_name != "own_refusals":
            batches = prompt_batches(self.tok, harmful_train, tc.batch_size, device)
            sign = 1.0 if d.orig_reading["projection"] >= d.comp_reading["projection"] else -1.0
            objective = (
                refusal_objective(d.selection.refusal_token_ids)
                if objective_name == "refusal"
                else projection_objective(d.direction, d.source, sign)
            )
        return first_order_scores(self.model, self.original, d.source[1], batches, objective)

    def targeted_masks(self, ch: Choice, k: int) -> dict[str, torch.Tensor]:
        if k not in self._top_masks:
            self._top_masks[k] = top_masks(ch.scores, k)
        return self._top_masks[k]

    def aird_partial_masks(self, ch: Choice, k: int) -> dict[str, torch.Tensor]:
        """A seeded random k of the AIRD block's restorable entries: AIRD's curve below the whole block."""
        flat = torch.cat([m.flatten() for m in ch.aird_masks.values()])
        where = flat.nonzero().flatten()
        g = torch.Generator().manual_seed(self.cfg.seed)
        keep = torch.zeros_like(flat)
        keep[where[torch.randperm(len(where), generator=g)[:k]]] = True
        out, offset = {}, 0
        for n, m in ch.aird_masks.items():
            out[n] = keep[offset : offset + m.numel()].view_as(m)
            offset += m.numel()
        return out

    def states(self, ch: Choice) -> dict[str, dict[str, torch.Tensor] | None]:
        """Restoration masks applied to the compressed model for each evaluated state."""
        out = {"compressed": {}, "aird": ch.aird_masks}
        if ch.front is not None:
            out.update(ch.front.masks)
        if ch.targeted is not None and ch.targeted["reached"]:
            out["targeted"] = self.targeted_masks(ch, ch.targeted["k"])
        return out

    def _restoration_key(self, masks: dict[str, torch.Tensor]) -> dict:
        return dict(
            checkpoint=self.fp_comp,
            restored_from=self.fp_orig,
            restored=digest({n: m.nonzero().tolist() for n, m in masks.items()}),
        )

    # --- the job ----------------------------------------------------------------------------
    def run(self) -> dict:
        start = time.perf_counter()
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.dir / "config.json", jsonable(dataclasses.asdict(self.cfg)))
        # This invocation's seconds per stage (a cached stage costs ~0): where a repair's time goes.
        seconds: dict[str, float] = {}

        @contextmanager
        def stage(name: str):
            t = time.perf_counter()
            yield
            seconds[name] = round(seconds.get(name, 0.0) + time.perf_counter() - t, 1)

        _log(f"original {self.orig.name}: selecting its refusal direction")
        with stage("original's selection"):
            d = self.diagnose()
        _log(f"source: position {d.source[0]}, layer {d.source[1]}; choosing the AIRD block")
        with stage("choice (AIRD, the anchored search, the static baseline, validation readings)"):
            ch = self.choose(d)
        _log(f"AIRD block {ch.aird['layer']} ({ch.aird['reason']}), {ch.aird['restored']} entries")
        ev = StateEvaluation(self.cfg, self.tok, d)
        with stage("held-out evaluation: original"):
            evals = {"original": ev.evaluate(self.original, "original", self.orig_dir / "eval", self.fp_orig)}
        for name, masks in self.states(ch).items():
            _log(f"evaluating {name}")
            key = self.fp_comp if not masks else self._restoration_key(masks)
            with stage(f"held-out evaluation: {name}"), restored(self.model, self.original, masks):
                evals[name] = ev.evaluate(self.model, name, self.dir / "eval" / name, key, reference=evals["original"])
                evals[name]["restored"] = count(masks)
        with stage("curve"):
            curve = self.curve(d, ch, ev)
        checkpoint = dict(original_name=self.orig.name, manifest=self.manifest, derivation=self.derivation)
        result = summarise_repair(self.cfg, checkpoint, d, ch, evals, curve, self.model, time.perf_counter() - start)
        if ch.front is not None:
            seconds["of which the anchored search"] = ch.front.search["seconds"]
        result["stage_seconds"] = seconds
        return self.write(ch, result)

    def curve(self, d: Diagnosis, ch: Choice, ev: StateEvaluation) -> dict:
        """Vanilla ASR against restored weights, for AIRD (random parts of its block) and targeted (top-k)."""
        if not self.cfg.curve_fractions:
            return {}
        total = ch.aird["restored"]
        ks = sorted({max(1, round(f * total)) for f in self.cfg.curve_fractions if f < 1})
        methods = {"aird": lambda k: self.aird_partial_masks(ch, k)}
        if ch.targeted is not None:
            methods["targeted"] = lambda k: self.targeted_masks(ch, k)
        block_names = [set(block_params(self.model, layer)) for layer in range(d.source[1])]
        out = {}
        for method, make in methods.items():
            points = []
            for k in ks:
                masks = make(k)
                n = count(masks)
                key = self._restoration_key(masks)
                first = min(
                    (
                        layer
                        for layer in range(d.source[1])
                        if any(bool(masks[p].any()) for p in masks if p in block_names[layer])
                    ),
                    default=0,
                )
                with restored(self.model, self.original, masks):
                    r = ev.evaluate(self.model, f"{method}-{k}", self.dir / "curve" / f"{method}-{k}", key, full=False)
                reading = cached_json(
                    self.dir / "curve" / f"{method}-{k}" / "probe.json",
                    {**key, "method": method, **d.readout_key(self.fp_comp)},
                    lambda masks=masks, first=first: self._read_restored(
                        d, masks, lambda readout: readout.read(first).to_json()
                    ),
                )
                points.append(
                    dict(
                        k=n,
                        fraction_of_aird=n / total,
                        asr=r["asr_vanilla"]["asr"],
                        rates=r["asr_vanilla"]["rates"]["asr"],
                        n_prompts=r["asr_vanilla"]["n_prompts"],
                        **reading,
                    )
                )
            out[method] = points
        return out

    def _read_restored(self, d: Diagnosis, masks: dict[str, torch.Tensor], read):
        """`read(readout)` with `masks` restored; the read-out is built first, so its baseline is the unrepaired model's."""
        readout = self.readout(d)
        with restored(self.model, self.original, masks):
            return read(readout)

    def write(self, ch: Choice, result: dict) -> dict:
        """The chosen repair applied for good, and `out` written (or kept, when it already holds it)."""
        masks = self.states(ch)[self.cfg.saved_method]
        restore_entries(self.model, self.original, masks)
        manifest = repair_manifest(
            self.cfg, self.manifest, self.model, result, ch.aird["layer"], masks, (self.fp_orig, self.fp_comp)
        )
        packed_from = None
        if self.comp.packed is not None:  # written in the input's format, the touched matrices at full precision
            weights = packed_weights(self.model, masks, self.comp.packed.quantized)
            stored = full_precision_cost(
                Path(self.comp.path), self.comp.packed, {m: tuple(w.shape) for m, w in weights.items()}
            )
            manifest["repair"]["stored"], result = stored, {**result, "stored": stored}
            packed_from = (Path(self.comp.path), self.comp.packed, weights)
        dtype = stored_dtype(Path(self.comp.path)) if packed_from is None else None
        if dtype is not None:
            manifest["repair"]["stored_dtype"] = str(dtype).removeprefix("torch.")
        held, written = write_output(
            Path(self.cfg.out),
            self.model,
            self.tok,
            manifest,
            result,
            self.dir.name.rsplit("-", 1)[0],
            packed_from,
            dtype,
        )
        _log(
            f"wrote {self.cfg.out} ({self.cfg.saved_method}-repaired checkpoint, repair.md)"
            if written
            else f"{self.cfg.out} already holds this repair: checkpoint kept, repair.md and figures redrawn"
        )
        return held
