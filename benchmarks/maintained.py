"""`python -m benchmarks.maintained`: the toolkit's compressors against the maintained implementations.

    python -m benchmarks.maintained                      # every row, embedded model (hours on 2 CPU cores)
    python -m benchmarks.maintained --rows gptq wanda    # some rows
    python -m benchmarks.maintained --no-write           # print the table, leave benchmarks/RESULTS.md alone

Each row compresses the model with the toolkit and with the maintained library on the same
calibration tokens (the toolkit's default calibration set: 128 harmless train instructions, padding
dropped row by row) and the same settings (GPTQ int4 group 128, symmetric, no activation order,
block 128, dampening 0.01; Wanda and SparseGPT at 50% or 2:4 over every decoder linear):

    gptq       toolkit GPTQ   vs GPTQModel (its `quantize`) and llm-compressor's GPTQModifier (W4A16)
    wanda      toolkit Wanda  vs llm-compressor's WandaPruningModifier
    sparsegpt  toolkit SparseGPT 50% vs llm-compressor's SparseGPTModifier
    sparsegpt24  the same at 2:4

Each maintained checkpoint must pass the repair job's derivation check against the original (only
decoder linears changed, within the format's bound). Every compressed model is then measured the same way: wikitext-2 perplexity (the repair job's
windows) and ASR on held-out harmful prompts (Arditi judge, greedy), each with its 95% interval,
and each maintained model against the toolkit's on the same windows and prompts (perplexity ratio
with a paired bootstrap and the exact Wilcoxon signed-rank test; exact McNemar on the verdicts),
Holm-corrected over the table. Measurements go to the shared store (`runs/measurements`), so
`python -m repair` on one of these checkpoints reuses them.

llm-compressor pins an older transformers than the toolkit's, so it runs in its own virtual
environment, made on first use (`--llmcompressor-env`, pip install of torch and llm-compressor
there), through benchmarks/llmcompressor_run.py. GPTQModel is the `gptq` extra of this project.
The compressed checkpoints stay in the run directory: a rerun reuses every finished one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch

from lm.cache import atomic_dir, atomic_write_json, cache_root, cached_json, measured, timed
from lm.cli import parse_config
from lm.errors import UserError, cli

RESULTS = Path(__file__).with_name("RESULTS.md")
BEGIN, END = "<!-- python -m benchmarks.maintained: begin -->", "<!-- python -m benchmarks.maintained: end -->"
LLMCOMPRESSOR = "llmcompressor==0.14.0.1"  # pins transformers <= 5.17, so its own environment
JUDGE = "arditi2024"


@dataclass(frozen=True)
class Implementation:
    name: str  # as the table shows it
    kind: str  # "toolkit", "gptqmodel" or "llmcompressor"
    method: str  # toolkit variant spec, or the llm-compressor recipe of benchmarks/llmcompressor_run.py


ROWS = {
    "gptq": (
        "GPTQ int4 g128",
        (
            Implementation("toolkit", "toolkit", "gptq:int4"),
            Implementation("GPTQModel 7.6", "gptqmodel", "int4-g128"),
            Implementation("llm-compressor 0.14", "llmcompressor", "gptq-w4a16"),
        ),
    ),
    "wanda": (
        "Wanda 50%",
        (
            Implementation("toolkit", "toolkit", "wanda:0.5"),
            Implementation("llm-compressor 0.14", "llmcompressor", "wanda-0.5"),
        ),
    ),
    "sparsegpt": (
        "SparseGPT 50%",
        (
            Implementation("toolkit", "toolkit", "sparsegpt:0.5"),
            Implementation("llm-compressor 0.14", "llmcompressor", "sparsegpt-0.5"),
        ),
    ),
    "sparsegpt24": (
        "SparseGPT 2:4",
        (
            Implementation("toolkit", "toolkit", "sparsegpt:2:4"),
            Implementation("llm-compressor 0.14", "llmcompressor", "sparsegpt-2:4"),
        ),
    ),
}


@dataclass(frozen=True)
class MaintainedRun:
    model: str = "embedded"
    rows: tuple[Literal[tuple(ROWS)], ...] = tuple(ROWS)  # which comparisons
    #: maintained implementations to run
    libraries: tuple[Literal["gptqmodel", "llmcompressor"], ...] = (
        "gptqmodel",
        "llmcompressor",
    )
    calibration_samples: int = 128  # harmless train instructions (the toolkit's default calibration)
    n_per_set: int = 50  # held-out harmful prompts per evaluation set (AdvBench, JailbreakBench)
    max_new_tokens: int = 64
    ppl_windows: int = 8  # wikitext-2 windows of 512 tokens (the repair job's)
    run_dir: str = "runs/maintained"  # compressed checkpoints and timings
    measurements_dir: str = "runs/measurements"  # the measurement store shared with the other entry points
    llmcompressor_env: str | None = None  # virtual environment for llm-compressor (default: in the cache)
    results: str = str(RESULTS)
    write: bool = True  # write the table into --results (--no-write: print it only)

    def __post_init__(self):
        if self.calibration_samples <= 0 or self.n_per_set <= 0 or self.max_new_tokens <= 0 or self.ppl_windows <= 0:
            raise UserError("calibration samples, prompts per set, new tokens and windows must be positive")


def llmcompressor_python(env: Path) -> Path:
    """The Python of llm-compressor's environment, made (venv + pip) when it is not there yet."""
    python = env / "bin" / "python"
    probe = [str(python), "-c", "import llmcompressor"]
    if python.is_file() and subprocess.run(probe, capture_output=True).returncode == 0:
        return python
    print(
        f"making llm-compressor's environment in {env} ({LLMCOMPRESSOR}, torch {torch.__version__.split('+')[0]}) ...",
        file=sys.stderr,
        flush=True,
    )
    subprocess.run([sys.executable, "-m", "venv", str(env)], check=True)
    pip = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", f"torch=={torch.__version__.split('+')[0]}", LLMCOMPRESSOR]
    )
    if pip.returncode != 0 or subprocess.run(probe, capture_output=True).returncode != 0:
        raise UserError(f"could not install {LLMCOMPRESSOR} into {env}; see pip's output above")
    return python


