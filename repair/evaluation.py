"""Measuring one state of the repair (original, compressed, AIRD, targeted, a curve point):
behaviour on held-out prompts through refusal.measure's shared store, utility, the direction at the
original's source and its quality, and the probes; every part cached under the state's directory."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from compression.checkpoint import sparsity_report
from lm.cache import cached_json, cached_tensors
from lm.perplexity import PerplexityConfig
from refusal.behaviour import BehaviourConfig, measure_behaviour
from refusal.collapse import collapse_verdict
from refusal.direction import candidate_directions, cosine_map
from refusal.judge_spec import judge_panel
from refusal.measure import EvalConfig
from refusal.probes import ProbeConfig
from refusal.probing import fitted_probe_parameters, harmfulness_probes, refusal_prediction_probes, training_prompts
from refusal.quality import direction_quality

from .config import RepairConfig
from .stages import Diagnosis, digest


class StateEvaluation:
    """Evaluates model states under one repair's settings and diagnosis."""

    def __init__(self, cfg: RepairConfig, tokenizer, diagnosis: Diagnosis):
        self.cfg, self.tok, self.d = cfg, tokenizer, diagnosis
        self.judges = judge_panel(cfg.judges)  # None without --judges

    @property
    def store(self) -> Path:
        return (
            Path(self.cfg.measurements_dir) if self.cfg.measurements_dir else Path(self.cfg.runs_dir) / "measurements"
        )

    def eval_config(self, setting: str = "vanilla", n: int | None = None) -> EvalConfig:
        c = self.cfg
        return EvalConfig(
            sets=c.eval_sets,
            n=n or c.n_asr,
            setting=setting,
            max_new_tokens=c.max_new_tokens,
            seed=c.seed,
            batch_size=c.batch_size,
        )

    def behaviour_config(self, settings: tuple[str, ...]) -> BehaviourConfig:
        """A full state's held-out measurements (refusal.behaviour), the ASR `settings` given."""
        c = self.cfg
        zero_shot = None
        if c.zero_shot_limit != 0:
            from lm.zero_shot import ALL_TASKS, ZeroShotConfig

            zero_shot = ZeroShotConfig(tasks=c.zero_shot_tasks or ALL_TASKS, limit=c.zero_shot_limit)
        return BehaviourConfig(
            asr=self.eval_config(),
            settings=settings,
            harmless=self.eval_config().harmless(c.harmless_sets, c.n_harmless),
            perplexity=PerplexityConfig(windows=c.ppl_windows, seqlen=c.ppl_seqlen),
            zero_shot=zero_shot,
        )

    def evaluate(
        self, model, name: str, where: Path, model_id, full: bool = True, reference: dict | None = None
    ) -> dict:
        """Behaviour, utility and direction of one model state, every part cached.

        `model_id` keys the measurements in the shared store: the weight fingerprint for the
        original and the compressed checkpoint (so a comparison run's measurements are reused),
        the restoration for a repaired state. `reference` is the original's evaluation (its
        perplexity for the collapse check, its fitted probes), None for the original itself.
        """
        c, tok, store, d = self.cfg, self.tok, self.store, self.d
        fp_key = dict(model=model_id)
        # The adversarial suffixes cost three generations each; they are measured for the AIRD
        # table's states (original, compressed, AIRD), vanilla ASR for the rest.
        settings = (
            ("vanilla", "adv_suffix")
            if (full and c.adv_suffix and name in ("original", "compressed", "aird"))
            else ("vanilla",)
        )
        if not full:
            # The restoration curve's points: vanilla ASR on fewer prompts, read by the keyword judges only.
            bcfg = BehaviourConfig(asr=self.eval_config("vanilla", c.curve_n_asr), settings=settings, judges=False)
            return measure_behaviour(model, tok, bcfg, store, model_id).to_json()
        out = measure_behaviour(model, tok, self.behaviour_config(settings), store, model_id, self.judges).to_json()
        train = (d.prompts["harmful_train"], d.prompts["harmless_train"])
        dirs = cached_tensors(
            where / "directions.safetensors",
            {**fp_key, "prompts": digest(list(train))},
            lambda: {"directions": candidate_directions(model, tok, *train)["directions"]},
        )
        cos = cosine_map(dirs["directions"], d.selection.directions)
        own = cosine_map(dirs["directions"][d.cell], d.direction)
        out["direction"] = dict(
            cosine_at_source=float(own), cosine_map=[[round(float(x), 4) for x in row] for row in cos]
        )
        out["directions_tensor"] = dirs["directions"]
        out["quality"] = cached_json(
            where / "quality_original_direction.json",
            {**fp_key, "source": list(d.source)},
            lambda: direction_quality(
                model,
                tok,
                d.direction,
                d.source[1],
                d.prompts["harmful_val"],
                d.prompts["harmless_val"],
                d.selection.refusal_token_ids,
                c.batch_size or 32,
            ).to_json(),
        )
        if c.probes:
            out.update(
                self.probes(
                    model,
                    name,
                    where,
                    model_id,
                    out["asr_vanilla"],
                    None if reference is None else reference["fitted_probes"],
                )
            )
        out["sparsity"] = {k: v for k, v in sparsity_report(model).items() if k != "per_matrix"}
        out["collapse"] = collapse_verdict(
            out["asr_vanilla"]["completions"],
            out["perplexity"]["perplexity"],
            None if reference is None else reference["perplexity"]["perplexity"],
        ).to_json()
        return out

    def probes(self, model, name: str, where: Path, model_id, asr: dict, ref: dict | None) -> dict:
        """Harmfulness probes (own and the original's) and the original's refusal-prediction probe
        on this state. The original's (ref None) are fitted and returned as `fitted_probes`, which
        every later state is read with."""
        c, tok, d = self.cfg, self.tok, self.d
        pcfg, batch = ProbeConfig(seed=c.seed), c.batch_size or 16
        test = [
            [p.text for p in cfg.prompts()]
            for cfg in (self.eval_config(), self.eval_config().harmless(c.harmless_sets, c.n_harmless))
        ]
        train = (d.prompts["harmful_train"], d.prompts["harmless_train"])
        key = dict(
            model=model_id,
            train=digest(list(train)),
            test=digest(test),
            probe=dataclasses.asdict(pcfg),
            original_probes=None if ref is None else ref["key"],
        )
        out = dict(
            probes=cached_tensors(
                where / "probes.safetensors",
                key,
                lambda: harmfulness_probes(
                    model, tok, train, (test[0], test[1]), pcfg, None if ref is None else ref["harmfulness"], batch
                ),
            )
        )
        if c.n_refusal_probe:
            prompts = training_prompts(c.n_refusal_probe, c.seed)
            rkey = dict(
                key,
                train=digest([p.id for p in prompts]),
                test=digest([r["id"] for r in asr["records"]]),
                generation=dataclasses.asdict(self.eval_config().asr_config()),
            )
            # Only the original's probe is fitted (its training generations are the main job's, in the
            # shared store); each repaired state is read with it, which needs no generation beyond its ASR.
            out["refusal_probes"] = cached_tensors(
                where / "refusal_probes.safetensors",
                rkey,
                lambda: refusal_prediction_probes(
                    model,
                    tok,
                    prompts,
                    self.eval_config(),
                    self.store,
                    model_id,
                    asr,
                    pcfg,
                    None if ref is None else ref["refusal"],
                    batch,
                    fit=ref is None,
                ),
            )
        if ref is None:
            out["fitted_probes"] = dict(
                harmfulness=fitted_probe_parameters(out["probes"]),
                key=digest(key),
                refusal=fitted_probe_parameters(out["refusal_probes"]) if "refusal_probes" in out else None,
            )
        return out
