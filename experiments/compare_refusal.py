"""The main job: how compression changes a chat model's refusal behaviour and refusal directions.

    python -m experiments.compare_refusal                 # embedded model, default variants
    python -m experiments.compare_refusal --quick         # CI-sized
    python -m experiments.compare_refusal --model Qwen/Qwen2.5-7B-Instruct --variants wanda:0.5 wanda:2:4

For the original and every variant: vanilla ASR on the first AdvBench goals (both judges),
wikitext-2 perplexity, a collapse check, difference-of-means directions at every layer and
post-instruction position, and their cosine to the original's. Each stage leaves an artifact in
runs/<name>/ and is reused on a rerun with the same settings.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from compression.calibration import CalibrationConfig, ResponseCalibrationConfig, calibration_set, response_calibration_set
from compression.checkpoint import read_manifest, save_variant, sparsity_report
from compression.variants import VariantSpec, build_variant, parse_variant, validate_variant
from lm import datasets
from lm.cache import atomic_write_json, atomic_write_text, cached_json, cached_tensors
from lm.chat import post_instruction
from lm.errors import UserError
from lm.loading import load_model, model_fingerprint
from lm.perplexity import perplexity
from refusal.asr import AsrConfig, attack_success
from refusal.collapse import collapse_verdict
from refusal.direction import candidate_directions, cosine_map, norm_peak

DEFAULT_VARIANTS = ("wanda:0.5", "rtn:int8")


@dataclass
class CompareConfig:
    model: str = "embedded"
    variants: tuple[str, ...] = DEFAULT_VARIANTS
    name: str | None = None  # run directory name under runs_dir
    runs_dir: str = "runs"
    n_asr: int = 100  # first n AdvBench goals (Wei et al.'s eval split)
    max_new_tokens: int = 128
    n_train: int = 128  # harmful and harmless instructions for the directions, each
    ppl_windows: int = 8
    ppl_seqlen: int = 512
    calib_samples: int = 128
    batch_size: int | None = None
    seed: int = 0
    dtype: str = "float32"
    save_checkpoints: bool = True

    @classmethod
    def quick(cls, **overrides) -> "CompareConfig":
        """CI-sized: the same stages on a handful of prompts."""
        small = dict(n_asr=8, max_new_tokens=24, n_train=16, ppl_windows=2, ppl_seqlen=256, calib_samples=16)
        return cls(**{**small, **overrides})

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
        for spec in self.specs:
            validate_variant(spec, self.base.model)
        self._fingerprint: str | None = None
        self._calibration = None
        self._responses = None

    # --- shared inputs -------------------------------------------------------------------
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(self.base.model)
        return self._fingerprint

    def calibration(self):
        if self._calibration is None:
            self._calibration = calibration_set(self.base.tokenizer, CalibrationConfig(n_samples=self.cfg.calib_samples, seed=self.cfg.seed))
        return self._calibration

    def responses(self):
        """(instruction, own greedy response) pairs for gradient-based scores (SNIP), generated once."""
        if self._responses is None:
            cfg = ResponseCalibrationConfig(n_samples=self.cfg.calib_samples, max_new_tokens=min(64, self.cfg.max_new_tokens), seed=self.cfg.seed)
            self._responses = response_calibration_set(self.base.model, self.base.tokenizer, cfg)
        return self._responses

    def direction_prompts(self) -> tuple[list[str], list[str]]:
        n, seed = self.cfg.n_train, self.cfg.seed
        return (
            datasets.sample(datasets.instructions("harmful", "train"), n, seed),
            datasets.sample(datasets.instructions("harmless", "train"), n, seed),
        )

    # --- per-variant stages --------------------------------------------------------------
    def variant_model(self, spec: VariantSpec):
        """The variant's model: built once, saved as a checkpoint, reloaded on later runs."""
        if spec.method == "original":
            return self.base.model
        ckpt = self.dir / "variants" / spec.slug / "model"
        params = self.variant_params(spec)
        manifest = read_manifest(ckpt)
        if manifest is not None and manifest.get("params") == params and manifest.get("base_fingerprint") == self.fingerprint():
            _log(f"{spec.text}: reusing checkpoint {ckpt}")
            return load_model(str(ckpt), dtype=self.cfg.dtype).model
        _log(f"{spec.text}: building")
        start = time.perf_counter()
        model = build_variant(
            self.base.model, spec,
            self.calibration() if spec.needs_calibration else None,
            responses=self.responses() if spec.needs_responses else None,
        )
        seconds = time.perf_counter() - start
        if self.cfg.save_checkpoints:
            save_variant(model, self.base.tokenizer, ckpt, dict(
                method=spec.method, spec=spec.text, params=params, build_seconds=seconds,
                calibration_sha256=(self.calibration().digest if spec.needs_calibration
                                    else self.responses().digest if spec.needs_responses else None),
                base_model=self.cfg.model, base_fingerprint=self.fingerprint(),
            ))
        return model

    def variant_params(self, spec: VariantSpec) -> dict:
        params = dict(spec.params)
        if spec.needs_calibration or spec.needs_responses:
            params.update(calib_samples=self.cfg.calib_samples, seed=self.cfg.seed)
        if spec.needs_responses:
            params.update(response_tokens=min(64, self.cfg.max_new_tokens))
        return params

    def evaluate(self, spec: VariantSpec, model) -> dict:
        cfg, tok = self.cfg, self.base.tokenizer
        vdir = self.dir / "variants" / spec.slug
        key = dict(variant=spec.text, params=self.variant_params(spec), base=self.fingerprint())

        asr_cfg = AsrConfig("vanilla", max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, seed=cfg.seed)
        asr = cached_json(vdir / "asr_vanilla.json", {**key, **dataclasses.asdict(asr_cfg), "n": cfg.n_asr},
                          lambda: _timed(lambda: attack_success(model, tok, datasets.advbench_eval(cfg.n_asr), asr_cfg)))
        ppl = cached_json(vdir / "perplexity.json", {**key, "windows": cfg.ppl_windows, "seqlen": cfg.ppl_seqlen},
                          lambda: _timed(lambda: dict(perplexity=perplexity(model, tok, cfg.ppl_windows, cfg.ppl_seqlen))))
        harmful, harmless = self.direction_prompts()
        dirs = cached_tensors(vdir / "directions.safetensors", {**key, "n_train": cfg.n_train, "seed": cfg.seed},
                              lambda: candidate_directions(model, tok, harmful, harmless))
        return dict(asr=asr, perplexity=ppl, directions=dirs, sparsity=sparsity_report(model))

    # --- the whole job -------------------------------------------------------------------
    def run(self) -> dict:
        start = time.perf_counter()
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.dir / "config.json", dataclasses.asdict(self.cfg))
        results = {}
        for spec in self.specs:
            model = self.variant_model(spec)
            _log(f"{spec.text}: evaluating")
            results[spec.slug] = (spec, self.evaluate(spec, model))
            if model is not self.base.model:
                del model
        report = self.summarise(results, time.perf_counter() - start)
        atomic_write_json(self.dir / "report.json", report)
        atomic_write_text(self.dir / "report.md", render_markdown(report))
        _log(f"report: {self.dir / 'report.md'}")
        return report

    def summarise(self, results: dict, seconds: float) -> dict:
        original = results["original"][1]
        ref_dirs = original["directions"]["directions"]
        ref_ppl = original["perplexity"]["perplexity"]
        post = post_instruction(self.base.tokenizer)
        rows = []
        for slug, (spec, r) in results.items():
            dirs = r["directions"]["directions"]
            cos = cosine_map(dirs, ref_dirs)  # [position, layer]
            asr = r["asr"]
            ppl = r["perplexity"]["perplexity"]
            verdict = collapse_verdict(asr["completions"], ppl, ref_ppl)
            peak = norm_peak(dirs)
            ref_peak = norm_peak(ref_dirs)
            rows.append(dict(
                variant=spec.text,
                method=spec.method,
                params=spec.params,
                decoder_sparsity=r["sparsity"]["decoder_linear_sparsity"],
                asr=asr["asr"],
                n_prompts=asr["n_prompts"],
                perplexity=ppl,
                collapse=verdict.to_json(),
                norm_peak_layer=peak,
                cosine_at_original_peak=float(cos[-1, ref_peak]),
                cosine_per_layer_last_position=[round(float(c), 4) for c in cos[-1]],
                cosine_map=[[round(float(c), 4) for c in row] for row in cos],
                direction_norm_last_position=[round(float(n), 3) for n in dirs[-1].norm(dim=-1)],
                samples=[dict(goal=g, completion=c) for g, c in zip(datasets.advbench_eval(3), asr["completions"][:3])],
                seconds=dict(asr=r["asr"].get("seconds"), perplexity=r["perplexity"].get("seconds")),
            ))
        return dict(
            model=self.cfg.model,
            model_name=self.base.name,
            base_fingerprint=self.fingerprint(),
            config=dataclasses.asdict(self.cfg),
            post_instruction_tokens=post.text,
            positions=post.positions,
            n_layers=int(ref_dirs.shape[1]),
            wall_seconds=round(seconds, 1),
            variants=rows,
        )