def compress_external(impl: Implementation, model_dir: str, rows: list[list[int]], out: Path, env: Path) -> dict:
    """The maintained library's checkpoint in `out` (made once, atomically) and how long it took."""
    record = out / "benchmark_compression.json"
    if record.is_file():
        return json.loads(record.read_text())
    with atomic_dir(out) as tmp:
        start, cpu = time.perf_counter(), time.process_time()
        if impl.kind == "gptqmodel":
            from lm.packed import PackedFormat, require
            from lm.packed.gptq import quantize_with_gptqmodel

            require(PackedFormat("gptq", 4, 128, {}))  # a missing extra is one line, before any work
            quantize_with_gptqmodel(model_dir, str(tmp), rows, bits=4, group_size=128)
        else:
            calibration = tmp / "calibration_tokens.json"
            calibration.write_text(json.dumps(rows))
            script = Path(__file__).with_name("llmcompressor_run.py")
            proc = subprocess.run(
                [str(llmcompressor_python(env)), str(script), model_dir, str(calibration), impl.method, str(tmp)]
            )
            calibration.unlink()
            if proc.returncode != 0:
                raise UserError(f"llm-compressor failed on {impl.method} (exit {proc.returncode}); its output is above")
        seconds = time.perf_counter() - start
        atomic_write_json(
            tmp / "benchmark_compression.json",
            dict(seconds=seconds, cpu_seconds_this_process=time.process_time() - cpu),
        )
    return json.loads(record.read_text())


def measure_model(model, tok, model_id, a: MaintainedRun) -> dict:
    from lm.perplexity import PerplexityConfig, measure_perplexity
    from refusal.measure import EvalConfig, measure

    store = Path(a.measurements_dir)
    pcfg = PerplexityConfig(windows=a.ppl_windows, seqlen=512)
    asr = measure(model, tok, EvalConfig(n=a.n_per_set, max_new_tokens=a.max_new_tokens), store, model_id)
    # `model` may be a builder; measure() has called it if generation was needed, so build once.
    ppl = measured(store, "perplexity", model_id, [pcfg], lambda: timed(lambda: measure_perplexity(model(), tok, pcfg)))
    return dict(asr=asr, perplexity=ppl)


