"""The probing notebooks (notebooks/probe_*.ipynb) and their helpers in refusal.probe.

The helpers are tested on tiny models; `test_probing_notebooks_execute` (slow) executes both notebooks
top to bottom with nbclient on the embedded model at a small size, in a temporary working directory,
on a kernel that runs this interpreter (a kernelspec written to a temporary JUPYTER_PATH, so a
fresh venv needs no `ipykernel install`); the linear-probe and compare-variant notebooks likewise.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import pytest
import torch

from lm.chat import format_prompts, tokenize_prompts
from lm.errors import UserError
from refusal import probe
from refusal.select import SelectionConfig, SelectionResult
from refusal.selection_artifacts import save_selection

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = ("probe_transformerlens.ipynb", "probe_nnsight.ipynb")  # in this order: the second checks the first
PROBING_MODULES = ("transformer_lens", "nnsight", "nbclient", "nbformat", "ipykernel")
KERNEL = "refusal-repair-probe-test"
CELL_TIMEOUT = 600  # seconds per cell; a whole small run takes well under two minutes


# --- helpers on tiny models ------------------------------------------------------------------


def test_default_layer_is_058_of_depth():
    assert probe.default_layer(24) == 14  # the embedded model's reported layer
    assert probe.default_layer(32) == 19
    assert probe.default_layer(4) == 2


def test_direction_computed_saved_and_read_back(tiny_qwen2, tmp_path, monkeypatch):
    model, tokenizer = tiny_qwen2
    run_dir = tmp_path / "runs" / "probe"
    first = probe.load_probe_direction(model, tokenizer, None, run_dir, n_train=4, seed=1, model_id="tiny")
    path = run_dir / probe.PROBE_DIRECTION_FILE
    assert first.path == path and path.is_file() and first.source == "diff-of-means"
    n_layers = model.config.num_hidden_layers
    assert (first.position, first.layer) == (-1, probe.default_layer(n_layers))
    assert torch.isclose(first.direction.norm(), torch.tensor(1.0))

    from safetensors.torch import load_file

    stored = load_file(str(path))["candidates"]
    torch.testing.assert_close(first.raw, stored[-1, first.layer], rtol=0, atol=0)

    # Same model and sample: the file is reused, nothing is recomputed.
    def fail(*args, **kwargs):
        raise AssertionError("recomputed a cached direction")

    monkeypatch.setattr(probe, "candidate_directions", fail)
    again = probe.load_probe_direction(model, tokenizer, None, run_dir, n_train=4, seed=1, model_id="tiny")
    torch.testing.assert_close(again.direction, first.direction, rtol=0, atol=0)
    # A DIRECTION_DIR without selection artifacts falls back to the same saved file, and says so.
    fallback = probe.load_probe_direction(
        model, tokenizer, tmp_path / "empty", run_dir, n_train=4, seed=1, model_id="tiny"
    )
    assert fallback.source == "diff-of-means" and fallback.how.startswith("no selection.json")
    # Another sample invalidates it.
    with pytest.raises(AssertionError, match="recomputed"):
        probe.load_probe_direction(model, tokenizer, None, run_dir, n_train=4, seed=2, model_id="tiny")


def test_direction_from_a_selection_directory(tiny_qwen2, tmp_path):
    model, tokenizer = tiny_qwen2
    n_layers, d = model.config.num_hidden_layers, model.config.hidden_size
    g = torch.Generator().manual_seed(0)
    shape = (2, n_layers)
    result = SelectionResult(
        config=SelectionConfig(),
        positions=[-2, -1],
        bypass=torch.rand(shape, generator=g, dtype=torch.float64),
        induce=torch.rand(shape, generator=g, dtype=torch.float64),
        kl=torch.zeros(shape, dtype=torch.float64),
        reasons=[[None] * n_layers for _ in range(2)],
        chosen=(-2, 1),
        directions=torch.randn(2, n_layers, d, generator=g),
        refusal_token_ids=[0],
    )
    save_selection(result, tmp_path)
    got = probe.load_probe_direction(model, tokenizer, tmp_path, tmp_path / "unused")
    assert got.source == "selection" and (got.position, got.layer) == (-2, 1)
    torch.testing.assert_close(got.direction, result.directions[0, 1] / result.directions[0, 1].norm())
    assert not (tmp_path / "unused").exists()

    result.chosen = None  # nothing passed the filters: the default (position, layer) of the candidates
    save_selection(result, tmp_path)
    got = probe.load_probe_direction(model, tokenizer, tmp_path)
    assert (got.position, got.layer) == (-1, probe.default_layer(n_layers))
    torch.testing.assert_close(got.raw, result.directions[1, got.layer])


def test_selection_of_another_model_is_refused(tiny_qwen2, tmp_path):
    model, tokenizer = tiny_qwen2
    n_layers, d = model.config.num_hidden_layers, model.config.hidden_size
    for layers, width, match in ((n_layers + 1, d, "layers"), (n_layers, d + 2, "width")):
        shape = (1, layers)
        save_selection(
            SelectionResult(
                config=SelectionConfig(),
                positions=[-1],
                bypass=torch.zeros(shape, dtype=torch.float64),
                induce=torch.ones(shape, dtype=torch.float64),
                kl=torch.zeros(shape, dtype=torch.float64),
                reasons=[[None] * layers],
                chosen=(-1, 0),
                directions=torch.ones(1, layers, width),
                refusal_token_ids=[0],
            ),
            tmp_path,
        )
        with pytest.raises(UserError, match=match):
            probe.load_probe_direction(model, tokenizer, tmp_path)


def test_toolkit_resid_last_equals_hf_hidden_states(tiny_qwen2):
    model, tokenizer = tiny_qwen2
    harmful, harmless = probe.probe_instructions(3, seed=0)
    prompts = format_prompts(tokenizer, harmful + harmless)
    got = probe.toolkit_resid_last(model, tokenizer, prompts, batch_size=4)
    n_layers = model.config.num_hidden_layers
    assert got.shape == (6, n_layers, model.config.hidden_size)
    with torch.no_grad():
        enc = tokenize_prompts(tokenizer, prompts)
        hidden = model.model(**enc, output_hidden_states=True).hidden_states
    want = torch.stack([hidden[layer][:, -1] for layer in range(n_layers)], dim=1)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_probe_instructions_are_held_out():
    from lm.datasets import instructions

    harmful, harmless = probe.probe_instructions(8, seed=3)
    assert len(harmful) == len(harmless) == 8
    assert not set(harmful) & set(instructions("harmful", "train"))
    assert set(harmful) <= set(instructions("harmful", "test"))


def test_projection_and_figure():
    unit = torch.tensor([0.6, 0.8])
    resid = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[3.0, 4.0], [0.0, 0.0]]])  # [n=2, layers=2, d=2]
    torch.testing.assert_close(probe.project(resid, unit), torch.tensor([[0.6, 0.8], [5.0, 0.0]], dtype=torch.float64))
    harmful = torch.tensor([[1.0, 5.0], [1.0, 7.0]], dtype=torch.float64)
    harmless = torch.tensor([[1.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
    torch.testing.assert_close(
        probe.separation(harmful, harmless), torch.tensor([0.0, 4 / 2**0.5], dtype=torch.float64)
    )
    direction = probe.ProbeDirection(unit, unit, -1, 1, "diff-of-means", Path("x"), "test")
    fig = probe.projection_figure(harmful, harmless, direction, "title")
    assert fig.layout.xaxis.title.text and fig.layout.yaxis.title.text
    means = [t for t in fig.data if t.name and "mean" in t.name]
    assert [list(t.y) for t in means] == [[1.0, 6.0], [1.0, 2.0]]
    bands = [t for t in fig.data if t.fill == "tonexty"]
    assert len(bands) == 2


def test_projections_saved_with_params(tmp_path):
    harmful, harmless = torch.rand(3, 4, dtype=torch.float64), torch.rand(3, 4, dtype=torch.float64)
    params = dict(model="m", n_prompts=3, direction=dict(layer=2))
    probe.save_projections(tmp_path / "p.safetensors", harmful, harmless, params)
    got = probe.load_projections(tmp_path / "p.safetensors", params)
    torch.testing.assert_close(got["harmful"], harmful)
    assert probe.load_projections(tmp_path / "p.safetensors", {**params, "n_prompts": 4}) is None
    assert probe.load_projections(tmp_path / "missing.safetensors", params) is None


# --- the notebooks ---------------------------------------------------------------------------


def test_notebooks_are_clean_and_parameterised():
    nbformat = pytest.importorskip("nbformat", reason="the probing extra is not installed (pip install -e '.[test]')")
    for name in NOTEBOOKS:
        nb = nbformat.read(REPO / "notebooks" / name, as_version=4)
        nbformat.validate(nb)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert all(not c.get("outputs") and c.get("execution_count") is None for c in code), f"{name} has outputs"
        params = [c for c in code if "parameters" in c.metadata.get("tags", [])]
        assert len(params) == 1 and params[0] is code[0], (
            f"{name}: the first code cell must be the tagged parameters cell"
        )
        for line in ('MODEL = "embedded"', "N_PROMPTS = 16", "DIRECTION_DIR = None"):
            assert line in params[0].source
        assert "PROBE_N_PROMPTS" in code[1].source


def _write_kernelspec(root: Path) -> Path:
    """A kernelspec that runs this interpreter's ipykernel; JUPYTER_PATH=root makes it visible."""
    spec = root / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(
        json.dumps(
            dict(
                argv=[sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                display_name="refusal-repair (test interpreter)",
                language="python",
            )
        )
    )
    return root


def _notebook_workdir(tmp_path: Path, monkeypatch, modules) -> Path:
    """A working directory for executed notebooks and a kernel on this interpreter; skips without `modules`."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"the probing extra is not installed (missing {', '.join(missing)}); pip install -e '.[test]'")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.setenv("JUPYTER_PATH", str(_write_kernelspec(tmp_path / "jupyter")))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]))
    return work


@pytest.mark.slow
def _execute(name: str, work: Path) -> str:
    """Run notebooks/<name> top to bottom in `work` (the executed copy, outputs included, is written
    there for inspection, also when a cell fails); returns everything its cells printed."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(REPO / "notebooks" / name, as_version=4)
    try:
        NotebookClient(
            nb, kernel_name=KERNEL, timeout=CELL_TIMEOUT, resources={"metadata": {"path": str(work)}}
        ).execute()
    finally:
        nbformat.write(nb, work / name)
    return "\n".join(
        out.get("text", "") for cell in nb.cells if cell.cell_type == "code" for out in cell.get("outputs", [])
    )


def test_probing_notebooks_execute(tmp_path, monkeypatch):
    work = _notebook_workdir(tmp_path, monkeypatch, PROBING_MODULES)

    monkeypatch.setenv("PROBE_N_PROMPTS", "4")
    monkeypatch.setenv("PROBE_N_DIRECTION", "8")
    monkeypatch.delenv("PROBE_DIRECTION_DIR", raising=False)
    monkeypatch.delenv("PROBE_RUN_DIR", raising=False)  # default runs/probe, relative to the temp working dir
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")

    texts, seconds = {}, {}
    for name in NOTEBOOKS:
        start = time.perf_counter()
        texts[name] = _execute(name, work)
        seconds[name] = time.perf_counter() - start
    print("notebook run times:", {k: f"{v:.0f} s" for k, v in seconds.items()})

    run = work / "runs" / "probe"
    for artifact in (
        "direction.safetensors",
        "projections_transformerlens.safetensors",
        "projections_nnsight.safetensors",
        "probe_transformerlens.html",
        "probe_nnsight.html",
    ):
        assert (run / artifact).is_file(), artifact
    for page in ("probe_transformerlens.html", "probe_nnsight.html"):  # plotly.js inside: the page works offline
        html = (run / page).read_text()
        assert 'src="https://cdn.plot.ly' not in html and "plotly.js v" in html, page
    tl, nn = texts[NOTEBOOKS[0]], texts[NOTEBOOKS[1]]
    assert "layer round(0.58 * 24) = 14" in tl
    assert "TransformerLens resid_pre matches the HF hidden states" in tl
    assert "nnsight resid_pre and projections match lm.hooks.capture" in nn
    assert "nnsight projections match the TransformerLens notebook's saved projections" in nn

    from safetensors.torch import load_file

    tl_proj = load_file(str(run / "projections_transformerlens.safetensors"))
    assert tl_proj["harmful"].shape == tl_proj["harmless"].shape == (4, 24)
    # The direction separates the classes where it was read (harmful projects higher).
    assert tl_proj["harmful"][:, 14].mean() > tl_proj["harmless"][:, 14].mean()


def test_linear_probe_notebook_is_clean_and_parameterised():
    nbformat = pytest.importorskip("nbformat", reason="the probing extra is not installed (pip install -e '.[test]')")
    nb = nbformat.read(REPO / "notebooks" / "linear_probe.ipynb", as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in code)
    assert "parameters" in code[0].metadata.get("tags", []) and 'MODEL = "embedded"' in code[0].source
    assert "PROBE_N_TRAIN" in code[1].source and "PROBE_N_TEST" in code[1].source


@pytest.mark.slow
def test_linear_probe_notebook_executes(tmp_path, monkeypatch):
    """The scikit-learn probe notebook on the embedded model: 16 + 16 train, 16 + 16 held-out prompts."""
    work = _notebook_workdir(tmp_path, monkeypatch, ("nbclient", "nbformat", "ipykernel"))

    monkeypatch.setenv("PROBE_N_TRAIN", "16")
    monkeypatch.setenv("PROBE_N_TEST", "16")
    monkeypatch.delenv("PROBE_RUN_DIR", raising=False)
    text = _execute("linear_probe.ipynb", work)
    assert "fitted 24 probes" in text and "the probe is above chance at the direction's layer" in text

    from safetensors.torch import load_file

    saved = load_file(str(work / "runs" / "probe" / "linear_probe.safetensors"))
    assert saved["coef"].shape == (1, 24, 896) and saved["cosine"].shape == (24,)
    # Where the direction is read the probe's weights agree with it in sign (both point towards harm).
    assert saved["cosine"][14] > 0
    assert (work / "runs" / "probe" / "linear_probe.html").is_file()


def test_every_notebook_inlines_plotly():
    """Every figure a notebook writes carries plotly.js inside (include_plotlyjs=True), so its HTML opens offline."""
    nbformat = pytest.importorskip("nbformat", reason="the probing extra is not installed (pip install -e '.[test]')")
    for path in sorted((REPO / "notebooks").glob("*.ipynb")):
        code = [c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]
        writes = [s for s in code if "write_html(" in s or "to_html(" in s]
        assert writes and all("include_plotlyjs=True" in s for s in writes), path.name


# --- compare_variant.ipynb: a compressed variant beside its original ---------------------------


def test_check_comparable_names_every_difference(tiny_qwen2, tiny_llama):
    from lm.loading import LoadedModel

    qwen = LoadedModel(*tiny_qwen2, spec="qwen", path="qwen", name="qwen")
    llama = LoadedModel(*tiny_llama, spec="llama", path="llama", name="llama")
    probe.check_comparable(qwen, qwen)
    with pytest.raises(UserError, match="'llama' is not a variant of 'qwen'") as err:
        probe.check_comparable(qwen, llama)
    assert "model_type qwen2 vs llama" in str(err.value) and "chat templates differ" in str(err.value)


def test_compare_variant_notebook_is_clean_and_parameterised():
    nbformat = pytest.importorskip("nbformat", reason="the probing extra is not installed (pip install -e '.[test]')")
    nb = nbformat.read(REPO / "notebooks" / "compare_variant.ipynb", as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in code)
    assert "parameters" in code[0].metadata.get("tags", [])
    for line in ('ORIGINAL = "embedded"', "VARIANT = ", "DIRECTION_DIR = None", "N_TRAIN = ", "N_TEST = "):
        assert line in code[0].source
    for name in ("ORIGINAL", "VARIANT", "DIRECTION_DIR", "N_TRAIN", "N_TEST", "SEED", "BATCH_SIZE", "RUN_DIR"):
        assert f'"PROBE_{name}"' in code[1].source
    assert "include_plotlyjs=True" in "".join(c.source for c in code)


@pytest.mark.slow
def test_compare_variant_notebook_executes(tmp_path, monkeypatch):
    """The embedded model against a 30% magnitude-pruned copy of it, 16 + 16 train, 16 + 16 held-out prompts."""
    work = _notebook_workdir(tmp_path, monkeypatch, ("nbclient", "nbformat", "ipykernel"))
    import gc

    from compression.checkpoint import save_variant
    from compression.magnitude import prune_magnitude
    from compression.sparsity import SparsityPattern
    from lm.loading import load_model

    start = time.perf_counter()
    loaded = load_model("embedded")
    prune_magnitude(loaded.model, SparsityPattern(0.3))
    save_variant(loaded.model, loaded.tokenizer, tmp_path / "variant", dict(method="magnitude", spec="magnitude:0.3"))
    del loaded
    gc.collect()
    built = time.perf_counter() - start

    monkeypatch.setenv("PROBE_VARIANT", str(tmp_path / "variant"))
    monkeypatch.setenv("PROBE_N_TRAIN", "16")
    monkeypatch.setenv("PROBE_N_TEST", "16")
    for name in ("ORIGINAL", "DIRECTION_DIR", "RUN_DIR"):
        monkeypatch.delenv(f"PROBE_{name}", raising=False)
    text = _execute("compare_variant.ipynb", work)
    print(f"variant built in {built:.0f} s, notebook ran in {time.perf_counter() - start - built:.0f} s")
    for line in (
        "both models share the architecture and the tokenizer",
        "(magnitude:0.3, decoder sparsity ",
        "the original's direction artifact matches its difference of means on this train sample",
        "the original's direction separates its held-out prompts at layer 14",
        "the original's probe is above chance at the direction's layer",
    ):
        assert line in text, line

    run = work / "runs" / "probe" / "compare_variant"
    html = (run / "compare_variant.html").read_text()
    assert 'src="https://cdn.plot.ly' not in html and "plotly.js v" in html  # plotly.js inlined: opens offline
    from safetensors.torch import load_file

    saved = load_file(str(run / "compare_variant.safetensors"))
    assert saved["cosine"].shape == (24,) and saved["direction_variant"].shape == (24, 896)
    assert saved["projection_variant_harmful"].shape == (16, 24) and saved["accuracy_transfer"].shape == (24, 3)
    # Pruning 30% of the smallest weights leaves the direction mostly in place where it is read.
    assert saved["cosine"][14] > 0.5