def _timed(fn) -> dict:
    start = time.perf_counter()
    out = fn()
    out["seconds"] = round(time.perf_counter() - start, 1)
    return out


def render_markdown(report: dict) -> str:
    lines = [
        f"# Refusal under compression: {report['model_name']}",
        "",
        f"Wall time {report['wall_seconds']:.0f} s. ASR: vanilla greedy decoding on the first "
        f"{report['variants'][0]['n_prompts']} AdvBench goals, at most {report['config']['max_new_tokens']} new tokens; "
        "Wei = Wei et al. 2024 judge (31 case-sensitive strings and >= 20 words), Arditi = Arditi et al. 2024 judge "
        "(12 strings, case-insensitive). Directions: difference of means of block inputs at the post-instruction "
        f"tokens `{report['post_instruction_tokens']!r}` over {report['config']['n_train']} harmful + "
        f"{report['config']['n_train']} harmless instructions; cosine to the original's direction at the same (position, layer).",
        "",
        "| variant | decoder sparsity | ASR Wei | ASR Arditi | perplexity | collapsed | norm-peak layer | cos @ original's peak (last pos) | min cos (last pos) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for v in report["variants"]:
        flag = f"**yes** ({v['collapse']['reason']})" if v["collapse"]["collapsed"] else "no"
        lines.append(
            f"| {v['variant']} | {v['decoder_sparsity']:.1%} | {v['asr']['wei2024']:.1%} | {v['asr']['arditi2024']:.1%} | "
            f"{v['perplexity']:.2f} | {flag} | {v['norm_peak_layer']} | {v['cosine_at_original_peak']:.3f} | "
            f"{min(v['cosine_per_layer_last_position'][1:], default=1.0):.3f} |"
        )
    lines += ["", "Collapsed variants are never safe: their ASR reflects broken text, not refusal.", "",
              "## Cosine to the original's direction, per layer (last post-instruction position)", ""]
    n_layers = report["n_layers"]
    lines.append("| variant | " + " | ".join(str(l) for l in range(n_layers)) + " |")
    lines.append("|---|" + "---|" * n_layers)
    for v in report["variants"][1:]:
        lines.append(f"| {v['variant']} | " + " | ".join(f"{c:.2f}" for c in v["cosine_per_layer_last_position"]) + " |")
    lines += ["", "## Sample completions", ""]
    for v in report["variants"]:
        lines.append(f"### {v['variant']}")
        lines.append("")
        for s in v["samples"]:
            text = s["completion"].strip().replace("\n", " ")
            lines.append(f"- **{s['goal']}** → {text[:300]}{'…' if len(text) > 300 else ''}")
        lines.append("")
    return "\n".join(lines)


def parse_args(argv=None) -> CompareConfig:
    p = argparse.ArgumentParser(prog="python -m experiments.compare_refusal", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="embedded", help="'embedded', a hub id, a local safetensors directory, or a .gguf file")
    p.add_argument("--variants", nargs="+", default=None, help=f"variant specs (default: {' '.join(DEFAULT_VARIANTS)}); e.g. wanda:0.6 wanda:2:4 magnitude:0.5 rtn:int4:g32")
    p.add_argument("--name", default=None, help="run directory name (default compare-<model>)")
    p.add_argument("--runs-dir", default="runs")
    p.add_argument("--quick", action="store_true", help="CI-sized run: few prompts, short generations")
    p.add_argument("--n-asr", type=int)
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--n-train", type=int)
    p.add_argument("--ppl-windows", type=int)
    p.add_argument("--ppl-seqlen", type=int)
    p.add_argument("--calib-samples", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--no-checkpoints", action="store_true", help="do not save variant checkpoints")
    a = p.parse_args(argv)
    overrides = {k: v for k, v in dict(
        model=a.model, variants=tuple(a.variants) if a.variants else None, name=a.name, runs_dir=a.runs_dir,
        n_asr=a.n_asr, max_new_tokens=a.max_new_tokens, n_train=a.n_train, ppl_windows=a.ppl_windows, ppl_seqlen=a.ppl_seqlen,
        calib_samples=a.calib_samples, batch_size=a.batch_size, seed=a.seed, dtype=a.dtype,
    ).items() if v is not None}
    if a.no_checkpoints:
        overrides["save_checkpoints"] = False
    if a.quick and "name" not in overrides:
        overrides["name"] = "quick-" + Path(a.model).name.replace("/", "-")
    return CompareConfig.quick(**overrides) if a.quick else CompareConfig(**overrides)


def main(argv=None) -> int:
    try:
        cfg = parse_args(argv)
        for v in cfg.variants:
            parse_variant(v)  # fail on a bad spec before loading anything
        Comparison(cfg).run()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