def run_row(key: str, a: MaintainedRun, base, calibration, fingerprint: str, env: Path) -> list[dict]:
    from compression.checkpoint import sparsity_report
    from compression.variants import build_variant, parse_variant
    from lm.loading import load_model, model_fingerprint
    from repair.derivation import derivation_records

    out = []
    for impl in ROWS[key][1]:
        if impl.kind != "toolkit" and impl.kind not in a.libraries:
            continue
        built = {}
        if impl.kind == "toolkit":
            model_id = dict(base=fingerprint, variant=impl.method, calibration=calibration.digest)

            def build(impl=impl):
                if "model" not in built:
                    start = time.perf_counter()
                    built["model"] = build_variant(base.model, parse_variant(impl.method), calibration)
                    built["seconds"] = time.perf_counter() - start
                return built["model"]

            timing = cached_json(
                Path(a.run_dir) / "toolkit" / f"{impl.method.replace(':', '-')}.json",
                model_id,
                lambda build=build: dict(
                    seconds=(build(), built["seconds"])[1],
                    sparsity=sparsity_report(built["model"])["decoder_linear_sparsity"],
                ),
            )
            where = "in memory"
        else:
            path = Path(a.run_dir) / "models" / f"{impl.kind}-{impl.method.replace(':', '-')}"
            timing = compress_external(impl, base.path, calibration.rows(), path, env)
            fp_file = path / "benchmark_fingerprint.json"  # the checkpoint never changes once written
            if fp_file.is_file():
                model_id = json.loads(fp_file.read_text())["fingerprint"]
                loaded = None
            else:
                loaded = load_model(str(path))
                derivation_records(base, loaded)  # e.g. a pruned LM head or embedding stops the row here
                model_id = model_fingerprint(loaded.model)
                atomic_write_json(
                    fp_file,
                    dict(fingerprint=model_id, sparsity=sparsity_report(loaded.model)["decoder_linear_sparsity"]),
                )
            timing = dict(timing, sparsity=json.loads(fp_file.read_text())["sparsity"])

            def build(path=path, loaded=loaded):
                if "model" not in built:
                    built["model"] = (loaded or load_model(str(path))).model
                return built["model"]

            where = str(path)
        print(f"[{time.strftime('%H:%M:%S')}] {ROWS[key][0]}, {impl.name}: measuring", file=sys.stderr, flush=True)
        m = measure_model(build, base.tokenizer, model_id, a)
        out.append(
            dict(
                row=ROWS[key][0],
                implementation=impl.name,
                method=impl.method,
                where=where,
                seconds=timing["seconds"],
                sparsity=timing["sparsity"],
                **m,
            )
        )
        built.clear()
    return out


def compare(results: list[dict], original: dict) -> list[dict]:
    """Every maintained model against the toolkit's in its row, Holm over the table per measure."""
    from refusal.measure import paired, perplexity_rate
    from refusal.stats import add_holm, paired_perplexity_ratio

    tests = []
    for r in results:
        r["ppl"] = perplexity_rate(r["perplexity"])
        r["asr_rate"] = r["asr"]["rates"]["asr"][JUDGE]
        toolkit = next(t for t in results if t["row"] == r["row"] and t["implementation"] == "toolkit")
        r["vs_original_asr"] = paired(r["asr"], original["asr"], JUDGE)
        if r is toolkit:
            continue
        p, q = r["perplexity"], toolkit["perplexity"]
        r["ppl_vs_toolkit"] = paired_perplexity_ratio(p["window_nll"], q["window_nll"], p["window_tokens"])
        r["asr_vs_toolkit"] = paired(r["asr"], toolkit["asr"], JUDGE)
        tests.append(r)
    add_holm([r["ppl_vs_toolkit"] for r in tests])
    add_holm([r["asr_vs_toolkit"] for r in tests])
    add_holm([r["vs_original_asr"] for r in results])
    return results


