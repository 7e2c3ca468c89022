"""repair.json's content: one row per evaluated state, the paired tests and findings, the probes,
the diagnosis and the choice, and the settings the numbers were measured under."""

from __future__ import annotations

from lm.hooks import decoder_layers
from refusal.judge_report import judges_section
from refusal.judge_spec import judge_panel
from refusal.measure import describe_prompts, perplexity_rate, zero_shot_rates

from .comparisons import COMPARISONS, findings, hollow_section, paired_tests
from .config import RepairConfig
from .probes import summarise_states
from .stages import Choice, Diagnosis


def state_row(e: dict, model_params: int) -> dict:
    """One state's rates (with intervals), perplexity, zero-shot, direction and sparsity."""
    row = dict(
        asr={k.removeprefix("asr_"): v["asr"] for k, v in e.items() if k.startswith("asr_")},
        rates=dict(
            asr={k.removeprefix("asr_"): v["rates"]["asr"] for k, v in e.items() if k.startswith("asr_")},
            over_refusal=e["harmless"]["rates"]["refusal"],
            per_source={s: v["asr"] for s, v in e["asr_vanilla"]["rates"]["per_source"].items()},
            judge_disagreement=e["asr_vanilla"]["rates"]["judge_disagreement"],
        ),
        perplexity=e["perplexity"]["perplexity"],
        perplexity_ci=perplexity_rate(e["perplexity"]),
        zero_shot=(
            {t: v["acc"] for t, v in e["zero_shot"]["per_task"].items()} | {"average": e["zero_shot"]["average"]}
        )
        if "zero_shot" in e
        else None,
        zero_shot_rates=zero_shot_rates(e["zero_shot"]) if "zero_shot" in e else None,
        cosine_at_source=e["direction"]["cosine_at_source"],
        quality=e["quality"],
        sparsity=e["sparsity"],
        collapse=e["collapse"],
    )
    if "restored" in e:
        row["restored"] = e["restored"]
        row["restored_fraction_of_model"] = e["restored"] / model_params
    return row


def summarise_repair(
    cfg: RepairConfig, checkpoint: dict, d: Diagnosis, ch: Choice, evals: dict, curve: dict, model, seconds: float
) -> dict:
    """`checkpoint`: what is known of the input before any stage (original_name, manifest, derivation)."""
    model_params = sum(p.numel() for p in model.parameters())
    rows = {name: state_row(e, model_params) for name, e in evals.items()}
    samples = {
        name: [
            dict(goal=rec["prompt"], source=rec["source"], completion=rec["completions"][0])
            for rec in e["asr_vanilla"]["records"][:3]
        ]
        for name, e in evals.items()
    }
    tests = paired_tests(evals)
    own = d.own_selection
    extra = {}
    if cfg.judges:  # --judges: every judge's rates, tests and agreement on the repair's states (refusal.judge_report)
        extra["judges"] = judges_section(
            judge_panel(cfg.judges),
            {name: dict(asr=e["asr_vanilla"], harmless=e["harmless"]) for name, e in evals.items()},
            [(a, b) for a, b in COMPARISONS if a in evals and b in evals],
            cfg.max_new_tokens,
        )
    return dict(
        original=cfg.original,
        original_name=checkpoint["original_name"],
        compressed=str(cfg.compressed),
        compressed_manifest=checkpoint["manifest"],
        derivation={k: v for k, v in checkpoint["derivation"].items() if k != "per_matrix"},
        source=dict(position=d.source[0], layer=d.source[1]),
        compressed_source=dict(position=own.chosen[0], layer=own.chosen[1]) if own is not None and own.chosen else None,
        probe=dict(
            original=d.orig_reading,
            compressed=d.comp_reading,
            aird=ch.aird_reading,
            n_harmful=len(d.readout_harmful),
            n_harmless=len(d.readout_harmless),
        ),
        aird=ch.aird,
        targeted=ch.targeted,
        front=ch.front.to_json() if ch.front is not None else None,
        curve=curve,
        states=rows,
        tests=tests,
        findings=findings(rows, tests),
        hollow=hollow_section(evals),
        probes=summarise_states(evals, d.cell),
        evaluation=dict(
            harmful=describe_prompts(evals["original"]["asr_vanilla"], len(tests["asr_vanilla"]["arditi2024"])),
            harmless=describe_prompts(evals["original"]["harmless"], len(tests["over_refusal"]["arditi2024"])),
        ),
        samples=samples,
        model_params=model_params,
        n_layers=len(decoder_layers(model)),
        settings=dict(
            n_asr=cfg.n_asr,
            eval_sets=list(cfg.eval_sets),
            harmless_sets=list(cfg.harmless_sets),
            n_harmless=cfg.n_harmless,
            curve_n_asr=cfg.curve_n_asr or cfg.n_asr,
            max_new_tokens=cfg.max_new_tokens,
            n_val=len(d.prompts["harmful_val"]),
            zero_shot_limit=cfg.zero_shot_limit,
            ppl_windows=cfg.ppl_windows,
            ppl_seqlen=cfg.ppl_seqlen,
        ),
        saved=cfg.saved_method,
        wall_seconds=round(seconds, 1),
        **extra,
    )
