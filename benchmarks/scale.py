"""`python -m benchmarks.scale`: the heavy stages at 7B scale, on a random Llama-2-7B-shaped model.

    python -m benchmarks.scale                      # on a GPU: bfloat16, the issue's sizes
    python -m benchmarks.scale --vllm               # also 520 x 256 generations with vLLM
    python -m benchmarks.scale --shape tiny --device cpu --dtype float32   # the same code in seconds

The model is built with random weights directly on the device (no download): Llama-2-7B's shape
(32 layers, width 4096, MLP 11008, 32 heads, vocabulary 32000). Timing does not depend on the
weights' values, with one exception handled here: a random model never emits EOS, so every
generation runs the full 256 tokens (the worst case; aligned models stop early on refusals).

Stages, each timed with peak device memory: Wanda 50% and SparseGPT 50% (block-sequential, 128
calibration sequences of 256 tokens), SNIP scores on 128 samples (one pass), and greedy generation
of 520 prompts x 256 new tokens with the default decoder (and vLLM with --vllm). Prompts are
chat-shaped: a shared 24-token template prefix, 10-35 tokens of their own and a shared 5-token
suffix, like AdvBench goals in a chat template. Goals on one H100: Wanda 50% under 2 minutes,
520 x 256 generations under 2 minutes.
"""

from __future__ import annotations

import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Literal

import torch
import tyro

from compression.calibration import Calibration
from compression.snip import snip_scores_one_pass
from compression.sparsegpt import prune_sparsegpt
from compression.sparsity import SparsityPattern
from compression.wanda import prune_wanda
from lm.cli import parse_config
from lm.continuous_batching import decode_continuous
from lm.errors import UserError, cli
from lm.generation import auto_batch_size, vllm_available

from .measure import measure

SHAPES = {
    "llama-2-7b": dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
        max_position_embeddings=4096,
    ),
    "tiny": dict(
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=512,
        max_position_embeddings=1024,
    ),
}
PREFIX, SUFFIX, OWN = 24, 5, (10, 35)  # chat-template tokens shared by every prompt, and each prompt's own


@dataclass(frozen=True)
class ScaleConfig:
    shape: Literal["llama-2-7b", "tiny"] = "llama-2-7b"  # the random model's shape
    device: str = "cuda"  # where the model is built and run
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"  # weights and activations
    calib_samples: int = 128  # Wanda / SparseGPT calibration sequences
    calib_seqlen: int = 256  # tokens per calibration sequence
    calib_batch: int = 8  # calibration sequences per forward pass
    snip_samples: int = 128  # SNIP (prompt, response) samples
    snip_seqlen: int = 256  # tokens per SNIP sample
    gen_prompts: int = 520  # prompts generated (AdvBench's 520)
    gen_new_tokens: int = 256  # new tokens per prompt
    gen_batch: int = 0  # prompts per decoder batch (0: lm.generation.auto_batch_size)
    vllm: bool = False  # also generate with vLLM (must be installed)
    seed: int = 0  # the random weights and prompts

    def __post_init__(self):
        if self.shape not in SHAPES:
            raise UserError(f"unknown shape {self.shape!r}; choose one of {', '.join(SHAPES)}")
        if (
            min(
                self.calib_samples,
                self.calib_seqlen,
                self.calib_batch,
                self.snip_samples,
                self.snip_seqlen,
                self.gen_prompts,
                self.gen_new_tokens,
            )
            <= 0
            or self.gen_batch < 0
        ):
            raise UserError("benchmark sizes must be positive")


@dataclass(frozen=True)
class ScaleRun:
    #: the run
    cfg: Annotated[ScaleConfig, tyro.conf.OmitArgPrefixes] = ScaleConfig(
        device="cuda" if torch.cuda.is_available() else "cpu"
    )
    json: str | None = None  # write the rows here
    results: str | None = None  # append the table to this markdown file (e.g. benchmarks/RESULTS.md)


def random_model(cfg: ScaleConfig):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(cfg.seed)
    with torch.device(cfg.device):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**SHAPES[cfg.shape]), dtype=getattr(torch, cfg.dtype))
    return model.eval()


def calibration(cfg: ScaleConfig, vocab: int) -> Calibration:
    g = torch.Generator().manual_seed(cfg.seed)
    ids = torch.randint(vocab, (cfg.calib_samples, cfg.calib_seqlen), generator=g)
    batches = [
        dict(input_ids=ids[i : i + cfg.calib_batch], attention_mask=torch.ones_like(ids[i : i + cfg.calib_batch]))
        for i in range(0, len(ids), cfg.calib_batch)
    ]
    return Calibration(batches=batches, digest="random")


def snip_batches(cfg: ScaleConfig, vocab: int, device) -> list[dict]:
    """One sample per batch (|W * grad| per sample); the second half of each sequence is the 'response'."""
    g = torch.Generator().manual_seed(cfg.seed + 1)
    out = []
    for _ in range(cfg.snip_samples):
        ids = torch.randint(vocab, (1, cfg.snip_seqlen), generator=g)
        labels = ids.clone()
        labels[:, : cfg.snip_seqlen // 2] = -100
        out.append(
            {
                k: v.to(device)
                for k, v in dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).items()
            }
        )
    return out