def table(results: list[dict], original: dict) -> str:
    from refusal.measure import perplexity_rate
    from refusal.stats import fmt_rate, fmt_value_ci

    head = [
        "compression",
        "implementation",
        "time s",
        "zeros",
        "perplexity [95% CI]",
        "ppl ratio to toolkit [95% CI]",
        "p (Wilcoxon, Holm)",
        "ASR [95% CI]",
        "b / c vs toolkit",
        "p (McNemar, Holm)",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    o = original
    lines.append(
        f"| none | original | - | - | {fmt_value_ci(perplexity_rate(o['perplexity']))} | - | - | "
        f"{fmt_rate(o['asr']['rates']['asr'][JUDGE])} | - | - |"
    )
    for r in results:
        t, m = r.get("ppl_vs_toolkit"), r.get("asr_vs_toolkit")
        ratio = f"{t['ratio']:.3f} [{t['ci95'][0]:.3f}, {t['ci95'][1]:.3f}]" if t else "-"
        lines.append(
            "| "
            + " | ".join(
                [
                    r["row"],
                    r["implementation"],
                    f"{r['seconds']:.1f}",
                    f"{r['sparsity']:.1%}",
                    fmt_value_ci(r["ppl"]),
                    ratio,
                    f"{t['p_holm']:.2g}" if t else "-",
                    fmt_rate(r["asr_rate"]),
                    f"{m['b']} / {m['c']}" if m else "-",
                    f"{m['p_holm']:.2g}" if m else "-",
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def section(table_text: str, a: MaintainedRun, argv: list[str], n_tokens: int, n_prompts: int, seconds: float) -> str:
    from .__main__ import heading, machine

    return "\n".join(
        [
            BEGIN,
            heading("python -m benchmarks.maintained", argv),
            "",
            f"Machine: {machine()}. Wall time {seconds / 60:.0f} min (reused checkpoints and measurements count zero). "
            f"Model {a.model}; calibration: {a.calibration_samples} harmless train instructions, {n_tokens:,} tokens, the same "
            f"for every implementation. Perplexity: wikitext-2, {a.ppl_windows} windows of 512 tokens (bootstrap over windows); "
            f"ASR: {n_prompts} held-out harmful prompts, greedy, {a.max_new_tokens} new tokens, Arditi et al.'s judge (Wilson). "
            "Ratio and b / c compare each maintained implementation with the toolkit's in its row on the same windows and prompts "
            "(b: prompts only the maintained model answered); p-values Holm-corrected over the table, per measure. "
            "Time: the compression's wall clock on this machine (llm-compressor's in its own process).",
            "",
            table_text,
            END,
        ]
    )


@cli
def main(argv=None) -> int:
    from compression.calibration import CalibrationConfig, calibration_set
    from lm.loading import load_model, model_fingerprint, resolve

    argv = sys.argv[1:] if argv is None else list(argv)
    a = parse_config(MaintainedRun, argv, prog="python -m benchmarks.maintained", description=__doc__.split("\n\n")[0])[
        0
    ]
    resolve(a.model)
    env = Path(a.llmcompressor_env) if a.llmcompressor_env else cache_root() / "envs" / LLMCOMPRESSOR.replace("==", "-")
    start = time.perf_counter()
    base = load_model(a.model)
    fingerprint = model_fingerprint(base.model)
    calibration = calibration_set(base.tokenizer, CalibrationConfig(n_samples=a.calibration_samples))
    original = measure_model(lambda: base.model, base.tokenizer, fingerprint, a)
    results = []
    for key in a.rows:
        results.extend(run_row(key, a, base, calibration, fingerprint, env))
    compare(results, original)
    text = section(
        table(results, original),
        a,
        argv,
        calibration.n_tokens,
        original["asr"]["rates"]["n"],
        time.perf_counter() - start,
    )
    print(text)
    keep = (
        "row",
        "implementation",
        "method",
        "where",
        "seconds",
        "sparsity",
        "ppl",
        "asr_rate",
        "ppl_vs_toolkit",
        "asr_vs_toolkit",
        "vs_original_asr",
    )
    atomic_write_json(
        Path(a.run_dir) / "maintained.json",
        dict(settings=asdict(a), rows=[{k: r.get(k) for k in keep} for r in results]),
    )
    if a.write:
        from .__main__ import write_results

        write_results(Path(a.results), text, BEGIN, END)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
