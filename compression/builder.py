"""Building the compressed variants of one base model: the data each method reads (prompt
calibration, (prompt, response) pairs, the model's own refusals and helpful replies), generated once
and shared by every variant; importance scores cached on disk; a built variant saved as a checkpoint
and reused only when its manifest matches and its weights verify. The main job
(experiments.compare_refusal) and the brittleness sweep (experiments.brittleness) build through it."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lm.loading import LoadedModel, load_model, model_fingerprint

from .calibration import CalibrationConfig, ResponseCalibrationConfig, calibration_set, response_calibration_set
from .checkpoint import read_manifest, save_variant, weights_verified
from .variants import VariantSpec, build_variant_with_report


@dataclass(frozen=True)
class BuildSettings:
    """What every variant of one base model is built from. The model's own replies (SNIP's pairs,
    Wei et al.'s safety and utility data) take their count and seed from `calibration`."""

    base_model: str  # the base model as the user named it (recorded in each checkpoint's manifest)
    calibration: CalibrationConfig  # prompt calibration (Wanda, SparseGPT, GPTQ)
    response_tokens: int = 64  # tokens of each own reply
    dtype: str = "float32"  # precision a saved checkpoint is reloaded in


class VariantBuilder:
    """Builds, saves and reuses the variants of `base`; importance scores are cached in `scores_dir`."""

    def __init__(self, base: LoadedModel, settings: BuildSettings, scores_dir: Path):
        self.base, self.settings, self.scores_dir = base, settings, Path(scores_dir)
        self._fingerprint: str | None = None
        self._calibration = None
        self._responses = None
        self._own_replies: dict = {}

    # --- the data the methods read, generated once ---------------------------------------
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(self.base.model)
        return self._fingerprint

    def calibration(self):
        if self._calibration is None:
            # The model writes its own replies when the calibration source asks for them.
            self._calibration = calibration_set(self.base.tokenizer, self.settings.calibration, model=self.base.model)
        return self._calibration

    def own_replies(self, kind: str):
        """The base model's own refusals (safety) or helpful replies (utility), generated once (Wei et al.)."""
        from .attribution import OwnRepliesConfig, safety_calibration, utility_calibration

        if kind not in self._own_replies:
            s = self.settings
            cfg = OwnRepliesConfig(
                n_samples=s.calibration.n_samples, max_new_tokens=s.response_tokens, seed=s.calibration.seed
            )
            make = safety_calibration if kind == "safety" else utility_calibration
            self._own_replies[kind] = make(self.base.model, self.base.tokenizer, cfg)
        return self._own_replies[kind]

    def responses(self):
        """(instruction, own greedy response) pairs for gradient-based scores (SNIP), generated once."""
        if self._responses is None:
            s = self.settings
            cfg = ResponseCalibrationConfig(
                n_samples=s.calibration.n_samples, max_new_tokens=s.response_tokens, seed=s.calibration.seed
            )
            self._responses = response_calibration_set(self.base.model, self.base.tokenizer, cfg)
        return self._responses

    # --- identity of a variant -----------------------------------------------------------
    def params(self, spec: VariantSpec) -> dict:
        """The variant's parameters with the settings its data came from: its cache key and manifest entry."""
        s = self.settings.calibration
        params = dict(spec.params)
        if spec.needs_calibration or spec.needs_responses or spec.needs_safety or spec.needs_utility:
            params.update(calib_samples=s.n_samples, seed=s.seed)
        default = CalibrationConfig()
        if spec.needs_calibration and (s.source, s.seqlen) != (default.source, default.seqlen):
            # Only when not the defaults, so runs cached before these settings existed stay valid.
            params.update(calib_source=s.source, calib_seqlen=s.seqlen)
        if spec.needs_responses or spec.needs_safety or spec.needs_utility:
            params.update(response_tokens=self.settings.response_tokens)
        return params

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

    def reusable(self, spec: VariantSpec, manifest: dict | None) -> bool:
        """Whether a saved variant was built by the same method from the same base and calibration.

        The prompt calibration is cheap to rebuild, so its digest is compared, which also catches a
        change in how it is made; the model's own replies (SNIP, set difference) would cost minutes
        of generation, so for them the settings in `params` stand in.
        """
        if (
            manifest is None
            or manifest.get("params") != self.params(spec)
            or manifest.get("base_fingerprint") != self.fingerprint()
        ):
            return False
        if spec.needs_calibration:
            cal = self.calibration()
            if (
                manifest.get("calibration_sha256", {}).get("prompts") != cal.digest
                or manifest.get("calibration") != cal.description
            ):
                return False
        return True

    # --- building ------------------------------------------------------------------------
    def build(self, spec: VariantSpec):
        """(variant model, what the method removed, seconds): built from the base model, never saved."""
        start = time.perf_counter()
        model, removal = build_variant_with_report(
            self.base.model,
            spec,
            self.calibration() if spec.needs_calibration else None,
            responses=self.responses() if spec.needs_responses else None,
            safety=self.own_replies("safety") if spec.needs_safety else None,
            utility=self.own_replies("utility") if spec.needs_utility else None,
            scores_dir=self.scores_dir,
        )
        return model, removal, time.perf_counter() - start

    def checkpointed(self, spec: VariantSpec, ckpt: Path, save: bool, log: Callable[[str], None]):
        """The variant's model: reloaded from `ckpt` when it holds this variant and its weights verify,
        else built (and saved there when `save`; a user's checkpoint, spec 'path', already is one);
        `log` gets one line saying which."""
        if spec.method == "original":
            return self.base.model
        manifest = read_manifest(ckpt)
        if self.reusable(spec, manifest) and weights_verified(ckpt, manifest):
            log(f"{spec.text}: reusing checkpoint {ckpt}")
            return load_model(str(ckpt), dtype=self.settings.dtype).model
        log(f"{spec.text}: building")
        model, removal, seconds = self.build(spec)
        if save and spec.method != "path":
            save_variant(
                model,
                self.base.tokenizer,
                ckpt,
                dict(
                    method=spec.method,
                    spec=spec.text,
                    params=self.params(spec),
                    build_seconds=seconds,
                    removal=removal,
                    calibration_sha256=self.calibration_digests(spec),
                    calibration=self.calibration().description if spec.needs_calibration else None,
                    base_model=self.settings.base_model,
                    base_fingerprint=self.fingerprint(),
                ),
            )
        return model