def chat_shaped_prompts(cfg: ScaleConfig, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(cfg.seed + 2)
    prefix, suffix = (
        torch.randint(vocab, (PREFIX,), generator=g).tolist(),
        torch.randint(vocab, (SUFFIX,), generator=g).tolist(),
    )
    lengths = torch.randint(OWN[0], OWN[1] + 1, (cfg.gen_prompts,), generator=g).tolist()
    return [prefix + torch.randint(vocab, (n,), generator=g).tolist() + suffix for n in lengths]


def generate_hf(model, prompts: list[list[int]], cfg: ScaleConfig) -> int:
    """Greedy decoding of every prompt with the default decoder (continuous batching, no stop
    tokens, so every row runs to the limit as vLLM's does with ignore_eos); returns the new tokens."""
    batch = cfg.gen_batch or auto_batch_size(model, max(map(len, prompts)) + cfg.gen_new_tokens, 1)
    order = sorted(prompts, key=len, reverse=True)
    return sum(map(len, decode_continuous(model, order, cfg.gen_new_tokens, stops=[], batch_size=batch)))


def generate_vllm(model, prompts: list[list[int]], cfg: ScaleConfig) -> tuple[int, float]:
    """(new tokens, seconds of generation) for the same prompts through vLLM, served from a saved
    checkpoint as the ASR stage serves variants; the save and engine start are not timed."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    with tempfile.TemporaryDirectory(prefix="scale-vllm-") as tmp:
        model.save_pretrained(tmp)
        llm = LLM(model=tmp, skip_tokenizer_init=True, dtype=cfg.dtype, seed=cfg.seed)
        params = SamplingParams(max_tokens=cfg.gen_new_tokens, temperature=0.0, ignore_eos=True, detokenize=False)
        start = time.perf_counter()
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params)
        seconds = time.perf_counter() - start
        del llm
    return sum(len(o.outputs[0].token_ids) for o in outs), seconds


def run(cfg: ScaleConfig) -> list[dict]:
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("no CUDA device here; use --device cpu (with --shape tiny: 7B on CPU takes hours)")
    rows = []

    def record(stage: str, m, **extra):
        rows.append(dict(stage=stage, seconds=m.seconds, peak_mib=m.peak_mib, resident_mib=m.resident_mib, **extra))
        print(
            f"[scale] {stage}: {m.seconds:.1f} s, peak +{m.peak_mib or 0:.0f} MiB {extra or ''}",
            file=sys.stderr,
            flush=True,
        )

    half = SparsityPattern(ratio=0.5)
    for name, prune in (("Wanda 50%", prune_wanda), ("SparseGPT 50%", prune_sparsegpt)):
        model = random_model(cfg)  # each method prunes a dense model
        calib = calibration(cfg, model.config.vocab_size)
        record(
            f"{name}, {cfg.calib_samples} x {cfg.calib_seqlen} tokens",
            measure(lambda: prune(model, calib, half), cfg.device),
        )
        del model
    model = random_model(cfg)
    params = sum(p.numel() for p in model.parameters())
    batches = snip_batches(cfg, model.config.vocab_size, cfg.device)
    record(
        f"SNIP scores, {cfg.snip_samples} samples x {cfg.snip_seqlen} tokens",
        measure(lambda: snip_scores_one_pass(model, batches), cfg.device),
    )
    prompts = chat_shaped_prompts(cfg, model.config.vocab_size)
    m = measure(lambda: generate_hf(model, prompts, cfg), cfg.device)
    record(
        f"generation, {cfg.gen_prompts} x {cfg.gen_new_tokens} tokens, default decoder",
        m,
        tokens=m.result,
        tokens_per_s=m.result / m.seconds,
    )
    if cfg.vllm:
        if not vllm_available():
            raise UserError("--vllm: vllm is not installed (pip install 'refusal-repair[vllm]')")
        m = measure(lambda: generate_vllm(model, prompts, cfg), cfg.device)
        tokens, seconds = m.result
        m.seconds = seconds  # generation only: the checkpoint save and engine start are not serving time
        record(
            f"generation, {cfg.gen_prompts} x {cfg.gen_new_tokens} tokens, vLLM",
            m,
            tokens=tokens,
            tokens_per_s=tokens / seconds,
        )
    for r in rows:
        r["model_params"] = params
    return rows


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(torch.device(device))} ({torch.cuda.device_count()} visible)"
    return "CPU"


def markdown(rows: list[dict], cfg: ScaleConfig) -> str:
    from .__main__ import utc_now

    lines = [
        f"### `python -m benchmarks.scale` ({cfg.shape}, {rows[0]['model_params'] / 1e9:.2f}B params, {cfg.dtype}): "
        f"{device_name(cfg.device)}, torch {torch.__version__}, {utc_now()}",
        "",
        "| stage | seconds | peak extra MiB | tokens/s |",
        "|---|---|---|---|",
    ]
    for r in rows:
        tps = f"{r['tokens_per_s']:.0f}" if "tokens_per_s" in r else "-"
        lines.append(f"| {r['stage']} | {r['seconds']:.1f} | {r['peak_mib'] or 0:.0f} | {tps} |")
    return "\n".join(lines)


def parse_args(argv=None) -> ScaleRun:
    return parse_config(ScaleRun, argv, prog="python -m benchmarks.scale", description=__doc__.split("\n\n")[0])[0]


@cli
def main(argv=None) -> int:
    run_args = parse_args(argv)
    cfg = run_args.cfg
    rows = run(cfg)
    text = markdown(rows, cfg)
    print(text)
    if run_args.json:
        from lm.cache import atomic_write_json

        atomic_write_json(Path(run_args.json), dict(config=asdict(cfg), device=device_name(cfg.device), rows=rows))
    if run_args.results:
        from lm.cache import atomic_write_text

        results = Path(run_args.results)
        old = results.read_text() if results.is_file() else "# Benchmark results\n"
        atomic_write_text(results, old.rstrip("\n") + "\n\n" + text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
