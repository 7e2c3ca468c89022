"""One loader for every way a user names a model: 'embedded', a hub id, a local directory, a .gguf file."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError

from .embedded import EMBEDDED_NAME, converted_gguf_dir, embedded_model_dir
from .errors import UserError

# transformers 5 silently builds an empty tokenizer when a directory has none of these.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    spec: str  # what the user asked for
    path: str  # local directory (or hub id) the weights came from
    name: str  # human-readable name for reports
    packed: object = None  # lm.packed.PackedFormat when the checkpoint is stored quantized (read dequantized)


def resolve(spec: str) -> tuple[str, str]:
    """Map a model spec to (local dir or hub id, display name), converting embedded/GGUF once."""
    check_model_spec(spec)
    if spec == "embedded":
        return str(embedded_model_dir()), EMBEDDED_NAME
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        return str(converted_gguf_dir(path)), path.name
    if path.exists():
        return str(path), path.name
    return spec, spec  # hub id


# Path prefixes of huggingface.co itself, so no hub user or organisation has these names.
HUB_RESERVED = ("models", "datasets", "spaces")


def path_like(spec: str) -> bool:
    """Whether a model spec names a local path rather than a hub id ('org/name'): it starts with
    '.', '/' or '~', has more than one '/', a backslash or a .gguf suffix, or its first part is a
    local directory or a name no hub account can have (models/x)."""
    if spec.startswith((".", "/", "~")) or "\\" in spec or spec.count("/") > 1 or spec.endswith(".gguf"):
        return True
    first = spec.split("/")[0]
    return "/" in spec and (first in HUB_RESERVED or Path(first).is_dir())


def check_model_spec(spec: str) -> None:
    """The checks of a model spec that need no model: a local path exists and holds a loadable
    checkpoint. A path-like spec that does not exist is an error here, never a hub lookup."""
    if spec == "embedded":
        return
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UserError(f"GGUF file not found: {spec}")
        return
    if path.exists():
        if not path.is_dir():
            raise UserError(
                f"not a model directory: {spec} (expected a directory with config.json and *.safetensors, or a .gguf file)"
            )
        if not (path / "config.json").is_file():
            raise UserError(f"no config.json in {spec}: not a Hugging Face model directory")
        if not any(path.glob("*.safetensors")):
            raise UserError(
                f"no *.safetensors weights in {spec}; only safetensors checkpoints are loaded (never pickles)"
            )
        if not any((path / f).is_file() for f in TOKENIZER_FILES):
            raise UserError(
                f"no tokenizer in {spec} (expected one of {', '.join(TOKENIZER_FILES)}); save the tokenizer with the model"
            )
        return
    if path_like(spec) or os.sep in spec.strip("/").replace("/", "", 1):
        raise UserError(f"model path not found: {spec}")


def load_model(
    spec: str,
    dtype: str | torch.dtype = "float32",
    device: str | None = None,
    device_map: str | dict | None = None,
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load a causal LM and its tokenizer; errors are one-line `UserError`s."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise UserError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    path, name = resolve(spec)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except OSError as e:
        where = "" if Path(path).exists() else " (no such local directory; looked up as a Hugging Face hub id)"
        raise UserError(f"cannot load model {spec!r}{where}: {str(e).splitlines()[0]}") from None
    except ValueError as e:
        raise UserError(f"cannot load model {spec!r}: {str(e).splitlines()[0]}") from None
    packed = None
    if Path(path).is_dir():
        from .packed import load_packed, packed_format

        if packed_format(Path(path)) is not None:
            model, packed = load_packed(path, spec, dtype)
    try:
        model = (
            model
            if packed is not None
            else AutoModelForCausalLM.from_pretrained(
                path,
                dtype=dtype,
                device_map=device_map,
                use_safetensors=True,
                trust_remote_code=trust_remote_code,
            )
        )
    except ValueError as e:  # e.g. a config that is not a causal LM
        raise UserError(
            f"cannot load {spec!r} as a causal LM ({config.model_type}): {str(e).splitlines()[0]}"
        ) from None
    except (OSError, SafetensorError) as e:  # SafetensorError: truncated or corrupt weight file
        raise UserError(f"cannot load weights of {spec!r}: {str(e).splitlines()[0]}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:  # ValueError covers a malformed tokenizer.json
        raise UserError(f"cannot load the tokenizer of {spec!r}: {str(e).splitlines()[0]}") from None
    if device_map is None and device is not None:
        model.to(device)
    model.eval()
    check_model(model, spec)
    prepare_tokenizer(tokenizer)
    return LoadedModel(model=model, tokenizer=tokenizer, spec=spec, path=path, name=name, packed=packed)


SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def stored_dtype(path) -> torch.dtype | None:
    """The floating dtype most of a checkpoint directory's stored weights have (read from the
    safetensors headers, no tensor data): what an output derived from it should be saved in, so a
    bfloat16 model is not written back at twice its size. None: no floating safetensors weights."""
    from safetensors import safe_open

    counts: dict[torch.dtype, int] = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                piece = f.get_slice(name)
                dtype = SAFETENSORS_DTYPES.get(piece.get_dtype())
                if dtype is not None:
                    n = 1
                    for d in piece.get_shape():
                        n *= d
                    counts[dtype] = counts.get(dtype, 0) + n
    return max(counts, key=counts.get) if counts else None


def prepare_tokenizer(tokenizer) -> None:
    """Left padding for batched generation; fall back to EOS as pad token where none is defined."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def check_model(model: torch.nn.Module, spec: str) -> None:
    from .architecture import check_linears

    try:
        check_linears(model)
    except UserError as e:
        raise UserError(f"{spec!r}: {e}") from None
    for name, param in model.named_parameters():
        if not torch.isfinite(param).all():
            raise UserError(f"model {spec!r} has non-finite (NaN/inf) weights in {name}")


def model_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 over parameter names, shapes and bytes: identifies a base model across processes."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
