"""The repaired checkpoint a user gets: stored in the compressed input's precision, loadable as
docs/repair-output.md shows, and a missing input reported before any model loads."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from compression.calibration import CalibrationConfig, calibration_set
from compression.checkpoint import save_variant
from compression.variants import build_variant, parse_variant
from repair.__main__ import main
from tests.repair.test_repair import SMALL
from tests.tiny import build_model, build_tokenizer, save_tiny

DOC = Path(__file__).parents[2] / "docs" / "repair-output.md"


@pytest.fixture(scope="module")
def bf16_pair(tmp_path_factory):
    """A tiny original and its Wanda-pruned variant, both stored in bfloat16."""
    root = tmp_path_factory.mktemp("bf16")
    tokenizer = build_tokenizer("chatml")
    original = build_model("qwen2", tokenizer, seed=0, hidden=128, layers=4)
    pruned = build_variant(
        original, parse_variant("wanda:0.5"), calibration_set(tokenizer, CalibrationConfig(n_samples=8, seed=0))
    )
    save_tiny(root / "original", original.to(torch.bfloat16), tokenizer)
    save_variant(pruned.to(torch.bfloat16), tokenizer, root / "pruned", dict(method="wanda", params={"sparsity": 0.5}))
    return root


def stored_dtypes(directory: Path) -> set[str]:
    out = set()
    for file in directory.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            out |= {f.get_slice(name).get_dtype() for name in f.keys()}
    return out


def doc_block(heading: str) -> str:
    """The first python code block under `heading` in docs/repair-output.md."""
    text = DOC.read_text()
    section = text[text.index(heading) :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_a_bf16_checkpoint_is_repaired_into_bf16_and_loads_as_the_docs_show(bf16_pair, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "repaired"
    code = main(
        [
            "--original",
            str(bf16_pair / "original"),
            "--compressed",
            str(bf16_pair / "pruned"),
            "--out",
            str(out),
            "--runs-dir",
            str(tmp_path / "runs"),
            *SMALL,
        ]
    )
    assert code == 0, capsys.readouterr().err
    assert stored_dtypes(bf16_pair / "pruned") == stored_dtypes(out) == {"BF16"}  # not written back as float32
    assert json.loads((out / "compression.json").read_text())["repair"]["stored_dtype"] == "bfloat16"

    code = doc_block("## Load it with transformers").replace('"runs/my-model-repaired"', repr(str(out)))
    scope: dict = {}
    exec(compile(code, str(DOC), "exec"), scope)  # noqa: S102 - the documented example, run as a user would
    assert scope["model"].dtype == torch.bfloat16 and isinstance(scope["reply"], str)
    # The loaded weights are the repaired ones: the restored count the manifest gives differs from the input.
    pruned = torch.nn.utils.parameters_to_vector(build_back(bf16_pair / "pruned").parameters())
    repaired = torch.nn.utils.parameters_to_vector(scope["model"].parameters())
    restored = json.loads((out / "compression.json").read_text())["repair"]["restored"]
    assert int((pruned != repaired).sum()) == restored > 0


def build_back(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype="auto")


def test_a_missing_compressed_checkpoint_fails_before_any_model_loads(bf16_pair, tmp_path, monkeypatch, capsys):
    import repair.__main__ as entry
    import repair.pipeline

    for module in (entry, repair.pipeline):
        monkeypatch.setattr(
            module, "load_model", lambda *a, **k: pytest.fail("a model was loaded before the paths were checked")
        )
    monkeypatch.chdir(tmp_path)
    code = main(
        [
            "--original",
            str(bf16_pair / "original"),
            "--compressed",
            str(tmp_path / "nowhere"),
            "--out",
            str(tmp_path / "out"),
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error:") and "not found" in err and len(err.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []
